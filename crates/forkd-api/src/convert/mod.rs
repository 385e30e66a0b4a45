//! The one place where the operations seam ([`forkd_ops`]) meets the wire:
//! requests and results in both directions (the daemon turns wire requests
//! into seam requests and seam results into wire answers; the client does
//! the reverse), and the wording of hints for API callers.
//!
//! Every conversion that the client undoes is lossless for what forkd's own
//! front ends show, and the round trips are tested here, so that the CLI
//! prints the same bytes with and without `--remote`.

use std::collections::BTreeMap;
use std::time::Duration;

use forkd_ops as ops;

pub use crate::error::{api_hint, api_text};
use crate::error::{ApiError, ErrorBody};
use crate::types as api;

mod guest;
mod transfer;
pub use guest::*;
pub use transfer::*;

/// Every guest with a network has this address (the gateway keeps slirp's).
pub const GUEST_ADDR: &str = "10.0.2.15";

// ---------------------------------------------------------------- errors

/// What a client makes of an error answer: the operation's own error when
/// the body carries one, else one built from the status.
pub fn op_error(status: u16, body: &ErrorBody) -> ops::OpError {
    let kind = body
        .kind
        .as_deref()
        .and_then(kind_of)
        .unwrap_or(match status {
            400 | 401 | 413 => ops::ErrorKind::BadInput,
            403 => ops::ErrorKind::PermissionDenied,
            404 => ops::ErrorKind::NotFound,
            409 => ops::ErrorKind::Conflict,
            422 => ops::ErrorKind::Unprocessable,
            429 | 503 => ops::ErrorKind::Busy,
            _ => ops::ErrorKind::Internal,
        });
    let hint = body
        .hint
        .clone()
        .and_then(|h| serde_json::from_value(h).ok())
        .or((status == 401).then_some(ops::Hint::ProvideToken));
    ops::OpError {
        kind,
        message: body.message.clone().unwrap_or_else(|| body.error.clone()),
        hint,
    }
}

fn kind_of(s: &str) -> Option<ops::ErrorKind> {
    use ops::ErrorKind as K;
    [
        K::BadInput,
        K::NotFound,
        K::Conflict,
        K::Busy,
        K::Unprocessable,
        K::PermissionDenied,
        K::Internal,
    ]
    .into_iter()
    .find(|k| k.as_str() == s)
}

// ---------------------------------------------------------------- states

impl From<ops::SnapshotStatus> for api::SnapshotStatus {
    fn from(s: ops::SnapshotStatus) -> Self {
        match s {
            ops::SnapshotStatus::Writing => Self::Writing,
            ops::SnapshotStatus::Ready => Self::Ready,
            ops::SnapshotStatus::Failed => Self::Failed,
            ops::SnapshotStatus::Broken => Self::Broken,
        }
    }
}

impl From<api::SnapshotStatus> for ops::SnapshotStatus {
    fn from(s: api::SnapshotStatus) -> Self {
        match s {
            api::SnapshotStatus::Writing => Self::Writing,
            api::SnapshotStatus::Ready => Self::Ready,
            api::SnapshotStatus::Failed => Self::Failed,
            api::SnapshotStatus::Broken => Self::Broken,
        }
    }
}

impl From<ops::SandboxState> for api::SandboxState {
    fn from(s: ops::SandboxState) -> Self {
        match s {
            ops::SandboxState::Starting => Self::Starting,
            ops::SandboxState::Running => Self::Running,
            ops::SandboxState::Pooled => Self::Pooled,
            ops::SandboxState::Dead => Self::Dead,
        }
    }
}

impl From<api::SandboxState> for ops::SandboxState {
    fn from(s: api::SandboxState) -> Self {
        match s {
            api::SandboxState::Starting => Self::Starting,
            api::SandboxState::Running => Self::Running,
            api::SandboxState::Pooled => Self::Pooled,
            api::SandboxState::Dead => Self::Dead,
        }
    }
}

fn mode_to_wire(m: ops::BranchMode) -> api::BranchMode {
    match m {
        ops::BranchMode::Live => api::BranchMode::Live,
        ops::BranchMode::Full => api::BranchMode::Full,
    }
}

fn mode_from_wire(m: api::BranchMode) -> ops::BranchMode {
    match m {
        api::BranchMode::Full => ops::BranchMode::Full,
        api::BranchMode::Diff | api::BranchMode::Live => ops::BranchMode::Live,
    }
}

// ---------------------------------------------------------------- sandboxes

/// A sandbox on the wire (`spawn` and `memory_limit_mib` are the caller's).
pub fn sandbox_to_wire(s: &ops::Sandbox) -> api::SandboxInfo {
    api::SandboxInfo {
        id: s.id.clone(),
        snapshot_tag: s.snapshot.clone().unwrap_or_default(),
        netns: None,
        guest_addr: GUEST_ADDR.to_string(),
        created_at_unix: s.created_at,
        pid: Some(s.pid),
        memory_limit_mib: None,
        has_branched: s.branches > 0,
        branch_count: s.branches,
        state: s.state.into(),
        image: Some(s.image.clone()),
        mem_mib: Some(s.mem_mib),
        cpus: Some(s.cpus),
        spawn: None,
        network: Some(network_to_wire(&s.network)),
        lifetime: lifetime_to_wire(&s.lifetime),
    }
}

