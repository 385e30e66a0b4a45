//! The host-side client against a hostile guest: the guest end of a real
//! UNIX socketpair is driven by the test and writes what a root process in
//! the guest could write on the agent's port. Every call must come back in
//! bounded time with a clear error, and the session must say why it closed.

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use forkd_protocol::client::{AgentClient, ClientError, Limits};
use forkd_protocol::frame::{write_frame, Header};
use forkd_protocol::{
    decode, encode, ExecRequest, ExitStatus, FrameReader, Hello, HelloAck, Kind, Request, Response,
};

/// Short bounds so that the tests take seconds.
fn limits() -> Limits {
    Limits {
        exec_grace: Duration::from_millis(300),
        frame_stall: Duration::from_millis(600),
        write_stall: Duration::from_millis(600),
        ..Limits::default()
    }
}

/// The guest end: its stream and a reader for what the host sends.
struct Guest {
    w: UnixStream,
    r: FrameReader<UnixStream>,
}

impl Guest {
    /// The next request the host sent, skipping other frames.
    fn request(&mut self) -> (u32, Request) {
        loop {
            let f = self.r.read_frame().expect("host frame");
            if f.kind == Kind::Request {
                return (f.id, decode(&f.payload).expect("request JSON"));
            }
        }
    }

    fn frame(&mut self, kind: Kind, id: u32, payload: &[u8]) {
        write_frame(&mut self.w, kind, id, payload).expect("guest write");
    }

    fn respond(&mut self, id: u32, r: &Response) {
        self.frame(Kind::Response, id, &encode(r));
    }
}

/// A client connected to a guest end that answers the handshake and then
/// does whatever the test says.
fn connect(limits: Limits) -> (AgentClient, Guest) {
    let (host, guest) = UnixStream::pair().unwrap();
    let g = std::thread::spawn(move || {
        let mut r = FrameReader::new(guest.try_clone().unwrap());
        let mut w = guest;
        let f = r.read_frame().unwrap();
        let hello: Hello = decode(&f.payload).unwrap();
        let ack = HelloAck {
            nonce: hello.nonce,
            protocol: forkd_protocol::PROTOCOL,
            agent_version: "hostile".into(),
        };
        write_frame(&mut w, Kind::HelloAck, 0, &encode(&ack)).unwrap();
        Guest { w, r }
    });
    let c =
        AgentClient::connect_with(host, Duration::from_secs(5), limits, &mut || Ok(())).unwrap();
    (c, g.join().unwrap())
}

fn sh(script: &str, timeout_ms: Option<u64>) -> ExecRequest {
    ExecRequest {
        argv: vec!["sh".into(), "-c".into(), script.into()],
        timeout_ms,
        ..Default::default()
    }
}

fn exited(code: i32) -> Response {
    Response::Exited(ExitStatus {
        code: Some(code),
        signal: None,
        timed_out: false,
        duration_ms: 1,
    })
}

/// Runs `f` on a thread and returns its result and how long it took.
fn timed<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> (T, Duration) {
    let t = Instant::now();
    let r = std::thread::spawn(f).join().unwrap();
    (r, t.elapsed())
}

#[test]
fn a_silent_agent_ends_a_timed_exec_at_timeout_plus_grace() {
    let (c, mut g) = connect(limits());
    let (r, took) = timed(move || {
        let r = c.exec(sh("sleep 600", Some(500)), None, |_, _| {});
        drop(g.request());
        r
    });
    assert!(
        matches!(r, Err(ClientError::ExitNotReported { .. })),
        "{r:?}"
    );
    assert!(took >= Duration::from_millis(800), "{took:?}");
    assert!(took < Duration::from_secs(5), "{took:?}");
}

#[test]
fn a_4_gib_header_swallows_nothing_that_follows() {
    let (c, mut g) = connect(limits());
    let h = std::thread::spawn(move || {
        let (id, _) = g.request();
        // `FK 01 05 <id> ffffffff`, nothing of the announced payload, then the
        // agent's real output and exit.
        g.w.write_all(&Header::encode(Kind::Stdout, id, u32::MAX))
            .unwrap();
        g.frame(Kind::Stdout, id, b"real output");
        g.respond(id, &exited(3));
        g
    });
    let out = c.exec_collect(sh("true", Some(10_000)), None).unwrap();
    assert_eq!(out.stdout, b"real output");
    assert_eq!(out.status.code, Some(3));
    let _g = h.join().unwrap();
    assert_eq!(c.closed_reason(), None);
}

