//! One connection's protocol with hyper: HTTP/1.1 (with upgrades) or
//! HTTP/2 with prior knowledge, told apart by the client's first bytes as
//! hyper-util's auto builder does; and, for HTTP/1.1 between requests, the
//! way out (the socket and the bytes read past the last request) that hands
//! the connection to another worker.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{ready, Context, Poll, Wake, Waker};

use bytes::{Buf, Bytes};
use futures_util::task::AtomicWaker;
use hyper::server::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::{ConnService, ConnState};

/// The first bytes of every HTTP/2 connection with prior knowledge.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// hyper's builders for both protocols, configured once per worker.
pub(crate) struct Builders {
    pub(crate) http1: http1::Builder,
    pub(crate) http2: http2::Builder<TokioExecutor>,
}

type H1<I> = http1::UpgradeableConnection<TokioIo<ConnIo<I>>, ConnService>;
type H2<I> = http2::Connection<TokioIo<Lent<I>>, ConnService, TokioExecutor>;

/// Where hyper's HTTP/2 connection gives its socket back when dropped.
type Back<I> = Arc<std::sync::Mutex<Option<ConnIo<I>>>>;

/// A connection being served.
pub(super) enum Conn<I> {
    /// Reading the first bytes, to tell HTTP/2's preface from HTTP/1.1.
    ReadVersion {
        io: Option<ConnIo<I>>,
        service: Option<ConnService>,
        buf: [u8; 24],
        filled: usize,
        cancelled: bool,
    },
    Http1(Pin<Box<H1<I>>>),
    /// An HTTP/1.1 connection idle between requests, taken apart: only
    /// its socket and its service are kept (hyper's buffers and state are
    /// freed) until its client sends the next request's first bytes.
    Parked {
        io: Option<ConnIo<I>>,
        service: Option<ConnService>,
        /// Asked to close: it shuts with a lingering close, as hyper shuts
        /// an idle connection.
        closing: bool,
    },
    Http2 {
        conn: Pin<Box<H2<I>>>,
        back: Back<I>,
        state: Arc<ConnState>,
        /// Asked to close while idle ([`Conn::shutdown_idle`]): decided at
        /// its next poll, once hyper has written what it holds.
        going_away: bool,
    },
    /// An idle HTTP/2 connection closing: hyper's connection dropped, its
    /// socket taken back, a single GOAWAY naming the last stream the client
    /// opened written, then a lingering close. (hyper's own graceful
    /// shutdown sends GOAWAY and a PING, which some clients, Python's `h2`
    /// among them, take as a protocol error and fail their next request.)
    GoingAway {
        io: ConnIo<I>,
        frame: [u8; 17],
        written: usize,
        shut: bool,
    },
    /// Over, or handed away.
    Done,
}

/// What an HTTP/1.1 connection hands back between requests.
pub(super) struct Parts<I> {
    pub(super) io: I,
    /// Bytes read past the last request (the start of the next one).
    pub(super) carried: Bytes,
    pub(super) service: ConnService,
}

