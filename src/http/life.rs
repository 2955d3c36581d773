//! A connection's decider: facts in, steps out, no I/O. It decides a
//! connection's whole life in its worker: the header, keep-alive and drain
//! timers, `--max-connection-age`, `Connection: close` and GOAWAY, handing
//! the connection to a sibling (when the worker leaves, or for balance),
//! closing an idle one for a waiting client (fair admission at the cap),
//! and parking an idle one. The connection's loop ([`super::serve`]) and
//! the worker's parking lot ([`super::lot`]) only carry its steps out.
//!
//! | event ↓ / state → | serving | handing (leaving / balance) | draining | closing (told to close) |
//! |---|---|---|---|---|
//! | timer, idle, before its deadline | wait until the deadline | — | wait (grace) | wait |
//! | timer, idle, first head late | **header timeout** → closing | — | — | — |
//! | timer, idle, keep-alive over | shutdown → closing | — | — | — |
//! | timer, max age reached | → draining (busy HTTP/1.1: `Connection: close`) | — | HTTP/2: close after its grace | — |
//! | timer, grace over | — | balance: → serving; leaving, busy: wait; leaving, idle: → draining | HTTP/1.1 idle or HTTP/2: shutdown → closing | HTTP/2 idle: close |
//! | drain, HTTP/1.1, movable, a sibling ready, not stopping | → handing (leaving) | — | — | — |
//! | drain, otherwise | → draining | — | — | — |
//! | nudge, crowded, idle ≥ 1 s, budget | HTTP/1.1: shutdown → closing; HTTP/2: → draining | stay | stay | stay |
//! | nudge, balance budget fits, movable, settled | → handing (balance) | stay | stay | stay |
//! | between requests | — | **hand over** | — | — |
//! | handed: sent | — | over | — | — |
//! | handed: no sibling / kept | — | balance: → serving; leaving: → draining (kept: patient) | — | — |
//! | between requests, past [`PARK_ABOVE`] connections | **park** | — | — | — |
//!
//! Invariants (checked after every step of seeded random sequences):
//! - a connection is handed over or parked only between requests (nothing
//!   in flight, everything written), so HTTP/1.1 never has two responses
//!   in flight and no request is lost on the way;
//! - an HTTP/1.1 connection is only ever ended by a shutdown (hyper's
//!   lingering close, so unread request bytes never turn it into a reset)
//!   or by being handed over; an abrupt close is for HTTP/2 after GOAWAY;
//! - while its worker serves and is not crowded, an idle connection is
//!   closed only at its header or keep-alive deadline or its maximum age,
//!   never sooner.

use std::time::Duration;
use tokio::time::Instant;

/// The longest an idle HTTP/1 connection is kept open once draining starts,
/// and the longest a closing connection with nothing in flight waits for
/// its client's part of the close.
pub(super) const DRAIN_IDLE_GRACE: Duration = Duration::from_secs(1);
/// How often a draining connection looks at its state.
pub(super) const DRAIN_POLL: Duration = Duration::from_millis(50);
/// How long a connection asked to move for balance waits for a moment
/// between requests before it stays where it is.
pub(super) const REBALANCE_WAIT: Duration = Duration::from_secs(2);
/// Above this many open connections in a worker, an HTTP/1.1 connection
/// idle between requests is parked: it then costs little more than its
/// socket (well under a KiB instead of hyper's buffers and state, some
/// 18 KiB). Below, taking it apart and putting it together again per
/// request would cost a busy keep-alive client throughput for memory
/// nobody misses.
pub(super) const PARK_ABOVE: u64 = 256;

/// What woke a connection's task to act.
pub(super) enum Woke {
    /// A nudge from the worker: crowded (an idle connection may make
    /// room), or asking connections to move for balance.
    Nudged,
    /// The connection is over.
    Closed,
    /// The worker started draining.
    Drain,
    /// The connection's timer fired.
    Timer,
    /// A connection waiting to be handed over is between requests.
    BetweenRequests,
    /// The connection is parked and may leave its task for the lot.
    Parked,
}

/// `--max-connection-age` and its companions.
#[derive(Debug, Clone, Copy)]
pub(crate) struct MaxAge {
    pub(crate) age: Duration,
    pub(crate) jitter: Duration,
    pub(crate) grace: Duration,
}

