//! SPAWN: children of a snapshot, each mapping its RAM image copy-on-write
//! (`MAP_PRIVATE`) with its own qcow2 overlay on the frozen disk, started
//! with `-incoming defer`, loaded with the device state, then made its own
//! (entropy, clock, hostname). The warm pool keeps QEMUs started ahead of
//! time, waiting for a device state.
//!
//! Pure decisions sit apart so that they are tested without a VM: whether a
//! snapshot may be spawned from now ([`readiness`]) and how slots of a
//! fan-out are filled ([`fan_out`]).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use forkd_ops::{Child, PartialFailure, SandboxState, SnapshotStatus};
use forkd_vm::{AccelChoice, Disk, HostProbe, LaunchOptions, MemoryBackend, RunDir, Vm, VmConfig};

use super::record::{child_image, SandboxConfig};
use super::{getrandom, DirGuard, Fleet, DEVICE_STATE, DISK_IMAGE};
use crate::sandbox::new_id;
use crate::CoreError;

/// Whether a snapshot can be spawned from now.
#[derive(Debug, PartialEq)]
pub(crate) enum Readiness {
    Ready,
    /// Still being written: wait and ask again.
    Wait,
}

/// Decides from a snapshot's row whether to spawn, wait, or refuse.
pub(crate) fn readiness(
    tag: &str,
    status: Option<(SnapshotStatus, Option<String>)>,
    wait: bool,
) -> Result<Readiness, CoreError> {
    match status {
        None => Err(CoreError::NoSnapshot { tag: tag.into() }),
        Some((SnapshotStatus::Ready, _)) => Ok(Readiness::Ready),
        Some((SnapshotStatus::Writing, _)) if wait => Ok(Readiness::Wait),
        Some((SnapshotStatus::Writing, _)) => Err(CoreError::SnapshotWriting { tag: tag.into() }),
        Some((status, error)) => Err(CoreError::SnapshotNotReady {
            tag: tag.into(),
            status,
            error,
        }),
    }
}

/// Runs `job` for slots `0..n`, at most `parallel` at a time, calling
/// `done` as each finishes; returns the results in slot order.
pub(crate) fn fan_out<T: Send>(
    n: usize,
    parallel: usize,
    job: &(dyn Fn(usize) -> T + Sync),
    done: &(dyn Fn(usize, &T) + Sync),
) -> Vec<T> {
    let next = AtomicUsize::new(0);
    let results: Mutex<Vec<Option<T>>> = Mutex::new((0..n).map(|_| None).collect());
    std::thread::scope(|s| {
        for _ in 0..parallel.clamp(1, n.max(1)) {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                if i >= n {
                    return;
                }
                let r = job(i);
                done(i, &r);
                results.lock().unwrap_or_else(|p| p.into_inner())[i] = Some(r);
            });
        }
    });
    results
        .into_inner()
        .unwrap_or_else(|p| p.into_inner())
        .into_iter()
        .map(|r| r.expect("every slot is filled"))
        .collect()
}

/// A snapshot checked for spawning.
pub(crate) struct Parent {
    pub(crate) tag: String,
    pub(crate) dir: PathBuf,
    pub(crate) config: SandboxConfig,
    pub(crate) accel: AccelChoice,
    /// The children's config differs from the snapshot's (pool members,
    /// started with the snapshot's, do not fit).
    pub(crate) overridden: bool,
    /// The one child's id, when the caller names it.
    pub(crate) child_id: Option<String>,
    /// The hugetlb copy of the RAM image the children map, when they run on
    /// huge pages; closed once they all have it mapped.
    pub(crate) huge_ram: Option<forkd_vm::hugeram::HugeRam>,
}

/// What children may change of their snapshot's configuration.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ChildOverrides {
    pub network: Option<forkd_ops::Network>,
    pub allow_out: Option<Vec<String>>,
    pub deny_out: Option<Vec<String>>,
    pub memory_limit_mib: Option<u64>,
    pub cpu_quota_pct: Option<u32>,
    /// The id of the one child instead of a fresh one (a pool member has
    /// its own, so such a child is never taken from the pool).
    pub id: Option<String>,
    /// Children map a hugetlb copy of the image ([`forkd_vm::hugeram`]).
    pub huge_pages: bool,
}

