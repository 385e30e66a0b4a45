//! QEMU migration, the only place forkd uses it: saving and loading a VM's
//! device state (guest RAM stays in its file: `x-ignore-shared`), and the
//! live background snapshot that streams RAM out while the guest runs.
//!
//! Capabilities are set before every use, because QEMU keeps them from one
//! migration to the next (a live branch leaves `background-snapshot` on,
//! which would turn the next device-state save into another live snapshot).
//! Streams go to file descriptors handed to QEMU over QMP (`getfd`) or to a
//! UNIX socket: QEMU never runs a shell (`exec:` URIs), so a seccomp filter
//! that forbids it to spawn processes does not get in the way. Every wait for
//! a migration goes through one poller, [`wait_finished`].

use std::fs::File;
use std::os::unix::io::AsFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::config::MemoryBackend;
use crate::disk::PreparedDiskSnapshot;
use crate::populate::{self, RamName};
use crate::qmp::{event_time, Qmp, QmpError};
use crate::vm::Vm;
use crate::VmError;

/// Where an outgoing migration stands (`query-migrate`'s `status`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MigrationStatus {
    /// No migration has run.
    None,
    /// Setting up, running, or in any intermediate state QEMU reports.
    Active(String),
    Completed,
    Failed,
    Cancelled,
}

impl MigrationStatus {
    fn parse(s: &str) -> MigrationStatus {
        match s {
            "" | "none" => MigrationStatus::None,
            "completed" => MigrationStatus::Completed,
            "failed" => MigrationStatus::Failed,
            "cancelled" => MigrationStatus::Cancelled,
            other => MigrationStatus::Active(other.to_string()),
        }
    }
}

/// What QEMU says about its outgoing migration.
#[derive(Debug, Clone, PartialEq)]
pub struct MigrationInfo {
    pub status: MigrationStatus,
    /// Guest downtime in milliseconds, once QEMU knows it.
    pub downtime_ms: Option<f64>,
    /// QEMU's reason, for a failed migration.
    pub error: Option<String>,
    /// Guest RAM pages written to the stream so far (non-zero and zero).
    pub ram_pages: u64,
}

impl MigrationInfo {
    fn from_qmp(v: &Value) -> MigrationInfo {
        let pages = |k: &str| v["ram"][k].as_u64().unwrap_or(0);
        MigrationInfo {
            status: MigrationStatus::parse(v["status"].as_str().unwrap_or("")),
            downtime_ms: v["downtime"].as_f64(),
            error: v["error-desc"].as_str().map(str::to_string),
            ram_pages: pages("normal") + pages("duplicate"),
        }
    }

    /// Whether a background snapshot has write-protected guest RAM and
    /// scheduled the guest's resume: QEMU writes pages only after that
    /// (and a finished snapshot is past it).
    fn past_the_pause(&self) -> bool {
        self.ram_pages > 0 || self.status == MigrationStatus::Completed
    }
}

/// How long a live snapshot paused its guest.
#[derive(Debug, Clone)]
pub struct LivePause {
    /// From STOP to RESUME, by QEMU's own event timestamps.
    pub pause: Duration,
    /// The disk image frozen at the pause, when a disk was prepared.
    pub frozen_disk: Option<PathBuf>,
    /// How long populating guest RAM took before the pause, while the guest
    /// ran ([`crate::populate`]); `None` for anonymous RAM.
    pub populated_in: Option<Duration>,
}

/// What a stopped snapshot (pause, save, copy, resume) did.
#[derive(Debug, Clone)]
pub struct StoppedSnapshot<T> {
    pub pause: Duration,
    pub frozen_disk: Option<PathBuf>,
    /// What the caller's copy inside the pause returned.
    pub copied: T,
}

/// The capability sets forkd migrates with.
#[derive(Debug, Clone, Copy)]
enum Purpose {
    /// Device state only; RAM is in a file the other side maps.
    DeviceState,
    /// A live snapshot: RAM streams out while the guest runs.
    BackgroundSnapshot,
}

