//! envd over the seam: the `process.Process` and `filesystem.Filesystem`
//! Connect services (JSON codec; unary, server-streaming `Start`, `Connect`,
//! `WatchDir`, client-streaming `StreamInput`), files over plain HTTP and
//! `/health`. Each call is one seam call (or a followed process) on a
//! blocking thread; stream messages are sent as the guest produces them.
//!
//! A stream sends a keepalive message after `Keepalive-Ping-Interval`
//! seconds without one (as envd does; the SDK skips them), ends with
//! `deadline_exceeded` at its `Connect-Timeout-Ms`, and stops following
//! (the process goes on, as after the SDK's `disconnect`) within
//! [`forkd_ops::policy::PROCESS_QUIET`] of its client going away: a dead
//! client never holds a follower or a watch for ever.

use std::cell::Cell;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::Request;
use axum::http::header;
use axum::response::Response;
use forkd_e2b::connect::{
    self, check_content_type, decode_request_envelope, decode_unary_request, encode_message,
    CallKind, Code, ConnectError, EndStream, EnvelopeDecoder, DEFAULT_MAX_MESSAGE,
};
use forkd_e2b::envd::files::{error_body, FilesQuery, WriteInfo};
use forkd_e2b::envd::filesystem::{self as fs, EntryInfo, EventType, FileType};
use forkd_e2b::envd::process::{self as pr, ProcessSelector};
use forkd_e2b::envd::{user_from_authorization, Empty, Validate};
use forkd_e2b::routes::{Kind, RouteMatch};
use forkd_ops::{
    ErrorKind, FileInfo, FileKind, FsEventKind, OpError, Operations, ProcessEvent, ProcessRef,
    ProcessSpec, PtySize, WriteOptions,
};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio_stream::StreamExt as _;

use super::{blocking, read_body, reply, E2b};

/// Largest file a single `GET /files` answer carries.
const MAX_FILE_READ: usize = 256 << 20;

/// How long one poll of a watch waits for its first change.
const WATCH_POLL: Duration = Duration::from_secs(1);

/// The Connect code of a seam error.
fn code_of(e: &OpError) -> Code {
    match e.kind {
        ErrorKind::BadInput => Code::InvalidArgument,
        ErrorKind::NotFound => Code::NotFound,
        ErrorKind::Conflict => Code::AlreadyExists,
        ErrorKind::Busy => Code::ResourceExhausted,
        ErrorKind::Unprocessable => Code::FailedPrecondition,
        ErrorKind::PermissionDenied => Code::PermissionDenied,
        ErrorKind::Internal => Code::Internal,
    }
}

fn to_connect(e: &OpError) -> ConnectError {
    ConnectError::new(code_of(e), e.message.clone())
}

fn unary_error(e: &ConnectError) -> Response {
    reply(e.http_status(), connect::UNARY_JSON, e.to_json())
}

/// A 401 for a bad access token, in the form the route's caller reads.
pub(crate) fn unauthenticated(kind: &Kind, message: &str) -> Response {
    match kind {
        Kind::Http | Kind::Relay => reply(401, "application/json", error_body(401, message)),
        _ => unary_error(&ConnectError::new(Code::Unauthenticated, message)),
    }
}

fn unary_ok<T: Serialize>(v: &T) -> Response {
    match serde_json::to_vec(v) {
        Ok(b) => reply(200, connect::UNARY_JSON, b),
        Err(e) => unary_error(&ConnectError::new(Code::Internal, e.to_string())),
    }
}

/// A guest path as the seam takes it: E2B's relative paths are relative to
/// the user's home (root's here).
fn guest_path(path: &str) -> String {
    if path.starts_with('/') {
        path.to_owned()
    } else {
        format!("/root/{path}")
    }
}

fn entry(info: &FileInfo) -> EntryInfo {
    let file_type = match info.kind {
        FileKind::Dir => FileType::Directory,
        FileKind::Symlink => FileType::Symlink,
        FileKind::File | FileKind::Other => FileType::File,
    };
    EntryInfo {
        name: info.name.clone(),
        file_type,
        path: info.path.clone(),
        size: i64::try_from(info.size).unwrap_or(i64::MAX),
        mode: info.mode & 0o7777,
        permissions: info.permissions.clone(),
        owner: info.owner.clone(),
        group: info.group.clone(),
        modified_time: time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(
            info.modified_ns,
        ))
        .ok(),
        symlink_target: info.symlink_target.clone(),
        metadata: Default::default(),
        is_symlink: info.kind == FileKind::Symlink,
    }
}

