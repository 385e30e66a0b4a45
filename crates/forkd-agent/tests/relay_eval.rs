//! TCP relays, the persistent Python interpreter (eval) and the E2B code
//! interpreter, against the real client over a socketpair. The agent runs
//! in this host's root, so the relay reaches this host's loopback and eval
//! runs this host's `/usr/bin/python3`.

mod common;

use std::io::{Read, Write};
use std::net::TcpListener;
use std::sync::Arc;
use std::time::Duration;

use common::{tempdir, Agent};
use forkd_protocol::client::ClientError;
use forkd_protocol::ErrorCode;

fn code(e: ClientError) -> ErrorCode {
    match e {
        ClientError::Agent(r) => r.code,
        other => panic!("expected an agent error, got {other}"),
    }
}

/// An echo server on a free loopback port: uppercases what it reads until
/// EOF, then closes. Returns the port.
fn echo_server() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for conn in l.incoming() {
            let Ok(mut s) = conn else { return };
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 65536];
                loop {
                    let n = match s.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    buf[..n].make_ascii_uppercase();
                    if s.write_all(&buf[..n]).is_err() {
                        return;
                    }
                }
                let _ = s.shutdown(std::net::Shutdown::Write);
            });
        }
    });
    port
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn a_relay_carries_bytes_both_ways_with_half_close() {
    let agent = Agent::new(None);
    let c = agent.connect();
    let port = echo_server();
    let relay = c.tcp_connect(port, Duration::from_secs(5)).unwrap();
    let (mut r, mut w) = relay.split();
    // 8 MiB each way, more than a window many times over, from two threads.
    let data: Vec<u8> = (0..8 << 20).map(|i| b"abcdefghij"[i % 10]).collect();
    let sent = data.clone();
    let writer = std::thread::spawn(move || {
        w.write_all(&sent).unwrap();
        w.shutdown().unwrap();
        w
    });
    let mut back = Vec::new();
    r.read_to_end(&mut back).unwrap();
    let _w = writer.join().unwrap();
    assert_eq!(back.len(), data.len());
    assert!(back
        .iter()
        .zip(&data)
        .all(|(b, d)| *b == d.to_ascii_uppercase()));
    assert_eq!(
        r.wait_closed(Duration::from_secs(10)).unwrap(),
        (data.len() as u64, data.len() as u64)
    );
    // The session carries on.
    assert!(c.ping(Duration::from_secs(5)).is_ok());
}

#[test]
fn a_closed_port_is_a_clear_error_and_dropping_a_relay_closes_it() {
    let agent = Agent::new(None);
    let c = agent.connect();
    let e = c
        .tcp_connect(free_port(), Duration::from_secs(5))
        .unwrap_err();
    match e {
        ClientError::Agent(r) => {
            assert_eq!(r.code, ErrorCode::ConnectionRefused);
            assert!(r.message.contains("is not open"), "{}", r.message);
        }
        other => panic!("{other}"),
    }
    // A server that sees its client go away when the relay is dropped.
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let server = std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut buf = [0u8; 16];
        let mut got = Vec::new();
        loop {
            match s.read(&mut buf) {
                Ok(0) => return got,
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) => panic!("{e}"),
            }
        }
    });
    let mut relay = c.tcp_connect(port, Duration::from_secs(5)).unwrap();
    relay.write_all(b"bye").unwrap();
    std::thread::sleep(Duration::from_millis(200));
    drop(relay);
    assert_eq!(server.join().unwrap(), b"bye");
}

#[test]
fn eval_keeps_state_returns_the_repr_and_captures_output() {
    let agent = Agent::new(None);
    let c = agent.connect();
    let t = Some(Duration::from_secs(60));
    let r = c.eval_collect("x = 40\nprint('defined')", &[], t).unwrap();
    assert_eq!(r.result.value, None);
    assert_eq!(r.stdout, b"defined\n");
    assert_eq!(r.result.error, None);
    let r = c.eval_collect("x + 2", &[], t).unwrap();
    assert_eq!(r.result.value.as_deref(), Some("42"));
    assert!(r.result.execution_count >= 2);
    let r = c.eval_collect("'hi' * 2", &[], t).unwrap();
    assert_eq!(r.result.value.as_deref(), Some("'hihi'"));
    // Output of subprocesses (the worker's fd 1 and 2) is captured too.
    let r = c
        .eval_collect(
            "import os, sys\nos.system('echo from-shell; echo to-err >&2')\nsys.stderr.write('py-err\\n')",
            &[("EXTRA".into(), "1".into())],
            t,
        )
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&r.stdout), "from-shell\n");
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(err.contains("to-err") && err.contains("py-err"), "{err}");
    // Errors come back as the exception with its traceback, not a failure.
    let r = c.eval_collect("undefined_name + 1", &[], t).unwrap();
    let e = r.result.error.unwrap();
    assert_eq!(e.name, "NameError");
    assert!(e.traceback.contains("undefined_name"), "{}", e.traceback);
    // The state outlives the session (it is in the interpreter process).
    drop(c);
    let c = agent.connect();
    let r = c.eval_collect("x", &[], t).unwrap();
    assert_eq!(r.result.value.as_deref(), Some("40"));
    // Environment: the sandbox's, then the call's.
    c.set_env(&[("SANDBOX_VAR".into(), "s".into())]).unwrap();
    let r = c
        .eval_collect(
            "import os; os.environ['SANDBOX_VAR'] + os.environ['CALL_VAR']",
            &[("CALL_VAR".into(), "c".into())],
            t,
        )
        .unwrap();
    assert_eq!(r.result.value.as_deref(), Some("'sc'"));
}

