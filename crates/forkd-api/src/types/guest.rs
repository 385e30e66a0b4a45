//! Bodies of the routes that reach inside a sandbox beyond `exec`: files and
//! directories, tar streams, directory watches, and processes the guest keeps
//! running between calls. These are forkd's own routes (the runtime forkd
//! grew from had only whole-file reads and writes), so their shapes follow
//! the operations seam one to one.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::MAX_EXEC_TIMEOUT_SECS;
use crate::error::ApiError;
use crate::validate::{self, Validate};

/// Deepest listing one call may ask for.
pub const MAX_LIST_DEPTH: u32 = 16;
/// Longest a watch poll may wait, in milliseconds.
pub const MAX_WATCH_WAIT_MS: u64 = 60_000;

fn user(u: &Option<String>) -> Result<(), ApiError> {
    match u {
        Some(u) => validate::user("user", u),
        None => Ok(()),
    }
}

// ---------------------------------------------------------------- files

/// What a path is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum FileType {
    /// A regular file.
    File,
    /// A directory.
    Dir,
    /// A symbolic link (described as the link, not its target).
    Symlink,
    /// A device, FIFO or socket.
    Other,
}

/// Facts about one path in the guest.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct FileInfo {
    /// The last path component.
    pub name: String,
    /// The absolute path.
    pub path: String,
    /// What it is.
    #[serde(rename = "type")]
    pub file_type: FileType,
    /// Size in bytes.
    pub size: u64,
    /// Permission bits with setuid, setgid and sticky (e.g. 420 for 0644).
    pub mode: u32,
    /// `ls -l`-style permissions (`-rw-r--r--`).
    pub permissions: String,
    /// The owning account's name (its uid when it has none).
    pub owner: String,
    /// The owning group's name (its gid when it has none).
    pub group: String,
    /// Modification time, nanoseconds since the Unix epoch.
    pub modified_ns: i64,
    /// For a symlink: where it points.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub symlink_target: Option<String>,
}

/// Query of the routes that name one guest path (`stat`, `DELETE files`,
/// raw downloads).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PathQuery {
    /// Absolute guest path.
    pub path: String,
    /// Act as this guest account (default root).
    #[serde(default)]
    pub user: Option<String>,
}

impl Validate for PathQuery {
    fn validate(&self) -> Result<(), ApiError> {
        validate::guest_path("path", &self.path)?;
        user(&self.user)
    }
}

/// Query of `GET /v1/sandboxes/{id}/files/list`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    /// Absolute path of the directory.
    pub path: String,
    /// Levels to descend: 1 (the default) lists the directory itself.
    #[serde(default)]
    pub depth: Option<u32>,
    /// Act as this guest account (default root).
    #[serde(default)]
    pub user: Option<String>,
}

impl Validate for ListQuery {
    fn validate(&self) -> Result<(), ApiError> {
        validate::guest_path("path", &self.path)?;
        if let Some(d) = self.depth {
            validate::range("depth", d, 1, MAX_LIST_DEPTH)?;
        }
        user(&self.user)
    }
}

/// Query of `PUT /v1/sandboxes/{id}/files/raw`, whose body is the file's
/// bytes (`application/octet-stream`, streamed: no size cap).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawWriteQuery {
    /// Absolute guest path of the file (created or truncated).
    pub path: String,
    /// Permission bits of a new file (e.g. 493 for 0755); 0644 when absent.
    #[serde(default)]
    pub mode: Option<u32>,
    /// Create missing parent directories (default true); with false, a
    /// missing parent is a 404.
    #[serde(default)]
    pub mkdir: Option<bool>,
    /// Write as this guest account (default root).
    #[serde(default)]
    pub user: Option<String>,
}

impl Validate for RawWriteQuery {
    fn validate(&self) -> Result<(), ApiError> {
        validate::guest_path("path", &self.path)?;
        if let Some(mode) = self.mode {
            validate::range("mode", mode, 0, 0o7777)?;
        }
        user(&self.user)
    }
}

/// A file was written.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct FileWritten {
    /// The path written.
    pub path: String,
    /// Bytes written.
    pub bytes: u64,
}

/// `POST /v1/sandboxes/{id}/files/mkdir`: make a directory and its parents.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MkdirRequest {
    /// Absolute guest path.
    pub path: String,
    /// Act as this guest account (it owns what is made).
    #[serde(default)]
    pub user: Option<String>,
}

impl Validate for MkdirRequest {
    fn validate(&self) -> Result<(), ApiError> {
        validate::guest_path("path", &self.path)?;
        user(&self.user)
    }
}

/// The answer to a mkdir.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct MkdirResponse {
    /// The directory.
    pub path: String,
    /// False when it already existed.
    pub created: bool,
}

/// `POST /v1/sandboxes/{id}/files/rename`: move or rename a path.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RenameRequest {
    /// Absolute guest path to move.
    pub from: String,
    /// Absolute guest path to move it to.
    pub to: String,
    /// Act as this guest account.
    #[serde(default)]
    pub user: Option<String>,
}

