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
//! | nudge, crowded, idle ≥ 1 s, budget | HTTP/1.1: close idle → closing; HTTP/2: → draining | stay | stay | stay |
//! | nudge, balance budget fits, movable, settled | → handing (balance) | stay | stay | stay |
//! | between requests | — | **hand over** | — | — |
//! | handed: sent | — | over | — | — |
//! | handed: no sibling / kept | — | balance: → serving; leaving: → draining (kept: patient) | — | — |
//! | timer, HTTP/1.1 idle [`PARK_IDLE`] since its last answer | → rested (wait until its deadline) | — | — | — |
//! | between requests, rested or past [`PARK_ABOVE`] connections | **park** | — | — | — |
//!
//! Invariants (checked after every step of seeded random sequences):
//! - a connection is handed over or parked only between requests (nothing
//!   in flight, everything written), so HTTP/1.1 never has two responses
//!   in flight and no request is lost on the way;
//! - an HTTP/1.1 connection is only ever ended by a shutdown (hyper's
//!   lingering close, so unread request bytes never turn it into a reset),
//!   by being handed over, or, idle for a while with nothing unread, at
//!   once for a waiting client; an abrupt close is for HTTP/2 after GOAWAY;
//! - a connection told to close, draining or on its way is not nudged;
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
/// An HTTP/1.1 connection idle this long since its last answer is parked
/// whatever the worker holds: a client that pauses this long between
/// requests pays a resume (cheaper than a new connection) for the memory
/// its connection frees, and a keep-alive pool that sends without pause
/// is never taken apart.
pub(super) const PARK_IDLE: Duration = Duration::from_secs(1);

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
    /// Idle for a while, its last answer out: closed at once if nothing
    /// from its client is unread (else a lingering close), to let a
    /// waiting client in.
    CloseIdle,
    /// Tell it to close (HTTP/1.1: `Connection: close` on the response in
    /// flight, or a lingering close if idle; HTTP/2: GOAWAY), and look
    /// again then. `idle`: nothing was in flight (HTTP/2: a single GOAWAY
    /// naming the last stream, then a close, if nothing is being sent
    /// either).
    Shutdown { then: Instant, idle: bool },
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
    /// HTTP/2: zdr's own GOAWAY was asked for, and waits for a poll with
    /// nothing in flight (a stream came after the decision).
    pub(super) goaway_waits: bool,
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
    /// It was idle for [`PARK_IDLE`] after an answer: parked at its next
    /// moment between requests, however many connections the worker holds.
    pub(super) rested: bool,
}

impl Life {
    /// Whether the connection waits for a moment between requests.
    pub(super) fn wants_moment(&self) -> bool {
        self.handing.is_some()
    }

