//! The one error type of this crate. Every message names the thing that went
//! wrong (the registry, the blob, the file, the tar entry) and, where the user
//! can act, what to do about it.

use std::io;
use std::path::PathBuf;

use crate::digest::Digest;

/// Result with [`OciError`] as the default error.
pub type Result<T, E = OciError> = std::result::Result<T, E>;

/// Everything that can go wrong while talking to a registry, moving file sets
/// or unpacking images.
#[derive(Debug, thiserror::Error)]
pub enum OciError {
    #[error("invalid image reference `{reference}`: {reason}; write it as HOST[:PORT]/REPO[:TAG][@sha256:HEX]")]
    InvalidReference { reference: String, reason: String },

    #[error("invalid digest `{digest}`: {reason}")]
    InvalidDigest { digest: String, reason: String },

    #[error("invalid image source `{source_text}`: {reason}; use REF, oci-archive:PATH, docker-archive:PATH or oci-layout:DIR")]
    InvalidSource { source_text: String, reason: String },

    #[error("cannot reach registry {registry} ({url}): {source}; check the address, that the registry runs, and --insecure for a plain-HTTP registry")]
    Connect {
        registry: String,
        url: String,
        #[source]
        source: reqwest::Error,
    },

    #[error("registry {registry} answered {status} to {action} ({url}): {body}")]
    Status {
        registry: String,
        action: String,
        url: String,
        status: u16,
        body: String,
    },

    #[error("registry {registry} asks for credentials and none are configured: log in with `docker login {registry}` (or add `auths` for it to $DOCKER_CONFIG/config.json)")]
    NoCredentials { registry: String },

    #[error("registry {registry} refused the credentials{user}: {detail}; check them with `docker login {registry}`", user = username.as_ref().map(|u| format!(" of `{u}`")).unwrap_or_default())]
    Unauthorized {
        registry: String,
        username: Option<String>,
        detail: String,
    },

    #[error("token server {realm} did not give a token: {reason}")]
    Token { realm: String, reason: String },

    #[error("Docker config {}: {reason}", path.display())]
    DockerConfig { path: PathBuf, reason: String },

    #[error("{what} {digest} is corrupt: expected {expected} bytes, got {actual}; the registry or the archive holds a damaged or truncated copy")]
    SizeMismatch {
        what: String,
        digest: Digest,
        expected: u64,
        actual: u64,
    },

    #[error("{what} {digest} is corrupt: its content hashes to {actual}; the registry or the archive holds a damaged copy")]
    DigestMismatch {
        what: String,
        digest: Digest,
        actual: Digest,
    },

    #[error("{what} is larger than the {limit} bytes forkd accepts")]
    TooLarge { what: String, limit: u64 },

    #[error("{what} is not valid: {reason}")]
    BadDocument { what: String, reason: String },

    #[error("{what} has media type `{media_type}`, which forkd does not handle here")]
    UnsupportedMediaType { what: String, media_type: String },

    #[error("image {reference} has no linux/amd64 manifest (it has: {available})")]
    NoPlatform {
        reference: String,
        available: String,
    },

    #[error("image {reference} is not a forkd file set (artifact type `{found}`, expected `{expected}`)")]
    WrongArtifact {
        reference: String,
        found: String,
        expected: String,
    },

    #[error("file name `{name}` is not allowed in a file set: {reason}")]
    InvalidFileName { name: String, reason: &'static str },

    #[error("{layer}: tar entry `{entry}` is refused: {reason}")]
    UnsafeEntry {
        layer: String,
        entry: String,
        reason: String,
    },

    #[error("{layer}: cannot unpack `{entry}`: {source}")]
    Unpack {
        layer: String,
        entry: String,
        #[source]
        source: io::Error,
    },

    #[error("archive {}: {reason}", path.display())]
    Archive { path: PathBuf, reason: String },

    #[error("cannot {action} {}: {source}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

impl OciError {
    /// A closure for `map_err` that wraps an I/O error with what was done to which path.
    pub(crate) fn io(
        action: &'static str,
        path: impl Into<PathBuf>,
    ) -> impl FnOnce(io::Error) -> Self {
        let path = path.into();
        move |source| OciError::Io {
            action,
            path,
            source,
        }
    }

    pub(crate) fn bad(what: impl Into<String>, reason: impl ToString) -> Self {
        OciError::BadDocument {
            what: what.into(),
            reason: reason.to_string(),
        }
    }
}
