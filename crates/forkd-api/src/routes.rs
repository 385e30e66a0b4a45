//! The route table: the single source of truth for what the daemon serves.
//!
//! The server registers one handler per [`Route`] in [`ROUTES`] (and a test
//! there checks it registered exactly these); [`openapi`] builds the OpenAPI
//! document from the same table and from the types' derived JSON schemas, so
//! the document cannot drift from the routes. The committed copy is
//! `docs/openapi.json`; a test here fails when it is stale and says how to
//! regenerate it.

use schemars::gen::SchemaSettings;
use serde_json::{json, Map, Value};

use crate::decode::{DEFAULT_BODY_LIMIT, FILE_BODY_LIMIT};
use crate::error::ErrorBody;
use crate::types::*;

/// An HTTP method the API uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Method {
    /// `GET`
    Get,
    /// `POST`
    Post,
    /// `PUT`
    Put,
    /// `DELETE`
    Delete,
}

impl Method {
    /// The upper-case method name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Get => "GET",
            Self::Post => "POST",
            Self::Put => "PUT",
            Self::Delete => "DELETE",
        }
    }

    fn openapi_key(self) -> &'static str {
        match self {
            Self::Get => "get",
            Self::Post => "post",
            Self::Put => "put",
            Self::Delete => "delete",
        }
    }
}

/// What a request or response body is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Body {
    /// A JSON object of the named component schema.
    Json(&'static str),
    /// A JSON array of the named component schema.
    JsonArray(&'static str),
    /// Newline-delimited JSON objects of the named schema, streamed as they
    /// happen (`application/x-ndjson`).
    NdJson(&'static str),
    /// Prometheus text exposition (`GET /metrics`).
    PrometheusText,
    /// An OpenAPI document (`GET /v1/openapi.json`).
    OpenApi,
    /// Raw bytes (`application/octet-stream`), streamed.
    Octet,
    /// A tar archive (`application/x-tar`), streamed.
    Tar,
}

/// One documented answer of a route.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Response {
    /// HTTP status.
    pub status: u16,
    /// When this status is sent.
    pub description: &'static str,
    /// The body; errors (4xx, 5xx) always carry an [`ErrorBody`].
    pub body: Option<Body>,
}

/// Which concurrency limit a route takes a permit from (429 when none is left).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Limit {
    /// Spawning and booting sandboxes.
    Spawn,
    /// Branching sandboxes.
    Branch,
}

/// One route of the API.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Route {
    /// HTTP method.
    pub method: Method,
    /// Path, axum style: parameters are `{id}` and `{tag}`.
    pub path: &'static str,
    /// Unique name of the operation; also the audit log's `operation`.
    pub operation_id: &'static str,
    /// One line on what it does.
    pub summary: &'static str,
    /// The OpenAPI tag grouping it.
    pub group: &'static str,
    /// Whether it changes state, and so is written to the audit log.
    pub mutating: bool,
    /// Whether it needs the bearer token when one is configured.
    pub auth: bool,
    /// The JSON request body, if it takes one.
    pub request: Option<&'static str>,
    /// A raw request body ([`Body::Octet`] or [`Body::Tar`]) that the
    /// server streams to the operation instead of buffering, so it has no
    /// size cap.
    pub stream_request: Option<Body>,
    /// The query-string type (a component schema), if it takes one.
    pub query: Option<&'static str>,
    /// Largest accepted body, in bytes.
    pub body_limit: usize,
    /// The concurrency limit it is subject to.
    pub limit: Option<Limit>,
    /// Its success and route-specific error answers. 400, 401, 413, 429 and 500
    /// are added to the document from the other fields.
    pub responses: &'static [Response],
}

impl Route {
    /// Names of the path parameters, in order (`["id"]` for
    /// `/v1/sandboxes/{id}/exec`).
    pub fn path_params(&self) -> impl Iterator<Item = &'static str> {
        self.path
            .split('/')
            .filter_map(|seg| seg.strip_prefix('{')?.strip_suffix('}'))
    }
}

const fn route(
    method: Method,
    path: &'static str,
    operation_id: &'static str,
    summary: &'static str,
    group: &'static str,
) -> Route {
    Route {
        method,
        path,
        operation_id,
        summary,
        group,
        mutating: false,
        auth: true,
        request: None,
        stream_request: None,
        query: None,
        body_limit: DEFAULT_BODY_LIMIT,
        limit: None,
        responses: &[],
    }
}

const fn ok(status: u16, description: &'static str, body: Body) -> Response {
    Response {
        status,
        description,
        body: Some(body),
    }
}

const fn no_body(status: u16, description: &'static str) -> Response {
    Response {
        status,
        description,
        body: None,
    }
}

