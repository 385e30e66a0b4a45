//! Properties over arbitrary bytes, shared by the bounded property tests
//! (`cargo test`) and the cargo-fuzz targets in `fuzz/` (compiled with
//! `--cfg fuzzing`). Not part of the library's API.
//!
//! - [`decoder`]: any bytes, pushed whole or in pieces of any size, decode to
//!   the same frames and errors; the decoder never holds more than
//!   [`DECODER_CAPACITY`], always has room after its frames are taken, and
//!   every frame it returns is one that was in the input.
//! - [`client_replies`]: a real [`AgentClient`] on a socketpair runs an
//!   exec, a ping, a file read, a process attachment, a directory listing, a
//!   TCP relay, an eval and a tar upload at once while the guest end plays a
//!   script read from the bytes (frames of any kind for live, finished and
//!   unknown ids, payloads of every response and event type, flow-control
//!   grants of any size, data beyond the window, oversized and torn headers,
//!   garbage), then closes. Every call must return, without a panic, within
//!   a bound.

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use crate::client::{AgentClient, Limits};
use crate::frame::{write_frame, Frame, FrameDecoder, FrameError, Header, Kind, DECODER_CAPACITY};
use crate::{
    decode, encode, AttachOptions, ErrorCode, ErrorReply, EvalError, EvalResult, ExecRequest,
    ExitStatus, FileInfo, FileKind, FrameReader, FsEvent, FsEventKind, Hello, HelloAck, Pong,
    ProcInfo, Response, TarSummary, MAX_PAYLOAD, PROTOCOL,
};

/// Host calls the guest end of [`client_replies`] answers.
const CALLS: usize = 8;

/// What one `next_frame` gave, comparable across runs.
#[derive(Debug, PartialEq, Eq)]
enum Event {
    Frame(Kind, u32, Vec<u8>),
    Error(&'static str, Option<u32>),
}

fn event(r: Result<Frame, FrameError>) -> Event {
    match r {
        Ok(f) => Event::Frame(f.kind, f.id, f.payload),
        Err(e) => {
            let name = match e {
                FrameError::Eof => "eof",
                FrameError::Io(_) => "io",
                FrameError::BadMagic { .. } => "magic",
                FrameError::BadVersion { .. } => "version",
                FrameError::UnknownKind { .. } => "kind",
                FrameError::Oversized { .. } => "oversized",
            };
            Event::Error(name, e.frame_id())
        }
    }
}

fn decode_in_pieces(input: &[u8], piece: usize) -> Vec<Event> {
    let mut d = FrameDecoder::new();
    let mut events = Vec::new();
    for chunk in input.chunks(piece.max(1)) {
        let mut rest = chunk;
        while !rest.is_empty() {
            let n = d.push(rest);
            rest = &rest[n..];
            assert!(d.buffered() <= DECODER_CAPACITY);
            while let Some(r) = d.next_frame() {
                if r.is_ok() {
                    assert_eq!(d.discarded(), 0);
                }
                events.push(event(r));
            }
            assert!(d.space() > 0, "a drained decoder has room");
        }
    }
    events
}

/// See the module docs. The first byte picks the piece size.
pub fn decoder(data: &[u8]) {
    let Some((&sel, input)) = data.split_first() else {
        return;
    };
    let whole = decode_in_pieces(input, input.len());
    let pieces = decode_in_pieces(input, 1 + usize::from(sel) % 61);
    assert_eq!(whole, pieces);
    for e in &whole {
        if let Event::Frame(kind, id, payload) = e {
            assert!(payload.len() <= MAX_PAYLOAD as usize);
            let mut bytes = Vec::new();
            write_frame(&mut bytes, *kind, *id, payload).expect("a decoded frame re-encodes");
            assert!(
                input.windows(bytes.len()).any(|w| w == bytes.as_slice()),
                "frame {kind:?} {id} was not in the input"
            );
        }
    }
}

/// Reads arbitrary bytes as decisions; zeros once they run out.
struct Tape<'a>(&'a [u8]);

impl Tape<'_> {
    fn u8(&mut self) -> u8 {
        match self.0.split_first() {
            Some((b, rest)) => {
                self.0 = rest;
                *b
            }
            None => 0,
        }
    }
    fn u32(&mut self) -> u32 {
        (0..4).fold(0, |v, _| v << 8 | u32::from(self.u8()))
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.u8()).collect()
    }
    fn done(&self) -> bool {
        self.0.is_empty()
    }
}

fn exit_status(t: &mut Tape) -> ExitStatus {
    ExitStatus {
        code: Some(i32::from(t.u8())),
        signal: None,
        timed_out: t.u8() & 1 == 1,
        duration_ms: u64::from(t.u32()),
    }
}

