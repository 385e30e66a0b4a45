//! Live BRANCH: snapshot a running sandbox with a pause that does not grow
//! with its memory.
//!
//! The pause is `stop`, `blockdev-snapshot-sync` (the disk freezes; the
//! sandbox goes on in a new overlay), and `migrate` with QEMU's
//! `background-snapshot` capability: QEMU saves the device state, write-
//! protects guest RAM with userfaultfd and resumes the guest by itself. RAM
//! then streams out while the guest runs (a page the guest writes is copied
//! out before the write proceeds), into a [`Writer`] that splits it
//! (`forkd-migstream`): pages into a sparse `ram.img`, device state into a
//! stream children load with `x-ignore-shared`. The snapshot is `writing`
//! until the writer has checked that QEMU completed, copied the frozen disk
//! and published it atomically; then `ready`; on any failure `failed`, with
//! nothing published and the staging directory gone. The source never stops
//! for the copy and is never harmed by a failed branch.

use std::fs::File;
use std::io::{BufReader, BufWriter, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use forkd_store::{Manifest, SnapshotRow, SnapshotStatus};
use forkd_vm::vm::Vm;
use forkd_vm::MemoryBackend;
use serde::{Deserialize, Serialize};

use crate::fleet::{Fleet, DEVICE_STATE, DISK_IMAGE, RAM_IMAGE};
use crate::ramimage::RamImage;
use crate::CoreError;

/// How to branch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Background snapshot: the pause does not contain the RAM copy.
    Live,
    /// Stop, copy everything, resume: the baseline.
    Full,
}

impl std::str::FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Mode, String> {
        match s {
            "live" => Ok(Mode::Live),
            "full" => Ok(Mode::Full),
            other => Err(format!("unknown branch mode {other:?}: use live or full")),
        }
    }
}

/// What a branch reports when its pause is over (and, when waited for, its
/// snapshot is ready).
#[derive(Debug, Clone, Serialize)]
pub struct BranchInfo {
    pub tag: String,
    pub mode: Mode,
    pub status: SnapshotStatus,
    /// The source was paused this long, as forkd measured it (stop until
    /// QEMU reported it running again).
    pub pause_ms: f64,
    /// Guest downtime as QEMU reports it (live mode).
    pub qemu_downtime_ms: Option<f64>,
    /// From the start of the branch until the snapshot was ready (when waited).
    pub ready_ms: Option<f64>,
}

/// Everything the writer needs; serialisable so a detached process can run it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WriterJob {
    pub tag: String,
    pub source: String,
    /// The writer listens here; QEMU connects and streams.
    pub socket: PathBuf,
    pub qmp_socket: PathBuf,
    /// The disk file frozen at the pause (copied into the snapshot).
    pub frozen_disk: Option<PathBuf>,
    pub machine: serde_json::Value,
    pub parent: Option<String>,
    /// The flat RAM image the source was started from (snapshot `parent`'s):
    /// when set, the branch stores only the pages that differ from it.
    #[serde(default)]
    pub ram_base: Option<PathBuf>,
    pub home: PathBuf,
    pub runtime: PathBuf,
}

/// The RAM block QEMU names after our memory backend (`-object ...,id=mem0`).
pub const RAM_BLOCK: &str = "mem0";

/// Receives one live-snapshot stream and publishes it as snapshot `job.tag`.
pub struct Writer {
    job: WriterJob,
    listener: UnixListener,
    staging: forkd_store::Staging,
    /// Held while this writer lives; [`Fleet::recover`] fails `writing`
    /// snapshots whose lock is free (their writer died).
    _alive: File,
}

/// The lock a live writer of snapshot `tag` holds.
pub fn writer_lock(runtime: &Path, tag: &str) -> PathBuf {
    runtime.join("writers").join(format!("{tag}.lock"))
}

