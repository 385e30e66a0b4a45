//! The E2B control plane over the seam: create (a template is a snapshot
//! tag to spawn from, or an image to boot; `base` is the default image),
//! list with `x-next-token` paging, info, kill, timeout, pause (a snapshot
//! that keeps memory, a record of the sandbox, then the sandbox is stopped),
//! connect (a running sandbox answers as it is; a paused one is spawned from
//! its snapshot under its own id, with its own token, metadata and
//! environment) and fork (one live branch of the source, then one spawned
//! child per requested sandbox, each with its own access token and its own
//! error). Paused sandboxes are listed and described with state `paused`.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::Request;
use axum::response::Response;
use forkd_e2b::control::{
    ApiError, ConnectRequest, CreatedSandbox, ForkRequest, ForkResult, ListQuery, ListedSandbox,
    NewSandbox, PauseRequest, SandboxDetail, SandboxState, TimeoutRequest,
};
use forkd_e2b::paging::{self, Cursor};
use forkd_e2b::paused::PausedSandbox;
use forkd_e2b::routes::RouteMatch;
use forkd_ops::{
    BranchRequest, CreateRequest, ErrorKind, OpError, Operations, RemoveSnapshot, Sandbox,
    Settings, SpawnRequest,
};
use time::OffsetDateTime;

use super::{blocking, new_access_token, read_body, reply, E2b};

/// Largest control-plane request body.
const MAX_BODY: usize = 1 << 20;

/// The template every E2B SDK names when the user names none.
const BASE_TEMPLATE: &str = "base";

/// The prefix of the snapshots a paused sandbox `id` is kept in.
fn pause_prefix(id: &str) -> String {
    format!("e2b-paused-{id}-")
}

/// The snapshot of this pause of `id` (a sandbox paused again after a
/// resume runs from its previous one, so each pause has its own).
fn pause_tag(id: &str) -> String {
    format!("{}{}", pause_prefix(id), now_ms())
}

fn now_ms() -> i64 {
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0);
    i64::try_from(ms).unwrap_or(i64::MAX)
}

fn conflict(message: String) -> OpError {
    OpError {
        kind: ErrorKind::Conflict,
        message,
        hint: None,
    }
}

fn not_found(message: String) -> OpError {
    OpError {
        kind: ErrorKind::NotFound,
        message,
        hint: None,
    }
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
        ("DELETE", "/sandboxes/{id}") => match blocking(move || kill(&e2b, &id)).await {
            Ok(()) => reply(204, "application/json", Vec::new()),
            Err(e) => op_error(&e),
        },
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
        // The code interpreter's `/contexts` calls carry only this one
        // (docs/e2b-protocol.md §9): the sandbox's one secret serves both.
        traffic_access_token: sandbox.access_token.clone(),
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
    let running: Vec<ListedSandbox> = all
        .iter()
        .filter(|s| s.state == forkd_ops::SandboxState::Running)
        .map(listed)
        .collect();
    let paused: Vec<ListedSandbox> = {
        let e2b = e2b.clone();
        blocking(move || Ok(e2b.paused.list()))
            .await
            .unwrap_or_default()
            .iter()
            .map(PausedSandbox::listed)
            .filter(|p| !running.iter().any(|r| r.sandbox_id == p.sandbox_id))
            .collect()
    };
    let items: Vec<ListedSandbox> = running
        .into_iter()
        .chain(paused)
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
    let wanted = id.clone();
    let found = blocking(move || match e2b.ops.sandbox(&id) {
        Ok(s) if s.state == forkd_ops::SandboxState::Running => Ok(Some(SandboxDetail {
            listed: listed(&s),
            envd_access_token: s.access_token.clone(),
            lifecycle: None,
        })),
        Ok(_) => Ok(e2b.paused.load(&id)?.map(|p| paused_detail(&p))),
        Err(e) if e.kind == ErrorKind::NotFound => {
            Ok(e2b.paused.load(&id)?.map(|p| paused_detail(&p)))
        }
        Err(e) => Err(e),
    })
    .await;
    match found {
        Ok(Some(d)) => json(200, &d),
        Ok(None) => from_api(ApiError::sandbox_not_found(&wanted)),
        Err(e) => op_error(&e),
    }
}