/// A sandbox's lifetime on the wire (absent when it has none).
pub fn lifetime_to_wire(l: &ops::Lifetime) -> Option<api::LifetimeInfo> {
    (*l != ops::Lifetime::default()).then(|| api::LifetimeInfo {
        ends_at_ms: l.ends_at_ms,
        idle_timeout_ms: l.idle_timeout_ms,
        last_active_ms: l.last_active_ms,
        labels: l.labels.clone(),
        env: l.env.iter().cloned().collect(),
        cwd: l.cwd.clone(),
        user: l.user.clone(),
    })
}

/// A sandbox's lifetime from the wire. The environment comes sorted by
/// name (the order of distinct names does not change what a command sees).
pub fn lifetime_from_wire(l: Option<api::LifetimeInfo>) -> ops::Lifetime {
    l.map(|l| ops::Lifetime {
        ends_at_ms: l.ends_at_ms,
        idle_timeout_ms: l.idle_timeout_ms,
        last_active_ms: l.last_active_ms,
        labels: l.labels,
        env: l.env.into_iter().collect(),
        cwd: l.cwd,
        user: l.user,
    })
    .unwrap_or_default()
}

/// The lifetime fields of a boot or spawn as the seam's settings.
pub fn settings_from_wire(
    ttl_ms: Option<u64>,
    idle_timeout_ms: Option<u64>,
    labels: &BTreeMap<String, String>,
    env: &BTreeMap<String, String>,
    cwd: Option<&str>,
) -> ops::Settings {
    ops::Settings {
        ttl: ttl_ms.map(Duration::from_millis),
        idle_timeout: idle_timeout_ms.map(Duration::from_millis),
        labels: labels.clone(),
        env: env.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        cwd: cwd.map(str::to_string),
        user: None,
        access_token: None,
    }
}

/// The seam's settings as the lifetime fields of a boot or spawn.
#[allow(clippy::type_complexity)]
pub fn settings_to_wire(
    s: &ops::Settings,
) -> (
    Option<u64>,
    Option<u64>,
    BTreeMap<String, String>,
    BTreeMap<String, String>,
    Option<String>,
) {
    let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
    (
        s.ttl.map(ms),
        s.idle_timeout.map(ms),
        s.labels.clone(),
        s.env.iter().cloned().collect(),
        s.cwd.clone(),
    )
}

fn mode_to_wire_net(m: ops::Network) -> api::NetworkMode {
    match m {
        ops::Network::Default => api::NetworkMode::Default,
        ops::Network::None => api::NetworkMode::None,
        ops::Network::Slirp => api::NetworkMode::Slirp,
    }
}

fn mode_from_wire_net(m: api::NetworkMode) -> ops::Network {
    match m {
        api::NetworkMode::Default => ops::Network::Default,
        api::NetworkMode::None => ops::Network::None,
        api::NetworkMode::Slirp => ops::Network::Slirp,
    }
}

/// A network policy on the wire.
pub fn network_to_wire(n: &ops::NetworkPolicy) -> api::NetworkInfo {
    api::NetworkInfo {
        mode: mode_to_wire_net(n.mode),
        allow_out: n.allow_out.clone(),
        deny_out: n.deny_out.clone(),
    }
}

/// A network policy from the wire.
pub fn network_from_wire(n: api::NetworkInfo) -> ops::NetworkPolicy {
    ops::NetworkPolicy {
        mode: mode_from_wire_net(n.mode),
        allow_out: n.allow_out,
        deny_out: n.deny_out,
    }
}

/// A sandbox from the wire.
pub fn sandbox_from_wire(s: api::SandboxInfo) -> ops::Sandbox {
    ops::Sandbox {
        state: s.state.into(),
        pid: s.pid.unwrap_or(0),
        snapshot: (!s.snapshot_tag.is_empty()).then_some(s.snapshot_tag),
        image: s.image.unwrap_or_else(|| "?".into()),
        mem_mib: s.mem_mib.unwrap_or(0),
        cpus: s.cpus.unwrap_or(0),
        created_at: s.created_at_unix,
        branches: s.branch_count,
        network: s.network.map(network_from_wire).unwrap_or_default(),
        lifetime: lifetime_from_wire(s.lifetime),
        access_token: None,
        id: s.id,
    }
}

/// A spawned child on the wire.
pub fn child_to_wire(c: &ops::Child) -> api::SandboxInfo {
    let mut s = sandbox_to_wire(&c.sandbox);
    s.spawn = Some(api::SpawnReport {
        ready_ms: c.ready_ms,
        restore_ms: c.restore_ms,
        clock_step_ms: c.clock_step_ms,
        from_pool: c.from_pool,
    });
    s
}