fn proc_info(t: &mut Tape) -> ProcInfo {
    ProcInfo {
        pid: t.u32(),
        tag: None,
        argv: vec!["f".into()],
        env: vec![],
        cwd: "/".into(),
        user: "root".into(),
        uid: 0,
        gid: 0,
        pty: t.u8() & 1 == 1,
        stdin: false,
        started_unix_ms: 0,
        exit: None,
    }
}

fn file_info(t: &mut Tape) -> FileInfo {
    FileInfo {
        name: "f".into(),
        path: "/f".into(),
        kind: FileKind::File,
        target_kind: None,
        symlink_target: None,
        size: u64::from(t.u32()),
        mode: 0o644,
        permissions: "-rw-r--r--".into(),
        uid: 0,
        gid: 0,
        owner: "root".into(),
        group: "root".into(),
        mtime_ns: 0,
    }
}

/// An event payload of a type picked by the tape.
fn event_payload(t: &mut Tape) -> Vec<u8> {
    use crate::Event;
    let e = match t.u8() % 8 {
        0 => Event::Started(proc_info(t)),
        1 => Event::Attached(proc_info(t)),
        2 => Event::Dropped {
            bytes: u64::from(t.u32()),
        },
        3 => Event::Entries {
            entries: (0..t.u8() % 4).map(|_| file_info(t)).collect(),
        },
        4 => Event::Process(proc_info(t)),
        5 => Event::Connected,
        6 => return b"{\"event\":\"started\"".to_vec(),
        _ => {
            let n = usize::from(t.u8() % 32);
            return t.bytes(n);
        }
    };
    encode(&e)
}

/// A response payload of a type picked by the tape.
fn response_payload(t: &mut Tape) -> Vec<u8> {
    let r = match t.u8() % 20 {
        9 => Response::ProcEnded(exit_status(t)),
        10 => Response::Detached,
        11 => Response::Listed {
            entries: u64::from(t.u32()),
        },
        12 => Response::RelayClosed {
            sent: u64::from(t.u32()),
            received: 0,
        },
        13 => Response::Evaluated(EvalResult {
            value: Some("1".into()),
            value_truncated: false,
            error: (t.u8() & 1 == 1).then(|| EvalError {
                name: "E".into(),
                value: "v".into(),
                traceback: "tb".into(),
            }),
            execution_count: 1,
            timed_out: false,
            restarted: false,
            duration_ms: 0,
        }),
        14 => Response::TarDone(TarSummary {
            bytes: u64::from(t.u32()),
            entries: 1,
        }),
        15 => Response::Stat { info: file_info(t) },
        16 => Response::WatchEvents {
            events: vec![FsEvent {
                name: "a".into(),
                kind: FsEventKind::Create,
            }],
            dropped: 0,
        },
        17 => Response::ProcStarted(proc_info(t)),
        18 => Response::Error(ErrorReply::new(ErrorCode::ConnectionRefused, "fuzz")),
        0 => Response::Exited(exit_status(t)),
        1 => Response::Pong(Pong {
            agent_version: "f".into(),
            protocol: t.u8(),
            uptime_ms: 0,
            root_disk: false,
            hostname: "f".into(),
        }),
        2 => Response::FileDone {
            bytes: u64::from(t.u32()),
        },
        3 => Response::Written { bytes: 0 },
        4 => Response::Signalled,
        5 => Response::Error(ErrorReply::new(ErrorCode::Io, "fuzz")),
        6 => Response::Restored { clock_step_ms: -1 },
        7 => return b"{\"kind\":\"exited\"".to_vec(),
        _ => {
            let n = usize::from(t.u8() % 32);
            return t.bytes(n);
        }
    };
    encode(&r)
}

