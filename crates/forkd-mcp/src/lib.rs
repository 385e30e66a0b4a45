//! forkd for AI agents: a Model Context Protocol server whose tools are the
//! operations seam ([`forkd_ops::Operations`]) — create, run, files, branch,
//! spawn, kill, list — with schemas and descriptions an LLM can act on, and
//! errors that say what to call next.
//!
//! It is an adapter like the CLI and the daemon: it decides nothing about
//! sandboxes (defaults come from [`forkd_ops::policy`]), it only shapes
//! requests and answers for agents. It runs over stdio (`forkd mcp`, on this
//! host's fleet or a daemon's) and over MCP's streamable HTTP transport,
//! mounted by the daemon at `/mcp` ([`http_service`]). Built on `rmcp`, the
//! maintained Rust MCP SDK.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use forkd_ops::{
    policy, BranchRequest, CreateRequest, ExecSpec, FileKind, Hint, OpError, Operations,
    SpawnRequest, Stream, WriteOptions,
};
use rmcp::handler::server::router::tool::ToolRouter;
use rmcp::handler::server::wrapper::{Json, Parameters};
use rmcp::model::{ServerCapabilities, ServerConfig};
pub use rmcp::transport::streamable_http_server::session::local::LocalSessionManager;
use rmcp::transport::streamable_http_server::StreamableHttpServerConfig;
pub use rmcp::transport::streamable_http_server::StreamableHttpService;
use rmcp::{tool, tool_handler, tool_router, ServerHandler, ServiceExt};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The MCP server: tools over one [`Operations`] implementation.
#[derive(Clone)]
pub struct ForkdMcp {
    ops: Arc<dyn Operations>,
    tool_router: ToolRouter<Self>,
}

/// A hint worded for an agent: the tool to call.
pub fn agent_hint(hint: &Hint) -> String {
    match hint {
        Hint::ListSandboxes => "call list_sandboxes to see the sandboxes that exist".into(),
        Hint::ListSnapshots => "call list_snapshots to see the snapshots that exist".into(),
        Hint::KillSandbox { id } => {
            format!("call kill_sandbox with sandbox_id `{id}` to remove it")
        }
        Hint::RemoveSnapshot { tag } => {
            format!("the snapshot `{tag}` is unusable; branch again under another tag")
        }
        Hint::WaitForSnapshot { tag } => {
            format!("wait a moment and retry; list_snapshots shows `{tag}` as ready when it is")
        }
        Hint::BranchLive { id } => format!("call branch_sandbox on `{id}` (live mode)"),
        Hint::RemoveDependentsOrForce { .. } => "kill the sandboxes spawned from it first".into(),
        Hint::PickAnotherTag { .. } => {
            "choose another tag, or leave the tag out to get a fresh one".into()
        }
        Hint::BuildImage { image } => format!("image `{image}` is built on first use; retry"),
        Hint::UsePythonImage => "create the sandbox with image `debian-python`".into(),
        Hint::ProvideToken => {
            "the forkd daemon refused the token; the person running it must configure FORKD_TOKEN"
                .into()
        }
    }
}

/// An error as a tool result text: what went wrong and what to call next.
pub fn agent_text(e: &OpError) -> String {
    match &e.hint {
        Some(h) => format!("{}; {}", e.message, agent_hint(h)),
        None => e.message.clone(),
    }
}

type ToolResult<T> = Result<Json<T>, String>;

/// Runs a blocking operation off the async runtime.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, OpError> + Send + 'static,
) -> Result<T, String> {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r.map_err(|e| agent_text(&e)),
        Err(e) => Err(format!("forkd failed while running the tool: {e}")),
    }
}

// ------------------------------------------------------------------ tools' types

