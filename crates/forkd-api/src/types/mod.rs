//! The typed bodies of every `/v1` route: requests (strict: unknown fields are
//! refused) and responses.
//!
//! The legacy routes keep the field names, defaults and shapes of the runtime
//! forkd grew from, so its clients work unchanged; forkd's own fields sit beside
//! them and are optional. Flags that mean nothing on forkd are accepted and
//! documented as no-ops on the field itself, which is also what the OpenAPI
//! document shows.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::error::ApiError;
use crate::validate::{self, Validate};

mod guest;
mod transfer;
pub use guest::*;
pub use transfer::*;

/// Most children one spawn call may ask for.
pub const MAX_SPAWN: usize = 1000;
/// Longest exec timeout, in seconds (one day).
pub const MAX_EXEC_TIMEOUT_SECS: u64 = 86_400;
/// Largest pool a snapshot may keep.
pub const MAX_POOL_SIZE: u32 = 1000;

fn default_one() -> usize {
    1
}
fn default_exec_timeout() -> u64 {
    30
}

// ---------------------------------------------------------------- snapshots

/// Lifecycle of a snapshot.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum SnapshotStatus {
    /// Still being written by a branch that did not wait; not spawnable yet.
    Writing,
    /// Complete; children can be spawned from it.
    Ready,
    /// Writing failed; kept for diagnosis, never spawnable.
    Failed,
    /// forkd: was ready, but something it needs is gone (a file, the
    /// snapshot it is layered on); never spawnable, `error` says why.
    Broken,
}

/// One snapshot, as `GET /v1/snapshots` lists it and a branch returns it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct SnapshotInfo {
    /// The snapshot's tag (`[A-Za-z0-9._-]{1,64}`, not starting with `.`).
    pub tag: String,
    /// Its directory in the store.
    pub dir: String,
    /// When it was taken (Unix seconds).
    pub created_at_unix: u64,
    /// Id of the sandbox it was branched from; absent for snapshots not made by
    /// a branch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub branched_from: Option<String>,
    /// How long the source sandbox was paused, in whole milliseconds (rounded
    /// up, so a sub-millisecond pause reads 1). Absent for snapshots not made by
    /// a branch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pause_ms: Option<u64>,
    /// forkd: the same pause in microseconds, for pauses of a few milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pause_us: Option<u64>,
    /// `writing`, `ready` or `failed`.
    pub status: SnapshotStatus,
    /// Whether children can be spawned from it now (`status` is `ready` and its
    /// whole parent chain is present).
    pub bootable: bool,
    /// forkd: the snapshot this one is layered on, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent_tag: Option<String>,
    /// forkd: why writing failed, for `status: failed`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// forkd: how the branch that made it went; only in branch answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub branch: Option<BranchReport>,
}

/// forkd: the timings of one branch.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct BranchReport {
    /// `live` or `full` (what the request's mode mapped to).
    pub mode: BranchMode,
    /// The source's pause in milliseconds, unrounded.
    pub pause_ms: f64,
    /// Guest downtime as QEMU reports it (live branches).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub qemu_downtime_ms: Option<f64>,
    /// From the call until the snapshot was ready (waited branches).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_ms: Option<f64>,
    /// Bytes of RAM copied during the pause (full branches).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ram_copied_bytes: Option<u64>,
}

impl SnapshotInfo {
    /// Converts a pause measured in (fractional) milliseconds into the
    /// `pause_ms` / `pause_us` pair: legacy clients read `pause_ms` as an
    /// integer, so it is rounded up rather than sent as a float.
    pub fn pause_fields(pause_ms: Option<f64>) -> (Option<u64>, Option<u64>) {
        match pause_ms {
            Some(ms) if ms.is_finite() && ms >= 0.0 => {
                (Some(ms.ceil() as u64), Some((ms * 1000.0).round() as u64))
            }
            _ => (None, None),
        }
    }
}

/// One file of a snapshot, in `GET /v1/snapshots/{tag}/info`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct SnapshotFile {
    /// File name inside the snapshot directory.
    pub name: String,
    /// Apparent size (`st_size`).
    pub logical_bytes: u64,
    /// Allocated size (`st_blocks * 512`); smaller than `logical_bytes` for
    /// sparse RAM images.
    pub physical_bytes: u64,
}

/// `GET /v1/snapshots/{tag}/info`: a snapshot with its files, sizes, parent
/// chain and dependents.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct SnapshotDetail {
    /// Everything `GET /v1/snapshots` says about it.
    #[serde(flatten)]
    pub snapshot: SnapshotInfo,
    /// Number of ancestors (0 for a snapshot with no parent).
    pub chain_depth: usize,
    /// Tags from the root of the chain down to the direct parent.
    pub ancestors: Vec<String>,
    /// Tags of the snapshots layered directly on this one; a delete without
    /// `cascade` or `force` is refused while this is not empty.
    pub dependents: Vec<String>,
    /// forkd: ids of live sandboxes spawned from this snapshot.
    #[serde(default)]
    pub sandboxes: Vec<String>,
    /// Every file of the snapshot directory.
    pub files: Vec<SnapshotFile>,
    /// Apparent size of the guest RAM image.
    pub memory_logical_bytes: u64,
    /// Allocated size of the guest RAM image.
    pub memory_physical_bytes: u64,
    /// Size of the device-state file.
    pub vmstate_bytes: u64,
    /// forkd: sum of `logical_bytes` over `files`.
    pub total_logical_bytes: u64,
    /// forkd: sum of `physical_bytes` over `files`.
    pub total_physical_bytes: u64,
    /// forkd: when set, the RAM image is a diff layer over this snapshot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ram_parent: Option<String>,
    /// forkd: pages held by the RAM layer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layer_pages: Option<u64>,
    /// forkd: the network its children get unless a spawn says otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<NetworkInfo>,
    /// forkd: RAM images read to make the image its children map (1: a
    /// full image; one more per diff layer below it).
    #[serde(default)]
    pub ram_layers: u32,
    /// forkd: qcow2 files in its disk's backing chain, its own included
    /// (the raw base image aside; 0: no disk).
    #[serde(default)]
    pub disk_layers: u32,
}

