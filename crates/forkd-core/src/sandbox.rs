//! A sandbox: one VM booted from the guest artifacts, with exec and files.
//!
//! This is the ephemeral form `forkd run` uses: the VM belongs to this process
//! and dies with it (QEMU gets SIGKILL if we are killed; its run directory is
//! removed on drop or by the next forkd process).

use std::io::{Read, Write};
use std::path::Path;
use std::time::Duration;

use forkd_protocol::client::OutputStream;
use forkd_protocol::{ExecRequest, ExitStatus, Pong};
use forkd_vm::{
    AccelChoice, AccelRequest, Disk, HostProbe, LaunchOptions, MemoryBackend, Network, RunDir, Vm,
    VmConfig,
};

use crate::artifacts::Artifacts;
use crate::paths::Env;
use crate::CoreError;

/// How to boot.
#[derive(Debug, Clone)]
pub struct BootOptions {
    pub cpus: u32,
    pub mem_mib: u64,
    pub accel: AccelRequest,
    pub network: Network,
    pub boot_timeout: Duration,
    /// QEMU binary (name on PATH or path).
    pub qemu: String,
    /// Set from another thread to abandon a boot in progress.
    pub cancel: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
    /// TCG translation-cache size in MiB (QEMU's default when `None`).
    pub tcg_tb_mib: Option<u32>,
    /// Huge pages for the sandbox's own RAM (see [`forkd_vm::HugePages`]).
    pub huge_pages: forkd_vm::HugePages,
    /// Populate all guest RAM at start (QEMU `prealloc=on`).
    pub prealloc: bool,
    /// What the network gateway lets out ([`Network::Gateway`]).
    pub egress: forkd_vm::Egress,
    /// The QEMU process's cgroup limits.
    pub limits: forkd_vm::Limits,
}

impl Default for BootOptions {
    fn default() -> Self {
        BootOptions {
            cpus: 1,
            mem_mib: 256,
            accel: AccelRequest::Auto,
            network: Network::Gateway,
            boot_timeout: Duration::from_secs(60),
            qemu: "qemu-system-x86_64".into(),
            cancel: None,
            tcg_tb_mib: None,
            huge_pages: forkd_vm::HugePages::Off,
            prealloc: false,
            egress: forkd_vm::Egress::default(),
            limits: forkd_vm::Limits::default(),
        }
    }
}

/// A booted sandbox owned by this process.
pub struct Sandbox {
    id: String,
    accel: AccelChoice,
    vm: Vm,
}

