//! Whether a `ready` snapshot can really spawn, told by cheap checks: its
//! manifest and the size of every file it lists, the kernel and initramfs
//! it was made with, every file below its disk in the backing chain, the
//! health of the snapshot its RAM is a layer over, and the disk of the one
//! its disk is layered on. No contents are read
//! (spawn verifies those). A snapshot that fails one of them is reported
//! `broken`, with why; the database keeps `ready` (the check is repeated
//! each time, so a file put back heals it).

use std::collections::HashMap;

use forkd_ops::SnapshotStatus;

use super::record::SandboxConfig;
use super::{Fleet, DISK_IMAGE};
use crate::CoreError;

/// Why the snapshots checked so far are broken (`None`: healthy).
pub(crate) type Memo = HashMap<String, Option<String>>;

impl Fleet {
    /// Why snapshot `tag` cannot spawn, if a cheap check says so. Only
    /// meaningful for a `ready` row.
    pub(crate) fn broken_reason(&self, tag: &str) -> Result<Option<String>, CoreError> {
        self.broken_reason_memo(tag, &mut Memo::new(), 0)
    }

    pub(crate) fn broken_reason_memo(
        &self,
        tag: &str,
        memo: &mut Memo,
        depth: usize,
    ) -> Result<Option<String>, CoreError> {
        if let Some(known) = memo.get(tag) {
            return Ok(known.clone());
        }
        if depth > 1000 {
            return Ok(Some("its chain of parents loops".into()));
        }
        let why = self.check_one(tag, memo, depth)?;
        memo.insert(tag.to_string(), why.clone());
        Ok(why)
    }

    fn check_one(
        &self,
        tag: &str,
        memo: &mut Memo,
        depth: usize,
    ) -> Result<Option<String>, CoreError> {
        let row = self.db().get_snapshot(tag)?;
        let Some(row) = row else {
            return Ok(Some(format!("snapshot `{tag}` is gone")));
        };
        let manifest = match self.store.check(tag) {
            Ok(m) => m,
            Err(e) => return Ok(Some(e.to_string())),
        };
        if let Ok(config) = serde_json::from_value::<SandboxConfig>(manifest.machine.clone()) {
            for (what, p) in [
                ("kernel", &config.vm.kernel),
                ("initramfs", &config.vm.initramfs),
            ] {
                if !p.is_file() {
                    return Ok(Some(format!(
                        "the {what} it was made with ({}) is gone",
                        p.display()
                    )));
                }
            }
        }
        if manifest.files.iter().any(|f| f.name == DISK_IMAGE) {
            let disk = row.dir.join(DISK_IMAGE);
            match forkd_vm::disk::backing_chain(&disk) {
                Err(e) => return Ok(Some(format!("its disk is unreadable: {e}"))),
                Ok(chain) => {
                    if let Some(gone) = chain.iter().find(|p| !p.exists()) {
                        let whose = if gone.starts_with(self.sandboxes_dir()) {
                            " (a file of the run directory of the sandbox it was taken from)"
                        } else {
                            ""
                        };
                        return Ok(Some(format!(
                            "its disk is backed by {}{whose}, which is gone",
                            gone.display()
                        )));
                    }
                }
            }
        }
        // A RAM layer needs all of the snapshot below (its flat image is
        // made from that snapshot's own chain); a disk layered on another
        // snapshot's needs only that disk, whose chain was checked above.
        let below = row.parent.iter().chain(manifest.ram_parent.iter());
        for parent in below.cloned().collect::<Vec<_>>() {
            let whole = manifest.ram_parent.as_deref() == Some(parent.as_str());
            let status = self.db().get_snapshot(&parent)?.map(|r| r.status);
            let why = match status {
                None => Some(format!("snapshot `{parent}` it is layered on is gone")),
                Some(SnapshotStatus::Ready) if whole => self
                    .broken_reason_memo(&parent, memo, depth + 1)?
                    .map(|w| format!("snapshot `{parent}` it is layered on is broken: {w}")),
                Some(SnapshotStatus::Ready) => self
                    .store
                    .check_files(&parent, &[DISK_IMAGE])
                    .err()
                    .map(|e| format!("the disk of snapshot `{parent}` it is layered on: {e}")),
                Some(s) => Some(format!("snapshot `{parent}` it is layered on is {s}")),
            };
            if why.is_some() {
                return Ok(why);
            }
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{fleet, snapshot};
    use super::*;

    #[test]
    fn a_snapshot_breaks_with_its_files_and_its_parents() {
        let (_tmp, f) = fleet();
        snapshot(&f, "root", None);
        snapshot(&f, "leaf", Some("root"));
        assert_eq!(f.broken_reason("leaf").unwrap(), None);
        std::fs::remove_file(f.store().dir("root").join("device.state")).unwrap();
        assert_eq!(
            f.broken_reason("root").unwrap().unwrap(),
            "snapshot `root` is missing device.state: it is incomplete"
        );
        // Layered on `root` by its disk only (no RAM layer): what `root`
        // lost does not matter to it.
        assert_eq!(f.broken_reason("leaf").unwrap(), None);
        f.db().delete_snapshot_row("root").unwrap();
        assert_eq!(
            f.broken_reason("leaf").unwrap().unwrap(),
            "snapshot `root` it is layered on is gone"
        );
        let listed = f.snapshots().unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].status, SnapshotStatus::Broken);
        assert!(!f.snapshot_detail("leaf").unwrap().bootable);
    }
}