/// A spawned child from the wire.
pub fn child_from_wire(mut s: api::SandboxInfo) -> ops::Child {
    let r = s.spawn.take().unwrap_or(api::SpawnReport {
        ready_ms: 0.0,
        restore_ms: 0.0,
        clock_step_ms: 0,
        from_pool: false,
    });
    ops::Child {
        sandbox: sandbox_from_wire(s),
        ready_ms: r.ready_ms,
        restore_ms: r.restore_ms,
        clock_step_ms: r.clock_step_ms,
        from_pool: r.from_pool,
    }
}

/// `POST /v1/sandboxes/boot` as a create request.
pub fn create_from_wire(b: &api::BootRequest) -> ops::CreateRequest {
    let image = match &b.container_image {
        // Always a registry reference, however it is spelt.
        Some(r) if r.starts_with(ops::image::REGISTRY_TRANSPORT) => r.clone(),
        Some(r) => format!("{}{r}", ops::image::REGISTRY_TRANSPORT),
        None => b.image.name().to_string(),
    };
    ops::CreateRequest {
        image: Some(image),
        insecure_registry: b.insecure_registry,
        mem_mib: b.memory_mib,
        cpus: b.vcpus,
        accel: b.accel.map(|a| match a {
            api::Accel::Auto => ops::Accel::Auto,
            api::Accel::Kvm => ops::Accel::Kvm,
            api::Accel::Tcg => ops::Accel::Tcg,
        }),
        network: b.network.map(mode_from_wire_net),
        allow_out: b.allow_out.clone(),
        deny_out: b.deny_out.clone(),
        memory_limit_mib: b.memory_limit_mib,
        cpu_quota_pct: b.cpu_quota_pct,
        tcg_tb_mib: b.tcg_tb_mib,
        huge_pages: b.huge_pages,
        prealloc: b.prealloc,
        guest: ops::GuestFiles::default(),
        snapshot_as: b.tag.clone(),
        settings: settings_from_wire(
            b.ttl_ms,
            b.idle_timeout_ms,
            &b.labels,
            &b.env,
            b.cwd.as_deref(),
        ),
    }
}

/// A create request as `POST /v1/sandboxes/boot`. Host files (a kernel, an
/// agent, an image path) are this host's: a daemon elsewhere cannot use them.
pub fn create_to_wire(r: &ops::CreateRequest) -> Result<api::BootRequest, ops::OpError> {
    if !r.guest.is_empty() {
        return Err(ops::OpError::bad_input(
            "a guest kernel, modules or agent names a file on this host, which a daemon cannot use; drop the option or run without a daemon",
        ));
    }
    let mut container_image = None;
    let image = match r.image.as_deref() {
        None | Some("busybox") => api::Image::Busybox,
        Some("debian-python") => api::Image::DebianPython,
        Some("none") => api::Image::None,
        Some(other) => match ops::image::image_kind(other) {
            ops::image::ImageKind::Registry => {
                container_image = Some(other.to_string());
                api::Image::Busybox
            }
            ops::image::ImageKind::HostContainer => {
                return Err(ops::OpError::bad_input(format!(
                    "image {other:?} is a container image in a file on this host, which a daemon cannot read; push it to a registry and name it there, or run without a daemon"
                )))
            }
            ops::image::ImageKind::Other => {
                return Err(ops::OpError::bad_input(format!(
                    "image {other:?} is not one a daemon boots (busybox, debian-python, none or a registry reference): an image file or an image built here is used on this host only; run without a daemon"
                )))
            }
        },
    };
    let (ttl_ms, idle_timeout_ms, labels, env, cwd) = settings_to_wire(&r.settings);
    Ok(api::BootRequest {
        ttl_ms,
        idle_timeout_ms,
        labels,
        env,
        cwd,
        image,
        memory_mib: r.mem_mib,
        vcpus: r.cpus,
        tag: r.snapshot_as.clone(),
        accel: r.accel.map(|a| match a {
            ops::Accel::Auto => api::Accel::Auto,
            ops::Accel::Kvm => api::Accel::Kvm,
            ops::Accel::Tcg => api::Accel::Tcg,
        }),
        network: r.network.map(mode_to_wire_net),
        allow_out: r.allow_out.clone(),
        deny_out: r.deny_out.clone(),
        memory_limit_mib: r.memory_limit_mib,
        cpu_quota_pct: r.cpu_quota_pct,
        tcg_tb_mib: r.tcg_tb_mib,
        huge_pages: r.huge_pages,
        prealloc: r.prealloc,
        insecure_registry: r.insecure_registry && container_image.is_some(),
        container_image,
    })
}

// ---------------------------------------------------------------- exec

