//! The application side: how an app hands zdr its service.
//!
//! An app's start-up has up to three steps, each given to [`crate::Server`]:
//!
//! 1. **load** (sync, optional): build shared state — config, data,
//!    templates. With `--preload` it runs once in the master before the
//!    workers are forked, so they share its memory copy-on-write; without,
//!    each worker runs it. It runs before any async runtime exists.
//! 2. **service** (async): inside each worker's runtime, build the
//!    `tower::Service` that answers requests (an axum `Router` works as-is).
//! 3. **ready** (async, optional): a readiness check ("can I reach my
//!    database?"). A worker accepts connections only once it passes, and a
//!    reload drains the old generation only once every new worker is ready.

use std::future::Future;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use futures_util::FutureExt;

pub use crate::body::BoxError;

/// The request type zdr hands to the app's service.
pub type Request = http::Request<crate::body::RequestBody>;

pub use crate::response_body::Body;

pub use crate::worker_info::WorkerInfo;

/// The response type, after zdr has taken the app's body.
pub type Response = http::Response<Body>;

pub(crate) type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// What the load step produced, ready to be turned into a service in a
/// worker.
pub(crate) struct LoadedApp {
    pub(crate) make_service: Box<dyn Fn() -> BoxFuture<anyhow::Result<AppService>> + Send + Sync>,
    pub(crate) ready: Arc<dyn Fn() -> BoxFuture<anyhow::Result<()>> + Send + Sync>,
    /// Every request carries its [`crate::ClientInfo`] in its extensions
    /// (the app asked, with [`crate::Server::client_info`]).
    pub(crate) client_info: bool,
    /// Run once the worker has drained (with the time left of the graceful
    /// timeout; zero for a fast stop); returns an exit code for the worker
    /// when it has one to report.
    pub(crate) stop: Option<StopHook>,
    /// How long the app's own thread has gone without showing it runs,
    /// for an app that runs beside the runtime (a Python app's event
    /// loop); `None` while it has not started. Past `--timeout`, the
    /// worker ends itself (the runtime, which answers the master, cannot
    /// tell otherwise).
    pub(crate) silence: Option<Silence>,
}

/// See [`LoadedApp::silence`].
pub(crate) type Silence = Arc<dyn Fn() -> Option<std::time::Duration> + Send + Sync>;

/// See [`LoadedApp::stop`].
pub(crate) type StopHook = Arc<dyn Fn(std::time::Duration) -> BoxFuture<i32> + Send + Sync>;

/// Runs the app's load step.
pub(crate) type Loader = Arc<dyn Fn() -> anyhow::Result<LoadedApp> + Send + Sync>;

/// Boxes an app's service into zdr's erased type. An app error becomes a
/// 500 response for that request.
pub(crate) fn erase<Svc, B>(svc: Svc) -> AppService
where
    Svc: tower::Service<Request, Response = http::Response<B>> + Clone + Send + Sync + 'static,
    Svc::Future: Send + 'static,
    Svc::Error: Into<BoxError>,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    AppService(Arc::new(Adapter(svc)))
}

/// The app's service with its types erased; a request costs one boxed
/// future (and the boxed body).
#[derive(Clone)]
pub(crate) struct AppService(Arc<dyn ErasedService>);

impl AppService {
    /// Answers one request.
    pub(crate) fn call(&self, req: Request) -> BoxFuture<Response> {
        self.0.call(req)
    }
}

trait ErasedService: Send + Sync {
    fn call(&self, req: Request) -> BoxFuture<Response>;
}

/// Adapts an app's service to zdr's: boxes the body, and turns an error
/// (from `poll_ready` or the call) or a panic into a 500.
struct Adapter<S>(S);

impl<S, B> ErasedService for Adapter<S>
where
    S: tower::Service<Request, Response = http::Response<B>> + Clone + Send + Sync + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    fn call(&self, req: Request) -> BoxFuture<Response> {
        let mut svc = self.0.clone();
        // Most services are always ready (a router, a `service_fn`): then
        // the call is made at once and the box holds the app's own future
        // alone. One that is not ready is asked again, from the request's
        // task, with its waker.
        let mut cx = Context::from_waker(Waker::noop());
        match catch_unwind(AssertUnwindSafe(|| svc.poll_ready(&mut cx))) {
            Ok(Poll::Ready(Ok(()))) => match catch_unwind(AssertUnwindSafe(|| svc.call(req))) {
                Ok(future) => Box::pin(Answer { future }),
                Err(panic) => Box::pin(std::future::ready(panicked(panic))),
            },
            Ok(Poll::Ready(Err(err))) => Box::pin(std::future::ready(failed(err))),
            Ok(Poll::Pending) => Box::pin(async move {
                let answer = async move {
                    std::future::poll_fn(|cx| svc.poll_ready(cx)).await?;
                    svc.call(req).await
                };
                match AssertUnwindSafe(answer).catch_unwind().await {
                    Ok(Ok(res)) => res.map(Body::new),
                    Ok(Err(err)) => failed(err),
                    Err(panic) => panicked(panic),
                }
            }),
            Err(panic) => Box::pin(std::future::ready(panicked(panic))),
        }
    }
}

