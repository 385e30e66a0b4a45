//! A chatty agent process cannot grow the agent's or the host's memory: its
//! output lives in a bounded backlog, a slow attachment loses bytes instead
//! of queueing them, and the host holds at most a window per stream. One
//! test in its own binary, so that the process's peak RSS (`VmHWM`, agent
//! and client together) is this test's alone.

mod common;

use std::time::{Duration, Instant};

use common::Agent;
use forkd_protocol::client::AttachEvent;
use forkd_protocol::{AttachOptions, ProcSpec};

fn vm_hwm_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM in /proc/self/status")
}

#[test]
fn chatty_processes_and_slow_readers_leave_memory_bounded() {
    let agent = Agent::new(None);
    let c = agent.connect();
    let before = vm_hwm_kib();
    // Four processes writing as fast as they can, 1 MiB backlog each.
    let mut pids = Vec::new();
    for _ in 0..4 {
        let p = c
            .proc_start(ProcSpec::new([
                "sh",
                "-c",
                "yes 0123456789abcdefghijklmnopqrstuvwxyz",
            ]))
            .unwrap();
        pids.push(p.pid);
    }
    // A slow attachment: reads a chunk now and then, never keeps up.
    let mut a = c
        .proc_attach(
            pids[0],
            AttachOptions {
                replay: true,
                backpressure: false,
            },
        )
        .unwrap();
    let until = Instant::now() + Duration::from_secs(4);
    let (mut got, mut lost) = (0u64, 0u64);
    while Instant::now() < until {
        match a.next(Some(Duration::from_secs(5))).unwrap() {
            AttachEvent::Stdout(b) => got += b.len() as u64,
            AttachEvent::Dropped(n) => lost += n,
            other => panic!("{other:?}"),
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let grew_mib = (vm_hwm_kib().saturating_sub(before)) / 1024;
    for pid in &pids {
        c.proc_signal(*pid, libc::SIGKILL).unwrap();
    }
    eprintln!("read {got} bytes, lost {lost}, peak RSS grew by {grew_mib} MiB");
    assert!(lost > 0, "the slow reader lost nothing (read {got} bytes)");
    // Four 1 MiB backlogs, a window in flight, thread stacks and buffers.
    assert!(grew_mib < 48, "peak RSS grew by {grew_mib} MiB");
}