impl<I> Conn<I>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    /// A new connection, its protocol not yet known.
    pub(super) fn new(io: ConnIo<I>, service: ConnService) -> Conn<I> {
        Conn::ReadVersion {
            io: Some(io),
            service: Some(service),
            buf: [0; 24],
            filled: 0,
            cancelled: false,
        }
    }

    /// An HTTP/1.1 connection whose protocol is already known (handed over
    /// from another worker, or taken back from a handoff that failed).
    pub(super) fn http1(builders: &Builders, io: ConnIo<I>, service: ConnService) -> Conn<I> {
        Conn::Http1(Box::pin(
            builders
                .http1
                .serve_connection(TokioIo::new(io), service)
                .with_upgrades(),
        ))
    }

    /// Whether it is an HTTP/1.1 connection (served by hyper, or parked).
    pub(super) fn is_http1(&self) -> bool {
        matches!(self, Conn::Http1(_) | Conn::Parked { .. })
    }

    /// Whether it is parked in its task (see [`Conn::Parked`]), not asked
    /// to close.
    pub(super) fn is_parked(&self) -> bool {
        matches!(self, Conn::Parked { closing: false, .. })
    }

    /// Drives the connection; ready once it is over. With `park`, an
    /// HTTP/1.1 connection hyper has left waiting between requests (see
    /// [`ConnState::between_requests`]) is parked.
    pub(super) fn poll(
        &mut self,
        cx: &mut Context<'_>,
        builders: &Builders,
        park: Option<&ConnState>,
    ) -> Poll<()> {
        loop {
            match self {
                Conn::ReadVersion {
                    io,
                    service,
                    buf,
                    filled,
                    cancelled,
                } => {
                    if *cancelled {
                        // A lingering close: part of a head may be unread.
                        if let Some(stream) = io.as_mut() {
                            let _ = ready!(Pin::new(stream).poll_shutdown(cx));
                        }
                        *self = Conn::Done;
                        return Poll::Ready(());
                    }
                    let Some(stream) = io.as_mut() else {
                        *self = Conn::Done;
                        return Poll::Ready(());
                    };
                    let mut http2 = true;
                    while *filled < H2_PREFACE.len() {
                        let mut read = ReadBuf::new(&mut buf[*filled..]);
                        match ready!(Pin::new(&mut *stream).poll_read(cx, &mut read)) {
                            Ok(()) => {}
                            Err(_) => {
                                *self = Conn::Done;
                                return Poll::Ready(());
                            }
                        }
                        let n = read.filled().len();
                        let end = *filled + n;
                        if n == 0 || buf[*filled..end] != H2_PREFACE[*filled..end] {
                            *filled = end;
                            http2 = false;
                            break;
                        }
                        *filled = end;
                    }
                    let (Some(mut stream), Some(service)) = (io.take(), service.take()) else {
                        *self = Conn::Done;
                        return Poll::Ready(());
                    };
                    stream.carry(Bytes::copy_from_slice(&buf[..*filled]));
                    *self = if http2 {
                        service.conn.http2.store(true, Ordering::Relaxed);
                        stream.frames = Some(Frames::default());
                        let back: Back<I> = Arc::default();
                        let lent = Lent {
                            io: Some(stream),
                            back: Arc::clone(&back),
                        };
                        let state = Arc::clone(&service.conn);
                        Conn::Http2 {
                            conn: Box::pin(
                                builders.http2.serve_connection(TokioIo::new(lent), service),
                            ),
                            back,
                            state,
                            going_away: false,
                        }
                    } else {
                        Conn::http1(builders, stream, service)
                    };
                }
                Conn::Http1(conn) => {
                    if conn.as_mut().poll(cx).is_ready() {
                        *self = Conn::Done;
                        return Poll::Ready(());
                    }
                    if !park.is_some_and(ConnState::between_requests) {
                        return Poll::Pending;
                    }
                    let Some((io, service)) = self.take_http1_io() else {
                        return Poll::Ready(());
                    };
                    if !io.carried.is_empty() {
                        // Read ahead already: served at once.
                        *self = Conn::http1(builders, io, service);
                        continue;
                    }
                    *self = Conn::Parked {
                        io: Some(io),
                        service: Some(service),
                        closing: false,
                    };
                }
                Conn::Parked {
                    io,
                    service,
                    closing,
                } => {
                    let Some(stream) = io.as_mut() else {
                        *self = Conn::Done;
                        return Poll::Ready(());
                    };
                    if *closing {
                        let _ = ready!(Pin::new(&mut *stream).poll_shutdown(cx));
                        *self = Conn::Done;
                        return Poll::Ready(());
                    }
                    // The next request's first bytes, read on the stack:
                    // nothing is held while the connection waits.
                    let mut first = [0u8; 1024];
                    let mut read = ReadBuf::new(&mut first);
                    match ready!(Pin::new(&mut *stream).poll_read(cx, &mut read)) {
                        Ok(()) if !read.filled().is_empty() => {}
                        // Closed by the client, or broken: over, as hyper
                        // ends an idle connection its client closed.
                        _ => {
                            *self = Conn::Done;
                            return Poll::Ready(());
                        }
                    }
                    let (Some(mut stream), Some(service)) = (io.take(), service.take()) else {
                        *self = Conn::Done;
                        return Poll::Ready(());
                    };
                    stream.carry(Bytes::copy_from_slice(read.filled()));
                    *self = Conn::http1(builders, stream, service);
                }
                Conn::Http2 {
                    conn,
                    back,
                    state,
                    going_away,
                } => {
                    if conn.as_mut().poll(cx).is_ready() {
                        *self = Conn::Done;
                        return Poll::Ready(());
                    }
                    if !*going_away {
                        return Poll::Pending;
                    }
                    // hyper has written all it could: is anything still in
                    // flight, being sent, or unflushed?
                    let idle = !state.unflushed.load(Ordering::Relaxed)
                        && state.h2_bodies.load(Ordering::Acquire) == 0
                        && state.in_flight.load(Ordering::Acquire) == 0;
                    if !idle {
                        // A stream came meanwhile: the GOAWAY waits for the
                        // next poll with nothing in flight (hyper polls
                        // again as the stream's answer goes out); the
                        // decider's grace bounds the wait (then hyper's
                        // own shutdown, `graceful_shutdown`).
                        return Poll::Pending;
                    }
                    *going_away = false;
                    let back = Arc::clone(back);
                    // Dropping hyper's connection gives the socket back.
                    *self = Conn::Done;
                    let Some(io) = back.lock().ok().and_then(|mut b| b.take()) else {
                        return Poll::Ready(());
                    };
                    let last = io.frames.as_ref().map_or(0, |f| f.last_stream);
                    *self = Conn::GoingAway {
                        io,
                        frame: goaway(last),
                        written: 0,
                        shut: false,
                    };
                }
                Conn::GoingAway {
                    io,
                    frame,
                    written,
                    shut,
                } => {
                    while *written < frame.len() {
                        match ready!(Pin::new(&mut *io).poll_write(cx, &frame[*written..])) {
                            Ok(n) if n > 0 => *written += n,
                            _ => {
                                *self = Conn::Done;
                                return Poll::Ready(());
                            }
                        }
                    }
                    if !*shut {
                        let _ = ready!(Pin::new(&mut *io).poll_shutdown(cx));
                        *shut = true;
                    }
                    // Lingering: what the client sends meanwhile is read
                    // and dropped until it closes (or the caller's grace
                    // ends), so that no reset overtakes the GOAWAY.
                    let mut sink = [0u8; 1024];
                    loop {
                        let mut read = ReadBuf::new(&mut sink);
                        match ready!(Pin::new(&mut *io).poll_read(cx, &mut read)) {
                            Ok(()) if !read.filled().is_empty() => {}
                            _ => {
                                *self = Conn::Done;
                                return Poll::Ready(());
                            }
                        }
                    }
                }
                Conn::Done => return Poll::Ready(()),
            }
        }
    }

    /// Asks the connection to close once nothing is in flight (HTTP/1.1:
    /// `Connection: close` on the response in flight, or close if idle;
    /// HTTP/2: GOAWAY). One that has not yet shown its protocol closes.
    pub(super) fn graceful_shutdown(&mut self) {
        match self {
            Conn::ReadVersion { cancelled, .. } => *cancelled = true,
            Conn::Http1(conn) => conn.as_mut().graceful_shutdown(),
            // Idle: closed, as hyper closes an idle connection it is asked
            // to shut down (a lingering close, on its next poll).
            Conn::Parked { closing, .. } => *closing = true,
            Conn::Http2 {
                conn, going_away, ..
            } => {
                *going_away = false;
                conn.as_mut().graceful_shutdown();
            }
            Conn::GoingAway { .. } | Conn::Done => {}
        }
    }

    /// As [`Conn::graceful_shutdown`], for a connection with nothing in
    /// flight: an HTTP/2 connection that is still idle at its next poll (no
    /// request waiting for its answer, no answer's body being sent, all
    /// hyper wrote flushed) says GOAWAY once, naming the last stream its
    /// client opened, and closes (see [`Conn::GoingAway`]); the client
    /// retries on a new connection whatever it sends after. One that is not
    /// idle then waits for its next poll that is; any other connection
    /// shuts as `graceful_shutdown` does.
    pub(super) fn shutdown_idle(&mut self) {
        match self {
            Conn::Http2 { going_away, .. } => *going_away = true,
            _ => self.graceful_shutdown(),
        }
    }

    /// Closes the connection now, whatever it was reading, with a
    /// lingering close (the rest of a head may be on its way); `false` for
    /// HTTP/2, which has GOAWAY for that and is closed by the caller.
    pub(super) fn shut_lingering(&mut self) -> bool {
        match self {
            Conn::ReadVersion { cancelled, .. } => *cancelled = true,
            Conn::Parked { closing, .. } => *closing = true,
            Conn::Http1(_) => {
                let Some((io, service)) = self.take_http1_io() else {
                    return false;
                };
                *self = Conn::Parked {
                    io: Some(io),
                    service: Some(service),
                    closing: true,
                };
            }
            Conn::Http2 { .. } | Conn::GoingAway { .. } | Conn::Done => return false,
        }
        true
    }

    /// Closes an idle HTTP/1.1 connection at once if nothing from its
    /// client is unread (`true`: it is over); else it shuts with a
    /// lingering close. HTTP/2 is asked to close (GOAWAY).
    pub(super) fn close_idle(&mut self) -> bool {
        let unread = match self {
            Conn::Http1(_) | Conn::Parked { .. } => {
                let Some((mut io, service)) = self.take_http1_io_or_parked() else {
                    return true;
                };
                let unread = !io.carried.is_empty() || io.readable_now();
                *self = Conn::Parked {
                    io: Some(io),
                    service: Some(service),
                    closing: true,
                };
                unread
            }
            Conn::Http2 { .. } => {
                self.graceful_shutdown();
                return false;
            }
            Conn::GoingAway { .. } => return false,
            Conn::ReadVersion { .. } | Conn::Done => true,
        };
        if !unread {
            *self = Conn::Done;
        }
        !unread
    }

    /// The socket and service of an HTTP/1.1 connection between requests,
    /// served or parked.
    fn take_http1_io_or_parked(&mut self) -> Option<(ConnIo<I>, ConnService)> {
        if let Conn::Parked { io, service, .. } = self {
            let taken = io.take().zip(service.take());
            *self = Conn::Done;
            return taken;
        }
        self.take_http1_io()
    }

    /// Takes an HTTP/1.1 connection apart between requests; the caller
    /// checked that nothing is in flight or unwritten. `None` (and the
    /// connection unchanged) for any other.
    pub(super) fn take_http1(&mut self) -> Option<Parts<I>> {
        let (io, service) = self.take_http1_io_or_parked()?;
        Some(Parts {
            io: io.io,
            carried: io.carried,
            service,
        })
    }

    /// Takes hyper's HTTP/1.1 connection apart between requests: the
    /// socket as zdr wraps it, with the bytes hyper read ahead carried, and
    /// the service.
    fn take_http1_io(&mut self) -> Option<(ConnIo<I>, ConnService)> {
        if !matches!(self, Conn::Http1(_)) {
            return None;
        }
        let Conn::Http1(conn) = std::mem::replace(self, Conn::Done) else {
            return None;
        };
        let parts = Pin::into_inner(conn).into_parts()?;
        let mut io = parts.io.into_inner();
        io.carried = match (io.carried.is_empty(), parts.read_buf.is_empty()) {
            // An empty view of hyper's read buffer would keep all of it.
            (true, true) => Bytes::new(),
            (true, false) => parts.read_buf,
            (false, true) => std::mem::take(&mut io.carried),
            (false, false) => {
                let mut both = Vec::with_capacity(io.carried.len() + parts.read_buf.len());
                both.extend_from_slice(&io.carried);
                both.extend_from_slice(&parts.read_buf);
                Bytes::from(both)
            }
        };
        Some((io, parts.service))
    }
}

