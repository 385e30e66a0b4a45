//! Stored disks that never depend on a run directory.
//!
//! A sandbox's disk is a chain of qcow2 overlays in its run directory: each
//! snapshot freezes the top one (it becomes read-only) and the sandbox goes
//! on in a new overlay backed by it. A snapshot stores a copy of the frozen
//! file, whose header names its backing file: for every snapshot but the
//! first of a sandbox, that is a file of the run directory, which `kill`
//! deletes. So before it is published, the copy is rebased onto something
//! that lives in the store or the home:
//!
//! - when the backing file was itself frozen by an earlier snapshot of the
//!   same sandbox that is still `ready`, that snapshot's `disk.qcow2` is a
//!   byte-for-byte copy of it (each manifest records the file it copies,
//!   `disk_from`): only the header changes (`qemu-img rebase -u`), no data
//!   is copied, and the new snapshot is layered on that one (its `parent`,
//!   so `rmi` refuses to delete the one it needs);
//! - otherwise (that snapshot failed or was deleted), the copy is rebased
//!   onto the nearest file below that is stored (an older snapshot's disk,
//!   or the base image in the home, which is named by its contents), and
//!   qemu-img copies what differs into it.
//!
//! Snapshots made before this existed may still name a run-directory file;
//! [`Fleet::release_run_dir`] makes them independent the same way before
//! `kill` deletes it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use forkd_ops::SnapshotStatus;
use forkd_store::SandboxRow;

use super::{Fleet, DISK_IMAGE};
use crate::CoreError;

impl Fleet {
    /// Makes `copy` (the stored copy of a disk file that sandbox `source`
    /// froze, with `run_dir` its run directory) depend on nothing in the
    /// run directory. Returns the snapshot whose disk backs it now, if one
    /// does: the snapshot it is layered on.
    pub(crate) fn detach_disk(
        &self,
        source: &str,
        run_dir: &Path,
        copy: &Path,
    ) -> Result<Option<String>, CoreError> {
        let chain = forkd_vm::disk::backing_chain(copy).map_err(CoreError::DiskImage)?;
        let Some(first) = chain.first() else {
            return Ok(None);
        };
        // Which run-directory files a ready snapshot of this source holds.
        let mut stored: HashMap<PathBuf, String> = HashMap::new();
        for row in self.db().snapshots_from_source(source)? {
            if row.status != SnapshotStatus::Ready {
                continue;
            }
            if let Ok(m) = self.store.load(&row.tag) {
                if let Some(from) = m.disk_from {
                    stored.insert(PathBuf::from(from), row.tag);
                }
            }
        }
        let mut target = None;
        for (i, file) in chain.iter().enumerate() {
            if !file.starts_with(run_dir) {
                target = Some((i, file.clone(), self.snapshot_of_disk(file)));
                break;
            }
            if let Some(tag) = stored.get(file) {
                let disk = self.store.dir(tag).join(DISK_IMAGE);
                target = Some((i, disk, Some(tag.clone())));
                break;
            }
        }
        let Some((i, new_backing, layered_on)) = target else {
            return Err(CoreError::DiskImage(format!(
                "the disk chain of {} never leaves {}",
                copy.display(),
                run_dir.display()
            )));
        };
        if i == 0 && &new_backing == first {
            return Ok(layered_on); // already outside the run directory
        }
        let format = forkd_vm::disk::format_of(&new_backing);
        // The immediate backing file has a stored twin: same data, so only
        // the header changes. Anything deeper: copy what differs.
        forkd_vm::disk::rebase(copy, &new_backing, format, i > 0).map_err(CoreError::DiskImage)?;
        Ok(layered_on)
    }

    /// The snapshot whose `disk.qcow2` is `file`, if it is one.
    pub(super) fn snapshot_of_disk(&self, file: &Path) -> Option<String> {
        if file.file_name()? != DISK_IMAGE {
            return None;
        }
        let dir = file.parent()?;
        if dir.parent()? != self.store.root() {
            return None;
        }
        Some(dir.file_name()?.to_string_lossy().into_owned())
    }

    /// Before sandbox `row`'s run directory goes: makes every ready
    /// snapshot whose disk still names one of its files (made before stored
    /// disks were self-contained) independent of it, oldest first.
    pub(super) fn release_run_dir(&self, row: &SandboxRow) -> Result<(), CoreError> {
        if !row.run_dir.starts_with(self.sandboxes_dir()) || !row.run_dir.exists() {
            return Ok(());
        }
        let mut needing = Vec::new();
        for s in self.db().snapshots_from_source(&row.id)? {
            if s.status != SnapshotStatus::Ready {
                continue;
            }
            let disk = s.dir.join(DISK_IMAGE);
            let Ok(chain) = forkd_vm::disk::backing_chain(&disk) else {
                continue;
            };
            if chain.iter().any(|f| f.starts_with(&row.run_dir)) {
                needing.push(s.tag);
            }
        }
        let mut failed = Vec::new();
        let mut reason = String::new();
        for tag in &needing {
            if let Err(e) = self.repair_disk(&row.id, &row.run_dir, tag) {
                failed.push(tag.clone());
                reason = e.to_string();
            }
        }
        if failed.is_empty() {
            return Ok(());
        }
        Err(CoreError::RunDirNeeded {
            id: row.id.clone(),
            tags: failed,
            reason,
        })
    }

    /// Rebases snapshot `tag`'s stored disk off run directory `run_dir`
    /// (of sandbox `source`), through a copy renamed over it, and records
    /// the new file in the manifest.
    pub(crate) fn repair_disk(
        &self,
        source: &str,
        run_dir: &Path,
        tag: &str,
    ) -> Result<(), CoreError> {
        let dir = self.store.dir(tag);
        let disk = dir.join(DISK_IMAGE);
        let tmp = dir.join(format!(".{DISK_IMAGE}.repair"));
        let _ = std::fs::remove_file(&tmp);
        crate::files::copy_sparse(&disk, &tmp).map_err(CoreError::host("copying", &disk))?;
        let done = self
            .detach_disk(source, run_dir, &tmp)
            .and_then(|_| Ok(self.store.replace_file(tag, DISK_IMAGE, &tmp)?));
        if done.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        done.map(drop)
    }
}
