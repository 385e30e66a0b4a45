//! Agent processes (`ProcStart` and friends) against the real client over a
//! socketpair: real processes on this host, no VM.

mod common;

use std::time::{Duration, Instant};

use common::Agent;
use forkd_protocol::client::{AttachEvent, Attachment, ClientError};
use forkd_protocol::{AttachOptions, ErrorCode, ExitStatus, ProcSelector, ProcSpec, PtySize};

const T: Option<Duration> = Some(Duration::from_secs(20));

/// Follows an attachment to its end: (stdout, stderr, pty, dropped, status).
fn collect(mut a: Attachment) -> (Vec<u8>, Vec<u8>, Vec<u8>, u64, Option<ExitStatus>) {
    let (mut out, mut err, mut pty, mut dropped) = (Vec::new(), Vec::new(), Vec::new(), 0);
    loop {
        match a.next(T).unwrap() {
            AttachEvent::Stdout(b) => out.extend(b),
            AttachEvent::Stderr(b) => err.extend(b),
            AttachEvent::Pty(b) => pty.extend(b),
            AttachEvent::Dropped(n) => dropped += n,
            AttachEvent::Ended(s) => return (out, err, pty, dropped, Some(s)),
            AttachEvent::Detached => return (out, err, pty, dropped, None),
        }
    }
}

fn agent_error(e: ClientError) -> forkd_protocol::ErrorReply {
    match e {
        ClientError::Agent(r) => r,
        other => panic!("expected an agent error, got {other}"),
    }
}

#[test]
fn a_started_process_streams_output_and_reports_its_end() {
    let agent = Agent::new(None);
    let c = agent.connect();
    let mut spec = ProcSpec::shell("echo out; echo err >&2; echo \"$GREETING\"; pwd; exit 3");
    spec.env = vec![("GREETING".into(), "hi there".into())];
    spec.cwd = Some("/tmp".into());
    spec.tag = Some("job".into());
    let a = c.proc_start_attached(spec, true).unwrap();
    assert_eq!(a.info().tag.as_deref(), Some("job"));
    assert!(a.info().pid > 0);
    let (out, err, _, dropped, status) = collect(a);
    assert_eq!(String::from_utf8_lossy(&out), "out\nhi there\n/tmp\n");
    assert_eq!(err, b"err\n");
    assert_eq!(dropped, 0);
    assert_eq!(status.unwrap().code, Some(3));
}

#[test]
fn output_streams_as_it_happens() {
    let agent = Agent::new(None);
    let c = agent.connect();
    // The process cannot go past `read` until the test has seen its first
    // line: output that was not streamed as written would never arrive.
    let mut spec = ProcSpec::shell("echo first; read x; echo second");
    spec.stdin = true;
    let mut a = c.proc_start_attached(spec, true).unwrap();
    match a.next(T).unwrap() {
        AttachEvent::Stdout(b) => assert_eq!(b, b"first\n"),
        other => panic!("{other:?}"),
    }
    c.proc_input(a.info().pid, b"go\n", false).unwrap();
    let (out, _, _, _, status) = collect(a);
    assert_eq!(out, b"second\n");
    assert_eq!(status.unwrap().code, Some(0));
}

