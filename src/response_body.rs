//! The response body zdr sends: an app's whole-buffer body (`Full<Bytes>`,
//! `String`) as its bytes, and any other body boxed. Most answers are a single buffer, so most responses
//! cost no allocation of their own.

use std::any::Any;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body as _, Frame, SizeHint};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};

use crate::body::BoxError;

/// The body of a response zdr sends.
///
/// [`Body::new`] takes any body that yields [`Bytes`]; a single buffer is
/// kept as it is, anything else is boxed.
pub struct Body(Inner);

enum Inner {
    /// A single buffer, until sent; `None` once sent, or if empty.
    Full(Option<Bytes>),
    /// Any other body.
    Boxed(UnsyncBoxBody<Bytes, BoxError>),
}

impl Body {
    /// Wraps an app's response body.
    pub fn new<B>(body: B) -> Body
    where
        B: http_body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        let mut body = Some(body);
        let any = &mut body as &mut dyn Any;
        if let Some(full) = any.downcast_mut::<Option<Full<Bytes>>>() {
            if let Some(bytes) = full.take().and_then(full_bytes) {
                return Body::from(bytes);
            }
            return Body::empty();
        }
        if let Some(text) = any.downcast_mut::<Option<String>>() {
            return Body::from(Bytes::from(text.take().unwrap_or_default()));
        }
        if let Some(boxed) = any.downcast_mut::<Option<Body>>() {
            return boxed.take().unwrap_or_else(Body::empty);
        }
        match body {
            Some(body) => Body(Inner::Boxed(body.map_err(Into::into).boxed_unsync())),
            None => Body::empty(),
        }
    }

    /// A body with no bytes.
    pub fn empty() -> Body {
        Body(Inner::Full(None))
    }

    /// Whether it is a single buffer (or nothing), which hyper writes as
    /// soon as it has the response.
    pub(crate) fn is_single_buffer(&self) -> bool {
        matches!(self.0, Inner::Full(_))
    }

    /// The same body, calling `done` once it has yielded its last frame
    /// (not if it fails or is dropped before). A single buffer is returned
    /// as it is: it is written with the head.
    pub(crate) fn on_end(self, done: impl FnOnce() + Send + Unpin + 'static) -> Body {
        match self.0 {
            Inner::Full(bytes) => Body(Inner::Full(bytes)),
            Inner::Boxed(inner) => Body(Inner::Boxed(
                OnEnd {
                    inner,
                    done: Some(done),
                }
                .boxed_unsync(),
            )),
        }
    }
}

impl Body {
    /// The same body, calling `dropped` when it is dropped (sent whole,
    /// failed or abandoned).
    pub(crate) fn on_drop(self, dropped: impl FnOnce() + Send + Unpin + 'static) -> Body {
        Body(Inner::Boxed(
            OnDrop {
                inner: self,
                dropped: Some(dropped),
            }
            .boxed_unsync(),
        ))
    }
}

/// A body that says when it is dropped.
struct OnDrop<F: FnOnce()> {
    inner: Body,
    dropped: Option<F>,
}

impl<F: FnOnce()> Drop for OnDrop<F> {
    fn drop(&mut self) {
        if let Some(dropped) = self.dropped.take() {
            dropped();
        }
    }
}

impl<F: FnOnce() + Unpin> http_body::Body for OnDrop<F> {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        Pin::new(&mut self.get_mut().inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The bytes of a `Full` body, which it yields at once.
fn full_bytes(mut full: Full<Bytes>) -> Option<Bytes> {
    let mut cx = Context::from_waker(std::task::Waker::noop());
    match Pin::new(&mut full).poll_frame(&mut cx) {
        Poll::Ready(Some(Ok(frame))) => frame.into_data().ok(),
        _ => None,
    }
}

impl From<Bytes> for Body {
    fn from(bytes: Bytes) -> Body {
        Body(Inner::Full((!bytes.is_empty()).then_some(bytes)))
    }
}

impl From<String> for Body {
    fn from(text: String) -> Body {
        Body::from(Bytes::from(text))
    }
}

impl From<&'static str> for Body {
    fn from(text: &'static str) -> Body {
        Body::from(Bytes::from_static(text.as_bytes()))
    }
}

impl std::fmt::Debug for Body {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0 {
            Inner::Full(bytes) => f
                .debug_tuple("Body")
                .field(&bytes.as_ref().map_or(0, Bytes::len))
                .finish(),
            Inner::Boxed(_) => f.write_str("Body(boxed)"),
        }
    }
}

