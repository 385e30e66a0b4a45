//! forkd's `/v1` API from the client side.
//!
//! [`Client`] implements the operations seam ([`forkd_ops::Operations`])
//! against a daemon, over its UNIX socket or HTTP, so that a front end runs
//! an operation remotely with the same requests, results, defaults and
//! errors as on this host. The wire format and its conversions belong to
//! `forkd-api`; this crate only moves bytes (with `reqwest`: connection
//! reuse, streamed bodies, timeouts). Its general calls ([`Client::raw`],
//! [`Client::call`], [`Client::stream`]) serve tests and benchmarks that
//! speak the API directly.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::time::Duration;

use forkd_api::convert;
use forkd_api::types as api;
use forkd_ops::{
    BranchOutcome, BranchRequest, CreateRequest, Created, EvalOutcome, ExecOutcome, ExecSpec,
    FileInfo, FsEvent, GcReport, KilledAll, OnChild, OpError, Operations, Pong, PoolStatus,
    ProcessEvent, ProcessInfo, ProcessRef, ProcessSpec, Pruned, PtySize, RemoveSnapshot, Sandbox,
    Snapshot, SnapshotDetail, SpawnOutcome, SpawnRequest, Stream, TarSummary, WriteOptions,
};

mod guest;
pub mod pipe;
pub mod tarcount;
use serde::de::DeserializeOwned;
use serde_json::Value;

/// How long a connection attempt may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Most stdin bytes an exec sends (the API takes stdin whole, as base64).
pub const MAX_STDIN: usize = 48 << 20;

/// Where the daemon is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// A UNIX socket.
    Unix(PathBuf),
    /// `http://host:port`.
    Http(String),
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Unix(p) => write!(f, "{}", p.display()),
            Target::Http(u) => f.write_str(u),
        }
    }
}

/// A call that did not get an answer, or got an error answer.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach the daemon at {target}: {source}")]
    Connect {
        target: Target,
        #[source]
        source: reqwest::Error,
    },
    #[error("talking to the daemon at {target}: {source}")]
    Transport {
        target: Target,
        #[source]
        source: reqwest::Error,
    },
    #[error("the daemon sent a malformed answer: {0}")]
    Protocol(String),
    /// The daemon answered with an error status.
    #[error("{} (HTTP {status})", body.error)]
    Api {
        status: u16,
        body: forkd_api::ErrorBody,
    },
}

impl From<ClientError> for OpError {
    fn from(e: ClientError) -> OpError {
        match e {
            ClientError::Api { status, body } => convert::op_error(status, &body),
            other => OpError::internal(other.to_string()),
        }
    }
}

/// An answer, whatever its status.
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: u16,
    pub body: Vec<u8>,
}

impl Answer {
    /// The body as JSON (`null` when empty).
    pub fn json(&self) -> Result<Value, ClientError> {
        if self.body.is_empty() {
            return Ok(Value::Null);
        }
        serde_json::from_slice(&self.body).map_err(|e| ClientError::Protocol(e.to_string()))
    }
}

/// Talks to one daemon.
#[derive(Debug, Clone)]
pub struct Client {
    http: reqwest::blocking::Client,
    target: Target,
    base: String,
    token: Option<String>,
}

impl Client {
    /// `spec` is a socket path (`/run/forkd.sock`, `unix:/…`) or a URL
    /// (`http://127.0.0.1:8889`); `token` is the bearer token, if any.
    pub fn new(spec: &str, token: Option<String>) -> Result<Client, String> {
        let target = if spec.starts_with("http://") {
            Target::Http(spec.trim_end_matches('/').to_string())
        } else if spec.starts_with("https://") {
            return Err("https is not supported; put a TLS proxy in front of the daemon".into());
        } else if let Some(p) = spec.strip_prefix("unix:") {
            Target::Unix(PathBuf::from(p))
        } else if spec.starts_with('/') || spec.starts_with('.') {
            Target::Unix(PathBuf::from(spec))
        } else {
            return Err(format!(
                "`{spec}` is neither a socket path nor an http:// URL"
            ));
        };
        // No overall timeout: a spawn of many children or a branch of a big
        // guest takes as long as it takes; connecting must be quick.
        let builder = reqwest::blocking::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(None::<Duration>);
        let (builder, base) = match &target {
            Target::Unix(p) => (builder.unix_socket(p.as_path()), "http://forkd".to_string()),
            Target::Http(u) => (builder, u.clone()),
        };
        let http = builder
            .build()
            .map_err(|e| format!("setting up the HTTP client: {e}"))?;
        Ok(Client {
            http,
            target,
            base,
            token,
        })
    }