/// forkd: a snapshot's chain before or after `POST /v1/snapshots/{tag}/compact`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct ChainSize {
    /// RAM images its children are made from.
    pub ram_layers: u32,
    /// qcow2 files of its disk chain.
    pub disk_layers: u32,
    /// Bytes those stored files occupy (the base image aside).
    pub bytes: u64,
}

/// forkd: what `POST /v1/snapshots/{tag}/compact` did.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct CompactResponse {
    /// The snapshot.
    pub tag: String,
    /// False when it was one RAM image and one disk layer already.
    pub compacted: bool,
    /// What its children were made from before.
    pub before: ChainSize,
    /// What they are made from now (the same when nothing was done).
    pub after: ChainSize,
    /// Snapshots below it that it no longer needs (kept).
    #[serde(default)]
    pub released: Vec<String>,
}

/// Query of `DELETE /v1/snapshots/{tag}`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DeleteSnapshotQuery {
    /// Delete the snapshots that depend on this one too, recursively.
    #[serde(default)]
    pub cascade: bool,
    /// Delete even though other snapshots depend on it, leaving them broken
    /// (they are marked `failed`). Exclusive with `cascade`.
    #[serde(default)]
    pub force: bool,
}

impl Validate for DeleteSnapshotQuery {
    fn validate(&self) -> Result<(), ApiError> {
        if self.cascade && self.force {
            return Err(ApiError::field(
                "force",
                "`cascade` and `force` are exclusive: cascade deletes the dependents, \
                 force orphans them; pass one",
            ));
        }
        Ok(())
    }
}

/// `POST /v1/snapshots/{tag}/pool`: keep `size` pre-started children of the
/// snapshot waiting, so a spawn with `use_pool` takes them instead of starting
/// QEMU. `size: 0` drops the pool.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PoolRequest {
    /// How many pre-started children to keep (0 to 1000).
    pub size: u32,
}

impl Validate for PoolRequest {
    fn validate(&self) -> Result<(), ApiError> {
        validate::range("size", self.size, 0, MAX_POOL_SIZE)
    }
}

/// The state of one snapshot's pool.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct PoolInfo {
    /// The snapshot the pool spawns from.
    pub tag: String,
    /// The size asked for.
    pub size: u32,
    /// Children started and waiting now.
    pub ready: u32,
    /// forkd: members this call started.
    #[serde(default)]
    pub started: u32,
}

// ---------------------------------------------------------------- sandboxes

/// Lifecycle of a sandbox.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum SandboxState {
    /// forkd: being started (its record exists before its QEMU does).
    Starting,
    /// Running and handed out.
    Running,
    /// Started and waiting in a snapshot's pool.
    Pooled,
    /// Its QEMU is gone.
    Dead,
}

/// One sandbox.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct SandboxInfo {
    /// The sandbox id (also the guest's hostname).
    pub id: String,
    /// The snapshot it was spawned from; empty for a sandbox booted fresh.
    pub snapshot_tag: String,
    /// Always null on forkd: each child has its own network gateway and no
    /// host network namespace.
    pub netns: Option<String>,
    /// Where the guest is reachable from the host, as forkd sees it.
    pub guest_addr: String,
    /// When it was started (Unix seconds).
    pub created_at_unix: u64,
    /// Host pid of its QEMU.
    pub pid: Option<u32>,
    /// The memory limit asked for at spawn, if any.
    pub memory_limit_mib: Option<u64>,
    /// Whether any branch has been taken from it.
    #[serde(default)]
    pub has_branched: bool,
    /// How many branches have been taken from it.
    #[serde(default)]
    pub branch_count: u32,
    /// forkd: `running`, `pooled` or `dead`.
    pub state: SandboxState,
    /// forkd: the root disk it booted with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// forkd: guest memory in MiB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mem_mib: Option<u64>,
    /// forkd: virtual CPUs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpus: Option<u32>,
    /// forkd: how its spawn went; only in spawn answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spawn: Option<SpawnReport>,
    /// forkd: its network and egress policy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<NetworkInfo>,
    /// forkd: when it ends, its labels and the defaults its commands get;
    /// absent when it has none of them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lifetime: Option<LifetimeInfo>,
}

/// forkd: a sandbox's end time, idle timeout, labels and command defaults.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct LifetimeInfo {
    /// When it is killed (Unix milliseconds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ends_at_ms: Option<u64>,
    /// Killed after this many milliseconds without an operation on it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_timeout_ms: Option<u64>,
    /// The last operation on it (Unix milliseconds).
    #[serde(default)]
    pub last_active_ms: u64,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    /// Labels to select it by.
    pub labels: BTreeMap<String, String>,
    /// Environment every command gets (a command's own variables win).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// Working directory of every command that names none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cwd: Option<String>,
    /// The guest account commands run as when they name none (from the
    /// container image the sandbox was created from); root when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
}

