//! Why a sandbox operation failed, as typed variants that read as sentences,
//! and their one mapping onto the seam's [`OpError`] (a kind every front end
//! maps to a status or exit code, and a [`Hint`] each front end words).

use std::path::PathBuf;

use forkd_ops::{Dependents, ErrorKind, Hint, OpError, SnapshotStatus};

/// Why a sandbox operation failed.
#[derive(Debug, thiserror::Error)]
pub enum CoreError {
    #[error("{0}")]
    BadRequest(String),
    #[error(transparent)]
    InvalidName(#[from] forkd_ops::InvalidName),
    #[error("no sandbox `{id}`")]
    NoSandbox { id: String },
    #[error("sandbox `{id}` was killed: {why}")]
    Expired {
        id: String,
        why: forkd_ops::lifetime::Expiry,
    },
    #[error("no snapshot `{tag}`")]
    NoSnapshot { tag: String },
    #[error("sandbox `{id}` is dead (its QEMU, pid {pid}, is gone{})", cause.as_deref().map(|c| format!(": {c}")).unwrap_or_default())]
    SandboxDead {
        id: String,
        pid: u32,
        cause: Option<String>,
    },
    #[error("sandbox `{id}` is still starting")]
    SandboxStarting { id: String },
    #[error("cannot {what}: {reason}")]
    Admission { what: &'static str, reason: String },
    #[error("snapshot `{tag}` is broken: {why}")]
    SnapshotBroken { tag: String, why: String },
    #[error("sandbox `{id}` holds files that snapshot {} needs, and they could not be moved into the store: {reason}", tags.join(", "))]
    RunDirNeeded {
        id: String,
        tags: Vec<String>,
        reason: String,
    },
    #[error(
        "sandbox `{id}` is a warm-pool member that has not been handed out; spawn from its snapshot instead"
    )]
    SandboxPooled { id: String },
    #[error("sandbox `{id}` has an unreadable record: {reason}")]
    BadRecord { id: String, reason: String },
    #[error("snapshot `{tag}` is not ready (status: {status}{})", reason_suffix(.error))]
    SnapshotNotReady {
        tag: String,
        status: SnapshotStatus,
        error: Option<String>,
    },
    #[error("snapshot `{tag}` is still being written (status: writing)")]
    SnapshotWriting { tag: String },
    #[error("snapshot `{tag}` is still being written after {waited_s} s")]
    SnapshotWritingTooLong { tag: String, waited_s: u64 },
    #[error("snapshot `{tag}` is being written or compacted by another process right now; retry when it has finished")]
    SnapshotBusy { tag: String },
    #[error("snapshot `{tag}` is in use by {}", describe(.dependents))]
    SnapshotInUse { tag: String, dependents: Dependents },
    #[error("snapshot `{tag}` cannot be spawned: {reason}")]
    SnapshotUnusable { tag: String, reason: String },
    #[error("sandbox `{id}` runs from {}, not from `{expected}`", runs_from.as_deref().map(|s| format!("`{s}`")).unwrap_or_else(|| "no snapshot".into()))]
    WrongParent {
        id: String,
        runs_from: Option<String>,
        expected: String,
    },
    #[error("sandbox `{id}` is being branched{} right now", into.as_deref().map(|t| format!(" into `{t}`")).unwrap_or_default())]
    BranchInProgress { id: String, into: Option<String> },
    #[error("sandbox `{id}` cannot be branched live: {reason}")]
    NotLiveBranchable { id: String, reason: String },
    #[error("sandbox `{id}` cannot take a full snapshot: {reason}")]
    NoFullSnapshot { id: String, reason: &'static str },
    #[error("branch `{tag}` failed: {reason}")]
    BranchFailed { tag: String, reason: String },
    #[error("sandbox `{id}` has no python3 ({detail})")]
    NoPython { id: String, detail: String },
    /// The guest refused an operation on its own things (a path that does
    /// not exist, a directory where a file was asked, its permissions).
    #[error("{what} in `{id}`: {message}")]
    InGuest {
        id: String,
        what: String,
        code: forkd_protocol::ErrorCode,
        message: String,
    },
    #[error("no root image `{name}` in {}: an image is named by its file name there, without `.ext4`", dir.display())]
    NoImage { name: String, dir: PathBuf },
    #[error("root image `{name}` is in use by {}", users.join(", "))]
    ImageInUse { name: String, users: Vec<String> },
    #[error("choosing the accelerator: {0}")]
    Accel(String),
    #[error("{0}")]
    HugePages(String),
    #[error("{what} {}: {source}", path.display())]
    Host {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    DiskImage(String),
    #[error("the branch writer: {0}")]
    Writer(String),
    #[error("the sandbox's network gateway: {0}")]
    Network(String),
    #[error(
        "the static guest agent binary was not found ({0}); build it with `scripts/build-agent.sh`"
    )]
    AgentNotFound(String),
    #[error("container image {source_text}: {error}")]
    ContainerImage {
        source_text: String,
        #[source]
        error: Box<forkd_oci::OciError>,
    },
    #[error(transparent)]
    Guest(#[from] forkd_guest::GuestError),
    #[error(transparent)]
    Vm(#[from] forkd_vm::VmError),
    #[error(transparent)]
    Store(#[from] forkd_store::StoreError),
}

fn reason_suffix(error: &Option<String>) -> String {
    error
        .as_deref()
        .map(|e| format!(": {e}"))
        .unwrap_or_default()
}

/// "sandbox sb-1, sandbox sb-2, snapshot kid".
fn describe(d: &Dependents) -> String {
    d.sandboxes
        .iter()
        .map(|s| format!("sandbox {s}"))
        .chain(d.snapshots.iter().map(|t| format!("snapshot {t}")))
        .collect::<Vec<_>>()
        .join(", ")
}

impl From<forkd_protocol::client::ClientError> for CoreError {
    fn from(e: forkd_protocol::client::ClientError) -> CoreError {
        CoreError::Vm(forkd_vm::VmError::Agent(e))
    }
}

/// What kind of failure a registry, archive or layer error is.
pub(crate) fn oci_error_kind(e: &forkd_oci::OciError) -> ErrorKind {
    use forkd_oci::OciError as O;
    match e {
        O::InvalidReference { .. } | O::InvalidDigest { .. } | O::InvalidSource { .. } => {
            ErrorKind::BadInput
        }
        O::NoCredentials { .. } | O::Unauthorized { .. } => ErrorKind::PermissionDenied,
        O::Status { status: 404, .. } => ErrorKind::NotFound,
        O::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound => {
            ErrorKind::NotFound
        }
        O::WrongArtifact { .. }
        | O::SizeMismatch { .. }
        | O::DigestMismatch { .. }
        | O::BadDocument { .. }
        | O::TooLarge { .. }
        | O::UnsupportedMediaType { .. }
        | O::NoPlatform { .. }
        | O::UnsafeEntry { .. }
        | O::Archive { .. } => ErrorKind::Unprocessable,
        _ => ErrorKind::Internal,
    }
}

impl CoreError {
    /// A host file operation that failed.
    pub fn host(
        what: &'static str,
        path: impl Into<PathBuf>,
    ) -> impl FnOnce(std::io::Error) -> CoreError {
        let path = path.into();
        move |source| CoreError::Host { what, path, source }
    }

    /// What kind of failure this is.
    pub fn kind(&self) -> ErrorKind {
        use forkd_store::StoreError as S;
        use CoreError as C;
        match self {
            C::BadRequest(_)
            | C::InvalidName(_)
            | C::Vm(forkd_vm::VmError::Config(_))
            | C::Guest(
                forkd_guest::GuestError::BadPackageName { .. }
                | forkd_guest::GuestError::PackagesNeedDebian { .. }
                | forkd_guest::GuestError::NotADirectory { .. },
            ) => ErrorKind::BadInput,
            C::NoSandbox { .. } | C::NoSnapshot { .. } | C::NoImage { .. } | C::Expired { .. } => {
                ErrorKind::NotFound
            }
            C::ImageInUse { .. } => ErrorKind::Busy,
            C::ContainerImage { error, .. } => oci_error_kind(error),
            C::SandboxDead { .. }
            | C::SnapshotBroken { .. }
            | C::RunDirNeeded { .. }
            | C::SandboxPooled { .. }
            | C::SnapshotNotReady { .. }
            | C::SnapshotInUse { .. }
            | C::SnapshotUnusable { .. }
            | C::WrongParent { .. }
            | C::NotLiveBranchable { .. }
            | C::NoFullSnapshot { .. }
            | C::HugePages(_) => ErrorKind::Conflict,
            C::SnapshotWriting { .. }
            | C::SnapshotBusy { .. }
            | C::SandboxStarting { .. }
            | C::Admission { .. }
            | C::SnapshotWritingTooLong { .. }
            | C::BranchInProgress { .. } => ErrorKind::Busy,
            C::NoPython { .. } => ErrorKind::Unprocessable,
            C::InGuest { code, .. } => {
                use forkd_protocol::ErrorCode as W;
                match code {
                    W::NotFound | W::CommandNotFound | W::UnknownUser => ErrorKind::NotFound,
                    W::AlreadyExists => ErrorKind::Conflict,
                    W::PermissionDenied => ErrorKind::PermissionDenied,
                    W::NotADirectory
                    | W::IsADirectory
                    | W::NotEmpty
                    | W::CwdNotFound
                    | W::BadRequest
                    | W::NoStdin => ErrorKind::BadInput,
                    W::Limit | W::TimedOut => ErrorKind::Busy,
                    _ => ErrorKind::Unprocessable,
                }
            }
            C::Store(e) => match e {
                S::InvalidTag(_) => ErrorKind::BadInput,
                S::NoSandbox { .. } | S::NoSnapshot { .. } => ErrorKind::NotFound,
                S::SnapshotWriting { .. } => ErrorKind::Busy,
                S::SandboxExists { .. }
                | S::SnapshotExists { .. }
                | S::SnapshotFailed { .. }
                | S::ManifestMissing { .. }
                | S::ManifestInvalid { .. }
                | S::ManifestTooNew { .. }
                | S::FileMissing { .. }
                | S::NotRegularFile { .. }
                | S::FileSizeMismatch { .. }
                | S::FileCorrupt { .. } => ErrorKind::Conflict,
                _ => ErrorKind::Internal,
            },
            // The agent refused the request (a command that does not exist,
            // a file that cannot be read): the caller asked for the impossible.
            C::Vm(forkd_vm::VmError::Agent(forkd_protocol::client::ClientError::Agent(_))) => {
                ErrorKind::Unprocessable
            }
            C::BadRecord { .. }
            | C::BranchFailed { .. }
            | C::Accel(_)
            | C::Host { .. }
            | C::DiskImage(_)
            | C::Writer(_)
            | C::Network(_)
            | C::AgentNotFound(_)
            | C::Guest(_)
            | C::Vm(_) => ErrorKind::Internal,
        }
    }

    /// What the user can do about it, when there is something.
    pub fn hint(&self) -> Option<Hint> {
        use forkd_store::StoreError as S;
        use CoreError as C;
        let remove = |tag: &str| Some(Hint::RemoveSnapshot { tag: tag.into() });
        match self {
            C::NoSandbox { .. } | C::Expired { .. } => Some(Hint::ListSandboxes),
            C::NoSnapshot { .. } => Some(Hint::ListSnapshots),
            C::SandboxDead { id, .. } | C::BadRecord { id, .. } => {
                Some(Hint::KillSandbox { id: id.clone() })
            }
            C::SnapshotNotReady { tag, status, .. } => match status {
                SnapshotStatus::Writing => Some(Hint::WaitForSnapshot { tag: tag.clone() }),
                _ => remove(tag),
            },
            C::SnapshotWriting { tag } | C::SnapshotWritingTooLong { tag, .. } => {
                Some(Hint::WaitForSnapshot { tag: tag.clone() })
            }
            C::BranchInProgress {
                into: Some(tag), ..
            } => Some(Hint::WaitForSnapshot { tag: tag.clone() }),
            C::SnapshotInUse { tag, .. } => {
                Some(Hint::RemoveDependentsOrForce { tag: tag.clone() })
            }
            C::SnapshotUnusable { tag, .. } | C::SnapshotBroken { tag, .. } => remove(tag),
            C::RunDirNeeded { tags, .. } => tags.first().and_then(|t| remove(t)),
            C::NoFullSnapshot { id, .. } => Some(Hint::BranchLive { id: id.clone() }),
            C::NoPython { .. } => Some(Hint::UsePythonImage),
            C::Store(e) => match e {
                S::NoSandbox { .. } => Some(Hint::ListSandboxes),
                S::NoSnapshot { .. } => Some(Hint::ListSnapshots),
                S::SnapshotExists { tag } => Some(Hint::PickAnotherTag { tag: tag.clone() }),
                S::SnapshotWriting { tag } => Some(Hint::WaitForSnapshot { tag: tag.clone() }),
                S::SnapshotFailed { tag, .. }
                | S::ManifestMissing { tag, .. }
                | S::ManifestInvalid { tag, .. }
                | S::FileMissing { tag, .. }
                | S::NotRegularFile { tag, .. }
                | S::FileSizeMismatch { tag, .. }
                | S::FileCorrupt { tag, .. } => remove(tag),
                _ => None,
            },
            _ => None,
        }
    }
}

impl From<CoreError> for OpError {
    fn from(e: CoreError) -> OpError {
        OpError {
            kind: e.kind(),
            hint: e.hint(),
            message: e.to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_carry_their_kind_and_hint_across_the_seam() {
        let e: OpError = CoreError::NoSandbox { id: "sb-1".into() }.into();
        assert_eq!(
            (e.kind, e.message.as_str(), e.hint),
            (
                ErrorKind::NotFound,
                "no sandbox `sb-1`",
                Some(Hint::ListSandboxes)
            )
        );
        let e: OpError = CoreError::SnapshotInUse {
            tag: "warm".into(),
            dependents: Dependents {
                sandboxes: vec!["sb-1".into()],
                snapshots: vec!["kid".into()],
            },
        }
        .into();
        assert_eq!(e.kind, ErrorKind::Conflict);
        assert_eq!(
            e.message,
            "snapshot `warm` is in use by sandbox sb-1, snapshot kid"
        );
        let e: OpError = CoreError::WrongParent {
            id: "sb-1".into(),
            runs_from: None,
            expected: "py".into(),
        }
        .into();
        assert_eq!(
            e.message,
            "sandbox `sb-1` runs from no snapshot, not from `py`"
        );
        let e: OpError =
            CoreError::Store(forkd_store::StoreError::SnapshotExists { tag: "t".into() }).into();
        assert_eq!(e.hint, Some(Hint::PickAnotherTag { tag: "t".into() }));
    }

    #[test]
    fn an_agent_refusal_is_unprocessable_not_internal() {
        let refusal = forkd_protocol::client::ClientError::Agent(forkd_protocol::ErrorReply {
            code: forkd_protocol::ErrorCode::NotFound,
            message: "no such command".into(),
        });
        assert_eq!(CoreError::from(refusal).kind(), ErrorKind::Unprocessable);
    }
}
