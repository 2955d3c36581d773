//! Accepting: the worker's accept loop on the inherited listeners (until
//! it drains), the connection cap, and the start of each connection's
//! service (TLS or not).

use crate::http::io::Tracked;
use crate::http::{self, Peer, Shared};
use crate::listener::WorkerListener;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};

/// How long, and how many times at most, a worker over its share of
/// connections waits before accepting anyway.
pub(super) const BALANCE_WAIT: Duration = Duration::from_micros(250);
pub(super) const BALANCE_WAITS: u32 = 20;

/// Accepts on one listener until the worker drains; returns the listener.
pub(super) async fn accept_loop(
    listener: WorkerListener,
    shared: Arc<Shared>,
    mut drain: watch::Receiver<bool>,
    permits: Arc<Semaphore>,
    capacity: usize,
) -> WorkerListener {
    accept_until_drained(&listener, &shared, &mut drain, &permits, capacity).await;
    listener
}

/// Accepts connections until the worker drains.
pub(super) async fn accept_until_drained(
    listener: &WorkerListener,
    shared: &Arc<Shared>,
    drain: &mut watch::Receiver<bool>,
    permits: &Arc<Semaphore>,
    capacity: usize,
) {
    let mut backoff = Backoff::default();
    loop {
        // At the cap, a look at the queue every moment: clients waiting
        // there, with no ready sibling below the cap to accept them, make
        // the worker crowded (see `http::placement`).
        // Below the cap, a permit is taken at once: no timer, no clock read
        // on the accept path.
        let permit = match Arc::clone(permits).try_acquire_owned() {
            Ok(p) => p,
            Err(tokio::sync::TryAcquireError::Closed) => return,
            Err(tokio::sync::TryAcquireError::NoPermits) => loop {
                tokio::select! {
                    biased;
                    _ = drain.wait_for(|d| *d) => return,
                    p = Arc::clone(permits).acquire_owned() => break match p {
                        Ok(p) => p,
                        Err(_) => return,
                    },
                    _ = tokio::time::sleep(crate::http::placement::CHECK) => {
                        shared.placement.looked(
                            listener.has_waiting()
                                && !shared.board.ready_sibling_below(shared.slot_index, capacity),
                        );
                    }
                }
            },
        };
        if shared.placement.is_crowded() && permits.available_permits() > 0 {
            // Room again (with the permit just taken, and more).
            shared.placement.looked(false);
        }
        if !wait_for_share(shared, drain).await {
            return;
        }
        let accepted = tokio::select! {
            biased;
            _ = drain.wait_for(|d| *d) => return,
            a = accept(listener) => a,
        };
        match accepted {
            Ok((stream, peer)) => {
                start_serving(stream, peer, permit, shared, drain, accepted_now())
            }
            Err(e) if is_transient(&e) => {}
            // Out of descriptors or memory: the other workers take the queue.
            Err(e) => backoff.after(format!("accept failed: {e}")).await,
        }
    }
}

/// Holding more than its share of the server's connections, a worker
/// gives the others a moment to take the next one (accepted or handed
/// over): processes sharing one queue otherwise pile work on whichever is
/// busiest. Returns false if the worker started draining meanwhile.
///
/// An overloaded worker does not wait: its runtime is busy, so a moment's
/// timer would last until its current request is done, while the clients
/// it takes are the ones it answers first (see [`http::shed`]).
pub(super) async fn wait_for_share(shared: &Shared, drain: &mut watch::Receiver<bool>) -> bool {
    if shared.shed.as_ref().is_some_and(|s| s.overloaded()) {
        return true;
    }
    for _ in 0..BALANCE_WAITS {
        if !shared.board.over_share(shared.slot_index) {
            break;
        }
        tokio::select! {
            biased;
            _ = drain.wait_for(|d| *d) => return false,
            _ = tokio::time::sleep(BALANCE_WAIT) => {}
        }
    }
    true
}

/// Backing off after a failure that retrying at once would only repeat (out
/// of descriptors or memory): a pause, and an error said once every ten
/// seconds at most.
#[derive(Default)]
pub(super) struct Backoff {
    last_said: Option<std::time::Instant>,
}

impl Backoff {
    /// Says `what` (unless said lately) and returns the pause to await.
    pub(super) fn after(&mut self, what: String) -> tokio::time::Sleep {
        if self
            .last_said
            .is_none_or(|t| t.elapsed() >= Duration::from_secs(10))
        {
            tracing::error!(
                event = crate::logging::LogEvent::WorkerTrouble.name(),
                "worker {}: {what}; retrying every 100 ms",
                std::process::id()
            );
            self.last_said = Some(std::time::Instant::now());
        }
        tokio::time::sleep(Duration::from_millis(100))
    }
}

/// The origin of a connection accepted now.
pub(super) fn accepted_now() -> http::Origin {
    http::Origin::Accepted {
        at_ns: crate::sys::monotonic_ns(),
    }
}

