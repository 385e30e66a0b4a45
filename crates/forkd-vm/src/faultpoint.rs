//! Named points where a fault-injection test can catch a long operation:
//! with `FORKD_TEST_STOP_AT=<name>` in its environment, a process reaching
//! point `<name>` stops itself (`SIGSTOP`), so that the test finds it
//! stopped at exactly that step and kills it with `SIGKILL`. Without the
//! variable a point costs one environment lookup. Nothing else is done
//! here: what the operation leaves behind is the operation's business.

/// The variable naming the point to stop at.
pub const STOP_AT_VAR: &str = "FORKD_TEST_STOP_AT";

/// Stops this process when the environment names `point`.
pub fn reached(point: &str) {
    if std::env::var(STOP_AT_VAR).is_ok_and(|v| v == point) {
        // SAFETY: raise only sends a signal to this process; SIGSTOP
        // cannot be caught and touches no memory of ours.
        unsafe {
            libc::raise(libc::SIGSTOP);
        }
    }
}
