//! The persistent Python interpreter behind `Eval`, and the E2B code
//! interpreter's script.
//!
//! Why this shape: the cell semantics E2B's `run_code` and forkd's `eval`
//! need are the same (the value of a final expression as its `repr()`,
//! tracebacks that show the user's lines, `print` and subprocess output
//! captured), and `crates/forkd-e2b/guest/code_interpreter.py` already
//! implements them in its `--worker` mode: one persistent interpreter driven
//! over two pipes (JSON commands in on fd 3, JSON events out on fd 4, an
//! end-of-cell sentinel on fds 1 and 2). The agent embeds that file, writes
//! it to `/run/forkd/` in the guest when first needed, and drives one worker
//! itself: no HTTP server and no port for eval, the same Python code for
//! both front ends, and agent and script always of the same build (the
//! worker protocol is internal to them). The worker is an ordinary guest
//! process, so its variables live in guest memory and every branch and
//! spawned child of a snapshot has them.
//!
//! Bounds: one eval at a time (others wait their turn, cancellable);
//! output streams to the host as it comes; event lines longer than
//! [`MAX_LINE`] and output beyond [`QUEUE_BYTES`] waiting in the agent are
//! dropped; the value and traceback are cut to fit one frame.

use std::collections::VecDeque;
use std::fs::{self, File};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use forkd_protocol::{ErrorCode, ErrorReply, EvalError, EvalResult, Kind, Response};
use serde::Deserialize;

use crate::reaper::Reaper;
use crate::session::{lock, Stream, TICK};
use crate::spawn::{self, StartFailure};
use crate::users::User;

/// The code interpreter, embedded at build time.
pub const SCRIPT: &str = include_str!("../../forkd-e2b/guest/code_interpreter.py");

/// Where the agent writes it in the guest (tmpfs, inside the command root):
/// named by its content, so agents of different builds sharing a root (a
/// host running tests) never run each other's copy.
pub fn script_path() -> &'static str {
    static PATH: OnceLock<String> = OnceLock::new();
    PATH.get_or_init(|| {
        // FNV-1a: a name, not a security boundary.
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in SCRIPT.bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        format!("/run/forkd/code_interpreter-{h:016x}.py")
    })
}
/// Longest event line from the worker kept.
pub const MAX_LINE: usize = 8 << 20;
/// Bytes of worker messages waiting in the agent at most.
pub const QUEUE_BYTES: usize = 8 << 20;
/// Time for the interpreter to start (Python under TCG is slow).
const START_TIMEOUT: Duration = Duration::from_secs(120);
/// After an interrupt, how long the code has to stop before the
/// interpreter is killed and restarted empty.
const INTERRUPT_GRACE: Duration = Duration::from_secs(5);
/// After the cell's end, how long to wait for the sentinels on fds 1 and 2
/// (a background child holding them open delays them forever).
const SENTINEL_GRACE: Duration = Duration::from_secs(2);
/// JSON-escaped bytes of the value, of the traceback, of the error text.
const MAX_VALUE: usize = 256 * 1024;
const MAX_TRACEBACK: usize = 256 * 1024;
const MAX_ERROR_TEXT: usize = 64 * 1024;

const SENTINEL_PREFIX: &[u8] = b"\x00forkd-cell-end:";
/// Cell ids, unique in this agent.
static NEXT_CELL: AtomicU64 = AtomicU64::new(1);
/// Longest cell id in a sentinel.
const SENTINEL_ID_MAX: usize = 64;

