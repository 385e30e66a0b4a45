//! Serving host requests over one frame stream.
//!
//! The read loop never blocks on a request's work: every request runs on its
//! own thread and writes frames through a shared, locked writer, so a long
//! command, a slow reader or a malformed frame never stops the agent from
//! answering the next request. What the read loop does itself is routing:
//! host data frames (`Stdin`, `Data`) and flow-control grants (`Window`) go
//! to the request they name.
//!
//! State that outlives a host connection (agent processes, watches, the
//! sandbox environment, the interpreter) lives in the [`Server`]; each
//! connection's requests in flight live in a [`Session`], which ends at the
//! channel's end or the next `Hello`.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use forkd_protocol::frame::parse_window;
use forkd_protocol::{
    decode, encode, ErrorCode, ErrorReply, Event, ExecRequest, ExitStatus, Frame, FrameError,
    FrameReader, Hello, HelloAck, Kind, Pong, ProcSelector, Request, Response, CHUNK, PROTOCOL,
};

use crate::eval::Evaluator;
use crate::fsops::{self, fs_error};
use crate::procs::Procs;
use crate::reaper::{Ended, Reaper};
use crate::session::{lock, Session, Stream, Writer};
use crate::spawn::{self, StartFailure};
use crate::users::{Names, User};
use crate::watch::Watches;
use crate::AGENT_VERSION;

/// After a command exits, output pipes still held open by its background
/// children are abandoned once they have been quiet this long.
const OUTPUT_GRACE: Duration = Duration::from_millis(300);
/// Largest sandbox environment (`SetEnv`), bytes.
const MAX_SANDBOX_ENV: usize = 256 * 1024;

/// What the server needs to know about its guest.
#[derive(Clone)]
pub struct Config {
    /// Directory commands are chrooted into and file paths resolve under
    /// (the mounted root disk); `None` runs them in the agent's own root.
    pub root: Option<PathBuf>,
    pub reaper: Reaper,
    /// Power the machine off on `Shutdown` (PID 1); otherwise just stop serving.
    pub power_off: bool,
}

/// Agent state shared by the read loop and the request threads.
pub struct Server {
    cfg: Config,
    writer: Writer,
    session: Mutex<Arc<Session>>,
    /// stdin senders of running execs, by request id.
    stdin: Mutex<HashMap<u32, Sender<Vec<u8>>>>,
    /// process groups of running execs, by request id.
    running: Arc<Mutex<HashMap<u32, libc::pid_t>>>,
    /// files being written, by request id.
    uploads: Mutex<HashMap<u32, Upload>>,
    procs: Arc<Procs>,
    watches: Arc<Watches>,
    evaluator: Arc<Evaluator>,
    /// The sandbox's environment (`SetEnv`).
    env: Mutex<Vec<(String, String)>>,
    shutdown: AtomicBool,
}

struct Upload {
    file: File,
    path: String,
    bytes: u64,
}

/// Why [`Server::serve`] returned.
#[derive(Debug)]
pub enum Stop {
    /// The host side closed the channel (it may reconnect).
    Disconnected,
    /// A read failed.
    Io(io::Error),
    /// The host asked for shutdown.
    Shutdown,
}

impl Server {
    pub fn new(cfg: Config, writer: Box<dyn Write + Send>) -> Arc<Server> {
        let writer: Writer = Arc::new(Mutex::new(writer));
        Arc::new(Server {
            procs: Arc::new(Procs::new(cfg.reaper.clone(), cfg.root.clone())),
            watches: Arc::new(Watches::default()),
            evaluator: Arc::new(Evaluator::new(cfg.reaper.clone(), cfg.root.clone())),
            session: Mutex::new(Session::new(Arc::clone(&writer))),
            cfg,
            writer,
            stdin: Mutex::new(HashMap::new()),
            running: Arc::new(Mutex::new(HashMap::new())),
            uploads: Mutex::new(HashMap::new()),
            env: Mutex::new(Vec::new()),
            shutdown: AtomicBool::new(false),
        })
    }

    /// Serves a new connection whose writing end is `writer` (the agent's
    /// port keeps one writer for all connections; tests that connect again
    /// over a new socket use this).
    pub fn serve_with<R: Read>(
        self: &Arc<Self>,
        reader: &mut FrameReader<R>,
        writer: Box<dyn Write + Send>,
    ) -> Stop {
        *lock(&self.writer) = writer;
        self.serve(reader)
    }

