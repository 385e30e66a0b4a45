//! Sandboxes: the operations both front ends (CLI, daemon) call.
//!
//! Owns the decisions above a single VM: where files live ([`paths`]), which
//! guest artifacts a sandbox boots from ([`artifacts`]), an ephemeral sandbox
//! owned by this process ([`sandbox`]), persistent sandboxes with snapshots
//! and spawn ([`fleet`]), and the host report ([`doctor`]). It parses no
//! command lines and prints nothing; the CLI does that.

pub mod artifacts;
pub mod branch;
pub mod doctor;
pub mod files;
pub mod fleet;
pub mod hugepages;
pub mod paths;
pub mod ramimage;
pub mod sandbox;
pub mod snapinfo;

pub use artifacts::{ArtifactOptions, Artifacts, Image};
pub use fleet::Fleet;
pub use paths::Env;
pub use sandbox::{BootOptions, Sandbox};

/// Starts `cmd` in its own session with no standard streams, so that it
/// outlives this process and its terminal (background pool refills, branch
/// writers for `--no-wait`).
pub fn spawn_detached(cmd: &mut std::process::Command) -> std::io::Result<std::process::Child> {
    use std::os::unix::process::CommandExt;
    cmd.stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    // SAFETY: setsid runs in the child before exec; async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    cmd.spawn()
}

/// Why a sandbox operation failed.
#[derive(Debug, thiserror::Error)]
pub enum CoreError {
    #[error("{0}")]
    Config(String),
    /// The sandbox or snapshot named does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The target exists but is in the wrong state for the request (a
    /// snapshot not ready or in use, a dead sandbox).
    #[error("{0}")]
    Conflict(String),
    /// Someone else is doing this right now; retrying later may work.
    #[error("{0}")]
    Busy(String),
    #[error(
        "the static guest agent binary was not found ({0}); build it with `scripts/build-agent.sh`"
    )]
    AgentNotFound(String),
    #[error(transparent)]
    Guest(#[from] forkd_guest::GuestError),
    #[error(transparent)]
    Vm(#[from] forkd_vm::VmError),
    #[error(transparent)]
    Store(#[from] forkd_store::StoreError),
}

/// What kind of failure a [`CoreError`] is, for front ends that map errors
/// to status codes (the daemon) or exit codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The request itself is wrong (a bad tag, an impossible option).
    BadInput,
    NotFound,
    Conflict,
    Busy,
    /// Everything else: the host, QEMU or the guest failed.
    Internal,
}

impl CoreError {
    pub fn kind(&self) -> ErrorKind {
        use forkd_store::StoreError as S;
        match self {
            CoreError::NotFound(_) => ErrorKind::NotFound,
            CoreError::Conflict(_) => ErrorKind::Conflict,
            CoreError::Busy(_) => ErrorKind::Busy,
            CoreError::Store(e) => match e {
                S::InvalidTag { .. } => ErrorKind::BadInput,
                S::NoSandbox { .. } | S::NoSnapshot { .. } => ErrorKind::NotFound,
                S::SandboxExists { .. }
                | S::SnapshotExists { .. }
                | S::SnapshotWriting { .. }
                | S::SnapshotFailed { .. } => ErrorKind::Conflict,
                _ => ErrorKind::Internal,
            },
            CoreError::Config(_)
            | CoreError::AgentNotFound(_)
            | CoreError::Guest(_)
            | CoreError::Vm(_) => ErrorKind::Internal,
        }
    }
}