#[test]
fn a_process_outlives_its_session_and_a_later_one_attaches_to_it() {
    let agent = Agent::new(None);
    let c1 = agent.connect();
    let mut spec = ProcSpec::shell("echo early; read line; echo \"got $line\"; echo late");
    spec.stdin = true;
    let info = c1.proc_start(spec).unwrap();
    let no_stdin = c1.proc_start(ProcSpec::shell("sleep 30")).unwrap();
    // The host goes away (the daemon closes idle sessions).
    drop(c1);
    std::thread::sleep(Duration::from_millis(300));
    let c2 = agent.connect();
    let listed = c2.proc_list().unwrap();
    let me = listed.iter().find(|p| p.pid == info.pid).unwrap();
    assert!(me.exit.is_none() && me.stdin);
    // A late attachment with replay sees what was written before it came.
    let a = c2
        .proc_attach(
            info.pid,
            AttachOptions {
                replay: true,
                backpressure: false,
            },
        )
        .unwrap();
    assert_eq!(c2.proc_input(info.pid, b"x\n", false).unwrap(), 2);
    let (out, _, _, _, status) = collect(a);
    assert_eq!(String::from_utf8_lossy(&out), "early\ngot x\nlate\n");
    assert_eq!(status.unwrap().code, Some(0));
    // A process without a stdin pipe refuses input with its own code.
    let e = c2.proc_input(no_stdin.pid, b"x\n", false).unwrap_err();
    assert_eq!(agent_error(e).code, ErrorCode::NoStdin);
    c2.proc_signal(no_stdin.pid, libc::SIGKILL).unwrap();

    // Input in pieces, then closing stdin ends `cat`.
    let mut spec = ProcSpec::shell("cat");
    spec.stdin = true;
    let cat = c2.proc_start(spec).unwrap();
    assert_eq!(c2.proc_input(cat.pid, b"hello\n", false).unwrap(), 6);
    let mut input = c2.proc_input_stream(cat.pid, true).unwrap();
    input.send(b"a").unwrap();
    input.send(b"b\n").unwrap();
    assert_eq!(input.finish().unwrap(), 3);
    let a = c2
        .proc_attach(
            ProcSelector::Pid(cat.pid),
            AttachOptions {
                replay: true,
                backpressure: false,
            },
        )
        .unwrap();
    let (out, _, _, _, status) = collect(a);
    assert_eq!(out, b"hello\nab\n");
    assert_eq!(status.unwrap().code, Some(0));
    // Closing an ended process's stdin is not an error (idempotent).
    c2.proc_close_stdin(cat.pid).unwrap();
}

#[test]
fn signals_reach_the_whole_group_and_waits_report_them() {
    let agent = Agent::new(None);
    let c = agent.connect();
    // bash -c style: the shell waits for a child; both must die.
    let p = c.proc_start(ProcSpec::shell("sleep 60 & wait")).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    c.proc_signal(p.pid, libc::SIGKILL).unwrap();
    let status = c.proc_wait(p.pid, T).unwrap();
    assert_eq!((status.code, status.signal), (None, Some(9)));
    // Signalling an ended process is NotFound (E2B's kill() -> False).
    let e = c.proc_signal(p.pid, libc::SIGKILL).unwrap_err();
    assert_eq!(agent_error(e).code, ErrorCode::NotFound);
    let e = c.proc_signal(999_999, libc::SIGKILL).unwrap_err();
    assert_eq!(agent_error(e).code, ErrorCode::NotFound);
}

#[test]
fn a_process_is_killed_at_its_timeout() {
    let agent = Agent::new(None);
    let c = agent.connect();
    let mut spec = ProcSpec::shell("echo started; sleep 30");
    spec.timeout_ms = Some(400);
    let a = c.proc_start_attached(spec, false).unwrap();
    let started = Instant::now();
    let (out, _, _, _, status) = collect(a);
    let status = status.unwrap();
    assert_eq!(out, b"started\n");
    assert!(status.timed_out);
    assert_eq!(status.signal, Some(9));
    assert!(started.elapsed() < Duration::from_secs(10));
}

#[test]
fn a_chatty_process_without_readers_keeps_only_its_backlog() {
    let agent = Agent::new(None);
    let c = agent.connect();
    // 4 MiB of output into a 64 KiB backlog, with nobody attached.
    let mut spec = ProcSpec::shell("head -c 4194304 /dev/zero | tr '\\0' x; echo; echo tail-end");
    spec.backlog_bytes = Some(64 * 1024);
    let p = c.proc_start(spec).unwrap();
    let status = c.proc_wait(p.pid, T).unwrap();
    assert_eq!(status.code, Some(0));
    let a = c
        .proc_attach(
            p.pid,
            AttachOptions {
                replay: true,
                backpressure: false,
            },
        )
        .unwrap();
    let (out, _, _, _, _) = collect(a);
    // What is left is the newest 64 KiB, ending with the last line.
    assert_eq!(out.len(), 64 * 1024);
    assert!(out.ends_with(b"\ntail-end\n"));
}