#[test]
fn eval_interrupts_at_its_timeout_and_restarts_a_stuck_interpreter() {
    let agent = Agent::new(None);
    let c = Arc::new(agent.connect());
    let t = Some(Duration::from_secs(60));
    c.eval_collect("kept = 'yes'", &[], t).unwrap();
    // A timeout interrupts the code; the state stays.
    let r = c
        .eval_collect(
            "import time\ntime.sleep(30)",
            &[],
            Some(Duration::from_millis(500)),
        )
        .unwrap();
    assert!(r.result.timed_out);
    assert!(!r.result.restarted);
    assert_eq!(r.result.error.unwrap().name, "KeyboardInterrupt");
    assert_eq!(
        c.eval_collect("kept", &[], t)
            .unwrap()
            .result
            .value
            .as_deref(),
        Some("'yes'")
    );
    // Two evals at once run one after the other.
    let c2 = Arc::clone(&c);
    let first = std::thread::spawn(move || {
        c2.eval_collect("import time; time.sleep(0.5); order = ['first']", &[], t)
            .unwrap()
    });
    std::thread::sleep(Duration::from_millis(100));
    let second = c
        .eval_collect("order.append('second'); order", &[], t)
        .unwrap();
    first.join().unwrap();
    assert_eq!(second.result.value.as_deref(), Some("['first', 'second']"));
    // Code that swallows the interrupt: the interpreter is killed and the
    // next eval starts empty.
    let r = c
        .eval_collect(
            "import time\nwhile True:\n    try:\n        time.sleep(10)\n    except KeyboardInterrupt:\n        pass",
            &[],
            Some(Duration::from_millis(300)),
        )
        .unwrap();
    assert!(r.result.timed_out && r.result.restarted, "{r:?}");
    let r = c.eval_collect("kept", &[], t).unwrap();
    assert_eq!(r.result.error.unwrap().name, "NameError");
}

#[test]
fn eval_without_python_is_unavailable() {
    // A root with no python3 in it (and nothing else).
    let root = tempdir("nopython");
    std::fs::create_dir_all(root.join("run")).unwrap();
    let agent = Agent::new(Some(root.clone()));
    let c = agent.connect();
    let e = c
        .eval_collect("1", &[], Some(Duration::from_secs(30)))
        .unwrap_err();
    assert_eq!(code(e), ErrorCode::Unavailable);
    let e = c
        .code_interpreter(49999, None, Duration::from_secs(30))
        .unwrap_err();
    assert_eq!(code(e), ErrorCode::Unavailable);
    std::fs::remove_dir_all(root).unwrap();
}

/// One HTTP/1.1 request over a relay; returns the response's text (the
/// server closes the connection after answering, as asked).
fn http(relay: forkd_protocol::client::TcpRelay, method: &str, path: &str, body: &str) -> String {
    let (mut r, mut w) = relay.split();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    w.write_all(req.as_bytes()).unwrap();
    let mut out = Vec::new();
    r.set_timeout(Some(Duration::from_secs(60)));
    r.read_to_end(&mut out).unwrap();
    String::from_utf8_lossy(&out).into_owned()
}

#[test]
fn the_code_interpreter_starts_on_demand_and_answers_through_a_relay() {
    let agent = Agent::new(None);
    let c = agent.connect();
    let port = free_port();
    let pid = c
        .code_interpreter(port, Some("/tmp"), Duration::from_secs(120))
        .unwrap();
    // Asking again finds the running one.
    assert_eq!(
        c.code_interpreter(port, None, Duration::from_secs(120))
            .unwrap(),
        pid
    );
    let t = Duration::from_secs(10);
    let resp = http(
        c.tcp_connect(port, t).unwrap(),
        "POST",
        "/execute",
        r#"{"code":"y = 6 * 7\ny"}"#,
    );
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    assert!(resp.contains(r#""text": "42""#), "{resp}");
    // Stateful across requests (and connections).
    let resp = http(
        c.tcp_connect(port, t).unwrap(),
        "POST",
        "/execute",
        r#"{"code":"y + 1"}"#,
    );
    assert!(resp.contains(r#""text": "43""#), "{resp}");
    let resp = http(c.tcp_connect(port, t).unwrap(), "GET", "/contexts", "");
    assert!(resp.contains(r#""language": "python""#), "{resp}");
    let tag = format!("forkd-code-interpreter-{port}");
    c.proc_signal(forkd_protocol::ProcSelector::Tag(tag), libc::SIGKILL)
        .unwrap();
    c.proc_wait(pid, Some(Duration::from_secs(20))).unwrap();
}