/// A connection's socket as hyper sees it: first the bytes already read
/// (the version check's, or those a previous worker read), then the
/// socket; every write marks the connection unflushed until hyper flushes.
///
/// When the worker sheds load, its reads go through a [`Stamp`]: the moment
/// the socket becomes readable is the moment a request can start waiting.
pub(super) struct ConnIo<I> {
    io: I,
    carried: Bytes,
    state: Arc<ConnState>,
    /// The waker its reads register, when stamping.
    stamp: Option<(Arc<Stamp>, Waker)>,
    /// HTTP/2: the frames its client sends, followed for the last stream
    /// it opened.
    frames: Option<Frames>,
}

impl<I> ConnIo<I> {
    pub(super) fn new(io: I, carried: Bytes, state: Arc<ConnState>, stamp: bool) -> ConnIo<I> {
        let stamp = stamp.then(|| {
            let stamp = Arc::new(Stamp {
                task: AtomicWaker::new(),
                state: Arc::clone(&state),
            });
            let waker = Waker::from(Arc::clone(&stamp));
            (stamp, waker)
        });
        ConnIo {
            io,
            carried,
            state,
            stamp,
            frames: None,
        }
    }

    fn carry(&mut self, bytes: Bytes) {
        self.carried = bytes;
    }
}