#[test]
fn a_slow_attachment_gets_a_gap_marker_but_a_backpressure_one_loses_nothing() {
    let agent = Agent::new(None);
    let c = agent.connect();
    let lines = |n: u32| {
        format!("i=0; while [ $i -lt {n} ]; do echo line-$i-xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx; i=$((i+1)); done")
    };
    // Lossy: the attachment reads nothing until the process has ended, and
    // the process writes 1.9 MB, far more than the stream's flow-control
    // window (forkd_protocol::WINDOW) lets the agent send unread: the
    // follower stalls and the 8 KiB backlog runs over, however the host's
    // scheduler interleaves the two (with less output than the window, a
    // slow follower sometimes sent everything in time).
    assert!(30_000 * 64 > 4 * forkd_protocol::WINDOW as usize);
    let mut spec = ProcSpec::shell(&lines(30_000));
    spec.backlog_bytes = Some(8192);
    let mut a = c.proc_start_attached(spec.clone(), false).unwrap();
    let pid = a.info().pid;
    c.proc_wait(pid, T).unwrap();
    let mut dropped = 0;
    let mut out = Vec::new();
    loop {
        match a.next(T).unwrap() {
            AttachEvent::Stdout(b) => out.extend(b),
            AttachEvent::Dropped(n) => dropped += n,
            AttachEvent::Ended(_) => break,
            other => panic!("{other:?}"),
        }
    }
    assert!(dropped > 0, "nothing was dropped");
    assert!(out.ends_with(b"line-29999-xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx\n"));
    // With backpressure the process waits for the reader: every line arrives.
    spec = ProcSpec::shell(&lines(3000));
    spec.backlog_bytes = Some(8192);
    let a = c.proc_start_attached(spec, true).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let (out, _, _, dropped, status) = collect(a);
    assert_eq!(dropped, 0);
    assert_eq!(status.unwrap().code, Some(0));
    let text = String::from_utf8(out).unwrap();
    assert_eq!(text.lines().count(), 3000);
    assert!(text
        .lines()
        .enumerate()
        .all(|(i, l)| l.starts_with(&format!("line-{i}-"))));
}

#[test]
fn a_terminal_process_echoes_input_and_takes_a_resize() {
    let agent = Agent::new(None);
    let c = agent.connect();
    let mut spec = ProcSpec::new([
        "/bin/sh",
        "-c",
        "stty size; read x; echo \"[$x]\"; stty size",
    ]);
    spec.pty = Some(PtySize { cols: 80, rows: 24 });
    let mut a = c.proc_start_attached(spec, true).unwrap();
    assert!(a.info().pty);
    let pid = a.info().pid;
    // Wait for the first size line before resizing.
    let mut seen = Vec::new();
    while !String::from_utf8_lossy(&seen).contains("24 80") {
        match a.next(T).unwrap() {
            AttachEvent::Pty(b) => seen.extend(b),
            other => panic!("{other:?} after {seen:?}"),
        }
    }
    c.proc_resize(
        pid,
        PtySize {
            cols: 100,
            rows: 30,
        },
    )
    .unwrap();
    c.proc_input(pid, b"hello\n", false).unwrap();
    // A terminal's input cannot be closed (send ^D instead).
    let e = c.proc_close_stdin(pid).unwrap_err();
    assert_eq!(agent_error(e).code, ErrorCode::BadRequest);
    let (_, _, pty, _, status) = collect(a);
    let text = String::from_utf8_lossy(&pty);
    // The terminal echoes the input, then the script's lines (CRLF).
    assert!(text.contains("hello\r\n"), "{text:?}");
    assert!(text.contains("[hello]\r\n"), "{text:?}");
    assert!(text.contains("30 100"), "{text:?}");
    assert_eq!(status.unwrap().code, Some(0));
}

