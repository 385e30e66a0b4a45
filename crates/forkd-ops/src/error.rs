//! The one error every operation returns, whichever side of the seam ran it.
//!
//! An [`OpError`] says what is wrong in a sentence (`message`), what kind of
//! failure it is (`kind`, which front ends map to an HTTP status or an exit
//! code) and, where the user can act, what to do as a [`Hint`]: a fact, not a
//! command line. Each front end words hints in its own terms (the CLI names
//! `forkd` commands, the API names routes), so no lower crate ever tells a
//! user what to type.

use serde::{Deserialize, Serialize};

/// What kind of failure an [`OpError`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// The request itself is wrong (a bad tag, an impossible option).
    BadInput,
    /// The sandbox, snapshot or file named does not exist.
    NotFound,
    /// The target exists but its state forbids the request (a snapshot not
    /// ready or in use, a dead sandbox, a tag that is taken).
    Conflict,
    /// Someone else is doing this right now; retrying later may work.
    Busy,
    /// The request is valid but the target cannot do it (a directory where
    /// a file was asked, no Python in the guest).
    Unprocessable,
    /// The guest refused the access (its permissions, a read-only file).
    PermissionDenied,
    /// The host, QEMU or the guest failed.
    Internal,
}

impl ErrorKind {
    /// The one spelling of this kind on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::BadInput => "bad_input",
            ErrorKind::NotFound => "not_found",
            ErrorKind::Conflict => "conflict",
            ErrorKind::Busy => "busy",
            ErrorKind::Unprocessable => "unprocessable",
            ErrorKind::PermissionDenied => "permission_denied",
            ErrorKind::Internal => "internal",
        }
    }
}

/// What the user can do about an error, as a fact each front end words.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "do", rename_all = "snake_case")]
pub enum Hint {
    /// Listing sandboxes shows the ids that exist.
    ListSandboxes,
    /// Listing snapshots shows the tags that exist and their status.
    ListSnapshots,
    /// The sandbox is dead or unusable: kill it to remove its record.
    KillSandbox { id: String },
    /// The snapshot is unusable: delete it.
    RemoveSnapshot { tag: String },
    /// The snapshot is still being written: retry when it is ready.
    WaitForSnapshot { tag: String },
    /// Full snapshots are impossible for this sandbox: branch it live.
    BranchLive { id: String },
    /// Kill (or delete) the dependents first, or force the deletion.
    RemoveDependentsOrForce { tag: String },
    /// The tag is taken: choose another or delete the snapshot.
    PickAnotherTag { tag: String },
    /// A guest image is missing: build it.
    BuildImage { image: String },
    /// The sandbox's guest has no Python: use an image that has it.
    UsePythonImage,
    /// The daemon wants the bearer token it was started with.
    ProvideToken,
}

/// Why an operation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
#[error("{message}")]
pub struct OpError {
    pub kind: ErrorKind,
    /// What is wrong, as a sentence naming the thing.
    pub message: String,
    /// What the user can do, when there is something.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hint: Option<Hint>,
}

impl OpError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> OpError {
        OpError {
            kind,
            message: message.into(),
            hint: None,
        }
    }

    pub fn with_hint(mut self, hint: Hint) -> OpError {
        self.hint = Some(hint);
        self
    }

    pub fn bad_input(message: impl Into<String>) -> OpError {
        OpError::new(ErrorKind::BadInput, message)
    }

    pub fn internal(message: impl Into<String>) -> OpError {
        OpError::new(ErrorKind::Internal, message)
    }

    /// The sandbox `id` does not exist.
    pub fn no_sandbox(id: &str) -> OpError {
        OpError::new(ErrorKind::NotFound, format!("no sandbox `{id}`"))
            .with_hint(Hint::ListSandboxes)
    }

    /// The snapshot `tag` does not exist.
    pub fn no_snapshot(tag: &str) -> OpError {
        OpError::new(ErrorKind::NotFound, format!("no snapshot `{tag}`"))
            .with_hint(Hint::ListSnapshots)
    }
}

impl From<crate::InvalidName> for OpError {
    fn from(e: crate::InvalidName) -> OpError {
        OpError::bad_input(e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_error_travels_as_json_and_back_unchanged() {
        let e = OpError::no_snapshot("py");
        let wire = serde_json::to_value(&e).unwrap();
        assert_eq!(
            wire,
            serde_json::json!({"kind": "not_found", "message": "no snapshot `py`", "hint": {"do": "list_snapshots"}})
        );
        assert_eq!(serde_json::from_value::<OpError>(wire).unwrap(), e);
        let h = Hint::KillSandbox { id: "sb-1".into() };
        let back: Hint = serde_json::from_value(serde_json::to_value(&h).unwrap()).unwrap();
        assert_eq!(back, h);
    }

    #[test]
    fn kinds_have_one_spelling_each() {
        for k in [
            ErrorKind::BadInput,
            ErrorKind::NotFound,
            ErrorKind::Conflict,
            ErrorKind::Busy,
            ErrorKind::Unprocessable,
            ErrorKind::PermissionDenied,
            ErrorKind::Internal,
        ] {
            assert_eq!(
                serde_json::to_value(k).unwrap(),
                serde_json::json!(k.as_str())
            );
        }
    }
}