    /// Serves frames from `reader` until the channel closes or shutdown.
    pub fn serve<R: Read>(self: &Arc<Self>, reader: &mut FrameReader<R>) -> Stop {
        let mut mine = self.new_session();
        let stop = loop {
            if self.shutdown.load(Ordering::SeqCst) {
                break Stop::Shutdown;
            }
            match reader.read_frame() {
                Ok(frame) => {
                    if let Some(s) = self.handle(frame) {
                        mine = s;
                    }
                }
                Err(FrameError::Eof) => break Stop::Disconnected,
                Err(FrameError::Io(e)) => break Stop::Io(e),
                Err(e) => {
                    // Malformed frame: say so and keep serving.
                    let id = e.frame_id().unwrap_or(0);
                    self.reply(
                        id,
                        Response::Error(ErrorReply::new(ErrorCode::BadFrame, e.to_string())),
                    );
                }
            }
        };
        // This connection's requests end with it (a newer connection's
        // session, if one has started meanwhile, is not ours to close).
        mine.close();
        stop
    }

    /// Ends the current session's requests and starts a new session.
    fn new_session(&self) -> Arc<Session> {
        let mut s = lock(&self.session);
        s.close();
        *s = Session::new(Arc::clone(&self.writer));
        Arc::clone(&s)
    }

    fn current(&self) -> Arc<Session> {
        Arc::clone(&lock(&self.session))
    }

    /// Handles one frame; returns the new session a `Hello` started.
    fn handle(self: &Arc<Self>, frame: Frame) -> Option<Arc<Session>> {
        let id = frame.id;
        match frame.kind {
            Kind::Hello => match decode::<Hello>(&frame.payload) {
                Ok(h) => {
                    // One host at a time: a hello means the previous one is gone.
                    let s = self.new_session();
                    self.send_json(
                        Kind::HelloAck,
                        id,
                        &HelloAck {
                            nonce: h.nonce,
                            protocol: PROTOCOL,
                            agent_version: AGENT_VERSION.into(),
                        },
                    );
                    return Some(s);
                }
                Err(e) => self.bad_frame(id, format!("undecodable hello: {e}")),
            },
            Kind::Request => match decode::<Request>(&frame.payload) {
                Ok(req) => self.request(id, req),
                Err(e) => self.bad_frame(id, format!("undecodable request: {e}")),
            },
            Kind::Stdin | Kind::Data => {
                if let Some(stream) = self.current().stream(id) {
                    stream.push_inbound(frame.payload);
                } else if frame.kind == Kind::Stdin {
                    self.exec_stdin(id, frame.payload);
                } else {
                    self.upload_chunk(id, &frame.payload);
                }
            }
            Kind::Window => {
                if let (Some(stream), Some(bytes)) =
                    (self.current().stream(id), parse_window(&frame.payload))
                {
                    stream.grant(bytes);
                }
            }
            Kind::HelloAck
            | Kind::Response
            | Kind::Stdout
            | Kind::Stderr
            | Kind::Event
            | Kind::Pty => self.bad_frame(
                id,
                format!("{:?} frames are sent by the agent, not to it", frame.kind),
            ),
        }
        None
    }

    fn request(self: &Arc<Self>, id: u32, req: Request) {
        match req {
            Request::Ping {} => self.reply(id, Response::Pong(self.pong())),
            Request::Exec(exec) => self.start_exec(id, exec),
            Request::WriteFile {
                path,
                mode,
                parents,
                user,
            } => self.start_upload(id, path, mode, parents, user),
            Request::ReadFile { path, user } => {
                let me = Arc::clone(self);
                spawn_named("read-file", move || me.download(id, &path, user.as_deref()));
            }
            Request::Signal { target, signal } => {
                let pgid = lock(&self.running).get(&target).copied();
                let resp = match pgid {
                    // SAFETY: kill has no memory effects; a negative pid names
                    // the process group the exec leads.
                    Some(pg) if unsafe { libc::kill(-pg, signal) } == 0 => Response::Signalled,
                    Some(_) => Response::Error(ErrorReply::new(
                        ErrorCode::BadRequest,
                        format!("signal {signal}: {}", io::Error::last_os_error()),
                    )),
                    None => Response::Error(ErrorReply::new(
                        ErrorCode::BadRequest,
                        format!("no running command with request id {target}"),
                    )),
                };
                self.reply(id, resp);
            }
            Request::Restore {
                entropy_hex,
                unix_time_ns,
                hostname,
            } => {
                let resp = match crate::forksafe::restore(&entropy_hex, unix_time_ns, &hostname) {
                    Ok(clock_step_ms) => Response::Restored { clock_step_ms },
                    Err(e) => error(ErrorCode::BadRequest, e),
                };
                self.reply(id, resp);
            }
            Request::Shutdown {} => {
                self.reply(id, Response::ShuttingDown);
                self.shutdown.store(true, Ordering::SeqCst);
                if self.cfg.power_off {
                    crate::init::power_off();
                }
            }
            // Protocol 2: every request gets a stream and a thread.
            req => {
                let stream = self.current().open(id, req.is_windowed());
                if let Request::Cancel { target } = req {
                    if let Some(s) = self.current().stream(target) {
                        s.cancel();
                    }
                    return stream.finish(Response::Cancelled);
                }
                let me = Arc::clone(self);
                spawn_named("request", move || {
                    let resp = me.serve_request(&stream, req);
                    stream.finish(resp);
                });
            }
        }
    }

