//! `forkd`: the command-line front end. It parses arguments, calls the
//! operations seam (this host's fleet, or a daemon with `--remote`) and
//! prints; nothing else lives here.

mod commands;
mod hints;
mod remote;
mod signals;

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use forkd_core::{doctor, ArtifactOptions, BootOptions, Env, Image, Sandbox};
use forkd_protocol::client::OutputStream;
use forkd_protocol::ExecRequest;

/// Exit code when forkd itself fails (not the command in the guest).
const EXIT_FORKD_ERROR: u8 = 125;
/// Exit code when the guest command hit its timeout (as timeout(1)).
pub(crate) const EXIT_TIMEOUT: u8 = 124;

#[derive(Parser)]
#[command(
    name = "forkd",
    version,
    about = "MicroVM sandboxes for AI-agent fan-out"
)]
struct Cli {
    /// Talk to a forkd daemon instead of this host's state: its socket path
    /// or http://HOST:PORT (also $FORKD_REMOTE; bearer token from
    /// $FORKD_TOKEN). Every command on sandboxes and snapshots works
    /// remotely, with the same output; run, doctor, image and daemon do not.
    #[arg(long, global = true, value_name = "SOCKET|URL")]
    remote: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Boot a sandbox, run CMD in it with output streamed, tear it down.
    /// Exits with CMD's exit code (128+N if a signal killed it, 124 on timeout,
    /// 125 if forkd itself failed).
    Run(RunArgs),
    /// Check this host (QEMU, accelerator, guest artifacts, tmpfs,
    /// userfaultfd) and where the state database, the snapshot store and
    /// the runtime directory disagree.
    Doctor {
        /// Repair the disagreements found (stray store directories, files
        /// of failed snapshots, snapshot disks that depend on a sandbox's
        /// run directory, dead sandboxes, QEMUs no record names, cached
        /// RAM images nothing references). Failed and broken snapshots are
        /// only reported: `forkd rmi --failed` deletes them.
        #[arg(long)]
        repair: bool,
        #[arg(long)]
        json: bool,
    },
    /// Guest images.
    #[command(subcommand)]
    Image(ImageCommand),
    /// Serve the REST API (see docs/openapi.json) on a UNIX socket, or on
    /// TCP with --listen. Sandboxes outlive the daemon: restarting it never
    /// kills one.
    Daemon(DaemonArgs),
    #[command(flatten)]
    Fleet(FleetCommand),
}