const SANDBOX_404: Response = no_body(404, "No sandbox with this id.");
const SNAPSHOT_404: Response = no_body(404, "No snapshot with this tag.");
const SANDBOX_NOT_RUNNING: Response = no_body(409, "The sandbox is not running.");
const GUEST_PATH_404: Response = no_body(
    404,
    "No sandbox with this id, or no such path in the guest.",
);
const GUEST_403: Response = no_body(403, "The guest refused the access (its permissions).");
const PROCESS_404: Response = no_body(404, "No sandbox with this id, or no such process.");

/// Every route the daemon serves.
pub const ROUTES: &[Route] = &[
    Route {
        auth: false,
        responses: &[ok(200, "The daemon is up.", Body::Json("HealthResponse"))],
        ..route(
            Method::Get,
            "/healthz",
            "health",
            "Liveness probe; needs no token.",
            "status",
        )
    },
    Route {
        responses: &[ok(200, "forkd's version.", Body::Json("VersionResponse"))],
        ..route(
            Method::Get,
            "/version",
            "version",
            "forkd and API versions.",
            "status",
        )
    },
    Route {
        responses: &[ok(
            200,
            "Prometheus text exposition, version 0.0.4.",
            Body::PrometheusText,
        )],
        ..route(
            Method::Get,
            "/metrics",
            "metrics",
            "Sandbox and snapshot counts; spawn, branch-pause and exec latency histograms.",
            "status",
        )
    },
    Route {
        responses: &[ok(200, "This document.", Body::OpenApi)],
        ..route(
            Method::Get,
            "/v1/openapi.json",
            "openapi",
            "The OpenAPI document of this API.",
            "status",
        )
    },
    Route {
        responses: &[ok(200, "Every snapshot.", Body::JsonArray("SnapshotInfo"))],
        ..route(
            Method::Get,
            "/v1/snapshots",
            "listSnapshots",
            "List snapshots.",
            "snapshots",
        )
    },
    Route {
        responses: &[
            ok(
                200,
                "The snapshot with files, sizes, chain and dependents.",
                Body::Json("SnapshotDetail"),
            ),
            SNAPSHOT_404,
        ],
        ..route(
            Method::Get,
            "/v1/snapshots/{tag}/info",
            "snapshotInfo",
            "One snapshot: files, sizes, parent chain, dependents, status.",
            "snapshots",
        )
    },
    Route {
        mutating: true,
        query: Some("DeleteSnapshotQuery"),
        responses: &[
            no_body(204, "Deleted (with its dependents when `cascade`)."),
            SNAPSHOT_404,
            no_body(
                409,
                "Other snapshots or live sandboxes depend on it; the error names them.",
            ),
        ],
        ..route(
            Method::Delete,
            "/v1/snapshots/{tag}",
            "deleteSnapshot",
            "Delete a snapshot.",
            "snapshots",
        )
    },
    Route {
        mutating: true,
        responses: &[
            ok(
                200,
                "Its layers and bytes before and after (`compacted: false`: it was one RAM image and one disk layer already).",
                Body::Json("CompactResponse"),
            ),
            SNAPSHOT_404,
            no_body(
                409,
                "The snapshot is not ready, is broken, or another process is writing or compacting it.",
            ),
        ],
        ..route(
            Method::Post,
            "/v1/snapshots/{tag}/compact",
            "compactSnapshot",
            "forkd: rewrite a snapshot made of a chain of RAM and disk layers as one RAM image and one disk layer, with the same contents; the snapshots below are kept.",
            "snapshots",
        )
    },
    Route {
        mutating: true,
        responses: &[ok(
            200,
            "What was deleted, and what was kept because something depends on it.",
            Body::Json("PruneResponse"),
        )],
        ..route(
            Method::Post,
            "/v1/snapshots/prune",
            "pruneSnapshots",
            "forkd: delete every failed and broken snapshot nothing else needs.",
            "snapshots",
        )
    },
    Route {
        mutating: true,
        responses: &[ok(
            200,
            "The cached images deleted and how many are kept.",
            Body::Json("GcResponse"),
        )],
        ..route(
            Method::Post,
            "/v1/gc",
            "gc",
            "forkd: delete cached RAM images that no snapshot of any home references.",
            "snapshots",
        )
    },
    Route {
        mutating: true,
        request: Some("PoolRequest"),
        limit: Some(Limit::Spawn),
        responses: &[
            ok(
                200,
                "The pool as it is now; it fills in the background.",
                Body::Json("PoolInfo"),
            ),
            SNAPSHOT_404,
            no_body(409, "The snapshot is not ready."),
        ],
        ..route(
            Method::Post,
            "/v1/snapshots/{tag}/pool",
            "setPool",
            "Keep pre-started children of a snapshot waiting for spawns with `use_pool`.",
            "snapshots",
        )
    },
    Route {
        responses: &[ok(200, "Every sandbox.", Body::JsonArray("SandboxInfo"))],
        ..route(
            Method::Get,
            "/v1/sandboxes",
            "listSandboxes",
            "List sandboxes.",
            "sandboxes",
        )
    },
    Route {
        mutating: true,
        responses: &[ok(
            200,
            "The sandboxes killed, those that could not be, and the QEMUs without a record that were killed.",
            Body::Json("KillAllResponse"),
        )],
        ..route(
            Method::Delete,
            "/v1/sandboxes",
            "killAllSandboxes",
            "forkd: kill every sandbox, and every QEMU of this home that has no record.",
            "sandboxes",
        )
    },
    Route {
        mutating: true,
        request: Some("SpawnRequest"),
        limit: Some(Limit::Spawn),
        responses: &[
            ok(
                201,
                "The children, one per `n`.",
                Body::JsonArray("SandboxInfo"),
            ),
            SNAPSHOT_404,
            no_body(409, "The snapshot is not ready (writing or failed)."),
        ],
        ..route(
            Method::Post,
            "/v1/sandboxes",
            "spawnSandboxes",
            "SPAWN `n` copy-on-write children from a snapshot.",
            "sandboxes",
        )
    },
    Route {
        mutating: true,
        request: Some("BootRequest"),
        limit: Some(Limit::Spawn),
        responses: &[
            ok(201, "The booted sandbox.", Body::Json("SandboxInfo")),
            no_body(409, "`tag` is taken."),
        ],
        ..route(
            Method::Post,
            "/v1/sandboxes/boot",
            "bootSandbox",
            "Boot a fresh sandbox (optionally snapshot it under `tag`).",
            "sandboxes",
        )
    },
    Route {
        responses: &[
            ok(200, "The sandbox.", Body::Json("SandboxInfo")),
            SANDBOX_404,
        ],
        ..route(
            Method::Get,
            "/v1/sandboxes/{id}",
            "getSandbox",
            "One sandbox.",
            "sandboxes",
        )
    },
    Route {
        mutating: true,
        request: Some("TimeoutRequest"),
        responses: &[
            ok(
                200,
                "The sandbox with its new end time.",
                Body::Json("SandboxInfo"),
            ),
            SANDBOX_404,
        ],
        ..route(
            Method::Post,
            "/v1/sandboxes/{id}/timeout",
            "setSandboxTimeout",
            "Move a sandbox's end time (`ttl_ms` from now; null: no end time).",
            "sandboxes",
        )
    },
    Route {
        mutating: true,
        responses: &[no_body(204, "Killed and removed."), SANDBOX_404],
        ..route(
            Method::Delete,
            "/v1/sandboxes/{id}",
            "deleteSandbox",
            "Kill a sandbox.",
            "sandboxes",
        )
    },
    Route {
        mutating: true,
        request: Some("ExecRequest"),
        responses: &[
            ok(
                200,
                "The command ran (whatever its exit code).",
                Body::Json("ExecResponse"),
            ),
            SANDBOX_404,
            SANDBOX_NOT_RUNNING,
        ],
        ..route(
            Method::Post,
            "/v1/sandboxes/{id}/exec",
            "exec",
            "Run a command in the guest and wait for it.",
            "sandboxes",
        )
    },
    Route {
        mutating: true,
        request: Some("PushRequest"),
        responses: &[
            ok(
                200,
                "One JSON object per line as the push goes: progress, then its result or error.",
                Body::NdJson("TransferEvent"),
            ),
            no_body(404, "No such snapshot."),
        ],
        ..route(
            Method::Post,
            "/v1/snapshots/{tag}/push",
            "pushSnapshot",
            "forkd: push a snapshot and its chain to an OCI registry (NDJSON progress).",
            "snapshots",
        )
    },
    Route {
        mutating: true,
        request: Some("PullRequest"),
        responses: &[ok(
            200,
            "One JSON object per line as the pull goes: progress, then its result or error.",
            Body::NdJson("TransferEvent"),
        )],
        ..route(
            Method::Post,
            "/v1/snapshots/pull",
            "pullSnapshot",
            "forkd: pull a snapshot from an OCI registry, verify and publish it (NDJSON progress).",
            "snapshots",
        )
    },
    Route {
        mutating: true,
        request: Some("ExecRequest"),
        responses: &[
            ok(
                200,
                "One JSON object per line as the command runs: output chunks, then its exit.",
                Body::NdJson("ExecEvent"),
            ),
            SANDBOX_404,
            SANDBOX_NOT_RUNNING,
        ],
        ..route(
            Method::Post,
            "/v1/sandboxes/{id}/exec/stream",
            "execStream",
            "forkd: run a command and stream its output as it comes (NDJSON).",
            "sandboxes",
        )
    },
    Route {
        mutating: true,
        request: Some("EvalRequest"),
        responses: &[
            ok(200, "The code ran.", Body::Json("EvalResponse")),
            SANDBOX_404,
            SANDBOX_NOT_RUNNING,
            no_body(
                422,
                "The guest has no Python (boot it with image `debian-python`).",
            ),
        ],
        ..route(
            Method::Post,
            "/v1/sandboxes/{id}/eval",
            "eval",
            "Run Python code in the guest.",
            "sandboxes",
        )
    },
    Route {
        responses: &[
            ok(200, "The agent answered.", Body::Json("PingResponse")),
            SANDBOX_404,
            SANDBOX_NOT_RUNNING,
        ],
        ..route(
            Method::Post,
            "/v1/sandboxes/{id}/ping",
            "ping",
            "Round trip to the guest agent.",
            "sandboxes",
        )
    },
    Route {
        mutating: true,
        request: Some("BranchRequest"),
        limit: Some(Limit::Branch),
        responses: &[
            ok(
                201,
                "The new snapshot, complete.",
                Body::Json("SnapshotInfo"),
            ),
            ok(
                202,
                "`wait: false`: the pause is over, the snapshot is still `writing`.",
                Body::Json("SnapshotInfo"),
            ),
            SANDBOX_404,
            no_body(409, "The tag exists, or the sandbox is not running."),
        ],
        ..route(
            Method::Post,
            "/v1/sandboxes/{id}/branch",
            "branch",
            "BRANCH a running sandbox into a new snapshot.",
            "sandboxes",
        )
    },
    // ---- files
    Route {
        mutating: true,
        request: Some("FileWriteRequest"),
        body_limit: FILE_BODY_LIMIT,
        responses: &[
            ok(200, "Written.", Body::Json("FileWritten")),
            GUEST_403,
            no_body(
                404,
                "No sandbox with this id, or a parent directory is missing and `mkdir` is false.",
            ),
            SANDBOX_NOT_RUNNING,
        ],
        ..route(
            Method::Put,
            "/v1/sandboxes/{id}/files",
            "writeFile",
            "Write a file in the guest from base64 JSON (parents created).",
            "files",
        )
    },
    Route {
        query: Some("FileReadQuery"),
        responses: &[
            ok(200, "The file.", Body::Json("FileContent")),
            GUEST_403,
            GUEST_PATH_404,
            SANDBOX_NOT_RUNNING,
        ],
        ..route(
            Method::Get,
            "/v1/sandboxes/{id}/files",
            "readFile",
            "Read a file from the guest as base64 JSON (a directory is a 400).",
            "files",
        )
    },
    Route {
        mutating: true,
        query: Some("PathQuery"),
        responses: &[
            no_body(204, "Removed (a directory with everything in it)."),
            GUEST_403,
            GUEST_PATH_404,
            SANDBOX_NOT_RUNNING,
        ],
        ..route(
            Method::Delete,
            "/v1/sandboxes/{id}/files",
            "removeFile",
            "forkd: remove a file, or a directory and everything in it.",
            "files",
        )
    },
    Route {
        mutating: true,
        query: Some("RawWriteQuery"),
        stream_request: Some(Body::Octet),
        responses: &[
            ok(200, "Written.", Body::Json("FileWritten")),
            GUEST_403,
            no_body(
                404,
                "No sandbox with this id, or a parent directory is missing and `mkdir` is false.",
            ),
            SANDBOX_NOT_RUNNING,
        ],
        ..route(
            Method::Put,
            "/v1/sandboxes/{id}/files/raw",
            "uploadFile",
            "forkd: write a file from a raw body, streamed (no size cap).",
            "files",
        )
    },
    Route {
        query: Some("PathQuery"),
        responses: &[
            ok(200, "The file's bytes, streamed.", Body::Octet),
            GUEST_403,
            GUEST_PATH_404,
            SANDBOX_NOT_RUNNING,
        ],
        ..route(
            Method::Get,
            "/v1/sandboxes/{id}/files/raw",
            "downloadFile",
            "forkd: read a file as raw bytes, streamed (no size cap).",
            "files",
        )
    },
    Route {
        query: Some("PathQuery"),
        responses: &[
            ok(200, "The path's facts.", Body::Json("FileInfo")),
            GUEST_403,
            GUEST_PATH_404,
            SANDBOX_NOT_RUNNING,
        ],
        ..route(
            Method::Get,
            "/v1/sandboxes/{id}/files/stat",
            "statFile",
            "forkd: facts about a path (type, size, mode, owner, time).",
            "files",
        )
    },
    Route {
        query: Some("ListQuery"),
        responses: &[
            ok(
                200,
                "The entries, sorted by path.",
                Body::JsonArray("FileInfo"),
            ),
            GUEST_403,
            GUEST_PATH_404,
            SANDBOX_NOT_RUNNING,
        ],
        ..route(
            Method::Get,
            "/v1/sandboxes/{id}/files/list",
            "listFiles",
            "forkd: list a directory, `depth` levels down.",
            "files",
        )
    },
    Route {
        mutating: true,
        request: Some("MkdirRequest"),
        responses: &[
            ok(
                200,
                "The directory exists (`created` says whether this call made it).",
                Body::Json("MkdirResponse"),
            ),
            GUEST_403,
            SANDBOX_404,
            no_body(
                409,
                "The path exists and is not a directory, or the sandbox is not running.",
            ),
        ],
        ..route(
            Method::Post,
            "/v1/sandboxes/{id}/files/mkdir",
            "makeDir",
            "forkd: make a directory and its missing parents.",
            "files",
        )
    },
    Route {
        mutating: true,
        request: Some("RenameRequest"),
        responses: &[
            ok(200, "The path at its new place.", Body::Json("FileInfo")),
            GUEST_403,
            GUEST_PATH_404,
            SANDBOX_NOT_RUNNING,
        ],
        ..route(
            Method::Post,
            "/v1/sandboxes/{id}/files/rename",
            "renameFile",
            "forkd: move or rename a path.",
            "files",
        )
    },
    Route {
        mutating: true,
        query: Some("PathQuery"),
        stream_request: Some(Body::Tar),
        responses: &[
            ok(200, "Unpacked.", Body::Json("TarSummary")),
            GUEST_403,
            SANDBOX_404,
            SANDBOX_NOT_RUNNING,
        ],
        ..route(
            Method::Put,
            "/v1/sandboxes/{id}/files/tar",
            "uploadTar",
            "forkd: unpack a tar stream into directory `path` (created; modes kept).",
            "files",
        )
    },
    Route {
        query: Some("PathQuery"),
        responses: &[
            ok(200, "The tar stream.", Body::Tar),
            GUEST_403,
            GUEST_PATH_404,
            SANDBOX_NOT_RUNNING,
        ],
        ..route(
            Method::Get,
            "/v1/sandboxes/{id}/files/tar",
            "downloadTar",
            "forkd: pack a file or directory into a tar stream.",
            "files",
        )
    },
    // ---- watches
    Route {
        mutating: true,
        request: Some("WatchRequest"),
        responses: &[
            ok(201, "Watching.", Body::Json("WatchCreated")),
            GUEST_PATH_404,
            SANDBOX_NOT_RUNNING,
        ],
        ..route(
            Method::Post,
            "/v1/sandboxes/{id}/watches",
            "watchDir",
            "forkd: start watching a directory for changes.",
            "files",
        )
    },
    Route {
        query: Some("WatchPollQuery"),
        responses: &[
            ok(
                200,
                "The changes since the last poll (waiting up to `wait_ms` for the first).",
                Body::JsonArray("FsEvent"),
            ),
            no_body(404, "No sandbox with this id, or no such watch."),
            SANDBOX_NOT_RUNNING,
        ],
        ..route(
            Method::Get,
            "/v1/sandboxes/{id}/watches/{watch}",
            "pollWatch",
            "forkd: the changes under a watch.",
            "files",
        )
    },
    Route {
        mutating: true,
        responses: &[
            no_body(204, "Stopped."),
            no_body(404, "No sandbox with this id, or no such watch."),
            SANDBOX_NOT_RUNNING,
        ],
        ..route(
            Method::Delete,
            "/v1/sandboxes/{id}/watches/{watch}",
            "deleteWatch",
            "forkd: stop a watch.",
            "files",
        )
    },
    // ---- processes
    Route {
        mutating: true,
        request: Some("ProcessStartRequest"),
        responses: &[
            ok(
                200,
                "One JSON object per line: `started`, its output, then `exit` (or `error`). \
                 Disconnecting stops following; the process goes on.",
                Body::NdJson("ProcessEvent"),
            ),
            no_body(
                404,
                "No sandbox with this id, or the program or account does not exist.",
            ),
            no_body(
                409,
                "The sandbox is not running, or a running process has this tag.",
            ),
        ],
        ..route(
            Method::Post,
            "/v1/sandboxes/{id}/processes",
            "startProcess",
            "forkd: start a process the guest keeps, and stream its output.",
            "processes",
        )
    },
    Route {
        responses: &[
            ok(
                200,
                "Running processes, and the last ones that ended.",
                Body::JsonArray("ProcessInfo"),
            ),
            SANDBOX_404,
            SANDBOX_NOT_RUNNING,
        ],
        ..route(
            Method::Get,
            "/v1/sandboxes/{id}/processes",
            "listProcesses",
            "forkd: the processes the guest keeps.",
            "processes",
        )
    },
    Route {
        query: Some("FollowQuery"),
        responses: &[
            ok(
                200,
                "One JSON object per line: its output, then `exit` (or `error`).",
                Body::NdJson("ProcessEvent"),
            ),
            PROCESS_404,
            SANDBOX_NOT_RUNNING,
        ],
        ..route(
            Method::Get,
            "/v1/sandboxes/{id}/processes/{process}/stream",
            "followProcess",
            "forkd: follow a running process's output.",
            "processes",
        )
    },
    Route {
        mutating: true,
        request: Some("ProcessInputRequest"),
        responses: &[
            no_body(204, "Written."),
            no_body(400, "Bad input, or the process's stdin is closed."),
            PROCESS_404,
            SANDBOX_NOT_RUNNING,
        ],
        ..route(
            Method::Post,
            "/v1/sandboxes/{id}/processes/{process}/input",
            "processInput",
            "forkd: write to a process's stdin (and close it).",
            "processes",
        )
    },
    Route {
        mutating: true,
        request: Some("SignalRequest"),
        responses: &[no_body(204, "Sent."), PROCESS_404, SANDBOX_NOT_RUNNING],
        ..route(
            Method::Post,
            "/v1/sandboxes/{id}/processes/{process}/signal",
            "signalProcess",
            "forkd: send a signal to a process's group.",
            "processes",
        )
    },
    Route {
        mutating: true,
        request: Some("PtySize"),
        responses: &[
            no_body(204, "Resized."),
            no_body(400, "Bad input, or the process has no terminal."),
            PROCESS_404,
            SANDBOX_NOT_RUNNING,
        ],
        ..route(
            Method::Post,
            "/v1/sandboxes/{id}/processes/{process}/resize",
            "resizeProcess",
            "forkd: resize a process's terminal.",
            "processes",
        )
    },
];

