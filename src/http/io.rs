//! A connection's socket as zdr keeps it: counted against its worker's
//! cap and on the scoreboard until it is closed, with a send timeout and
//! a lingering close.

use crate::handoff::SocketKind;
use crate::scoreboard::Scoreboard;
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::OwnedSemaphorePermit;

/// A connection's socket, carrying its share of the worker's connection
/// cap and its count on the scoreboard. Both are given back when the socket
/// is dropped, which for an upgraded connection (WebSocket) is when the app
/// is done with it, not when hyper hands it over: a draining worker waits
/// for it, up to the graceful timeout.
///
/// It closes with a lingering close: once the response is out it shuts
/// its sending side, then reads and drops whatever the client still sends
/// until the client closes too (or is silent for [`LINGER`], or
/// [`LINGER_MAX`] passes), so that unread
/// request bytes never turn the close into a reset that could destroy the
/// response on its way.
pub(crate) struct Tracked<I> {
    io: I,
    seat: Seat,
    /// Set once the sending side is shut: when the lingering close began,
    /// and when it ends unless the client sends more.
    linger: Option<(tokio::time::Instant, Pin<Box<tokio::time::Sleep>>)>,
    /// How long a write may wait for the client to take more (the send
    /// timeout).
    send_stall: Option<crate::stall::Stall>,
}

/// How long a closing connection waits for more from its client (nginx's
/// `lingering_timeout`), and for its client to close at all
/// (`lingering_time`).
pub(super) const LINGER: Duration = Duration::from_secs(2);
pub(super) const LINGER_MAX: Duration = Duration::from_secs(30);

impl<I> Tracked<I> {
    pub(crate) fn new(
        io: I,
        permit: OwnedSemaphorePermit,
        seat: (&'static Scoreboard, usize),
        send_timeout: Option<Duration>,
    ) -> Tracked<I> {
        seat.0.add_connections(seat.1, 1);
        Tracked {
            io,
            seat: Seat {
                _permit: permit,
                at: seat,
            },
            linger: None,
            send_stall: send_timeout.map(crate::stall::Stall::new),
        }
    }

    /// A write's outcome, held to the send timeout: a client that takes
    /// nothing for that long has its connection closed.
    fn within_send_timeout<T>(
        &mut self,
        cx: &mut Context<'_>,
        poll: Poll<std::io::Result<T>>,
    ) -> Poll<std::io::Result<T>> {
        let Some(stall) = &mut self.send_stall else {
            return poll;
        };
        if poll.is_ready() {
            stall.progress();
            return poll;
        }
        if !stall.expired(cx) {
            return Poll::Pending;
        }
        self.seat
            .at
            .0
            .count_timeout(crate::metrics::ClientTimeout::Send);
        Poll::Ready(Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "the client took nothing for the send timeout",
        )))
    }
}