/// The commands on sandboxes and snapshots: they run through the operations
/// seam, on this host or on a daemon (`--remote`).
#[derive(Subcommand)]
enum FleetCommand {
    /// Boot a sandbox that keeps running after forkd exits; prints its id.
    Create(CreateArgs),
    /// Run CMD in a running sandbox (exit code as for `run`).
    Exec(ExecArgs),
    /// List sandboxes.
    Ls {
        #[arg(long)]
        json: bool,
    },
    /// Kill sandboxes and remove their files.
    Kill {
        /// Sandbox ids.
        ids: Vec<String>,
        /// Kill every sandbox, and every QEMU of this home that has no
        /// record (a creator that died mid-start); then delete cached RAM
        /// images nothing references.
        #[arg(long, conflicts_with = "ids")]
        all: bool,
    },
    /// Snapshot a running sandbox (it pauses briefly, then goes on).
    Snapshot {
        id: String,
        #[arg(long)]
        tag: String,
        #[arg(long)]
        json: bool,
    },
    /// List snapshots.
    Snapshots {
        #[arg(long)]
        json: bool,
    },
    /// Show one snapshot: files and real sizes, parent chain, RAM layer,
    /// dependents.
    Info {
        tag: String,
        #[arg(long)]
        json: bool,
    },
    /// Delete a snapshot (refused while sandboxes or snapshots depend on
    /// it), failed and broken ones included.
    Rmi {
        #[arg(required_unless_present = "failed")]
        tag: Option<String>,
        /// Delete even if sandboxes were spawned from it.
        #[arg(long)]
        force: bool,
        /// Delete every failed and broken snapshot that nothing else needs.
        #[arg(long, conflicts_with_all = ["tag", "force"])]
        failed: bool,
    },
    /// Delete cached RAM images no snapshot of any home references.
    Gc {
        #[arg(long)]
        json: bool,
    },
    /// Start N copy-on-write children of a snapshot.
    Spawn {
        tag: String,
        /// Number of children.
        #[arg(short = 'n', long = "count", default_value_t = 1)]
        n: usize,
        /// Children started at once (default: number of cores).
        #[arg(long)]
        parallel: Option<usize>,
        /// Keep K pre-started QEMUs for this snapshot: spawns take from the
        /// pool, which refills in the background after this spawn.
        #[arg(long, value_name = "K")]
        pool: Option<usize>,
        /// Fail at once if the snapshot is still being written (default: wait).
        #[arg(long)]
        no_wait: bool,
        #[arg(long)]
        json: bool,
    },
    /// Snapshot a running sandbox while it runs (live: the pause does not
    /// grow with its memory); the branch is a snapshot `spawn` can fan out.
    Branch {
        id: String,
        /// Snapshot tag (default: ID-branch-UNIX_MILLISECONDS).
        #[arg(long)]
        tag: Option<String>,
        /// live (background snapshot) or full (stop, copy, resume).
        #[arg(long, default_value = "live")]
        mode: String,
        /// Return right after the pause; the snapshot is `writing` until ready.
        #[arg(long)]
        no_wait: bool,
        #[arg(long)]
        json: bool,
    },
    /// Fill the warm pool of a snapshot to K pre-started QEMUs (`forkd ls` shows them as pooled).
    Pool {
        tag: String,
        #[arg(long, value_name = "K")]
        size: usize,
    },
}

/// The virtual machine: flags `run` and `create` share.
#[derive(Args)]
struct MachineArgs {
    /// Guest memory in MiB [default: 256].
    #[arg(long)]
    mem: Option<u64>,
    /// Virtual CPUs [default: 1].
    #[arg(long)]
    cpus: Option<u32>,
    /// Accelerator: auto (KVM where hardware virtualization works, else TCG), kvm or tcg.
    #[arg(long, default_value = "auto")]
    accel: String,
    /// Guest network: user (QEMU user-mode stack) or none.
    #[arg(long, default_value = "user")]
    net: String,
    /// TCG translation-cache size in MiB (smaller: less memory per VM).
    #[arg(long, value_name = "MIB")]
    tcg_tb_mib: Option<u32>,
}

impl MachineArgs {
    fn boot_options(&self) -> Result<BootOptions> {
        Ok(BootOptions {
            cpus: self.cpus.unwrap_or(forkd_ops::policy::CPUS),
            mem_mib: self.mem.unwrap_or(forkd_ops::policy::MEM_MIB),
            accel: self.accel.parse().map_err(anyhow::Error::msg)?,
            network: match self.net.parse().map_err(anyhow::Error::msg)? {
                forkd_ops::Network::User => forkd_vm::Network::User,
                forkd_ops::Network::None => forkd_vm::Network::None,
            },
            tcg_tb_mib: self.tcg_tb_mib,
            ..BootOptions::default()
        })
    }
}

