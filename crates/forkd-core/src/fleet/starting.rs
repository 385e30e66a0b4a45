//! Records before launches, and what no record knows about.
//!
//! A sandbox's row exists before its QEMU does: state `starting`, pid 0,
//! written while its creator holds the run directory's creator lock; the
//! pid and start time are written the moment QEMU is spawned
//! ([`forkd_vm::SpawnHook`]); the state becomes `running` or `pooled` before
//! the lock is let go. So a creator that dies at any step (a `kill -9` of
//! the CLI or the daemon mid-spawn) leaves a `starting` row whose lock is
//! free, and whoever finds it kills what it started ([`Fleet::reap_dead_starts`]):
//! by the recorded pid, and by the run directory in QEMU's command line
//! for the instant before the pid was written.
//!
//! Every run directory also says which home it belongs to (`owner.json`,
//! with the guest's memory size for admission), because the runtime
//! directory may be shared by several homes: [`Fleet::kill_orphans`] kills
//! the QEMUs of this home's run directories that no row names, and never
//! another home's.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use forkd_ops::{Sandbox, SandboxState};
use forkd_store::SandboxRow;
use forkd_vm::{AccelChoice, SpawnHook, VmConfig};
use serde::{Deserialize, Serialize};

use super::record::{view, SandboxConfig};
use super::Fleet;
use crate::CoreError;

/// Who a run directory belongs to.
pub(crate) const OWNER_FILE: &str = "owner.json";
/// Held by the process creating the sandbox until its row says it runs.
const CREATOR_LOCK: &str = "creator.lock";

/// What `owner.json` in a run directory holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct RunDirOwner {
    /// The `FORKD_HOME` whose state database has (or had) its row.
    pub home: PathBuf,
    /// Guest memory, MiB (what admission counts as committed).
    pub mem_mib: u64,
}

/// The owner of run directory `dir`, if it says.
pub(crate) fn read_owner(dir: &Path) -> Option<RunDirOwner> {
    serde_json::from_slice(&std::fs::read(dir.join(OWNER_FILE)).ok()?).ok()
}

/// Writes `owner.json` into run directory `dir`.
pub(crate) fn write_owner(dir: &Path, owner: &RunDirOwner) -> Result<(), CoreError> {
    let path = dir.join(OWNER_FILE);
    std::fs::write(&path, serde_json::to_vec(owner).expect("owner serialises"))
        .map_err(CoreError::host("writing", path))
}

/// Whether `a` and `b` name the same home.
fn same_home(a: &Path, b: &Path) -> bool {
    a == b || matches!((a.canonicalize(), b.canonicalize()), (Ok(x), Ok(y)) if x == y)
}

/// How long a creator lock may stay held after its creator died (see
/// [`creator_alive`]).
const DEAD_CREATOR_GRACE: Duration = Duration::from_secs(5);

/// Whether the process that creates the sandbox in `dir` is alive and still
/// holds its creator lock.
///
/// The lock alone can outlive its creator for a moment: a process the
/// creator had forked but that had not yet exec'd (a QEMU still in its
/// pre-exec steps, which on cgroup v1 can wait tens of milliseconds to enter
/// its group) holds a copy of every descriptor, this lock's included, until
/// its exec closes them. So the lock file also names its creator (pid, start
/// time, pid namespace). When that process is gone, the lock is waited for
/// (up to [`DEAD_CREATOR_GRACE`]) so that whatever was being exec'd has shown
/// itself by its command line, and then the creator counts as dead. A lock
/// still held after that, or one whose creator this process cannot see
/// (another pid namespace), is believed.
fn creator_alive(dir: &Path) -> bool {
    creator_alive_within(dir, DEAD_CREATOR_GRACE)
}

fn creator_alive_within(dir: &Path, grace: Duration) -> bool {
    let path = dir.join(CREATOR_LOCK);
    let Ok(f) = File::open(&path) else {
        return false;
    };
    if !lock_is_held(&f) {
        return false;
    }
    let Some(creator) = read_creator(&f) else {
        // Not written yet, or by a forkd that did not name the creator.
        return true;
    };
    if Some(creator.pid_ns) != pid_namespace()
        || forkd_vm::process::pid_alive(creator.pid, creator.start)
    {
        return true;
    }
    let deadline = std::time::Instant::now() + grace;
    while std::time::Instant::now() < deadline {
        if !lock_is_held(&f) {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    lock_is_held(&f)
}

/// Whether another open of the lock file holds its lock.
fn lock_is_held(f: &File) -> bool {
    use std::os::unix::io::AsRawFd;
    // SAFETY: flock on a valid fd we own; no memory effects. A lock taken
    // here belongs to `f`'s own open file description and is let go at once
    // (below) or when the caller drops `f`.
    let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc == 0 {
        // SAFETY: as above.
        unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_UN) };
        return false;
    }
    std::io::Error::last_os_error().raw_os_error() == Some(libc::EWOULDBLOCK)
}

