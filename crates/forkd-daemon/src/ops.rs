//! The routes' bodies: each decodes its request, turns it into a call of the
//! operations seam ([`forkd_ops::Operations`], here the local fleet) with
//! `forkd_api::convert`, and turns the result back into the wire answer. No
//! default and no policy is decided here; the seam decides them. HTTP is not
//! here either: the server decodes, authorizes and limits, then calls
//! [`Daemon::dispatch`] on a blocking thread.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use base64::Engine as _;
use forkd_api::convert;
use forkd_api::types::{
    BootRequest, BranchRequest, DeleteSnapshotQuery, EvalRequest, ExecEvent, ExecRequest,
    ExecResponse, HealthResponse, PingResponse, PoolRequest, SpawnRequest, TimeoutRequest,
    VersionResponse,
};
use forkd_api::{decode_json, decode_query, ApiError};
use forkd_core::{CoreError, Env, Fleet};
use forkd_ops::{policy, Operations, RemoveSnapshot, SandboxState, SnapshotStatus};
use serde::Serialize;
use serde_json::Value;

/// What an operation answers.
pub enum Reply {
    Json(u16, Value),
    Text(u16, &'static str, String),
    Empty(u16),
    /// 200 with `application/x-ndjson` lines as they are produced.
    Stream(tokio::sync::mpsc::Receiver<Vec<u8>>),
    /// 200 with a body an operation streams (see [`crate::pipe`]).
    Streamed(crate::pipe::Streamed),
}

impl Reply {
    pub(crate) fn json(status: u16, v: impl Serialize) -> Reply {
        Reply::Json(status, serde_json::to_value(v).expect("replies serialise"))
    }

    pub fn status(&self) -> u16 {
        match self {
            Reply::Json(s, _) | Reply::Text(s, _, _) | Reply::Empty(s) => *s,
            Reply::Stream(_) | Reply::Streamed(_) => 200,
        }
    }
}

/// The daemon's state: the fleet (which implements the operations) plus
/// what only the daemon has (metrics).
pub struct Daemon {
    pub fleet: Arc<Fleet>,
    pub env: Env,
    pub metrics: Arc<forkd_api::metrics::Metrics>,
}

impl Daemon {
    pub fn new(env: Env) -> Result<Daemon, CoreError> {
        Ok(Daemon {
            fleet: Arc::new(Fleet::open_long_lived(&env)?),
            env,
            metrics: Arc::new(forkd_api::metrics::Metrics::new()),
        })
    }

    fn ops(&self) -> &dyn Operations {
        &*self.fleet
    }