fn set_capabilities(qmp: &mut Qmp, purpose: Purpose) -> Result<(), VmError> {
    let (ignore_shared, background) = match purpose {
        Purpose::DeviceState => (true, false),
        Purpose::BackgroundSnapshot => (false, true),
    };
    qmp.execute(
        "migrate-set-capabilities",
        Some(json!({ "capabilities": [
            { "capability": "background-snapshot", "state": background },
            { "capability": "x-ignore-shared", "state": ignore_shared },
        ]})),
    )?;
    if let Purpose::BackgroundSnapshot = purpose {
        // QEMU's default cap of 128 MiB/s would make the copy take seconds.
        qmp.execute(
            "migrate-set-parameters",
            Some(json!({ "max-bandwidth": 64u64 << 30 })),
        )?;
    }
    Ok(())
}

fn query(qmp: &mut Qmp) -> Result<MigrationInfo, VmError> {
    Ok(MigrationInfo::from_qmp(
        &qmp.execute("query-migrate", None)?,
    ))
}

/// The one poller: waits until the outgoing migration is over. `Completed`
/// is success; `Failed` or `Cancelled` an error naming `what` and QEMU's
/// reason; a deadline passed, an error too.
pub(crate) fn wait_finished(
    qmp: &mut Qmp,
    deadline: Instant,
    what: &'static str,
) -> Result<MigrationInfo, VmError> {
    loop {
        let info = query(qmp)?;
        match info.status {
            MigrationStatus::Completed => return Ok(info),
            MigrationStatus::Failed | MigrationStatus::Cancelled => {
                return Err(VmError::Migration {
                    what,
                    reason: info
                        .error
                        .unwrap_or_else(|| format!("QEMU reports it {:?}", info.status)),
                })
            }
            MigrationStatus::None | MigrationStatus::Active(_) => {}
        }
        if Instant::now() > deadline {
            return Err(VmError::Migration {
                what,
                reason: "it did not finish in time".into(),
            });
        }
        std::thread::sleep(Duration::from_micros(500));
    }
}

