//! Sandboxes against a real QEMU booting the real Debian kernel (TCG on this
//! project's machines). Every test checks that its VM leaves nothing behind.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{boot, sh, Footprint};
use forkd_core::CoreError;
use forkd_protocol::client::ClientError;
use forkd_protocol::frame::{write_frame, Header};
use forkd_protocol::{ErrorCode, Kind, MAX_PAYLOAD};
use forkd_vm::VmError;

#[test]
fn boots_the_debian_kernel_and_runs_a_command_in_the_root_disk() {
    let s = boot();
    let fp = Footprint::of(&s);
    let pong = s.ping().unwrap();
    assert!(
        pong.root_disk,
        "commands should run in the busybox root disk"
    );
    assert_eq!(pong.hostname, s.id());
    let out = s
        .exec_collect(sh(
            "uname -r; cat /etc/hostname; test -x /bin/busybox && echo rootfs",
        ))
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[0], common::artifacts().kernel.version);
    assert_eq!(lines.last(), Some(&"rootfs"));
    assert_eq!(out.status.code, Some(0));
    drop(s);
    fp.assert_gone(Duration::from_secs(5));
}

#[test]
fn exit_codes_signals_and_stderr() {
    let s = boot();
    let fp = Footprint::of(&s);
    let out = s
        .exec_collect(sh("echo to-out; echo to-err >&2; exit 42"))
        .unwrap();
    assert_eq!(out.status.code, Some(42));
    assert_eq!(out.stdout, b"to-out\n");
    assert_eq!(out.stderr, b"to-err\n");
    let out = s.exec_collect(sh("kill -KILL $$")).unwrap();
    assert_eq!((out.status.code, out.status.signal), (None, Some(9)));
    assert_eq!(out.status.shell_code(), 137);
    // A missing program is the shell's 127, with one line on stderr.
    let out = s
        .exec_collect(forkd_protocol::ExecRequest {
            argv: vec!["/nope".into()],
            ..Default::default()
        })
        .unwrap();
    assert_eq!(out.status.code, Some(127));
    assert_eq!(out.stderr, b"/nope: command not found\n");
    drop(s);
    fp.assert_gone(Duration::from_secs(5));
}

#[test]
fn ten_megabytes_of_stdout_arrive_intact() {
    let s = boot();
    let fp = Footprint::of(&s);
    // 10 MiB of a known 16-byte line from one process (forks are slow under TCG).
    let out = s
        .exec_collect(sh("yes 0123456789abcde | head -c 10485760"))
        .unwrap();
    assert_eq!(
        out.status.code,
        Some(0),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.stdout.len(), 10 * 1024 * 1024);
    assert!(out.stdout.chunks(16).all(|c| c == b"0123456789abcde\n"));
    drop(s);
    fp.assert_gone(Duration::from_secs(5));
}

#[test]
fn a_hung_command_is_killed_at_its_timeout_and_the_vm_keeps_serving() {
    let s = boot();
    let fp = Footprint::of(&s);
    let mut req = sh("echo begun; sleep 600");
    req.timeout_ms = Some(1500);
    let out = s.exec_collect(req).unwrap();
    assert!(out.status.timed_out);
    assert_eq!(out.status.signal, Some(9));
    assert_eq!(out.stdout, b"begun\n");
    let again = s.exec_collect(sh("echo alive")).unwrap();
    assert_eq!(again.stdout, b"alive\n");
    drop(s);
    fp.assert_gone(Duration::from_secs(5));
}

#[test]
fn files_round_trip_and_are_visible_to_commands() {
    let s = boot();
    let fp = Footprint::of(&s);
    let data: Vec<u8> = (0..1_500_000u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    assert_eq!(
        s.write_file("/root/blob.bin", Some(0o640), &data[..])
            .unwrap(),
        data.len() as u64
    );
    let out = s
        .exec_collect(sh("wc -c < /root/blob.bin; stat -c %a /root/blob.bin"))
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!("{}\n640\n", data.len())
    );
    let mut back = Vec::new();
    s.read_file("/root/blob.bin", &mut back).unwrap();
    assert!(back == data, "read-back differs");
    match s.read_file("/no/such/file", Vec::new()) {
        Err(CoreError::Vm(VmError::Agent(ClientError::Agent(r)))) => {
            assert_eq!(r.code, ErrorCode::NotFound)
        }
        other => panic!("expected not-found, got {other:?}"),
    }
    drop(s);
    fp.assert_gone(Duration::from_secs(5));
}

#[test]
fn malformed_frames_are_answered_and_the_agent_keeps_serving() {
    let s = boot();
    let fp = Footprint::of(&s);
    let agent = s.vm().agent();
    agent
        .send_raw(b"\x00garbage that is not a frame\xff")
        .unwrap();
    let mut bad = Vec::new();
    write_frame(
        &mut bad,
        Kind::Request,
        7001,
        b"{\"op\":\"exec\",\"argv\":42}",
    )
    .unwrap();
    agent.send_raw(&bad).unwrap();
    match agent.wait_reply(7001, Duration::from_secs(20)) {
        Err(ClientError::Agent(r)) => assert_eq!(r.code, ErrorCode::BadFrame, "{}", r.message),
        other => panic!("{other:?}"),
    }
    let mut huge = Header::encode(Kind::Request, 7002, MAX_PAYLOAD + 1).to_vec();
    huge.resize(huge.len() + MAX_PAYLOAD as usize + 1, b'x');
    agent.send_raw(&huge).unwrap();
    match agent.wait_reply(7002, Duration::from_secs(30)) {
        Err(ClientError::Agent(r)) => assert!(r.message.contains("larger than"), "{}", r.message),
        other => panic!("{other:?}"),
    }
    assert_eq!(s.exec_collect(sh("echo fine")).unwrap().stdout, b"fine\n");
    drop(s);
    fp.assert_gone(Duration::from_secs(5));
}

