//! Overload shedding (`--max-queue-time`): a request that waited too long
//! in a busy worker before zdr could start it is answered `503` with
//! `Retry-After` at once, instead of joining a queue its client will give
//! up on.
//!
//! A request waits from when its bytes woke the connection (or the
//! connection was accepted) to when zdr is about to call the app on it:
//! behind the worker's other work, which is where a pre-fork worker's
//! overload lives (a handler that blocks the runtime, a CPU-bound app,
//! many HTTP/2 streams at once). How long it may wait adapts to the app and
//! to the worker's state, as CoDel's two regimes do:
//!
//! - **Normal**: a burst may queue. A request is shed once it waited
//!   longer than the floor the operator set (`--max-queue-time`) and two of
//!   the app's recent responses, so that a slow app at its capacity (each
//!   request waiting for the one before it) is not shed.
//! - **Overloaded** (a request was shed within the last [`OVERLOAD_HOLD`]):
//!   the queue is standing, and only fresh requests are worth starting.
//!   Each request first takes a ticket and lets the worker's other ready
//!   work have its turn (it yields until the runtime has looked for I/O
//!   again and every connection accepted meanwhile has read its first
//!   request), so that answers which cost nothing (health probes, other
//!   sheds) go out before the next slow one starts. Then the newest
//!   request waiting is started (if it has waited no longer than the
//!   floor) and the older ones are shed: last in, first out, as Facebook's
//!   adaptive LIFO does, since the newest is the one whose client is surely
//!   still waiting and that the queue has cost the least.
//!
//! | state      | request                          | outcome                     |
//! |------------|----------------------------------|-----------------------------|
//! | normal     | waited ≤ max(floor, 2 × app)     | started                     |
//! | normal     | waited > max(floor, 2 × app)     | shed; overloaded from now   |
//! | overloaded | first poll                       | takes a ticket, yields      |
//! | overloaded | yielded, connections accepted and not yet read (at most [`MAX_YIELDS`] times) | yields again |
//! | overloaded | yielded, the newest ticket, waited ≤ floor | started |
//! | overloaded | yielded, waited > floor, or a newer ticket | shed; overloaded from now |
//! | any        | a health probe                   | answered, never shed        |
//! | normal     | taken from an app's own queue (a Python app's), waited ≤ max(floor, 2 × app) | started |
//! | normal     | taken from an app's own queue, waited longer | shed; overloaded from now |
//! | overloaded | taken from an app's own queue, waited ≤ floor | started |
//! | overloaded | taken from an app's own queue, waited > floor | shed; overloaded from now |
//!
//! An app that queues requests itself (a Python app: the runtime hands
//! each call to the app's thread at once, and the wait is in the app's
//! queue) has a shedder of its own for that queue ([`Shedder::decide_taken`],
//! the app's time from its taking a call to its head): the app's queue is
//! first in, first out, so there is nothing to yield to. Its 503 carries a
//! [`ShedMark`], which the HTTP layer counts as its own sheds.
//!
//! Shed means `503` with `Retry-After: 1` at once, counted in
//! `zdr_requests_shed_total`, and said at most once a second per worker.
//! The app's recent time is a moving average (1/8 per request) of the time
//! from the app's first poll to its response head, over requests started.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use http::header::{HeaderValue, RETRY_AFTER};
use http::StatusCode;

use crate::app::{plain, Response};

/// A worker's shedding state.
pub(crate) struct Shedder {
    /// The least wait that may be shed (`--max-queue-time`), in ns.
    floor_ns: u64,
    /// The app's recent response time, in ns (a moving average).
    typical_ns: AtomicU64,
    /// Overloaded until then ([`crate::sys::monotonic_ns`]).
    overloaded_until_ns: AtomicU64,
    /// Connections accepted whose task has not run yet.
    unread: AtomicUsize,
}

/// The most times a request yields to connections not yet read.
pub(crate) const MAX_YIELDS: u32 = 8;

/// How long a worker stays overloaded after it last shed a request.
pub(crate) const OVERLOAD_HOLD: Duration = Duration::from_secs(1);

/// What becomes of a request about to be started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    Start,
    /// Let the worker's other ready work go first, then decide.
    Yield,
    Shed,
}

/// What the client is told to wait before trying again, in seconds.
const RETRY_AFTER_SECS: &str = "1";

impl Shedder {
    /// Shedding requests that waited longer than `floor` (at least).
    pub(crate) fn new(floor: Duration) -> Shedder {
        Shedder {
            floor_ns: u64::try_from(floor.as_nanos()).unwrap_or(u64::MAX),
            typical_ns: AtomicU64::new(0),
            overloaded_until_ns: AtomicU64::new(0),
            unread: AtomicUsize::new(0),
        }
    }