impl Validate for RenameRequest {
    fn validate(&self) -> Result<(), ApiError> {
        validate::guest_path("from", &self.from)?;
        validate::guest_path("to", &self.to)?;
        user(&self.user)
    }
}

/// What a tar stream into or out of the guest carried.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct TarSummary {
    /// Bytes of the tar stream.
    pub bytes: u64,
    /// Files, directories and links.
    pub entries: u64,
}

// ---------------------------------------------------------------- watches

/// `POST /v1/sandboxes/{id}/watches`: watch a directory for changes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct WatchRequest {
    /// Absolute path of the directory.
    pub path: String,
    /// Watch its subdirectories too.
    #[serde(default)]
    pub recursive: bool,
    /// Act as this guest account.
    #[serde(default)]
    pub user: Option<String>,
}

impl Validate for WatchRequest {
    fn validate(&self) -> Result<(), ApiError> {
        validate::guest_path("path", &self.path)?;
        user(&self.user)
    }
}

/// A watch was started.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct WatchCreated {
    /// Its id, for polling and stopping it.
    pub watch: u32,
}

/// Query of `GET /v1/sandboxes/{id}/watches/{watch}`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct WatchPollQuery {
    /// Wait up to this long for the first change (0, the default: answer at
    /// once).
    #[serde(default)]
    pub wait_ms: Option<u64>,
}

impl Validate for WatchPollQuery {
    fn validate(&self) -> Result<(), ApiError> {
        if let Some(w) = self.wait_ms {
            validate::range("wait_ms", w, 0, MAX_WATCH_WAIT_MS)?;
        }
        Ok(())
    }
}

/// What happened to a watched path.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum FsEventType {
    /// Created.
    Create,
    /// Written to.
    Write,
    /// Removed.
    Remove,
    /// Renamed or moved away.
    Rename,
    /// Its permissions or owner changed.
    Chmod,
}

/// One change under a watched directory.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct FsEvent {
    /// Path relative to the watched directory.
    pub name: String,
    /// What happened.
    #[serde(rename = "type")]
    pub event_type: FsEventType,
}

// ---------------------------------------------------------------- processes

/// A terminal's size.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PtySize {
    /// Columns (1 to 1000).
    pub cols: u16,
    /// Rows (1 to 1000).
    pub rows: u16,
}

impl Validate for PtySize {
    fn validate(&self) -> Result<(), ApiError> {
        validate::range("cols", self.cols, 1, 1000)?;
        validate::range("rows", self.rows, 1, 1000)
    }
}

/// `POST /v1/sandboxes/{id}/processes`: start a process the guest keeps
/// running after the call; the answer streams its output.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ProcessStartRequest {
    /// The program and its arguments (`args[0]` is looked up in `PATH`).
    pub args: Vec<String>,
    /// Environment added to the sandbox's.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Working directory (default: the user's home).
    #[serde(default)]
    pub cwd: Option<String>,
    /// Run as this guest account (default root).
    #[serde(default)]
    pub user: Option<String>,
    /// Keep stdin open for `…/input`.
    #[serde(default)]
    pub stdin: bool,
    /// Run it on a terminal of this size.
    #[serde(default)]
    pub pty: Option<PtySize>,
    /// A name to find it by instead of its pid (unique among running
    /// processes; not all digits).
    #[serde(default)]
    pub tag: Option<String>,
    /// Kill it after this many seconds (no limit when absent).
    #[serde(default)]
    pub timeout_secs: Option<u64>,
}

impl Validate for ProcessStartRequest {
    fn validate(&self) -> Result<(), ApiError> {
        super::validate_command("args", &self.args)?;
        super::validate_env(&self.env)?;
        if let Some(cwd) = &self.cwd {
            validate::guest_path("cwd", cwd)?;
        }
        user(&self.user)?;
        if let Some(p) = &self.pty {
            p.validate()?;
        }
        if let Some(tag) = &self.tag {
            validate::process_tag("tag", tag)?;
        }
        if let Some(t) = self.timeout_secs {
            validate::range("timeout_secs", t, 1, MAX_EXEC_TIMEOUT_SECS)?;
        }
        Ok(())
    }
}

/// How a process ended.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct ProcessExit {
    /// The shell's convention: its exit code, 128+N for signal N, 124 at its
    /// timeout.
    pub exit_code: i32,
    /// Its own exit code, when it exited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<i32>,
    /// The signal that killed it, when one did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<i32>,
    /// Killed at its timeout.
    pub timed_out: bool,
    /// How long it ran.
    pub duration_ms: u64,
}

/// A process the guest keeps.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct ProcessInfo {
    /// Its pid in the guest.
    pub pid: u32,
    /// Its tag, when it was given one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tag: Option<String>,
    /// The program and its arguments.
    pub args: Vec<String>,
    /// The environment it was given on top of the sandbox's.
    pub env: BTreeMap<String, String>,
    /// Its working directory.
    pub cwd: String,
    /// The account it runs as.
    pub user: String,
    /// Whether it runs on a terminal.
    pub pty: bool,
    /// Whether its stdin is open.
    pub stdin: bool,
    /// When it started, milliseconds since the Unix epoch.
    pub started_unix_ms: u64,
    /// How it ended; absent while it runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit: Option<ProcessExit>,
}

