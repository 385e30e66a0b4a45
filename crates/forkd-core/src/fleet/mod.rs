//! Sandboxes that outlive the process that made them, and snapshots of them.
//!
//! A [`Fleet`] is the state database plus the snapshot store plus the runtime
//! directory. Every sandbox is a detached QEMU (own session, no parent-death
//! signal) whose guest RAM is a shared file on tmpfs (or, with huge pages, a
//! hugetlb memfd, which only a live branch can snapshot), recorded in SQLite
//! with its pid and start time; any later process re-attaches by pid and
//! sockets.
//!
//! The rooms: records and their views ([`record`]), rows written before
//! launches and QEMUs no row names ([`starting`]), booting ([`create`]),
//! full snapshots ([`snapshot`]), stored disks that never depend on a run
//! directory ([`diskchain`]), spawning and the warm pool ([`spawn`]), the
//! content-keyed RAM images children map and their collection
//! ([`ramcache`]), snapshot details, health and deletion ([`info`],
//! [`integrity`], [`remove`]), rewriting a chain of layers as one
//! ([`compact`]), and reconciling the database with the
//! processes that exist after a crash ([`recover`]). Live branches are in
//! [`crate::branch`]. This module holds the handle and what every room
//! needs: finding a sandbox, talking to it, listing and killing.

mod compact;
mod create;
pub(crate) mod diskchain;
mod info;
pub(crate) mod integrity;
pub mod lifetime;
mod ramcache;
pub mod record;
mod recover;
mod remove;
mod snapshot;
mod spawn;
pub(crate) mod starting;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use forkd_ops::{Sandbox, SandboxState};
use forkd_protocol::ExecRequest;
use forkd_store::{Db, SandboxRow, Store};
use forkd_vm::Vm;

pub use create::STOP_AFTER_CLAIM;
pub(crate) use info::snapshot_view;
pub use ramcache::CACHE_DIR;
pub use record::SandboxConfig;
pub use recover::Recovery;
pub use spawn::ChildOverrides;

use crate::paths::Env;
use crate::sessions::{Session, Sessions};
use crate::CoreError;

/// Name of the device-state file in a snapshot.
pub const DEVICE_STATE: &str = "device.state";
/// Name of the RAM image in a snapshot.
pub const RAM_IMAGE: &str = "ram.img";
/// Name of the frozen disk in a snapshot.
pub const DISK_IMAGE: &str = "disk.qcow2";

/// The state database, snapshot store and runtime directory together.
pub struct Fleet {
    env: Env,
    /// Shared with the hooks that record a QEMU's pid the moment it exists.
    db: Arc<Mutex<Db>>,
    store: Store,
    /// Agent sessions shared between calls, for long-lived processes only
    /// ([`Fleet::open_long_lived`]): a short-lived one connects per call and
    /// lets go, so that it never keeps a sandbox's agent from others.
    sessions: Option<Sessions>,
    /// QEMUs this process started (pid, start time): they are its children,
    /// so whoever kills them, this process must reap them
    /// ([`Fleet::housekeeping`]).
    children: Mutex<Vec<(u32, u64)>>,
    /// When [`Fleet::housekeeping`] last reconciled.
    reconciled: Mutex<Instant>,
}

impl Fleet {
    pub fn open(env: &Env) -> Result<Fleet, CoreError> {
        let db = Db::open(&env.home.join("state.db"))?;
        let store =
            Store::new(env.home.join("snapshots")).keep_zero_cvs_in(env.home.join("zero-cvs"));
        store.sweep_staging();
        let fleet = Fleet {
            env: env.clone(),
            db: Arc::new(Mutex::new(db)),
            store,
            sessions: None,
            children: Mutex::new(Vec::new()),
            reconciled: Mutex::new(Instant::now()),
        };
        // Every forkd process heals what a dead one left: sandboxes whose
        // creator died mid-start, branches whose writer died (and the
        // source it left frozen). Failing here must not stop the command.
        let _ = fleet.reconcile();
        Ok(fleet)
    }

