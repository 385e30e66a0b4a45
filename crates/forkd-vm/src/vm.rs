//! A running QEMU: start it, wait until its agent answers, talk to it, stop it.
//!
//! Ownership rules that keep hosts clean: every VM lives in its own [`RunDir`]
//! (sockets, console log, overlays), locked with `flock` by the process that
//! owns the VM. Dropping a [`Vm`] kills QEMU and removes the directory. If the
//! owner dies without dropping (SIGKILL), QEMU gets SIGKILL from the kernel
//! (`PR_SET_PDEATHSIG`; once QEMU has dropped to its `-runas` user, which
//! clears that, from the run directory's watchdog) and the next forkd
//! process removes the unlocked directory ([`crate::rundir::sweep_stale`]). Disks and migration are in
//! their own modules ([`crate::disk`], [`crate::migration`]); this one is the
//! handle and its lifecycle.

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use forkd_protocol::client::{AgentClient, ClientError};

use crate::config::VmConfig;
use crate::launch::{connect_agent, start_qemu, Started};
pub use crate::launch::{LaunchOptions, SpawnHook};
use crate::migration::restore_device_state;
use crate::process::{describe, pid_alive, reap_if_child, tail, tail_bytes, STDERR_KEPT};
use crate::qmp::Qmp;
use crate::rundir::RunDir;
use crate::VmError;

/// How [`Vm::shutdown`] ended the VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shutdown {
    /// The guest synced and powered off.
    PoweredOff,
    /// QEMU exited on QMP `quit`.
    Quit,
    /// QEMU was killed.
    Killed,
}

/// A running VM with its QMP and agent connections.
pub struct Vm {
    config: VmConfig,
    /// Present while we spawned QEMU and still hold its handle.
    child: Mutex<Option<Child>>,
    pid: u32,
    /// Start time of `pid` (clock ticks since host boot), to tell it from a
    /// later process that reuses the number.
    pid_start: u64,
    /// Kill QEMU and remove the run directory on drop.
    owned: bool,
    qmp: Mutex<Qmp>,
    /// Absent on handles from [`Vm::attach_control`].
    agent: Option<AgentClient>,
    run_dir: Option<RunDir>,
    run_path: PathBuf,
    boot_time: Duration,
    restore_time: Option<Duration>,
    stderr_path: PathBuf,
}

impl Vm {
    /// Starts QEMU and waits until the guest agent has answered the handshake.
    pub fn launch(config: VmConfig, run_dir: RunDir, opts: &LaunchOptions) -> Result<Vm, VmError> {
        let Started {
            mut partial,
            qmp,
            started,
            stderr_path,
            pid,
            pid_start,
        } = start_qemu(&config, &run_dir, opts)?;
        // Preallocation happens before the guest boots: not boot time.
        let deadline = started + opts.boot_timeout + config.prealloc_allowance();
        let mut qmp = qmp;
        let mut restore_time = None;
        if let Some(state) = &opts.restore {
            let t = Instant::now();
            if let Err(e) = restore_device_state(&mut qmp, state, deadline) {
                partial.wait_exit(Duration::from_millis(500));
                partial.check_alive()?;
                return Err(e);
            }
            restore_time = Some(t.elapsed());
        }
        let agent = connect_agent(&config, &mut partial, deadline, opts)?;
        let boot_time = started.elapsed();
        if opts.restore.is_none() {
            // Booted: what runs from now on may be the guest's own code.
            crate::console::bound(&mut qmp)?;
        }
        let run_path = run_dir.path().to_path_buf();
        Ok(Vm {
            config,
            child: Mutex::new(partial.child.take()),
            pid,
            pid_start,
            owned: true,
            qmp: Mutex::new(qmp),
            agent: Some(agent),
            run_dir: Some(run_dir),
            run_path,
            boot_time,
            restore_time,
            stderr_path,
        })
    }

    /// Starts QEMU for a later restore (`config.incoming`) and returns as soon
    /// as it answers on QMP: a warm-pool member that skips QEMU start-up when
    /// it is activated with [`Vm::attach_restoring`]. The process is detached.
    pub fn launch_standby(
        config: &VmConfig,
        mut run_dir: RunDir,
        opts: &LaunchOptions,
    ) -> Result<(u32, u64), VmError> {
        if !config.incoming {
            return Err(VmError::Config("a standby VM needs `incoming`".into()));
        }
        let Started {
            mut partial,
            pid,
            pid_start,
            ..
        } = start_qemu(config, &run_dir, opts)?;
        // QEMU keeps listening on QMP after we hang up; the activator reconnects.
        run_dir.keep();
        partial.child.take();
        Ok((pid, pid_start))
    }