/// One line of a process stream (`application/x-ndjson`): `started` first
/// (when starting one), output as it comes, then `exit` or `error`. A client
/// that disconnects stops following; the process goes on.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "event", rename_all = "lowercase")]
pub enum ProcessEvent {
    /// The process started.
    Started {
        /// The process.
        process: ProcessInfo,
    },
    /// Bytes on its stdout.
    Stdout {
        /// Standard base64.
        data_b64: String,
    },
    /// Bytes on its stderr.
    Stderr {
        /// Standard base64.
        data_b64: String,
    },
    /// Bytes on its terminal.
    Pty {
        /// Standard base64.
        data_b64: String,
    },
    /// This follower fell behind and missed this many bytes.
    Dropped {
        /// Bytes missed.
        bytes: u64,
    },
    /// It ended (the last line).
    Exit(ProcessExit),
    /// Following it failed (the last line); the fields of an error answer.
    Error(crate::error::ErrorBody),
}

/// Query of `GET /v1/sandboxes/{id}/processes/{process}/stream`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FollowQuery {
    /// Start from the oldest output still kept (default: from now).
    #[serde(default)]
    pub replay: bool,
}

impl Validate for FollowQuery {
    fn validate(&self) -> Result<(), ApiError> {
        Ok(())
    }
}

/// `POST /v1/sandboxes/{id}/processes/{process}/input`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ProcessInputRequest {
    /// Bytes for its stdin (standard base64; may be empty).
    #[serde(default)]
    pub data_b64: String,
    /// Close its stdin after writing.
    #[serde(default)]
    pub close: bool,
}

impl ProcessInputRequest {
    /// The decoded bytes. Validation has already checked they decode.
    pub fn data(&self) -> Result<Vec<u8>, ApiError> {
        validate::base64("data_b64", &self.data_b64)
    }
}

impl Validate for ProcessInputRequest {
    fn validate(&self) -> Result<(), ApiError> {
        self.data().map(drop)
    }
}

/// `POST /v1/sandboxes/{id}/processes/{process}/signal`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SignalRequest {
    /// The signal number (e.g. 15 for SIGTERM), sent to its process group.
    pub signal: i32,
}

impl Validate for SignalRequest {
    fn validate(&self) -> Result<(), ApiError> {
        validate::range("signal", self.signal, 1, 64)
    }
}

/// `POST /v1/sandboxes/{id}/processes/{process}/resize`.
pub type ResizeRequest = PtySize;

/// A process named in a path: its pid, or its tag (which is never all
/// digits).
pub fn parse_process(segment: &str) -> Result<ProcessRefWire, ApiError> {
    if !segment.is_empty() && segment.bytes().all(|b| b.is_ascii_digit()) {
        return segment
            .parse()
            .map(ProcessRefWire::Pid)
            .map_err(|_| ApiError::field("process", "the pid is out of range"));
    }
    validate::process_tag("process", segment)?;
    Ok(ProcessRefWire::Tag(segment.to_string()))
}

/// A process as a path names it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProcessRefWire {
    /// By pid.
    Pid(u32),
    /// By tag.
    Tag(String),
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn process_events_are_tagged_lines() {
        let ev = ProcessEvent::Stdout {
            data_b64: "aGk=".into(),
        };
        assert_eq!(
            serde_json::to_value(&ev).unwrap(),
            json!({"event": "stdout", "data_b64": "aGk="})
        );
        let exit = ProcessEvent::Exit(ProcessExit {
            exit_code: 0,
            code: Some(0),
            signal: None,
            timed_out: false,
            duration_ms: 5,
        });
        let v = serde_json::to_value(&exit).unwrap();
        assert_eq!(v["event"], "exit");
        assert_eq!(v["exit_code"], 0);
        let back: ProcessEvent = serde_json::from_value(v).unwrap();
        assert_eq!(back, exit);
    }

    #[test]
    fn processes_are_named_by_pid_or_a_tag_that_is_not_a_number() {
        assert_eq!(parse_process("42").unwrap(), ProcessRefWire::Pid(42));
        assert_eq!(
            parse_process("server").unwrap(),
            ProcessRefWire::Tag("server".into())
        );
        assert!(parse_process("99999999999").is_err());
        assert!(parse_process("a b").is_err());
    }

    #[test]
    fn requests_name_their_bad_field() {
        let bad = ProcessStartRequest {
            args: vec!["sh".into()],
            env: BTreeMap::new(),
            cwd: None,
            user: None,
            stdin: false,
            pty: Some(PtySize { cols: 0, rows: 24 }),
            tag: Some("123".into()),
            timeout_secs: None,
        };
        assert_eq!(bad.validate().unwrap_err().field_name(), Some("cols"));
        let q = ListQuery {
            path: "/".into(),
            depth: Some(0),
            user: None,
        };
        assert_eq!(q.validate().unwrap_err().field_name(), Some("depth"));
        let q = PathQuery {
            path: "/x".into(),
            user: Some("a:b".into()),
        };
        assert_eq!(q.validate().unwrap_err().field_name(), Some("user"));
    }
}
