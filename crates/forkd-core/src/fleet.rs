//! Sandboxes that outlive the process that made them, and snapshots of them.
//!
//! A [`Fleet`] is the state database plus the snapshot store plus the runtime
//! directory. Every sandbox is a detached QEMU (own session, no parent-death
//! signal) whose guest RAM is a shared file on tmpfs (or, with huge pages, a
//! hugetlb memfd, which only a live branch can snapshot), recorded in SQLite
//! with its pid and start time; any later process re-attaches by pid and
//! sockets.
//!
//! SNAPSHOT pauses the sandbox, freezes its disk (the sandbox goes on in a new
//! overlay), saves device state without RAM (`x-ignore-shared`), copies the
//! RAM file, resumes, then publishes atomically. SPAWN starts children with
//! `-incoming defer`, each mapping the snapshot's RAM image copy-on-write
//! (`MAP_PRIVATE`) with its own qcow2 overlay on the frozen disk, loads the
//! device state, and makes each child its own (entropy, clock, hostname).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use forkd_protocol::ExecRequest;
use forkd_store::{Db, Manifest, SandboxRow, SandboxState, SnapshotStatus, Store};
use forkd_vm::{AccelChoice, Disk, HostProbe, LaunchOptions, MemoryBackend, RunDir, Vm, VmConfig};
use serde::{Deserialize, Serialize};

use crate::artifacts::Artifacts;
use crate::paths::Env;
use crate::sandbox::{new_id, BootOptions};
use crate::CoreError;

/// What a sandbox row's `config` column holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SandboxConfig {
    pub vm: VmConfig,
    /// Human-readable image name (for `forkd ls`).
    pub image: String,
    pub accel_reason: String,
}

/// A sandbox as `forkd ls` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct SandboxView {
    pub id: String,
    /// running, dead (its QEMU is gone), pooled.
    pub state: String,
    pub pid: u32,
    pub snapshot: Option<String>,
    pub image: String,
    pub mem_mib: u64,
    pub cpus: u32,
    pub created_at: u64,
}

/// Outcome of one child of a spawn.
#[derive(Debug, Clone, Serialize)]
pub struct Child {
    pub id: String,
    /// From the start of this child's launch until its agent answered and
    /// fork-safety was applied.
    pub ready_ms: f64,
    /// Loading the device state (`migrate-incoming` until running).
    pub restore_ms: f64,
    /// How far the child's clock was stepped.
    pub clock_step_ms: i64,
    /// Whether it was a pre-started pool member.
    pub from_pool: bool,
}

/// Result of a snapshot.
#[derive(Debug, Clone, Serialize)]
pub struct SnapshotInfo {
    pub tag: String,
    pub dir: PathBuf,
    /// The sandbox was paused this long.
    pub pause_ms: f64,
    /// RAM bytes copied during the pause (data extents of the RAM file).
    pub ram_copied: u64,
    pub total_ms: f64,
}

/// The state database, snapshot store and runtime directory together.
pub struct Fleet {
    env: Env,
    db: Mutex<Db>,
    store: Store,
    no_wait: std::sync::atomic::AtomicBool,
}

/// Name of the device-state file in a snapshot.
pub const DEVICE_STATE: &str = "device.state";
/// Name of the RAM image in a snapshot.
pub const RAM_IMAGE: &str = "ram.img";
/// Name of the frozen disk in a snapshot.
pub const DISK_IMAGE: &str = "disk.qcow2";

impl Fleet {
    pub fn open(env: &Env) -> Result<Fleet, CoreError> {
        let db = Db::open(&env.home.join("state.db"))?;
        let store = Store::new(env.home.join("snapshots"));
        store.sweep_staging();
        Ok(Fleet {
            env: env.clone(),
            db: Mutex::new(db),
            store,
            no_wait: std::sync::atomic::AtomicBool::new(false),
        })
    }

    pub fn db(&self) -> MutexGuard<'_, Db> {
        self.db.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn env(&self) -> &Env {
        &self.env
    }

    fn sandboxes_dir(&self) -> PathBuf {
        self.env.runtime.join("sandboxes")
    }

