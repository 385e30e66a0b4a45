//! Serving host requests over one frame stream.
//!
//! The read loop never blocks on a request's work: exec and file reads run on
//! their own threads and write frames through a shared, locked writer, so a
//! long command, a slow reader or a malformed frame never stops the agent from
//! answering the next request.

use std::collections::HashMap;
use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use forkd_protocol::frame::write_frame;
use forkd_protocol::{
    decode, encode, ErrorCode, ErrorReply, ExecRequest, ExitStatus, Frame, FrameError, FrameReader,
    Hello, HelloAck, Kind, Pong, Request, Response, CHUNK, VERSION,
};

use crate::reaper::{Ended, Reaper};
use crate::AGENT_VERSION;

/// Environment every command starts with; `ExecRequest::env` adds to it.
const DEFAULT_ENV: &[(&str, &str)] = &[
    (
        "PATH",
        "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    ),
    ("HOME", "/root"),
    ("LANG", "C.UTF-8"),
];

/// After a command exits, output pipes still held open by its background
/// children are abandoned once they have been quiet this long.
const OUTPUT_GRACE: Duration = Duration::from_millis(300);

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

type Writer = Arc<Mutex<Box<dyn Write + Send>>>;

/// Agent state shared by the read loop and the request threads.
pub struct Server {
    cfg: Config,
    writer: Writer,
    /// stdin senders of running execs, by request id.
    stdin: Mutex<HashMap<u32, Sender<Vec<u8>>>>,
    /// process groups of running execs, by request id.
    running: Arc<Mutex<HashMap<u32, libc::pid_t>>>,
    /// files being written, by request id.
    uploads: Mutex<HashMap<u32, Upload>>,
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
        Arc::new(Server {
            cfg,
            writer: Arc::new(Mutex::new(writer)),
            stdin: Mutex::new(HashMap::new()),
            running: Arc::new(Mutex::new(HashMap::new())),
            uploads: Mutex::new(HashMap::new()),
            shutdown: AtomicBool::new(false),
        })
    }

    /// Serves frames from `reader` until the channel closes or shutdown.
    pub fn serve<R: Read>(self: &Arc<Self>, reader: &mut FrameReader<R>) -> Stop {
        loop {
            if self.shutdown.load(Ordering::SeqCst) {
                return Stop::Shutdown;
            }
            match reader.read_frame() {
                Ok(frame) => self.handle(frame),
                Err(FrameError::Eof) => return Stop::Disconnected,
                Err(FrameError::Io(e)) => return Stop::Io(e),
                Err(e) => {
                    // Malformed frame: say so and keep serving.
                    let id = e.frame_id().unwrap_or(0);
                    self.reply(
                        id,
                        Response::Error(ErrorReply::new(ErrorCode::BadFrame, e.to_string())),
                    );
                }
            }
        }
    }

    fn handle(self: &Arc<Self>, frame: Frame) {
        let id = frame.id;
        match frame.kind {
            Kind::Hello => match decode::<Hello>(&frame.payload) {
                Ok(h) => self.send_json(
                    Kind::HelloAck,
                    id,
                    &HelloAck {
                        nonce: h.nonce,
                        protocol: VERSION,
                        agent_version: AGENT_VERSION.into(),
                    },
                ),
                Err(e) => self.bad_frame(id, format!("undecodable hello: {e}")),
            },
            Kind::Request => match decode::<Request>(&frame.payload) {
                Ok(req) => self.request(id, req),
                Err(e) => self.bad_frame(id, format!("undecodable request: {e}")),
            },
            Kind::Stdin => {
                let tx = lock(&self.stdin).get(&id).cloned();
                // stdin for a command that already ended is dropped.
                if let Some(tx) = tx {
                    if frame.payload.is_empty() {
                        lock(&self.stdin).remove(&id);
                    }
                    let _ = tx.send(frame.payload);
                }
            }
            Kind::Data => self.upload_chunk(id, &frame.payload),
            Kind::HelloAck | Kind::Response | Kind::Stdout | Kind::Stderr => self.bad_frame(
                id,
                format!("{:?} frames are sent by the agent, not to it", frame.kind),
            ),
        }
    }

    fn request(self: &Arc<Self>, id: u32, req: Request) {
        match req {
            Request::Ping {} => self.reply(id, Response::Pong(self.pong())),
            Request::Exec(exec) => self.start_exec(id, exec),
            Request::WriteFile { path, mode } => self.start_upload(id, path, mode),
            Request::ReadFile { path } => {
                let me = Arc::clone(self);
                spawn_named("read-file", move || me.download(id, &path));
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
            protocol: VERSION,
            uptime_ms,
            root_disk: self.cfg.root.is_some(),
            hostname: hostname(),
        }
    }

    // ----- exec -----

    fn start_exec(self: &Arc<Self>, id: u32, req: ExecRequest) {
        if req.argv.is_empty() || req.argv[0].is_empty() {
            return self.reply(
                id,
                error(ErrorCode::BadRequest, "exec needs a non-empty argv"),
            );
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
                Err(e) => e,
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
    ) -> Result<ExitStatus, Response> {
        let started = Instant::now();
        let mut cmd = self.command(req)?;
        cmd.stdin(if stdin_rx.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
        let (mut child, ended) = self.cfg.reaper.spawn(&mut cmd).map_err(|e| {
            error(
                ErrorCode::Spawn,
                format!("cannot run `{}`: {e}", req.argv[0]),
            )
        })?;
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
                    // own process group (setsid in `command`).
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

    /// Builds the command: fresh environment, own session, chroot and cwd.
    fn command(&self, req: &ExecRequest) -> Result<Command, Response> {
        let mut cmd = Command::new(&req.argv[0]);
        cmd.args(&req.argv[1..]).env_clear();
        for (k, v) in DEFAULT_ENV {
            cmd.env(k, v);
        }
        for (k, v) in &req.env {
            if k.is_empty() || k.contains('=') || k.contains('\0') {
                return Err(error(
                    ErrorCode::BadRequest,
                    format!("invalid environment variable name {k:?}"),
                ));
            }
            cmd.env(k, v);
        }
        let cwd = req.cwd.as_deref().unwrap_or("/");
        let cwd = CString::new(cwd)
            .map_err(|_| error(ErrorCode::BadRequest, "cwd contains a NUL byte"))?;
        let root = match &self.cfg.root {
            Some(r) => Some(
                CString::new(r.as_os_str().as_bytes())
                    .map_err(|_| error(ErrorCode::BadRequest, "root path contains a NUL byte"))?,
            ),
            None => None,
        };
        // SAFETY: the closure runs in the forked child before exec and calls
        // only async-signal-safe functions (setsid, sigprocmask, chroot, chdir)
        // on CStrings allocated before the fork.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setsid() < 0 {
                    return Err(io::Error::last_os_error());
                }
                // The agent blocks SIGCHLD and SIGIO; commands must not inherit that.
                let mut set: libc::sigset_t = std::mem::zeroed();
                libc::sigemptyset(&mut set);
                libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
                if let Some(root) = &root {
                    if libc::chroot(root.as_ptr()) < 0 {
                        return Err(io::Error::last_os_error());
                    }
                }
                if libc::chdir(cwd.as_ptr()) < 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        Ok(cmd)
    }

    // ----- files -----

    /// Maps a guest path onto the command root.
    fn resolve(&self, path: &str) -> Result<PathBuf, Response> {
        if !path.starts_with('/') {
            return Err(error(
                ErrorCode::BadRequest,
                format!("path {path:?} must be absolute"),
            ));
        }
        if path.contains('\0') {
            return Err(error(ErrorCode::BadRequest, "path contains a NUL byte"));
        }
        Ok(match &self.cfg.root {
            Some(root) => root.join(path.trim_start_matches('/')),
            None => PathBuf::from(path),
        })
    }

    fn start_upload(&self, id: u32, path: String, mode: Option<u32>) {
        let opened = self.resolve(&path).and_then(|p| {
            OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(mode.unwrap_or(0o644))
                .open(&p)
                .map_err(|e| io_error(&path, &e))
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
            Err(resp) => self.reply(id, resp),
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
                Err(e) => io_error(&up.path, &e),
            };
            return self.reply(id, resp);
        }
        if let Err(e) = up.file.write_all(data) {
            let resp = io_error(&up.path, &e);
            uploads.remove(&id);
            drop(uploads);
            return self.reply(id, resp);
        }
        up.bytes += data.len() as u64;
    }

    fn download(&self, id: u32, path: &str) {
        let resp = (|| {
            let p = self.resolve(path)?;
            let mut f = File::open(&p).map_err(|e| io_error(path, &e))?;
            if f.metadata().map(|m| m.is_dir()).unwrap_or(false) {
                return Err(error(ErrorCode::Io, format!("{path} is a directory")));
            }
            let mut buf = vec![0u8; CHUNK];
            let mut total = 0u64;
            loop {
                let n = match f.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(io_error(path, &e)),
                };
                total += n as u64;
                self.send_raw(Kind::Data, id, &buf[..n]);
            }
            Ok(Response::FileDone { bytes: total })
        })();
        self.reply(id, resp.unwrap_or_else(|e| e));
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
        let _ = write_frame(&mut **lock(&self.writer), kind, id, payload);
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
        let _ = write_frame(&mut **lock(writer), kind, id, &buf[..n]);
    }
}

fn error(code: ErrorCode, msg: impl Into<String>) -> Response {
    Response::Error(ErrorReply::new(code, msg))
}

fn io_error(path: &str, e: &io::Error) -> Response {
    let code = if e.kind() == io::ErrorKind::NotFound {
        ErrorCode::NotFound
    } else {
        ErrorCode::Io
    };
    error(code, format!("{path}: {e}"))
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

fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
