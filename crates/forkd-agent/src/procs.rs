//! Processes that belong to the agent, not to a request (`ProcStart`).
//!
//! Each runs in its own session, optionally on a pseudo-terminal, and its
//! output goes into a bounded backlog ([`Ring`]) from which any number of
//! attachments — of this session or a later one — follow it with their own
//! cursor. The process never waits for an attachment unless that attachment
//! asked for backpressure; a slow one instead learns how much it lost.
//! Processes outlive the host connection: the table lives in the server,
//! not the session, and in guest memory, so a snapshot carries it to every
//! child.
//!
//! Bounds: [`MAX_LIVE`] running processes, the last [`MAX_ENDED`] ended
//! ones kept for late attachments and waits, and at most [`BACKLOG_BUDGET`]
//! bytes of backlog reserved across all of them (an ended process's backlog
//! goes first when a new one needs room).

use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use forkd_protocol::proc::{DEFAULT_BACKLOG, MAX_BACKLOG, MIN_BACKLOG};
use forkd_protocol::{
    ErrorCode, ErrorReply, Event, ExitStatus, Kind, ProcInfo, ProcSelector, ProcSpec, PtySize,
    Response, CHUNK,
};

use crate::reaper::{Ended, Reaper};
use crate::ring::{Next, Ring, Source};
use crate::session::{lock, Cancelled, Recv, Stream, TICK};
use crate::spawn::{self, StartFailure};
use crate::users::User;

/// Running agent processes at most.
pub const MAX_LIVE: usize = 256;
/// Ended processes kept for late attachments, waits and listings.
pub const MAX_ENDED: usize = 32;
/// Backlog bytes reserved across all kept processes at most.
pub const BACKLOG_BUDGET: u64 = 64 << 20;
/// After a process exits, output still held open by its background
/// children is abandoned once it has been quiet this long.
const OUTPUT_GRACE: Duration = Duration::from_millis(300);
/// Longest tag.
const MAX_TAG: usize = 256;

/// The agent's process table.
pub struct Procs {
    table: Mutex<Table>,
    reaper: Reaper,
    root: Option<PathBuf>,
}

#[derive(Default)]
struct Table {
    live: HashMap<u32, Arc<Proc>>,
    /// Oldest first.
    ended: VecDeque<Arc<Proc>>,
    /// Backlog capacity of every process in `live` and `ended`.
    reserved: u64,
}

/// One agent process.
pub struct Proc {
    /// What it was started as (`exit` and `stdin` are filled in on demand).
    info: ProcInfo,
    started: Instant,
    cap: usize,
    /// Its stdin pipe or terminal master (non-blocking), while open.
    input: Mutex<Option<File>>,
    /// The terminal master, for resizing.
    pty: Option<File>,
    out: Mutex<Output>,
    changed: Condvar,
}

struct Output {
    ring: Ring,
    /// Cursors of attachments with backpressure, by attachment number.
    holds: HashMap<u64, u64>,
    next_hold: u64,
    exit: Option<ExitStatus>,
    /// Output readers blocked for room (they count as active).
    blocked_readers: usize,
    /// The process ended: readers still draining pipes drop what they read.
    abandoned: bool,
}

/// A started process and, when the start attaches, the attachment's hold.
pub struct Started {
    pub proc: Arc<Proc>,
    pub hold: Option<u64>,
}

impl Proc {
    /// Its description now.
    pub fn info(&self) -> ProcInfo {
        let mut info = self.info.clone();
        info.exit = lock(&self.out).exit;
        info.stdin = lock(&self.input).is_some();
        info
    }

    pub fn pid(&self) -> u32 {
        self.info.pid
    }

    fn ended(&self) -> bool {
        lock(&self.out).exit.is_some()
    }

    /// Appends output, first waiting while a backpressure attachment has
    /// not sent what would be dropped. Dropped once the process ended.
    fn push_output(&self, source: Source, bytes: &[u8]) {
        let mut out = lock(&self.out);
        loop {
            if out.abandoned {
                return;
            }
            let Some(min) = out.holds.values().min().copied() else {
                break;
            };
            if out.ring.room_before(min) >= bytes.len() {
                break;
            }
            out.blocked_readers += 1;
            out = self
                .changed
                .wait_timeout(out, TICK)
                .unwrap_or_else(|p| p.into_inner())
                .0;
            out.blocked_readers -= 1;
        }
        out.ring.push(source, bytes);
        self.changed.notify_all();
    }