/// The route with this method and (axum-style) path.
pub fn find(method: Method, path: &str) -> Option<&'static Route> {
    ROUTES.iter().find(|r| r.method == method && r.path == path)
}

/// The route with this operation id.
pub fn by_operation(operation_id: &str) -> Option<&'static Route> {
    ROUTES.iter().find(|r| r.operation_id == operation_id)
}

/// The component schemas of every type the routes name, generated from the
/// types themselves.
fn component_schemas() -> Map<String, Value> {
    let mut gen = SchemaSettings::openapi3().into_generator();
    gen.subschema_for::<ErrorBody>();
    gen.subschema_for::<HealthResponse>();
    gen.subschema_for::<VersionResponse>();
    gen.subschema_for::<SnapshotInfo>();
    gen.subschema_for::<SnapshotDetail>();
    gen.subschema_for::<DeleteSnapshotQuery>();
    gen.subschema_for::<PoolRequest>();
    gen.subschema_for::<PoolInfo>();
    gen.subschema_for::<SandboxInfo>();
    gen.subschema_for::<SpawnRequest>();
    gen.subschema_for::<BootRequest>();
    gen.subschema_for::<TimeoutRequest>();
    gen.subschema_for::<ExecRequest>();
    gen.subschema_for::<ExecResponse>();
    gen.subschema_for::<ExecEvent>();
    gen.subschema_for::<PushRequest>();
    gen.subschema_for::<PullRequest>();
    gen.subschema_for::<TransferEvent>();
    gen.subschema_for::<EvalRequest>();
    gen.subschema_for::<EvalResponse>();
    gen.subschema_for::<PingResponse>();
    gen.subschema_for::<BranchRequest>();
    gen.subschema_for::<FileWriteRequest>();
    gen.subschema_for::<FileReadQuery>();
    gen.subschema_for::<FileContent>();
    gen.subschema_for::<FileWritten>();
    gen.subschema_for::<FileInfo>();
    gen.subschema_for::<PathQuery>();
    gen.subschema_for::<ListQuery>();
    gen.subschema_for::<RawWriteQuery>();
    gen.subschema_for::<MkdirRequest>();
    gen.subschema_for::<MkdirResponse>();
    gen.subschema_for::<RenameRequest>();
    gen.subschema_for::<TarSummary>();
    gen.subschema_for::<WatchRequest>();
    gen.subschema_for::<WatchCreated>();
    gen.subschema_for::<WatchPollQuery>();
    gen.subschema_for::<FsEvent>();
    gen.subschema_for::<ProcessStartRequest>();
    gen.subschema_for::<ProcessInfo>();
    gen.subschema_for::<ProcessEvent>();
    gen.subschema_for::<FollowQuery>();
    gen.subschema_for::<ProcessInputRequest>();
    gen.subschema_for::<SignalRequest>();
    gen.subschema_for::<PtySize>();
    gen.subschema_for::<KillAllResponse>();
    gen.subschema_for::<PruneResponse>();
    gen.subschema_for::<CompactResponse>();
    gen.subschema_for::<GcResponse>();
    let mut definitions = gen.take_definitions();
    // The OpenAPI 3.0 visitors (e.g. moving `$ref` siblings into `allOf`, which
    // 3.0 would ignore) only run on root schemas by themselves.
    for visitor in gen.visitors_mut() {
        for schema in definitions.values_mut() {
            visitor.visit_schema(schema);
        }
    }
    definitions
        .into_iter()
        .map(|(name, schema)| {
            let value = serde_json::to_value(schema).unwrap_or(Value::Null);
            (name, value)
        })
        .collect()
}