fn selector(s: &Option<ProcessSelector>) -> ProcessRef {
    match s {
        Some(ProcessSelector::Pid(p)) => ProcessRef::Pid(*p),
        Some(ProcessSelector::Tag(t)) => ProcessRef::Tag(t.clone()),
        None => ProcessRef::Pid(0),
    }
}

/// Decodes and validates a unary request.
async fn unary_request<T: DeserializeOwned>(
    req: Request,
    check: fn(&T) -> Result<(), ConnectError>,
) -> Result<T, Response> {
    let ct = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    if let Err(m) = check_content_type(ct.as_deref(), CallKind::Unary) {
        return Err(reply(
            415,
            connect::UNARY_JSON,
            ConnectError::new(Code::InvalidArgument, m).to_json(),
        ));
    }
    let body = read_body(req.into_body(), DEFAULT_MAX_MESSAGE)
        .await
        .map_err(|m| unary_error(&ConnectError::new(Code::ResourceExhausted, m)))?;
    let msg: T = decode_unary_request(&body).map_err(|e| unary_error(&e.to_connect_error()))?;
    check(&msg).map_err(|e| unary_error(&e))?;
    Ok(msg)
}

/// Decodes the one request message of a server-streaming call.
async fn stream_request<T: DeserializeOwned + Validate>(req: Request) -> Result<T, Response> {
    let ct = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    if let Err(m) = check_content_type(ct.as_deref(), CallKind::Streaming) {
        return Err(reply(
            415,
            connect::UNARY_JSON,
            ConnectError::new(Code::InvalidArgument, m).to_json(),
        ));
    }
    let body = read_body(req.into_body(), DEFAULT_MAX_MESSAGE + 5)
        .await
        .map_err(|m| unary_error(&ConnectError::new(Code::ResourceExhausted, m)))?;
    let mut dec = EnvelopeDecoder::new(DEFAULT_MAX_MESSAGE);
    let envs = dec
        .feed_all(&body)
        .and_then(|e| dec.finish().map(|()| e))
        .map_err(|e| unary_error(&e.to_connect_error()))?;
    let first = envs.first().ok_or_else(|| {
        unary_error(&ConnectError::new(
            Code::InvalidArgument,
            "the stream request holds no message",
        ))
    })?;
    let msg: T = decode_request_envelope(first).map_err(|e| unary_error(&e.to_connect_error()))?;
    msg.validate().map_err(|e| unary_error(&e))?;
    Ok(msg)
}

type Chunk = Result<bytes::Bytes, std::io::Error>;

/// When a stream sends keepalives and when it ends, from its request.
#[derive(Clone, Copy, Debug)]
struct Pace {
    keepalive: Duration,
    /// `Connect-Timeout-Ms`: also the lifetime of a process `Start` runs,
    /// as envd makes it.
    timeout: Option<Duration>,
    deadline: Option<Instant>,
}

impl Pace {
    fn of(headers: &axum::http::HeaderMap) -> Result<Pace, ConnectError> {
        let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
        let timeout = connect::parse_timeout_ms(header("connect-timeout-ms"))?;
        Ok(Pace {
            keepalive: connect::keepalive_interval(header(connect::KEEPALIVE_HEADER)),
            timeout,
            deadline: timeout.map(|t| Instant::now() + t),
        })
    }
}

/// The sending side of a stream, on its blocking thread.
struct Out {
    tx: tokio::sync::mpsc::Sender<Chunk>,
    pace: Pace,
    last_sent: Cell<Instant>,
    expired: Cell<bool>,
}

impl Out {
    /// Sends one message; false when the client went away or the stream's
    /// deadline passed (stop producing).
    fn send(&self, b: Vec<u8>) -> bool {
        if self.past_deadline() {
            return false;
        }
        self.last_sent.set(Instant::now());
        self.tx.blocking_send(Ok(bytes::Bytes::from(b))).is_ok()
    }