    /// Whether the connection, between requests, may be parked in a
    /// worker holding `connections`: rested, or in a crowded worker; not
    /// when draining or on its way to a sibling.
    pub(super) fn may_park(&self, connections: u64) -> bool {
        self.drain_began.is_none()
            && self.handing.is_none()
            && (self.rested || connections > PARK_ABOVE)
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
    pub(super) fn nudged(
        &mut self,
        f: &Facts,
        unflushed: bool,
        budget: &impl Budget,
    ) -> (Nudge, Step) {
        let facts = NudgeFacts {
            quiet: self.drain_began.is_none()
                && self.handing.is_none()
                && self.closing_since.is_none(),
            idle_for: f
                .last_done
                .filter(|_| f.idle && !unflushed)
                .map(|done| f.now.saturating_duration_since(done)),
            http2: f.http2,
            movable: self.movable,
            handed: self.handed,
            here_for: f.now.saturating_duration_since(self.arrived),
            rate: f.requests as f64
                / f.now
                    .saturating_duration_since(self.arrived)
                    .as_secs_f64()
                    .max(1e-9),
        };
        let nudge = nudged(&facts, budget);
        let step = match nudge {
            Nudge::Stay => Step::Same,
            Nudge::Close => {
                self.closing_since = Some(f.now);
                Step::CloseIdle
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
        let stays = matches!(self.handing.take(), Some(Handing::Balance { .. })) && !worker_leaving;
        match how {
            Handed::Sent => Step::Close,
            Handed::NoSibling | Handed::Kept if stays => {
                self.fired(f.now, f.idle, f.http2, f.last_done)
            }
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
                idle: false,
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
            } else if self.goaway_waits && now >= since + DRAIN_IDLE_GRACE {
                // Never idle at a poll within the grace: hyper's own
                // GOAWAY, which lets the streams in flight finish.
                self.goaway_waits = false;
                Step::Shutdown {
                    then: now + DRAIN_POLL,
                    idle: false,
                }
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
                self.goaway_waits = http2 && idle;
                return Step::Shutdown {
                    then: now + DRAIN_POLL,
                    idle,
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
            self.goaway_waits = http2;
            return Step::Shutdown {
                then: now + DRAIN_POLL,
                idle: true,
            };
        }
        let mut next = if idle { since + allowed } else { now + allowed };
        if let (Some(done), true, false) = (last_done, idle, http2) {
            // Idle HTTP/1.1: parked once it has rested.
            if now >= done + PARK_IDLE {
                self.rested = true;
            } else {
                next = next.min(done + PARK_IDLE);
            }
        }
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
            goaway_waits: false,
            patient: false,
            handing: None,
            movable: true,
            handed: false,
            arrived: now,
            rested: false,
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
        // Idle: GOAWAY of zdr's own, naming the last stream.
        assert!(matches!(
            c.fired(at, true, true, done),
            Step::Shutdown { idle: true, .. }
        ));
        // Whatever the client does then, closed once idle for the grace.
        assert!(matches!(
            c.fired(at + DRAIN_POLL, true, true, done),
            Step::Wait { .. }
        ));
        assert_eq!(
            c.fired(at + DRAIN_IDLE_GRACE, true, true, done),
            Step::Close
        );
    }

    #[test]
    fn a_busy_http2_connection_gets_hypers_goaway_at_the_graces_end() {
        let t0 = Instant::now();
        let mut c = clock(t0);
        let done = Some(t0);
        assert!(matches!(c.drain(t0, true, true), Step::Wait { .. }));
        // Never idle within the grace: hyper's graceful GOAWAY, which lets
        // the streams in flight finish.
        let end = t0 + DRAIN_IDLE_GRACE.min(c.keepalive);
        assert_eq!(
            c.fired(end, false, true, done),
            Step::Shutdown {
                then: end + DRAIN_POLL,
                idle: false
            }
        );
    }

    #[test]
    fn an_http2_goaway_that_waits_for_an_idle_poll_past_the_grace_becomes_hypers() {
        let t0 = Instant::now();
        let mut c = clock(t0);
        let done = Some(t0);
        assert!(matches!(c.drain(t0, false, true), Step::Wait { .. }));
        // Idle at the timer: zdr's GOAWAY is asked for; the connection
        // waits for a poll with nothing in flight.
        let at = t0 + DRAIN_POLL;
        assert!(matches!(
            c.fired(at, true, true, done),
            Step::Shutdown { idle: true, .. }
        ));
        // A stream came and streams keep coming: within the grace, wait.
        assert!(matches!(
            c.fired(at + DRAIN_POLL, false, true, done),
            Step::Wait { .. }
        ));
        // Past it, never idle: hyper's own GOAWAY, once.
        let end = at + DRAIN_IDLE_GRACE;
        assert_eq!(
            c.fired(end, false, true, done),
            Step::Shutdown {
                then: end + DRAIN_POLL,
                idle: false
            }
        );
        assert!(matches!(
            c.fired(end + DRAIN_POLL, false, true, done),
            Step::Wait { .. }
        ));
        // Idle at last: closed.
        assert_eq!(c.fired(end + 2 * DRAIN_POLL, true, true, done), Step::Close);
    }

    #[test]
    fn an_http2_connection_idle_past_its_keep_alive_gets_zdrs_goaway() {
        let t0 = Instant::now();
        let mut c = clock(t0);
        let at = t0 + c.keepalive;
        assert_eq!(
            c.fired(at, true, true, Some(t0)),
            Step::Shutdown {
                then: at + DRAIN_POLL,
                idle: true
            }
        );
    }

    /// A worker's budgets, as a test sets them.
    struct Budgets {
        crowded: bool,
        closes: std::cell::Cell<u32>,
        moves: std::cell::Cell<u32>,
    }

    impl Budget for Budgets {
        fn crowded(&self) -> bool {
            self.crowded
        }
        fn take_one(&self) -> bool {
            let n = self.closes.get();
            self.closes.set(n.saturating_sub(1));
            n > 0
        }
        fn take_give(&self, _rate: f64) -> bool {
            let n = self.moves.get();
            self.moves.set(n.saturating_sub(1));
            n > 0
        }
    }

    fn budgets(crowded: bool, closes: u32, moves: u32) -> Budgets {
        Budgets {
            crowded,
            closes: closes.into(),
            moves: moves.into(),
        }
    }

    fn facts(now: Instant, idle: bool, http2: bool, last_done: Option<Instant>) -> Facts {
        Facts {
            now,
            idle,
            http1: !http2,
            http2,
            last_done,
            between_requests: idle,
            requests: 10,
        }
    }

    /// The drain column: (HTTP/2, movable, stopping, a sibling ready, busy)
    /// → handed over at the next moment, or drained (busy HTTP/1.1:
    /// `Connection: close` at once).
    #[test]
    fn the_worker_draining_hands_over_or_drains() {
        let t0 = Instant::now();
        for http2 in [false, true] {
            for movable in [false, true] {
                for stopping in [false, true] {
                    for sibling in [false, true] {
                        for busy in [false, true] {
                            let mut c = clock(t0);
                            c.movable = movable;
                            let f = facts(t0, !busy, http2, Some(t0));
                            let step = c.worker_drains(&f, stopping, sibling);
                            let hands = !http2 && movable && !stopping && sibling;
                            let case = (http2, movable, stopping, sibling, busy);
                            assert_eq!(c.wants_moment(), hands, "{case:?}");
                            assert_eq!(c.draining(), !hands, "{case:?}");
                            let expect = if hands {
                                Step::Wait {
                                    until: t0 + DRAIN_IDLE_GRACE,
                                }
                            } else if busy && !http2 {
                                Step::Shutdown {
                                    then: t0 + Duration::from_secs(3600),
                                    idle: false,
                                }
                            } else {
                                Step::Wait {
                                    until: t0 + DRAIN_POLL,
                                }
                            };
                            assert_eq!(step, expect, "{case:?}");
                            // A second drain changes nothing.
                            assert_eq!(c.worker_drains(&f, stopping, sibling), Step::Same);
                        }
                    }
                }
            }
        }
    }

    /// The nudge rows: (crowded, idle for, HTTP/2, movable, handed and
    /// here for, budgets) → what the connection does.
    #[test]
    fn a_nudge_closes_an_idle_connection_for_a_waiting_client_or_moves_one_for_balance() {
        let idle_long = super::super::placement::IDLE_FOR;
        let settled = crate::balance::SETTLE;
        let tick = crate::balance::TICK;
        /// crowded, idle for, HTTP/2, movable, handed, here for, closes
        /// left, moves left → what it does.
        type Row = (
            bool,
            Option<Duration>,
            bool,
            bool,
            bool,
            Duration,
            u32,
            u32,
            Nudge,
        );
        let rows: &[Row] = &[
            // crowded, idle_for, http2, movable, handed, here_for, closes, moves → nudge
            (
                true,
                Some(idle_long),
                false,
                true,
                false,
                settled,
                1,
                1,
                Nudge::Close,
            ),
            (
                true,
                Some(idle_long),
                true,
                true,
                false,
                settled,
                1,
                1,
                Nudge::Drain,
            ),
            // No budget left for this look: it may still move for balance.
            (
                true,
                Some(idle_long),
                false,
                true,
                false,
                settled,
                0,
                1,
                Nudge::Give,
            ),
            (
                true,
                Some(idle_long),
                false,
                false,
                false,
                settled,
                0,
                1,
                Nudge::Stay,
            ),
            // Idle for less than a second: its client may be sending.
            (
                true,
                Some(idle_long / 2),
                false,
                false,
                false,
                settled,
                1,
                0,
                Nudge::Stay,
            ),
            // Busy, or not yet answered: never closed for another.
            (true, None, false, false, false, settled, 1, 0, Nudge::Stay),
            // Not crowded: nothing closes.
            (
                false,
                Some(idle_long * 10),
                false,
                false,
                false,
                settled,
                1,
                0,
                Nudge::Stay,
            ),
            // Balance: movable, here a tick at least, settled if handed.
            (false, None, false, true, false, tick, 0, 1, Nudge::Give),
            (false, None, false, true, false, tick / 2, 0, 1, Nudge::Stay),
            (false, None, false, true, true, tick, 0, 1, Nudge::Stay),
            (false, None, false, true, true, settled, 0, 1, Nudge::Give),
            (false, None, true, true, false, settled, 0, 1, Nudge::Stay),
            (false, None, false, true, false, settled, 0, 0, Nudge::Stay),
        ];
        for (i, &(crowded, idle_for, http2, movable, handed, here_for, closes, moves, want)) in
            rows.iter().enumerate()
        {
            let f = NudgeFacts {
                quiet: true,
                idle_for,
                http2,
                movable,
                handed,
                here_for,
                rate: 1.0,
            };
            let b = budgets(crowded, closes, moves);
            assert_eq!(nudged(&f, &b), want, "row {i}");
            // Draining or on its way: never.
            let f = NudgeFacts { quiet: false, ..f };
            assert_eq!(
                nudged(&f, &budgets(crowded, closes, moves)),
                Nudge::Stay,
                "row {i}"
            );
        }
    }

    #[test]
    fn a_connection_asked_to_move_is_handed_over_between_requests_or_stays() {
        let t0 = Instant::now();
        let mut c = clock(t0);
        let f = facts(t0 + S, true, false, Some(t0));
        let (nudge, step) = c.nudged(&f, false, &budgets(false, 0, 1));
        assert_eq!(nudge, Nudge::Give);
        assert_eq!(
            step,
            Step::Wait {
                until: t0 + S + REBALANCE_WAIT
            }
        );
        assert!(!c.may_park(10_000), "on its way: not parked");
        // Busy: not yet.
        assert_eq!(
            c.between_requests(&facts(t0 + S, false, false, Some(t0))),
            Step::Same
        );
        assert_eq!(c.between_requests(&f), Step::HandOver);
        // The queue was full: it stays and is served here, not drained.
        let step = c.handed(&f, Handed::Kept, false);
        assert!(!c.draining() && !c.wants_moment(), "{step:?}");
        // Asked again, and its worker starts leaving meanwhile: drained.
        let mut c = clock(t0);
        c.nudged(&f, false, &budgets(false, 0, 1));
        c.handed(&f, Handed::NoSibling, true);
        assert!(c.draining());
        // No moment within the wait: it stays.
        let mut c = clock(t0);
        c.nudged(&f, false, &budgets(false, 0, 1));
        assert!(matches!(
            c.timer(&facts(t0 + S + REBALANCE_WAIT, false, false, Some(t0))),
            Step::Wait { .. }
        ));
        assert!(!c.wants_moment() && !c.draining());
    }

    #[test]
    fn a_leaving_workers_connection_waits_for_its_response_then_goes_or_drains() {
        let t0 = Instant::now();
        let mut c = clock(t0);
        c.worker_drains(&facts(t0, false, false, Some(t0)), false, true);
        // The response in flight is not told to close; the wait goes on.
        let later = t0 + 2 * DRAIN_IDLE_GRACE;
        assert_eq!(
            c.timer(&facts(later, false, false, Some(t0))),
            Step::Wait {
                until: later + DRAIN_IDLE_GRACE
            }
        );
        assert!(!c.draining());
        assert_eq!(
            c.between_requests(&facts(later, true, false, Some(later))),
            Step::HandOver
        );
        assert_eq!(
            c.handed(&facts(later, true, false, Some(later)), Handed::Sent, true),
            Step::Close
        );
        // Kept (the queue stayed full): drained patiently.
        let mut c = clock(t0);
        c.worker_drains(&facts(t0, true, false, Some(t0)), false, true);
        c.handed(&facts(t0, true, false, Some(t0)), Handed::Kept, true);
        assert!(c.draining() && c.patient);
        // Idle, no moment came (a streamed answer): drained.
        let mut c = clock(t0);
        c.worker_drains(&facts(t0, true, false, Some(t0)), false, true);
        let f = facts(t0 + DRAIN_IDLE_GRACE, true, false, Some(t0));
        assert_eq!(
            c.timer(&f),
            Step::Wait {
                until: f.now + DRAIN_POLL
            }
        );
        assert!(c.draining() && !c.wants_moment());
    }

    #[test]
    fn only_a_quiet_connection_in_a_crowded_worker_is_parked() {
        let t0 = Instant::now();
        let mut c = clock(t0);
        assert!(!c.may_park(PARK_ABOVE));
        assert!(c.may_park(PARK_ABOVE + 1));
        c.drain(t0, false, false);
        assert!(!c.may_park(PARK_ABOVE + 1), "draining");
        let mut c = clock(t0);
        c.handing = Some(Handing::Leaving { until: t0 });
        assert!(!c.may_park(PARK_ABOVE + 1), "on its way");
        // Parked until its keep-alive ends, or its age if sooner.
        let mut c = clock(t0);
        c.keepalive = 10 * S;
        assert_eq!(c.parked_until(t0), t0 + c.keepalive);
        c.max_age = Some((t0 + S, S));
        assert_eq!(c.parked_until(t0), t0 + S);
    }

    #[test]
    fn an_http1_connection_idle_for_a_while_is_parked_in_a_quiet_worker() {
        let t0 = Instant::now();
        let mut c = clock(t0);
        c.keepalive = 10 * S;
        let done = Some(t0);
        // Before its rest, the timer wakes it at the rest's end.
        assert_eq!(
            c.fired(t0 + S / 2, true, false, done),
            Step::Wait {
                until: t0 + PARK_IDLE
            }
        );
        assert!(!c.may_park(0));
        // Busy: no rest, whatever the last answer's age.
        assert_eq!(
            c.fired(t0 + 2 * S, false, false, done),
            Step::Wait { until: t0 + 12 * S }
        );
        assert!(!c.may_park(0));
        // Idle since its last answer for the rest: parked, and the timer
        // still stands for the keep-alive deadline.
        assert_eq!(
            c.fired(t0 + PARK_IDLE, true, false, done),
            Step::Wait { until: t0 + 10 * S }
        );
        assert!(c.may_park(0));
        // Never before its first answer (the header timeout stands), nor
        // HTTP/2.
        let mut c = clock(t0);
        c.fired(t0 + 5 * S, true, false, None);
        assert!(!c.may_park(0), "waiting for its first head");
        let mut c = clock(t0);
        c.fired(t0 + 5 * S, true, true, done);
        assert!(!c.may_park(0), "HTTP/2");
    }

    /// A model connection driven by random events; the decider's
    /// invariants (see the module doc) are checked after every step.
    struct Model {
        life: Life,
        now: Instant,
        http2: bool,
        in_flight: u32,
        last_done: Option<Instant>,
        unflushed: bool,
        /// Told to close (hyper closes an idle HTTP/1.1 one itself).
        shut: bool,
        over: bool,
        /// Since the start: no drain, no crowded nudge.
        calm: bool,
        /// The worker drains.
        leaving: bool,
        /// A timer saw it idle for [`PARK_IDLE`] after an answer.
        rest_seen: bool,
    }

    impl Model {
        fn facts(&self) -> Facts {
            Facts {
                now: self.now,
                idle: self.in_flight == 0,
                http1: !self.http2,
                http2: self.http2,
                last_done: self.last_done,
                between_requests: self.in_flight == 0 && !self.unflushed && !self.shut,
                requests: 3,
            }
        }

        /// Checks a step the decider took on `f`.
        fn check(&mut self, f: &Facts, step: Step, handed_sent: bool, trail: &[u64]) {
            let why = format!("trail {trail:?}: {step:?} on {f:?}");
            match step {
                Step::HandOver => {
                    assert!(f.between_requests, "handed over mid-request: {why}");
                    assert!(!self.http2, "HTTP/2 handed over: {why}");
                }
                Step::Close => {
                    assert!(
                        self.http2 || handed_sent,
                        "an HTTP/1.1 connection closed abruptly: {why}"
                    );
                    self.over = true;
                }
                Step::Wait { until } => assert!(until > f.now, "a wait that ends at once: {why}"),
                Step::Shutdown { then, idle } => {
                    assert!(then > f.now, "{why}");
                    assert!(
                        !idle || f.idle,
                        "an idle shutdown with a request in flight: {why}"
                    );
                    self.shut = true;
                }
                Step::HeaderTimeout => {
                    assert!(f.idle && f.last_done.is_none(), "{why}");
                    self.shut = true;
                }
                Step::CloseIdle => {
                    assert!(!self.http2, "{why}");
                    let idle_for = f.last_done.map(|d| f.now.saturating_duration_since(d));
                    assert!(
                        f.idle
                            && !self.unflushed
                            && idle_for.is_some_and(|d| d >= super::super::placement::IDLE_FOR),
                        "closed while not idle for long: {why}"
                    );
                    self.over = true;
                }
                Step::Same => {}
            }
            if matches!(
                step,
                Step::Shutdown { .. } | Step::HeaderTimeout | Step::Close | Step::CloseIdle
            ) && !handed_sent
                && self.calm
                && f.idle
                && !self.life.draining()
            {
                let deadline = match f.last_done {
                    None => self.life.epoch + self.life.header_timeout,
                    Some(done) => done + self.life.keepalive,
                };
                assert!(f.now >= deadline, "closed idle before its deadline: {why}");
            }
            if self.calm && f.idle && self.life.draining() {
                let aged = self.life.max_age.is_some_and(|(at, _)| f.now >= at);
                assert!(aged, "drained while its worker serves: {why}");
            }
            assert!(
                !(self.life.draining() && self.life.wants_moment()),
                "draining and on its way at once: {why}"
            );
            assert!(
                !self.life.rested || (self.rest_seen && !self.http2),
                "rested without a rest: {why}"
            );
            if !self.http2 && self.shut && self.in_flight == 0 {
                // hyper closes an idle HTTP/1.1 connection it was told to.
                self.over = true;
            }
        }
    }

    #[test]
    fn random_sequences_keep_the_invariants() {
        for seed in 1..=500u64 {
            let mut rng = crate::test_rng::Rng::seeded(seed);
            let t0 = Instant::now();
            let mut life = clock(t0);
            life.movable = rng.below(2) == 0;
            if rng.below(3) == 0 {
                life.max_age = Some((t0 + Duration::from_millis(rng.below(20_000)), S));
            }
            let mut m = Model {
                life,
                now: t0,
                http2: rng.below(3) == 0,
                in_flight: 0,
                last_done: None,
                unflushed: false,
                shut: false,
                over: false,
                calm: true,
                leaving: false,
                rest_seen: false,
            };
            let mut trail = Vec::new();
            for _ in 0..80 {
                if m.over {
                    break;
                }
                let choice = rng.below(9);
                trail.push(choice);
                m.now += Duration::from_millis(rng.below(1500));
                match choice {
                    // A request begins (HTTP/1.1: one at a time, and none
                    // once told to close).
                    0 | 1 if (m.http2 || m.in_flight == 0) && !m.shut => {
                        m.in_flight += 1;
                        m.unflushed = true;
                    }
                    // A response ends and is written out.
                    2 if m.in_flight > 0 => {
                        m.in_flight -= 1;
                        m.last_done = Some(m.now);
                        m.unflushed = false;
                        if m.life.wants_moment() {
                            let f = m.facts();
                            let step = m.life.between_requests(&f);
                            m.check(&f, step, false, &trail);
                            if step == Step::HandOver {
                                let how = [Handed::Sent, Handed::NoSibling, Handed::Kept]
                                    [rng.below(3) as usize];
                                let step = m.life.handed(&f, how, m.leaving);
                                m.check(&f, step, how == Handed::Sent, &trail);
                            }
                        }
                    }
                    3 | 4 => {
                        let f = m.facts();
                        m.rest_seen |=
                            f.idle && f.last_done.is_some_and(|done| f.now >= done + PARK_IDLE);
                        let step = m.life.timer(&f);
                        m.check(&f, step, false, &trail);
                    }
                    5 => {
                        m.calm = false;
                        m.leaving = true;
                        let f = m.facts();
                        let step = m
                            .life
                            .worker_drains(&f, rng.below(2) == 0, rng.below(2) == 0);
                        m.check(&f, step, false, &trail);
                    }
                    6 | 7 => {
                        let crowded = rng.below(2) == 0;
                        if crowded {
                            m.calm = false;
                        }
                        let b = budgets(crowded, rng.below(2) as u32, rng.below(2) as u32);
                        let f = m.facts();
                        let (_, step) = m.life.nudged(&f, m.unflushed, &b);
                        m.check(&f, step, false, &trail);
                    }
                    _ => {
                        // Between requests, as the loop sees it.
                        let f = m.facts();
                        let crowd = [0, PARK_ABOVE + 1][rng.below(2) as usize];
                        if f.http1 && f.between_requests && m.life.may_park(crowd) {
                            // Parked: it leaves its task (a resumed one is
                            // decided afresh).
                            assert!(
                                !m.life.draining() && !m.life.wants_moment(),
                                "parked while draining or on its way: trail {trail:?}"
                            );
                            assert!(
                                crowd > PARK_ABOVE || m.rest_seen,
                                "parked in a quiet worker before its rest: trail {trail:?}"
                            );
                            m.over = true;
                            continue;
                        }
                        let step = m.life.between_requests(&f);
                        m.check(&f, step, false, &trail);
                        if step == Step::HandOver {
                            let how = [Handed::Sent, Handed::NoSibling, Handed::Kept]
                                [rng.below(3) as usize];
                            let step = m.life.handed(&f, how, m.leaving);
                            m.check(&f, step, how == Handed::Sent, &trail);
                        }
                    }
                }
            }
        }
    }
}
