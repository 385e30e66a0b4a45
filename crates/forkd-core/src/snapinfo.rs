//! What one snapshot is made of: files and their real sizes, the chain of
//! parents, what depends on it, and whether its RAM is a diff layer.

use std::os::unix::fs::MetadataExt;

use forkd_store::{SnapshotRow, SnapshotStatus};
use serde::Serialize;

use crate::fleet::{Fleet, RAM_IMAGE};
use crate::ramimage::{LayerMap, LAYER_MAP};
use crate::CoreError;

/// One file of a snapshot.
#[derive(Debug, Clone, Serialize)]
pub struct FileDetail {
    pub name: String,
    /// Apparent size (a RAM image is the size of guest RAM).
    pub size: u64,
    /// Bytes it really occupies (RAM images and disks are sparse).
    pub allocated: u64,
}

/// Everything `forkd info` shows about a snapshot.
#[derive(Debug, Clone, Serialize)]
pub struct SnapshotDetail {
    #[serde(flatten)]
    pub row: SnapshotRow,
    /// Parent, grandparent, … up to the root of the chain.
    pub chain: Vec<String>,
    /// Snapshots layered on this one and live sandboxes spawned from it.
    pub dependents: Vec<String>,
    /// `full` or `layer` (only the pages differing from `ram_parent`).
    pub ram: &'static str,
    pub ram_parent: Option<String>,
    /// Pages held by a RAM layer.
    pub layer_pages: Option<u64>,
    pub files: Vec<FileDetail>,
    /// Sum of `allocated` over the files.
    pub allocated: u64,
    /// Ready and with a readable manifest: children can be spawned from it.
    pub bootable: bool,
}

impl Fleet {
    /// Describes snapshot `tag` without verifying its contents.
    pub fn snapshot_detail(&self, tag: &str) -> Result<SnapshotDetail, CoreError> {
        forkd_store::validate_tag(tag)?;
        let row = self.db().get_snapshot(tag)?.ok_or_else(|| {
            CoreError::NotFound(format!("no snapshot `{tag}`; `forkd snapshots` lists them"))
        })?;
        let mut chain = Vec::new();
        let mut next = row.parent.clone();
        while let Some(p) = next {
            if chain.contains(&p) || chain.len() > 1000 {
                break; // a cycle would be a corrupt database; do not loop
            }
            next = self.db().get_snapshot(&p)?.and_then(|r| r.parent);
            chain.push(p);
        }
        let dependents = forkd_store::deletion_blockers(&self.db(), tag)?;
        let manifest = if row.status == SnapshotStatus::Ready {
            self.store().load(tag).ok()
        } else {
            None
        };
        let mut files = Vec::new();
        if let Ok(dir) = std::fs::read_dir(&row.dir) {
            for e in dir.flatten() {
                if let Ok(m) = e.metadata() {
                    if m.is_file() {
                        files.push(FileDetail {
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
            chain,
            dependents,
            ram: if ram_parent.is_some() {
                "layer"
            } else {
                "full"
            },
            layer_pages,
            allocated: files.iter().map(|f| f.allocated).sum(),
            files,
            bootable: manifest.is_some(),
            ram_parent,
            row,
        })
    }
}