/// An API exec as the seam's command and its stdin bytes. The timeout is
/// the route's (`timeout_secs`, 30 s when absent, as legacy clients expect).
pub fn exec_from_wire(r: api::ExecRequest) -> Result<(ops::ExecSpec, Option<Vec<u8>>), ApiError> {
    let stdin = match &r.stdin_b64 {
        Some(b) => Some(crate::validate::base64("stdin_b64", b)?),
        None => None,
    };
    Ok((
        ops::ExecSpec {
            argv: r.args,
            env: r.env.into_iter().collect(),
            cwd: r.cwd,
            timeout: Some(Duration::from_secs(r.timeout_secs)),
        },
        stdin,
    ))
}

/// A command as an API exec. Without a timeout it may run for the route's
/// longest ([`api::MAX_EXEC_TIMEOUT_SECS`]).
pub fn exec_to_wire(spec: &ops::ExecSpec, stdin: Option<&[u8]>) -> api::ExecRequest {
    use base64::Engine as _;
    api::ExecRequest {
        args: spec.argv.clone(),
        timeout_secs: spec
            .timeout
            .map(|t| t.as_millis().div_ceil(1000).max(1) as u64)
            .unwrap_or(api::MAX_EXEC_TIMEOUT_SECS)
            .min(api::MAX_EXEC_TIMEOUT_SECS),
        env: spec.env.iter().cloned().collect(),
        cwd: spec.cwd.clone(),
        stdin_b64: stdin.map(|b| crate::validate::BASE64.encode(b)),
    }
}

/// The last line of a streaming exec.
pub fn exit_to_wire(o: &ops::ExecOutcome) -> api::ExecEvent {
    api::ExecEvent {
        stream: None,
        data_b64: None,
        exit_code: Some(i64::from(o.exit_code())),
        timed_out: Some(o.timed_out),
        signal: o.signal,
        duration_ms: Some(o.duration_ms),
        error: None,
    }
}

/// How a command ended, from the last line of a streaming exec.
pub fn exit_from_wire(e: &api::ExecEvent) -> Option<ops::ExecOutcome> {
    let code = e.exit_code?;
    let timed_out = e.timed_out.unwrap_or(false);
    Some(ops::ExecOutcome {
        code: (e.signal.is_none() && !timed_out).then_some(code as i32),
        signal: e.signal,
        timed_out,
        duration_ms: e.duration_ms.unwrap_or(0),
    })
}

// ---------------------------------------------------------------- snapshots

/// A snapshot on the wire (`bootable` means ready here; details refine it).
pub fn snapshot_to_wire(s: &ops::Snapshot) -> api::SnapshotInfo {
    let pause_us = s.pause_ms.map(|ms| (ms * 1000.0).round() as u64);
    api::SnapshotInfo {
        tag: s.tag.clone(),
        dir: s.dir.display().to_string(),
        created_at_unix: s.created_at,
        branched_from: s.source.clone(),
        pause_ms: s.pause_ms.map(|ms| ms.ceil() as u64),
        pause_us,
        status: s.status.into(),
        bootable: s.status == ops::SnapshotStatus::Ready,
        parent_tag: s.parent.clone(),
        error: s.error.clone(),
        branch: None,
    }
}

/// A snapshot from the wire.
pub fn snapshot_from_wire(s: &api::SnapshotInfo) -> ops::Snapshot {
    ops::Snapshot {
        tag: s.tag.clone(),
        status: s.status.into(),
        dir: s.dir.clone().into(),
        parent: s.parent_tag.clone(),
        source: s.branched_from.clone(),
        created_at: s.created_at_unix,
        pause_ms: s
            .pause_us
            .map(|us| us as f64 / 1000.0)
            .or(s.pause_ms.map(|ms| ms as f64)),
        error: s.error.clone(),
    }
}

/// A snapshot's details on the wire.
pub fn detail_to_wire(d: &ops::SnapshotDetail) -> api::SnapshotDetail {
    let size = |name: &str| d.files.iter().find(|f| f.name == name);
    let mut snapshot = snapshot_to_wire(&d.snapshot);
    snapshot.bootable = d.bootable;
    api::SnapshotDetail {
        snapshot,
        chain_depth: d.chain.len(),
        // Root first, direct parent last.
        ancestors: d.chain.iter().rev().cloned().collect(),
        dependents: d.dependents.snapshots.clone(),
        sandboxes: d.dependents.sandboxes.clone(),
        files: d
            .files
            .iter()
            .map(|f| api::SnapshotFile {
                name: f.name.clone(),
                logical_bytes: f.size,
                physical_bytes: f.allocated,
            })
            .collect(),
        memory_logical_bytes: size("ram.img").map(|f| f.size).unwrap_or(0),
        memory_physical_bytes: ["ram.img", "ram.map"]
            .iter()
            .filter_map(|n| size(n))
            .map(|f| f.allocated)
            .sum(),
        vmstate_bytes: size("device.state").map(|f| f.size).unwrap_or(0),
        total_logical_bytes: d.files.iter().map(|f| f.size).sum(),
        total_physical_bytes: d.allocated,
        ram_parent: d.ram_parent.clone(),
        layer_pages: d.layer_pages,
        network: d.network.as_ref().map(network_to_wire),
        ram_layers: d.layers.ram,
        disk_layers: d.layers.disk,
    }
}

