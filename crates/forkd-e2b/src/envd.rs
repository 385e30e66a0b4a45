//! envd's messages: the `process.Process` and `filesystem.Filesystem` Connect
//! services in their proto3 JSON form, field for field as the descriptors in
//! `e2b/envd/process/process_pb.py` and `e2b/envd/filesystem/filesystem_pb.py`
//! (e2b 2.63.0) define them, plus the plain-HTTP `/files` answer and the
//! `Authorization: Basic` user the SDK sends.
//!
//! A proto `oneof` is a Rust enum, externally tagged, which is exactly its
//! JSON shape (`{"start":{"pid":42}}`). Field names are lowerCamelCase with the
//! snake_case name as an alias; unknown fields are ignored, as the SDK's own
//! codec does. Requests from the network are checked with [`Validate`] before
//! the daemon acts on them.

use std::collections::BTreeMap;

use base64::Engine;
use serde::{Deserialize, Serialize};

use crate::connect::{Code, ConnectError};

/// Longest path accepted in any request (Linux `PATH_MAX`).
pub const MAX_PATH: usize = 4096;
/// Most arguments a process may be started with.
pub const MAX_ARGS: usize = 4096;
/// Most environment variables in one request.
pub const MAX_ENVS: usize = 1024;
/// Most bytes of command, arguments and environment together.
pub const MAX_PROCESS_CONFIG_BYTES: usize = 1 << 20;
/// Longest tag or user name.
pub const MAX_NAME: usize = 256;
/// Deepest `ListDir` walk accepted.
pub const MAX_LIST_DEPTH: u32 = 64;

/// A request that must be checked before it is acted on.
pub trait Validate {
    /// `invalid_argument` naming the field when the request is unusable.
    fn validate(&self) -> Result<(), ConnectError>;
}

fn invalid(message: impl Into<String>) -> ConnectError {
    ConnectError::new(Code::InvalidArgument, message)
}

/// Checks a path field: not empty, at most [`MAX_PATH`] bytes, no NUL.
pub fn check_path(field: &str, path: &str) -> Result<(), ConnectError> {
    if path.is_empty() {
        return Err(invalid(format!(
            "`{field}` is empty; give a file or directory path"
        )));
    }
    if path.len() > MAX_PATH {
        return Err(invalid(format!(
            "`{field}` is {} bytes long; paths are limited to {MAX_PATH}",
            path.len()
        )));
    }
    if path.contains('\0') {
        return Err(invalid(format!("`{field}` contains a NUL byte")));
    }
    Ok(())
}

/// Checks an environment map: names non-empty without `=` or NUL, values
/// without NUL, at most [`MAX_ENVS`] entries.
pub fn check_envs(field: &str, envs: &BTreeMap<String, String>) -> Result<(), ConnectError> {
    if envs.len() > MAX_ENVS {
        return Err(invalid(format!(
            "`{field}` has {} variables; at most {MAX_ENVS} are accepted",
            envs.len()
        )));
    }
    for (k, v) in envs {
        if k.is_empty() || k.contains('=') || k.contains('\0') {
            return Err(invalid(format!(
                "`{field}` has the variable name {k:?}; names must be non-empty without `=` or NUL"
            )));
        }
        if v.contains('\0') {
            return Err(invalid(format!("`{field}.{k}` contains a NUL byte")));
        }
    }
    Ok(())
}

/// An empty message (`SendInputResponse`, `UpdateResponse`, keepalives, …).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Empty {}

