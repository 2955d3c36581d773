//! The built-in demo app that `zdr serve` runs, to watch reloads and
//! draining from a terminal:
//!
//! - `GET /` answers which worker (pid) and generation served it, which
//!   process ran the load step (the master's pid under `--preload`), and
//!   the client's address and scheme as zdr resolved them.
//! - `GET /slow?ms=N` answers the same after N ms (at most 60 000).
//! - `POST /` (or `/upload`) reads the whole request body, then answers as
//!   `GET /` does, plus `received=BYTES`: a request stays in flight for as
//!   long as its client takes to send the body. A POST anywhere else is
//!   answered 405 at once, without reading its body, as many apps answer
//!   (an upload refused before it is read).
//! - `GET /echo` with `Connection: upgrade` and `Upgrade: echo` switches
//!   protocols and echoes every byte back until the client closes: an
//!   upgraded connection, like a WebSocket, that a reload leaves open until
//!   the graceful timeout.
//! - `GET /panic` panics in the handler: the request gets a 500, the worker
//!   goes on.
//! - `GET /alloc?mb=N` makes the worker hold N more megabytes (at most
//!   1024), to watch `--max-worker-memory` recycle it.
//! - `GET /bytes?n=N` answers N bytes (at most 256 MiB) of the alphabet
//!   over and over, as one buffer: a large download, to read slowly across
//!   a reload (the worker keeps the longest it has made, and answers
//!   slices of it).
//! - `GET /block?ms=N` blocks the worker's runtime thread for N ms (at most
//!   60 000), as a handler with a blocking call would: with `--threads 1`
//!   and `--timeout` shorter than N, the master kills and replaces it.
//!
//! - `GET /error` makes the service return an error, which zdr answers
//!   with a 500.
//!
//! Every answer names the worker (`pid=`), its `generation=`, the process
//! that ran the load step (`loaded_in=`) and how many times that process
//! has run it (`loads=`: with `--preload`, each reload runs it again in
//! the master).
//!
//! Environment variables shape it, to try out start-up failures, slow
//! boots and readiness: `ZDR_DEMO_MESSAGE` (added to every answer),
//! `ZDR_DEMO_LOAD_ERROR` (the load step fails with this message),
//! `ZDR_DEMO_BOOT_MS` (each worker takes this long to build its service),
//! `ZDR_DEMO_BOOT_FAIL_FILE` (while this file exists, a booting worker fails
//! to build its service and exits), `ZDR_DEMO_UNREADY_FILE` (while this
//! file exists, the readiness check fails: a booting worker waits, a
//! serving one answers 503 on the readiness probe), and, to try out a
//! canary, `ZDR_DEMO_ERROR_RATE` (this fraction, 0 to 1, of the answers
//! to `GET /` are 500s naming their generation) and `ZDR_DEMO_LATENCY_MS`
//! (added to every answer). Set them with `raw_env` in the config file to
//! have a reload change them.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, StatusCode};
use http_body_util::Full;

use zdr::{Request, Server, WorkerInfo};

const MAX_MS: u64 = 60_000;

/// The demo app's shared state.
#[derive(Debug)]
pub struct Demo {
    loaded_in: u32,
    loads: u64,
    message: String,
    boot_delay: Duration,
    /// The fraction of answers that are injected 500s.
    error_rate: f64,
    /// Added to every answer.
    latency: Duration,
    boot_fail_file: Option<PathBuf>,
    unready_file: Option<PathBuf>,
}

/// How many times this process has run the load step.
static LOADS: AtomicU64 = AtomicU64::new(0);

/// The demo's way of saying that the service failed (answered with a 500).
#[derive(Debug)]
struct DemoError;

impl std::fmt::Display for DemoError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the demo app was asked to fail")
    }
}

impl std::error::Error for DemoError {}

impl Demo {
    /// The demo's load step: its settings from the environment.
    pub(crate) fn from_env() -> Demo {
        let boot_ms = std::env::var("ZDR_DEMO_BOOT_MS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        Demo {
            loaded_in: std::process::id(),
            loads: LOADS.fetch_add(1, Ordering::Relaxed) + 1,
            message: std::env::var("ZDR_DEMO_MESSAGE").unwrap_or_default(),
            boot_delay: Duration::from_millis(boot_ms),
            error_rate: std::env::var("ZDR_DEMO_ERROR_RATE")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(0.0),
            latency: Duration::from_millis(
                std::env::var("ZDR_DEMO_LATENCY_MS")
                    .ok()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0),
            ),
            boot_fail_file: std::env::var_os("ZDR_DEMO_BOOT_FAIL_FILE").map(PathBuf::from),
            unready_file: std::env::var_os("ZDR_DEMO_UNREADY_FILE").map(PathBuf::from),
        }
    }
}

