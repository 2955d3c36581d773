//! The application side: how an app hands zdr its service.
//!
//! An app's start-up has up to three steps, each given to [`Server`]:
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
use std::pin::Pin;
use std::process::ExitCode;
use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use futures_util::FutureExt;
use http_body_util::BodyExt;
use std::panic::AssertUnwindSafe;
use tower::ServiceExt;

/// Any error an app may return.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The request type zdr hands to the app's service.
pub type Request = http::Request<crate::http::body::RequestBody>;

/// The response body zdr sends: any app body, boxed.
pub type Body = http_body_util::combinators::UnsyncBoxBody<Bytes, BoxError>;

/// The response type, after zdr has boxed the app's body.
pub type Response = http::Response<Body>;

pub(crate) type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// What the load step produced, ready to be turned into a service in a
/// worker.
pub(crate) struct LoadedApp {
    pub(crate) make_service: Box<dyn Fn() -> BoxFuture<anyhow::Result<AppService>> + Send + Sync>,
    pub(crate) ready: Arc<dyn Fn() -> BoxFuture<anyhow::Result<()>> + Send + Sync>,
}

/// Runs the app's load step.
pub(crate) type Loader = Arc<dyn Fn() -> anyhow::Result<LoadedApp> + Send + Sync>;

type MakeService<S> = Arc<dyn Fn(Arc<S>) -> BoxFuture<anyhow::Result<AppService>> + Send + Sync>;
type Ready<S> = Arc<dyn Fn(Arc<S>) -> BoxFuture<anyhow::Result<()>> + Send + Sync>;

/// A zdr server for an app: give it the app's steps, then [`Server::run`]
/// makes the program a complete zdr server with the whole CLI (`serve`,
/// `check`, every flag).
///
/// ```no_run
/// use std::sync::Arc;
///
/// struct Shared { greeting: String }
///
/// fn main() -> std::process::ExitCode {
///     zdr::Server::new("hello")
///         .load(|| Ok(Shared { greeting: "hello".into() }))
///         .service(|shared: Arc<Shared>| async move {
///             Ok(tower::service_fn(move |_req: zdr::Request| {
///                 let body = shared.greeting.clone();
///                 async move { Ok::<_, std::convert::Infallible>(http::Response::new(body)) }
///             }))
///         })
///         .run()
/// }
/// ```
pub struct Server<S = ()> {
    name: String,
    load: Arc<dyn Fn() -> anyhow::Result<S> + Send + Sync>,
    service: Option<MakeService<S>>,
    ready: Option<Ready<S>>,
}

impl Server<()> {
    /// A server for the app called `name` (used in `--help` and logs).
    pub fn new(name: impl Into<String>) -> Server<()> {
        Server {
            name: name.into(),
            load: Arc::new(|| Ok(())),
            service: None,
            ready: None,
        }
    }
}

impl<S: Send + Sync + 'static> Server<S> {
    /// Sets the load step, which builds the state shared by the service.
    /// Call it before [`Server::service`] and [`Server::ready`], which
    /// receive its result.
    pub fn load<T, F>(self, load: F) -> Server<T>
    where
        T: Send + Sync + 'static,
        F: Fn() -> anyhow::Result<T> + Send + Sync + 'static,
    {
        Server {
            name: self.name,
            load: Arc::new(load),
            service: None,
            ready: None,
        }
    }

    /// Sets the per-worker step that builds the service, inside the
    /// worker's runtime. Any `tower::Service` over [`Request`] whose
    /// response body yields [`Bytes`] will do, an axum `Router` included.
    pub fn service<F, Fut, Svc, B>(mut self, make: F) -> Self
    where
        F: Fn(Arc<S>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = anyhow::Result<Svc>> + Send + 'static,
        Svc: tower::Service<Request, Response = http::Response<B>> + Clone + Send + Sync + 'static,
        Svc::Future: Send + 'static,
        Svc::Error: Into<BoxError>,
        B: http_body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        let make = Arc::new(make);
        self.service = Some(Arc::new(move |state: Arc<S>| {
            let fut = make(state);
            Box::pin(async move { Ok(erase(fut.await?)) }) as BoxFuture<_>
        }));
        self
    }

    /// Sets the readiness check. It must pass before a worker accepts
    /// connections; it is retried until the boot timeout.
    pub fn ready<F, Fut>(mut self, ready: F) -> Self
    where
        F: Fn(Arc<S>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        self.ready = Some(Arc::new(move |state| {
            Box::pin(ready(state)) as BoxFuture<_>
        }));
        self
    }

    /// Runs the program as a zdr server: parses the command line and
    /// serves, checks or (in a worker) works. Returns the exit code.
    pub fn run(self) -> ExitCode {
        let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
        self.run_with_args(args)
    }

    /// As [`Server::run`], with the arguments given (the first is the
    /// program name).
    pub fn run_with_args(self, args: Vec<std::ffi::OsString>) -> ExitCode {
        let name = self.name.clone();
        let loader = self.into_loader();
        crate::cli::main(&name, loader, args)
    }

    fn into_loader(self) -> Loader {
        let Server {
            load,
            service,
            ready,
            ..
        } = self;
        Arc::new(move || {
            let make = service.clone().ok_or_else(|| {
                anyhow::anyhow!("the app gave zdr no service (call Server::service)")
            })?;
            let state = Arc::new(load()?);
            let ready = ready.clone();
            let for_service = Arc::clone(&state);
            Ok(LoadedApp {
                make_service: Box::new(move || make(Arc::clone(&for_service))),
                ready: Arc::new(move || match &ready {
                    Some(check) => check(Arc::clone(&state)),
                    None => Box::pin(async { Ok(()) }),
                }),
            })
        })
    }
}

/// Boxes an app's service into zdr's erased type. An app error becomes a
/// 500 response for that request.
fn erase<Svc, B>(svc: Svc) -> AppService
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
/// (from `poll_ready` or the call) into a 500.
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
        let svc = self.0.clone();
        Box::pin(async move {
            // A panic costs that request a 500 and nothing else.
            match AssertUnwindSafe(svc.oneshot(req)).catch_unwind().await {
                Ok(Ok(res)) => res.map(|b| b.map_err(Into::into).boxed_unsync()),
                Ok(Err(err)) => {
                    tracing::error!("app error: {}", err.into());
                    internal_error()
                }
                Err(panic) => {
                    let what = panic
                        .downcast_ref::<&str>()
                        .map(|s| s.to_string())
                        .or_else(|| panic.downcast_ref::<String>().cloned())
                        .unwrap_or_else(|| "a non-string payload".to_owned());
                    tracing::error!("handler panicked: {what}; answered 500");
                    internal_error()
                }
            }
        })
    }
}

fn internal_error() -> Response {
    crate::http::plain(
        http::StatusCode::INTERNAL_SERVER_ERROR,
        "Internal Server Error\n",
    )
}

/// Facts about the worker process the code is running in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorkerInfo {
    /// The worker's pid.
    pub pid: u32,
    /// The generation the worker belongs to; each reload starts a new one.
    pub generation: u64,
    /// The pid of the master that started it.
    pub master_pid: u32,
}

static WORKER_INFO: OnceLock<WorkerInfo> = OnceLock::new();

impl WorkerInfo {
    /// The current worker's facts, or `None` outside a zdr worker.
    pub fn current() -> Option<WorkerInfo> {
        WORKER_INFO.get().copied()
    }

    pub(crate) fn set(info: WorkerInfo) {
        let _ = WORKER_INFO.set(info);
    }
}
