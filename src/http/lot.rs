//! The worker's parking lot: idle HTTP/1.1 connections between requests,
//! held out of any task.
//!
//! A plain (not TLS) HTTP/1.1 connection that its decider lets park (see
//! [`super::life`]) leaves its task: hyper's buffers and state, the task,
//! the connection's service and its registration with the runtime are
//! freed, and only the socket (with its share of the cap) and a few words
//! of state ([`Resume`]) stay here, some 200 bytes. The lot's own epoll
//! instance watches the parked sockets (the runtime watches that one
//! descriptor), and the lot resumes a connection (a task of its own again,
//! serving) when:
//! - its client sends (or closes): the next request's first byte;
//! - its next deadline passes (keep-alive, `--max-connection-age`), looked
//!   for at most every [`SCAN_EVERY`]: the resumed connection's decider
//!   says what the deadline means;
//! - the worker drains: every parked connection is resumed at once and
//!   handed over or drained as any idle connection is; nothing is parked
//!   after;
//! - a nudge asks it to move for balance ([`Nudge::Give`]).
//!
//! A nudge that makes room for waiting clients closes a parked connection
//! here: it is idle (nothing to answer); should its client have sent
//! bytes just now, with a lingering close.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
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
}

/// A connection's place in the lot: its index, and the generation of that
/// index, so that a stale event never names another.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Key {
    index: u32,
    generation: u32,
}

impl Key {
    fn word(self) -> u64 {
        (u64::from(self.generation) << 32) | u64::from(self.index)
    }

    fn from_word(word: u64) -> Key {
        Key {
            index: word as u32,
            generation: (word >> 32) as u32,
        }
    }
}

/// How often at most the lot looks through its connections for deadlines
/// that passed: a deadline is kept to within this.
const SCAN_EVERY: Duration = Duration::from_millis(100);

/// How long after the first connection of a wave parks the allocator is
/// asked to give free memory back: time for the wave's tasks to end (and
/// free hyper's buffers), once a second at most.
const RELEASE_AFTER: Duration = Duration::from_secs(1);

/// How many readiness events one look takes.
const EVENTS: usize = 256;

#[derive(Default)]
struct State {
    slots: Vec<(u32, Option<Entry>)>,
    free: Vec<u32>,
    /// The earliest deadline of a parked connection (`u64::MAX`: none);
    /// never later than the real one.
    next_ns: u64,
    /// The worker drains (or the lot has no watch): nothing is parked.
    closed: bool,
    /// A connection parked since the allocator last gave free memory back.
    release_due: bool,
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

/// The lot's own epoll instance, as the runtime watches it.
struct Watch(Epoll);

impl std::os::fd::AsRawFd for Watch {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        use std::os::fd::AsFd;
        self.0 .0.as_fd().as_raw_fd()
    }
}

/// A worker's parked connections: their sockets are in the lot's own
/// epoll instance (level-triggered, for bytes or the client's close),
/// which the runtime watches as one descriptor.
pub(crate) struct Lot {
    state: Mutex<State>,
    watch: Option<AsyncFd<Watch>>,
    /// Rung when a connection parks with a deadline earlier than the one
    /// the lot's timer is set for, or the first since the allocator last
    /// gave memory back.
    sooner: tokio::sync::Notify,
    /// Where its count of parked connections is shown to the master.
    held: Option<&'static crate::scoreboard::Held>,
}

