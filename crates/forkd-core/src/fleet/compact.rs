//! Compaction: a snapshot whose children are made from a chain of layers
//! (a RAM diff layer over its parent's image, over its grandparent's…; a
//! qcow2 disk backed by its parent's disk, backed by…) rewritten as one
//! RAM image and one qcow2 layer over the base image, with the same
//! contents, so that spawning from it reads one file of each and the
//! snapshots below can be deleted.
//!
//! Atomic as every store write: the new files are built in a staging
//! directory (the flat RAM image children already map, copied; the disk
//! collapsed by qemu-img's safe rebase; the other files hard-linked),
//! checked (the RAM copy must hash to the image it copies, the disk must
//! read the same as the old chain), then swapped with the published
//! directory in one `rename(2)`. The row stays `ready` throughout: a crash
//! at any step leaves the old snapshot or the new one, both whole. The
//! snapshots below are never touched, so everything else layered on them
//! keeps working; snapshots layered on this one keep working too, because
//! what they read through it is unchanged.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use forkd_ops::{ChainSize, Compacted, Layers, SnapshotStatus};
use forkd_store::Manifest;

use super::{Fleet, DISK_IMAGE, RAM_IMAGE};
use crate::faultpoint;
use crate::ramimage::LAYER_MAP;
use crate::CoreError;

/// Fault points a test can stop compaction at ([`crate::faultpoint`]).
pub const STOP_AFTER_RAM: &str = "compact:ram";
pub const STOP_AFTER_DISK: &str = "compact:disk";
pub const STOP_BEFORE_SWAP: &str = "compact:swap";

/// The stored files children of a snapshot are made from.
struct Chain {
    /// Tags whose RAM files are read, the snapshot's own first.
    ram: Vec<String>,
    /// qcow2 files of its disk chain, its own first.
    disk: Vec<PathBuf>,
    /// The snapshots below it in either chain.
    below: Vec<String>,
    bytes: u64,
}

impl Chain {
    fn size(&self) -> ChainSize {
        ChainSize {
            layers: Layers {
                ram: self.ram.len() as u32,
                disk: self.disk.len() as u32,
            },
            bytes: self.bytes,
        }
    }
}

fn allocated(path: &Path) -> u64 {
    std::fs::metadata(path)
        .map(|m| m.blocks() * 512)
        .unwrap_or(0)
}

impl Fleet {
    /// How many RAM and disk layers the children of snapshot `tag` are made
    /// from (what `info` reports).
    pub(crate) fn layers_of(&self, tag: &str) -> Result<Layers, CoreError> {
        Ok(self.layer_chain(tag)?.size().layers)
    }

    fn layer_chain(&self, tag: &str) -> Result<Chain, CoreError> {
        let manifest = self.store.load(tag)?;
        let dir = self.store.dir(tag);
        let mut bytes: u64 = manifest
            .files
            .iter()
            .map(|f| allocated(&dir.join(&f.name)))
            .sum();
        let mut ram = vec![tag.to_string()];
        let mut below = Vec::new();
        let mut next = manifest.ram_parent.clone();
        while let Some(parent) = next {
            if ram.contains(&parent) || ram.len() > 1000 {
                return Err(CoreError::SnapshotUnusable {
                    tag: tag.into(),
                    reason: "its RAM layers loop".into(),
                });
            }
            let m = self.store.load(&parent)?;
            let pdir = self.store.dir(&parent);
            bytes += [RAM_IMAGE, LAYER_MAP]
                .iter()
                .filter(|n| m.files.iter().any(|f| &f.name == *n))
                .map(|n| allocated(&pdir.join(n)))
                .sum::<u64>();
            next = m.ram_parent.clone();
            below.push(parent.clone());
            ram.push(parent);
        }
        let mut disk = Vec::new();
        if manifest.files.iter().any(|f| f.name == DISK_IMAGE) {
            let own = dir.join(DISK_IMAGE);
            let chain = forkd_vm::disk::backing_chain(&own).map_err(CoreError::DiskImage)?;
            disk.push(own);
            for file in chain {
                if !file.exists() {
                    return Err(CoreError::SnapshotUnusable {
                        tag: tag.into(),
                        reason: format!("its disk is backed by {}, which is gone", file.display()),
                    });
                }
                if !forkd_vm::disk::is_qcow2(&file) {
                    break; // the raw base image, shared by everything
                }
                bytes += allocated(&file);
                if let Some(t) = self.snapshot_of_disk(&file) {
                    if !below.contains(&t) {
                        below.push(t);
                    }
                }
                disk.push(file);
            }
        }
        Ok(Chain {
            ram,
            disk,
            below,
            bytes,
        })
    }

