use super::*;
use crate::frame::{write_frame, Header, HEADER_LEN, MAGIC};
use std::io::Cursor;

fn framed(kind: Kind, id: u32, payload: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    write_frame(&mut v, kind, id, payload).unwrap();
    v
}

#[test]
fn frame_round_trip() {
    let mut bytes = framed(Kind::Stdout, 7, b"hello");
    bytes.extend(framed(Kind::Data, 8, b""));
    let mut r = FrameReader::new(Cursor::new(bytes));
    let a = r.read_frame().unwrap();
    assert_eq!(
        (a.kind, a.id, a.payload.as_slice()),
        (Kind::Stdout, 7, &b"hello"[..])
    );
    let b = r.read_frame().unwrap();
    assert_eq!((b.kind, b.id, b.payload.len()), (Kind::Data, 8, 0));
    assert!(matches!(r.read_frame(), Err(FrameError::Eof)));
}

#[test]
fn header_layout_is_big_endian() {
    let h = Header::encode(Kind::Request, 0x01020304, 0x0a0b0c0d);
    assert_eq!(
        &h[..],
        &[b'F', b'K', VERSION, 3, 1, 2, 3, 4, 0x0a, 0x0b, 0x0c, 0x0d]
    );
}

#[test]
fn garbage_before_a_frame_is_skipped_and_reported() {
    let mut bytes = b"noise-without-magic!".to_vec();
    bytes.extend(framed(Kind::Request, 3, b"{}"));
    let mut r = FrameReader::new(Cursor::new(bytes));
    assert!(matches!(r.read_frame(), Err(FrameError::BadMagic { .. })));
    let f = r.read_frame().unwrap();
    assert_eq!((f.kind, f.id), (Kind::Request, 3));
}

#[test]
fn magic_split_across_reads_is_found() {
    // A reader that returns one byte at a time exercises the carry-over of 'F'.
    struct Trickle(Cursor<Vec<u8>>);
    impl std::io::Read for Trickle {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            let n = buf.len().min(1);
            self.0.read(&mut buf[..n])
        }
    }
    let mut bytes = vec![0u8; 13];
    bytes.extend(framed(Kind::Stderr, 9, b"x"));
    let mut r = FrameReader::new(Trickle(Cursor::new(bytes)));
    assert!(r.read_frame().is_err());
    assert_eq!(r.read_frame().unwrap().id, 9);
}

#[test]
fn oversized_frame_is_skipped_without_buffering() {
    let len = MAX_PAYLOAD + 1;
    let mut bytes = Header::encode(Kind::Data, 5, len).to_vec();
    bytes.extend(std::iter::repeat_n(0xAB, len as usize));
    bytes.extend(framed(Kind::Data, 6, b"ok"));
    let mut r = FrameReader::new(Cursor::new(bytes));
    match r.read_frame() {
        Err(e @ FrameError::Oversized { id: 5, .. }) => assert!(e.is_recoverable()),
        other => panic!("expected oversized, got {other:?}"),
    }
    assert_eq!(r.read_frame().unwrap().payload, b"ok");
}

#[test]
fn wrong_version_and_unknown_kind_are_consumed() {
    let mut v = Header::encode(Kind::Data, 1, 2).to_vec();
    v[2] = VERSION + 1;
    v.extend(b"zz");
    let mut k = Header::encode(Kind::Data, 2, 1).to_vec();
    k[3] = 200;
    k.push(b'q');
    let mut bytes = v;
    bytes.extend(k);
    bytes.extend(framed(Kind::Stdin, 3, b""));
    let mut r = FrameReader::new(Cursor::new(bytes));
    assert!(matches!(
        r.read_frame(),
        Err(FrameError::BadVersion { id: 1, .. })
    ));
    assert!(matches!(
        r.read_frame(),
        Err(FrameError::UnknownKind { id: 2, kind: 200 })
    ));
    assert_eq!(r.read_frame().unwrap().id, 3);
}

