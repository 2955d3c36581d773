//! Where a worker's connections should be: nudges from the worker to its
//! connections, for two reasons.
//!
//! **Balance** ([`crate::balance`] decides): a worker answering well above
//! its siblings asks some of its idle HTTP/1.1 connections to go to a
//! sibling ([`Placement::give`]); each connection woken takes one from
//! that budget, waits for a moment between requests and is handed over
//! through the queue, as a leaving worker's are (a connection that cannot
//! go stays and is served as before). A worker giving takes no handed-over
//! connection itself ([`Placement::giving`]).
//!
//! **Fair admission at the connection cap**: a worker holding
//! `--worker-connections` connections while new clients wait in the accept
//! queue makes room for them, as nginx does with its reusable connections,
//! instead of leaving them waiting for as long as the connections it holds
//! stay open.
//!
//! The worker is *crowded* while it is at its cap, a connection waits in a
//! listening socket's queue (looked at every [`CHECK`]), and no other ready
//! worker is below the cap to accept it. While it is:
//! - an idle keep-alive connection (nothing in flight, its last answer
//!   [`IDLE_FOR`] old or more) is closed, HTTP/2 with GOAWAY: one at the
//!   first crowded look, then twice as many at each look that still finds
//!   clients waiting though the last look's closes were all made, up to
//!   [`BUDGET`], so that a worker holding thousands of idle browsers
//!   closes about as many as wait;
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

/// The most idle connections closed for one look.
pub(crate) const BUDGET: usize = 32;

/// A worker's nudges, shared by its accept loops, its balance task and its
/// connections.
#[derive(Default)]
pub(crate) struct Placement {
    crowded: AtomicBool,
    /// How many idle connections a crowded look may close: 1 at the first,
    /// doubled at each crowded look that follows one whose budget was used
    /// up (clients still wait though connections were closed).
    size: AtomicUsize,
    /// Traffic still to shed for balance in this tick, in thousandths of
    /// a request a second.
    give: AtomicU64,
    /// How far the least loaded worker is below the mean, less what was
    /// moved since, in the same unit.
    room: AtomicU64,
    /// Whether this tick asked for any.
    giving: AtomicBool,
    /// How many ready siblings are less loaded (they take handed-over
    /// connections first).
    rank: AtomicUsize,
    /// Changes at every look that finds the worker crowded: a connection
    /// polls its wake-up only then.
    looks: AtomicU64,
    /// Idle connections that may still close for this look.
    budget: AtomicUsize,
    wake: Notify,
}

impl Placement {
    /// Asks connections carrying `rate` requests a second between them to
    /// go to siblings (for this balance tick; 0 ends the previous tick's
    /// giving).
    /// `room` is how far below the mean the least loaded worker is.
    pub(crate) fn give(&self, rate: f64, room: f64) {
        let milli = (rate.max(0.0) * 1000.0) as u64;
        self.room
            .store((room.max(0.0) * 1000.0) as u64, Ordering::Relaxed);
        self.give.store(milli, Ordering::Relaxed);
        self.giving.store(milli > 0, Ordering::Relaxed);
        if milli > 0 {
            self.looks.fetch_add(1, Ordering::Release);
            self.wake.notify_waiters();
        }
    }

    /// Records how many ready siblings are less loaded.
    pub(crate) fn set_rank(&self, rank: usize) {
        self.rank.store(rank, Ordering::Relaxed);
    }

    /// How many ready siblings are less loaded.
    pub(crate) fn rank(&self) -> usize {
        self.rank.load(Ordering::Relaxed)
    }

    /// Whether this worker is giving connections away in this tick.
    pub(crate) fn giving(&self) -> bool {
        self.giving.load(Ordering::Relaxed)
    }

