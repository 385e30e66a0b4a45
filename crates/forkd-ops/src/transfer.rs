//! Moving snapshots between hosts through an OCI registry: the requests of
//! [`crate::Operations::push`] and [`crate::Operations::pull`], the progress
//! they report as they go, and what they did.

use serde::{Deserialize, Serialize};

/// Push snapshot `tag` (with its chain of parents) to registry reference
/// `reference` (`host[:port]/repository[:tag]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PushRequest {
    pub tag: String,
    pub reference: String,
    /// Speak plain HTTP to the registry (loopback registries in tests and
    /// development); HTTPS otherwise.
    #[serde(default)]
    pub insecure: bool,
}

/// Pull the snapshot at registry reference `reference` into the store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PullRequest {
    pub reference: String,
    /// The local tag of the pulled snapshot (default: the tag it had where
    /// it was pushed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tag: Option<String>,
    #[serde(default)]
    pub insecure: bool,
}

/// Counts of a push or pull so far; cumulative, also the final tally.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransferCounts {
    /// Logical bytes of every file in the artifact.
    pub total_bytes: u64,
    /// Logical bytes handled so far.
    pub done_bytes: u64,
    /// Bytes in holes and zero runs: never stored nor sent.
    pub zero_bytes: u64,
    /// Chunks sent (push) or downloaded (pull).
    pub chunks_transferred: u64,
    /// Compressed bytes of those chunks: what crossed the network.
    pub bytes_transferred: u64,
    /// Chunks not sent: the registry had them (push), or this host did (pull).
    pub chunks_reused: u64,
    /// Raw bytes of the reused chunks.
    pub raw_bytes_reused: u64,
    /// Bytes of indexes, configs and manifests sent or received.
    pub metadata_bytes: u64,
}

/// A progress report of a push or pull.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransferProgress {
    /// The file being moved (`<snapshot>/<file>` or a boot file's name).
    pub file: String,
    pub counts: TransferCounts,
}

/// What a push did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PushOutcome {
    pub tag: String,
    /// The reference pushed to, as written in full.
    pub reference: String,
    /// Digest of the manifest the reference now points to.
    pub digest: String,
    /// The snapshots the artifact carries, the pushed one first, then its
    /// parents down to the root of its chain.
    pub snapshots: Vec<String>,
    pub counts: TransferCounts,
}

/// What a pull did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PullOutcome {
    /// The local tag of the pulled snapshot.
    pub tag: String,
    pub reference: String,
    pub digest: String,
    /// Snapshots this pull published, the pulled one first.
    pub published: Vec<String>,
    /// Parents this host already had (same origin), which were kept.
    pub reused: Vec<String>,
    pub counts: TransferCounts,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pull_request_without_options_reads_as_defaults() {
        let r: PullRequest = serde_json::from_str(r#"{"reference":"r/x:1"}"#).unwrap();
        assert_eq!(
            r,
            PullRequest {
                reference: "r/x:1".into(),
                tag: None,
                insecure: false
            }
        );
    }
}