    /// Connects to a QEMU started earlier (by this or another process) with
    /// `config`, by pid and sockets. The VM is not owned: dropping the
    /// returned handle leaves it running.
    pub fn attach(
        config: VmConfig,
        pid: u32,
        pid_start: u64,
        run_dir: &Path,
        timeout: Duration,
    ) -> Result<Vm, VmError> {
        Self::attach_restoring(config, pid, pid_start, run_dir, None, timeout)
    }

    /// [`Vm::attach`] to a standby QEMU (from [`Vm::launch_standby`]),
    /// loading the device state `restore` first when given.
    pub fn attach_restoring(
        config: VmConfig,
        pid: u32,
        pid_start: u64,
        run_dir: &Path,
        restore: Option<&Path>,
        timeout: Duration,
    ) -> Result<Vm, VmError> {
        if !pid_alive(pid, pid_start) {
            return Err(VmError::NotRunning { pid });
        }
        // Connect QMP only if needed now (restore) or later (a command): an
        // exec must not hold QEMU's single QMP connection.
        let mut qmp = Qmp::lazy(&config.qmp_socket, timeout);
        let mut restore_time = None;
        if let Some(state) = restore {
            let t = Instant::now();
            restore_device_state(&mut qmp, state, Instant::now() + timeout)?;
            restore_time = Some(t.elapsed());
        }
        let stream = UnixStream::connect(&config.agent_socket)
            .map_err(|e| VmError::Agent(ClientError::Io(e)))?;
        let agent = AgentClient::connect_while(stream, timeout, &mut || {
            if pid_alive(pid, pid_start) {
                Ok(())
            } else {
                Err(ClientError::Closed("QEMU exited".into()))
            }
        })?;
        Ok(Vm {
            stderr_path: run_dir.join("qemu.stderr"),
            config,
            child: Mutex::new(None),
            pid,
            pid_start,
            owned: false,
            qmp: Mutex::new(qmp),
            agent: Some(agent),
            run_dir: None,
            run_path: run_dir.to_path_buf(),
            boot_time: Duration::ZERO,
            restore_time,
        })
    }

    /// Lets the VM outlive this handle (and this process): drop no longer
    /// kills it or removes its run directory. Returns `(pid, pid_start)`,
    /// which [`Vm::attach`] needs later.
    pub fn detach(mut self) -> (u32, u64) {
        self.owned = false;
        if let Some(rd) = self.run_dir.as_mut() {
            rd.keep();
        }
        // Dropping the Child handle neither kills nor waits.
        self.child.lock().unwrap_or_else(|p| p.into_inner()).take();
        (self.pid, self.pid_start)
    }

    /// Start time of QEMU's process, for [`Vm::attach`].
    pub fn pid_start(&self) -> u64 {
        self.pid_start
    }

    /// How long loading the device state took, for restored VMs.
    pub fn restore_time(&self) -> Option<Duration> {
        self.restore_time
    }

