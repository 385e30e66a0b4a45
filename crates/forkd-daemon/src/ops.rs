//! The operations behind the routes: blocking calls into the fleet, one per
//! `operation_id` of [`forkd_api::routes::ROUTES`]. HTTP is not here; the
//! server decodes, authorizes and limits, then calls [`Daemon::dispatch`]
//! on a blocking thread.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use forkd_api::types::*;
use forkd_api::{decode_json, decode_query, ApiError};
use forkd_core::branch::{Mode, WriterLaunch};
use forkd_core::{BootOptions, CoreError, Env, ErrorKind, Fleet};
use forkd_store::SnapshotRow;
use forkd_vm::Vm;
use serde::Serialize;
use serde_json::Value;

/// What an operation answers.
pub enum Reply {
    Json(u16, Value),
    Text(u16, &'static str, String),
    Empty(u16),
    /// 200 with `application/x-ndjson` lines as they are produced.
    Stream(tokio::sync::mpsc::Receiver<Vec<u8>>),
}

impl Reply {
    fn json(status: u16, v: impl Serialize) -> Reply {
        Reply::Json(status, serde_json::to_value(v).expect("replies serialise"))
    }

    pub fn status(&self) -> u16 {
        match self {
            Reply::Json(s, _) | Reply::Text(s, _, _) | Reply::Empty(s) => *s,
            Reply::Stream(_) => 200,
        }
    }
}

/// One agent connection to a sandbox, shared by concurrent calls (the
/// protocol multiplexes requests), dropped when idle so that the CLI can
/// connect too (the agent serves one client at a time).
struct Session {
    vm: Vm,
    last_used: Mutex<Instant>,
}

/// How long an unused agent session is kept open.
const SESSION_IDLE: Duration = Duration::from_secs(2);

/// The daemon's state: the fleet plus what only a long-lived process has.
pub struct Daemon {
    pub fleet: Fleet,
    pub env: Env,
    pub metrics: Arc<forkd_api::metrics::Metrics>,
    /// This binary, for detached branch writers that survive a restart.
    pub exe: PathBuf,
    sessions: Mutex<HashMap<String, Arc<Session>>>,
    /// One lock per sandbox around opening its session: two calls that
    /// arrive together must share one connection, not open two (the agent
    /// serves one connection at a time, so the second would wait).
    opening: Mutex<HashMap<String, Arc<Mutex<()>>>>,
    /// QEMUs this daemon started (pid, start time): their parent is the
    /// daemon, so whoever kills them, the daemon must reap them.
    children: Mutex<Vec<(u32, u64)>>,
}

fn core(e: CoreError) -> ApiError {
    let message = e.to_string();
    match e.kind() {
        ErrorKind::BadInput => ApiError::BadRequest(message),
        ErrorKind::NotFound => ApiError::Gone(message),
        ErrorKind::Conflict | ErrorKind::Busy => ApiError::conflict(message),
        ErrorKind::Internal => ApiError::Internal(message),
    }
}

impl Daemon {
    pub fn new(env: Env, exe: PathBuf) -> Result<Daemon, CoreError> {
        let fleet = Fleet::open(&env)?;
        // Answer 409 for a snapshot still being written instead of holding
        // the connection until it is ready.
        fleet.set_no_wait(true);
        Ok(Daemon {
            fleet,
            env,
            metrics: Arc::new(forkd_api::metrics::Metrics::new()),
            exe,
            sessions: Mutex::new(HashMap::new()),
            opening: Mutex::new(HashMap::new()),
            children: Mutex::new(Vec::new()),
        })
    }