/// Serves a connection in a task of its own.
pub(super) fn start_serving(
    stream: Stream,
    peer: Peer,
    permit: OwnedSemaphorePermit,
    shared: &Arc<Shared>,
    drain: &watch::Receiver<bool>,
    origin: http::Origin,
) {
    let (shared, drain) = (Arc::clone(shared), drain.clone());
    // Counted now, not in the task, so that the share check before the
    // next accept sees it.
    let seat = (shared.board, shared.slot_index);
    let send_timeout = shared.send_timeout;
    if let Some(shed) = &shared.shed {
        shed.accepted();
    }
    match stream {
        Stream::Tcp(s) => {
            let io = Tracked::new(s, permit, seat, send_timeout);
            tokio::spawn(serve_maybe_tls(io, peer, shared, drain, origin));
        }
        Stream::Unix(s) => {
            let io = Tracked::new(s, permit, seat, send_timeout);
            tokio::spawn(serve_maybe_tls(io, peer, shared, drain, origin));
        }
    }
}

/// A permit for a connection a draining worker takes whatever its cap (it
/// accepts nothing more): a free one, or one added past the cap. Returns it
/// (`None` if another task took the added one first) with how many permits
/// were added, which the worker's last wait must count (0 or 1).
pub(super) fn permit_past_cap(permits: &Arc<Semaphore>) -> (Option<OwnedSemaphorePermit>, usize) {
    if let Ok(permit) = Arc::clone(permits).try_acquire_owned() {
        return (Some(permit), 0);
    }
    permits.add_permits(1);
    (Arc::clone(permits).try_acquire_owned().ok(), 1)
}

/// When the whole server stops, the master has closed its copies of the
/// listening sockets; each worker takes what is already queued before it
/// closes its own. Once the last copy is closed, new connections are
/// refused at once, and none that was queued is dropped. (On a reload the
/// next generation takes the queue instead.) Connections taken past the
/// worker's cap get permits of their own; returns how many.
pub(super) fn sweep(
    listeners: &[WorkerListener],
    shared: &Arc<Shared>,
    drain: &watch::Receiver<bool>,
    permits: &Arc<Semaphore>,
) -> usize {
    use futures_util::FutureExt;
    let mut extra = 0;
    for listener in listeners {
        loop {
            match accept(listener).now_or_never() {
                Some(Ok((stream, peer))) => {
                    let (permit, added) = permit_past_cap(permits);
                    extra += added;
                    let Some(permit) = permit else {
                        break;
                    };
                    start_serving(stream, peer, permit, shared, drain, accepted_now());
                }
                Some(Err(e)) if is_transient(&e) => {}
                // Nothing queued (or no descriptor left to take it with).
                _ => break,
            }
        }
    }
    extra
}

/// Serves a connection, after the TLS handshake when serving HTTPS. The
/// handshake runs in the connection's task, bounded by the header timeout.
pub(super) async fn serve_maybe_tls<I>(
    io: I,
    mut peer: Peer,
    shared: Arc<Shared>,
    drain: watch::Receiver<bool>,
    origin: http::Origin,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + http::Passable + 'static,
{
    if let Some(shed) = &shared.shed {
        shed.reading();
    }
    let acceptor = match (&shared.tls, &origin) {
        (Some(acceptor), http::Origin::Accepted { .. }) => acceptor.clone(),
        _ => return http::serve(io, peer, shared, drain, origin).await,
    };
    // Boxed: a plain connection's task is not sized for TLS's state (its
    // handshake and its stream), which every idle connection would carry.
    Box::pin(async move {
        match tokio::time::timeout(shared.header_timeout, acceptor.accept(io)).await {
            Ok(Ok(stream)) => {
                peer.scheme = "https";
                http::serve(stream, peer, shared, drain, origin).await
            }
            Ok(Err(e)) => tracing::debug!("TLS handshake failed: {e}"),
            Err(_) => tracing::debug!("TLS handshake timed out"),
        }
    })
    .await
}

pub(super) enum Stream {
    Tcp(tokio::net::TcpStream),
    Unix(tokio::net::UnixStream),
}

pub(super) async fn accept(listener: &WorkerListener) -> std::io::Result<(Stream, Peer)> {
    match listener {
        WorkerListener::Tcp(l) => {
            let (s, addr) = l.accept().await?;
            let _ = s.set_nodelay(true);
            Ok((
                Stream::Tcp(s),
                Peer {
                    ip: Some(addr.ip()),
                    scheme: "http",
                },
            ))
        }
        WorkerListener::Unix(l) => {
            let (s, _) = l.accept().await?;
            Ok((
                Stream::Unix(s),
                Peer {
                    ip: None,
                    scheme: "http",
                },
            ))
        }
    }
}

pub(super) fn is_transient(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        ConnectionAborted | ConnectionReset | Interrupted | WouldBlock
    ) || e.raw_os_error() == Some(nix::libc::EPROTO)
}