#[derive(Debug, Deserialize, JsonSchema)]
pub struct CreateArgs {
    /// Root disk of a fresh sandbox: `busybox` (small, the default) or
    /// `debian-python` (Debian with python3). Ignored with `snapshot`.
    #[serde(default)]
    pub image: Option<String>,
    /// Start from this snapshot instead of booting: the new sandbox is a
    /// copy-on-write child with everything the snapshot's sandbox had in
    /// memory and on disk, ready in well under a second.
    #[serde(default)]
    pub snapshot: Option<String>,
    /// Guest memory in MiB (default 256).
    #[serde(default)]
    pub mem_mib: Option<u64>,
    /// Virtual CPUs (default 1).
    #[serde(default)]
    pub cpus: Option<u32>,
    /// Kill the sandbox this many seconds after it starts (default: it
    /// lives until kill_sandbox).
    #[serde(default)]
    pub ttl_secs: Option<u64>,
    /// Labels (`key: value`) to recognise it by in list_sandboxes.
    #[serde(default)]
    pub labels: std::collections::BTreeMap<String, String>,
    /// Environment every command in it gets unless the command sets its own.
    #[serde(default)]
    pub env: std::collections::BTreeMap<String, String>,
    /// Working directory of every command that names none.
    #[serde(default)]
    pub cwd: Option<String>,
}

