//! What lives inside a sandbox, as the operations report it: files and
//! directories, changes under a watched directory, processes the guest
//! keeps running between calls, and the persistent Python interpreter's
//! answers. Independent of the host↔guest wire format, which may evolve on
//! its own; forkd-core converts.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::types::ExecOutcome;

/// What a path is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FileKind {
    File,
    Dir,
    Symlink,
    /// A device, FIFO or socket.
    Other,
}

/// Facts about one path in a sandbox (a symlink is described as a link).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileInfo {
    /// The last path component.
    pub name: String,
    /// The absolute path in the guest.
    pub path: String,
    pub kind: FileKind,
    pub size: u64,
    /// Permission bits with setuid, setgid and sticky.
    pub mode: u32,
    /// `ls -l`-style permissions as Go prints them (`-rw-r--r--`).
    pub permissions: String,
    pub owner: String,
    pub group: String,
    /// Modification time, nanoseconds since the Unix epoch.
    pub modified_ns: i64,
    /// For a symlink: the path it points to.
    #[serde(default)]
    pub symlink_target: Option<String>,
}

/// How to write a file.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WriteOptions {
    /// Permission bits of a new file (0o644 when absent).
    pub mode: Option<u32>,
    /// Create missing parent directories (default:
    /// [`crate::policy::WRITE_CREATES_PARENTS`]).
    pub parents: Option<bool>,
    /// Act as this guest account (its permissions; it owns what is made).
    pub user: Option<String>,
}

/// What happened to a watched path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FsEventKind {
    Create,
    Write,
    Remove,
    Rename,
    Chmod,
}

/// One change under a watched directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FsEvent {
    /// Path relative to the watched directory.
    pub name: String,
    pub kind: FsEventKind,
}

/// What a tar stream into or out of a sandbox carried.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TarSummary {
    /// Bytes of the tar stream.
    pub bytes: u64,
    /// Files, directories and links.
    pub entries: u64,
}

/// A terminal's size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PtySize {
    pub cols: u16,
    pub rows: u16,
}

/// A process the guest keeps running between calls.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessSpec {
    /// The program and its arguments.
    pub argv: Vec<String>,
    /// Added to the sandbox's environment.
    pub env: Vec<(String, String)>,
    /// Working directory (default: the user's home).
    pub cwd: Option<String>,
    /// Run as this guest account (default root).
    pub user: Option<String>,
    /// Keep stdin open for [`crate::Operations::process_input`].
    pub stdin: bool,
    /// Run it on a terminal of this size.
    pub pty: Option<PtySize>,
    /// A name to find it by (unique among running processes).
    pub tag: Option<String>,
    /// Kill it after this long.
    pub timeout: Option<Duration>,
}

/// Which process.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProcessRef {
    Pid(u32),
    Tag(String),
}

impl std::fmt::Display for ProcessRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ProcessRef::Pid(p) => write!(f, "pid {p}"),
            ProcessRef::Tag(t) => write!(f, "tag `{t}`"),
        }
    }
}

/// A process the guest keeps, as listed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessInfo {
    pub pid: u32,
    pub tag: Option<String>,
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
    pub cwd: String,
    pub user: String,
    pub pty: bool,
    pub stdin: bool,
    pub started_unix_ms: u64,
    /// How it ended; `None` while it runs.
    pub exit: Option<ExecOutcome>,
}

/// What following a process delivers, in order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProcessEvent {
    /// The process as following begins: the first event of both
    /// `run_process` (just started) and `follow_process`.
    Started(ProcessInfo),
    Stdout(Vec<u8>),
    Stderr(Vec<u8>),
    /// Output of a process on a terminal.
    Pty(Vec<u8>),
    /// This many bytes of output were dropped before they reached this
    /// follower (it fell behind a bounded backlog).
    Dropped(u64),
    /// Nothing came for [`crate::policy::PROCESS_QUIET`]: the follower can
    /// send its own keepalive or notice that its client went away, and
    /// stops following by returning false. Never sent over `/v1`.
    Quiet,
}

/// A TCP connection to a port inside a guest
/// ([`crate::Operations::connect_port`]): what the guest's server sends
/// comes out of `reader` (end of file when it closes), what `writer` takes
/// goes to it. A read waits at most [`crate::policy::PORT_IDLE`] for bytes.
pub struct PortConn {
    pub reader: Box<dyn std::io::Read + Send>,
    pub writer: Box<dyn std::io::Write + Send>,
}

impl std::fmt::Debug for PortConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PortConn")
    }
}

/// An exception evaluated code raised.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EvalError {
    /// The exception's class (`NameError`).
    pub name: String,
    /// `str()` of the exception.
    pub value: String,
    /// The traceback as Python prints it.
    pub traceback: String,
}

/// Python evaluated in a sandbox's persistent interpreter.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EvalOutcome {
    /// `repr()` of the final expression's value, when there is one.
    pub value: Option<String>,
    pub stdout: String,
    pub stderr: String,
    /// The exception, when the code raised.
    pub error: Option<EvalError>,
    /// Cells this interpreter has run (1 after a restart).
    pub execution_count: u64,
    /// Interrupted at the timeout.
    pub timed_out: bool,
    pub duration_ms: u64,
}