#[derive(Args)]
struct CreateArgs {
    #[command(flatten)]
    machine: MachineArgs,
    /// Back guest RAM with 2 MiB hugetlb pages: a live branch then pauses
    /// for a few ms at any guest size (on 4 KiB pages the pause grows with
    /// it). The host must have them reserved first, at least MEM/2 pages
    /// for each such sandbox: `sysctl -w vm.nr_hugepages=N` (as root).
    /// Full-mode snapshots (`snapshot`, `branch --mode full`) are not
    /// available for such a sandbox: its RAM is in a memfd; branch it live.
    #[arg(long)]
    hugepages: bool,
    /// Populate all guest RAM at start, so the first live branch does not
    /// do it inside its pause. Costs the whole --mem in host memory from
    /// the start (nothing extra with --hugepages: the pool is set aside
    /// anyway); QEMU starts slower for large guests.
    #[arg(long)]
    prealloc: bool,
    #[command(flatten)]
    guest: GuestArgs,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct ExecArgs {
    /// Sandbox id.
    id: String,
    #[arg(long)]
    timeout: Option<f64>,
    #[arg(long = "env", value_name = "KEY=VALUE")]
    env: Vec<String>,
    #[arg(long)]
    cwd: Option<String>,
    #[arg(short, long)]
    interactive: bool,
    #[arg(last = true, required = true, value_name = "CMD")]
    cmd: Vec<String>,
}

#[derive(Args, Clone)]
struct GuestArgs {
    /// Root disk: busybox, debian-python, none, or a path to a raw ext4 image.
    #[arg(long, default_value = "busybox")]
    image: String,
    /// Guest kernel to use instead of Debian's cloud kernel.
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// Modules directory (lib/modules/VERSION) of --kernel.
    #[arg(long, requires = "kernel")]
    modules: Option<PathBuf>,
    /// The static guest agent binary (default: next to forkd).
    #[arg(long)]
    agent: Option<PathBuf>,
}

impl GuestArgs {
    fn artifact_options(&self) -> Result<ArtifactOptions> {
        let image: Image = self.image.parse().map_err(anyhow::Error::msg)?;
        Ok(ArtifactOptions {
            kernel: self.kernel.clone(),
            modules: self.modules.clone(),
            agent: self.agent.clone(),
            image,
        })
    }
}

#[derive(Args)]
struct RunArgs {
    #[command(flatten)]
    machine: MachineArgs,
    #[command(flatten)]
    guest: GuestArgs,
    /// Kill CMD after this many seconds (exit code 124).
    #[arg(long)]
    timeout: Option<f64>,
    /// Environment for CMD (repeatable): --env KEY=VALUE.
    #[arg(long = "env", value_name = "KEY=VALUE")]
    env: Vec<String>,
    /// Working directory of CMD in the guest.
    #[arg(long)]
    cwd: Option<String>,
    /// Forward forkd's stdin to CMD.
    #[arg(short, long)]
    interactive: bool,
    /// Print boot and run timings to stderr.
    #[arg(long)]
    timings: bool,
    /// The command and its arguments.
    #[arg(last = true, required = true, value_name = "CMD")]
    cmd: Vec<String>,
}

#[derive(Subcommand)]
enum ImageCommand {
    /// Build (or find cached) kernel, initramfs and root image; print their paths.
    Build {
        #[command(flatten)]
        guest: GuestArgs,
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    // A detached helper of an earlier forkd command (a branch writer, a pool
    // refill) runs its job and exits here.
    if let Some(code) = forkd_core::helper::run_if_helper() {
        return code;
    }
    // Before any thread starts, so that every thread inherits the mask and
    // the signal thread is the only one that sees these signals.
    signals::block_termination_signals();
    let cli = Cli::parse();
    let remote = remote::daemon(cli.remote.clone());
    let result = match cli.command {
        Command::Run(args) => remote::local_only(remote.as_deref(), "run").and_then(|()| run(args)),
        Command::Doctor { repair, json } => {
            remote::local_only(remote.as_deref(), "doctor").and_then(|()| doctor_cmd(repair, json))
        }
        Command::Image(ImageCommand::Build { guest, json }) => {
            remote::local_only(remote.as_deref(), "image").and_then(|()| image_build(&guest, json))
        }
        Command::Daemon(args) => {
            remote::local_only(remote.as_deref(), "daemon").and_then(|()| daemon(args))
        }
        Command::Fleet(command) => {
            remote::operations(remote.as_deref()).and_then(|ops| fleet_command(&*ops, command))
        }
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            match e.downcast_ref::<forkd_ops::OpError>() {
                Some(op) => eprintln!("forkd: error: {}", hints::render(op)),
                None => eprintln!("forkd: error: {e:#}"),
            }
            ExitCode::from(EXIT_FORKD_ERROR)
        }
    }
}

/// The commands that run through the operations seam.
fn fleet_command(ops: &dyn forkd_ops::Operations, command: FleetCommand) -> Result<ExitCode> {
    use FleetCommand as Command;
    match command {
        Command::Create(args) => commands::create(ops, args),
        Command::Exec(args) => commands::exec(ops, args),
        Command::Ls { json } => commands::ls(ops, json),
        Command::Kill { ids, all } => commands::kill(ops, ids, all),
        Command::Snapshot { id, tag, json } => commands::snapshot(ops, &id, &tag, json),
        Command::Snapshots { json } => commands::snapshots(ops, json),
        Command::Info { tag, json } => commands::info(ops, &tag, json),
        Command::Rmi { tag, force, failed } => match (tag, failed) {
            (_, true) => commands::prune(ops),
            (Some(tag), false) => commands::rmi(ops, &tag, force),
            (None, false) => anyhow::bail!("name a snapshot to delete, or pass --failed"),
        },
        Command::Gc { json } => commands::gc(ops, json),
        Command::Spawn {
            tag,
            n,
            parallel,
            pool,
            no_wait,
            json,
        } => commands::spawn(ops, &tag, n, parallel, pool, no_wait, json),
        Command::Branch {
            id,
            tag,
            mode,
            no_wait,
            json,
        } => commands::branch(ops, &id, tag, &mode, no_wait, json),
        Command::Pool { tag, size } => commands::pool(ops, &tag, size),
    }
}

pub(crate) fn parse_env(pairs: &[String]) -> Result<Vec<(String, String)>> {
    pairs
        .iter()
        .map(|kv| {
            kv.split_once('=')
                .filter(|(k, _)| !k.is_empty())
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .with_context(|| format!("--env {kv:?} must look like KEY=VALUE"))
        })
        .collect()
}

pub(crate) fn parse_timeout(t: Option<f64>) -> Result<Option<u64>> {
    match t {
        Some(t) if !(t > 0.0 && t.is_finite()) => {
            anyhow::bail!("--timeout must be a positive number of seconds")
        }
        Some(t) => Ok(Some((t * 1000.0) as u64)),
        None => Ok(None),
    }
}

pub(crate) fn progress(msg: &str) {
    eprintln!("forkd: {msg}");
}

fn run(args: RunArgs) -> Result<ExitCode> {
    let env = Env::from_process();
    let boot = args.machine.boot_options()?;
    let vars = parse_env(&args.env)?;
    let timeout_ms = parse_timeout(args.timeout)?;

    let t0 = Instant::now();
    let artifacts =
        forkd_core::artifacts::ensure(&env, &args.guest.artifact_options()?, &progress)?;
    let t_artifacts = t0.elapsed();

    let cancel = Arc::new(AtomicBool::new(false));
    let signals = signals::Handler::start(Arc::clone(&cancel));
    let opts = BootOptions {
        cancel: Some(Arc::clone(&cancel)),
        ..boot
    };
    let sandbox = match Sandbox::boot(&env, &artifacts, &opts) {
        Ok(s) => Arc::new(s),
        Err(_) if signals.received().is_some() => {
            return Ok(ExitCode::from(128 + signals.received().unwrap_or(2) as u8))
        }
        Err(e) => return Err(e.into()),
    };
    if args.timings {
        eprintln!(
            "forkd: {} booted in {:.0} ms ({}; artifacts {:.0} ms)",
            sandbox.id(),
            sandbox.boot_time().as_secs_f64() * 1000.0,
            sandbox.accel().reason,
            t_artifacts.as_secs_f64() * 1000.0
        );
    }
    let exec_id = sandbox.vm().agent().reserve_id();
    signals.attach(Arc::downgrade(&sandbox), exec_id);

    let req = ExecRequest {
        argv: args.cmd.clone(),
        env: vars,
        cwd: args.cwd.clone(),
        timeout_ms,
        stdin: false,
    };
    let stdin: Option<Box<dyn std::io::Read + Send>> =
        args.interactive.then(|| Box::new(std::io::stdin()) as _);
    let t_exec = Instant::now();
    let mut out = std::io::stdout().lock();
    let mut err = std::io::stderr();
    let tty = out.is_terminal();
    let result = sandbox.exec_as(exec_id, req, stdin, |stream, bytes| {
        let _ = match stream {
            OutputStream::Stdout => {
                out.write_all(bytes)
                    .and_then(|_| if tty { out.flush() } else { Ok(()) })
            }
            OutputStream::Stderr => err.write_all(bytes),
        };
    });
    let _ = out.flush();
    let exec_time = t_exec.elapsed();
    signals.detach();
    let sandbox = Arc::try_unwrap(sandbox).ok();
    // Ephemeral: the overlay is thrown away, so no clean guest shutdown is
    // needed; dropping kills QEMU and removes the run directory.
    let t_down = Instant::now();
    drop(sandbox);
    if let Some(sig) = signals.received() {
        return Ok(ExitCode::from(128 + sig as u8));
    }
    let status = result?;
    if args.timings {
        eprintln!(
            "forkd: command took {:.0} ms, teardown {:.0} ms, total {:.0} ms",
            exec_time.as_secs_f64() * 1000.0,
            t_down.elapsed().as_secs_f64() * 1000.0,
            t0.elapsed().as_secs_f64() * 1000.0
        );
    }
    if status.timed_out {
        eprintln!(
            "forkd: command timed out after {:.1} s and was killed",
            args.timeout.unwrap_or(0.0)
        );
        return Ok(ExitCode::from(EXIT_TIMEOUT));
    }
    Ok(ExitCode::from((status.shell_code() & 0xff) as u8))
}

/// `forkd doctor`: the host report, then where this home's state, store and
/// runtime directory disagree (repaired with `--repair`). Local only: it
/// reads this host's files and processes, which a daemon's caller cannot
/// see or mend.
fn doctor_cmd(repair: bool, json: bool) -> Result<ExitCode> {
    use forkd_core::consistency::{self, Kind};
    let env = Env::from_process();
    let mut checks = doctor::run(&env, "qemu-system-x86_64");
    let fleet = forkd_core::Fleet::open(&env)?;
    let found = consistency::findings(&fleet)?;
    for f in &found {
        let kind = serde_json::to_value(f.kind)?;
        let fix = match f.kind {
            Kind::BrokenSnapshot | Kind::FailedSnapshot => "forkd rmi --failed".to_string(),
            _ => "forkd doctor --repair".to_string(),
        };
        checks.push(doctor::Check {
            name: "state",
            level: doctor::Level::Warn,
            detail: format!(
                "{} `{}`: {}",
                kind.as_str().unwrap_or("?").replace('_', " "),
                f.subject,
                f.detail
            ),
            fix: (!repair || !f.repairable).then_some(fix),
        });
    }
    if found.is_empty() {
        checks.push(doctor::Check {
            name: "state",
            level: doctor::Level::Ok,
            detail: "state database, snapshot store and runtime directory agree".into(),
            fix: None,
        });
    }
    if repair {
        for line in consistency::repair(&fleet, &found) {
            checks.push(doctor::Check {
                name: "repair",
                level: doctor::Level::Ok,
                detail: line,
                fix: None,
            });
        }
    }
    let failed = checks.iter().any(|c| c.level == doctor::Level::Fail);
    if json {
        println!("{}", serde_json::to_string_pretty(&checks)?);
    } else {
        println!("forkd home:    {}", env.home.display());
        println!("runtime dir:   {}", env.runtime.display());
        for c in &checks {
            let tag = match c.level {
                doctor::Level::Ok => "ok  ",
                doctor::Level::Warn => "warn",
                doctor::Level::Fail => "FAIL",
            };
            println!("[{tag}] {:<12} {}", c.name, c.detail);
            if let Some(fix) = &c.fix {
                println!("       {:<12} fix: {fix}", "");
            }
        }
    }
    Ok(if failed {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

fn image_build(guest: &GuestArgs, json: bool) -> Result<ExitCode> {
    let env = Env::from_process();
    let t0 = Instant::now();
    let a = forkd_core::artifacts::ensure(&env, &guest.artifact_options()?, &progress)?;
    let took = t0.elapsed();
    if json {
        let v = serde_json::json!({
            "kernel": a.kernel.vmlinuz, "kernel_version": a.kernel.version,
            "initramfs": a.initramfs, "rootfs": a.rootfs, "seconds": took.as_secs_f64(),
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!(
            "kernel     {} ({})",
            a.kernel.vmlinuz.display(),
            a.kernel.version
        );
        println!("initramfs  {}", a.initramfs.display());
        match &a.rootfs {
            Some(r) => println!("rootfs     {}", r.display()),
            None => println!("rootfs     none"),
        }
        eprintln!("forkd: ready in {:.1} s", took.as_secs_f64());
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(clap::Args)]
struct DaemonArgs {
    /// Where to listen: a socket path (`unix:/path` or `/path`; default
    /// `$FORKD_RUNTIME_DIR/forkd.sock`, mode 0600) or `tcp:HOST:PORT`.
    #[arg(long, value_name = "ADDR")]
    listen: Option<String>,
    /// Listen on TCP 127.0.0.1:8889 (the legacy default).
    #[arg(long, conflicts_with = "listen")]
    tcp: bool,
    /// File holding the bearer token (at least 16 bytes) every call must
    /// present; also read from $FORKD_TOKEN. Required off loopback.
    #[arg(long, value_name = "PATH")]
    token_file: Option<PathBuf>,
    /// Audit log (one JSON line per mutating call); default $FORKD_HOME/audit.log.
    #[arg(long, value_name = "PATH")]
    audit_log: Option<PathBuf>,
    /// Concurrent spawn calls before answering 429.
    #[arg(long, default_value_t = 4)]
    max_spawn: usize,
    /// Concurrent branch calls before answering 429.
    #[arg(long, default_value_t = 2)]
    max_branch: usize,
    /// Let this group use the UNIX socket too (mode 0660 instead of 0600).
    #[arg(long, value_name = "GROUP")]
    socket_group: Option<String>,
}

fn daemon(args: DaemonArgs) -> Result<ExitCode> {
    signals::unblock_termination_signals();
    let env = Env::from_process();
    let mut opts = forkd_daemon::DaemonOptions::defaults(&env);
    if args.tcp {
        opts.listen = forkd_api::auth::ListenAddr::Tcp(forkd_api::auth::DEFAULT_TCP);
    } else if let Some(l) = &args.listen {
        opts.listen = forkd_api::auth::ListenAddr::parse(l)?;
    }
    opts.token = match &args.token_file {
        Some(p) => Some(
            std::fs::read_to_string(p)
                .map_err(|e| anyhow::anyhow!("reading the token file {}: {e}", p.display()))?
                .trim()
                .to_string(),
        ),
        None => std::env::var("FORKD_TOKEN").ok().filter(|t| !t.is_empty()),
    };
    if let Some(a) = args.audit_log {
        opts.audit_log = a;
    }
    opts.max_spawn = args.max_spawn;
    opts.max_branch = args.max_branch;
    if let Some(g) = args.socket_group {
        opts.socket_access = forkd_api::auth::SocketAccess::Group(g);
    }
    forkd_daemon::run(&env, opts, &|line| eprintln!("forkd daemon: {line}"))?;
    Ok(ExitCode::SUCCESS)
}