    /// Where a new attachment starts (the oldest byte kept, or the next
    /// one) and, with backpressure, its hold there, taken at one instant.
    pub fn attach_point(&self, options: forkd_protocol::AttachOptions) -> (u64, Option<u64>) {
        let mut out = lock(&self.out);
        let cursor = if options.replay {
            out.ring.start()
        } else {
            out.ring.end()
        };
        let hold = options.backpressure.then(|| {
            let id = out.next_hold;
            out.next_hold += 1;
            out.holds.insert(id, cursor);
            id
        });
        (cursor, hold)
    }

    /// The last `max` bytes of output, as text (for error messages).
    pub fn output_tail(&self, max: usize) -> String {
        let out = lock(&self.out);
        let mut cursor = out
            .ring
            .end()
            .saturating_sub(max as u64)
            .max(out.ring.start());
        let mut bytes = Vec::new();
        while let Next::Data(_, b) = out.ring.read(cursor, max) {
            bytes.extend_from_slice(b);
            cursor += b.len() as u64;
        }
        String::from_utf8_lossy(&bytes).trim().to_string()
    }

    /// Registers a backpressure attachment at `cursor`.
    fn hold(&self, cursor: u64) -> u64 {
        let mut out = lock(&self.out);
        let id = out.next_hold;
        out.next_hold += 1;
        out.holds.insert(id, cursor);
        id
    }

    fn release(&self, hold: Option<u64>) {
        if let Some(h) = hold {
            lock(&self.out).holds.remove(&h);
            self.changed.notify_all();
        }
    }

    /// Follows the output from `cursor` to the end (or cancellation),
    /// sending it on `stream`; returns the request's last response.
    pub fn follow(&self, stream: &Stream, mut cursor: u64, hold: Option<u64>) -> Response {
        let r = self.follow_inner(stream, &mut cursor, hold);
        self.release(hold);
        match r {
            Ok(status) => Response::ProcEnded(status),
            Err(Cancelled) => Response::Detached,
        }
    }

    fn follow_inner(
        &self,
        stream: &Stream,
        cursor: &mut u64,
        hold: Option<u64>,
    ) -> Result<ExitStatus, Cancelled> {
        loop {
            enum Step {
                Lost(u64),
                Data(Source, Vec<u8>),
                End(ExitStatus),
            }
            let step = {
                let mut out = lock(&self.out);
                loop {
                    if stream.is_cancelled() {
                        return Err(Cancelled);
                    }
                    match out.ring.read(*cursor, CHUNK) {
                        Next::Gap { lost, resume } => {
                            *cursor = resume;
                            break Step::Lost(lost);
                        }
                        Next::Data(source, bytes) => break Step::Data(source, bytes.to_vec()),
                        Next::Empty => {
                            if let Some(status) = out.exit {
                                break Step::End(status);
                            }
                        }
                    }
                    out = self
                        .changed
                        .wait_timeout(out, TICK)
                        .unwrap_or_else(|p| p.into_inner())
                        .0;
                }
            };
            match step {
                Step::Lost(bytes) => stream.send_event(&Event::Dropped { bytes }),
                Step::Data(source, bytes) => {
                    let kind = match source {
                        Source::Stdout => Kind::Stdout,
                        Source::Stderr => Kind::Stderr,
                        Source::Pty => Kind::Pty,
                    };
                    stream.send_data(kind, &bytes)?;
                    *cursor += bytes.len() as u64;
                    if let Some(h) = hold {
                        lock(&self.out).holds.insert(h, *cursor);
                        self.changed.notify_all();
                    }
                }
                Step::End(status) => return Ok(status),
            }
        }
    }

