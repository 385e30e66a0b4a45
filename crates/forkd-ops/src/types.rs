//! What the operations take and give. Requests leave a field `None` to get
//! the default ([`crate::policy`] decides it, on the side of the seam that
//! runs the operation); results carry typed states and typed dependents.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::state::{BranchMode, SandboxState, SnapshotStatus};

// ------------------------------------------------------------------ sandboxes

/// One sandbox, as `list` and `sandbox` report it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sandbox {
    pub id: String,
    pub state: SandboxState,
    /// Host pid of its QEMU.
    pub pid: u32,
    /// The snapshot it was spawned from.
    pub snapshot: Option<String>,
    /// The root disk it booted with (for children: "IMAGE (from TAG)").
    pub image: String,
    pub mem_mib: u64,
    pub cpus: u32,
    /// Unix seconds.
    pub created_at: u64,
    /// How many snapshots were branched from it.
    #[serde(default)]
    pub branches: u32,
    /// Its network and egress policy.
    #[serde(default)]
    pub network: NetworkPolicy,
    /// When it ends, its labels and the defaults its commands get.
    #[serde(default, skip_serializing_if = "crate::Lifetime::is_unset")]
    pub lifetime: crate::Lifetime,
    /// The secret a front end keeps with it ([`crate::Settings::access_token`]);
    /// only the fleet on this host knows it, and it is never serialized.
    #[serde(skip)]
    pub access_token: Option<String>,
}

/// Which accelerator a new sandbox runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    /// KVM where hardware virtualization works, TCG otherwise.
    #[default]
    Auto,
    Kvm,
    Tcg,
}

impl std::str::FromStr for Accel {
    type Err = String;
    fn from_str(s: &str) -> Result<Accel, String> {
        match s {
            "auto" => Ok(Accel::Auto),
            "kvm" => Ok(Accel::Kvm),
            "tcg" => Ok(Accel::Tcg),
            other => Err(format!(
                "unknown accelerator {other:?}: use auto, kvm or tcg"
            )),
        }
    }
}

/// The guest's network.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Network {
    /// A NIC behind forkd's own gateway: the public internet as the egress
    /// policy allows, nothing of the host, no other sandbox. (`user`, the
    /// name this mode had, is read as `default`.)
    #[default]
    #[serde(alias = "user")]
    Default,
    /// Nothing: no network device (or, for a child of a snapshot that has
    /// one, a gateway that lets nothing out).
    None,
    /// QEMU's unfiltered user-mode stack: only reported, for children of
    /// snapshots made before the gateway existed.
    Slirp,
}

impl std::str::FromStr for Network {
    type Err = String;
    fn from_str(s: &str) -> Result<Network, String> {
        match s {
            "default" | "user" => Ok(Network::Default),
            "none" => Ok(Network::None),
            other => Err(format!("unknown network {other:?}: use default or none")),
        }
    }
}

impl std::fmt::Display for Network {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Network::Default => "default",
            Network::None => "none",
            Network::Slirp => "slirp",
        })
    }
}

/// A sandbox's network as it was asked for and is enforced: its mode and
/// its `--allow-out`/`--deny-out` rules (CIDRs or domain names, as given).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkPolicy {
    pub mode: Network,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow_out: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deny_out: Vec<String>,
}

impl std::fmt::Display for NetworkPolicy {
    /// `default`, `default (allow-out pypi.org; deny-out 1.2.3.4)`, `none`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.mode)?;
        let mut parts = Vec::new();
        if !self.allow_out.is_empty() {
            parts.push(format!("allow-out {}", self.allow_out.join(", ")));
        }
        if !self.deny_out.is_empty() {
            parts.push(format!("deny-out {}", self.deny_out.join(", ")));
        }
        if !parts.is_empty() {
            write!(f, " ({})", parts.join("; "))?;
        }
        Ok(())
    }
}

