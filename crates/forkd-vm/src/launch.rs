//! Starting a QEMU process: spawn it in its own session, wait for its
//! sockets and QMP, connect to the guest agent, and clean up on every error
//! (a [`Partial`] QEMU is killed when dropped).

use std::fs::{self, File};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use forkd_protocol::client::{AgentClient, ClientError};

use crate::config::VmConfig;
use crate::process::{describe, process_start_time, tail, tail_bytes, which, STDERR_KEPT};
use crate::qmp::Qmp;
use crate::rundir::RunDir;
use crate::VmError;

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
    /// Called with QEMU's pid and start time right after the process is
    /// spawned, before anything can fail: a caller that recorded the VM
    /// before starting it completes the record here.
    pub on_spawn: Option<SpawnHook>,
}

/// What [`LaunchOptions::on_spawn`] calls.
#[derive(Clone)]
pub struct SpawnHook(pub Arc<dyn Fn(u32, u64) + Send + Sync>);

impl SpawnHook {
    pub fn new(f: impl Fn(u32, u64) + Send + Sync + 'static) -> SpawnHook {
        SpawnHook(Arc::new(f))
    }
}

impl std::fmt::Debug for SpawnHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SpawnHook")
    }
}

impl Default for LaunchOptions {
    fn default() -> Self {
        LaunchOptions {
            boot_timeout: Duration::from_secs(60),
            die_with_parent: true,
            cancel: None,
            restore: None,
            on_spawn: None,
        }
    }
}

/// A QEMU that has not finished booting: cleans up after itself on error.
pub(crate) struct Partial {
    pub(crate) child: Option<Child>,
    /// Why a SIGBUS would have killed it ([`VmConfig::sigbus_cause`]).
    pub(crate) sigbus_cause: Option<&'static str>,
    pub(crate) stderr_path: PathBuf,
    pub(crate) console: PathBuf,
}

impl Partial {
    pub(crate) fn check_alive(&mut self) -> Result<(), VmError> {
        if let Some(child) = self.child.as_mut() {
            if let Ok(Some(status)) = child.try_wait() {
                self.child = None;
                return Err(VmError::ExitedDuringBoot {
                    status: describe(status, self.sigbus_cause),
                    stderr: tail_bytes(&self.stderr_path, STDERR_KEPT),
                    console: tail(&self.console, 15),
                });
            }
        }
        Ok(())
    }

