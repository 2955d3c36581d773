//! The worker's parking lot: idle HTTP/1.1 connections between requests,
//! held out of any task.
//!
//! A plain (not TLS) HTTP/1.1 connection that its decider parks (see
//! [`super::life`]) leaves its task: hyper's buffers and state, the task and
//! the connection's service are freed, and only the socket (with its share
//! of the cap) and a few words of state ([`Resume`]) stay here, about
//! 0.6 KiB in all. The lot watches each socket for readability through the
//! runtime's own registration (a waker per connection that names it), and
//! resumes it (a task of its own again, serving) when:
//! - its client sends (or closes): the next request's first byte;
//! - its next deadline passes (keep-alive, `--max-connection-age`): the
//!   resumed connection's decider says what the deadline means;
//! - the worker drains: every parked connection is resumed at once and
//!   handed over or drained as any idle connection is; nothing is parked
//!   after;
//! - a nudge asks it to move for balance ([`Nudge::Give`]).
//!
//! A nudge that makes room for waiting clients closes a parked connection
//! here (it is idle: nothing to answer and nothing unread).

use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;

use futures_util::task::AtomicWaker;
use tokio::sync::watch;
use tokio::time::Instant;

use super::io::Plain;
use super::life::{Nudge, NudgeFacts};
use super::{Origin, Peer, Shared};

/// What a parked connection's decider and service are rebuilt from (its
/// times on the monotonic clock, [`crate::sys::monotonic_ns`]: plain words).
#[derive(Clone, Copy)]
pub(crate) struct Resume {
    /// Its client's address (a parked connection is plain `http`).
    pub(super) ip: Option<std::net::IpAddr>,
    /// When it was accepted (its age counts from then).
    pub(super) epoch_ns: u64,
    /// When it reaches its maximum age; 0 for never.
    pub(super) max_age_ns: u64,
    /// When it came to this worker.
    pub(super) arrived_ns: u64,
    /// When its last response finished.
    pub(super) last_done_ns: u64,
    /// Requests it has begun in this worker.
    pub(super) requests: u64,
    /// It was handed over by a sibling.
    pub(super) handed: bool,
    /// It may be handed on when this worker leaves.
    pub(super) hand_on: bool,
    /// Its drain waits the whole keep-alive timeout (see the decider).
    pub(super) patient: bool,
    /// Resumed to be handed to a sibling for balance.
    pub(super) give: bool,
}

/// A monotonic-clock reading as an [`Instant`], and back.
pub(super) fn instant_at(ns: u64) -> Instant {
    let (now, now_ns) = (Instant::now(), crate::sys::monotonic_ns());
    match now_ns.checked_sub(ns) {
        Some(ago) => now.checked_sub(Duration::from_nanos(ago)).unwrap_or(now),
        None => now + Duration::from_nanos(ns - now_ns),
    }
}

/// An [`Instant`] as a monotonic-clock reading.
pub(super) fn ns_at(at: Instant) -> u64 {
    let (now, now_ns) = (Instant::now(), crate::sys::monotonic_ns());
    if at >= now {
        now_ns.saturating_add((at - now).as_nanos() as u64)
    } else {
        now_ns.saturating_sub((now - at).as_nanos() as u64)
    }
}

impl Resume {
    /// The facts a nudge is decided on, for a parked connection (idle, its
    /// last answer out, HTTP/1.1).
    fn nudge_facts(&self, now_ns: u64, movable: bool) -> NudgeFacts {
        let here_for = Duration::from_nanos(now_ns.saturating_sub(self.arrived_ns));
        NudgeFacts {
            quiet: true,
            idle_for: Some(Duration::from_nanos(
                now_ns.saturating_sub(self.last_done_ns),
            )),
            http2: false,
            movable,
            handed: self.handed,
            here_for,
            rate: self.requests as f64 / here_for.as_secs_f64().max(1e-9),
        }
    }
}

/// One parked connection.
struct Entry {
    io: Plain,
    resume: Resume,
    /// When it must be looked at again with nothing from its client.
    until_ns: u64,
    /// Its registration for readability (kept: the runtime holds a clone).
    _waker: Waker,
}

/// A connection's place in the lot: its index, and the generation of that
/// index, so that a stale wake-up never names another.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Key {
    index: u32,
    generation: u32,
}

/// How often at most the lot looks through its connections for deadlines
/// that passed: a deadline is kept to within this.
const SCAN_EVERY: Duration = Duration::from_millis(100);

#[derive(Default)]
struct State {
    slots: Vec<(u32, Option<Entry>)>,
    free: Vec<u32>,
    /// Connections whose sockets woke.
    ready: Vec<Key>,
    /// The earliest deadline of a parked connection (`u64::MAX`: none);
    /// never later than the real one.
    next_ns: u64,
    /// The worker drains: nothing more is parked.
    closed: bool,
}