fn paused_detail(p: &PausedSandbox) -> SandboxDetail {
    SandboxDetail {
        listed: p.listed(),
        envd_access_token: p.envd_access_token.clone(),
        lifecycle: None,
    }
}

/// Kills a running sandbox, or forgets a paused one; then removes the pause
/// snapshots nothing needs any more.
fn kill(e2b: &E2b, id: &str) -> Result<(), OpError> {
    let ops = e2b.ops.as_ref();
    match ops.sandbox(id) {
        Ok(_) => ops.kill(id)?,
        Err(e) if e.kind == ErrorKind::NotFound => {
            let _held = e2b.transitions.lock().unwrap_or_else(|p| p.into_inner());
            if e2b.paused.load(id)?.is_none() {
                return Err(e);
            }
            e2b.paused.remove(id)?;
        }
        Err(e) => return Err(e),
    }
    sweep_pause_snapshots(e2b);
    Ok(())
}

/// Removes the pause snapshots of sandboxes that are neither paused (no
/// record) nor there any more (killed by `kill`, by their timeout or by
/// `forkd kill`). Newest first, so that a chain of pauses goes link by link
/// in one sweep; a snapshot something else still needs (a fork's child, a
/// branch) stays until a later sweep finds it free. The daemon sweeps after
/// every E2B kill and every [`SWEEP_EVERY`].
pub(crate) fn sweep_pause_snapshots(e2b: &E2b) {
    let ops = e2b.ops.as_ref();
    let Ok(all) = ops.snapshots() else { return };
    let mut pauses: Vec<(u64, String, String)> = all
        .iter()
        .filter_map(|s| {
            let (id, ms) = s.tag.strip_prefix("e2b-paused-")?.rsplit_once('-')?;
            Some((ms.parse().ok()?, id.to_owned(), s.tag.clone()))
        })
        .collect();
    pauses.sort_by_key(|p| std::cmp::Reverse(p.0));
    // Not while a pause or a resume is under way (its snapshot exists
    // before its record, or its record goes once the sandbox runs).
    let _held = e2b.transitions.lock().unwrap_or_else(|p| p.into_inner());
    for (_, id, tag) in pauses {
        let needed = ops.sandbox(&id).is_ok() || !matches!(e2b.paused.load(&id), Ok(None));
        if !needed {
            let _ = ops.remove_snapshot(&tag, RemoveSnapshot::default());
        }
    }
}

/// How often the daemon sweeps pause snapshots nothing needs.
pub(crate) const SWEEP_EVERY: Duration = Duration::from_secs(30);

async fn pause(e2b: Arc<E2b>, id: String, p: PauseRequest) -> Response {
    if p.memory == Some(false) {
        return api_error(
            400,
            "forkd pauses with memory only (a snapshot of the running sandbox); leave `memory` out",
        );
    }
    match blocking(move || pause_sandbox(&e2b, &id)).await {
        Ok(()) => reply(204, "application/json", Vec::new()),
        Err(e) => op_error(&e),
    }
}

/// Snapshots sandbox `id` with its memory, records it, then stops it. A
/// sandbox already paused is a conflict (the SDK's `pause` answers False).
fn pause_sandbox(e2b: &E2b, id: &str) -> Result<(), OpError> {
    let ops = e2b.ops.as_ref();
    let _held = e2b.transitions.lock().unwrap_or_else(|p| p.into_inner());
    let s = match ops.sandbox(id) {
        Ok(s) if s.state == forkd_ops::SandboxState::Running => s,
        Ok(_) => return Err(not_found(format!("sandbox {id} is not running"))),
        Err(e) if e.kind == ErrorKind::NotFound && e2b.paused.load(id)?.is_some() => {
            return Err(conflict(format!("sandbox {id} is already paused")))
        }
        Err(e) => return Err(e),
    };
    let tag = pause_tag(id);
    ops.branch(&BranchRequest {
        source: id.to_owned(),
        tag: Some(tag.clone()),
        mode: None,
        wait: Some(true),
        expect_parent: None,
    })?;
    let record = PausedSandbox {
        sandbox_id: id.to_owned(),
        template_id: template_of(&s),
        snapshot: tag.clone(),
        envd_access_token: s.access_token.clone(),
        started_at: started_at(&s).unix_timestamp(),
        paused_at_ms: now_ms(),
        cpu_count: s.cpus,
        memory_mb: s.mem_mib,
        metadata: s.lifetime.labels.clone(),
        env: s.lifetime.env.clone(),
        cwd: s.lifetime.cwd.clone(),
        user: s.lifetime.user.clone(),
    };
    let stopped = e2b.paused.save(&record).and_then(|()| ops.kill(id));
    if let Err(e) = stopped {
        // Still running: it is not paused.
        let _ = e2b.paused.remove(id);
        let _ = ops.remove_snapshot(&tag, RemoveSnapshot::default());
        return Err(e);
    }
    Ok(())
}