/// The process a creator lock file names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Creator {
    pid: u32,
    start: u64,
    /// Inode of its `/proc/<pid>/ns/pid`: pids mean something only there.
    pid_ns: u64,
}

/// The inode of this process's pid namespace.
fn pid_namespace() -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self/ns/pid").ok().map(|m| m.ino())
}

/// Writes this process into its creator lock file, as one line in one
/// write (a reader sees all of it or no complete line).
fn write_creator(f: &File) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    let pid = std::process::id();
    let start = forkd_vm::process::process_start_time(pid).unwrap_or(0);
    let pid_ns = pid_namespace().unwrap_or(0);
    f.set_len(0)?;
    f.write_all_at(format!("{pid} {start} {pid_ns}\n").as_bytes(), 0)
}

/// The creator a lock file names, if it names one.
fn read_creator(f: &File) -> Option<Creator> {
    use std::os::unix::fs::FileExt;
    let mut buf = [0u8; 96];
    let n = f.read_at(&mut buf, 0).ok()?;
    parse_creator(std::str::from_utf8(&buf[..n]).ok()?)
}

/// `"<pid> <start> <pid namespace>\n"` as [`write_creator`] writes it; a
/// line without its newline is not complete yet.
fn parse_creator(text: &str) -> Option<Creator> {
    let mut fields = text.strip_suffix('\n')?.split(' ');
    let creator = Creator {
        pid: fields.next()?.parse().ok().filter(|&p| p > 0)?,
        start: fields.next()?.parse().ok()?,
        pid_ns: fields.next()?.parse().ok()?,
    };
    fields.next().is_none().then_some(creator)
}

/// A sandbox being created: its row says `starting` until [`Starting::finish`];
/// dropped unfinished, it deletes the row (the caller has cleaned up QEMU
/// and the directory, or `kill` has).
pub(super) struct Starting<'a> {
    fleet: &'a Fleet,
    id: String,
    row: SandboxRow,
    _creator: File,
    finished: bool,
}

impl Starting<'_> {
    /// The hook that writes QEMU's pid into the row as soon as it exists;
    /// with `huge_claim` (the sandbox's huge-page claim, in pages) it also
    /// hands that claim to QEMU, so that it is never held by a process that
    /// is gone while QEMU runs.
    pub(super) fn spawn_hook(&self, huge_claim: Option<u64>) -> SpawnHook {
        let db = Arc::clone(&self.fleet.db);
        let id = self.id.clone();
        SpawnHook::new(move |pid, start| {
            if let Some(pages) = huge_claim {
                // Bound again after launch if this fails.
                let _ = crate::hugepool::bind(&id, pages, pid, start);
            }
            let db = db.lock().unwrap_or_else(|p| p.into_inner());
            let _ = db.set_sandbox_pid(&id, pid, start);
        })
    }

    /// The sandbox runs (or waits in the pool): records its pid (again,
    /// in case the hook could not) and state, then lets the creator lock go.
    pub(super) fn finish(
        mut self,
        pid: u32,
        pid_start: u64,
        state: SandboxState,
    ) -> Result<Sandbox, CoreError> {
        {
            let db = self.fleet.db();
            db.set_sandbox_pid(&self.id, pid, pid_start)?;
            db.update_sandbox_state(&self.id, state)?;
        }
        self.finished = true;
        self.row.pid = pid;
        self.row.pid_start = pid_start;
        self.row.state = state;
        Ok(view(&self.row, None))
    }
}

impl Drop for Starting<'_> {
    fn drop(&mut self) {
        if !self.finished {
            let _ = self.fleet.db().delete_sandbox(&self.id);
        }
    }
}

