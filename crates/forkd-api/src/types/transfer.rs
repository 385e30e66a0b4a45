//! Wire types of the registry routes: push and pull requests, and the NDJSON
//! lines that report their progress and end with the outcome or the error.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::error::ErrorBody;

/// `POST /v1/snapshots/{tag}/push`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PushRequest {
    /// `host[:port]/repository[:tag]`.
    pub reference: String,
    /// Plain HTTP to the registry (loopback registries); HTTPS otherwise.
    #[serde(default)]
    pub insecure: bool,
}

/// `POST /v1/snapshots/pull`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PullRequest {
    /// `host[:port]/repository[:tag]`.
    pub reference: String,
    /// Local tag of the pulled snapshot (default: its tag where pushed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tag: Option<String>,
    /// Plain HTTP (loopback registries); HTTPS otherwise.
    #[serde(default)]
    pub insecure: bool,
}

/// Counts of a transfer so far.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct TransferCounts {
    /// Logical bytes of every file moved.
    pub total_bytes: u64,
    /// Logical bytes handled so far.
    pub done_bytes: u64,
    /// Bytes in holes and zero runs (never sent).
    pub zero_bytes: u64,
    /// Chunks sent or downloaded.
    pub chunks_transferred: u64,
    /// Compressed bytes that crossed the network.
    pub bytes_transferred: u64,
    /// Chunks not sent: the registry or this host had them.
    pub chunks_reused: u64,
    /// Raw bytes of the reused chunks.
    pub raw_bytes_reused: u64,
    /// Bytes of indexes, configs and manifests.
    pub metadata_bytes: u64,
}

/// What a push or pull did.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct TransferResult {
    /// The (local) tag pushed or pulled.
    pub tag: String,
    /// `host[:port]/repository[:tag]`.
    pub reference: String,
    /// Digest of the manifest the reference points to.
    pub digest: String,
    /// Push: every snapshot the artifact carries. Pull: those published.
    pub snapshots: Vec<String>,
    /// Pull: parents this host had already.
    #[serde(default)]
    pub reused: Vec<String>,
    /// The final counts.
    pub counts: TransferCounts,
}

/// One line of a push or pull stream: progress lines, then one line with
/// `result` or `error`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct TransferEvent {
    /// The file being moved.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
    /// The counts so far.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub counts: Option<TransferCounts>,
    /// Last line of a transfer that succeeded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<TransferResult>,
    /// Last line of a transfer that failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorBody>,
}

/// A registry reference: 1 to 1024 characters, no whitespace or control
/// characters (its grammar is checked where it is used).
fn reference(value: &str) -> Result<(), crate::error::ApiError> {
    if value.is_empty()
        || value.len() > 1024
        || value.chars().any(|c| c.is_whitespace() || c.is_control())
    {
        return Err(crate::error::ApiError::field(
            "reference",
            "a reference is 1 to 1024 characters without spaces, like 127.0.0.1:5000/team/agent:v3",
        ));
    }
    Ok(())
}

impl crate::validate::Validate for PushRequest {
    fn validate(&self) -> Result<(), crate::error::ApiError> {
        reference(&self.reference)
    }
}

impl crate::validate::Validate for PullRequest {
    fn validate(&self) -> Result<(), crate::error::ApiError> {
        reference(&self.reference)?;
        match &self.tag {
            Some(t) => crate::validate::tag("tag", t),
            None => Ok(()),
        }
    }
}
