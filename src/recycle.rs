//! The recycling policy, consulted by both processes: when a worker has
//! served enough requests to be replaced, and how many replacements may be
//! in flight at once.
//!
//! A worker counts its requests on the scoreboard and rings the master's
//! doorbell when it nears its limit (the last [`PRESPAWN_SHARE`]th of it)
//! and when it reaches it; the master starts its replacement as the worker
//! nears its limit (within the server's surge budget) and drains the worker
//! once the replacement is ready and the limit reached. At saturation the
//! replacement is thus ready about when the limit is reached, so the worker
//! stops close to its limit instead of serving on through its
//! replacement's boot; with little traffic the worker is drained a while
//! after its replacement started, a little short of its limit. Capacity never dips, and the server never runs more than
//! [`MAX_SURGE`] processes beyond its workers for recycling.

use serde::{Deserialize, Serialize};

/// Replacements for recycled workers (request or memory limit) in flight
/// at once, for the whole server.
pub(crate) const MAX_SURGE: usize = 1;

/// The share of a worker's request limit left when its replacement starts:
/// one eighth (125 requests of 1000). At saturation that is about a boot's
/// worth of requests.
pub(crate) const PRESPAWN_SHARE: u64 = 8;

/// A worker's request limit: `max_requests` plus its share of the jitter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct RequestLimit {
    /// The count at which the worker is replaced.
    pub(crate) limit: u64,
    /// The count at which its replacement starts (the last
    /// [`PRESPAWN_SHARE`]th of `limit` left).
    pub(crate) prespawn_at: u64,
}

impl RequestLimit {
    /// The limit `max_requests + jitter`, or none when `max_requests` is 0.
    /// `jitter` is drawn by the caller in `0..=max_requests_jitter`.
    pub(crate) fn new(max_requests: u64, jitter: u64) -> Option<RequestLimit> {
        let limit = max_requests + jitter;
        (max_requests > 0).then_some(RequestLimit {
            limit,
            prespawn_at: limit - limit / PRESPAWN_SHARE,
        })
    }

    /// Whether a worker that has started `requests` requests is near
    /// enough its limit for its replacement to start.
    pub(crate) fn due(&self, requests: u64) -> bool {
        requests >= self.prespawn_at
    }

    /// Whether the worker rings its master at its `requests`th request:
    /// when its replacement is due, and at its limit.
    pub(crate) fn rings_at(&self, requests: u64) -> bool {
        requests == self.prespawn_at || requests == self.limit
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

    #[test]
    fn the_replacement_is_due_for_the_last_eighth() {
        let l = RequestLimit::new(1000, 0).unwrap();
        assert_eq!(l.prespawn_at, 875);
        assert!(!l.due(874));
        assert!(l.due(875));
        assert!(l.rings_at(875) && l.rings_at(1000));
        assert!(!l.rings_at(876) && !l.rings_at(1001));
        // A limit of one: due at once, ringing once.
        let one = RequestLimit::new(1, 0).unwrap();
        assert_eq!(one.prespawn_at, 1);
        assert!(one.rings_at(1));
    }
}