/// Guest artifacts that replace the built ones: files on the host that runs
/// the operation, so only a local fleet can use them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestFiles {
    /// A guest kernel instead of Debian's cloud kernel.
    pub kernel: Option<PathBuf>,
    /// The modules directory (`lib/modules/VERSION`) of `kernel`.
    pub modules: Option<PathBuf>,
    /// The static guest agent binary.
    pub agent: Option<PathBuf>,
}

impl GuestFiles {
    pub fn is_empty(&self) -> bool {
        self.kernel.is_none() && self.modules.is_none() && self.agent.is_none()
    }
}

/// Boot a sandbox that outlives the caller.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreateRequest {
    /// Root disk: `busybox`, `debian-python`, `none`, the name of an image
    /// built on the host that runs the operation, the path of a raw ext4
    /// image there, or a container image (`HOST/REPO:TAG`,
    /// `oci-archive:PATH`, `docker-archive:PATH`, `oci-layout:DIR`), built
    /// into a root image once per digest; its `Env`, `WorkingDir` and `User`
    /// become the sandbox's defaults under [`Self::settings`].
    pub image: Option<String>,
    /// Reach the registry of a container image over plain HTTP (a loopback
    /// or lab registry).
    #[serde(default)]
    pub insecure_registry: bool,
    pub mem_mib: Option<u64>,
    pub cpus: Option<u32>,
    pub accel: Option<Accel>,
    pub network: Option<Network>,
    /// Destinations the guest may reach (CIDRs or domains); with any, only
    /// those ([`crate::policy`] words the rules).
    pub allow_out: Vec<String>,
    /// Destinations the guest may never reach; beats `allow_out`.
    pub deny_out: Vec<String>,
    /// The memory limit of the sandbox's QEMU process in MiB (default: guest
    /// RAM plus QEMU's own overhead).
    pub memory_limit_mib: Option<u64>,
    /// CPU time as a percentage of one host CPU (150 = 1.5 CPUs).
    pub cpu_quota_pct: Option<u32>,
    /// TCG translation-cache size in MiB.
    pub tcg_tb_mib: Option<u32>,
    /// Back guest RAM with 2 MiB hugetlb pages.
    pub huge_pages: bool,
    /// Populate all guest RAM at start.
    pub prealloc: bool,
    pub guest: GuestFiles,
    /// Once the sandbox answers, take a full snapshot of it under this tag
    /// (the sandbox is removed again if that fails).
    pub snapshot_as: Option<String>,
    /// Its time to live, idle timeout, labels and default env and cwd.
    #[serde(default)]
    pub settings: crate::Settings,
}

/// A sandbox `create` booted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Created {
    #[serde(flatten)]
    pub sandbox: Sandbox,
    /// From QEMU start until the guest agent answered.
    pub boot_ms: f64,
}

// ------------------------------------------------------------------ exec

/// A command to run in a sandbox.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecSpec {
    /// The command and its arguments (`argv[0]` is looked up in `PATH`).
    pub argv: Vec<String>,
    /// Added to the agent's environment.
    pub env: Vec<(String, String)>,
    /// Working directory (absolute guest path).
    pub cwd: Option<String>,
    /// Kill the command after this long.
    pub timeout: Option<Duration>,
}

/// Which output stream a chunk of output came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Stream {
    Stdout,
    Stderr,
}

/// How a command ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecOutcome {
    /// Its exit code, when it exited.
    pub code: Option<i32>,
    /// The signal that killed it, when one did.
    pub signal: Option<i32>,
    /// Whether it was killed because its timeout ran out.
    pub timed_out: bool,
    pub duration_ms: u64,
}

/// Exit code of a command killed at its timeout (as timeout(1)).
pub const EXIT_TIMED_OUT: i32 = 124;

impl ExecOutcome {
    /// The shell's convention: the exit code, 128 + N for signal N, 124 when
    /// the timeout killed it.
    pub fn exit_code(&self) -> i32 {
        if self.timed_out {
            return EXIT_TIMED_OUT;
        }
        match (self.code, self.signal) {
            (Some(c), _) => c,
            (None, Some(s)) => 128 + s,
            (None, None) => 255,
        }
    }
}

