//! The route table of the E2B API and how a request finds its sandbox.
//!
//! One listener serves both sides: the SDK sends `E2b-Sandbox-Id` (and
//! `E2b-Sandbox-Port`) on every request to a sandbox and never to the control
//! plane, so [`target`] decides the side from the headers alone, then [`find`]
//! picks the route within that side. Every route says how it authenticates
//! ([`Auth`]) and what kind of body it speaks ([`Kind`]); the server registers
//! exactly these (a test there should compare against [`ROUTES`]).

use crate::connect::{Code, ConnectError};
use crate::control::ApiError;

/// Header naming the sandbox of an envd or port request.
pub const SANDBOX_ID_HEADER: &str = "E2b-Sandbox-Id";
/// Header naming the port in the sandbox.
pub const SANDBOX_PORT_HEADER: &str = "E2b-Sandbox-Port";
/// envd's port (the SDK's `ConnectionConfig.envd_port`).
pub const ENVD_PORT: u16 = 49983;
/// The code interpreter's port (`e2b_code_interpreter` `JUPYTER_PORT`).
pub const CODE_INTERPRETER_PORT: u16 = 49999;
/// Header the code-interpreter SDK sends when the create answer had a
/// `trafficAccessToken`.
pub const TRAFFIC_TOKEN_HEADER: &str = "E2B-Traffic-Access-Token";
/// Longest sandbox id.
pub const MAX_SANDBOX_ID: usize = 64;

/// Which server a request is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Side {
    /// The control plane (`E2B_API_URL`).
    ControlPlane,
    /// A sandbox's envd (port 49983).
    Envd,
    /// A sandbox's code interpreter (port 49999), relayed into the guest.
    CodeInterpreter,
}

/// HTTP methods in the table.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Method {
    /// GET
    Get,
    /// POST
    Post,
    /// DELETE
    Delete,
}

impl Method {
    /// The method named `s` (upper case), if the table uses it.
    pub fn parse(s: &str) -> Option<Method> {
        match s {
            "GET" => Some(Method::Get),
            "POST" => Some(Method::Post),
            "DELETE" => Some(Method::Delete),
            _ => None,
        }
    }

    /// Upper-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            Method::Get => "GET",
            Method::Post => "POST",
            Method::Delete => "DELETE",
        }
    }
}

/// What a route's request and answer bodies are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// JSON in, JSON out; errors `{code: <status>, message}`.
    Json,
    /// Connect unary (`application/json`).
    ConnectUnary,
    /// Connect server stream (`application/connect+json`, one request
    /// envelope, many answer envelopes).
    ConnectServerStream,
    /// Connect client stream (many request envelopes, one answer).
    ConnectClientStream,
    /// Plain HTTP (`/files`, `/health`).
    Http,
    /// Relayed to a TCP port in the guest as it is.
    Relay,
}

/// How a route authenticates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Auth {
    /// `X-API-KEY` must match a configured key.
    ApiKey,
    /// `X-Access-Token` must match the sandbox's token.
    EnvdToken,
    /// The sandbox's access token in `X-Access-Token` or its traffic token
    /// in `E2B-Traffic-Access-Token` (the code-interpreter SDK sends the
    /// first only on `/execute` and the second on every call when the
    /// create answer had `trafficAccessToken`; docs/e2b-protocol.md §12.1).
    SandboxOrTrafficToken,
    /// None (`GET /health`, as envd does).
    Open,
}

/// One route.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Route {
    /// Which server.
    pub side: Side,
    /// HTTP method.
    pub method: Method,
    /// Path; `{id}` is one path segment.
    pub path: &'static str,
    /// Body kind.
    pub kind: Kind,
    /// Authentication.
    pub auth: Auth,
    /// The SDK calls that use it.
    pub sdk: &'static str,
}

const fn r(
    side: Side,
    method: Method,
    path: &'static str,
    kind: Kind,
    auth: Auth,
    sdk: &'static str,
) -> Route {
    Route {
        side,
        method,
        path,
        kind,
        auth,
        sdk,
    }
}

use Auth::*;
use Kind::*;
use Method::*;
use Side::*;

