//! The E2B control plane over the seam: create (a template is a snapshot
//! tag to spawn from, or an image to boot; `base` is the default image),
//! list with `x-next-token` paging, info, kill, timeout, pause (a snapshot
//! that keeps memory, then the sandbox is killed), connect (a running
//! sandbox answers as it is; a paused one is spawned from its snapshot under
//! a new id) and fork (one live branch of the source, then one spawned child
//! per requested sandbox, each with its own access token and its own error).

use std::sync::Arc;
use std::time::Duration;

use axum::extract::Request;
use axum::response::Response;
use forkd_e2b::control::{
    ApiError, ConnectRequest, CreatedSandbox, ForkRequest, ForkResult, ListQuery, ListedSandbox,
    NewSandbox, PauseRequest, SandboxDetail, SandboxState, TimeoutRequest,
};
use forkd_e2b::paging::{self, Cursor};
use forkd_e2b::routes::RouteMatch;
use forkd_ops::{
    BranchRequest, CreateRequest, ErrorKind, OpError, Operations, Sandbox, Settings, SpawnRequest,
};
use time::OffsetDateTime;

use super::{blocking, new_access_token, read_body, reply, E2b};

/// Largest control-plane request body.
const MAX_BODY: usize = 1 << 20;

/// The template every E2B SDK names when the user names none.
const BASE_TEMPLATE: &str = "base";

/// The snapshot a paused sandbox is kept in.
fn pause_tag(id: &str) -> String {
    format!("e2b-paused-{id}")
}

/// A control-plane error answer (`{code, message}`).
pub(crate) fn api_error(status: u16, message: impl Into<String>) -> Response {
    let e = ApiError::new(status, message);
    reply(status, "application/json", e.to_json())
}

fn from_api(e: ApiError) -> Response {
    reply(e.code, "application/json", e.to_json())
}

/// The HTTP status of a seam error on the control plane.
pub(crate) fn status_of(e: &OpError) -> u16 {
    match e.kind {
        ErrorKind::BadInput | ErrorKind::Unprocessable => 400,
        ErrorKind::NotFound => 404,
        ErrorKind::Conflict => 409,
        ErrorKind::Busy => 503,
        ErrorKind::PermissionDenied => 403,
        ErrorKind::Internal => 500,
    }
}

fn op_error(e: &OpError) -> Response {
    api_error(status_of(e), e.message.clone())
}

fn json<T: serde::Serialize>(status: u16, value: &T) -> Response {
    match serde_json::to_vec(value) {
        Ok(b) => reply(status, "application/json", b),
        Err(e) => api_error(500, format!("the answer could not be encoded: {e}")),
    }
}

async fn body_json<T: serde::de::DeserializeOwned + Default>(req: Request) -> Result<T, Response> {
    let bytes = read_body(req.into_body(), MAX_BODY)
        .await
        .map_err(|m| api_error(400, m))?;
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    serde_json::from_slice(&bytes).map_err(|e| {
        api_error(
            400,
            format!("the request body is not the JSON expected: {e}"),
        )
    })
}