    /// Runs operation `op` (an `operation_id`) with its path parameters,
    /// query string and body.
    pub fn dispatch(
        &self,
        op: &str,
        params: &HashMap<&'static str, String>,
        query: Option<&str>,
        body: &[u8],
        body_limit: usize,
    ) -> Result<Reply, ApiError> {
        let id = || params.get("id").cloned().unwrap_or_default();
        let tag = || params.get("tag").cloned().unwrap_or_default();
        match op {
            "health" => Ok(Reply::json(200, HealthResponse { ok: true })),
            "version" => Ok(Reply::json(200, VersionResponse::current())),
            "metrics" => self.metrics_text(),
            "openapi" => Ok(Reply::Json(200, forkd_api::routes::openapi())),
            "listSnapshots" => self.list_snapshots(),
            "snapshotInfo" => self.snapshot_info(&tag()),
            "deleteSnapshot" => {
                let q: DeleteSnapshotQuery = decode_query(query)?;
                self.delete_snapshot(&tag(), q.cascade, q.force)?;
                Ok(Reply::Empty(204))
            }
            "setPool" => self.set_pool(&tag(), decode_json(body, body_limit)?),
            "listSandboxes" => self.list_sandboxes(),
            "spawnSandboxes" => self.spawn(decode_json(body, body_limit)?),
            "bootSandbox" => self.boot(decode_json(body, body_limit)?),
            "getSandbox" => Ok(Reply::json(200, self.sandbox_info(&id())?)),
            "deleteSandbox" => {
                self.drop_session(&id());
                self.fleet
                    .kill(&id())
                    .map_err(|e| not_found_sandbox(e, &id()))?;
                Ok(Reply::Empty(204))
            }
            "exec" => self.exec(&id(), decode_json(body, body_limit)?),
            "execStream" => self.exec_stream(&id(), decode_json(body, body_limit)?),
            "eval" => self.eval(&id(), decode_json(body, body_limit)?),
            "ping" => self.ping(&id()),
            "branch" => self.branch(&id(), decode_json(body, body_limit)?),
            "writeFile" => self.write_file(&id(), decode_json(body, body_limit)?),
            "readFile" => self.read_file(&id(), decode_query(query)?),
            other => Err(ApiError::Internal(format!(
                "operation `{other}` has no implementation"
            ))),
        }
    }

    /// Whether [`Daemon::dispatch`] implements `op`; a test checks every
    /// route of the table is.
    pub fn implements(op: &str) -> bool {
        IMPLEMENTED.contains(&op)
    }

    fn metrics_text(&self) -> Result<Reply, ApiError> {
        let sandboxes = self.fleet.list().map_err(core)?;
        let mut by_state: HashMap<forkd_store::SandboxState, u64> = HashMap::new();
        for s in &sandboxes {
            if let Ok(state) = s.state.parse::<forkd_store::SandboxState>() {
                *by_state.entry(state).or_default() += 1;
            }
        }
        let snaps = self
            .fleet
            .db()
            .list_snapshots()
            .map_err(|e| core(e.into()))?;
        let mut by_status: HashMap<forkd_store::SnapshotStatus, u64> = HashMap::new();
        for s in &snaps {
            *by_status.entry(s.status).or_default() += 1;
        }
        use forkd_store::{SandboxState as S, SnapshotStatus as T};
        self.metrics.set_sandboxes(&[
            (
                S::Running.into(),
                by_state.get(&S::Running).copied().unwrap_or(0),
            ),
            (
                S::Pooled.into(),
                by_state.get(&S::Pooled).copied().unwrap_or(0),
            ),
            (S::Dead.into(), by_state.get(&S::Dead).copied().unwrap_or(0)),
        ]);
        self.metrics.set_snapshots(&[
            (
                T::Writing.into(),
                by_status.get(&T::Writing).copied().unwrap_or(0),
            ),
            (
                T::Ready.into(),
                by_status.get(&T::Ready).copied().unwrap_or(0),
            ),
            (
                T::Failed.into(),
                by_status.get(&T::Failed).copied().unwrap_or(0),
            ),
        ]);
        Ok(Reply::Text(
            200,
            "text/plain; version=0.0.4; charset=utf-8",
            self.metrics.render(),
        ))
    }

    // ------------------------------------------------------------ snapshots

    fn snapshot_row(&self, tag: &str) -> Result<SnapshotRow, ApiError> {
        forkd_store::validate_tag(tag).map_err(|e| ApiError::field("tag", e.to_string()))?;
        self.fleet
            .db()
            .get_snapshot(tag)
            .map_err(|e| core(e.into()))?
            .ok_or_else(|| ApiError::snapshot_not_found(tag))
    }

    fn list_snapshots(&self) -> Result<Reply, ApiError> {
        let rows = self
            .fleet
            .db()
            .list_snapshots()
            .map_err(|e| core(e.into()))?;
        Ok(Reply::json(
            200,
            rows.iter().map(snapshot_info).collect::<Vec<_>>(),
        ))
    }