    /// Waits for the end; `Err` when the stream is cancelled first.
    pub fn wait(&self, stream: &Stream) -> Result<ExitStatus, Cancelled> {
        let mut out = lock(&self.out);
        loop {
            if let Some(status) = out.exit {
                return Ok(status);
            }
            if stream.is_cancelled() {
                return Err(Cancelled);
            }
            out = self
                .changed
                .wait_timeout(out, TICK)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Writes the host's input (the stream's data frames) to stdin; closes
    /// stdin at the end when `close`. Returns the last response.
    pub fn input(&self, stream: &Stream, close: bool) -> Response {
        if lock(&self.input).is_none() {
            return Response::Error(self.no_stdin());
        }
        let mut written = 0u64;
        loop {
            match stream.recv(None) {
                Recv::Data(d) => {
                    if let Err(e) = self.write_input(&d, stream) {
                        return Response::Error(e);
                    }
                    written += d.len() as u64;
                }
                Recv::Eof => break,
                Recv::Cancelled | Recv::Idle => {
                    return Response::Error(ErrorReply::new(
                        ErrorCode::Cancelled,
                        format!("input to process {} was cancelled", self.pid()),
                    ))
                }
            }
        }
        if close && self.pty.is_none() {
            lock(&self.input).take();
        }
        Response::InputWritten { bytes: written }
    }

    fn no_stdin(&self) -> ErrorReply {
        let why = if self.ended() {
            "has ended"
        } else {
            "has no stdin pipe (start it with stdin, or it was closed)"
        };
        ErrorReply::new(ErrorCode::NoStdin, format!("process {} {why}", self.pid()))
    }

    /// Writes `data` whole to the non-blocking input, waiting for room and
    /// giving up when the stream is cancelled.
    fn write_input(&self, mut data: &[u8], stream: &Stream) -> Result<(), ErrorReply> {
        while !data.is_empty() {
            let guard = lock(&self.input);
            let Some(f) = guard.as_ref() else {
                return Err(self.no_stdin());
            };
            let fd = f.as_raw_fd();
            // A terminal takes small writes only while its buffer has room.
            let piece = if self.pty.is_some() { 256 } else { data.len() };
            // SAFETY: writes from a valid slice to a descriptor we own.
            let n = unsafe { libc::write(fd, data.as_ptr().cast(), data.len().min(piece)) };
            if n >= 0 {
                data = &data[n as usize..];
                continue;
            }
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EAGAIN) | Some(libc::EINTR) => {
                    drop(guard);
                    if stream.is_cancelled() {
                        return Err(ErrorReply::new(
                            ErrorCode::Cancelled,
                            format!("input to process {} was cancelled", self.pid()),
                        ));
                    }
                    spawn::poll_fd(fd, libc::POLLOUT, 100);
                }
                _ => {
                    return Err(ErrorReply::new(
                        ErrorCode::NoStdin,
                        format!("process {} does not take input any more: {e}", self.pid()),
                    ))
                }
            }
        }
        Ok(())
    }

    pub fn close_stdin(&self) -> Result<(), ErrorReply> {
        if self.pty.is_some() {
            return Err(ErrorReply::new(
                ErrorCode::BadRequest,
                format!(
                    "process {} runs on a terminal, whose input cannot be closed; send Ctrl-D \
                     (0x04) to end a line-mode reader's input",
                    self.pid()
                ),
            ));
        }
        lock(&self.input).take();
        Ok(())
    }

    pub fn signal(&self, signal: i32) -> Result<(), ErrorReply> {
        if self.ended() {
            return Err(ErrorReply::new(
                ErrorCode::NotFound,
                format!("process {} has already ended", self.pid()),
            ));
        }
        // SAFETY: kill has no memory effects; the process leads its own
        // process group (setsid at start).
        if unsafe { libc::kill(-(self.pid() as libc::pid_t), signal) } != 0 {
            return Err(ErrorReply::new(
                ErrorCode::BadRequest,
                format!(
                    "signal {signal} to process {}: {}",
                    self.pid(),
                    io::Error::last_os_error()
                ),
            ));
        }
        Ok(())
    }

    pub fn resize(&self, size: PtySize) -> Result<(), ErrorReply> {
        let Some(master) = &self.pty else {
            return Err(ErrorReply::new(
                ErrorCode::BadRequest,
                format!("process {} has no terminal to resize", self.pid()),
            ));
        };
        spawn::resize_pty(master, size).map_err(|e| {
            ErrorReply::new(
                ErrorCode::Io,
                format!("resizing the terminal of process {}: {e}", self.pid()),
            )
        })
    }
}

impl Procs {
    pub fn new(reaper: Reaper, root: Option<PathBuf>) -> Procs {
        Procs {
            table: Mutex::new(Table::default()),
            reaper,
            root,
        }
    }

