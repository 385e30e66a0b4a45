//! The E2B-compatible API (issue 13): `forkd daemon --e2b-listen` serves the
//! control plane E2B's SDK calls (`E2B_API_URL`) and every sandbox's envd
//! (`E2B_SANDBOX_URL`, routed by the `E2b-Sandbox-Id` header) on one
//! listener, as a thin adapter over the operations seam.
//!
//! The protocol (wire types, the Connect codec, the route table, tokens,
//! paging) is `forkd-e2b`'s; this module only binds the listener, checks the
//! API key or the sandbox's access token, calls [`Operations`] on a blocking
//! thread and writes the answer. It decides no policy: defaults are the
//! seam's. A sandbox's envd access token is made here (OS randomness) and
//! kept by the fleet with the sandbox's record (`Settings::access_token`).

mod control;
mod envd;
mod interpreter;
mod paused;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use forkd_api::auth::ListenAddr;
use forkd_e2b::routes::{self, Auth, Side, Target};
use forkd_e2b::token::{AccessToken, ApiKeys, TokenError, ACCESS_TOKEN_RANDOM_BYTES};
use forkd_ops::{ErrorKind, OpError, Operations};

/// How the E2B API listens and whom it lets in.
#[derive(Clone, Debug)]
pub struct E2bOptions {
    /// `tcp:HOST:PORT` or `unix:PATH`.
    pub listen: ListenAddr,
    /// The control plane's API keys; `None` lets any key in (loopback and
    /// UNIX sockets only).
    pub api_keys: Option<ApiKeys>,
}

/// Why the E2B API did not start.
#[derive(Debug, thiserror::Error)]
pub enum E2bError {
    #[error("the E2B API listens on {addr}, which is not loopback: give --e2b-api-key-file with at least one key, or listen on 127.0.0.1")]
    KeyRequired { addr: SocketAddr },
    #[error("the E2B API key file {path}: {source}")]
    KeyFile {
        path: String,
        source: std::io::Error,
    },
    #[error("the E2B API key file {path}: {source}")]
    Keys { path: String, source: TokenError },
}

impl E2bOptions {
    /// Options for `listen`, with the keys of `key_file` (one per line).
    /// A TCP address off loopback needs keys.
    pub fn new(
        listen: ListenAddr,
        key_file: Option<&std::path::Path>,
    ) -> Result<E2bOptions, E2bError> {
        let api_keys = match key_file {
            Some(p) => {
                let text = std::fs::read_to_string(p).map_err(|source| E2bError::KeyFile {
                    path: p.display().to_string(),
                    source,
                })?;
                Some(
                    ApiKeys::from_file_contents(&text).map_err(|source| E2bError::Keys {
                        path: p.display().to_string(),
                        source,
                    })?,
                )
            }
            None => None,
        };
        if let ListenAddr::Tcp(addr) = &listen {
            if api_keys.is_none() && !addr.ip().is_loopback() {
                return Err(E2bError::KeyRequired { addr: *addr });
            }
        }
        Ok(E2bOptions { listen, api_keys })
    }
}

/// What every handler shares.
pub struct E2b {
    pub ops: Arc<dyn Operations>,
    pub api_keys: Option<ApiKeys>,
    /// Records of paused sandboxes.
    pub(crate) paused: paused::PausedStore,
    /// Held while a sandbox is paused or resumed, so that two calls never
    /// pause or resume the same sandbox at once.
    pub(crate) transitions: std::sync::Mutex<()>,
}

impl E2b {
    /// The shared state over `ops`; paused sandboxes are recorded under
    /// `home` (`$FORKD_HOME/e2b-paused`).
    pub fn new(ops: Arc<dyn Operations>, api_keys: Option<ApiKeys>, home: &std::path::Path) -> E2b {
        E2b {
            ops,
            api_keys,
            paused: paused::PausedStore::new(home.join("e2b-paused")),
            transitions: std::sync::Mutex::new(()),
        }
    }
}

/// A fresh envd access token from OS randomness.
pub(crate) fn new_access_token() -> Result<AccessToken, OpError> {
    let mut bytes = [0u8; ACCESS_TOKEN_RANDOM_BYTES];
    getrandom::getrandom(&mut bytes).map_err(|e| OpError {
        kind: ErrorKind::Internal,
        message: format!("could not read OS randomness for an access token: {e}"),
        hint: None,
    })?;
    Ok(AccessToken::from_random(&bytes))
}

/// The router of the E2B listener (one fallback handler: the route table
/// of `forkd-e2b` decides).
pub fn router(state: Arc<E2b>) -> axum::Router {
    axum::Router::new().fallback(handle).with_state(state)
}

/// Serves the E2B API on `opts.listen` until `shutdown` resolves.
pub async fn serve(
    state: Arc<E2b>,
    listen: ListenAddr,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let sweeper = state.clone();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(control::SWEEP_EVERY).await;
            let e2b = sweeper.clone();
            let _ = tokio::task::spawn_blocking(move || control::sweep_pause_snapshots(&e2b)).await;
        }
    });
    let app = router(state);
    match listen {
        ListenAddr::Tcp(addr) => {
            let l = tokio::net::TcpListener::bind(addr).await.map_err(|e| {
                std::io::Error::new(e.kind(), format!("E2B API: listening on {addr}: {e}"))
            })?;
            axum::serve(l, app).with_graceful_shutdown(shutdown).await
        }
        ListenAddr::Unix(path) => {
            if path.exists() {
                std::fs::remove_file(&path)?;
            }
            let l = tokio::net::UnixListener::bind(&path).map_err(|e| {
                std::io::Error::new(
                    e.kind(),
                    format!("E2B API: listening on {}: {e}", path.display()),
                )
            })?;
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
            let r = axum::serve(l, app).with_graceful_shutdown(shutdown).await;
            let _ = std::fs::remove_file(&path);
            r
        }
    }
}