/// A snapshot's details from the wire.
pub fn detail_from_wire(d: api::SnapshotDetail) -> ops::SnapshotDetail {
    ops::SnapshotDetail {
        snapshot: snapshot_from_wire(&d.snapshot),
        chain: d.ancestors.iter().rev().cloned().collect(),
        dependents: ops::Dependents {
            sandboxes: d.sandboxes,
            snapshots: d.dependents,
        },
        ram_parent: d.ram_parent,
        layer_pages: d.layer_pages,
        files: d
            .files
            .into_iter()
            .map(|f| ops::FileSize {
                name: f.name,
                size: f.logical_bytes,
                allocated: f.physical_bytes,
            })
            .collect(),
        allocated: d.total_physical_bytes,
        bootable: d.snapshot.bootable,
        network: d.network.map(network_from_wire),
        layers: ops::Layers {
            ram: d.ram_layers,
            disk: d.disk_layers,
        },
    }
}

fn chain_size_to_wire(c: &ops::ChainSize) -> api::ChainSize {
    api::ChainSize {
        ram_layers: c.layers.ram,
        disk_layers: c.layers.disk,
        bytes: c.bytes,
    }
}

fn chain_size_from_wire(c: &api::ChainSize) -> ops::ChainSize {
    ops::ChainSize {
        layers: ops::Layers {
            ram: c.ram_layers,
            disk: c.disk_layers,
        },
        bytes: c.bytes,
    }
}

/// A compaction on the wire.
pub fn compacted_to_wire(c: &ops::Compacted) -> api::CompactResponse {
    api::CompactResponse {
        tag: c.tag.clone(),
        compacted: c.compacted,
        before: chain_size_to_wire(&c.before),
        after: chain_size_to_wire(&c.after),
        released: c.released.clone(),
    }
}

/// A compaction from the wire.
pub fn compacted_from_wire(c: api::CompactResponse) -> ops::Compacted {
    ops::Compacted {
        tag: c.tag,
        compacted: c.compacted,
        before: chain_size_from_wire(&c.before),
        after: chain_size_from_wire(&c.after),
        released: c.released,
    }
}

// ---------------------------------------------------------------- branch

/// A branch request from the wire (`id` from the path).
pub fn branch_from_wire(id: &str, r: &api::BranchRequest) -> ops::BranchRequest {
    ops::BranchRequest {
        source: id.to_string(),
        tag: r.tag.clone(),
        mode: (r.mode.is_some() || r.diff || r.live).then(|| mode_from_wire(r.effective_mode())),
        wait: r.wait,
        expect_parent: r.parent_tag.clone(),
    }
}

/// A branch request on the wire.
pub fn branch_to_wire(r: &ops::BranchRequest) -> api::BranchRequest {
    api::BranchRequest {
        tag: r.tag.clone(),
        mode: r.mode.map(mode_to_wire),
        wait: r.wait,
        parent_tag: r.expect_parent.clone(),
        ..api::BranchRequest::default()
    }
}

/// A branch's outcome on the wire: the snapshot with its report.
pub fn branch_outcome_to_wire(o: &ops::BranchOutcome) -> api::SnapshotInfo {
    let mut s = snapshot_to_wire(&o.snapshot);
    s.branch = Some(api::BranchReport {
        mode: mode_to_wire(o.mode),
        pause_ms: o.pause_ms,
        qemu_downtime_ms: o.qemu_downtime_ms,
        ready_ms: o.ready_ms,
        ram_copied_bytes: o.ram_copied,
    });
    s
}

/// A branch's outcome from the wire.
pub fn branch_outcome_from_wire(s: &api::SnapshotInfo) -> ops::BranchOutcome {
    let r = s.branch.clone();
    ops::BranchOutcome {
        snapshot: snapshot_from_wire(s),
        mode: r
            .as_ref()
            .map(|r| mode_from_wire(r.mode))
            .unwrap_or(ops::BranchMode::Live),
        pause_ms: r.as_ref().map(|r| r.pause_ms).unwrap_or(0.0),
        qemu_downtime_ms: r.as_ref().and_then(|r| r.qemu_downtime_ms),
        ready_ms: r.as_ref().and_then(|r| r.ready_ms),
        ram_copied: r.and_then(|r| r.ram_copied_bytes),
    }
}

// ---------------------------------------------------------------- spawn, pool

