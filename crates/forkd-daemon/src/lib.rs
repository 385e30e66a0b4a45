//! forkd as a service: `forkd daemon` serves every SPAWN and BRANCH
//! operation over a REST API (the routes, types and rules are in
//! `forkd-api`), on a UNIX socket by default or on TCP with a bearer token.
//! It shares the state database with the CLI and owns no sandbox: every QEMU
//! and every branch writer is a detached process, so a restart (or a
//! `kill -9`) of the daemon never kills a sandbox; at start it re-attaches by
//! reconciling the database with the processes that exist
//! ([`forkd_core::Fleet::recover`]).
//!
//! The routes are a thin adapter over the operations seam
//! ([`forkd_ops::Operations`]): the client side of the same API is
//! `forkd-client`.

pub mod e2b;
mod guest;
pub mod ops;
pub mod pipe;
pub mod server;
mod transfer;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use forkd_api::auth::{ListenAddr, ListenPolicy};
use forkd_api::limits::ConcurrencyLimit;
use forkd_core::Env;

/// How `forkd daemon` runs.
#[derive(Debug, Clone)]
pub struct DaemonOptions {
    pub listen: ListenAddr,
    /// The bearer token (at least 16 bytes); required for non-loopback TCP.
    pub token: Option<String>,
    /// One JSON line per mutating call.
    pub audit_log: PathBuf,
    /// Concurrent spawn/boot calls before answering 429.
    pub max_spawn: usize,
    /// Concurrent branch calls before answering 429.
    pub max_branch: usize,
    /// Who may open the UNIX socket (owner only, or a group too).
    pub socket_access: forkd_api::auth::SocketAccess,
    /// Also serve the E2B-compatible API ([`e2b`]).
    pub e2b: Option<e2b::E2bOptions>,
}

impl DaemonOptions {
    /// The defaults under `env`: socket `$FORKD_RUNTIME_DIR/forkd.sock`, audit
    /// log `$FORKD_HOME/audit.log`.
    pub fn defaults(env: &Env) -> DaemonOptions {
        DaemonOptions {
            listen: ListenAddr::Unix(default_socket(env)),
            token: None,
            audit_log: env.home.join("audit.log"),
            max_spawn: 4,
            max_branch: 2,
            socket_access: forkd_api::auth::SocketAccess::Owner,
            e2b: None,
        }
    }
}

/// Where the daemon listens unless told otherwise.
pub fn default_socket(env: &Env) -> PathBuf {
    env.runtime.join("forkd.sock")
}

/// Why the daemon did not start.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("{0}")]
    Policy(#[from] forkd_api::auth::AuthError),
    #[error(transparent)]
    Core(#[from] forkd_core::CoreError),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// Runs the daemon until SIGTERM or SIGINT. `log` receives start-up and
/// recovery lines.
pub fn run(env: &Env, opts: DaemonOptions, log: &dyn Fn(&str)) -> Result<(), DaemonError> {
    let policy = ListenPolicy::new(opts.listen.clone(), opts.token.as_deref())?;
    if let forkd_api::auth::SocketAccess::Group(g) = &opts.socket_access {
        server::group_id(g)?; // refuse an unknown group before anything starts
    }
    let daemon = ops::Daemon::new(env.clone())?;
    let rec = daemon.fleet.recover()?;
    log(&format!(
        "recovered: {} running sandboxes re-attached, {} dead, {} whose start was interrupted killed, {} branches still writing, {} interrupted branches failed",
        rec.running.len(),
        rec.dead.len(),
        rec.abandoned.len(),
        rec.writing.len(),
        rec.failed.len()
    ));
    let audit = server::open_audit(&opts.audit_log)?;
    let daemon = Arc::new(daemon);
    let app = Arc::new(server::App {
        daemon: daemon.clone(),
        policy,
        spawn_limit: ConcurrencyLimit::new("spawn", opts.max_spawn.max(1), 2),
        branch_limit: ConcurrencyLimit::new("branch", opts.max_branch.max(1), 1),
        audit: Mutex::new(Some(audit)),
        audit_path: opts.audit_log.clone(),
        socket_access: opts.socket_access.clone(),
        mcp: forkd_mcp::http_service(daemon.fleet.clone()),
    });
    log(&format!(
        "listening on {}{}; audit log {}",
        opts.listen,
        if opts.token.is_some() {
            " (bearer token required)"
        } else {
            ""
        },
        opts.audit_log.display()
    ));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(256)
        .enable_all()
        .build()?;
    let e2b = opts.e2b.clone().map(|o| {
        log(&format!(
            "E2B API on {}{}",
            o.listen,
            if o.api_keys.is_some() {
                " (API key required)"
            } else {
                " (any API key: loopback only)"
            }
        ));
        let state = Arc::new(e2b::E2b::new(daemon.fleet.clone(), o.api_keys, &env.home));
        (state, o.listen)
    });
    let served = rt.block_on(async move {
        match e2b {
            // The E2B listener lives as long as the main one; a failure to
            // bind it stops the daemon.
            Some((state, listen)) => tokio::select! {
                r = server::serve(app) => r,
                r = e2b::serve(state, listen, std::future::pending()) => r,
            },
            None => server::serve(app).await,
        }
    });
    // Handlers still blocked on a guest (an exec that never ends) are
    // abandoned, not waited for: the sandboxes are detached and go on.
    rt.shutdown_timeout(std::time::Duration::from_millis(500));
    served?;
    log("stopped; sandboxes keep running");
    Ok(())
}