    /// Nothing to send for a while: a keepalive (`make`) when one is due;
    /// false when the client went away or the deadline passed.
    fn quiet(&self, make: impl FnOnce() -> Vec<u8>) -> bool {
        if self.past_deadline() || self.tx.is_closed() {
            return false;
        }
        if self.last_sent.get().elapsed() >= self.pace.keepalive {
            return self.send(make());
        }
        true
    }

    fn past_deadline(&self) -> bool {
        if self.pace.deadline.is_some_and(|d| Instant::now() >= d) {
            self.expired.set(true);
        }
        self.expired.get()
    }
}

/// A streaming answer fed by `produce` on a blocking thread: it sends
/// messages through the [`Out`] (which says when to stop) and returns how
/// the stream ends; a stream whose deadline passed ends with
/// `deadline_exceeded` whatever `produce` says.
fn stream_response(
    pace: Pace,
    produce: impl FnOnce(&Out) -> Result<(), ConnectError> + Send + 'static,
) -> Response {
    let (tx, rx) = tokio::sync::mpsc::channel::<Chunk>(64);
    tokio::task::spawn_blocking(move || {
        let out = Out {
            tx,
            pace,
            last_sent: Cell::new(Instant::now()),
            expired: Cell::new(false),
        };
        let produced = produce(&out);
        let end = if out.past_deadline() {
            EndStream::failed(ConnectError::new(
                Code::DeadlineExceeded,
                "the stream's deadline (connect-timeout-ms) passed",
            ))
        } else {
            match produced {
                Ok(()) => EndStream::ok(),
                Err(e) => EndStream::failed(e),
            }
        };
        let _ = out
            .tx
            .blocking_send(Ok(bytes::Bytes::from(end.to_envelope())));
    });
    let body = Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(rx));
    let mut r = Response::new(body);
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(connect::STREAM_JSON),
    );
    r
}

fn envelope<T: Serialize>(m: &T) -> Vec<u8> {
    encode_message(m).unwrap_or_default()
}

/// Sends the process events of a started or followed process (false: stop
/// following).
fn process_events(out: &Out) -> impl FnMut(ProcessEvent) -> bool + '_ {
    move |ev| {
        let event = match ev {
            ProcessEvent::Started(info) => {
                pr::ProcessEvent::Start(pr::StartEvent { pid: info.pid })
            }
            ProcessEvent::Stdout(b) => pr::ProcessEvent::Data(pr::DataEvent::Stdout(b)),
            ProcessEvent::Stderr(b) => pr::ProcessEvent::Data(pr::DataEvent::Stderr(b)),
            ProcessEvent::Pty(b) => pr::ProcessEvent::Data(pr::DataEvent::Pty(b)),
            ProcessEvent::Dropped(_) => return true,
            ProcessEvent::Quiet => {
                return out.quiet(|| {
                    envelope(&pr::StartResponse::from(pr::ProcessEvent::Keepalive(
                        Empty {},
                    )))
                })
            }
        };
        out.send(envelope(&pr::StartResponse::from(event)))
    }
}

fn end_event(out: &forkd_ops::ExecOutcome) -> pr::EndEvent {
    match (out.signal, out.code) {
        (Some(sig), _) => pr::EndEvent::signalled(sig),
        (None, Some(code)) => pr::EndEvent::exited(code),
        (None, None) => pr::EndEvent::exited(out.exit_code()),
    }
}