    /// Runs a protocol-2 request on its own thread; returns its last response.
    fn serve_request(&self, stream: &Arc<Stream>, req: Request) -> Response {
        let root = self.cfg.root.as_deref();
        let r: Result<Response, ErrorReply> = match req {
            Request::SetEnv { vars } => self.set_env(vars),
            Request::ProcStart { spec, attach } => {
                let env = lock(&self.env).clone();
                let hold = attach.is_some_and(|a| a.backpressure);
                self.procs
                    .start(spec, &env, hold)
                    .map(|started| match attach {
                        None => Response::ProcStarted(started.proc.info()),
                        Some(_) => {
                            stream.send_event(&Event::Started(started.proc.info()));
                            started.proc.follow(stream, 0, started.hold)
                        }
                    })
            }
            Request::ProcAttach { target, options } => self.procs.find(&target).map(|p| {
                let (cursor, hold) = p.attach_point(options);
                stream.send_event(&Event::Attached(p.info()));
                p.follow(stream, cursor, hold)
            }),
            Request::ProcWait { target } => {
                self.procs.find(&target).map(|p| match p.wait(stream) {
                    Ok(status) => Response::ProcEnded(status),
                    Err(_) => Response::Detached,
                })
            }
            Request::ProcInput { target, close } => {
                self.procs.find(&target).map(|p| p.input(stream, close))
            }
            Request::ProcCloseStdin { target } => self
                .procs
                .find(&target)
                .and_then(|p| p.close_stdin())
                .map(|()| Response::StdinClosed),
            Request::ProcSignal { target, signal } => self
                .procs
                .find(&target)
                .and_then(|p| p.signal(signal))
                .map(|()| Response::Signalled),
            Request::ProcResize { target, cols, rows } => self
                .procs
                .find(&target)
                .and_then(|p| p.resize(forkd_protocol::PtySize { cols, rows }))
                .map(|()| Response::Resized),
            Request::ProcList {} => {
                let list = self.procs.list();
                let count = list.len() as u64;
                for info in list {
                    stream.send_event(&Event::Process(info));
                }
                Ok(Response::Processes { count })
            }
            Request::Stat { path, user } => fsops::in_guest(root, user.as_deref(), |u| {
                let abs = fsops::absolute(&path, &u.home)?;
                fsops::file_info(&abs, &Names::load()).map(|info| Response::Stat { info })
            }),
            Request::ListDir { path, depth, user } => fsops::in_guest(root, user.as_deref(), |u| {
                let abs = fsops::absolute(&path, &u.home)?;
                let names = Names::load();
                let entries = fsops::list_dir(&abs, depth, &names, &mut |batch| {
                    if stream.is_cancelled() {
                        return Err(ErrorReply::new(ErrorCode::Cancelled, "cancelled"));
                    }
                    stream.send_event(&Event::Entries { entries: batch });
                    Ok(())
                })?;
                Ok(Response::Listed { entries })
            }),
            Request::MakeDir { path, mode, user } => fsops::in_guest(root, user.as_deref(), |u| {
                let abs = fsops::absolute(&path, &u.home)?;
                fsops::make_dir(&abs, mode).map(|()| Response::MadeDir)
            }),
            Request::Remove {
                path,
                recursive,
                user,
            } => fsops::in_guest(root, user.as_deref(), |u| {
                let abs = fsops::absolute(&path, &u.home)?;
                fsops::remove(&abs, recursive).map(|()| Response::Removed)
            }),
            Request::Move { from, to, user } => fsops::in_guest(root, user.as_deref(), |u| {
                let (from, to) = (
                    fsops::absolute(&from, &u.home)?,
                    fsops::absolute(&to, &u.home)?,
                );
                fsops::rename(&from, &to)?;
                fsops::file_info(&to, &Names::load()).map(|info| Response::Moved { info })
            }),
            Request::WatchStart {
                path,
                recursive,
                idle_ms,
            } => self
                .watches
                .start(root, &path, recursive, idle_ms.map(Duration::from_millis))
                .map(|watch| Response::WatchStarted { watch }),
            Request::WatchPoll { watch, wait_ms } => self
                .watches
                .poll(watch, Duration::from_millis(wait_ms), stream)
                .map(|(events, dropped)| Response::WatchEvents { events, dropped }),
            Request::WatchStop { watch } => {
                self.watches.stop(watch).map(|()| Response::WatchStopped)
            }
            Request::TarRead { path, user } => {
                Ok(crate::tarstream::read(stream, root, &path, user.as_deref()))
            }
            Request::TarWrite { path, user } => Ok(crate::tarstream::write(
                stream,
                root,
                &path,
                user.as_deref(),
            )),
            Request::TcpConnect { port, timeout_ms } => {
                Ok(crate::relay::relay(stream, port, timeout_ms))
            }
            Request::Eval {
                code,
                env,
                timeout_ms,
            } => {
                let mut all = lock(&self.env).clone();
                all.extend(env);
                Ok(self
                    .evaluator
                    .eval(stream, &code, &all, timeout_ms.map(Duration::from_millis)))
            }
            Request::CodeInterpreter { port, cwd } => self.code_interpreter(stream, port, cwd),
            // Handled on the read loop.
            Request::Ping {}
            | Request::Exec(_)
            | Request::WriteFile { .. }
            | Request::ReadFile { .. }
            | Request::Signal { .. }
            | Request::Shutdown {}
            | Request::Restore { .. }
            | Request::Cancel { .. } => Err(ErrorReply::new(
                ErrorCode::BadRequest,
                "request routed to the wrong handler",
            )),
        };
        r.unwrap_or_else(Response::Error)
    }