/// A response with a status, a content type and a body.
pub(crate) fn reply(status: u16, content_type: &'static str, body: Vec<u8>) -> Response {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (status, [(header::CONTENT_TYPE, content_type)], body).into_response()
}

fn header_str<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// Runs a blocking seam call off the async threads.
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, OpError> + Send + 'static,
) -> Result<T, OpError> {
    tokio::task::spawn_blocking(f).await.unwrap_or_else(|e| {
        Err(OpError {
            kind: ErrorKind::Internal,
            message: format!("the call to the fleet failed: {e}"),
            hint: None,
        })
    })
}

/// The one handler: routes by header and path, authenticates, dispatches.
async fn handle(State(e2b): State<Arc<E2b>>, req: Request) -> Response {
    let headers = req.headers().clone();
    let target = match routes::target(
        header_str(&headers, routes::SANDBOX_ID_HEADER),
        header_str(&headers, routes::SANDBOX_PORT_HEADER),
    ) {
        Ok(t) => t,
        Err(e) => {
            let (s, ct, b) = e.response();
            return reply(s, ct, b);
        }
    };
    let (side, sandbox) = match target {
        Target::ControlPlane => (Side::ControlPlane, None),
        Target::Sandbox { id, side } => (side, Some(id)),
    };
    let method = req.method().as_str().to_owned();
    let path = req.uri().path().to_owned();
    let query = req.uri().query().unwrap_or("").to_owned();
    let found = match routes::find(side, &method, &path) {
        Ok(m) => m,
        Err(e) => {
            let (s, ct, b) = e.response();
            return reply(s, ct, b);
        }
    };
    match found.route.auth {
        Auth::ApiKey => {
            if let Some(keys) = &e2b.api_keys {
                if let Err(e) = keys.verify(header_str(&headers, ApiKeys::HEADER)) {
                    drain(req).await;
                    return control::api_error(e.http_status(), e.to_string());
                }
            }
        }
        Auth::EnvdToken | Auth::SandboxOrTrafficToken => {
            let id = sandbox.clone().unwrap_or_default();
            let traffic = match found.route.auth {
                Auth::SandboxOrTrafficToken => header_str(&headers, routes::TRAFFIC_TOKEN_HEADER),
                _ => None,
            };
            let presented = header_str(&headers, AccessToken::HEADER)
                .or(traffic)
                .map(str::to_owned);
            let ops = e2b.ops.clone();
            let id2 = id.clone();
            let stored = blocking(move || ops.sandbox(&id2)).await;
            let running = matches!(&stored, Ok(s) if s.state == forkd_ops::SandboxState::Running);
            if !running {
                drain(req).await;
                let (s, ct, b) = routes::sandbox_not_running_response(&id);
                return reply(s, ct, b);
            }
            let token = stored
                .ok()
                .and_then(|s| s.access_token)
                .ok_or(TokenError::Mismatch {
                    header: AccessToken::HEADER,
                })
                .and_then(|t| AccessToken::parse(&t));
            if let Err(e) = token.and_then(|t| t.verify(presented.as_deref())) {
                drain(req).await;
                return envd::unauthenticated(&found.route.kind, &e.to_string());
            }
        }
        // envd's /health needs no token, but a sandbox that is not running
        // has no envd to answer (the SDK's `is_running` reads the 502).
        Auth::Open if side == Side::ControlPlane => {}
        Auth::Open => {
            let id = sandbox.clone().unwrap_or_default();
            let ops = e2b.ops.clone();
            let id2 = id.clone();
            let running = matches!(
                blocking(move || ops.sandbox(&id2)).await,
                Ok(s) if s.state == forkd_ops::SandboxState::Running
            );
            if !running {
                drain(req).await;
                let (s, ct, b) = routes::sandbox_not_running_response(&id);
                return reply(s, ct, b);
            }
        }
    }
    match side {
        Side::ControlPlane => control::dispatch(e2b, found, &query, req).await,
        Side::Envd => envd::dispatch(e2b, sandbox.unwrap_or_default(), found, &query, req).await,
        Side::CodeInterpreter => {
            interpreter::dispatch(e2b, sandbox.unwrap_or_default(), found, req).await
        }
    }
}

/// Reads (and drops) what is left of a refused request's body, up to
/// [`DRAIN_LIMIT`] bytes and [`DRAIN_TIME`]: answered before its body was
/// read, hyper closes the connection while the client is still writing, and
/// the client sees a broken pipe instead of the refusal.
async fn drain(req: Request) {
    let _ = tokio::time::timeout(
        DRAIN_TIME,
        axum::body::to_bytes(req.into_body(), DRAIN_LIMIT),
    )
    .await;
}

/// Most bytes of a refused request read before answering.
const DRAIN_LIMIT: usize = 1 << 20;
/// Longest wait for them.
const DRAIN_TIME: std::time::Duration = std::time::Duration::from_secs(2);

/// The body of a request, bounded.
pub(crate) async fn read_body(body: Body, limit: usize) -> Result<bytes::Bytes, String> {
    axum::body::to_bytes(body, limit)
        .await
        .map_err(|e| format!("the request body could not be read (at most {limit} bytes): {e}"))
}
