//! The host <-> guest agent protocol.
//!
//! Owns the wire format spoken over the virtio-serial port `org.forkd.agent`:
//! framing ([`frame`]), the typed messages (this module, [`proc`], [`fs`]),
//! and the host-side client ([`client`]) that multiplexes concurrent requests
//! over one channel. It never touches QEMU or the guest's system: the agent
//! and the VM crates bring the transport. `docs/agent-protocol.md` is the
//! overview of the wire.
//!
//! A session starts with `Hello { nonce }` from the host; the agent answers
//! `HelloAck` with the same nonce and its [`PROTOCOL`] number, which the host
//! requires to equal its own. The host discards everything before that ack,
//! which is how a new connection skips output that an earlier connection left
//! in the pipe. Then the host sends `Request` frames with fresh ids; for each,
//! the agent sends zero or more data frames (`Stdout`, `Stderr`, `Pty`,
//! `Data`) and `Event` frames, and exactly one `Response`, always last.
//!
//! Requests whose data can be long-lived or unbounded (process attachments,
//! process input, tar streams, TCP relays: see [`Request::is_windowed`]) are
//! flow-controlled in both directions: a sender may have at most
//! [`WINDOW`] bytes of data frames for the request that the receiver has not
//! yet acknowledged with a `Window` frame, so one slow stream never stalls the
//! shared channel and neither side buffers more than a window per stream.
//!
//! Processes started with [`Request::ProcStart`], directory watches and the
//! Python interpreter of [`Request::Eval`] belong to the agent, not to a
//! session: they outlive the connection that created them (the host's
//! sessions close when idle) and live in guest memory, so a snapshot of the
//! guest carries them to its children.

pub mod client;
pub mod frame;
pub mod fs;
pub mod proc;

use serde::{Deserialize, Serialize};

pub use frame::{
    Frame, FrameDecoder, FrameError, FrameReader, Kind, CHUNK, DECODER_CAPACITY, MAX_PAYLOAD,
    VERSION, WINDOW,
};
pub use fs::{permissions_string, FileInfo, FileKind, FsEvent, FsEventKind, TarSummary};
pub use proc::{AttachOptions, EvalError, EvalResult, ProcInfo, ProcSelector, ProcSpec, PtySize};

/// Version of the messages (this module's requests, responses and events,
/// and which frame kinds exist), reported in `HelloAck` and `Pong`. The host
/// refuses an agent whose number differs: a guest booted or snapshotted by
/// another forkd build must be booted again. The frame header's
/// [`VERSION`] is the framing's own and stays 1, so that both sides can
/// still read each other's handshake and say why they disagree.
///
/// History: 1 = exec, files, signals, restore; 2 = agent-owned processes,
/// filesystem operations and watches, tar streams, TCP relays, flow control,
/// eval, exit code 127 for a missing program.
pub const PROTOCOL: u8 = 2;

/// Name of the virtio-serial port the agent listens on.
pub const PORT_NAME: &str = "org.forkd.agent";

/// First message of a session (host -> agent).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Hello {
    pub nonce: u64,
}

/// The agent's answer to [`Hello`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HelloAck {
    pub nonce: u64,
    pub protocol: u8,
    pub agent_version: String,
}