impl Fleet {
    /// Records sandbox `id` as `starting` before its QEMU is launched: writes
    /// the run directory's owner, takes the creator lock, inserts the row.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn begin_sandbox(
        &self,
        id: &str,
        run_dir: &Path,
        vm: &VmConfig,
        image: &str,
        accel: &AccelChoice,
        snapshot: Option<&str>,
    ) -> Result<Starting<'_>, CoreError> {
        // The lock first: a directory that names its owner but whose
        // creator lock is free and that no row names is an orphan.
        let lock = run_dir.join(CREATOR_LOCK);
        let creator = super::lock_file(&lock).map_err(CoreError::host("locking", &lock))?;
        write_creator(&creator).map_err(CoreError::host("writing", &lock))?;
        write_owner(
            run_dir,
            &RunDirOwner {
                home: self.env.home.clone(),
                mem_mib: vm.mem_mib,
            },
        )?;
        let config = SandboxConfig {
            vm: vm.clone(),
            image: image.to_string(),
            accel_reason: accel.reason.clone(),
        };
        let row = SandboxRow {
            id: id.to_string(),
            state: SandboxState::Starting,
            pid: 0,
            pid_start: 0,
            run_dir: run_dir.to_path_buf(),
            snapshot: snapshot.map(str::to_string),
            config: serde_json::to_value(&config).expect("config serialises"),
            created_at: forkd_store::unix_now(),
        };
        self.db().insert_sandbox(&row)?;
        Ok(Starting {
            fleet: self,
            id: id.to_string(),
            row,
            _creator: creator,
            finished: false,
        })
    }

    /// The QEMUs of a sandbox's row: its recorded pid, and any process
    /// whose command line names its run directory (a QEMU whose pid was
    /// never written, or one a failed start left behind).
    pub(super) fn qemus_of(&self, row: &SandboxRow) -> Vec<(u32, u64)> {
        let mut out = Vec::new();
        if row.pid != 0 && forkd_vm::process::pid_alive(row.pid, row.pid_start) {
            out.push((row.pid, row.pid_start));
        }
        if row.run_dir.starts_with(self.sandboxes_dir()) {
            let needle = format!("{}/", row.run_dir.display());
            for p in forkd_vm::process::processes_mentioning(&needle) {
                if !out.iter().any(|(pid, _)| *pid == p.0) {
                    out.push(p);
                }
            }
        }
        out
    }

    /// Finishes the `starting` sandboxes whose creator died: kills what it
    /// started, removes the run directory and the row. Returns their ids.
    pub fn reap_dead_starts(&self) -> Result<Vec<String>, CoreError> {
        let starting: Vec<SandboxRow> = self
            .db()
            .list_sandboxes()?
            .into_iter()
            .filter(|r| r.state == SandboxState::Starting)
            .collect();
        let mut reaped = Vec::new();
        for row in starting {
            if creator_alive(&row.run_dir) {
                continue;
            }
            // The creator may have finished between the listing and the
            // lock check: it records the state before it lets go.
            let now = self.db().get_sandbox(&row.id)?;
            if now.as_ref().map(|r| r.state) != Some(SandboxState::Starting) {
                continue;
            }
            let row = now.expect("checked just above");
            forkd_vm::process::kill_and_wait(&self.qemus_of(&row), Duration::from_secs(10));
            if row.run_dir.starts_with(self.sandboxes_dir()) {
                let _ = std::fs::remove_dir_all(&row.run_dir);
            }
            self.db().delete_sandbox(&row.id)?;
            reaped.push(row.id);
        }
        Ok(reaped)
    }

    /// This home's run directories that no row names and whose creator is
    /// gone.
    pub fn orphan_run_dirs(&self) -> Result<Vec<PathBuf>, CoreError> {
        let mut out = Vec::new();
        let Ok(entries) = std::fs::read_dir(self.sandboxes_dir()) else {
            return Ok(out);
        };
        for e in entries.flatten() {
            let dir = e.path();
            let id = e.file_name().to_string_lossy().into_owned();
            let ours = match read_owner(&dir) {
                Some(owner) => same_home(&owner.home, &self.env.home) && !creator_alive(&dir),
                // A creator that died before it wrote the owner left a
                // directory QEMU never ran in, whoever's it was: it goes
                // once its own lock is free. Any other directory without
                // an owner belongs to a forkd that does not write one.
                None => {
                    !dir.join("qmp.sock").exists()
                        && forkd_vm::rundir::is_abandoned(&dir)
                        && forkd_vm::process::processes_mentioning(&format!("{}/", dir.display()))
                            .is_empty()
                }
            };
            if ours && self.db().get_sandbox(&id)?.is_none() {
                out.push(dir);
            }
        }
        Ok(out)
    }

    /// Kills the QEMUs of this home's run directories that no row names
    /// (and whose creator is gone), and removes the directories. Returns
    /// the pids killed.
    pub fn kill_orphans(&self) -> Result<Vec<u32>, CoreError> {
        let mut killed = Vec::new();
        for dir in self.orphan_run_dirs()? {
            let qemus = forkd_vm::process::processes_mentioning(&format!("{}/", dir.display()));
            forkd_vm::process::kill_and_wait(&qemus, Duration::from_secs(10));
            killed.extend(qemus.iter().map(|(pid, _)| *pid));
            let _ = std::fs::remove_dir_all(&dir);
        }
        Ok(killed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::{Child, Command};
    use std::time::Instant;

    /// A process (util-linux `flock`) holding `path`'s lock for `secs`.
    fn hold(path: &Path, secs: &str) -> Child {
        let child = Command::new("flock")
            .arg(path)
            .args(["sleep", secs])
            .spawn()
            .expect("util-linux flock");
        let f = File::open(path).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !lock_is_held(&f) {
            assert!(Instant::now() < deadline, "flock never took the lock");
            std::thread::sleep(Duration::from_millis(5));
        }
        child
    }

    #[test]
    fn a_lock_outliving_its_dead_creator_is_waited_for_then_the_creator_is_dead() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(CREATOR_LOCK);
        assert!(!creator_alive(dir.path()), "no lock file");
        let ns = pid_namespace().unwrap();

        // Our own lock, naming us: alive; let go: dead.
        let ours = super::super::lock_file(&path).unwrap();
        write_creator(&ours).unwrap();
        let named = read_creator(&File::open(&path).unwrap()).unwrap();
        assert_eq!((named.pid, named.pid_ns), (std::process::id(), ns));
        assert!(creator_alive(dir.path()));
        drop(ours);
        assert!(!creator_alive(dir.path()));

        // Named creator gone, the lock held by another process (what a
        // half-forked child of a killed spawner is) that lets go in 1.5 s:
        // waited for, then dead.
        let mut gone = Command::new("true").spawn().unwrap();
        gone.wait().unwrap();
        let dead_line = format!("{} 1 {ns}\n", gone.id());
        std::fs::write(&path, &dead_line).unwrap();
        let mut holder = hold(&path, "1.5");
        let t = Instant::now();
        assert!(!creator_alive(dir.path()));
        let waited = t.elapsed();
        assert!(
            waited >= Duration::from_millis(100) && waited < DEAD_CREATOR_GRACE,
            "{waited:?}"
        );
        holder.wait().unwrap();

        let mut holder = hold(&path, "30");
        // Still held when the grace ends: believed (asked again later).
        assert!(creator_alive_within(dir.path(), Duration::from_millis(300)));
        // A creator in another pid namespace cannot be looked up: believed.
        std::fs::write(&path, format!("{} 1 {}\n", gone.id(), ns + 1)).unwrap();
        assert!(creator_alive_within(dir.path(), Duration::ZERO));
        // The creator named is alive (this process): believed.
        let start = forkd_vm::process::process_start_time(std::process::id()).unwrap();
        std::fs::write(&path, format!("{} {start} {ns}\n", std::process::id())).unwrap();
        assert!(creator_alive_within(dir.path(), Duration::ZERO));
        // No creator named (an older forkd), or a line not complete yet:
        // the lock alone says.
        for text in ["", &dead_line[..dead_line.len() - 1]] {
            std::fs::write(&path, text).unwrap();
            assert!(creator_alive_within(dir.path(), Duration::ZERO), "{text:?}");
        }
        holder.kill().unwrap();
        holder.wait().unwrap();
    }

    #[test]
    fn the_creator_line_is_parsed_strictly() {
        let c = |pid, start, pid_ns| Some(Creator { pid, start, pid_ns });
        assert_eq!(parse_creator("12 345 678\n"), c(12, 345, 678));
        assert_eq!(parse_creator("12 0 0\n"), c(12, 0, 0));
        for bad in [
            "",
            "12 345 678",
            "12 345\n",
            "0 5 6\n",
            "x 5 6\n",
            "12 y 6\n",
            "-1 5 6\n",
            "12  5 6\n",
            "12 5 6 7\n",
        ] {
            assert_eq!(parse_creator(bad), None, "{bad:?}");
        }
    }
}
