//! The scoreboard: one slot of shared memory per worker, as in Apache and
//! uWSGI.
//!
//! A worker writes its state (booting, ready, draining), a heartbeat, its
//! request and connection counters and, if it cannot boot, why. The master
//! reads them to gate reloads on readiness, detect hung workers, recycle
//! workers and report status. One mechanism serves all of these; the only
//! other channel is the [`Doorbell`], a pipe a worker writes one byte to so
//! that the master looks at the scoreboard now rather than at its next tick.
//!
//! The memory is a `memfd` mapped shared, so it survives both `fork` and
//! `exec`: workers (and a re-executed master) map it from an inherited
//! descriptor. Every field is an atomic, so no lock is shared between
//! processes and a crashed worker cannot leave one held.

use std::io;
use std::num::NonZeroUsize;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicU8, Ordering};

use nix::sys::mman::{mmap, munmap, MapFlags, ProtFlags};

use crate::metrics::{RequestCounters, REQUEST_BUCKETS};

mod begun;
pub use begun::Begun;

/// How many workers can exist at once, across all generations.
pub const CAPACITY: usize = 1024;
const MESSAGE_LEN: usize = 440;

/// A worker's state as the worker reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum SlotState {
    /// Unused slot.
    Free = 0,
    /// Spawned; loading the app or waiting for its readiness check.
    Booting = 1,
    /// Accepting and serving.
    Ready = 2,
    /// Finishing in-flight requests; no longer accepting.
    Draining = 3,
    /// Could not boot; the slot's message says why.
    BootFailed = 4,
}

impl SlotState {
    fn from_u32(v: u32) -> SlotState {
        match v {
            1 => SlotState::Booting,
            2 => SlotState::Ready,
            3 => SlotState::Draining,
            4 => SlotState::BootFailed,
            _ => SlotState::Free,
        }
    }
}

/// One worker's shared record.
#[repr(C)]
pub struct Slot {
    state: AtomicU32,
    pid: AtomicU32,
    generation: AtomicU64,
    heartbeat_ms: AtomicU64,
    requests: AtomicU64,
    connections: AtomicU64,
    /// Requests being answered now (workers of earlier builds leave it 0).
    in_flight: AtomicU32,
    by_class: [AtomicU64; 5],
    duration_buckets: [AtomicU64; REQUEST_BUCKETS.len() + 1],
    duration_sum_us: AtomicU64,
    message_len: AtomicU32,
    message: [AtomicU8; MESSAGE_LEN],
}

const SLOT_SIZE: usize = std::mem::size_of::<Slot>();

/// Server-wide figures, on a cache line of their own.
#[repr(C, align(64))]
struct Header {
    /// Connections open in all workers.
    connections: AtomicU64,
    /// Workers accepting now (ready, not draining), kept by the master.
    accepting: AtomicU64,
    /// Set by the master when the server is stopping: readiness fails.
    stopping: AtomicU64,
    /// Connections closed for a client's slowness, by
    /// [`crate::metrics::ClientTimeout`], over the server's life.
    client_timeouts: [AtomicU64; 3],
    /// Workers handing a connection over right now (see
    /// [`crate::handoff`]); earlier builds leave it 0.
    handing_off: AtomicU64,
    /// Connections handed over, over the server's life.
    handed_over: AtomicU64,
}

// The layout is shared by processes of different builds: a master and the
// workers a reload starts from a newer binary on disk, and a master and the
// new image it becomes on SIGUSR2. A new field must not move an old one:
// the header keeps its cache line (new server-wide figures go in its spare
// bytes), and a slot keeps its size and order.
const _: () = assert!(std::mem::size_of::<Header>() == 64);
const _: () = assert!(
    SLOT_SIZE == 648,
    "the slot layout is shared across builds: append nothing to it"
);

/// The whole shared mapping.
#[repr(C)]
struct Table {
    header: Header,
    slots: [Slot; CAPACITY],
}

const TABLE_SIZE: usize = std::mem::size_of::<Table>();

