//! HTTP: listening (UNIX socket or TCP), routing by the route table,
//! authorization, body limits, concurrency caps, the audit log and request
//! metrics. Everything a route does is in [`crate::ops`].

use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use axum::extract::connect_info::{ConnectInfo, Connected};
use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::serve::IncomingStream;
use forkd_api::auth::{ListenAddr, ListenPolicy};
use forkd_api::limits::ConcurrencyLimit;
use forkd_api::routes::{Limit, Method, Route, ROUTES};
use forkd_api::ApiError;

use crate::ops::{Daemon, Reply};

/// Who is calling, for the audit log.
#[derive(Clone, Debug)]
pub struct Caller(pub String);

impl Connected<IncomingStream<'_, tokio::net::TcpListener>> for Caller {
    fn connect_info(stream: IncomingStream<'_, tokio::net::TcpListener>) -> Self {
        Caller(format!("tcp:{}", stream.remote_addr()))
    }
}

impl Connected<IncomingStream<'_, tokio::net::UnixListener>> for Caller {
    fn connect_info(stream: IncomingStream<'_, tokio::net::UnixListener>) -> Self {
        match stream.io().peer_cred() {
            Ok(c) => Caller(format!(
                "unix:uid={},pid={}",
                c.uid(),
                c.pid().map(|p| p.to_string()).unwrap_or_else(|| "?".into())
            )),
            Err(_) => Caller("unix:?".into()),
        }
    }
}

/// The server's shared state.
pub struct App {
    pub daemon: Arc<Daemon>,
    pub policy: ListenPolicy,
    pub spawn_limit: ConcurrencyLimit,
    pub branch_limit: ConcurrencyLimit,
    pub audit: Mutex<Option<std::fs::File>>,
    pub audit_path: PathBuf,
    /// Who may open the UNIX socket.
    pub socket_access: forkd_api::auth::SocketAccess,
    /// MCP's streamable HTTP transport over the same operations, at `/mcp`.
    pub mcp: forkd_mcp::StreamableHttpService<forkd_mcp::ForkdMcp, forkd_mcp::LocalSessionManager>,
}

/// Finds the route for `method` and `path`, with its path parameters. A
/// literal segment beats a parameter (`/v1/sandboxes/boot` is not sandbox
/// `boot`). `Err(true)` when the path exists under another method.
pub fn match_route(
    method: Method,
    path: &str,
) -> Result<(&'static Route, HashMap<&'static str, String>), bool> {
    let segs: Vec<&str> = path.trim_end_matches('/').split('/').collect();
    let mut best: Option<(&'static Route, HashMap<&'static str, String>)> = None;
    let mut other_method = false;
    for route in ROUTES {
        let pat: Vec<&str> = route.path.split('/').collect();
        if pat.len() != segs.len() {
            continue;
        }
        let mut params = HashMap::new();
        let ok = pat.iter().zip(&segs).all(|(p, s)| {
            match p.strip_prefix('{').and_then(|p| p.strip_suffix('}')) {
                Some(name) if !s.is_empty() => {
                    params.insert(name, s.to_string());
                    true
                }
                Some(_) => false,
                None => p == s,
            }
        });
        if !ok {
            continue;
        }
        if route.method != method {
            other_method = true;
            continue;
        }
        if best.as_ref().is_none_or(|(_, b)| params.len() < b.len()) {
            best = Some((route, params));
        }
    }
    best.ok_or(other_method)
}

fn method_of(m: &axum::http::Method) -> Option<Method> {
    Some(match *m {
        axum::http::Method::GET => Method::Get,
        axum::http::Method::POST => Method::Post,
        axum::http::Method::PUT => Method::Put,
        axum::http::Method::DELETE => Method::Delete,
        _ => return None,
    })
}

fn error_response(e: &ApiError) -> Response {
    let status = StatusCode::from_u16(e.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut r = (status, axum::Json(e.body())).into_response();
    if let Some(secs) = e.retry_after_secs() {
        r.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(secs));
    }
    if e.status() == 401 {
        r.headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    }
    r
}