impl Writer {
    /// Creates the staging directory and starts listening. Once this returns,
    /// QEMU may connect.
    pub fn prepare(fleet: &Fleet, job: WriterJob) -> Result<Writer, CoreError> {
        let lock = writer_lock(&fleet.env().runtime, &job.tag);
        let _ = std::fs::create_dir_all(lock.parent().expect("has a parent"));
        let alive = crate::fleet::lock_file(&lock).map_err(|e| {
            CoreError::Busy(format!(
                "snapshot `{}` already has a writer ({}: {e})",
                job.tag,
                lock.display()
            ))
        })?;
        let staging = fleet.store().stage(&job.tag)?;
        let _ = std::fs::remove_file(&job.socket);
        let listener = UnixListener::bind(&job.socket).map_err(|e| {
            CoreError::Config(format!("listening on {}: {e}", job.socket.display()))
        })?;
        Ok(Writer {
            job,
            listener,
            staging,
            _alive: alive,
        })
    }

    /// Receives, splits, verifies and publishes; records `ready` or `failed`.
    pub fn run(self, fleet: &Fleet) -> Result<(), CoreError> {
        let tag = self.job.tag.clone();
        let socket = self.job.socket.clone();
        let lock = writer_lock(&fleet.env().runtime, &tag);
        let r = self.receive_and_publish(fleet);
        let _ = std::fs::remove_file(socket);
        let _ = std::fs::remove_file(lock);
        let db = fleet.db();
        match &r {
            Ok(()) => db.set_snapshot_status(&tag, SnapshotStatus::Ready, None)?,
            Err(e) => db.set_snapshot_status(&tag, SnapshotStatus::Failed, Some(&e.to_string()))?,
        }
        r
    }

    fn receive_and_publish(self, fleet: &Fleet) -> Result<(), CoreError> {
        let fail = |what: &str, e: &dyn std::fmt::Display| {
            CoreError::Config(format!("branch `{}`: {what}: {e}", self.job.tag))
        };
        let stream = accept_within(&self.listener, Duration::from_secs(60))
            .map_err(|e| fail("QEMU never connected", &e))?;
        let dir = self.staging.path().to_path_buf();
        let ram_file = File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(dir.join(RAM_IMAGE))
            .map_err(|e| fail("creating the RAM image", &e))?;
        // A diff layer when the source runs from a parent image that is
        // still there; a full image otherwise.
        let base = match (&self.job.ram_base, &self.job.parent) {
            (Some(path), Some(_)) => File::open(path).ok(),
            _ => None,
        };
        let diff = base.is_some();
        let mut ram = match base {
            Some(base) => RamImage::with_base(ram_file, RAM_BLOCK, base),
            None => RamImage::new(ram_file, RAM_BLOCK),
        };
        let mut device = BufWriter::new(
            File::create(dir.join(DEVICE_STATE))
                .map_err(|e| fail("creating the device state", &e))?,
        );
        let mut input = BufReader::with_capacity(1 << 20, stream);
        let split = forkd_migstream::split(
            &mut input,
            &mut device,
            &mut ram,
            &forkd_migstream::Options::live_snapshot(RAM_BLOCK),
        );
        if let Err(e) = split {
            // Never cut QEMU off mid-stream: QEMU 7.2 leaves guest RAM
            // write-protected when a background snapshot fails, and the
            // source would hang on its next write. Take the rest of the
            // stream so that QEMU completes and unprotects RAM, then fail.
            let _ = std::io::copy(&mut input, &mut std::io::sink());
            return Err(fail("splitting the stream", &e));
        }
        device
            .flush()
            .map_err(|e| fail("writing the device state", &e))?;
        drop(device);
        if ram.is_empty() {
            return Err(fail("the stream", &"carried no RAM block `mem0`"));
        }
        if let Some(map) = ram
            .finish()
            .map_err(|e| fail("finishing the RAM layer", &e))?
        {
            std::fs::write(dir.join(crate::ramimage::LAYER_MAP), map.encode())
                .map_err(|e| fail("writing the RAM layer map", &e))?;
        }
        wait_completed(&self.job.qmp_socket)
            .map_err(|e| fail("QEMU did not complete the snapshot", &e))?;
        if let Some(disk) = &self.job.frozen_disk {
            crate::files::copy_sparse(disk, &dir.join(DISK_IMAGE))
                .map_err(|e| fail("copying the frozen disk", &e))?;
        }
        let pause_ms = fleet
            .db()
            .get_snapshot(&self.job.tag)?
            .and_then(|r| r.pause_ms)
            .unwrap_or(0.0);
        let manifest = Manifest {
            format: forkd_store::MANIFEST_FORMAT,
            tag: self.job.tag.clone(),
            created_at: forkd_store::unix_now(),
            parent: self.job.parent.clone(),
            source_sandbox: Some(self.job.source.clone()),
            pause_ms,
            ram_parent: if diff { self.job.parent.clone() } else { None },
            machine: self.job.machine.clone(),
            files: vec![],
        };
        self.staging.publish(manifest)?;
        Ok(())
    }
}