/// Server-wide figures kept after the table: a second header, added once
/// the first was full. A memfd made by an earlier build's master is only
/// [`TABLE_SIZE`] bytes long; a process that maps one keeps none of these
/// figures (see [`Scoreboard::map`]). New figures go in its spare bytes.
#[repr(C, align(64))]
struct Extra {
    /// Handoffs by [`crate::metrics::HandoffOutcome`] other than `sent`,
    /// in its order from `sent_after_wait` ([`Header::handed_over`] counts
    /// every connection sent, with or without a wait, as every build
    /// does).
    handoffs: [AtomicU64; 3],
    /// Connections closed for waiting clients, by
    /// [`crate::metrics::MadeRoom`].
    made_room: [AtomicU64; 2],
    /// Requests answered 504 at `--request-timeout`.
    request_timeouts: AtomicU64,
    /// Requests shed (503) at `--max-queue-time`.
    shed: AtomicU64,
    _spare: [AtomicU64; 1],
}

const _: () = assert!(std::mem::size_of::<Extra>() == 64);

/// Where [`Extra`] ends: the memfd's length as builds before [`Begun`]
/// made it.
const EXTRA_END: usize = TABLE_SIZE + std::mem::size_of::<Extra>();

/// Where the [`Begun`] tables end: the memfd's length as builds before
/// [`Held`] made it.
const BEGUN_END: usize = EXTRA_END + CAPACITY * std::mem::size_of::<Begun>();

/// What a worker holds now, beside its slot: a region added once the slot
/// could grow no more (one per slot, after the [`Begun`] tables). New
/// per-worker figures go in its spare bytes.
#[repr(C, align(64))]
pub struct Held {
    /// Its idle HTTP/1.1 connections parked out of their tasks (counted
    /// in its connections too).
    parked: AtomicU64,
    _spare: [AtomicU64; 7],
}

const _: () = assert!(std::mem::size_of::<Held>() == 64);

impl Held {
    /// Counts connections parked (+) or resumed (-) by its worker.
    pub fn add_parked(&self, delta: i64) {
        if delta >= 0 {
            self.parked.fetch_add(delta as u64, Ordering::Relaxed);
        } else {
            let _ = self
                .parked
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                    Some(n.saturating_sub(delta.unsigned_abs()))
                });
        }
    }

    /// Its connections parked now.
    pub fn parked(&self) -> u64 {
        self.parked.load(Ordering::Relaxed)
    }

    /// Clears it for a new worker (by the master).
    pub fn clear(&self) {
        self.parked.store(0, Ordering::Relaxed);
    }
}

/// The memfd's length as this build makes it: the table, [`Extra`], each
/// slot's [`Begun`] requests, then each slot's [`Held`].
const FULL_SIZE: usize = BEGUN_END + CAPACITY * std::mem::size_of::<Held>();
const _: () = assert!(std::mem::size_of::<Begun>() % 64 == 0);
const _: () = assert!(TABLE_SIZE % 64 == 0);
const _: () = assert!(
    SLOT_SIZE <= 1024,
    "a scoreboard slot should stay within 1 KiB"
);

/// Milliseconds on the system-wide monotonic clock, comparable between
/// processes.
pub fn monotonic_ms() -> u64 {
    use nix::time::{clock_gettime, ClockId};
    clock_gettime(ClockId::CLOCK_MONOTONIC)
        .map(|t| (t.tv_sec() as u64) * 1000 + (t.tv_nsec() as u64) / 1_000_000)
        .unwrap_or(0)
}

impl Slot {
    /// Prepares the slot for a worker about to be spawned.
    pub fn claim(&self, generation: u64) {
        self.pid.store(0, Ordering::Relaxed);
        self.generation.store(generation, Ordering::Relaxed);
        self.heartbeat_ms.store(monotonic_ms(), Ordering::Relaxed);
        self.requests.store(0, Ordering::Relaxed);
        self.connections.store(0, Ordering::Relaxed);
        self.message_len.store(0, Ordering::Relaxed);
        self.in_flight.store(0, Ordering::Relaxed);
        for c in self.by_class.iter().chain(&self.duration_buckets) {
            c.store(0, Ordering::Relaxed);
        }
        self.duration_sum_us.store(0, Ordering::Relaxed);
        self.state
            .store(SlotState::Booting as u32, Ordering::Release);
    }