    /// Runs operation `op` (an `operation_id`) with its path parameters,
    /// query string and body (`upload` for routes whose body is streamed).
    pub fn dispatch(
        &self,
        op: &str,
        params: &HashMap<&'static str, String>,
        query: Option<&str>,
        body: &[u8],
        body_limit: usize,
        upload: Option<Box<dyn std::io::Read + Send>>,
    ) -> Result<Reply, ApiError> {
        let input = crate::guest::Input {
            params,
            query,
            body,
            body_limit,
            upload,
        };
        if let Some(reply) = self.guest_route(op, input)? {
            return Ok(reply);
        }
        let id = || params.get("id").cloned().unwrap_or_default();
        let tag = || params.get("tag").cloned().unwrap_or_default();
        match op {
            "health" => Ok(Reply::json(200, HealthResponse { ok: true })),
            "version" => Ok(Reply::json(200, VersionResponse::current())),
            "metrics" => self.metrics_text(),
            "openapi" => Ok(Reply::Json(200, forkd_api::routes::openapi())),
            "listSnapshots" => {
                let list = self.ops().snapshots()?;
                Ok(Reply::json(
                    200,
                    list.iter()
                        .map(convert::snapshot_to_wire)
                        .collect::<Vec<_>>(),
                ))
            }
            "snapshotInfo" => Ok(Reply::json(
                200,
                convert::detail_to_wire(&self.ops().snapshot_info(&tag())?),
            )),
            "deleteSnapshot" => {
                let q: DeleteSnapshotQuery = decode_query(query)?;
                self.ops().remove_snapshot(
                    &tag(),
                    RemoveSnapshot {
                        force: q.force,
                        cascade: q.cascade,
                    },
                )?;
                Ok(Reply::Empty(204))
            }
            "compactSnapshot" => Ok(Reply::json(
                200,
                convert::compacted_to_wire(&self.ops().compact(&tag())?),
            )),
            "pruneSnapshots" => Ok(Reply::json(
                200,
                convert::pruned_to_wire(&self.ops().prune_snapshots()?),
            )),
            "gc" => Ok(Reply::json(200, convert::gc_to_wire(&self.ops().gc()?))),
            "killAllSandboxes" => Ok(Reply::json(
                200,
                convert::killed_all_to_wire(&self.ops().kill_all()?),
            )),
            "setPool" => {
                let req: PoolRequest = decode_json(body, body_limit)?;
                let p = self.ops().pool(&tag(), req.size as usize)?;
                Ok(Reply::json(200, convert::pool_to_wire(&tag(), &p)))
            }
            "listSandboxes" => {
                let list = self.ops().list()?;
                Ok(Reply::json(
                    200,
                    list.iter()
                        .map(convert::sandbox_to_wire)
                        .collect::<Vec<_>>(),
                ))
            }
            "spawnSandboxes" => self.spawn(decode_json(body, body_limit)?),
            "bootSandbox" => self.boot(decode_json(body, body_limit)?),
            "getSandbox" => Ok(Reply::json(
                200,
                convert::sandbox_to_wire(&self.ops().sandbox(&id())?),
            )),
            "deleteSandbox" => {
                self.ops().kill(&id())?;
                Ok(Reply::Empty(204))
            }
            "setSandboxTimeout" => {
                let req: TimeoutRequest = decode_json(body, body_limit)?;
                let ttl = req.ttl_ms.map(std::time::Duration::from_millis);
                let s = self.ops().set_timeout(&id(), ttl)?;
                Ok(Reply::json(200, convert::sandbox_to_wire(&s)))
            }
            "exec" => self.exec(&id(), decode_json(body, body_limit)?),
            "execStream" => self.exec_stream(&id(), decode_json(body, body_limit)?),
            "eval" => {
                let req: EvalRequest = decode_json(body, body_limit)?;
                let timeout = req.timeout_secs.map(std::time::Duration::from_secs);
                let r = self.ops().eval(&id(), &req.code, timeout)?;
                Ok(Reply::json(200, convert::eval_to_wire(&r)))
            }
            "ping" => {
                let p = self.ops().ping(&id())?;
                Ok(Reply::json(
                    200,
                    PingResponse {
                        pong: true,
                        id: id(),
                        rtt_us: p.rtt_us,
                    },
                ))
            }
            "branch" => {
                let req: BranchRequest = decode_json(body, body_limit)?;
                let out = self.ops().branch(&convert::branch_from_wire(&id(), &req))?;
                self.metrics.branch_pause.observe(out.pause_ms / 1000.0);
                let status = if out.snapshot.status == SnapshotStatus::Writing {
                    202
                } else {
                    201
                };
                Ok(Reply::json(status, convert::branch_outcome_to_wire(&out)))
            }
            "pushSnapshot" => self.push_stream(&tag(), decode_json(body, body_limit)?),
            "pullSnapshot" => self.pull_stream(decode_json(body, body_limit)?),
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
        let sandboxes = self.ops().list()?;
        let snaps = self.ops().snapshots()?;
        let count = |s: SandboxState| sandboxes.iter().filter(|x| x.state == s).count() as u64;
        let count_snap = |s: SnapshotStatus| snaps.iter().filter(|x| x.status == s).count() as u64;
        self.metrics.set_sandboxes(
            &SandboxState::ALL
                .iter()
                .map(|s| ((*s).into(), count(*s)))
                .collect::<Vec<_>>(),
        );
        self.metrics.set_snapshots(
            &SnapshotStatus::ALL
                .iter()
                .map(|s| ((*s).into(), count_snap(*s)))
                .collect::<Vec<_>>(),
        );
        Ok(Reply::Text(
            200,
            "text/plain; version=0.0.4; charset=utf-8",
            self.metrics.render(),
        ))
    }

    fn spawn(&self, req: SpawnRequest) -> Result<Reply, ApiError> {
        let metrics = &self.metrics;
        let out = self.ops().spawn(&convert::spawn_from_wire(&req), &|_, r| {
            if let Ok(c) = r {
                metrics.spawn_latency.observe(c.ready_ms / 1000.0);
            }
        })?;
        // This route's answer lists children; when some failed and were
        // kept (`on_failure: keep`), the first failure is the answer's error
        // only if nothing started.
        let mut started = Vec::new();
        let mut first_error = None;
        for c in out.children {
            match c {
                Ok(c) => {
                    let mut s = convert::child_to_wire(&c);
                    s.memory_limit_mib = req.memory_limit_mib;
                    started.push(s);
                }
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        match (started.is_empty(), first_error) {
            (true, Some(e)) => Err(e.into()),
            _ => Ok(Reply::json(201, started)),
        }
    }

    fn boot(&self, req: BootRequest) -> Result<Reply, ApiError> {
        let t = Instant::now();
        let created = self
            .ops()
            .create(&convert::create_from_wire(&req), &|_| {})?;
        self.metrics.spawn_latency.observe_duration(t.elapsed());
        Ok(Reply::json(201, convert::sandbox_to_wire(&created.sandbox)))
    }

    /// Runs the command and answers with its output in one piece: at most
    /// [`policy::EXEC_BUFFERED_OUTPUT_LIMIT`] bytes of each stream are
    /// kept, the rest dropped and counted, so that one chatty command
    /// cannot take the daemon's memory (`/exec/stream` has no limit: it
    /// holds nothing).
    fn exec(&self, id: &str, req: ExecRequest) -> Result<Reply, ApiError> {
        let (spec, stdin) = convert::exec_from_wire(req)?;
        let mut stdout = Capped::new(policy::EXEC_BUFFERED_OUTPUT_LIMIT);
        let mut stderr = Capped::new(policy::EXEC_BUFFERED_OUTPUT_LIMIT);
        let t = Instant::now();
        let out = self.ops().exec(
            id,
            &spec,
            stdin.map(|b| Box::new(std::io::Cursor::new(b)) as Box<dyn std::io::Read + Send>),
            &mut |s, b| match s {
                forkd_ops::Stream::Stdout => stdout.push(b),
                forkd_ops::Stream::Stderr => stderr.push(b),
            },
        )?;
        self.metrics.exec_latency.observe_duration(t.elapsed());
        Ok(Reply::json(
            200,
            ExecResponse {
                stdout_dropped: stdout.dropped,
                stderr_dropped: stderr.dropped,
                stdout: stdout.into_text("stdout"),
                stderr: stderr.into_text("stderr"),
                exit_code: i64::from(out.exit_code()),
                timed_out: out.timed_out,
            },
        ))
    }

    /// Starts the command and answers at once; a thread streams its output
    /// as NDJSON lines and ends with its exit (or the error that broke it).
    fn exec_stream(&self, id: &str, req: ExecRequest) -> Result<Reply, ApiError> {
        let (spec, stdin) = convert::exec_from_wire(req)?;
        // Fail before answering 200 when the sandbox cannot run anything.
        self.fleet.session(id).map_err(forkd_ops::OpError::from)?;
        let (tx, rx) = tokio::sync::mpsc::channel::<Vec<u8>>(64);
        let line = |ev: &ExecEvent| {
            let mut l = serde_json::to_vec(ev).expect("events serialise");
            l.push(b'\n');
            l
        };
        let fleet = self.fleet.clone();
        let metrics = self.metrics.clone();
        let id = id.to_string();
        std::thread::Builder::new()
            .name(format!("exec-stream-{id}"))
            .spawn(move || {
                let t = Instant::now();
                let input = stdin
                    .map(|b| Box::new(std::io::Cursor::new(b)) as Box<dyn std::io::Read + Send>);
                let ops: &dyn Operations = &*fleet;
                let r = ops.exec(&id, &spec, input, &mut |s, b| {
                    let ev = ExecEvent {
                        stream: Some(
                            match s {
                                forkd_ops::Stream::Stdout => "stdout",
                                forkd_ops::Stream::Stderr => "stderr",
                            }
                            .into(),
                        ),
                        data_b64: Some(base64::engine::general_purpose::STANDARD.encode(b)),
                        exit_code: None,
                        timed_out: None,
                        signal: None,
                        duration_ms: None,
                        error: None,
                    };
                    // A client that went away stops receiving; the command
                    // still runs to its end (or its timeout).
                    let _ = tx.blocking_send(line(&ev));
                });
                let last = match r {
                    Ok(out) => {
                        metrics.exec_latency.observe_duration(t.elapsed());
                        convert::exit_to_wire(&out)
                    }
                    Err(e) => ExecEvent {
                        stream: None,
                        data_b64: None,
                        exit_code: None,
                        timed_out: None,
                        signal: None,
                        duration_ms: None,
                        error: Some(convert::api_text(&e)),
                    },
                };
                let _ = tx.blocking_send(line(&last));
            })
            .map_err(|e| ApiError::Internal(format!("starting the exec stream: {e}")))?;
        Ok(Reply::Stream(rx))
    }
}

/// Output kept up to a limit; what comes after is counted, not kept.
struct Capped {
    kept: Vec<u8>,
    limit: usize,
    dropped: u64,
}

impl Capped {
    fn new(limit: usize) -> Capped {
        Capped {
            kept: Vec::new(),
            limit,
            dropped: 0,
        }
    }

    fn push(&mut self, b: &[u8]) {
        let take = self.limit.saturating_sub(self.kept.len()).min(b.len());
        self.kept.extend_from_slice(&b[..take]);
        self.dropped += (b.len() - take) as u64;
    }

    /// The kept output as text, ending with a line that says what was
    /// dropped, if anything was.
    fn into_text(self, name: &str) -> String {
        let mut text = String::from_utf8_lossy(&self.kept).into_owned();
        if self.dropped > 0 {
            text.push_str(&format!(
                "\n[forkd: {} more bytes of {name} dropped: this answer keeps {} MiB per stream; stream the exec to get everything]\n",
                self.dropped,
                self.limit >> 20
            ));
        }
        text
    }
}

const IMPLEMENTED: &[&str] = &[
    "health",
    "version",
    "metrics",
    "openapi",
    "listSnapshots",
    "snapshotInfo",
    "deleteSnapshot",
    "compactSnapshot",
    "pruneSnapshots",
    "gc",
    "killAllSandboxes",
    "setPool",
    "listSandboxes",
    "spawnSandboxes",
    "bootSandbox",
    "getSandbox",
    "deleteSandbox",
    "setSandboxTimeout",
    "exec",
    "execStream",
    "eval",
    "ping",
    "branch",
    "writeFile",
    "readFile",
    "removeFile",
    "uploadFile",
    "downloadFile",
    "statFile",
    "listFiles",
    "makeDir",
    "renameFile",
    "uploadTar",
    "downloadTar",
    "watchDir",
    "pollWatch",
    "deleteWatch",
    "startProcess",
    "listProcesses",
    "followProcess",
    "processInput",
    "signalProcess",
    "resizeProcess",
    "pushSnapshot",
    "pullSnapshot",
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffered_output_keeps_its_limit_and_says_what_it_dropped() {
        let mut c = Capped::new(8);
        c.push(b"hello ");
        c.push(b"world, again");
        assert_eq!(c.dropped, 10);
        let text = c.into_text("stdout");
        assert!(
            text.starts_with("hello wo\n[forkd: 10 more bytes of stdout dropped"),
            "{text}"
        );
        let mut quiet = Capped::new(8);
        quiet.push(b"ok");
        assert_eq!(
            (quiet.dropped, quiet.into_text("stderr")),
            (0, "ok".to_string())
        );
    }

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