impl ChildOverrides {
    pub fn is_empty(&self) -> bool {
        *self == ChildOverrides::default()
    }

    /// Applies the overrides to a snapshot's VM config; the network can be
    /// narrowed or reopened only where the snapshot has a gateway NIC.
    pub(crate) fn apply(&self, tag: &str, vm: &mut VmConfig) -> Result<(), CoreError> {
        let net_changed =
            self.network.is_some() || self.allow_out.is_some() || self.deny_out.is_some();
        if net_changed {
            let refuse = |why: &str| {
                Err(CoreError::BadRequest(format!(
                    "the children of snapshot `{tag}` cannot change their network: {why}"
                )))
            };
            match (vm.network, self.network) {
                (forkd_vm::Network::None, Some(forkd_ops::Network::None)) => {}
                (forkd_vm::Network::None, _) => {
                    return refuse("it has no network device (it was made with network none)")
                }
                (forkd_vm::Network::User, _) => {
                    return refuse("it was made with QEMU's unfiltered user-mode network, which forkd cannot restrict; make the snapshot again")
                }
                (forkd_vm::Network::Gateway, _) => {}
            }
            match self.network {
                Some(forkd_ops::Network::None) => vm.egress.deny_all = true,
                Some(forkd_ops::Network::Default) => vm.egress.deny_all = false,
                Some(forkd_ops::Network::Slirp) => {
                    return refuse("slirp is only ever reported, never asked for")
                }
                None => {}
            }
            if let Some(a) = &self.allow_out {
                vm.egress.allow_out = a.clone();
            }
            if let Some(d) = &self.deny_out {
                vm.egress.deny_out = d.clone();
            }
            crate::netgw::policy_of(&vm.egress)?;
        }
        if let Some(m) = self.memory_limit_mib {
            vm.limits.memory_limit_mib = Some(m);
        }
        if let Some(q) = self.cpu_quota_pct {
            vm.limits.cpu_quota_pct = Some(q);
        }
        Ok(())
    }
}

/// What a pool fill did.
#[derive(Debug, Clone, Copy)]
pub struct PoolFill {
    pub started: usize,
    /// Members waiting after the fill.
    pub ready: usize,
}

impl Fleet {
    /// Starts `n` children of snapshot `tag`, at most `parallel` at a time.
    /// Fails before starting any QEMU if the snapshot is missing, not ready
    /// (waiting while it is being written when `wait`) or corrupt. A child
    /// that fails is cleaned up and reported in its slot; its siblings
    /// finish. With [`PartialFailure::Kill`] any failure kills the children
    /// that started and fails the call.
    pub fn spawn(
        &self,
        tag: &str,
        n: usize,
        parallel: usize,
        wait: bool,
        on_failure: PartialFailure,
        on_child: &(dyn Fn(usize, &Result<Child, CoreError>) + Sync),
    ) -> Result<Vec<Result<Child, CoreError>>, CoreError> {
        let none = ChildOverrides::default();
        self.spawn_with(tag, n, parallel, wait, on_failure, &none, on_child)
    }

