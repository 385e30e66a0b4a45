//! Full snapshots: pause, freeze the disk, save the device state, copy the
//! RAM file, resume, publish. The pause grows with the memory the guest has
//! touched; [`crate::branch`] is the live alternative.
//!
//! The tag is claimed in the database (`writing`) before anything is
//! written, so that a taken tag is refused before the copy and a failed
//! one is reused; the row and the published directory change together.

use std::time::Instant;

use forkd_ops::{BranchMode, BranchOutcome, Snapshot, SnapshotStatus};
use forkd_store::{Manifest, SnapshotRow};
use forkd_vm::MemoryBackend;

use super::{unix_now_ns, Fleet, DEVICE_STATE, DISK_IMAGE, RAM_IMAGE};
use crate::CoreError;

impl Fleet {
    /// Snapshots running sandbox `id` under `tag` with the guest stopped for
    /// the copy, and publishes it.
    pub fn snapshot(&self, id: &str, tag: &str) -> Result<BranchOutcome, CoreError> {
        forkd_store::validate_tag(tag)?;
        let t_start = Instant::now();
        let (row, config) = self.sandbox(id)?;
        if !matches!(config.vm.memory, MemoryBackend::SharedFile(_)) {
            return Err(CoreError::NoFullSnapshot {
                id: id.into(),
                reason: "it maps its RAM from a snapshot image",
            });
        }
        let _one_at_a_time = self.branch_lock(id, &row.run_dir)?;
        let vm = self.control(id)?;
        // The RAM file, or QEMU's hugetlb memfd read through /proc.
        let ram = vm.guest_ram_file()?.ok_or(CoreError::NoFullSnapshot {
            id: id.into(),
            reason: "its RAM is not in a file",
        })?;
        let _writing = self.claim_tag(tag, id, row.snapshot.as_deref())?;
        let written = (|| {
            let staging = self.store.stage(tag)?;
            // Everything that can happen while the guest runs happens first:
            // the new overlay is created and attached before the pause.
            let disk = if config.vm.disks.is_empty() {
                None
            } else {
                let next = vm.run_dir().join(format!("root-{}.qcow2", unix_now_ns()));
                Some(vm.prepare_disk_snapshot(0, &next)?)
            };
            let ram_copy = staging.path().join(RAM_IMAGE);
            let stopped = vm.stopped_snapshot(&staging.path().join(DEVICE_STATE), disk, || {
                crate::files::copy_sparse(&ram, &ram_copy).map_err(|e| {
                    forkd_vm::VmError::Migration {
                        what: "copying guest RAM",
                        reason: e.to_string(),
                    }
                })
            })?;
            let mut parent = row.snapshot.clone();
            if let Some(frozen) = &stopped.frozen_disk {
                // Read-only from now on (QEMU writes only the new overlay).
                let copy = staging.path().join(DISK_IMAGE);
                crate::files::copy_sparse(frozen, &copy)
                    .map_err(CoreError::host("copying the frozen disk", frozen))?;
                if let Some(below) = self.detach_disk(id, &row.run_dir, &copy)? {
                    parent = Some(below);
                }
            }
            let pause_ms = Snapshot::pause_to_us(stopped.pause.as_secs_f64() * 1000.0);
            let manifest = Manifest {
                format: forkd_store::MANIFEST_FORMAT,
                tag: tag.to_string(),
                created_at: forkd_store::unix_now(),
                parent: parent.clone(),
                source_sandbox: Some(id.to_string()),
                pause_ms,
                ram_parent: None,
                disk_from: stopped
                    .frozen_disk
                    .as_ref()
                    .map(|p| p.to_string_lossy().into_owned()),
                machine: serde_json::to_value(&config).expect("config serialises"),
                files: vec![],
                origin: None,
            };
            staging.publish(manifest)?;
            Ok::<_, CoreError>((pause_ms, parent, stopped.copied))
        })();
        let (pause_ms, parent, copied) = match written {
            Ok(w) => w,
            Err(e) => {
                let _ = self.db().transition_snapshot(
                    tag,
                    SnapshotStatus::Writing,
                    SnapshotStatus::Failed,
                    Some(&e.to_string()),
                );
                return Err(e);
            }
        };
        {
            let db = self.db();
            db.set_snapshot_pause(tag, pause_ms)?;
            db.set_snapshot_parent(tag, parent.as_deref())?;
            db.set_snapshot_status(tag, SnapshotStatus::Ready, None)?;
        }
        Ok(BranchOutcome {
            snapshot: self.snapshot_view_of(tag)?,
            mode: BranchMode::Full,
            pause_ms,
            qemu_downtime_ms: None,
            ready_ms: Some(t_start.elapsed().as_secs_f64() * 1000.0),
            ram_copied: Some(copied),
        })
    }

    /// Claims `tag` for a snapshot of sandbox `source` about to be written:
    /// a `writing` row (replacing a `failed` one, whose leftovers go), and
    /// the writer lock that tells recovery someone is writing it. Refused
    /// at once when the tag is taken.
    pub(crate) fn claim_tag(
        &self,
        tag: &str,
        source: &str,
        parent: Option<&str>,
    ) -> Result<std::fs::File, CoreError> {
        self.claim_row(&SnapshotRow {
            tag: tag.to_string(),
            status: SnapshotStatus::Writing,
            dir: self.store.dir(tag),
            parent: parent.map(str::to_string),
            source: Some(source.to_string()),
            created_at: forkd_store::unix_now(),
            pause_ms: None,
            error: None,
        })
    }

    /// [`Fleet::claim_tag`] for any writer of a snapshot (a pull has no
    /// source sandbox): `row` (status `writing`) is recorded under the
    /// writer lock, which is returned held.
    pub(crate) fn claim_row(&self, row: &SnapshotRow) -> Result<std::fs::File, CoreError> {
        let tag = row.tag.as_str();
        let lock = crate::branch::writer_lock(&self.env.runtime, tag);
        let lock_dir = lock.parent().expect("has a parent");
        std::fs::create_dir_all(lock_dir).map_err(CoreError::host("creating", lock_dir))?;
        let held = super::lock_file(&lock).map_err(|_| {
            CoreError::Store(forkd_store::StoreError::SnapshotExists { tag: tag.into() })
        })?;
        let replaced = self
            .db
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .claim_snapshot(row)?;
        if replaced.is_some() || self.store.exists(tag) {
            // What a failed snapshot (or an older forkd) left under the tag.
            self.store.remove_if_present(tag)?;
            self.db().forget_verified_under(&self.store.dir(tag))?;
        }
        Ok(held)
    }

    pub(crate) fn snapshot_view_of(&self, tag: &str) -> Result<Snapshot, CoreError> {
        let row = self
            .db()
            .get_snapshot(tag)?
            .ok_or_else(|| CoreError::NoSnapshot { tag: tag.into() })?;
        Ok(super::snapshot_view(&row))
    }
}