/// `POST /v1/sandboxes/{id}/timeout`: move a sandbox's end time.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TimeoutRequest {
    /// Killed this many milliseconds from now; absent or null: it lives
    /// until killed.
    #[serde(default)]
    pub ttl_ms: Option<u64>,
}

impl Validate for TimeoutRequest {
    fn validate(&self) -> Result<(), ApiError> {
        validate_lifetime(self.ttl_ms, None, &BTreeMap::new(), &BTreeMap::new(), None)
    }
}

/// Longest container image reference accepted.
pub const MAX_IMAGE_REF: usize = 512;

/// A boot's `container_image`: a registry reference, never something on
/// the daemon's host (the reference's own syntax is checked where it is
/// pulled).
fn validate_container_image(r: &str) -> Result<(), ApiError> {
    use forkd_ops::image::{image_kind, ImageKind, REGISTRY_TRANSPORT};
    let bad = |why: String| Err(ApiError::field("container_image", why));
    if r.is_empty() || r.len() > MAX_IMAGE_REF {
        return bad(format!(
            "must be a registry reference of 1-{MAX_IMAGE_REF} bytes"
        ));
    }
    if r.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return bad(format!("{r:?} holds whitespace or control characters"));
    }
    let bare = r.strip_prefix(REGISTRY_TRANSPORT).unwrap_or(r);
    if image_kind(r) == ImageKind::HostContainer || bare.starts_with(['/', '.', '~']) {
        return bad(format!(
            "{r:?} names a file or directory on the daemon's host, which a caller cannot use: push the image to a registry and name it there"
        ));
    }
    Ok(())
}

/// Checks the lifetime fields of a boot or spawn.
pub(crate) fn validate_lifetime(
    ttl_ms: Option<u64>,
    idle_timeout_ms: Option<u64>,
    labels: &BTreeMap<String, String>,
    env: &BTreeMap<String, String>,
    cwd: Option<&str>,
) -> Result<(), ApiError> {
    let none = BTreeMap::new();
    // The seam checks all of them at once; checked one field at a time, the
    // 400 names the field at fault.
    let fields: [(&str, forkd_ops::Settings); 5] = [
        (
            "ttl_ms",
            crate::convert::settings_from_wire(ttl_ms, None, &none, &none, None),
        ),
        (
            "idle_timeout_ms",
            crate::convert::settings_from_wire(None, idle_timeout_ms, &none, &none, None),
        ),
        (
            "labels",
            crate::convert::settings_from_wire(None, None, labels, &none, None),
        ),
        (
            "env",
            crate::convert::settings_from_wire(None, None, &none, env, None),
        ),
        (
            "cwd",
            crate::convert::settings_from_wire(None, None, &none, &none, cwd),
        ),
    ];
    for (field, settings) in fields {
        settings
            .validate()
            .map_err(|e| ApiError::field(field, e.message))?;
    }
    Ok(())
}

/// forkd: a sandbox's network as enforced: its mode and egress rules.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct NetworkInfo {
    /// `default` (the public internet the rules allow, nothing of the
    /// host), `none`, or `slirp` (QEMU's unfiltered stack, only for
    /// children of snapshots made before forkd filtered).
    pub mode: NetworkMode,
    /// Destinations allowed (CIDRs or domain names); with any, only those.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow_out: Vec<String>,
    /// Destinations denied; beats `allow_out`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deny_out: Vec<String>,
}

/// forkd: the timings of one spawned child.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct SpawnReport {
    /// From its launch until its agent answered and fork-safety was applied.
    pub ready_ms: f64,
    /// Loading the device state.
    pub restore_ms: f64,
    /// How far its clock was stepped.
    pub clock_step_ms: i64,
    /// Whether it came from the warm pool.
    pub from_pool: bool,
}

/// `POST /v1/sandboxes`: SPAWN `n` children from the snapshot `snapshot_tag`
/// (the legacy request, unchanged). Answers 201 with one [`SandboxInfo`] per
/// child, 404 for an unknown tag, 409 for a snapshot that is not ready.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SpawnRequest {
    /// The snapshot to spawn from.
    pub snapshot_tag: String,
    /// How many children (1 to 1000).
    #[serde(default = "default_one")]
    pub n: usize,
    /// No-op on forkd: every child already has its own network gateway.
    #[serde(default)]
    pub per_child_netns: bool,
    /// Memory limit of each child's QEMU process (its cgroup), in MiB; the
    /// snapshot's when absent. At least guest RAM + 64 MiB.
    #[serde(default)]
    pub memory_limit_mib: Option<u64>,
    /// No-op on forkd: children map the parent's RAM copy-on-write from tmpfs,
    /// so the first branch of a child has no cold-cache penalty to pre-pay.
    #[serde(default)]
    pub prewarm: bool,
    /// No-op on forkd: every sandbox's RAM is a shared file on tmpfs, so every
    /// sandbox can take a live branch.
    #[serde(default)]
    pub live_fork: bool,
    /// Children map their RAM on 2 MiB huge pages (a hugetlb copy of the
    /// snapshot's image, forkd managing the host's pool): their own live
    /// branches pause as briefly as a parent's, but each first write into a
    /// 2 MiB page copies all of it. Such children never come from the warm
    /// pool. Default false (4 KiB pages shared with the siblings).
    #[serde(default)]
    pub hugepages: bool,
    /// forkd: a no-op kept for compatibility: children always come from the
    /// snapshot's pool first (see `POST /v1/snapshots/{tag}/pool`), and only
    /// the rest are started.
    #[serde(default)]
    pub use_pool: bool,
    /// forkd: wait while the snapshot is still being written (the default),
    /// or answer 409 at once with `false`.
    #[serde(default)]
    pub wait: Option<bool>,
    /// forkd: what to do when some children fail to start: `kill` the others
    /// and answer with the error (the default on this route: a client never
    /// has to find stray children), or `keep` them.
    #[serde(default)]
    pub on_failure: PartialFailure,
    /// forkd: children started at once (default: one per host core).
    #[serde(default)]
    pub parallel: Option<usize>,
    /// forkd: after spawning, refill the snapshot's warm pool to this many
    /// members in the background.
    #[serde(default)]
    pub refill_pool: Option<usize>,
    /// forkd: the children's network (default: the snapshot's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<NetworkMode>,
    /// forkd: replaces the snapshot's allowed destinations (CIDRs or domain
    /// names; with any, only those are reachable).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow_out: Option<Vec<String>>,
    /// forkd: replaces the snapshot's denied destinations.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deny_out: Option<Vec<String>>,
    /// forkd: CPU time of each child as a percentage of one host CPU.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_quota_pct: Option<u32>,
    /// forkd: killed this many milliseconds after it starts (movable with
    /// `POST /v1/sandboxes/{id}/timeout`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_ms: Option<u64>,
    /// forkd: killed after this many milliseconds without an operation on it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_timeout_ms: Option<u64>,
    /// forkd: labels (`key: value`) to select sandboxes by.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// forkd: environment every command in it gets (a command's own wins).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// forkd: working directory of every command that names none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cwd: Option<String>,
}

