//! The seam every forkd front end calls: one trait, [`Operations`], for
//! everything a user does with sandboxes and snapshots (create, exec, files,
//! branch, spawn, pool, kill, list, info, delete, prune, gc), with its request and
//! result types, its error ([`OpError`]) and its defaults ([`policy`]).
//!
//! `forkd-core`'s fleet implements it on this host; `forkd-client`
//! implements it against a daemon. The CLI, the daemon's `/v1` API, the
//! E2B-compatible API and the MCP server are adapters that parse, call the
//! trait and print. Nothing here does I/O: types, rules and the trait only.

mod error;
mod name;
pub mod policy;
mod state;
mod types;

use std::io::{Read, Write};

pub use error::{ErrorKind, Hint, OpError};
pub use name::{validate_id, validate_tag, InvalidName, MAX_NAME_LEN};
pub use state::{BranchMode, SandboxState, SnapshotStatus, UnknownState};
pub use types::*;

/// Called as each child of a spawn finishes, with its slot.
pub type OnChild<'a> = &'a (dyn Fn(usize, &Result<Child, OpError>) + Sync);

/// Everything a user does with sandboxes and snapshots.
pub trait Operations: Send + Sync {
    /// Boots a sandbox that outlives the caller. `progress` hears about
    /// long preparations (building guest images).
    fn create(&self, req: &CreateRequest, progress: &dyn Fn(&str)) -> Result<Created, OpError>;

    /// Every sandbox, dead ones included (marked so).
    fn list(&self) -> Result<Vec<Sandbox>, OpError>;

    /// One sandbox.
    fn sandbox(&self, id: &str) -> Result<Sandbox, OpError>;

    /// Kills a sandbox (if it still runs) and removes its files and record.
    fn kill(&self, id: &str) -> Result<(), OpError>;

    /// Kills every sandbox, and every QEMU of this home that has no record
    /// (a creator that died before it wrote one), and collects the caches
    /// nothing references any more.
    fn kill_all(&self) -> Result<KilledAll, OpError>;

    /// Runs a command, streaming its output to `output` as it comes.
    fn exec(
        &self,
        id: &str,
        spec: &ExecSpec,
        stdin: Option<Box<dyn Read + Send>>,
        output: &mut dyn FnMut(Stream, &[u8]),
    ) -> Result<ExecOutcome, OpError>;

    /// Runs Python code (the guest needs python3).
    fn eval(&self, id: &str, code: &str) -> Result<EvalOutcome, OpError>;

    /// A round trip to the guest agent.
    fn ping(&self, id: &str) -> Result<Pong, OpError>;

    /// Writes a file in the guest (created or truncated); returns its size.
    fn write_file(
        &self,
        id: &str,
        path: &str,
        mode: Option<u32>,
        data: &mut dyn Read,
    ) -> Result<u64, OpError>;

    /// Reads a file from the guest into `out`; returns its size.
    fn read_file(&self, id: &str, path: &str, out: &mut dyn Write) -> Result<u64, OpError>;

    /// Snapshots a running sandbox (live: the pause does not grow with its
    /// memory; full: stop, copy, resume).
    fn branch(&self, req: &BranchRequest) -> Result<BranchOutcome, OpError>;

    /// Starts copy-on-write children of a snapshot. Fails as a whole only
    /// when nothing could start (bad request, unusable snapshot); otherwise
    /// each slot holds its child or why it failed.
    fn spawn(&self, req: &SpawnRequest, on_child: OnChild<'_>) -> Result<SpawnOutcome, OpError>;

    /// Tops a snapshot's warm pool up to `size` pre-started members.
    fn pool(&self, tag: &str, size: usize) -> Result<PoolStatus, OpError>;

    /// Every snapshot.
    fn snapshots(&self) -> Result<Vec<Snapshot>, OpError>;

    /// One snapshot with its files, chain and dependents.
    fn snapshot_info(&self, tag: &str) -> Result<SnapshotDetail, OpError>;

    /// Deletes a snapshot; returns the tags deleted (more than one with
    /// `cascade`).
    fn remove_snapshot(&self, tag: &str, opts: RemoveSnapshot) -> Result<Vec<String>, OpError>;

    /// Deletes every failed and broken snapshot that nothing else needs.
    fn prune_snapshots(&self) -> Result<Pruned, OpError>;

    /// Deletes cached files no snapshot references (RAM images children
    /// map, shared by every home on the host).
    fn gc(&self) -> Result<GcReport, OpError>;
}
