//! Collecting exit statuses.
//!
//! As PID 1 the agent inherits every orphan in the guest and must reap them,
//! but a blind `waitpid(-1)` would also swallow the statuses of the commands it
//! runs for the host. The [`Reaper`] is therefore the only caller of `waitpid`
//! in PID-1 mode: it hands the status of a registered child to whoever waits for
//! it and discards the rest. Outside a guest (host tests) a per-child waiter
//! thread is used instead, so the test process's other children are untouched.

use std::collections::HashMap;
use std::io;
use std::process::{Child, Command};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How a child ended, decoded from a raw wait status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    Exited(i32),
    Signalled(i32),
}

impl Ended {
    fn from_raw(status: libc::c_int) -> Ended {
        if libc::WIFSIGNALED(status) {
            Ended::Signalled(libc::WTERMSIG(status))
        } else {
            Ended::Exited(libc::WEXITSTATUS(status))
        }
    }
}

type Registry = Mutex<HashMap<libc::pid_t, Sender<Ended>>>;

/// Hands out exit statuses of spawned children.
#[derive(Clone)]
pub struct Reaper {
    global: Option<Arc<Registry>>,
}

impl Reaper {
    /// PID-1 mode: starts the thread that reaps every child of the process.
    /// SIGCHLD must already be blocked in all threads (the binary does it first
    /// thing), so that this thread can wait for it with `sigtimedwait`.
    pub fn pid1() -> io::Result<Reaper> {
        let registry: Arc<Registry> = Arc::new(Mutex::new(HashMap::new()));
        let r = Arc::clone(&registry);
        std::thread::Builder::new()
            .name("reaper".into())
            .spawn(move || reap_forever(&r))?;
        Ok(Reaper {
            global: Some(registry),
        })
    }

    /// Host mode: one waiter thread per child.
    pub fn per_child() -> Reaper {
        Reaper { global: None }
    }

    /// Spawns `cmd` and returns the child with a channel that yields its end.
    pub fn spawn(&self, cmd: &mut Command) -> io::Result<(Child, Receiver<Ended>)> {
        let (tx, rx) = mpsc::channel();
        match &self.global {
            Some(registry) => {
                // Hold the registry across spawn and insert: the reaper thread
                // looks a pid up under this lock after reaping it, so even a
                // child that exits at once finds its sender registered.
                let mut reg = registry.lock().unwrap_or_else(|p| p.into_inner());
                let child = cmd.spawn()?;
                reg.insert(child.id() as libc::pid_t, tx);
                Ok((child, rx))
            }
            None => {
                let child = cmd.spawn()?;
                let pid = child.id() as libc::pid_t;
                std::thread::Builder::new()
                    .name(format!("wait-{pid}"))
                    .spawn(move || {
                        if let Some(end) = wait_pid(pid) {
                            let _ = tx.send(end);
                        }
                    })?;
                Ok((child, rx))
            }
        }
    }
}

/// Blocks until `pid` ends; `None` if it cannot be waited for.
fn wait_pid(pid: libc::pid_t) -> Option<Ended> {
    let mut status: libc::c_int = 0;
    loop {
        // SAFETY: waitpid writes only to `status`, a valid c_int we own.
        let r = unsafe { libc::waitpid(pid, &mut status, 0) };
        if r == pid {
            return Some(Ended::from_raw(status));
        }
        if r < 0 && io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            return None;
        }
    }
}

fn reap_forever(registry: &Registry) {
    // SAFETY: sigset_t is plain data; sigemptyset/sigaddset initialise it.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t owned by this frame.
    unsafe {
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGCHLD);
    }
    let timeout = libc::timespec {
        tv_sec: 1,
        tv_nsec: 0,
    };
    loop {
        {
            // Reap only while holding the registry: spawners hold it across
            // `spawn`, and std's spawn waits for a child whose exec failed
            // itself; reaping that child here would make std panic.
            let mut reg = registry.lock().unwrap_or_else(|p| p.into_inner());
            loop {
                let mut status: libc::c_int = 0;
                // SAFETY: waitpid writes only to `status`.
                let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
                if pid <= 0 {
                    break;
                }
                // Orphans that are not ours are reaped and forgotten.
                if let Some(tx) = reg.remove(&pid) {
                    let _ = tx.send(Ended::from_raw(status));
                }
            }
        }
        // A 1 s timeout bounds the delay if a SIGCHLD coalesced with one we
        // already consumed; normally we wake on the signal itself.
        // SAFETY: `set` and `timeout` are valid for the call; the siginfo
        // pointer may be null.
        unsafe { libc::sigtimedwait(&set, std::ptr::null_mut(), &timeout) };
    }
}

/// Sleep helper shared by the agent's polling loops.
pub(crate) fn nap(ms: u64) {
    std::thread::sleep(Duration::from_millis(ms));
}