/// Dispatches an envd route for sandbox `id` (token already checked).
pub(crate) async fn dispatch(
    e2b: Arc<E2b>,
    id: String,
    m: RouteMatch,
    query: &str,
    req: Request,
) -> Response {
    let user = match user_from_authorization(
        req.headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok()),
    ) {
        Ok(u) => u,
        Err(e) => return unary_error(&e),
    };
    let pace = match Pace::of(req.headers()) {
        Ok(p) => p,
        Err(e) => return unary_error(&e),
    };
    let ops = e2b.ops.clone();
    let method = req.method().as_str().to_owned();
    macro_rules! unary {
        ($t:ty, |$msg:ident, $ops:ident, $id:ident, $user:ident| $body:expr) => {
            unary!($t, <$t as Validate>::validate, |$msg, $ops, $id, $user| {
                $body
            })
        };
        ($t:ty, $check:expr, |$msg:ident, $ops:ident, $id:ident, $user:ident| $body:expr) => {{
            let $msg: $t = match unary_request(req, $check).await {
                Ok(m) => m,
                Err(r) => return r,
            };
            let $ops = ops.clone();
            let $id = id.clone();
            let $user = user.clone();
            match blocking(move || $body).await {
                Ok(v) => unary_ok(&v),
                Err(e) => unary_error(&to_connect(&e)),
            }
        }};
    }
    match (method.as_str(), m.route.path) {
        ("GET", "/health") => reply(204, "application/json", Vec::new()),
        ("GET", "/files") => read_file(ops, id, query, user).await,
        ("POST", "/files") => write_files(ops, id, query, user, req).await,
        (_, "/process.Process/Start") => {
            let msg: pr::StartRequest = match stream_request(req).await {
                Ok(m) => m,
                Err(r) => return r,
            };
            let Some(p) = msg.process.clone() else {
                return unary_error(&ConnectError::new(
                    Code::InvalidArgument,
                    "`process` is missing",
                ));
            };
            let mut argv = vec![p.cmd.clone()];
            argv.extend(p.args.iter().cloned());
            let spec = ProcessSpec {
                argv,
                env: p.envs.into_iter().collect(),
                cwd: p.cwd.clone(),
                user,
                stdin: msg.wants_stdin(),
                pty: msg.pty.and_then(|p| p.size).map(|s| PtySize {
                    cols: u16::try_from(s.cols).unwrap_or(u16::MAX),
                    rows: u16::try_from(s.rows).unwrap_or(u16::MAX),
                }),
                tag: msg.tag.clone(),
                timeout: pace.timeout,
            };
            stream_response(pace, move |out| {
                let mut on = process_events(out);
                match ops.run_process(&id, &spec, &mut on) {
                    Ok(Some(end)) => {
                        out.send(envelope(&pr::StartResponse::from(pr::ProcessEvent::End(
                            end_event(&end),
                        ))));
                        Ok(())
                    }
                    Ok(None) => Ok(()),
                    Err(e) => Err(to_connect(&e)),
                }
            })
        }
        (_, "/process.Process/Connect") => {
            let msg: pr::ConnectRequest = match stream_request(req).await {
                Ok(m) => m,
                Err(r) => return r,
            };
            let process = selector(&msg.process);
            stream_response(pace, move |out| {
                // envd forgets a process when it ends; the agent keeps the
                // last ended ones, which envd's callers must not find.
                let ended = Cell::new(false);
                let mut events = process_events(out);
                let mut on = |ev: ProcessEvent| match &ev {
                    ProcessEvent::Started(info) if info.exit.is_some() => {
                        ended.set(true);
                        false
                    }
                    _ => events(ev),
                };
                let followed = ops.follow_process(&id, &process, false, &mut on);
                if ended.get() {
                    return Err(ConnectError::new(
                        Code::NotFound,
                        format!("process {process} not found (it has ended)"),
                    ));
                }
                match followed {
                    Ok(Some(end)) => {
                        out.send(envelope(&pr::StartResponse::from(pr::ProcessEvent::End(
                            end_event(&end),
                        ))));
                        Ok(())
                    }
                    Ok(None) => Ok(()),
                    Err(e) => Err(to_connect(&e)),
                }
            })
        }
        (_, "/process.Process/List") => unary!(pr::ListRequest, |_| Ok(()), |_m, ops, id, _u| {
            let procs = ops.list_processes(&id)?;
            Ok(pr::ListResponse {
                processes: procs
                    .into_iter()
                    .filter(|p| p.exit.is_none())
                    .map(|p| pr::ProcessInfo {
                        config: Some(pr::ProcessConfig {
                            cmd: p.argv.first().cloned().unwrap_or_default(),
                            args: p.argv.iter().skip(1).cloned().collect(),
                            envs: p.env.into_iter().collect(),
                            cwd: Some(p.cwd),
                        }),
                        pid: p.pid,
                        tag: p.tag,
                    })
                    .collect(),
            })
        }),
        (_, "/process.Process/SendInput") => unary!(pr::SendInputRequest, |m, ops, id, _u| {
            let data = match m.input {
                Some(pr::ProcessInput::Stdin(b)) | Some(pr::ProcessInput::Pty(b)) => b,
                None => Vec::new(),
            };
            ops.process_input(&id, &selector(&m.process), &data, false)?;
            Ok(Empty {})
        }),
        (_, "/process.Process/CloseStdin") => unary!(pr::CloseStdinRequest, |m, ops, id, _u| {
            ops.process_input(&id, &selector(&m.process), &[], true)?;
            Ok(Empty {})
        }),
        (_, "/process.Process/SendSignal") => unary!(pr::SendSignalRequest, |m, ops, id, _u| {
            ops.signal_process(&id, &selector(&m.process), m.signal.number().unwrap_or(15))?;
            Ok(Empty {})
        }),
        (_, "/process.Process/Update") => unary!(pr::UpdateRequest, |m, ops, id, _u| {
            let size = m.pty.and_then(|p| p.size).unwrap_or_default();
            ops.resize_process(
                &id,
                &selector(&m.process),
                PtySize {
                    cols: u16::try_from(size.cols).unwrap_or(u16::MAX),
                    rows: u16::try_from(size.rows).unwrap_or(u16::MAX),
                },
            )?;
            Ok(Empty {})
        }),
        (_, "/process.Process/StreamInput") => stream_input(ops, id, req).await,
        (_, "/filesystem.Filesystem/Stat") => unary!(fs::StatRequest, |m, ops, id, u| {
            let info = ops.stat(&id, &guest_path(&m.path), u.as_deref())?;
            Ok(fs::StatResponse {
                entry: Some(entry(&info)),
            })
        }),
        (_, "/filesystem.Filesystem/ListDir") => unary!(fs::ListDirRequest, |m, ops, id, u| {
            let depth = m.effective_depth();
            let list = ops.list_dir(&id, &guest_path(&m.path), depth, u.as_deref())?;
            Ok(fs::ListDirResponse {
                entries: list.iter().map(entry).collect(),
            })
        }),
        (_, "/filesystem.Filesystem/MakeDir") => unary!(fs::MakeDirRequest, |m, ops, id, u| {
            let path = guest_path(&m.path);
            if !ops.make_dir(&id, &path, u.as_deref())? {
                return Err(OpError {
                    kind: ErrorKind::Conflict,
                    message: format!("directory {path} already exists"),
                    hint: None,
                });
            }
            let info = ops.stat(&id, &path, u.as_deref())?;
            Ok(fs::MakeDirResponse {
                entry: Some(entry(&info)),
            })
        }),
        (_, "/filesystem.Filesystem/Remove") => unary!(fs::RemoveRequest, |m, ops, id, u| {
            ops.remove_path(&id, &guest_path(&m.path), u.as_deref())?;
            Ok(Empty {})
        }),
        (_, "/filesystem.Filesystem/Move") => unary!(fs::MoveRequest, |m, ops, id, u| {
            let info = ops.rename_path(
                &id,
                &guest_path(&m.source),
                &guest_path(&m.destination),
                u.as_deref(),
            )?;
            Ok(fs::MoveResponse {
                entry: Some(entry(&info)),
            })
        }),
        (_, "/filesystem.Filesystem/CreateWatcher") => {
            unary!(fs::CreateWatcherRequest, |m, ops, id, u| {
                let w = ops.watch_dir(&id, &guest_path(&m.path), m.recursive, u.as_deref())?;
                Ok(fs::CreateWatcherResponse {
                    watcher_id: w.to_string(),
                })
            })
        }
        (_, "/filesystem.Filesystem/GetWatcherEvents") => {
            unary!(fs::GetWatcherEventsRequest, |m, ops, id, _u| {
                let w = watcher(&m.watcher_id)?;
                let events = ops.watch_events(&id, w, Duration::ZERO)?;
                Ok(fs::GetWatcherEventsResponse {
                    events: events.iter().map(fs_event).collect(),
                })
            })
        }
        (_, "/filesystem.Filesystem/RemoveWatcher") => {
            unary!(fs::RemoveWatcherRequest, |m, ops, id, _u| {
                ops.unwatch(&id, watcher(&m.watcher_id)?)?;
                Ok(Empty {})
            })
        }
        (_, "/filesystem.Filesystem/WatchDir") => {
            let msg: fs::WatchDirRequest = match stream_request(req).await {
                Ok(m) => m,
                Err(r) => return r,
            };
            stream_response(pace, move |out| {
                let w = ops
                    .watch_dir(&id, &guest_path(&msg.path), msg.recursive, user.as_deref())
                    .map_err(|e| to_connect(&e))?;
                let mut open = out.send(envelope(&fs::WatchDirResponse::Start(Empty {})));
                while open {
                    let events = match ops.watch_events(&id, w, WATCH_POLL) {
                        Ok(ev) => ev,
                        Err(e) => {
                            let _ = ops.unwatch(&id, w);
                            return Err(to_connect(&e));
                        }
                    };
                    open = if events.is_empty() {
                        out.quiet(|| envelope(&fs::WatchDirResponse::Keepalive(Empty {})))
                    } else {
                        events.iter().all(|e| {
                            out.send(envelope(&fs::WatchDirResponse::Filesystem(Box::new(
                                fs_event(e),
                            ))))
                        })
                    };
                }
                let _ = ops.unwatch(&id, w);
                Ok(())
            })
        }
        _ => unary_error(&ConnectError::new(
            Code::Unimplemented,
            format!("{method} {} is not served", m.route.path),
        )),
    }
}