impl<I: AsyncRead + Unpin> ConnIo<I> {
    /// Whether the client has sent bytes not yet read (or closed): one
    /// read that does not wait; what it read is kept to be read again.
    fn readable_now(&mut self) -> bool {
        let mut first = [0u8; 1024];
        let mut read = ReadBuf::new(&mut first);
        let mut cx = Context::from_waker(Waker::noop());
        match Pin::new(&mut self.io).poll_read(&mut cx, &mut read) {
            Poll::Pending => false,
            Poll::Ready(Ok(())) => {
                self.carried = Bytes::copy_from_slice(read.filled());
                !read.filled().is_empty()
            }
            Poll::Ready(Err(_)) => false,
        }
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for ConnIo<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if self.frames.is_none() {
            return self.read(cx, buf);
        }
        let before = buf.filled().len();
        let poll = self.read(cx, buf);
        if let Some(frames) = &mut self.frames {
            frames.follow(&buf.filled()[before..]);
        }
        poll
    }
}

impl<I: AsyncRead + Unpin> ConnIo<I> {
    fn read(&mut self, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        if !self.carried.is_empty() {
            let n = self.carried.len().min(buf.remaining());
            buf.put_slice(&self.carried[..n]);
            self.carried.advance(n);
            return Poll::Ready(Ok(()));
        }
        match &self.stamp {
            Some((stamp, waker)) => {
                stamp.task.register(cx.waker());
                Pin::new(&mut self.io).poll_read(&mut Context::from_waker(waker), buf)
            }
            None => Pin::new(&mut self.io).poll_read(cx, buf),
        }
    }
}

