//! A running QEMU: start it, wait until its agent answers, talk to it, stop it.
//!
//! Ownership rules that keep hosts clean: every VM lives in its own [`RunDir`]
//! (sockets, console log, overlays), locked with `flock` by the process that
//! owns the VM. Dropping a [`Vm`] kills QEMU and removes the directory. If the
//! owner dies without dropping (SIGKILL), QEMU gets SIGKILL from the kernel
//! (`PR_SET_PDEATHSIG`) and the next forkd process removes the unlocked
//! directory ([`sweep_stale`]).

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::io::AsRawFd;
use std::os::unix::net::UnixStream;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use forkd_protocol::client::{AgentClient, ClientError};

use crate::config::VmConfig;
use crate::qmp::{Qmp, QmpError};

/// Why a VM operation failed.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("invalid VM configuration: {0}")]
    Config(String),
    #[error("{0} not found: install QEMU with `apt-get install qemu-system-x86`")]
    QemuNotFound(String),
    #[error("cannot start QEMU: {0}")]
    Spawn(io::Error),
    #[error("QEMU exited during boot ({status}){}", detail(.stderr, .console))]
    ExitedDuringBoot {
        status: String,
        stderr: String,
        console: String,
    },
    #[error("the guest agent did not answer within {timeout:?} of QEMU starting{}", detail(.stderr, .console))]
    BootTimeout {
        timeout: Duration,
        stderr: String,
        console: String,
    },
    #[error("the VM died ({status}) during {during}{}", detail("", .console))]
    Died {
        status: String,
        during: String,
        console: String,
    },
    #[error("boot cancelled")]
    Cancelled,
    #[error("QEMU (pid {pid}) is not running")]
    NotRunning { pid: u32 },
    #[error("restoring the device state failed: {0}")]
    Restore(String),
    #[error(transparent)]
    Qmp(#[from] QmpError),
    #[error(transparent)]
    Agent(#[from] ClientError),
    #[error("VM run directory {path}: {source}")]
    RunDir { path: String, source: io::Error },
}

fn detail(stderr: &str, console: &str) -> String {
    let mut s = String::new();
    if !stderr.trim().is_empty() {
        s.push_str(&format!("\nQEMU said: {}", stderr.trim()));
    }
    if !console.trim().is_empty() {
        s.push_str(&format!(
            "\nlast guest console lines:\n{}",
            console.trim_end()
        ));
    }
    s
}

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
    /// the pipe closes and it removes the directory. It runs in its own
    /// session so terminal signals meant for us do not end it early.
    pub fn remove_when_owner_dies(&mut self) -> Result<(), VmError> {
        let err = |source| VmError::RunDir {
            path: self.path.display().to_string(),
            source,
        };
        let mut cmd = Command::new("/bin/sh");
        cmd.arg("-c")
            .arg("while read -r _; do :; done; rm -rf -- \"$0\"")
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

impl Drop for RunDir {
    fn drop(&mut self) {
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

/// How to launch.
#[derive(Debug, Clone)]
pub struct LaunchOptions {
    /// From QEMU start until the agent must have answered.
    pub boot_timeout: Duration,
    /// Kill QEMU when the thread that started it dies (ephemeral VMs).
    pub die_with_parent: bool,
    /// Set to true (from another thread) to abandon the boot.
    pub cancel: Option<Arc<AtomicBool>>,
    /// Restore the guest from this device-state stream (the config must say
    /// `incoming`) instead of booting it.
    pub restore: Option<PathBuf>,
}

impl Default for LaunchOptions {
    fn default() -> Self {
        LaunchOptions {
            boot_timeout: Duration::from_secs(60),
            die_with_parent: true,
            cancel: None,
            restore: None,
        }
    }
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

    /// Saves the device state (no RAM: guest RAM must be a shared file) to
    /// `path` with `x-ignore-shared`. The guest must be paused; QEMU is left
    /// in `postmigrate` and resumes with `cont`.
    pub fn save_device_state(&self, path: &Path) -> Result<(), VmError> {
        let mut qmp = self.qmp();
        set_ignore_shared(&mut qmp)?;
        qmp.execute(
            "migrate",
            Some(serde_json::json!({ "uri": format!("exec:cat > {}", shell_quote(path)) })),
        )?;
        wait_migration(&mut qmp, Instant::now() + Duration::from_secs(60))
    }

    /// The file QEMU currently writes for disk `vdN` (the top of its chain).
    pub fn disk_top(&self, index: usize) -> Result<PathBuf, VmError> {
        let (_, file) = top_node(&mut self.qmp(), index)?;
        Ok(PathBuf::from(file))
    }

    /// Freezes the disk `vdN`: QEMU goes on writing a new qcow2 overlay at
    /// `new_overlay` whose backing file is the current top, which is never
    /// written again. Returns the path of that frozen file.
    pub fn snapshot_disk(&self, index: usize, new_overlay: &Path) -> Result<PathBuf, VmError> {
        let mut qmp = self.qmp();
        let (top, file) = top_node(&mut qmp, index)?;
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        qmp.execute(
            "blockdev-snapshot-sync",
            Some(serde_json::json!({
                "node-name": top,
                "snapshot-file": new_overlay.to_string_lossy(),
                "snapshot-node-name": format!("disk{index}-{stamp:x}"),
                "format": "qcow2",
            })),
        )?;
        Ok(PathBuf::from(file))
    }

    /// The slow half of [`Vm::snapshot_disk`], done while the guest runs:
    /// creates `new_overlay` on top of disk `index`'s current image and
    /// attaches it to QEMU as a node without a backing. Inside the pause,
    /// [`Vm::commit_disk_snapshot`] is then a single graph change.
    pub fn prepare_disk_snapshot(
        &self,
        index: usize,
        new_overlay: &Path,
    ) -> Result<PreparedDiskSnapshot, VmError> {
        let mut qmp = self.qmp();
        let entry = disk_entry(&mut qmp, index)?;
        let (top, file) = top_of(&entry);
        let size = entry["inserted"]["image"]["virtual-size"]
            .as_u64()
            .ok_or_else(|| VmError::Config(format!("QEMU reports no size for disk vd{index}")))?;
        // `-u`: QEMU holds the write lock on the current image, so qemu-img
        // must not open it; the size comes from QEMU instead.
        let out = std::process::Command::new("qemu-img")
            .args(["create", "-q", "-u", "-f", "qcow2", "-F", "qcow2", "-b"])
            .arg(&file)
            .arg(new_overlay)
            .arg(size.to_string())
            .output()
            .map_err(|e| VmError::Config(format!("cannot run qemu-img: {e}")))?;
        if !out.status.success() {
            return Err(VmError::Config(format!(
                "qemu-img create {} failed: {}",
                new_overlay.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let node = format!("disk{index}-{stamp:x}");
        let added = qmp.execute(
            "blockdev-add",
            Some(serde_json::json!({
                "driver": "qcow2",
                "node-name": node,
                "file": { "driver": "file", "filename": new_overlay.to_string_lossy() },
                "backing": null,
            })),
        );
        if let Err(e) = added {
            let _ = std::fs::remove_file(new_overlay);
            return Err(e.into());
        }
        Ok(PreparedDiskSnapshot {
            top_node: top,
            frozen: PathBuf::from(file),
            overlay_node: node,
            overlay: new_overlay.to_path_buf(),
        })
    }

    /// Makes a prepared overlay the disk's top (the guest should be
    /// stopped); returns the image that is frozen from now on.
    pub fn commit_disk_snapshot(&self, p: &PreparedDiskSnapshot) -> Result<PathBuf, VmError> {
        self.qmp().execute(
            "blockdev-snapshot",
            Some(serde_json::json!({ "node": p.top_node, "overlay": p.overlay_node })),
        )?;
        Ok(p.frozen.clone())
    }

    /// Detaches and deletes a prepared overlay that was never committed.
    pub fn abandon_disk_snapshot(&self, p: PreparedDiskSnapshot) {
        let _ = self.qmp().execute(
            "blockdev-del",
            Some(serde_json::json!({ "node-name": p.overlay_node })),
        );
        let _ = std::fs::remove_file(&p.overlay);
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
                        status: describe(status),
                        during: during.into(),
                        console: tail(&self.config.console_log, 10),
                    };
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        VmError::Agent(err)
    }

    /// Last lines of the guest console.
    pub fn console_tail(&self, lines: usize) -> String {
        tail(&self.config.console_log, lines)
    }

    /// What QEMU wrote to stderr.
    pub fn qemu_stderr(&self) -> String {
        fs::read_to_string(&self.stderr_path).unwrap_or_default()
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
        }
    }
}

/// A QEMU that has not finished booting: cleans up after itself on error.
struct Partial {
    child: Option<Child>,
    stderr_path: PathBuf,
    console: PathBuf,
}

impl Partial {
    fn check_alive(&mut self) -> Result<(), VmError> {
        if let Some(child) = self.child.as_mut() {
            if let Ok(Some(status)) = child.try_wait() {
                self.child = None;
                return Err(VmError::ExitedDuringBoot {
                    status: describe(status),
                    stderr: fs::read_to_string(&self.stderr_path).unwrap_or_default(),
                    console: tail(&self.console, 15),
                });
            }
        }
        Ok(())
    }

    fn wait_exit(&mut self, within: Duration) {
        let deadline = Instant::now() + within;
        while let Some(child) = self.child.as_mut() {
            if matches!(child.try_wait(), Ok(Some(_))) || Instant::now() > deadline {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn timeout(&self, timeout: Duration) -> VmError {
        VmError::BootTimeout {
            timeout,
            stderr: fs::read_to_string(&self.stderr_path).unwrap_or_default(),
            console: tail(&self.console, 15),
        }
    }
}

impl Drop for Partial {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// "exit code 1", "killed by signal 9".
pub fn describe(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(c), _) => format!("exit code {c}"),
        (None, Some(s)) => format!("killed by signal {s}"),
        _ => status.to_string(),
    }
}

/// The last `lines` lines of a text file (reads at most its last 64 KiB).
pub fn tail(path: &Path, lines: usize) -> String {
    let Ok(mut f) = File::open(path) else {
        return String::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(64 * 1024)));
    let mut buf = Vec::new();
    let _ = f.read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf);
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Resolves a program name on PATH (or checks an explicit path).
pub fn which(program: &Path) -> Option<PathBuf> {
    if program.components().count() > 1 {
        return program.is_file().then(|| program.to_path_buf());
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(program))
            .find(|p| p.is_file())
    })
}

/// `qemu-system-x86_64 --version`, first line.
pub fn qemu_version(qemu: &Path) -> Result<String, VmError> {
    let exe = which(qemu).ok_or_else(|| VmError::QemuNotFound(qemu.display().to_string()))?;
    let out = Command::new(exe)
        .arg("--version")
        .output()
        .map_err(VmError::Spawn)?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()
        .unwrap_or("")
        .to_string())
}

/// A QEMU process that has started and answers on QMP.
struct Started {
    partial: Partial,
    qmp: Qmp,
    started: Instant,
    stderr_path: PathBuf,
    pid: u32,
    pid_start: u64,
}

/// Spawns QEMU for `config` in `run_dir` and waits until QMP answers.
fn start_qemu(
    config: &VmConfig,
    run_dir: &RunDir,
    opts: &LaunchOptions,
) -> Result<Started, VmError> {
    config.validate().map_err(VmError::Config)?;
    let qemu = which(&config.qemu)
        .ok_or_else(|| VmError::QemuNotFound(config.qemu.display().to_string()))?;
    let stderr_path = run_dir.file("qemu.stderr");
    let stderr = File::create(&stderr_path).map_err(|source| VmError::RunDir {
        path: stderr_path.display().to_string(),
        source,
    })?;
    let started = Instant::now();
    let mut cmd = Command::new(&qemu);
    cmd.args(config.to_args())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr);
    let die_with_parent = opts.die_with_parent;
    // SAFETY: runs in the forked child before exec; setsid and prctl are
    // async-signal-safe syscalls with no memory effects in the child.
    unsafe {
        cmd.pre_exec(move || {
            // Own session: a Ctrl-C on our terminal is ours to handle,
            // it must not kill QEMU behind our back.
            libc::setsid();
            if die_with_parent {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0);
            }
            Ok(())
        });
    }
    let child = cmd.spawn().map_err(VmError::Spawn)?;
    let pid = child.id();
    let pid_start = process_start_time(pid).unwrap_or(0);
    let mut partial = Partial {
        child: Some(child),
        stderr_path: stderr_path.clone(),
        console: config.console_log.clone(),
    };

    // Sockets appear once QEMU has parsed its options.
    let deadline = started + opts.boot_timeout;
    while !(config.qmp_socket.exists() && config.agent_socket.exists()) {
        partial.check_alive()?;
        if opts
            .cancel
            .as_ref()
            .is_some_and(|c| c.load(Ordering::SeqCst))
        {
            return Err(VmError::Cancelled);
        }
        if Instant::now() > deadline {
            return Err(partial.timeout(opts.boot_timeout));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    // A connection failing here usually means QEMU is on its way out:
    // give it a moment so the error can say why. QEMU answers only after it
    // has preallocated guest RAM, hence a wait that grows with the guest.
    let qmp_wait = Duration::from_secs(10) + config.prealloc_allowance();
    let qmp = match Qmp::connect(&config.qmp_socket, qmp_wait) {
        Ok(q) => q,
        Err(e) => {
            partial.wait_exit(Duration::from_secs(2));
            partial.check_alive()?;
            return Err(e.into());
        }
    };
    Ok(Started {
        partial,
        qmp,
        started,
        stderr_path,
        pid,
        pid_start,
    })
}

/// Connects to the agent of a starting QEMU, failing fast if QEMU exits or
/// the caller cancels.
fn connect_agent(
    config: &VmConfig,
    partial: &mut Partial,
    deadline: Instant,
    opts: &LaunchOptions,
) -> Result<AgentClient, VmError> {
    let stream = match UnixStream::connect(&config.agent_socket) {
        Ok(s) => s,
        Err(e) => {
            partial.wait_exit(Duration::from_secs(2));
            partial.check_alive()?;
            return Err(VmError::Agent(ClientError::Io(e)));
        }
    };
    let left = deadline.saturating_duration_since(Instant::now());
    let mut exited = None;
    let mut keep_waiting = || {
        if opts
            .cancel
            .as_ref()
            .is_some_and(|c| c.load(Ordering::SeqCst))
        {
            return Err(ClientError::Cancelled);
        }
        if let Err(e) = partial.check_alive() {
            exited = Some(e);
            return Err(ClientError::Cancelled);
        }
        Ok(())
    };
    let connected = AgentClient::connect_while(stream, left, &mut keep_waiting);
    if let Some(e) = exited {
        return Err(e);
    }
    let agent = match connected {
        Ok(a) => a,
        Err(ClientError::Cancelled) => return Err(VmError::Cancelled),
        Err(ClientError::HandshakeTimeout(_)) => {
            partial.check_alive()?;
            return Err(partial.timeout(opts.boot_timeout));
        }
        Err(e) => {
            partial.wait_exit(Duration::from_secs(2));
            partial.check_alive()?;
            return Err(e.into());
        }
    };
    Ok(agent)
}

/// The node name and file of the top of disk `vdN`'s chain.
/// An overlay made by [`Vm::prepare_disk_snapshot`], not yet the top.
#[derive(Debug)]
pub struct PreparedDiskSnapshot {
    top_node: String,
    frozen: PathBuf,
    overlay_node: String,
    overlay: PathBuf,
}

/// QEMU's `query-block` entry of disk `index`.
fn disk_entry(qmp: &mut Qmp, index: usize) -> Result<serde_json::Value, VmError> {
    let blocks = qmp.execute("query-block", None)?;
    // `qdev` is the device id ("vd0") or its QOM path, depending on version.
    let id = format!("vd{index}");
    let path = format!("/{id}/");
    blocks
        .as_array()
        .and_then(|l| {
            l.iter().find(|b| {
                b["qdev"]
                    .as_str()
                    .is_some_and(|q| q == id || q.contains(&path))
            })
        })
        .cloned()
        .ok_or_else(|| VmError::Config(format!("the VM has no disk vd{index}")))
}

/// The top node's name and image file of a `query-block` entry.
fn top_of(entry: &serde_json::Value) -> (String, String) {
    let field = |k: &str| {
        entry["inserted"][k]
            .as_str()
            .unwrap_or_default()
            .to_string()
    };
    (field("node-name"), field("file"))
}

fn top_node(qmp: &mut Qmp, index: usize) -> Result<(String, String), VmError> {
    Ok(top_of(&disk_entry(qmp, index)?))
}

/// Loads a device-state stream into a QEMU started with `-incoming defer` and
/// waits until the guest runs.
fn restore_device_state(qmp: &mut Qmp, state: &Path, deadline: Instant) -> Result<(), VmError> {
    set_ignore_shared(qmp)?;
    qmp.execute(
        "migrate-incoming",
        Some(serde_json::json!({ "uri": format!("exec:cat {}", shell_quote(state)) })),
    )?;
    loop {
        let status = qmp.status()?;
        if status == "running" {
            return Ok(());
        }
        let mig = qmp.execute("query-migrate", None)?;
        if mig["status"] == "completed" {
            // The state was saved from a paused source, and QEMU restores the
            // run state with it: the guest continues only when told to.
            qmp.cont()?;
            return Ok(());
        }
        if mig["status"] == "failed" {
            return Err(VmError::Restore(
                mig["error-desc"]
                    .as_str()
                    .unwrap_or("migration failed")
                    .to_string(),
            ));
        }
        if Instant::now() > deadline {
            return Err(VmError::Restore(format!(
                "the guest was not running before the deadline (status {status})"
            )));
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn set_ignore_shared(qmp: &mut Qmp) -> Result<(), VmError> {
    // Capabilities persist in QEMU: a live branch before this left
    // background-snapshot on, which would turn this save into another one.
    qmp.execute(
        "migrate-set-capabilities",
        Some(serde_json::json!({
            "capabilities": [
                { "capability": "background-snapshot", "state": false },
                { "capability": "x-ignore-shared", "state": true },
            ]
        })),
    )?;
    Ok(())
}

/// Polls an outgoing migration until it completes.
fn wait_migration(qmp: &mut Qmp, deadline: Instant) -> Result<(), VmError> {
    loop {
        let mig = qmp.execute("query-migrate", None)?;
        match mig["status"].as_str().unwrap_or("") {
            "completed" => return Ok(()),
            "failed" | "cancelled" => {
                return Err(VmError::Restore(format!(
                    "saving the device state failed: {}",
                    mig["error-desc"].as_str().unwrap_or("unknown error")
                )))
            }
            _ => {}
        }
        if Instant::now() > deadline {
            return Err(VmError::Restore("saving the device state timed out".into()));
        }
        std::thread::sleep(Duration::from_micros(500));
    }
}

/// Single-quotes a path for the shell QEMU runs `exec:` URIs with.
fn shell_quote(p: &Path) -> String {
    format!("'{}'", p.to_string_lossy().replace('\'', "'\\''"))
}

/// Field 22 of /proc/<pid>/stat: when the process started, in clock ticks.
pub fn process_start_time(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may contain spaces and parentheses: split after the last ')'.
    let rest = stat.rsplit_once(')')?.1;
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// True when `pid` runs, is not a zombie, and started at `start` (0: any).
pub fn pid_alive(pid: u32, start: u64) -> bool {
    let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return false;
    };
    let mut fields = rest.split_whitespace();
    if fields.next() == Some("Z") {
        return false;
    }
    start == 0 || fields.nth(18).and_then(|s| s.parse::<u64>().ok()) == Some(start)
}

/// Reaps `pid` if it is a child of this process that has been killed. Blocks
/// until its whole thread group is gone: the leader of a multi-threaded
/// process (QEMU) shows as a zombie while its other threads are still
/// exiting, and a non-blocking wait then reaps nothing, leaving a zombie that
/// nobody reaps later. No-op for other processes, and for a process that
/// merely reuses the pid (its start time differs from `start`).
/// Call it only after the process was killed.
pub fn reap_if_child(pid: u32, start: u64) {
    let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return;
    };
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ppid = fields.get(1).and_then(|p| p.parse::<u32>().ok());
    let started = fields.get(19).and_then(|p| p.parse::<u64>().ok());
    if ppid != Some(std::process::id()) || (start != 0 && started != Some(start)) {
        return;
    }
    let mut status = 0;
    // SAFETY: waitpid on our own child; writes only `status`.
    unsafe { libc::waitpid(pid as libc::pid_t, &mut status, 0) };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shell_quoting_survives_quotes_and_spaces() {
        assert_eq!(shell_quote(Path::new("/a b/c")), "'/a b/c'");
        assert_eq!(shell_quote(Path::new("/it's")), "'/it'\\''s'");
    }

    #[test]
    fn this_process_is_alive_with_its_start_time() {
        let me = std::process::id();
        let start = process_start_time(me).unwrap();
        assert!(pid_alive(me, start));
        assert!(pid_alive(me, 0));
        assert!(!pid_alive(me, start + 1));
        assert!(!pid_alive(u32::MAX - 1, 0));
    }
}
