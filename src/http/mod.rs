//! Serving one connection with hyper: HTTP/1.1 with keep-alive and HTTP/2
//! (h2c), the keep-alive idle timeout, request accounting, the access log,
//! and draining without racing a client.
//!
//! Draining a connection:
//! - HTTP/1 with a request in flight: the response carries
//!   `Connection: close` and the connection closes after it.
//! - HTTP/1 idle: closing now would race a client that is just sending its
//!   next request on it. The connection stays open for a short grace
//!   (at most the keep-alive timeout, capped at one second); a request that
//!   arrives meanwhile is served with `Connection: close`, and one that
//!   does not arrive finds the connection closed as after any keep-alive
//!   timeout.
//! - HTTP/2: GOAWAY, sent at a moment with no stream in flight if one comes
//!   within the same grace, else at its end. At such a moment zdr writes a
//!   single GOAWAY naming the last stream the client opened and closes
//!   (`conn::Conn::shutdown_idle`): a client's next request is retried on a
//!   new connection, and clients that fail on a PING after GOAWAY (Python's
//!   `h2`, under httpx) never see one. With streams in flight at the
//!   grace's end, hyper's graceful shutdown (GOAWAY, PING, final GOAWAY)
//!   lets them finish. A client that never answers the PING does not hold
//!   the connection: once nothing is in flight, it closes after the
//!   grace.
//!
//! A worker that leaves while another is ready (recycled, scaled down, or
//! the old generation of a reload) does not close its plain HTTP/1.1
//! connections: at a moment between requests (nothing in flight, the last
//! answer written out to its end, no request body left unread, the client
//! not closing) it hands each one to a ready worker through the
//! server's queue ([`crate::handoff`]), with the bytes of the next request
//! already read. A request in flight is answered first, without
//! `Connection: close`. An idle connection that finds no such moment within
//! the grace, or no ready worker, drains as above; so does every connection
//! when the server stops.
//!
//! Every close is a lingering close (see the worker's connection wrapper).

pub mod access_log;
mod conn;
pub(crate) mod io;
mod life;
mod limits;
pub(crate) mod lot;

pub(crate) use life::MaxAge;
use life::{Facts, Handed, Handing, Life, Nudge, Step, Woke, REBALANCE_WAIT};
pub(crate) use limits::Limits;
use lot::Resume;
pub(crate) mod placement;
pub(crate) mod shed;

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use http::header::{HeaderValue, CONNECTION, CONTENT_LENGTH};
use http::{StatusCode, Version};
use http_body::Body as _;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::app::{plain, AppService, Request, Response};
use crate::config::Settings;
use crate::scoreboard::Slot;
use access_log::{AccessLog, Entry};
pub(crate) use conn::Builders;
use conn::{Conn, ConnIo};

/// hyper's default cap on header fields (Gunicorn's default too).
/// hyper's default cap on header fields (Gunicorn's default too).
const HYPER_MAX_HEADERS: usize = 100;

/// What every connection of a worker shares.
pub(crate) struct Shared {
    pub(crate) service: AppService,
    pub(crate) builders: Builders,
    pub(crate) keepalive: Duration,
    pub(crate) access_log: Option<AccessLog>,
    pub(crate) board: &'static crate::scoreboard::Scoreboard,
    pub(crate) slot_index: usize,
    pub(crate) slot: &'static Slot,
    /// Where the worker names its requests in flight, for the master's
    /// account of a worker killed at `--timeout`.
    pub(crate) begun: Option<&'static crate::scoreboard::Begun>,
    /// Every request carries its [`crate::ClientInfo`] (the app asked).
    pub(crate) client_info: bool,
    /// When this worker is recycled, if ever.
    pub(crate) request_limit: Option<crate::recycle::RequestLimit>,
    /// Called when the request count nears the limit and when it reaches
    /// it (see [`crate::recycle::RequestLimit::rings_at`]).
    pub(crate) on_limit: Box<dyn Fn() + Send + Sync>,
    /// The health probes' paths ("" for off).
    pub(crate) probes: Probes,
    /// Limits on request heads and bodies.
    pub(crate) limits: Limits,
    /// Whose forwarding headers to trust.
    pub(crate) forwarded: crate::forwarded::AllowList,
    /// The TLS acceptor, when serving HTTPS.
    pub(crate) tls: Option<tokio_rustls::TlsAcceptor>,
    /// How long a client gets to send a request's head (and finish the TLS
    /// handshake).
    pub(crate) header_timeout: Duration,
    /// The longest a connection lives (`--max-connection-age`), its
    /// jitter, and the grace an aged HTTP/2 connection gets after GOAWAY.
    pub(crate) max_age: Option<MaxAge>,
    /// How long a request body may wait for the client's next byte.
    pub(crate) body_timeout: Option<Duration>,
    /// How long a response may wait for the client to take more of it.
    pub(crate) send_timeout: Option<Duration>,
    /// How long the app may take to a response head (`--request-timeout`).
    pub(crate) request_timeout: Option<Duration>,
    /// Overload shedding (`--max-queue-time`), when on.
    pub(crate) shed: Option<shed::Shedder>,
    /// The server's handoff queue: an idle HTTP/1.1 connection of a worker
    /// that leaves while other workers stay is handed to one of them.
    pub(crate) handoff: Option<Arc<crate::handoff::Queue>>,
    /// The worker's nudges to its connections: make room for waiting
    /// clients, move for balance (see [`placement`]).
    pub(crate) placement: placement::Placement,
    /// Its idle HTTP/1.1 connections parked out of their tasks.
    pub(crate) lot: lot::Lot,
    /// The app's readiness check.
    pub(crate) ready: Arc<dyn Fn() -> crate::app::BoxFuture<anyhow::Result<()>> + Send + Sync>,
}

