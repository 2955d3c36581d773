//! The request body an app reads: hyper's, held to `--limit-request-body`
//! on the bytes actually received (chunked and HTTP/2 bodies included, not
//! only a declared Content-Length) and to `--body-timeout` between bytes,
//! and discarded in the background when
//! the app answers without reading it: an HTTP/1.1 connection stays usable
//! for the client's next request, and an HTTP/2 stream ends cleanly rather
//! than with a reset some clients take for an error.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

/// Any error an app may return.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The most of an unread body that is read and thrown away; past it, an
/// HTTP/1.1 connection closes instead (the response then says
/// `Connection: close`) and an HTTP/2 stream is reset.
pub(crate) const DISCARD_MAX: u64 = 4 << 20;

/// How long the discarding of an unread body may wait for the client.
const DISCARD_TIME: Duration = Duration::from_secs(10);

/// A request's body, as the app's service receives it.
///
/// It yields the bytes the client sends. Past `--limit-request-body` it
/// yields an error instead ([`BodyTooLarge`]), and zdr answers the request
/// with 413 whatever the app answers. An app that does not read it need not
/// care: what it leaves unread is discarded for it.
pub struct RequestBody {
    inner: Option<Incoming>,
    /// Limits and what was seen: only for requests that have a body.
    watch: Option<Arc<BodyWatch>>,
    received: u64,
    /// How long the client may leave the body waiting for its next byte.
    stall: Option<crate::stall::Stall>,
}

impl std::fmt::Debug for RequestBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RequestBody")
            .field("received", &self.received)
            .field("done", &self.inner.is_none())
            .finish_non_exhaustive()
    }
}

/// What a body's reader found, for the connection to act on once the
/// response is ready.
pub(crate) struct BodyWatch {
    limit: Option<u64>,
    too_large: AtomicBool,
    /// The client left the body waiting past the body timeout.
    timed_out: AtomicBool,
    /// The body could not be read: malformed (a bad chunk) or cut short.
    broken: AtomicBool,
    /// Where a body timeout is counted.
    board: &'static crate::scoreboard::Scoreboard,
    /// Whether the app read it to its end.
    ended: AtomicBool,
    /// The length the client declared, if it did.
    declared: Option<u64>,
}

impl BodyWatch {
    /// Whether the body went past the limit.
    pub(crate) fn too_large(&self) -> bool {
        self.too_large.load(Ordering::Relaxed)
    }

    /// Whether the client stopped sending the body for the body timeout.
    pub(crate) fn timed_out(&self) -> bool {
        self.timed_out.load(Ordering::Relaxed)
    }

    /// Whether the client's body could not be read (a malformed chunk, or
    /// the client went away): its fault, not the app's, whatever the app
    /// answered.
    pub(crate) fn broken(&self) -> bool {
        self.broken.load(Ordering::Relaxed)
    }

    /// Whether the app read the body to its end.
    pub(crate) fn ended(&self) -> bool {
        self.ended.load(Ordering::Relaxed)
    }

    /// Whether an HTTP/1.1 connection must close after the response: the
    /// app left more of the body unread than zdr reads and discards for it.
    pub(crate) fn must_close(&self) -> bool {
        !self.ended.load(Ordering::Relaxed) && self.declared.is_none_or(|n| n > self.budget())
    }

    fn budget(&self) -> u64 {
        self.limit.unwrap_or(DISCARD_MAX).min(DISCARD_MAX)
    }
}

/// The error a body yields past `--limit-request-body`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BodyTooLarge {
    /// The limit, in bytes.
    pub limit: u64,
}

impl std::fmt::Display for BodyTooLarge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "request body over the limit of {} bytes", self.limit)
    }
}

impl std::error::Error for BodyTooLarge {}

/// The error a body yields when the client sends nothing for the body
/// timeout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BodyTimeout {
    /// The timeout.
    pub after: Duration,
}

impl std::fmt::Display for BodyTimeout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "no request body data for {:.1}s (--body-timeout)",
            self.after.as_secs_f64()
        )
    }
}

impl std::error::Error for BodyTimeout {}