    /// Whether QEMU is still running.
    pub fn is_alive(&self) -> bool {
        let mut child = self.child.lock().unwrap_or_else(|p| p.into_inner());
        match child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => pid_alive(self.pid, self.pid_start),
        }
    }

    pub fn config(&self) -> &VmConfig {
        &self.config
    }

    /// QEMU's process id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// From QEMU start to the agent's handshake.
    pub fn boot_time(&self) -> Duration {
        self.boot_time
    }

    /// The agent session. Handles from [`Vm::attach_control`] have none:
    /// calling this on one is a bug in the caller.
    pub fn agent(&self) -> &AgentClient {
        self.agent
            .as_ref()
            .expect("a control-only VM handle has no agent session (use Vm::attach)")
    }

    /// Attaches for QEMU control only (QMP, lazily), without the agent:
    /// QEMU's agent socket serves one client at a time, and a branch or
    /// snapshot must not wait for a running `exec` to finish.
    pub fn attach_control(
        config: VmConfig,
        pid: u32,
        pid_start: u64,
        run_dir: &Path,
    ) -> Result<Vm, VmError> {
        if !pid_alive(pid, pid_start) {
            return Err(VmError::NotRunning { pid });
        }
        Ok(Vm {
            stderr_path: run_dir.join("qemu.stderr"),
            qmp: Mutex::new(Qmp::lazy(&config.qmp_socket, Duration::from_secs(30))),
            config,
            child: Mutex::new(None),
            pid,
            pid_start,
            owned: false,
            agent: None,
            run_dir: None,
            run_path: run_dir.to_path_buf(),
            boot_time: Duration::ZERO,
            restore_time: None,
        })
    }

    /// The QMP session (one command at a time).
    pub fn qmp(&self) -> MutexGuard<'_, Qmp> {
        self.qmp.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn run_dir(&self) -> &Path {
        &self.run_path
    }

    /// Kills QEMU and waits (up to 5 s) until it is gone, owned or not.
    pub fn terminate(self) {
        self.kill_now();
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let gone = {
                let mut child = self.child.lock().unwrap_or_else(|p| p.into_inner());
                match child.as_mut() {
                    Some(c) => c.try_wait().map(|s| s.is_some()).unwrap_or(true),
                    None => {
                        let gone = !pid_alive(self.pid, self.pid_start);
                        // A zombie counts as gone; reap it if it is ours.
                        reap_if_child(self.pid, self.pid_start);
                        gone
                    }
                }
            };
            if gone || Instant::now() > deadline {
                return;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// The QEMU exit status if it has exited.
    pub fn try_exit(&self) -> Option<ExitStatus> {
        let mut child = self.child.lock().unwrap_or_else(|p| p.into_inner());
        child.as_mut().and_then(|c| c.try_wait().ok().flatten())
    }

    /// Sends SIGKILL to QEMU without waiting (safe from any thread); the
    /// owner's next agent call fails with [`VmError::Died`].
    pub fn kill_now(&self) {
        // SAFETY: kill has no memory effects; the pid is our unreaped child
        // (reaping happens only through `child`), so it cannot be reused.
        unsafe { libc::kill(self.pid as libc::pid_t, libc::SIGKILL) };
    }

    /// Turns an agent error into the real story when QEMU is what died.
    pub fn explain(&self, err: ClientError, during: &str) -> VmError {
        if matches!(err, ClientError::Closed(_) | ClientError::Io(_)) {
            // The socket closes while QEMU is exiting; give it a moment to be reapable.
            let deadline = Instant::now() + Duration::from_secs(2);
            while Instant::now() < deadline {
                if let Some(status) = self.try_exit() {
                    return VmError::Died {
                        status: describe(status, self.config.sigbus_cause()),
                        during: during.into(),
                        console: tail(&self.config.console_log, 10),
                    };
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        VmError::Agent(err)
    }

    /// Last lines the guest wrote to its console while it booted (later
    /// output goes to QEMU's bounded ring, [`crate::console`]).
    pub fn console_tail(&self, lines: usize) -> String {
        tail(&self.config.console_log, lines)
    }

    /// The end of what QEMU wrote to stderr (its last [`STDERR_KEPT`]
    /// bytes: a guest can make QEMU log).
    pub fn qemu_stderr(&self) -> String {
        tail_bytes(&self.stderr_path, STDERR_KEPT)
    }

    /// Powers the guest off through its agent (which syncs its disks), falling
    /// back to QMP `quit` and then SIGKILL. Removes the run directory. Returns
    /// how it ended.
    pub fn shutdown(self, timeout: Duration) -> Shutdown {
        let deadline = Instant::now() + timeout;
        if self
            .agent
            .as_ref()
            .is_some_and(|a| a.shutdown(Duration::from_secs(2)).is_ok())
            && self.wait_exit(deadline)
        {
            return Shutdown::PoweredOff;
        }
        if self.qmp().quit().is_ok() && self.wait_exit(Instant::now() + Duration::from_secs(3)) {
            return Shutdown::Quit;
        }
        Shutdown::Killed // by Drop
    }

    fn wait_exit(&self, deadline: Instant) -> bool {
        loop {
            if self.try_exit().is_some() {
                return true;
            }
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Kills QEMU at once (SIGKILL) and removes the run directory.
    pub fn kill(self) {}
}

impl Drop for Vm {
    fn drop(&mut self) {
        if !self.owned {
            return;
        }
        let mut child = self.child.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(mut child) = child.take() {
            let _ = child.kill();
            let _ = child.wait();
            if let Some(name) = self.run_path.file_name() {
                crate::cgroup::release(&name.to_string_lossy());
            }
        }
    }
}