/// Every route of the E2B API forkd serves.
pub static ROUTES: &[Route] = &[
    // Control plane.
    r(
        ControlPlane,
        Post,
        "/v2/sandboxes",
        Json,
        ApiKey,
        "Sandbox.create",
    ),
    r(
        ControlPlane,
        Get,
        "/v2/sandboxes",
        Json,
        ApiKey,
        "Sandbox.list",
    ),
    r(
        ControlPlane,
        Get,
        "/sandboxes/{id}",
        Json,
        ApiKey,
        "get_info",
    ),
    r(
        ControlPlane,
        Delete,
        "/sandboxes/{id}",
        Json,
        ApiKey,
        "kill",
    ),
    r(
        ControlPlane,
        Post,
        "/sandboxes/{id}/timeout",
        Json,
        ApiKey,
        "set_timeout",
    ),
    r(
        ControlPlane,
        Post,
        "/sandboxes/{id}/pause",
        Json,
        ApiKey,
        "pause",
    ),
    r(
        ControlPlane,
        Post,
        "/v2/sandboxes/{id}/connect",
        Json,
        ApiKey,
        "Sandbox.connect, connect (resume)",
    ),
    r(
        ControlPlane,
        Post,
        "/sandboxes/{id}/fork",
        Json,
        ApiKey,
        "fork",
    ),
    // envd: process.Process.
    r(
        Envd,
        Post,
        "/process.Process/Start",
        ConnectServerStream,
        EnvdToken,
        "commands.run, pty.create",
    ),
    r(
        Envd,
        Post,
        "/process.Process/Connect",
        ConnectServerStream,
        EnvdToken,
        "commands.connect, pty.connect",
    ),
    r(
        Envd,
        Post,
        "/process.Process/List",
        ConnectUnary,
        EnvdToken,
        "commands.list",
    ),
    r(
        Envd,
        Post,
        "/process.Process/SendInput",
        ConnectUnary,
        EnvdToken,
        "commands.send_stdin, pty.send_stdin",
    ),
    r(
        Envd,
        Post,
        "/process.Process/StreamInput",
        ConnectClientStream,
        EnvdToken,
        "commands.stream_input, pty.stream_input",
    ),
    r(
        Envd,
        Post,
        "/process.Process/CloseStdin",
        ConnectUnary,
        EnvdToken,
        "commands.close_stdin",
    ),
    r(
        Envd,
        Post,
        "/process.Process/SendSignal",
        ConnectUnary,
        EnvdToken,
        "commands.kill, pty.kill",
    ),
    r(
        Envd,
        Post,
        "/process.Process/Update",
        ConnectUnary,
        EnvdToken,
        "pty.resize",
    ),
    // envd: filesystem.Filesystem.
    r(
        Envd,
        Post,
        "/filesystem.Filesystem/Stat",
        ConnectUnary,
        EnvdToken,
        "files.exists, files.get_info",
    ),
    r(
        Envd,
        Post,
        "/filesystem.Filesystem/ListDir",
        ConnectUnary,
        EnvdToken,
        "files.list",
    ),
    r(
        Envd,
        Post,
        "/filesystem.Filesystem/MakeDir",
        ConnectUnary,
        EnvdToken,
        "files.make_dir",
    ),
    r(
        Envd,
        Post,
        "/filesystem.Filesystem/Remove",
        ConnectUnary,
        EnvdToken,
        "files.remove",
    ),
    r(
        Envd,
        Post,
        "/filesystem.Filesystem/Move",
        ConnectUnary,
        EnvdToken,
        "files.rename",
    ),
    r(
        Envd,
        Post,
        "/filesystem.Filesystem/WatchDir",
        ConnectServerStream,
        EnvdToken,
        "files.watch_dir (async SDK)",
    ),
    r(
        Envd,
        Post,
        "/filesystem.Filesystem/CreateWatcher",
        ConnectUnary,
        EnvdToken,
        "files.watch_dir (sync SDK)",
    ),
    r(
        Envd,
        Post,
        "/filesystem.Filesystem/GetWatcherEvents",
        ConnectUnary,
        EnvdToken,
        "WatchHandle.get_new_events",
    ),
    r(
        Envd,
        Post,
        "/filesystem.Filesystem/RemoveWatcher",
        ConnectUnary,
        EnvdToken,
        "WatchHandle.stop",
    ),
    // envd: plain HTTP.
    r(Envd, Get, "/files", Http, EnvdToken, "files.read"),
    r(
        Envd,
        Post,
        "/files",
        Http,
        EnvdToken,
        "files.write, files.write_files",
    ),
    r(
        Envd,
        Get,
        "/health",
        Http,
        Open,
        "is_running, the SDK's failure probe",
    ),
    // Code interpreter (port 49999), relayed into the guest.
    r(
        CodeInterpreter,
        Post,
        "/execute",
        Relay,
        SandboxOrTrafficToken,
        "run_code",
    ),
    r(
        CodeInterpreter,
        Post,
        "/contexts",
        Relay,
        SandboxOrTrafficToken,
        "create_code_context",
    ),
    r(
        CodeInterpreter,
        Get,
        "/contexts",
        Relay,
        SandboxOrTrafficToken,
        "list_code_contexts",
    ),
    r(
        CodeInterpreter,
        Post,
        "/contexts/{id}/restart",
        Relay,
        SandboxOrTrafficToken,
        "restart_code_context",
    ),
    r(
        CodeInterpreter,
        Delete,
        "/contexts/{id}",
        Relay,
        SandboxOrTrafficToken,
        "remove_code_context",
    ),
    r(
        CodeInterpreter,
        Get,
        "/health",
        Relay,
        Open,
        "(server health)",
    ),
];