    fn set_env(&self, vars: Vec<(String, String)>) -> Result<Response, ErrorReply> {
        let mut size = 0;
        for (k, v) in &vars {
            if k.is_empty() || k.contains('=') || k.contains('\0') || v.contains('\0') {
                return Err(ErrorReply::new(
                    ErrorCode::BadRequest,
                    format!("invalid environment variable {k:?}"),
                ));
            }
            size += k.len() + v.len() + 2;
        }
        if size > MAX_SANDBOX_ENV {
            return Err(ErrorReply::new(
                ErrorCode::Limit,
                format!("the environment takes {size} bytes, more than {MAX_SANDBOX_ENV}"),
            ));
        }
        *lock(&self.env) = vars;
        Ok(Response::EnvSet)
    }

    /// Starts the E2B code interpreter on `port` unless it runs, then waits
    /// until the port takes connections.
    fn code_interpreter(
        &self,
        stream: &Stream,
        port: u16,
        cwd: Option<String>,
    ) -> Result<Response, ErrorReply> {
        let tag = format!("forkd-code-interpreter-{port}");
        let proc = match self.procs.find(&ProcSelector::Tag(tag.clone())) {
            Ok(p) if p.info().exit.is_none() => p,
            _ => {
                crate::eval::install_script(self.cfg.root.as_deref())?;
                let root = self.cfg.root.as_deref();
                let cwd = cwd.unwrap_or_else(|| {
                    ["/home/user", "/root"]
                        .into_iter()
                        .find(|d| spawn::cwd_exists(root, d))
                        .unwrap_or("/")
                        .to_string()
                });
                let spec = forkd_protocol::ProcSpec {
                    argv: [
                        "python3",
                        "-u",
                        crate::eval::script_path(),
                        "--port",
                        &port.to_string(),
                        "--cwd",
                        &cwd,
                    ]
                    .map(String::from)
                    .to_vec(),
                    tag: Some(tag),
                    backlog_bytes: Some(64 * 1024),
                    ..Default::default()
                };
                let env = lock(&self.env).clone();
                match self.procs.start(spec, &env, false) {
                    Ok(s) => s.proc,
                    Err(e) if e.code == ErrorCode::CommandNotFound => {
                        return Err(ErrorReply::new(
                            ErrorCode::Unavailable,
                            "python3 is not installed in this guest; the code interpreter needs \
                             an image with python3 (such as debian-python)",
                        ))
                    }
                    Err(e) => return Err(e),
                }
            }
        };
        let deadline = Instant::now() + Duration::from_secs(120);
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
        loop {
            if std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_ok() {
                return Ok(Response::CodeInterpreterReady {
                    pid: proc.pid(),
                    port,
                });
            }
            if let Some(exit) = proc.info().exit {
                return Err(ErrorReply::new(
                    ErrorCode::Unavailable,
                    format!(
                        "the code interpreter exited at start ({}): {}",
                        describe_exit(&exit),
                        proc.output_tail(2048)
                    ),
                ));
            }
            if Instant::now() > deadline || stream.wait_cancelled(Duration::from_millis(100)) {
                return Err(ErrorReply::new(
                    ErrorCode::TimedOut,
                    format!("the code interpreter did not listen on port {port} in time"),
                ));
            }
        }
    }

