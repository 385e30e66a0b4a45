//! Persistent state of forkd: the SQLite state database shared by the CLI and the
//! daemon ([`Db`]), and the on-disk snapshot store ([`Store`]) with its manifests,
//! atomic publication, content verification and deletion policy.
//!
//! This crate only deals with files and rows. It must never start QEMU, talk to a
//! VM, or decide *when* something happens; callers (`forkd-core`) do that and use
//! these types to record and check what happened.

mod db;
mod error;
mod hash;
mod store;

pub use db::{Db, SandboxRow, SnapshotRow, SCHEMA_VERSION};
pub use error::{Result, StoreError};
pub use forkd_ops::{validate_tag, SandboxState, SnapshotStatus};
pub use hash::hash_file;
pub use store::{FileEntry, Manifest, Staging, Store, VerifyStats, MANIFEST_FORMAT};

/// What still depends on snapshot `tag` and so blocks its deletion: live
/// sandboxes spawned from it (any state but dead) and snapshots layered on
/// it. Empty means it may go.
pub fn dependents(db: &Db, tag: &str) -> Result<forkd_ops::Dependents> {
    Ok(forkd_ops::Dependents {
        sandboxes: db
            .sandboxes_from_snapshot(tag)?
            .into_iter()
            .filter(|sandbox| sandbox.state != SandboxState::Dead)
            .map(|sandbox| sandbox.id)
            .collect(),
        snapshots: db.children_of(tag)?,
    })
}

/// Current time as unix seconds, the unit of every `created_at` in this crate.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod policy_tests {
    use super::*;
    use std::path::PathBuf;

    #[test]
    fn dependents_are_live_sandboxes_and_child_snapshots() {
        let tmp = tempfile::tempdir().unwrap();
        let db = Db::open(&tmp.path().join("forkd.db")).unwrap();
        let snap = |tag: &str, parent: Option<&str>| SnapshotRow {
            tag: tag.into(),
            status: SnapshotStatus::Ready,
            dir: PathBuf::from("/s").join(tag),
            parent: parent.map(Into::into),
            source: None,
            created_at: 1,
            pause_ms: Some(3.0),
            error: None,
        };
        let sandbox = |id: &str, state: SandboxState, from: &str| SandboxRow {
            id: id.into(),
            state,
            pid: 1,
            pid_start: 1,
            run_dir: PathBuf::from("/run").join(id),
            snapshot: Some(from.into()),
            config: serde_json::json!({}),
            created_at: 1,
        };
        db.insert_snapshot(&snap("base", None)).unwrap();
        db.insert_snapshot(&snap("leaf", Some("base"))).unwrap();
        assert!(dependents(&db, "leaf").unwrap().is_empty());

        db.insert_sandbox(&sandbox("a", SandboxState::Running, "base"))
            .unwrap();
        db.insert_sandbox(&sandbox("b", SandboxState::Pooled, "base"))
            .unwrap();
        db.insert_sandbox(&sandbox("c", SandboxState::Dead, "base"))
            .unwrap();
        db.insert_sandbox(&sandbox("d", SandboxState::Running, "leaf"))
            .unwrap();
        let base = dependents(&db, "base").unwrap();
        assert_eq!(
            (base.sandboxes, base.snapshots),
            (vec!["a".to_string(), "b".into()], vec!["leaf".to_string()])
        );
        assert_eq!(dependents(&db, "leaf").unwrap().sandboxes, ["d"]);
        assert!(dependents(&db, "unknown").unwrap().is_empty());
    }
}