    /// Where this client connects.
    pub fn target(&self) -> &Target {
        &self.target
    }

    fn send(
        &self,
        method: &str,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<reqwest::blocking::Response, ClientError> {
        match body {
            Some(b) => self.send_body(method, path, "application/json", b.into()),
            None => self.send_request(self.request(method, path)?),
        }
    }

    fn request(
        &self,
        method: &str,
        path: &str,
    ) -> Result<reqwest::blocking::RequestBuilder, ClientError> {
        let method = reqwest::Method::from_bytes(method.as_bytes())
            .map_err(|e| ClientError::Protocol(format!("method {method}: {e}")))?;
        let mut req = self.http.request(method, format!("{}{path}", self.base));
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        Ok(req)
    }

    fn send_body(
        &self,
        method: &str,
        path: &str,
        content_type: &str,
        body: reqwest::blocking::Body,
    ) -> Result<reqwest::blocking::Response, ClientError> {
        let req = self
            .request(method, path)?
            .header(reqwest::header::CONTENT_TYPE, content_type)
            .body(body);
        self.send_request(req)
    }

    fn send_request(
        &self,
        req: reqwest::blocking::RequestBuilder,
    ) -> Result<reqwest::blocking::Response, ClientError> {
        req.send().map_err(|source| {
            if source.is_connect() {
                ClientError::Connect {
                    target: self.target.clone(),
                    source,
                }
            } else {
                ClientError::Transport {
                    target: self.target.clone(),
                    source,
                }
            }
        })
    }

    /// The error an error answer carries.
    fn error_answer(&self, resp: reqwest::blocking::Response) -> OpError {
        let status = resp.status().as_u16();
        match resp.bytes() {
            Ok(body) => match api_error(Answer {
                status,
                body: body.to_vec(),
            }) {
                Err(e) => e.into(),
                Ok(_) => OpError::internal(format!("the daemon answered HTTP {status}")),
            },
            Err(e) => self.transport(e).into(),
        }
    }

    fn transport(&self, source: reqwest::Error) -> ClientError {
        ClientError::Transport {
            target: self.target.clone(),
            source,
        }
    }

    /// Sends one request and returns whatever status came back.
    pub fn raw(
        &self,
        method: &str,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<Answer, ClientError> {
        let resp = self.send(method, path, body)?;
        let status = resp.status().as_u16();
        let body = resp.bytes().map_err(|e| self.transport(e))?.to_vec();
        Ok(Answer { status, body })
    }

    /// Sends one request; `Err(Api)` for 4xx and 5xx answers.
    pub fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Answer, ClientError> {
        let a = self.raw(method, path, body.map(|b| b.to_string().into_bytes()))?;
        api_error(a)
    }

    /// Sends one request and passes a 2xx body to `on_data` as it arrives
    /// (for `application/x-ndjson` streams); `Err(Api)` for error statuses.
    pub fn stream(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
        on_data: &mut dyn FnMut(&[u8]),
    ) -> Result<u16, ClientError> {
        let mut resp = self.send(method, path, body.map(|b| b.to_string().into_bytes()))?;
        let status = resp.status().as_u16();
        if status >= 400 {
            let body = resp.bytes().map_err(|e| self.transport(e))?.to_vec();
            return api_error(Answer { status, body }).map(|a| a.status);
        }
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = resp
                .read(&mut buf)
                .map_err(|e| ClientError::Protocol(format!("reading the daemon's stream: {e}")))?;
            if n == 0 {
                return Ok(status);
            }
            on_data(&buf[..n]);
        }
    }

    fn json<T: DeserializeOwned>(
        &self,
        method: &str,
        path: &str,
        body: Option<Value>,
    ) -> Result<T, OpError> {
        let answer = self.call(method, path, body.as_ref())?;
        serde_json::from_slice(&answer.body).map_err(|e| {
            OpError::internal(format!(
                "the daemon sent an unexpected answer to {method} {path}: {e}"
            ))
        })
    }
}

pub(crate) fn api_error(a: Answer) -> Result<Answer, ClientError> {
    if a.status < 400 {
        return Ok(a);
    }
    let body = serde_json::from_slice::<forkd_api::ErrorBody>(&a.body).unwrap_or_else(|_| {
        forkd_api::ErrorBody {
            error: String::from_utf8_lossy(&a.body).trim().to_string(),
            kind: None,
            message: None,
            hint: None,
        }
    });
    Err(ClientError::Api {
        status: a.status,
        body,
    })
}

pub(crate) fn to_value(v: impl serde::Serialize) -> Value {
    serde_json::to_value(v).expect("requests serialise")
}

/// A sandbox id or tag as a path segment: refused when it would change the
/// path (the daemon checks the rule too).
pub(crate) fn segment(what: &str, s: &str) -> Result<(), OpError> {
    match what {
        "tag" => forkd_ops::validate_tag(s)?,
        _ => forkd_ops::validate_id(s).map_err(|_| OpError::no_sandbox(s))?,
    }
    Ok(())
}

/// The `/v1` API carries no access token (a secret only a front end on the
/// daemon's host keeps): refused rather than dropped.
fn no_access_token(settings: &forkd_ops::Settings) -> Result<(), OpError> {
    if settings.access_token.is_some() {
        return Err(OpError::bad_input(
            "an access token is kept only by a fleet on the daemon's host; the /v1 API does not carry it",
        ));
    }
    Ok(())
}

/// What the `/v1` API does not carry: a front end on the daemon's host
/// does it through the fleet.
fn host_only(what: &str) -> OpError {
    OpError::bad_input(format!(
        "{what} is done only by a fleet on the daemon's host; the /v1 API does not carry it"
    ))
}

impl Operations for Client {
    fn code_interpreter(&self, _id: &str, _port: u16) -> Result<u32, OpError> {
        Err(host_only("starting the code interpreter"))
    }