/// forkd: what a spawn does when some children fail.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum PartialFailure {
    /// Kill the children that started and answer with the error.
    #[default]
    Kill,
    /// Keep the children that started.
    Keep,
}

impl Validate for SpawnRequest {
    fn validate(&self) -> Result<(), ApiError> {
        validate::tag("snapshot_tag", &self.snapshot_tag)?;
        validate::range("n", self.n, 1, MAX_SPAWN)?;
        if let Some(mib) = self.memory_limit_mib {
            validate::range("memory_limit_mib", mib, 1, u64::from(u32::MAX))?;
        }
        if let Some(p) = self.parallel {
            validate::range("parallel", p, 1, MAX_SPAWN)?;
        }
        if let Some(k) = self.refill_pool {
            validate::range("refill_pool", k, 0, MAX_SPAWN)?;
        }
        if let Some(rules) = &self.allow_out {
            validate::egress_rules("allow_out", rules)?;
        }
        if let Some(rules) = &self.deny_out {
            validate::egress_rules("deny_out", rules)?;
        }
        if let Some(q) = self.cpu_quota_pct {
            validate::range("cpu_quota_pct", q, 1, 100 * 1024)?;
        }
        validate_lifetime(
            self.ttl_ms,
            self.idle_timeout_ms,
            &self.labels,
            &self.env,
            self.cwd.as_deref(),
        )?;
        Ok(())
    }
}

/// Root disk of a freshly booted sandbox.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum Image {
    /// A small busybox root.
    #[default]
    Busybox,
    /// Debian with Python 3 (needed by `eval`); built once on first use.
    DebianPython,
    /// forkd: no root disk; commands run in the initramfs.
    None,
}

impl Image {
    /// The image's name, as forkd's CLI spells it.
    pub fn name(self) -> &'static str {
        match self {
            Image::Busybox => "busybox",
            Image::DebianPython => "debian-python",
            Image::None => "none",
        }
    }
}

/// `POST /v1/sandboxes/boot`: boot a fresh sandbox (forkd's `create`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct BootRequest {
    /// Root disk: `busybox` (default) or `debian-python`.
    #[serde(default)]
    pub image: Image,
    /// Guest memory in MiB (64 to 65536; default 256).
    #[serde(default)]
    pub memory_mib: Option<u64>,
    /// Virtual CPUs (1 to 64; default 1).
    #[serde(default)]
    pub vcpus: Option<u32>,
    /// When set, a full snapshot of the booted sandbox is taken under this tag
    /// once its agent answers, ready to spawn from.
    #[serde(default)]
    pub tag: Option<String>,
    /// forkd: `auto` (default: KVM where hardware virtualization works),
    /// `kvm` or `tcg`.
    #[serde(default)]
    pub accel: Option<Accel>,
    /// forkd: `default` (the public internet as `allow_out`/`deny_out`
    /// allow, nothing of the host; `user` is read as `default`) or `none`.
    #[serde(default)]
    pub network: Option<NetworkMode>,
    /// forkd: allowed destinations (CIDRs or domain names); with any, only
    /// those are reachable.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow_out: Vec<String>,
    /// forkd: denied destinations; beats `allow_out`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deny_out: Vec<String>,
    /// forkd: memory limit of the sandbox's QEMU process in MiB (default:
    /// guest RAM plus QEMU's own overhead).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_limit_mib: Option<u64>,
    /// forkd: CPU time as a percentage of one host CPU (150 = 1.5 CPUs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_quota_pct: Option<u32>,
    /// forkd: TCG translation-cache size in MiB.
    #[serde(default)]
    pub tcg_tb_mib: Option<u32>,
    /// forkd: back guest RAM with 2 MiB hugetlb pages (the host must have
    /// them reserved).
    #[serde(default)]
    pub huge_pages: bool,
    /// forkd: populate all guest RAM at start.
    #[serde(default)]
    pub prealloc: bool,
    /// forkd: boot from a container image in a registry instead of `image`
    /// (`HOST/REPO:TAG`, `HOST/REPO@sha256:…`, or `docker://REF`): pulled
    /// and built into a root image on the daemon's host, once per digest
    /// (with the daemon's `config.json` credentials); its `Env`,
    /// `WorkingDir` and `User` become the sandbox's defaults. Images in
    /// files (`oci-archive:PATH` and the like) and paths are the daemon
    /// host's own and refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container_image: Option<String>,
    /// forkd: reach `container_image`'s registry over plain HTTP (a
    /// loopback or lab registry).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub insecure_registry: bool,
    /// forkd: killed this many milliseconds after it starts (movable with
    /// `POST /v1/sandboxes/{id}/timeout`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_ms: Option<u64>,
    /// forkd: killed after this many milliseconds without an operation on it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_timeout_ms: Option<u64>,
    /// forkd: labels (`key: value`) to select sandboxes by.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// forkd: environment every command in it gets (a command's own wins).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// forkd: working directory of every command that names none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cwd: Option<String>,
}