    /// [`Fleet::spawn`] with children that differ from their snapshot
    /// (network, limits); such children never come from the warm pool.
    #[allow(clippy::too_many_arguments)]
    pub fn spawn_with(
        &self,
        tag: &str,
        n: usize,
        parallel: usize,
        wait: bool,
        on_failure: PartialFailure,
        overrides: &ChildOverrides,
        on_child: &(dyn Fn(usize, &Result<Child, CoreError>) + Sync),
    ) -> Result<Vec<Result<Child, CoreError>>, CoreError> {
        forkd_store::validate_tag(tag)?;
        if n == 0 {
            return Err(CoreError::BadRequest(
                "a spawn needs at least one child".into(),
            ));
        }
        if let Some(id) = &overrides.id {
            if n != 1 {
                return Err(CoreError::BadRequest(format!(
                    "a spawn that names its child's id ({id}) starts one child, not {n}"
                )));
            }
            forkd_ops::validate_id(id).map_err(|e| CoreError::BadRequest(e.to_string()))?;
            if self.db().get_sandbox(id)?.is_some() {
                return Err(forkd_store::StoreError::SandboxExists { id: id.clone() }.into());
            }
        }
        let mut parent = self.prepare_spawn(tag, wait)?;
        parent.child_id = overrides.id.clone();
        if !overrides.is_empty() {
            overrides.apply(tag, &mut parent.config.vm)?;
            parent.overridden = true;
        }
        // Held until every child has the copy mapped (or failed).
        let _copy_claim = if overrides.huge_pages {
            let (copy, claim) = self.huge_copy(&parent)?;
            parent.huge_ram = Some(copy);
            Some(claim)
        } else {
            None
        };
        let results = fan_out(n, parallel, &|_| self.spawn_one(&parent), on_child);
        if on_failure == PartialFailure::Kill {
            if let Some(i) = results.iter().position(|r| r.is_err()) {
                for c in results.iter().flatten() {
                    let _ = self.kill(&c.sandbox.id);
                }
                return Err(results
                    .into_iter()
                    .nth(i)
                    .and_then(|r| r.err())
                    .expect("slot i failed"));
            }
        }
        Ok(results)
    }

    /// The hugetlb copy of `parent`'s RAM image that children on huge pages
    /// map, with the pool claim that covers it until they have it mapped
    /// (bound to this process: a spawner that dies leaves no claim behind).
    fn huge_copy(
        &self,
        parent: &Parent,
    ) -> Result<(forkd_vm::hugeram::HugeRam, super::create::ClaimGuard), CoreError> {
        if let Some(why) = crate::hugepool::unavailable() {
            return Err(CoreError::HugePages(format!(
                "children on huge pages need forkd to manage the host's huge-page pool, and it cannot: {why}; spawn them on 4 KiB pages (without huge pages)"
            )));
        }
        let mem = parent.config.vm.mem_mib;
        if !mem.is_multiple_of(2) {
            return Err(CoreError::HugePages(format!(
                "snapshot `{}` has {mem} MiB of guest RAM, not a multiple of the 2 MiB huge page size; spawn its children on 4 KiB pages",
                parent.tag
            )));
        }
        let image = self.ram_for_children(&parent.tag, &parent.dir)?;
        let id = format!("spawn-{}-{}", std::process::id(), super::unix_now_ns());
        let pages = crate::hugepages::HugePagePool::pages_for(mem);
        // Held by this process (the copy lives in its memfd until the
        // children map it).
        crate::hugepool::claim(&id, pages)?;
        let claim = super::create::ClaimGuard(Some(id.clone()));
        forkd_vm::faultpoint::reached("spawn:huge-copy");
        let copy = forkd_vm::hugeram::HugeRam::copy_of(&image, mem << 20).map_err(|e| {
            CoreError::HugePages(format!(
                "copying snapshot `{}`'s RAM image into huge pages for its children: {e}",
                parent.tag
            ))
        })?;
        Ok((copy, claim))
    }