    fn pong(&self) -> Pong {
        let uptime_ms = std::fs::read_to_string("/proc/uptime")
            .ok()
            .and_then(|s| s.split_whitespace().next()?.parse::<f64>().ok())
            .map(|s| (s * 1000.0) as u64)
            .unwrap_or(0);
        Pong {
            agent_version: AGENT_VERSION.into(),
            protocol: PROTOCOL,
            uptime_ms,
            root_disk: self.cfg.root.is_some(),
            hostname: hostname(),
        }
    }

    // ----- exec -----

    fn exec_stdin(&self, id: u32, payload: Vec<u8>) {
        let tx = lock(&self.stdin).get(&id).cloned();
        // stdin for a command that already ended is dropped.
        if let Some(tx) = tx {
            if payload.is_empty() {
                lock(&self.stdin).remove(&id);
            }
            let _ = tx.send(payload);
        }
    }

    fn start_exec(self: &Arc<Self>, id: u32, req: ExecRequest) {
        if let Err(e) = spawn::validate(&req.argv, &req.env) {
            return self.reply(id, Response::Error(e));
        }
        if lock(&self.running).contains_key(&id) {
            return self.reply(
                id,
                error(
                    ErrorCode::BadRequest,
                    format!("request id {id} is already running"),
                ),
            );
        }
        // Register stdin before the command thread starts so that Stdin frames
        // arriving right behind the request are never dropped.
        let stdin_rx = if req.stdin {
            let (tx, rx) = mpsc::channel();
            lock(&self.stdin).insert(id, tx);
            Some(rx)
        } else {
            None
        };
        let me = Arc::clone(self);
        spawn_named("exec", move || {
            let resp = match me.run(id, &req, stdin_rx) {
                Ok(status) => Response::Exited(status),
                Err(e) => Response::Error(e),
            };
            lock(&me.stdin).remove(&id);
            me.reply(id, resp);
        });
    }