    fn connect_port(&self, _id: &str, _port: u16) -> Result<forkd_ops::PortConn, OpError> {
        Err(host_only("relaying a guest port"))
    }

    fn create(&self, req: &CreateRequest, _progress: &dyn Fn(&str)) -> Result<Created, OpError> {
        no_access_token(&req.settings)?;
        let body = to_value(convert::create_to_wire(req)?);
        let t = std::time::Instant::now();
        let s: api::SandboxInfo = self.json("POST", "/v1/sandboxes/boot", Some(body))?;
        Ok(Created {
            sandbox: convert::sandbox_from_wire(s),
            boot_ms: t.elapsed().as_secs_f64() * 1000.0,
        })
    }

    fn list(&self) -> Result<Vec<Sandbox>, OpError> {
        let v: Vec<api::SandboxInfo> = self.json("GET", "/v1/sandboxes", None)?;
        Ok(v.into_iter().map(convert::sandbox_from_wire).collect())
    }

    fn sandbox(&self, id: &str) -> Result<Sandbox, OpError> {
        segment("id", id)?;
        let s: api::SandboxInfo = self.json("GET", &format!("/v1/sandboxes/{id}"), None)?;
        Ok(convert::sandbox_from_wire(s))
    }

    fn kill(&self, id: &str) -> Result<(), OpError> {
        segment("id", id)?;
        self.call("DELETE", &format!("/v1/sandboxes/{id}"), None)?;
        Ok(())
    }

    fn kill_all(&self) -> Result<KilledAll, OpError> {
        let k: api::KillAllResponse = self.json("DELETE", "/v1/sandboxes", None)?;
        Ok(convert::killed_all_from_wire(k))
    }

    fn set_timeout(&self, id: &str, ttl: Option<Duration>) -> Result<Sandbox, OpError> {
        segment("id", id)?;
        let body = serde_json::json!({
            "ttl_ms": ttl.map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
        });
        let s: api::SandboxInfo =
            self.json("POST", &format!("/v1/sandboxes/{id}/timeout"), Some(body))?;
        Ok(convert::sandbox_from_wire(s))
    }