impl CreateArgs {
    fn settings(&self) -> forkd_ops::Settings {
        forkd_ops::Settings {
            ttl: self.ttl_secs.map(std::time::Duration::from_secs),
            idle_timeout: None,
            labels: self.labels.clone(),
            env: self.env.clone().into_iter().collect(),
            cwd: self.cwd.clone(),
            user: None,
            access_token: None,
        }
    }
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct SandboxOut {
    /// The id to pass to the other tools.
    pub sandbox_id: String,
    /// `running`, `pooled` or `dead`.
    pub state: String,
    /// The root disk it runs.
    pub image: String,
    /// The snapshot it was started from, if any.
    pub snapshot: Option<String>,
    pub mem_mib: u64,
    pub cpus: u32,
    /// When it is killed (Unix milliseconds), if it has a time to live.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ends_at_ms: Option<u64>,
    /// Its labels.
    #[serde(skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub labels: std::collections::BTreeMap<String, String>,
}

impl From<forkd_ops::Sandbox> for SandboxOut {
    fn from(s: forkd_ops::Sandbox) -> SandboxOut {
        SandboxOut {
            sandbox_id: s.id,
            state: s.state.to_string(),
            image: s.image,
            snapshot: s.snapshot,
            mem_mib: s.mem_mib,
            cpus: s.cpus,
            ends_at_ms: s.lifetime.ends_at_ms,
            labels: s.lifetime.labels,
        }
    }
}

#[derive(Debug, Deserialize, JsonSchema)]
pub struct RunArgs {
    pub sandbox_id: String,
    /// A shell command line, run with `sh -c`.
    pub command: String,
    /// Working directory (an absolute path in the sandbox).
    #[serde(default)]
    pub cwd: Option<String>,
    /// Extra environment variables.
    #[serde(default)]
    pub env: std::collections::BTreeMap<String, String>,
    /// Kill the command after this many seconds (default 60).
    #[serde(default)]
    pub timeout_secs: Option<u64>,
    /// Text fed to the command's standard input.
    #[serde(default)]
    pub stdin: Option<String>,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct RunOut {
    pub stdout: String,
    pub stderr: String,
    /// The exit code: 127 when the command does not exist, 124 when it timed
    /// out, 128+N when signal N killed it.
    pub exit_code: i32,
    /// The signal that killed it, if one did.
    pub signal: Option<i32>,
    pub timed_out: bool,
    pub duration_ms: u64,
    /// Whether stdout or stderr was cut (each keeps its first 64 KiB).
    pub truncated: bool,
}

#[derive(Debug, Deserialize, JsonSchema)]
pub struct WriteArgs {
    pub sandbox_id: String,
    /// Absolute path in the sandbox; missing parent directories are created.
    pub path: String,
    /// The content: text, or base64 when `base64` is true.
    pub content: String,
    #[serde(default)]
    pub base64: bool,
    /// Permission bits, e.g. 493 for 0755 (default 0644).
    #[serde(default)]
    pub mode: Option<u32>,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct WriteOut {
    pub path: String,
    pub bytes: u64,
}

#[derive(Debug, Deserialize, JsonSchema)]
pub struct ReadArgs {
    pub sandbox_id: String,
    /// Absolute path of a file in the sandbox.
    pub path: String,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct ReadOut {
    pub path: String,
    /// The content as text, or base64 when it is not UTF-8 (see `base64`).
    pub content: String,
    pub base64: bool,
    pub bytes: u64,
    /// Whether the content was cut at 1 MiB.
    pub truncated: bool,
}

#[derive(Debug, Deserialize, JsonSchema)]
pub struct ListArgs {
    pub sandbox_id: String,
    /// Absolute path of a directory in the sandbox.
    pub path: String,
    /// Levels to descend: 1 (default) lists the directory itself, at most 5.
    #[serde(default)]
    pub depth: Option<u32>,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct EntryOut {
    pub path: String,
    /// `file`, `dir`, `symlink` or `other`.
    #[serde(rename = "type")]
    pub kind: String,
    pub size: u64,
    /// As `ls -l` shows them (`drwxr-xr-x`).
    pub permissions: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub symlink_target: Option<String>,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct ListOut {
    pub path: String,
    pub entries: Vec<EntryOut>,
    /// Whether entries were cut at 1000.
    pub truncated: bool,
}

#[derive(Debug, Deserialize, JsonSchema)]
pub struct BranchArgs {
    pub sandbox_id: String,
    /// Tag of the new snapshot (letters, digits, `.`, `_`, `-`); a fresh one
    /// when absent.
    #[serde(default)]
    pub tag: Option<String>,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct BranchOut {
    /// The snapshot to pass to spawn_sandboxes or create_sandbox.
    pub snapshot: String,
    /// How long the sandbox was paused, in milliseconds.
    pub pause_ms: f64,
    pub status: String,
}

#[derive(Debug, Deserialize, JsonSchema)]
pub struct SpawnArgs {
    /// The snapshot to start children of.
    pub snapshot: String,
    /// How many children (1 to 1000).
    pub count: usize,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct SpawnOut {
    /// The children that started.
    pub sandbox_ids: Vec<String>,
    /// Why the others failed, one entry per failed child.
    pub errors: Vec<String>,
    pub wall_ms: f64,
}

#[derive(Debug, Deserialize, JsonSchema)]
pub struct SandboxArgs {
    pub sandbox_id: String,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct Killed {
    pub sandbox_id: String,
    pub killed: bool,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct SandboxList {
    pub sandboxes: Vec<SandboxOut>,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct SnapshotOut {
    pub snapshot: String,
    /// `writing`, `ready` or `failed`.
    pub status: String,
    /// The sandbox it was taken from.
    pub source: Option<String>,
    /// The snapshot its source was started from.
    pub parent: Option<String>,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct SnapshotList {
    pub snapshots: Vec<SnapshotOut>,
}

/// Keeps the first [`policy::AGENT_OUTPUT_CAP`] bytes of a stream and
/// counts the rest.
#[derive(Default)]
struct Capped {
    kept: Vec<u8>,
    dropped: u64,
}

impl Capped {
    fn push(&mut self, b: &[u8]) {
        let room = policy::AGENT_OUTPUT_CAP.saturating_sub(self.kept.len());
        let take = room.min(b.len());
        self.kept.extend_from_slice(&b[..take]);
        self.dropped += (b.len() - take) as u64;
    }

    fn text(self, stream: &str) -> String {
        let mut s = String::from_utf8_lossy(&self.kept).into_owned();
        if self.dropped > 0 {
            s.push_str(&format!(
                "\n[forkd: {} more bytes of {stream} not shown]",
                self.dropped
            ));
        }
        s
    }
}

/// Largest file `read_file` returns.
const READ_CAP: usize = 1 << 20;
/// Most entries `list_files` returns.
const LIST_CAP: usize = 1000;
/// Deepest `list_files` descends.
const MAX_LIST_DEPTH: u32 = 5;

/// Keeps the first `cap` bytes written to it and counts the rest away.
struct Head {
    kept: Vec<u8>,
    cap: usize,
}

impl std::io::Write for Head {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        let take = self.cap.saturating_sub(self.kept.len()).min(b.len());
        self.kept.extend_from_slice(&b[..take]);
        Ok(b.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn absolute(path: &str) -> Result<(), OpError> {
    if path.starts_with('/') {
        Ok(())
    } else {
        Err(OpError::bad_input(format!(
            "path `{path}` must be absolute (start with /)"
        )))
    }
}

#[tool_router(router = tool_router)]
impl ForkdMcp {
    pub fn new(ops: Arc<dyn Operations>) -> ForkdMcp {
        ForkdMcp {
            ops,
            tool_router: Self::tool_router(),
        }
    }

    #[tool(
        name = "create_sandbox",
        description = "Start a sandbox: a Linux microVM to run code in. Either boot a fresh one from an image, or start from a snapshot (made with branch_sandbox) as a copy-on-write child that already has everything the snapshot's sandbox had loaded. Returns the sandbox_id the other tools take."
    )]
    async fn create_sandbox(
        &self,
        Parameters(a): Parameters<CreateArgs>,
    ) -> ToolResult<SandboxOut> {
        let ops = self.ops.clone();
        let settings = a.settings();
        blocking(move || match a.snapshot {
            Some(tag) => {
                let req = SpawnRequest {
                    settings,
                    ..SpawnRequest::new(tag, 1)
                };
                let out = ops.spawn(&req, &|_, _| {})?;
                let child = out
                    .children
                    .into_iter()
                    .next()
                    .ok_or_else(|| OpError::internal("the spawn returned no child"))??;
                Ok(SandboxOut::from(child.sandbox))
            }
            None => {
                let created = ops.create(
                    &CreateRequest {
                        image: a.image,
                        mem_mib: a.mem_mib,
                        cpus: a.cpus,
                        settings,
                        ..CreateRequest::default()
                    },
                    &|_| {},
                )?;
                Ok(SandboxOut::from(created.sandbox))
            }
        })
        .await
        .map(Json)
    }

    #[tool(
        name = "run_command",
        description = "Run a shell command in a sandbox and wait for it to end. Returns stdout, stderr and exit_code (127: no such command; 124: killed at the timeout). Each output stream keeps its first 64 KiB, marked when cut."
    )]
    async fn run_command(&self, Parameters(a): Parameters<RunArgs>) -> ToolResult<RunOut> {
        let ops = self.ops.clone();
        blocking(move || {
            let spec = ExecSpec {
                argv: vec!["sh".into(), "-c".into(), a.command],
                env: a.env.into_iter().collect(),
                cwd: a.cwd,
                timeout: Some(
                    a.timeout_secs
                        .map(Duration::from_secs)
                        .unwrap_or(policy::AGENT_COMMAND_TIMEOUT),
                ),
            };
            let stdin = a.stdin.map(|s| {
                Box::new(std::io::Cursor::new(s.into_bytes())) as Box<dyn std::io::Read + Send>
            });
            let (mut out, mut err) = (Capped::default(), Capped::default());
            let r = ops.exec(&a.sandbox_id, &spec, stdin, &mut |s, b| match s {
                Stream::Stdout => out.push(b),
                Stream::Stderr => err.push(b),
            })?;
            let truncated = out.dropped > 0 || err.dropped > 0;
            Ok(RunOut {
                stdout: out.text("stdout"),
                stderr: err.text("stderr"),
                exit_code: r.exit_code(),
                signal: r.signal,
                timed_out: r.timed_out,
                duration_ms: r.duration_ms,
                truncated,
            })
        })
        .await
        .map(Json)
    }

    #[tool(
        name = "write_file",
        description = "Write a file in a sandbox (created or replaced; missing parent directories are created). Text by default; set base64 for binary content."
    )]
    async fn write_file(&self, Parameters(a): Parameters<WriteArgs>) -> ToolResult<WriteOut> {
        let ops = self.ops.clone();
        blocking(move || {
            let data = if a.base64 {
                base64::engine::general_purpose::STANDARD
                    .decode(&a.content)
                    .map_err(|e| OpError::bad_input(format!("content is not valid base64: {e}")))?
            } else {
                a.content.into_bytes()
            };
            absolute(&a.path)?;
            let opts = WriteOptions {
                mode: a.mode,
                ..WriteOptions::default()
            };
            let bytes = ops.write_file(&a.sandbox_id, &a.path, &opts, &mut &data[..])?;
            Ok(WriteOut {
                path: a.path,
                bytes,
            })
        })
        .await
        .map(Json)
    }

    #[tool(
        name = "read_file",
        description = "Read a file from a sandbox. Returns text, or base64 when the file is not UTF-8; files are cut at 1 MiB."
    )]
    async fn read_file(&self, Parameters(a): Parameters<ReadArgs>) -> ToolResult<ReadOut> {
        let ops = self.ops.clone();
        blocking(move || {
            absolute(&a.path)?;
            let mut kept = Head {
                kept: Vec::new(),
                cap: READ_CAP,
            };
            let bytes = ops.read_file(&a.sandbox_id, &a.path, None, &mut kept)?;
            let truncated = bytes > READ_CAP as u64;
            let (content, base64) = match String::from_utf8(kept.kept) {
                Ok(s) => (s, false),
                Err(e) => (
                    base64::engine::general_purpose::STANDARD.encode(e.as_bytes()),
                    true,
                ),
            };
            Ok(ReadOut {
                path: a.path,
                content,
                base64,
                bytes,
                truncated,
            })
        })
        .await
        .map(Json)
    }

    #[tool(
        name = "list_files",
        description = "List a directory in a sandbox: each entry's path, type (file, dir, symlink, other), size and permissions. depth 1 (default) lists the directory itself; up to 5 descends into subdirectories. At most 1000 entries."
    )]
    async fn list_files(&self, Parameters(a): Parameters<ListArgs>) -> ToolResult<ListOut> {
        let ops = self.ops.clone();
        blocking(move || {
            absolute(&a.path)?;
            let depth = a.depth.unwrap_or(policy::LIST_DEPTH);
            if !(1..=MAX_LIST_DEPTH).contains(&depth) {
                return Err(OpError::bad_input(format!(
                    "depth {depth} is out of range; use 1 to {MAX_LIST_DEPTH}"
                )));
            }
            let mut all = ops.list_dir(&a.sandbox_id, &a.path, depth, None)?;
            let truncated = all.len() > LIST_CAP;
            all.truncate(LIST_CAP);
            Ok(ListOut {
                path: a.path,
                entries: all
                    .into_iter()
                    .map(|f| EntryOut {
                        path: f.path,
                        kind: match f.kind {
                            FileKind::File => "file",
                            FileKind::Dir => "dir",
                            FileKind::Symlink => "symlink",
                            FileKind::Other => "other",
                        }
                        .to_string(),
                        size: f.size,
                        permissions: f.permissions,
                        symlink_target: f.symlink_target,
                    })
                    .collect(),
                truncated,
            })
        })
        .await
        .map(Json)
    }