    pub(crate) fn wait_exit(&mut self, within: Duration) {
        let deadline = Instant::now() + within;
        while let Some(child) = self.child.as_mut() {
            if matches!(child.try_wait(), Ok(Some(_))) || Instant::now() > deadline {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub(crate) fn timeout(&self, timeout: Duration) -> VmError {
        VmError::BootTimeout {
            timeout,
            stderr: tail_bytes(&self.stderr_path, STDERR_KEPT),
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

/// A QEMU process that has started and answers on QMP.
pub(crate) struct Started {
    pub(crate) partial: Partial,
    pub(crate) qmp: Qmp,
    pub(crate) started: Instant,
    pub(crate) stderr_path: PathBuf,
    pub(crate) pid: u32,
    pub(crate) pid_start: u64,
}

/// Spawns QEMU for `config` in `run_dir` and waits until QMP answers.
pub(crate) fn start_qemu(
    config: &VmConfig,
    run_dir: &RunDir,
    opts: &LaunchOptions,
) -> Result<Started, VmError> {
    config.validate().map_err(VmError::Config)?;
    let qemu = which(&config.qemu)
        .ok_or_else(|| VmError::QemuNotFound(config.qemu.display().to_string()))?;
    let mut confined = config.clone();
    confined.run_as = crate::confine::run_as_for(run_dir.path())?;
    if confined.run_as.is_some() {
        confined.user_option = crate::confine::UserOption::of(&qemu);
    }
    if let Some(r) = confined.run_as {
        // QEMU's user may traverse the run directory (it connects to the
        // network gateway's socket after dropping privileges), nobody else.
        let dir = run_dir.path();
        let denied = |source| VmError::RunDir {
            path: dir.display().to_string(),
            source,
        };
        std::os::unix::fs::chown(dir, Some(0), Some(r.gid)).map_err(denied)?;
        fs::set_permissions(dir, fs::Permissions::from_mode(0o710)).map_err(denied)?;
    }
    let group = cgroup_for(&confined, run_dir)?;
    let cgroup_fds = group.as_ref().map(|g| g.procs_fds()).unwrap_or_default();
    let stderr_path = run_dir.file("qemu.stderr");
    let stderr = File::create(&stderr_path).map_err(|source| VmError::RunDir {
        path: stderr_path.display().to_string(),
        source,
    })?;
    let started = Instant::now();
    let mut cmd = Command::new(&qemu);
    cmd.args(confined.to_args())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr);
    let die_with_parent = opts.die_with_parent;
    let ram_fd = config.ram_fd.filter(|_| config.private_hugetlb);
    // A child must not punch holes in the RAM image it shares
    // (confine::NoPunchFilter); built here, installed after the fork.
    let no_punch = matches!(config.memory, crate::config::MemoryBackend::PrivateFile(_))
        .then(crate::confine::NoPunchFilter::new);
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    // SAFETY: runs in the forked child before exec; setsid, prctl and fcntl
    // are async-signal-safe syscalls with no memory effects in the child,
    // and the seccomp program was built before the fork.
    unsafe {
        cmd.pre_exec(move || {
            if let Some(f) = &no_punch {
                f.install(root)?;
            }
            // The hugetlb copy of the RAM image stays open across exec:
            // QEMU maps it by /proc/self/fd/N.
            if let Some(fd) = ram_fd {
                if libc::fcntl(fd, libc::F_SETFD, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            // Own session: a Ctrl-C on our terminal is ours to handle,
            // it must not kill QEMU behind our back.
            libc::setsid();
            if die_with_parent {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0);
            }
            // Into its cgroup before it runs: every byte QEMU allocates
            // is charged to the VM's limits.
            crate::cgroup::Group::enter_in_child(&cgroup_fds)
        });
    }
    let child = cmd.spawn().map_err(VmError::Spawn)?;
    drop(group);
    let pid = child.id();
    if die_with_parent {
        // PR_SET_PDEATHSIG does not survive QEMU's drop to its user.
        run_dir.kill_when_owner_dies(pid);
    }
    let pid_start = process_start_time(pid).unwrap_or(0);
    if let Some(hook) = &opts.on_spawn {
        (hook.0)(pid, pid_start);
    }
    let mut partial = Partial {
        child: Some(child),
        sigbus_cause: config.sigbus_cause(),
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

/// Makes the cgroup of the VM in `run_dir` with `config`'s limits. Without
/// root a host may give forkd no writable cgroup: the VM then runs without
/// one (`forkd doctor` says so); as root that is an error.
fn cgroup_for(
    config: &VmConfig,
    run_dir: &RunDir,
) -> Result<Option<crate::cgroup::Group>, VmError> {
    use crate::cgroup::{Group, Layout, Limits};
    let Some(layout) = Layout::detect() else {
        return Ok(None);
    };
    let name = run_dir
        .path()
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let limits = Limits {
        memory_bytes: config.memory_limit_bytes(),
        pids: crate::config::PIDS_MAX,
        cpu_quota_pct: config.limits.cpu_quota_pct,
    };
    match Group::create(&layout, &name, &limits) {
        Ok(g) => Ok(Some(g)),
        Err(e) if crate::confine::is_root() => Err(e.into()),
        Err(_) => Ok(None),
    }
}

/// Connects to the agent of a starting QEMU, failing fast if QEMU exits or
/// the caller cancels.
pub(crate) fn connect_agent(
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