impl MaxAge {
    /// This connection's own limit: the age plus a random share of the
    /// jitter, so that connections opened together do not close together.
    pub(super) fn for_connection(&self, epoch: Instant) -> Duration {
        use std::hash::{BuildHasher, Hasher};
        if self.jitter.is_zero() {
            return self.age;
        }
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u64(epoch.elapsed().as_nanos() as u64);
        let share = (h.finish() % 1_000_000) as f64 / 1_000_000.0;
        self.age + self.jitter.mul_f64(share)
    }
}

/// What a connection does next, as its [`Life`] decides.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Step {
    /// Close it now (HTTP/2 after GOAWAY, or handed over: its socket is a
    /// sibling's now).
    Close,
    /// No complete request head came within the header timeout: counted,
    /// and shut (a lingering close).
    HeaderTimeout,
    /// Tell it to close (HTTP/1.1: `Connection: close` on the response in
    /// flight, or a lingering close if idle; HTTP/2: GOAWAY), and look
    /// again then.
    Shutdown { then: Instant },
    /// Look again then.
    Wait { until: Instant },
    /// Hand it to a sibling now (it is between requests), then say how it
    /// went ([`Life::handed`]).
    HandOver,
    /// Nothing changes (the timer stands).
    Same,
}

/// Why a connection waits for a moment between requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Handing {
    /// Its worker leaves while a sibling stays.
    Leaving { until: Instant },
    /// Its worker carries more than its share.
    Balance { until: Instant },
}

/// What became of a handoff.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Handed {
    /// A sibling has it.
    Sent,
    /// No sibling was ready: it stays, untouched.
    NoSibling,
    /// The queue stayed full or the send failed: it stays, and its next
    /// request is answered here.
    Kept,
}

/// What a connection is at a moment, as the loop reads it.
#[derive(Debug, Clone, Copy)]
pub(super) struct Facts {
    pub(super) now: Instant,
    /// No request in flight.
    pub(super) idle: bool,
    /// Known to speak HTTP/1.1 (its first bytes were not HTTP/2's).
    pub(super) http1: bool,
    pub(super) http2: bool,
    /// When its last response finished; `None` before the first.
    pub(super) last_done: Option<Instant>,
    /// Idle with everything written, its last answer out.
    pub(super) between_requests: bool,
    /// Requests it has begun in this worker.
    pub(super) requests: u64,
}

/// How a nudge is decided, for a connection in its task or in the lot.
#[derive(Debug, Clone, Copy)]
pub(crate) struct NudgeFacts {
    /// Neither draining nor on its way to a sibling.
    pub(crate) quiet: bool,
    /// How long it has been idle with its last answer out; `None` if busy
    /// or not yet answered.
    pub(crate) idle_for: Option<Duration>,
    pub(crate) http2: bool,
    /// It can go to a sibling (plain HTTP/1.1, a handoff queue).
    pub(crate) movable: bool,
    /// It was handed over from a sibling.
    pub(crate) handed: bool,
    /// How long it has been in this worker.
    pub(crate) here_for: Duration,
    /// Its requests a second here.
    pub(crate) rate: f64,
}

/// What a nudge asks of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Nudge {
    /// Close it, to let a waiting client in (HTTP/1.1, idle).
    Close,
    /// Drain it, to let a waiting client in (HTTP/2: GOAWAY).
    Drain,
    /// Move it to a sibling, for balance.
    Give,
    /// Leave it be.
    Stay,
}

/// The worker's budgets that nudges draw on (the worker's [`Placement`]).
///
/// [`Placement`]: super::placement::Placement
pub(crate) trait Budget {
    /// Whether clients wait while the worker is at its cap.
    fn crowded(&self) -> bool;
    /// Takes one idle connection's close from the crowded look's budget.
    fn take_one(&self) -> bool;
    /// Takes a move of a connection carrying `rate` from the balance budget.
    fn take_give(&self, rate: f64) -> bool;
}

impl Budget for super::placement::Placement {
    fn crowded(&self) -> bool {
        self.is_crowded()
    }
    fn take_one(&self) -> bool {
        super::placement::Placement::take_one(self)
    }
    fn take_give(&self, rate: f64) -> bool {
        super::placement::Placement::take_give(self, rate)
    }
}