/// The user named by `Authorization: Basic base64("<user>:")`, the way the
/// SDK selects the user of a command or file operation
/// (`e2b/envd/utils.py` `authentication_header`). `Ok(None)` without the
/// header (the default user); an error for a malformed one.
pub fn user_from_authorization(header: Option<&str>) -> Result<Option<String>, ConnectError> {
    let Some(header) = header else {
        return Ok(None);
    };
    let unauth = |why: &str| ConnectError::new(Code::Unauthenticated, why.to_owned());
    let (scheme, rest) = header
        .trim()
        .split_once(' ')
        .ok_or_else(|| unauth("the Authorization header must be `Basic <base64 of user:>`"))?;
    if !scheme.eq_ignore_ascii_case("basic") || rest.len() > 4 * MAX_NAME {
        return Err(unauth(
            "the Authorization header must be `Basic <base64 of user:>`",
        ));
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(rest.trim())
        .map_err(|_| unauth("the Basic credentials are not base64"))?;
    let text =
        String::from_utf8(decoded).map_err(|_| unauth("the Basic credentials are not UTF-8"))?;
    let user = text.split_once(':').map_or(text.as_str(), |(u, _)| u);
    if user.is_empty() {
        return Ok(None);
    }
    if user.len() > MAX_NAME
        || !user
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
    {
        return Err(unauth("the user name must be a plain Unix user name"));
    }
    Ok(Some(user.to_owned()))
}

/// `process.Process`.
pub mod process {
    use super::*;
    use crate::pjson::{self, ProtoEnum};

    /// `process.PTY.Size`
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
    pub struct PtySize {
        /// Columns.
        #[serde(with = "pjson::u32_lenient", default)]
        pub cols: u32,
        /// Rows.
        #[serde(with = "pjson::u32_lenient", default)]
        pub rows: u32,
    }

    /// `process.PTY`
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
    pub struct Pty {
        /// The terminal size.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub size: Option<PtySize>,
    }

    /// `process.ProcessConfig`
    #[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
    pub struct ProcessConfig {
        /// The program; the SDK always sends `/bin/bash`.
        #[serde(default)]
        pub cmd: String,
        /// Its arguments (`["-l", "-c", CMD]` for `commands.run`).
        #[serde(default, deserialize_with = "null_default")]
        pub args: Vec<String>,
        /// Added environment, last wins.
        #[serde(default, deserialize_with = "null_default")]
        pub envs: BTreeMap<String, String>,
        /// Working directory; the user's home when absent.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub cwd: Option<String>,
    }

    impl Validate for ProcessConfig {
        fn validate(&self) -> Result<(), ConnectError> {
            if self.cmd.is_empty() {
                return Err(invalid("`process.cmd` is empty; name the program to run"));
            }
            check_path("process.cmd", &self.cmd)?;
            if self.args.len() > MAX_ARGS {
                return Err(invalid(format!(
                    "`process.args` has {} entries; at most {MAX_ARGS} are accepted",
                    self.args.len()
                )));
            }
            if self.args.iter().any(|a| a.contains('\0')) {
                return Err(invalid("an entry of `process.args` contains a NUL byte"));
            }
            check_envs("process.envs", &self.envs)?;
            if let Some(cwd) = &self.cwd {
                check_path("process.cwd", cwd)?;
            }
            let total = self.cmd.len()
                + self.args.iter().map(String::len).sum::<usize>()
                + self
                    .envs
                    .iter()
                    .map(|(k, v)| k.len() + v.len())
                    .sum::<usize>();
            if total > MAX_PROCESS_CONFIG_BYTES {
                return Err(invalid(format!(
                    "command, arguments and environment take {total} bytes; at most \
                     {MAX_PROCESS_CONFIG_BYTES} are accepted (write large inputs to a file)"
                )));
            }
            Ok(())
        }
    }

    /// `process.ProcessSelector`: a oneof of `pid` and `tag`.
    #[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
    #[serde(rename_all = "lowercase")]
    pub enum ProcessSelector {
        /// By process id.
        Pid(#[serde(with = "pjson::u32_lenient")] u32),
        /// By the tag given at start.
        Tag(String),
    }

    fn check_selector(
        selector: &Option<ProcessSelector>,
    ) -> Result<&ProcessSelector, ConnectError> {
        match selector {
            None => Err(invalid(
                "`process` is missing; select the process by `pid` or `tag`",
            )),
            Some(ProcessSelector::Tag(t)) if t.is_empty() || t.len() > MAX_NAME => Err(invalid(
                format!("`process.tag` must be 1 to {MAX_NAME} bytes"),
            )),
            Some(s) => Ok(s),
        }
    }

    /// `process.ListRequest`
    #[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
    pub struct ListRequest {}

    /// `process.ProcessInfo`
    #[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
    pub struct ProcessInfo {
        /// How it was started.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub config: Option<ProcessConfig>,
        /// Its pid in the guest.
        #[serde(with = "pjson::u32_lenient", default)]
        pub pid: u32,
        /// Its tag, if it was given one.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub tag: Option<String>,
    }

    /// `process.ListResponse`
    #[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
    pub struct ListResponse {
        /// Live processes started through envd.
        #[serde(default, deserialize_with = "null_default")]
        pub processes: Vec<ProcessInfo>,
    }

    /// `process.StartRequest`
    #[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
    pub struct StartRequest {
        /// What to run.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub process: Option<ProcessConfig>,
        /// Run on a pseudo-terminal of this size.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub pty: Option<Pty>,
        /// A name to find the process by later.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub tag: Option<String>,
        /// Whether stdin is a pipe (absent = true, as envd treats it) or
        /// `/dev/null` (false).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub stdin: Option<bool>,
    }

    impl StartRequest {
        /// Whether the process gets a stdin pipe.
        pub fn wants_stdin(&self) -> bool {
            self.pty.is_none() && self.stdin != Some(false)
        }
    }

    impl Validate for StartRequest {
        fn validate(&self) -> Result<(), ConnectError> {
            let Some(process) = &self.process else {
                return Err(invalid("`process` is missing; give `cmd` and `args`"));
            };
            process.validate()?;
            if let Some(tag) = &self.tag {
                if tag.is_empty() || tag.len() > MAX_NAME {
                    return Err(invalid(format!("`tag` must be 1 to {MAX_NAME} bytes")));
                }
            }
            if let Some(Pty { size: Some(size) }) = &self.pty {
                if size.cols == 0 || size.rows == 0 || size.cols > 0xffff || size.rows > 0xffff {
                    return Err(invalid("`pty.size` must have 1 to 65535 cols and rows"));
                }
            }
            Ok(())
        }
    }

    /// `process.UpdateRequest` (resize a PTY).
    #[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
    pub struct UpdateRequest {
        /// Which process.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub process: Option<ProcessSelector>,
        /// The new size.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub pty: Option<Pty>,
    }

    impl Validate for UpdateRequest {
        fn validate(&self) -> Result<(), ConnectError> {
            check_selector(&self.process)?;
            match &self.pty {
                Some(Pty { size: Some(s) })
                    if s.cols > 0 && s.rows > 0 && s.cols <= 0xffff && s.rows <= 0xffff =>
                {
                    Ok(())
                }
                _ => Err(invalid("`pty.size` must have 1 to 65535 cols and rows")),
            }
        }
    }

    /// `process.ProcessEvent.StartEvent`
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
    pub struct StartEvent {
        /// The new process's pid.
        #[serde(with = "pjson::u32_lenient", default)]
        pub pid: u32,
    }

    /// `process.ProcessEvent.DataEvent`: a oneof of the output streams.
    #[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
    #[serde(rename_all = "lowercase")]
    pub enum DataEvent {
        /// Bytes on stdout.
        Stdout(#[serde(with = "pjson::bytes")] Vec<u8>),
        /// Bytes on stderr.
        Stderr(#[serde(with = "pjson::bytes")] Vec<u8>),
        /// Bytes from the pseudo-terminal.
        Pty(#[serde(with = "pjson::bytes")] Vec<u8>),
    }

    /// `process.ProcessEvent.EndEvent`
    #[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
    pub struct EndEvent {
        /// Exit code; -1 when a signal ended the process (envd).
        #[serde(
            rename = "exitCode",
            alias = "exit_code",
            with = "pjson::i32_lenient",
            default
        )]
        pub exit_code: i32,
        /// Whether it exited (false when signalled).
        #[serde(default)]
        pub exited: bool,
        /// `exit status 3`, `signal: killed`, as Go's `ProcessState` prints.
        #[serde(default)]
        pub status: String,
        /// The wait error text, when there is one.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub error: Option<String>,
    }

    impl EndEvent {
        /// The end of a process that exited with `code`, as envd reports it.
        pub fn exited(code: i32) -> Self {
            EndEvent {
                exit_code: code,
                exited: true,
                status: format!("exit status {code}"),
                error: (code != 0).then(|| format!("exit status {code}")),
            }
        }

        /// The end of a process killed by `signal` (`signal: killed` for 9).
        pub fn signalled(signal: i32) -> Self {
            let name = signal_name(signal);
            EndEvent {
                exit_code: -1,
                exited: false,
                status: format!("signal: {name}"),
                error: Some(format!("signal: {name}")),
            }
        }
    }

    /// Go's `syscall.Signal.String()` for the common signals (what envd's
    /// `status` prints), the number otherwise.
    pub fn signal_name(signal: i32) -> String {
        match signal {
            1 => "hangup".into(),
            2 => "interrupt".into(),
            3 => "quit".into(),
            6 => "aborted".into(),
            9 => "killed".into(),
            11 => "segmentation fault".into(),
            13 => "broken pipe".into(),
            14 => "alarm clock".into(),
            15 => "terminated".into(),
            n => format!("signal {n}"),
        }
    }

    /// `process.ProcessEvent`: a oneof of start, data, end and keepalive.
    #[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
    #[serde(rename_all = "lowercase")]
    pub enum ProcessEvent {
        /// First message of a `Start` or `Connect` stream.
        Start(StartEvent),
        /// Output.
        Data(DataEvent),
        /// Last message: how the process ended.
        End(EndEvent),
        /// Sent on idle streams every `Keepalive-Ping-Interval` seconds.
        Keepalive(Empty),
    }

    /// `process.StartResponse` and `process.ConnectResponse` (same shape).
    #[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
    pub struct StartResponse {
        /// The event.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub event: Option<ProcessEvent>,
    }

    impl From<ProcessEvent> for StartResponse {
        fn from(event: ProcessEvent) -> Self {
            StartResponse { event: Some(event) }
        }
    }

    /// `process.ConnectResponse`
    pub type ConnectResponse = StartResponse;

    /// `process.ProcessInput`: a oneof of stdin and pty bytes.
    #[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
    #[serde(rename_all = "lowercase")]
    pub enum ProcessInput {
        /// To the stdin pipe.
        Stdin(#[serde(with = "pjson::bytes")] Vec<u8>),
        /// To the pseudo-terminal.
        Pty(#[serde(with = "pjson::bytes")] Vec<u8>),
    }

    /// `process.SendInputRequest`
    #[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
    pub struct SendInputRequest {
        /// Which process.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub process: Option<ProcessSelector>,
        /// What to write.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub input: Option<ProcessInput>,
    }

    impl Validate for SendInputRequest {
        fn validate(&self) -> Result<(), ConnectError> {
            check_selector(&self.process)?;
            if self.input.is_none() {
                return Err(invalid("`input` is missing; send `stdin` or `pty` bytes"));
            }
            Ok(())
        }
    }

    /// `process.StreamInputRequest.StartEvent`
    #[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
    pub struct StreamInputStart {
        /// Which process the following data is for.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub process: Option<ProcessSelector>,
    }

    /// `process.StreamInputRequest.DataEvent`
    #[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
    pub struct StreamInputData {
        /// The bytes.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub input: Option<ProcessInput>,
    }

    /// `process.StreamInputRequest`: one message of the client stream; the
    /// first must be `Start`.
    #[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
    #[serde(rename_all = "lowercase")]
    pub enum StreamInputRequest {
        /// Selects the process.
        Start(StreamInputStart),
        /// Input bytes.
        Data(StreamInputData),
        /// Ignored.
        Keepalive(Empty),
    }

    /// `process.Signal`
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub enum Signal {
        /// `SIGNAL_UNSPECIFIED` (refused).
        #[default]
        Unspecified,
        /// `SIGNAL_SIGTERM`
        Sigterm,
        /// `SIGNAL_SIGKILL`
        Sigkill,
    }

    impl ProtoEnum for Signal {
        const VALUES: &'static [(Self, &'static str, i32)] = &[
            (Signal::Unspecified, "SIGNAL_UNSPECIFIED", 0),
            (Signal::Sigterm, "SIGNAL_SIGTERM", 15),
            (Signal::Sigkill, "SIGNAL_SIGKILL", 9),
        ];
        const UNSPECIFIED: Self = Signal::Unspecified;
    }

    impl Signal {
        /// The Linux signal number.
        pub fn number(self) -> Option<i32> {
            match self {
                Signal::Unspecified => None,
                Signal::Sigterm => Some(15),
                Signal::Sigkill => Some(9),
            }
        }
    }

    /// `process.SendSignalRequest`
    #[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
    pub struct SendSignalRequest {
        /// Which process.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub process: Option<ProcessSelector>,
        /// Which signal.
        #[serde(with = "pjson::proto_enum", default)]
        pub signal: Signal,
    }

    impl Validate for SendSignalRequest {
        fn validate(&self) -> Result<(), ConnectError> {
            check_selector(&self.process)?;
            if self.signal.number().is_none() {
                return Err(invalid("`signal` must be SIGNAL_SIGTERM or SIGNAL_SIGKILL"));
            }
            Ok(())
        }
    }

    /// `process.CloseStdinRequest` and `process.ConnectRequest` (same shape).
    #[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
    pub struct ProcessRequest {
        /// Which process.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub process: Option<ProcessSelector>,
    }

    impl Validate for ProcessRequest {
        fn validate(&self) -> Result<(), ConnectError> {
            check_selector(&self.process).map(|_| ())
        }
    }

    /// `process.CloseStdinRequest`
    pub type CloseStdinRequest = ProcessRequest;
    /// `process.ConnectRequest`
    pub type ConnectRequest = ProcessRequest;
}

/// `filesystem.Filesystem`.
pub mod filesystem {
    use super::*;
    use crate::pjson::{self, ProtoEnum};
    use time::OffsetDateTime;

    /// `filesystem.FileType`
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub enum FileType {
        /// `FILE_TYPE_UNSPECIFIED` (the SDK drops such entries from lists).
        #[default]
        Unspecified,
        /// `FILE_TYPE_FILE`
        File,
        /// `FILE_TYPE_DIRECTORY`
        Directory,
        /// `FILE_TYPE_SYMLINK`
        Symlink,
    }

    impl ProtoEnum for FileType {
        const VALUES: &'static [(Self, &'static str, i32)] = &[
            (FileType::Unspecified, "FILE_TYPE_UNSPECIFIED", 0),
            (FileType::File, "FILE_TYPE_FILE", 1),
            (FileType::Directory, "FILE_TYPE_DIRECTORY", 2),
            (FileType::Symlink, "FILE_TYPE_SYMLINK", 3),
        ];
        const UNSPECIFIED: Self = FileType::Unspecified;
    }

    /// `filesystem.EventType`
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub enum EventType {
        /// `EVENT_TYPE_UNSPECIFIED` (the SDK drops such events).
        #[default]
        Unspecified,
        /// `EVENT_TYPE_CREATE`
        Create,
        /// `EVENT_TYPE_WRITE`
        Write,
        /// `EVENT_TYPE_REMOVE`
        Remove,
        /// `EVENT_TYPE_RENAME`
        Rename,
        /// `EVENT_TYPE_CHMOD`
        Chmod,
    }

    impl ProtoEnum for EventType {
        const VALUES: &'static [(Self, &'static str, i32)] = &[
            (EventType::Unspecified, "EVENT_TYPE_UNSPECIFIED", 0),
            (EventType::Create, "EVENT_TYPE_CREATE", 1),
            (EventType::Write, "EVENT_TYPE_WRITE", 2),
            (EventType::Remove, "EVENT_TYPE_REMOVE", 3),
            (EventType::Rename, "EVENT_TYPE_RENAME", 4),
            (EventType::Chmod, "EVENT_TYPE_CHMOD", 5),
        ];
        const UNSPECIFIED: Self = EventType::Unspecified;
    }

    /// `filesystem.EntryInfo`
    #[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
    pub struct EntryInfo {
        /// Base name.
        #[serde(default)]
        pub name: String,
        /// File, directory or symlink (for a symlink: the target's type, and
        /// `is_symlink` set, as envd reports it).
        #[serde(rename = "type", with = "pjson::proto_enum", default)]
        pub file_type: FileType,
        /// Absolute path.
        #[serde(default)]
        pub path: String,
        /// Size in bytes.
        #[serde(with = "pjson::i64_string", default)]
        pub size: i64,
        /// Permission bits only (`0o644` = 420).
        #[serde(with = "pjson::u32_lenient", default)]
        pub mode: u32,
        /// `-rw-r--r--` as Go's `FileMode.String()` prints it.
        #[serde(default)]
        pub permissions: String,
        /// Owner name (numeric string without a passwd entry).
        #[serde(default)]
        pub owner: String,
        /// Group name.
        #[serde(default)]
        pub group: String,
        /// Last modification.
        #[serde(
            rename = "modifiedTime",
            alias = "modified_time",
            with = "pjson::timestamp",
            default,
            skip_serializing_if = "Option::is_none"
        )]
        pub modified_time: Option<OffsetDateTime>,
        /// Where a symlink points.
        #[serde(
            rename = "symlinkTarget",
            alias = "symlink_target",
            default,
            skip_serializing_if = "Option::is_none"
        )]
        pub symlink_target: Option<String>,
        /// `user.e2b.*` extended attributes.
        #[serde(
            default,
            deserialize_with = "null_default",
            skip_serializing_if = "BTreeMap::is_empty"
        )]
        pub metadata: BTreeMap<String, String>,
        /// Whether the entry itself is a symlink.
        #[serde(
            rename = "isSymlink",
            alias = "is_symlink",
            default,
            skip_serializing_if = "is_false"
        )]
        pub is_symlink: bool,
    }

    /// Go's `FileMode.String()` for a file type and permission bits:
    /// `-rw-r--r--`, `drwxr-xr-x`, `Lrwxrwxrwx`.
    pub fn permissions_string(file_type: FileType, is_symlink: bool, mode: u32) -> String {
        let mut s = String::with_capacity(10);
        s.push(if is_symlink {
            'L'
        } else if file_type == FileType::Directory {
            'd'
        } else {
            '-'
        });
        for (bit, c) in [
            (0o400, 'r'),
            (0o200, 'w'),
            (0o100, 'x'),
            (0o040, 'r'),
            (0o020, 'w'),
            (0o010, 'x'),
            (0o004, 'r'),
            (0o002, 'w'),
            (0o001, 'x'),
        ] {
            s.push(if mode & bit != 0 { c } else { '-' });
        }
        s
    }

    macro_rules! path_request {
        ($name:ident, $doc:literal) => {
            #[doc = $doc]
            #[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
            pub struct $name {
                /// The path.
                #[serde(default)]
                pub path: String,
            }

            impl Validate for $name {
                fn validate(&self) -> Result<(), ConnectError> {
                    check_path("path", &self.path)
                }
            }
        };
    }

    path_request!(StatRequest, "`filesystem.StatRequest`");
    path_request!(MakeDirRequest, "`filesystem.MakeDirRequest` (`mkdir -p`)");
    path_request!(RemoveRequest, "`filesystem.RemoveRequest` (recursive)");

    /// `filesystem.StatResponse`, `MakeDirResponse` and `MoveResponse` (one
    /// entry each).
    #[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
    pub struct EntryResponse {
        /// The entry.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub entry: Option<EntryInfo>,
    }

    /// `filesystem.StatResponse`
    pub type StatResponse = EntryResponse;
    /// `filesystem.MakeDirResponse`
    pub type MakeDirResponse = EntryResponse;
    /// `filesystem.MoveResponse`
    pub type MoveResponse = EntryResponse;

    /// `filesystem.MoveRequest`
    #[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
    pub struct MoveRequest {
        /// From.
        #[serde(default)]
        pub source: String,
        /// To.
        #[serde(default)]
        pub destination: String,
    }

    impl Validate for MoveRequest {
        fn validate(&self) -> Result<(), ConnectError> {
            check_path("source", &self.source)?;
            check_path("destination", &self.destination)
        }
    }

    /// `filesystem.ListDirRequest`
    #[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
    pub struct ListDirRequest {
        /// The directory.
        #[serde(default)]
        pub path: String,
        /// Levels to descend; 0 means 1 (envd).
        #[serde(with = "pjson::u32_lenient", default)]
        pub depth: u32,
    }

    impl ListDirRequest {
        /// The depth to walk: 0 is 1.
        pub fn effective_depth(&self) -> u32 {
            self.depth.max(1)
        }
    }

    impl Validate for ListDirRequest {
        fn validate(&self) -> Result<(), ConnectError> {
            check_path("path", &self.path)?;
            if self.depth > MAX_LIST_DEPTH {
                return Err(invalid(format!(
                    "`depth` {} is deeper than the {MAX_LIST_DEPTH} levels accepted",
                    self.depth
                )));
            }
            Ok(())
        }
    }

    /// `filesystem.ListDirResponse`
    #[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
    pub struct ListDirResponse {
        /// The entries, the directory itself excluded.
        #[serde(default, deserialize_with = "null_default")]
        pub entries: Vec<EntryInfo>,
    }

    /// `filesystem.WatchDirRequest` and `CreateWatcherRequest` (same fields).
    #[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
    pub struct WatchRequest {
        /// The directory.
        #[serde(default)]
        pub path: String,
        /// Watch subdirectories too.
        #[serde(default)]
        pub recursive: bool,
        /// Attach the entry's info to each event.
        #[serde(rename = "includeEntry", alias = "include_entry", default)]
        pub include_entry: bool,
        /// Allow NFS/CIFS/FUSE paths.
        #[serde(rename = "allowNetworkMounts", alias = "allow_network_mounts", default)]
        pub allow_network_mounts: bool,
    }

    impl Validate for WatchRequest {
        fn validate(&self) -> Result<(), ConnectError> {
            check_path("path", &self.path)
        }
    }

    /// `filesystem.WatchDirRequest`
    pub type WatchDirRequest = WatchRequest;
    /// `filesystem.CreateWatcherRequest`
    pub type CreateWatcherRequest = WatchRequest;

    /// `filesystem.FilesystemEvent`
    #[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
    pub struct FilesystemEvent {
        /// Path relative to the watched directory.
        #[serde(default)]
        pub name: String,
        /// What happened.
        #[serde(rename = "type", with = "pjson::proto_enum", default)]
        pub event_type: EventType,
        /// The entry, when asked for and it still exists.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub entry: Option<EntryInfo>,
    }

    /// `filesystem.WatchDirResponse`: a oneof of start, event and keepalive.
    #[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
    #[serde(rename_all = "lowercase")]
    pub enum WatchDirResponse {
        /// First message of the stream.
        Start(Empty),
        /// An event.
        Filesystem(Box<FilesystemEvent>),
        /// Idle keepalive.
        Keepalive(Empty),
    }

    /// `filesystem.CreateWatcherResponse`
    #[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
    pub struct CreateWatcherResponse {
        /// Names the watcher in later calls.
        #[serde(rename = "watcherId", alias = "watcher_id", default)]
        pub watcher_id: String,
    }

    /// `filesystem.GetWatcherEventsRequest` and `RemoveWatcherRequest`.
    #[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
    pub struct WatcherRequest {
        /// From `CreateWatcher`.
        #[serde(rename = "watcherId", alias = "watcher_id", default)]
        pub watcher_id: String,
    }

    impl Validate for WatcherRequest {
        fn validate(&self) -> Result<(), ConnectError> {
            if self.watcher_id.is_empty() || self.watcher_id.len() > MAX_NAME {
                return Err(invalid(format!(
                    "`watcherId` must be 1 to {MAX_NAME} bytes"
                )));
            }
            Ok(())
        }
    }

    /// `filesystem.GetWatcherEventsRequest`
    pub type GetWatcherEventsRequest = WatcherRequest;
    /// `filesystem.RemoveWatcherRequest`
    pub type RemoveWatcherRequest = WatcherRequest;

    /// `filesystem.GetWatcherEventsResponse`
    #[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
    pub struct GetWatcherEventsResponse {
        /// Events since the last call.
        #[serde(default, deserialize_with = "null_default")]
        pub events: Vec<FilesystemEvent>,
    }

    fn is_false(b: &bool) -> bool {
        !*b
    }
}