impl RequestBody {
    /// Wraps hyper's body. A request without a body costs nothing more.
    pub(crate) fn new(
        inner: Incoming,
        limit: Option<u64>,
        timeout: Option<Duration>,
        board: &'static crate::scoreboard::Scoreboard,
    ) -> (RequestBody, Option<Arc<BodyWatch>>) {
        if inner.is_end_stream() {
            // Nothing to read, limit or time.
            return (RequestBody::empty(), None);
        }
        let watch = Arc::new(BodyWatch {
            limit,
            too_large: AtomicBool::new(false),
            timed_out: AtomicBool::new(false),
            broken: AtomicBool::new(false),
            board,
            ended: AtomicBool::new(false),
            declared: inner.size_hint().exact(),
        });
        let body = RequestBody {
            inner: Some(inner),
            watch: Some(Arc::clone(&watch)),
            received: 0,
            stall: timeout.map(crate::stall::Stall::new),
        };
        (body, Some(watch))
    }
}

impl RequestBody {
    /// A body with nothing in it (a request that has none, or one built by
    /// hand in a test).
    pub(crate) fn empty() -> RequestBody {
        RequestBody {
            inner: None,
            watch: None,
            received: 0,
            stall: None,
        }
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        let Some(inner) = this.inner.as_mut() else {
            return Poll::Ready(None);
        };
        let frame = match Pin::new(inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => frame,
            Poll::Ready(Some(Err(e))) => {
                if let Some(watch) = &this.watch {
                    watch.broken.store(true, Ordering::Relaxed);
                }
                return Poll::Ready(Some(Err(e.into())));
            }
            Poll::Ready(None) => {
                if let Some(watch) = &this.watch {
                    watch.ended.store(true, Ordering::Relaxed);
                }
                return Poll::Ready(None);
            }
            Poll::Pending => return this.wait_for_client(cx),
        };
        if let Some(stall) = &mut this.stall {
            stall.progress();
        }
        if let (Some(data), Some(watch)) = (frame.data_ref(), &this.watch) {
            this.received += data.len() as u64;
            if let Some(limit) = watch.limit.filter(|l| this.received > *l) {
                watch.too_large.store(true, Ordering::Relaxed);
                // Nothing more is read: the connection closes after the 413.
                this.inner = None;
                return Poll::Ready(Some(Err(Box::new(BodyTooLarge { limit }))));
            }
        }
        Poll::Ready(Some(Ok(frame)))
    }

    fn is_end_stream(&self) -> bool {
        let end = self.inner.as_ref().is_none_or(Body::is_end_stream);
        if let (true, Some(watch)) = (end, &self.watch) {
            watch.ended.store(true, Ordering::Relaxed);
        }
        end
    }

    fn size_hint(&self) -> SizeHint {
        self.inner
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), Body::size_hint)
    }
}

impl RequestBody {
    /// The client has sent nothing more yet: fails the body once it has
    /// been silent for the body timeout.
    fn wait_for_client(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let (Some(stall), Some(watch)) = (&mut self.stall, &self.watch) else {
            return Poll::Pending;
        };
        if !stall.expired(cx) {
            return Poll::Pending;
        }
        let after = stall.after();
        watch.timed_out.store(true, Ordering::Relaxed);
        watch
            .board
            .count_timeout(crate::metrics::ClientTimeout::Body);
        // Nothing more is read: the connection closes after the answer.
        self.inner = None;
        Poll::Ready(Some(Err(Box::new(BodyTimeout { after }))))
    }
}

impl Drop for RequestBody {
    fn drop(&mut self) {
        let Some(inner) = self.inner.take() else {
            return;
        };
        let Some(watch) = &self.watch else { return };
        if inner.is_end_stream() || watch.too_large() || watch.timed_out() {
            return;
        }
        // The app answers without the rest of the body: read it and throw it
        // away, so that hyper can go on to the next request on this
        // connection (or end the stream cleanly). Past the limits, dropping
        // it closes the connection (or resets the stream).
        let budget = watch.budget().saturating_sub(self.received);
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(discard(inner, budget));
        }
    }
}

/// Reads and drops up to `budget` bytes of a body, within [`DISCARD_TIME`].
async fn discard(mut body: Incoming, budget: u64) {
    use http_body_util::BodyExt;
    let _ = tokio::time::timeout(DISCARD_TIME, async move {
        let mut seen = 0u64;
        while let Some(Ok(frame)) = body.frame().await {
            if let Some(data) = frame.data_ref() {
                seen += data.len() as u64;
                if seen > budget {
                    return;
                }
            }
        }
    })
    .await;
}