    fn snapshot_info(&self, tag: &str) -> Result<Reply, ApiError> {
        let row = self.snapshot_row(tag)?;
        let d = self.fleet.snapshot_detail(tag).map_err(core)?;
        let size = |name: &str| d.files.iter().find(|f| f.name == name);
        let (mut sandboxes, mut dependents) = (vec![], vec![]);
        for dep in &d.dependents {
            match dep.split_once(' ') {
                Some(("sandbox", id)) => sandboxes.push(id.to_string()),
                Some((_, t)) => dependents.push(t.to_string()),
                None => dependents.push(dep.clone()),
            }
        }
        let ram_phys: u64 = ["ram.img", "ram.map"]
            .iter()
            .filter_map(|n| size(n))
            .map(|f| f.allocated)
            .sum();
        Ok(Reply::json(
            200,
            SnapshotDetail {
                snapshot: snapshot_info(&row),
                chain_depth: d.chain.len(),
                // Root first, direct parent last.
                ancestors: d.chain.iter().rev().cloned().collect(),
                dependents,
                sandboxes,
                files: d
                    .files
                    .iter()
                    .map(|f| SnapshotFile {
                        name: f.name.clone(),
                        logical_bytes: f.size,
                        physical_bytes: f.allocated,
                    })
                    .collect(),
                memory_logical_bytes: size("ram.img").map(|f| f.size).unwrap_or(0),
                memory_physical_bytes: ram_phys,
                vmstate_bytes: size("device.state").map(|f| f.size).unwrap_or(0),
                total_logical_bytes: d.files.iter().map(|f| f.size).sum(),
                total_physical_bytes: d.allocated,
                ram_parent: d.ram_parent.clone(),
                layer_pages: d.layer_pages,
            },
        ))
    }

    /// Deletes `tag`. Dependent snapshots are deleted first with `cascade`;
    /// sandboxes spawned from it only stop the deletion without `force`.
    fn delete_snapshot(&self, tag: &str, cascade: bool, force: bool) -> Result<(), ApiError> {
        self.snapshot_row(tag)?;
        if cascade {
            let children = self
                .fleet
                .db()
                .children_of(tag)
                .map_err(|e| core(e.into()))?;
            for child in children {
                self.delete_snapshot(&child, true, force)?;
            }
        }
        let blockers =
            forkd_store::deletion_blockers(&self.fleet.db(), tag).map_err(|e| core(e.into()))?;
        let blocking: Vec<String> = blockers
            .into_iter()
            .filter(|b| !(force && b.starts_with("sandbox ")))
            .collect();
        if !blocking.is_empty() && !force {
            return Err(ApiError::snapshot_has_dependents(tag, blocking));
        }
        self.fleet.remove_snapshot(tag, force).map_err(core)
    }

    fn set_pool(&self, tag: &str, req: PoolRequest) -> Result<Reply, ApiError> {
        self.snapshot_row(tag)?;
        self.fleet.fill_pool(tag, req.size as usize).map_err(core)?;
        let ready = self
            .fleet
            .list()
            .map_err(core)?
            .iter()
            .filter(|s| s.state == "pooled" && s.snapshot.as_deref() == Some(tag))
            .count() as u32;
        Ok(Reply::json(
            200,
            PoolInfo {
                tag: tag.to_string(),
                size: req.size,
                ready,
            },
        ))
    }

    // ------------------------------------------------------------ sandboxes

    fn sandbox_infos(&self) -> Result<Vec<SandboxInfo>, ApiError> {
        let snaps = self
            .fleet
            .db()
            .list_snapshots()
            .map_err(|e| core(e.into()))?;
        let mut branches: HashMap<String, u32> = HashMap::new();
        for s in &snaps {
            if let Some(src) = &s.source {
                *branches.entry(src.clone()).or_default() += 1;
            }
        }
        Ok(self
            .fleet
            .list()
            .map_err(core)?
            .into_iter()
            .map(|v| {
                let n = branches.get(&v.id).copied().unwrap_or(0);
                SandboxInfo {
                    snapshot_tag: v.snapshot.clone().unwrap_or_default(),
                    netns: None,
                    guest_addr: GUEST_ADDR.to_string(),
                    created_at_unix: v.created_at,
                    pid: Some(v.pid),
                    memory_limit_mib: None,
                    has_branched: n > 0,
                    branch_count: n,
                    state: v
                        .state
                        .parse::<forkd_store::SandboxState>()
                        .map_or(SandboxState::Dead, SandboxState::from),
                    image: Some(v.image),
                    mem_mib: Some(v.mem_mib),
                    cpus: Some(v.cpus),
                    spawn: None,
                    id: v.id,
                }
            })
            .collect())
    }