    /// Marks the slot unused (see [`Scoreboard::release`]).
    fn release(&self) {
        self.state.store(SlotState::Free as u32, Ordering::Release);
    }

    /// Records the worker's pid (by the master, after spawning).
    pub fn set_pid(&self, pid: u32) {
        self.pid.store(pid, Ordering::Relaxed);
    }

    /// The worker's pid, 0 until known.
    pub fn pid(&self) -> u32 {
        self.pid.load(Ordering::Relaxed)
    }

    /// The generation the slot was claimed for.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Relaxed)
    }

    /// The worker's reported state.
    pub fn state(&self) -> SlotState {
        SlotState::from_u32(self.state.load(Ordering::Acquire))
    }

    /// Reports a new state (by the worker).
    pub fn set_state(&self, state: SlotState) {
        self.state.store(state as u32, Ordering::Release);
    }

    /// Records that the worker's runtime is making progress.
    pub fn beat(&self) {
        self.heartbeat_ms.store(monotonic_ms(), Ordering::Relaxed);
    }

    /// When the worker last reported progress, in [`monotonic_ms`].
    pub fn heartbeat_ms(&self) -> u64 {
        self.heartbeat_ms.load(Ordering::Relaxed)
    }

    /// Counts one served request and returns the new total.
    pub fn add_request(&self) -> u64 {
        self.requests.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// A request is being answered: counts it, and one more in flight
    /// until [`Slot::end_request`]; returns the new total.
    pub fn begin_request(&self) -> u64 {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        self.add_request()
    }

    /// A request begun with [`Slot::begin_request`] is over, however it
    /// ended.
    pub fn end_request(&self) {
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
    }

    /// Requests being answered now.
    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Requests served so far.
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    /// Counts a connection opened (+1) or closed (-1).
    fn add_connections(&self, delta: i64) {
        if delta >= 0 {
            self.connections.fetch_add(delta as u64, Ordering::Relaxed);
        } else {
            self.connections
                .fetch_sub(delta.unsigned_abs(), Ordering::Relaxed);
        }
    }

    /// Counts one answered request by status and duration, for metrics.
    pub fn record(&self, status: u16, elapsed: std::time::Duration) {
        let class = (status / 100).clamp(1, 5) as usize - 1;
        self.by_class[class].fetch_add(1, Ordering::Relaxed);
        let bucket = RequestCounters::bucket(elapsed.as_secs_f64());
        self.duration_buckets[bucket].fetch_add(1, Ordering::Relaxed);
        self.duration_sum_us
            .fetch_add(elapsed.as_micros() as u64, Ordering::Relaxed);
    }

    /// What [`Slot::record`] has counted.
    pub fn counters(&self) -> RequestCounters {
        let mut c = RequestCounters::default();
        for (a, b) in c.by_class.iter_mut().zip(&self.by_class) {
            *a = b.load(Ordering::Relaxed);
        }
        for (a, b) in c.buckets.iter_mut().zip(&self.duration_buckets) {
            *a = b.load(Ordering::Relaxed);
        }
        c.sum_us = self.duration_sum_us.load(Ordering::Relaxed);
        c
    }

    /// Connections open now.
    pub fn connections(&self) -> u64 {
        self.connections.load(Ordering::Relaxed)
    }

    /// Stores a short text (why the worker failed to boot), truncated to
    /// fit on a character boundary.
    pub fn set_message(&self, text: &str) {
        let mut end = text.len().min(MESSAGE_LEN);
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        for (cell, byte) in self.message.iter().zip(&text.as_bytes()[..end]) {
            cell.store(*byte, Ordering::Relaxed);
        }
        self.message_len.store(end as u32, Ordering::Release);
    }

    /// The stored text, empty if none.
    pub fn message(&self) -> String {
        let len = (self.message_len.load(Ordering::Acquire) as usize).min(MESSAGE_LEN);
        let bytes: Vec<u8> = self.message[..len]
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .collect();
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

/// The shared table of slots.
pub struct Scoreboard {
    base: NonNull<Table>,
    fd: OwnedFd,
    /// How many bytes are mapped: [`FULL_SIZE`], or less ([`BEGUN_END`],
    /// [`EXTRA_END`], [`TABLE_SIZE`]) for a memfd an earlier build made.
    len: usize,
}

// SAFETY: the mapping is only ever accessed through atomics, so sharing it
// between threads (and processes) is sound.
unsafe impl Send for Scoreboard {}
// SAFETY: as above.
unsafe impl Sync for Scoreboard {}

impl Scoreboard {
    /// Creates a zeroed scoreboard (by the master).
    pub fn create() -> io::Result<Scoreboard> {
        use nix::sys::memfd::{memfd_create, MemFdCreateFlag};
        let fd = memfd_create(c"zdr-scoreboard", MemFdCreateFlag::MFD_CLOEXEC)?;
        nix::unistd::ftruncate(&fd, FULL_SIZE as i64)?;
        Self::map(fd)
    }

    /// Maps a scoreboard from a descriptor inherited from the master.
    ///
    /// # Safety
    ///
    /// `fd` must be an open descriptor that this process owns and that
    /// nothing else closes or adopts: it is closed when the result is
    /// dropped.
    pub(crate) unsafe fn attach(fd: RawFd) -> io::Result<Scoreboard> {
        // SAFETY: the caller hands over a descriptor this process owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        crate::sys::set_cloexec(fd.as_raw_fd(), true)?;
        Self::map(fd)
    }

    fn map(fd: OwnedFd) -> io::Result<Scoreboard> {
        // A memfd an earlier build's master made holds the table alone.
        let size = nix::sys::stat::fstat(fd.as_raw_fd())?.st_size;
        let mapped = if usize::try_from(size).is_ok_and(|n| n >= FULL_SIZE) {
            FULL_SIZE
        } else if usize::try_from(size).is_ok_and(|n| n >= BEGUN_END) {
            BEGUN_END
        } else if usize::try_from(size).is_ok_and(|n| n >= EXTRA_END) {
            EXTRA_END
        } else if usize::try_from(size).is_ok_and(|n| n >= TABLE_SIZE) {
            TABLE_SIZE
        } else {
            return Err(io::Error::other("the scoreboard is too small"));
        };
        let len = NonZeroUsize::new(mapped).ok_or(io::ErrorKind::InvalidInput)?;
        // SAFETY: a fresh shared mapping of a memfd sized above; no other
        // mapping in this process aliases it, and it is only read and
        // written through the atomics of `Table`, whose all-zero bit
        // pattern is valid.
        let ptr = unsafe {
            mmap(
                None,
                len,
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                MapFlags::MAP_SHARED,
                fd.as_fd(),
                0,
            )?
        };
        Ok(Scoreboard {
            base: ptr.cast(),
            fd,
            len: mapped,
        })
    }

    /// The descriptor to pass to workers.
    pub fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Slot `index`; panics if out of range (indices come from the master).
    pub fn slot(&self, index: usize) -> &Slot {
        assert!(index < CAPACITY, "scoreboard slot {index} out of range");
        &self.table().slots[index]
    }

    fn table(&self) -> &Table {
        // SAFETY: the mapping is TABLE_SIZE bytes, lives as long as `self`,
        // and is only accessed through atomics.
        unsafe { self.base.as_ref() }
    }

    /// The figures after the table, when the memfd has them.
    fn extra(&self) -> Option<&Extra> {
        if self.len < EXTRA_END {
            return None;
        }
        // SAFETY: the mapping is EXTRA_END bytes (checked above), and
        // `Extra` starts right after the table at a 64-byte boundary.
        Some(unsafe { self.at(TABLE_SIZE) })
    }

    /// The `T` at byte `offset` of the mapping.
    ///
    /// # Safety
    ///
    /// The mapping must hold a whole `T` at `offset`, aligned for it. (It
    /// lives as long as `self` and is only accessed through atomics, whose
    /// all-zero bit pattern is valid.)
    unsafe fn at<T>(&self, offset: usize) -> &T {
        // SAFETY: the caller vouches for the range and the alignment; the
        // rest holds for every part of the mapping.
        unsafe { &*self.base.as_ptr().cast::<u8>().add(offset).cast::<T>() }
    }

    /// The requests in flight that slot `index`'s worker names, when the
    /// memfd has room for them (see [`Begun`]).
    pub fn begun(&self, index: usize) -> Option<&Begun> {
        if self.len < BEGUN_END || index >= CAPACITY {
            return None;
        }
        // SAFETY: the mapping is at least BEGUN_END bytes (checked above);
        // the `Begun` tables start right after `Extra` at a 64-byte
        // boundary, one per slot, and `index` is in range.
        Some(unsafe { self.at(EXTRA_END + index * std::mem::size_of::<Begun>()) })
    }

    /// What slot `index`'s worker holds now, when the memfd has room for
    /// it (see [`Held`]).
    pub fn held(&self, index: usize) -> Option<&Held> {
        if self.len < FULL_SIZE || index >= CAPACITY {
            return None;
        }
        // SAFETY: the mapping is FULL_SIZE bytes (checked above); the
        // `Held` records start right after the `Begun` tables at a 64-byte
        // boundary, one per slot, and `index` is in range.
        Some(unsafe { self.at(BEGUN_END + index * std::mem::size_of::<Held>()) })
    }

    /// Counts a handoff's outcome (by a worker).
    pub(crate) fn count_handoff(&self, outcome: crate::metrics::HandoffOutcome) {
        use crate::metrics::HandoffOutcome;
        if matches!(
            outcome,
            HandoffOutcome::Sent | HandoffOutcome::SentAfterWait
        ) {
            self.count_handed_over();
        }
        if outcome != HandoffOutcome::Sent {
            if let Some(extra) = self.extra() {
                extra.handoffs[outcome as usize - 1].fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Counts a connection closed for waiting clients (by a worker).
    pub(crate) fn count_made_room(&self, how: crate::metrics::MadeRoom) {
        if let Some(extra) = self.extra() {
            extra.made_room[how as usize].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Counts a request answered 504 at `--request-timeout` (by a worker).
    pub(crate) fn count_request_timeout(&self) {
        if let Some(extra) = self.extra() {
            extra.request_timeouts.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Counts a request shed at `--max-queue-time` (by a worker).
    pub(crate) fn count_shed(&self) {
        if let Some(extra) = self.extra() {
            extra.shed.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Requests shed at `--max-queue-time`, server-wide.
    pub(crate) fn shed(&self) -> u64 {
        self.extra().map_or(0, |e| e.shed.load(Ordering::Relaxed))
    }

    /// Requests answered 504 at `--request-timeout`, server-wide.
    pub(crate) fn request_timeouts(&self) -> u64 {
        self.extra()
            .map_or(0, |e| e.request_timeouts.load(Ordering::Relaxed))
    }

    /// Connections closed for waiting clients, by
    /// [`crate::metrics::MadeRoom`].
    pub(crate) fn made_room(&self) -> [u64; 2] {
        self.extra()
            .map(|e| [0, 1].map(|i| e.made_room[i].load(Ordering::Relaxed)))
            .unwrap_or_default()
    }

    /// Handoffs so far, by [`crate::metrics::HandoffOutcome`] (in its
    /// order).
    pub(crate) fn handoffs(&self) -> [u64; 4] {
        let more = self
            .extra()
            .map(|e| [0, 1, 2].map(|i| e.handoffs[i].load(Ordering::Relaxed)))
            .unwrap_or_default();
        [
            self.handed_over().saturating_sub(more[0]),
            more[0],
            more[1],
            more[2],
        ]
    }

    /// Counts a connection opened (+1) or closed (-1) by the worker in
    /// `slot`, in its slot and in the server-wide total.
    pub fn add_connections(&self, slot: usize, delta: i64) {
        self.slot(slot).add_connections(delta);
        let total = &self.table().header.connections;
        if delta >= 0 {
            total.fetch_add(delta as u64, Ordering::Relaxed);
        } else {
            total.fetch_sub(delta.unsigned_abs(), Ordering::Relaxed);
        }
    }

    /// Frees the slot of a worker that exited (by the master): the
    /// connections it still counted died with it, so they leave the
    /// server-wide total too.
    pub fn release(&self, slot: usize) {
        if let Some(held) = self.held(slot) {
            held.clear();
        }
        let slot = self.slot(slot);
        let left = slot.connections.swap(0, Ordering::Relaxed);
        let total = &self.table().header.connections;
        let _ = total.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
            Some(n.saturating_sub(left))
        });
        slot.release();
    }

    /// Counts a connection closed for a client's slowness (by a worker).
    pub fn count_timeout(&self, kind: crate::metrics::ClientTimeout) {
        self.table().header.client_timeouts[kind as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Connections closed for a client's slowness, by kind, so far.
    pub fn client_timeouts(&self) -> [u64; 3] {
        let counts = &self.table().header.client_timeouts;
        [0, 1, 2].map(|i| counts[i].load(Ordering::Relaxed))
    }

    /// Marks the server as stopping (by the master): every worker's
    /// readiness probe fails from now on.
    pub fn set_stopping(&self) {
        self.table().header.stopping.store(1, Ordering::Release);
    }

    /// Connections open in all workers.
    pub fn total_connections(&self) -> u64 {
        self.table().header.connections.load(Ordering::Relaxed)
    }

    /// Whether the server is stopping.
    pub fn stopping(&self) -> bool {
        self.table().header.stopping.load(Ordering::Acquire) == 1
    }

    /// Records how many workers accept now (by the master).
    pub fn set_accepting(&self, workers: usize) {
        self.table()
            .header
            .accepting
            .store(workers as u64, Ordering::Relaxed);
    }

    /// Counts this worker as handing a connection over; the fence orders
    /// the count before what the caller reads next (a sibling's state).
    pub fn begin_handoff(&self) {
        self.table()
            .header
            .handing_off
            .fetch_add(1, Ordering::SeqCst);
        std::sync::atomic::fence(Ordering::SeqCst);
    }

    /// Ends what [`Scoreboard::begin_handoff`] began.
    pub fn end_handoff(&self) {
        let _ =
            self.table()
                .header
                .handing_off
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                    Some(n.saturating_sub(1))
                });
    }

    /// Counts a connection handed to a sibling (by a worker).
    pub fn count_handed_over(&self) {
        self.table()
            .header
            .handed_over
            .fetch_add(1, Ordering::Relaxed);
    }

    /// Connections handed to a sibling so far.
    pub fn handed_over(&self) -> u64 {
        self.table().header.handed_over.load(Ordering::Relaxed)
    }

    /// How many workers are handing a connection over right now.
    pub fn handoffs_in_progress(&self) -> u64 {
        self.table().header.handing_off.load(Ordering::SeqCst)
    }

    /// Whether a ready worker other than the one in `slot` holds fewer than
    /// `cap` connections (it will accept a waiting client).
    pub(crate) fn ready_sibling_below(&self, slot: usize, cap: usize) -> bool {
        self.table().slots.iter().enumerate().any(|(i, s)| {
            i != slot && s.state() == SlotState::Ready && (s.connections() as usize) < cap
        })
    }

    /// Whether any worker is draining (leaving, its connections going to
    /// the others).
    pub(crate) fn any_draining(&self) -> bool {
        self.table()
            .slots
            .iter()
            .any(|s| s.state() == SlotState::Draining)
    }

    /// Every ready worker's slot, pid and request count, for balance.
    pub(crate) fn ready_samples(&self) -> Vec<crate::balance::Sample> {
        self.table()
            .slots
            .iter()
            .enumerate()
            .filter(|(_, s)| s.state() == SlotState::Ready)
            .map(|(slot, s)| crate::balance::Sample {
                slot,
                pid: s.pid(),
                requests: s.requests(),
                generation: s.generation(),
            })
            .collect()
    }

    /// Whether a worker other than the one in `slot`, of any generation,
    /// is ready (accepting, so taking handed-over connections too).
    pub fn has_ready_sibling(&self, slot: usize) -> bool {
        self.table()
            .slots
            .iter()
            .enumerate()
            .any(|(i, s)| i != slot && s.state() == SlotState::Ready)
    }

    /// Whether the worker in `slot` holds more than its share of the
    /// server's connections: more than the average over accepting workers,
    /// plus one. Such a worker leaves new connections to the others.
    pub fn over_share(&self, slot: usize) -> bool {
        let header = &self.table().header;
        let workers = header.accepting.load(Ordering::Relaxed);
        if workers < 2 {
            return false;
        }
        let total = header.connections.load(Ordering::Relaxed);
        let mine = self.slot(slot).connections();
        mine * workers > total + workers
    }

    /// The first free slot, if any.
    pub fn free_slot(&self) -> Option<usize> {
        (0..CAPACITY).find(|&i| self.slot(i).state() == SlotState::Free)
    }
}

impl Drop for Scoreboard {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `map`; no reference
        // into it outlives `self`.
        unsafe {
            let _ = munmap(self.base.cast(), self.len);
        }
    }
}

/// The pipe a worker rings to wake the master: any byte means "look at the
/// scoreboard". Non-blocking on both ends; a full pipe already means the
/// master will look.
pub struct Doorbell {
    fd: OwnedFd,
}

impl Doorbell {
    /// Creates the pipe: `(read end for the master, bell for the workers)`.
    pub fn pair() -> io::Result<(OwnedFd, Doorbell)> {
        use nix::fcntl::OFlag;
        let (r, w) = nix::unistd::pipe2(OFlag::O_CLOEXEC | OFlag::O_NONBLOCK)?;
        Ok((r, Doorbell { fd: w }))
    }

    /// Rebuilds the bell from a descriptor inherited from the master.
    ///
    /// # Safety
    ///
    /// `fd` must be an open descriptor that this process owns and that
    /// nothing else closes or adopts: it is closed when the result is
    /// dropped.
    pub(crate) unsafe fn from_inherited(fd: RawFd) -> io::Result<Doorbell> {
        // SAFETY: the caller hands over a descriptor this process owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        crate::sys::set_cloexec(fd.as_raw_fd(), true)?;
        Ok(Doorbell { fd })
    }

    /// Wakes the master.
    pub fn ring(&self) {
        let _ = nix::unistd::write(&self.fd, &[1]);
    }

    /// The descriptor to pass to workers.
    pub fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slot_is_small_and_round_trips() {
        let board = Scoreboard::create().unwrap();
        assert_eq!(board.free_slot(), Some(0));
        let slot = board.slot(0);
        slot.claim(7);
        slot.set_pid(42);
        assert_eq!(board.free_slot(), Some(1));
        assert_eq!(
            (slot.state(), slot.generation(), slot.pid()),
            (SlotState::Booting, 7, 42)
        );
        assert_eq!(slot.add_request(), 1);
        slot.set_message("ünïcode is cut on a boundary");
        assert_eq!(slot.message(), "ünïcode is cut on a boundary");
        slot.set_message(&"é".repeat(400));
        assert_eq!(slot.message().chars().count(), MESSAGE_LEN / 2);
        board.release(0);
        assert_eq!(board.free_slot(), Some(0));
    }

    #[test]
    fn a_dead_workers_connections_leave_the_total() {
        let board = Scoreboard::create().unwrap();
        board.slot(0).claim(1);
        board.slot(1).claim(1);
        board.add_connections(0, 3);
        board.add_connections(1, 2);
        // Worker 0 is killed with its three connections open.
        board.release(0);
        assert_eq!(board.total_connections(), 2);
        board.slot(0).claim(2);
        assert_eq!(board.slot(0).connections(), 0);
        board.add_connections(1, -2);
        assert_eq!(board.total_connections(), 0);
    }

    #[test]
    fn a_dead_workers_parked_connections_are_forgotten() {
        let board = Scoreboard::create().unwrap();
        board.slot(4).claim(1);
        let held = board.held(4).expect("this build's memfd has room");
        held.add_parked(5);
        held.add_parked(-2);
        assert_eq!(held.parked(), 3);
        // More resumed than counted (a count begun before a restart)
        // stays at zero rather than wrapping.
        held.add_parked(-9);
        assert_eq!(held.parked(), 0);
        held.add_parked(4);
        board.release(4);
        assert_eq!(board.held(4).map(Held::parked), Some(0));
    }

    #[test]
    fn a_memfd_an_earlier_build_made_maps_without_what_it_lacks() {
        use nix::sys::memfd::{memfd_create, MemFdCreateFlag};
        for (len, extra, begun, held) in [
            (TABLE_SIZE, false, false, false),
            (EXTRA_END, true, false, false),
            (BEGUN_END, true, true, false),
            (FULL_SIZE, true, true, true),
        ] {
            let fd = memfd_create(c"zdr-test", MemFdCreateFlag::MFD_CLOEXEC).unwrap();
            nix::unistd::ftruncate(&fd, len as i64).unwrap();
            let board = Scoreboard::map(fd).unwrap();
            assert_eq!(board.extra().is_some(), extra, "{len} bytes");
            assert_eq!(board.begun(3).is_some(), begun, "{len} bytes");
            assert_eq!(board.held(3).is_some(), held, "{len} bytes");
            // What a build without it does is count nothing, quietly.
            board.count_shed();
            board.release(3);
        }
    }

    #[test]
    fn a_worker_over_its_share_is_told_so() {
        let board = Scoreboard::create().unwrap();
        board.set_accepting(2);
        board.add_connections(0, 3);
        board.add_connections(1, 1);
        // 4 connections over 2 workers: 3 is more than the average plus one.
        assert!(!board.over_share(0));
        board.add_connections(0, 1);
        assert!(board.over_share(0));
        assert!(!board.over_share(1));
        board.set_accepting(1);
        assert!(!board.over_share(0), "a lone worker always accepts");
    }

    #[test]
    fn a_ready_sibling_below_the_cap_and_a_draining_one_are_told_apart() {
        let board = Scoreboard::create().unwrap();
        for i in 0..3 {
            board.slot(i).claim(1);
        }
        board.slot(0).set_state(SlotState::Ready);
        board.slot(1).set_state(SlotState::Ready);
        board.slot(2).set_state(SlotState::Draining);
        board.add_connections(0, 10);
        board.add_connections(1, 10);
        assert!(!board.ready_sibling_below(0, 10), "the sibling is full");
        assert!(board.ready_sibling_below(0, 11));
        board.add_connections(1, -1);
        assert!(board.ready_sibling_below(0, 10));
        assert!(!board.ready_sibling_below(1, 10), "itself does not count");
        assert!(board.any_draining());
        board.slot(2).set_state(SlotState::Ready);
        assert!(!board.any_draining());
        assert!(board.ready_sibling_below(1, 10), "an empty ready worker");
        // Counts and the least loaded of the ready.
        board.slot(2).begin_request();
        let samples = board.ready_samples();
        assert_eq!(samples.len(), 3);
        assert_eq!(samples[2].requests, 1);
    }

    #[test]
    fn shared_across_fork_like_mappings() {
        let board = Scoreboard::create().unwrap();
        let dup = nix::unistd::dup(board.raw_fd()).unwrap();
        // SAFETY: `dup` is a fresh duplicate owned by nothing else.
        let other = unsafe { Scoreboard::attach(dup) }.unwrap();
        board.slot(3).claim(1);
        other.slot(3).set_state(SlotState::Ready);
        other.slot(3).add_request();
        assert_eq!(board.slot(3).state(), SlotState::Ready);
        assert_eq!(board.slot(3).requests(), 1);
    }
}