    /// A fleet for a long-lived process (the daemon): agent sessions are
    /// shared by concurrent calls and kept open between them; the process
    /// must call [`Fleet::housekeeping`] every second or so, which closes the
    /// idle ones.
    pub fn open_long_lived(env: &Env) -> Result<Fleet, CoreError> {
        let mut f = Fleet::open(env)?;
        f.sessions = Some(Sessions::default());
        Ok(f)
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

    /// A sandbox's record and configuration.
    pub fn sandbox(&self, id: &str) -> Result<(SandboxRow, SandboxConfig), CoreError> {
        forkd_ops::validate_id(id).map_err(|_| CoreError::NoSandbox { id: id.into() })?;
        let row = self
            .db()
            .get_sandbox(id)?
            .ok_or_else(|| CoreError::NoSandbox { id: id.into() })?;
        let config = SandboxConfig::of(&row)?;
        Ok((row, config))
    }

    /// A sandbox's record and configuration, if its QEMU still runs; a dead
    /// one is marked so.
    fn live(&self, id: &str) -> Result<(SandboxRow, SandboxConfig), CoreError> {
        let (row, config) = self.sandbox(id)?;
        if row.state == SandboxState::Starting {
            return Err(CoreError::SandboxStarting { id: id.into() });
        }
        self.enforce(&row)?;
        if !forkd_vm::process::pid_alive(row.pid, row.pid_start) {
            self.db().update_sandbox_state(id, SandboxState::Dead)?;
            return Err(CoreError::SandboxDead {
                id: id.into(),
                pid: row.pid,
                cause: crate::admission::likely_death_cause(&self.env, &config.vm),
            });
        }
        Ok((row, config))
    }

    /// Connects to a running sandbox (its agent; QMP when first used).
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

    /// The agent session of a running, handed-out sandbox: shared by this
    /// process's calls in a long-lived fleet, this call's own otherwise.
    pub fn session(&self, id: &str) -> Result<Arc<Session>, CoreError> {
        // Every use of a sandbox meets its lifetime first (a shared session
        // skips `live`).
        self.lifetime(id)?;
        let connect = || {
            let (row, _) = self.sandbox(id)?;
            if row.state == SandboxState::Pooled {
                return Err(CoreError::SandboxPooled { id: id.into() });
            }
            self.attach(id)
        };
        match &self.sessions {
            Some(shared) => shared.get(id, connect),
            None => Ok(Arc::new(Session::new(connect()?))),
        }
    }

    fn drop_session(&self, id: &str) {
        if let Some(shared) = &self.sessions {
            shared.drop_session(id);
        }
    }

    /// Runs `f` on sandbox `id`'s agent session; a session whose channel
    /// broke is dropped, so that the next call opens a fresh one.
    pub(crate) fn with_agent<T>(
        &self,
        id: &str,
        what: &str,
        f: impl FnOnce(
            &forkd_protocol::client::AgentClient,
        ) -> Result<T, forkd_protocol::client::ClientError>,
    ) -> Result<T, CoreError> {
        let session = self.session(id)?;
        self.with_agent_of(&session, id, what, f)
    }

    /// [`Fleet::with_agent`] on a session the caller holds.
    pub(crate) fn with_agent_of<T>(
        &self,
        session: &Session,
        id: &str,
        what: &str,
        f: impl FnOnce(
            &forkd_protocol::client::AgentClient,
        ) -> Result<T, forkd_protocol::client::ClientError>,
    ) -> Result<T, CoreError> {
        let out = f(session.vm().agent());
        session.touch();
        out.map_err(|e| match e {
            // The agent refused this request; the session is fine.
            forkd_protocol::client::ClientError::Agent(reply) => CoreError::InGuest {
                id: id.into(),
                what: what.into(),
                code: reply.code,
                message: reply.message,
            },
            e => {
                self.drop_session(id);
                explain_detached(&self.env, session.vm(), e, what)
            }
        })
    }

    /// Runs a command in a sandbox, streaming its output to `on_output`.
    pub fn exec(
        &self,
        id: &str,
        req: ExecRequest,
        stdin: Option<Box<dyn Read + Send>>,
        on_output: impl FnMut(forkd_protocol::client::OutputStream, &[u8]),
    ) -> Result<forkd_protocol::ExitStatus, CoreError> {
        let what = format!("exec of `{}`", req.argv.join(" "));
        self.with_agent(id, &what, |agent| agent.exec(req, stdin, on_output))
    }

    /// A round trip to the guest agent.
    pub fn ping(&self, id: &str) -> Result<Duration, CoreError> {
        let t = Instant::now();
        self.with_agent(id, "a ping", |agent| agent.ping(Duration::from_secs(5)))?;
        Ok(t.elapsed())
    }

    /// All sandboxes, with dead ones marked as such.
    pub fn list(&self) -> Result<Vec<Sandbox>, CoreError> {
        self.reap_dead_starts()?;
        self.reap_expired()?;
        let rows = self.db().list_sandboxes()?;
        let branches = record::branch_counts(&self.db().list_snapshots()?);
        let mut out = Vec::with_capacity(rows.len());
        for mut row in rows {
            // A `starting` row's creator is alive (the others were reaped
            // just above); its QEMU may not exist yet.
            if !matches!(row.state, SandboxState::Dead | SandboxState::Starting)
                && !forkd_vm::process::pid_alive(row.pid, row.pid_start)
            {
                self.db()
                    .update_sandbox_state(&row.id, SandboxState::Dead)?;
                row.state = SandboxState::Dead;
            }
            out.push(record::view(&row, branches.get(&row.id).copied()));
        }
        Ok(out)
    }

    /// One sandbox, as [`Fleet::list`] shows it.
    pub fn sandbox_view(&self, id: &str) -> Result<Sandbox, CoreError> {
        self.sandbox(id)?;
        self.list()?
            .into_iter()
            .find(|s| s.id == id)
            .ok_or_else(|| CoreError::NoSandbox { id: id.into() })
    }

    /// Kills a sandbox (if it still runs) and removes its files and record.
    /// Snapshots whose disk still depends on a file of its run directory
    /// (made before snapshots were self-contained) are made independent of
    /// it first; when that fails, the sandbox is left alone.
    pub fn kill(&self, id: &str) -> Result<(), CoreError> {
        forkd_ops::validate_id(id).map_err(|_| CoreError::NoSandbox { id: id.into() })?;
        let row = self
            .db()
            .get_sandbox(id)?
            .ok_or_else(|| CoreError::NoSandbox { id: id.into() })?;
        self.drop_session(id);
        self.release_run_dir(&row)?;
        // Every QEMU of the row, including one whose pid was never written;
        // those this process started are reaped.
        forkd_vm::process::kill_and_wait(&self.qemus_of(&row), Duration::from_secs(10));
        if let Some(name) = row.run_dir.file_name() {
            forkd_vm::cgroup::release(&name.to_string_lossy());
        }
        // Its huge-page claim ends with its QEMU; the limit follows.
        let _ = crate::hugepool::settle();
        let dir = row.run_dir.as_path();
        if dir.starts_with(self.sandboxes_dir()) {
            let _ = std::fs::remove_dir_all(dir);
        }
        self.db().delete_sandbox(id)?;
        Ok(())
    }

    /// Remembers that this process started a QEMU (it must reap it).
    fn adopt(&self, pid: u32, pid_start: u64) {
        self.children
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((pid, pid_start));
    }

    /// What a long-lived process (the daemon) calls periodically: reaps the
    /// QEMUs it started that are gone, whoever killed them, and closes agent
    /// sessions nobody used for a while.
    pub fn housekeeping(&self) {
        let gone: Vec<(u32, u64)> = {
            let mut kids = self.children.lock().unwrap_or_else(|p| p.into_inner());
            let (gone, alive): (Vec<_>, Vec<_>) = kids
                .iter()
                .partition(|(pid, start)| !forkd_vm::process::pid_alive(*pid, *start));
            *kids = alive;
            gone
        };
        for (pid, start) in gone {
            forkd_vm::process::reap_if_child(pid, start);
        }
        if let Some(shared) = &self.sessions {
            shared.close_idle();
        }
        // Heal what dead creators and writers left, a few times a minute
        // (every command does it too; a daemon may run for weeks without).
        let due = {
            let mut last = self.reconciled.lock().unwrap_or_else(|p| p.into_inner());
            let due = last.elapsed() > Duration::from_secs(5);
            if due {
                *last = Instant::now();
            }
            due
        };
        if due {
            let _ = self.reconcile();
        }
        // Sandboxes whose time is up die here even when nobody asks for
        // them (their end times are in their records, so a restarted daemon
        // goes on where the last one stopped).
        let _ = self.reap_expired();
    }
}

fn explain_detached(
    env: &Env,
    vm: &Vm,
    e: forkd_protocol::client::ClientError,
    what: &str,
) -> CoreError {
    if !vm.is_alive() {
        // A detached QEMU's exit status went to whoever is its parent now;
        // what the host shows is the next best thing.
        return CoreError::Vm(forkd_vm::VmError::Died {
            status: crate::admission::likely_death_cause(env, vm.config())
                .unwrap_or_else(|| "QEMU exited".into()),
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
pub(crate) struct DirGuard(pub(crate) PathBuf);

impl DirGuard {
    pub(crate) fn disarm(self) {
        std::mem::forget(self);
    }
}

impl Drop for DirGuard {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub(crate) fn getrandom(buf: &mut [u8]) -> Result<(), CoreError> {
    // SAFETY: getrandom writes at most buf.len() bytes into buf.
    let n = unsafe { libc::getrandom(buf.as_mut_ptr().cast(), buf.len(), 0) };
    if n != buf.len() as isize {
        return Err(CoreError::Host {
            what: "reading host entropy from",
            path: "getrandom(2)".into(),
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}

pub(crate) fn unix_now_ms() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0)
}

pub(crate) fn unix_now_ns() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

/// A fleet on a temporary home with snapshot records and published
/// directories, for tests of the parts that need no QEMU.
#[cfg(test)]
pub(crate) mod testing {
    use forkd_ops::SnapshotStatus;
    use forkd_store::{Manifest, SnapshotRow};

    use super::Fleet;
    use crate::Env;

    pub(crate) fn fleet() -> (tempfile::TempDir, Fleet) {
        let tmp = tempfile::tempdir().unwrap();
        let env = Env {
            home: tmp.path().join("home"),
            runtime: tmp.path().join("run"),
        };
        let f = Fleet::open(&env).unwrap();
        (tmp, f)
    }

    /// Publishes a one-file snapshot `tag` on `parent` and records it ready.
    pub(crate) fn snapshot(f: &Fleet, tag: &str, parent: Option<&str>) {
        let staging = f.store().stage(tag).unwrap();
        std::fs::write(staging.path().join("device.state"), tag).unwrap();
        staging
            .publish(Manifest {
                format: forkd_store::MANIFEST_FORMAT,
                tag: tag.into(),
                created_at: 1,
                parent: parent.map(Into::into),
                source_sandbox: None,
                pause_ms: 1.0,
                ram_parent: None,
                disk_from: None,
                machine: serde_json::json!({}),
                files: vec![],
                origin: None,
            })
            .unwrap();
        f.db()
            .insert_snapshot(&SnapshotRow {
                tag: tag.into(),
                status: SnapshotStatus::Ready,
                dir: f.store().dir(tag),
                parent: parent.map(Into::into),
                source: None,
                created_at: 1,
                pause_ms: Some(1.0),
                error: None,
            })
            .unwrap();
    }
}