#[test]
fn qemu_killed_mid_exec_is_a_clear_error_and_leaves_nothing() {
    let s = Arc::new(boot());
    let fp = Footprint::of(&s);
    let s2 = Arc::clone(&s);
    let h = std::thread::spawn(move || s2.exec_collect(sh("echo started; sleep 600")));
    std::thread::sleep(Duration::from_millis(1500));
    // SAFETY: signalling our own child QEMU.
    unsafe { libc::kill(fp.pid as i32, libc::SIGKILL) };
    let err = h.join().unwrap().unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, CoreError::Vm(VmError::Died { .. })), "{msg}");
    assert!(
        msg.contains("killed by signal 9") && msg.contains("sleep 600"),
        "{msg}"
    );
    drop(Arc::try_unwrap(s).ok().expect("sole owner"));
    fp.assert_gone(Duration::from_secs(5));
}

#[test]
fn clean_shutdown_powers_the_guest_off() {
    let s = boot();
    let fp = Footprint::of(&s);
    s.exec_collect(sh("echo data > /root/f")).unwrap();
    assert_eq!(
        s.shutdown(Duration::from_secs(20)),
        forkd_vm::vm::Shutdown::PoweredOff
    );
    fp.assert_gone(Duration::from_secs(5));
}

#[test]
fn qmp_reports_status_and_can_pause_and_resume() {
    let s = boot();
    let fp = Footprint::of(&s);
    assert_eq!(s.vm().qmp().status().unwrap(), "running");
    s.vm().qmp().stop().unwrap();
    assert_eq!(s.vm().qmp().status().unwrap(), "paused");
    // A paused guest does not answer; it does again once resumed.
    assert!(matches!(
        s.vm().agent().ping(Duration::from_millis(500)),
        Err(ClientError::Timeout(_))
    ));
    s.vm().qmp().cont().unwrap();
    s.ping().unwrap();
    drop(s);
    fp.assert_gone(Duration::from_secs(5));
}

#[test]
fn stdin_env_and_cwd_reach_the_command() {
    let s = boot();
    let fp = Footprint::of(&s);
    let mut req = sh("echo \"$A-$B\"; pwd; tr a-z A-Z");
    req.env = vec![("A".into(), "one".into()), ("B".into(), "two".into())];
    req.cwd = Some("/etc".into());
    let input: Box<dyn std::io::Read + Send> = Box::new(std::io::Cursor::new(b"shout\n".to_vec()));
    let mut out = Vec::new();
    let status = s
        .exec(req, Some(input), |_, b| out.extend_from_slice(b))
        .unwrap();
    assert_eq!(status.code, Some(0));
    assert_eq!(String::from_utf8_lossy(&out), "one-two\n/etc\nSHOUT\n");
    drop(s);
    fp.assert_gone(Duration::from_secs(5));
}

#[test]
fn a_kernel_qemu_cannot_load_is_a_clear_boot_error_and_leaves_nothing() {
    // Its own runtime directory: the other tests of this file boot VMs in
    // the shared one at the same time, and their run dirs are not leaks.
    let shared = forkd_core::Env::from_process();
    let env = forkd_core::Env {
        home: shared.home.clone(),
        runtime: std::env::temp_dir().join(format!("forkd-bogus-run-{}", std::process::id())),
    };
    let mut a = common::artifacts().clone();
    let bogus = std::env::temp_dir().join(format!("forkd-bogus-kernel-{}", std::process::id()));
    std::fs::write(&bogus, b"this is not a bzImage").unwrap();
    a.kernel.vmlinuz = bogus.clone();
    let before: Vec<_> = std::fs::read_dir(env.vms_dir())
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    let err = match forkd_core::Sandbox::boot(&env, &a, &forkd_core::BootOptions::default()) {
        Ok(_) => panic!("booted a bogus kernel"),
        Err(e) => e,
    };
    let msg = err.to_string();
    assert!(
        matches!(err, CoreError::Vm(VmError::ExitedDuringBoot { .. })),
        "{msg}"
    );
    assert!(msg.contains("QEMU said"), "{msg}");
    std::fs::remove_file(bogus).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let after: Vec<_> = std::fs::read_dir(env.vms_dir())
            .map(|d| d.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        let new: Vec<_> = after.iter().filter(|p| !before.contains(p)).collect();
        if new.is_empty() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "leaked run dirs {new:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = std::fs::remove_dir_all(&env.runtime);
}

#[test]
fn guest_time_runs_at_host_speed() {
    let s = boot();
    let fp = Footprint::of(&s);
    // The difference between `sleep 3` and `sleep 0` cancels the exec's own
    // overhead; what is left is three guest seconds in host time.
    let timed = |script: &str| {
        let t = std::time::Instant::now();
        let out = s.exec_collect(sh(script)).unwrap();
        assert_eq!(out.status.code, Some(0));
        t.elapsed().as_secs_f64()
    };
    let mut diffs: Vec<f64> = (0..3)
        .map(|_| timed("sleep 3") - timed("sleep 0"))
        .collect();
    diffs.sort_by(f64::total_cmp);
    let median = diffs[1];
    assert!(
        (2.85..=3.15).contains(&median),
        "a guest `sleep 3` took {median:.3} s of host time (samples {diffs:?})"
    );
    drop(s);
    fp.assert_gone(Duration::from_secs(5));
}
