//! The defaults and rules every front end gets, decided here once. A front
//! end leaves a request field `None`; the side of the seam that runs the
//! operation fills it in with these.

use std::time::Duration;

use crate::state::BranchMode;
use crate::types::PartialFailure;

/// Guest memory of a new sandbox, in MiB.
pub const MEM_MIB: u64 = 256;
/// Virtual CPUs of a new sandbox.
pub const CPUS: u32 = 1;
/// Root disk of a new sandbox.
pub const IMAGE: &str = "busybox";
/// A branch is live unless asked otherwise.
pub const BRANCH_MODE: BranchMode = BranchMode::Live;
/// A branch returns once its snapshot is ready unless asked otherwise.
pub const BRANCH_WAITS: bool = true;
/// A spawn from a snapshot still being written waits for it unless asked
/// otherwise (it never maps a half-written image).
pub const SPAWN_WAITS_FOR_WRITING: bool = true;
/// How long a spawn waits for a snapshot being written.
pub const WRITING_WAIT_LIMIT: Duration = Duration::from_secs(600);
/// What a fan-out does when some children fail: the others are kept and
/// each failure is reported in its slot.
pub const PARTIAL_FAILURE: PartialFailure = PartialFailure::Keep;
/// Whether spawned children map their RAM on 2 MiB huge pages unless asked
/// otherwise. Off: a child that touches a few scattered 4 KiB pages would
/// copy whole 2 MiB pages, and fan-out density (siblings sharing every page
/// they have not written) is what spawn is for; a caller who will branch
/// the children asks for huge pages (bench/results/branch-children.md has
/// the measured trade).
pub const CHILD_HUGE_PAGES: bool = false;
/// How long a command an agent runs (through MCP) may take unless it asks
/// for longer: a tool call must come back.
pub const AGENT_COMMAND_TIMEOUT: Duration = Duration::from_secs(60);
/// How much of each output stream an agent gets back from one command;
/// the rest is counted and marked.
pub const AGENT_OUTPUT_CAP: usize = 64 << 10;
/// Writing a file creates its missing parent directories unless asked not to.
pub const WRITE_CREATES_PARENTS: bool = true;
/// How long a followed process may stay silent before its follower gets a
/// [`crate::ProcessEvent::Quiet`].
pub const PROCESS_QUIET: Duration = Duration::from_secs(2);
/// How long a read from a guest port ([`crate::PortConn`]) waits for bytes
/// before it fails: a server in the guest that stalls cannot hold a relay
/// for ever.
pub const PORT_IDLE: Duration = Duration::from_secs(900);
/// How long a guest's code interpreter may take to start (Python under TCG).
pub const CODE_INTERPRETER_START: Duration = Duration::from_secs(180);
/// How long an eval may run unless asked otherwise.
pub const EVAL_TIMEOUT: Duration = Duration::from_secs(30);
/// Most children (and pool members) one call may ask for.
/// How many levels a directory listing descends unless asked (1: the
/// directory's own entries).
pub const LIST_DEPTH: u32 = 1;

pub const MAX_CHILDREN: usize = 1000;

/// Most bytes of each output stream (stdout, stderr) an exec that answers
/// in one piece keeps; the rest is dropped and counted, and the answer says
/// so. Streaming an exec has no such limit: its output is never held.
pub const EXEC_BUFFERED_OUTPUT_LIMIT: usize = 8 << 20;

/// Free space (MiB) kept on the runtime tmpfs beyond what admitted guests
/// may still claim, so that a guest never dies of SIGBUS writing its RAM.
pub const TMPFS_HEADROOM_MIB: u64 = 64;

/// The environment variable that sets the most guest memory (MiB, the sum
/// of the sandboxes' sizes) one runtime directory may commit; `0` means no
/// limit.
pub const GUEST_MEMORY_LIMIT_VAR: &str = "FORKD_GUEST_MEMORY_LIMIT_MIB";

/// The committed guest memory allowed when [`GUEST_MEMORY_LIMIT_VAR`] is
/// not set: twice the host's RAM (children share their snapshot's pages
/// copy-on-write, so guests rarely touch all they were given).
pub fn default_guest_memory_limit_mib(host_ram_mib: u64) -> u64 {
    host_ram_mib.saturating_mul(2)
}

/// The tag of a branch that was given none: the source's id and the time in
/// milliseconds, so two branches of one sandbox a moment apart do not clash.
pub fn default_branch_tag(source: &str, unix_ms: u128) -> String {
    format!("{source}-branch-{unix_ms}")
}

/// How many children of an `n`-child spawn start at once: as asked, else one
/// per host core; never more than `n`, never less than one.
pub fn spawn_parallelism(n: usize, asked: Option<usize>, cores: usize) -> usize {
    asked.unwrap_or(cores).clamp(1, n.max(1))
}

/// Checks a child count (`-n`, a pool size) against [`MAX_CHILDREN`].
pub fn check_children(what: &str, n: usize, min: usize) -> Result<(), crate::OpError> {
    if n < min || n > MAX_CHILDREN {
        return Err(crate::OpError::bad_input(format!(
            "{what} must be between {min} and {MAX_CHILDREN}, not {n}"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parallelism_is_bounded_by_the_children_and_at_least_one() {
        assert_eq!(spawn_parallelism(10, None, 2), 2);
        assert_eq!(spawn_parallelism(1, None, 16), 1);
        assert_eq!(spawn_parallelism(10, Some(4), 2), 4);
        assert_eq!(spawn_parallelism(3, Some(0), 2), 1);
        assert_eq!(spawn_parallelism(3, Some(64), 2), 3);
    }

    #[test]
    fn default_tags_are_valid_tags() {
        let t = default_branch_tag("sb-0123abcd", 1_764_488_123_456);
        assert_eq!(t, "sb-0123abcd-branch-1764488123456");
        crate::validate_tag(&t).unwrap();
    }

    #[test]
    fn child_counts_are_checked_with_their_name() {
        assert!(check_children("-n", 1, 1).is_ok());
        assert_eq!(
            check_children("-n", 0, 1).unwrap_err().message,
            "-n must be between 1 and 1000, not 0"
        );
        assert!(check_children("--size", 0, 0).is_ok());
        assert!(check_children("--size", 1001, 0).is_err());
    }
}
