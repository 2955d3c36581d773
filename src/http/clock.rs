//! The connection's clock: when a connection's head, keep-alive and
//! drain timers fire and what each firing asks for (I/O-free; the
//! connection's loop in [`super::serve`] carries it out).

use std::time::Duration;
use tokio::time::Instant;

/// The longest an idle HTTP/1 connection is kept open once draining starts,
/// and the longest a closing connection with nothing in flight waits for
/// its client's part of the close.
pub(super) const DRAIN_IDLE_GRACE: Duration = Duration::from_secs(1);
/// How often a draining connection looks at its state.
pub(super) const DRAIN_POLL: Duration = Duration::from_millis(50);

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
    /// A leaving worker's connection is between requests.
    BetweenRequests,
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

/// What a connection does next, as its [`Clock`] decides.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Step {
    /// Close it now.
    Close,
    /// Close it now: no complete request head came within the header
    /// timeout.
    HeaderTimeout,
    /// Tell it to close (HTTP/1.1: `Connection: close` on the response in
    /// flight, or close if idle; HTTP/2: GOAWAY), and look again then.
    Shutdown { then: Instant },
    /// Look again then.
    Wait { until: Instant },
}

/// A connection's timing rules, with no I/O: the header timeout, the
/// keep-alive timeout, and the drain. With nothing in flight, a connection
/// may wait for its first request's head for the header timeout (which
/// cuts off clients that trickle it: slowloris), and after a response for
/// the keep-alive timeout.
#[derive(Debug, Clone)]
pub(super) struct Clock {
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
}

impl Clock {
    /// The worker started draining.
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

    /// The timer fired: `idle` is whether no request is in flight, and
    /// `last_done` when the last response was finished.
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
            if last_done.is_none() {
                return Step::HeaderTimeout;
            }
            // Idle for the whole keep-alive period.
            self.closing_since = Some(now);
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

    fn clock(now: Instant) -> Clock {
        Clock {
            epoch: now,
            header_timeout: Duration::from_secs(10),
            keepalive: Duration::from_secs(2),
            max_age: None,
            drain_began: None,
            closing_since: None,
            patient: false,
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