    fn sandbox_info(&self, id: &str) -> Result<SandboxInfo, ApiError> {
        self.sandbox_infos()?
            .into_iter()
            .find(|s| s.id == id)
            .ok_or_else(|| ApiError::sandbox_not_found(id))
    }

    fn list_sandboxes(&self) -> Result<Reply, ApiError> {
        Ok(Reply::json(200, self.sandbox_infos()?))
    }

    fn spawn(&self, req: SpawnRequest) -> Result<Reply, ApiError> {
        let row = self.snapshot_row(&req.snapshot_tag)?;
        if row.status != forkd_store::SnapshotStatus::Ready {
            return Err(ApiError::conflict(format!(
                "snapshot `{}` is not ready (status: {})",
                row.tag, row.status
            )));
        }
        let metrics = &self.metrics;
        let results = self
            .fleet
            .spawn(&req.snapshot_tag, req.n, req.n.min(4), &|_, r| {
                if let Ok(c) = r {
                    metrics.spawn_latency.observe(c.ready_ms / 1000.0);
                }
            })
            .map_err(core)?;
        // All or nothing: a partial fan-out is killed and the first error
        // reported, so that a client never has to find stray children.
        if let Some(err) = results.iter().find_map(|r| r.as_ref().err()) {
            let message = format!("spawning from `{}` failed: {err}", req.snapshot_tag);
            for c in results.iter().flatten() {
                let _ = self.fleet.kill(&c.id);
            }
            return Err(ApiError::Internal(message));
        }
        let children: Vec<forkd_core::fleet::Child> = results.into_iter().flatten().collect();
        for c in &children {
            self.adopt(&c.id);
        }
        let all = self.sandbox_infos()?;
        let out: Vec<SandboxInfo> = children
            .iter()
            .filter_map(|c| {
                let mut s = all.iter().find(|s| s.id == c.id).cloned()?;
                s.memory_limit_mib = req.memory_limit_mib;
                s.spawn = Some(SpawnReport {
                    ready_ms: c.ready_ms,
                    restore_ms: c.restore_ms,
                    clock_step_ms: c.clock_step_ms,
                    from_pool: c.from_pool,
                });
                Some(s)
            })
            .collect();
        Ok(Reply::json(201, out))
    }

    fn boot(&self, req: BootRequest) -> Result<Reply, ApiError> {
        let image = match req.image {
            Image::Busybox => "busybox",
            Image::DebianPython => "debian-python",
        };
        let opts = forkd_core::ArtifactOptions {
            image: image.parse().map_err(ApiError::BadRequest)?,
            ..forkd_core::ArtifactOptions::default()
        };
        let artifacts = forkd_core::artifacts::ensure(&self.env, &opts, &|_| {}).map_err(core)?;
        let boot = BootOptions {
            mem_mib: req.memory_mib.unwrap_or(256),
            cpus: req.vcpus.unwrap_or(1),
            ..BootOptions::default()
        };
        let t = Instant::now();
        let sb = self.fleet.create(&artifacts, image, &boot).map_err(core)?;
        self.adopt(&sb.id);
        self.metrics.spawn_latency.observe_duration(t.elapsed());
        if let Some(tag) = &req.tag {
            if let Err(e) = self.fleet.snapshot(&sb.id, tag) {
                let _ = self.fleet.kill(&sb.id);
                return Err(core(e));
            }
        }
        Ok(Reply::json(201, self.sandbox_info(&sb.id)?))
    }

    /// The shared agent session of a running sandbox.
    fn session(&self, id: &str) -> Result<Arc<Session>, ApiError> {
        forkd_store::validate_tag(id).map_err(|_| ApiError::sandbox_not_found(id))?;
        if let Some(s) = self.cached_session(id) {
            return Ok(s);
        }
        let gate = self
            .opening
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(id.to_string())
            .or_default()
            .clone();
        let _opening = gate.lock().unwrap_or_else(|p| p.into_inner());
        // Someone else may have opened it while we waited.
        if let Some(s) = self.cached_session(id) {
            return Ok(s);
        }
        let (row, _) = self
            .fleet
            .sandbox(id)
            .map_err(|e| not_found_sandbox(e, id))?;
        if row.state == forkd_store::SandboxState::Pooled {
            return Err(ApiError::conflict(format!(
                "sandbox `{id}` is a pool member that has not been handed out; spawn from its snapshot instead"
            )));
        }
        let vm = self
            .fleet
            .attach(id)
            .map_err(|e| not_found_sandbox(e, id))?;
        let s = Arc::new(Session {
            vm,
            last_used: Mutex::new(Instant::now()),
        });
        self.sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id.to_string(), s.clone());
        Ok(s)
    }

