//! Booting a sandbox that outlives its caller: admitted first (runtime
//! tmpfs and committed guest memory), recorded before QEMU starts.

use std::time::Duration;

use forkd_ops::{Sandbox, SandboxState};
use forkd_vm::{Disk, HostProbe, LaunchOptions, MemoryBackend, RunDir, Vm};

use super::{DirGuard, Fleet};
use crate::admission::{self, Need};
use crate::artifacts::Artifacts;
use crate::sandbox::{new_id, BootOptions};
use crate::CoreError;

/// Fault point ([`crate::faultpoint`]): a create holds its huge-page claim,
/// its QEMU does not exist yet.
pub const STOP_AFTER_CLAIM: &str = "create:claimed";

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
        let hugetlb = opts.huge_pages != forkd_vm::HugePages::Off;
        // Its RAM is a file on the runtime tmpfs that grows to the whole
        // guest as it is touched (a hugetlb memfd takes nothing there).
        let admitted = admission::admit(
            &self.env,
            &Need {
                what: "create",
                guests: 1,
                mem_mib: opts.mem_mib,
                tmpfs_bytes: if hugetlb { 0 } else { opts.mem_mib << 20 },
            },
        )?;
        let id = new_id("sb");
        // On-demand huge pages: the pool may grow by this guest's size for
        // as long as its QEMU runs (crate::hugepool).
        let on_demand = opts.huge_pages == forkd_vm::HugePages::HugetlbOnDemand;
        let pages = crate::hugepages::HugePagePool::pages_for(opts.mem_mib);
        if on_demand {
            crate::hugepool::claim(&id, pages)?;
            forkd_vm::faultpoint::reached(STOP_AFTER_CLAIM);
        }
        let claim = ClaimGuard(on_demand.then(|| id.clone()));
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
        let starting = self.begin_sandbox(&id, run_dir.path(), &config, image, &accel, None)?;
        drop(admitted); // the run directory now counts for the next admission
        crate::netgw::start(&config, true)?;
        let vm = Vm::launch(
            config,
            run_dir,
            &LaunchOptions {
                boot_timeout: opts.boot_timeout,
                die_with_parent: false,
                cancel: opts.cancel.clone(),
                restore: None,
                on_spawn: Some(starting.spawn_hook(on_demand.then_some(pages))),
            },
        )
        .map_err(|e| explain_sigbus(e, on_demand, opts.mem_mib))?;
        let boot = vm.boot_time();
        self.adopt(vm.pid(), vm.pid_start());
        if on_demand {
            crate::hugepool::bind(&id, pages, vm.pid(), vm.pid_start())?;
        }
        let sandbox = starting.finish(vm.pid(), vm.pid_start(), SandboxState::Running)?;
        vm.detach();
        cleanup.disarm();
        claim.disarm();
        Ok((sandbox, boot))
    }
}

/// Drops a sandbox's huge-page claim when its create (or spawn) fails.
pub(crate) struct ClaimGuard(pub(crate) Option<String>);

impl ClaimGuard {
    pub(crate) fn disarm(mut self) {
        self.0 = None;
    }
}

impl Drop for ClaimGuard {
    fn drop(&mut self) {
        if let Some(id) = self.0.take() {
            let _ = crate::hugepool::release(&id);
        }
    }
}

/// A QEMU on on-demand huge pages that died of SIGBUS touched a page the
/// host's pool could not give: say so instead of "killed by signal 7".
pub(crate) fn explain_sigbus(e: forkd_vm::VmError, on_demand: bool, mem_mib: u64) -> CoreError {
    match &e {
        forkd_vm::VmError::ExitedDuringBoot { status, .. }
            if on_demand && status.contains("SIGBUS") =>
        {
            CoreError::HugePages(format!(
                "the guest ({mem_mib} MiB on 2 MiB huge pages taken on demand) touched a page the host could not give (QEMU was {status}): free memory ran out in 2 MiB blocks, or another program holds the surplus huge pages; free memory, or run forkd with FORKD_HUGEPAGES=off for 4 KiB pages"
            ))
        }
        _ => e.into(),
    }
}