fn accept_within(l: &UnixListener, limit: Duration) -> std::io::Result<UnixStream> {
    l.set_nonblocking(true)?;
    let deadline = Instant::now() + limit;
    loop {
        match l.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(false)?;
                return Ok(s);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(2));
            }
            Err(e) => return Err(e),
        }
    }
}

/// Waits until QEMU reports the outgoing migration `completed`. The QMP
/// socket takes one client at a time: retry while the brancher holds it.
fn wait_completed(qmp_socket: &Path) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut qmp = loop {
        match forkd_vm::qmp::Qmp::connect(qmp_socket, Duration::from_secs(5)) {
            Ok(q) => break q,
            Err(e) if Instant::now() > deadline => return Err(e.to_string()),
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    };
    loop {
        let m = qmp
            .execute("query-migrate", None)
            .map_err(|e| e.to_string())?;
        match m["status"].as_str().unwrap_or("") {
            "completed" => return Ok(()),
            "failed" | "cancelled" => {
                return Err(m["error-desc"]
                    .as_str()
                    .unwrap_or("migration failed")
                    .to_string())
            }
            _ if Instant::now() > deadline => return Err("still running after 60 s".into()),
            _ => std::thread::sleep(Duration::from_millis(5)),
        }
    }
}

/// How the writer runs.
pub enum WriterLaunch {
    /// On a thread of this process (it must outlive the branch).
    Thread,
    /// In a detached process: `exe _branch-writer JOB_JSON`.
    Process(PathBuf),
}