/// An HTTP/2 client's frames, followed as they are read: the last stream
/// it opened (RFC 9113 §4.1: a 9-byte header, its length first, then the
/// type, flags and stream).
#[derive(Default)]
struct Frames {
    /// Bytes of the preface or of a frame's payload still to pass.
    skip: usize,
    /// The frame header being read, and how much of it has come.
    header: [u8; 9],
    have: usize,
    /// The highest stream a HEADERS frame opened.
    last_stream: u32,
    /// The 24-byte preface has been passed.
    prefaced: bool,
}

impl Frames {
    fn follow(&mut self, mut bytes: &[u8]) {
        if !self.prefaced {
            self.prefaced = true;
            self.skip = H2_PREFACE.len();
        }
        while !bytes.is_empty() {
            if self.skip > 0 {
                let n = self.skip.min(bytes.len());
                self.skip -= n;
                bytes = &bytes[n..];
                continue;
            }
            let n = (9 - self.have).min(bytes.len());
            self.header[self.have..self.have + n].copy_from_slice(&bytes[..n]);
            self.have += n;
            bytes = &bytes[n..];
            if self.have < 9 {
                return;
            }
            self.have = 0;
            let h = self.header;
            let length = usize::from(h[0]) << 16 | usize::from(h[1]) << 8 | usize::from(h[2]);
            let stream = u32::from_be_bytes([h[5], h[6], h[7], h[8]]) & 0x7fff_ffff;
            // HEADERS (type 1) opens a stream.
            if h[3] == 1 {
                self.last_stream = self.last_stream.max(stream);
            }
            self.skip = length;
        }
    }
}