/// The paths of the health probes a worker answers itself.
pub(crate) struct Probes {
    pub(crate) live: String,
    pub(crate) ready: String,
    pub(crate) startup: String,
}

impl Shared {
    /// The answer to a health probe, if `req` is one. Probes are neither
    /// counted as requests nor logged.
    fn probe(&self, req: &Request) -> Option<crate::app::BoxFuture<Response>> {
        if req.method() != http::Method::GET && req.method() != http::Method::HEAD {
            return None;
        }
        let path = req.uri().path();
        let answer = |status, text: &'static str| -> crate::app::BoxFuture<Response> {
            Box::pin(std::future::ready(plain(status, text)))
        };
        if path == self.probes.live {
            Some(answer(StatusCode::OK, "live\n"))
        } else if path == self.probes.startup {
            Some(answer(StatusCode::OK, "started\n"))
        } else if path == self.probes.ready {
            if self.board.stopping() {
                return Some(answer(StatusCode::SERVICE_UNAVAILABLE, "stopping\n"));
            }
            if self.slot.state() == crate::scoreboard::SlotState::Draining {
                return Some(answer(StatusCode::SERVICE_UNAVAILABLE, "draining\n"));
            }
            let check = (self.ready)();
            Some(Box::pin(async move {
                match check.await {
                    Ok(()) => plain(StatusCode::OK, "ready\n"),
                    Err(e) => plain(
                        StatusCode::SERVICE_UNAVAILABLE,
                        format!("not ready: {e:#}\n"),
                    ),
                }
            }))
        } else {
            None
        }
    }
}

impl Shared {
    /// Configures hyper for these settings.
    pub(crate) fn builders(settings: &Settings) -> Builders {
        let mut http1 = hyper::server::conn::http1::Builder::new();
        http1
            .timer(TokioTimer::new())
            .keep_alive(true)
            // A client may shut its sending side once its request is out
            // (`nc -N`, some HTTP/1.0 clients): it still gets its answer.
            .half_close(true)
            // zdr's own per-connection timer enforces the header timeout,
            // without hyper re-arming one for every request.
            .header_read_timeout(None);
        // hyper's own limit is 100, kept on the stack; setting it at all
        // makes hyper allocate the header array for every request.
        if settings.limit_request_fields != HYPER_MAX_HEADERS {
            http1.max_headers(settings.limit_request_fields);
        }
        let mut http2 = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
        http2.timer(TokioTimer::new());
        // HTTP/2's own bound on a head (SETTINGS_MAX_HEADER_LIST_SIZE),
        // from the same limits; zdr checks each field and the count after
        // decoding.
        if settings.limit_request_field_size > 0 {
            let list = settings
                .limit_request_fields
                .saturating_mul(settings.limit_request_field_size);
            http2.max_header_list_size(u32::try_from(list).unwrap_or(u32::MAX));
        }
        Builders { http1, http2 }
    }
}

/// The peer as the access log names it.
#[derive(Clone)]
pub(crate) struct Peer {
    /// The peer's address; none over a Unix socket.
    pub(crate) ip: Option<std::net::IpAddr>,
    /// How it reached this worker: `http` or `https`.
    pub(crate) scheme: &'static str,
}

/// One connection's state, shared between its task and its requests.
#[derive(Default)]
struct ConnState {
    in_flight: AtomicUsize,
    /// When the last response finished ([`sys::monotonic_ns`]); 0 before
    /// the first.
    ///
    /// [`sys::monotonic_ns`]: crate::sys::monotonic_ns
    last_done_ns: AtomicU64,
    draining: AtomicBool,
    http2: AtomicBool,
    /// hyper has written something it has not flushed yet.
    unflushed: AtomicBool,
    /// hyper has begun to close the connection (the client asked to, or an
    /// HTTP/1.0 client did not ask to keep it): it is not handed over.
    closing: AtomicBool,
    /// The last response (a single buffer, or a streamed body that has
    /// ended) answered a request with no body left unread, while the
    /// connection stays open: once it is written, the connection is
    /// between requests and may be handed over.
    reusable: AtomicBool,
    /// HTTP/2: answers whose bodies hyper still holds (it drops each once
    /// it has sent the last of it to the connection).
    h2_bodies: AtomicUsize,
    /// Requests begun on it in this worker, for its rate (balance).
    requests: AtomicU64,
    /// When bytes to read last woke it, or it was accepted
    /// ([`sys::monotonic_ns`]): the earliest its next request can have
    /// been waiting since, for overload shedding (see [`shed`]).
    ///
    /// [`sys::monotonic_ns`]: crate::sys::monotonic_ns
    ready_ns: AtomicU64,
}

impl ConnState {
    /// Whether an HTTP/1.1 connection may be handed over now: nothing in
    /// flight, everything hyper wrote flushed, the client not closing, and
    /// either no request yet or a last answer that was a single buffer to a
    /// request whose body was read to its end. hyper then holds nothing of
    /// the connection but the bytes it read ahead.
    fn between_requests(&self) -> bool {
        self.in_flight.load(Ordering::Acquire) == 0
            && !self.unflushed.load(Ordering::Relaxed)
            && !self.closing.load(Ordering::Relaxed)
            && (self.reusable.load(Ordering::Relaxed)
                || self.last_done_ns.load(Ordering::Relaxed) == 0)
    }
}