impl Fleet {
    /// Branches sandbox `id` into snapshot `tag`. With `wait`, returns once the
    /// snapshot is ready (or failed); without, right after the pause.
    pub fn branch(
        &self,
        id: &str,
        tag: &str,
        mode: Mode,
        wait: bool,
        launch: WriterLaunch,
    ) -> Result<BranchInfo, CoreError> {
        forkd_store::validate_tag(tag)?;
        if mode == Mode::Full {
            let t = Instant::now();
            let info = self.snapshot(id, tag)?;
            return Ok(BranchInfo {
                tag: info.tag,
                mode,
                status: SnapshotStatus::Ready,
                pause_ms: info.pause_ms,
                qemu_downtime_ms: None,
                ready_ms: Some(t.elapsed().as_secs_f64() * 1000.0),
            });
        }
        let t_start = Instant::now();
        let (row, config) = self.sandbox(id)?;
        let ram = match &config.vm.memory {
            MemoryBackend::Anonymous => {
                return Err(CoreError::Config(format!(
                    "sandbox `{id}` has anonymous RAM and cannot be branched"
                )))
            }
            MemoryBackend::SharedFile(p) | MemoryBackend::PrivateFile(p) => p.clone(),
        };
        // Hugetlb RAM is in a memfd (not at `ram`) and can always be write-protected.
        if !config.vm.ram_in_hugetlb_memfd() && !crate::paths::is_tmpfs(&ram) {
            return Err(CoreError::Config(format!(
                "sandbox `{id}` keeps its RAM in {}, which is not on tmpfs: a live branch write-protects RAM with userfaultfd, which needs shmem. Use --mode full, or run sandboxes with FORKD_RUNTIME_DIR on tmpfs (e.g. /dev/shm/forkd)",
                ram.display()
            )));
        }
        let _lock = crate::fleet::lock_file(&row.run_dir.join("branch.lock")).map_err(|_| {
            CoreError::Busy(format!(
                "sandbox `{id}` is being branched right now; retry when that branch is done"
            ))
        })?;
        if let Some(busy) = self
            .db()
            .list_snapshots()?
            .into_iter()
            .find(|s| s.source.as_deref() == Some(id) && s.status == SnapshotStatus::Writing)
        {
            return Err(CoreError::Busy(format!(
                "sandbox `{id}` is still being branched into `{}` (status: writing); retry when `forkd snapshots` says it is ready",
                busy.tag
            )));
        }
        let vm = self.control(id)?;
        // A spawned child maps its snapshot's flat image privately: the
        // branch then needs to keep only the pages that differ from it.
        let ram_base = match (&config.vm.memory, &row.snapshot) {
            (MemoryBackend::PrivateFile(p), Some(_)) => Some(p.clone()),
            _ => None,
        };
        let frozen_disk = if config.vm.disks.is_empty() {
            None
        } else {
            Some(vm.disk_top(0)?)
        };
        let job = WriterJob {
            tag: tag.to_string(),
            source: id.to_string(),
            socket: row
                .run_dir
                .join(format!("branch-{}.sock", std::process::id())),
            qmp_socket: config.vm.qmp_socket.clone(),
            frozen_disk,
            machine: serde_json::to_value(&config).expect("config serialises"),
            parent: row.snapshot.clone(),
            ram_base,
            home: self.env().home.clone(),
            runtime: self.env().runtime.clone(),
        };
        // Claim the tag: from here on the snapshot exists as `writing`.
        self.db().insert_snapshot(&SnapshotRow {
            tag: tag.to_string(),
            status: SnapshotStatus::Writing,
            dir: self.store().dir(tag),
            parent: row.snapshot.clone(),
            source: Some(id.to_string()),
            created_at: forkd_store::unix_now(),
            pause_ms: None,
            error: None,
        })?;
        let writer = match self.start_writer(job.clone(), launch) {
            Ok(w) => w,
            Err(e) => {
                self.db()
                    .set_snapshot_status(tag, SnapshotStatus::Failed, Some(&e.to_string()))?;
                return Err(e);
            }
        };
        let paused = self.live_pause(&vm, &job);
        drop(vm); // frees QMP for the writer
        let (pause, downtime) = match paused {
            Ok(p) => p,
            Err(e) => {
                // Unblock a writer still waiting for QEMU; it records `failed`.
                let _ = UnixStream::connect(&job.socket);
                if let WriterHandle::Thread(h) = writer {
                    let _ = h.join();
                }
                let _ = self.db().set_snapshot_status(
                    tag,
                    SnapshotStatus::Failed,
                    Some(&e.to_string()),
                );
                return Err(e);
            }
        };
        let pause_ms = pause.as_secs_f64() * 1000.0;
        self.db().set_snapshot_pause(tag, pause_ms)?;
        let mut info = BranchInfo {
            tag: tag.to_string(),
            mode,
            status: SnapshotStatus::Writing,
            pause_ms,
            qemu_downtime_ms: downtime,
            ready_ms: None,
        };
        if wait {
            let status = self.wait_snapshot(tag, writer)?;
            info.status = status;
            info.ready_ms = Some(t_start.elapsed().as_secs_f64() * 1000.0);
            // QEMU reports the guest downtime once the snapshot completed.
            if info.qemu_downtime_ms.is_none() {
                info.qemu_downtime_ms =
                    forkd_vm::qmp::Qmp::connect(&config.vm.qmp_socket, Duration::from_secs(5))
                        .ok()
                        .and_then(|mut q| q.execute("query-migrate", None).ok())
                        .and_then(|m| m["downtime"].as_f64());
            }
            if status == SnapshotStatus::Failed {
                let err = self
                    .db()
                    .get_snapshot(tag)?
                    .and_then(|r| r.error)
                    .unwrap_or_default();
                return Err(CoreError::Config(format!("branch `{tag}` failed: {err}")));
            }
        }
        Ok(info)
    }