    /// Rewrites snapshot `tag` as one RAM image and one disk layer with the
    /// same contents (see the module documentation); a snapshot that is one
    /// of each already is left alone (`compacted: false`).
    pub fn compact(&self, tag: &str) -> Result<Compacted, CoreError> {
        forkd_store::validate_tag(tag)?;
        let row = self
            .db()
            .get_snapshot(tag)?
            .ok_or_else(|| CoreError::NoSnapshot { tag: tag.into() })?;
        match row.status {
            SnapshotStatus::Ready => {}
            SnapshotStatus::Writing => {
                return Err(CoreError::SnapshotWriting { tag: tag.into() });
            }
            status => {
                return Err(CoreError::SnapshotNotReady {
                    tag: tag.into(),
                    status,
                    error: row.error.clone(),
                })
            }
        }
        if let Some(why) = self.broken_reason(tag)? {
            return Err(CoreError::SnapshotBroken {
                tag: tag.into(),
                why,
            });
        }
        // One writer per tag: a branch or another compaction of it waits
        // its turn (the lock `recover` looks at for `writing` rows).
        let lock = crate::branch::writer_lock(&self.env.runtime, tag);
        let lock_dir = lock.parent().expect("has a parent");
        std::fs::create_dir_all(lock_dir).map_err(CoreError::host("creating", lock_dir))?;
        let _held =
            super::lock_file(&lock).map_err(|_| CoreError::SnapshotBusy { tag: tag.into() })?;

        let before = self.layer_chain(tag)?;
        let manifest = self.store.load(tag)?;
        if before.ram.len() <= 1 && before.disk.len() <= 1 {
            // Nothing to do; a row still naming a parent the files no longer
            // need (a compaction that died after its swap) is put right.
            if manifest.parent.is_none() && row.parent.is_some() {
                self.db().set_snapshot_parent(tag, None)?;
            }
            return Ok(Compacted {
                tag: tag.into(),
                compacted: false,
                before: before.size(),
                after: before.size(),
                released: vec![],
            });
        }
        // What is copied must be what was published: checked against the
        // manifest (the verification cache makes this a `stat` when it can).
        self.store.verify(&self.db(), tag)?;

        let staging = self.store.stage_replacement(tag)?;
        let dir = self.store.dir(tag);
        let mut expected = Vec::new();
        // RAM: the flat image children map (made and checked if needed).
        let ram_copy = staging.path().join(RAM_IMAGE);
        if before.ram.len() > 1 {
            let (flat, digest) = self.ram_image_with_digest(tag)?;
            crate::files::copy_sparse(&flat, &ram_copy)
                .map_err(CoreError::host("copying the flat RAM image", &flat))?;
            expected.push((RAM_IMAGE, digest));
        } else {
            link_or_copy(&dir.join(RAM_IMAGE), &ram_copy)?;
        }
        faultpoint::reached(STOP_AFTER_RAM);
        // Disk: the chain collapsed into a copy of the top.
        let disk_copy = staging.path().join(DISK_IMAGE);
        if before.disk.len() > 1 {
            let own = dir.join(DISK_IMAGE);
            crate::files::copy_sparse(&own, &disk_copy)
                .map_err(CoreError::host("copying the disk", &own))?;
            forkd_vm::disk::collapse(&disk_copy).map_err(CoreError::DiskImage)?;
            if !forkd_vm::disk::same_contents(&own, &disk_copy).map_err(CoreError::DiskImage)? {
                return Err(CoreError::DiskImage(format!(
                    "the collapsed disk of snapshot `{tag}` does not read the same as its chain"
                )));
            }
        } else if before.disk.len() == 1 {
            link_or_copy(&dir.join(DISK_IMAGE), &disk_copy)?;
        }
        faultpoint::reached(STOP_AFTER_DISK);
        // Everything else (the device state) is the same file.
        for f in &manifest.files {
            if ![RAM_IMAGE, LAYER_MAP, DISK_IMAGE].contains(&f.name.as_str()) {
                link_or_copy(&dir.join(&f.name), &staging.path().join(&f.name))?;
            }
        }
        let new_manifest = Manifest {
            ram_parent: None,
            // Nothing below is needed any more.
            parent: None,
            files: vec![],
            ..manifest
        };
        faultpoint::reached(STOP_BEFORE_SWAP);
        let expected: Vec<(&str, &str)> = expected.iter().map(|(n, d)| (*n, d.as_str())).collect();
        staging.publish_over(new_manifest, &expected)?;
        {
            let db = self.db();
            db.forget_verified_under(&dir)?;
            db.set_snapshot_parent(tag, None)?;
        }
        let after = self.layer_chain(tag)?;
        Ok(Compacted {
            tag: tag.into(),
            compacted: true,
            before: before.size(),
            after: after.size(),
            released: before.below,
        })
    }
}