/// A round trip to a sandbox's guest agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pong {
    pub rtt_us: u64,
}

// ------------------------------------------------------------------ snapshots

/// One snapshot.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    pub tag: String,
    pub status: SnapshotStatus,
    /// Its directory in the store.
    pub dir: PathBuf,
    /// The snapshot the source sandbox ran from (the chain's next link).
    pub parent: Option<String>,
    /// The sandbox it was taken from.
    pub source: Option<String>,
    /// Unix seconds.
    pub created_at: u64,
    /// How long the source was paused, to the microsecond.
    pub pause_ms: Option<f64>,
    /// Why writing failed, for `failed`.
    pub error: Option<String>,
}

impl Snapshot {
    /// A pause in (fractional) milliseconds kept to the microsecond, the
    /// precision every side of the seam carries.
    pub fn pause_to_us(pause_ms: f64) -> f64 {
        (pause_ms * 1000.0).round() / 1000.0
    }
}

/// What depends on a snapshot and so keeps it from being deleted.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dependents {
    /// Live sandboxes spawned from it (pool members included).
    pub sandboxes: Vec<String>,
    /// Snapshots whose chain goes through it.
    pub snapshots: Vec<String>,
}

impl Dependents {
    pub fn is_empty(&self) -> bool {
        self.sandboxes.is_empty() && self.snapshots.is_empty()
    }
}

/// One file of a snapshot and its real size.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileSize {
    pub name: String,
    /// Apparent size (a RAM image is the size of guest RAM).
    pub size: u64,
    /// Bytes it really occupies (RAM images and disks are sparse).
    pub allocated: u64,
}

/// Everything known about one snapshot.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SnapshotDetail {
    #[serde(flatten)]
    pub snapshot: Snapshot,
    /// Parent, grandparent, … up to the root of the chain.
    pub chain: Vec<String>,
    pub dependents: Dependents,
    /// When set, the RAM image is a layer holding only the pages that
    /// differ from this snapshot's.
    pub ram_parent: Option<String>,
    /// Pages held by the RAM layer.
    pub layer_pages: Option<u64>,
    pub files: Vec<FileSize>,
    /// Sum of `allocated` over the files.
    pub allocated: u64,
    /// Ready and with a readable manifest: children can be spawned from it.
    pub bootable: bool,
    /// The network its children get unless a spawn overrides it.
    #[serde(default)]
    pub network: Option<NetworkPolicy>,
    /// How many files make up what its children run from (`compact`
    /// brings both to 1).
    #[serde(default)]
    pub layers: Layers,
}

/// How many stored files a snapshot's children are made from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Layers {
    /// RAM images read to make the image children map: 1 for a full image,
    /// one more per diff layer below.
    pub ram: u32,
    /// qcow2 files in its disk's backing chain, its own included (the raw
    /// base image below them is not counted; 0: no disk).
    pub disk: u32,
}

/// A snapshot's chain before or after `compact`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChainSize {
    pub layers: Layers,
    /// Bytes the stored files children are made from occupy: its own and
    /// those of every RAM and disk layer below it (the base image aside).
    pub bytes: u64,
}

/// What `compact` did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Compacted {
    pub tag: String,
    /// False when it was one RAM image and one disk layer already: nothing
    /// was written.
    pub compacted: bool,
    pub before: ChainSize,
    pub after: ChainSize,
    /// The snapshots it no longer needs (they are kept; `rmi` may delete
    /// them now unless something else depends on them).
    pub released: Vec<String>,
}

/// Options of a snapshot deletion.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemoveSnapshot {
    /// Delete even though sandboxes or snapshots depend on it.
    pub force: bool,
    /// Delete the snapshots layered on it too, recursively.
    pub cascade: bool,
}

/// What deleting every failed and broken snapshot did.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Pruned {
    /// Tags deleted, dependents first.
    pub removed: Vec<String>,
    /// Failed or broken snapshots left in place, with why.
    pub kept: Vec<KeptSnapshot>,
}