    fn start_writer(
        &self,
        job: WriterJob,
        launch: WriterLaunch,
    ) -> Result<WriterHandle, CoreError> {
        match launch {
            WriterLaunch::Thread => {
                let writer = Writer::prepare(self, job)?;
                let env = self.env().clone();
                let h = std::thread::Builder::new()
                    .name("branch-writer".into())
                    .spawn(move || {
                        // Its own database handle: the writer may outlive the caller's.
                        match Fleet::open(&env) {
                            Ok(f) => writer.run(&f),
                            Err(e) => Err(e),
                        }
                    })
                    .map_err(|e| CoreError::Config(format!("starting the branch writer: {e}")))?;
                Ok(WriterHandle::Thread(h))
            }
            WriterLaunch::Process(exe) => {
                let mut cmd = std::process::Command::new(exe);
                cmd.arg("_branch-writer")
                    .arg(serde_json::to_string(&job).expect("job serialises"));
                crate::spawn_detached(&mut cmd)
                    .map_err(|e| CoreError::Config(format!("starting the branch writer: {e}")))?;
                let deadline = Instant::now() + Duration::from_secs(10);
                while !job.socket.exists() {
                    if Instant::now() > deadline {
                        return Err(CoreError::Config("the branch writer did not start".into()));
                    }
                    std::thread::sleep(Duration::from_millis(2));
                }
                Ok(WriterHandle::Process)
            }
        }
    }

    /// The pause. Returns how long it was and QEMU's own downtime figure.
    fn live_pause(&self, vm: &Vm, job: &WriterJob) -> Result<(Duration, Option<f64>), CoreError> {
        let mut qmp = vm.qmp();
        qmp.execute(
            "migrate-set-capabilities",
            Some(serde_json::json!({ "capabilities": [
                { "capability": "x-ignore-shared", "state": false },
                { "capability": "background-snapshot", "state": true },
            ]})),
        )
        .map_err(forkd_vm::VmError::from)?;
        // QEMU's default cap of 128 MiB/s would make the copy take seconds.
        qmp.execute(
            "migrate-set-parameters",
            Some(serde_json::json!({ "max-bandwidth": 64u64 << 30 })),
        )
        .map_err(forkd_vm::VmError::from)?;
        drop(qmp);
        // Everything that can happen while the guest runs happens first:
        // the new overlay is created and attached before the pause.
        let prepared = if job.frozen_disk.is_some() {
            let next = vm.run_dir().join(format!("root-{}.qcow2", now_ns()));
            Some(vm.prepare_disk_snapshot(0, &next)?)
        } else {
            None
        };
        let t0 = Instant::now();
        vm.qmp().take_events();
        if let Err(e) = vm.qmp().stop() {
            if let Some(p) = prepared {
                vm.abandon_disk_snapshot(p);
            }
            return Err(forkd_vm::VmError::from(e).into());
        }
        let mut committed = false;
        let started = (|| -> Result<(), CoreError> {
            if let Some(p) = &prepared {
                vm.commit_disk_snapshot(p)?;
                committed = true;
            }
            vm.qmp()
                .execute(
                    "migrate",
                    Some(serde_json::json!({ "uri": format!("unix:{}", job.socket.display()) })),
                )
                .map_err(forkd_vm::VmError::from)?;
            Ok(())
        })();
        if let Err(e) = started {
            let _ = vm.qmp().cont();
            if let (Some(p), false) = (prepared, committed) {
                vm.abandon_disk_snapshot(p);
            }
            return Err(e);
        }
        // QEMU resumes the guest itself once RAM is write-protected. QMP can
        // be slow to answer while RAM streams, so the pause is measured with
        // the STOP and RESUME events' own timestamps, not by polling.
        let resumed = vm.qmp().wait_event("RESUME", Duration::from_secs(30));
        let resume = match resumed {
            Ok(ev) => ev,
            Err(e) => {
                let m = vm.qmp().execute("query-migrate", None).ok();
                let _ = vm.qmp().cont();
                let why = m
                    .and_then(|m| m["error-desc"].as_str().map(str::to_string))
                    .unwrap_or_else(|| e.to_string());
                return Err(CoreError::Config(format!(
                    "the live snapshot failed: {why}"
                )));
            }
        };
        let stop = vm.qmp().wait_event("STOP", Duration::from_secs(1)).ok();
        let pause = match (
            stop.as_ref().and_then(forkd_vm::qmp::event_time),
            forkd_vm::qmp::event_time(&resume),
        ) {
            (Some(a), Some(b)) if b >= a => Duration::from_secs_f64(b - a),
            _ => t0.elapsed(),
        };
        let downtime = vm
            .qmp()
            .execute("query-migrate", None)
            .ok()
            .and_then(|m| m["downtime"].as_f64());
        Ok((pause, downtime))
    }