    /// Takes the move of a connection answering `rate` requests a second
    /// from this tick's balance budget, if it fits ([`crate::balance::fits`]).
    pub(crate) fn take_give(&self, rate: f64) -> bool {
        let milli = (rate.max(0.0) * 1000.0) as u64;
        let room = self.room.load(Ordering::Relaxed);
        let took = self
            .give
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |left| {
                crate::balance::fits(rate, left as f64 / 1000.0, room as f64 / 1000.0)
                    .then(|| left.saturating_sub(milli))
            })
            .is_ok();
        if took {
            let _ = self
                .room
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |r| {
                    Some(r.saturating_sub(milli))
                });
        }
        took
    }

    /// Whether new clients wait while this worker is at its cap.
    pub(crate) fn is_crowded(&self) -> bool {
        self.crowded.load(Ordering::Relaxed)
    }

    /// Records a look: crowded or not. A crowded look renews the budget
    /// (doubling it from one while looks stay crowded) and wakes every
    /// connection to see whether it is an idle one to close.
    pub(crate) fn looked(&self, crowded: bool) {
        self.crowded.store(crowded, Ordering::Relaxed);
        if !crowded {
            self.size.store(0, Ordering::Relaxed);
        } else {
            let used_up = self.budget.load(Ordering::Relaxed) == 0;
            let size = self.size.load(Ordering::Relaxed);
            let size = match size {
                0 => 1,
                n if used_up => (n * 2).min(BUDGET),
                n => n,
            };
            self.size.store(size, Ordering::Relaxed);
            self.budget.store(size, Ordering::Relaxed);
            self.looks.fetch_add(1, Ordering::Release);
            self.wake.notify_waiters();
        }
    }

    /// The number of nudges (crowded looks, balance asks) so far.
    pub(crate) fn looks(&self) -> u64 {
        self.looks.load(Ordering::Acquire)
    }

    /// Resolves at the next nudge (or at once if one happened since this
    /// was made).
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
        let crowd = Placement::default();
        assert!(!crowd.is_crowded());
        assert!(!crowd.take_one(), "no budget before a crowded look");
        // One, then two, four... while clients still wait though every
        // close allowed was made; at most BUDGET.
        let mut budgets = Vec::new();
        for _ in 0..8 {
            crowd.looked(true);
            assert!(crowd.is_crowded());
            budgets.push((0..BUDGET * 2).filter(|_| crowd.take_one()).count());
        }
        assert_eq!(budgets, [1, 2, 4, 8, 16, 32, 32, 32]);
        assert_eq!(crowd.looks(), 8);
        crowd.looked(false);
        assert!(!crowd.is_crowded());
        assert_eq!(crowd.looks(), 8);
        // Looks at which no idle connection was ready to close do not
        // grow the budget.
        crowd.looked(true);
        crowd.looked(true);
        crowd.looked(true);
        assert!(crowd.take_one() && !crowd.take_one(), "starts over at one");
        crowd.looked(true);
        assert_eq!((0..4).filter(|_| crowd.take_one()).count(), 2);
    }

    #[test]
    fn a_balance_ask_gives_its_budget_and_the_next_tick_ends_it() {
        let p = Placement::default();
        assert!(!p.giving() && !p.take_give(10.0));
        // 50 above the mean, the least loaded 20 below it.
        p.give(50.0, 20.0);
        assert!(p.giving());
        assert_eq!(p.looks(), 1);
        // 85 would widen the gap (past the slack); 30 fits (20 left, the
        // least loaded 10 above the mean then), 15 too (5 left); then 25
        // is too much.
        assert!(!p.take_give(85.0));
        assert!(p.take_give(30.0) && p.take_give(15.0));
        assert!(!p.take_give(25.0) && !p.take_give(0.0));
        assert!(p.room.load(Ordering::Relaxed) == 0);
        assert!(p.take_give(4.0) && p.take_give(1.0));
        assert!(!p.take_give(1.0), "no longer above the mean");
        // Still this tick's giver (it takes nothing handed over) until the
        // next tick says otherwise.
        assert!(p.giving());
        p.give(0.0, 0.0);
        assert!(!p.giving());
        assert_eq!(p.looks(), 1);
    }

    #[tokio::test]
    async fn a_crowded_look_wakes_a_waiting_connection() {
        let crowd = std::sync::Arc::new(Placement::default());
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