    fn cached_session(&self, id: &str) -> Option<Arc<Session>> {
        let map = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        let s = map.get(id)?;
        if s.vm.is_alive() && s.vm.agent().closed_reason().is_none() {
            *s.last_used.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
            return Some(s.clone());
        }
        None
    }

    fn drop_session(&self, id: &str) {
        self.opening
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
        self.sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
    }

    /// Remembers that this daemon started sandbox `id`'s QEMU.
    fn adopt(&self, id: &str) {
        if let Ok(Some(row)) = self.fleet.db().get_sandbox(id) {
            self.children
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push((row.pid, row.pid_start));
        }
    }

    /// Reaps QEMUs this daemon started that are gone, whoever killed them
    /// (called periodically), so none stays a zombie.
    pub fn reap_children(&self) {
        let gone: Vec<(u32, u64)> = {
            let mut kids = self.children.lock().unwrap_or_else(|p| p.into_inner());
            let (gone, alive): (Vec<_>, Vec<_>) = kids
                .iter()
                .partition(|(pid, start)| !forkd_vm::vm::pid_alive(*pid, *start));
            *kids = alive;
            gone
        };
        for (pid, start) in gone {
            forkd_vm::vm::reap_if_child(pid, start);
        }
    }

    /// Closes agent sessions nobody used for a while (called periodically).
    pub fn close_idle_sessions(&self) {
        let mut map = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        map.retain(|_, s| {
            Arc::strong_count(s) > 1
                || s.last_used
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .elapsed()
                    < SESSION_IDLE
        });
    }

    fn run(
        &self,
        id: &str,
        req: forkd_protocol::ExecRequest,
        stdin: Option<Vec<u8>>,
    ) -> Result<forkd_protocol::client::Output, ApiError> {
        let session = self.session(id)?;
        let t = Instant::now();
        let out = session.vm.agent().exec_collect(req, stdin);
        *session.last_used.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
        match out {
            Ok(o) => {
                self.metrics.exec_latency.observe_duration(t.elapsed());
                Ok(o)
            }
            // The agent refused this request (e.g. no such command): the
            // session is fine and the caller asked for the impossible.
            Err(e @ forkd_protocol::client::ClientError::Agent(_)) => {
                Err(ApiError::Unprocessable(format!("exec in `{id}`: {e}")))
            }
            Err(e) => {
                self.drop_session(id);
                Err(ApiError::Internal(format!("exec in `{id}`: {e}")))
            }
        }
    }

    /// Starts the command and answers at once; a thread streams its output
    /// as NDJSON lines and ends with its exit (or the error that broke it).
    fn exec_stream(&self, id: &str, req: ExecRequest) -> Result<Reply, ApiError> {
        let (exec, stdin) = to_protocol(req)?;
        let session = self.session(id)?;
        let (tx, rx) = tokio::sync::mpsc::channel::<Vec<u8>>(64);
        let line = |ev: &ExecEvent| {
            let mut l = serde_json::to_vec(ev).expect("events serialise");
            l.push(b'\n');
            l
        };
        let metrics = self.metrics.clone();
        std::thread::Builder::new()
            .name(format!("exec-stream-{id}"))
            .spawn(move || {
                let t = Instant::now();
                let input = stdin
                    .map(|b| Box::new(std::io::Cursor::new(b)) as Box<dyn std::io::Read + Send>);
                let r = session.vm.agent().exec(exec, input, |s, b| {
                    let ev = ExecEvent {
                        stream: Some(
                            match s {
                                forkd_protocol::client::OutputStream::Stdout => "stdout",
                                forkd_protocol::client::OutputStream::Stderr => "stderr",
                            }
                            .into(),
                        ),
                        data_b64: Some(base64::engine::general_purpose::STANDARD.encode(b)),
                        exit_code: None,
                        timed_out: None,
                        error: None,
                    };
                    // A client that went away stops receiving; the command
                    // still runs to its end (or its timeout).
                    let _ = tx.blocking_send(line(&ev));
                });
                *session.last_used.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
                let last = match r {
                    Ok(st) => {
                        metrics.exec_latency.observe_duration(t.elapsed());
                        ExecEvent {
                            stream: None,
                            data_b64: None,
                            exit_code: Some(if st.timed_out {
                                124
                            } else {
                                st.shell_code() as i64
                            }),
                            timed_out: Some(st.timed_out),
                            error: None,
                        }
                    }
                    Err(e) => ExecEvent {
                        stream: None,
                        data_b64: None,
                        exit_code: None,
                        timed_out: None,
                        error: Some(e.to_string()),
                    },
                };
                let _ = tx.blocking_send(line(&last));
            })
            .map_err(|e| ApiError::Internal(format!("starting the exec stream: {e}")))?;
        Ok(Reply::Stream(rx))
    }

