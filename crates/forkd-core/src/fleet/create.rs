//! Booting a sandbox that outlives its caller.

use std::time::Duration;

use forkd_ops::{Sandbox, SandboxState};
use forkd_vm::{Disk, HostProbe, LaunchOptions, MemoryBackend, RunDir, Vm};

use super::{DirGuard, Fleet};
use crate::artifacts::Artifacts;
use crate::sandbox::{new_id, BootOptions};
use crate::CoreError;

impl Fleet {
    /// Boots a detached sandbox and records it; returns it and how long the
    /// boot took (QEMU start until the agent answered).
    pub fn create(
        &self,
        artifacts: &Artifacts,
        image: &str,
        opts: &BootOptions,
    ) -> Result<(Sandbox, Duration), CoreError> {
        let accel =
            forkd_vm::accel::choose(opts.accel, &HostProbe::read()).map_err(CoreError::Accel)?;
        if opts.huge_pages == forkd_vm::HugePages::Hugetlb {
            crate::hugepages::preflight(opts.mem_mib)?;
        }
        let id = new_id("sb");
        let mut run_dir = RunDir::create(&self.sandboxes_dir(), &id)?;
        run_dir.keep();
        let cleanup = DirGuard(run_dir.path().to_path_buf());
        let mut disks = Vec::new();
        if let Some(base) = &artifacts.rootfs {
            let overlay = run_dir.file("root.qcow2");
            forkd_vm::disk::create_overlay(base, "raw", &overlay).map_err(CoreError::DiskImage)?;
            disks.push(Disk { overlay });
        }
        // Shared file on tmpfs: snapshots read RAM from the file instead of
        // streaming it through the migration channel.
        let memory = MemoryBackend::SharedFile(run_dir.file("ram"));
        let config =
            crate::sandbox::boot_config(artifacts, opts, &accel, &run_dir, &id, memory, disks);
        crate::netgw::start(&config, true)?;
        let vm = Vm::launch(
            config.clone(),
            run_dir,
            &LaunchOptions {
                boot_timeout: opts.boot_timeout,
                die_with_parent: false,
                cancel: opts.cancel.clone(),
                restore: None,
            },
        )?;
        let boot = vm.boot_time();
        let (pid, pid_start) = vm.detach();
        self.adopt(pid, pid_start);
        let sandbox = self.record(
            &id,
            pid,
            pid_start,
            &config,
            image,
            &accel,
            None,
            SandboxState::Running,
        )?;
        cleanup.disarm();
        Ok((sandbox, boot))
    }
}
