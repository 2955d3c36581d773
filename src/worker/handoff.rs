//! The worker's side of connection handoff: receiving connections other
//! workers hand over, balancing (giving away idle keep-alive connections
//! when this worker is busier than the others), and reclaiming what was
//! handed to a worker that is leaving.

use super::accept::{permit_past_cap, start_serving, wait_for_share, Backoff, Stream};
use super::stop::finish;
use crate::handoff::{Handed, Queue, SocketKind};
use crate::http::{self, Peer, Shared};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};

/// How long the first connection in the handoff queue may stay first
/// before a worker that is leaving takes the queue back: a ready worker
/// takes one within microseconds, and one a busy machine holds back for a
/// while should still get it.
pub(super) const RECLAIM_AFTER: Duration = Duration::from_secs(1);

/// How often a leaving worker with nothing left to serve looks at the
/// queue at first, while it waits for it to empty: ready workers take a
/// handed connection within a millisecond or two, and a worker that
/// lingers holds up the next recycling (one at a time, server-wide). The
/// runtime's timers tick in milliseconds, so these waits block its thread,
/// which has nothing else to run.
pub(super) const QUICK_LOOK: Duration = Duration::from_micros(200);

/// How many quick looks before the leaving worker looks every
/// [`RECLAIM_LOOK`] instead.
pub(super) const QUICK_LOOKS: u32 = 50;

/// How often a leaving worker looks at the queue after its quick looks,
/// or while it still serves connections.
pub(super) const RECLAIM_LOOK: Duration = Duration::from_millis(10);

/// Once its own connections are done, a leaving worker takes back what is
/// still queued if nobody takes it (the ready workers may all be ones that
/// serve no HTTP themselves, as in socket mode, or all at their cap), and
/// serves it as a draining worker does, not handing it on: no connection
/// is left waiting in the queue. While the ready workers take (the first
/// in the queue changes), it leaves the queue to them: what it took back
/// would stay with a worker that is leaving, and a client that asks only
/// after its graceful timeout would find it closed. Returns the exit code
/// of that wait.
pub(super) async fn reclaim(
    queue: &Queue,
    shared: &Arc<Shared>,
    drain: &watch::Receiver<bool>,
    permits: &Arc<Semaphore>,
    capacity: usize,
    left: Duration,
) -> i32 {
    let mut extra = 0;
    let deadline = tokio::time::Instant::now() + left;
    // The first connection queued, and since when it has been first.
    let mut first = None;
    let mut since = tokio::time::Instant::now();
    let mut quick = 0;
    loop {
        let now = tokio::time::Instant::now();
        let head = queue.head();
        if head.is_none() || now >= deadline {
            break;
        }
        if head != first {
            first = head;
            since = now;
        } else if now - since >= RECLAIM_AFTER {
            // Nobody took anything for a while: nobody will.
            while let Ok(Some(h)) = queue.try_recv() {
                extra += serve_handed(h, shared, drain, permits, Taken::Back);
            }
            first = None;
            continue;
        }
        if quick < QUICK_LOOKS && extra == 0 && permits.available_permits() >= capacity {
            quick += 1;
            std::thread::sleep(QUICK_LOOK);
        } else {
            tokio::time::sleep_until((now + RECLAIM_LOOK).min(deadline)).await;
        }
    }
    if extra == 0 && permits.available_permits() >= capacity {
        return 0;
    }
    finish(
        capacity + extra,
        permits,
        deadline.saturating_duration_since(tokio::time::Instant::now()),
    )
    .await
}

/// Takes the connections leaving siblings hand over until this worker
/// drains; then, once no sibling is midway through handing one over,
/// takes what is still queued (see [`crate::handoff`]). Returns how many
/// permits it added past the worker's cap.
pub(super) async fn receive_handoffs(
    queue: Arc<Queue>,
    shared: Arc<Shared>,
    mut drain: watch::Receiver<bool>,
    permits: Arc<Semaphore>,
) -> usize {
    let mut extra = 0;
    let mut backoff = Backoff::default();
    loop {
        let ready = tokio::select! {
            biased;
            _ = drain.wait_for(|d| *d) => break,
            r = queue.readable() => r,
        };
        // Within the worker's connection cap, as for an accept (and only
        // once a connection waits, so that no permit is parked here): at
        // the cap, handed connections wait in the queue for another worker.
        let taken = match ready {
            Ok(()) => {
                let defer = if shared.board.any_draining() {
                    // A leaving worker's connections: taken at once.
                    None
                } else if shared.placement.giving() {
                    Some(GIVER_DEFERS)
                } else {
                    match shared.placement.rank() {
                        0 => None,
                        rank => Some(RANK_DEFERS * rank.min(10) as u32),
                    }
                };
                if let Some(defer) = defer {
                    // Leaves it a moment to a sibling less loaded.
                    tokio::select! {
                        biased;
                        _ = drain.wait_for(|d| *d) => break,
                        _ = tokio::time::sleep(defer) => {}
                    }
                    if queue.is_empty() {
                        // A sibling took it.
                        queue.settle();
                        continue;
                    }
                }
                if !wait_for_share(&shared, &mut drain).await {
                    break;
                }
                let permit = tokio::select! {
                    biased;
                    _ = drain.wait_for(|d| *d) => break,
                    p = Arc::clone(&permits).acquire_owned() => match p {
                        Ok(p) => p,
                        Err(_) => break,
                    },
                };
                queue.take().map(|h| h.map(|h| (h, permit)))
            }
            Err(e) => Err(e),
        };
        match taken {
            Ok(Some((h, permit))) => {
                extra += serve_handed(h, &shared, &drain, &permits, Some(permit));
            }
            // Another worker took it.
            Ok(None) => {}
            Err(e) => {
                backoff
                    .after(format!("cannot take a handed-over connection: {e}"))
                    .await
            }
        }
    }
    // The slot said draining before the drain signal; the fence orders that
    // before the count is read.
    std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
    let deadline = tokio::time::Instant::now() + HANDOFF_SETTLE;
    while shared.board.handoffs_in_progress() > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    while let Ok(Some(h)) = queue.try_recv() {
        extra += serve_handed(h, &shared, &drain, &permits, None);
    }
    extra
}