fn reply_response(reply: Reply) -> Response {
    match reply {
        Reply::Json(s, v) => (
            StatusCode::from_u16(s).unwrap_or(StatusCode::OK),
            axum::Json(v),
        )
            .into_response(),
        Reply::Text(s, ct, text) => (
            StatusCode::from_u16(s).unwrap_or(StatusCode::OK),
            [(header::CONTENT_TYPE, ct)],
            text,
        )
            .into_response(),
        Reply::Stream(rx) => {
            use tokio_stream::StreamExt as _;
            let stream = tokio_stream::wrappers::ReceiverStream::new(rx)
                .map(Ok::<_, std::convert::Infallible>);
            (
                StatusCode::OK,
                [(header::CONTENT_TYPE, "application/x-ndjson")],
                axum::body::Body::from_stream(stream),
            )
                .into_response()
        }
        Reply::Streamed(st) => {
            use tokio_stream::StreamExt as _;
            let first = tokio_stream::iter(st.first.map(|d| Ok(axum::body::Bytes::from(d))));
            let rest = tokio_stream::wrappers::ReceiverStream::new(st.rest).map(|p| match p {
                crate::pipe::Piece::Data(d) => Ok(axum::body::Bytes::from(d)),
                // An error chunk makes the server break the body off, so
                // the client sees a truncated answer, never a short file.
                crate::pipe::Piece::Failed(e) => Err(std::io::Error::other(e.message)),
            });
            (
                StatusCode::OK,
                [(header::CONTENT_TYPE, st.content_type)],
                axum::body::Body::from_stream(first.chain(rest)),
            )
                .into_response()
        }
        Reply::Empty(s) => StatusCode::from_u16(s)
            .unwrap_or(StatusCode::NO_CONTENT)
            .into_response(),
    }
}

/// The one handler: every request goes through here.
pub async fn handle(
    State(app): State<Arc<App>>,
    ConnectInfo(caller): ConnectInfo<Caller>,
    req: Request,
) -> Response {
    let path = req.uri().path().to_string();
    let query = req.uri().query().map(str::to_string);
    let Some(method) = method_of(req.method()) else {
        return error_response(&ApiError::BadRequest(format!(
            "method {} is not used by this API",
            req.method()
        )));
    };
    let (route, params) = match match_route(method, &path) {
        Ok(found) => found,
        Err(true) => {
            return error_response(&ApiError::BadRequest(format!(
                "{} is not allowed on {path}; see /v1/openapi.json",
                method.as_str()
            )))
        }
        Err(false) => {
            return error_response(&ApiError::NotFound {
                what: "route",
                name: path,
            })
        }
    };
    let auth = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let target = params
        .get("id")
        .or_else(|| params.get("tag"))
        .cloned()
        .unwrap_or_default();
    // The route runs in a task of its own, audit line included: a client
    // that hangs up right after sending drops this handler's future, but
    // never the operation it asked for nor the record of it.
    let task_app = Arc::clone(&app);
    let task = tokio::spawn(async move {
        let app = task_app;
        let result = serve_route(&app, route, params, query, auth, req).await;
        let status = match &result {
            Ok(r) => r.status(),
            Err(e) => e.status(),
        };
        app.daemon.metrics.count_request(route.operation_id, status);
        if route.mutating {
            let now_ms = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0);
            let rec = forkd_api::audit::AuditRecord::new(
                now_ms,
                caller.0,
                route,
                target,
                result.as_ref().map(|r| r.status()),
            );
            let mut audit = app.audit.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(f) = audit.as_mut() {
                let _ = f.write_all(rec.to_line().as_bytes());
            }
        }
        result
    });
    match task.await {
        Ok(Ok(reply)) => reply_response(reply),
        Ok(Err(e)) => error_response(&e),
        Err(e) => error_response(&ApiError::Internal(format!(
            "the `{}` handler failed: {e}",
            route.operation_id
        ))),
    }
}

async fn serve_route(
    app: &Arc<App>,
    route: &'static Route,
    params: HashMap<&'static str, String>,
    query: Option<String>,
    auth: Option<String>,
    req: Request,
) -> Result<Reply, ApiError> {
    app.policy.authorize(route.auth, auth.as_deref())?;
    let (body, upload) = if route.stream_request.is_some() {
        (axum::body::Bytes::new(), Some(stream_body(req.into_body())))
    } else {
        (read_body(req.into_body(), route.body_limit).await?, None)
    };
    let permit = match route.limit {
        Some(Limit::Spawn) => Some(app.spawn_limit.try_acquire()?),
        Some(Limit::Branch) => Some(app.branch_limit.try_acquire()?),
        None => None,
    };
    let daemon = app.daemon.clone();
    let op = route.operation_id;
    let limit = route.body_limit;
    let joined = tokio::task::spawn_blocking(move || {
        let r = daemon.dispatch(op, &params, query.as_deref(), &body, limit, upload);
        drop(permit);
        r
    })
    .await;
    joined.unwrap_or_else(|e| {
        Err(ApiError::Internal(format!(
            "the `{op}` handler failed: {e}"
        )))
    })
}