#[test]
fn truncated_frame_is_an_io_error() {
    let mut bytes = framed(Kind::Stdout, 1, b"abcdef");
    bytes.truncate(HEADER_LEN + 2);
    let mut r = FrameReader::new(Cursor::new(bytes));
    let e = r.read_frame().unwrap_err();
    assert!(!e.is_recoverable(), "{e}");
}

#[test]
fn write_frame_refuses_oversized_payload() {
    let big = vec![0u8; MAX_PAYLOAD as usize + 1];
    let mut out = Vec::new();
    assert!(write_frame(&mut out, Kind::Data, 1, &big).is_err());
    assert!(out.is_empty());
}

#[test]
fn requests_round_trip_through_json() {
    let reqs = vec![
        Request::Ping {},
        Request::Exec(ExecRequest {
            argv: vec!["sh".into(), "-c".into(), "echo hi".into()],
            env: vec![("A".into(), "b".into())],
            cwd: Some("/tmp".into()),
            timeout_ms: Some(1500),
            stdin: true,
            user: None,
        }),
        Request::WriteFile {
            path: "/x".into(),
            mode: Some(0o600),
            parents: true,
            user: Some("user".into()),
        },
        Request::ReadFile {
            path: "/y".into(),
            user: None,
        },
        Request::Signal {
            target: 4,
            signal: 15,
        },
        Request::Shutdown {},
        Request::Restore {
            entropy_hex: to_hex(&[1, 2, 0xff]),
            unix_time_ns: 5,
            hostname: "sb-1".into(),
        },
        Request::SetEnv {
            vars: vec![("A".into(), "1".into())],
        },
        Request::Cancel { target: 9 },
        Request::ProcStart {
            spec: ProcSpec {
                argv: vec!["/bin/bash".into(), "-l".into()],
                env: vec![("TERM".into(), "xterm".into())],
                cwd: Some("/tmp".into()),
                user: Some("1000:1000".into()),
                stdin: true,
                pty: Some(PtySize { cols: 80, rows: 24 }),
                tag: Some("t".into()),
                timeout_ms: Some(60_000),
                backlog_bytes: Some(4096),
            },
            attach: Some(AttachOptions {
                replay: true,
                backpressure: true,
            }),
        },
        Request::ProcAttach {
            target: ProcSelector::Tag("t".into()),
            options: AttachOptions::default(),
        },
        Request::ProcWait {
            target: ProcSelector::Pid(3),
        },
        Request::ProcInput {
            target: 3.into(),
            close: true,
        },
        Request::ProcCloseStdin { target: 3.into() },
        Request::ProcSignal {
            target: 3.into(),
            signal: 15,
        },
        Request::ProcResize {
            target: 3.into(),
            cols: 100,
            rows: 30,
        },
        Request::ProcList {},
        Request::Stat {
            path: "/a".into(),
            user: None,
        },
        Request::ListDir {
            path: "/".into(),
            depth: 2,
            user: None,
        },
        Request::MakeDir {
            path: "/d".into(),
            mode: Some(0o700),
            user: None,
        },
        Request::Remove {
            path: "/d".into(),
            recursive: true,
            user: None,
        },
        Request::Move {
            from: "/a".into(),
            to: "/b".into(),
            user: None,
        },
        Request::WatchStart {
            path: "/tmp".into(),
            recursive: true,
            idle_ms: Some(5),
        },
        Request::WatchPoll {
            watch: 1,
            wait_ms: 10,
        },
        Request::WatchStop { watch: 1 },
        Request::TarRead {
            path: "/d".into(),
            user: None,
        },
        Request::TarWrite {
            path: "/d".into(),
            user: None,
        },
        Request::TcpConnect {
            port: 49999,
            timeout_ms: None,
        },
        Request::Eval {
            code: "1+1".into(),
            env: vec![],
            timeout_ms: Some(5),
        },
        Request::CodeInterpreter {
            port: 49999,
            cwd: None,
        },
    ];
    for r in reqs {
        let back: Request = decode(&encode(&r)).unwrap();
        assert_eq!(back, r);
    }
}

