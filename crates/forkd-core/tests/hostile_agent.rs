//! A hostile process inside a real guest (TCG here) attacks the agent
//! channel with `forkd-hostile` (built with the agent): it takes the agent's
//! port out of PID 1 and writes a header announcing 4 GiB, half a frame, a
//! slow trickle or 30 MB of garbage, stops the agent, or kills it. Each host
//! side wait must end on time with a clear error, the test process's memory
//! must stay bounded, a sandbox next to it must not notice, and a new
//! connection must work once the attack is over (or say the agent is gone).
//!
//! The bounds are generous: these are correctness tests under a slow
//! emulator on a shared machine, not benchmarks.

mod common;

use std::os::unix::net::UnixStream;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::{boot, sh, Footprint};
use forkd_core::{CoreError, Sandbox};
use forkd_protocol::client::{AgentClient, ClientError, Limits};
use forkd_protocol::ExecRequest;
use forkd_vm::VmError;

/// One guest under attack at a time: each test boots VMs of its own.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// Slack for a slow, shared machine on top of each bound.
const SLACK: Duration = Duration::from_secs(20);

const TOOL: &str = "/root/forkd-hostile";

fn upload_tool(agent: &AgentClient) {
    let path = forkd_core::artifacts::find_agent(None)
        .unwrap()
        .with_file_name("forkd-hostile");
    let bin = std::fs::read(&path).expect("forkd-hostile (scripts/build-agent.sh builds it)");
    agent.write_file(TOOL, Some(0o755), &bin[..]).unwrap();
}

/// Starts `forkd-hostile ARGS` in the guest after `delay_s`, in the
/// background, killed after `life_s` at the latest.
fn launch(agent: &AgentClient, delay_s: u32, life_s: u32, args: &str) {
    let script =
        format!("(sleep {delay_s}; timeout {life_s} {TOOL} {args}) >> /tmp/hostile.log 2>&1 &");
    let out = agent.exec_collect(sh(&script), None).unwrap();
    assert_eq!(out.status.code, Some(0), "launching `{args}`");
}

fn sleeper(timeout: Duration) -> ExecRequest {
    let mut req = sh("sleep 600");
    req.timeout_ms = Some(timeout.as_millis() as u64);
    req
}

/// A new session on the sandbox's agent socket (QEMU takes one client at a
/// time: the previous one must be closed).
fn reconnect(s: &Sandbox) -> AgentClient {
    let stream = UnixStream::connect(&s.vm().config().agent_socket).unwrap();
    AgentClient::connect(stream, Duration::from_secs(60)).expect("a new session after the attack")
}

