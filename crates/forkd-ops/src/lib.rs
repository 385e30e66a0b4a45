//! The seam every forkd front end calls: one trait, [`Operations`], for
//! everything a user does with sandboxes and snapshots (create, exec, files,
//! processes, guest ports, branch, spawn, pool, kill, list, info, compact,
//! delete, prune, gc, push, pull), with its request and result types, its
//! error ([`OpError`]) and its defaults ([`policy`]).
//!
//! `forkd-core`'s fleet implements it on this host; `forkd-client`
//! implements it against a daemon. The CLI, the daemon's `/v1` API, the
//! E2B-compatible API and the MCP server are adapters that parse, call the
//! trait and print. Nothing here does I/O: types, rules and the trait only.

mod error;
mod guest;
pub mod image;
pub mod lifetime;
mod name;
pub mod policy;
mod state;
mod transfer;
mod types;

use std::io::{Read, Write};
use std::time::Duration;

pub use error::{ErrorKind, Hint, OpError};
pub use guest::*;
pub use lifetime::{Lifetime, Settings};
pub use name::{validate_id, validate_tag, InvalidName, MAX_NAME_LEN};
pub use state::{BranchMode, SandboxState, SnapshotStatus, UnknownState};
pub use transfer::*;
pub use types::*;

/// Called with each progress report of a push or pull.
pub type OnTransfer<'a> = &'a (dyn Fn(&TransferProgress) + Sync);

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

    /// Moves a sandbox's end time to `ttl` from now (`None`: it lives until
    /// killed); returns it as it is now.
    fn set_timeout(&self, id: &str, ttl: Option<Duration>) -> Result<Sandbox, OpError>;

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

    /// A round trip to the guest agent.
    fn ping(&self, id: &str) -> Result<Pong, OpError>;

    /// Runs Python code in the sandbox's persistent interpreter: variables
    /// survive between calls, and into branches and children (the guest
    /// needs python3).
    fn eval(&self, id: &str, code: &str, timeout: Option<Duration>)
        -> Result<EvalOutcome, OpError>;

    // ---- files

    /// Writes a file in the guest (created or truncated); returns its size.
    fn write_file(
        &self,
        id: &str,
        path: &str,
        opts: &WriteOptions,
        data: &mut dyn Read,
    ) -> Result<u64, OpError>;

    /// Reads a file from the guest into `out`; returns its size.
    fn read_file(
        &self,
        id: &str,
        path: &str,
        user: Option<&str>,
        out: &mut dyn Write,
    ) -> Result<u64, OpError>;

    /// Facts about a path.
    fn stat(&self, id: &str, path: &str, user: Option<&str>) -> Result<FileInfo, OpError>;

    /// A directory's entries, `depth` levels down (1: the directory's own
    /// entries), sorted by path.
    fn list_dir(
        &self,
        id: &str,
        path: &str,
        depth: u32,
        user: Option<&str>,
    ) -> Result<Vec<FileInfo>, OpError>;

    /// Makes a directory and its missing parents; false when it existed.
    fn make_dir(&self, id: &str, path: &str, user: Option<&str>) -> Result<bool, OpError>;

    /// Removes a file, or a directory with everything in it.
    fn remove_path(&self, id: &str, path: &str, user: Option<&str>) -> Result<(), OpError>;

    /// Moves or renames a path; returns it at its new place.
    fn rename_path(
        &self,
        id: &str,
        from: &str,
        to: &str,
        user: Option<&str>,
    ) -> Result<FileInfo, OpError>;

    /// Unpacks a tar stream into directory `dir` in the guest (created with
    /// its parents; modes kept).
    fn copy_in(
        &self,
        id: &str,
        dir: &str,
        user: Option<&str>,
        tar: &mut dyn Read,
    ) -> Result<TarSummary, OpError>;

    /// Packs a file or directory of the guest into a tar stream.
    fn copy_out(
        &self,
        id: &str,
        path: &str,
        user: Option<&str>,
        tar: &mut dyn Write,
    ) -> Result<TarSummary, OpError>;

    /// Starts watching a directory; returns the watch to poll.
    fn watch_dir(
        &self,
        id: &str,
        path: &str,
        recursive: bool,
        user: Option<&str>,
    ) -> Result<u32, OpError>;

    /// The changes under a watch since the last call, waiting up to `wait`
    /// for the first.
    fn watch_events(&self, id: &str, watch: u32, wait: Duration) -> Result<Vec<FsEvent>, OpError>;

    /// Stops a watch.
    fn unwatch(&self, id: &str, watch: u32) -> Result<(), OpError>;

    // ---- processes the guest keeps

    /// Starts a process that outlives the call and follows it from its first
    /// byte: `on_event` hears `Started` first, then its output, until it
    /// ends (returns how) or `on_event` answers false (returns `None`; the
    /// process goes on).
    fn run_process(
        &self,
        id: &str,
        spec: &ProcessSpec,
        on_event: &mut dyn FnMut(ProcessEvent) -> bool,
    ) -> Result<Option<ExecOutcome>, OpError>;

    /// Follows a running process's output (from the oldest output still
    /// kept with `replay`, else from now), as [`Operations::run_process`].
    fn follow_process(
        &self,
        id: &str,
        process: &ProcessRef,
        replay: bool,
        on_event: &mut dyn FnMut(ProcessEvent) -> bool,
    ) -> Result<Option<ExecOutcome>, OpError>;

    /// Writes to a process's stdin; `close` closes it after.
    fn process_input(
        &self,
        id: &str,
        process: &ProcessRef,
        data: &[u8],
        close: bool,
    ) -> Result<(), OpError>;

    /// Sends a signal to a process's group.
    fn signal_process(&self, id: &str, process: &ProcessRef, signal: i32) -> Result<(), OpError>;

    /// Resizes a process's terminal.
    fn resize_process(&self, id: &str, process: &ProcessRef, size: PtySize) -> Result<(), OpError>;

    /// The processes the guest keeps (running, and the last ended ones).
    fn list_processes(&self, id: &str) -> Result<Vec<ProcessInfo>, OpError>;

    // ---- guest ports

    /// Starts E2B's code interpreter server in the guest on `port` unless it
    /// runs there, and waits until it takes connections; returns its pid.
    /// Needs python3 in the guest.
    fn code_interpreter(&self, id: &str, port: u16) -> Result<u32, OpError>;

    /// Opens a TCP connection to `127.0.0.1:port` inside the guest, relayed
    /// over the agent channel. Only a fleet on this host relays bytes; the
    /// `/v1` client refuses.
    fn connect_port(&self, id: &str, port: u16) -> Result<PortConn, OpError>;

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

    /// Rewrites a snapshot made of a chain of RAM and disk layers as one
    /// RAM image and one disk layer, without changing what spawns from it;
    /// the snapshots below it are kept. Published atomically: any failure
    /// leaves the snapshot as it was.
    fn compact(&self, tag: &str) -> Result<Compacted, OpError>;

    /// Deletes every failed and broken snapshot that nothing else needs.
    fn prune_snapshots(&self) -> Result<Pruned, OpError>;

    /// Deletes cached files no snapshot references (RAM images children
    /// map, shared by every home on the host).
    fn gc(&self) -> Result<GcReport, OpError>;

    // ---- registries

    /// Pushes a snapshot and its chain of parents to an OCI registry as one
    /// artifact; chunks the registry already has are not sent again.
    fn push(&self, req: &PushRequest, progress: OnTransfer<'_>) -> Result<PushOutcome, OpError>;

    /// Pulls a snapshot (and the parents this host lacks) from an OCI
    /// registry, verifies everything, and publishes it atomically; an
    /// interrupted pull resumes where it stopped.
    fn pull(&self, req: &PullRequest, progress: OnTransfer<'_>) -> Result<PullOutcome, OpError>;
}
