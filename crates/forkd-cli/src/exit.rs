//! The CLI's exit codes, one convention for every command (the README has
//! the table). A command run in a guest (`exec`, `run`) exits with its own
//! code, 128+N for signal N, 124 when forkd killed it at its timeout; forkd's
//! own failures use codes that convention leaves free.

use std::process::ExitCode;

use forkd_ops::{ErrorKind, OpError};

/// Some of several items (children of a spawn, ids to kill) failed; each is
/// named on stderr (or in the JSON).
pub const SOME_FAILED: u8 = 1;
/// The command line or a request was wrong (clap uses 2 for usage too).
pub const BAD_INPUT: u8 = 2;
/// forkd failed: a sandbox or snapshot not found, in the wrong state, busy,
/// or the host, QEMU or the guest failed.
pub const FORKD_FAILED: u8 = 125;

/// A mistake in the command line, found by forkd rather than clap.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Usage(pub String);

/// The exit code of an operation's error.
pub fn of_op(e: &OpError) -> u8 {
    match e.kind {
        ErrorKind::BadInput => BAD_INPUT,
        ErrorKind::NotFound
        | ErrorKind::Conflict
        | ErrorKind::Busy
        | ErrorKind::Unprocessable
        | ErrorKind::PermissionDenied
        | ErrorKind::Internal => FORKD_FAILED,
    }
}

/// The exit code of whatever a command failed with.
pub fn of_error(e: &anyhow::Error) -> u8 {
    if let Some(op) = e.downcast_ref::<OpError>() {
        return of_op(op);
    }
    if e.downcast_ref::<Usage>().is_some() {
        return BAD_INPUT;
    }
    FORKD_FAILED
}

/// The exit code of a command over several items: success when none
/// failed, [`SOME_FAILED`] when some did, the error's own code when all did.
pub fn of_items(succeeded: usize, first_failure: Option<&OpError>) -> ExitCode {
    match (succeeded, first_failure) {
        (_, None) => ExitCode::SUCCESS,
        (0, Some(e)) => ExitCode::from(of_op(e)),
        (_, Some(_)) => ExitCode::from(SOME_FAILED),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_not_found_exits_alike_and_bad_input_is_two() {
        assert_eq!(of_op(&OpError::no_sandbox("x")), FORKD_FAILED);
        assert_eq!(of_op(&OpError::no_snapshot("x")), FORKD_FAILED);
        assert_eq!(of_op(&OpError::bad_input("x")), BAD_INPUT);
        assert_eq!(of_error(&anyhow::Error::new(Usage("x".into()))), BAD_INPUT);
        assert_eq!(
            of_error(&anyhow::Error::new(OpError::no_sandbox("x"))),
            FORKD_FAILED
        );
        assert_eq!(of_items(2, None), ExitCode::SUCCESS);
        assert_eq!(
            of_items(1, Some(&OpError::no_sandbox("x"))),
            ExitCode::from(1)
        );
        assert_eq!(
            of_items(0, Some(&OpError::no_sandbox("x"))),
            ExitCode::from(FORKD_FAILED)
        );
    }
}