/// Dispatches a control-plane route.
pub(crate) async fn dispatch(e2b: Arc<E2b>, m: RouteMatch, query: &str, req: Request) -> Response {
    let id = m.id.clone().unwrap_or_default();
    let method = req.method().as_str().to_owned();
    match (method.as_str(), m.route.path) {
        ("POST", "/v2/sandboxes") => create(e2b, req).await,
        ("GET", "/v2/sandboxes") => list(e2b, query).await,
        ("GET", "/sandboxes/{id}") => info(e2b, id).await,
        ("DELETE", "/sandboxes/{id}") => {
            let ops = e2b.ops.clone();
            match blocking(move || ops.kill(&id)).await {
                Ok(()) => reply(204, "application/json", Vec::new()),
                Err(e) => op_error(&e),
            }
        }
        ("POST", "/sandboxes/{id}/timeout") => {
            let t: TimeoutRequest = match body_json::<Option<TimeoutRequest>>(req).await {
                Ok(Some(t)) => t,
                Ok(None) => return api_error(400, "the body must be {\"timeout\": SECONDS}"),
                Err(r) => return r,
            };
            if let Err(e) = t.validate() {
                return from_api(e);
            }
            let ops = e2b.ops.clone();
            let ttl = Duration::from_secs(t.timeout);
            match blocking(move || ops.set_timeout(&id, Some(ttl))).await {
                Ok(_) => reply(204, "application/json", Vec::new()),
                Err(e) => op_error(&e),
            }
        }
        ("POST", "/sandboxes/{id}/pause") => {
            let p: PauseRequest = match body_json(req).await {
                Ok(p) => p,
                Err(r) => return r,
            };
            pause(e2b, id, p).await
        }
        ("POST", "/v2/sandboxes/{id}/connect") => {
            let c: ConnectRequest = match body_json(req).await {
                Ok(c) => c,
                Err(r) => return r,
            };
            if let Err(e) = c.validate() {
                return from_api(e);
            }
            connect(e2b, id, c).await
        }
        ("POST", "/sandboxes/{id}/fork") => {
            let f: ForkRequest = match body_json(req).await {
                Ok(f) => f,
                Err(r) => return r,
            };
            if let Err(e) = f.validate() {
                return from_api(e);
            }
            fork(e2b, id, f).await
        }
        _ => api_error(404, format!("{method} {} is not served", m.route.path)),
    }
}

/// The create answer for a sandbox.
fn created(template: &str, sandbox: &Sandbox) -> CreatedSandbox {
    CreatedSandbox {
        template_id: template.to_owned(),
        sandbox_id: sandbox.id.clone(),
        client_id: forkd_e2b::CLIENT_ID.to_owned(),
        envd_version: forkd_e2b::ENVD_VERSION.to_owned(),
        alias: None,
        envd_access_token: sandbox.access_token.clone(),
        traffic_access_token: None,
        domain: None,
    }
}

/// The template a sandbox was made from, as E2B names it: the snapshot it
/// was spawned from, or the image it booted.
fn template_of(s: &Sandbox) -> String {
    match &s.snapshot {
        Some(tag) => tag.clone(),
        None => s.image.clone(),
    }
}

/// Spawns one child of snapshot `tag` with its own access token.
fn spawn_one(ops: &dyn Operations, tag: &str, mut settings: Settings) -> Result<Sandbox, OpError> {
    settings.access_token = Some(new_access_token()?.expose().to_owned());
    let mut req = SpawnRequest::new(tag, 1);
    req.settings = settings;
    let out = ops.spawn(&req, &|_, _| {})?;
    let child = out.children.into_iter().next().ok_or_else(|| OpError {
        kind: ErrorKind::Internal,
        message: format!("spawning a child of snapshot `{tag}` returned no child"),
        hint: None,
    })??;
    Ok(child.sandbox)
}

async fn create(e2b: Arc<E2b>, req: Request) -> Response {
    let new: NewSandbox = match body_json::<Option<NewSandbox>>(req).await {
        Ok(Some(n)) => n,
        Ok(None) => return api_error(400, "the body must be a JSON object with templateID"),
        Err(r) => return r,
    };
    if let Err(e) = new.validate() {
        return from_api(e);
    }
    let unsupported = new.unsupported_fields();
    if !unsupported.is_empty() {
        return api_error(
            400,
            format!(
                "forkd does not support {} in Sandbox.create; leave them out",
                unsupported.join(", ")
            ),
        );
    }
    let settings = Settings {
        ttl: Some(Duration::from_secs(new.timeout_secs())),
        labels: new.metadata.clone().unwrap_or_default(),
        env: new
            .env_vars
            .clone()
            .unwrap_or_default()
            .into_iter()
            .collect(),
        ..Settings::default()
    };
    let ops = e2b.ops.clone();
    let template = new.template_id.clone();
    let made = blocking(move || {
        let is_snapshot =
            template != BASE_TEMPLATE && ops.snapshots()?.iter().any(|s| s.tag == template);
        if is_snapshot {
            return spawn_one(ops.as_ref(), &template, settings);
        }
        let mut settings = settings;
        settings.access_token = Some(new_access_token()?.expose().to_owned());
        let req = CreateRequest {
            image: (template != BASE_TEMPLATE).then(|| template.clone()),
            settings,
            ..CreateRequest::default()
        };
        Ok(ops.create(&req, &|_| {})?.sandbox)
    })
    .await;
    match made {
        Ok(s) => json(201, &created(&new.template_id, &s)),
        Err(e) => op_error(&e),
    }
}