/// Whether `id` can be a sandbox id: `[A-Za-z0-9._-]{1,64}`, not starting
/// with `.`.
pub fn is_valid_sandbox_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_SANDBOX_ID
        && !id.starts_with('.')
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// Where a request goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// The control plane.
    ControlPlane,
    /// A sandbox's envd or code interpreter.
    Sandbox {
        /// The sandbox id (syntax checked, existence not).
        id: String,
        /// Envd or code interpreter.
        side: Side,
    },
}

/// A request the router cannot send anywhere.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    /// `E2b-Sandbox-Id` is not an id forkd could have made.
    #[error("the E2b-Sandbox-Id header {id:?} is not a sandbox id")]
    BadSandboxId {
        /// What was sent (cut to 80 characters).
        id: String,
    },
    /// A port header that is not a number.
    #[error("the E2b-Sandbox-Port header {port:?} is not a port number")]
    BadPort {
        /// What was sent.
        port: String,
    },
    /// A port nothing listens on.
    #[error("sandbox {id}: port is not open ({port}); forkd serves envd on {ENVD_PORT} and the code interpreter on {CODE_INTERPRETER_PORT}")]
    PortNotOpen {
        /// The sandbox.
        id: String,
        /// The port asked for.
        port: u16,
    },
    /// No route with this path on this side.
    #[error("no such route: {method} {path}")]
    NotFound {
        /// Which server.
        side: Side,
        /// The method.
        method: String,
        /// The path.
        path: String,
    },
    /// The path exists with other methods.
    #[error("{method} is not allowed on {path}; use {allowed}")]
    MethodNotAllowed {
        /// Which server.
        side: Side,
        /// The method.
        method: String,
        /// The path.
        path: String,
        /// The methods the path takes, comma-separated.
        allowed: String,
    },
}

impl RouteError {
    /// The answer: status, content type, body — in the error format the SDK
    /// expects on that side (§7 of docs/e2b-protocol.md).
    pub fn response(&self) -> (u16, &'static str, Vec<u8>) {
        match self {
            RouteError::BadSandboxId { .. } | RouteError::BadPort { .. } => (
                400,
                "application/json",
                crate::envd::files::error_body(400, &self.to_string()),
            ),
            // The SDK maps 502 + "port is not open" to SandboxUnreachableException.
            RouteError::PortNotOpen { .. } => (
                502,
                "application/json",
                crate::envd::files::error_body(502, &self.to_string()),
            ),
            RouteError::NotFound {
                side: ControlPlane, ..
            } => (
                404,
                "application/json",
                ApiError::new(404, self.to_string()).to_json(),
            ),
            RouteError::MethodNotAllowed {
                side: ControlPlane, ..
            } => (
                405,
                "application/json",
                ApiError::new(405, self.to_string()).to_json(),
            ),
            RouteError::NotFound {
                side: Envd, path, ..
            } if path.starts_with("/process.") || path.starts_with("/filesystem.") => {
                let e = ConnectError::new(Code::Unimplemented, self.to_string());
                (e.http_status(), "application/json", e.to_json())
            }
            RouteError::NotFound { .. } => (
                404,
                "application/json",
                crate::envd::files::error_body(404, &self.to_string()),
            ),
            RouteError::MethodNotAllowed { .. } => (
                405,
                "application/json",
                crate::envd::files::error_body(405, &self.to_string()),
            ),
        }
    }
}