fn schema_ref(name: &str) -> Value {
    json!({ "$ref": format!("#/components/schemas/{name}") })
}

fn body_content(body: Body) -> Value {
    match body {
        Body::Json(name) => json!({ "application/json": { "schema": schema_ref(name) } }),
        Body::JsonArray(name) => {
            json!({ "application/json": { "schema": { "type": "array", "items": schema_ref(name) } } })
        }
        Body::NdJson(name) => json!({ "application/x-ndjson": { "schema": schema_ref(name) } }),
        Body::PrometheusText => {
            json!({ "text/plain; version=0.0.4": { "schema": { "type": "string" } } })
        }
        Body::OpenApi => json!({ "application/json": { "schema": { "type": "object" } } }),
        Body::Octet => {
            json!({ "application/octet-stream": { "schema": { "type": "string", "format": "binary" } } })
        }
        Body::Tar => {
            json!({ "application/x-tar": { "schema": { "type": "string", "format": "binary" } } })
        }
    }
}

fn error_response(description: &str) -> Value {
    json!({ "description": description, "content": body_content(Body::Json("ErrorBody")) })
}

fn query_parameters(query: &str, schemas: &Map<String, Value>) -> Vec<Value> {
    let Some(schema) = schemas.get(query) else {
        return Vec::new();
    };
    let required: Vec<&str> = schema["required"]
        .as_array()
        .map(|r| r.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let Some(properties) = schema["properties"].as_object() else {
        return Vec::new();
    };
    properties
        .iter()
        .map(|(name, prop)| {
            let mut prop = prop.clone();
            let description = prop
                .as_object_mut()
                .and_then(|p| p.remove("description"))
                .unwrap_or(Value::Null);
            json!({
                "name": name,
                "in": "query",
                "required": required.contains(&name.as_str()),
                "description": description,
                "schema": prop,
            })
        })
        .collect()
}

fn operation(route: &Route, schemas: &Map<String, Value>) -> Value {
    let mut parameters: Vec<Value> = route
        .path_params()
        .map(|name| {
            let description = match name {
                "id" => "Sandbox id.",
                "tag" => "Snapshot tag (`[A-Za-z0-9._-]{1,64}`, not starting with `.`).",
                "watch" => "Watch id, as starting the watch answered.",
                "process" => "The process's pid, or its tag (which is never all digits).",
                _ => "",
            };
            json!({
                "name": name,
                "in": "path",
                "required": true,
                "description": description,
                "schema": { "type": "string" },
            })
        })
        .collect();
    if let Some(query) = route.query {
        parameters.extend(query_parameters(query, schemas));
    }

    let mut responses = Map::new();
    for r in route.responses {
        let value = match (r.status, r.body) {
            (status, _) if status >= 400 => error_response(r.description),
            (_, Some(body)) => {
                json!({ "description": r.description, "content": body_content(body) })
            }
            (_, None) => json!({ "description": r.description }),
        };
        responses.insert(r.status.to_string(), value);
    }
    let mut add = |status: u16, description: String| {
        responses
            .entry(status.to_string())
            .or_insert_with(|| error_response(&description));
    };
    if route.request.is_some() || route.query.is_some() {
        add(400, "Bad input; the error names the field.".to_owned());
    }
    if route.auth {
        add(
            401,
            "A token is configured and the request lacks it.".to_owned(),
        );
    }
    if route.request.is_some() {
        add(
            413,
            format!("The body is larger than {} bytes.", route.body_limit),
        );
    }
    if route.limit.is_some() {
        add(
            429,
            "Too many concurrent operations of this kind; see `Retry-After`.".to_owned(),
        );
    }
    add(500, "forkd failed.".to_owned());

    let mut op = json!({
        "operationId": route.operation_id,
        "summary": route.summary,
        "tags": [route.group],
        "responses": responses,
        "security": if route.auth { json!([{ "bearer": [] }, {}]) } else { json!([]) },
    });
    if !parameters.is_empty() {
        op["parameters"] = Value::Array(parameters);
    }
    if let Some(request) = route.request {
        op["requestBody"] =
            json!({ "required": true, "content": body_content(Body::Json(request)) });
    }
    if let Some(body) = route.stream_request {
        op["requestBody"] = json!({ "required": true, "content": body_content(body) });
    }
    if route.mutating {
        op["x-forkd-audited"] = json!(true);
    }
    op
}

/// The OpenAPI 3.0 document of the API, as the daemon serves it at
/// `GET /v1/openapi.json` and as `docs/openapi.json` commits it.
pub fn openapi() -> Value {
    let schemas = component_schemas();
    let mut paths = Map::new();
    for route in ROUTES {
        let item = paths
            .entry(route.path.to_owned())
            .or_insert_with(|| json!({}));
        item[route.method.openapi_key()] = operation(route, &schemas);
    }
    json!({
        "openapi": "3.0.3",
        "info": {
            "title": "forkd daemon API",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "MicroVM sandboxes: SPAWN children from snapshots, BRANCH running \
                sandboxes, run commands and move files. Served on a UNIX socket by default \
                (no token needed unless one is configured), or on TCP (default \
                127.0.0.1:8889) with `Authorization: Bearer <token>`. Every error body is \
                `{\"error\": \"...\"}`. Request bodies refuse unknown fields.",
        },
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": { "bearer": { "type": "http", "scheme": "bearer" } },
        },
    })
}

