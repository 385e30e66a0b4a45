//! Ctrl-C and friends while a sandbox runs, and while `forkd exec` waits.
//!
//! The first SIGINT is forwarded to the command in the guest (it may want to
//! clean up, and its exit status flows back as usual). SIGTERM, SIGHUP or a
//! second SIGINT stop the VM: a boot in progress is cancelled, a running VM is
//! killed; the main thread then drops the sandbox, which removes its files,
//! and exits 128+N. Nothing is done inside a signal handler: the signals stay
//! blocked and one thread takes them with `sigwait`.

use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::{Arc, Mutex, Weak};

use forkd_core::Sandbox;

const SIGNALS: [libc::c_int; 3] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP];

fn sigset() -> libc::sigset_t {
    // SAFETY: sigset_t is plain data; sigemptyset/sigaddset initialise it.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in SIGNALS {
            libc::sigaddset(&mut set, s);
        }
        set
    }
}

/// Blocks SIGINT/SIGTERM/SIGHUP in the calling thread (and threads it starts).
pub fn block_termination_signals() {
    let set = sigset();
    // SAFETY: valid sigset; changes only this thread's mask.
    unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
}

/// Undoes [`block_termination_signals`] for this thread (and the threads it
/// starts afterwards): the daemon handles SIGTERM/SIGINT itself.
pub fn unblock_termination_signals() {
    let set = sigset();
    // SAFETY: valid sigset; changes only this thread's mask.
    unsafe { libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut()) };
}

/// Starts a thread that ends the process with 128+N when SIGINT, SIGTERM or
/// SIGHUP arrives (they stay blocked everywhere else): for the commands
/// whose every step is safe to die at (all but `run`, whose sandbox dies
/// with it, and the servers, which stop themselves).
pub fn exit_on_termination() {
    std::thread::spawn(|| loop {
        let set = sigset();
        let mut sig: libc::c_int = 0;
        // SAFETY: valid sigset and out pointer.
        if unsafe { libc::sigwait(&set, &mut sig) } == 0 {
            std::process::exit(128 + sig);
        }
    });
}

struct State {
    target: Mutex<Option<(Weak<Sandbox>, u32)>>,
    received: AtomicI32,
    forwarded: AtomicBool,
    cancel: Arc<AtomicBool>,
}

/// The signal thread's handle.
pub struct Handler {
    state: Arc<State>,
}

impl Handler {
    /// Starts the thread. `cancel` is set when a signal should stop the VM.
    pub fn start(cancel: Arc<AtomicBool>) -> Handler {
        let state = Arc::new(State {
            target: Mutex::new(None),
            received: AtomicI32::new(0),
            forwarded: AtomicBool::new(false),
            cancel,
        });
        let s = Arc::clone(&state);
        std::thread::spawn(move || loop {
            let set = sigset();
            let mut sig: libc::c_int = 0;
            // SAFETY: valid sigset and out pointer.
            if unsafe { libc::sigwait(&set, &mut sig) } != 0 {
                continue;
            }
            s.handle(sig);
        });
        Handler { state }
    }

    /// From now on signals concern this sandbox and its exec `exec_id`.
    pub fn attach(&self, sandbox: Weak<Sandbox>, exec_id: u32) {
        *self.state.target.lock().unwrap_or_else(|p| p.into_inner()) = Some((sandbox, exec_id));
    }

    /// The sandbox is going away; signals now only mark the exit code.
    pub fn detach(&self) {
        self.state
            .target
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
    }

    /// The signal that stopped the run, if any.
    pub fn received(&self) -> Option<i32> {
        match self.state.received.load(Ordering::SeqCst) {
            0 => None,
            s => Some(s),
        }
    }
}

impl State {
    fn handle(&self, sig: libc::c_int) {
        let target = self
            .target
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .and_then(|(w, id)| Some((w.upgrade()?, *id)));
        if let Some((sandbox, exec_id)) = &target {
            if sig == libc::SIGINT && !self.forwarded.swap(true, Ordering::SeqCst) {
                eprintln!("\nforkd: interrupt sent to the command (again to kill the sandbox)");
                if sandbox.vm().agent().signal(*exec_id, libc::SIGINT).is_ok() {
                    return;
                }
            }
        }
        self.received.store(sig, Ordering::SeqCst);
        self.cancel.store(true, Ordering::SeqCst);
        if let Some((sandbox, _)) = target {
            sandbox.vm().kill_now();
        }
    }
}

/// Restores the default action of SIGPIPE (Rust ignores it), so that a
/// write to a closed pipe ends the process quietly instead of failing.
pub fn default_sigpipe() {
    // SAFETY: setting a signal disposition to SIG_DFL has no memory effects.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
}