/// The answer to an envd or port request for a sandbox that does not exist
/// or no longer runs: 502 with "was not found", which the SDK turns into
/// `SandboxNotRunningException` (and `is_running() == False`).
pub fn sandbox_not_running_response(id: &str) -> (u16, &'static str, Vec<u8>) {
    (
        502,
        "application/json",
        crate::envd::files::error_body(502, &format!("The sandbox {id} was not found")),
    )
}

/// Decides the side from the routing headers: no `E2b-Sandbox-Id` → control
/// plane; else the port (default envd).
pub fn target(sandbox_id: Option<&str>, sandbox_port: Option<&str>) -> Result<Target, RouteError> {
    let Some(id) = sandbox_id else {
        return Ok(Target::ControlPlane);
    };
    let id = id.trim();
    if !is_valid_sandbox_id(id) {
        return Err(RouteError::BadSandboxId {
            id: id.chars().take(80).collect(),
        });
    }
    let port = match sandbox_port.map(str::trim) {
        None => ENVD_PORT,
        Some(p) => p.parse::<u16>().map_err(|_| RouteError::BadPort {
            port: p.chars().take(20).collect(),
        })?,
    };
    let side = match port {
        ENVD_PORT => Envd,
        CODE_INTERPRETER_PORT => CodeInterpreter,
        port => {
            return Err(RouteError::PortNotOpen {
                id: id.to_owned(),
                port,
            })
        }
    };
    Ok(Target::Sandbox {
        id: id.to_owned(),
        side,
    })
}

/// A matched route and its `{id}` parameter.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RouteMatch {
    /// The route.
    pub route: &'static Route,
    /// The value of `{id}` when the path has one.
    pub id: Option<String>,
}

fn match_path(pattern: &str, path: &str) -> Option<Option<String>> {
    let mut id = None;
    let mut pat = pattern.split('/');
    let mut got = path.split('/');
    loop {
        match (pat.next(), got.next()) {
            (None, None) => return Some(id),
            (Some("{id}"), Some(seg)) if !seg.is_empty() => {
                let seg = percent_encoding::percent_decode_str(seg)
                    .decode_utf8()
                    .ok()?;
                id = Some(seg.into_owned());
            }
            (Some(p), Some(s)) if p == s => {}
            _ => return None,
        }
    }
}

