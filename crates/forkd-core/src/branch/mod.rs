//! Live BRANCH: snapshot a running sandbox with a pause that does not grow
//! with its memory.
//!
//! The pause belongs to forkd-vm ([`forkd_vm::Vm::live_snapshot`]): stop,
//! freeze the disk (a new overlay prepared while the guest ran becomes its
//! top), `migrate` with QEMU's `background-snapshot` capability. QEMU saves
//! the device state, write-protects guest RAM with userfaultfd and resumes
//! the guest by itself; RAM then streams out while the guest runs (a page the
//! guest writes is copied out before the write proceeds) into a
//! [`writer::Writer`]. The snapshot is `writing` until the writer has
//! published it; then `ready`; on any failure `failed`, with nothing
//! published. The source never stops for the copy and is never harmed by a
//! failed branch: whoever records the failure first releases the source's
//! memory if the failed stream left it write-protected (QEMU 7.2 does not,
//! see [`forkd_vm::unfreeze`]) and resumes it if it was left paused
//! ([`Fleet::fail_branch`]). That is the writer itself, its guard (the
//! process that started it and waits for it, [`guard`]), a waiting
//! brancher, or any later forkd command ([`Fleet::reconcile`]).

mod guard;
mod writer;

use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use forkd_ops::{BranchMode, BranchOutcome, SnapshotStatus};
use forkd_vm::MemoryBackend;

pub use guard::supervise_writer;
pub use writer::{run_writer, writer_gone, writer_lock, writer_pid, Writer, WriterJob, RAM_BLOCK};

use crate::fleet::Fleet;
use crate::helper::{self, Job};
use crate::CoreError;

/// How the writer of one branch runs.
enum WriterHandle {
    /// On a thread of this process.
    Thread(std::thread::JoinHandle<Result<(), CoreError>>),
    /// In a detached helper process.
    Helper,
}