    fn exec(
        &self,
        id: &str,
        spec: &ExecSpec,
        stdin: Option<Box<dyn Read + Send>>,
        output: &mut dyn FnMut(Stream, &[u8]),
    ) -> Result<ExecOutcome, OpError> {
        use base64::Engine as _;
        segment("id", id)?;
        let input = match stdin {
            Some(mut r) => {
                let mut buf = Vec::new();
                r.by_ref()
                    .take(MAX_STDIN as u64 + 1)
                    .read_to_end(&mut buf)
                    .map_err(|e| OpError::bad_input(format!("reading stdin: {e}")))?;
                if buf.len() > MAX_STDIN {
                    return Err(OpError::bad_input(format!(
                        "stdin is larger than the {} MiB a daemon takes with one exec",
                        MAX_STDIN >> 20
                    )));
                }
                Some(buf)
            }
            None => None,
        };
        let body = to_value(convert::exec_to_wire(spec, input.as_deref()));
        let mut pending: Vec<u8> = Vec::new();
        let mut end: Option<api::ExecEvent> = None;
        let mut bad: Option<String> = None;
        self.stream(
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
                            let stream = if s == "stderr" {
                                Stream::Stderr
                            } else {
                                Stream::Stdout
                            };
                            output(stream, &data);
                        }
                        _ => end = Some(ev),
                    }
                }
            },
        )?;
        if let Some(e) = bad {
            return Err(OpError::internal(format!(
                "the daemon sent a malformed exec stream: {e}"
            )));
        }
        match end {
            Some(ev) => match convert::exit_from_wire(&ev) {
                Some(outcome) => Ok(outcome),
                None => Err(OpError::internal(format!(
                    "exec in `{id}` broke off: {}",
                    ev.error.unwrap_or_else(|| "no exit status".into())
                ))),
            },
            None => Err(OpError::internal(format!(
                "the exec stream of `{id}` ended without an exit status"
            ))),
        }
    }

    fn eval(
        &self,
        id: &str,
        code: &str,
        timeout: Option<Duration>,
    ) -> Result<EvalOutcome, OpError> {
        segment("id", id)?;
        let r: api::EvalResponse = self.json(
            "POST",
            &format!("/v1/sandboxes/{id}/eval"),
            Some(serde_json::json!({
                "code": code,
                "timeout_secs": timeout.map(|t| t.as_secs().max(1)),
            })),
        )?;
        Ok(convert::eval_from_wire(r))
    }

    fn ping(&self, id: &str) -> Result<Pong, OpError> {
        segment("id", id)?;
        let r: api::PingResponse = self.json("POST", &format!("/v1/sandboxes/{id}/ping"), None)?;
        Ok(Pong { rtt_us: r.rtt_us })
    }

    fn write_file(
        &self,
        id: &str,
        path: &str,
        opts: &WriteOptions,
        data: &mut dyn Read,
    ) -> Result<u64, OpError> {
        self.guest_write(id, path, opts, data)
    }

    fn read_file(
        &self,
        id: &str,
        path: &str,
        user: Option<&str>,
        out: &mut dyn Write,
    ) -> Result<u64, OpError> {
        self.guest_read(id, path, user, out)
    }

    fn stat(&self, id: &str, path: &str, user: Option<&str>) -> Result<FileInfo, OpError> {
        self.guest_stat(id, path, user)
    }

    fn list_dir(
        &self,
        id: &str,
        path: &str,
        depth: u32,
        user: Option<&str>,
    ) -> Result<Vec<FileInfo>, OpError> {
        self.guest_list(id, path, depth, user)
    }

    fn make_dir(&self, id: &str, path: &str, user: Option<&str>) -> Result<bool, OpError> {
        self.guest_mkdir(id, path, user)
    }

    fn remove_path(&self, id: &str, path: &str, user: Option<&str>) -> Result<(), OpError> {
        self.guest_remove(id, path, user)
    }

    fn rename_path(
        &self,
        id: &str,
        from: &str,
        to: &str,
        user: Option<&str>,
    ) -> Result<FileInfo, OpError> {
        self.guest_rename(id, from, to, user)
    }

    fn copy_in(
        &self,
        id: &str,
        dir: &str,
        user: Option<&str>,
        tar: &mut dyn Read,
    ) -> Result<TarSummary, OpError> {
        self.guest_copy_in(id, dir, user, tar)
    }

    fn copy_out(
        &self,
        id: &str,
        path: &str,
        user: Option<&str>,
        tar: &mut dyn Write,
    ) -> Result<TarSummary, OpError> {
        self.guest_copy_out(id, path, user, tar)
    }

    fn watch_dir(
        &self,
        id: &str,
        path: &str,
        recursive: bool,
        user: Option<&str>,
    ) -> Result<u32, OpError> {
        self.guest_watch(id, path, recursive, user)
    }

    fn watch_events(&self, id: &str, watch: u32, wait: Duration) -> Result<Vec<FsEvent>, OpError> {
        self.guest_watch_events(id, watch, wait)
    }

    fn unwatch(&self, id: &str, watch: u32) -> Result<(), OpError> {
        self.guest_unwatch(id, watch)
    }

    fn run_process(
        &self,
        id: &str,
        spec: &ProcessSpec,
        on_event: &mut dyn FnMut(ProcessEvent) -> bool,
    ) -> Result<Option<ExecOutcome>, OpError> {
        self.guest_run(id, spec, on_event)
    }

    fn follow_process(
        &self,
        id: &str,
        process: &ProcessRef,
        replay: bool,
        on_event: &mut dyn FnMut(ProcessEvent) -> bool,
    ) -> Result<Option<ExecOutcome>, OpError> {
        self.guest_follow(id, process, replay, on_event)
    }

    fn process_input(
        &self,
        id: &str,
        process: &ProcessRef,
        data: &[u8],
        close: bool,
    ) -> Result<(), OpError> {
        self.guest_input(id, process, data, close)
    }

    fn signal_process(&self, id: &str, process: &ProcessRef, signal: i32) -> Result<(), OpError> {
        self.guest_signal(id, process, signal)
    }

    fn resize_process(&self, id: &str, process: &ProcessRef, size: PtySize) -> Result<(), OpError> {
        self.guest_resize(id, process, size)
    }

    fn list_processes(&self, id: &str) -> Result<Vec<ProcessInfo>, OpError> {
        self.guest_processes(id)
    }

    fn branch(&self, req: &BranchRequest) -> Result<BranchOutcome, OpError> {
        segment("id", &req.source)?;
        let s: api::SnapshotInfo = self.json(
            "POST",
            &format!("/v1/sandboxes/{}/branch", req.source),
            Some(to_value(convert::branch_to_wire(req))),
        )?;
        Ok(convert::branch_outcome_from_wire(&s))
    }

    fn spawn(&self, req: &SpawnRequest, on_child: OnChild<'_>) -> Result<SpawnOutcome, OpError> {
        no_access_token(&req.settings)?;
        if req.id.is_some() {
            return Err(OpError::bad_input(
                "a child's own id is given only by a fleet on the daemon's host; the /v1 API does not carry it",
            ));
        }
        let t = std::time::Instant::now();
        let v: Vec<api::SandboxInfo> = self.json(
            "POST",
            "/v1/sandboxes",
            Some(to_value(convert::spawn_to_wire(req))),
        )?;
        let children: Vec<Result<forkd_ops::Child, OpError>> = v
            .into_iter()
            .map(|s| Ok(convert::child_from_wire(s)))
            .collect();
        for (i, c) in children.iter().enumerate() {
            on_child(i, c);
        }
        Ok(SpawnOutcome {
            tag: req.tag.clone(),
            wall_ms: t.elapsed().as_secs_f64() * 1000.0,
            children,
        })
    }

    fn pool(&self, tag: &str, size: usize) -> Result<PoolStatus, OpError> {
        segment("tag", tag)?;
        let p: api::PoolInfo = self.json(
            "POST",
            &format!("/v1/snapshots/{tag}/pool"),
            Some(serde_json::json!({ "size": size })),
        )?;
        Ok(convert::pool_from_wire(&p))
    }

    fn snapshots(&self) -> Result<Vec<Snapshot>, OpError> {
        let v: Vec<api::SnapshotInfo> = self.json("GET", "/v1/snapshots", None)?;
        Ok(v.iter().map(convert::snapshot_from_wire).collect())
    }

    fn snapshot_info(&self, tag: &str) -> Result<SnapshotDetail, OpError> {
        segment("tag", tag)?;
        let d: api::SnapshotDetail =
            self.json("GET", &format!("/v1/snapshots/{tag}/info"), None)?;
        Ok(convert::detail_from_wire(d))
    }

    fn remove_snapshot(&self, tag: &str, opts: RemoveSnapshot) -> Result<Vec<String>, OpError> {
        segment("tag", tag)?;
        let q = match (opts.cascade, opts.force) {
            (true, _) => "?cascade=true",
            (false, true) => "?force=true",
            (false, false) => "",
        };
        let a = self.call("DELETE", &format!("/v1/snapshots/{tag}{q}"), None)?;
        // 204 answers carry nothing; a body lists what went.
        if a.body.is_empty() {
            return Ok(vec![tag.to_string()]);
        }
        serde_json::from_slice(&a.body)
            .map_err(|e| OpError::internal(format!("the daemon sent an unexpected answer: {e}")))
    }

    fn compact(&self, tag: &str) -> Result<forkd_ops::Compacted, OpError> {
        segment("tag", tag)?;
        let c: api::CompactResponse =
            self.json("POST", &format!("/v1/snapshots/{tag}/compact"), None)?;
        Ok(convert::compacted_from_wire(c))
    }

    fn prune_snapshots(&self) -> Result<Pruned, OpError> {
        let p: api::PruneResponse = self.json("POST", "/v1/snapshots/prune", None)?;
        Ok(convert::pruned_from_wire(p))
    }

    fn gc(&self) -> Result<GcReport, OpError> {
        let g: api::GcResponse = self.json("POST", "/v1/gc", None)?;
        Ok(convert::gc_from_wire(g))
    }

    fn push(
        &self,
        req: &forkd_ops::PushRequest,
        progress: forkd_ops::OnTransfer<'_>,
    ) -> Result<forkd_ops::PushOutcome, OpError> {
        segment("tag", &req.tag)?;
        let body = to_value(convert::push_to_wire(req));
        let r = self.transfer(&format!("/v1/snapshots/{}/push", req.tag), &body, progress)?;
        Ok(convert::pushed_from_wire(&r))
    }

    fn pull(
        &self,
        req: &forkd_ops::PullRequest,
        progress: forkd_ops::OnTransfer<'_>,
    ) -> Result<forkd_ops::PullOutcome, OpError> {
        let body = to_value(convert::pull_to_wire(req));
        let r = self.transfer("/v1/snapshots/pull", &body, progress)?;
        Ok(convert::pulled_from_wire(&r))
    }
}

