//! The host side's memory stays bounded whatever the guest writes: a flood
//! of output for a live exec whose caller is slower than the guest (the
//! reader waits instead of queueing), and a flood of garbage. One test in its
//! own binary, so that the process's peak RSS (`VmHWM`) is this test's alone.

use std::os::unix::net::UnixStream;
use std::time::Duration;

use forkd_protocol::client::{AgentClient, Limits};
use forkd_protocol::frame::write_frame;
use forkd_protocol::{
    decode, encode, ExecRequest, ExitStatus, FrameReader, Hello, HelloAck, Kind, Response,
};

/// Peak resident memory of this process in KiB.
fn vm_hwm_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM in /proc/self/status")
}

fn connect() -> (AgentClient, UnixStream, FrameReader<UnixStream>) {
    let (host, guest) = UnixStream::pair().unwrap();
    let g = std::thread::spawn(move || {
        let mut r = FrameReader::new(guest.try_clone().unwrap());
        let mut w = guest;
        let hello: Hello = decode(&r.read_frame().unwrap().payload).unwrap();
        let ack = HelloAck {
            nonce: hello.nonce,
            protocol: forkd_protocol::PROTOCOL,
            agent_version: "flood".into(),
        };
        write_frame(&mut w, Kind::HelloAck, 0, &encode(&ack)).unwrap();
        (w, r)
    });
    let c = AgentClient::connect_with(host, Duration::from_secs(5), Limits::default(), &mut || {
        Ok(())
    })
    .unwrap();
    let (w, r) = g.join().unwrap();
    (c, w, r)
}

#[test]
fn floods_of_output_and_garbage_leave_memory_bounded() {
    let before = vm_hwm_kib();

    // 512 MiB of stdout for a live exec, read by a caller that is slower
    // than the guest writes. Unbounded queueing would hold most of it.
    let (c, mut w, mut r) = connect();
    let guest = std::thread::spawn(move || {
        let id = loop {
            let f = r.read_frame().unwrap();
            if f.kind == Kind::Request {
                break f.id;
            }
        };
        let chunk = vec![b'o'; 1 << 20];
        for _ in 0..512 {
            write_frame(&mut w, Kind::Stdout, id, &chunk).unwrap();
        }
        let exit = Response::Exited(ExitStatus {
            code: Some(0),
            signal: None,
            timed_out: false,
            duration_ms: 0,
        });
        write_frame(&mut w, Kind::Response, id, &encode(&exit)).unwrap();
        w
    });
    let mut seen = 0usize;
    let status = c
        .exec(
            ExecRequest {
                argv: vec!["flood".into()],
                ..Default::default()
            },
            None,
            |_, b| {
                seen += b.len();
                // The first chunks slowly, so the guest runs far ahead.
                if seen < 64 << 20 {
                    std::thread::sleep(Duration::from_millis(5));
                }
            },
        )
        .unwrap();
    assert_eq!(status.code, Some(0));
    assert_eq!(seen, 512 << 20);
    drop(guest.join().unwrap());
    let after_output = vm_hwm_kib();

    // 64 MiB of garbage on a fresh session: closed, never buffered.
    let (c, mut w, _r) = connect();
    let chunk: Vec<u8> = (0..1u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8)
        .collect();
    let writer = std::thread::spawn(move || {
        for _ in 0..64 {
            if std::io::Write::write_all(&mut w, &chunk).is_err() {
                break;
            }
        }
    });
    writer.join().unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while c.closed_reason().is_none() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(
        c.closed_reason().is_some(),
        "a garbage flood closes the session"
    );
    drop(c);
    let after_garbage = vm_hwm_kib();

    eprintln!("VmHWM: {before} KiB at start, {after_output} KiB after 512 MiB of output, {after_garbage} KiB after 64 MiB of garbage");
    // Mailbox (4 MiB + one frame), decoder (1 MiB), read buffers, and the
    // test's own 1 MiB chunks: well under 48 MiB of growth.
    assert!(
        after_output - before < 48 * 1024,
        "{before} -> {after_output} KiB"
    );
    assert!(
        after_garbage - before < 48 * 1024,
        "{before} -> {after_garbage} KiB"
    );
}