    /// The process `sel` names: a running one first, else the latest ended.
    pub fn find(&self, sel: &ProcSelector) -> Result<Arc<Proc>, ErrorReply> {
        let t = lock(&self.table);
        let matches = |p: &Arc<Proc>| match sel {
            ProcSelector::Pid(pid) => p.pid() == *pid,
            ProcSelector::Tag(tag) => p.info.tag.as_deref() == Some(tag.as_str()),
        };
        t.live
            .values()
            .find(|p| matches(p))
            .or_else(|| t.ended.iter().rev().find(|p| matches(p)))
            .cloned()
            .ok_or_else(|| {
                ErrorReply::new(
                    ErrorCode::NotFound,
                    format!("no process with {sel} was started through the agent"),
                )
            })
    }

    /// Every kept process, oldest first.
    pub fn list(&self) -> Vec<ProcInfo> {
        let procs: Vec<Arc<Proc>> = {
            let t = lock(&self.table);
            t.ended.iter().chain(t.live.values()).cloned().collect()
        };
        let mut infos: Vec<ProcInfo> = procs.iter().map(|p| p.info()).collect();
        infos.sort_by_key(|i| (i.started_unix_ms, i.pid));
        infos
    }

    /// Starts `spec` with the sandbox environment `sandbox_env`; with
    /// `hold`, an attachment with backpressure is registered at the first
    /// byte before any output is read.
    pub fn start(
        self: &Arc<Self>,
        spec: ProcSpec,
        sandbox_env: &[(String, String)],
        hold: bool,
    ) -> Result<Started, ErrorReply> {
        spawn::validate(&spec.argv, &spec.env)?;
        if spec
            .tag
            .as_ref()
            .is_some_and(|t| t.is_empty() || t.len() > MAX_TAG)
        {
            return Err(ErrorReply::new(
                ErrorCode::BadRequest,
                format!("a tag must be 1-{MAX_TAG} bytes"),
            ));
        }
        let cap = spec
            .backlog_bytes
            .unwrap_or(DEFAULT_BACKLOG)
            .clamp(MIN_BACKLOG, MAX_BACKLOG) as usize;
        let root = self.root.as_deref();
        let (user, cwd) = resolve_user_and_cwd(root, spec.user.as_deref(), spec.cwd.as_deref())?;
        self.admit(&spec, cap)?;
        match self.spawn(spec, sandbox_env, &user, &cwd, cap, hold) {
            Ok(s) => Ok(s),
            Err(e) => {
                lock(&self.table).reserved -= cap as u64;
                Err(e)
            }
        }
    }

    /// Reserves room for a process with a backlog of `cap` bytes.
    fn admit(&self, spec: &ProcSpec, cap: usize) -> Result<(), ErrorReply> {
        let mut t = lock(&self.table);
        if t.live.len() >= MAX_LIVE {
            return Err(ErrorReply::new(
                ErrorCode::Limit,
                format!("{MAX_LIVE} agent processes are running already"),
            ));
        }
        if let Some(tag) = &spec.tag {
            if t.live.values().any(|p| p.info.tag.as_ref() == Some(tag)) {
                return Err(ErrorReply::new(
                    ErrorCode::AlreadyExists,
                    format!("a running process has the tag {tag:?} already"),
                ));
            }
        }
        while t.reserved + cap as u64 > BACKLOG_BUDGET {
            let Some(old) = t.ended.pop_front() else {
                return Err(ErrorReply::new(
                    ErrorCode::Limit,
                    format!(
                        "the running processes' output backlogs take {} of the agent's {} \
                         bytes; ask for a smaller backlog_bytes",
                        t.reserved, BACKLOG_BUDGET
                    ),
                ));
            };
            t.reserved -= old.cap as u64;
        }
        t.reserved += cap as u64;
        Ok(())
    }