/// `docs/openapi.json` as text: [`openapi`] pretty-printed, with a final newline.
pub fn openapi_text() -> String {
    let mut text = serde_json::to_string_pretty(&openapi()).unwrap_or_default();
    text.push('\n');
    text
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;
    use std::path::PathBuf;

    use super::*;

    fn committed_path() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../docs/openapi.json")
    }

    #[test]
    fn routes_are_unique_and_well_formed() {
        let mut seen = HashSet::new();
        let mut ops = HashSet::new();
        for r in ROUTES {
            assert!(
                seen.insert((r.method, r.path)),
                "duplicate route {} {}",
                r.method.as_str(),
                r.path
            );
            assert!(
                ops.insert(r.operation_id),
                "duplicate operation id {}",
                r.operation_id
            );
            assert!(r.path.starts_with('/'), "{}", r.path);
            assert!(
                !r.path.contains(':'),
                "axum-0.7 style parameter in {}",
                r.path
            );
            assert!(
                r.responses.iter().any(|x| x.status < 300),
                "{} has no success answer",
                r.operation_id
            );
            if r.method == Method::Get {
                assert!(r.request.is_none() && !r.mutating, "{}", r.operation_id);
            }
            assert!(
                r.request.is_none() || r.stream_request.is_none(),
                "{} takes one body",
                r.operation_id
            );
            assert!(
                matches!(r.stream_request, None | Some(Body::Octet | Body::Tar)),
                "{}: streamed bodies are raw",
                r.operation_id
            );
            for p in r.path_params() {
                assert!(
                    matches!(p, "id" | "tag" | "watch" | "process"),
                    "{}: unexpected parameter {p}",
                    r.path
                );
            }
        }
        assert!(!find(Method::Get, "/healthz").unwrap().auth);
        assert!(ROUTES
            .iter()
            .filter(|r| r.path != "/healthz")
            .all(|r| r.auth));
    }

    #[test]
    fn every_named_schema_exists() {
        let schemas = component_schemas();
        for r in ROUTES {
            let bodies = r.responses.iter().filter_map(|x| x.body);
            for name in r
                .request
                .into_iter()
                .chain(r.query)
                .chain(bodies.filter_map(|b| match b {
                    Body::Json(n) | Body::JsonArray(n) => Some(n),
                    _ => None,
                }))
            {
                assert!(
                    schemas.contains_key(name),
                    "{}: no schema {name}",
                    r.operation_id
                );
            }
        }
        assert!(schemas.contains_key("ErrorBody"));
    }

    #[test]
    fn document_matches_the_routes() {
        let doc = openapi();
        let paths = doc["paths"].as_object().unwrap();
        let mut in_doc = HashSet::new();
        for (path, item) in paths {
            for (method, op) in item.as_object().unwrap() {
                in_doc.insert((method.clone(), path.clone()));
                let id = op["operationId"].as_str().unwrap();
                let route = by_operation(id).unwrap();
                assert_eq!(route.path, path);
                assert_eq!(route.method.openapi_key(), method);
            }
        }
        let in_table: HashSet<_> = ROUTES
            .iter()
            .map(|r| (r.method.openapi_key().to_owned(), r.path.to_owned()))
            .collect();
        assert_eq!(in_doc, in_table);

        let delete = &doc["paths"]["/v1/snapshots/{tag}"]["delete"];
        let names: Vec<&str> = delete["parameters"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["tag", "cascade", "force"]);
        let spawn = &doc["paths"]["/v1/sandboxes"]["post"];
        assert!(spawn["responses"]["429"].is_object());
        let schema = &doc["components"]["schemas"]["SpawnRequest"];
        assert_eq!(schema["additionalProperties"], json!(false));
        assert_eq!(schema["properties"]["n"]["default"], json!(1));
    }

    #[test]
    fn committed_document_is_current() {
        let path = committed_path();
        let generated = openapi_text();
        if std::env::var_os("FORKD_WRITE_OPENAPI").is_some() {
            std::fs::write(&path, &generated).unwrap();
        }
        let committed = std::fs::read_to_string(&path).unwrap_or_default();
        let committed: Value = serde_json::from_str(&committed).unwrap_or(Value::Null);
        assert!(
            committed == openapi(),
            "{} is stale or missing; regenerate it with \
             `FORKD_WRITE_OPENAPI=1 cargo test -p forkd-api committed_document_is_current` \
             and commit the result",
            path.display()
        );
    }
}