/// forkd: which accelerator a sandbox runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    /// KVM where hardware virtualization works, TCG otherwise.
    Auto,
    /// KVM (fails where it does not work).
    Kvm,
    /// Software emulation.
    Tcg,
}

/// forkd: a sandbox's network.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum NetworkMode {
    /// forkd's gateway: the public internet as the egress rules allow,
    /// nothing of the host, no other sandbox. `user` is read as this.
    #[default]
    #[serde(alias = "user")]
    Default,
    /// No network (no device, or a gateway that lets nothing out).
    None,
    /// Reported only: QEMU's unfiltered user-mode stack of a child of a
    /// snapshot made before forkd filtered.
    Slirp,
}

impl Validate for BootRequest {
    fn validate(&self) -> Result<(), ApiError> {
        if let Some(mib) = self.memory_mib {
            validate::range("memory_mib", mib, 64, 65_536)?;
        }
        if let Some(vcpus) = self.vcpus {
            validate::range("vcpus", vcpus, 1, 64)?;
        }
        if let Some(tag) = &self.tag {
            validate::tag("tag", tag)?;
        }
        if let Some(mib) = self.tcg_tb_mib {
            validate::range("tcg_tb_mib", mib, 1, 4096)?;
        }
        validate::egress_rules("allow_out", &self.allow_out)?;
        validate::egress_rules("deny_out", &self.deny_out)?;
        if let Some(mib) = self.memory_limit_mib {
            validate::range("memory_limit_mib", mib, 1, u64::from(u32::MAX))?;
        }
        if let Some(q) = self.cpu_quota_pct {
            validate::range("cpu_quota_pct", q, 1, 100 * 1024)?;
        }
        if let Some(r) = &self.container_image {
            validate_container_image(r)?;
            if self.image != Image::Busybox {
                return Err(ApiError::field(
                    "container_image",
                    format!(
                        "names the root disk, and so does image {:?}: give one of the two",
                        self.image.name()
                    ),
                ));
            }
        } else if self.insecure_registry {
            return Err(ApiError::field(
                "insecure_registry",
                "applies to a container_image only",
            ));
        }
        validate_lifetime(
            self.ttl_ms,
            self.idle_timeout_ms,
            &self.labels,
            &self.env,
            self.cwd.as_deref(),
        )?;
        Ok(())
    }
}

// ---------------------------------------------------------------- exec, eval, ping

/// `POST /v1/sandboxes/{id}/exec`: run a command in the guest and wait for it.
/// Legacy clients send `args` and `timeout_secs`; the rest is forkd's.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ExecRequest {
    /// The command and its arguments (`args[0]` is looked up in `PATH`).
    pub args: Vec<String>,
    /// Kill the command after this many seconds (1 to 86400; default 30).
    #[serde(default = "default_exec_timeout")]
    pub timeout_secs: u64,
    /// forkd: environment added to the agent's.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// forkd: working directory (absolute guest path).
    #[serde(default)]
    pub cwd: Option<String>,
    /// forkd: bytes fed to the command's stdin (standard base64); stdin is
    /// empty when absent.
    #[serde(default)]
    pub stdin_b64: Option<String>,
}

/// Checks a command line: a non-empty program, no NUL byte anywhere.
pub(crate) fn validate_command(field: &str, args: &[String]) -> Result<(), ApiError> {
    if args.is_empty() {
        return Err(ApiError::field(
            field,
            "must name a command, e.g. [\"uname\", \"-a\"]",
        ));
    }
    if args[0].is_empty() {
        return Err(ApiError::field(
            format!("{field}[0]"),
            "the command must not be empty",
        ));
    }
    if let Some(i) = args.iter().position(|a| a.contains('\0')) {
        return Err(ApiError::field(
            format!("{field}[{i}]"),
            "must not contain a NUL byte",
        ));
    }
    Ok(())
}

/// Checks environment variables: names non-empty without `=` or NUL, values
/// without NUL.
pub(crate) fn validate_env(env: &BTreeMap<String, String>) -> Result<(), ApiError> {
    for (key, value) in env {
        if key.is_empty() || key.contains(['=', '\0']) {
            return Err(ApiError::field(
                format!("env.{key}"),
                "a variable name must be non-empty without `=` or NUL",
            ));
        }
        if value.contains('\0') {
            return Err(ApiError::field(
                format!("env.{key}"),
                "a value must not contain a NUL byte",
            ));
        }
    }
    Ok(())
}