    /// Whether it shed a request lately: the queue is standing.
    pub(crate) fn overloaded(&self) -> bool {
        crate::sys::monotonic_ns() < self.overloaded_until_ns.load(Ordering::Relaxed)
    }

    /// A connection was accepted; its task is to run.
    pub(crate) fn accepted(&self) {
        self.unread.fetch_add(1, Ordering::Relaxed);
    }

    /// An accepted connection's task runs.
    pub(crate) fn reading(&self) {
        let _ = self
            .unread
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
    }

    /// What becomes of a request that has waited `waited_ns` at `now_ns`,
    /// having `yielded` already or not.
    /// `place` is its ticket and how often it yielded (0 before its first
    /// yield, when it takes its ticket).
    pub(crate) fn decide(&self, now_ns: u64, waited_ns: u64, place: &mut Place) -> Verdict {
        let facts = Facts {
            floor_ns: self.floor_ns,
            typical_ns: self.typical_ns.load(Ordering::Relaxed),
            overloaded: now_ns < self.overloaded_until_ns.load(Ordering::Relaxed),
            waited_ns,
            newest: (place.ticket != 0).then(|| place.ticket == NEWEST.get()),
            unread: place.yields < MAX_YIELDS && self.unread.load(Ordering::Relaxed) > 0,
        };
        let verdict = decide(&facts);
        if verdict == Verdict::Yield {
            if place.ticket == 0 {
                place.ticket = NEWEST.get() + 1;
                NEWEST.set(place.ticket);
            }
            place.yields += 1;
        }
        if verdict == Verdict::Shed {
            let hold = u64::try_from(OVERLOAD_HOLD.as_nanos()).unwrap_or(u64::MAX);
            self.overloaded_until_ns
                .store(now_ns.saturating_add(hold), Ordering::Relaxed);
        }
        verdict
    }

    /// Whether a call taken from an app's own queue at `now_ns`, having
    /// waited `waited_ns` since it was queued, is shed (see the module's
    /// table).
    #[cfg_attr(not(feature = "python"), allow(dead_code))]
    pub(crate) fn decide_taken(&self, now_ns: u64, waited_ns: u64) -> bool {
        let overloaded = now_ns < self.overloaded_until_ns.load(Ordering::Relaxed);
        let shed = taken_is_shed(
            self.floor_ns,
            self.typical_ns.load(Ordering::Relaxed),
            overloaded,
            waited_ns,
        );
        if shed {
            let hold = u64::try_from(OVERLOAD_HOLD.as_nanos()).unwrap_or(u64::MAX);
            self.overloaded_until_ns
                .store(now_ns.saturating_add(hold), Ordering::Relaxed);
        }
        shed
    }

    /// The longest a request may wait in the normal state, in ns.
    fn limit_ns(&self) -> u64 {
        normal_limit(self.floor_ns, self.typical_ns.load(Ordering::Relaxed))
    }

    /// The app answered a started request in `took_ns`.
    pub(crate) fn served(&self, took_ns: u64) {
        let before = self.typical_ns.load(Ordering::Relaxed);
        self.typical_ns
            .store(moving_average(before, took_ns), Ordering::Relaxed);
    }

    /// The answer to a shed request, counted, and said at most once a
    /// second per worker.
    pub(crate) fn answer(
        &self,
        board: &crate::scoreboard::Scoreboard,
        waited_ns: u64,
        body_left: bool,
    ) -> Response {
        board.count_shed();
        self.say(waited_ns);
        refusal(body_left)
    }

    /// The answer to a call shed from an app's own queue: said here, and
    /// marked for the HTTP layer to count ([`ShedMark`]).
    #[cfg_attr(not(feature = "python"), allow(dead_code))]
    pub(crate) fn answer_taken(&self, waited_ns: u64, body_left: bool) -> Response {
        self.say(waited_ns);
        let mut res = refusal(body_left);
        res.extensions_mut().insert(ShedMark);
        res
    }

    /// Says a request was shed, at most once a second per worker.
    fn say(&self, waited_ns: u64) {
        static LAST_SAID_MS: AtomicU64 = AtomicU64::new(0);
        if crate::logging::once_a_second(&LAST_SAID_MS) {
            tracing::warn!(
                event = crate::logging::LogEvent::RequestShed.name(),
                "worker {}: overloaded: a request waited {:.0} ms to be started (--max-queue-time \
                 {:.0} ms; {:.0} ms in a burst, two of the app's recent responses); answered 503 \
                 with Retry-After (zdr_requests_shed_total counts each)",
                std::process::id(),
                waited_ns as f64 / 1e6,
                self.floor_ns as f64 / 1e6,
                self.limit_ns() as f64 / 1e6,
            );
        }
    }
}

/// A response the app's own queue shed ([`Shedder::answer_taken`]): the
/// HTTP layer counts it in `zdr_requests_shed_total`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ShedMark;