impl Lot {
    /// A lot that counts its connections in `held`; one that cannot make
    /// its epoll instance parks nothing (its connections stay idle in
    /// their tasks), and says so.
    pub(crate) fn new(held: Option<&'static crate::scoreboard::Held>) -> Lot {
        let watch = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)
            .map_err(std::io::Error::from)
            .and_then(|epoll| {
                // SAFETY: `Watch` owns the epoll descriptor and never gives
                // it up or swaps it: it stays open, and is the same, for as
                // long as the `AsyncFd` holds it.
                unsafe { AsyncFd::register_with_interest(Watch(epoll), Interest::READABLE) }
                    .map_err(|e| e.into())
            });
        if let Err(e) = &watch {
            tracing::warn!(
                "worker {}: idle connections stay in their tasks (cannot watch them apart: {e})",
                std::process::id()
            );
        }
        let watch = watch.ok();
        Lot {
            state: Mutex::new(State {
                next_ns: u64::MAX,
                closed: watch.is_none(),
                ..State::default()
            }),
            watch,
            sooner: tokio::sync::Notify::new(),
            held,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding it left plain data behind: still usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether connections may be parked (not once the worker drains).
    pub(super) fn is_open(&self) -> bool {
        !self.lock().closed
    }

    /// Parks a connection until its socket has bytes (or its client
    /// closes) or the monotonic clock reaches `until_ns`; `Err` gives it
    /// back when the lot is closed (the worker drains).
    pub(super) fn park(
        &self,
        io: Plain,
        resume: Resume,
        until_ns: u64,
    ) -> Result<(), Box<(Plain, Resume)>> {
        let mut state = self.lock();
        let Some(watch) = self.watch.as_ref().filter(|_| !state.closed) else {
            return Err(Box::new((io, resume)));
        };
        let index = match state.free.pop() {
            Some(index) => index,
            None => {
                let Ok(index) = u32::try_from(state.slots.len()) else {
                    return Err(Box::new((io, resume)));
                };
                state.slots.push((0, None));
                index
            }
        };
        let key = Key {
            index,
            generation: state.slots[index as usize].0,
        };
        let event = EpollEvent::new(EpollFlags::EPOLLIN | EpollFlags::EPOLLRDHUP, key.word());
        if watch.get_ref().0.add(io.as_fd(), event).is_err() {
            state.free.push(index);
            return Err(Box::new((io, resume)));
        }
        state.slots[index as usize].1 = Some(Entry {
            io,
            resume,
            until_ns,
        });
        let first = !std::mem::replace(&mut state.release_due, true);
        let sooner = until_ns < state.next_ns || first;
        state.next_ns = state.next_ns.min(until_ns);
        drop(state);
        if let Some(held) = self.held {
            held.add_parked(1);
        }
        if sooner {
            self.sooner.notify_one();
        }
        Ok(())
    }

    /// Takes a connection out of the lot (and out of its watch).
    fn take(&self, state: &mut State, key: Key) -> Option<Entry> {
        let entry = state.take(key)?;
        if let Some(watch) = &self.watch {
            let _ = watch.get_ref().0.delete(entry.io.as_fd());
        }
        if let Some(held) = self.held {
            held.add_parked(-1);
        }
        Some(entry)
    }

    /// Runs the lot until the worker drains; then resumes every parked
    /// connection, and parks none after.
    pub(crate) async fn run(shared: Arc<Shared>, mut drain: watch::Receiver<bool>) {
        let lot = &shared.lot;
        let Some(watch) = &lot.watch else {
            return;
        };
        let timer = tokio::time::sleep(Duration::from_secs(3600));
        tokio::pin!(timer);
        // Gives the memory the parked connections' tasks freed back to the
        // kernel, a while after the first of a wave parks.
        let release = tokio::time::sleep(Duration::from_secs(3600));
        tokio::pin!(release);
        let mut releasing = false;
        let mut seen = shared.placement.looks();
        let mut scanned = Instant::now();
        let mut events = vec![EpollEvent::empty(); EVENTS];
        // What resumed connections watch (this task waits on `drain`).
        let resumed_drain = drain.clone();
        loop {
            let nudge = shared.placement.woken();
            tokio::pin!(nudge);
            nudge.as_mut().enable();
            if shared.placement.looks() != seen {
                seen = shared.placement.looks();
                lot.nudged(&shared, &drain);
                continue;
            }
            let next = lot.resume_late(&shared, &drain, &mut scanned);
            if let Some(at) = next {
                timer.as_mut().reset(at.max(scanned + SCAN_EVERY));
            }
            if !releasing && lot.lock().release_due {
                release.as_mut().reset(Instant::now() + RELEASE_AFTER);
                releasing = true;
            }
            tokio::select! {
                biased;
                _ = drain.wait_for(|d| *d) => break,
                ready = watch.readable() => {
                    let Ok(mut ready) = ready else { break };
                    // Every socket with bytes (or closed), a batch at a time.
                    loop {
                        let n = watch
                            .get_ref()
                            .0
                            .wait(&mut events, EpollTimeout::ZERO)
                            .unwrap_or(0);
                        for event in &events[..n] {
                            lot.woke(Key::from_word(event.data()), &shared, &resumed_drain);
                        }
                        if n < EVENTS {
                            ready.clear_ready();
                            break;
                        }
                    }
                }
                () = &mut nudge => {
                    seen = shared.placement.looks();
                    lot.nudged(&shared, &resumed_drain);
                }
                // A deadline sooner than the timer's: set it again.
                () = lot.sooner.notified() => {}
                () = &mut timer, if next.is_some() => {}
                () = &mut release, if releasing => {
                    releasing = false;
                    lot.lock().release_due = false;
                    crate::sys::release_free_memory();
                }
            }
        }
        let all: Vec<Entry> = {
            let mut state = lot.lock();
            state.closed = true;
            state.next_ns = u64::MAX;
            let keys = state.keys();
            keys.into_iter()
                .filter_map(|k| lot.take(&mut state, k))
                .collect()
        };
        for e in all {
            resume_in_task(e.io, e.resume, bytes::Bytes::new(), &shared, &drain);
        }
    }

    /// A parked connection's socket woke: its client's first bytes are
    /// read here (so that the resumed connection has its request at once,
    /// whatever the runtime has yet to notice) and it is resumed with
    /// them; a client that closed is closed; a wake-up with nothing to
    /// read leaves it parked.
    fn woke(&self, key: Key, shared: &Arc<Shared>, drain: &watch::Receiver<bool>) {
        let mut first = [0u8; 1024];
        let mut state = self.lock();
        let Some((generation, Some(entry))) = state.slots.get(key.index as usize) else {
            return;
        };
        if *generation != key.generation {
            return;
        }
        let read = entry.io.read_now(&mut first);
        if matches!(&read, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock
            || e.kind() == std::io::ErrorKind::Interrupted)
        {
            return;
        }
        let Some(e) = self.take(&mut state, key) else {
            return;
        };
        drop(state);
        match read {
            Ok(n) if n > 0 => resume_in_task(
                e.io,
                e.resume,
                bytes::Bytes::copy_from_slice(&first[..n]),
                shared,
                drain,
            ),
            // Closed by its client, or broken: over, as hyper ends an idle
            // connection its client closed.
            _ => drop(e),
        }
    }

    /// Resumes, once their earliest deadline passed, the connections whose
    /// deadline passed; returns when the next deadline is.
    fn resume_late(
        &self,
        shared: &Arc<Shared>,
        drain: &watch::Receiver<bool>,
        scanned: &mut Instant,
    ) -> Option<Instant> {
        let now_ns = crate::sys::monotonic_ns();
        let (due, next_ns) = {
            let mut state = self.lock();
            let mut due = Vec::new();
            if state.next_ns <= now_ns {
                *scanned = Instant::now();
                let mut next_ns = u64::MAX;
                for key in state.keys() {
                    let until = state.slots[key.index as usize]
                        .1
                        .as_ref()
                        .map_or(u64::MAX, |e| e.until_ns);
                    if until <= now_ns {
                        due.extend(self.take(&mut state, key));
                    } else {
                        next_ns = next_ns.min(until);
                    }
                }
                state.next_ns = next_ns;
            }
            (due, state.next_ns)
        };
        for e in due {
            resume_in_task(e.io, e.resume, bytes::Bytes::new(), shared, drain);
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
            let mut state = self.lock();
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
                    Nudge::Close | Nudge::Drain => closed.extend(self.take(&mut state, key)),
                    Nudge::Give => {
                        if let Some(mut e) = self.take(&mut state, key) {
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
            e.io.close_idle();
        }
        for e in moving {
            resume_in_task(e.io, e.resume, bytes::Bytes::new(), shared, drain);
        }
    }
}

/// Serves a parked connection in a task of its own again (back in the
/// runtime's registry).
pub(super) fn resume_in_task(
    io: Plain,
    resume: Resume,
    carried: bytes::Bytes,
    shared: &Arc<Shared>,
    drain: &watch::Receiver<bool>,
) {
    let (shared, drain) = (Arc::clone(shared), drain.clone());
    let origin = Origin::Resumed { resume, carried };
    let result = match io {
        Plain::Tcp(io) => io.into_tokio().map(|io| {
            let peer = Peer {
                ip: resume.ip,
                scheme: "http",
            };
            drop(tokio::spawn(super::serve(io, peer, shared, drain, origin)));
        }),
        Plain::Unix(io) => io.into_tokio().map(|io| {
            let peer = Peer {
                ip: None,
                scheme: "http",
            };
            drop(tokio::spawn(super::serve(io, peer, shared, drain, origin)));
        }),
    };
    if let Err(e) = result {
        tracing::debug!("cannot resume a parked connection: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a parked connection keeps in the lot, in bytes (its socket and
    /// its share of the cap, its decider's words, its deadline).
    #[test]
    fn a_parked_connection_keeps_a_few_words() {
        let entry = std::mem::size_of::<(u32, Option<Entry>)>();
        assert!(entry <= 256, "a parked connection keeps {entry} bytes");
    }

    #[test]
    fn a_key_survives_the_epoll_word() {
        for (index, generation) in [(0, 0), (7, 3), (u32::MAX, u32::MAX)] {
            let key = Key { index, generation };
            assert!(Key::from_word(key.word()) == key);
        }
    }

    #[test]
    fn monotonic_readings_and_instants_agree() {
        let now = Instant::now();
        for delta in [
            Duration::ZERO,
            Duration::from_millis(5),
            Duration::from_secs(600),
        ] {
            let later = now + delta;
            let back = instant_at(ns_at(later));
            let off = if back > later {
                back - later
            } else {
                later - back
            };
            assert!(
                off < Duration::from_millis(5),
                "{delta:?} came back {off:?} off"
            );
        }
    }
}