/// A GOAWAY frame (type 7, stream 0) naming `last_stream`, with NO_ERROR.
fn goaway(last_stream: u32) -> [u8; 17] {
    let mut frame = [0u8; 17];
    frame[2] = 8;
    frame[3] = 7;
    frame[9..13].copy_from_slice(&(last_stream & 0x7fff_ffff).to_be_bytes());
    frame
}

/// An HTTP/2 connection's socket while hyper holds it: given back (to
/// [`Back`]) when hyper's connection is dropped, so that zdr can say
/// GOAWAY itself ([`Conn::shutdown_idle`]).
pub(super) struct Lent<I> {
    io: Option<ConnIo<I>>,
    back: Back<I>,
}

impl<I> Drop for Lent<I> {
    fn drop(&mut self) {
        if let (Some(io), Ok(mut back)) = (self.io.take(), self.back.lock()) {
            *back = Some(io);
        }
    }
}

fn gone() -> std::io::Error {
    std::io::Error::from(std::io::ErrorKind::NotConnected)
}

impl<I: AsyncRead + Unpin> AsyncRead for Lent<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.io.as_mut() {
            Some(io) => Pin::new(io).poll_read(cx, buf),
            None => Poll::Ready(Err(gone())),
        }
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Lent<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.io.as_mut() {
            Some(io) => Pin::new(io).poll_write(cx, buf),
            None => Poll::Ready(Err(gone())),
        }
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        match self.io.as_mut() {
            Some(io) => Pin::new(io).poll_write_vectored(cx, bufs),
            None => Poll::Ready(Err(gone())),
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.io.as_ref().is_some_and(ConnIo::is_write_vectored)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.io.as_mut() {
            Some(io) => Pin::new(io).poll_flush(cx),
            None => Poll::Ready(Err(gone())),
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.io.as_mut() {
            Some(io) => Pin::new(io).poll_shutdown(cx),
            None => Poll::Ready(Err(gone())),
        }
    }
}

/// The waker a connection's reads register when the worker sheds load:
/// notes when the socket woke the connection, then wakes its task.
pub(super) struct Stamp {
    task: AtomicWaker,
    state: Arc<ConnState>,
}

impl Wake for Stamp {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.state
            .ready_ns
            .store(crate::sys::monotonic_ns(), Ordering::Relaxed);
        self.task.wake();
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for ConnIo<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.state.unflushed.store(true, Ordering::Relaxed);
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        self.state.unflushed.store(true, Ordering::Relaxed);
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let poll = Pin::new(&mut self.io).poll_flush(cx);
        if let Poll::Ready(Ok(())) = poll {
            self.state.unflushed.store(false, Ordering::Relaxed);
        }
        poll
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.state.closing.store(true, Ordering::Relaxed);
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}
