//! A VM's private directory: sockets, console log, overlays, RAM file. Its
//! owner holds an `flock` on it while the VM lives; directories whose owner
//! died are swept by the next forkd process ([`sweep_stale`]).

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::io::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use crate::VmError;

/// A VM's private directory, locked by its owner while it lives.
pub struct RunDir {
    path: PathBuf,
    lock: Option<File>,
    keep: bool,
    watchdog: Option<(Option<std::process::ChildStdin>, Child)>,
}

const LOCK_FILE: &str = "owner.lock";

impl RunDir {
    /// Creates `parent/name` and takes its lock. Fails if it already exists.
    pub fn create(parent: &Path, name: &str) -> Result<RunDir, VmError> {
        let path = parent.join(name);
        let err = |source| VmError::RunDir {
            path: path.display().to_string(),
            source,
        };
        fs::create_dir_all(parent).map_err(err)?;
        fs::create_dir(&path).map_err(err)?;
        let lock = OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .open(path.join(LOCK_FILE))
            .map_err(err)?;
        // SAFETY: flock on a valid fd we own; no memory effects.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            return Err(err(io::Error::last_os_error()));
        }
        Ok(RunDir {
            path,
            lock: Some(lock),
            keep: false,
            watchdog: None,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A file inside the directory.
    pub fn file(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    /// Leaves the directory in place on drop (a detached VM outlives us).
    pub fn keep(&mut self) {
        self.keep = true;
    }

    /// Guarantees removal even if this process is killed with SIGKILL: a
    /// watchdog shell blocks reading a pipe only we hold open; when we die
    /// the pipe closes and it removes the directory (and kills the QEMU
    /// named by [`RunDir::kill_when_owner_dies`]). It runs in its own
    /// session so terminal signals meant for us do not end it early.
    pub fn remove_when_owner_dies(&mut self) -> Result<(), VmError> {
        let err = |source| VmError::RunDir {
            path: self.path.display().to_string(),
            source,
        };
        let mut cmd = Command::new("/bin/sh");
        // Lines on the pipe name the QEMU to kill with us (0: none any
        // more); the last one counts.
        cmd.arg("-c")
            .arg("q=0; while read -r p; do q=$p; done; [ \"$q\" -gt 0 ] 2>/dev/null && kill -9 \"$q\"; rm -rf -- \"$0\"")
            .arg(&self.path)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        // SAFETY: setsid is async-signal-safe and has no memory effects.
        unsafe {
            cmd.pre_exec(|| {
                libc::setsid();
                Ok(())
            });
        }
        let mut child = cmd.spawn().map_err(err)?;
        // Keep the write end open for our lifetime; never reap the shell
        // (init adopts it when it outlives us; we reap it on drop).
        self.watchdog = Some((child.stdin.take(), child));
        Ok(())
    }
}

impl RunDir {
    /// The watchdog of [`RunDir::remove_when_owner_dies`] also kills `pid`
    /// when we die. Needed because QEMU that drops to its `-runas` user
    /// loses `PR_SET_PDEATHSIG` (the kernel clears it on a credential
    /// change). No-op without a watchdog.
    pub fn kill_when_owner_dies(&self, pid: u32) {
        if let Some((Some(pipe), _)) = &self.watchdog {
            let mut w: &std::process::ChildStdin = pipe;
            let _ = writeln!(w, "{pid}");
        }
    }
}

impl Drop for RunDir {
    fn drop(&mut self) {
        // We end normally: the QEMU is gone (its pid may be reused soon).
        if let Some((Some(pipe), _)) = &self.watchdog {
            let mut w: &std::process::ChildStdin = pipe;
            let _ = writeln!(w, "0");
        }
        if !self.keep {
            let _ = fs::remove_dir_all(&self.path);
        }
        self.lock.take();
        if let Some((pipe, mut child)) = self.watchdog.take() {
            drop(pipe);
            let _ = child.wait();
        }
    }
}

/// Whether run directory `dir`'s lock is free (its owner is gone, or it was
/// made to outlive its owner).
pub fn is_abandoned(dir: &Path) -> bool {
    let Ok(lock) = File::open(dir.join(LOCK_FILE)) else {
        return false;
    };
    // SAFETY: flock on a valid fd we own; released when `lock` drops.
    unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) == 0 }
}

/// Removes run directories under `parent` whose owner is gone (their lock can
/// be taken). Returns what it removed.
pub fn sweep_stale(parent: &Path) -> Vec<PathBuf> {
    let mut removed = Vec::new();
    let Ok(entries) = fs::read_dir(parent) else {
        return removed;
    };
    for e in entries.flatten() {
        let dir = e.path();
        let Ok(lock) = File::open(dir.join(LOCK_FILE)) else {
            continue;
        };
        // SAFETY: flock on a valid fd we own.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0
            && fs::remove_dir_all(&dir).is_ok()
        {
            removed.push(dir);
        }
    }
    removed
}