#[test]
fn protocol_1_requests_still_decode() {
    // What a protocol-1 host sends must mean the same to this agent.
    let r: Request = decode(br#"{"op":"write_file","path":"/x","mode":420}"#).unwrap();
    assert_eq!(
        r,
        Request::WriteFile {
            path: "/x".into(),
            mode: Some(0o644),
            parents: false,
            user: None
        }
    );
    let r: Request = decode(br#"{"op":"read_file","path":"/y"}"#).unwrap();
    assert_eq!(
        r,
        Request::ReadFile {
            path: "/y".into(),
            user: None
        }
    );
}

#[test]
fn windowed_requests_are_the_streams() {
    let attach = Request::ProcAttach {
        target: 1.into(),
        options: AttachOptions::default(),
    };
    assert!(attach.is_windowed());
    assert!(!Request::ProcStart {
        spec: ProcSpec::new(["true"]),
        attach: None
    }
    .is_windowed());
    assert!(Request::ProcStart {
        spec: ProcSpec::new(["true"]),
        attach: Some(AttachOptions::default())
    }
    .is_windowed());
    assert!(!Request::Exec(ExecRequest::default()).is_windowed());
    assert!(Request::TcpConnect {
        port: 1,
        timeout_ms: None
    }
    .is_windowed());
}

#[test]
fn responses_and_events_round_trip_through_json() {
    let info = ProcInfo {
        pid: 42,
        tag: Some("t".into()),
        argv: vec!["sleep".into(), "1".into()],
        env: vec![("A".into(), "1".into())],
        cwd: "/".into(),
        user: "root".into(),
        uid: 0,
        gid: 0,
        pty: false,
        stdin: true,
        started_unix_ms: 7,
        exit: Some(ExitStatus {
            code: None,
            signal: Some(9),
            timed_out: true,
            duration_ms: 3,
        }),
    };
    let file = FileInfo {
        name: "l".into(),
        path: "/l".into(),
        kind: FileKind::Symlink,
        target_kind: Some(FileKind::Dir),
        symlink_target: Some("/tmp".into()),
        size: 4,
        mode: 0o777,
        permissions: permissions_string(FileKind::Symlink, 0o777),
        uid: 0,
        gid: 0,
        owner: "root".into(),
        group: "root".into(),
        mtime_ns: -1,
    };
    let responses = vec![
        Response::ProcStarted(info.clone()),
        Response::ProcEnded(info.exit.unwrap()),
        Response::Stat { info: file.clone() },
        Response::Moved { info: file.clone() },
        Response::WatchEvents {
            events: vec![FsEvent {
                name: "a/b".into(),
                kind: FsEventKind::Rename,
            }],
            dropped: 2,
        },
        Response::Evaluated(EvalResult {
            value: Some("2".into()),
            value_truncated: false,
            error: Some(EvalError {
                name: "NameError".into(),
                value: "x".into(),
                traceback: "Traceback".into(),
            }),
            execution_count: 3,
            timed_out: false,
            restarted: false,
            duration_ms: 1,
        }),
        Response::TarDone(TarSummary {
            bytes: 10240,
            entries: 2,
        }),
        Response::RelayClosed {
            sent: 1,
            received: 2,
        },
        Response::Error(ErrorReply::new(ErrorCode::CwdNotFound, "no /x")),
    ];
    for r in responses {
        let back: Response = decode(&encode(&r)).unwrap();
        assert_eq!(back, r);
    }
    let events = vec![
        Event::Started(info.clone()),
        Event::Attached(info.clone()),
        Event::Dropped { bytes: 9 },
        Event::Entries {
            entries: vec![file],
        },
        Event::Process(info),
        Event::Connected,
    ];
    for e in events {
        let back: Event = decode(&encode(&e)).unwrap();
        assert_eq!(back, e);
    }
}

#[test]
fn window_frames_carry_four_bytes() {
    use crate::frame::{parse_window, window_payload};
    assert_eq!(parse_window(&window_payload(WINDOW)), Some(WINDOW));
    assert_eq!(parse_window(b"abc"), None);
    assert_eq!(parse_window(b"abcde"), None);
    for k in 1..=11u8 {
        assert_eq!(Kind::from_u8(k).map(|k| k as u8), Some(k));
    }
    assert_eq!(Kind::from_u8(12), None);
}

#[test]
fn unknown_request_fields_and_ops_are_rejected() {
    assert!(decode::<Request>(br#"{"op":"ping","extra":1}"#).is_err());
    assert!(decode::<Request>(br#"{"op":"format_disk"}"#).is_err());
    assert!(decode::<Request>(br#"{"op":"exec","argv":"notalist"}"#).is_err());
    let minimal: Request = decode(br#"{"op":"exec","argv":["true"]}"#).unwrap();
    assert_eq!(
        minimal,
        Request::Exec(ExecRequest {
            argv: vec!["true".into()],
            ..Default::default()
        })
    );
}

#[test]
fn shell_code_follows_the_shell_convention() {
    let s = |code, signal| ExitStatus {
        code,
        signal,
        timed_out: false,
        duration_ms: 0,
    };
    assert_eq!(s(Some(3), None).shell_code(), 3);
    assert_eq!(s(None, Some(9)).shell_code(), 137);
}

#[test]
fn magic_constant_matches_header() {
    assert_eq!(&Header::encode(Kind::Hello, 0, 0)[..2], &MAGIC);
}

#[test]
fn hex_round_trip_and_rejects_garbage() {
    let b = [0u8, 1, 0x7f, 0xff];
    assert_eq!(to_hex(&b), "00017fff");
    assert_eq!(from_hex("00017FFF").unwrap(), b);
    assert!(from_hex("abc").is_none());
    assert!(from_hex("zz").is_none());
    assert!(from_hex("é1").is_none());
}

mod properties {
    //! Bounded property runs of [`crate::fuzzing`] (seconds); the long runs
    //! are `PROPTEST_CASES=N cargo test -p forkd-protocol --release properties`
    //! or the cargo-fuzz targets `frame_decoder` and `client_replies`
    //! (docs/fuzzing.md).
    use crate::frame::{write_frame, Header};
    use crate::Kind;
    use proptest::prelude::*;

    /// Frames, forged headers and garbage glued together: random bytes alone
    /// seldom contain a magic.
    fn framey() -> impl Strategy<Value = Vec<u8>> {
        let piece = prop_oneof![
            (
                any::<u8>(),
                any::<u32>(),
                proptest::collection::vec(any::<u8>(), 0..64)
            )
                .prop_map(|(k, id, p)| {
                    let mut v = Vec::new();
                    let kind = Kind::from_u8(1 + k % 11).unwrap_or(Kind::Data);
                    write_frame(&mut v, kind, id, &p).unwrap();
                    v
                }),
            (any::<[u8; 2]>(), any::<u32>(), any::<u32>()).prop_map(|(vk, id, len)| {
                let mut h = Header::encode(Kind::Stdout, id, len).to_vec();
                h[2] = vk[0];
                h[3] = vk[1];
                h
            }),
            proptest::collection::vec(any::<u8>(), 0..32),
            Just(b"F".to_vec()),
            Just(b"FK".to_vec()),
        ];
        proptest::collection::vec(piece, 0..24).prop_map(|v| v.concat())
    }

    proptest! {
        #[test]
        fn decoder_on_arbitrary_bytes(data in proptest::collection::vec(any::<u8>(), 0..2048)) {
            crate::fuzzing::decoder(&data);
        }

        #[test]
        fn decoder_on_frames_and_garbage(sel in any::<u8>(), data in framey()) {
            let mut input = vec![sel];
            input.extend(data);
            crate::fuzzing::decoder(&input);
        }
    }

    proptest! {
        // Each case is a real session on a socketpair (about a millisecond).
        #[test]
        fn client_replies_to_a_scripted_guest(data in proptest::collection::vec(any::<u8>(), 0..512)) {
            crate::fuzzing::client_replies(&data);
        }
    }
}