fn started_at(s: &Sandbox) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp(i64::try_from(s.created_at).unwrap_or(i64::MAX))
        .unwrap_or(OffsetDateTime::UNIX_EPOCH)
}

fn listed(s: &Sandbox) -> ListedSandbox {
    let started = started_at(s);
    // A sandbox without an end time lives until killed; E2B has no word for
    // that, so it gets the longest timeout E2B accepts from now.
    let end_at = s
        .lifetime
        .ends_at_ms
        .and_then(|ms| OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000).ok())
        .unwrap_or_else(|| {
            OffsetDateTime::now_utc() + Duration::from_secs(forkd_e2b::control::MAX_TIMEOUT_SECS)
        });
    ListedSandbox {
        template_id: template_of(s),
        sandbox_id: s.id.clone(),
        client_id: forkd_e2b::CLIENT_ID.to_owned(),
        started_at: started,
        end_at,
        cpu_count: s.cpus,
        memory_mb: s.mem_mib,
        disk_size_mb: 0,
        state: SandboxState::Running,
        envd_version: forkd_e2b::ENVD_VERSION.to_owned(),
        alias: None,
        metadata: s.lifetime.labels.clone(),
    }
}

async fn list(e2b: Arc<E2b>, query: &str) -> Response {
    let q = match ListQuery::parse(query) {
        Ok(q) => q,
        Err(e) => return from_api(e),
    };
    let cursor = match q
        .next_token
        .as_deref()
        .map(|t| Cursor::decode(t, q.descending))
    {
        Some(Err(e)) => return from_api(e),
        Some(Ok(c)) => Some(c),
        None => None,
    };
    let ops = e2b.ops.clone();
    let all = match blocking(move || ops.list()).await {
        Ok(all) => all,
        Err(e) => return op_error(&e),
    };
    let items: Vec<ListedSandbox> = all
        .iter()
        .filter(|s| s.state == forkd_ops::SandboxState::Running)
        .map(listed)
        .filter(|l| q.matches(l.state, &l.template_id, l.started_at, &l.metadata))
        .collect();
    let (page, next) = paging::page(
        items,
        |l| {
            (
                i64::try_from(l.started_at.unix_timestamp_nanos() / 1_000_000).unwrap_or(0),
                l.sandbox_id.clone(),
            )
        },
        q.descending,
        cursor.as_ref(),
        q.limit,
    );
    let mut r = json(200, &page);
    if let Some(next) = next {
        if let Ok(v) = axum::http::HeaderValue::from_str(&next) {
            r.headers_mut().insert(paging::NEXT_TOKEN_HEADER, v);
        }
    }
    r
}

async fn info(e2b: Arc<E2b>, id: String) -> Response {
    let ops = e2b.ops.clone();
    match blocking(move || ops.sandbox(&id)).await {
        Ok(s) if s.state == forkd_ops::SandboxState::Running => json(
            200,
            &SandboxDetail {
                listed: listed(&s),
                envd_access_token: s.access_token.clone(),
                lifecycle: None,
            },
        ),
        Ok(s) => from_api(ApiError::sandbox_not_found(&s.id)),
        Err(e) => op_error(&e),
    }
}

