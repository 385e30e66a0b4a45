//! `forkd`: the command-line front end. It parses arguments, calls the
//! operations seam (this host's fleet, or a daemon with `--remote`) and
//! prints; nothing else lives here.

mod commands;
mod cp;
mod exit;
mod hints;
mod images;
mod remote;
mod signals;
mod transfer;
mod tree;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Result;
use clap::{Args, Parser, Subcommand};
use forkd_core::{doctor, ArtifactOptions, BootOptions, Env, Image, Sandbox};
use forkd_protocol::client::OutputStream;
use forkd_protocol::ExecRequest;

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
        /// Print JSON instead of text.
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
        /// Only sandboxes with this label (repeatable: all must match).
        #[arg(long = "label", value_name = "KEY=VALUE")]
        labels: Vec<String>,
        /// Print JSON instead of text.
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
        /// Kill every sandbox with this label (repeatable: all must match).
        #[arg(
            long = "label",
            value_name = "KEY=VALUE",
            conflicts_with_all = ["ids", "all"]
        )]
        labels: Vec<String>,
        /// Print JSON ({killed: [...], failed: [{id, error}]}) instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Copy files and directories between this host and a sandbox (modes
    /// and times kept, parents made): `cp ./src ID:/work`, `cp ID:/out .`.
    /// As `docker cp`: a directory lands inside an existing directory, or
    /// becomes a new path; `DIR/.` copies its contents; `-` is a tar stream
    /// on stdin or stdout.
    Cp {
        /// Source: a local path, `ID:/path` in a sandbox, or `-` (a tar on stdin).
        src: String,
        /// Destination: a local path, `ID:/path` in a sandbox, or `-` (a tar
        /// to stdout).
        dst: String,
        /// Print nothing on success.
        #[arg(short, long)]
        quiet: bool,
        /// Print one JSON object ({src, dst, entries, bytes}) instead of text.
        #[arg(long, conflicts_with = "quiet")]
        json: bool,
    },
    /// Snapshot a running sandbox (it pauses briefly, then goes on).
    Snapshot {
        /// The sandbox to snapshot.
        id: String,
        /// Tag of the new snapshot ([A-Za-z0-9._-], at most 64).
        #[arg(long)]
        tag: String,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// List snapshots.
    Snapshots {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Show one snapshot (files and real sizes, parent chain, RAM layer,
    /// dependents, the network its children get) or one sandbox (its
    /// network and egress policy among the rest).
    Info {
        /// The snapshot's tag.
        tag: String,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Rewrite a snapshot made of a chain of RAM and disk layers as one RAM
    /// image and one disk layer, with the same contents (what spawns from
    /// it does not change; the snapshots below are kept, and `rmi` may
    /// delete them afterwards if nothing else needs them).
    Compact {
        /// The snapshot's tag.
        tag: String,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Snapshots and sandboxes as a lineage tree (status, layer size, age).
    Tree {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Push a snapshot (with its chain of parents) to an OCI registry.
    Push {
        /// The snapshot's tag.
        tag: String,
        /// Where: HOST[:PORT]/REPOSITORY[:TAG], e.g. 127.0.0.1:5000/team/agent:v3.
        reference: String,
        /// Plain HTTP to the registry (loopback registries); HTTPS otherwise.
        #[arg(long)]
        insecure: bool,
        /// Print JSON instead of text (and no progress).
        #[arg(long)]
        json: bool,
    },
    /// Pull a snapshot from an OCI registry (only what this host lacks),
    /// verify it and publish it.
    Pull {
        /// HOST[:PORT]/REPOSITORY[:TAG].
        reference: String,
        /// Local tag (default: the tag it was pushed with).
        #[arg(long)]
        tag: Option<String>,
        /// Plain HTTP to the registry (loopback registries); HTTPS otherwise.
        #[arg(long)]
        insecure: bool,
        /// Print JSON instead of text (and no progress).
        #[arg(long)]
        json: bool,
    },
    /// Delete a snapshot (refused while sandboxes or snapshots depend on
    /// it), failed and broken ones included.
    Rmi {
        /// The snapshot's tag.
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
        /// The snapshot to spawn from.
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
        /// Map the children's RAM on 2 MiB huge pages (a copy of the
        /// snapshot's image in the host's huge-page pool, which forkd
        /// manages as root): their own live branches pause as briefly as a
        /// parent's; each first write into a 2 MiB page copies all of it.
        /// Never taken from the warm pool.
        #[arg(long)]
        hugepages: bool,
        #[command(flatten)]
        limits: ChildLimitArgs,
        #[command(flatten)]
        lifetime: LifetimeArgs,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Move a sandbox's end time: DURATION from now (`90s`, `5m`, `1h`),
    /// or `none` to let it live until killed.
    Timeout {
        /// The sandbox.
        id: String,
        /// How long from now, or `none`.
        #[arg(value_name = "DURATION|none")]
        ttl: String,
    },
    /// Snapshot a running sandbox while it runs (live: the pause does not
    /// grow with its memory); the branch is a snapshot `spawn` can fan out.
    Branch {
        /// The sandbox to branch.
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
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Serve the operations to an AI agent over the Model Context Protocol on
    /// stdin/stdout (tools: create_sandbox, run_command, write_file,
    /// read_file, list_files, branch_sandbox, spawn_sandboxes, kill_sandbox,
    /// list_sandboxes, list_snapshots). The daemon serves the same at /mcp.
    Mcp,
    /// Fill the warm pool of a snapshot to K pre-started QEMUs (`forkd ls` shows them as pooled).
    Pool {
        /// The snapshot whose pool to fill.
        tag: String,
        /// How many pre-started members to keep (0 to 1000).
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
    /// Guest network: default (the public internet as --allow-out and
    /// --deny-out allow; never the host, its loopback or private networks,
    /// never another sandbox) or none.
    #[arg(long, default_value = "default")]
    net: String,
    /// Allow only these destinations (repeatable): a CIDR (10.1.0.0/16,
    /// 1.2.3.4) or a domain (pypi.org also matches its subdomains,
    /// *.github.com only them). A CIDR inside private space opens it.
    #[arg(long = "allow-out", value_name = "CIDR|DOMAIN")]
    allow_out: Vec<String>,
    /// Never reach these destinations (repeatable); beats --allow-out.
    #[arg(long = "deny-out", value_name = "CIDR|DOMAIN")]
    deny_out: Vec<String>,
    #[command(flatten)]
    limits: LimitArgs,
    /// TCG translation-cache size in MiB (smaller: less memory per VM).
    #[arg(long, value_name = "MIB")]
    tcg_tb_mib: Option<u32>,
}

/// The QEMU process's cgroup limits.
#[derive(Args, Clone)]
struct LimitArgs {
    /// Memory limit of the sandbox's QEMU process in MiB [default: guest
    /// RAM plus QEMU's own overhead].
    #[arg(long = "memory-limit", value_name = "MIB")]
    memory_limit: Option<u64>,
    /// CPU time the sandbox may use, in host CPUs (1.5 = one and a half).
    #[arg(long = "cpus-quota", value_name = "CPUS")]
    cpus_quota: Option<f64>,
}

impl LimitArgs {
    fn cpu_quota_pct(&self) -> Result<Option<u32>> {
        self.cpus_quota.map(cpus_to_pct).transpose()
    }
}

/// `--cpus-quota 1.5` as 150 percent of one CPU.
fn cpus_to_pct(cpus: f64) -> Result<u32> {
    if !(cpus.is_finite() && (0.01..=1024.0).contains(&cpus)) {
        return Err(crate::exit::Usage(format!(
            "--cpus-quota {cpus} is out of range: give a number of CPUs from 0.01 to 1024"
        ))
        .into());
    }
    Ok((cpus * 100.0).round() as u32)
}

/// What children of a snapshot may change (default: the snapshot's).
#[derive(Args)]
struct ChildLimitArgs {
    /// The children's network: default or none [default: the snapshot's].
    #[arg(long)]
    net: Option<String>,
    /// Replace the snapshot's --allow-out rules (repeatable).
    #[arg(long = "allow-out", value_name = "CIDR|DOMAIN")]
    allow_out: Vec<String>,
    /// Replace the snapshot's --deny-out rules (repeatable).
    #[arg(long = "deny-out", value_name = "CIDR|DOMAIN")]
    deny_out: Vec<String>,
    #[command(flatten)]
    limits: LimitArgs,
}

impl MachineArgs {
    fn boot_options(&self) -> Result<BootOptions> {
        Ok(BootOptions {
            cpus: self.cpus.unwrap_or(forkd_ops::policy::CPUS),
            mem_mib: self.mem.unwrap_or(forkd_ops::policy::MEM_MIB),
            accel: self.accel.parse().map_err(crate::exit::Usage)?,
            network: match self.net.parse().map_err(crate::exit::Usage)? {
                forkd_ops::Network::Default => forkd_vm::Network::Gateway,
                forkd_ops::Network::None | forkd_ops::Network::Slirp => forkd_vm::Network::None,
            },
            egress: forkd_vm::Egress {
                deny_all: false,
                allow_out: self.allow_out.clone(),
                deny_out: self.deny_out.clone(),
            },
            limits: forkd_vm::Limits {
                memory_limit_mib: self.limits.memory_limit,
                cpu_quota_pct: self.limits.cpu_quota_pct()?,
            },
            tcg_tb_mib: self.tcg_tb_mib,
            ..BootOptions::default()
        })
    }
}

/// What a sandbox keeps for its life: flags `create` and `spawn` share.
#[derive(Args)]
struct LifetimeArgs {
    /// Kill the sandbox this long after it starts (`90s`, `5m`, `1h 30m`);
    /// `forkd timeout` moves it.
    #[arg(long, value_name = "DURATION")]
    ttl: Option<String>,
    /// Kill the sandbox after this long without a command, file or other
    /// operation on it.
    #[arg(long = "idle-timeout", value_name = "DURATION")]
    idle_timeout: Option<String>,
    /// A label to select it by (`ls --label`, `kill --label`); repeatable.
    #[arg(long = "label", value_name = "KEY=VALUE")]
    labels: Vec<String>,
    /// An environment variable every command in it gets unless the command
    /// sets its own (repeatable).
    #[arg(long = "env", value_name = "KEY=VALUE")]
    env: Vec<String>,
    /// Working directory of every command that names none.
    #[arg(long, value_name = "DIR")]
    cwd: Option<String>,
}

impl LifetimeArgs {
    fn settings(&self) -> Result<forkd_ops::Settings> {
        Ok(forkd_ops::Settings {
            ttl: self
                .ttl
                .as_deref()
                .map(|d| duration("--ttl", d))
                .transpose()?,
            idle_timeout: self
                .idle_timeout
                .as_deref()
                .map(|d| duration("--idle-timeout", d))
                .transpose()?,
            labels: parse_labels(&self.labels)?.into_iter().collect(),
            env: parse_env(&self.env)?,
            cwd: self.cwd.clone(),
            user: None,
            access_token: None,
        })
    }
}

/// A duration as people write it (`90s`, `5m`, `1h 30m`, `500ms`).
pub(crate) fn duration(flag: &str, text: &str) -> Result<std::time::Duration> {
    humantime::parse_duration(text).map_err(|e| {
        exit::Usage(format!(
            "{flag} {text:?} is not a duration ({e}): write e.g. 90s, 5m or 1h30m"
        ))
        .into()
    })
}

/// `--label KEY=VALUE` flags.
pub(crate) fn parse_labels(pairs: &[String]) -> Result<Vec<(String, String)>> {
    pairs
        .iter()
        .map(|kv| {
            forkd_ops::lifetime::parse_pair("--label", kv)
                .map_err(|e| exit::Usage(e.message).into())
        })
        .collect()
}

#[derive(Args)]
struct CreateArgs {
    #[command(flatten)]
    machine: MachineArgs,
    #[command(flatten)]
    lifetime: LifetimeArgs,
    /// Back guest RAM with 2 MiB hugetlb pages, so that a live branch
    /// pauses for a few ms at any guest size. As root this is the default:
    /// forkd lets the host's pool grow on demand by the guest's size while
    /// it runs (`vm.nr_overcommit_hugepages`, see `forkd doctor`); a guest
    /// costs the pages it touches (FORKD_HUGEPAGES=off in forkd's
    /// environment opts out). Without root, or with --prealloc, the
    /// pages come from the static pool the administrator reserved:
    /// `sysctl -w vm.nr_hugepages=N`, at least MEM/2 per such sandbox.
    #[arg(long)]
    hugepages: bool,
    /// Populate all guest RAM at start. Costs the whole --mem in host
    /// memory from the start; QEMU starts slower for large guests. Without
    /// it forkd populates RAM before a live branch's pause, while the
    /// guest runs, so the first branch is as short as the next ones.
    #[arg(long)]
    prealloc: bool,
    #[command(flatten)]
    guest: GuestArgs,
    /// Print JSON instead of the id.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct ExecArgs {
    /// Sandbox id.
    id: String,
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
    /// Collect the output and print one JSON object: {stdout, stderr,
    /// exit_code, signal, timed_out, duration_ms}.
    #[arg(long)]
    json: bool,
    /// The command and its arguments.
    #[arg(last = true, required = true, value_name = "CMD")]
    cmd: Vec<String>,
}

#[derive(Args, Clone)]
struct GuestArgs {
    /// Root disk: busybox, debian-python, none, the name of an image built
    /// here (`forkd image ls`), a path to a raw ext4 image, or a container
    /// image: HOST/REPO:TAG, oci-archive:PATH, docker-archive:PATH or
    /// oci-layout:DIR (built once per image digest; its Env, WorkingDir and
    /// User become the defaults of commands).
    #[arg(long, default_value = "busybox")]
    image: String,
    /// Reach the registry of a container --image over plain HTTP (a
    /// loopback or lab registry). Credentials come from Docker's config.json.
    #[arg(long)]
    insecure: bool,
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
        let image: Image = self.image.parse().map_err(crate::exit::Usage)?;
        Ok(ArtifactOptions {
            kernel: self.kernel.clone(),
            modules: self.modules.clone(),
            agent: self.agent.clone(),
            image,
            insecure_registry: self.insecure,
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
    /// Collect the output and print one JSON object: {stdout, stderr,
    /// exit_code, signal, timed_out, duration_ms}.
    #[arg(long)]
    json: bool,
    /// The command and its arguments.
    #[arg(last = true, required = true, value_name = "CMD")]
    cmd: Vec<String>,
}

#[derive(Subcommand)]
enum ImageCommand {
    /// Build (or find cached) kernel, initramfs and root image; print their
    /// paths (and, for --from, --from-dir and --packages, the image's name
    /// for `--image`).
    Build {
        #[command(flatten)]
        guest: GuestArgs,
        /// Build the root image from this directory (a root tree: it needs
        /// /bin/sh for commands; owners, modes and links are kept; the
        /// directory is only read). Cached by its content.
        #[arg(long, value_name = "DIR", conflicts_with = "packages")]
        from_dir: Option<PathBuf>,
        /// Build the root image from a container image: a registry
        /// reference (HOST/REPO:TAG or @sha256:…; --insecure for plain
        /// HTTP, credentials from Docker's config.json), oci-archive:PATH,
        /// docker-archive:PATH or oci-layout:DIR. Layers are verified and
        /// applied (whiteouts, owners, modes); cached by the image's digest.
        /// Its Env, WorkingDir and User become the defaults of commands in
        /// sandboxes created from it.
        #[arg(long, value_name = "SOURCE", conflicts_with_all = ["packages", "from_dir"])]
        from: Option<String>,
        /// Extra Debian packages for the debian-python image, comma
        /// separated (`--packages git,curl`); each set is its own image.
        #[arg(long, value_name = "A,B,C", value_delimiter = ',')]
        packages: Vec<String>,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// List the root images built here: name (for `--image`), kind, size
    /// and the sandboxes and snapshots whose disks back onto each.
    Ls {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Delete root images; refused for one a sandbox or snapshot still
    /// backs onto.
    Rm {
        /// Image names, as `forkd image ls` shows them.
        #[arg(required = true)]
        names: Vec<String>,
        /// Print JSON instead of text.
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
    let cli = parse();
    if !matches!(cli.command, Command::Daemon(_)) {
        // `forkd ... | head` ends quietly when head exits, like any Unix
        // tool; the daemon keeps ignoring SIGPIPE (its peers hang up).
        signals::default_sigpipe();
    }
    let remote = remote::daemon(cli.remote.clone());
    if matches!(cli.command, Command::Doctor { .. } | Command::Image(_)) {
        // Like the fleet commands: a signal ends them at once (an image
        // build publishes by rename, so dying leaves at most its staging).
        signals::exit_on_termination();
    }
    let result = match cli.command {
        Command::Run(args) => remote::local_only(remote.as_deref(), "run").and_then(|()| run(args)),
        Command::Doctor { repair, json } => {
            remote::local_only(remote.as_deref(), "doctor").and_then(|()| doctor_cmd(repair, json))
        }
        Command::Image(command) => {
            remote::local_only(remote.as_deref(), "image").and_then(|()| image_command(command))
        }
        Command::Daemon(args) => {
            remote::local_only(remote.as_deref(), "daemon").and_then(|()| daemon(args))
        }
        Command::Fleet(command) => {
            remote::operations(remote.as_deref()).and_then(|ops| fleet_command(ops, command))
        }
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            match e.downcast_ref::<forkd_ops::OpError>() {
                Some(op) => eprintln!("forkd: error: {}", hints::render(op)),
                None => eprintln!("forkd: error: {e:#}"),
            }
            ExitCode::from(exit::of_error(&e))
        }
    }
}

/// The command line, with `--remote` shown only on the commands it applies
/// to (it is global for the commands on sandboxes and snapshots).
fn parse() -> Cli {
    use clap::{CommandFactory, FromArgMatches};
    let mut cmd = Cli::command();
    // A hidden local `--remote` on the commands that run on this host only
    // keeps the global one (and its help) off them.
    fn hide_remote(c: clap::Command) -> clap::Command {
        let names: Vec<String> = c
            .get_subcommands()
            .map(|s| s.get_name().to_string())
            .collect();
        let mut c = c.arg(
            clap::Arg::new("remote")
                .long("remote")
                .value_name("SOCKET|URL")
                .hide(true),
        );
        for n in names {
            c = c.mut_subcommand(n, hide_remote);
        }
        c
    }
    for local in ["run", "doctor", "image", "daemon"] {
        cmd = cmd.mut_subcommand(local, hide_remote);
    }
    let matches = cmd.get_matches();
    Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit())
}

/// The commands that run through the operations seam.
fn fleet_command(owned: Box<dyn forkd_ops::Operations>, command: FleetCommand) -> Result<ExitCode> {
    use FleetCommand as Command;
    let ops = &*owned;
    if !matches!(command, Command::Mcp) {
        // SIGINT, SIGTERM or SIGHUP end the command at once with 128+N,
        // wherever it is: every step is safe to die at (a kill -9 is, and
        // the next command or the daemon finishes what it left), and a
        // sandbox, or an exec's command in one, outlives us and goes on.
        signals::exit_on_termination();
    }
    match command {
        Command::Create(args) => commands::create(ops, args),
        Command::Exec(args) => commands::exec(ops, args),
        Command::Ls { labels, json } => commands::ls(ops, &parse_labels(&labels)?, json),
        Command::Kill {
            ids,
            all,
            labels,
            json,
        } => commands::kill(ops, ids, all, &parse_labels(&labels)?, json),
        Command::Timeout { id, ttl } => {
            let ttl = match ttl.as_str() {
                "none" => None,
                d => Some(duration("timeout", d)?),
            };
            commands::timeout(ops, &id, ttl)
        }
        Command::Cp {
            src,
            dst,
            quiet,
            json,
        } => commands::cp(ops, &src, &dst, quiet, json),
        Command::Snapshot { id, tag, json } => commands::snapshot(ops, &id, &tag, json),
        Command::Snapshots { json } => commands::snapshots(ops, json),
        Command::Info { tag, json } => commands::info(ops, &tag, json),
        Command::Rmi { tag, force, failed } => match (tag, failed) {
            (_, true) => commands::prune(ops),
            (Some(tag), false) => commands::rmi(ops, &tag, force),
            (None, false) => anyhow::bail!("name a snapshot to delete, or pass --failed"),
        },
        Command::Gc { json } => commands::gc(ops, json),
        Command::Compact { tag, json } => commands::compact(ops, &tag, json),
        Command::Tree { json } => tree::tree(ops, json),
        Command::Push {
            tag,
            reference,
            insecure,
            json,
        } => transfer::push(ops, &tag, &reference, insecure, json),
        Command::Pull {
            reference,
            tag,
            insecure,
            json,
        } => transfer::pull(ops, &reference, tag, insecure, json),
        Command::Spawn {
            tag,
            n,
            parallel,
            pool,
            no_wait,
            hugepages,
            limits,
            lifetime,
            json,
        } => {
            let req = forkd_ops::SpawnRequest {
                huge_pages: hugepages.then_some(true),
                settings: lifetime.settings()?,
                parallel,
                pool,
                wait: no_wait.then_some(false),
                network: limits
                    .net
                    .as_deref()
                    .map(str::parse)
                    .transpose()
                    .map_err(crate::exit::Usage)?,
                allow_out: (!limits.allow_out.is_empty()).then_some(limits.allow_out),
                deny_out: (!limits.deny_out.is_empty()).then_some(limits.deny_out),
                memory_limit_mib: limits.limits.memory_limit,
                cpu_quota_pct: limits.limits.cpu_quota_pct()?,
                ..forkd_ops::SpawnRequest::new(tag, n)
            };
            commands::spawn(ops, req, json)
        }
        Command::Branch {
            id,
            tag,
            mode,
            no_wait,
            json,
        } => commands::branch(ops, &id, tag, &mode, no_wait, json),
        Command::Pool { tag, size } => commands::pool(ops, &tag, size),
        Command::Mcp => {
            // Termination signals end the server (stdin closing does too).
            signals::unblock_termination_signals();
            commands::mcp(owned)
        }
    }
}

pub(crate) fn parse_env(pairs: &[String]) -> Result<Vec<(String, String)>> {
    pairs
        .iter()
        .map(|kv| {
            kv.split_once('=')
                .filter(|(k, _)| !k.is_empty())
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .ok_or_else(|| exit::Usage(format!("--env {kv:?} must look like KEY=VALUE")).into())
        })
        .collect()
}

pub(crate) fn parse_timeout(t: Option<f64>) -> Result<Option<u64>> {
    match t {
        Some(t) if !(t > 0.0 && t.is_finite()) => {
            Err(exit::Usage("--timeout must be a positive number of seconds".into()).into())
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
    let artifacts = forkd_core::artifacts::ensure(&env, &args.guest.artifact_options()?, &progress)
        .map_err(forkd_ops::OpError::from)?;
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
        Err(e) => return Err(forkd_ops::OpError::from(e).into()),
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

    let (mut vars, mut cwd, mut user) = (vars, args.cwd.clone(), None);
    if let Some(defaults) = &artifacts.defaults {
        defaults.apply_to_command(&mut vars, &mut cwd, &mut user);
    }
    let req = ExecRequest {
        argv: args.cmd.clone(),
        env: vars,
        cwd,
        timeout_ms,
        stdin: false,
        user,
    };
    let stdin: Option<Box<dyn std::io::Read + Send>> =
        args.interactive.then(|| Box::new(std::io::stdin()) as _);
    let t_exec = Instant::now();
    let mut sink = commands::Output::new(args.json);
    let result = sandbox.exec_as(exec_id, req, stdin, |stream, bytes| {
        sink.write(
            match stream {
                OutputStream::Stdout => forkd_ops::Stream::Stdout,
                OutputStream::Stderr => forkd_ops::Stream::Stderr,
            },
            bytes,
        )
    });
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
    let status = result.map_err(forkd_ops::OpError::from)?;
    if args.timings {
        eprintln!(
            "forkd: command took {:.0} ms, teardown {:.0} ms, total {:.0} ms",
            exec_time.as_secs_f64() * 1000.0,
            t_down.elapsed().as_secs_f64() * 1000.0,
            t0.elapsed().as_secs_f64() * 1000.0
        );
    }
    sink.finish(&forkd_ops::ExecOutcome {
        code: status.code,
        signal: status.signal,
        timed_out: status.timed_out,
        duration_ms: status.duration_ms,
    })
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

fn image_command(command: ImageCommand) -> Result<ExitCode> {
    match command {
        ImageCommand::Build {
            guest,
            from_dir,
            from,
            packages,
            json,
        } => images::build(
            &guest.artifact_options()?,
            &images::BuildFrom {
                dir: from_dir,
                container: from,
                packages,
            },
            json,
        ),
        ImageCommand::Ls { json } => images::ls(json),
        ImageCommand::Rm { names, json } => images::rm(&names, json),
    }
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
    /// Also serve E2B's API (control plane and every sandbox's envd) here:
    /// `tcp:HOST:PORT` or `unix:PATH`. Point E2B_API_URL and E2B_SANDBOX_URL
    /// at it (docs/e2b.md).
    #[arg(long, value_name = "ADDR")]
    e2b_listen: Option<String>,
    /// File of E2B API keys, one per line (at least 16 characters each);
    /// required when --e2b-listen is off loopback.
    #[arg(long, value_name = "PATH", requires = "e2b_listen")]
    e2b_api_key_file: Option<PathBuf>,
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
    if let Some(l) = &args.e2b_listen {
        opts.e2b = Some(forkd_daemon::e2b::E2bOptions::new(
            forkd_api::auth::ListenAddr::parse(l)?,
            args.e2b_api_key_file.as_deref(),
        )?);
    }
    forkd_daemon::run(&env, opts, &|line| eprintln!("forkd daemon: {line}"))?;
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    #[test]
    fn cpu_quotas_are_percent_of_a_cpu_and_bounded() {
        assert_eq!(super::cpus_to_pct(1.5).unwrap(), 150);
        assert_eq!(super::cpus_to_pct(0.25).unwrap(), 25);
        assert!(super::cpus_to_pct(0.0).is_err());
        assert!(super::cpus_to_pct(f64::NAN).is_err());
    }
}
