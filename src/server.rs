//! The public entry point: [`Server`], the builder an app's `main` hands
//! its steps to (see [`crate::app`] for what each step does), and that
//! makes the program a complete zdr server with the whole CLI.

use std::future::Future;
use std::process::ExitCode;
use std::sync::Arc;

use bytes::Bytes;

use crate::app::{erase, AppService, BoxError, BoxFuture, LoadedApp, Loader, Request};

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
    version: Option<String>,
    load: Arc<dyn Fn() -> Result<S, BoxError> + Send + Sync>,
    service: Option<MakeService<S>>,
    ready: Option<Ready<S>>,
    client_info: bool,
}

impl<S> std::fmt::Debug for Server<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("name", &self.name)
            .field("version", &self.version)
            .field("service", &self.service.is_some())
            .field("ready", &self.ready.is_some())
            .field("client_info", &self.client_info)
            .finish_non_exhaustive()
    }
}

impl Server<()> {
    /// A server for the app called `name` (used in `--help` and logs).
    pub fn new(name: impl Into<String>) -> Server<()> {
        Server {
            name: name.into(),
            version: None,
            load: Arc::new(|| Ok(())),
            service: None,
            ready: None,
            client_info: false,
        }
    }
}

impl<S: Send + Sync + 'static> Server<S> {
    /// Sets the load step, which builds the state shared by the service.
    /// Call it before [`Server::service`] and [`Server::ready`], which
    /// receive its result.
    ///
    /// Every step returns its errors as a [`BoxError`], so that `?` works
    /// on any error type (an `anyhow::Error` or an `std::io::Error` alike);
    /// zdr logs the error with its chain of causes.
    pub fn load<T, F>(self, load: F) -> Server<T>
    where
        T: Send + Sync + 'static,
        F: Fn() -> Result<T, BoxError> + Send + Sync + 'static,
    {
        Server {
            name: self.name,
            version: self.version,
            load: Arc::new(load),
            service: None,
            ready: None,
            client_info: self.client_info,
        }
    }

    /// Sets the app's version, which `--version` and `--help` show
    /// (`env!("CARGO_PKG_VERSION")` in the app's `main`), beside zdr's.
    pub fn version(mut self, version: impl Into<String>) -> Self {
        self.version = Some(version.into());
        self
    }

    /// Sets the per-worker step that builds the service, inside the
    /// worker's runtime. Any `tower::Service` over [`Request`] whose
    /// response body yields [`Bytes`] will do, an axum `Router` included.
    pub fn service<F, Fut, Svc, B>(mut self, make: F) -> Self
    where
        F: Fn(Arc<S>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Svc, BoxError>> + Send + 'static,
        Svc: tower::Service<Request, Response = http::Response<B>> + Clone + Send + Sync + 'static,
        Svc::Future: Send + 'static,
        Svc::Error: Into<BoxError>,
        B: http_body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        let make = Arc::new(make);
        self.service = Some(Arc::new(move |state: Arc<S>| {
            let fut = make(state);
            Box::pin(async move { Ok(erase(fut.await.map_err(anyhow::Error::from_boxed)?)) })
                as BoxFuture<_>
        }));
        self
    }

    /// Asks for each request's client: every request then carries a
    /// [`crate::ClientInfo`] in its extensions (its address and scheme,
    /// from trusted forwarding headers where `--forwarded-allow-ips` says
    /// so, and when its connection expires), as axum's `ConnectInfo` does.
    /// An axum handler takes it as `Extension<zdr::ClientInfo>`. An app
    /// that does not ask pays nothing for it per request; zdr's own access
    /// log and metrics know the client either way.
    ///
    /// ```no_run
    /// # use std::sync::Arc;
    /// zdr::Server::new("hello")
    ///     .client_info()
    ///     .service(|_: Arc<()>| async move {
    ///         Ok(tower::service_fn(|req: zdr::Request| async move {
    ///             let who = req
    ///                 .extensions()
    ///                 .get::<zdr::ClientInfo>()
    ///                 .and_then(|c| c.addr)
    ///                 .map_or_else(|| "unknown".to_owned(), |ip| ip.to_string());
    ///             Ok::<_, std::convert::Infallible>(http::Response::new(who))
    ///         }))
    ///     });
    /// ```
    pub fn client_info(mut self) -> Self {
        self.client_info = true;
        self
    }

    /// Sets the readiness check. It must pass before a worker accepts
    /// connections; it is retried until the boot timeout.
    pub fn ready<F, Fut>(mut self, ready: F) -> Self
    where
        F: Fn(Arc<S>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), BoxError>> + Send + 'static,
    {
        self.ready = Some(Arc::new(move |state| {
            let check = ready(state);
            Box::pin(async move { check.await.map_err(anyhow::Error::from_boxed) }) as BoxFuture<_>
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
        ExitCode::from(self.run_for_status(args))
    }

    /// As [`Server::run_with_args`], returning the exit status as a number,
    /// for a host that ends the process itself (the Python wheel's
    /// extension module, which exits without finalising its interpreter).
    pub fn run_for_status(self, args: Vec<std::ffi::OsString>) -> u8 {
        let name = self.name.clone();
        let version = self.version.clone();
        let loader = self.into_loader();
        crate::cli::main(&name, version.as_deref(), loader, args)
    }

    fn into_loader(self) -> Loader {
        let Server {
            load,
            service,
            ready,
            client_info,
            ..
        } = self;
        Arc::new(move || {
            let make = service.clone().ok_or_else(|| {
                anyhow::anyhow!("the app gave zdr no service (call Server::service)")
            })?;
            let state = Arc::new(load().map_err(anyhow::Error::from_boxed)?);
            let ready = ready.clone();
            let for_service = Arc::clone(&state);
            Ok(LoadedApp {
                silence: None,
                make_service: Box::new(move || make(Arc::clone(&for_service))),
                ready: Arc::new(move || match &ready {
                    Some(check) => check(Arc::clone(&state)),
                    None => Box::pin(async { Ok(()) }),
                }),
                client_info,
                stop: None,
            })
        })
    }
}