impl Client {
    /// Runs a push or pull stream: progress lines to `progress`, then the
    /// result (or the error the last line carries).
    fn transfer(
        &self,
        path: &str,
        body: &Value,
        progress: forkd_ops::OnTransfer<'_>,
    ) -> Result<api::TransferResult, OpError> {
        let mut pending: Vec<u8> = Vec::new();
        let mut end: Option<Result<api::TransferResult, OpError>> = None;
        let mut bad: Option<String> = None;
        self.stream("POST", path, Some(body), &mut |bytes| {
            pending.extend_from_slice(bytes);
            // A line longer than this is not a progress line: a broken daemon.
            if pending.len() > 1 << 20 && !pending.contains(&b'\n') {
                bad.get_or_insert("a line longer than 1 MiB".into());
                pending.clear();
            }
            while let Some(nl) = pending.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = pending.drain(..=nl).collect();
                let ev: api::TransferEvent = match serde_json::from_slice(&line) {
                    Ok(ev) => ev,
                    Err(e) => {
                        bad.get_or_insert(e.to_string());
                        continue;
                    }
                };
                match (ev.result, ev.error, ev.counts) {
                    (Some(r), _, _) => end = Some(Ok(r)),
                    (_, Some(e), _) => end = Some(Err(convert::op_error(500, &e))),
                    (_, _, Some(c)) => progress(&forkd_ops::TransferProgress {
                        file: ev.file.unwrap_or_default(),
                        counts: convert::counts_from_wire(&c),
                    }),
                    _ => {}
                }
            }
        })?;
        if let Some(e) = bad {
            return Err(OpError::internal(format!(
                "the daemon sent a malformed transfer stream: {e}"
            )));
        }
        end.unwrap_or_else(|| {
            Err(OpError::internal(
                "the transfer stream ended without a result",
            ))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_are_parsed_from_paths_and_urls() {
        assert_eq!(
            Client::new("/run/f.sock", None).unwrap().target,
            Target::Unix("/run/f.sock".into())
        );
        assert_eq!(
            Client::new("unix:rel.sock", None).unwrap().target,
            Target::Unix("rel.sock".into())
        );
        assert_eq!(
            Client::new("http://127.0.0.1:8889/", None).unwrap().target,
            Target::Http("http://127.0.0.1:8889".into())
        );
        assert!(Client::new("https://x", None).is_err());
        assert!(Client::new("nonsense", None).is_err());
    }

    #[test]
    fn query_values_are_escaped_and_segments_checked() {
        assert_eq!(convert::query_value("/tmp/a b&c"), "/tmp/a%20b%26c");
        assert!(segment("id", "../x").is_err());
        assert!(segment("tag", "ok.1").is_ok());
    }

    #[test]
    fn an_unreachable_daemon_is_an_error_naming_it() {
        let c = Client::new("/nonexistent/forkd.sock", None).unwrap();
        let e = c.list().unwrap_err();
        assert_eq!(e.kind, forkd_ops::ErrorKind::Internal);
        assert!(
            e.message
                .starts_with("cannot reach the daemon at /nonexistent/forkd.sock"),
            "{}",
            e.message
        );
    }
}
