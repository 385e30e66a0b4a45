//! Why a VM operation failed.

use std::io;
use std::time::Duration;

use forkd_protocol::client::ClientError;

use crate::qmp::QmpError;

/// Why a VM operation failed.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("invalid VM configuration: {0}")]
    Config(String),
    #[error("{0} not found: install QEMU with `apt-get install qemu-system-x86`")]
    QemuNotFound(String),
    #[error("cannot start QEMU: {0}")]
    Spawn(io::Error),
    #[error("QEMU exited during boot ({status}){}", detail(.stderr, .console))]
    ExitedDuringBoot {
        status: String,
        stderr: String,
        console: String,
    },
    #[error("the guest agent did not answer within {timeout:?} of QEMU starting{}", detail(.stderr, .console))]
    BootTimeout {
        timeout: Duration,
        stderr: String,
        console: String,
    },
    #[error("the VM died ({status}) during {during}{}", detail("", .console))]
    Died {
        status: String,
        during: String,
        console: String,
    },
    #[error("boot cancelled")]
    Cancelled,
    #[error("QEMU (pid {pid}) is not running")]
    NotRunning { pid: u32 },
    #[error("{what} failed: {reason}")]
    Migration { what: &'static str, reason: String },
    #[error("populating guest RAM before a live snapshot: {0}")]
    Populate(#[from] crate::populate::PopulateError),
    #[error(transparent)]
    Qmp(#[from] QmpError),
    #[error(transparent)]
    Agent(#[from] ClientError),
    #[error(transparent)]
    RunAs(#[from] crate::confine::RunAsError),
    #[error("{0}; forkd runs as root, so every QEMU must be confined in a cgroup of its own")]
    Cgroup(#[from] crate::cgroup::CgroupError),
    #[error("cannot release the guest memory a failed live snapshot left write-protected in QEMU (pid {pid}): {reason}")]
    Thaw { pid: u32, reason: String },
    #[error("VM run directory {path}: {source}")]
    RunDir { path: String, source: io::Error },
}

fn detail(stderr: &str, console: &str) -> String {
    let mut s = String::new();
    if !stderr.trim().is_empty() {
        s.push_str(&format!("\nQEMU said: {}", stderr.trim()));
    }
    if !console.trim().is_empty() {
        s.push_str(&format!(
            "\nlast guest console lines:\n{}",
            console.trim_end()
        ));
    }
    s
}