/// Finds the route for `method path` (the path without its query) on `side`.
pub fn find(side: Side, method: &str, path: &str) -> Result<RouteMatch, RouteError> {
    let candidates: Vec<(&'static Route, Option<String>)> = ROUTES
        .iter()
        .filter(|r| r.side == side)
        .filter_map(|r| match_path(r.path, path).map(|id| (r, id)))
        .collect();
    if candidates.is_empty() {
        return Err(RouteError::NotFound {
            side,
            method: method.chars().take(16).collect(),
            path: path.chars().take(200).collect(),
        });
    }
    let wanted = Method::parse(method);
    if let Some((route, id)) = candidates.iter().find(|(r, _)| Some(r.method) == wanted) {
        return Ok(RouteMatch {
            route,
            id: id.clone(),
        });
    }
    let allowed: Vec<&str> = candidates.iter().map(|(r, _)| r.method.as_str()).collect();
    Err(RouteError::MethodNotAllowed {
        side,
        method: method.chars().take(16).collect(),
        path: path.chars().take(200).collect(),
        allowed: allowed.join(", "),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The procedures of the service descriptors in `e2b/envd/process/
    /// process_pb.py` and `filesystem_pb.py` (e2b 2.63.0), with their kinds.
    const SERVICES: &[(&str, Kind)] = &[
        ("/process.Process/List", ConnectUnary),
        ("/process.Process/Connect", ConnectServerStream),
        ("/process.Process/Start", ConnectServerStream),
        ("/process.Process/Update", ConnectUnary),
        ("/process.Process/StreamInput", ConnectClientStream),
        ("/process.Process/SendInput", ConnectUnary),
        ("/process.Process/SendSignal", ConnectUnary),
        ("/process.Process/CloseStdin", ConnectUnary),
        ("/filesystem.Filesystem/Stat", ConnectUnary),
        ("/filesystem.Filesystem/MakeDir", ConnectUnary),
        ("/filesystem.Filesystem/Move", ConnectUnary),
        ("/filesystem.Filesystem/ListDir", ConnectUnary),
        ("/filesystem.Filesystem/Remove", ConnectUnary),
        ("/filesystem.Filesystem/WatchDir", ConnectServerStream),
        ("/filesystem.Filesystem/CreateWatcher", ConnectUnary),
        ("/filesystem.Filesystem/GetWatcherEvents", ConnectUnary),
        ("/filesystem.Filesystem/RemoveWatcher", ConnectUnary),
    ];

    #[test]
    fn every_envd_procedure_is_routed_once_with_its_kind() {
        for (path, kind) in SERVICES {
            let routes: Vec<_> = ROUTES.iter().filter(|r| r.path == *path).collect();
            assert_eq!(routes.len(), 1, "{path}");
            assert_eq!(routes[0].kind, *kind, "{path}");
            assert_eq!(routes[0].auth, EnvdToken, "{path}");
        }
        let connect_routes = ROUTES
            .iter()
            .filter(|r| {
                matches!(
                    r.kind,
                    ConnectUnary | ConnectServerStream | ConnectClientStream
                )
            })
            .count();
        assert_eq!(connect_routes, SERVICES.len());
    }

    #[test]
    fn no_two_routes_collide() {
        for (i, a) in ROUTES.iter().enumerate() {
            for b in &ROUTES[i + 1..] {
                assert!(
                    !(a.side == b.side && a.method == b.method && a.path == b.path),
                    "{a:?}"
                );
            }
        }
    }

    /// (headers, method, path) of every request the SDK sent in the capture
    /// behind docs/e2b-protocol.md, and the route it must reach.
    #[test]
    fn captured_requests_reach_their_routes() {
        type Case = (
            Option<&'static str>,
            Option<&'static str>,
            &'static str,
            &'static str,
            &'static str,
        );
        let cases: &[Case] = &[
            (None, None, "POST", "/v2/sandboxes", "/v2/sandboxes"),
            (None, None, "GET", "/v2/sandboxes", "/v2/sandboxes"),
            (None, None, "GET", "/sandboxes/sbx-1", "/sandboxes/{id}"),
            (None, None, "DELETE", "/sandboxes/sbx-1", "/sandboxes/{id}"),
            (
                None,
                None,
                "POST",
                "/sandboxes/sbx-1/timeout",
                "/sandboxes/{id}/timeout",
            ),
            (
                None,
                None,
                "POST",
                "/sandboxes/sbx-1/pause",
                "/sandboxes/{id}/pause",
            ),
            (
                None,
                None,
                "POST",
                "/v2/sandboxes/sbx-1/connect",
                "/v2/sandboxes/{id}/connect",
            ),
            (
                None,
                None,
                "POST",
                "/sandboxes/sbx-1/fork",
                "/sandboxes/{id}/fork",
            ),
            (Some("sbx-1"), Some("49983"), "GET", "/health", "/health"),
            (
                Some("sbx-1"),
                Some("49983"),
                "POST",
                "/process.Process/Start",
                "/process.Process/Start",
            ),
            (Some("sbx-1"), Some("49983"), "POST", "/files", "/files"),
            (Some("sbx-1"), Some("49983"), "GET", "/files", "/files"),
            (
                Some("sbx-1"),
                Some("49983"),
                "POST",
                "/filesystem.Filesystem/ListDir",
                "/filesystem.Filesystem/ListDir",
            ),
            (Some("sbx-1"), Some("49999"), "POST", "/execute", "/execute"),
            (
                Some("sbx-1"),
                Some("49999"),
                "POST",
                "/contexts",
                "/contexts",
            ),
            (
                Some("sbx-1"),
                Some("49999"),
                "GET",
                "/contexts",
                "/contexts",
            ),
            (
                Some("sbx-1"),
                Some("49999"),
                "POST",
                "/contexts/c1/restart",
                "/contexts/{id}/restart",
            ),
            (
                Some("sbx-1"),
                Some("49999"),
                "DELETE",
                "/contexts/c1",
                "/contexts/{id}",
            ),
        ];
        for (sid, port, method, path, want) in cases {
            let side = match target(*sid, *port).unwrap() {
                Target::ControlPlane => ControlPlane,
                Target::Sandbox { id, side } => {
                    assert_eq!(id, "sbx-1");
                    side
                }
            };
            let m = find(side, method, path).unwrap();
            assert_eq!(m.route.path, *want, "{method} {path}");
            if want.contains("{id}") {
                assert!(matches!(m.id.as_deref(), Some("sbx-1") | Some("c1")));
            }
        }
    }

    #[test]
    fn bad_input_gets_the_status_the_sdk_expects() {
        assert_eq!(
            target(Some("sbx-1"), None).unwrap(),
            Target::Sandbox {
                id: "sbx-1".into(),
                side: Envd
            }
        );
        let e = target(Some("sbx-1"), Some("8080")).unwrap_err();
        let (status, _, body) = e.response();
        assert_eq!(status, 502);
        assert!(String::from_utf8(body)
            .unwrap()
            .contains("port is not open"));
        for bad in ["", "../etc", ".x", "a b", &"x".repeat(65)] {
            assert_eq!(
                target(Some(bad), None).unwrap_err().response().0,
                400,
                "{bad:?}"
            );
        }
        assert_eq!(
            target(Some("sbx-1"), Some("http"))
                .unwrap_err()
                .response()
                .0,
            400
        );
        let (status, _, body) = sandbox_not_running_response("sbx-9");
        assert_eq!(status, 502);
        assert!(String::from_utf8(body).unwrap().contains("was not found"));

        let e = find(ControlPlane, "GET", "/nope").unwrap_err();
        let (status, _, body) = e.response();
        assert_eq!(status, 404);
        let parsed: ApiError = serde_json::from_slice(&body).unwrap();
        assert_eq!(parsed.code, 404);
        let e = find(ControlPlane, "PUT", "/sandboxes/x").unwrap_err();
        assert!(
            matches!(&e, RouteError::MethodNotAllowed { allowed, .. } if allowed == "GET, DELETE")
        );
        assert_eq!(e.response().0, 405);
        let e = find(Envd, "POST", "/process.Process/Nope").unwrap_err();
        let (status, _, body) = e.response();
        assert_eq!(status, 501);
        let parsed: ConnectError = serde_json::from_slice(&body).unwrap();
        assert_eq!(parsed.code, Code::Unimplemented);
        assert_eq!(
            find(Envd, "GET", "/process.Process/Start")
                .unwrap_err()
                .response()
                .0,
            405
        );
        assert_eq!(
            find(Envd, "POST", "/sandboxes/x").unwrap_err().response().0,
            404
        );
        assert!(find(ControlPlane, "GET", "/sandboxes/").is_err());
        assert!(find(ControlPlane, "GET", "/sandboxes/a/b").is_err());
        assert_eq!(
            find(ControlPlane, "GET", "/sandboxes/a%2Fb")
                .unwrap()
                .id
                .as_deref(),
            Some("a/b")
        );
    }

    proptest! {
        #[test]
        fn routing_never_panics(id in proptest::option::of(".{0,100}"), port in proptest::option::of(".{0,10}"), method in "[A-Z]{0,8}", path in "(/[a-zA-Z0-9.%{}_-]{0,12}){0,5}") {
            if let Ok(t) = target(id.as_deref(), port.as_deref()) {
                let side = match t { Target::ControlPlane => ControlPlane, Target::Sandbox { side, .. } => side };
                if let Err(e) = find(side, &method, &path) {
                    let (status, _, _) = e.response();
                    prop_assert!((400..600).contains(&status));
                }
            }
        }
    }
}