impl Validate for ExecRequest {
    fn validate(&self) -> Result<(), ApiError> {
        validate_command("args", &self.args)?;
        validate::range("timeout_secs", self.timeout_secs, 1, MAX_EXEC_TIMEOUT_SECS)?;
        validate_env(&self.env)?;
        if let Some(cwd) = &self.cwd {
            validate::guest_path("cwd", cwd)?;
        }
        if let Some(stdin) = &self.stdin_b64 {
            validate::base64("stdin_b64", stdin)?;
        }
        Ok(())
    }
}

/// The result of an exec.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct ExecResponse {
    /// Standard output (invalid UTF-8 replaced by U+FFFD).
    pub stdout: String,
    /// Standard error (invalid UTF-8 replaced by U+FFFD).
    pub stderr: String,
    /// Exit code; 128+N for a signal, 124 when `timeout_secs` ran out.
    pub exit_code: i64,
    /// forkd: whether the command was killed because `timeout_secs` ran out.
    #[serde(default)]
    pub timed_out: bool,
    /// forkd: bytes of standard output dropped beyond the first 8 MiB this
    /// answer keeps (`stdout` then ends with a line saying so); stream the
    /// exec (`/exec/stream`) to get everything.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub stdout_dropped: u64,
    /// forkd: the same for standard error.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub stderr_dropped: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// forkd: one line of `POST /v1/sandboxes/{id}/exec/stream`: a chunk of
/// output (`stream` and `data_b64`), or, last, the exit (`exit_code`,
/// `timed_out`), or an `error` if the exec broke off.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct ExecEvent {
    /// `stdout` or `stderr`, for an output chunk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream: Option<String>,
    /// The chunk's bytes (standard base64).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_b64: Option<String>,
    /// The exit code (128+N for a signal, 124 on timeout), on the last line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i64>,
    /// Whether the command was killed at its timeout, on the last line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timed_out: Option<bool>,
    /// The signal that killed the command, on the last line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<i32>,
    /// How long the command ran, on the last line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<u64>,
    /// Why the exec broke off, on the last line instead of `exit_code`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// `POST /v1/sandboxes/{id}/eval`: run Python code in the sandbox's
/// persistent interpreter (needs a Python image, e.g. `debian-python`):
/// variables survive between calls, and into branches and their children.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct EvalRequest {
    /// Python source; the value of a final expression is the result.
    pub code: String,
    /// forkd: interrupt the code after this many seconds (default 30).
    #[serde(default)]
    pub timeout_secs: Option<u64>,
}

impl Validate for EvalRequest {
    fn validate(&self) -> Result<(), ApiError> {
        if self.code.contains('\0') {
            return Err(ApiError::field("code", "must not contain a NUL byte"));
        }
        if let Some(t) = self.timeout_secs {
            validate::range("timeout_secs", t, 1, MAX_EXEC_TIMEOUT_SECS)?;
        }
        Ok(())
    }
}

/// An exception evaluated code raised.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct EvalException {
    /// The exception's class (`NameError`).
    pub name: String,
    /// `str()` of the exception.
    pub value: String,
    /// The traceback as Python prints it.
    pub traceback: String,
}

/// The result of an eval.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct EvalResponse {
    /// `repr()` of the final expression's value, if there was one and no error.
    pub result: Option<String>,
    /// The Python traceback, if the code raised (or why it stopped at its
    /// timeout).
    pub error: Option<String>,
    /// 0 on success, 1 when the code raised or timed out.
    pub exit_code: i64,
    /// forkd: what the code printed.
    #[serde(default)]
    pub stdout: String,
    /// forkd: what the code wrote to stderr.
    #[serde(default)]
    pub stderr: String,
    /// forkd: the exception, when the code raised.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exception: Option<EvalException>,
    /// forkd: cells this interpreter has run.
    #[serde(default)]
    pub execution_count: u64,
    /// forkd: interrupted at its timeout.
    #[serde(default)]
    pub timed_out: bool,
    /// forkd: how long it ran.
    #[serde(default)]
    pub duration_ms: u64,
}

/// `POST /v1/sandboxes/{id}/ping`: a round trip to the guest agent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct PingResponse {
    /// Always true.
    pub pong: bool,
    /// The sandbox that answered.
    pub id: String,
    /// Round-trip time to the agent, in microseconds.
    pub rtt_us: u64,
}

// ---------------------------------------------------------------- branch

/// How a branch writes the snapshot.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum BranchMode {
    /// Stop, copy the whole RAM image, resume: the pause grows with the memory
    /// the guest has touched.
    Full,
    /// Mapped to `live` on forkd (a live branch pauses for less than a diff
    /// snapshot would).
    Diff,
    /// Pause for milliseconds; RAM streams out while the source keeps running.
    Live,
}

/// `POST /v1/sandboxes/{id}/branch`: snapshot a running sandbox under a new
/// tag. 201 with the snapshot; 202 with `status: writing` when `wait` is false
/// and the snapshot is still being written; 409 when the tag exists.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct BranchRequest {
    /// Tag of the new snapshot; generated (`branch-<id>-<unix time>`) when absent.
    #[serde(default)]
    pub tag: Option<String>,
    /// `full`, `diff` (mapped to `live`) or `live` (the default when neither this
    /// nor a legacy boolean is set).
    #[serde(default)]
    pub mode: Option<BranchMode>,
    /// Answer once the snapshot is complete (default). When false a live branch
    /// answers right after the pause, with `status: writing`; a full branch
    /// always completes within the pause, so it answers 201 either way.
    #[serde(default)]
    pub wait: Option<bool>,
    /// Must equal the source sandbox's own snapshot tag when set (the daemon
    /// checks); forkd records the parent chain itself.
    #[serde(default)]
    pub parent_tag: Option<String>,
    /// Legacy: the same as `mode: "diff"`.
    #[serde(default)]
    pub diff: bool,
    /// Legacy: the same as `mode: "live"`.
    #[serde(default)]
    pub live: bool,
    /// Legacy measurement hook; a no-op on forkd, which reports `pause_ms` for
    /// every branch.
    #[serde(default)]
    pub measure_diff: bool,
}