/// A connection's share of its worker's cap and its count on the
/// scoreboard, given back when dropped.
struct Seat {
    _permit: OwnedSemaphorePermit,
    at: (&'static Scoreboard, usize),
}

impl Drop for Seat {
    fn drop(&mut self) {
        self.at.0.add_connections(self.at.1, -1);
    }
}

impl<I> Tracked<I> {
    /// The same connection over another form of its socket (registered
    /// with the runtime, or not); its send timeout starts afresh.
    fn with<J>(self, f: impl FnOnce(I) -> std::io::Result<J>) -> std::io::Result<Tracked<J>> {
        let Tracked {
            io,
            seat,
            linger,
            send_stall,
        } = self;
        debug_assert!(linger.is_none(), "a closing connection is not parked");
        Ok(Tracked {
            io: f(io)?,
            seat,
            linger: None,
            send_stall: send_stall.map(|s| crate::stall::Stall::new(s.after())),
        })
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for Tracked<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<I: AsyncRead + AsyncWrite + Unpin> AsyncWrite for Tracked<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let poll = Pin::new(&mut self.io).poll_write(cx, buf);
        self.within_send_timeout(cx, poll)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let poll = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.within_send_timeout(cx, poll)
    }
    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let poll = Pin::new(&mut self.io).poll_flush(cx);
        self.within_send_timeout(cx, poll)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        let (began, until) = match &mut this.linger {
            Some((began, until)) => (*began, until),
            None => {
                std::task::ready!(Pin::new(&mut this.io).poll_shutdown(cx))?;
                let now = tokio::time::Instant::now();
                let (_, until) = this
                    .linger
                    .insert((now, Box::pin(tokio::time::sleep(LINGER))));
                (now, until)
            }
        };
        let mut scratch = [0u8; 2048];
        loop {
            if std::future::Future::poll(until.as_mut(), cx).is_ready() {
                return Poll::Ready(Ok(()));
            }
            let mut buf = ReadBuf::new(&mut scratch);
            match Pin::new(&mut this.io).poll_read(cx, &mut buf) {
                Poll::Ready(Ok(())) if !buf.filled().is_empty() => {
                    // More from the client: wait for the rest, within bounds.
                    let next = tokio::time::Instant::now() + LINGER;
                    until.as_mut().reset(next.min(began + LINGER_MAX));
                }
                // The client closed (or failed): nothing is left to reset.
                Poll::Ready(_) => return Poll::Ready(Ok(())),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

impl super::Passable for Tracked<tokio::net::TcpStream> {
    fn passable(&self) -> Option<(std::os::fd::RawFd, SocketKind)> {
        Some((self.io.as_raw_fd(), SocketKind::Tcp))
    }

    fn into_plain(self) -> Option<std::io::Result<Plain>> {
        Some(self.leave_runtime())
    }
}

impl super::Passable for Tracked<tokio::net::UnixStream> {
    fn passable(&self) -> Option<(std::os::fd::RawFd, SocketKind)> {
        Some((self.io.as_raw_fd(), SocketKind::Unix))
    }

    fn into_plain(self) -> Option<std::io::Result<Plain>> {
        Some(self.leave_runtime())
    }
}

/// A plain connection's socket as the worker's parking lot holds it: out
/// of the runtime's registry (the lot watches it), nothing but the
/// descriptor and its share of the cap.
pub(crate) enum Plain {
    Tcp(Tracked<std::net::TcpStream>),
    Unix(Tracked<std::os::unix::net::UnixStream>),
}

impl Plain {
    /// Its descriptor, for the lot's watch.
    pub(super) fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        use std::os::fd::AsFd;
        match self {
            Plain::Tcp(t) => t.io.as_fd(),
            Plain::Unix(t) => t.io.as_fd(),
        }
    }

    /// Reads what the client has sent, without waiting (`WouldBlock` if
    /// nothing; 0 once it closed).
    pub(super) fn read_now(&self, buf: &mut [u8]) -> std::io::Result<usize> {
        use std::io::Read;
        match self {
            Plain::Tcp(t) => (&t.io).read(buf),
            Plain::Unix(t) => (&t.io).read(buf),
        }
    }

    /// Closes an idle connection for a waiting client: at once if nothing
    /// from its client is unread, else with a lingering close.
    pub(super) fn close_idle(self) {
        let mut one = [0u8; 1];
        let unread = match &self {
            Plain::Tcp(t) => t.io.peek(&mut one).is_ok(),
            Plain::Unix(t) => {
                use std::io::Read;
                // No peek on a Unix stream: a byte read is a byte unread
                // for the lingering close that follows.
                (&t.io).read(&mut one).is_ok()
            }
        };
        if unread {
            self.close_lingering();
        }
    }

    /// Closes it with a lingering close, in a task of its own.
    pub(super) fn close_lingering(self) {
        use tokio::io::AsyncWriteExt;
        match self {
            Plain::Tcp(t) => {
                if let Ok(mut t) = t.with(tokio::net::TcpStream::from_std) {
                    drop(tokio::spawn(async move {
                        let _ = t.shutdown().await;
                    }));
                }
            }
            Plain::Unix(t) => {
                if let Ok(mut t) = t.with(tokio::net::UnixStream::from_std) {
                    drop(tokio::spawn(async move {
                        let _ = t.shutdown().await;
                    }));
                }
            }
        }
    }
}

impl Tracked<tokio::net::TcpStream> {
    /// Out of the runtime's registry, for the lot.
    fn leave_runtime(self) -> std::io::Result<Plain> {
        self.with(tokio::net::TcpStream::into_std).map(Plain::Tcp)
    }
}

impl Tracked<tokio::net::UnixStream> {
    /// Out of the runtime's registry, for the lot.
    fn leave_runtime(self) -> std::io::Result<Plain> {
        self.with(tokio::net::UnixStream::into_std).map(Plain::Unix)
    }
}

impl Tracked<std::net::TcpStream> {
    /// Back in the runtime's registry, to be served.
    pub(super) fn into_tokio(self) -> std::io::Result<Tracked<tokio::net::TcpStream>> {
        self.with(tokio::net::TcpStream::from_std)
    }
}

impl Tracked<std::os::unix::net::UnixStream> {
    /// Back in the runtime's registry, to be served.
    pub(super) fn into_tokio(self) -> std::io::Result<Tracked<tokio::net::UnixStream>> {
        self.with(tokio::net::UnixStream::from_std)
    }
}

impl<I> super::Passable for tokio_rustls::server::TlsStream<I> {}
