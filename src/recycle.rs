//! The recycling policy, consulted by both processes: when a worker has
//! served enough requests to be replaced, and how many replacements may be
//! in flight at once.
//!
//! A worker counts its requests on the scoreboard and rings the master's
//! doorbell when it reaches its limit; the master starts its replacement
//! (within the server's surge budget) and drains the worker once the
//! replacement is ready. Capacity never dips, and the server never runs
//! more than [`MAX_SURGE`] processes beyond its workers for recycling.

use serde::{Deserialize, Serialize};

/// Replacements for recycled workers (request or memory limit) in flight
/// at once, for the whole server.
pub(crate) const MAX_SURGE: usize = 1;

/// A worker's request limit: `max_requests` plus its share of the jitter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct RequestLimit {
    /// The count at which the worker is replaced.
    pub(crate) limit: u64,
    /// The count at which its replacement starts; equal to `limit` (kept
    /// in the worker's spec for binaries that read it).
    pub(crate) prespawn_at: u64,
}

impl RequestLimit {
    /// The limit `max_requests + jitter`, or none when `max_requests` is 0.
    /// `jitter` is drawn by the caller in `0..=max_requests_jitter`.
    pub(crate) fn new(max_requests: u64, jitter: u64) -> Option<RequestLimit> {
        (max_requests > 0).then_some(RequestLimit {
            limit: max_requests + jitter,
            prespawn_at: max_requests + jitter,
        })
    }

    /// Whether a worker that has started `requests` requests is due for
    /// replacement.
    pub(crate) fn reached(&self, requests: u64) -> bool {
        requests >= self.limit
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_means_never() {
        assert_eq!(RequestLimit::new(0, 5), None);
    }

    #[test]
    fn the_jitter_is_added_and_the_limit_is_inclusive() {
        let l = RequestLimit::new(1000, 37).unwrap();
        assert_eq!(l.limit, 1037);
        assert!(!l.reached(1036));
        assert!(l.reached(1037));
    }
}