impl State {
    fn take(&mut self, key: Key) -> Option<Entry> {
        let (generation, slot) = self.slots.get_mut(key.index as usize)?;
        if *generation != key.generation {
            return None;
        }
        let entry = slot.take()?;
        *generation = generation.wrapping_add(1);
        self.free.push(key.index);
        Some(entry)
    }

    /// Every parked connection's key.
    fn keys(&self) -> Vec<Key> {
        self.slots
            .iter()
            .enumerate()
            .filter(|(_, (_, e))| e.is_some())
            .map(|(i, (generation, _))| Key {
                index: i as u32,
                generation: *generation,
            })
            .collect()
    }
}

struct Inner {
    state: Mutex<State>,
    /// The lot's task.
    task: AtomicWaker,
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding it left plain data behind: still usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The waker a parked connection's socket wakes: names the connection.
struct Ring {
    lot: Arc<Inner>,
    key: Key,
}

impl Wake for Ring {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.lot.lock().ready.push(self.key);
        self.lot.task.wake();
    }
}

/// A worker's parked connections.
pub(crate) struct Lot {
    inner: Arc<Inner>,
}

impl Default for Lot {
    fn default() -> Lot {
        Lot {
            inner: Arc::new(Inner {
                state: Mutex::new(State {
                    next_ns: u64::MAX,
                    ..State::default()
                }),
                task: AtomicWaker::new(),
            }),
        }
    }
}

/// What [`Lot::park`] did.
pub(super) enum Parked {
    /// Held in the lot.
    Held,
    /// Its socket woke at once: resume it.
    Resume(Plain, Resume),
}

impl Lot {
    /// Whether connections may be parked (not once the worker drains).
    pub(super) fn is_open(&self) -> bool {
        !self.inner.lock().closed
    }

    /// Parks a connection until its socket wakes or the monotonic clock
    /// reaches `until_ns`; `Err` gives it back when the lot is closed (the
    /// worker drains).
    pub(super) fn park(
        &self,
        io: Plain,
        resume: Resume,
        until_ns: u64,
    ) -> Result<Parked, (Plain, Resume)> {
        let mut state = self.inner.lock();
        if state.closed {
            return Err((io, resume));
        }
        let index = match state.free.pop() {
            Some(index) => index,
            None => {
                let Ok(index) = u32::try_from(state.slots.len()) else {
                    return Err((io, resume));
                };
                state.slots.push((0, None));
                index
            }
        };
        let key = Key {
            index,
            generation: state.slots[index as usize].0,
        };
        drop(state);
        let waker = Waker::from(Arc::new(Ring {
            lot: Arc::clone(&self.inner),
            key,
        }));
        // Registered before it is held: a wake-up from now on names it.
        let woke = io
            .poll_read_ready(&mut Context::from_waker(&waker))
            .is_ready();
        let mut state = self.inner.lock();
        if woke {
            // Its next request is already here. The index's generation
            // moves on: the registration just made names nobody.
            let slot = &mut state.slots[index as usize].0;
            *slot = slot.wrapping_add(1);
            state.free.push(index);
            return Ok(Parked::Resume(io, resume));
        }
        state.slots[index as usize].1 = Some(Entry {
            io,
            resume,
            until_ns,
            _waker: waker,
        });
        let earlier = until_ns < state.next_ns;
        state.next_ns = state.next_ns.min(until_ns);
        drop(state);
        if earlier {
            // The lot's timer is set for a later deadline.
            self.inner.task.wake();
        }
        Ok(Parked::Held)
    }

    /// Runs the lot until the worker drains; then resumes every parked
    /// connection, and parks none after.
    pub(crate) async fn run(shared: Arc<Shared>, mut drain: watch::Receiver<bool>) {
        let lot = &shared.lot;
        let timer = tokio::time::sleep(Duration::from_secs(3600));
        tokio::pin!(timer);
        let mut seen = shared.placement.looks();
        let mut scanned = Instant::now();
        loop {
            let nudge = shared.placement.woken();
            tokio::pin!(nudge);
            nudge.as_mut().enable();
            if shared.placement.looks() != seen {
                seen = shared.placement.looks();
                lot.nudged(&shared, &drain);
                continue;
            }
            let next = lot.resume_due(&shared, &drain, &mut scanned);
            if let Some(at) = next {
                timer.as_mut().reset(at.max(scanned + SCAN_EVERY));
            }
            let nudged = tokio::select! {
                biased;
                _ = drain.wait_for(|d| *d) => break,
                () = std::future::poll_fn(|cx| lot.poll_ready(cx)) => false,
                () = &mut nudge => true,
                () = &mut timer, if next.is_some() => false,
            };
            if nudged {
                seen = shared.placement.looks();
                lot.nudged(&shared, &drain);
            }
        }
        let all: Vec<Entry> = {
            let mut state = lot.inner.lock();
            state.closed = true;
            state.ready.clear();
            state.next_ns = u64::MAX;
            let keys = state.keys();
            keys.into_iter().filter_map(|k| state.take(k)).collect()
        };
        for e in all {
            resume_in_task(e.io, e.resume, &shared, &drain);
        }
    }