/// A request from the host. The frame id names it in every frame that follows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Liveness and facts about the guest.
    Ping {},
    /// Run a command. Output streams back as `Stdout`/`Stderr` frames; the
    /// `Response` is `Exited`. When `stdin` is true the host sends `Stdin`
    /// frames with the same id, ending with an empty one. A program that
    /// does not exist exits 127 (126 when it cannot be executed) with the
    /// reason on stderr, as a shell reports it; a missing working directory
    /// is the error `CwdNotFound`.
    Exec(ExecRequest),
    /// Write a file: `Data` frames with the same id follow, ending with an empty
    /// one; the response is `Written`. Paths of every file request may be
    /// absolute, `~`-prefixed or relative to the home of the acting user
    /// (root: `/root`), and resolve inside the guest's root.
    WriteFile {
        path: String,
        #[serde(default)]
        mode: Option<u32>,
        /// Create missing parent directories first (`mkdir -p`).
        #[serde(default)]
        parents: bool,
        /// Act as this account (see [`ProcSpec::user`]): its permissions
        /// apply and what is created belongs to it; root when absent.
        #[serde(default)]
        user: Option<String>,
    },
    /// Read a file: the agent sends `Data` frames, then `FileDone`.
    ReadFile {
        path: String,
        #[serde(default)]
        user: Option<String>,
    },
    /// Send a signal to the process group of a running exec.
    Signal { target: u32, signal: i32 },
    /// Sync filesystems and power the guest off.
    Shutdown {},
    /// Make a restored copy of a guest its own (fork safety): mix host
    /// entropy into the kernel CRNG and reseed it, step the clock to host
    /// time, set the hostname.
    Restore {
        /// Hex-encoded random bytes from the host (at least 32 bytes).
        entropy_hex: String,
        /// Host wall-clock time, nanoseconds since the Unix epoch.
        unix_time_ns: u64,
        hostname: String,
    },

    // ----- protocol 2 -----
    /// Set the sandbox's environment: variables every later exec, process
    /// and interpreter starts with (after the defaults, before the request's
    /// own). Replaces the previous set. Answer: `EnvSet`.
    SetEnv { vars: Vec<(String, String)> },
    /// End another request of this session early: detach an attachment,
    /// stop a wait, abandon process input, close a relay, stop a tar stream
    /// or interrupt an eval. Answer: `Cancelled` (the target request still
    /// sends its own last `Response`); cancelling an id that has finished
    /// is not an error.
    Cancel { target: u32 },
    /// Start a process that belongs to the agent. Without `attach` the
    /// answer is `ProcStarted`. With it, the request follows the process
    /// from its first byte: an `Event::Started`, then `Stdout`/`Stderr`/
    /// `Pty` frames (windowed), then `ProcEnded` (or `Detached` when
    /// cancelled).
    ProcStart {
        spec: ProcSpec,
        #[serde(default)]
        attach: Option<AttachOptions>,
    },
    /// Follow a running (or recently ended) process's output: an
    /// `Event::Attached`, output frames (windowed; `Event::Dropped` where
    /// the backlog lost bytes this attachment had not sent), then
    /// `ProcEnded`, or `Detached` when cancelled.
    ProcAttach {
        target: ProcSelector,
        #[serde(default)]
        options: AttachOptions,
    },
    /// Wait for a process to end: `ProcEnded` (at once if it has).
    ProcWait { target: ProcSelector },
    /// Write to a process's stdin (its terminal, for a pty): `Stdin` frames
    /// with this id follow (windowed), ending with an empty one. Answer:
    /// `InputWritten`; with `close`, stdin is closed after the input.
    ProcInput {
        target: ProcSelector,
        #[serde(default)]
        close: bool,
    },
    /// Close a process's stdin pipe (idempotent; refused for a terminal).
    ProcCloseStdin { target: ProcSelector },
    /// Send a signal to a process's process group (it leads its own
    /// session, so `bash -c` children get it too). Answer: `Signalled`.
    ProcSignal { target: ProcSelector, signal: i32 },
    /// Resize a process's terminal. Answer: `Resized`.
    ProcResize {
        target: ProcSelector,
        cols: u16,
        rows: u16,
    },
    /// Processes started with `ProcStart`, running and recently ended:
    /// one `Event::Process` each, then `Processes`.
    ProcList {},
    /// Facts about a path (`lstat`, plus the target's kind for a symlink).
    /// Answer: `Stat`.
    Stat {
        path: String,
        #[serde(default)]
        user: Option<String>,
    },
    /// List a directory's entries down to `depth` levels (1 = its own
    /// entries; 0 counts as 1), not following symlinks, the directory itself
    /// excluded: `Event::Entries` batches, then `Listed`.
    ListDir {
        path: String,
        #[serde(default)]
        depth: u32,
        #[serde(default)]
        user: Option<String>,
    },
    /// Create a directory and its missing parents. `AlreadyExists` when it
    /// is a directory already, `NotADirectory` when it or a parent is
    /// something else. Answer: `MadeDir`.
    MakeDir {
        path: String,
        #[serde(default)]
        mode: Option<u32>,
        #[serde(default)]
        user: Option<String>,
    },
    /// Remove a file, a symlink, or a directory (with its contents when
    /// `recursive`; an empty one without). Answer: `Removed`.
    Remove {
        path: String,
        #[serde(default)]
        recursive: bool,
        #[serde(default)]
        user: Option<String>,
    },
    /// Rename `from` to `to`, creating `to`'s parents; across filesystems it
    /// copies and removes. Answer: `Moved` with the new path's facts.
    Move {
        from: String,
        to: String,
        #[serde(default)]
        user: Option<String>,
    },
    /// Watch a directory (and its subdirectories when `recursive`) for
    /// changes. The watch belongs to the agent; collect its events with
    /// `WatchPoll` and end it with `WatchStop`; one not polled for
    /// `idle_ms` (10 minutes when absent) is stopped by the agent. Answer:
    /// `WatchStarted`.
    WatchStart {
        path: String,
        #[serde(default)]
        recursive: bool,
        #[serde(default)]
        idle_ms: Option<u64>,
    },
    /// The events of a watch since the last poll, waiting up to `wait_ms`
    /// (at most 60 s) for the first one. Answer: `WatchEvents`.
    WatchPoll {
        watch: u32,
        #[serde(default)]
        wait_ms: u64,
    },
    /// Stop a watch. Answer: `WatchStopped`.
    WatchStop { watch: u32 },
    /// Stream a file or a directory tree as a tar archive whose entries are
    /// named from `path`'s last component: `Data` frames (windowed), then
    /// `TarDone`. Symlinks are archived as links; modes and times are kept.
    TarRead {
        path: String,
        #[serde(default)]
        user: Option<String>,
    },
    /// Unpack a tar archive into the directory `path` (created with its
    /// parents): `Data` frames with this id follow (windowed), ending with an
    /// empty one. Modes and times are kept, entries escaping `path` are
    /// skipped; files belong to `user` (root when absent). Answer: `TarDone`.
    TarWrite {
        path: String,
        #[serde(default)]
        user: Option<String>,
    },
    /// Open a TCP connection to `127.0.0.1:port` inside the guest and relay
    /// it: `Event::Connected`, then `Data` frames both ways (windowed); an
    /// empty `Data` frame ends that direction (half-close); `RelayClosed`
    /// when both directions have ended. A port nobody listens on is the
    /// error `ConnectionRefused`.
    TcpConnect {
        port: u16,
        #[serde(default)]
        timeout_ms: Option<u64>,
    },
    /// Run Python code in the guest's persistent interpreter (started on
    /// first use; variables survive between calls and into snapshots).
    /// Output streams as `Stdout`/`Stderr` frames; the answer is
    /// `Evaluated`. `Unavailable` when the guest has no `python3`.
    Eval {
        code: String,
        #[serde(default)]
        env: Vec<(String, String)>,
        /// Interrupt the code (KeyboardInterrupt) after this long; when it
        /// does not stop within 5 s the interpreter is restarted empty.
        #[serde(default)]
        timeout_ms: Option<u64>,
    },
    /// Make sure the E2B code-interpreter server (the agent's copy of
    /// `code_interpreter.py`, written to `/run/forkd/`) listens on
    /// `127.0.0.1:port` in the guest,
    /// starting it as an agent process (tag `forkd-code-interpreter-PORT`)
    /// if needed. Answer: `CodeInterpreterReady`.
    CodeInterpreter {
        port: u16,
        /// Working directory of its contexts; `/home/user` when that
        /// exists, else `/root`.
        #[serde(default)]
        cwd: Option<String>,
    },
}