/// Weighs this worker's load against its ready siblings' once a
/// [`crate::balance::TICK`] and asks its connections to move when it
/// carries more than its share (see [`crate::balance`]), until it drains.
pub(super) async fn balance(shared: Arc<Shared>, mut drain: watch::Receiver<bool>) {
    let mut balancer = crate::balance::Balancer::default();
    let mut tick = tokio::time::interval(crate::balance::TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last = tokio::time::Instant::now();
    loop {
        tokio::select! {
            biased;
            _ = drain.wait_for(|d| *d) => break,
            _ = tick.tick() => {}
        }
        let now = tokio::time::Instant::now();
        if shared.board.any_draining() {
            // A worker is leaving: its connections come first, taken by
            // whoever is quickest, and the rates are not this one's to
            // judge by. Balance starts over once it has gone.
            balancer = crate::balance::Balancer::default();
            shared.placement.set_rank(0);
            shared.placement.give(0.0, 0.0);
            last = now;
            continue;
        }
        let give = balancer.tick(
            shared.slot_index,
            &shared.board.ready_samples(),
            now - last,
            shared.slot.connections() as usize,
        );
        last = now;
        if give > 0.0 {
            tracing::debug!(
                "worker {}: {give:.0} requests a second above the mean; asking connections to move",
                std::process::id()
            );
        }
        shared.placement.set_rank(balancer.rank());
        shared.placement.give(give, balancer.room());
    }
    shared.placement.set_rank(0);
    shared.placement.give(0.0, 0.0);
}

/// How long a worker that gives connections away for balance leaves a
/// handed-over one in the queue for a sibling before it takes it itself
/// (should every other ready worker be giving too, or serve no HTTP).
pub(super) const GIVER_DEFERS: Duration = Duration::from_millis(100);

/// How long a worker leaves a handed-over connection in the queue for
/// each ready sibling less loaded than itself (see [`crate::balance`]).
pub(super) const RANK_DEFERS: Duration = Duration::from_millis(10);

/// The longest a draining worker waits for siblings midway through a
/// handoff (each takes microseconds; a sibling stopped meanwhile by the
/// machine does not hold it).
pub(super) const HANDOFF_SETTLE: Duration = Duration::from_secs(1);

/// How a handed-over connection comes to this worker.
pub(super) enum Taken {
    /// Within its cap, with this permit.
    Within(OwnedSemaphorePermit),
    /// Past its cap if need be (a draining worker's last look at the
    /// queue: it accepts nothing more); it may still hand it on.
    Draining,
    /// Taken back once its own connections were done, because nobody else
    /// took it: served here to its end, not handed on.
    Back,
}

/// Serves a connection another worker handed over; returns 1 if it took a
/// permit past the worker's cap.
impl From<Option<OwnedSemaphorePermit>> for Taken {
    fn from(permit: Option<OwnedSemaphorePermit>) -> Taken {
        permit.map_or(Taken::Draining, Taken::Within)
    }
}

pub(super) fn serve_handed(
    handed: Handed,
    shared: &Arc<Shared>,
    drain: &watch::Receiver<bool>,
    permits: &Arc<Semaphore>,
    taken: impl Into<Taken>,
) -> usize {
    let taken = taken.into();
    let hand_on = !matches!(taken, Taken::Back);
    let (permit, extra) = match taken {
        Taken::Within(permit) => (permit, 0),
        Taken::Draining | Taken::Back => match permit_past_cap(permits) {
            (Some(permit), added) => (permit, added),
            (None, added) => return added,
        },
    };
    let stream = match handed.kind {
        SocketKind::Tcp => {
            let std = std::net::TcpStream::from(handed.socket);
            let ip = std.peer_addr().ok().map(|a| a.ip());
            std.set_nonblocking(true)
                .and_then(|()| tokio::net::TcpStream::from_std(std))
                .map(|s| (Stream::Tcp(s), ip))
        }
        SocketKind::Unix => {
            let std = std::os::unix::net::UnixStream::from(handed.socket);
            std.set_nonblocking(true)
                .and_then(|()| tokio::net::UnixStream::from_std(std))
                .map(|s| (Stream::Unix(s), None))
        }
    };
    match stream {
        Ok((stream, ip)) => start_serving(
            stream,
            Peer { ip, scheme: "http" },
            permit,
            shared,
            drain,
            http::Origin::Handed {
                carried: handed.carried,
                age: handed.age,
                hand_on,
            },
        ),
        Err(e) => tracing::debug!("cannot serve a handed-over connection: {e}"),
    }
    extra
}