/// The demo app as a zdr server.
pub fn server() -> Server<Demo> {
    Server::new("demo")
        // It shows each request's client.
        .client_info()
        .load(|| {
            if let Ok(msg) = std::env::var("ZDR_DEMO_LOAD_ERROR") {
                return Err(format!("demo app: {msg}").into());
            }
            Ok(Demo::from_env())
        })
        .service(|demo: Arc<Demo>| async move {
            tokio::time::sleep(demo.boot_delay).await;
            if let Some(file) = demo.boot_fail_file.as_ref().filter(|f| f.exists()) {
                return Err(format!("demo app: {} exists", file.display()).into());
            }
            Ok(tower::service_fn(move |req: Request| route(&demo, req)))
        })
        .ready(|demo: Arc<Demo>| async move {
            match demo.unready_file.as_ref().filter(|f| f.exists()) {
                Some(file) => Err(format!("{} exists", file.display()).into()),
                None => Ok(()),
            }
        })
}

/// Whether this answer is one of the injected errors: a deterministic
/// share `rate` of the answers, counted per worker.
fn injected_error(rate: f64) -> bool {
    static ANSWERS: AtomicU64 = AtomicU64::new(0);
    let n = ANSWERS.fetch_add(1, Ordering::Relaxed) as f64;
    // The error count goes up by one each time n * rate crosses a whole
    // number.
    ((n + 1.0) * rate).floor() > (n * rate).floor()
}

/// `n` bytes of the alphabet over and over, for `/bytes`: a slice of the
/// longest run built so far in this worker, so that a download costs the
/// worker its sending, not its making.
fn alphabet(n: usize) -> Bytes {
    static RUN: std::sync::Mutex<Bytes> = std::sync::Mutex::new(Bytes::new());
    let Ok(mut run) = RUN.lock() else {
        return Bytes::new();
    };
    if run.len() < n {
        *run = (0..n).map(|i| b'a' + (i % 26) as u8).collect();
    }
    run.slice(..n)
}

/// Memory that `/alloc` holds on to.
static HELD: std::sync::Mutex<Vec<Vec<u8>>> = std::sync::Mutex::new(Vec::new());

fn query_param(req: &Request, name: &str) -> u64 {
    req.uri()
        .query()
        .unwrap_or("")
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == name)
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0)
}

fn query_ms(req: &Request) -> u64 {
    query_param(req, "ms").min(MAX_MS)
}

/// What the demo answers with.
type Answer = Result<http::Response<Full<Bytes>>, DemoError>;

/// Answers the plain `GET /` (the benchmarks' request) at once, with no
/// future to speak of; everything else in a boxed one.
fn route(
    demo: &Arc<Demo>,
    req: Request,
) -> futures_util::future::Either<
    std::future::Ready<Answer>,
    std::pin::Pin<Box<dyn std::future::Future<Output = Answer> + Send>>,
> {
    use futures_util::future::Either;
    let plain = req.method() == Method::GET
        && req.uri().path() == "/"
        && demo.latency.is_zero()
        && demo.error_rate == 0.0;
    if plain {
        let client = req.extensions().get::<zdr::ClientInfo>();
        return Either::Left(std::future::ready(Ok(hello(demo, client, None))));
    }
    Either::Right(Box::pin(handle(Arc::clone(demo), req)))
}

/// The demo's usual answer: who served the request, and for whom. (The
/// benchmarks' bare hyper server answers with this very function.)
pub(crate) fn hello(
    demo: &Demo,
    client: Option<&zdr::ClientInfo>,
    received: Option<usize>,
) -> http::Response<Full<Bytes>> {
    let info = WorkerInfo::current();
    let body = format!(
        "pid={} generation={} loaded_in={} loads={} client={} scheme={}{}{}{}\n",
        info.map(|i| i.pid).unwrap_or_else(std::process::id),
        info.map(|i| i.generation).unwrap_or(0),
        demo.loaded_in,
        demo.loads,
        client
            .and_then(|c| c.addr)
            .map_or_else(|| "-".to_owned(), |a| a.to_string()),
        client.map_or("http", |c| c.scheme),
        if demo.message.is_empty() {
            ""
        } else {
            " message="
        },
        demo.message,
        received.map_or_else(String::new, |n| format!(" received={n}")),
    );
    reply(StatusCode::OK, body)
}