impl http_body::Body for Body {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match &mut self.get_mut().0 {
            Inner::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            Inner::Boxed(body) => Pin::new(body).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.0 {
            Inner::Full(bytes) => bytes.is_none(),
            Inner::Boxed(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.0 {
            Inner::Full(bytes) => {
                SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64))
            }
            Inner::Boxed(body) => body.size_hint(),
        }
    }
}

/// A body that says when it has ended.
struct OnEnd<F> {
    inner: UnsyncBoxBody<Bytes, BoxError>,
    done: Option<F>,
}

impl<F: FnOnce() + Unpin> http_body::Body for OnEnd<F> {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let frame = std::task::ready!(Pin::new(&mut this.inner).poll_frame(cx));
        // hyper stops polling once a body says it has ended: the end is
        // either the frame that says so or the end of the frames.
        if matches!(frame, None | Some(Ok(_))) && (frame.is_none() || this.inner.is_end_stream()) {
            if let Some(done) = this.done.take() {
                done();
            }
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn collect(body: Body) -> (Bytes, bool) {
        let unboxed = matches!(body.0, Inner::Full(_));
        (body.collect().await.unwrap().to_bytes(), unboxed)
    }

    #[tokio::test]
    async fn a_streamed_body_says_when_it_has_ended() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        use std::sync::Arc;
        let ended = Arc::new(AtomicUsize::new(0));
        let count = |ended: &Arc<AtomicUsize>| {
            let ended = Arc::clone(ended);
            move || {
                ended.fetch_add(1, Ordering::Relaxed);
            }
        };
        // Frames until there are none.
        let frames = futures_util::stream::iter(
            ["a", "b"].map(|s| Ok::<_, BoxError>(Frame::data(Bytes::from(s)))),
        );
        let body = Body::new(http_body_util::StreamBody::new(frames)).on_end(count(&ended));
        let mut body = std::pin::pin!(body);
        let first = std::future::poll_fn(|cx| body.as_mut().poll_frame(cx)).await;
        assert!(first.is_some());
        assert_eq!(ended.load(Ordering::Relaxed), 0);
        let second = std::future::poll_fn(|cx| body.as_mut().poll_frame(cx)).await;
        assert!(second.is_some());
        assert_eq!(ended.load(Ordering::Relaxed), 0);
        assert!(std::future::poll_fn(|cx| body.as_mut().poll_frame(cx))
            .await
            .is_none());
        assert_eq!(ended.load(Ordering::Relaxed), 1);
        // A body whose last frame says it is the end (hyper polls no more).
        let sized = Full::new(Bytes::from_static(b"abc")).map_err(|e| -> BoxError { match e {} });
        let body = Body::new(sized).on_end(count(&ended));
        assert!(!body.is_single_buffer());
        let mut body = std::pin::pin!(body);
        assert!(std::future::poll_fn(|cx| body.as_mut().poll_frame(cx))
            .await
            .is_some());
        assert!(body.is_end_stream());
        assert_eq!(ended.load(Ordering::Relaxed), 2);
    }

    #[tokio::test]
    async fn single_buffers_stay_unboxed_and_others_are_boxed() {
        let full = Body::new(Full::new(Bytes::from_static(b"hello")));
        assert_eq!(full.size_hint().exact(), Some(5));
        assert_eq!(collect(full).await, (Bytes::from_static(b"hello"), true));
        let text = Body::new(String::from("text"));
        assert_eq!(collect(text).await, (Bytes::from_static(b"text"), true));
        let empty = Body::new(http_body_util::Empty::<Bytes>::new());
        assert!(!matches!(empty.0, Inner::Full(_)));
        assert!(empty.is_end_stream());
        let streamed = Body::new(http_body_util::StreamBody::new(futures_util::stream::iter(
            [
                Ok::<_, std::convert::Infallible>(Frame::data(Bytes::from_static(b"a"))),
                Ok(Frame::data(Bytes::from_static(b"b"))),
            ],
        )));
        assert_eq!(collect(streamed).await, (Bytes::from_static(b"ab"), false));
        assert!(Body::new(Full::new(Bytes::new())).is_end_stream());
    }
}
