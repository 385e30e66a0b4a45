//! The receiving end of a live branch: listens on a UNIX socket, takes the
//! background-snapshot stream QEMU sends, splits it as it arrives
//! (`forkd-migstream`: pages into a sparse `ram.img` or a diff layer,
//! everything else into a device-state stream children load with
//! `x-ignore-shared`), confirms with QEMU that the snapshot completed, copies
//! the frozen disk and publishes the snapshot atomically. The snapshot row is
//! `writing` until then, `ready` or `failed` after.
//!
//! A writer runs on a thread of the brancher, or in a process of its own
//! started by a detached guard ([`super::guard`]) when the brancher can host
//! helpers ([`crate::helper`]), so that it outlives the call that started
//! the branch and its death never goes unnoticed.

use std::fs::File;
use std::io::{BufReader, BufWriter, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use forkd_ops::SnapshotStatus;
use forkd_store::Manifest;
use forkd_vm::{Vm, VmConfig};
use serde::{Deserialize, Serialize};

use crate::fleet::{Fleet, DEVICE_STATE, DISK_IMAGE, RAM_IMAGE};
use crate::ramimage::RamImage;
use crate::{CoreError, Env};

/// The RAM block QEMU names after our memory backend (`-object ...,id=mem0`).
pub const RAM_BLOCK: &str = "mem0";

/// How long QEMU has to connect after the writer is ready.
const CONNECT_LIMIT: Duration = Duration::from_secs(60);
/// How long QEMU has to report the snapshot complete once the stream ended.
const COMPLETE_LIMIT: Duration = Duration::from_secs(60);

/// Everything a writer needs; serialisable so a detached helper can run it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WriterJob {
    pub tag: String,
    /// The sandbox being branched.
    pub source: String,
    pub source_pid: u32,
    pub source_pid_start: u64,
    pub source_run_dir: PathBuf,
    pub source_vm: VmConfig,
    /// The writer listens here; QEMU connects and streams.
    pub socket: PathBuf,
    /// The disk file frozen at the pause (copied into the snapshot).
    pub frozen_disk: Option<PathBuf>,
    /// The source's recorded configuration (the snapshot's machine).
    pub machine: serde_json::Value,
    pub parent: Option<String>,
    /// The flat RAM image the source was started from (snapshot `parent`'s):
    /// when set, the branch stores only the pages that differ from it.
    #[serde(default)]
    pub ram_base: Option<PathBuf>,
    pub home: PathBuf,
    pub runtime: PathBuf,
    /// The process that pauses the source and starts QEMU's stream (pid,
    /// start time): if it dies before the stream begins, the source is
    /// left stopped and nothing would ever resume it but the writer.
    #[serde(default)]
    pub brancher: Option<(u32, u64)>,
}

/// The lock a live writer of snapshot `tag` holds.
pub fn writer_lock(runtime: &Path, tag: &str) -> PathBuf {
    runtime.join("writers").join(format!("{tag}.lock"))
}