async fn handle(demo: Arc<Demo>, req: Request) -> Answer {
    let mut received = None;
    match (req.method(), req.uri().path()) {
        (&Method::GET | &Method::HEAD, _) => {}
        (&Method::POST, "/" | "/upload") => {}
        _ => {
            return Ok(reply(
                StatusCode::METHOD_NOT_ALLOWED,
                "method not allowed\n".into(),
            ))
        }
    }
    if !demo.latency.is_zero() {
        tokio::time::sleep(demo.latency).await;
    }
    if demo.error_rate > 0.0 && req.uri().path() == "/" && injected_error(demo.error_rate) {
        let generation = WorkerInfo::current().map_or(0, |i| i.generation);
        return Ok(reply(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("injected error generation={generation}\n"),
        ));
    }
    let client = req.extensions().get::<zdr::ClientInfo>().cloned();
    match req.uri().path() {
        "/" | "/upload" if req.method() == Method::POST => {
            use http_body_util::BodyExt;
            match req.into_body().collect().await {
                Ok(body) => received = Some(body.to_bytes().len()),
                Err(e) => {
                    return Ok(reply(
                        StatusCode::BAD_REQUEST,
                        format!("cannot read the body: {e}\n"),
                    ))
                }
            }
        }
        "/" => {}
        "/echo" => return Ok(echo(req)),
        "/bytes" => {
            let n = query_param(&req, "n").min(256 << 20) as usize;
            return Ok(http::Response::new(Full::new(alphabet(n))));
        }
        "/slow" => tokio::time::sleep(Duration::from_millis(query_ms(&req))).await,
        "/block" => std::thread::sleep(Duration::from_millis(query_ms(&req))),
        "/panic" => panic!("the demo app was asked to panic"),
        "/error" => return Err(DemoError),
        "/alloc" => {
            let mb = query_param(&req, "mb").min(1024) as usize;
            // Touched, so that it is resident; kept until the worker exits.
            HELD.lock()
                .map(|mut held| held.push(vec![1u8; mb << 20]))
                .ok();
        }
        _ => return Ok(reply(StatusCode::NOT_FOUND, "not found\n".into())),
    }
    Ok(hello(&demo, client.as_ref(), received))
}

/// Upgrades the connection to a byte echo.
fn echo(mut req: Request) -> http::Response<Full<Bytes>> {
    let wants = req
        .headers()
        .get(http::header::UPGRADE)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"echo"));
    if !wants {
        return reply(
            StatusCode::UPGRADE_REQUIRED,
            "send Connection: upgrade and Upgrade: echo\n".into(),
        );
    }
    let upgrade = hyper::upgrade::on(&mut req);
    // zdr cannot close an upgraded connection without breaking it. Asked
    // to (`/echo?polite=1`), the echo ends it itself when its worker drains
    // or the connection ages; else it lasts until the client leaves.
    let polite = query_param(&req, "polite") == 1;
    let leave = match req.extensions().get::<zdr::ClientInfo>() {
        Some(client) if polite => {
            futures_util::future::Either::Left(WorkerInfo::draining_or_aged(client))
        }
        _ => futures_util::future::Either::Right(std::future::pending()),
    };
    tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let Ok(upgraded) = upgrade.await else { return };
        let mut io = hyper_util::rt::TokioIo::new(upgraded);
        let mut buf = [0u8; 1024];
        tokio::pin!(leave);
        loop {
            tokio::select! {
                read = io.read(&mut buf) => match read {
                    Ok(n) if n > 0 && io.write_all(&buf[..n]).await.is_ok() => {}
                    _ => break,
                },
                () = &mut leave => {
                    let _ = io.shutdown().await;
                    break;
                }
            }
        }
    });
    let mut res = reply(StatusCode::SWITCHING_PROTOCOLS, String::new());
    res.headers_mut().insert(
        http::header::CONNECTION,
        http::HeaderValue::from_static("upgrade"),
    );
    res.headers_mut().insert(
        http::header::UPGRADE,
        http::HeaderValue::from_static("echo"),
    );
    res
}

fn reply(status: StatusCode, body: String) -> http::Response<Full<Bytes>> {
    let mut res = http::Response::new(Full::new(Bytes::from(body)));
    *res.status_mut() = status;
    res.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    res
}
