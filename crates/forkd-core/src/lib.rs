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
