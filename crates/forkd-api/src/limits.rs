//! Concurrency caps on spawn and branch: a call either takes a permit at once or
//! is refused with 429 and a `Retry-After`, never queued (a queued spawn would
//! hold its HTTP connection while VMs it cannot afford wait to start).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use crate::error::ApiError;

/// A cap of `max` concurrent operations of one kind.
#[derive(Clone, Debug)]
pub struct ConcurrencyLimit {
    what: &'static str,
    max: usize,
    retry_after_secs: u64,
    in_flight: Arc<AtomicUsize>,
}

/// Held while an operation runs; dropping it frees the slot.
#[derive(Debug)]
pub struct Permit {
    in_flight: Arc<AtomicUsize>,
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

impl ConcurrencyLimit {
    /// A cap of `max` operations named `what` ("spawn", "branch"); refused
    /// callers are told to retry after `retry_after_secs`.
    pub fn new(what: &'static str, max: usize, retry_after_secs: u64) -> Self {
        Self {
            what,
            max,
            retry_after_secs,
            in_flight: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// A permit, or 429 when `max` are in flight.
    pub fn try_acquire(&self) -> Result<Permit, ApiError> {
        self.in_flight
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.max).then_some(n + 1)
            })
            .map(|_| Permit {
                in_flight: self.in_flight.clone(),
            })
            .map_err(|_| ApiError::TooManyRequests {
                what: self.what,
                limit: self.max,
                retry_after_secs: self.retry_after_secs,
            })
    }

    /// Operations running now.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn over_the_cap_is_429_with_retry_after() {
        let limit = ConcurrencyLimit::new("branch", 2, 3);
        let a = limit.try_acquire().unwrap();
        let _b = limit.try_acquire().unwrap();
        let err = limit.try_acquire().unwrap_err();
        assert_eq!(err.status(), 429);
        assert_eq!(err.retry_after_secs(), Some(3));
        assert!(err.to_string().contains("branch"), "{err}");
        drop(a);
        assert_eq!(limit.in_flight(), 1);
        assert!(limit.try_acquire().is_ok());
    }

    #[test]
    fn zero_cap_refuses_everything() {
        assert!(ConcurrencyLimit::new("spawn", 0, 1).try_acquire().is_err());
    }
}