    #[tool(
        name = "branch_sandbox",
        description = "Snapshot a running sandbox while it keeps running (it pauses for milliseconds): its memory (running processes, loaded data) and disk at this instant become a snapshot that spawn_sandboxes or create_sandbox can start copies from. Use it to fork work: try several things from the same state."
    )]
    async fn branch_sandbox(&self, Parameters(a): Parameters<BranchArgs>) -> ToolResult<BranchOut> {
        let ops = self.ops.clone();
        blocking(move || {
            let out = ops.branch(&BranchRequest {
                source: a.sandbox_id,
                tag: a.tag,
                ..BranchRequest::default()
            })?;
            Ok(BranchOut {
                snapshot: out.snapshot.tag,
                pause_ms: out.pause_ms,
                status: out.snapshot.status.to_string(),
            })
        })
        .await
        .map(Json)
    }

    #[tool(
        name = "spawn_sandboxes",
        description = "Start `count` copy-on-write children of a snapshot. Each starts with the snapshot's memory and disk and then goes its own way. Returns the ids of the children that started and why any others failed."
    )]
    async fn spawn_sandboxes(&self, Parameters(a): Parameters<SpawnArgs>) -> ToolResult<SpawnOut> {
        let ops = self.ops.clone();
        blocking(move || {
            let out = ops.spawn(&SpawnRequest::new(a.snapshot, a.count), &|_, _| {})?;
            let mut ids = Vec::new();
            let mut errors = Vec::new();
            for c in out.children {
                match c {
                    Ok(c) => ids.push(c.sandbox.id),
                    Err(e) => errors.push(agent_text(&e)),
                }
            }
            Ok(SpawnOut {
                sandbox_ids: ids,
                errors,
                wall_ms: out.wall_ms,
            })
        })
        .await
        .map(Json)
    }