/// A nudge's decision for one connection: close an idle one for a waiting
/// client (within the look's budget), move a settled one for balance
/// (within the tick's budget), or leave it.
pub(crate) fn nudged(f: &NudgeFacts, budget: &impl Budget) -> Nudge {
    if !f.quiet {
        return Nudge::Stay;
    }
    if budget.crowded()
        && f.idle_for
            .is_some_and(|idle| idle >= super::placement::IDLE_FOR)
        && budget.take_one()
    {
        return if f.http2 { Nudge::Drain } else { Nudge::Close };
    }
    if f.movable
        && !f.http2
        && (!f.handed || f.here_for >= crate::balance::SETTLE)
        && f.here_for >= crate::balance::TICK
        && budget.take_give(f.rate)
    {
        return Nudge::Give;
    }
    Nudge::Stay
}

/// A connection's decider: its timing rules and where it goes. With
/// nothing in flight, a connection may wait for its first request's head
/// for the header timeout (which cuts off clients that trickle it:
/// slowloris), and after a response for the keep-alive timeout.
#[derive(Debug, Clone)]
pub(super) struct Life {
    pub(super) epoch: Instant,
    pub(super) header_timeout: Duration,
    pub(super) keepalive: Duration,
    /// When the connection reaches its maximum age, and the grace an
    /// HTTP/2 connection then gets to finish its streams.
    pub(super) max_age: Option<(Instant, Duration)>,
    /// When draining began.
    pub(super) drain_began: Option<Instant>,
    /// When the connection was told to close.
    pub(super) closing_since: Option<Instant>,
    /// Draining waits for an idle HTTP/1 connection's next request for the
    /// whole keep-alive timeout, not the short grace: set for a connection
    /// whose worker was leaving but could not hand it over, whose client
    /// expects it to stay open.
    pub(super) patient: bool,
    /// Waiting for a moment between requests to go to a sibling.
    pub(super) handing: Option<Handing>,
    /// It can go to a sibling: plain HTTP/1.1 (not TLS) in a worker with a
    /// handoff queue, and not one taken back to be served here to its end.
    pub(super) movable: bool,
    /// It was handed over by a sibling.
    pub(super) handed: bool,
    /// When it came to this worker.
    pub(super) arrived: Instant,
}

impl Life {
    /// Whether the connection waits for a moment between requests.
    pub(super) fn wants_moment(&self) -> bool {
        self.handing.is_some()
    }

    /// Whether the connection, between requests, may be parked in a
    /// worker holding `connections`: not when draining or on its way to a
    /// sibling.
    pub(super) fn may_park(&self, connections: u64) -> bool {
        self.drain_began.is_none() && self.handing.is_none() && connections > PARK_ABOVE
    }

    /// Whether its requests' responses say `Connection: close`.
    pub(super) fn draining(&self) -> bool {
        self.drain_began.is_some()
    }

    /// When a parked connection must be looked at again, with nothing
    /// from its client: the end of its keep-alive timeout or its age.
    pub(super) fn parked_until(&self, last_done: Instant) -> Instant {
        let idle = last_done + self.keepalive;
        self.max_age.map_or(idle, |(at, _)| idle.min(at))
    }

    /// The worker drains: hand the connection to a ready sibling at its
    /// next moment between requests (its response in flight is not told
    /// to close; idle, it waits at most the idle grace), or drain it.
    pub(super) fn worker_drains(&mut self, f: &Facts, stopping: bool, sibling_ready: bool) -> Step {
        if self.drain_began.is_some() || self.handing.is_some() {
            return Step::Same;
        }
        if f.http1 && self.movable && !stopping && sibling_ready {
            let until = f.now + DRAIN_IDLE_GRACE;
            self.handing = Some(Handing::Leaving { until });
            return Step::Wait { until };
        }
        self.drain(f.now, !f.idle, f.http2)
    }

    /// A nudge from the worker (see [`nudged`]); says what it asked.
    pub(super) fn nudged(&mut self, f: &Facts, unflushed: bool, budget: &impl Budget) -> (Nudge, Step) {
        let facts = NudgeFacts {
            quiet: self.drain_began.is_none() && self.handing.is_none(),
            idle_for: f
                .last_done
                .filter(|_| f.idle && !unflushed)
                .map(|done| f.now.saturating_duration_since(done)),
            http2: f.http2,
            movable: self.movable,
            handed: self.handed,
            here_for: f.now.saturating_duration_since(self.arrived),
            rate: f.requests as f64
                / f.now.saturating_duration_since(self.arrived).as_secs_f64().max(1e-9),
        };
        let nudge = nudged(&facts, budget);
        let step = match nudge {
            Nudge::Stay => Step::Same,
            Nudge::Close => {
                // Idle for a while: closed as after a keep-alive timeout.
                self.closing_since = Some(f.now);
                Step::Shutdown {
                    then: f.now + DRAIN_POLL,
                }
            }
            Nudge::Drain => self.drain(f.now, false, true),
            Nudge::Give => {
                let until = f.now + REBALANCE_WAIT;
                self.handing = Some(Handing::Balance { until });
                Step::Wait { until }
            }
        };
        (nudge, step)
    }