    fn exec(&self, id: &str, req: ExecRequest) -> Result<Reply, ApiError> {
        let (exec, stdin) = to_protocol(req)?;
        let out = self.run(id, exec, stdin)?;
        Ok(Reply::json(
            200,
            ExecResponse {
                stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
                stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
                exit_code: if out.status.timed_out {
                    124
                } else {
                    out.status.shell_code() as i64
                },
                timed_out: out.status.timed_out,
            },
        ))
    }

    fn eval(&self, id: &str, req: EvalRequest) -> Result<Reply, ApiError> {
        let no_python = |detail: &str| {
            ApiError::Unprocessable(format!(
                "sandbox `{id}` has no python3 (boot it with image `debian-python`): {detail}"
            ))
        };
        let out = self
            .run(
                id,
                forkd_protocol::ExecRequest {
                    argv: vec!["python3".into(), "-c".into(), req.code],
                    env: vec![],
                    cwd: None,
                    timeout_ms: Some(30_000),
                    stdin: false,
                },
                None,
            )
            .map_err(|e| match e {
                ApiError::Unprocessable(m) => no_python(&m),
                other => other,
            })?;
        let code = out.status.shell_code() as i64;
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        if code == 127 {
            return Err(no_python(stderr.trim()));
        }
        Ok(Reply::json(
            200,
            EvalResponse {
                result: Some(String::from_utf8_lossy(&out.stdout).into_owned()),
                error: (code != 0).then_some(stderr),
                exit_code: code,
            },
        ))
    }

    fn ping(&self, id: &str) -> Result<Reply, ApiError> {
        let session = self.session(id)?;
        let t = Instant::now();
        session
            .vm
            .agent()
            .ping(Duration::from_secs(5))
            .map_err(|e| {
                self.drop_session(id);
                ApiError::Internal(format!("ping of `{id}`: {e}"))
            })?;
        Ok(Reply::json(
            200,
            PingResponse {
                pong: true,
                id: id.to_string(),
                rtt_us: t.elapsed().as_micros() as u64,
            },
        ))
    }

    fn branch(&self, id: &str, req: BranchRequest) -> Result<Reply, ApiError> {
        let (row, _) = self
            .fleet
            .sandbox(id)
            .map_err(|e| not_found_sandbox(e, id))?;
        if let Some(parent) = &req.parent_tag {
            if row.snapshot.as_deref() != Some(parent.as_str()) {
                return Err(ApiError::conflict(format!(
                    "sandbox `{id}` runs from {}, not from `{parent}` (parent_tag)",
                    row.snapshot
                        .as_deref()
                        .map(|s| format!("`{s}`"))
                        .unwrap_or_else(|| "no snapshot".into())
                )));
            }
        }
        let tag = req
            .tag
            .clone()
            .unwrap_or_else(|| format!("branch-{id}-{}", forkd_store::unix_now()));
        let mode = match req.effective_mode() {
            BranchMode::Full => Mode::Full,
            _ => Mode::Live,
        };
        let info = self
            .fleet
            .branch(
                id,
                &tag,
                mode,
                req.wait,
                WriterLaunch::Process(self.exe.clone()),
            )
            .map_err(core)?;
        self.metrics.branch_pause.observe(info.pause_ms / 1000.0);
        let row = self.snapshot_row(&tag)?;
        let status = if row.status == forkd_store::SnapshotStatus::Writing {
            202
        } else {
            201
        };
        let mut snap = snapshot_info(&row);
        snap.branch = Some(BranchReport {
            mode: match info.mode {
                Mode::Full => BranchMode::Full,
                Mode::Live => BranchMode::Live,
            },
            pause_ms: info.pause_ms,
            qemu_downtime_ms: info.qemu_downtime_ms,
            ready_ms: info.ready_ms,
        });
        Ok(Reply::json(status, snap))
    }