/// A spawn request from the wire.
pub fn spawn_from_wire(r: &api::SpawnRequest) -> ops::SpawnRequest {
    ops::SpawnRequest {
        tag: r.snapshot_tag.clone(),
        n: r.n,
        parallel: r.parallel,
        pool: r.refill_pool,
        wait: r.wait,
        on_failure: Some(match r.on_failure {
            api::PartialFailure::Kill => ops::PartialFailure::Kill,
            api::PartialFailure::Keep => ops::PartialFailure::Keep,
        }),
        network: r.network.map(mode_from_wire_net),
        allow_out: r.allow_out.clone(),
        deny_out: r.deny_out.clone(),
        memory_limit_mib: r.memory_limit_mib,
        cpu_quota_pct: r.cpu_quota_pct,
        settings: settings_from_wire(
            r.ttl_ms,
            r.idle_timeout_ms,
            &r.labels,
            &r.env,
            r.cwd.as_deref(),
        ),
        id: None,
        huge_pages: r.hugepages.then_some(true),
    }
}

/// A spawn request on the wire. A request that leaves the partial-failure
/// policy open gets the seam's default, not the route's.
pub fn spawn_to_wire(r: &ops::SpawnRequest) -> api::SpawnRequest {
    let on_failure = r.on_failure.unwrap_or(ops::policy::PARTIAL_FAILURE);
    let (ttl_ms, idle_timeout_ms, labels, env, cwd) = settings_to_wire(&r.settings);
    api::SpawnRequest {
        ttl_ms,
        idle_timeout_ms,
        labels,
        env,
        cwd,
        snapshot_tag: r.tag.clone(),
        n: r.n,
        per_child_netns: false,
        memory_limit_mib: r.memory_limit_mib,
        prewarm: false,
        live_fork: false,
        hugepages: r.huge_pages.unwrap_or(false),
        use_pool: false,
        wait: r.wait,
        on_failure: match on_failure {
            ops::PartialFailure::Kill => api::PartialFailure::Kill,
            ops::PartialFailure::Keep => api::PartialFailure::Keep,
        },
        parallel: r.parallel,
        refill_pool: r.pool,
        network: r.network.map(mode_to_wire_net),
        allow_out: r.allow_out.clone(),
        deny_out: r.deny_out.clone(),
        cpu_quota_pct: r.cpu_quota_pct,
    }
}

/// A pool's state on the wire.
pub fn pool_to_wire(tag: &str, p: &ops::PoolStatus) -> api::PoolInfo {
    api::PoolInfo {
        tag: tag.to_string(),
        size: p.size as u32,
        ready: p.ready as u32,
        started: p.started as u32,
    }
}

/// A pool's state from the wire.
pub fn pool_from_wire(p: &api::PoolInfo) -> ops::PoolStatus {
    ops::PoolStatus {
        size: p.size as usize,
        started: p.started as usize,
        ready: p.ready as usize,
    }
}

/// What killing every sandbox did, on the wire.
pub fn killed_all_to_wire(k: &ops::KilledAll) -> api::KillAllResponse {
    api::KillAllResponse {
        killed: k.killed.clone(),
        failed: k
            .failed
            .iter()
            .map(|(id, e)| api::KillFailure {
                id: id.clone(),
                error: ApiError::Op(e.clone()).body(),
            })
            .collect(),
        orphans: k.orphans.clone(),
    }
}

/// What killing every sandbox did, from the wire.
pub fn killed_all_from_wire(k: api::KillAllResponse) -> ops::KilledAll {
    ops::KilledAll {
        killed: k.killed,
        failed: k
            .failed
            .into_iter()
            .map(|f| (f.id, op_error(500, &f.error)))
            .collect(),
        orphans: k.orphans,
    }
}

/// A prune on the wire.
pub fn pruned_to_wire(p: &ops::Pruned) -> api::PruneResponse {
    api::PruneResponse {
        removed: p.removed.clone(),
        kept: p
            .kept
            .iter()
            .map(|k| api::KeptSnapshot {
                tag: k.tag.clone(),
                sandboxes: k.dependents.sandboxes.clone(),
                snapshots: k.dependents.snapshots.clone(),
            })
            .collect(),
    }
}

/// A prune from the wire.
pub fn pruned_from_wire(p: api::PruneResponse) -> ops::Pruned {
    ops::Pruned {
        removed: p.removed,
        kept: p
            .kept
            .into_iter()
            .map(|k| ops::KeptSnapshot {
                tag: k.tag,
                dependents: ops::Dependents {
                    sandboxes: k.sandboxes,
                    snapshots: k.snapshots,
                },
            })
            .collect(),
    }
}

/// A collection on the wire.
pub fn gc_to_wire(g: &ops::GcReport) -> api::GcResponse {
    api::GcResponse {
        removed: g.removed.clone(),
        freed_bytes: g.freed_bytes,
        kept: g.kept as u64,
    }
}

