//! Process messages: processes that belong to the agent rather than to a
//! request ([`ProcSpec`] starts one, [`ProcInfo`] describes it, a
//! [`ProcSelector`] names it), how an attachment follows its output
//! ([`AttachOptions`]), and the persistent Python interpreter's answer
//! ([`EvalResult`]).

use serde::{Deserialize, Serialize};

use crate::ExitStatus;

/// Default size of a process's output backlog.
pub const DEFAULT_BACKLOG: u32 = 1 << 20;
/// Largest output backlog one process may ask for.
pub const MAX_BACKLOG: u32 = 16 << 20;
/// Smallest output backlog (smaller requests are raised to this).
pub const MIN_BACKLOG: u32 = 4096;

/// A process to start under the agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct ProcSpec {
    /// Program and arguments; the program is looked up on `PATH` in the
    /// guest when it has no `/`.
    pub argv: Vec<String>,
    /// Added to (and overriding) the agent's default environment, the
    /// user's `HOME`/`USER`/`LOGNAME` and the sandbox's environment.
    #[serde(default)]
    pub env: Vec<(String, String)>,
    /// Working directory; the user's home (when it exists) or `/` when absent.
    #[serde(default)]
    pub cwd: Option<String>,
    /// The account to run as: a name from the guest's `/etc/passwd`, or
    /// `UID` / `UID:GID`; root when absent.
    #[serde(default)]
    pub user: Option<String>,
    /// Give the process a stdin pipe (written with `ProcInput`); without it
    /// stdin is `/dev/null`. A process with a terminal always has input.
    #[serde(default)]
    pub stdin: bool,
    /// Run it on a new pseudo-terminal of this size: stdin, stdout and
    /// stderr are the terminal, output arrives as `Pty` frames.
    #[serde(default)]
    pub pty: Option<PtySize>,
    /// A name to find it by (unique among running processes).
    #[serde(default)]
    pub tag: Option<String>,
    /// Its lifetime: the agent kills its process group this long after the
    /// start (E2B's `Connect-Timeout-Ms`); no limit when absent.
    #[serde(default)]
    pub timeout_ms: Option<u64>,
    /// Bytes of output the agent keeps for attachments that fall behind or
    /// come later ([`DEFAULT_BACKLOG`] when absent, at most [`MAX_BACKLOG`]).
    #[serde(default)]
    pub backlog_bytes: Option<u32>,
}

impl ProcSpec {
    /// A spec running `argv`.
    pub fn new<S: Into<String>>(argv: impl IntoIterator<Item = S>) -> ProcSpec {
        ProcSpec {
            argv: argv.into_iter().map(Into::into).collect(),
            ..ProcSpec::default()
        }
    }

    /// A spec running `command` with `/bin/sh -c`.
    pub fn shell(command: &str) -> ProcSpec {
        ProcSpec::new(["/bin/sh", "-c", command])
    }
}

/// Size of a pseudo-terminal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PtySize {
    pub cols: u16,
    pub rows: u16,
}

/// Names a process started with `ProcStart`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProcSelector {
    Pid(u32),
    Tag(String),
}

impl From<u32> for ProcSelector {
    fn from(pid: u32) -> Self {
        ProcSelector::Pid(pid)
    }
}

impl std::fmt::Display for ProcSelector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ProcSelector::Pid(p) => write!(f, "pid {p}"),
            ProcSelector::Tag(t) => write!(f, "tag {t:?}"),
        }
    }
}

/// How an attachment follows a process's output.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct AttachOptions {
    /// Start with the oldest output still in the backlog (else: output from
    /// now on, as envd's `Connect` does). Ignored when attaching at start,
    /// which sees everything.
    #[serde(default)]
    pub replay: bool,
    /// Make the process wait for this attachment instead of dropping output
    /// it has not sent yet: the process blocks on its output, as on a slow
    /// terminal, while the backlog is full of bytes this attachment still
    /// has to send. Without it, a slow attachment gets a `Dropped` event
    /// and skips ahead, and the process never waits.
    #[serde(default)]
    pub backpressure: bool,
}

/// A process the agent manages.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcInfo {
    pub pid: u32,
    #[serde(default)]
    pub tag: Option<String>,
    pub argv: Vec<String>,
    /// The environment the request added (not the defaults).
    pub env: Vec<(String, String)>,
    /// The working directory it started in.
    pub cwd: String,
    /// The account it runs as (name, or the uid when it has none).
    pub user: String,
    pub uid: u32,
    pub gid: u32,
    pub pty: bool,
    /// Whether it has a stdin pipe (or a terminal) that is still open.
    pub stdin: bool,
    /// Start time, milliseconds since the Unix epoch (guest clock).
    pub started_unix_ms: u64,
    /// How it ended; `None` while it runs.
    #[serde(default)]
    pub exit: Option<ExitStatus>,
}

/// The answer of the persistent Python interpreter to one `Eval`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EvalResult {
    /// `repr()` of the value of the code's final expression, when it ends
    /// with one whose value is not `None`.
    #[serde(default)]
    pub value: Option<String>,
    /// True when `value` was cut to the agent's limit.
    #[serde(default)]
    pub value_truncated: bool,
    /// The exception the code raised.
    #[serde(default)]
    pub error: Option<EvalError>,
    /// Executions this interpreter has run, this one included (1 after a
    /// restart).
    pub execution_count: u64,
    /// The code ran past its timeout and was interrupted.
    pub timed_out: bool,
    /// The interpreter was (re)started empty during this call: it had died,
    /// or it did not stop after an interrupt and was killed.
    pub restarted: bool,
    pub duration_ms: u64,
}

/// An exception raised by evaluated code.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EvalError {
    /// The exception's class name (`NameError`).
    pub name: String,
    /// `str()` of the exception.
    pub value: String,
    /// The formatted traceback, as Python prints it.
    pub traceback: String,
}