/// How much of a body the server still reads (and drops) after it has
/// decided to refuse it, so that the client, which is still sending, gets
/// to read the answer instead of a broken pipe.
const DRAIN_LIMIT: usize = 64 << 20;

/// Reads a whole body of at most `limit` bytes.
async fn read_body(body: axum::body::Body, limit: usize) -> Result<axum::body::Bytes, ApiError> {
    use tokio_stream::StreamExt as _;
    let mut stream = body.into_data_stream();
    let mut buf: Vec<u8> = Vec::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| ApiError::BadRequest(format!("reading the body: {e}")))?;
        if buf.len() + chunk.len() > limit {
            drain(stream, DRAIN_LIMIT).await;
            return Err(ApiError::PayloadTooLarge { limit });
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(buf.into())
}

/// Reads and drops up to `limit` more bytes of a body.
async fn drain(mut stream: axum::body::BodyDataStream, limit: usize) {
    use tokio_stream::StreamExt as _;
    let mut seen = 0usize;
    while let Some(Ok(chunk)) = stream.next().await {
        seen += chunk.len();
        if seen > limit {
            return;
        }
    }
}

/// A request body as a blocking reader for the operation, fed as the
/// operation reads (at most a few chunks ahead). A body the client breaks
/// off ends the reader with an error, so a half upload is never taken for
/// a whole one. When the operation stops reading early (it failed), the
/// rest is drained so the client reads the answer.
fn stream_body(body: axum::body::Body) -> Box<dyn std::io::Read + Send> {
    let (reader, tx) = crate::pipe::BodyReader::new();
    tokio::spawn(async move {
        use tokio_stream::StreamExt as _;
        let mut stream = body.into_data_stream();
        while let Some(chunk) = stream.next().await {
            let piece = chunk
                .map(|b| b.to_vec())
                .map_err(|e| std::io::Error::other(format!("the upload broke off: {e}")));
            let failed = piece.is_err();
            if failed {
                let _ = tx.send(piece).await;
                return;
            }
            if tx.send(piece).await.is_err() {
                drain(stream, DRAIN_LIMIT).await;
                return;
            }
        }
    });
    Box::new(reader)
}

/// The MCP endpoint (streamable HTTP) behind the same bearer-token policy
/// as the `/v1` routes.
async fn mcp(State(app): State<Arc<App>>, req: Request) -> Response {
    let auth = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    if let Err(e) = app.policy.authorize(true, auth) {
        return error_response(&e);
    }
    use tower::ServiceExt as _;
    match app.mcp.clone().oneshot(req).await {
        Ok(r) => r.into_response(),
        Err(never) => match never {},
    }
}

/// Serves until SIGTERM/SIGINT.
pub async fn serve(app: Arc<App>) -> std::io::Result<()> {
    let router = axum::Router::new()
        .route("/mcp", axum::routing::any(mcp))
        .fallback(handle)
        .with_state(app.clone());
    {
        let d = app.daemon.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(std::time::Duration::from_millis(500)).await;
                let d = d.clone();
                let _ = tokio::task::spawn_blocking(move || d.fleet.housekeeping()).await;
            }
        });
    }
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let (stopping_tx, mut stopping) = tokio::sync::watch::channel(false);
    let shutdown = async move {
        tokio::select! {
            _ = term.recv() => {},
            _ = tokio::signal::ctrl_c() => {},
        }
        let _ = stopping_tx.send(true);
    };
    // Requests in flight get a grace period, not forever: an exec of a
    // command that never ends would otherwise hold the daemon up.
    let grace = async move {
        let _ = stopping.wait_for(|s| *s).await;
        tokio::time::sleep(SHUTDOWN_GRACE).await;
    };
    let socket = match app.policy.addr() {
        ListenAddr::Unix(path) => Some(path.clone()),
        ListenAddr::Tcp(_) => None,
    };
    let served = tokio::select! {
        r = serve_until(app, router, shutdown) => r,
        _ = grace => Ok(()),
    };
    if let Some(path) = socket {
        let _ = std::fs::remove_file(path);
    }
    served
}

/// How long requests in flight may go on after SIGTERM.
pub const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

