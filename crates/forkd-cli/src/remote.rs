//! `--remote`: the same commands against a daemon's REST API. Each call
//! returns the types the local commands print, so the output is the same
//! either way.

use std::sync::OnceLock;

use anyhow::{anyhow, bail, Result};
use forkd_api::types as api;
use forkd_core::branch::{BranchInfo, Mode};
use forkd_core::fleet::{Child, SandboxView};
use forkd_core::snapinfo::{FileDetail, SnapshotDetail};
use forkd_daemon::client::Client;
use forkd_store::{SnapshotRow, SnapshotStatus};
use serde_json::{json, Value};

static REMOTE: OnceLock<Option<Client>> = OnceLock::new();

/// Sets the daemon to talk to (`--remote`, else `$FORKD_REMOTE`; the token
/// from `$FORKD_TOKEN`). Call once, first thing.
pub fn configure(flag: Option<String>) -> Result<()> {
    let spec = flag.or_else(|| std::env::var("FORKD_REMOTE").ok().filter(|s| !s.is_empty()));
    let client = match spec {
        Some(s) => {
            let token = std::env::var("FORKD_TOKEN").ok().filter(|t| !t.is_empty());
            Some(Client::new(&s, token).map_err(|e| anyhow!("--remote: {e}"))?)
        }
        None => None,
    };
    let _ = REMOTE.set(client);
    Ok(())
}

/// The daemon client when `--remote` is in effect.
pub fn client() -> Option<&'static Client> {
    REMOTE.get().and_then(|c| c.as_ref())
}

/// Refuses commands that only make sense on this host.
pub fn local_only(command: &str) -> Result<()> {
    if client().is_some() {
        bail!("`forkd {command}` runs on this host only; drop --remote (or unset FORKD_REMOTE)");
    }
    Ok(())
}

fn call(c: &Client, method: &str, path: &str, body: Option<Value>) -> Result<Value> {
    let answer = c.call(method, path, body.as_ref())?;
    Ok(answer.json()?)
}

fn parse<T: serde::de::DeserializeOwned>(v: Value) -> Result<T> {
    serde_json::from_value(v).map_err(|e| anyhow!("the daemon sent an unexpected answer: {e}"))
}

fn view(s: api::SandboxInfo) -> SandboxView {
    SandboxView {
        state: serde_json::to_value(s.state)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default(),
        pid: s.pid.unwrap_or(0),
        snapshot: (!s.snapshot_tag.is_empty()).then_some(s.snapshot_tag),
        image: s.image.unwrap_or_else(|| "?".into()),
        mem_mib: s.mem_mib.unwrap_or(0),
        cpus: s.cpus.unwrap_or(0),
        created_at: s.created_at_unix,
        id: s.id,
    }
}

fn status(s: api::SnapshotStatus) -> SnapshotStatus {
    match s {
        api::SnapshotStatus::Writing => SnapshotStatus::Writing,
        api::SnapshotStatus::Ready => SnapshotStatus::Ready,
        api::SnapshotStatus::Failed => SnapshotStatus::Failed,
    }
}

fn row(s: &api::SnapshotInfo) -> SnapshotRow {
    SnapshotRow {
        tag: s.tag.clone(),
        status: status(s.status),
        dir: s.dir.clone().into(),
        parent: s.parent_tag.clone(),
        source: s.branched_from.clone(),
        created_at: s.created_at_unix,
        pause_ms: s.pause_us.map(|us| us as f64 / 1000.0),
        error: s.error.clone(),
    }
}

pub fn list(c: &Client) -> Result<Vec<SandboxView>> {
    let v: Vec<api::SandboxInfo> = parse(call(c, "GET", "/v1/sandboxes", None)?)?;
    Ok(v.into_iter().map(view).collect())
}

pub fn kill(c: &Client, id: &str) -> Result<()> {
    call(c, "DELETE", &format!("/v1/sandboxes/{id}"), None).map(drop)
}

pub fn snapshots(c: &Client) -> Result<Vec<SnapshotRow>> {
    let v: Vec<api::SnapshotInfo> = parse(call(c, "GET", "/v1/snapshots", None)?)?;
    Ok(v.iter().map(row).collect())
}

pub fn detail(c: &Client, tag: &str) -> Result<SnapshotDetail> {
    let d: api::SnapshotDetail =
        parse(call(c, "GET", &format!("/v1/snapshots/{tag}/info"), None)?)?;
    // In the local order: sandboxes, then snapshots.
    let mut dependents: Vec<String> = d.sandboxes.iter().map(|s| format!("sandbox {s}")).collect();
    dependents.extend(d.dependents.iter().map(|t| format!("snapshot {t}")));
    Ok(SnapshotDetail {
        row: row(&d.snapshot),
        chain: d.ancestors.iter().rev().cloned().collect(),
        dependents,
        ram: if d.ram_parent.is_some() {
            "layer"
        } else {
            "full"
        },
        ram_parent: d.ram_parent,
        layer_pages: d.layer_pages,
        files: d
            .files
            .into_iter()
            .map(|f| FileDetail {
                name: f.name,
                size: f.logical_bytes,
                allocated: f.physical_bytes,
            })
            .collect(),
        allocated: d.total_physical_bytes,
        bootable: d.snapshot.bootable,
    })
}

pub fn rmi(c: &Client, tag: &str, force: bool) -> Result<()> {
    let q = if force { "?force=true" } else { "" };
    call(c, "DELETE", &format!("/v1/snapshots/{tag}{q}"), None).map(drop)
}