    /// Checks a snapshot can be spawned from (ready, files intact, kernel
    /// present, same accelerator) without starting anything; waits while it
    /// is being written when `wait`.
    pub(crate) fn prepare_spawn(&self, tag: &str, wait: bool) -> Result<Parent, CoreError> {
        let limit = forkd_ops::policy::WRITING_WAIT_LIMIT;
        let t0 = Instant::now();
        loop {
            let row = self.db().get_snapshot(tag)?;
            match readiness(tag, row.map(|r| (r.status, r.error)), wait)? {
                Readiness::Ready => break,
                Readiness::Wait if t0.elapsed() > limit => {
                    return Err(CoreError::SnapshotWritingTooLong {
                        tag: tag.into(),
                        waited_s: limit.as_secs(),
                    })
                }
                Readiness::Wait => std::thread::sleep(Duration::from_millis(20)),
            }
        }
        // Cheap checks first (a parent gone, a disk backed by a file that
        // is gone), so that a broken snapshot says why; then the contents.
        if let Some(why) = self.broken_reason(tag)? {
            return Err(CoreError::SnapshotBroken {
                tag: tag.into(),
                why,
            });
        }
        let manifest = {
            let db = self.db();
            self.store.verify(&db, tag)?
        };
        let unusable = |reason: String| CoreError::SnapshotUnusable {
            tag: tag.into(),
            reason,
        };
        let config: SandboxConfig = serde_json::from_value(manifest.machine.clone())
            .map_err(|e| unusable(format!("its machine configuration is unreadable: {e}")))?;
        for (what, p) in [
            ("kernel", &config.vm.kernel),
            ("initramfs", &config.vm.initramfs),
        ] {
            if !p.is_file() {
                return Err(unusable(format!(
                    "the {what} {} it was made with is gone",
                    p.display()
                )));
            }
        }
        let accel = forkd_vm::accel::choose(forkd_vm::AccelRequest::Auto, &HostProbe::read())
            .map_err(CoreError::Accel)?;
        if accel.accel != config.vm.accel {
            return Err(unusable(format!(
                "it was made under {} but this host runs {}",
                config.vm.accel, accel.accel
            )));
        }
        Ok(Parent {
            tag: tag.into(),
            dir: self.store.dir(tag),
            config,
            accel,
            overridden: false,
            child_id: None,
            huge_ram: None,
        })
    }

    /// The configuration of a child of `parent`, with its own sockets and a
    /// fresh overlay on the frozen disk in `run_dir`.
    fn child_config(
        &self,
        parent: &Parent,
        id: &str,
        run_dir: &RunDir,
    ) -> Result<VmConfig, CoreError> {
        let mut config = parent.config.vm.clone();
        config.memory =
            MemoryBackend::PrivateFile(self.ram_for_children(&parent.tag, &parent.dir)?);
        // A child maps its image, never RAM of its own: the parent's
        // choice of pages says nothing about it.
        config.huge_pages = forkd_vm::HugePages::Off;
        config.prealloc = false;
        config.private_hugetlb = parent.huge_ram.is_some();
        config.ram_fd = parent.huge_ram.as_ref().map(|h| h.fd());
        config.qmp_socket = run_dir.file("qmp.sock");
        config.agent_socket = run_dir.file("agent.sock");
        config.console_log = run_dir.file("console.log");
        config.hostname = id.to_string();
        config.incoming = true;
        if config.network == forkd_vm::Network::Gateway {
            config.net_socket = Some(run_dir.file("net.sock"));
        }
        if !config.disks.is_empty() {
            let overlay = run_dir.file("root.qcow2");
            forkd_vm::disk::create_overlay(&parent.dir.join(DISK_IMAGE), "qcow2", &overlay)
                .map_err(CoreError::DiskImage)?;
            config.disks = vec![Disk { overlay }];
        }
        Ok(config)
    }

    /// Tops the warm pool of snapshot `tag` up to `size` standby QEMUs
    /// (started with `-incoming defer`, answering on QMP, no guest yet).
    pub fn fill_pool(&self, tag: &str, size: usize) -> Result<PoolFill, CoreError> {
        forkd_store::validate_tag(tag)?;
        let parent = self.prepare_spawn(tag, false)?;
        self.list()?; // marks dead members
        let have = self.db().count_from_snapshot(tag, SandboxState::Pooled)?;
        let mut started = 0;
        for _ in have..size {
            let admitted = self.admit_children(&parent, "pool", 1)?;
            let id = new_id("sb");
            let run_dir = RunDir::create(&self.sandboxes_dir(), &id)?;
            let guard = DirGuard(run_dir.path().to_path_buf());
            let config = self.child_config(&parent, &id, &run_dir)?;
            let starting = self.begin_sandbox(
                &id,
                run_dir.path(),
                &config,
                &child_image(&parent.config.image, tag),
                &parent.accel,
                Some(tag),
            )?;
            drop(admitted);
            crate::netgw::start(&config, true)?;
            let (pid, pid_start) = Vm::launch_standby(
                &config,
                run_dir,
                &LaunchOptions {
                    boot_timeout: Duration::from_secs(30),
                    die_with_parent: false,
                    cancel: None,
                    restore: None,
                    on_spawn: Some(starting.spawn_hook(None)),
                },
            )?;
            self.adopt(pid, pid_start);
            if let Err(e) = starting.finish(pid, pid_start, SandboxState::Pooled) {
                forkd_vm::process::kill_and_wait(&[(pid, pid_start)], Duration::from_secs(5));
                return Err(e);
            }
            guard.disarm();
            started += 1;
        }
        Ok(PoolFill {
            started,
            ready: self.db().count_from_snapshot(tag, SandboxState::Pooled)?,
        })
    }

