//! The one error type of this crate. Every message names the thing that is
//! wrong; what the user should type about it is the front ends' business
//! (they word the hint each variant implies).

use std::io;
use std::path::PathBuf;

/// Result with [`StoreError`] as the default error.
pub type Result<T, E = StoreError> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(transparent)]
    InvalidTag(#[from] forkd_ops::InvalidName),

    #[error("cannot {action} `{}`: {source}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    #[error("state database `{}`: {source}", path.display())]
    Database {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },

    #[error(
        "state database `{}` has schema version {found}, newer than this forkd understands \
         ({supported}); upgrade forkd",
        path.display()
    )]
    SchemaTooNew {
        path: PathBuf,
        found: i64,
        supported: i64,
    },

    #[error("a sandbox with id `{id}` already exists; sandbox ids must be unique")]
    SandboxExists { id: String },

    #[error("no sandbox `{id}`")]
    NoSandbox { id: String },

    #[error("snapshot `{tag}` already exists")]
    SnapshotExists { tag: String },

    #[error("no snapshot `{tag}`")]
    NoSnapshot { tag: String },

    #[error("snapshot `{tag}` is still being written (status: writing)")]
    SnapshotWriting { tag: String },

    #[error(
        "snapshot `{tag}` failed while being written{}",
        reason_suffix(.error)
    )]
    SnapshotFailed { tag: String, error: Option<String> },

    #[error(
        "snapshot `{tag}` has no manifest (`{}`): it is incomplete",
        path.display()
    )]
    ManifestMissing { tag: String, path: PathBuf },

    #[error(
        "manifest `{}` of snapshot `{tag}` is invalid: {reason}",
        path.display()
    )]
    ManifestInvalid {
        tag: String,
        path: PathBuf,
        reason: String,
    },

    #[error(
        "snapshot `{tag}` has manifest format {found}, newer than this forkd supports \
         ({supported}); upgrade forkd"
    )]
    ManifestTooNew {
        tag: String,
        found: u64,
        supported: u32,
    },

    #[error("cannot publish snapshot `{tag}`: the manifest is for `{found}`")]
    ManifestTagMismatch { tag: String, found: String },

    #[error(
        "cannot publish snapshot `{tag}`: staging entry `{name}` is not a regular file \
         (only plain files may be part of a snapshot)"
    )]
    UnexpectedStagingEntry { tag: String, name: String },

    #[error("snapshot `{tag}` is missing {name}: it is incomplete")]
    FileMissing { tag: String, name: String },

    #[error("snapshot `{tag}`: {name} is not a regular file: it is corrupt")]
    NotRegularFile { tag: String, name: String },

    #[error(
        "snapshot `{tag}`: {name} is {}: {actual} bytes, manifest says {expected}: \
         it is corrupt",
        size_problem(.actual, .expected)
    )]
    FileSizeMismatch {
        tag: String,
        name: String,
        actual: u64,
        expected: u64,
    },

    #[error(
        "snapshot `{tag}`: {name} does not match its manifest (blake3 {actual}, manifest says \
         {expected}): it is corrupt"
    )]
    FileCorrupt {
        tag: String,
        name: String,
        actual: String,
        expected: String,
    },

    #[error("path `{}` is not valid UTF-8; forkd keeps paths in its state as UTF-8", path.display())]
    NonUtf8Path { path: PathBuf },
}

fn reason_suffix(error: &Option<String>) -> String {
    match error {
        Some(reason) => format!(" ({reason})"),
        None => String::new(),
    }
}

fn size_problem(actual: &u64, expected: &u64) -> &'static str {
    if actual < expected {
        "truncated"
    } else {
        "too large"
    }
}

/// Builds a `map_err` closure for an I/O failure on `path`.
pub(crate) fn io_err(
    action: &'static str,
    path: impl Into<PathBuf>,
) -> impl FnOnce(io::Error) -> StoreError {
    let path = path.into();
    move |source| StoreError::Io {
        action,
        path,
        source,
    }
}