    fn run(
        &self,
        id: u32,
        req: &ExecRequest,
        stdin_rx: Option<mpsc::Receiver<Vec<u8>>>,
    ) -> Result<ExitStatus, ErrorReply> {
        let started = Instant::now();
        let root = self.cfg.root.as_deref();
        let cwd = req.cwd.as_deref().unwrap_or("/");
        if !spawn::cwd_exists(root, cwd) {
            return Err(spawn::cwd_missing(cwd));
        }
        let user = match req.user.as_deref() {
            None => User::root(),
            // Looked up in the guest's own /etc/passwd, as a process's is.
            Some(name) => crate::procs::resolve_user_and_cwd(root, Some(name), Some(cwd))?.0,
        };
        let sandbox_env = lock(&self.env).clone();
        let env = spawn::environment(&user, &[&sandbox_env, &req.env]);
        let mut cmd = spawn::command(&req.argv, &env, cwd, root, &user, false)?;
        cmd.stdin(if stdin_rx.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
        let (mut child, ended) = match self.cfg.reaper.spawn(&mut cmd) {
            Ok(c) => c,
            Err(e) => {
                // A missing directory may have been removed since the check.
                if !spawn::cwd_exists(root, cwd) {
                    return Err(spawn::cwd_missing(cwd));
                }
                let failure = StartFailure::of(&req.argv[0], &e);
                return match failure.shell_code() {
                    // The shell's convention: the reason on stderr, 127/126.
                    Some(code) => {
                        let msg = match &failure {
                            StartFailure::NotFound(m) | StartFailure::NotExecutable(m) => m,
                            StartFailure::Other(_) => "",
                        };
                        self.send_raw(Kind::Stderr, id, format!("{msg}\n").as_bytes());
                        Ok(ExitStatus {
                            code: Some(code),
                            signal: None,
                            timed_out: false,
                            duration_ms: started.elapsed().as_millis() as u64,
                        })
                    }
                    None => Err(failure.reply()),
                };
            }
        };
        let pid = child.id() as libc::pid_t;
        lock(&self.running).insert(id, pid);

        if let (Some(rx), Some(mut input)) = (stdin_rx, child.stdin.take()) {
            spawn_named("stdin", move || {
                while let Ok(chunk) = rx.recv() {
                    if chunk.is_empty() || input.write_all(&chunk).is_err() {
                        break;
                    }
                }
            });
        }
        let abandoned = Arc::new(AtomicBool::new(false));
        let activity = Arc::new(AtomicU64::new(0));
        let (done_tx, done_rx) = mpsc::channel();
        let pumps = [
            child
                .stdout
                .take()
                .map(|p| Box::new(p) as Box<dyn Read + Send>)
                .map(|p| (Kind::Stdout, p)),
            child
                .stderr
                .take()
                .map(|p| Box::new(p) as Box<dyn Read + Send>)
                .map(|p| (Kind::Stderr, p)),
        ];
        let mut n_pumps = 0;
        for (kind, pipe) in pumps.into_iter().flatten() {
            n_pumps += 1;
            let writer = Arc::clone(&self.writer);
            let (abandoned, activity, done) =
                (abandoned.clone(), activity.clone(), done_tx.clone());
            spawn_named("output", move || {
                pump_output(pipe, kind, id, &writer, &abandoned, &activity, started);
                let _ = done.send(());
            });
        }
        drop(done_tx);

        let mut timed_out = false;
        let end = match req.timeout_ms.map(Duration::from_millis) {
            Some(t) => match ended.recv_timeout(t) {
                Ok(end) => Some(end),
                Err(RecvTimeoutError::Timeout) => {
                    timed_out = true;
                    // SAFETY: kill has no memory effects; the command leads its
                    // own process group (setsid in `spawn::command`).
                    unsafe { libc::kill(-pid, libc::SIGKILL) };
                    ended.recv().ok()
                }
                Err(RecvTimeoutError::Disconnected) => None,
            },
            None => ended.recv().ok(),
        };
        lock(&self.running).remove(&id);

        // Drain output: wait for both pipes to close, but give up on pipes that
        // background processes keep open once they have gone quiet.
        let mut finished = 0;
        while finished < n_pumps {
            match done_rx.recv_timeout(Duration::from_millis(50)) {
                Ok(()) => finished += 1,
                Err(RecvTimeoutError::Disconnected) => break,
                Err(RecvTimeoutError::Timeout) => {
                    let quiet_since = Duration::from_millis(activity.load(Ordering::Relaxed));
                    if started.elapsed().saturating_sub(quiet_since) > OUTPUT_GRACE {
                        break;
                    }
                }
            }
        }
        abandoned.store(true, Ordering::SeqCst);

        let (code, signal) = match end {
            Some(Ended::Exited(c)) => (Some(c), None),
            Some(Ended::Signalled(s)) => (None, Some(s)),
            None => (None, None),
        };
        Ok(ExitStatus {
            code,
            signal,
            timed_out,
            duration_ms: started.elapsed().as_millis() as u64,
        })
    }

    // ----- files -----

    fn start_upload(
        &self,
        id: u32,
        path: String,
        mode: Option<u32>,
        parents: bool,
        user: Option<String>,
    ) {
        // Opened on a thread inside the guest's root, as the user; written
        // here, on the read loop, as the data frames arrive.
        let opened = fsops::in_guest(self.cfg.root.as_deref(), user.as_deref(), |u| {
            let p = fsops::absolute(&path, &u.home)?;
            if parents {
                fsops::make_parents(&p)?;
            }
            OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(mode.unwrap_or(0o644))
                .open(&p)
                .map_err(|e| fs_error(&p, &e))
        });
        match opened {
            Ok(file) => {
                lock(&self.uploads).insert(
                    id,
                    Upload {
                        file,
                        path,
                        bytes: 0,
                    },
                );
            }
            Err(e) => self.reply(id, Response::Error(e)),
        }
    }

    fn upload_chunk(&self, id: u32, data: &[u8]) {
        let mut uploads = lock(&self.uploads);
        let Some(up) = uploads.get_mut(&id) else {
            // Data for a refused or finished upload is dropped: the host has
            // (or will have) the error reply already.
            return;
        };
        if data.is_empty() {
            let up = uploads.remove(&id).expect("present: checked above");
            drop(uploads);
            let resp = match up.file.sync_all() {
                Ok(()) => Response::Written { bytes: up.bytes },
                Err(e) => Response::Error(fs_error(Path::new(&up.path), &e)),
            };
            return self.reply(id, resp);
        }
        if let Err(e) = up.file.write_all(data) {
            let resp = Response::Error(fs_error(Path::new(&up.path), &e));
            uploads.remove(&id);
            drop(uploads);
            return self.reply(id, resp);
        }
        up.bytes += data.len() as u64;
    }

    /// Sends a file's contents (on its own thread, inside the guest's root).
    fn download(&self, id: u32, path: &str, user: Option<&str>) {
        let resp = (|| {
            let u = fsops::enter(self.cfg.root.as_deref(), user)?;
            let p = fsops::absolute(path, &u.home)?;
            let mut f = File::open(&p).map_err(|e| fs_error(&p, &e))?;
            if f.metadata().map(|m| m.is_dir()).unwrap_or(false) {
                return Err(ErrorReply::new(
                    ErrorCode::IsADirectory,
                    format!("{path} is a directory, not a file"),
                ));
            }
            let mut buf = vec![0u8; CHUNK];
            let mut total = 0u64;
            loop {
                let n = match f.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(fs_error(&p, &e)),
                };
                total += n as u64;
                self.send_raw(Kind::Data, id, &buf[..n]);
            }
            Ok(Response::FileDone { bytes: total })
        })();
        self.reply(id, resp.unwrap_or_else(Response::Error));
    }