impl BranchRequest {
    /// What forkd does for this request: `Full` or `Live` (never `Diff`, which
    /// maps to `Live`). Call after [`Validate::validate`].
    pub fn effective_mode(&self) -> BranchMode {
        match self.mode {
            Some(BranchMode::Full) => BranchMode::Full,
            Some(BranchMode::Diff | BranchMode::Live) | None => BranchMode::Live,
        }
    }
}

impl Validate for BranchRequest {
    fn validate(&self) -> Result<(), ApiError> {
        if let Some(tag) = &self.tag {
            validate::tag("tag", tag)?;
        }
        if let Some(parent) = &self.parent_tag {
            validate::tag("parent_tag", parent)?;
        }
        if self.diff && self.live {
            return Err(ApiError::field(
                "live",
                "`diff` and `live` are exclusive; set `mode` instead",
            ));
        }
        if self.mode == Some(BranchMode::Full) && (self.diff || self.live) {
            let legacy = if self.diff { "diff" } else { "live" };
            return Err(ApiError::field(
                "mode",
                format!("`mode: \"full\"` contradicts the legacy `{legacy}: true`; drop one"),
            ));
        }
        Ok(())
    }
}

// ---------------------------------------------------------------- files

/// `PUT /v1/sandboxes/{id}/files`: write a file in the guest (created or
/// truncated; missing parent directories are created unless `mkdir` is
/// false). For large files, `PUT /v1/sandboxes/{id}/files/raw` streams the
/// bytes without base64 and without a size cap.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FileWriteRequest {
    /// Absolute guest path.
    pub path: String,
    /// The content, standard base64.
    pub content_b64: String,
    /// Permission bits (e.g. 493 for 0755); 0644 when absent.
    #[serde(default)]
    pub mode: Option<u32>,
    /// forkd: create missing parent directories (default true); with false,
    /// a missing parent is a 404.
    #[serde(default)]
    pub mkdir: Option<bool>,
    /// forkd: write as this guest account (default root).
    #[serde(default)]
    pub user: Option<String>,
}

impl FileWriteRequest {
    /// The decoded content. Validation has already checked it decodes.
    pub fn content(&self) -> Result<Vec<u8>, ApiError> {
        validate::base64("content_b64", &self.content_b64)
    }
}

impl Validate for FileWriteRequest {
    fn validate(&self) -> Result<(), ApiError> {
        validate::guest_path("path", &self.path)?;
        if let Some(mode) = self.mode {
            validate::range("mode", mode, 0, 0o7777)?;
        }
        if let Some(u) = &self.user {
            validate::user("user", u)?;
        }
        self.content().map(drop)
    }
}

/// Query of `GET /v1/sandboxes/{id}/files`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FileReadQuery {
    /// Absolute guest path of the file to read.
    pub path: String,
    /// forkd: read as this guest account (default root).
    #[serde(default)]
    pub user: Option<String>,
}

impl Validate for FileReadQuery {
    fn validate(&self) -> Result<(), ApiError> {
        validate::guest_path("path", &self.path)?;
        if let Some(u) = &self.user {
            validate::user("user", u)?;
        }
        Ok(())
    }
}

/// A file read from the guest.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct FileContent {
    /// The path that was read.
    pub path: String,
    /// The content, standard base64.
    pub content_b64: String,
}

// ---------------------------------------------------------------- housekeeping

/// forkd: what `DELETE /v1/sandboxes` (kill every sandbox) did.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct KillAllResponse {
    /// Sandboxes killed and removed.
    pub killed: Vec<String>,
    /// Sandboxes that could not be killed, with why.
    #[serde(default)]
    pub failed: Vec<KillFailure>,
    /// Host pids of QEMUs that had no record (their creator died before
    /// writing it), killed with their run directory.
    #[serde(default)]
    pub orphans: Vec<u32>,
}

/// forkd: a sandbox `DELETE /v1/sandboxes` could not kill.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct KillFailure {
    /// The sandbox.
    pub id: String,
    /// Why it could not be killed.
    pub error: crate::ErrorBody,
}

/// forkd: what `POST /v1/snapshots/prune` did.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct PruneResponse {
    /// Failed and broken snapshots deleted, dependents first.
    pub removed: Vec<String>,
    /// Failed or broken snapshots kept because something depends on them.
    #[serde(default)]
    pub kept: Vec<KeptSnapshot>,
}

/// forkd: a failed or broken snapshot a prune kept.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct KeptSnapshot {
    /// The snapshot.
    pub tag: String,
    /// Live sandboxes spawned from it.
    pub sandboxes: Vec<String>,
    /// Snapshots layered on it.
    pub snapshots: Vec<String>,
}

/// forkd: what `POST /v1/gc` did.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct GcResponse {
    /// Cached RAM images deleted (file names in the runtime directory's
    /// image cache).
    pub removed: Vec<String>,
    /// Bytes they occupied.
    pub freed_bytes: u64,
    /// Cached images still referenced.
    pub kept: u64,
}

