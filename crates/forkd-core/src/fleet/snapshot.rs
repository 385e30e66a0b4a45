//! Full snapshots: pause, freeze the disk, save the device state, copy the
//! RAM file, resume, publish. The pause grows with the memory the guest has
//! touched; [`crate::branch`] is the live alternative.

use std::time::Instant;

use forkd_ops::{BranchMode, BranchOutcome, Snapshot, SnapshotStatus};
use forkd_store::Manifest;
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
        let vm = self.control(id)?;
        // The RAM file, or QEMU's hugetlb memfd read through /proc.
        let ram = vm.guest_ram_file()?.ok_or(CoreError::NoFullSnapshot {
            id: id.into(),
            reason: "its RAM is not in a file",
        })?;
        let staging = self.store.stage(tag)?;
        // Everything that can happen while the guest runs happens first: the
        // new overlay is created and attached before the pause.
        let disk = if config.vm.disks.is_empty() {
            None
        } else {
            let next = vm.run_dir().join(format!("root-{}.qcow2", unix_now_ns()));
            Some(vm.prepare_disk_snapshot(0, &next)?)
        };
        let ram_copy = staging.path().join(RAM_IMAGE);
        let stopped = vm.stopped_snapshot(&staging.path().join(DEVICE_STATE), disk, || {
            crate::files::copy_sparse(&ram, &ram_copy).map_err(|e| forkd_vm::VmError::Migration {
                what: "copying guest RAM",
                reason: e.to_string(),
            })
        })?;
        if let Some(frozen) = &stopped.frozen_disk {
            // Read-only from now on (QEMU writes only the new overlay).
            crate::files::copy_sparse(frozen, &staging.path().join(DISK_IMAGE))
                .map_err(CoreError::host("copying the frozen disk", frozen))?;
        }
        let pause_ms = Snapshot::pause_to_us(stopped.pause.as_secs_f64() * 1000.0);
        let manifest = Manifest {
            format: forkd_store::MANIFEST_FORMAT,
            tag: tag.to_string(),
            created_at: forkd_store::unix_now(),
            parent: row.snapshot.clone(),
            source_sandbox: Some(id.to_string()),
            pause_ms,
            ram_parent: None,
            machine: serde_json::to_value(&config).expect("config serialises"),
            files: vec![],
        };
        let manifest = staging.publish(manifest)?;
        let snapshot_row = forkd_store::SnapshotRow {
            tag: tag.to_string(),
            status: SnapshotStatus::Ready,
            dir: self.store.dir(tag),
            parent: row.snapshot.clone(),
            source: Some(id.to_string()),
            created_at: manifest.created_at,
            pause_ms: Some(pause_ms),
            error: None,
        };
        self.db().insert_snapshot(&snapshot_row)?;
        Ok(BranchOutcome {
            snapshot: super::info::snapshot_view(&snapshot_row),
            mode: BranchMode::Full,
            pause_ms,
            qemu_downtime_ms: None,
            ready_ms: Some(t_start.elapsed().as_secs_f64() * 1000.0),
            ram_copied: Some(stopped.copied),
        })
    }
}