/// The pid of the process writing snapshot `tag`, as its lock file says
/// (for diagnosis and fault-injection tests).
pub fn writer_pid(runtime: &Path, tag: &str) -> Option<u32> {
    std::fs::read_to_string(writer_lock(runtime, tag))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Whether the writer of snapshot `tag` is gone (its lock is free). A
/// writer records its outcome before it lets go of the lock, so a row still
/// `writing` whose writer is gone will never be finished.
pub fn writer_gone(runtime: &Path, tag: &str) -> bool {
    match crate::fleet::lock_file(&writer_lock(runtime, tag)) {
        Ok(_free) => true,
        Err(e) => e.raw_os_error() != Some(libc::EWOULDBLOCK),
    }
}

/// Receives one live-snapshot stream and publishes it as snapshot `job.tag`.
pub struct Writer {
    job: WriterJob,
    listener: UnixListener,
    staging: forkd_store::Staging,
    /// Held while this writer lives; [`Fleet::recover`] fails `writing`
    /// snapshots whose lock is free (their writer died).
    _alive: File,
}

impl Writer {
    /// Takes the writer lock, creates the staging directory and starts
    /// listening. Once this returns, QEMU may connect: the socket appears at
    /// `job.socket` only when it listens.
    pub fn prepare(fleet: &Fleet, job: WriterJob) -> Result<Writer, CoreError> {
        let lock = writer_lock(&fleet.env().runtime, &job.tag);
        let lock_dir = lock.parent().expect("has a parent");
        std::fs::create_dir_all(lock_dir).map_err(CoreError::host("creating", lock_dir))?;
        let mut alive = crate::fleet::lock_file(&lock).map_err(|e| {
            CoreError::Writer(format!(
                "snapshot `{}` already has a writer ({}: {e})",
                job.tag,
                lock.display()
            ))
        })?;
        let _ = alive.set_len(0);
        let _ = writeln!(alive, "{}", std::process::id());
        let staging = fleet.store().stage(&job.tag)?;
        let pending = job.socket.with_extension("pending");
        let _ = std::fs::remove_file(&pending);
        let listener =
            UnixListener::bind(&pending).map_err(CoreError::host("listening on", &pending))?;
        std::fs::rename(&pending, &job.socket)
            .map_err(CoreError::host("publishing the socket", &job.socket))?;
        Ok(Writer {
            job,
            listener,
            staging,
            _alive: alive,
        })
    }

    /// Receives, splits, confirms and publishes; records `ready` or `failed`.
    pub fn run(self, fleet: &Fleet) -> Result<(), CoreError> {
        let tag = self.job.tag.clone();
        let socket = self.job.socket.clone();
        let lock = writer_lock(&fleet.env().runtime, &tag);
        // The lock outlives the receiving (a duplicate holds it): it is let
        // go only once the outcome is recorded.
        let held = self._alive.try_clone();
        let r = self.receive_and_publish(fleet);
        // The status first: whoever finds the lock free must find the row
        // no longer `writing` ([`writer_gone`]). A failure releases the
        // source first, if the failed stream left it write-protected.
        let recorded = match &r {
            Ok(parent) => {
                let ready = {
                    let db = fleet.db();
                    db.set_snapshot_parent(&tag, parent.as_deref())
                        .and_then(|()| {
                            db.transition_snapshot(
                                &tag,
                                SnapshotStatus::Writing,
                                SnapshotStatus::Ready,
                                None,
                            )
                        })
                        .map_err(CoreError::from)
                };
                match ready {
                    // Someone failed the branch meanwhile (its brancher gave
                    // up on it): what was published goes, as the row says.
                    Ok(false) => fleet
                        .store()
                        .remove_if_present(&tag)
                        .map(drop)
                        .map_err(CoreError::from),
                    other => other.map(drop),
                }
            }
            Err(e) => fleet.fail_branch(&tag, &e.to_string()).map(drop),
        };
        let _ = std::fs::remove_file(socket);
        let _ = std::fs::remove_file(lock);
        drop(held);
        recorded?;
        r.map(drop)
    }

    /// Returns the snapshot the new one is layered on.
    fn receive_and_publish(self, fleet: &Fleet) -> Result<Option<String>, CoreError> {
        let tag = self.job.tag.clone();
        let fail = |what: &str, e: &dyn std::fmt::Display| CoreError::BranchFailed {
            tag: tag.clone(),
            reason: format!("{what}: {e}"),
        };
        let stream = accept_within(&self.listener, CONNECT_LIMIT)
            .map_err(|e| fail("QEMU never connected", &e))?;
        if let Err(e) = wait_for_stream(&stream, self.job.brancher) {
            // Failing the branch releases the source: resumed if paused.
            return Err(fail("no stream", &e));
        }
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
        // The stream's own end marker catches most truncations; QEMU's word
        // that the migration completed catches the rest.
        let source = Vm::attach_control(
            self.job.source_vm.clone(),
            self.job.source_pid,
            self.job.source_pid_start,
            &self.job.source_run_dir,
        )
        .map_err(|e| fail("asking QEMU whether the snapshot completed", &e))?;
        source
            .wait_migration(COMPLETE_LIMIT)
            .map_err(|e| fail("QEMU did not complete the snapshot", &e))?;
        drop(source);
        let mut parent = self.job.parent.clone();
        if let Some(disk) = &self.job.frozen_disk {
            let copy = dir.join(DISK_IMAGE);
            crate::files::copy_sparse(disk, &copy)
                .map_err(|e| fail("copying the frozen disk", &e))?;
            if let Some(below) = fleet
                .detach_disk(&self.job.source, &self.job.source_run_dir, &copy)
                .map_err(|e| fail("making the disk independent of the source", &e))?
            {
                parent = Some(below);
            }
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
            parent: parent.clone(),
            source_sandbox: Some(self.job.source.clone()),
            pause_ms,
            ram_parent: if diff { self.job.parent.clone() } else { None },
            disk_from: self
                .job
                .frozen_disk
                .as_ref()
                .map(|p| p.to_string_lossy().into_owned()),
            machine: self.job.machine.clone(),
            files: vec![],
            origin: None,
        };
        self.staging.publish(manifest)?;
        Ok(parent)
    }
}

/// Waits until QEMU's stream has a first byte (or ended) on `stream`, for
/// as long as the brancher lives: the connection exists before the pause
/// (QEMU holds the other end), and a brancher that dies between stopping
/// the guest and `migrate` leaves a stream that never starts. Its death
/// is noticed within a second and, with a grace period for a `migrate`
/// it sent just before, ends the wait with an error.
fn wait_for_stream(stream: &UnixStream, brancher: Option<(u32, u64)>) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    const TICK_MS: libc::c_int = 1000;
    const GRACE: Duration = Duration::from_secs(3);
    let mut dead_since: Option<Instant> = None;
    loop {
        let mut fds = [libc::pollfd {
            fd: stream.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        }];
        // SAFETY: one valid pollfd for an fd `stream` keeps open.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 1, TICK_MS) };
        if n > 0 {
            // Readable, ended or broken: the stream's reader takes it on.
            return Ok(());
        }
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        let alive = brancher.is_none_or(|(pid, start)| forkd_vm::process::pid_alive(pid, start));
        if alive {
            continue;
        }
        let since = *dead_since.get_or_insert_with(Instant::now);
        if since.elapsed() >= GRACE {
            return Err(std::io::Error::other(
                "the brancher died while the source was paused, before QEMU began the stream",
            ));
        }
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

/// Runs a writer job to its end (the body of a detached writer helper).
pub fn run_writer(job: WriterJob) -> Result<(), CoreError> {
    let fleet = Fleet::open(&Env {
        home: job.home.clone(),
        runtime: job.runtime.clone(),
    })?;
    let tag = job.tag.clone();
    match Writer::prepare(&fleet, job) {
        Ok(w) => w.run(&fleet),
        Err(e) => {
            fleet.fail_branch(&tag, &e.to_string())?;
            Err(e)
        }
    }
}