    /// Boots a detached sandbox and records it.
    pub fn create(
        &self,
        artifacts: &Artifacts,
        image: &str,
        opts: &BootOptions,
    ) -> Result<SandboxView, CoreError> {
        let accel = choose_accel(opts)?;
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
            forkd_vm::disk::create_overlay(base, "raw", &overlay).map_err(CoreError::Config)?;
            disks.push(Disk { overlay });
        }
        // Shared file on tmpfs: snapshots read RAM from the file instead of
        // streaming it through the migration channel.
        let memory = MemoryBackend::SharedFile(run_dir.file("ram"));
        let config =
            crate::sandbox::boot_config(artifacts, opts, &accel, &run_dir, &id, memory, disks);
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
        let (pid, pid_start) = vm.detach();
        let row = self.record(
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
        Ok(row)
    }

    #[allow(clippy::too_many_arguments)]
    fn record(
        &self,
        id: &str,
        pid: u32,
        pid_start: u64,
        vm: &VmConfig,
        image: &str,
        accel: &AccelChoice,
        snapshot: Option<&str>,
        state: SandboxState,
    ) -> Result<SandboxView, CoreError> {
        let config = SandboxConfig {
            vm: vm.clone(),
            image: image.to_string(),
            accel_reason: accel.reason.clone(),
        };
        let row = SandboxRow {
            id: id.to_string(),
            state,
            pid,
            pid_start,
            run_dir: vm
                .qmp_socket
                .parent()
                .unwrap_or(Path::new("/"))
                .to_path_buf(),
            snapshot: snapshot.map(str::to_string),
            config: serde_json::to_value(&config).expect("config serialises"),
            created_at: unix_now(),
        };
        self.db().insert_sandbox(&row)?;
        Ok(view(&row, &config))
    }

    /// A sandbox's record and configuration.
    pub fn sandbox(&self, id: &str) -> Result<(SandboxRow, SandboxConfig), CoreError> {
        let row = self.db().get_sandbox(id)?.ok_or_else(|| {
            CoreError::NotFound(format!("no sandbox `{id}`; `forkd ls` lists them"))
        })?;
        let config: SandboxConfig = serde_json::from_value(row.config.clone()).map_err(|e| {
            CoreError::Config(format!("sandbox `{id}` has an unreadable config: {e}"))
        })?;
        Ok((row, config))
    }

    /// A sandbox's record and configuration, if its QEMU still runs; a dead
    /// one is marked so and reported with the fix.
    fn live(&self, id: &str) -> Result<(SandboxRow, SandboxConfig), CoreError> {
        let (row, config) = self.sandbox(id)?;
        if !forkd_vm::vm::pid_alive(row.pid, row.pid_start) {
            self.db().update_sandbox_state(id, SandboxState::Dead)?;
            return Err(CoreError::Conflict(format!(
                "sandbox `{id}` is dead (its QEMU, pid {}, is gone); remove it with `forkd kill {id}`",
                row.pid
            )));
        }
        Ok((row, config))
    }

    /// Connects to a running sandbox.
    pub fn attach(&self, id: &str) -> Result<Vm, CoreError> {
        let (row, config) = self.live(id)?;
        Ok(Vm::attach(
            config.vm,
            row.pid,
            row.pid_start,
            &row.run_dir,
            Duration::from_secs(30),
        )?)
    }

    /// Connects to a running sandbox for QEMU control only (no agent
    /// session), so that it does not wait for another client's exec.
    pub fn control(&self, id: &str) -> Result<Vm, CoreError> {
        let (row, config) = self.live(id)?;
        Ok(Vm::attach_control(
            config.vm,
            row.pid,
            row.pid_start,
            &row.run_dir,
        )?)
    }

    /// Runs a command in a sandbox (see [`crate::Sandbox::exec`]).
    pub fn exec(
        &self,
        id: &str,
        req: ExecRequest,
        stdin: Option<Box<dyn std::io::Read + Send>>,
        on_output: impl FnMut(forkd_protocol::client::OutputStream, &[u8]),
    ) -> Result<forkd_protocol::ExitStatus, CoreError> {
        let vm = self.attach(id)?;
        let what = format!("exec of `{}`", req.argv.join(" "));
        vm.agent()
            .exec(req, stdin, on_output)
            .map_err(|e| explain_detached(&vm, e, &what))
    }

