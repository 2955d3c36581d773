//! Fair admission at the connection cap: a worker holding
//! `--worker-connections` connections while new clients wait in the accept
//! queue makes room for them, as nginx does with its reusable connections,
//! instead of leaving them waiting for as long as the connections it holds
//! stay open.
//!
//! The worker is *crowded* while it is at its cap and a connection waits
//! in a listening socket's queue (looked at every [`CHECK`]). While it is:
//! - an idle keep-alive connection (nothing in flight, its last answer
//!   [`IDLE_FOR`] old or more) is closed, HTTP/2 with GOAWAY; at most
//!   [`BUDGET`] of them for each look, so that a worker holding thousands
//!   of idle browsers closes only about as many as wait;
//! - every HTTP/1.1 response begun carries `Connection: close`, so that
//!   busy keep-alive connections take turns with the clients that wait
//!   (each such client reconnects and queues behind them).
//!
//! A worker below its cap, or whose queue is empty, does neither: a
//! server with room never closes a connection for another's sake.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::Notify;

/// How often a worker at its cap looks at its listening sockets' queues.
pub(crate) const CHECK: Duration = Duration::from_millis(50);

/// How long an idle connection must have been idle to be closed for a
/// waiting client: its client is unlikely to be sending on it right now.
pub(crate) const IDLE_FOR: Duration = Duration::from_secs(1);

/// The most idle connections closed for each look.
pub(crate) const BUDGET: usize = 32;

/// A worker's crowding, shared by its accept loops and its connections.
#[derive(Default)]
pub(crate) struct Crowd {
    crowded: AtomicBool,
    /// Changes at every look that finds the worker crowded: a connection
    /// polls its wake-up only then.
    looks: AtomicU64,
    /// Idle connections that may still close for this look.
    budget: AtomicUsize,
    wake: Notify,
}

impl Crowd {
    /// Whether new clients wait while this worker is at its cap.
    pub(crate) fn is_crowded(&self) -> bool {
        self.crowded.load(Ordering::Relaxed)
    }

    /// Records a look: crowded or not. A crowded look renews the budget
    /// and wakes every connection to see whether it is an idle one to
    /// close.
    pub(crate) fn looked(&self, crowded: bool) {
        self.crowded.store(crowded, Ordering::Relaxed);
        if crowded {
            self.budget.store(BUDGET, Ordering::Relaxed);
            self.looks.fetch_add(1, Ordering::Release);
            self.wake.notify_waiters();
        }
    }

    /// The number of crowded looks so far.
    pub(crate) fn looks(&self) -> u64 {
        self.looks.load(Ordering::Acquire)
    }

    /// Resolves at the next crowded look (or at once if one happened since
    /// this was made).
    pub(crate) fn woken(&self) -> tokio::sync::futures::Notified<'_> {
        self.wake.notified()
    }

    /// Takes one idle connection's close from this look's budget.
    pub(crate) fn take_one(&self) -> bool {
        self.budget
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
            .is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_crowded_look_allows_a_budget_of_closes_and_a_calm_one_none_more() {
        let crowd = Crowd::default();
        assert!(!crowd.is_crowded());
        assert!(!crowd.take_one(), "no budget before a crowded look");
        crowd.looked(true);
        assert!(crowd.is_crowded());
        assert_eq!(crowd.looks(), 1);
        let taken = (0..BUDGET * 2).filter(|_| crowd.take_one()).count();
        assert_eq!(taken, BUDGET);
        crowd.looked(false);
        assert!(!crowd.is_crowded());
        assert_eq!(crowd.looks(), 1);
        crowd.looked(true);
        assert!(crowd.take_one());
    }

    #[tokio::test]
    async fn a_crowded_look_wakes_a_waiting_connection() {
        let crowd = std::sync::Arc::new(Crowd::default());
        let woken = crowd.woken();
        tokio::pin!(woken);
        // Made before the look: resolves even if first polled after it.
        crowd.looked(false);
        assert!(
            tokio::time::timeout(Duration::from_millis(10), &mut woken)
                .await
                .is_err(),
            "a calm look wakes nobody"
        );
        crowd.looked(true);
        tokio::time::timeout(Duration::from_secs(10), woken)
            .await
            .expect("woken");
    }
}