fn watcher(id: &str) -> Result<u32, OpError> {
    id.parse().map_err(|_| OpError {
        kind: ErrorKind::NotFound,
        message: format!("watcher {id:?} not found"),
        hint: None,
    })
}

fn fs_event(e: &forkd_ops::FsEvent) -> fs::FilesystemEvent {
    fs::FilesystemEvent {
        name: e.name.clone(),
        event_type: match e.kind {
            FsEventKind::Create => EventType::Create,
            FsEventKind::Write => EventType::Write,
            FsEventKind::Remove => EventType::Remove,
            FsEventKind::Rename => EventType::Rename,
            FsEventKind::Chmod => EventType::Chmod,
        },
        entry: None,
    }
}

/// `StreamInput`: request envelopes as they arrive, each `data` written to
/// the process selected by the first (`start`) message.
async fn stream_input(ops: Arc<dyn Operations>, id: String, req: Request) -> Response {
    let mut stream = req.into_body().into_data_stream();
    let mut dec = EnvelopeDecoder::new(DEFAULT_MAX_MESSAGE);
    let mut process: Option<ProcessRef> = None;
    let fail = |e: ConnectError| {
        let mut out = EndStream::failed(e).to_envelope();
        out.shrink_to_fit();
        reply(200, connect::STREAM_JSON, out)
    };
    while let Some(chunk) = stream.next().await {
        let chunk = match chunk {
            Ok(c) => c,
            Err(e) => {
                return fail(ConnectError::new(
                    Code::Canceled,
                    format!("the input stream broke off: {e}"),
                ))
            }
        };
        let mut input: &[u8] = &chunk;
        loop {
            let env = match dec.feed(&mut input) {
                Ok(Some(env)) => env,
                Ok(None) => break,
                Err(e) => return fail(e.to_connect_error()),
            };
            let msg: pr::StreamInputRequest = match decode_request_envelope(&env) {
                Ok(m) => m,
                Err(e) => return fail(e.to_connect_error()),
            };
            match msg {
                pr::StreamInputRequest::Start(s) => process = Some(selector(&s.process)),
                pr::StreamInputRequest::Keepalive(_) => {}
                pr::StreamInputRequest::Data(d) => {
                    let Some(p) = process.clone() else {
                        return fail(ConnectError::new(
                            Code::InvalidArgument,
                            "the first StreamInput message must be `start`",
                        ));
                    };
                    let data = match d.input {
                        Some(pr::ProcessInput::Stdin(b)) | Some(pr::ProcessInput::Pty(b)) => b,
                        None => continue,
                    };
                    let (ops, id) = (ops.clone(), id.clone());
                    if let Err(e) = blocking(move || ops.process_input(&id, &p, &data, false)).await
                    {
                        return fail(to_connect(&e));
                    }
                }
            }
        }
    }
    let mut out = envelope(&Empty {});
    out.extend(EndStream::ok().to_envelope());
    reply(200, connect::STREAM_JSON, out)
}