/// Waits until `agent`'s session closes; returns the reason.
fn wait_closed(agent: &AgentClient, within: Duration) -> String {
    let deadline = Instant::now() + within;
    loop {
        if let Some(r) = agent.closed_reason() {
            return r;
        }
        assert!(
            Instant::now() < deadline,
            "the session did not close within {within:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The bystander answers as usual.
fn bystander_ok(b: &Sandbox) {
    let out = b.exec_collect(sh("echo unaffected")).unwrap();
    assert_eq!(out.stdout, b"unaffected\n");
}

fn works(agent: &AgentClient) {
    agent.ping(Duration::from_secs(30)).unwrap();
    let out = agent.exec_collect(sh("echo back"), None).unwrap();
    assert_eq!(out.stdout, b"back\n");
}

/// Peak resident memory of this process in KiB.
fn vm_hwm_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM in /proc/self/status")
}

#[test]
fn forged_frames_garbage_and_a_stopped_agent_cannot_wedge_the_host() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let grace = Limits::default().exec_grace;
    let stall = Limits::default().frame_stall;
    let s = boot();
    let b = boot();
    let (fp, fpb) = (Footprint::of(&s), Footprint::of(&b));
    let hwm_start = vm_hwm_kib();
    upload_tool(s.vm().agent());

    // 1. `FK 01 05 <id> ffffffff` for the exec in progress: reported and
    // scanned past; the agent's own exit report still gets through.
    let id = s.vm().agent().reserve_id();
    launch(s.vm().agent(), 2, 30, &format!("header {id}"));
    let t = Instant::now();
    let st = s
        .exec_as(id, sleeper(Duration::from_secs(8)), None, |_, _| {})
        .expect("a forged 4 GiB header swallows nothing");
    let took = t.elapsed();
    eprintln!("header: exec ended in {took:?}: {st:?}");
    assert!(st.timed_out, "{st:?}");
    assert!(took < Duration::from_secs(8) + grace + SLACK, "{took:?}");
    assert_eq!(s.vm().agent().closed_reason(), None);
    bystander_ok(&b);

    // 2. Half a frame (a header announcing 1 MiB, 100 bytes of it): the
    // exec ends at its timeout + grace; the session closes after the stall
    // bound; a new session works.
    let id = s.vm().agent().reserve_id();
    launch(s.vm().agent(), 2, 30, &format!("half {id}"));
    let t = Instant::now();
    let r = s.exec_as(id, sleeper(Duration::from_secs(8)), None, |_, _| {});
    let took = t.elapsed();
    eprintln!("half: exec ended in {took:?}: {r:?}");
    assert!(
        matches!(
            r,
            Err(CoreError::Vm(VmError::Agent(
                ClientError::ExitNotReported { .. } | ClientError::Closed(_)
            )))
        ),
        "{r:?}"
    );
    assert!(took < Duration::from_secs(8) + grace + SLACK, "{took:?}");
    let reason = wait_closed(s.vm().agent(), stall + SLACK);
    eprintln!("half: session closed: {reason}");
    assert!(reason.contains("incomplete"), "{reason}");
    bystander_ok(&b);
    let c1 = reconnect(&s);
    works(&c1);

    // 3. 30 MB of garbage: the session closes (no more than a frame's worth
    // of garbage is tolerated), the exec in progress ends at once.
    launch(&c1, 2, 25, "garbage 30000000");
    let launched = Instant::now();
    let t = Instant::now();
    let r = c1.exec(sleeper(Duration::from_secs(10)), None, |_, _| {});
    let took = t.elapsed();
    eprintln!("garbage: exec ended in {took:?}: {r:?}");
    assert!(
        matches!(
            r,
            Err(ClientError::Closed(_) | ClientError::ExitNotReported { .. })
        ),
        "{r:?}"
    );
    assert!(took < Duration::from_secs(10) + grace + SLACK, "{took:?}");
    let reason = wait_closed(&c1, stall + SLACK);
    eprintln!("garbage: session closed: {reason}");
    assert!(reason.contains("not agent frames"), "{reason}");
    bystander_ok(&b);
    // The attacker runs until its `timeout`; then the agent is back.
    std::thread::sleep(Duration::from_secs(28).saturating_sub(launched.elapsed()));
    let c2 = reconnect(&s);
    works(&c2);

    // 4. A slow trickle of a frame for the exec in progress: same as half a
    // frame, spread over time.
    let id = c2.reserve_id();
    launch(&c2, 2, 25, &format!("trickle {id} 25"));
    let launched = Instant::now();
    let t = Instant::now();
    let r = c2.exec_as(id, sleeper(Duration::from_secs(8)), None, |_, _| {});
    let took = t.elapsed();
    eprintln!("trickle: exec ended in {took:?}: {r:?}");
    assert!(
        matches!(
            r,
            Err(ClientError::ExitNotReported { .. } | ClientError::Closed(_))
        ),
        "{r:?}"
    );
    assert!(took < Duration::from_secs(8) + grace + SLACK, "{took:?}");
    let reason = wait_closed(&c2, stall + SLACK);
    eprintln!("trickle: session closed: {reason}");
    assert!(reason.contains("incomplete"), "{reason}");
    std::thread::sleep(Duration::from_secs(30).saturating_sub(launched.elapsed()));
    let c3 = reconnect(&s);
    works(&c3);
    bystander_ok(&b);

    // 5. The agent stopped (every thread, ptrace) for 30 s: a timed exec and
    // a ping end on time, the session stays open, and once the agent runs
    // again the same session serves.
    launch(&c3, 2, 60, "stall 30");
    std::thread::sleep(Duration::from_secs(6));
    let t = Instant::now();
    let mut req = sh("echo never");
    req.timeout_ms = Some(3000);
    let r = c3.exec(req, None, |_, _| {});
    let took = t.elapsed();
    eprintln!("stall: exec ended in {took:?}: {r:?}");
    assert!(
        matches!(r, Err(ClientError::ExitNotReported { .. })),
        "{r:?}"
    );
    assert!(took >= Duration::from_secs(3) + grace, "{took:?}");
    assert!(took < Duration::from_secs(3) + grace + SLACK, "{took:?}");
    let t = Instant::now();
    let p = c3.ping(Duration::from_secs(2));
    assert!(matches!(p, Err(ClientError::Timeout(_))), "{p:?}");
    assert!(t.elapsed() < Duration::from_secs(2) + SLACK);
    bystander_ok(&b);
    let deadline = Instant::now() + Duration::from_secs(60);
    while c3.ping(Duration::from_secs(5)).is_err() {
        assert!(Instant::now() < deadline, "the agent never came back");
    }
    assert_eq!(c3.closed_reason(), None);
    works(&c3);

    let log = c3
        .exec_collect(sh("cat /tmp/hostile.log"), None)
        .unwrap()
        .stdout;
    eprintln!("{}", String::from_utf8_lossy(&log));
    let hwm_end = vm_hwm_kib();
    eprintln!("VmHWM of the test process: {hwm_start} KiB before the attacks, {hwm_end} KiB after");
    assert!(
        hwm_end - hwm_start < 64 * 1024,
        "{hwm_start} -> {hwm_end} KiB"
    );
    drop((c1, c2, c3));
    drop((s, b));
    fp.assert_gone(Duration::from_secs(5));
    fpb.assert_gone(Duration::from_secs(5));
}

#[test]
fn a_killed_agent_ends_the_wait_and_is_reported_gone() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let s = boot();
    let b = boot();
    let (fp, fpb) = (Footprint::of(&s), Footprint::of(&b));
    upload_tool(s.vm().agent());
    launch(s.vm().agent(), 2, 30, "kill");
    let t = Instant::now();
    let r = s.exec_as(
        s.vm().agent().reserve_id(),
        sleeper(Duration::from_secs(60)),
        None,
        |_, _| {},
    );
    let took = t.elapsed();
    eprintln!("kill: exec ended in {took:?}: {r:?}");
    // PID 1 exiting panics the guest kernel and QEMU exits (-no-reboot).
    assert!(
        matches!(r, Err(CoreError::Vm(VmError::Died { .. }))),
        "{r:?}"
    );
    assert!(took < Duration::from_secs(2) + SLACK, "{took:?}");
    let again = s.exec_collect(sh("echo anyone"));
    assert!(
        matches!(
            again,
            Err(CoreError::Vm(
                VmError::Died { .. } | VmError::Agent(ClientError::Closed(_))
            ))
        ),
        "{again:?}"
    );
    eprintln!("kill: next exec: {}", again.unwrap_err());
    bystander_ok(&b);
    drop((s, b));
    fp.assert_gone(Duration::from_secs(5));
    fpb.assert_gone(Duration::from_secs(5));
}
