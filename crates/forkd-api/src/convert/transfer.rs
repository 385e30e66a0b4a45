//! Push and pull between the seam and the wire, both directions.

use forkd_ops as ops;

use crate::error::ApiError;
use crate::types as api;

/// A push request on the wire.
pub fn push_to_wire(r: &ops::PushRequest) -> api::PushRequest {
    api::PushRequest {
        reference: r.reference.clone(),
        insecure: r.insecure,
    }
}

/// A push request of snapshot `tag` from the wire.
pub fn push_from_wire(tag: &str, r: api::PushRequest) -> ops::PushRequest {
    ops::PushRequest {
        tag: tag.to_string(),
        reference: r.reference,
        insecure: r.insecure,
    }
}

/// A pull request on the wire.
pub fn pull_to_wire(r: &ops::PullRequest) -> api::PullRequest {
    api::PullRequest {
        reference: r.reference.clone(),
        tag: r.tag.clone(),
        insecure: r.insecure,
    }
}

/// A pull request from the wire.
pub fn pull_from_wire(r: api::PullRequest) -> ops::PullRequest {
    ops::PullRequest {
        reference: r.reference,
        tag: r.tag,
        insecure: r.insecure,
    }
}

/// Transfer counts on the wire.
pub fn counts_to_wire(c: &ops::TransferCounts) -> api::TransferCounts {
    api::TransferCounts {
        total_bytes: c.total_bytes,
        done_bytes: c.done_bytes,
        zero_bytes: c.zero_bytes,
        chunks_transferred: c.chunks_transferred,
        bytes_transferred: c.bytes_transferred,
        chunks_reused: c.chunks_reused,
        raw_bytes_reused: c.raw_bytes_reused,
        metadata_bytes: c.metadata_bytes,
    }
}

/// Transfer counts from the wire.
pub fn counts_from_wire(c: &api::TransferCounts) -> ops::TransferCounts {
    ops::TransferCounts {
        total_bytes: c.total_bytes,
        done_bytes: c.done_bytes,
        zero_bytes: c.zero_bytes,
        chunks_transferred: c.chunks_transferred,
        bytes_transferred: c.bytes_transferred,
        chunks_reused: c.chunks_reused,
        raw_bytes_reused: c.raw_bytes_reused,
        metadata_bytes: c.metadata_bytes,
    }
}

/// A progress line.
pub fn progress_to_wire(p: &ops::TransferProgress) -> api::TransferEvent {
    api::TransferEvent {
        file: Some(p.file.clone()),
        counts: Some(counts_to_wire(&p.counts)),
        result: None,
        error: None,
    }
}

/// A push outcome on the wire.
pub fn pushed_to_wire(o: &ops::PushOutcome) -> api::TransferResult {
    api::TransferResult {
        tag: o.tag.clone(),
        reference: o.reference.clone(),
        digest: o.digest.clone(),
        snapshots: o.snapshots.clone(),
        reused: vec![],
        counts: counts_to_wire(&o.counts),
    }
}

/// A push outcome from the wire.
pub fn pushed_from_wire(r: &api::TransferResult) -> ops::PushOutcome {
    ops::PushOutcome {
        tag: r.tag.clone(),
        reference: r.reference.clone(),
        digest: r.digest.clone(),
        snapshots: r.snapshots.clone(),
        counts: counts_from_wire(&r.counts),
    }
}

/// A pull outcome on the wire.
pub fn pulled_to_wire(o: &ops::PullOutcome) -> api::TransferResult {
    api::TransferResult {
        tag: o.tag.clone(),
        reference: o.reference.clone(),
        digest: o.digest.clone(),
        snapshots: o.published.clone(),
        reused: o.reused.clone(),
        counts: counts_to_wire(&o.counts),
    }
}

/// A pull outcome from the wire.
pub fn pulled_from_wire(r: &api::TransferResult) -> ops::PullOutcome {
    ops::PullOutcome {
        tag: r.tag.clone(),
        reference: r.reference.clone(),
        digest: r.digest.clone(),
        published: r.snapshots.clone(),
        reused: r.reused.clone(),
        counts: counts_from_wire(&r.counts),
    }
}

/// The last line of a stream whose operation failed.
pub fn transfer_error_to_wire(e: &ops::OpError) -> api::TransferEvent {
    api::TransferEvent {
        file: None,
        counts: None,
        result: None,
        error: Some(ApiError::Op(e.clone()).body()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transfers_round_trip() {
        let push = ops::PushRequest {
            tag: "kid".into(),
            reference: "127.0.0.1:5000/a/b:1".into(),
            insecure: true,
        };
        assert_eq!(push_from_wire("kid", push_to_wire(&push)), push);
        let pull = ops::PullRequest {
            reference: "r/a:1".into(),
            tag: Some("x".into()),
            insecure: false,
        };
        assert_eq!(pull_from_wire(pull_to_wire(&pull)), pull);
        let counts = ops::TransferCounts {
            total_bytes: 9,
            done_bytes: 8,
            zero_bytes: 7,
            chunks_transferred: 6,
            bytes_transferred: 5,
            chunks_reused: 4,
            raw_bytes_reused: 3,
            metadata_bytes: 2,
        };
        let pulled = ops::PullOutcome {
            tag: "t".into(),
            reference: "r".into(),
            digest: "sha256:00".into(),
            published: vec!["t".into()],
            reused: vec!["p".into()],
            counts: counts.clone(),
        };
        assert_eq!(pulled_from_wire(&pulled_to_wire(&pulled)), pulled);
        let pushed = ops::PushOutcome {
            tag: "t".into(),
            reference: "r".into(),
            digest: "d".into(),
            snapshots: vec!["t".into(), "p".into()],
            counts,
        };
        assert_eq!(pushed_from_wire(&pushed_to_wire(&pushed)), pushed);
        let e = ops::OpError::no_snapshot("zz");
        let line = transfer_error_to_wire(&e);
        assert_eq!(crate::convert::op_error(500, &line.error.unwrap()), e);
    }
}