/// A failed or broken snapshot a prune did not delete.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KeptSnapshot {
    pub tag: String,
    /// What still depends on it (live sandboxes, or snapshots that are
    /// themselves neither failed nor broken).
    pub dependents: Dependents,
}

/// What a garbage collection of the shared caches did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GcReport {
    /// Cached RAM images deleted (file names in the runtime directory's
    /// image cache): no snapshot of any home on this host references them.
    pub removed: Vec<String>,
    /// Bytes those files occupied.
    pub freed_bytes: u64,
    /// Cached images still referenced, kept.
    pub kept: usize,
}

// ------------------------------------------------------------------ kill

/// What killing every sandbox did.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct KilledAll {
    /// Sandboxes killed and removed, in list order.
    pub killed: Vec<String>,
    /// Sandboxes that could not be killed, and why.
    pub failed: Vec<(String, crate::OpError)>,
    /// QEMU processes of this home that had no record (found by their run
    /// directory), killed with their directory.
    pub orphans: Vec<u32>,
}

// ------------------------------------------------------------------ branch

/// Snapshot a running sandbox.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BranchRequest {
    /// The sandbox to branch.
    pub source: String,
    /// The new snapshot's tag (default: [`crate::policy::default_branch_tag`]).
    pub tag: Option<String>,
    /// Default: live.
    pub mode: Option<BranchMode>,
    /// Return once the snapshot is ready (default), or right after the pause.
    pub wait: Option<bool>,
    /// When set, the source must run from this snapshot.
    pub expect_parent: Option<String>,
}

/// How a branch went.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BranchOutcome {
    /// The new snapshot (`writing` when the branch did not wait).
    pub snapshot: Snapshot,
    pub mode: BranchMode,
    /// The source was paused this long.
    pub pause_ms: f64,
    /// Guest downtime as QEMU reports it (live mode, when known).
    pub qemu_downtime_ms: Option<f64>,
    /// From the start of the branch until the snapshot was ready (when waited).
    pub ready_ms: Option<f64>,
    /// Bytes of RAM copied during the pause (full mode).
    pub ram_copied: Option<u64>,
}

// ------------------------------------------------------------------ spawn

/// What a fan-out does when some children start and others fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PartialFailure {
    /// Keep the children that started; report each failure in its slot.
    Keep,
    /// Kill the children that started: all or nothing.
    Kill,
}

/// Start children of a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpawnRequest {
    pub tag: String,
    /// How many children.
    pub n: usize,
    /// Children started at once (default: [`crate::policy::spawn_parallelism`]).
    pub parallel: Option<usize>,
    /// After spawning, refill the snapshot's warm pool to this many members
    /// (in the background).
    pub pool: Option<usize>,
    /// Wait while the snapshot is still being written (default), or fail.
    pub wait: Option<bool>,
    /// Default: [`crate::policy::PARTIAL_FAILURE`].
    pub on_failure: Option<PartialFailure>,
    /// The children's network; the snapshot's when `None`. A snapshot
    /// without a network device cannot give its children one.
    #[serde(default)]
    pub network: Option<Network>,
    /// Replaces the snapshot's `allow_out` rules when set.
    #[serde(default)]
    pub allow_out: Option<Vec<String>>,
    /// Replaces the snapshot's `deny_out` rules when set.
    #[serde(default)]
    pub deny_out: Option<Vec<String>>,
    /// The memory limit of each child's QEMU process in MiB (default: the
    /// snapshot's).
    #[serde(default)]
    pub memory_limit_mib: Option<u64>,
    /// CPU quota of each child, percent of one host CPU (default: the
    /// snapshot's).
    #[serde(default)]
    pub cpu_quota_pct: Option<u32>,
    /// Each child's time to live, idle timeout, labels and default env and
    /// cwd (nothing of the source's is inherited).
    #[serde(default)]
    pub settings: crate::Settings,
    /// The id of the one child (`n` must be 1; refused while a sandbox has
    /// it), instead of a fresh one: a front end that paused a sandbox into
    /// a snapshot brings it back under its own id (E2B's `connect`). Kept
    /// by a fleet on this host only, as [`crate::Settings::access_token`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// Map the children's RAM on 2 MiB huge pages (a hugetlb copy of the
    /// snapshot's image): their own live branches pause as briefly as a
    /// parent's, but each first write into a 2 MiB page copies all of it.
    /// Default: [`crate::policy::CHILD_HUGE_PAGES`]. Such children never
    /// come from the warm pool.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub huge_pages: Option<bool>,
}