impl Request {
    /// Whether this request's data frames are flow-controlled with
    /// `Window` frames (in both directions).
    pub fn is_windowed(&self) -> bool {
        matches!(
            self,
            Request::ProcStart {
                attach: Some(_),
                ..
            } | Request::ProcAttach { .. }
                | Request::ProcInput { .. }
                | Request::TarRead { .. }
                | Request::TarWrite { .. }
                | Request::TcpConnect { .. }
        )
    }
}

/// A command to run in the guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct ExecRequest {
    pub argv: Vec<String>,
    /// Added to (and overriding) the agent's default environment.
    #[serde(default)]
    pub env: Vec<(String, String)>,
    /// Working directory inside the command's root; `/` when absent.
    #[serde(default)]
    pub cwd: Option<String>,
    /// Kill the command's process group after this long.
    #[serde(default)]
    pub timeout_ms: Option<u64>,
    /// Whether `Stdin` frames follow; without them stdin is `/dev/null`.
    #[serde(default)]
    pub stdin: bool,
    /// Run as this account (see [`ProcSpec::user`]); root when absent. The
    /// working directory stays `/` when none is given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
}

/// The last frame for a request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Response {
    Pong(Pong),
    Exited(ExitStatus),
    Written {
        bytes: u64,
    },
    FileDone {
        bytes: u64,
    },
    Signalled,
    ShuttingDown,
    /// Restore done; how far the guest clock was stepped (guest minus host,
    /// before the step).
    Restored {
        clock_step_ms: i64,
    },
    Error(ErrorReply),

    // ----- protocol 2 -----
    EnvSet,
    Cancelled,
    ProcStarted(ProcInfo),
    /// How a followed or awaited process ended.
    ProcEnded(ExitStatus),
    /// The attachment or wait was cancelled (the process goes on).
    Detached,
    InputWritten {
        bytes: u64,
    },
    StdinClosed,
    Resized,
    /// The end of a `ProcList`: how many `Event::Process` frames it sent.
    Processes {
        count: u64,
    },
    /// (A struct variant: `FileInfo` has its own `kind` field.)
    Stat {
        info: FileInfo,
    },
    /// The end of a `ListDir`: how many entries the events carried.
    Listed {
        entries: u64,
    },
    MadeDir,
    Removed,
    Moved {
        info: FileInfo,
    },
    WatchStarted {
        watch: u32,
    },
    WatchEvents {
        events: Vec<FsEvent>,
        /// Events lost since the last poll because the watch's queue was
        /// full (the watch goes on).
        #[serde(default)]
        dropped: u64,
    },
    WatchStopped,
    TarDone(TarSummary),
    /// A relay ended: bytes sent to the guest's port and received from it.
    RelayClosed {
        sent: u64,
        received: u64,
    },
    Evaluated(EvalResult),
    CodeInterpreterReady {
        pid: u32,
        port: u16,
    },
}