async fn connect(e2b: Arc<E2b>, id: String, c: ConnectRequest) -> Response {
    match blocking(move || connect_sandbox(&e2b, &id, c)).await {
        Ok((status, template, s)) => json(status, &created(&template, &s)),
        Err(e) => op_error(&e),
    }
}

/// A running sandbox as it is (its timeout only ever extended; 200), or a
/// paused one spawned from its snapshot under its own id with its token,
/// metadata and environment (201).
fn connect_sandbox(
    e2b: &E2b,
    id: &str,
    c: ConnectRequest,
) -> Result<(u16, String, Sandbox), OpError> {
    let ops = e2b.ops.as_ref();
    let ttl = c.timeout.map(Duration::from_secs);
    let running = |ops: &dyn Operations| -> Result<Option<Sandbox>, OpError> {
        match ops.sandbox(id) {
            Ok(s) if s.state == forkd_ops::SandboxState::Running => Ok(Some(s)),
            Ok(_) => Ok(None),
            Err(e) if e.kind == ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    };
    if let Some(s) = running(ops)? {
        if let (Some(ttl), Some(end)) = (ttl, s.lifetime.ends_at_ms) {
            let wanted =
                now_ms().saturating_add(i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX));
            if wanted > i64::try_from(end).unwrap_or(i64::MAX) {
                ops.set_timeout(id, Some(ttl))?;
            }
        }
        let s = ops.sandbox(id)?;
        return Ok((200, template_of(&s), s));
    }
    let _held = e2b.transitions.lock().unwrap_or_else(|p| p.into_inner());
    // Resumed by another call while this one waited.
    if let Some(s) = running(ops)? {
        return Ok((200, template_of(&s), s));
    }
    let Some(p) = e2b.paused.load(id)? else {
        return Err(not_found(format!("Paused sandbox {id} not found")));
    };
    if c.memory == Some(false) {
        return Err(OpError {
            kind: ErrorKind::BadInput,
            message: "forkd resumes a paused sandbox with its memory only; leave on_resume at \"restore\"".into(),
            hint: None,
        });
    }
    let settings = Settings {
        ttl: Some(ttl.unwrap_or(Duration::from_secs(
            forkd_e2b::control::DEFAULT_TIMEOUT_SECS,
        ))),
        labels: p.metadata.clone(),
        env: p.env.clone(),
        cwd: p.cwd.clone(),
        user: p.user.clone(),
        access_token: p.envd_access_token.clone(),
        ..Settings::default()
    };
    let mut req = SpawnRequest::new(&p.snapshot, 1);
    req.settings = settings;
    req.id = Some(id.to_owned());
    let out = ops.spawn(&req, &|_, _| {})?;
    let child = out.children.into_iter().next().ok_or_else(|| OpError {
        kind: ErrorKind::Internal,
        message: format!(
            "resuming sandbox {id} from snapshot `{}` returned no child",
            p.snapshot
        ),
        hint: None,
    })??;
    // It runs again; a record left behind would only list it twice (the
    // running one wins there).
    let _ = e2b.paused.remove(id);
    Ok((201, p.template_id, child.sandbox))
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
        // Children keep the source's metadata, default environment and user.
        let settings = Settings {
            ttl: Some(ttl),
            labels: source.lifetime.labels.clone(),
            env: source.lifetime.env.clone(),
            cwd: source.lifetime.cwd.clone(),
            user: source.lifetime.user.clone(),
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