    /// Activates a pooled member of `tag`, if any: loads the device state into
    /// the waiting QEMU. A member that fails is removed and `None` returned,
    /// so the caller falls back to a cold start.
    fn claim_from_pool(&self, tag: &str, snap_dir: &Path) -> Option<(String, Vm)> {
        loop {
            let row = self.db().claim_pooled(tag).ok()??;
            let activated = SandboxConfig::of(&row).ok().and_then(|c| {
                Vm::attach_restoring(
                    c.vm,
                    row.pid,
                    row.pid_start,
                    &row.run_dir,
                    Some(&snap_dir.join(DEVICE_STATE)),
                    Duration::from_secs(30),
                )
                .ok()
            });
            match activated {
                Some(vm) => return Some((row.id, vm)),
                None => {
                    let _ = self.kill(&row.id);
                }
            }
        }
    }

    fn spawn_one(&self, parent: &Parent) -> Result<Child, CoreError> {
        let t0 = Instant::now();
        let pooled = if parent.overridden {
            None
        } else {
            self.claim_from_pool(&parent.tag, &parent.dir)
        };
        if let Some((id, vm)) = pooled {
            return self
                .make_own(&id, &vm)
                .and_then(|(restore_ms, clock_step_ms)| {
                    self.detach_child(&id, vm, t0, restore_ms, clock_step_ms, true)
                })
                .inspect_err(|_| {
                    let _ = self.kill(&id);
                });
        }
        let admitted = self.admit_children(parent, "spawn", 1)?;
        let id = parent.child_id.clone().unwrap_or_else(|| new_id("sb"));
        // On huge pages, the pool may grow by what the child can take: the
        // image it shares (counted by every child, so it outlives any one)
        // and its own copies of the pages it writes.
        let huge_claim = parent
            .huge_ram
            .as_ref()
            .map(|_| 2 * crate::hugepages::HugePagePool::pages_for(parent.config.vm.mem_mib));
        if let Some(pages) = huge_claim {
            crate::hugepool::claim(&id, pages)?;
        }
        let claim = super::create::ClaimGuard(huge_claim.map(|_| id.clone()));
        let mut run_dir = RunDir::create(&self.sandboxes_dir(), &id)?;
        // Owned until it is ready: on any error below, dropping the Vm (or
        // the run dir) kills QEMU and removes the files.
        let config = self.child_config(parent, &id, &run_dir)?;
        run_dir.keep();
        let guard = DirGuard(run_dir.path().to_path_buf());
        // The row exists before QEMU does, so that a spawner killed at any
        // step leaves nothing no row names.
        let starting = self.begin_sandbox(
            &id,
            run_dir.path(),
            &config,
            &child_image(&parent.config.image, &parent.tag),
            &parent.accel,
            Some(&parent.tag),
        )?;
        drop(admitted);
        crate::netgw::start(&config, true)?;
        let vm = Vm::launch(
            config,
            run_dir,
            &LaunchOptions {
                boot_timeout: Duration::from_secs(60),
                die_with_parent: false,
                cancel: None,
                restore: Some(parent.dir.join(DEVICE_STATE)),
                on_spawn: Some(starting.spawn_hook(huge_claim)),
            },
        )
        .map_err(|e| {
            super::create::explain_sigbus(e, huge_claim.is_some(), parent.config.vm.mem_mib)
        })?;
        let (pid, pid_start) = (vm.pid(), vm.pid_start());
        self.adopt(pid, pid_start);
        if let Some(pages) = huge_claim {
            crate::hugepool::bind(&id, pages, pid, pid_start)?;
        }
        claim.disarm();
        // `running` only once it is its own: a spawner killed before that
        // leaves a `starting` row, and whoever finds it kills the child.
        let made_own = self.make_own(&id, &vm);
        let child = made_own.and_then(|(restore_ms, clock_step_ms)| {
            starting.finish(pid, pid_start, SandboxState::Running)?;
            guard.disarm();
            self.detach_child(&id, vm, t0, restore_ms, clock_step_ms, false)
        });
        if child.is_err() {
            let _ = self.kill(&id);
        }
        child
    }

