//! Deleting snapshots: refused while something depends on them unless
//! forced, recursive with `cascade`, and taking the warm pool with them.

use forkd_ops::{RemoveSnapshot, SandboxState};

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
        forkd_store::validate_tag(tag)?;
        let exists = self.db().get_snapshot(tag)?.is_some() || self.store.exists(tag);
        if !exists {
            return Err(CoreError::NoSnapshot { tag: tag.into() });
        }
        let mut removed = Vec::new();
        if opts.cascade {
            let children = self.db().children_of(tag)?;
            for child in children {
                removed.extend(self.remove_snapshot(&child, opts)?);
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
        self.store.remove(tag)?;
        let _ = std::fs::remove_file(self.env.runtime.join("images").join(format!("{tag}.ram")));
        let db = self.db();
        db.delete_snapshot_row(tag)?;
        db.forget_verified_under(&self.store.dir(tag))?;
        removed.push(tag.to_string());
        Ok(removed)
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
}