    #[tool(
        name = "kill_sandbox",
        description = "Stop a sandbox and delete it with everything in it."
    )]
    async fn kill_sandbox(&self, Parameters(a): Parameters<SandboxArgs>) -> ToolResult<Killed> {
        let ops = self.ops.clone();
        blocking(move || {
            ops.kill(&a.sandbox_id)?;
            Ok(Killed {
                sandbox_id: a.sandbox_id,
                killed: true,
            })
        })
        .await
        .map(Json)
    }

    #[tool(
        name = "list_sandboxes",
        description = "List the sandboxes that exist."
    )]
    async fn list_sandboxes(&self) -> ToolResult<SandboxList> {
        let ops = self.ops.clone();
        blocking(move || {
            Ok(SandboxList {
                sandboxes: ops.list()?.into_iter().map(SandboxOut::from).collect(),
            })
        })
        .await
        .map(Json)
    }

    #[tool(
        name = "list_snapshots",
        description = "List the snapshots (made by branch_sandbox) that sandboxes can be started from."
    )]
    async fn list_snapshots(&self) -> ToolResult<SnapshotList> {
        let ops = self.ops.clone();
        blocking(move || {
            Ok(SnapshotList {
                snapshots: ops
                    .snapshots()?
                    .into_iter()
                    .map(|s| SnapshotOut {
                        snapshot: s.tag,
                        status: s.status.to_string(),
                        source: s.source,
                        parent: s.parent,
                    })
                    .collect(),
            })
        })
        .await
        .map(Json)
    }
}