#[test]
fn a_garbage_flood_closes_the_session_and_says_why() {
    let (c, mut g) = connect(limits());
    let h = std::thread::spawn(move || {
        let _ = g.request();
        // Pseudo-random bytes (xorshift), 30 MB, as fast as the host takes them.
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut chunk = vec![0u8; 64 * 1024];
        for _ in 0..(30_000_000 / chunk.len()) {
            for b in chunk.iter_mut() {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                *b = x as u8;
            }
            if g.w.write_all(&chunk).is_err() {
                break; // the host closed the session
            }
        }
    });
    // No timeout: the close alone must end the wait.
    let (r, took) = timed(move || {
        let r = c.exec(sh("cat", None), None, |_, _| {});
        (r, c.closed_reason())
    });
    h.join().unwrap();
    let (r, reason) = r;
    assert!(matches!(r, Err(ClientError::Closed(_))), "{r:?}");
    let reason = reason.expect("a closed session says why");
    assert!(reason.contains("not agent frames"), "{reason}");
    assert!(took < Duration::from_secs(10), "{took:?}");
}

#[test]
fn a_half_frame_left_hanging_closes_the_session_after_the_stall_bound() {
    let (c, mut g) = connect(limits());
    let h = std::thread::spawn(move || {
        let (id, _) = g.request();
        g.w.write_all(&Header::encode(Kind::Stdout, id, 4096))
            .unwrap();
        g.w.write_all(b"only a little").unwrap();
        // Keep the channel open: only the stall bound can end this.
        std::thread::sleep(Duration::from_secs(3));
        g
    });
    let (r, took) = timed(move || {
        let r = c.exec(sh("true", None), None, |_, _| {});
        (r, c.closed_reason())
    });
    let (r, reason) = r;
    assert!(matches!(r, Err(ClientError::Closed(_))), "{r:?}");
    assert!(reason.unwrap().contains("incomplete"));
    assert!(took < Duration::from_secs(3), "{took:?}");
    drop(h.join().unwrap());
}

