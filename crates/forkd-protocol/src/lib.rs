//! The host <-> guest agent protocol.
//!
//! Owns the wire format spoken over the virtio-serial port `org.forkd.agent`:
//! framing ([`frame`]), the typed messages (this module), and the host-side
//! client ([`client`]) that multiplexes concurrent requests over one channel.
//! It never touches QEMU or the guest's system: the agent and the VM crates
//! bring the transport.
//!
//! A session starts with `Hello { nonce }` from the host; the agent answers
//! `HelloAck` with the same nonce. The host discards everything before that ack,
//! which is how a new connection skips output that an earlier connection left
//! in the pipe. Then the host sends `Request` frames with fresh ids; for each,
//! the agent sends zero or more data frames (`Stdout`, `Stderr`, `Data`) and
//! exactly one `Response`, always last.

pub mod client;
pub mod frame;

use serde::{Deserialize, Serialize};

pub use frame::{
    Frame, FrameDecoder, FrameError, FrameReader, Kind, CHUNK, DECODER_CAPACITY, MAX_PAYLOAD,
    VERSION,
};

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
    /// frames with the same id, ending with an empty one.
    Exec(ExecRequest),
    /// Write a file: `Data` frames with the same id follow, ending with an empty
    /// one; the response is `Written`.
    WriteFile {
        path: String,
        #[serde(default)]
        mode: Option<u32>,
    },
    /// Read a file: the agent sends `Data` frames, then `FileDone`.
    ReadFile { path: String },
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
    /// The path does not exist.
    NotFound,
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
