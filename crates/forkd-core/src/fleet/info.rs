//! What one snapshot is made of: files and their real sizes, the chain of
//! parents, what depends on it, and whether its RAM is a diff layer.

use std::os::unix::fs::MetadataExt;

use forkd_ops::{FileSize, Snapshot, SnapshotDetail, SnapshotStatus};
use forkd_store::SnapshotRow;

use super::{Fleet, RAM_IMAGE};
use crate::ramimage::{LayerMap, LAYER_MAP};
use crate::CoreError;

/// A snapshot row as the seam reports it.
pub(crate) fn snapshot_view(row: &SnapshotRow) -> Snapshot {
    Snapshot {
        tag: row.tag.clone(),
        status: row.status,
        dir: row.dir.clone(),
        parent: row.parent.clone(),
        source: row.source.clone(),
        created_at: row.created_at,
        pause_ms: row.pause_ms.map(Snapshot::pause_to_us),
        error: row.error.clone(),
    }
}

impl Fleet {
    /// Every snapshot, oldest first; a `ready` one that cheap checks find
    /// unable to spawn is reported `broken`, with why.
    pub fn snapshots(&self) -> Result<Vec<Snapshot>, CoreError> {
        let rows = self.db().list_snapshots()?;
        let mut memo = super::integrity::Memo::new();
        let mut out = Vec::with_capacity(rows.len());
        for row in &rows {
            out.push(self.health_view(row, &mut memo)?);
        }
        Ok(out)
    }

    /// A row's view with its health: `broken` (and why) for a `ready` row
    /// that cannot spawn.
    pub(crate) fn health_view(
        &self,
        row: &SnapshotRow,
        memo: &mut super::integrity::Memo,
    ) -> Result<Snapshot, CoreError> {
        let mut view = snapshot_view(row);
        if row.status == SnapshotStatus::Ready {
            if let Some(why) = self.broken_reason_memo(&row.tag, memo, 0)? {
                view.status = SnapshotStatus::Broken;
                view.error = Some(why);
            }
        }
        Ok(view)
    }

    /// The parents of snapshot `tag`: parent, grandparent, … up to the root.
    pub fn chain(&self, tag: &str) -> Result<Vec<String>, CoreError> {
        let mut chain = Vec::new();
        let mut next = self.db().get_snapshot(tag)?.and_then(|r| r.parent);
        while let Some(p) = next {
            if chain.contains(&p) || chain.len() > 1000 {
                break; // a cycle would be a corrupt database; do not loop
            }
            next = self.db().get_snapshot(&p)?.and_then(|r| r.parent);
            chain.push(p);
        }
        Ok(chain)
    }

    /// Describes snapshot `tag` without verifying its contents.
    pub fn snapshot_detail(&self, tag: &str) -> Result<SnapshotDetail, CoreError> {
        forkd_store::validate_tag(tag)?;
        let row = self
            .db()
            .get_snapshot(tag)?
            .ok_or_else(|| CoreError::NoSnapshot { tag: tag.into() })?;
        let chain = self.chain(tag)?;
        let dependents = forkd_store::dependents(&self.db(), tag)?;
        let view = self.health_view(&row, &mut super::integrity::Memo::new())?;
        let manifest = if view.status == SnapshotStatus::Ready {
            self.store().load(tag).ok()
        } else {
            None
        };
        let mut files = Vec::new();
        if let Ok(dir) = std::fs::read_dir(&row.dir) {
            for e in dir.flatten() {
                if let Ok(m) = e.metadata() {
                    if m.is_file() {
                        files.push(FileSize {
                            name: e.file_name().to_string_lossy().into_owned(),
                            size: m.len(),
                            allocated: m.blocks() * 512,
                        });
                    }
                }
            }
        }
        files.sort_by(|a, b| a.name.cmp(&b.name));
        let ram_parent = manifest.as_ref().and_then(|m| m.ram_parent.clone());
        let layer_pages = if ram_parent.is_some() {
            let len = std::fs::metadata(row.dir.join(RAM_IMAGE))
                .map(|m| m.len())
                .unwrap_or(0);
            std::fs::read(row.dir.join(LAYER_MAP))
                .ok()
                .and_then(|b| LayerMap::decode(&b, len).ok())
                .map(|m| m.pages.count())
        } else {
            None
        };
        Ok(SnapshotDetail {
            snapshot: view,
            chain,
            dependents,
            layer_pages,
            allocated: files.iter().map(|f| f.allocated).sum(),
            files,
            network: manifest
                .as_ref()
                .and_then(|m| {
                    serde_json::from_value::<super::record::SandboxConfig>(m.machine.clone()).ok()
                })
                .map(|c| crate::netgw::view(&c.vm)),
            bootable: manifest.is_some(),
            layers: if manifest.is_some() {
                self.layers_of(tag).unwrap_or_default()
            } else {
                forkd_ops::Layers::default()
            },
            ram_parent,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{fleet, snapshot};
    use super::*;

    #[test]
    fn the_chain_runs_from_the_parent_to_the_root_and_survives_a_cycle() {
        let (_tmp, f) = fleet();
        snapshot(&f, "root", None);
        snapshot(&f, "mid", Some("root"));
        snapshot(&f, "leaf", Some("mid"));
        assert_eq!(f.chain("leaf").unwrap(), ["mid", "root"]);
        assert!(f.chain("root").unwrap().is_empty());
        let d = f.snapshot_detail("mid").unwrap();
        assert_eq!(d.chain, ["root"]);
        assert_eq!(d.dependents.snapshots, ["leaf"]);
        assert!(d.bootable && d.files.iter().any(|f| f.name == "device.state"));
        // A corrupt database with a loop must not hang the walk.
        f.db()
            .insert_snapshot(&SnapshotRow {
                tag: "a".into(),
                status: SnapshotStatus::Ready,
                dir: f.store().dir("a"),
                parent: Some("b".into()),
                source: None,
                created_at: 1,
                pause_ms: None,
                error: None,
            })
            .unwrap();
        f.db()
            .insert_snapshot(&SnapshotRow {
                tag: "b".into(),
                status: SnapshotStatus::Ready,
                dir: f.store().dir("b"),
                parent: Some("a".into()),
                source: None,
                created_at: 1,
                pause_ms: None,
                error: None,
            })
            .unwrap();
        assert_eq!(f.chain("a").unwrap(), ["b", "a"]);
    }

    #[test]
    fn an_unknown_or_invalid_tag_is_named() {
        let (_tmp, f) = fleet();
        assert!(matches!(
            f.snapshot_detail("nope"),
            Err(CoreError::NoSnapshot { .. })
        ));
        assert!(matches!(
            f.snapshot_detail("../x"),
            Err(CoreError::InvalidName(_))
        ));
    }
}