/// Decrements a connection's in-flight count however the request ends.
struct InFlight {
    conn: Arc<ConnState>,
    /// The worker's slot, once the request counts there.
    slot: Option<&'static Slot>,
    /// The request's number in the worker, once it is named in
    /// [`Shared::begun`].
    named: Option<(&'static crate::scoreboard::Begun, u64)>,
    /// When the response was ready, if it was (the clock is read once).
    done: Option<u64>,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if let Some(slot) = self.slot {
            slot.end_request();
        }
        if let Some((begun, number)) = self.named {
            begun.end(number);
        }
        let done = self.done.unwrap_or_else(crate::sys::monotonic_ns);
        self.conn.last_done_ns.store(done.max(1), Ordering::Relaxed);
        self.conn.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

#[derive(Clone)]
struct ConnService {
    shared: Arc<Shared>,
    conn: Arc<ConnState>,
    /// How its requests resolve their client, decided once per connection.
    client: crate::forwarded::PeerRule,
    /// Request extensions holding the connection's own client, when the
    /// app asked for its requests' clients ([`Shared::client_info`]):
    /// cloned into each request whose client it is, which costs less than
    /// building them anew (a map per request, as `http` makes them).
    extensions: Option<http::Extensions>,
}

impl hyper::service::Service<http::Request<hyper::body::Incoming>> for ConnService {
    type Response = Response;
    type Error = Infallible;
    type Future = ConnFuture;

    fn call(&self, req: http::Request<hyper::body::Incoming>) -> ConnFuture {
        self.conn.in_flight.fetch_add(1, Ordering::AcqRel);
        self.conn.requests.fetch_add(1, Ordering::Relaxed);
        let mut guard = Some(InFlight {
            conn: Arc::clone(&self.conn),
            slot: None,
            named: None,
            done: None,
        });
        let version = req.version();
        let (parts, incoming) = req.into_parts();
        let (body, watch) = crate::body::RequestBody::new(
            incoming,
            self.shared.limits.body,
            self.shared.body_timeout,
            self.shared.board,
        );
        let mut req = Request::from_parts(parts, body);
        if let Some(probe) = self.shared.probe(&req) {
            return ConnFuture {
                inner: probe,
                guard,
                version,
                head: req.method() == http::Method::HEAD,
                body: None,
                log: None,
                metrics: None,
                queued: None,
            };
        }
        let refusal = self.shared.limits.check(&req);
        let req_is_head = req.method() == http::Method::HEAD;
        // The client as forwarding headers say, read only for those who
        // use it: the access log and an app that asked for it.
        let forwarded = if self.extensions.is_some() || self.shared.access_log.is_some() {
            self.client.forwarded(req.headers())
        } else {
            None
        };
        let client = forwarded.as_ref().unwrap_or(self.client.direct());
        let started = self.shared.slot.begin_request();
        // One clock read per request, for the metrics, the access log and
        // the master's account of a hung worker.
        let began = crate::sys::monotonic_ns();
        if let Some(g) = &mut guard {
            g.slot = Some(self.shared.slot);
            if let Some(begun) = self.shared.begun {
                begun.begin(
                    started,
                    began / 1_000_000,
                    req.method().as_str(),
                    req.uri().path(),
                );
                g.named = Some((begun, started));
            }
        }
        if let Some(limit) = &self.shared.request_limit {
            if limit.rings_at(started) {
                (self.shared.on_limit)();
            }
        }
        if version == Version::HTTP_2 {
            self.conn.http2.store(true, Ordering::Relaxed);
        } else if self.shared.placement.is_crowded() && !self.conn.draining.load(Ordering::Relaxed)
        {
            // Clients wait for a slot: this connection takes its turn
            // again after reconnecting (see `placement`).
            self.conn.draining.store(true, Ordering::Relaxed);
            self.shared
                .board
                .count_made_room(crate::metrics::MadeRoom::Rotated);
        }
        let log = self.shared.access_log.is_some().then(|| {
            Box::new(LogFacts {
                shared: Arc::clone(&self.shared),
                client: client
                    .addr
                    .map_or_else(|| "-".to_owned(), |ip| ip.to_string()),
                method: req.method().clone(),
                uri: req.uri().clone(),
                headers: req.headers().clone(),
            })
        });
        let inner: crate::app::BoxFuture<Response> = match refusal {
            // Refused without reading the rest: the connection closes after.
            Some((status, text)) => {
                let mut res = plain(status, text);
                res.headers_mut()
                    .insert(CONNECTION, HeaderValue::from_static("close"));
                Box::pin(std::future::ready(res))
            }
            None => {
                if let Some(extensions) = &self.extensions {
                    match forwarded {
                        Some(client) => {
                            req.extensions_mut().insert(client);
                        }
                        None => req.extensions_mut().extend(extensions.clone()),
                    }
                }
                match self.shared.request_timeout {
                    Some(limit) => {
                        let what = (req.method().clone(), req.uri().clone());
                        let answer = self.shared.service.call(req);
                        Box::pin(within(limit, answer, self.shared.board, what))
                    }
                    None => self.shared.service.call(req),
                }
            }
        };
        // Shedding is decided at the app's first poll, which an HTTP/2
        // stream reaches only once its own task runs.
        let queued = self
            .shared
            .shed
            .as_ref()
            .filter(|_| refusal.is_none())
            .map(|_| {
                Box::new(Queued {
                    shared: Arc::clone(&self.shared),
                    since_ns: self
                        .conn
                        .ready_ns
                        .load(Ordering::Relaxed)
                        .max(self.conn.last_done_ns.load(Ordering::Relaxed)),
                    started_ns: 0,
                    place: shed::Place::default(),
                    yielding: None,
                    body_left: watch.is_some(),
                })
            });
        ConnFuture {
            inner,
            guard,
            version,
            head: req_is_head,
            body: watch,
            log,
            metrics: Some((self.shared.slot, began)),
            queued,
        }
    }
}

/// A request's place in a shedding worker's queue.
struct Queued {
    shared: Arc<Shared>,
    /// The earliest it can have been waiting since.
    since_ns: u64,
    /// When the app was first polled on it; 0 before.
    started_ns: u64,
    /// Its place in the queue when the worker is overloaded (see
    /// [`shed`]).
    place: shed::Place,
    /// Its yield to the worker's other work, under way.
    yielding: Option<Pin<Box<dyn Future<Output = ()> + Send>>>,
    /// It has a body the app has not read.
    body_left: bool,
}

impl Queued {
    /// The app is about to be polled on the request: whether it is.
    fn start(&mut self) -> shed::Verdict {
        let Some(shedder) = &self.shared.shed else {
            return shed::Verdict::Start;
        };
        let now = crate::sys::monotonic_ns().max(1);
        let verdict = shedder.decide(now, now.saturating_sub(self.since_ns), &mut self.place);
        if verdict == shed::Verdict::Start {
            self.started_ns = now;
        }
        verdict
    }

    /// The answer to it, shed.
    fn answer(&self) -> Response {
        let waited = crate::sys::monotonic_ns().saturating_sub(self.since_ns);
        match &self.shared.shed {
            Some(shedder) => shedder.answer(self.shared.board, waited, self.body_left),
            None => plain(StatusCode::SERVICE_UNAVAILABLE, "Service Unavailable\n"),
        }
    }

    /// The app answered the request it was started on.
    fn answered(self) {
        if let Some(shedder) = &self.shared.shed {
            shedder.served(crate::sys::monotonic_ns().saturating_sub(self.started_ns));
        }
    }
}

/// The app's answer if it comes within `limit`; else 504, the app's work
/// on the request dropped (its future, and with it what it awaited), the
/// worker serving on. Counted, and said (at most once a second per
/// worker) with the request's method and path.
async fn within(
    limit: Duration,
    answer: crate::app::BoxFuture<Response>,
    board: &'static crate::scoreboard::Scoreboard,
    (method, uri): (http::Method, http::Uri),
) -> Response {
    if let Ok(res) = tokio::time::timeout(limit, answer).await {
        return res;
    }
    board.count_request_timeout();
    static LAST_SAID_MS: AtomicU64 = AtomicU64::new(0);
    if crate::logging::once_a_second(&LAST_SAID_MS) {
        tracing::warn!(
            event = crate::logging::LogEvent::RequestTimeout.name(),
            "worker {}: {method} {} was not answered within --request-timeout {:.1}s; \
             answered 504 (zdr_request_timeouts_total counts each)",
            std::process::id(),
            uri.path(),
            limit.as_secs_f64()
        );
    }
    plain(StatusCode::GATEWAY_TIMEOUT, "Gateway Timeout\n")
}

/// What the access log needs of a request, kept only when logging.
struct LogFacts {
    shared: Arc<Shared>,
    /// The client's address as resolved (through trusted proxies).
    client: String,
    method: http::Method,
    uri: http::Uri,
    headers: http::HeaderMap,
}

/// One request's response on its way: the app's future, then zdr's
/// finishing touches (`Connection: close` while draining, the access log).
pub(crate) struct ConnFuture {
    inner: crate::app::BoxFuture<Response>,
    guard: Option<InFlight>,
    version: Version,
    /// A HEAD request: the response keeps its length but loses its content.
    head: bool,
    /// What became of the request's body, when it has one.
    body: Option<Arc<crate::body::BodyWatch>>,
    log: Option<Box<LogFacts>>,
    /// Where to count the request, and when it started (not for probes).
    metrics: Option<(&'static Slot, u64)>,
    /// When shedding: how long it waited, decided at the first poll
    /// (boxed: every connection's task holds room for its future).
    queued: Option<Box<Queued>>,
}

impl Future for ConnFuture {
    type Output = Result<Response, Infallible>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        if let Some(q) = &mut self.queued {
            while q.started_ns == 0 {
                if let Some(yielding) = &mut q.yielding {
                    ready!(yielding.as_mut().poll(cx));
                    q.yielding = None;
                }
                match q.start() {
                    shed::Verdict::Start => {}
                    // Woken once the runtime has looked for I/O again.
                    shed::Verdict::Yield => q.yielding = Some(Box::pin(tokio::task::yield_now())),
                    shed::Verdict::Shed => {
                        let res = q.answer();
                        self.queued = None;
                        self.inner = Box::pin(std::future::ready(res));
                        break;
                    }
                }
            }
        }
        let mut res = ready!(self.inner.as_mut().poll(cx));
        if let Some(q) = self.queued.take() {
            // Shed from the app's own queue (a Python app's), which sheds
            // only when this worker does (`--max-queue-time`).
            if res.extensions_mut().remove::<shed::ShedMark>().is_some() {
                q.shared.board.count_shed();
            }
            q.answered();
        }
        let mut close = false;
        let mut body_done = true;
        if let Some(body) = self.body.take() {
            body_done = body.ended();
            if body.too_large() {
                // Whatever the app made of the error, the client sent too
                // much: it hears so, and the connection closes.
                res = plain(StatusCode::PAYLOAD_TOO_LARGE, "Payload Too Large\n");
                close = true;
            } else if body.timed_out() {
                res = plain(StatusCode::REQUEST_TIMEOUT, "Request Timeout\n");
                close = true;
            } else if body.broken() {
                // A malformed body is the client's fault (not a 5xx that
                // counts against the app or a canary).
                res = plain(StatusCode::BAD_REQUEST, "Bad Request\n");
                close = true;
            } else {
                close = body.must_close();
            }
        }
        without_forbidden_content(&mut res, self.head);
        let now = crate::sys::monotonic_ns();
        if let Some(g) = &mut self.guard {
            g.done = Some(now);
        }
        let elapsed = self.metrics.take().map(|(slot, began)| {
            let elapsed = Duration::from_nanos(now.saturating_sub(began));
            slot.record(res.status().as_u16(), elapsed);
            elapsed
        });
        let draining = self
            .guard
            .as_ref()
            .is_some_and(|g| g.conn.draining.load(Ordering::Relaxed));
        if self.version < Version::HTTP_2 && (draining || close) {
            res.headers_mut()
                .insert(CONNECTION, HeaderValue::from_static("close"));
        }
        if let (Some(g), true) = (&self.guard, self.version == Version::HTTP_2) {
            // The connection is idle only once hyper has let go of this
            // answer's body (see `Conn::shutdown_idle`).
            if !res.body().is_end_stream() {
                let conn = Arc::clone(&g.conn);
                conn.h2_bodies.fetch_add(1, Ordering::AcqRel);
                let body = std::mem::replace(res.body_mut(), crate::app::Body::empty());
                *res.body_mut() = body.on_drop(move || {
                    conn.h2_bodies.fetch_sub(1, Ordering::AcqRel);
                });
            }
        }
        if let Some(g) = &self.guard {
            // Once this answer is out, may the connection be handed over?
            // A single buffer is out with the head; a streamed body says
            // when it has ended.
            let eligible = self.version < Version::HTTP_2 && !draining && !close && body_done;
            let single = res.body().is_single_buffer();
            g.conn.reusable.store(eligible && single, Ordering::Relaxed);
            if eligible && !single {
                let conn = Arc::clone(&g.conn);
                let body = std::mem::replace(res.body_mut(), crate::app::Body::empty());
                *res.body_mut() = body.on_end(move || conn.reusable.store(true, Ordering::Relaxed));
            }
        }
        if let Some(facts) = self.log.take() {
            if let Some(log) = &facts.shared.access_log {
                let body_len = res
                    .headers()
                    .get(CONTENT_LENGTH)
                    .and_then(|v| v.to_str().ok()?.parse().ok())
                    .or_else(|| res.body().size_hint().exact());
                log.log(&Entry {
                    peer: &facts.client,
                    method: &facts.method,
                    uri: &facts.uri,
                    version: self.version,
                    request_headers: &facts.headers,
                    status: res.status().as_u16(),
                    response_headers: res.headers(),
                    body_len,
                    elapsed: elapsed.unwrap_or_default(),
                });
            }
        }
        self.guard = None;
        Poll::Ready(Ok(res))
    }
}

/// Takes the content out of a response that must not have any, whatever
/// the app put in it (RFC 9110 §6.4.1 and §15; RFC 9113 §8.1): the answer
/// to HEAD keeps the length it would have had, a 304 keeps its length too,
/// 1xx and 204 carry no length, and 205 says 0. Over HTTP/2 a DATA frame
/// in such a response is a protocol error for the client.
fn without_forbidden_content(res: &mut Response, head: bool) {
    let status = res.status().as_u16();
    let empty_status = matches!(status, 100..=199 | 204 | 205 | 304);
    if !head && !empty_status {
        return;
    }
    if res.body().is_end_stream() && !head && status != 205 {
        if matches!(status, 100..=199 | 204) {
            res.headers_mut().remove(CONTENT_LENGTH);
        }
        return;
    }
    let length = res.body().size_hint().exact();
    *res.body_mut() = crate::app::Body::empty();
    let headers = res.headers_mut();
    match status {
        100..=199 | 204 => {
            headers.remove(CONTENT_LENGTH);
        }
        205 => {
            headers.insert(CONTENT_LENGTH, HeaderValue::from_static("0"));
        }
        _ => {
            if let (false, Some(n)) = (headers.contains_key(CONTENT_LENGTH), length) {
                headers.insert(CONTENT_LENGTH, HeaderValue::from(n));
            }
        }
    }
}

/// How a connection came to this worker.
pub(crate) enum Origin {
    /// Accepted from a listening socket, at this moment
    /// ([`crate::sys::monotonic_ns`]): its first request waited from then.
    Accepted { at_ns: u64 },
    /// Handed over by a leaving worker, between requests: HTTP/1.1, with
    /// the bytes of its next request it had already read, and its age;
    /// `hand_on` says whether this worker may hand it on when it leaves.
    Handed {
        carried: bytes::Bytes,
        age: Duration,
        hand_on: bool,
    },
    /// Parked in this worker's lot, resumed: with the first bytes of its
    /// next request when its client sent them.
    Resumed {
        resume: Resume,
        carried: bytes::Bytes,
    },
}

/// A connection's socket, as far as handing it to another worker goes.
pub(crate) trait Passable {
    /// Its descriptor and kind, if it can be handed over (a plain socket;
    /// not a TLS stream, whose session state lives in this process).
    fn passable(&self) -> Option<(std::os::fd::RawFd, crate::handoff::SocketKind)> {
        None
    }

    /// The socket as the worker's parking lot holds it, if it can be
    /// parked there (a plain socket; `None` for any other, which closes).
    fn into_plain(self) -> Option<std::io::Result<io::Plain>>
    where
        Self: Sized,
    {
        None
    }
}

/// Serves one connection until it closes, the keep-alive timeout passes,
/// draining closes it, or (when its worker leaves) it is handed to a
/// sibling.
pub(crate) async fn serve<I>(
    io: I,
    peer: Peer,
    shared: Arc<Shared>,
    mut drain: watch::Receiver<bool>,
    origin: Origin,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + Passable + 'static,
{
    let now = Instant::now();
    let now_ns = crate::sys::monotonic_ns();
    let conn_state = Arc::new(ConnState::default());
    // What the connection brings: where its age counts from, the bytes of
    // its next request already read, and how it came.
    let from_lot_idle = matches!(&origin, Origin::Resumed { carried, .. } if carried.is_empty());
    let (carried, fresh, resumed) = match origin {
        Origin::Accepted { at_ns } => {
            conn_state.ready_ns.store(at_ns, Ordering::Relaxed);
            (bytes::Bytes::new(), true, None)
        }
        Origin::Handed {
            carried,
            age,
            hand_on,
        } => {
            // Handed over between requests, its last response written: the
            // keep-alive timeout applies from now, not the first request's
            // header timeout, and it may be handed on at once.
            let epoch = now.checked_sub(age).unwrap_or(now);
            let resume = Resume {
                ip: peer.ip,
                epoch_ns: now_ns.saturating_sub(age.as_nanos() as u64),
                max_age_ns: shared
                    .max_age
                    .map_or(0, |m| lot::ns_at(epoch + m.for_connection(epoch))),
                arrived_ns: now_ns,
                last_done_ns: now_ns.max(1),
                requests: 0,
                handed: true,
                hand_on,
                // Taken back from the queue by its leaving worker: it waits
                // for its next request as long as a kept one does.
                patient: !hand_on,
                give: false,
            };
            (carried, false, Some(resume))
        }
        Origin::Resumed { resume, carried } => (carried, false, Some(resume)),
    };
    let hand_on = resumed.as_ref().is_none_or(|r| r.hand_on);
    if let Some(r) = &resumed {
        conn_state
            .last_done_ns
            .store(r.last_done_ns, Ordering::Relaxed);
        conn_state.requests.store(r.requests, Ordering::Relaxed);
        conn_state.reusable.store(true, Ordering::Relaxed);
        conn_state.ready_ns.store(now_ns, Ordering::Relaxed);
    }
    // A connection that can go to a sibling: plain HTTP/1.1, in a worker
    // with a handoff queue; one that can be parked out of its task: plain.
    let passable = shared
        .handoff
        .as_ref()
        .filter(|_| hand_on)
        .and_then(|queue| Some((queue, io.passable()?)));
    let plain = io.passable().is_some();
    let (epoch, max_age) = match &resumed {
        Some(r) => (
            lot::instant_at(r.epoch_ns),
            shared
                .max_age
                .filter(|_| r.max_age_ns != 0)
                .map(|m| (lot::instant_at(r.max_age_ns), m.grace)),
        ),
        None => (
            now,
            shared
                .max_age
                .map(|m| (now + m.for_connection(now), m.grace)),
        ),
    };
    let mut life = Life {
        epoch,
        header_timeout: shared.header_timeout,
        keepalive: shared.keepalive,
        max_age,
        drain_began: None,
        closing_since: None,
        goaway_waits: false,
        patient: resumed.as_ref().is_some_and(|r| r.patient),
        handing: resumed
            .as_ref()
            .filter(|r| r.give)
            .map(|_| Handing::Balance {
                until: now + REBALANCE_WAIT,
            }),
        movable: passable.is_some(),
        handed: resumed.as_ref().is_some_and(|r| r.handed),
        arrived: resumed
            .as_ref()
            .map_or(now, |r| lot::instant_at(r.arrived_ns)),
        rested: false,
    };
    let client = shared
        .forwarded
        .peer(peer.ip, peer.scheme)
        .expires(max_age.map(|(at, _)| at.into_std()));
    let extensions = shared.client_info.then(|| {
        let mut extensions = http::Extensions::new();
        extensions.insert(client.direct().clone());
        extensions
    });
    let service = ConnService {
        shared: Arc::clone(&shared),
        conn: Arc::clone(&conn_state),
        client,
        extensions,
    };
    let io = ConnIo::new(io, carried, Arc::clone(&conn_state), shared.shed.is_some());
    let mut conn = if fresh {
        Conn::new(io, service)
    } else {
        Conn::http1(&shared.builders, io, service)
    };
    // One timer per connection, re-armed lazily: it wakes once per period
    // at most, not once per request. What it means when it fires is
    // decided by the connection's `Life`.
    let first = match &resumed {
        None => epoch + shared.header_timeout.min(shared.keepalive),
        Some(_) => match facts(&conn_state, true).last_done {
            Some(done) => life.parked_until(done),
            None => now + shared.keepalive,
        },
    };
    let timer = tokio::time::sleep_until(max_age.map_or(first, |(at, _)| first.min(at)));
    tokio::pin!(timer);
    // The drain signal and the timer are polled only when they may have
    // fired (a version check, a state check), not on every wake-up of the
    // connection, which is once or more per request.
    let probe = drain.clone();
    let drain_fired = || probe.has_changed().unwrap_or(true);
    let drain_wait = drain.wait_for(|d| *d);
    tokio::pin!(drain_wait);
    let (mut drain_armed, mut timer_armed) = (false, false);
    // A nudge (see `placement`) wakes the connection only when one was
    // given (a counter compared on each wake-up; the wake-up is polled
    // only then).
    let nudge_wait = shared.placement.woken();
    tokio::pin!(nudge_wait);
    let (mut nudge_armed, mut nudge_seen) = (false, shared.placement.looks());
    // One resumed from the lot with nothing from its client (its deadline
    // passed, the worker drains, it moves) has that seen to before it may
    // park again.
    let mut parkable = !from_lot_idle;
    loop {
        let woke = std::future::poll_fn(|cx| {
            let park =
                (parkable && life.may_park(shared.slot.connections())).then_some(&*conn_state);
            let may_park = park.is_some();
            if conn.poll(cx, &shared.builders, park).is_ready() {
                return Poll::Ready(Woke::Closed);
            }
            if may_park && plain && conn.is_parked() && shared.lot.is_open() {
                return Poll::Ready(Woke::Parked);
            }
            if life.wants_moment() && conn_state.between_requests() {
                return Poll::Ready(Woke::BetweenRequests);
            }
            if !life.draining()
                && !life.wants_moment()
                && (!drain_armed || drain_fired())
                && drain_wait.as_mut().poll(cx).is_ready()
            {
                return Poll::Ready(Woke::Drain);
            }
            drain_armed = true;
            if (!nudge_armed || shared.placement.looks() != nudge_seen)
                && nudge_wait.as_mut().poll(cx).is_ready()
            {
                return Poll::Ready(Woke::Nudged);
            }
            nudge_armed = true;
            if (!timer_armed || timer.is_elapsed()) && timer.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Woke::Timer);
            }
            timer_armed = true;
            Poll::Pending
        })
        .await;
        parkable = true;
        let f = facts(&conn_state, conn.is_http1());
        let step = match woke {
            Woke::Closed => break,
            Woke::Parked => {
                // Out of its task, into the worker's lot, until its client
                // sends again (see `lot`).
                let Some(parts) = conn.take_http1() else {
                    break;
                };
                let resume = Resume {
                    ip: peer.ip,
                    epoch_ns: lot::ns_at(life.epoch),
                    max_age_ns: life.max_age.map_or(0, |(at, _)| lot::ns_at(at)),
                    arrived_ns: lot::ns_at(life.arrived),
                    last_done_ns: conn_state.last_done_ns.load(Ordering::Relaxed),
                    requests: f.requests,
                    handed: life.handed,
                    hand_on,
                    patient: life.patient,
                    give: false,
                };
                let until = lot::ns_at(life.parked_until(f.last_done.unwrap_or(f.now)));
                drop(parts.service);
                match parts.io.into_plain() {
                    Some(Ok(plain)) => {
                        if let Err(refused) = shared.lot.park(plain, resume, until) {
                            let (plain, resume) = *refused;
                            // The worker began to drain meanwhile.
                            lot::resume_in_task(
                                plain,
                                resume,
                                bytes::Bytes::new(),
                                &shared,
                                &probe,
                            );
                        }
                    }
                    Some(Err(e)) => tracing::debug!("cannot park a connection: {e}"),
                    // Not a plain socket after all: it ends here.
                    None => {}
                }
                return;
            }
            Woke::Nudged => {
                nudge_seen = shared.placement.looks();
                nudge_wait.set(shared.placement.woken());
                nudge_armed = false;
                let unflushed = conn_state.unflushed.load(Ordering::Relaxed);
                let (nudge, step) = life.nudged(&f, unflushed, &shared.placement);
                if matches!(nudge, Nudge::Close | Nudge::Drain) {
                    shared
                        .board
                        .count_made_room(crate::metrics::MadeRoom::IdleClosed);
                }
                step
            }
            Woke::Drain => life.worker_drains(
                &f,
                shared.board.stopping(),
                shared.board.has_ready_sibling(shared.slot_index),
            ),
            Woke::BetweenRequests => match (life.between_requests(&f), passable) {
                (Step::HandOver, Some((queue, (fd, kind)))) => {
                    // Boxed: its state (rare) is not carried by every
                    // connection's task.
                    let sent =
                        Box::pin(hand_over(&mut conn, &shared, queue, fd, kind, life.epoch)).await;
                    let how = match sent {
                        HandOver::Sent => Handed::Sent,
                        HandOver::NoSibling => Handed::NoSibling,
                        HandOver::Kept(parts) => {
                            let io = ConnIo::new(
                                parts.io,
                                parts.carried,
                                Arc::clone(&conn_state),
                                shared.shed.is_some(),
                            );
                            conn = Conn::http1(&shared.builders, io, parts.service);
                            Handed::Kept
                        }
                    };
                    let leaving = *probe.borrow();
                    life.handed(&facts(&conn_state, conn.is_http1()), how, leaving)
                }
                (Step::HandOver, None) => break,
                (step, _) => step,
            },
            Woke::Timer => life.timer(&f),
        };
        // Draining (its worker's, or its own at its age): the next
        // response says `Connection: close`.
        if life.draining() {
            conn_state.draining.store(true, Ordering::Relaxed);
        }
        // A timer reset below must be polled again to be armed.
        timer_armed = false;
        match step {
            Step::Close | Step::HandOver => break,
            Step::CloseIdle => {
                if conn.close_idle() {
                    break;
                }
                timer.as_mut().reset(f.now + Duration::from_secs(3600));
            }
            Step::HeaderTimeout => {
                shared
                    .board
                    .count_timeout(crate::metrics::ClientTimeout::Header);
                if !conn.shut_lingering() {
                    break;
                }
                // The lingering close ends within its own bound.
                timer.as_mut().reset(f.now + Duration::from_secs(3600));
            }
            Step::Shutdown { then, idle } => {
                if idle {
                    conn.shutdown_idle();
                } else {
                    conn.graceful_shutdown();
                }
                timer.as_mut().reset(then);
            }
            Step::Wait { until } => timer.as_mut().reset(until),
            Step::Same => {}
        }
    }
}

/// What the connection is now, for its decider.
fn facts(conn: &ConnState, http1: bool) -> Facts {
    let now = Instant::now();
    let last_done = match conn.last_done_ns.load(Ordering::Relaxed) {
        0 => None,
        // The same clock, read as an `Instant`.
        ns => now.checked_sub(Duration::from_nanos(
            crate::sys::monotonic_ns().saturating_sub(ns),
        )),
    };
    Facts {
        now,
        idle: conn.in_flight.load(Ordering::Acquire) == 0,
        http1,
        http2: conn.http2.load(Ordering::Relaxed),
        last_done,
        between_requests: conn.between_requests(),
        requests: conn.requests.load(Ordering::Relaxed),
    }
}

/// What became of a handoff.
enum HandOver<I> {
    /// A sibling has the connection; this worker's copy closes.
    Sent,
    /// No sibling is ready: the connection stays here, untouched.
    NoSibling,
    /// The queue stayed full or the send failed: the connection stays
    /// here (its parts, to serve it again), and this worker answers its
    /// next request itself.
    Kept(conn::Parts<I>),
}

/// How long a leaving worker waits for room in a full handoff queue before
/// it answers the connection's next request itself. Ready workers empty
/// the queue at thousands of connections a second, so a wait this long
/// means they are not taking (all at their cap, or stopped).
const HANDOFF_PATIENCE: Duration = Duration::from_secs(5);

/// Hands a connection between requests to another ready worker, if there
/// is one, waiting for room in the queue if it is full.
async fn hand_over<I>(
    conn: &mut Conn<I>,
    shared: &Shared,
    queue: &crate::handoff::Queue,
    fd: std::os::fd::RawFd,
    kind: crate::handoff::SocketKind,
    epoch: Instant,
) -> HandOver<I>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    use crate::metrics::HandoffOutcome;
    // Counted before looking for a sibling: a sibling that starts to drain
    // meanwhile waits for this count before it takes its last connections
    // from the queue (see `crate::handoff`).
    shared.board.begin_handoff();
    let outcome = if !shared.board.has_ready_sibling(shared.slot_index) {
        HandOver::NoSibling
    } else {
        match conn.take_http1() {
            None => HandOver::NoSibling,
            Some(parts) if parts.carried.len() > crate::handoff::MAX_CARRIED => {
                HandOver::Kept(parts)
            }
            Some(parts) => {
                let sent = queue
                    .send(
                        fd,
                        kind,
                        epoch.elapsed(),
                        &parts.carried,
                        HANDOFF_PATIENCE,
                        || shared.board.has_ready_sibling(shared.slot_index),
                    )
                    .await;
                let counted = match &sent {
                    Ok(false) => HandoffOutcome::Sent,
                    Ok(true) => HandoffOutcome::SentAfterWait,
                    Err(crate::handoff::SendError::Full) => HandoffOutcome::FellBack,
                    Err(crate::handoff::SendError::Failed(_)) => HandoffOutcome::Failed,
                };
                shared.board.count_handoff(counted);
                match sent {
                    Ok(_) => HandOver::Sent,
                    Err(e) => {
                        warn_kept(&e);
                        HandOver::Kept(parts)
                    }
                }
            }
        }
    };
    shared.board.end_handoff();
    outcome
}