    /// The connection is between requests: handed over if it waits for
    /// that moment.
    pub(super) fn between_requests(&mut self, f: &Facts) -> Step {
        if self.handing.is_some() && f.between_requests {
            Step::HandOver
        } else {
            Step::Same
        }
    }

    /// How a handoff went; `worker_leaving` says whether the worker drains
    /// now.
    pub(super) fn handed(&mut self, f: &Facts, how: Handed, worker_leaving: bool) -> Step {
        let stays =
            matches!(self.handing.take(), Some(Handing::Balance { .. })) && !worker_leaving;
        match how {
            Handed::Sent => Step::Close,
            Handed::NoSibling | Handed::Kept if stays => self.fired(f.now, f.idle, f.http2, f.last_done),
            Handed::NoSibling => self.drain(f.now, false, false),
            Handed::Kept => {
                // Its client is owed an answer to the request it may send
                // next: it gets one, with `Connection: close`, as long as
                // the keep-alive timeout (and the worker's graceful
                // timeout) allows.
                self.patient = true;
                self.drain(f.now, false, false)
            }
        }
    }

    /// The connection's timer fired.
    pub(super) fn timer(&mut self, f: &Facts) -> Step {
        match self.handing {
            Some(Handing::Balance { until }) if f.now >= until => {
                // No moment between requests came soon: it stays.
                self.handing = None;
                self.fired(f.now, f.idle, f.http2, f.last_done)
            }
            Some(Handing::Balance { until }) => Step::Wait { until },
            Some(Handing::Leaving { .. }) if !f.idle => {
                // A request still in flight: its worker's graceful timeout
                // bounds it; it is handed over once answered.
                let until = f.now + DRAIN_IDLE_GRACE;
                self.handing = Some(Handing::Leaving { until });
                Step::Wait { until }
            }
            Some(Handing::Leaving { until }) if f.now < until => Step::Wait { until },
            Some(Handing::Leaving { .. }) => {
                // Nothing in flight, yet no moment between requests came
                // within the grace (a streamed answer, a request body left
                // unread): drained as any idle connection.
                self.handing = None;
                self.drain(f.now, false, false)
            }
            None => self.fired(f.now, f.idle, f.http2, f.last_done),
        }
    }

    /// Draining starts (the worker's, or the connection's own at its age).
    pub(super) fn drain(&mut self, now: Instant, busy: bool, http2: bool) -> Step {
        self.drain_began = Some(now);
        if busy && !http2 {
            // The response in flight says `Connection: close`.
            self.closing_since = Some(now);
            Step::Shutdown {
                then: now + Duration::from_secs(3600),
            }
        } else {
            // Idle, or HTTP/2: look again shortly.
            Step::Wait {
                until: now + DRAIN_POLL,
            }
        }
    }