    fn write_file(&self, id: &str, req: FileWriteRequest) -> Result<Reply, ApiError> {
        let data = req.content()?;
        let session = self.session(id)?;
        let n = session
            .vm
            .agent()
            .write_file(&req.path, req.mode, &data[..])
            .map_err(|e| ApiError::Unprocessable(format!("writing {} in `{id}`: {e}", req.path)))?;
        Ok(Reply::Json(
            200,
            serde_json::json!({ "path": req.path, "bytes": n }),
        ))
    }

    fn read_file(&self, id: &str, q: FileReadQuery) -> Result<Reply, ApiError> {
        let session = self.session(id)?;
        let mut buf = Vec::new();
        session
            .vm
            .agent()
            .read_file(&q.path, &mut buf)
            .map_err(|e| ApiError::NotFound {
                what: "file",
                name: format!("{} in `{id}` ({e})", q.path),
            })?;
        Ok(Reply::json(
            200,
            FileContent {
                path: q.path,
                content_b64: base64::engine::general_purpose::STANDARD.encode(&buf),
            },
        ))
    }
}

/// Every user-mode network guest has this address (QEMU's slirp default).
const GUEST_ADDR: &str = "10.0.2.15";

const IMPLEMENTED: &[&str] = &[
    "health",
    "version",
    "metrics",
    "openapi",
    "listSnapshots",
    "snapshotInfo",
    "deleteSnapshot",
    "setPool",
    "listSandboxes",
    "spawnSandboxes",
    "bootSandbox",
    "getSandbox",
    "deleteSandbox",
    "exec",
    "execStream",
    "eval",
    "ping",
    "branch",
    "writeFile",
    "readFile",
];

/// The agent request for an API exec, and its stdin bytes.
fn to_protocol(
    req: ExecRequest,
) -> Result<(forkd_protocol::ExecRequest, Option<Vec<u8>>), ApiError> {
    let stdin = match &req.stdin_b64 {
        Some(b) => Some(
            base64::engine::general_purpose::STANDARD
                .decode(b)
                .map_err(|e| ApiError::field("stdin_b64", e.to_string()))?,
        ),
        None => None,
    };
    let exec = forkd_protocol::ExecRequest {
        argv: req.args,
        env: req.env.into_iter().collect(),
        cwd: req.cwd,
        timeout_ms: Some(req.timeout_secs.saturating_mul(1000)),
        stdin: false,
    };
    Ok((exec, stdin))
}

fn not_found_sandbox(e: CoreError, id: &str) -> ApiError {
    match e.kind() {
        ErrorKind::NotFound => ApiError::sandbox_not_found(id),
        _ => core(e),
    }
}

fn snapshot_info(row: &SnapshotRow) -> forkd_api::types::SnapshotInfo {
    let (pause_ms, pause_us) = forkd_api::types::SnapshotInfo::pause_fields(row.pause_ms);
    forkd_api::types::SnapshotInfo {
        tag: row.tag.clone(),
        dir: row.dir.display().to_string(),
        created_at_unix: row.created_at,
        branched_from: row.source.clone(),
        pause_ms,
        pause_us,
        status: row.status.into(),
        bootable: row.status == forkd_store::SnapshotStatus::Ready,
        parent_tag: row.parent.clone(),
        error: row.error.clone(),
        branch: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_route_of_the_table_is_implemented_and_nothing_else() {
        for r in forkd_api::routes::ROUTES {
            assert!(
                Daemon::implements(r.operation_id),
                "route {} {} ({}) has no implementation",
                r.method.as_str(),
                r.path,
                r.operation_id
            );
        }
        for op in IMPLEMENTED {
            assert!(
                forkd_api::routes::by_operation(op).is_some(),
                "`{op}` is implemented but not in the route table"
            );
        }
    }
}