    /// Waits until snapshot `tag` is no longer `writing`.
    fn wait_snapshot(&self, tag: &str, writer: WriterHandle) -> Result<SnapshotStatus, CoreError> {
        if let WriterHandle::Thread(h) = writer {
            let _ = h.join();
        }
        loop {
            let status = self
                .db()
                .get_snapshot(tag)?
                .map(|r| r.status)
                .unwrap_or(SnapshotStatus::Failed);
            if status != SnapshotStatus::Writing {
                return Ok(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// A running writer.
pub enum WriterHandle {
    Thread(std::thread::JoinHandle<Result<(), CoreError>>),
    Process,
}

/// Entry point of the detached writer process (`forkd _branch-writer JOB`).
pub fn run_writer_process(job_json: &str) -> Result<(), CoreError> {
    let job: WriterJob = serde_json::from_str(job_json)
        .map_err(|e| CoreError::Config(format!("bad writer job: {e}")))?;
    let env = crate::Env {
        home: job.home.clone(),
        runtime: job.runtime.clone(),
    };
    let fleet = Fleet::open(&env)?;
    let tag = job.tag.clone();
    match Writer::prepare(&fleet, job) {
        Ok(w) => w.run(&fleet),
        Err(e) => {
            fleet
                .db()
                .set_snapshot_status(&tag, SnapshotStatus::Failed, Some(&e.to_string()))?;
            Err(e)
        }
    }
}

fn now_ns() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

/// What [`Fleet::recover`] found and did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Recovery {
    /// Sandboxes whose QEMU still runs.
    pub running: Vec<String>,
    /// Sandboxes whose QEMU is gone (marked dead).
    pub dead: Vec<String>,
    /// `writing` snapshots whose writer still runs (they finish by themselves).
    pub writing: Vec<String>,
    /// `writing` snapshots whose writer is gone (marked failed).
    pub failed: Vec<String>,
}

impl Fleet {
    /// Brings the state database in line with the processes that exist,
    /// after a crash or restart of whatever drove the fleet: sandboxes whose
    /// QEMU is gone are marked dead (running ones are left alone), and
    /// `writing` snapshots whose writer is gone are marked failed, their
    /// staging removed. Writers that still run are left to finish.
    pub fn recover(&self) -> Result<Recovery, CoreError> {
        let mut out = Recovery::default();
        for s in self.list()? {
            match s.state.as_str() {
                "dead" => out.dead.push(s.id),
                _ => out.running.push(s.id),
            }
        }
        let now = forkd_store::unix_now();
        let snapshots = self.db().list_snapshots()?;
        for snap in snapshots {
            if snap.status != SnapshotStatus::Writing {
                continue;
            }
            let lock = writer_lock(&self.env().runtime, &snap.tag);
            // A writer takes its lock within milliseconds of the row being
            // written; a young row may not have one yet.
            let orphaned = now.saturating_sub(snap.created_at) > 10
                && match crate::fleet::lock_file(&lock) {
                    Ok(_held) => true,
                    Err(e) => e.raw_os_error() != Some(libc::EWOULDBLOCK),
                };
            if orphaned {
                let _ = std::fs::remove_file(&lock);
                self.db().set_snapshot_status(
                    &snap.tag,
                    SnapshotStatus::Failed,
                    Some("its writer died before it was complete (recovered after a restart)"),
                )?;
                out.failed.push(snap.tag);
            } else {
                out.writing.push(snap.tag);
            }
        }
        self.store().sweep_staging();
        Ok(out)
    }
}