    /// The timer fired, with the connection serving or draining: `idle` is
    /// whether no request is in flight, and `last_done` when the last
    /// response was finished.
    pub(super) fn fired(
        &mut self,
        now: Instant,
        idle: bool,
        http2: bool,
        last_done: Option<Instant>,
    ) -> Step {
        if let Some((at, grace)) = self.max_age {
            if self.drain_began.is_none() && now >= at {
                // Too old: drained like a worker's connection.
                return self.drain(now, !idle, http2);
            }
            if http2
                && self
                    .drain_began
                    .is_some_and(|began| now >= began + DRAIN_IDLE_GRACE + grace)
            {
                // An aged HTTP/2 connection had GOAWAY and its grace.
                return Step::Close;
            }
        }
        if let Some(since) = self.closing_since {
            // Told to close. An HTTP/2 client that never answers the
            // closing PING would hold the connection until the graceful
            // timeout: with nothing in flight, it closes after a short
            // grace instead. HTTP/1: hyper closes it, lingering (see
            // worker).
            return if !http2 {
                Step::Wait {
                    until: now + Duration::from_secs(3600),
                }
            } else if idle && now >= since + DRAIN_IDLE_GRACE {
                Step::Close
            } else {
                Step::Wait {
                    until: now + DRAIN_POLL,
                }
            };
        }
        if let Some(began) = self.drain_began {
            // HTTP/1 idle: a client may be sending its next request right
            // now; it is served (with `Connection: close`) if it arrives
            // within the grace. HTTP/2: GOAWAY goes out at a moment with no
            // stream in flight if one comes within the grace (some clients
            // fail a stream in flight when GOAWAY and PING arrive), else at
            // its end.
            //
            // An HTTP/1 connection whose first request has not come yet:
            // its client has just connected and is sending it (a busy
            // machine may hold it back); it is given the header timeout
            // for it, as any new connection is, and answered with
            // `Connection: close`. Closing it after the short grace would
            // fail a request nobody had answered.
            let grace = if self.patient && !http2 {
                self.keepalive
            } else {
                DRAIN_IDLE_GRACE.min(self.keepalive)
            };
            let deadline = if !http2 && last_done.is_none() {
                (self.epoch + self.header_timeout).max(began + grace)
            } else {
                began + grace
            };
            if now >= deadline || (http2 && idle) {
                self.closing_since = Some(now);
                return Step::Shutdown {
                    then: now + DRAIN_POLL,
                };
            }
            return Step::Wait {
                until: now + DRAIN_POLL,
            };
        }
        let (since, allowed) = match last_done {
            None => (self.epoch, self.header_timeout),
            Some(t) => (t, self.keepalive),
        };
        if idle && since + allowed <= now {
            self.closing_since = Some(now);
            if last_done.is_none() {
                return Step::HeaderTimeout;
            }
            // Idle for the whole keep-alive period.
            return Step::Shutdown {
                then: now + DRAIN_POLL,
            };
        }
        let next = if idle { since + allowed } else { now + allowed };
        let next = self.max_age.map_or(next, |(at, _)| next.min(at));
        Step::Wait {
            until: next.max(now + Duration::from_millis(1)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn clock(now: Instant) -> Life {
        Life {
            epoch: now,
            header_timeout: Duration::from_secs(10),
            keepalive: Duration::from_secs(2),
            max_age: None,
            drain_began: None,
            closing_since: None,
            patient: false,
            handing: None,
            movable: true,
            handed: false,
            arrived: now,
        }
    }

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn a_head_that_never_completes_is_cut_off_at_the_header_timeout() {
        let t0 = Instant::now();
        let mut c = clock(t0);
        assert_eq!(
            c.fired(t0 + 2 * S, true, false, None),
            Step::Wait { until: t0 + 10 * S }
        );
        assert_eq!(c.fired(t0 + 10 * S, true, false, None), Step::HeaderTimeout);
    }

    #[test]
    fn an_idle_keep_alive_connection_is_closed_after_the_keep_alive_timeout() {
        let t0 = Instant::now();
        let mut c = clock(t0);
        let done = Some(t0 + 5 * S);
        assert_eq!(
            c.fired(t0 + 6 * S, true, false, done),
            Step::Wait { until: t0 + 7 * S }
        );
        // A request in flight is never timed out by the keep-alive timer.
        assert_eq!(
            c.fired(t0 + 7 * S, false, false, done),
            Step::Wait { until: t0 + 9 * S }
        );
        assert!(matches!(
            c.fired(t0 + 7 * S, true, false, done),
            Step::Shutdown { .. }
        ));
        // HTTP/1.1: hyper closes it; the clock only waits.
        assert!(matches!(
            c.fired(t0 + 8 * S, true, false, done),
            Step::Wait { .. }
        ));
    }

    #[test]
    fn a_draining_http1_connection_is_closed_after_the_grace_not_at_once() {
        let t0 = Instant::now();
        let mut c = clock(t0);
        let done = Some(t0);
        assert_eq!(
            c.drain(t0, false, false),
            Step::Wait {
                until: t0 + DRAIN_POLL
            }
        );
        // A request that arrives now is served (with `Connection: close`).
        assert!(matches!(
            c.fired(t0 + DRAIN_POLL, true, false, done),
            Step::Wait { .. }
        ));
        let grace = DRAIN_IDLE_GRACE.min(c.keepalive);
        assert!(matches!(
            c.fired(t0 + grace, true, false, done),
            Step::Shutdown { .. }
        ));
    }

    #[test]
    fn a_kept_connection_waits_for_its_next_request_for_the_keep_alive_timeout() {
        // Its worker is leaving but could not hand it over: its client is
        // owed an answer to the request it may send at any moment.
        let t0 = Instant::now();
        let mut c = clock(t0);
        c.keepalive = 10 * S;
        c.patient = true;
        let done = Some(t0);
        assert!(matches!(c.drain(t0, false, false), Step::Wait { .. }));
        // Past the short grace, still open.
        assert!(matches!(
            c.fired(t0 + 2 * DRAIN_IDLE_GRACE, true, false, done),
            Step::Wait { .. }
        ));
        assert!(matches!(
            c.fired(t0 + 9 * S, true, false, done),
            Step::Wait { .. }
        ));
        // Closed as after any keep-alive timeout.
        assert!(matches!(
            c.fired(t0 + 10 * S, true, false, done),
            Step::Shutdown { .. }
        ));
    }

    #[test]
    fn a_draining_connection_waits_for_its_first_request_up_to_the_header_timeout() {
        let t0 = Instant::now();
        let mut c = clock(t0);
        // Drain begins just after the connection was accepted, before its
        // first request came.
        assert!(matches!(c.drain(t0, false, false), Step::Wait { .. }));
        let grace = DRAIN_IDLE_GRACE.min(c.keepalive);
        assert!(matches!(
            c.fired(t0 + grace, true, false, None),
            Step::Wait { .. }
        ));
        assert!(matches!(
            c.fired(t0 + 9 * S, true, false, None),
            Step::Wait { .. }
        ));
        assert!(matches!(
            c.fired(t0 + 10 * S, true, false, None),
            Step::Shutdown { .. }
        ));
        // Once it has been answered, the usual grace applies.
        let mut c = clock(t0);
        c.drain(t0, false, false);
        assert!(matches!(
            c.fired(t0 + grace, true, false, Some(t0 + DRAIN_POLL)),
            Step::Shutdown { .. }
        ));
        // HTTP/2 has GOAWAY for this: the client knows what was not
        // processed.
        let mut c = clock(t0);
        c.drain(t0, false, true);
        assert!(matches!(
            c.fired(t0 + DRAIN_POLL, true, true, None),
            Step::Shutdown { .. }
        ));
    }

    #[test]
    fn a_connection_past_its_maximum_age_drains() {
        let t0 = Instant::now();
        let mut c = clock(t0);
        c.max_age = Some((t0 + 5 * S, 3 * S));
        let done = Some(t0 + S);
        // The keep-alive timer is cut short by the age.
        assert_eq!(
            c.fired(t0 + 2 * S, false, false, done),
            Step::Wait { until: t0 + 4 * S }
        );
        assert_eq!(
            c.fired(t0 + 4 * S, false, false, done),
            Step::Wait { until: t0 + 5 * S }
        );
        // Busy HTTP/1.1 at its age: `Connection: close` on this response.
        assert!(matches!(
            c.fired(t0 + 5 * S, false, false, done),
            Step::Shutdown { .. }
        ));
        assert!(c.drain_began.is_some());
        // HTTP/2: GOAWAY when idle, then closed after the grace whatever
        // is still in flight.
        let mut c = clock(t0);
        c.max_age = Some((t0 + 5 * S, 3 * S));
        assert!(matches!(
            c.fired(t0 + 5 * S, false, true, done),
            Step::Wait { .. }
        ));
        let later = t0 + 5 * S + DRAIN_IDLE_GRACE + 3 * S;
        assert_eq!(c.fired(later, false, true, done), Step::Close);
    }

    #[test]
    fn a_busy_http1_connection_closes_after_its_response() {
        let t0 = Instant::now();
        let mut c = clock(t0);
        assert!(matches!(c.drain(t0, true, false), Step::Shutdown { .. }));
    }

    #[test]
    fn a_draining_http2_connection_gets_goaway_when_idle_then_closes_after_a_grace() {
        let t0 = Instant::now();
        let mut c = clock(t0);
        let done = Some(t0);
        assert!(matches!(c.drain(t0, true, true), Step::Wait { .. }));
        // Streams in flight: no GOAWAY yet, within the grace.
        assert!(matches!(
            c.fired(t0 + DRAIN_POLL, false, true, done),
            Step::Wait { .. }
        ));
        let at = t0 + 2 * DRAIN_POLL;
        assert!(matches!(
            c.fired(at, true, true, done),
            Step::Shutdown { .. }
        ));
        // A client that never answers the closing PING: closed once idle
        // for the grace.
        assert!(matches!(
            c.fired(at + DRAIN_POLL, true, true, done),
            Step::Wait { .. }
        ));
        assert_eq!(
            c.fired(at + DRAIN_IDLE_GRACE, true, true, done),
            Step::Close
        );
    }
}