    /// All sandboxes, with dead ones marked as such.
    pub fn list(&self) -> Result<Vec<SandboxView>, CoreError> {
        let rows = self.db().list_sandboxes()?;
        let mut out = Vec::new();
        for mut row in rows {
            if row.state != SandboxState::Dead && !forkd_vm::vm::pid_alive(row.pid, row.pid_start) {
                self.db()
                    .update_sandbox_state(&row.id, SandboxState::Dead)?;
                row.state = SandboxState::Dead;
            }
            let config: Option<SandboxConfig> = serde_json::from_value(row.config.clone()).ok();
            out.push(match config {
                Some(c) => view(&row, &c),
                None => SandboxView {
                    id: row.id.clone(),
                    state: row.state.to_string(),
                    pid: row.pid,
                    snapshot: row.snapshot.clone(),
                    image: "?".into(),
                    mem_mib: 0,
                    cpus: 0,
                    created_at: row.created_at,
                },
            });
        }
        Ok(out)
    }

    /// Kills a sandbox (if it still runs) and removes its files and record.
    pub fn kill(&self, id: &str) -> Result<(), CoreError> {
        let (row, _) = self.sandbox(id)?;
        if forkd_vm::vm::pid_alive(row.pid, row.pid_start) {
            // SAFETY: kill has no memory effects; pid and start time were
            // checked just above, so this is the sandbox's QEMU.
            unsafe { libc::kill(row.pid as libc::pid_t, libc::SIGKILL) };
            let deadline = Instant::now() + Duration::from_secs(10);
            while forkd_vm::vm::pid_alive(row.pid, row.pid_start) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(2));
            }
        }
        // If this process started it (spawn, pool, create in a long-lived
        // process), it is our child: reap it, or it stays a zombie.
        forkd_vm::vm::reap_if_child(row.pid, row.pid_start);
        let dir = row.run_dir.as_path();
        if dir.starts_with(self.sandboxes_dir()) {
            let _ = std::fs::remove_dir_all(dir);
        }
        self.db().delete_sandbox(id)?;
        Ok(())
    }

    /// Snapshots a running sandbox under `tag` (pause, freeze disk, save
    /// device state, copy RAM, resume, publish).
    pub fn snapshot(&self, id: &str, tag: &str) -> Result<SnapshotInfo, CoreError> {
        forkd_store::validate_tag(tag)?;
        let t_start = Instant::now();
        let (row, config) = self.sandbox(id)?;
        if config.vm.ram_in_hugetlb_memfd() {
            return Err(CoreError::Conflict(format!(
                "sandbox `{id}` runs on huge pages (--hugepages): its RAM is in a hugetlb memfd, not a file that a full snapshot (`forkd snapshot`, `branch --mode full`) could copy. Branch it live instead: `forkd branch {id}` (--mode live is the default)"
            )));
        }
        let vm = self.control(id)?;
        let ram = match &config.vm.memory {
            MemoryBackend::SharedFile(p) => p.clone(),
            _ => {
                return Err(CoreError::Config(format!(
                    "sandbox `{id}` maps its RAM from a snapshot; branch it with --mode live"
                )))
            }
        };
        let staging = self.store.stage(tag)?;
        let device_state = staging.path().join(DEVICE_STATE);
        let new_overlay = Path::new(vm.run_dir()).join(format!("root-{}.qcow2", unix_now_ns()));

        // ---- the pause ----
        let t_pause = Instant::now();
        vm.qmp().stop().map_err(forkd_vm::VmError::from)?;
        let paused = (|| -> Result<(Option<PathBuf>, u64), CoreError> {
            let frozen = if config.vm.disks.is_empty() {
                None
            } else {
                Some(vm.snapshot_disk(0, &new_overlay)?)
            };
            vm.save_device_state(&device_state)?;
            let copied = crate::files::copy_sparse(&ram, &staging.path().join(RAM_IMAGE))
                .map_err(|e| CoreError::Config(format!("copying guest RAM: {e}")))?;
            Ok((frozen, copied))
        })();
        // Resume whatever happened: the sandbox must keep running.
        let resumed = vm.qmp().cont();
        let pause = t_pause.elapsed();
        let (frozen, ram_copied) = paused?;
        resumed.map_err(forkd_vm::VmError::from)?;
        // ---- outside the pause ----
        if let Some(frozen) = frozen {
            // Read-only from now on (QEMU writes only the new overlay).
            crate::files::copy_sparse(&frozen, &staging.path().join(DISK_IMAGE))
                .map_err(|e| CoreError::Config(format!("copying the frozen disk: {e}")))?;
        }
        let pause_ms = pause.as_secs_f64() * 1000.0;
        let manifest = Manifest {
            format: forkd_store::MANIFEST_FORMAT,
            tag: tag.to_string(),
            created_at: unix_now(),
            parent: row.snapshot.clone(),
            source_sandbox: Some(id.to_string()),
            pause_ms,
            ram_parent: None,
            machine: serde_json::to_value(&config).expect("config serialises"),
            files: vec![],
        };
        let manifest = staging.publish(manifest)?;
        self.db().insert_snapshot(&forkd_store::SnapshotRow {
            tag: tag.to_string(),
            status: SnapshotStatus::Ready,
            dir: self.store.dir(tag),
            parent: row.snapshot.clone(),
            source: Some(id.to_string()),
            created_at: manifest.created_at,
            pause_ms: Some(pause_ms),
            error: None,
        })?;
        Ok(SnapshotInfo {
            tag: tag.to_string(),
            dir: self.store.dir(tag),
            pause_ms,
            ram_copied,
            total_ms: t_start.elapsed().as_secs_f64() * 1000.0,
        })
    }

    /// Starts `n` children of snapshot `tag`, at most `parallel` at a time.
    /// Fails before starting any QEMU if the snapshot is missing, not ready
    /// or corrupt. A child that fails is cleaned up and reported in its slot;
    /// its siblings finish. `on_ready` is called as each child finishes.
    pub fn spawn(
        &self,
        tag: &str,
        n: usize,
        parallel: usize,
        on_ready: &(dyn Fn(usize, &Result<Child, CoreError>) + Sync),
    ) -> Result<Vec<Result<Child, CoreError>>, CoreError> {
        forkd_store::validate_tag(tag)?;
        if n == 0 {
            return Err(CoreError::Config("-n must be at least 1".into()));
        }
        let (snap_dir, parent, accel) = self.prepare_spawn(tag)?;
        let next = AtomicUsize::new(0);
        let results: Mutex<Vec<Option<Result<Child, CoreError>>>> =
            Mutex::new((0..n).map(|_| None).collect());
        std::thread::scope(|s| {
            for _ in 0..parallel.clamp(1, n) {
                s.spawn(|| loop {
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    if i >= n {
                        return;
                    }
                    let r = self.spawn_one(tag, &snap_dir, &parent, &accel);
                    on_ready(i, &r);
                    results.lock().unwrap_or_else(|p| p.into_inner())[i] = Some(r);
                });
            }
        });
        Ok(results
            .into_inner()
            .unwrap_or_else(|p| p.into_inner())
            .into_iter()
            .map(|r| r.expect("every slot is filled"))
            .collect())
    }

    /// Checks a snapshot can be spawned from (ready, files intact, kernel
    /// present, same accelerator) without starting anything.
    fn prepare_spawn(&self, tag: &str) -> Result<(PathBuf, SandboxConfig, AccelChoice), CoreError> {
        self.wait_until_written(tag)?;
        let row = self.db().get_snapshot(tag)?;
        match row.as_ref().map(|r| r.status) {
            None => {
                return Err(CoreError::NotFound(format!(
                    "no snapshot `{tag}`; `forkd snapshots` lists them"
                )))
            }
            Some(SnapshotStatus::Ready) => {}
            Some(other) => {
                return Err(CoreError::Conflict(format!(
                    "snapshot `{tag}` is not ready (status: {other})"
                )))
            }
        }
        let manifest = {
            let db = self.db();
            self.store.verify(&db, tag)?
        };
        let parent: SandboxConfig =
            serde_json::from_value(manifest.machine.clone()).map_err(|e| {
                CoreError::Config(format!(
                    "snapshot `{tag}` has an unreadable machine config: {e}"
                ))
            })?;
        for (what, p) in [
            ("kernel", &parent.vm.kernel),
            ("initramfs", &parent.vm.initramfs),
        ] {
            if !p.is_file() {
                return Err(CoreError::Config(format!(
                    "snapshot `{tag}` needs the {what} {} it was made with, which is gone",
                    p.display()
                )));
            }
        }
        let accel = forkd_vm::accel::choose(forkd_vm::AccelRequest::Auto, &HostProbe::read())
            .map_err(CoreError::Config)?;
        if accel.accel != parent.vm.accel {
            return Err(CoreError::Config(format!(
                "snapshot `{tag}` was made under {} but this host runs {}",
                parent.vm.accel, accel.accel
            )));
        }
        Ok((self.store.dir(tag), parent, accel))
    }

    /// Spawning from a snapshot that is still being written waits for it
    /// (never maps a half-written image), unless `no_wait` was set.
    fn wait_until_written(&self, tag: &str) -> Result<(), CoreError> {
        let deadline = Instant::now() + Duration::from_secs(600);
        loop {
            let status = self.db().get_snapshot(tag)?.map(|r| r.status);
            if status != Some(SnapshotStatus::Writing) {
                return Ok(());
            }
            if self.no_wait.load(Ordering::Relaxed) {
                return Err(CoreError::Conflict(format!(
                    "snapshot `{tag}` is still being written (status: writing); retry when `forkd snapshots` says ready, or spawn without --no-wait"
                )));
            }
            if Instant::now() > deadline {
                return Err(CoreError::Busy(format!(
                    "snapshot `{tag}` is still being written after 10 minutes"
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Fail instead of waiting when a snapshot is still being written.
    pub fn set_no_wait(&self, no_wait: bool) {
        self.no_wait.store(no_wait, Ordering::Relaxed);
    }

    /// The flat RAM image children of `tag` map. It must be on tmpfs (shmem)
    /// for them to be live-branchable: userfaultfd write-protect does not
    /// work on private mappings of disk files. A full image in a store on
    /// tmpfs is mapped where it is; otherwise the image is made once per
    /// snapshot in the runtime directory: a copy, or for a diff layer the
    /// parent's flat image with the layer's pages written over it (see
    /// [`crate::ramimage`] for the cost model).
    fn ram_for_children(&self, tag: &str, snap_dir: &Path) -> Result<PathBuf, CoreError> {
        let stored = snap_dir.join(RAM_IMAGE);
        let layer_map = snap_dir.join(crate::ramimage::LAYER_MAP);
        let ram_parent = if layer_map.exists() {
            let manifest = self.store.load(tag)?;
            Some(manifest.ram_parent.ok_or_else(|| {
                CoreError::Config(format!(
                    "snapshot `{tag}` has a RAM layer map but names no RAM parent"
                ))
            })?)
        } else {
            None
        };
        if ram_parent.is_none() && crate::paths::is_tmpfs(snap_dir) {
            return Ok(stored);
        }
        let dir = self.env.runtime.join("images");
        let image = dir.join(format!("{tag}.ram"));
        if image.exists() {
            return Ok(image);
        }
        std::fs::create_dir_all(&dir)
            .map_err(|e| CoreError::Config(format!("{}: {e}", dir.display())))?;
        let tmp = dir.join(format!(
            ".{tag}.ram.{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_file(&tmp);
        let made = match &ram_parent {
            None => crate::files::copy_sparse(&stored, &tmp).map(|_| ()),
            Some(parent) => {
                {
                    let db = self.db();
                    self.store.verify(&db, parent).map_err(|e| {
                        CoreError::Config(format!(
                            "snapshot `{tag}` keeps its RAM as a layer over `{parent}`, which is unusable: {e}"
                        ))
                    })?;
                }
                let base = self.ram_for_children(parent, &self.store.dir(parent))?;
                crate::ramimage::flatten(&base, &stored, &layer_map, &tmp).map(|_| ())
            }
        };
        if let Err(e) = made {
            let _ = std::fs::remove_file(&tmp);
            return Err(CoreError::Config(format!(
                "making the RAM image of `{tag}` in {}: {e}",
                dir.display()
            )));
        }
        std::fs::rename(&tmp, &image)
            .map_err(|e| CoreError::Config(format!("{}: {e}", image.display())))?;
        Ok(image)
    }

    /// The configuration of a child of the snapshot in `snap_dir`, with its
    /// own sockets and a fresh overlay on the frozen disk in `run_dir`.
    fn child_config(
        &self,
        snap_dir: &Path,
        parent: &SandboxConfig,
        id: &str,
        run_dir: &RunDir,
    ) -> Result<VmConfig, CoreError> {
        let mut config = parent.vm.clone();
        let tag = snap_dir
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        config.memory = MemoryBackend::PrivateFile(self.ram_for_children(tag, snap_dir)?);
        config.qmp_socket = run_dir.file("qmp.sock");
        config.agent_socket = run_dir.file("agent.sock");
        config.console_log = run_dir.file("console.log");
        config.hostname = id.to_string();
        config.incoming = true;
        if !config.disks.is_empty() {
            let overlay = run_dir.file("root.qcow2");
            forkd_vm::disk::create_overlay(&snap_dir.join(DISK_IMAGE), "qcow2", &overlay)
                .map_err(CoreError::Config)?;
            config.disks = vec![Disk { overlay }];
        }
        Ok(config)
    }

    /// Tops the warm pool of snapshot `tag` up to `size` standby QEMUs
    /// (started with `-incoming defer`, answering on QMP, no guest yet).
    /// Returns how many were started.
    pub fn fill_pool(&self, tag: &str, size: usize) -> Result<usize, CoreError> {
        let (snap_dir, parent, accel) = self.prepare_spawn(tag)?;
        self.list()?; // marks dead members
        let have = self.db().count_from_snapshot(tag, SandboxState::Pooled)?;
        let mut started = 0;
        for _ in have..size {
            let id = new_id("sb");
            let run_dir = RunDir::create(&self.sandboxes_dir(), &id)?;
            let guard = DirGuard(run_dir.path().to_path_buf());
            let config = self.child_config(&snap_dir, &parent, &id, &run_dir)?;
            let (pid, pid_start) = Vm::launch_standby(
                &config,
                run_dir,
                &LaunchOptions {
                    boot_timeout: Duration::from_secs(30),
                    die_with_parent: false,
                    cancel: None,
                    restore: None,
                },
            )?;
            let image = format!("{} (from {tag})", parent.image);
            if let Err(e) = self.record(
                &id,
                pid,
                pid_start,
                &config,
                &image,
                &accel,
                Some(tag),
                SandboxState::Pooled,
            ) {
                // SAFETY: our own freshly started QEMU.
                unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
                return Err(e);
            }
            guard.disarm();
            started += 1;
        }
        Ok(started)
    }

    /// Activates a pooled member of `tag`, if any: loads the device state into
    /// the waiting QEMU. A member that fails is removed and `None` returned,
    /// so the caller falls back to a cold start.
    fn claim_from_pool(&self, tag: &str, snap_dir: &Path) -> Option<(String, Vm, SandboxConfig)> {
        loop {
            let row = self.db().claim_pooled(tag).ok()??;
            let config: Option<SandboxConfig> = serde_json::from_value(row.config.clone()).ok();
            let activated = config.as_ref().ok_or(()).and_then(|c| {
                Vm::attach_restoring(
                    c.vm.clone(),
                    row.pid,
                    row.pid_start,
                    &row.run_dir,
                    Some(&snap_dir.join(DEVICE_STATE)),
                    Duration::from_secs(30),
                )
                .map_err(|_| ())
            });
            match (activated, config) {
                (Ok(vm), Some(c)) => return Some((row.id, vm, c)),
                _ => {
                    let _ = self.kill(&row.id);
                }
            }
        }
    }

    fn spawn_one(
        &self,
        tag: &str,
        snap_dir: &Path,
        parent: &SandboxConfig,
        accel: &AccelChoice,
    ) -> Result<Child, CoreError> {
        let t0 = Instant::now();
        if let Some((id, vm, _)) = self.claim_from_pool(tag, snap_dir) {
            return self.finish_child(&id, vm, t0, true).inspect_err(|_| {
                let _ = self.kill(&id);
            });
        }
        let id = new_id("sb");
        let mut run_dir = RunDir::create(&self.sandboxes_dir(), &id)?;
        // Owned until it is ready: on any error below, dropping the Vm (or
        // the run dir) kills QEMU and removes the files.
        let config = self.child_config(snap_dir, parent, &id, &run_dir)?;
        run_dir.keep();
        let guard = DirGuard(run_dir.path().to_path_buf());
        let vm = Vm::launch(
            config.clone(),
            run_dir,
            &LaunchOptions {
                boot_timeout: Duration::from_secs(60),
                die_with_parent: false,
                cancel: None,
                restore: Some(snap_dir.join(DEVICE_STATE)),
            },
        )?;
        let image = format!("{} (from {tag})", parent.image);
        // Recorded before fork safety so that a failure below is cleaned up
        // by `kill` like any other sandbox.
        let (pid, pid_start) = (vm.pid(), vm.pid_start());
        self.record(
            &id,
            pid,
            pid_start,
            &config,
            &image,
            accel,
            Some(tag),
            SandboxState::Running,
        )?;
        guard.disarm();
        let vm_ok = self.finish_child(&id, vm, t0, false);
        if vm_ok.is_err() {
            let _ = self.kill(&id);
        }
        vm_ok
    }

    /// Fork safety for a restored child, then detaches it.
    fn finish_child(
        &self,
        id: &str,
        vm: Vm,
        t0: Instant,
        pooled: bool,
    ) -> Result<Child, CoreError> {
        let restore_ms = vm.restore_time().unwrap_or_default().as_secs_f64() * 1000.0;
        let mut entropy = [0u8; 64];
        getrandom(&mut entropy)?;
        let clock_step_ms = vm
            .agent()
            .restore(&entropy, id)
            .map_err(|e| vm.explain(e, "fork-safety restore"))?;
        let ready_ms = t0.elapsed().as_secs_f64() * 1000.0;
        vm.detach();
        Ok(Child {
            id: id.to_string(),
            ready_ms,
            restore_ms,
            clock_step_ms,
            from_pool: pooled,
        })
    }

    /// Deletes a snapshot; refuses while sandboxes or snapshots depend on it
    /// unless `force`.
    pub fn remove_snapshot(&self, tag: &str, force: bool) -> Result<(), CoreError> {
        forkd_store::validate_tag(tag)?;
        let exists = self.db().get_snapshot(tag)?.is_some() || self.store.exists(tag);
        if !exists {
            return Err(CoreError::NotFound(format!(
                "no snapshot `{tag}`; `forkd snapshots` lists them"
            )));
        }
        // Sandboxes whose QEMU is gone do not count; the warm pool is ours.
        for s in self.list()? {
            if s.snapshot.as_deref() == Some(tag) && s.state == "pooled" {
                self.kill(&s.id)?;
            }
        }
        let blockers = forkd_store::deletion_blockers(&self.db(), tag)?;
        if !blockers.is_empty() && !force {
            return Err(CoreError::Conflict(format!(
                "snapshot `{tag}` is in use by {}; kill those first or pass --force",
                blockers.join(", ")
            )));
        }
        self.store.remove(tag)?;
        let _ = std::fs::remove_file(self.env.runtime.join("images").join(format!("{tag}.ram")));
        let db = self.db();
        db.delete_snapshot_row(tag)?;
        db.forget_verified_under(&self.store.dir(tag))?;
        Ok(())
    }
}

fn choose_accel(opts: &BootOptions) -> Result<AccelChoice, CoreError> {
    forkd_vm::accel::choose(opts.accel, &HostProbe::read()).map_err(CoreError::Config)
}

fn view(row: &SandboxRow, c: &SandboxConfig) -> SandboxView {
    SandboxView {
        id: row.id.clone(),
        state: row.state.to_string(),
        pid: row.pid,
        snapshot: row.snapshot.clone(),
        image: c.image.clone(),
        mem_mib: c.vm.mem_mib,
        cpus: c.vm.cpus,
        created_at: row.created_at,
    }
}

fn explain_detached(vm: &Vm, e: forkd_protocol::client::ClientError, what: &str) -> CoreError {
    if !vm.is_alive() {
        return CoreError::Vm(forkd_vm::VmError::Died {
            status: "QEMU exited".into(),
            during: what.into(),
            console: vm.console_tail(10),
        });
    }
    CoreError::Vm(forkd_vm::VmError::Agent(e))
}

/// Takes an exclusive `flock` on `path` (created if needed); released when
/// the returned file is dropped or the process dies.
pub(crate) fn lock_file(path: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::io::AsRawFd;
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)?;
    // SAFETY: flock on a valid fd we own; no memory effects.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(f)
}

/// Removes a directory on drop unless disarmed.
struct DirGuard(PathBuf);

impl DirGuard {
    fn disarm(self) {
        std::mem::forget(self);
    }
}

impl Drop for DirGuard {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn getrandom(buf: &mut [u8]) -> Result<(), CoreError> {
    // SAFETY: getrandom writes at most buf.len() bytes into buf.
    let n = unsafe { libc::getrandom(buf.as_mut_ptr().cast(), buf.len(), 0) };
    if n != buf.len() as isize {
        return Err(CoreError::Config(format!(
            "getrandom: {}",
            std::io::Error::last_os_error()
        )));
    }
    Ok(())
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn unix_now_ns() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}