/// See the module docs.
pub fn client_replies(data: &[u8]) {
    let limits = Limits {
        exec_grace: Duration::from_millis(50),
        max_garbage: 512,
        frame_stall: Duration::from_millis(200),
        write_stall: Duration::from_millis(200),
        mailbox_bytes: 4096,
        collect_bytes: 2048,
        op_timeout: Duration::from_millis(300),
    };
    let (host, guest) = UnixStream::pair().expect("socketpair");
    let script = data.to_vec();
    let guest_side = std::thread::spawn(move || play(guest, &script));
    let started = Instant::now();
    let Ok(c) = AgentClient::connect_with(host, Duration::from_secs(5), limits, &mut || Ok(()))
    else {
        // The script may have closed the channel before the ack.
        let _ = guest_side.join();
        return;
    };
    std::thread::scope(|s| {
        s.spawn(|| {
            let req = ExecRequest {
                argv: vec!["x".into()],
                timeout_ms: Some(100),
                ..Default::default()
            };
            let _ = c.exec_collect(req, None);
        });
        s.spawn(|| {
            let _ = c.ping(Duration::from_millis(300));
        });
        s.spawn(|| {
            let opts = AttachOptions {
                replay: true,
                backpressure: false,
            };
            if let Ok(mut a) = c.proc_attach(1, opts) {
                while a.next(None).is_ok_and(|e| {
                    !matches!(
                        e,
                        crate::client::AttachEvent::Ended(_) | crate::client::AttachEvent::Detached
                    )
                }) {}
            }
        });
        s.spawn(|| {
            let _ = c.list_dir("/", 2, None);
        });
        s.spawn(|| {
            if let Ok(relay) = c.tcp_connect(1, Duration::from_millis(300)) {
                let (mut r, mut w) = relay.split();
                let _ = std::io::Write::write_all(&mut w, &[b'x'; 300_000]);
                let _ = w.shutdown();
                let mut sink = Vec::new();
                let _ = std::io::Read::read_to_end(&mut r, &mut sink);
            }
        });
        s.spawn(|| {
            let _ = c.eval_collect("1", &[], Some(Duration::from_millis(100)));
        });
        s.spawn(|| {
            let data = vec![0u8; 600_000];
            let _ = c.tar_write("/d", None, &data[..]);
        });
        let _ = c.read_file("/f", Vec::new());
    });
    let _ = guest_side.join();
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "the host calls took {:?}",
        started.elapsed()
    );
}

/// The guest end: handshake, learn the three request ids, play the script,
/// close.
fn play(guest: UnixStream, script: &[u8]) {
    let Ok(read_half) = guest.try_clone() else {
        return;
    };
    let _ = read_half.set_read_timeout(Some(Duration::from_secs(2)));
    let mut r = FrameReader::new(read_half);
    let mut w = guest;
    let Ok(f) = r.read_frame() else { return };
    let Ok(hello) = decode::<Hello>(&f.payload) else {
        return;
    };
    let ack = HelloAck {
        nonce: hello.nonce,
        protocol: PROTOCOL,
        agent_version: "fuzz".into(),
    };
    if write_frame(&mut w, Kind::HelloAck, 0, &encode(&ack)).is_err() {
        return;
    }
    let mut ids = Vec::new();
    while ids.len() < CALLS {
        match r.read_frame() {
            Ok(f) if f.kind == Kind::Request => ids.push(f.id),
            Ok(_) => {}
            Err(e) if e.is_recoverable() => {}
            Err(_) => break,
        }
    }
    // Whatever the host sends from now on (signals, file data) is drained
    // so that its writes never block on us.
    let drain = std::thread::spawn(move || while r.read_frame().is_ok() {});
    let mut t = Tape(script);
    while !t.done() {
        let op = t.u8();
        let pick = usize::from(t.u8()) % (CALLS + 1);
        let id = match ids.get(pick) {
            Some(id) => *id,
            None => t.u32(),
        };
        let bytes = match op % 6 {
            // A frame of a known kind.
            0 | 1 => {
                let kind = Kind::from_u8(1 + t.u8() % 11).unwrap_or(Kind::Stdout);
                let payload = match kind {
                    Kind::Response => response_payload(&mut t),
                    Kind::Event => event_payload(&mut t),
                    // A grant of any size, or a malformed one.
                    Kind::Window => match t.u8() % 4 {
                        0 => {
                            let n = usize::from(t.u8() % 8);
                            t.bytes(n)
                        }
                        _ => t.u32().to_be_bytes().to_vec(),
                    },
                    // Data, sometimes more than any window allows.
                    _ => match t.u8() % 16 {
                        0 => vec![b'o'; 300 * 1024],
                        n => vec![b'o'; usize::from(n) * usize::from(t.u8())],
                    },
                };
                let mut v = Vec::new();
                let _ = write_frame(&mut v, kind, id, &payload);
                v
            }
            // A header with any version, kind and length, and a few bytes.
            2 => {
                let mut h = Header::encode(Kind::Stdout, id, t.u32()).to_vec();
                h[2] = t.u8();
                h[3] = t.u8();
                let n = usize::from(t.u8() % 16);
                h.extend(t.bytes(n));
                h
            }
            // Garbage.
            3 => {
                let n = usize::from(t.u8() % 64);
                t.bytes(n)
            }
            // A frame cut short.
            4 => {
                let mut v = Vec::new();
                let _ = write_frame(&mut v, Kind::Response, id, &response_payload(&mut t));
                v.truncate(usize::from(t.u8()) % v.len().max(1));
                v
            }
            _ => {
                std::thread::sleep(Duration::from_millis(u64::from(t.u8() % 4)));
                continue;
            }
        };
        if w.write_all(&bytes).is_err() {
            break;
        }
    }
    let _ = w.shutdown(std::net::Shutdown::Both);
    let _ = drain.join();
}