impl SpawnRequest {
    pub fn new(tag: impl Into<String>, n: usize) -> SpawnRequest {
        SpawnRequest {
            tag: tag.into(),
            n,
            parallel: None,
            pool: None,
            wait: None,
            on_failure: None,
            network: None,
            allow_out: None,
            deny_out: None,
            memory_limit_mib: None,
            cpu_quota_pct: None,
            settings: crate::Settings::default(),
            id: None,
            huge_pages: None,
        }
    }

    /// Whether the children's network differs from the snapshot's.
    pub fn overrides_network(&self) -> bool {
        self.network.is_some() || self.allow_out.is_some() || self.deny_out.is_some()
    }
}

/// One started child.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Child {
    pub sandbox: Sandbox,
    /// From the start of its launch until its agent answered and fork
    /// safety was applied.
    pub ready_ms: f64,
    /// Loading the device state.
    pub restore_ms: f64,
    /// How far its clock was stepped.
    pub clock_step_ms: i64,
    /// Whether it was a pre-started pool member.
    pub from_pool: bool,
}

/// How a spawn went: one slot per child asked for, in order.
#[derive(Debug, Clone)]
pub struct SpawnOutcome {
    pub tag: String,
    pub wall_ms: f64,
    pub children: Vec<Result<Child, crate::OpError>>,
}

impl SpawnOutcome {
    pub fn failed(&self) -> usize {
        self.children.iter().filter(|c| c.is_err()).count()
    }
}

/// A snapshot's warm pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolStatus {
    /// The size asked for.
    pub size: usize,
    /// Members started by this call.
    pub started: usize,
    /// Members waiting now.
    pub ready: usize,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outcome(code: Option<i32>, signal: Option<i32>, timed_out: bool) -> ExecOutcome {
        ExecOutcome {
            code,
            signal,
            timed_out,
            duration_ms: 1,
        }
    }

    #[test]
    fn exit_codes_follow_the_shell() {
        assert_eq!(outcome(Some(3), None, false).exit_code(), 3);
        assert_eq!(outcome(None, Some(9), false).exit_code(), 137);
        assert_eq!(outcome(None, Some(9), true).exit_code(), 124);
        assert_eq!(outcome(None, None, false).exit_code(), 255);
    }

    #[test]
    fn networks_read_the_old_name_and_print_their_rules() {
        assert_eq!("user".parse::<Network>().unwrap(), Network::Default);
        assert_eq!(
            serde_json::from_str::<Network>("\"user\"").unwrap(),
            Network::Default
        );
        assert!("wifi"
            .parse::<Network>()
            .unwrap_err()
            .contains("default or none"));
        let p = NetworkPolicy {
            mode: Network::Default,
            allow_out: vec!["pypi.org".into(), "10.1.0.0/16".into()],
            deny_out: vec!["1.2.3.4".into()],
        };
        assert_eq!(
            p.to_string(),
            "default (allow-out pypi.org, 10.1.0.0/16; deny-out 1.2.3.4)"
        );
        assert_eq!(NetworkPolicy::default().to_string(), "default");
        let json = serde_json::to_value(NetworkPolicy::default()).unwrap();
        assert_eq!(json, serde_json::json!({"mode": "default"}));
    }

    #[test]
    fn a_pause_keeps_microseconds_and_survives_integer_transport() {
        let local = Snapshot::pause_to_us(5.123_456_7);
        let us = (5.123_456_7f64 * 1000.0).round() as u64;
        assert_eq!(local, us as f64 / 1000.0);
    }
}