#[test]
fn tags_users_and_errors() {
    let agent = Agent::new(None);
    let c = agent.connect();
    let mut spec = ProcSpec::shell("sleep 30");
    spec.tag = Some("server".into());
    let p = c.proc_start(spec.clone()).unwrap();
    // A second running process may not take the same tag.
    let e = c.proc_start(spec).unwrap_err();
    assert_eq!(agent_error(e).code, ErrorCode::AlreadyExists);
    c.proc_signal(ProcSelector::Tag("server".into()), libc::SIGKILL)
        .unwrap();
    c.proc_wait(p.pid, T).unwrap();
    // A missing program and a missing cwd are different errors.
    let e = c
        .proc_start(ProcSpec::new(["no-such-program-here"]))
        .unwrap_err();
    assert_eq!(agent_error(e).code, ErrorCode::CommandNotFound);
    let mut spec = ProcSpec::new(["true"]);
    spec.cwd = Some("/no/such/dir".into());
    let e = agent_error(c.proc_start(spec).unwrap_err());
    assert_eq!(e.code, ErrorCode::CwdNotFound);
    assert!(e.message.contains("/no/such/dir"), "{}", e.message);
    let mut spec = ProcSpec::new(["true"]);
    spec.user = Some("no-such-user-anywhere".into());
    assert_eq!(
        agent_error(c.proc_start(spec).unwrap_err()).code,
        ErrorCode::UnknownUser
    );
    let e = c
        .proc_attach(424_242, AttachOptions::default())
        .unwrap_err();
    assert_eq!(agent_error(e).code, ErrorCode::NotFound);
    // A numeric user runs as that uid, with HOME, USER and LOGNAME set.
    let mut spec = ProcSpec::shell("id -u; id -g; echo $HOME $USER");
    spec.user = Some("4242:4243".into());
    let a = c.proc_start_attached(spec, true).unwrap();
    assert_eq!((a.info().uid, a.info().gid), (4242, 4243));
    let (out, err, _, _, status) = collect(a);
    assert_eq!(
        status.unwrap().code,
        Some(0),
        "{}",
        String::from_utf8_lossy(&err)
    );
    assert_eq!(String::from_utf8_lossy(&out), "4242\n4243\n/ 4242\n");
}

#[test]
fn the_sandbox_environment_reaches_every_later_process() {
    let agent = Agent::new(None);
    let c = agent.connect();
    c.set_env(&[
        ("SANDBOX_VAR".into(), "from-create".into()),
        ("B".into(), "1".into()),
    ])
    .unwrap();
    let mut spec = ProcSpec::shell("echo $SANDBOX_VAR $B");
    spec.env = vec![("B".into(), "2".into())];
    let (out, _, _, _, _) = collect(c.proc_start_attached(spec, true).unwrap());
    assert_eq!(out, b"from-create 2\n");
    // Execs too, and from a later session.
    drop(c);
    let c = agent.connect();
    let out = c
        .exec_collect(
            forkd_protocol::ExecRequest {
                argv: vec!["sh".into(), "-c".into(), "echo $SANDBOX_VAR".into()],
                ..Default::default()
            },
            None,
        )
        .unwrap();
    assert_eq!(out.stdout, b"from-create\n");
    let e = c.set_env(&[("A=B".into(), "x".into())]).unwrap_err();
    assert_eq!(agent_error(e).code, ErrorCode::BadRequest);
}

#[test]
fn detaching_leaves_the_process_running_and_a_wait_can_be_cancelled() {
    let agent = Agent::new(None);
    let c = agent.connect();
    let a = c
        .proc_start_attached(ProcSpec::shell("sleep 30"), true)
        .unwrap();
    let pid = a.info().pid;
    a.detach(Duration::from_secs(5)).unwrap();
    assert!(c
        .proc_list()
        .unwrap()
        .iter()
        .any(|p| p.pid == pid && p.exit.is_none()));
    // A wait that times out host-side is cancelled on the agent; the
    // process goes on.
    let e = c
        .proc_wait(pid, Some(Duration::from_millis(300)))
        .unwrap_err();
    assert!(matches!(e, ClientError::Timeout(_)), "{e}");
    c.proc_signal(pid, libc::SIGTERM).unwrap();
    assert_eq!(c.proc_wait(pid, T).unwrap().signal, Some(15));
}