/// Loads a device-state file into a QEMU started with `-incoming defer` and
/// waits until the guest runs.
pub(crate) fn restore_device_state(
    qmp: &mut Qmp,
    state: &Path,
    deadline: Instant,
) -> Result<(), VmError> {
    const WHAT: &str = "restoring the device state";
    let file = File::open(state).map_err(|e| VmError::Migration {
        what: WHAT,
        reason: format!("{}: {e}", state.display()),
    })?;
    // The guest may run as soon as its state is in: bound its console first.
    crate::console::bound(qmp)?;
    set_capabilities(qmp, Purpose::DeviceState)?;
    qmp.send_fd("forkd-incoming", file.as_fd())?;
    drop(file); // QEMU holds its own copy now
    qmp.execute(
        "migrate-incoming",
        Some(json!({ "uri": "fd:forkd-incoming" })),
    )?;
    loop {
        if qmp.status()? == "running" {
            return Ok(());
        }
        let info = query(qmp)?;
        match info.status {
            // The state was saved from a paused source and QEMU restores the
            // run state with it: the guest continues only when told to.
            MigrationStatus::Completed => return Ok(qmp.cont()?),
            MigrationStatus::Failed | MigrationStatus::Cancelled => {
                return Err(VmError::Migration {
                    what: WHAT,
                    reason: info.error.unwrap_or_else(|| "migration failed".into()),
                })
            }
            _ => {}
        }
        if Instant::now() > deadline {
            return Err(VmError::Migration {
                what: WHAT,
                reason: "the guest was not running before the deadline".into(),
            });
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

impl Vm {
    /// Saves the device state (no RAM: guest RAM must be a shared file) to
    /// `path`. The guest must be paused; QEMU is left in `postmigrate` and
    /// resumes with `cont`.
    pub fn save_device_state(&self, path: &Path) -> Result<(), VmError> {
        const WHAT: &str = "saving the device state";
        let file = File::create(path).map_err(|e| VmError::Migration {
            what: WHAT,
            reason: format!("{}: {e}", path.display()),
        })?;
        let mut qmp = self.qmp();
        set_capabilities(&mut qmp, Purpose::DeviceState)?;
        qmp.send_fd("forkd-outgoing", file.as_fd())?;
        drop(file);
        qmp.execute("migrate", Some(json!({ "uri": "fd:forkd-outgoing" })))?;
        wait_finished(&mut qmp, Instant::now() + Duration::from_secs(60), WHAT).map(drop)
    }

    /// Stops the guest and makes the prepared overlay the disk's top, so
    /// that the disk freezes at this instant (the first steps of both kinds
    /// of snapshot). Returns the frozen image. On failure the guest runs on
    /// and an overlay that was not swapped in is detached and deleted.
    fn stop_and_freeze_disk(
        &self,
        disk: Option<PreparedDiskSnapshot>,
    ) -> Result<Option<PathBuf>, VmError> {
        if let Err(e) = self.qmp().stop() {
            if let Some(d) = disk {
                self.abandon_disk_snapshot(d);
            }
            return Err(e.into());
        }
        let Some(d) = disk else {
            return Ok(None);
        };
        match self.commit_disk_snapshot(&d) {
            Ok(frozen) => Ok(Some(frozen)),
            Err(e) => {
                let _ = self.qmp().cont();
                self.abandon_disk_snapshot(d);
                Err(e)
            }
        }
    }

    /// A snapshot with the guest stopped: pauses it, freezes the prepared
    /// disk, saves the device state to `device_state`, runs `copy` (the
    /// caller copies guest RAM), and resumes the guest whatever happened.
    /// The pause contains all of it.
    pub fn stopped_snapshot<T>(
        &self,
        device_state: &Path,
        disk: Option<PreparedDiskSnapshot>,
        copy: impl FnOnce() -> Result<T, VmError>,
    ) -> Result<StoppedSnapshot<T>, VmError> {
        let t0 = Instant::now();
        let frozen_disk = self.stop_and_freeze_disk(disk)?;
        let inside = self.save_device_state(device_state).and_then(|()| copy());
        // Resume whatever happened: the sandbox must keep running.
        let resumed = self.qmp().cont();
        let pause = t0.elapsed();
        let copied = inside?;
        resumed?;
        Ok(StoppedSnapshot {
            pause,
            frozen_disk,
            copied,
        })
    }

    /// A live snapshot: pauses the guest, freezes the prepared disk, and
    /// starts a background snapshot streamed to the UNIX socket `target`
    /// (someone must be listening there; we connect and pass QEMU the fd). QEMU saves the device state,
    /// write-protects guest RAM and resumes the guest by itself; RAM then
    /// streams out while the guest runs. Returns once the guest runs again.
    /// Finishing the stream is the listener's business; [`Vm::wait_migration`]
    /// tells when QEMU is done.
    pub fn live_snapshot(
        &self,
        target: &Path,
        disk: Option<PreparedDiskSnapshot>,
    ) -> Result<LivePause, VmError> {
        const WHAT: &str = "the live snapshot";
        if let Some(reason) = crate::confine::userfaultfd_denied(self.pid()) {
            return Err(VmError::Migration { what: WHAT, reason });
        }
        // QEMU populates guest RAM before it write-protects it; doing it
        // first, while the guest runs, keeps it out of the pause below.
        let populated_in = match self.populate_guest_ram() {
            Ok(t) => t,
            Err(e) => {
                if let Some(d) = disk {
                    self.abandon_disk_snapshot(d);
                }
                return Err(e);
            }
        };
        set_capabilities(&mut self.qmp(), Purpose::BackgroundSnapshot)?;
        // We connect and hand QEMU the connection: a QEMU that dropped its
        // privileges could not open the listener's socket itself.
        let stream =
            std::os::unix::net::UnixStream::connect(target).map_err(|e| VmError::Migration {
                what: WHAT,
                reason: format!("connecting to {}: {e}", target.display()),
            })?;
        self.qmp().send_fd("forkd-live", stream.as_fd())?;
        drop(stream);
        let t0 = Instant::now();
        self.qmp().take_events();
        // The writer must see the stream end, not wait on an fd QEMU keeps.
        let close_stream = || {
            let _ = self
                .qmp()
                .execute("closefd", Some(json!({ "fdname": "forkd-live" })));
        };
        let frozen_disk = match self.stop_and_freeze_disk(disk) {
            Ok(f) => f,
            Err(e) => {
                close_stream();
                return Err(e);
            }
        };
        crate::faultpoint::reached(STOP_BEFORE_MIGRATE);
        if let Err(e) = self
            .qmp()
            .execute("migrate", Some(json!({ "uri": "fd:forkd-live" })))
        {
            close_stream();
            let _ = self.qmp().cont();
            return Err(e.into());
        }
        // QMP can be slow to answer while RAM streams, so the pause is
        // measured with the STOP and RESUME events' own timestamps.
        let resume = match self.await_resume(Instant::now() + Duration::from_secs(30)) {
            Ok(ev) => ev,
            Err(e) => {
                let why = query(&mut self.qmp())
                    .ok()
                    .and_then(|i| i.error)
                    .unwrap_or_else(|| e.to_string());
                let _ = self.qmp().cont();
                return Err(VmError::Migration {
                    what: WHAT,
                    reason: why,
                });
            }
        };
        let stop = self.qmp().wait_event("STOP", Duration::from_secs(1)).ok();
        let pause = match (stop.as_ref().and_then(event_time), event_time(&resume)) {
            (Some(a), Some(b)) if b >= a => Duration::from_secs_f64(b - a),
            _ => t0.elapsed(),
        };
        Ok(LivePause {
            pause,
            frozen_disk,
            populated_in,
        })
    }

    /// Waits for the guest to run again after `migrate` started a
    /// background snapshot of the guest forkd stopped; returns the RESUME
    /// event. QEMU 7.2 resumes the guest itself once RAM is write-protected.
    /// QEMU 9 and later put back the run state the VM had when `migrate`
    /// began, which is forkd's stop, so nothing resumes it: once QEMU is
    /// writing pages (it has write-protected RAM and scheduled its own
    /// resume, which then leaves the guest paused), forkd resumes it. A
    /// further round trip first lets that scheduled step run, and a guest
    /// still reported paused after forkd's resume is resumed once more.
    fn await_resume(&self, deadline: Instant) -> Result<Value, VmError> {
        const WHAT: &str = "the live snapshot";
        loop {
            match self.qmp().wait_event("RESUME", Duration::from_millis(2)) {
                Ok(ev) => return Ok(ev),
                Err(QmpError::Timeout(..)) => {}
                Err(e) => return Err(e.into()),
            }
            let info = query(&mut self.qmp())?;
            if matches!(
                info.status,
                MigrationStatus::Failed | MigrationStatus::Cancelled
            ) {
                return Err(VmError::Migration {
                    what: WHAT,
                    reason: info.error.unwrap_or_else(|| "migration failed".into()),
                });
            }
            if info.past_the_pause() {
                let status = self.qmp().status()?;
                if let Ok(ev) = self.qmp().wait_event("RESUME", Duration::ZERO) {
                    return Ok(ev);
                }
                if status != "running" {
                    self.qmp().cont()?;
                }
                let ev = self.qmp().wait_event("RESUME", Duration::from_secs(5))?;
                if self.qmp().status()? != "running" {
                    self.qmp().cont()?;
                }
                return Ok(ev);
            }
            if Instant::now() > deadline {
                return Err(VmError::Migration {
                    what: WHAT,
                    reason: "the guest was not resumed in time".into(),
                });
            }
        }
    }

    /// A path that reads this VM's guest RAM as a file: the RAM file, or
    /// for hugetlb RAM QEMU's memfd through `/proc/PID/fd`. `None` for
    /// anonymous RAM and for a child (it maps an image it never changes).
    pub fn guest_ram_file(&self) -> Result<Option<PathBuf>, VmError> {
        let c = self.config();
        if c.ram_in_hugetlb_memfd() {
            return Ok(Some(populate::memfd_path(self.pid())?));
        }
        Ok(match &c.memory {
            MemoryBackend::SharedFile(p) => Some(p.clone()),
            _ => None,
        })
    }

    /// Populates this VM's guest-RAM mapping in QEMU's address space
    /// ([`crate::populate`]); `None` when RAM is anonymous (QEMU's own pass
    /// maps the shared zero page there, nothing to allocate).
    fn populate_guest_ram(&self) -> Result<Option<Duration>, VmError> {
        let c = self.config();
        let canonical;
        let (name, page) = match &c.memory {
            MemoryBackend::Anonymous => return Ok(None),
            _ if c.ram_in_hugetlb_memfd() => (RamName::Memfd, 2 << 20),
            MemoryBackend::PrivateFile(_) if c.private_hugetlb => (RamName::ChildMemfd, 2 << 20),
            MemoryBackend::SharedFile(p) | MemoryBackend::PrivateFile(p) => {
                // The maps name the file by its resolved path.
                canonical = std::fs::canonicalize(p).unwrap_or_else(|_| p.clone());
                (RamName::File(&canonical), 4096)
            }
        };
        // Best effort: a mapping forkd cannot find is left to QEMU's own
        // pass (inside the pause, but correct). A page the host cannot give
        // fails the branch here, before any pause.
        let map = match populate::locate(self.pid(), name, c.mem_mib << 20) {
            Ok(m) => m,
            Err(_) => return Ok(None),
        };
        let first = populate::populate(self.pid(), map, page)?;
        // The guest may free (and its balloon discard) pages behind the
        // first pass, which takes long when it allocates; a second pass,
        // quick when everything is present, narrows that window to itself.
        let second = populate::populate(self.pid(), map, page)?;
        Ok(Some(first + second))
    }

    /// Waits until QEMU's outgoing migration (a live snapshot streaming out)
    /// is over; returns QEMU's figures when it completed.
    pub fn wait_migration(&self, timeout: Duration) -> Result<MigrationInfo, VmError> {
        wait_finished(
            &mut self.qmp(),
            Instant::now() + timeout,
            "the live snapshot",
        )
    }

    /// What QEMU says about its outgoing migration now.
    pub fn migration_info(&self) -> Result<MigrationInfo, VmError> {
        query(&mut self.qmp())
    }

    /// Cancels the outgoing migration, if one runs.
    pub fn cancel_migration(&self) -> Result<(), VmError> {
        self.qmp().execute("migrate_cancel", None)?;
        Ok(())
    }
}

/// Fault point ([`crate::faultpoint`]): inside a live snapshot's pause, the
/// guest stopped and its disk frozen, before QEMU is told to stream.
pub const STOP_BEFORE_MIGRATE: &str = "branch:before-migrate";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_and_figures_are_read_from_query_migrate() {
        let done = MigrationInfo::from_qmp(&json!({"status": "completed", "downtime": 7.0}));
        assert_eq!(done.status, MigrationStatus::Completed);
        assert_eq!(done.downtime_ms, Some(7.0));
        let failed =
            MigrationInfo::from_qmp(&json!({"status": "failed", "error-desc": "socket closed"}));
        assert_eq!(failed.status, MigrationStatus::Failed);
        assert_eq!(failed.error.as_deref(), Some("socket closed"));
        assert_eq!(
            MigrationInfo::from_qmp(&json!({})).status,
            MigrationStatus::None
        );
        // Past the pause once QEMU writes pages, zero pages included.
        let setup = MigrationInfo::from_qmp(&json!({"status": "active", "ram": {"normal": 0}}));
        assert!(!setup.past_the_pause());
        let streaming = MigrationInfo::from_qmp(
            &json!({"status": "active", "ram": {"normal": 0, "duplicate": 3}}),
        );
        assert_eq!(streaming.ram_pages, 3);
        assert!(streaming.past_the_pause());
        assert!(done.past_the_pause());
        assert_eq!(
            MigrationStatus::parse("active"),
            MigrationStatus::Active("active".into())
        );
    }
}