async fn pause(e2b: Arc<E2b>, id: String, p: PauseRequest) -> Response {
    if p.memory == Some(false) {
        return api_error(
            400,
            "forkd pauses with memory only (a snapshot of the running sandbox); leave `memory` out",
        );
    }
    let ops = e2b.ops.clone();
    let done = blocking(move || {
        let s = ops.sandbox(&id)?;
        if s.state != forkd_ops::SandboxState::Running {
            return Err(OpError {
                kind: ErrorKind::Conflict,
                message: format!("sandbox {id} is not running"),
                hint: None,
            });
        }
        let tag = pause_tag(&id);
        ops.branch(&BranchRequest {
            source: id.clone(),
            tag: Some(tag),
            mode: None,
            wait: Some(true),
            expect_parent: None,
        })?;
        ops.kill(&id)
    })
    .await;
    match done {
        Ok(()) => reply(204, "application/json", Vec::new()),
        Err(e) => op_error(&e),
    }
}

async fn connect(e2b: Arc<E2b>, id: String, c: ConnectRequest) -> Response {
    let ops = e2b.ops.clone();
    let ttl = c.timeout.map(Duration::from_secs);
    let done = blocking(move || {
        match ops.sandbox(&id) {
            Ok(s) if s.state == forkd_ops::SandboxState::Running => {
                // A running sandbox's timeout is only ever extended.
                if let Some(ttl) = ttl {
                    let later = s.lifetime.ends_at_ms.is_none_or(|end| {
                        let now = std::time::SystemTime::now()
                            .duration_since(std::time::UNIX_EPOCH)
                            .map(|d| d.as_millis() as u64)
                            .unwrap_or(0);
                        now + ttl.as_millis() as u64 > end
                    });
                    if later && s.lifetime.ends_at_ms.is_some() {
                        ops.set_timeout(&id, Some(ttl))?;
                    }
                }
                let s = ops.sandbox(&id)?;
                return Ok((200, template_of(&s), s));
            }
            Ok(_) | Err(_) => {}
        }
        let tag = pause_tag(&id);
        if !ops.snapshots()?.iter().any(|s| s.tag == tag) {
            return Err(OpError {
                kind: ErrorKind::NotFound,
                message: format!("Paused sandbox {id} not found"),
                hint: None,
            });
        }
        let settings = Settings {
            ttl: Some(ttl.unwrap_or(Duration::from_secs(
                forkd_e2b::control::DEFAULT_TIMEOUT_SECS,
            ))),
            ..Settings::default()
        };
        let s = spawn_one(ops.as_ref(), &tag, settings)?;
        Ok((201, tag, s))
    })
    .await;
    match done {
        Ok((status, template, s)) => json(status, &created(&template, &s)),
        Err(e) => op_error(&e),
    }
}

async fn fork(e2b: Arc<E2b>, id: String, f: ForkRequest) -> Response {
    let ops = e2b.ops.clone();
    let count = f.count() as usize;
    let ttl = Duration::from_secs(f.timeout_secs());
    let done = blocking(move || {
        let source = ops.sandbox(&id)?;
        let branched = ops.branch(&BranchRequest {
            source: id.clone(),
            tag: None,
            mode: None,
            wait: None,
            expect_parent: None,
        })?;
        let tag = branched.snapshot.tag.clone();
        // Children keep the source's metadata and default environment.
        let settings = Settings {
            ttl: Some(ttl),
            labels: source.lifetime.labels.clone(),
            env: source.lifetime.env.clone(),
            cwd: source.lifetime.cwd.clone(),
            ..Settings::default()
        };
        let results: Vec<Result<Sandbox, OpError>> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..count)
                .map(|_| {
                    let ops = ops.clone();
                    let tag = tag.clone();
                    let settings = settings.clone();
                    scope.spawn(move || spawn_one(ops.as_ref(), &tag, settings))
                })
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join().unwrap_or_else(|_| {
                        Err(OpError {
                            kind: ErrorKind::Internal,
                            message: "spawning a child panicked".into(),
                            hint: None,
                        })
                    })
                })
                .collect()
        });
        Ok((tag, results))
    })
    .await;
    match done {
        Ok((tag, results)) => {
            let entries: Vec<ForkResult> = results
                .into_iter()
                .map(|r| match r {
                    Ok(s) => ForkResult::Sandbox(created(&tag, &s)),
                    Err(e) => ForkResult::Error(ApiError::new(status_of(&e), e.message)),
                })
                .collect();
            json(201, &entries)
        }
        Err(e) => op_error(&e),
    }
}
