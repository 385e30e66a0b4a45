//! Detached helpers: work that must outlive the call that started it (the
//! writer of a branch that did not wait, a warm-pool refill, a sandbox's
//! network gateway).
//!
//! A helper is this very executable started again with its job, as JSON, in
//! the environment variable [`JOB_VAR`]. A program that opens a
//! [`crate::Fleet`] and wants that work to outlive it calls [`run_if_helper`]
//! first thing in `main`: when the variable is set it runs the job and tells
//! `main` to exit; otherwise it notes that this executable can host helpers.
//! Programs that never call it (test harnesses, other library users) get the
//! same work done on a thread of their own process instead.
//!
//! Helpers are started with a double fork: the intermediate process exits at
//! once and is reaped at once, so no caller (a daemon running for weeks, an
//! agent loop) is left with zombies, and the helper is adopted by init.

use std::path::PathBuf;
use std::process::{Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};

use serde::{Deserialize, Serialize};

use crate::branch::WriterJob;
use crate::paths::Env;
use crate::{CoreError, Fleet};

/// The environment variable that carries a helper's job.
pub const JOB_VAR: &str = "FORKD_HELPER_JOB";

/// Work a detached helper does.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "job", rename_all = "snake_case")]
pub enum Job {
    /// Guard a live branch: run its writer as a child process and fail the
    /// branch (releasing its source) if the writer dies.
    BranchWriter(Box<WriterJob>),
    /// Serve a sandbox's network gateway on `socket` until its QEMU ends.
    NetGateway {
        socket: PathBuf,
        egress: forkd_vm::Egress,
    },
    /// Receive a live branch's stream and publish the snapshot (the child a
    /// [`Job::BranchWriter`] starts).
    BranchStream(Box<WriterJob>),
    /// Top snapshot `tag`'s warm pool up to `size` members.
    FillPool {
        home: PathBuf,
        runtime: PathBuf,
        tag: String,
        size: usize,
    },
}

static CAN_HOST: AtomicBool = AtomicBool::new(false);

/// Call first thing in `main`. Runs the helper job this process was started
/// for and returns its exit code (then `main` returns it), or `None` for a
/// normal start, after which this executable hosts detached helpers.
pub fn run_if_helper() -> Option<ExitCode> {
    let Some(job) = std::env::var_os(JOB_VAR) else {
        CAN_HOST.store(true, Ordering::Relaxed);
        return None;
    };
    // Not inherited by what the helper starts (pool QEMUs).
    std::env::remove_var(JOB_VAR);
    // A helper may start helpers of its own (a pool fill, the gateways of
    // the members it starts).
    CAN_HOST.store(true, Ordering::Relaxed);
    let ran = serde_json::from_str::<Job>(&job.to_string_lossy())
        .map_err(|e| CoreError::Writer(format!("unreadable helper job: {e}")))
        .and_then(run);
    Some(match ran {
        Ok(()) => ExitCode::SUCCESS,
        Err(_) => ExitCode::FAILURE, // recorded where the job's owner looks
    })
}

fn run(job: Job) -> Result<(), CoreError> {
    match job {
        Job::BranchWriter(job) => crate::branch::supervise_writer(*job),
        Job::BranchStream(job) => crate::branch::run_writer(*job),
        Job::NetGateway { socket, egress } => crate::netgw::run_helper(socket, egress),
        Job::FillPool {
            home,
            runtime,
            tag,
            size,
        } => {
            let fleet = Fleet::open(&Env { home, runtime })?;
            fleet.fill_pool(&tag, size).map(drop)
        }
    }
}

/// Whether this process can start detached helpers (its `main` called
/// [`run_if_helper`]).
pub fn can_host() -> bool {
    CAN_HOST.load(Ordering::Relaxed)
}

/// Starts `job` in a detached helper (double fork, own session, no standard
/// streams). Fails when this process cannot host helpers.
pub(crate) fn start(job: &Job) -> Result<(), CoreError> {
    if !can_host() {
        return Err(CoreError::Writer(
            "this program cannot start detached helpers (its main does not call forkd_core::helper::run_if_helper)".into(),
        ));
    }
    let exe = std::env::current_exe()
        .map_err(|e| CoreError::Writer(format!("finding this executable: {e}")))?;
    let json = serde_json::to_string(job).expect("helper jobs serialise");
    let mut cmd = Command::new(exe);
    cmd.env(JOB_VAR, json)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    use std::os::unix::process::CommandExt;
    // SAFETY: runs in the forked child before exec, where only
    // async-signal-safe calls are allowed: sigemptyset, sigprocmask, setsid,
    // fork and _exit are. The intermediate exits at once; the grandchild
    // goes on to exec.
    unsafe {
        cmd.pre_exec(|| {
            // The caller may block termination signals (the CLI does, to
            // handle them on one thread); a helper must die of them.
            let mut none: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut none);
            libc::sigprocmask(libc::SIG_SETMASK, &none, std::ptr::null_mut());
            libc::setsid();
            match libc::fork() {
                -1 => Err(std::io::Error::last_os_error()),
                0 => Ok(()),
                _ => libc::_exit(0),
            }
        });
    }
    let mut intermediate = cmd
        .spawn()
        .map_err(|e| CoreError::Writer(format!("starting a helper: {e}")))?;
    let _ = intermediate.wait();
    Ok(())
}