/// Says (at most once a second per worker) that a connection could not be
/// handed over and is answered here instead.
fn warn_kept(e: &crate::handoff::SendError) {
    static LAST_SAID_MS: AtomicU64 = AtomicU64::new(0);
    if crate::logging::once_a_second(&LAST_SAID_MS) {
        tracing::warn!(
            event = crate::logging::LogEvent::HandoffFailed.name(),
            "worker {}: cannot hand a keep-alive connection to a sibling ({e}); \
             this worker answers its next request itself, with Connection: close \
             (zdr_connection_handoffs_total counts each)",
            std::process::id()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connection_is_between_requests_only_when_hyper_holds_nothing_of_it() {
        let fresh = ConnState::default();
        assert!(fresh.between_requests(), "no request yet");
        let answered = ConnState::default();
        answered.last_done_ns.store(5, Ordering::Relaxed);
        assert!(!answered.between_requests(), "a streamed or unread answer");
        answered.reusable.store(true, Ordering::Relaxed);
        assert!(answered.between_requests());
        answered.in_flight.store(1, Ordering::Relaxed);
        assert!(!answered.between_requests(), "a request in flight");
        answered.in_flight.store(0, Ordering::Relaxed);
        answered.unflushed.store(true, Ordering::Relaxed);
        assert!(!answered.between_requests(), "bytes not yet flushed");
        answered.unflushed.store(false, Ordering::Relaxed);
        answered.closing.store(true, Ordering::Relaxed);
        assert!(!answered.between_requests(), "hyper is closing it");
    }

    fn response(status: u16, body: &'static str) -> Response {
        let mut res = plain(StatusCode::from_u16(status).unwrap(), body);
        if status == 304 {
            res.headers_mut()
                .insert(CONTENT_LENGTH, HeaderValue::from_static("9"));
        }
        res
    }

    /// (status, HEAD?) → (content-length, whether content is left).
    #[test]
    fn responses_that_must_not_have_content_lose_it() {
        let cases = [
            (200, true, Some("5"), false),
            (200, false, None, true),
            (204, false, None, false),
            (204, true, None, false),
            (205, false, Some("0"), false),
            (304, false, Some("9"), false),
            (101, false, None, false),
            (404, true, Some("5"), false),
        ];
        for (status, head, length, content) in cases {
            let mut res = response(status, "hello");
            without_forbidden_content(&mut res, head);
            let got = res
                .headers()
                .get(CONTENT_LENGTH)
                .map(|v| v.to_str().unwrap().to_owned());
            assert_eq!(got.as_deref(), length, "{status} head={head}");
            assert_eq!(!res.body().is_end_stream(), content, "{status} head={head}");
        }
    }
}