    fn spawn(
        self: &Arc<Self>,
        spec: ProcSpec,
        sandbox_env: &[(String, String)],
        user: &User,
        cwd: &str,
        cap: usize,
        hold: bool,
    ) -> Result<Started, ErrorReply> {
        let root = self.root.as_deref();
        let env = spawn::environment(user, &[sandbox_env, &spec.env]);
        let mut cmd = spawn::command(&spec.argv, &env, cwd, root, user, spec.pty.is_some())?;
        let mut pty = None;
        if let Some(size) = spec.pty {
            let (master, slave) = spawn::open_pty(root, size).map_err(|e| {
                ErrorReply::new(
                    ErrorCode::Unavailable,
                    format!("cannot open a pseudo-terminal in the guest: {e}"),
                )
            })?;
            let io_err = |e: io::Error| ErrorReply::new(ErrorCode::Io, format!("terminal: {e}"));
            cmd.stdin(Stdio::from(slave.try_clone().map_err(io_err)?))
                .stdout(Stdio::from(slave.try_clone().map_err(io_err)?))
                .stderr(Stdio::from(slave));
            pty = Some(master);
        } else {
            cmd.stdin(if spec.stdin {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        }
        let (mut child, ended) = self
            .reaper
            .spawn(&mut cmd)
            .map_err(|e| StartFailure::of(&spec.argv[0], &e).reply())?;
        // The command holds the slave ends; ours must close so that the
        // master reads EOF (EIO) once the process and its children are gone.
        drop(cmd);
        let pid = child.id();
        let mut readers: Vec<(Source, Box<dyn Read + Send>)> = Vec::new();
        let input = match &pty {
            Some(master) => {
                let r = master
                    .try_clone()
                    .map_err(|e| ErrorReply::new(ErrorCode::Io, format!("terminal: {e}")))?;
                readers.push((Source::Pty, Box::new(PtyReader(r))));
                master.try_clone().ok()
            }
            None => {
                if let Some(o) = child.stdout.take() {
                    readers.push((Source::Stdout, Box::new(o)));
                }
                if let Some(e) = child.stderr.take() {
                    readers.push((Source::Stderr, Box::new(e)));
                }
                child.stdin.take().map(|i| {
                    let f = File::from(std::os::fd::OwnedFd::from(i));
                    let _ = spawn::set_nonblocking(f.as_raw_fd());
                    f
                })
            }
        };
        let info = ProcInfo {
            pid,
            tag: spec.tag.clone(),
            argv: spec.argv.clone(),
            env: spec.env.clone(),
            cwd: cwd.to_string(),
            user: user.name.clone(),
            uid: user.uid,
            gid: user.gid,
            pty: pty.is_some(),
            stdin: input.is_some(),
            started_unix_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
            exit: None,
        };
        let proc = Arc::new(Proc {
            info,
            started: Instant::now(),
            cap,
            input: Mutex::new(input),
            pty,
            out: Mutex::new(Output {
                ring: Ring::new(cap),
                holds: HashMap::new(),
                next_hold: 0,
                exit: None,
                blocked_readers: 0,
                abandoned: false,
            }),
            changed: Condvar::new(),
        });
        let hold = hold.then(|| proc.hold(0));
        {
            let mut t = lock(&self.table);
            // A pid reused since an ended process had it: forget that one.
            if let Some(i) = t.ended.iter().position(|p| p.pid() == pid) {
                if let Some(old) = t.ended.remove(i) {
                    t.reserved -= old.cap as u64;
                }
            }
            t.live.insert(pid, Arc::clone(&proc));
        }
        let activity = Arc::new(AtomicU64::new(0));
        let (done_tx, done_rx) = mpsc::channel();
        let n_readers = readers.len();
        let read_size = cap.min(32 * 1024);
        for (source, mut r) in readers {
            let (p, activity, done) = (Arc::clone(&proc), Arc::clone(&activity), done_tx.clone());
            spawn_named("proc-output", move || {
                let mut buf = vec![0u8; read_size];
                loop {
                    let n = match r.read(&mut buf) {
                        Ok(0) => break,
                        Ok(n) => n,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                        Err(_) => break,
                    };
                    activity.store(p.started.elapsed().as_millis() as u64, Ordering::Relaxed);
                    p.push_output(source, &buf[..n]);
                }
                let _ = done.send(());
            });
        }
        drop(done_tx);
        let me = Arc::clone(self);
        let p = Arc::clone(&proc);
        let timeout = spec.timeout_ms.map(Duration::from_millis);
        spawn_named("proc-wait", move || {
            me.await_end(&p, ended, timeout, done_rx, n_readers, &activity)
        });
        Ok(Started { proc, hold })
    }

    /// The process's waiter: its end (killing it at its timeout), then the
    /// rest of its output, then its move to the ended list.
    fn await_end(
        &self,
        p: &Arc<Proc>,
        ended: mpsc::Receiver<Ended>,
        timeout: Option<Duration>,
        done: mpsc::Receiver<()>,
        readers: usize,
        activity: &AtomicU64,
    ) {
        let pid = p.pid() as libc::pid_t;
        let mut timed_out = false;
        let end = match timeout {
            Some(t) => match ended.recv_timeout(t) {
                Ok(end) => Some(end),
                Err(RecvTimeoutError::Timeout) => {
                    timed_out = true;
                    // SAFETY: kill has no memory effects; the process leads
                    // its own process group.
                    unsafe { libc::kill(-pid, libc::SIGKILL) };
                    ended.recv().ok()
                }
                Err(RecvTimeoutError::Disconnected) => None,
            },
            None => ended.recv().ok(),
        };
        // Its output: wait for the readers to see EOF, but give up on
        // descriptors background children keep open once they are quiet
        // (a reader waiting for a slow attachment is not quiet).
        let mut finished = 0;
        while finished < readers {
            match done.recv_timeout(Duration::from_millis(50)) {
                Ok(()) => finished += 1,
                Err(RecvTimeoutError::Disconnected) => break,
                Err(RecvTimeoutError::Timeout) => {
                    let last = Duration::from_millis(activity.load(Ordering::Relaxed));
                    let blocked = lock(&p.out).blocked_readers > 0;
                    if !blocked && p.started.elapsed().saturating_sub(last) > OUTPUT_GRACE {
                        break;
                    }
                }
            }
        }
        let (code, signal) = match end {
            Some(Ended::Exited(c)) => (Some(c), None),
            Some(Ended::Signalled(s)) => (None, Some(s)),
            None => (None, None),
        };
        {
            let mut out = lock(&p.out);
            out.exit = Some(ExitStatus {
                code,
                signal,
                timed_out,
                duration_ms: p.started.elapsed().as_millis() as u64,
            });
            out.abandoned = true;
            p.changed.notify_all();
        }
        lock(&p.input).take();
        let mut t = lock(&self.table);
        if t.live.get(&p.pid()).is_some_and(|q| Arc::ptr_eq(q, p)) {
            t.live.remove(&p.pid());
            t.ended.push_back(Arc::clone(p));
            while t.ended.len() > MAX_ENDED {
                if let Some(old) = t.ended.pop_front() {
                    t.reserved -= old.cap as u64;
                }
            }
        }
    }
}

/// Resolves the user and the working directory (the user's home when not
/// given and it exists, else `/`) inside the guest's root.
pub fn resolve_user_and_cwd(
    root: Option<&Path>,
    user: Option<&str>,
    cwd: Option<&str>,
) -> Result<(User, String), ErrorReply> {
    let user = user.map(str::to_string);
    let cwd = cwd.map(str::to_string);
    crate::fsops::in_guest(root, None, move |_| {
        let user = crate::users::lookup(user.as_deref())
            .map_err(|e| ErrorReply::new(ErrorCode::UnknownUser, e.0))?;
        let cwd = match cwd {
            Some(c) => {
                let abs = crate::fsops::absolute(&c, &user.home)?;
                let abs = abs.to_string_lossy().into_owned();
                if !Path::new(&abs).is_dir() {
                    return Err(spawn::cwd_missing(&abs));
                }
                abs
            }
            None if Path::new(&user.home).is_dir() => user.home.clone(),
            None => "/".into(),
        };
        Ok((user, cwd))
    })
}

/// Reads a non-blocking terminal master: waits for data, and reads the
/// `EIO` that says every slave end is closed as the end.
struct PtyReader(File);

impl Read for PtyReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            match self.0.read(buf) {
                Ok(n) => return Ok(n),
                Err(e) if e.raw_os_error() == Some(libc::EIO) => return Ok(0),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    spawn::poll_fd(self.0.as_raw_fd(), libc::POLLIN, 1000);
                }
                Err(e) => return Err(e),
            }
        }
    }
}

fn spawn_named(name: &str, f: impl FnOnce() + Send + 'static) {
    if let Err(e) = std::thread::Builder::new().name(name.into()).spawn(f) {
        crate::log(&format!("cannot start a {name} thread: {e}"));
    }
}