async fn read_file(
    ops: Arc<dyn Operations>,
    id: String,
    query: &str,
    user: Option<String>,
) -> Response {
    let q = match FilesQuery::parse(query) {
        Ok(q) => q,
        Err(m) => return reply(400, "application/json", error_body(400, &m)),
    };
    let Some(path) = q.path else {
        return reply(
            400,
            "application/json",
            error_body(400, "`path` is missing"),
        );
    };
    let user = q.username.or(user);
    let path = guest_path(&path);
    let got = blocking(move || {
        let mut out = BoundedVec(Vec::new());
        ops.read_file(&id, &path, user.as_deref(), &mut out)?;
        Ok(out.0)
    })
    .await;
    match got {
        Ok(b) => reply(200, "application/octet-stream", b),
        Err(e) => {
            let status = super::control::status_of(&e);
            reply(status, "application/json", error_body(status, &e.message))
        }
    }
}

/// A file read into memory, at most [`MAX_FILE_READ`] bytes.
struct BoundedVec(Vec<u8>);

impl std::io::Write for BoundedVec {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.0.len() + buf.len() > MAX_FILE_READ {
            return Err(std::io::Error::other(format!(
                "the file is larger than the {MAX_FILE_READ} bytes one GET /files answers; read it in parts with a command"
            )));
        }
        self.0.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

async fn write_files(
    ops: Arc<dyn Operations>,
    id: String,
    query: &str,
    user: Option<String>,
    req: Request,
) -> Response {
    let bad = |m: &str| reply(400, "application/json", error_body(400, m));
    let q = match FilesQuery::parse(query) {
        Ok(q) => q,
        Err(m) => return bad(&m),
    };
    let user = q.username.clone().or(user);
    let ct = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    // (path, data) of every file in the request.
    let mut files: Vec<(String, Vec<u8>)> = Vec::new();
    if ct.starts_with("multipart/form-data") {
        use axum::extract::FromRequest as _;
        let mut mp = match axum::extract::Multipart::from_request(req, &()).await {
            Ok(mp) => mp,
            Err(e) => return bad(&format!("the multipart body is not valid: {e}")),
        };
        loop {
            let field = match mp.next_field().await {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(e) => return bad(&format!("the multipart body is not valid: {e}")),
            };
            let path = match (&q.path, field.file_name()) {
                (Some(p), _) => p.clone(),
                (None, Some(name)) => name.to_owned(),
                (None, None) => return bad("a file part has no filename and the query no `path`"),
            };
            match field.bytes().await {
                Ok(b) => files.push((path, b.to_vec())),
                Err(e) => return bad(&format!("a file part could not be read: {e}")),
            }
        }
    } else {
        let Some(path) = q.path.clone() else {
            return bad("`path` is missing");
        };
        match read_body(req.into_body(), MAX_FILE_READ).await {
            Ok(b) => files.push((path, b.to_vec())),
            Err(m) => return reply(413, "application/json", error_body(413, &m)),
        }
    }
    let done = blocking(move || {
        let mut out = Vec::with_capacity(files.len());
        for (path, data) in files {
            let path = guest_path(&path);
            let opts = WriteOptions {
                parents: Some(true),
                user: user.clone(),
                ..WriteOptions::default()
            };
            ops.write_file(&id, &path, &opts, &mut data.as_slice())?;
            out.push(WriteInfo {
                name: path.rsplit('/').next().unwrap_or("").to_owned(),
                kind: "file".to_owned(),
                path,
                metadata: Default::default(),
            });
        }
        Ok(out)
    })
    .await;
    match done {
        Ok(infos) => match serde_json::to_vec(&infos) {
            Ok(b) => reply(200, "application/json", b),
            Err(e) => reply(500, "application/json", error_body(500, &e.to_string())),
        },
        Err(e) => {
            let status = super::control::status_of(&e);
            reply(status, "application/json", error_body(status, &e.message))
        }
    }
}