// ---------------------------------------------------------------- status

/// `GET /healthz`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct HealthResponse {
    /// Always true while the daemon answers.
    pub ok: bool,
}

/// `GET /version`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct VersionResponse {
    /// forkd's version.
    pub version: String,
    /// The API version, `v1`.
    pub api: String,
}

impl VersionResponse {
    /// This build's version and API.
    pub fn current() -> Self {
        Self {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            api: "v1".to_owned(),
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn a_boot_takes_registry_references_and_nothing_of_the_daemons_host() {
        let boot = |r: &str| BootRequest {
            container_image: Some(r.into()),
            ..Default::default()
        };
        for good in [
            "127.0.0.1:5000/team/app:v1",
            "docker://busybox",
            "ubuntu:24.04",
        ] {
            assert!(boot(good).validate().is_ok(), "{good}");
        }
        for bad in [
            "oci-archive:/etc/passwd",
            "docker-archive:x.tar",
            "oci-layout:/srv",
            "/srv/root.ext4",
            "./x",
            "docker:///etc",
            "a b",
            "",
        ] {
            let e = boot(bad).validate().unwrap_err();
            assert_eq!(e.field_name(), Some("container_image"), "{bad}: {e}");
        }
        let long = "r.io/".to_string() + &"a".repeat(MAX_IMAGE_REF);
        assert!(boot(&long).validate().is_err());
        let both = BootRequest {
            image: Image::DebianPython,
            ..boot("r.io/app:1")
        };
        assert_eq!(
            both.validate().unwrap_err().field_name(),
            Some("container_image")
        );
        let insecure_alone = BootRequest {
            insecure_registry: true,
            ..Default::default()
        };
        assert_eq!(
            insecure_alone.validate().unwrap_err().field_name(),
            Some("insecure_registry")
        );
    }

    #[test]
    fn lifetime_errors_name_their_field() {
        let env: BTreeMap<String, String> = [("=".to_string(), String::new())].into();
        let labels: BTreeMap<String, String> = [("bad key!".to_string(), "v".to_string())].into();
        let none = BTreeMap::new();
        let field = |r: Result<(), ApiError>| r.unwrap_err().field_name().map(str::to_string);
        assert_eq!(
            field(validate_lifetime(None, None, &none, &env, None)).as_deref(),
            Some("env")
        );
        assert_eq!(
            field(validate_lifetime(None, None, &labels, &none, None)).as_deref(),
            Some("labels")
        );
        assert_eq!(
            field(validate_lifetime(None, None, &none, &none, Some("rel"))).as_deref(),
            Some("cwd")
        );
        assert_eq!(
            field(validate_lifetime(Some(0), None, &none, &none, None)).as_deref(),
            Some("ttl_ms")
        );
        assert!(validate_lifetime(Some(60_000), None, &none, &none, Some("/w")).is_ok());
    }

    #[test]
    fn snapshot_info_wire_shape() {
        let (pause_ms, pause_us) = SnapshotInfo::pause_fields(Some(3.2));
        assert_eq!((pause_ms, pause_us), (Some(4), Some(3200)));
        assert_eq!(SnapshotInfo::pause_fields(Some(f64::NAN)), (None, None));
        let info = SnapshotInfo {
            tag: "cp".into(),
            dir: "/s/cp".into(),
            created_at_unix: 1,
            branched_from: Some("sb-1".into()),
            pause_ms,
            pause_us,
            status: SnapshotStatus::Writing,
            bootable: false,
            parent_tag: None,
            error: None,
            branch: None,
        };
        assert_eq!(
            serde_json::to_value(&info).unwrap(),
            json!({"tag": "cp", "dir": "/s/cp", "created_at_unix": 1, "branched_from": "sb-1",
                   "pause_ms": 4, "pause_us": 3200, "status": "writing", "bootable": false})
        );
        let detail = SnapshotDetail {
            snapshot: info,
            chain_depth: 0,
            ancestors: vec![],
            dependents: vec!["x".into()],
            sandboxes: vec![],
            files: vec![],
            memory_logical_bytes: 0,
            memory_physical_bytes: 0,
            vmstate_bytes: 0,
            total_logical_bytes: 0,
            total_physical_bytes: 0,
            ram_parent: None,
            layer_pages: None,
            network: None,
            ram_layers: 1,
            disk_layers: 1,
        };
        let value = serde_json::to_value(&detail).unwrap();
        assert_eq!(
            value["tag"], "cp",
            "the snapshot's fields sit at the top level"
        );
        assert_eq!(value["dependents"], json!(["x"]));
    }

    #[test]
    fn sandbox_info_keeps_the_legacy_keys() {
        let info = SandboxInfo {
            id: "sb-1".into(),
            snapshot_tag: "py".into(),
            netns: None,
            guest_addr: "10.0.2.15".into(),
            created_at_unix: 2,
            pid: Some(42),
            memory_limit_mib: None,
            has_branched: false,
            branch_count: 0,
            state: SandboxState::Running,
            image: None,
            mem_mib: None,
            cpus: None,
            spawn: None,
            network: None,
            lifetime: None,
        };
        let value = serde_json::to_value(&info).unwrap();
        for key in [
            "id",
            "snapshot_tag",
            "netns",
            "guest_addr",
            "created_at_unix",
            "pid",
            "memory_limit_mib",
            "has_branched",
            "branch_count",
        ] {
            assert!(value.get(key).is_some(), "missing legacy key {key}");
        }
        assert_eq!(value["netns"], serde_json::Value::Null);
    }
}