#[tool_handler(router = self.tool_router)]
impl ServerHandler for ForkdMcp {
    fn get_info(&self) -> ServerConfig {
        let mut info = ServerConfig::new(ServerCapabilities::builder().enable_tools().build());
        info.server_info = rmcp::model::Implementation::new("forkd", env!("CARGO_PKG_VERSION"));
        info.instructions = Some(
            "forkd runs code in sandboxes that are real Linux microVMs. Typical loop: \
             create_sandbox, write_file your code in, run_command it, branch_sandbox to keep a \
             state you may want to return to or fan out, spawn_sandboxes to try several things \
             from it at once, kill_sandbox what you no longer need."
                .into(),
        );
        info
    }
}

/// Serves MCP over this process's stdin and stdout until the client hangs up.
pub async fn serve_stdio(ops: Arc<dyn Operations>) -> std::io::Result<()> {
    let service = ForkdMcp::new(ops)
        .serve(rmcp::transport::stdio())
        .await
        .map_err(|e| std::io::Error::other(format!("starting the MCP session: {e}")))?;
    service
        .waiting()
        .await
        .map(drop)
        .map_err(|e| std::io::Error::other(format!("the MCP session ended badly: {e}")))
}

/// The streamable HTTP transport's service, for a server to mount (the
/// daemon mounts it at `/mcp`).
pub fn http_service(
    ops: Arc<dyn Operations>,
) -> StreamableHttpService<ForkdMcp, LocalSessionManager> {
    StreamableHttpService::new(
        move || Ok(ForkdMcp::new(ops.clone())),
        Default::default(),
        StreamableHttpServerConfig::default(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_is_capped_with_a_marker() {
        let mut c = Capped::default();
        c.push(&vec![b'a'; policy::AGENT_OUTPUT_CAP - 1]);
        c.push(b"bcd");
        assert_eq!(c.dropped, 2);
        let t = c.text("stdout");
        assert!(
            t.ends_with("\n[forkd: 2 more bytes of stdout not shown]"),
            "{}",
            &t[t.len() - 60..]
        );
        assert!(t.starts_with("aaa"));
    }

    #[test]
    fn errors_tell_the_agent_which_tool_to_call() {
        assert_eq!(
            agent_text(&OpError::no_sandbox("sb-1")),
            "no sandbox `sb-1`; call list_sandboxes to see the sandboxes that exist"
        );
    }

    #[test]
    fn every_tool_has_a_description_and_an_object_schema() {
        // A real client of a daemon that is not there: listing tools calls nothing.
        let ops = forkd_client::Client::new("/nonexistent/forkd.sock", None).unwrap();
        let server = ForkdMcp::new(Arc::new(ops));
        let tools = server.tool_router.list_all();
        let names: Vec<&str> = tools.iter().map(|t| t.name.as_ref()).collect();
        for want in [
            "create_sandbox",
            "run_command",
            "write_file",
            "read_file",
            "branch_sandbox",
            "spawn_sandboxes",
            "kill_sandbox",
            "list_sandboxes",
            "list_snapshots",
        ] {
            assert!(names.contains(&want), "{want} missing from {names:?}");
        }
        for t in &tools {
            assert!(
                t.description.as_ref().is_some_and(|d| d.len() > 20),
                "{}",
                t.name
            );
            assert_eq!(
                t.input_schema.get("type").and_then(|v| v.as_str()),
                Some("object"),
                "{}",
                t.name
            );
        }
    }
}