/// The plain-HTTP `/files` and `/health` routes.
pub mod files {
    use super::*;

    /// One entry of the `POST /files` answer (a JSON array of these).
    #[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
    pub struct WriteInfo {
        /// Base name.
        pub name: String,
        /// `file` or `dir`.
        #[serde(rename = "type")]
        pub kind: String,
        /// Absolute path.
        pub path: String,
        /// `X-Metadata-*` headers stored on the file.
        #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
        pub metadata: BTreeMap<String, String>,
    }

    /// The query of `GET /files` and `POST /files`.
    #[derive(Clone, Debug, Default, PartialEq, Eq)]
    pub struct FilesQuery {
        /// `path`: absent on a multipart upload of several files (each
        /// part's filename is its path).
        pub path: Option<String>,
        /// `username`: the user to act as; the default user when absent.
        pub username: Option<String>,
    }

    impl FilesQuery {
        /// Parses a raw query string (without `?`). Signed URLs
        /// (`signature=`) are refused: forkd routes by header, and signed URLs
        /// carry none.
        pub fn parse(query: &str) -> Result<FilesQuery, String> {
            if query.len() > 2 * MAX_PATH + 1024 {
                return Err("the query string of /files is too long".to_owned());
            }
            let mut out = FilesQuery::default();
            for (k, v) in form_urlencoded::parse(query.as_bytes()) {
                match k.as_ref() {
                    "path" => {
                        check_path("path", &v).map_err(|e| e.message)?;
                        out.path = Some(v.into_owned());
                    }
                    "username" => {
                        if v.is_empty() || v.len() > MAX_NAME {
                            return Err(format!("`username` must be 1 to {MAX_NAME} bytes"));
                        }
                        out.username = Some(v.into_owned());
                    }
                    "signature" | "signature_expiration" => {
                        return Err("signed file URLs are not supported by forkd; send the \
                                    `X-Access-Token` header instead"
                            .to_owned())
                    }
                    _ => {}
                }
            }
            Ok(out)
        }
    }