pin_project_lite::pin_project! {
    /// An app's answer on its way: a panic while it is polled costs that
    /// request a 500 and nothing else.
    struct Answer<F> {
        #[pin]
        future: F,
    }
}

impl<F, B, E> Future for Answer<F>
where
    F: Future<Output = Result<http::Response<B>, E>>,
    E: Into<BoxError>,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Output = Response;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Response> {
        let future = self.project().future;
        match catch_unwind(AssertUnwindSafe(|| future.poll(cx))) {
            Ok(Poll::Pending) => Poll::Pending,
            Ok(Poll::Ready(Ok(res))) => Poll::Ready(res.map(Body::new)),
            Ok(Poll::Ready(Err(err))) => Poll::Ready(failed(err)),
            Err(panic) => Poll::Ready(panicked(panic)),
        }
    }
}

/// The answer to an app's error.
fn failed(err: impl Into<BoxError>) -> Response {
    tracing::error!(
        event = crate::logging::LogEvent::AppError.name(),
        "app error: {}",
        err.into()
    );
    internal_error()
}

/// The answer to an app's panic.
fn panicked(panic: Box<dyn std::any::Any + Send>) -> Response {
    let what = panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a non-string payload".to_owned());
    tracing::error!(
        event = crate::logging::LogEvent::AppError.name(),
        "handler panicked: {what}; answered 500"
    );
    internal_error()
}

fn internal_error() -> Response {
    plain(
        http::StatusCode::INTERNAL_SERVER_ERROR,
        "Internal Server Error\n",
    )
}

/// A plain-text response with `status`.
pub(crate) fn plain(status: http::StatusCode, text: impl Into<Bytes>) -> Response {
    let mut res = http::Response::new(Body::from(text.into()));
    *res.status_mut() = status;
    res.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    res
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::convert::Infallible;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn request() -> Request {
        let (parts, ()) = http::Request::new(()).into_parts();
        let body = crate::body::RequestBody::empty();
        http::Request::from_parts(parts, body)
    }

    fn answer(svc: AppService) -> http::StatusCode {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        rt.block_on(svc.call(request())).status()
    }

    /// A service with a switchable way to fail, and a `poll_ready` that is
    /// pending `pending` times (waking its task each time) first.
    #[derive(Clone)]
    struct Svc {
        pending: Arc<AtomicUsize>,
        fail: &'static str,
    }

    impl tower::Service<Request> for Svc {
        type Response = http::Response<String>;
        type Error = BoxError;
        type Future = BoxFuture<Result<http::Response<String>, BoxError>>;

        fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
            if self.pending.load(Ordering::SeqCst) > 0 {
                self.pending.fetch_sub(1, Ordering::SeqCst);
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            match self.fail {
                "ready-error" => Poll::Ready(Err("not ready".into())),
                "ready-panic" => panic!("poll_ready panicked"),
                _ => Poll::Ready(Ok(())),
            }
        }

        fn call(&mut self, _req: Request) -> Self::Future {
            match self.fail {
                "call-panic" => panic!("call panicked"),
                "poll-panic" => Box::pin(async { panic!("the future panicked") }),
                "error" => Box::pin(async { Err("failed".into()) }),
                _ => Box::pin(async { Ok(http::Response::new("ok".to_owned())) }),
            }
        }
    }

    fn svc(pending: usize, fail: &'static str) -> AppService {
        erase(Svc {
            pending: Arc::new(AtomicUsize::new(pending)),
            fail,
        })
    }

    #[test]
    fn a_ready_service_answers() {
        assert_eq!(answer(svc(0, "")), http::StatusCode::OK);
    }

    #[test]
    fn a_service_not_ready_at_once_is_asked_again_and_answers() {
        assert_eq!(answer(svc(3, "")), http::StatusCode::OK);
        assert_eq!(
            answer(svc(2, "error")),
            http::StatusCode::INTERNAL_SERVER_ERROR
        );
        assert_eq!(
            answer(svc(2, "call-panic")),
            http::StatusCode::INTERNAL_SERVER_ERROR
        );
    }

    #[test]
    fn every_failure_costs_the_request_a_500_and_nothing_else() {
        for fail in [
            "ready-error",
            "ready-panic",
            "call-panic",
            "poll-panic",
            "error",
        ] {
            assert_eq!(
                answer(svc(0, fail)),
                http::StatusCode::INTERNAL_SERVER_ERROR,
                "{fail}"
            );
        }
    }

    #[test]
    fn an_infallible_service_fn_answers() {
        let svc = erase(tower::service_fn(|_req: Request| async {
            Ok::<_, Infallible>(http::Response::new(String::from("hi")))
        }));
        assert_eq!(answer(svc), http::StatusCode::OK);
    }
}