/// A second name for a published (read-only from now on) store file, or a
/// sparse copy where a link cannot be made.
fn link_or_copy(from: &Path, to: &Path) -> Result<(), CoreError> {
    if std::fs::hard_link(from, to).is_ok() {
        return Ok(());
    }
    crate::files::copy_sparse(from, to)
        .map(drop)
        .map_err(CoreError::host("copying", from))
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::FileExt;

    use forkd_store::SnapshotRow;

    use super::super::testing::fleet;
    use super::*;
    use crate::ramimage::{LayerMap, PageSet};

    const PAGES: u64 = 256;

    fn qemu_io_write(image: &Path, pattern: u8, offset: u64) {
        let out = std::process::Command::new("qemu-io")
            .args(["-f", "qcow2", "-c"])
            .arg(format!("write -P {pattern} {offset} 64k"))
            .arg(image)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
    }

    /// Publishes `tag`: RAM pages `(page, byte)` (a layer over `below` when
    /// given, else a full image), a disk overlay on `below`'s disk (or on
    /// `base`) with one 64 KiB pattern written at `disk_write`.
    fn layer(
        f: &Fleet,
        tag: &str,
        below: Option<&str>,
        pages: &[(u64, u8)],
        disk_write: (u8, u64),
        base: &Path,
    ) {
        let staging = f.store().stage(tag).unwrap();
        std::fs::write(staging.path().join("device.state"), tag).unwrap();
        let ram = std::fs::File::create(staging.path().join(RAM_IMAGE)).unwrap();
        ram.set_len(PAGES * 4096).unwrap();
        let mut set = PageSet::new(PAGES);
        for (page, byte) in pages {
            ram.write_all_at(&[*byte; 4096], page * 4096).unwrap();
            set.set(*page, true);
        }
        if below.is_some() {
            std::fs::write(
                staging.path().join(LAYER_MAP),
                LayerMap { pages: set }.encode(),
            )
            .unwrap();
        }
        let disk = staging.path().join(DISK_IMAGE);
        match below {
            Some(b) => {
                forkd_vm::disk::create_overlay(&f.store().dir(b).join(DISK_IMAGE), "qcow2", &disk)
            }
            None => forkd_vm::disk::create_overlay(base, "raw", &disk),
        }
        .unwrap();
        qemu_io_write(&disk, disk_write.0, disk_write.1);
        // The overlay names the staging path of `below`'s disk only when
        // `below` is staged; it is published, so the path is final.
        staging
            .publish(Manifest {
                format: forkd_store::MANIFEST_FORMAT,
                tag: tag.into(),
                created_at: 1,
                parent: below.map(Into::into),
                source_sandbox: None,
                pause_ms: 1.0,
                ram_parent: below.map(Into::into),
                disk_from: None,
                machine: serde_json::json!({}),
                files: vec![],
                origin: None,
            })
            .unwrap();
        f.db()
            .insert_snapshot(&SnapshotRow {
                tag: tag.into(),
                status: SnapshotStatus::Ready,
                dir: f.store().dir(tag),
                parent: below.map(Into::into),
                source: None,
                created_at: 1,
                pause_ms: Some(1.0),
                error: None,
            })
            .unwrap();
    }

    fn flat(f: &Fleet, tag: &str) -> Vec<u8> {
        std::fs::read(f.ram_image_of(tag).unwrap()).unwrap()
    }

    #[test]
    fn a_chain_becomes_one_layer_that_spawns_the_same_and_keeps_what_is_below() {
        let (tmp, f) = fleet();
        let base = tmp.path().join("base.raw");
        std::fs::write(&base, vec![0x11u8; 1 << 20]).unwrap();
        layer(&f, "root", None, &[(0, b'A'), (5, b'B')], (1, 0), &base);
        layer(
            &f,
            "mid",
            Some("root"),
            &[(5, b'C'), (7, b'D')],
            (2, 64 << 10),
            &base,
        );
        layer(&f, "leaf", Some("mid"), &[(0, b'E')], (3, 0), &base);
        layer(&f, "kid", Some("leaf"), &[(9, b'F')], (4, 128 << 10), &base);
        let (leaf_ram, kid_ram) = (flat(&f, "leaf"), flat(&f, "kid"));
        assert_eq!(
            (leaf_ram[0], leaf_ram[5 * 4096], leaf_ram[7 * 4096]),
            (b'E', b'C', b'D')
        );
        let leaf_disk = tmp.path().join("leaf-before.qcow2");
        std::fs::hard_link(f.store().dir("leaf").join(DISK_IMAGE), &leaf_disk).unwrap();
        assert_eq!(f.layers_of("leaf").unwrap(), Layers { ram: 3, disk: 3 });

        let c = f.compact("leaf").unwrap();
        assert!(c.compacted);
        assert_eq!(c.before.layers, Layers { ram: 3, disk: 3 });
        assert_eq!(c.after.layers, Layers { ram: 1, disk: 1 });
        assert!(c.before.bytes > 0 && c.after.bytes > 0);
        assert_eq!(c.released, ["mid", "root"]);
        // What spawns from it is the same, and it depends on nothing.
        assert_eq!(flat(&f, "leaf"), leaf_ram);
        let disk = f.store().dir("leaf").join(DISK_IMAGE);
        assert!(forkd_vm::disk::same_contents(&leaf_disk, &disk).unwrap());
        assert_eq!(
            forkd_vm::disk::backing_chain(&disk).unwrap(),
            std::slice::from_ref(&base)
        );
        let m = f.store().verify(&f.db(), "leaf").unwrap();
        assert_eq!((m.ram_parent, m.parent), (None, None));
        assert!(!m.files.iter().any(|x| x.name == LAYER_MAP));
        assert_eq!(f.db().get_snapshot("leaf").unwrap().unwrap().parent, None);
        assert_eq!(
            f.snapshot_detail("leaf").unwrap().layers,
            Layers { ram: 1, disk: 1 }
        );
        // What is below is untouched and healthy; what is above reads the same.
        for tag in ["root", "mid", "leaf", "kid"] {
            assert_eq!(f.broken_reason(tag).unwrap(), None, "{tag}");
        }
        assert_eq!(
            f.store().load("mid").unwrap().ram_parent.as_deref(),
            Some("root")
        );
        assert_eq!(flat(&f, "kid"), kid_ram);
        // Nothing hidden is left in the store.
        assert!(std::fs::read_dir(f.store().root())
            .unwrap()
            .flatten()
            .all(|e| !e.file_name().to_string_lossy().starts_with('.')));
        // `leaf` no longer needs `mid`, and nothing else is layered on it.
        assert_eq!(
            f.remove_snapshot("mid", forkd_ops::RemoveSnapshot::default())
                .unwrap(),
            ["mid"]
        );
        assert_eq!(flat(&f, "leaf"), leaf_ram);

        // Flat already: nothing to do.
        let again = f.compact("leaf").unwrap();
        assert!(!again.compacted);
        assert_eq!(again.before, again.after);
        assert!(!f.compact("root").unwrap().compacted);
        // Bad tags are named.
        assert!(matches!(
            f.compact("nope"),
            Err(CoreError::NoSnapshot { .. })
        ));
        assert!(matches!(f.compact("../x"), Err(CoreError::InvalidName(_))));
    }

    #[test]
    fn a_damaged_layer_is_refused_and_the_snapshot_stays_as_it_was() {
        let (tmp, f) = fleet();
        let base = tmp.path().join("base.raw");
        std::fs::write(&base, vec![0u8; 1 << 20]).unwrap();
        layer(&f, "root", None, &[(0, b'A')], (1, 0), &base);
        layer(&f, "leaf", Some("root"), &[(1, b'B')], (2, 0), &base);
        // Same size, other bytes: only hashing finds it.
        let ram = f.store().dir("leaf").join(RAM_IMAGE);
        std::fs::OpenOptions::new()
            .write(true)
            .open(&ram)
            .unwrap()
            .write_all_at(b"X", 4096)
            .unwrap();
        let e = f.compact("leaf").unwrap_err();
        assert!(e.to_string().contains("corrupt"), "{e}");
        assert_eq!(
            f.store().load("leaf").unwrap().ram_parent.as_deref(),
            Some("root")
        );
    }
}