impl Fleet {
    /// Branches sandbox `id` into snapshot `tag`. With `wait`, returns once
    /// the snapshot is ready (or failed); without, right after the pause.
    /// `expect_parent`, when set, must be the snapshot the source runs from.
    pub fn branch(
        &self,
        id: &str,
        tag: &str,
        mode: BranchMode,
        wait: bool,
        expect_parent: Option<&str>,
    ) -> Result<BranchOutcome, CoreError> {
        forkd_store::validate_tag(tag)?;
        let (row, config) = self.sandbox(id)?;
        if let Some(expected) = expect_parent {
            if row.snapshot.as_deref() != Some(expected) {
                return Err(CoreError::WrongParent {
                    id: id.into(),
                    runs_from: row.snapshot.clone(),
                    expected: expected.into(),
                });
            }
        }
        if mode == BranchMode::Full {
            return self.snapshot(id, tag);
        }
        let t_start = Instant::now();
        let ram = match &config.vm.memory {
            MemoryBackend::Anonymous => {
                return Err(CoreError::NotLiveBranchable {
                    id: id.into(),
                    reason: "its RAM is anonymous memory".into(),
                })
            }
            MemoryBackend::SharedFile(p) | MemoryBackend::PrivateFile(p) => p.clone(),
        };
        // Hugetlb RAM is in a memfd (not at `ram`) and can always be write-protected.
        if !config.vm.ram_in_hugetlb_memfd() && !crate::paths::is_tmpfs(&ram) {
            return Err(CoreError::NotLiveBranchable {
                id: id.into(),
                reason: format!(
                    "it keeps its RAM in {}, which is not on tmpfs (userfaultfd write-protect needs shmem); branch it in full mode, or run sandboxes with FORKD_RUNTIME_DIR on tmpfs",
                    ram.display()
                ),
            });
        }
        let _lock = self.branch_lock(id, &row.run_dir)?;
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
            source_pid: row.pid,
            source_pid_start: row.pid_start,
            source_run_dir: row.run_dir.clone(),
            source_vm: config.vm.clone(),
            socket: row
                .run_dir
                .join(format!("branch-{}.sock", crate::fleet::unix_now_ns())),
            frozen_disk,
            machine: serde_json::to_value(&config).expect("config serialises"),
            parent: row.snapshot.clone(),
            ram_base,
            home: self.env().home.clone(),
            runtime: self.env().runtime.clone(),
            brancher: forkd_vm::process::process_start_time(std::process::id())
                .map(|start| (std::process::id(), start)),
        };
        // Claim the tag: from here on the snapshot exists as `writing`. The
        // claim's lock goes to the writer, which takes it in its turn.
        drop(self.claim_tag(tag, id, row.snapshot.as_deref())?);
        let fail = |e: CoreError| {
            let _ = self.fail_branch(tag, &e.to_string());
            e
        };
        let writer = self.start_writer(job.clone()).map_err(fail)?;
        // Everything that can happen while the guest runs happens first:
        // the new overlay is created and attached before the pause.
        let paused = (|| {
            let disk = match job.frozen_disk {
                Some(_) => {
                    let next = vm
                        .run_dir()
                        .join(format!("root-{}.qcow2", crate::fleet::unix_now_ns()));
                    Some(vm.prepare_disk_snapshot(0, &next)?)
                }
                None => None,
            };
            vm.live_snapshot(&job.socket, disk)
        })();
        drop(vm); // frees QMP for the writer
        let pause = match paused {
            Ok(p) => p.pause,
            Err(e) => {
                // Unblock a writer still waiting for QEMU; it records `failed`.
                let _ = UnixStream::connect(&job.socket);
                if let WriterHandle::Thread(h) = writer {
                    let _ = h.join();
                }
                return Err(fail(e.into()));
            }
        };
        let pause_ms = forkd_ops::Snapshot::pause_to_us(pause.as_secs_f64() * 1000.0);
        self.db().set_snapshot_pause(tag, pause_ms)?;
        let mut outcome = BranchOutcome {
            snapshot: self.snapshot_view_of(tag)?,
            mode,
            pause_ms,
            qemu_downtime_ms: None,
            ready_ms: None,
            ram_copied: None,
        };
        if wait {
            let status = self.wait_written(tag, writer)?;
            outcome.ready_ms = Some(t_start.elapsed().as_secs_f64() * 1000.0);
            outcome.snapshot = self.snapshot_view_of(tag)?;
            if status == SnapshotStatus::Failed {
                return Err(CoreError::BranchFailed {
                    tag: tag.into(),
                    reason: outcome.snapshot.error.unwrap_or_default(),
                });
            }
            // QEMU reports the guest downtime once the snapshot completed:
            // its own part of the pause (forkd stopped the guest first), in
            // whole ms. QEMU 7.2 stores it when it resumes the guest, and
            // when that rounds to 0 overwrites it at completion with the
            // time until the end of the stream: a figure longer than the
            // pause it is part of is that one, and is not a downtime.
            outcome.qemu_downtime_ms = self
                .control(id)
                .ok()
                .and_then(|vm| vm.migration_info().ok())
                .and_then(|m| m.downtime_ms)
                .filter(|d| *d <= pause_ms.ceil());
        }
        Ok(outcome)
    }

    /// Takes sandbox `id`'s branch lock and checks no snapshot of it is
    /// being written: one snapshot of a sandbox at a time, full or live.
    pub(crate) fn branch_lock(
        &self,
        id: &str,
        run_dir: &std::path::Path,
    ) -> Result<std::fs::File, CoreError> {
        let lock = crate::fleet::lock_file(&run_dir.join("branch.lock")).map_err(|_| {
            CoreError::BranchInProgress {
                id: id.into(),
                into: None,
            }
        })?;
        if let Some(busy) = self
            .db()
            .snapshots_from_source(id)?
            .into_iter()
            .find(|s| s.status == SnapshotStatus::Writing)
        {
            return Err(CoreError::BranchInProgress {
                id: id.into(),
                into: Some(busy.tag),
            });
        }
        Ok(lock)
    }

    /// Starts the writer: in a detached helper when this process can host
    /// one (it then outlives the caller), else on a thread.
    fn start_writer(&self, job: WriterJob) -> Result<WriterHandle, CoreError> {
        if helper::can_host() {
            let socket = job.socket.clone();
            helper::start(&Job::BranchWriter(Box::new(job)))?;
            let deadline = Instant::now() + Duration::from_secs(10);
            while !socket.exists() {
                if Instant::now() > deadline {
                    return Err(CoreError::Writer(
                        "the writer helper did not start listening within 10 s".into(),
                    ));
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            return Ok(WriterHandle::Helper);
        }
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
            .map_err(|e| CoreError::Writer(format!("starting a writer thread: {e}")))?;
        Ok(WriterHandle::Thread(h))
    }

    /// Waits until snapshot `tag` is no longer `writing`.
    fn wait_written(&self, tag: &str, writer: WriterHandle) -> Result<SnapshotStatus, CoreError> {
        if let WriterHandle::Thread(h) = writer {
            let _ = h.join();
        }
        let status = || -> Result<SnapshotStatus, CoreError> {
            Ok(self
                .db()
                .get_snapshot(tag)?
                .map(|r| r.status)
                .unwrap_or(SnapshotStatus::Failed))
        };
        let mut checked = Instant::now();
        loop {
            let now = status()?;
            if now != SnapshotStatus::Writing {
                return Ok(now);
            }
            // A helper that died never finishes: do not wait for it forever.
            if checked.elapsed() > Duration::from_millis(500) {
                checked = Instant::now();
                if writer_gone(&self.env().runtime, tag) && status()? == SnapshotStatus::Writing {
                    self.fail_branch(tag, "its writer died before the snapshot was complete")?;
                    return Ok(SnapshotStatus::Failed);
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}
