//! Deleting snapshots: refused while something depends on them unless
//! forced, recursive with `cascade`, and taking the warm pool with them.
//! The row decides what exists: a `failed` snapshot (which never had a
//! directory) or a broken one (whose directory may be half gone) is
//! deleted like any other, and a directory no row names is not a snapshot.
//! Pruning deletes every failed and broken snapshot nothing else needs.

use std::collections::HashSet;

use forkd_ops::{KeptSnapshot, Pruned, RemoveSnapshot, SandboxState, SnapshotStatus};

use super::Fleet;
use crate::CoreError;

impl Fleet {
    /// Deletes snapshot `tag` (and, with `cascade`, the snapshots layered on
    /// it first); refuses while sandboxes or snapshots depend on it unless
    /// `force`. Returns the tags deleted, dependents first.
    pub fn remove_snapshot(
        &self,
        tag: &str,
        opts: RemoveSnapshot,
    ) -> Result<Vec<String>, CoreError> {
        let removed = self.remove_snapshot_only(tag, opts)?;
        // The cached images only this snapshot used go with it.
        let _ = self.gc();
        Ok(removed)
    }

    fn remove_snapshot_only(
        &self,
        tag: &str,
        opts: RemoveSnapshot,
    ) -> Result<Vec<String>, CoreError> {
        forkd_store::validate_tag(tag)?;
        let row = self.db().get_snapshot(tag)?;
        let Some(row) = row else {
            return Err(CoreError::NoSnapshot { tag: tag.into() });
        };
        if row.status == SnapshotStatus::Writing {
            return Err(CoreError::SnapshotWriting { tag: tag.into() });
        }
        let mut removed = Vec::new();
        if opts.cascade {
            let children = self.db().children_of(tag)?;
            for child in children {
                removed.extend(self.remove_snapshot_only(&child, opts)?);
            }
        }
        // Sandboxes whose QEMU is gone do not count; the warm pool is ours.
        for s in self.list()? {
            if s.snapshot.as_deref() == Some(tag) && s.state == SandboxState::Pooled {
                self.kill(&s.id)?;
            }
        }
        let dependents = forkd_store::dependents(&self.db(), tag)?;
        if !dependents.is_empty() && !opts.force {
            return Err(CoreError::SnapshotInUse {
                tag: tag.into(),
                dependents,
            });
        }
        self.store.remove_if_present(tag)?;
        let db = self.db();
        db.delete_snapshot_row(tag)?;
        db.forget_verified_under(&self.store.dir(tag))?;
        let _ = std::fs::remove_file(crate::branch::writer_lock(&self.env.runtime, tag));
        removed.push(tag.to_string());
        Ok(removed)
    }

    /// Deletes every failed and broken snapshot that no live sandbox and
    /// no healthy snapshot depends on, dependents first.
    pub fn prune_snapshots(&self) -> Result<Pruned, CoreError> {
        let snapshots = self.snapshots()?;
        let doomed: HashSet<String> = snapshots
            .iter()
            .filter(|s| matches!(s.status, SnapshotStatus::Failed | SnapshotStatus::Broken))
            .map(|s| s.tag.clone())
            .collect();
        let mut out = Pruned::default();
        // Deepest first, so that a broken chain goes child before parent.
        let mut order: Vec<(usize, String)> = doomed
            .iter()
            .map(|t| (self.chain(t).map(|c| c.len()).unwrap_or(0), t.clone()))
            .collect();
        order.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
        for (_, tag) in order {
            // Failed and broken dependents went first; what is left blocks.
            let blocking = forkd_store::dependents(&self.db(), &tag)?;
            if !blocking.is_empty() {
                out.kept.push(KeptSnapshot {
                    tag,
                    dependents: blocking,
                });
                continue;
            }
            out.removed.extend(self.remove_snapshot_only(
                &tag,
                RemoveSnapshot {
                    force: false,
                    cascade: false,
                },
            )?);
        }
        out.kept.sort_by(|a, b| a.tag.cmp(&b.tag));
        let _ = self.gc();
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{fleet, snapshot};
    use super::*;

    #[test]
    fn a_snapshot_with_dependents_goes_only_with_cascade_or_force() {
        let (_tmp, f) = fleet();
        snapshot(&f, "root", None);
        snapshot(&f, "mid", Some("root"));
        snapshot(&f, "leaf", Some("mid"));
        let e = f
            .remove_snapshot("root", RemoveSnapshot::default())
            .unwrap_err();
        assert!(
            matches!(&e, CoreError::SnapshotInUse { dependents, .. } if dependents.snapshots == ["mid"]),
            "{e}"
        );
        let gone = f
            .remove_snapshot(
                "mid",
                RemoveSnapshot {
                    cascade: true,
                    force: false,
                },
            )
            .unwrap();
        assert_eq!(gone, ["leaf", "mid"]);
        assert!(!f.store().dir("leaf").exists() && !f.store().dir("mid").exists());
        assert_eq!(
            f.remove_snapshot("root", RemoveSnapshot::default())
                .unwrap(),
            ["root"]
        );
        assert!(f.db().list_snapshots().unwrap().is_empty());
        assert!(matches!(
            f.remove_snapshot("root", RemoveSnapshot::default()),
            Err(CoreError::NoSnapshot { .. })
        ));
    }

    #[test]
    fn failed_and_broken_snapshots_are_removed_and_their_tags_freed() {
        let (_tmp, f) = fleet();
        snapshot(&f, "good", None);
        snapshot(&f, "broken", None);
        snapshot(&f, "on-broken", Some("broken"));
        std::fs::remove_dir_all(f.store().dir("broken")).unwrap();
        // A failed row has no directory at all.
        f.db()
            .insert_snapshot(&forkd_store::SnapshotRow {
                tag: "t1".into(),
                status: SnapshotStatus::Failed,
                dir: f.store().dir("t1"),
                parent: None,
                source: None,
                created_at: 1,
                pause_ms: None,
                error: Some("boom".into()),
            })
            .unwrap();
        assert_eq!(
            f.remove_snapshot("t1", RemoveSnapshot::default()).unwrap(),
            ["t1"]
        );
        assert!(f.db().get_snapshot("t1").unwrap().is_none());
        // A directory without a row is not a snapshot.
        std::fs::create_dir_all(f.store().dir("stray")).unwrap();
        assert!(matches!(
            f.remove_snapshot("stray", RemoveSnapshot::default()),
            Err(CoreError::NoSnapshot { .. })
        ));
        let pruned = f.prune_snapshots().unwrap();
        assert_eq!(pruned.removed, ["on-broken", "broken"]);
        assert!(pruned.kept.is_empty());
        let left: Vec<String> = f.snapshots().unwrap().into_iter().map(|s| s.tag).collect();
        assert_eq!(left, ["good"]);
    }
}