pub fn spawn(c: &Client, tag: &str, n: usize, no_wait: bool) -> Result<Vec<Child>> {
    if !no_wait {
        // The daemon answers 409 for a snapshot still being written; the
        // CLI's default is to wait for it.
        wait_written(c, tag)?;
    }
    let v: Vec<api::SandboxInfo> = parse(call(
        c,
        "POST",
        "/v1/sandboxes",
        Some(json!({ "snapshot_tag": tag, "n": n })),
    )?)?;
    Ok(v.into_iter()
        .map(|s| {
            let r = s.spawn.unwrap_or(api::SpawnReport {
                ready_ms: 0.0,
                restore_ms: 0.0,
                clock_step_ms: 0,
                from_pool: false,
            });
            Child {
                id: s.id,
                ready_ms: r.ready_ms,
                restore_ms: r.restore_ms,
                clock_step_ms: r.clock_step_ms,
                from_pool: r.from_pool,
            }
        })
        .collect())
}

fn wait_written(c: &Client, tag: &str) -> Result<()> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(600);
    loop {
        let Ok(v) = call(c, "GET", &format!("/v1/snapshots/{tag}/info"), None) else {
            return Ok(()); // the spawn call reports it
        };
        if v["status"] != "writing" || std::time::Instant::now() > deadline {
            return Ok(());
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

pub fn branch(c: &Client, id: &str, tag: &str, mode: Mode, no_wait: bool) -> Result<BranchInfo> {
    let mode_s = match mode {
        Mode::Live => "live",
        Mode::Full => "full",
    };
    let s: api::SnapshotInfo = parse(call(
        c,
        "POST",
        &format!("/v1/sandboxes/{id}/branch"),
        Some(json!({ "tag": tag, "mode": mode_s, "wait": !no_wait })),
    )?)?;
    let report = s.branch.clone();
    Ok(BranchInfo {
        tag: s.tag,
        mode,
        status: status(s.status),
        pause_ms: report.as_ref().map(|r| r.pause_ms).unwrap_or(0.0),
        qemu_downtime_ms: report.as_ref().and_then(|r| r.qemu_downtime_ms),
        ready_ms: report.and_then(|r| r.ready_ms),
    })
}

/// Runs a command through the streaming route, writing its output here as
/// it arrives; returns its exit code and whether it timed out.
pub fn exec(
    c: &Client,
    id: &str,
    req: &forkd_protocol::ExecRequest,
    stdin: Option<Vec<u8>>,
) -> Result<(i64, bool)> {
    use base64::Engine as _;
    use std::io::Write as _;
    let timeout_secs = req
        .timeout_ms
        .map(|ms| ms.div_ceil(1000).max(1))
        .unwrap_or(api::MAX_EXEC_TIMEOUT_SECS);
    let mut body = json!({
        "args": req.argv,
        "timeout_secs": timeout_secs,
        "env": req.env.iter().cloned().collect::<std::collections::BTreeMap<String, String>>(),
    });
    if let Some(cwd) = &req.cwd {
        body["cwd"] = json!(cwd);
    }
    if let Some(input) = stdin {
        body["stdin_b64"] = json!(base64::engine::general_purpose::STANDARD.encode(input));
    }
    let mut pending: Vec<u8> = Vec::new();
    let mut end: Option<api::ExecEvent> = None;
    let mut bad: Option<String> = None;
    c.stream(
        "POST",
        &format!("/v1/sandboxes/{id}/exec/stream"),
        Some(&body),
        &mut |bytes| {
            pending.extend_from_slice(bytes);
            while let Some(nl) = pending.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = pending.drain(..=nl).collect();
                let ev: api::ExecEvent = match serde_json::from_slice(&line) {
                    Ok(ev) => ev,
                    Err(e) => {
                        bad.get_or_insert(e.to_string());
                        continue;
                    }
                };
                match (&ev.stream, &ev.data_b64) {
                    (Some(s), Some(d)) => {
                        let data = base64::engine::general_purpose::STANDARD
                            .decode(d)
                            .unwrap_or_default();
                        let _ = if s == "stderr" {
                            std::io::stderr().write_all(&data)
                        } else {
                            let mut out = std::io::stdout();
                            out.write_all(&data).and_then(|_| out.flush())
                        };
                    }
                    _ => end = Some(ev),
                }
            }
        },
    )?;
    if let Some(e) = bad {
        bail!("the daemon sent a malformed exec stream: {e}");
    }
    match end {
        Some(api::ExecEvent {
            exit_code: Some(code),
            timed_out,
            ..
        }) => Ok((code, timed_out.unwrap_or(false))),
        Some(api::ExecEvent { error: Some(e), .. }) => bail!("exec in `{id}` broke off: {e}"),
        _ => bail!("the exec stream of `{id}` ended without an exit status"),
    }
}

pub fn create(c: &Client, image: &str, mem_mib: u64, cpus: u32) -> Result<SandboxView> {
    let s: api::SandboxInfo = parse(call(
        c,
        "POST",
        "/v1/sandboxes/boot",
        Some(json!({ "image": image, "memory_mib": mem_mib, "vcpus": cpus })),
    )?)?;
    Ok(view(s))
}

pub fn pool(c: &Client, tag: &str, size: usize) -> Result<u32> {
    let p: api::PoolInfo = parse(call(
        c,
        "POST",
        &format!("/v1/snapshots/{tag}/pool"),
        Some(json!({ "size": size })),
    )?)?;
    Ok(p.ready)
}