    // ----- output -----

    fn reply(&self, id: u32, resp: Response) {
        self.send_json(Kind::Response, id, &resp);
    }

    fn bad_frame(&self, id: u32, msg: String) {
        self.reply(id, error(ErrorCode::BadFrame, msg));
    }

    fn send_json<T: serde::Serialize>(&self, kind: Kind, id: u32, msg: &T) {
        self.send_raw(kind, id, &encode(msg));
    }

    fn send_raw(&self, kind: Kind, id: u32, payload: &[u8]) {
        // A failed write means the host went away; requests finish regardless
        // and the next session starts clean after its handshake.
        let _ = forkd_protocol::frame::write_frame(&mut **lock(&self.writer), kind, id, payload);
    }
}

fn describe_exit(e: &ExitStatus) -> String {
    match (e.code, e.signal) {
        (Some(c), _) => format!("exit code {c}"),
        (None, Some(s)) => format!("signal {s}"),
        _ => "unknown status".into(),
    }
}

fn pump_output(
    mut pipe: Box<dyn Read + Send>,
    kind: Kind,
    id: u32,
    writer: &Writer,
    abandoned: &AtomicBool,
    activity: &AtomicU64,
    started: Instant,
) {
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = match pipe.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => return,
        };
        activity.store(started.elapsed().as_millis() as u64, Ordering::Relaxed);
        if abandoned.load(Ordering::SeqCst) {
            // The exec already answered; keep draining so the writer does not
            // block on a full pipe, but send nothing more for this id.
            continue;
        }
        let _ = forkd_protocol::frame::write_frame(&mut **lock(writer), kind, id, &buf[..n]);
    }
}

fn error(code: ErrorCode, msg: impl Into<String>) -> Response {
    Response::Error(ErrorReply::new(code, msg))
}

fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most buf.len() bytes into buf.
    let r = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if r != 0 {
        return String::new();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

fn spawn_named(name: &str, f: impl FnOnce() + Send + 'static) {
    if let Err(e) = std::thread::Builder::new().name(name.into()).spawn(f) {
        crate::log(&format!("cannot start a {name} thread: {e}"));
    }
}