/// `503` with `Retry-After`; `Connection: close` when the request's body
/// was left unread.
fn refusal(body_left: bool) -> Response {
    let mut res = plain(StatusCode::SERVICE_UNAVAILABLE, "Service Unavailable\n");
    res.headers_mut()
        .insert(RETRY_AFTER, HeaderValue::from_static(RETRY_AFTER_SECS));
    if body_left {
        // Its body is not read: the connection cannot carry another.
        res.headers_mut()
            .insert(http::header::CONNECTION, HeaderValue::from_static("close"));
    }
    res
}

/// Whether a call taken from an app's own queue is shed, from the facts.
#[cfg_attr(not(feature = "python"), allow(dead_code))]
fn taken_is_shed(floor_ns: u64, typical_ns: u64, overloaded: bool, waited_ns: u64) -> bool {
    if overloaded {
        waited_ns > floor_ns
    } else {
        waited_ns > normal_limit(floor_ns, typical_ns)
    }
}

thread_local! {
    /// The last ticket a request took on this thread: a runtime thread's
    /// newest waiting request holds it.
    static NEWEST: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// A request's place in an overloaded worker's queue.
#[derive(Debug, Default)]
pub(crate) struct Place {
    /// Its ticket (0 before it has one).
    ticket: u64,
    /// How often it yielded.
    yields: u32,
}

/// What a decision is made from.
#[derive(Debug, Clone, Copy)]
struct Facts {
    floor_ns: u64,
    /// The app's recent response time.
    typical_ns: u64,
    overloaded: bool,
    waited_ns: u64,
    /// Whether the request holds the newest ticket, once it has one.
    newest: Option<bool>,
    /// Connections were accepted and not yet read (and the request may
    /// still yield to them).
    unread: bool,
}

/// The decision, from the facts (see the module's table).
fn decide(f: &Facts) -> Verdict {
    if !f.overloaded {
        return if f.waited_ns > normal_limit(f.floor_ns, f.typical_ns) {
            Verdict::Shed
        } else {
            Verdict::Start
        };
    }
    match f.newest {
        None => Verdict::Yield,
        Some(_) if f.unread => Verdict::Yield,
        Some(true) if f.waited_ns <= f.floor_ns => Verdict::Start,
        Some(_) => Verdict::Shed,
    }
}

/// The longest wait allowed in the normal state: the floor, or two of the
/// app's recent responses if longer.
fn normal_limit(floor_ns: u64, typical_ns: u64) -> u64 {
    floor_ns.max(typical_ns.saturating_mul(2))
}

/// The next moving average of the app's time, 1/8 of the way to `sample`.
fn moving_average(before: u64, sample: u64) -> u64 {
    if before == 0 {
        return sample;
    }
    let (b, s) = (before as i128, sample as i128);
    (b + (s - b) / 8) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    fn facts(floor: u64, typical: u64, overloaded: bool, waited: u64) -> Facts {
        Facts {
            floor_ns: floor,
            typical_ns: typical,
            overloaded,
            waited_ns: waited,
            newest: None,
            unread: false,
        }
    }

    #[test]
    fn the_table() {
        use Verdict::*;
        let normal = |floor, typical, waited| facts(floor, typical, false, waited);
        let over = |waited, newest, unread| Facts {
            newest,
            unread,
            ..facts(10 * MS, 50 * MS, true, waited)
        };
        let table = [
            // Normal: the floor, or two of the app's responses.
            (normal(10 * MS, 0, 10 * MS), Start),
            (normal(10 * MS, 0, 10 * MS + 1), Shed),
            (normal(10 * MS, 2 * MS, 11 * MS), Shed),
            // A slow app at its capacity: a request waits for the one (or
            // two) before it, and is started.
            (normal(10 * MS, 50 * MS, 50 * MS), Start),
            (normal(10 * MS, 50 * MS, 100 * MS), Start),
            (normal(10 * MS, 50 * MS, 100 * MS + 1), Shed),
            // A request that yielded when overloaded, and finds the worker
            // normal again, is judged as any other.
            (
                Facts {
                    newest: Some(false),
                    unread: true,
                    ..normal(10 * MS, 50 * MS, 60 * MS)
                },
                Start,
            ),
            // Overloaded: take a ticket and yield first, whatever the wait.
            (over(0, None, false), Yield),
            (over(500 * MS, None, true), Yield),
            // Yield again while accepted connections are not yet read.
            (over(0, Some(true), true), Yield),
            (over(0, Some(false), true), Yield),
            // Then only the newest, and only if fresh, is started.
            (over(10 * MS, Some(true), false), Start),
            (over(0, Some(false), false), Shed),
            (over(10 * MS + 1, Some(true), false), Shed),
            (over(60 * MS, Some(true), false), Shed),
        ];
        for (facts, verdict) in table {
            assert_eq!(decide(&facts), verdict, "{facts:?}");
        }
    }

    #[test]
    fn the_table_for_an_apps_own_queue() {
        // (floor, typical, overloaded, waited) -> shed
        let table = [
            ((10 * MS, 0, false, 10 * MS), false),
            ((10 * MS, 0, false, 10 * MS + 1), true),
            ((10 * MS, 50 * MS, false, 100 * MS), false),
            ((10 * MS, 50 * MS, false, 100 * MS + 1), true),
            ((10 * MS, 50 * MS, true, 10 * MS), false),
            ((10 * MS, 50 * MS, true, 10 * MS + 1), true),
        ];
        for ((floor, typical, overloaded, waited), shed) in table {
            assert_eq!(
                taken_is_shed(floor, typical, overloaded, waited),
                shed,
                "{floor} {typical} {overloaded} {waited}"
            );
        }
        let s = Shedder::new(Duration::from_millis(10));
        s.served(50 * MS);
        let now = 1_000 * MS;
        assert!(!s.decide_taken(now, 100 * MS));
        assert!(s.decide_taken(now, 101 * MS));
        // Overloaded from then: the floor alone.
        assert!(s.decide_taken(now + MS, 11 * MS));
        assert!(!s.decide_taken(now + MS, 10 * MS));
        let later = now + 2 * MS + OVERLOAD_HOLD.as_nanos() as u64;
        assert!(!s.decide_taken(later, 90 * MS));
        let res = s.answer_taken(20 * MS, true);
        assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(res.headers()[RETRY_AFTER], "1");
        assert_eq!(res.headers()[http::header::CONNECTION], "close");
        assert!(res.extensions().get::<ShedMark>().is_some());
    }

    #[test]
    fn a_shed_makes_the_worker_overloaded_for_a_while() {
        let s = Shedder::new(Duration::from_millis(10));
        s.served(50 * MS);
        let now = 1_000 * MS;
        let (mut a, mut b, mut c) = (Place::default(), Place::default(), Place::default());
        assert_eq!(s.decide(now, 20 * MS, &mut a), Verdict::Start);
        assert_eq!(s.decide(now, 101 * MS, &mut a), Verdict::Shed);
        // Overloaded: two requests yield, each with a ticket; while a
        // connection accepted is not yet read, they yield again.
        assert_eq!(s.decide(now + MS, 0, &mut b), Verdict::Yield);
        assert_eq!(s.decide(now + MS, 0, &mut c), Verdict::Yield);
        assert!(b.ticket != 0 && c.ticket > b.ticket);
        s.accepted();
        assert_eq!(s.decide(now + MS, 0, &mut c), Verdict::Yield);
        s.reading();
        // Then the older is shed, the newer started.
        assert_eq!(s.decide(now + MS, 2 * MS, &mut b), Verdict::Shed);
        assert_eq!(s.decide(now + MS, 2 * MS, &mut c), Verdict::Start);
        // Never more than MAX_YIELDS yields for unread connections.
        let mut d = Place::default();
        s.accepted();
        let mut yields = 0;
        while s.decide(now + MS, 0, &mut d) == Verdict::Yield {
            yields += 1;
        }
        assert_eq!(yields, MAX_YIELDS);
        // No shed for the hold: normal again.
        let later = now + 2 * MS + OVERLOAD_HOLD.as_nanos() as u64;
        assert_eq!(
            s.decide(later, 20 * MS, &mut Place::default()),
            Verdict::Start
        );
    }

    #[test]
    fn the_apps_time_follows_its_responses() {
        let s = Shedder::new(Duration::from_millis(1));
        let typical = || s.typical_ns.load(Ordering::Relaxed);
        s.served(50 * MS);
        assert_eq!(typical(), 50 * MS, "the first response sets it");
        assert_eq!(s.limit_ns(), 100 * MS);
        for _ in 0..64 {
            s.served(2 * MS);
        }
        // Within 1 % of the new time after 64 responses.
        assert!(typical() < 2 * MS + 2 * MS / 100, "{}", typical());
        // One slow response moves it by an eighth of the difference.
        let before = typical();
        s.served(before + 80 * MS);
        assert_eq!(typical(), before + 10 * MS);
    }

    #[test]
    fn a_shed_request_is_told_when_to_come_back() {
        let board = crate::scoreboard::Scoreboard::create().unwrap();
        let board = &board;
        let s = Shedder::new(Duration::from_millis(5));
        let res = s.answer(board, 20 * MS, false);
        assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(res.headers()[RETRY_AFTER], "1");
        assert!(res.headers().get(http::header::CONNECTION).is_none());
        let res = s.answer(board, 20 * MS, true);
        assert_eq!(res.headers()[http::header::CONNECTION], "close");
        assert_eq!(board.shed(), 2);
    }
}