    /// Admits `n` more children of `parent`: their memory, and the flat RAM
    /// image they map when it is not made yet.
    fn admit_children(
        &self,
        parent: &Parent,
        what: &'static str,
        n: u64,
    ) -> Result<crate::admission::Admitted, CoreError> {
        let image = if self.children_image_ready(&parent.tag)? {
            0
        } else {
            parent.config.vm.mem_mib << 20
        };
        crate::admission::admit(
            &self.env,
            &crate::admission::Need {
                what,
                guests: n,
                mem_mib: parent.config.vm.mem_mib,
                tmpfs_bytes: image,
            },
        )
    }

    /// Fork safety for a restored child: fresh entropy, the clock, its
    /// own hostname. Returns how long the restore took and how far its
    /// clock was stepped, in ms.
    fn make_own(&self, id: &str, vm: &Vm) -> Result<(f64, i64), CoreError> {
        let restore_ms = vm.restore_time().unwrap_or_default().as_secs_f64() * 1000.0;
        let mut entropy = [0u8; 64];
        getrandom(&mut entropy)?;
        let clock_step_ms = vm
            .agent()
            .restore(&entropy, id)
            .map_err(|e| vm.explain(e, "fork-safety restore"))?;
        Ok((restore_ms, clock_step_ms))
    }

    /// Lets a child outlive this process and reports it.
    fn detach_child(
        &self,
        id: &str,
        vm: Vm,
        t0: Instant,
        restore_ms: f64,
        clock_step_ms: i64,
        pooled: bool,
    ) -> Result<Child, CoreError> {
        let ready_ms = t0.elapsed().as_secs_f64() * 1000.0;
        vm.detach();
        Ok(Child {
            sandbox: self.sandbox_view(id)?,
            ready_ms,
            restore_ms,
            clock_step_ms,
            from_pool: pooled,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_follows_the_status_and_the_wait_flag() {
        assert_eq!(
            readiness("t", Some((SnapshotStatus::Ready, None)), false).unwrap(),
            Readiness::Ready
        );
        assert_eq!(
            readiness("t", Some((SnapshotStatus::Writing, None)), true).unwrap(),
            Readiness::Wait
        );
        assert!(matches!(
            readiness("t", Some((SnapshotStatus::Writing, None)), false),
            Err(CoreError::SnapshotWriting { .. })
        ));
        let failed = readiness(
            "t",
            Some((SnapshotStatus::Failed, Some("boom".into()))),
            true,
        )
        .unwrap_err();
        assert_eq!(
            failed.to_string(),
            "snapshot `t` is not ready (status: failed: boom)"
        );
        assert!(matches!(
            readiness("t", None, true),
            Err(CoreError::NoSnapshot { .. })
        ));
    }

    #[test]
    fn a_fan_out_fills_every_slot_in_order_within_its_parallelism() {
        let running = AtomicUsize::new(0);
        let peak = AtomicUsize::new(0);
        let seen = Mutex::new(Vec::new());
        let out = fan_out(
            7,
            3,
            &|i| {
                let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                peak.fetch_max(now, Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(5));
                running.fetch_sub(1, Ordering::SeqCst);
                i * 10
            },
            &|i, r| seen.lock().unwrap().push((i, *r)),
        );
        assert_eq!(out, vec![0, 10, 20, 30, 40, 50, 60]);
        assert!(peak.load(Ordering::SeqCst) <= 3);
        assert_eq!(seen.lock().unwrap().len(), 7);
        assert_eq!(fan_out(2, 0, &|i| i, &|_, _| {}), vec![0, 1]);
    }
}