impl Sandbox {
    /// Boots a VM and waits until its agent answers.
    pub fn boot(
        env: &Env,
        artifacts: &Artifacts,
        opts: &BootOptions,
    ) -> Result<Sandbox, CoreError> {
        let accel =
            forkd_vm::accel::choose(opts.accel, &HostProbe::read()).map_err(CoreError::Accel)?;
        let vms = env.vms_dir();
        forkd_vm::rundir::sweep_stale(&vms);
        let id = new_id("vm");
        let mut run_dir = RunDir::create(&vms, &id)?;
        run_dir.remove_when_owner_dies()?;
        let mut disks = Vec::new();
        if let Some(base) = &artifacts.rootfs {
            let overlay = run_dir.file("root.qcow2");
            forkd_vm::disk::create_overlay(base, "raw", &overlay).map_err(CoreError::DiskImage)?;
            disks.push(Disk { overlay });
        }
        let config = boot_config(
            artifacts,
            opts,
            &accel,
            &run_dir,
            &id,
            MemoryBackend::Anonymous,
            disks,
        );
        crate::netgw::start(&config, false)?;
        let vm = Vm::launch(
            config,
            run_dir,
            &LaunchOptions {
                boot_timeout: opts.boot_timeout,
                die_with_parent: true,
                cancel: opts.cancel.clone(),
                restore: None,
                on_spawn: None,
            },
        )?;
        Ok(Sandbox { id, accel, vm })
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn accel(&self) -> &AccelChoice {
        &self.accel
    }

    pub fn vm(&self) -> &Vm {
        &self.vm
    }

    /// From QEMU start to the agent's first answer.
    pub fn boot_time(&self) -> Duration {
        self.vm.boot_time()
    }

    pub fn ping(&self) -> Result<Pong, CoreError> {
        self.vm
            .agent()
            .ping(Duration::from_secs(10))
            .map_err(|e| self.vm.explain(e, "ping").into())
    }

    /// Runs a command, streaming output to `on_output`.
    pub fn exec(
        &self,
        req: ExecRequest,
        stdin: Option<Box<dyn Read + Send>>,
        on_output: impl FnMut(OutputStream, &[u8]),
    ) -> Result<ExitStatus, CoreError> {
        let id = self.vm.agent().reserve_id();
        self.exec_as(id, req, stdin, on_output)
    }

    /// [`Self::exec`] under a request id from `vm().agent().reserve_id()`, so
    /// another thread can signal the command.
    pub fn exec_as(
        &self,
        id: u32,
        req: ExecRequest,
        stdin: Option<Box<dyn Read + Send>>,
        on_output: impl FnMut(OutputStream, &[u8]),
    ) -> Result<ExitStatus, CoreError> {
        let what = format!("exec of `{}`", req.argv.join(" "));
        self.vm
            .agent()
            .exec_as(id, req, stdin, on_output)
            .map_err(|e| self.vm.explain(e, &what).into())
    }

    /// Runs a command and collects its output.
    pub fn exec_collect(
        &self,
        req: ExecRequest,
    ) -> Result<forkd_protocol::client::Output, CoreError> {
        let what = format!("exec of `{}`", req.argv.join(" "));
        self.vm
            .agent()
            .exec_collect(req, None)
            .map_err(|e| self.vm.explain(e, &what).into())
    }

    pub fn write_file(
        &self,
        path: &str,
        mode: Option<u32>,
        data: impl Read,
    ) -> Result<u64, CoreError> {
        self.vm
            .agent()
            .write_file(path, mode, data)
            .map_err(|e| self.vm.explain(e, "file write").into())
    }

    pub fn read_file(&self, path: &str, out: impl Write) -> Result<u64, CoreError> {
        self.vm
            .agent()
            .read_file(path, out)
            .map_err(|e| self.vm.explain(e, "file read").into())
    }

    /// Powers the guest off cleanly (or kills it after `timeout`).
    pub fn shutdown(self, timeout: Duration) -> forkd_vm::vm::Shutdown {
        self.vm.shutdown(timeout)
    }

    /// The run directory (gone after shutdown).
    pub fn run_dir(&self) -> &Path {
        self.vm.run_dir()
    }
}

/// The configuration of a VM booted from `artifacts`, with its sockets and
/// console log in `run_dir`.
pub(crate) fn boot_config(
    artifacts: &Artifacts,
    opts: &BootOptions,
    accel: &AccelChoice,
    run_dir: &RunDir,
    id: &str,
    memory: MemoryBackend,
    disks: Vec<Disk>,
) -> VmConfig {
    VmConfig {
        qemu: opts.qemu.clone().into(),
        accel: accel.accel,
        cpus: opts.cpus,
        mem_mib: opts.mem_mib,
        memory,
        kernel: artifacts.kernel.vmlinuz.clone(),
        initramfs: artifacts.initramfs.clone(),
        kernel_args: vec![],
        hostname: id.to_string(),
        disks,
        network: opts.network,
        net_socket: (opts.network == Network::Gateway).then(|| run_dir.file("net.sock")),
        egress: opts.egress.clone(),
        limits: opts.limits,
        run_as: None,
        user_option: Default::default(),
        qmp_socket: run_dir.file("qmp.sock"),
        agent_socket: run_dir.file("agent.sock"),
        console_log: run_dir.file("console.log"),
        incoming: false,
        tcg_tb_mib: opts.tcg_tb_mib,
        huge_pages: opts.huge_pages,
        prealloc: opts.prealloc,
        private_hugetlb: false,
        page_reporting: forkd_vm::VmConfig::wants_page_reporting(opts.huge_pages),
        ram_fd: None,
        tsc_khz: forkd_vm::accel::host_tsc_khz(),
    }
}

/// `prefix-` and 8 random hex digits.
pub fn new_id(prefix: &str) -> String {
    let mut b = [0u8; 4];
    // SAFETY: getrandom writes at most b.len() bytes into b.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    if n != b.len() as isize {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0)
            ^ std::process::id();
        b = t.to_le_bytes();
    }
    format!("{prefix}-{:08x}", u32::from_le_bytes(b))
}