/// Writes the interpreter script into the guest's root unless it is there
/// with this content.
pub fn install_script(root: Option<&Path>) -> Result<(), ErrorReply> {
    crate::fsops::in_guest(root, None, |_| {
        let path = Path::new(script_path());
        if fs::read(path).is_ok_and(|b| b == SCRIPT.as_bytes()) {
            return Ok(());
        }
        let dir = path.parent().unwrap_or(Path::new("/"));
        let io = |e: io::Error| crate::fsops::fs_error(path, &e);
        fs::create_dir_all(dir).map_err(io)?;
        let tmp = dir.join(format!(
            ".code_interpreter.py.{}.{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        fs::write(&tmp, SCRIPT).map_err(io)?;
        fs::set_permissions(&tmp, fs::Permissions::from_mode(0o644)).map_err(io)?;
        fs::rename(&tmp, path).map_err(io)
    })
}

/// A piece of a worker descriptor's output.
#[derive(Debug, PartialEq, Eq)]
pub enum Piece {
    Data(Vec<u8>),
    /// The end-of-cell marker.
    Sentinel,
}

/// Finds end-of-cell sentinels (`\0forkd-cell-end:<id>\0`) in a byte
/// stream, across reads, holding back only what may start one.
#[derive(Debug, Default)]
pub struct Splitter {
    buf: Vec<u8>,
}

impl Splitter {
    pub fn push(&mut self, bytes: &[u8]) -> Vec<Piece> {
        self.buf.extend_from_slice(bytes);
        let mut out = Vec::new();
        loop {
            let Some(at) = find(&self.buf, SENTINEL_PREFIX) else {
                // Keep a tail that may be the start of a prefix.
                let keep = (1..SENTINEL_PREFIX.len().min(self.buf.len() + 1))
                    .rev()
                    .find(|&k| self.buf.ends_with(&SENTINEL_PREFIX[..k]))
                    .unwrap_or(0);
                let emit = self.buf.len() - keep;
                if emit > 0 {
                    out.push(Piece::Data(self.buf.drain(..emit).collect()));
                }
                return out;
            };
            let id_start = at + SENTINEL_PREFIX.len();
            let window = &self.buf[id_start..self.buf.len().min(id_start + SENTINEL_ID_MAX + 1)];
            match window.iter().position(|b| *b == 0) {
                Some(len) => {
                    if at > 0 {
                        out.push(Piece::Data(self.buf[..at].to_vec()));
                    }
                    out.push(Piece::Sentinel);
                    self.buf.drain(..id_start + len + 1);
                }
                None if window.len() <= SENTINEL_ID_MAX => {
                    // The id may still be arriving.
                    if at > 0 {
                        out.push(Piece::Data(self.buf.drain(..at).collect()));
                    }
                    return out;
                }
                None => {
                    // Not a sentinel after all: pass its first byte on.
                    out.push(Piece::Data(self.buf.drain(..at + 1).collect()));
                }
            }
        }
    }

    /// What is held at the end of the stream.
    pub fn finish(&mut self) -> Option<Vec<u8>> {
        (!self.buf.is_empty()).then(|| std::mem::take(&mut self.buf))
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Cuts `s` so that its JSON string form takes at most `limit` bytes;
/// returns whether it was cut.
pub fn truncate_json(s: &mut String, limit: usize) -> bool {
    let mut used = 2;
    for (i, c) in s.char_indices() {
        used += match c {
            '"' | '\\' | '\n' | '\t' | '\r' | '\u{8}' | '\u{c}' => 2,
            c if (c as u32) < 0x20 => 6,
            c => c.len_utf8(),
        };
        if used > limit {
            s.truncate(i);
            return true;
        }
    }
    false
}

/// What the worker says on its event descriptor.
#[derive(Debug, Deserialize)]
#[serde(tag = "t", rename_all = "lowercase")]
enum WorkerEvent {
    Ready {},
    Count {
        count: u64,
    },
    Stdout {
        text: String,
    },
    Stderr {
        text: String,
    },
    Result {
        data: Bundle,
        #[serde(default)]
        main: bool,
    },
    Error {
        name: String,
        value: String,
        traceback: String,
    },
    Done {},
    #[serde(other)]
    Other,
}

#[derive(Debug, Deserialize)]
struct Bundle {
    #[serde(rename = "text/plain")]
    text: Option<String>,
}

enum Msg {
    Event(WorkerEvent),
    Out(Kind, Vec<u8>),
    Sentinel,
    /// An event line over [`MAX_LINE`] was dropped.
    Oversized,
    Exit,
}

impl Msg {
    fn cost(&self) -> usize {
        64 + match self {
            Msg::Out(_, b) => b.len(),
            Msg::Event(WorkerEvent::Stdout { text } | WorkerEvent::Stderr { text }) => text.len(),
            Msg::Event(WorkerEvent::Result { data, .. }) => {
                data.text.as_ref().map_or(0, String::len)
            }
            Msg::Event(WorkerEvent::Error {
                traceback, value, ..
            }) => traceback.len() + value.len(),
            _ => 0,
        }
    }

    /// Output may be dropped under pressure; the cell's control flow not.
    fn droppable(&self) -> bool {
        matches!(
            self,
            Msg::Out(..) | Msg::Event(WorkerEvent::Stdout { .. } | WorkerEvent::Stderr { .. })
        )
    }
}

/// What the worker's reader threads hand to the eval in progress.
#[derive(Default)]
struct Queue {
    state: Mutex<QueueState>,
    changed: Condvar,
}

#[derive(Default)]
struct QueueState {
    msgs: VecDeque<Msg>,
    bytes: usize,
    dropped: u64,
}

impl Queue {
    fn push(&self, m: Msg) {
        let mut s = lock(&self.state);
        let cost = m.cost();
        if s.bytes + cost > QUEUE_BYTES && m.droppable() {
            s.dropped += cost as u64;
            return;
        }
        s.bytes += cost;
        s.msgs.push_back(m);
        self.changed.notify_all();
    }

    fn pop(&self, wait: Duration) -> Option<Msg> {
        let mut s = lock(&self.state);
        if s.msgs.is_empty() {
            s = self
                .changed
                .wait_timeout(s, wait)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        let m = s.msgs.pop_front()?;
        s.bytes -= m.cost();
        Some(m)
    }

    fn take_dropped(&self) -> u64 {
        std::mem::take(&mut lock(&self.state).dropped)
    }
}

struct Worker {
    pid: u32,
    cmd: File,
    queue: Arc<Queue>,
    executions: u64,
}

impl Worker {
    fn kill(&self) {
        // SAFETY: kill has no memory effects; the worker leads its group.
        unsafe { libc::kill(-(self.pid as libc::pid_t), libc::SIGKILL) };
    }
}

/// The guest's persistent interpreter.
pub struct Evaluator {
    root: Option<PathBuf>,
    reaper: Reaper,
    worker: Mutex<Option<Worker>>,
}

/// How one cell went, before it becomes a response.
#[derive(Default)]
struct Cell {
    value: Option<String>,
    error: Option<EvalError>,
    count: u64,
    done: bool,
    sentinels: u32,
    timed_out: bool,
    restarted: bool,
}

impl Evaluator {
    pub fn new(reaper: Reaper, root: Option<PathBuf>) -> Evaluator {
        Evaluator {
            root,
            reaper,
            worker: Mutex::new(None),
        }
    }

    /// Runs `code` (see `Request::Eval`), streaming output on `stream`.
    pub fn eval(
        &self,
        stream: &Stream,
        code: &str,
        env: &[(String, String)],
        timeout: Option<Duration>,
    ) -> Response {
        let started = Instant::now();
        // Wait for our turn, but not past a cancellation.
        let mut guard = loop {
            match self.worker.try_lock() {
                Ok(g) => break g,
                Err(std::sync::TryLockError::Poisoned(p)) => break p.into_inner(),
                Err(std::sync::TryLockError::WouldBlock) => {
                    if stream.wait_cancelled(TICK) {
                        return cancelled();
                    }
                }
            }
        };
        let mut cell = Cell::default();
        if guard.is_none() {
            match self.start_worker(env, stream) {
                Ok(w) => *guard = Some(w),
                Err(e) => return Response::Error(e),
            }
        }
        let Some(worker) = guard.as_mut() else {
            return Response::Error(ErrorReply::new(ErrorCode::Io, "no interpreter"));
        };
        let queue = Arc::clone(&worker.queue);
        // Output that arrived between cells belongs to this one; anything
        // else left over (a late sentinel) belongs to none.
        while let Some(m) = queue.pop(Duration::ZERO) {
            match m {
                Msg::Out(kind, bytes) => {
                    let _ = stream.send_data(kind, &bytes);
                }
                Msg::Event(WorkerEvent::Stdout { text }) => {
                    let _ = stream.send_data(Kind::Stdout, text.as_bytes());
                }
                Msg::Event(WorkerEvent::Stderr { text }) => {
                    let _ = stream.send_data(Kind::Stderr, text.as_bytes());
                }
                Msg::Exit => {
                    worker.kill();
                    *guard = None;
                    return Response::Error(ErrorReply::new(
                        ErrorCode::Io,
                        "the Python interpreter had exited; it will be started again on the \
                         next eval",
                    ));
                }
                _ => {}
            }
        }
        let id = format!("c{}", NEXT_CELL.fetch_add(1, Ordering::Relaxed));
        let env_vars: serde_json::Map<String, serde_json::Value> = env
            .iter()
            .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
            .collect();
        let line = serde_json::json!({"id": id, "code": code, "env_vars": env_vars}).to_string();
        if writeln!(worker.cmd, "{line}")
            .and_then(|_| worker.cmd.flush())
            .is_err()
        {
            // The worker is gone: start afresh next time.
            worker.kill();
            *guard = None;
            return Response::Error(ErrorReply::new(
                ErrorCode::Io,
                "the Python interpreter had exited; it will be started again on the next eval",
            ));
        }
        let deadline = timeout.map(|t| started + t);
        let mut interrupted_at: Option<Instant> = None;
        let mut done_at: Option<Instant> = None;
        let mut killed = false;
        loop {
            if cell.done && cell.sentinels >= 2 {
                break;
            }
            if done_at.is_some_and(|t| t.elapsed() > SENTINEL_GRACE) {
                break;
            }
            let now = Instant::now();
            if interrupted_at.is_none() && !cell.done {
                let late = deadline.is_some_and(|d| now >= d);
                if late || stream.is_cancelled() {
                    cell.timed_out = late;
                    interrupted_at = Some(now);
                    // SAFETY: kill has no memory effects.
                    unsafe { libc::kill(worker.pid as libc::pid_t, libc::SIGINT) };
                }
            }
            if !cell.done && interrupted_at.is_some_and(|t| t.elapsed() > INTERRUPT_GRACE) {
                killed = true;
                break;
            }
            let Some(msg) = queue.pop(TICK) else {
                continue;
            };
            match msg {
                Msg::Out(kind, bytes) => {
                    let _ = stream.send_data(kind, &bytes);
                }
                Msg::Sentinel => cell.sentinels += 1,
                Msg::Oversized => {
                    let _ = stream.send_data(
                        Kind::Stderr,
                        b"[forkd: an output or result line over 8 MiB was dropped]\n",
                    );
                }
                Msg::Exit => {
                    killed = true;
                    break;
                }
                Msg::Event(ev) => match ev {
                    WorkerEvent::Count { count } => cell.count = count,
                    WorkerEvent::Stdout { text } => {
                        let _ = stream.send_data(Kind::Stdout, text.as_bytes());
                    }
                    WorkerEvent::Stderr { text } => {
                        let _ = stream.send_data(Kind::Stderr, text.as_bytes());
                    }
                    WorkerEvent::Result { data, main: true } => cell.value = data.text,
                    WorkerEvent::Error {
                        name,
                        value,
                        traceback,
                    } => {
                        cell.error = Some(EvalError {
                            name,
                            value,
                            traceback,
                        })
                    }
                    WorkerEvent::Done {} => {
                        cell.done = true;
                        done_at = Some(Instant::now());
                    }
                    WorkerEvent::Result { .. } | WorkerEvent::Ready {} | WorkerEvent::Other => {}
                },
            }
        }
        let dropped = queue.take_dropped();
        if dropped > 0 {
            let note = format!("[forkd: {dropped} bytes of output were dropped]\n");
            let _ = stream.send_data(Kind::Stderr, note.as_bytes());
        }
        if killed {
            worker.kill();
            *guard = None;
            cell.restarted = true;
            let why = if interrupted_at.is_some() {
                "the code did not stop within 5 s of an interrupt; the interpreter was killed and \
                 will start empty"
            } else {
                "the interpreter exited during the code; it will start empty"
            };
            cell.error = Some(EvalError {
                name: "InterpreterRestarted".into(),
                value: why.into(),
                traceback: format!("InterpreterRestarted: {why}"),
            });
        } else {
            worker.executions = cell.count;
        }
        if stream.is_cancelled() && !cell.timed_out {
            return cancelled();
        }
        let mut value_truncated = false;
        if let Some(v) = cell.value.as_mut() {
            value_truncated = truncate_json(v, MAX_VALUE);
        }
        if let Some(e) = cell.error.as_mut() {
            truncate_json(&mut e.name, 1024);
            truncate_json(&mut e.value, MAX_ERROR_TEXT);
            truncate_json(&mut e.traceback, MAX_TRACEBACK);
        }
        Response::Evaluated(EvalResult {
            value: cell.value,
            value_truncated,
            error: cell.error,
            execution_count: cell.count,
            timed_out: cell.timed_out,
            restarted: cell.restarted,
            duration_ms: started.elapsed().as_millis() as u64,
        })
    }

    /// Starts a worker and waits for it to be ready.
    fn start_worker(
        &self,
        env: &[(String, String)],
        stream: &Stream,
    ) -> Result<Worker, ErrorReply> {
        let root = self.root.as_deref();
        install_script(root)?;
        let user = User::root();
        let cwd = if spawn::cwd_exists(root, "/root") {
            "/root"
        } else {
            "/"
        };
        let env = spawn::environment(&user, &[env, &[("PYTHONUNBUFFERED".into(), "1".into())]]);
        let argv: Vec<String> = ["python3", "-u", script_path(), "--worker", "3", "4"]
            .map(String::from)
            .to_vec();
        let mut cmd = spawn::command(&argv, &env, cwd, root, &user, false)?;
        let io_err = |what: &str, e: io::Error| {
            ErrorReply::new(
                ErrorCode::Io,
                format!("starting the interpreter ({what}): {e}"),
            )
        };
        let (cmd_r, cmd_w) = pipe().map_err(|e| io_err("pipe", e))?;
        let (evt_r, evt_w) = pipe().map_err(|e| io_err("pipe", e))?;
        let (cmd_fd, evt_fd) = (cmd_r.as_raw_fd(), evt_w.as_raw_fd());
        // SAFETY: runs in the forked child before exec; dup2 is
        // async-signal-safe and the descriptors are open in the child (they
        // are close-on-exec, so only the dup2 copies survive the exec).
        unsafe {
            cmd.pre_exec(move || {
                if libc::dup2(cmd_fd, 3) < 0 || libc::dup2(evt_fd, 4) < 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let (mut child, ended) =
            self.reaper
                .spawn(&mut cmd)
                .map_err(|e| match StartFailure::of("python3", &e) {
                    StartFailure::NotFound(_) => ErrorReply::new(
                        ErrorCode::Unavailable,
                        "python3 is not installed in this guest; eval needs an image with python3 \
                     (such as debian-python)",
                    ),
                    other => other.reply(),
                })?;
        drop(cmd);
        drop((cmd_r, evt_w));
        let pid = child.id();
        let queue = Arc::new(Queue::default());
        let spawn_reader = |name: &str, f: Box<dyn FnOnce() + Send>| {
            let _ = std::thread::Builder::new().name(name.into()).spawn(f);
        };
        {
            let q = Arc::clone(&queue);
            spawn_reader(
                "eval-events",
                Box::new(move || read_events(File::from(evt_r), &q)),
            );
        }
        for (kind, pipe) in [
            (
                Kind::Stdout,
                child
                    .stdout
                    .take()
                    .map(|p| Box::new(p) as Box<dyn Read + Send>),
            ),
            (
                Kind::Stderr,
                child
                    .stderr
                    .take()
                    .map(|p| Box::new(p) as Box<dyn Read + Send>),
            ),
        ] {
            if let Some(p) = pipe {
                let q = Arc::clone(&queue);
                spawn_reader("eval-output", Box::new(move || read_output(p, kind, &q)));
            }
        }
        {
            let q = Arc::clone(&queue);
            spawn_reader(
                "eval-wait",
                Box::new(move || {
                    let _ = ended.recv();
                    q.push(Msg::Exit);
                }),
            );
        }
        let worker = Worker {
            pid,
            cmd: File::from(cmd_w),
            queue,
            executions: 0,
        };
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if stream.is_cancelled() || Instant::now() > deadline {
                worker.kill();
                return Err(ErrorReply::new(
                    if stream.is_cancelled() {
                        ErrorCode::Cancelled
                    } else {
                        ErrorCode::TimedOut
                    },
                    "the Python interpreter did not start",
                ));
            }
            match worker.queue.pop(TICK) {
                Some(Msg::Event(WorkerEvent::Ready {})) => return Ok(worker),
                Some(Msg::Exit) => {
                    return Err(ErrorReply::new(
                        ErrorCode::Unavailable,
                        "the Python interpreter exited at start (is python3 >= 3.8 installed?)",
                    ))
                }
                // What it prints while starting is not any cell's.
                _ => {}
            }
        }
    }
}

fn cancelled() -> Response {
    Response::Error(ErrorReply::new(
        ErrorCode::Cancelled,
        "the eval was cancelled",
    ))
}

fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: pipe2 writes two descriptors into the array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // Move both above the standard and the worker's descriptors, so that
    // the child's dup2 onto 3 and 4 cannot clobber one with the other.
    let high = |fd: libc::c_int| -> io::Result<OwnedFd> {
        // SAFETY: fcntl duplicates a descriptor we own; the original is
        // closed right after and the copy owned by an OwnedFd.
        unsafe {
            let h = libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 10);
            libc::close(fd);
            if h < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(OwnedFd::from_raw_fd(h))
        }
    };
    Ok((high(fds[0])?, high(fds[1])?))
}

/// Reads the worker's JSON event lines (bounded).
fn read_events(f: File, q: &Queue) {
    let mut r = BufReader::with_capacity(64 * 1024, f);
    let mut line = Vec::new();
    loop {
        line.clear();
        let mut over = false;
        loop {
            let (done, used) = {
                let Ok(buf) = r.fill_buf() else { return };
                if buf.is_empty() {
                    return;
                }
                match buf.iter().position(|b| *b == b'\n') {
                    Some(i) => {
                        if !over && line.len() + i <= MAX_LINE {
                            line.extend_from_slice(&buf[..i]);
                        } else {
                            over = true;
                        }
                        (true, i + 1)
                    }
                    None => {
                        if !over && line.len() + buf.len() <= MAX_LINE {
                            line.extend_from_slice(buf);
                        } else {
                            over = true;
                            line.clear();
                        }
                        (false, buf.len())
                    }
                }
            };
            r.consume(used);
            if done {
                break;
            }
        }
        if over {
            q.push(Msg::Oversized);
        } else if let Ok(ev) = serde_json::from_slice::<WorkerEvent>(&line) {
            q.push(Msg::Event(ev));
        }
    }
}

/// Reads one of the worker's descriptors 1/2, splitting out sentinels.
fn read_output(mut p: Box<dyn Read + Send>, kind: Kind, q: &Queue) {
    let mut s = Splitter::default();
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        let n = match p.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        for piece in s.push(&buf[..n]) {
            q.push(match piece {
                Piece::Data(d) => Msg::Out(kind, d),
                Piece::Sentinel => Msg::Sentinel,
            });
        }
    }
    if let Some(rest) = s.finish() {
        q.push(Msg::Out(kind, rest));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(chunks: &[&[u8]]) -> (Vec<u8>, usize) {
        let mut s = Splitter::default();
        let mut data = Vec::new();
        let mut sentinels = 0;
        for c in chunks {
            for p in s.push(c) {
                match p {
                    Piece::Data(d) => data.extend(d),
                    Piece::Sentinel => sentinels += 1,
                }
            }
        }
        data.extend(s.finish().unwrap_or_default());
        (data, sentinels)
    }

    #[test]
    fn sentinels_are_found_across_reads() {
        let whole = b"out\n\x00forkd-cell-end:abc123\x00more".to_vec();
        assert_eq!(run(&[&whole]), (b"out\nmore".to_vec(), 1));
        for cut in 0..whole.len() {
            let (a, b) = whole.split_at(cut);
            assert_eq!(run(&[a, b]), (b"out\nmore".to_vec(), 1), "cut at {cut}");
        }
        let bytes: Vec<&[u8]> = whole.chunks(1).collect();
        assert_eq!(run(&bytes), (b"out\nmore".to_vec(), 1));
    }

    #[test]
    fn things_that_only_look_like_sentinels_pass_through() {
        let mut fake = b"a\x00forkd-cell-end:".to_vec();
        fake.extend(vec![b'x'; 100]);
        fake.extend(b"z");
        assert_eq!(run(&[&fake]), (fake.clone(), 0));
        assert_eq!(run(&[b"\x00forkd"]), (b"\x00forkd".to_vec(), 0));
        assert_eq!(run(&[b"plain \x00 zero"]), (b"plain \x00 zero".to_vec(), 0));
    }

    #[test]
    fn json_truncation_counts_escapes() {
        let mut s = "abc".to_string();
        assert!(!truncate_json(&mut s, 5));
        assert_eq!(s, "abc");
        let mut s = "\u{1}\u{1}\u{1}".to_string();
        assert!(truncate_json(&mut s, 14));
        assert_eq!(s, "\u{1}\u{1}");
        let mut s = "ééé".to_string();
        assert!(truncate_json(&mut s, 6));
        assert_eq!(s, "éé");
        let mut s = "x".repeat(100);
        truncate_json(&mut s, 50);
        assert!(serde_json::to_string(&s).unwrap().len() <= 50);
    }

    #[test]
    fn worker_events_decode() {
        let ev: WorkerEvent = serde_json::from_str(
            r#"{"t":"result","data":{"text/plain":"2","text/html":"<b>"},"main":true}"#,
        )
        .unwrap();
        assert!(
            matches!(ev, WorkerEvent::Result { data: Bundle { text: Some(ref t) }, main: true } if t == "2")
        );
        let ev: WorkerEvent = serde_json::from_str(r#"{"t":"ready","pid":3}"#).unwrap();
        assert!(matches!(ev, WorkerEvent::Ready {}));
        let ev: WorkerEvent = serde_json::from_str(r#"{"t":"something-new"}"#).unwrap();
        assert!(matches!(ev, WorkerEvent::Other));
    }
}