    /// The `{"code": <status>, "message": …}` body envd's HTTP routes answer
    /// errors with (the SDK reads `message`).
    pub fn error_body(status: u16, message: &str) -> Vec<u8> {
        serde_json::to_vec(&serde_json::json!({ "code": status, "message": message }))
            .unwrap_or_default()
    }
}

/// `null` reads as the type's default (proto3 JSON: null is "not set").
fn null_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::filesystem::*;
    use super::process::*;
    use super::*;

    fn json<T: Serialize>(v: &T) -> String {
        serde_json::to_string(v).unwrap()
    }

    #[test]
    fn process_events_serialize_as_captured_from_envd_answers() {
        let cases: [(ProcessEvent, &str); 5] = [
            (
                ProcessEvent::Start(StartEvent { pid: 42 }),
                r#"{"event":{"start":{"pid":42}}}"#,
            ),
            (
                ProcessEvent::Data(DataEvent::Stdout(b"hi\n".to_vec())),
                r#"{"event":{"data":{"stdout":"aGkK"}}}"#,
            ),
            (
                ProcessEvent::Data(DataEvent::Stderr(b"warn\n".to_vec())),
                r#"{"event":{"data":{"stderr":"d2Fybgo="}}}"#,
            ),
            (
                ProcessEvent::Keepalive(Empty {}),
                r#"{"event":{"keepalive":{}}}"#,
            ),
            (
                ProcessEvent::End(EndEvent::signalled(9)),
                r#"{"event":{"end":{"exitCode":-1,"exited":false,"status":"signal: killed","error":"signal: killed"}}}"#,
            ),
        ];
        for (event, want) in cases {
            let resp = StartResponse::from(event);
            assert_eq!(json(&resp), want);
            assert_eq!(serde_json::from_str::<StartResponse>(want).unwrap(), resp);
        }
        assert_eq!(
            json(&EndEvent::exited(0)),
            r#"{"exitCode":0,"exited":true,"status":"exit status 0"}"#
        );
        assert_eq!(EndEvent::exited(3).error.as_deref(), Some("exit status 3"));
        assert_eq!(signal_name(15), "terminated");
        assert_eq!(signal_name(64), "signal 64");
    }

    #[test]
    fn decodes_every_captured_sdk_request() {
        let r: SendInputRequest =
            serde_json::from_str(r#"{"process":{"pid":42},"input":{"stdin":"ZGF0YQo="}}"#).unwrap();
        r.validate().unwrap();
        assert_eq!(r.process, Some(ProcessSelector::Pid(42)));
        assert_eq!(r.input, Some(ProcessInput::Stdin(b"data\n".to_vec())));
        let r: SendInputRequest =
            serde_json::from_str(r#"{"process":{"pid":42},"input":{"pty":"bHMK"}}"#).unwrap();
        assert_eq!(r.input, Some(ProcessInput::Pty(b"ls\n".to_vec())));
        let r: SendSignalRequest =
            serde_json::from_str(r#"{"process":{"pid":42},"signal":"SIGNAL_SIGKILL"}"#).unwrap();
        r.validate().unwrap();
        assert_eq!(r.signal.number(), Some(9));
        let r: SendSignalRequest =
            serde_json::from_str(r#"{"process":{"tag":"srv"},"signal":15}"#).unwrap();
        assert_eq!(r.signal, Signal::Sigterm);
        let r: UpdateRequest =
            serde_json::from_str(r#"{"process":{"pid":42},"pty":{"size":{"cols":100,"rows":30}}}"#)
                .unwrap();
        r.validate().unwrap();
        let r: StartRequest = serde_json::from_str(
            r#"{"process":{"cmd":"/bin/bash","args":["-i","-l"],"envs":{"TERM":"xterm-256color","LANG":"C.UTF-8","LC_ALL":"C.UTF-8"}},"pty":{"size":{"cols":80,"rows":24}}}"#,
        )
        .unwrap();
        r.validate().unwrap();
        assert!(!r.wants_stdin());
        let r: StartRequest = serde_json::from_str(
            r#"{"process":{"cmd":"/bin/bash","args":["-l","-c","cat"]},"stdin":true}"#,
        )
        .unwrap();
        assert!(r.wants_stdin());
        let r: ProcessRequest = serde_json::from_str(r#"{"process":{"pid":42}}"#).unwrap();
        r.validate().unwrap();
        let r: ListDirRequest = serde_json::from_str(r#"{"path":"/tmp","depth":2}"#).unwrap();
        r.validate().unwrap();
        assert_eq!(r.effective_depth(), 2);
        let r: ListDirRequest = serde_json::from_str(r#"{"path":"/tmp"}"#).unwrap();
        assert_eq!(r.effective_depth(), 1);
        let r: MoveRequest =
            serde_json::from_str(r#"{"source":"/tmp/a.txt","destination":"/tmp/b.txt"}"#).unwrap();
        r.validate().unwrap();
        let r: WatchRequest = serde_json::from_str(r#"{"path":"/tmp","recursive":true}"#).unwrap();
        assert!(r.recursive && !r.include_entry);
        let r: WatcherRequest = serde_json::from_str(r#"{"watcherId":"w1"}"#).unwrap();
        r.validate().unwrap();
        let r: WatcherRequest = serde_json::from_str(r#"{"watcher_id":"w1"}"#).unwrap();
        assert_eq!(r.watcher_id, "w1");
    }

    #[test]
    fn entry_info_matches_envd_and_the_sdk() {
        let e = EntryInfo {
            name: "a.txt".into(),
            file_type: FileType::File,
            path: "/tmp/a.txt".into(),
            size: 5,
            mode: 0o644,
            permissions: permissions_string(FileType::File, false, 0o644),
            owner: "root".into(),
            group: "root".into(),
            modified_time: Some(crate::pjson::parse_rfc3339("2026-12-01T10:00:00Z").unwrap()),
            ..Default::default()
        };
        let want = r#"{"name":"a.txt","type":"FILE_TYPE_FILE","path":"/tmp/a.txt","size":"5","mode":420,"permissions":"-rw-r--r--","owner":"root","group":"root","modifiedTime":"2026-12-01T10:00:00Z"}"#;
        assert_eq!(json(&e), want);
        assert_eq!(serde_json::from_str::<EntryInfo>(want).unwrap(), e);
        assert_eq!(
            permissions_string(FileType::Directory, false, 0o755),
            "drwxr-xr-x"
        );
        assert_eq!(
            permissions_string(FileType::File, true, 0o777),
            "Lrwxrwxrwx"
        );
        let ev = FilesystemEvent {
            name: "a.txt".into(),
            event_type: EventType::Create,
            entry: None,
        };
        assert_eq!(json(&ev), r#"{"name":"a.txt","type":"EVENT_TYPE_CREATE"}"#);
        assert_eq!(json(&WatchDirResponse::Start(Empty {})), r#"{"start":{}}"#);
        assert_eq!(
            json(&CreateWatcherResponse {
                watcher_id: "w1".into()
            }),
            r#"{"watcherId":"w1"}"#
        );
        // Unknown enum numbers are unspecified; unknown names are errors.
        let e: EntryInfo = serde_json::from_str(r#"{"type":7}"#).unwrap();
        assert_eq!(e.file_type, FileType::Unspecified);
        assert!(serde_json::from_str::<EntryInfo>(r#"{"type":"FILE_TYPE_PIPE"}"#).is_err());
    }

    #[test]
    fn validation_names_the_field() {
        let bad: [(&dyn Validate, &str); 8] = [
            (&StartRequest::default(), "`process` is missing"),
            (
                &StartRequest {
                    process: Some(ProcessConfig::default()),
                    ..Default::default()
                },
                "`process.cmd` is empty",
            ),
            (
                &StartRequest {
                    process: Some(ProcessConfig {
                        cmd: "/bin/sh".into(),
                        cwd: Some("a\0b".into()),
                        ..Default::default()
                    }),
                    ..Default::default()
                },
                "`process.cwd` contains a NUL",
            ),
            (
                &StartRequest {
                    process: Some(ProcessConfig {
                        cmd: "/bin/sh".into(),
                        envs: [("A=B".to_string(), "x".to_string())].into(),
                        ..Default::default()
                    }),
                    ..Default::default()
                },
                "variable name",
            ),
            (&SendInputRequest::default(), "`process` is missing"),
            (
                &SendSignalRequest {
                    process: Some(ProcessSelector::Pid(1)),
                    signal: Signal::Unspecified,
                },
                "`signal`",
            ),
            (
                &StatRequest {
                    path: String::new(),
                },
                "`path` is empty",
            ),
            (
                &ListDirRequest {
                    path: "/".into(),
                    depth: 1000,
                },
                "`depth`",
            ),
        ];
        for (req, want) in bad {
            let err = req.validate().unwrap_err();
            assert_eq!(err.code, Code::InvalidArgument);
            assert!(
                err.message.contains(want),
                "{} does not contain {want}",
                err.message
            );
        }
        let long = StatRequest {
            path: "/".repeat(MAX_PATH + 1),
        };
        assert!(long.validate().is_err());
        let big = ProcessConfig {
            cmd: "/bin/sh".into(),
            args: vec!["x".repeat(1 << 20)],
            ..Default::default()
        };
        assert!(big.validate().unwrap_err().message.contains("bytes"));
    }

    #[test]
    fn basic_authorization_names_the_user() {
        assert_eq!(user_from_authorization(None).unwrap(), None);
        assert_eq!(
            user_from_authorization(Some("Basic cm9vdDo="))
                .unwrap()
                .as_deref(),
            Some("root")
        );
        assert_eq!(
            user_from_authorization(Some("basic dXNlcjo="))
                .unwrap()
                .as_deref(),
            Some("user")
        );
        assert_eq!(user_from_authorization(Some("Basic Og==")).unwrap(), None);
        for bad in [
            "Bearer x",
            "Basic",
            "Basic !!!",
            "Basic Li4vZXRjOg==",
            "Basic /w==",
        ] {
            assert_eq!(
                user_from_authorization(Some(bad)).unwrap_err().code,
                Code::Unauthenticated,
                "{bad}"
            );
        }
    }

    #[test]
    fn files_query_and_answer() {
        let q = files::FilesQuery::parse("path=%2Ftmp%2Fa.txt&username=root").unwrap();
        assert_eq!(q.path.as_deref(), Some("/tmp/a.txt"));
        assert_eq!(q.username.as_deref(), Some("root"));
        assert_eq!(
            files::FilesQuery::parse("").unwrap(),
            files::FilesQuery::default()
        );
        assert!(files::FilesQuery::parse("path=").is_err());
        assert!(files::FilesQuery::parse("path=/a&signature=v1_x")
            .unwrap_err()
            .contains("X-Access-Token"));
        let w = files::WriteInfo {
            name: "a.txt".into(),
            kind: "file".into(),
            path: "/tmp/a.txt".into(),
            metadata: BTreeMap::new(),
        };
        assert_eq!(
            json(&vec![w]),
            r#"[{"name":"a.txt","type":"file","path":"/tmp/a.txt"}]"#
        );
        assert_eq!(
            files::error_body(404, "path '/x' does not exist"),
            br#"{"code":404,"message":"path '/x' does not exist"}"#
        );
    }

    #[test]
    fn null_fields_read_as_defaults() {
        let c: ProcessConfig =
            serde_json::from_str(r#"{"cmd":"x","args":null,"envs":null,"cwd":null}"#).unwrap();
        assert!(c.args.is_empty() && c.envs.is_empty() && c.cwd.is_none());
    }
}