/// A collection from the wire.
pub fn gc_from_wire(g: api::GcResponse) -> ops::GcReport {
    ops::GcReport {
        removed: g.removed,
        freed_bytes: g.freed_bytes,
        kept: g.kept as usize,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn housekeeping_results_round_trip() {
        let k = ops::KilledAll {
            killed: vec!["sb-1".into()],
            failed: vec![("sb-2".into(), ops::OpError::no_sandbox("sb-2"))],
            orphans: vec![42],
        };
        let wire = serde_json::to_value(killed_all_to_wire(&k)).unwrap();
        let back = killed_all_from_wire(serde_json::from_value(wire).unwrap());
        assert_eq!(back, k);
        let p = ops::Pruned {
            removed: vec!["a".into(), "b".into()],
            kept: vec![ops::KeptSnapshot {
                tag: "c".into(),
                dependents: ops::Dependents {
                    sandboxes: vec!["sb-1".into()],
                    snapshots: vec![],
                },
            }],
        };
        assert_eq!(pruned_from_wire(pruned_to_wire(&p)), p);
        let g = ops::GcReport {
            removed: vec!["x.ram".into()],
            freed_bytes: 7,
            kept: 2,
        };
        assert_eq!(gc_from_wire(gc_to_wire(&g)), g);
        for s in ops::SnapshotStatus::ALL {
            assert_eq!(ops::SnapshotStatus::from(api::SnapshotStatus::from(*s)), *s);
        }
        for s in ops::SandboxState::ALL {
            assert_eq!(ops::SandboxState::from(api::SandboxState::from(*s)), *s);
        }
    }

    fn sandbox() -> ops::Sandbox {
        ops::Sandbox {
            id: "sb-1".into(),
            state: ops::SandboxState::Pooled,
            pid: 42,
            snapshot: Some("warm".into()),
            image: "busybox (from warm)".into(),
            mem_mib: 512,
            cpus: 2,
            created_at: 9,
            branches: 3,
            network: ops::NetworkPolicy {
                mode: ops::Network::None,
                allow_out: vec!["pypi.org".into()],
                deny_out: vec!["10.0.0.0/8".into()],
            },
            lifetime: ops::Lifetime {
                ends_at_ms: Some(1_764_000_000_123),
                idle_timeout_ms: Some(1500),
                last_active_ms: 1_763_999_999_000,
                labels: [("team".to_string(), "a".to_string())].into(),
                env: vec![("A".into(), "1".into()), ("B".into(), "2".into())],
                cwd: Some("/work".into()),
                user: Some("app".into()),
            },
            access_token: None,
        }
    }

    fn snapshot() -> ops::Snapshot {
        ops::Snapshot {
            tag: "kid".into(),
            status: ops::SnapshotStatus::Writing,
            dir: "/s/kid".into(),
            parent: Some("warm".into()),
            source: Some("sb-1".into()),
            created_at: 7,
            pause_ms: Some(ops::Snapshot::pause_to_us(5.123_456)),
            error: None,
        }
    }

    #[test]
    fn sandboxes_and_children_survive_the_wire() {
        let s = sandbox();
        assert_eq!(sandbox_from_wire(sandbox_to_wire(&s)), s);
        let mut bare = sandbox();
        bare.lifetime = ops::Lifetime::default();
        assert!(sandbox_to_wire(&bare).lifetime.is_none());
        assert_eq!(sandbox_from_wire(sandbox_to_wire(&bare)), bare);
        let c = ops::Child {
            sandbox: s,
            ready_ms: 1.5,
            restore_ms: 0.25,
            clock_step_ms: -3,
            from_pool: true,
        };
        assert_eq!(child_from_wire(child_to_wire(&c)), c);
    }

    #[test]
    fn snapshots_details_and_branches_survive_the_wire() {
        let s = snapshot();
        assert_eq!(snapshot_from_wire(&snapshot_to_wire(&s)), s);
        let d = ops::SnapshotDetail {
            snapshot: s.clone(),
            chain: vec!["warm".into(), "root".into()],
            dependents: ops::Dependents {
                sandboxes: vec!["sb-2".into()],
                snapshots: vec!["grandkid".into()],
            },
            ram_parent: Some("warm".into()),
            layer_pages: Some(12),
            files: vec![ops::FileSize {
                name: "ram.img".into(),
                size: 100,
                allocated: 10,
            }],
            allocated: 10,
            bootable: false,
            network: Some(ops::NetworkPolicy {
                mode: ops::Network::Slirp,
                ..Default::default()
            }),
            layers: ops::Layers { ram: 3, disk: 2 },
        };
        let wire = detail_to_wire(&d);
        assert_eq!(wire.ancestors, ["root", "warm"]);
        assert_eq!((wire.ram_layers, wire.disk_layers), (3, 2));
        assert_eq!(detail_from_wire(wire), d);
        let c = ops::Compacted {
            tag: "leaf".into(),
            compacted: true,
            before: ops::ChainSize {
                layers: ops::Layers { ram: 3, disk: 3 },
                bytes: 900,
            },
            after: ops::ChainSize {
                layers: ops::Layers { ram: 1, disk: 1 },
                bytes: 700,
            },
            released: vec!["warm".into(), "root".into()],
        };
        assert_eq!(compacted_from_wire(compacted_to_wire(&c)), c);
        let o = ops::BranchOutcome {
            snapshot: s,
            mode: ops::BranchMode::Full,
            pause_ms: 3.25,
            qemu_downtime_ms: Some(2.0),
            ready_ms: Some(40.5),
            ram_copied: Some(4096),
        };
        assert_eq!(branch_outcome_from_wire(&branch_outcome_to_wire(&o)), o);
    }

    #[test]
    fn requests_survive_the_wire_and_keep_their_defaults_open() {
        let b = ops::BranchRequest {
            source: "sb-1".into(),
            tag: None,
            mode: None,
            wait: Some(false),
            expect_parent: Some("warm".into()),
        };
        assert_eq!(branch_from_wire("sb-1", &branch_to_wire(&b)), b);
        let c = ops::CreateRequest {
            image: Some("debian-python".into()),
            mem_mib: Some(1024),
            accel: Some(ops::Accel::Tcg),
            snapshot_as: Some("t".into()),
            allow_out: vec!["*.github.com".into()],
            deny_out: vec!["1.2.3.4".into()],
            memory_limit_mib: Some(700),
            cpu_quota_pct: Some(150),
            network: Some(ops::Network::None),
            settings: ops::Settings {
                ttl: Some(Duration::from_millis(90_500)),
                idle_timeout: Some(Duration::from_secs(30)),
                labels: [("k".to_string(), "v".to_string())].into(),
                env: vec![("A".into(), "1".into())],
                cwd: Some("/srv".into()),
                user: None,
                access_token: None,
            },
            ..Default::default()
        };
        assert_eq!(create_from_wire(&create_to_wire(&c).unwrap()), c);
        let mut local = c.clone();
        local.image = Some("/tmp/root.ext4".into());
        assert!(create_to_wire(&local).is_err());
        // A registry reference travels as container_image and comes back
        // spelt with its transport; an image in a file on this host does not
        // travel.
        let mut remote = c.clone();
        remote.image = Some("127.0.0.1:5000/team/app:v1".into());
        remote.insecure_registry = true;
        let wire = create_to_wire(&remote).unwrap();
        assert_eq!(
            wire.container_image.as_deref(),
            Some("127.0.0.1:5000/team/app:v1")
        );
        assert!(wire.insecure_registry);
        let back = create_from_wire(&wire);
        assert_eq!(
            back.image.as_deref(),
            Some("docker://127.0.0.1:5000/team/app:v1")
        );
        assert!(back.insecure_registry);
        remote.image = Some("oci-archive:/tmp/app.tar".into());
        let e = create_to_wire(&remote).unwrap_err();
        assert!(e.message.contains("push it to a registry"), "{e:?}");
        let mut s = ops::SpawnRequest::new("warm", 3);
        s.wait = Some(false);
        s.on_failure = Some(ops::PartialFailure::Keep);
        assert_eq!(spawn_from_wire(&spawn_to_wire(&s)), s);
        s.network = Some(ops::Network::None);
        s.allow_out = Some(vec![]);
        s.deny_out = Some(vec!["evil.example".into()]);
        s.memory_limit_mib = Some(900);
        s.cpu_quota_pct = Some(50);
        s.settings = c.settings.clone();
        assert_eq!(spawn_from_wire(&spawn_to_wire(&s)), s);
        let spec = ops::ExecSpec {
            argv: vec!["true".into()],
            env: vec![("A".into(), "1".into())],
            cwd: Some("/tmp".into()),
            timeout: Some(Duration::from_secs(5)),
        };
        let (back, stdin) = exec_from_wire(exec_to_wire(&spec, Some(b"in"))).unwrap();
        assert_eq!((back, stdin), (spec, Some(b"in".to_vec())));
    }

    #[test]
    fn exits_survive_the_wire() {
        for o in [
            ops::ExecOutcome {
                code: Some(3),
                signal: None,
                timed_out: false,
                duration_ms: 5,
            },
            ops::ExecOutcome {
                code: None,
                signal: Some(9),
                timed_out: false,
                duration_ms: 5,
            },
        ] {
            assert_eq!(exit_from_wire(&exit_to_wire(&o)), Some(o));
        }
        let t = exit_from_wire(&exit_to_wire(&ops::ExecOutcome {
            code: None,
            signal: Some(9),
            timed_out: true,
            duration_ms: 1,
        }))
        .unwrap();
        assert_eq!((t.timed_out, t.exit_code()), (true, 124));
    }

    #[test]
    fn operation_errors_keep_kind_message_and_hint_across_the_wire() {
        let e = ops::OpError::no_snapshot("py");
        let api = ApiError::from(e.clone());
        assert_eq!(api.status(), 404);
        assert_eq!(
            api.to_string(),
            "no snapshot `py`; GET /v1/snapshots lists them"
        );
        assert_eq!(op_error(api.status(), &api.body()), e);
        // An error of the API layer itself (no kind) maps by status.
        let legacy = ApiError::field("n", "out of range");
        let back = op_error(legacy.status(), &legacy.body());
        assert_eq!(back.kind, ops::ErrorKind::BadInput);
        assert_eq!(back.message, "invalid `n`: out of range");
    }
}