    /// Ready once a parked connection's socket woke.
    fn poll_ready(&self, cx: &mut Context<'_>) -> Poll<()> {
        self.inner.task.register(cx.waker());
        if self.inner.lock().ready.is_empty() {
            Poll::Pending
        } else {
            Poll::Ready(())
        }
    }

    /// Resumes the connections whose sockets woke and, once their earliest
    /// deadline passed, those whose deadline passed; returns when the next
    /// deadline is.
    fn resume_due(
        &self,
        shared: &Arc<Shared>,
        drain: &watch::Receiver<bool>,
        scanned: &mut Instant,
    ) -> Option<Instant> {
        let now_ns = crate::sys::monotonic_ns();
        let (due, next_ns) = {
            let mut state = self.inner.lock();
            let mut due = Vec::new();
            for key in std::mem::take(&mut state.ready) {
                if let Some(e) = state.take(key) {
                    due.push(e);
                }
            }
            if state.next_ns <= now_ns {
                *scanned = Instant::now();
                let mut next_ns = u64::MAX;
                for key in state.keys() {
                    let until = state.slots[key.index as usize]
                        .1
                        .as_ref()
                        .map_or(u64::MAX, |e| e.until_ns);
                    if until <= now_ns {
                        due.extend(state.take(key));
                    } else {
                        next_ns = next_ns.min(until);
                    }
                }
                state.next_ns = next_ns;
            }
            (due, state.next_ns)
        };
        for e in due {
            resume_in_task(e.io, e.resume, shared, drain);
        }
        (next_ns != u64::MAX).then(|| instant_at(next_ns))
    }

    /// A nudge: each parked connection's decider says whether it closes to
    /// make room for waiting clients, moves for balance, or stays.
    fn nudged(&self, shared: &Arc<Shared>, drain: &watch::Receiver<bool>) {
        let now_ns = crate::sys::monotonic_ns();
        let queue = shared.handoff.is_some();
        let mut closed = Vec::new();
        let mut moving = Vec::new();
        {
            let mut state = self.inner.lock();
            // The longest idle first: the likeliest to stay idle.
            let mut order: Vec<(u64, Key)> = state
                .keys()
                .into_iter()
                .filter_map(|k| {
                    let e = state.slots[k.index as usize].1.as_ref()?;
                    Some((e.resume.last_done_ns, k))
                })
                .collect();
            order.sort_unstable_by_key(|(done, _)| *done);
            for (_, key) in order {
                if !shared.placement.is_crowded() && !shared.placement.giving() {
                    break;
                }
                let Some((_, Some(e))) = state.slots.get(key.index as usize) else {
                    continue;
                };
                let facts = e.resume.nudge_facts(now_ns, queue && e.resume.hand_on);
                match super::life::nudged(&facts, &shared.placement) {
                    Nudge::Stay => {}
                    Nudge::Close | Nudge::Drain => closed.extend(state.take(key)),
                    Nudge::Give => {
                        if let Some(mut e) = state.take(key) {
                            e.resume.give = true;
                            moving.push(e);
                        }
                    }
                }
            }
        }
        for e in closed {
            shared
                .board
                .count_made_room(crate::metrics::MadeRoom::IdleClosed);
            e.io.close_lingering();
        }
        for e in moving {
            resume_in_task(e.io, e.resume, shared, drain);
        }
    }
}

/// Serves a parked connection in a task of its own again.
pub(super) fn resume_in_task(
    io: Plain,
    resume: Resume,
    shared: &Arc<Shared>,
    drain: &watch::Receiver<bool>,
) {
    let (shared, drain) = (Arc::clone(shared), drain.clone());
    match io {
        Plain::Tcp(io) => {
            let peer = Peer {
                ip: resume.ip,
                scheme: "http",
            };
            tokio::spawn(super::serve(io, peer, shared, drain, Origin::Resumed(resume)));
        }
        Plain::Unix(io) => {
            let peer = Peer {
                ip: None,
                scheme: "http",
            };
            tokio::spawn(super::serve(io, peer, shared, drain, Origin::Resumed(resume)));
        }
    }
}
#[cfg(test)]
mod size_probe {
    #[test]
    fn sizes() {
        eprintln!("entry {} plain {} resume {} tracked {} peer {} stall {}",
            std::mem::size_of::<super::Entry>(),
            std::mem::size_of::<super::Plain>(),
            std::mem::size_of::<super::Resume>(),
            std::mem::size_of::<crate::http::io::Tracked<tokio::net::TcpStream>>(),
            std::mem::size_of::<super::Peer>(),
            std::mem::size_of::<Option<crate::stall::Stall>>(),
        );
    }
}