/// A notice within a streaming request, before its `Response` (frame kind
/// `Event`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// `ProcStart` with `attach`: the process runs; its output follows.
    Started(ProcInfo),
    /// `ProcAttach`: attached; output follows.
    Attached(ProcInfo),
    /// This attachment lost `bytes` of output: the backlog dropped them
    /// before they were sent. Output goes on after the gap.
    Dropped { bytes: u64 },
    /// A batch of `ListDir` entries.
    Entries { entries: Vec<FileInfo> },
    /// One `ProcList` entry.
    Process(ProcInfo),
    /// `TcpConnect`: the connection is open.
    Connected,
}

/// Facts the agent reports on `Ping`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pong {
    pub agent_version: String,
    pub protocol: u8,
    /// Milliseconds since the guest kernel booted (`/proc/uptime`).
    pub uptime_ms: u64,
    /// Whether commands run in a root disk (`true`) or in the initramfs.
    pub root_disk: bool,
    pub hostname: String,
}

/// How a command ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitStatus {
    /// Exit code when it exited.
    pub code: Option<i32>,
    /// Signal number when a signal killed it.
    pub signal: Option<i32>,
    /// True when the agent killed it at its timeout.
    pub timed_out: bool,
    pub duration_ms: u64,
}

impl ExitStatus {
    /// The shell convention: the code, or 128 + signal.
    pub fn shell_code(&self) -> i32 {
        match (self.code, self.signal) {
            (Some(c), _) => c,
            (None, Some(s)) => 128 + s,
            (None, None) => 255,
        }
    }
}

/// A failed request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{code:?}: {message}")]
pub struct ErrorReply {
    pub code: ErrorCode,
    pub message: String,
}

/// What kind of failure an [`ErrorReply`] reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The frame could not be decoded (bad magic, version, kind, size, JSON).
    BadFrame,
    /// The request decoded but makes no sense (empty argv, unknown id).
    BadRequest,
    /// The command could not be started.
    Spawn,
    /// A file operation failed.
    Io,
    /// The path (or process, or watch) does not exist.
    NotFound,
    // ----- protocol 2 -----
    /// A path component that must be a directory is not one.
    NotADirectory,
    /// The path is a directory where a file is needed.
    IsADirectory,
    /// The path exists already.
    AlreadyExists,
    /// A directory to remove without `recursive` is not empty.
    NotEmpty,
    /// The guest refused the access (permissions, a read-only filesystem).
    PermissionDenied,
    /// The working directory of a command or process does not exist (or is
    /// not a directory); distinct from a missing program, which exits 127.
    CwdNotFound,
    /// The program of a `ProcStart` does not exist (an `Exec` reports exit
    /// code 127 instead).
    CommandNotFound,
    /// No account of that name in the guest's `/etc/passwd`.
    UnknownUser,
    /// The process has no stdin pipe, or it was closed.
    NoStdin,
    /// Nothing listens on the TCP port in the guest.
    ConnectionRefused,
    /// The guest lacks what the request needs (`python3` for eval).
    Unavailable,
    /// A bound of the agent was reached (processes, watches, entries,
    /// backlog memory).
    Limit,
    /// The request did not finish within its own timeout.
    TimedOut,
    /// The request was cancelled (`Cancel`, or its session ended).
    Cancelled,
}

impl ErrorReply {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ErrorReply {
            code,
            message: message.into(),
        }
    }
}

/// Lower-case hex of `bytes`.
pub fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Parses lower- or upper-case hex; `None` on odd length or a non-hex digit.
pub fn from_hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// JSON-encodes a message for a frame payload.
pub fn encode<T: Serialize>(msg: &T) -> Vec<u8> {
    // Serialising these plain structs cannot fail: no maps with non-string keys,
    // no custom Serialize impls.
    serde_json::to_vec(msg).expect("protocol messages always serialise")
}

/// Decodes a JSON frame payload.
pub fn decode<'a, T: Deserialize<'a>>(payload: &'a [u8]) -> Result<T, serde_json::Error> {
    serde_json::from_slice(payload)
}

#[cfg(any(test, fuzzing))]
pub mod fuzzing;
#[cfg(test)]
mod tests;