async fn serve_until(
    app: Arc<App>,
    router: axum::Router,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    match app.policy.addr().clone() {
        ListenAddr::Unix(path) => {
            let listener = bind_unix(&path, &app.socket_access)?;
            let r = axum::serve(
                listener,
                router.into_make_service_with_connect_info::<Caller>(),
            )
            .with_graceful_shutdown(shutdown)
            .await;
            let _ = std::fs::remove_file(&path);
            r
        }
        ListenAddr::Tcp(addr) => {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|e| std::io::Error::new(e.kind(), format!("listening on {addr}: {e}")))?;
            axum::serve(
                listener,
                router.into_make_service_with_connect_info::<Caller>(),
            )
            .with_graceful_shutdown(shutdown)
            .await
        }
    }
}

/// Binds the UNIX socket with mode 0600 (0660 and the group for
/// [`SocketAccess::Group`]), replacing a stale socket file but refusing to
/// steal one a live daemon answers on.
///
/// [`SocketAccess::Group`]: forkd_api::auth::SocketAccess::Group
fn bind_unix(
    path: &std::path::Path,
    access: &forkd_api::auth::SocketAccess,
) -> std::io::Result<tokio::net::UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                format!("{} is in use by a running daemon", path.display()),
            ));
        }
        std::fs::remove_file(path)?;
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    // Created with no access for others from the start, then 0600.
    // SAFETY: umask only changes this process's file-creation mask.
    let old = unsafe { libc::umask(0o177) };
    let l = tokio::net::UnixListener::bind(path);
    // SAFETY: as above; restores the previous mask.
    unsafe { libc::umask(old) };
    let l = l.map_err(|e| {
        std::io::Error::new(e.kind(), format!("listening on {}: {e}", path.display()))
    })?;
    if let forkd_api::auth::SocketAccess::Group(name) = access {
        let gid = group_id(name)?;
        std::os::unix::fs::chown(path, None, Some(gid))?;
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(access.mode()))?;
    Ok(l)
}

/// The id of group `name` (or a numeric id).
pub fn group_id(name: &str) -> std::io::Result<u32> {
    if let Ok(gid) = name.parse::<u32>() {
        return Ok(gid);
    }
    let cname = std::ffi::CString::new(name).map_err(|_| {
        std::io::Error::new(std::io::ErrorKind::InvalidInput, "a group name has no NUL")
    })?;
    // SAFETY: getgrnam reads a NUL-terminated string and returns a pointer
    // to static storage or NULL; we copy the gid out at once, before any
    // other call could overwrite it (the daemon calls this once, at start).
    let gr = unsafe { libc::getgrnam(cname.as_ptr()) };
    if gr.is_null() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!("no group `{name}` (--socket-group)"),
        ));
    }
    // SAFETY: non-null pointer from getgrnam to a valid `struct group`.
    Ok(unsafe { (*gr).gr_gid })
}

/// Opens the audit log for appending.
pub fn open_audit(path: &std::path::Path) -> std::io::Result<std::fs::File> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_match_literals_before_parameters_and_report_wrong_methods() {
        let (r, p) = match_route(Method::Post, "/v1/sandboxes/boot").unwrap();
        assert_eq!((r.operation_id, p.len()), ("bootSandbox", 0));
        let (r, p) = match_route(Method::Get, "/v1/sandboxes/sb-1").unwrap();
        assert_eq!((r.operation_id, p["id"].as_str()), ("getSandbox", "sb-1"));
        let (r, p) = match_route(Method::Delete, "/v1/snapshots/a.b-c").unwrap();
        assert_eq!(
            (r.operation_id, p["tag"].as_str()),
            ("deleteSnapshot", "a.b-c")
        );
        let (r, _) = match_route(Method::Post, "/v1/sandboxes/").unwrap();
        assert_eq!(r.operation_id, "spawnSandboxes");
        assert!(match_route(Method::Put, "/v1/sandboxes").unwrap_err());
        assert!(!match_route(Method::Get, "/v2/nothing").unwrap_err());
        assert!(!match_route(Method::Get, "/v1/sandboxes//exec").unwrap_err());
        // Every route of the table is reachable at its own path.
        for route in ROUTES {
            let path = route.path.replace("{id}", "sb-x").replace("{tag}", "t");
            let (found, _) = match_route(route.method, &path).unwrap();
            assert_eq!(found.operation_id, route.operation_id, "{path}");
        }
    }
}