#[test]
fn a_slow_trickle_closes_the_session_after_the_stall_bound() {
    let (c, mut g) = connect(limits());
    let h = std::thread::spawn(move || {
        let (id, _) = g.request();
        let mut frame = Vec::new();
        write_frame(&mut frame, Kind::Stdout, id, &[b'.'; 1000]).unwrap();
        for b in frame {
            if g.w.write_all(&[b]).is_err() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    });
    let (r, took) = timed(move || c.exec(sh("true", Some(60_000)), None, |_, _| {}));
    assert!(
        matches!(r, Err(ClientError::Closed(ref m)) if m.contains("incomplete")),
        "{r:?}"
    );
    assert!(took < Duration::from_secs(3), "{took:?}");
    h.join().unwrap();
}

#[test]
fn stray_replies_wrong_types_and_data_after_the_response_are_harmless() {
    let (c, mut g) = connect(limits());
    let h = std::thread::spawn(move || {
        let (id, _) = g.request();
        // Replies and data for requests that do not exist.
        for stray in [0, 1, id.wrapping_add(1000), u32::MAX] {
            g.respond(stray, &exited(0));
            g.frame(Kind::Stdout, stray, b"not yours");
        }
        // Frames a host never gets, undecodable JSON for an unknown id.
        g.frame(Kind::Request, id, b"{}");
        g.frame(Kind::Stdin, id, b"x");
        g.frame(Kind::Response, id ^ 1, b"{not json");
        // The wrong kind of response for an exec.
        g.respond(id, &Response::Signalled);
        // Data after the response belongs to no one.
        g.frame(Kind::Stdout, id, b"late");
        let (id, _) = g.request();
        g.respond(id, &Response::FileDone { bytes: 1 });
        let (id, _) = g.request();
        g.frame(Kind::Response, id, b"\xff\xfe");
        let (id, req) = g.request();
        assert!(matches!(req, Request::Ping {}));
        g.respond(
            id,
            &Response::Pong(forkd_protocol::Pong {
                agent_version: "x".into(),
                protocol: 1,
                uptime_ms: 1,
                root_disk: false,
                hostname: "h".into(),
            }),
        );
        g
    });
    let mut out = Vec::new();
    let e = c
        .exec(sh("true", Some(5000)), None, |_, b| {
            out.extend_from_slice(b)
        })
        .unwrap_err();
    assert!(matches!(e, ClientError::Protocol(_)), "{e}");
    assert!(out.is_empty(), "{out:?}");
    let e = c.ping(Duration::from_secs(5)).unwrap_err();
    assert!(matches!(e, ClientError::Protocol(_)), "{e}");
    let e = c.ping(Duration::from_secs(5)).unwrap_err();
    assert!(e.to_string().contains("undecodable"), "{e}");
    assert_eq!(c.ping(Duration::from_secs(5)).unwrap().hostname, "h");
    let _g = h.join().unwrap();
    assert_eq!(c.closed_reason(), None);
}

#[test]
fn too_much_output_for_exec_collect_kills_the_command() {
    let (c, mut g) = connect(Limits {
        collect_bytes: 1 << 20,
        ..limits()
    });
    let h = std::thread::spawn(move || {
        let (id, _) = g.request();
        let chunk = vec![b'y'; 64 * 1024];
        // Flood until the host asks for the kill, then report the exit.
        let w = g.w.try_clone().unwrap();
        let flood = std::thread::spawn(move || {
            let mut w = w;
            for _ in 0..1024 {
                if write_frame(&mut w, Kind::Stdout, id, &chunk).is_err() {
                    return;
                }
            }
        });
        let (_, req) = g.request();
        assert_eq!(
            req,
            Request::Signal {
                target: id,
                signal: 9
            }
        );
        flood.join().unwrap();
        g.respond(id, &exited(137));
    });
    let e = c.exec_collect(sh("yes", None), None).unwrap_err();
    assert!(
        matches!(e, ClientError::OutputTooLarge { stream: "stdout", limit } if limit == 1 << 20),
        "{e}"
    );
    h.join().unwrap();
}

#[test]
fn a_guest_that_stops_reading_fails_sends_in_time() {
    let (c, g) = connect(limits());
    // The guest never reads again: the host's frames pile up in the socket.
    let data = vec![7u8; 16 << 20];
    let (r, took) = timed(move || {
        let r = c.write_file("/x", None, &data[..]);
        let p = c.ping(Duration::from_millis(300));
        (r, p, g)
    });
    let (r, p, _g) = r;
    assert!(
        matches!(r, Err(ClientError::SendTimeout(_) | ClientError::Closed(_))),
        "{r:?}"
    );
    assert!(
        matches!(p, Err(ClientError::Timeout(_) | ClientError::Closed(_))),
        "{p:?}"
    );
    assert!(took < Duration::from_secs(5), "{took:?}");
}

#[test]
fn a_closed_channel_ends_an_untimed_exec() {
    let (c, mut g) = connect(limits());
    let h = std::thread::spawn(move || {
        let (id, _) = g.request();
        g.frame(Kind::Stdout, id, b"partial ");
        drop(g);
    });
    let mut out = Vec::new();
    let e = c
        .exec(sh("sleep 600", None), None, |_, b| out.extend_from_slice(b))
        .unwrap_err();
    h.join().unwrap();
    assert!(matches!(e, ClientError::Closed(_)), "{e}");
    assert_eq!(out, b"partial ");
    assert!(c.closed_reason().is_some());
    assert!(matches!(
        c.ping(Duration::from_secs(1)),
        Err(ClientError::Closed(_))
    ));
}

// ----- protocol 2 -----

#[test]
fn an_agent_of_another_protocol_is_refused_with_the_reason() {
    let (host, guest) = UnixStream::pair().unwrap();
    let g = std::thread::spawn(move || {
        let mut r = FrameReader::new(guest.try_clone().unwrap());
        let mut w = guest;
        let hello: Hello = decode(&r.read_frame().unwrap().payload).unwrap();
        let ack = HelloAck {
            nonce: hello.nonce,
            protocol: 1,
            agent_version: "0.0.1".into(),
        };
        write_frame(&mut w, Kind::HelloAck, 0, &encode(&ack)).unwrap();
        w
    });
    let e = match AgentClient::connect_with(host, Duration::from_secs(5), limits(), &mut || Ok(()))
    {
        Ok(_) => panic!("a protocol-1 agent was accepted"),
        Err(e) => e,
    };
    let _w = g.join().unwrap();
    match &e {
        ClientError::ProtocolMismatch { agent, host, .. } => {
            assert_eq!((*agent, *host), (1, forkd_protocol::PROTOCOL));
        }
        other => panic!("{other:?}"),
    }
    let msg = e.to_string();
    assert!(msg.contains("protocol 1") && msg.contains("0.0.1"), "{msg}");
}

fn info(pid: u32) -> forkd_protocol::ProcInfo {
    forkd_protocol::ProcInfo {
        pid,
        tag: None,
        argv: vec!["yes".into()],
        env: vec![],
        cwd: "/".into(),
        user: "root".into(),
        uid: 0,
        gid: 0,
        pty: false,
        stdin: false,
        started_unix_ms: 0,
        exit: None,
    }
}

#[test]
fn data_past_the_window_fails_that_request_alone() {
    let (c, mut g) = connect(limits());
    let h = std::thread::spawn(move || {
        let (id, req) = g.request();
        assert!(matches!(req, Request::ProcAttach { .. }), "{req:?}");
        g.frame(
            Kind::Event,
            id,
            &encode(&forkd_protocol::Event::Attached(info(7))),
        );
        // Ignore flow control: 2 MiB at once, never waiting for a grant.
        let chunk = vec![b'y'; 64 * 1024];
        for _ in 0..32 {
            g.frame(Kind::Stdout, id, &chunk);
        }
        // The session is still good: answer a ping.
        let (pid, _) = g.request();
        g.respond(
            pid,
            &Response::Pong(forkd_protocol::Pong {
                agent_version: "hostile".into(),
                protocol: forkd_protocol::PROTOCOL,
                uptime_ms: 0,
                root_disk: false,
                hostname: "h".into(),
            }),
        );
        g
    });
    let mut a = c
        .proc_attach(7, forkd_protocol::AttachOptions::default())
        .unwrap();
    // Read nothing while the flood arrives: past the window it is refused
    // (a caller that keeps up grants as it reads, and nothing piles up).
    std::thread::sleep(Duration::from_millis(1000));
    let mut got = 0usize;
    let err = loop {
        match a.next(Some(Duration::from_secs(5))) {
            Ok(forkd_protocol::client::AttachEvent::Stdout(b)) => got += b.len(),
            Ok(other) => panic!("{other:?}"),
            Err(e) => break e,
        }
    };
    assert!(matches!(err, ClientError::FlowControl { .. }), "{err:?}");
    assert!(got <= forkd_protocol::WINDOW as usize, "{got}");
    assert!(c.ping(Duration::from_secs(5)).is_ok());
    assert_eq!(c.closed_reason(), None);
    drop(h.join().unwrap());
}

#[test]
fn a_relay_nobody_reads_does_not_stall_the_session() {
    let (c, mut g) = connect(limits());
    let h = std::thread::spawn(move || {
        let (id, req) = g.request();
        assert!(
            matches!(req, Request::TcpConnect { port: 49999, .. }),
            "{req:?}"
        );
        g.frame(Kind::Event, id, &encode(&forkd_protocol::Event::Connected));
        // A full window of data the host's caller does not read, and no
        // grant for the host's own sending.
        let chunk = vec![b'z'; 64 * 1024];
        for _ in 0..(forkd_protocol::WINDOW as usize / chunk.len()) {
            g.frame(Kind::Stdout, id, &[]);
            g.frame(Kind::Data, id, &chunk);
        }
        // Meanwhile other requests are served.
        for _ in 0..3 {
            let (pid, _) = g.request();
            g.respond(pid, &exited(0));
        }
        g
    });
    let relay = c.tcp_connect(49999, Duration::from_secs(5)).unwrap();
    let (mut reader, mut writer) = relay.split();
    // Sending blocks after a window without grants: the write times out.
    writer.set_timeout(Some(Duration::from_millis(500)));
    let big = vec![b'h'; forkd_protocol::WINDOW as usize + 1];
    let e = std::io::Write::write_all(&mut writer, &big).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::TimedOut, "{e}");
    // Three execs complete while the relay's window sits unread.
    for _ in 0..3 {
        let out = c.exec_collect(sh("true", Some(5_000)), None).unwrap();
        assert_eq!(out.status.code, Some(0));
    }
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0;
    reader.set_timeout(Some(Duration::from_millis(500)));
    while total < forkd_protocol::WINDOW as usize {
        match std::io::Read::read(&mut reader, &mut buf) {
            Ok(n) => total += n,
            Err(e) => panic!("after {total} bytes: {e}"),
        }
    }
    assert_eq!(total, forkd_protocol::WINDOW as usize);
    drop(h.join().unwrap());
}
