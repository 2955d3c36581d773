//! Forwarding a worker's requests to its command over loopback: pooled
//! keep-alive HTTP/1.1 connections, bodies streamed both ways, the
//! upgrades `--proxy-upgrades` allows (WebSocket) passed through. What a
//! request becomes on the way is decided in [`super::translate`].
//!
//! The client side is hyper's HTTP/1.1 connection with zdr's own pool: a
//! stack of idle connections to one port (the last one used is the next
//! one taken, its buffers still warm), no per-request resolution, URI
//! rewriting or task. A connection goes back on the stack when its
//! response's body has ended; one the command closed while it was idle is
//! found closed when taken, and a request that could not be sent on it is
//! sent on another (it was never written).

use std::convert::Infallible;
use std::net::Ipv4Addr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use http::header::{HeaderValue, ALLOW, HOST};
use http::StatusCode;
use http_body::{Body as _, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;

use super::translate::{self, Refusal};
use crate::app::{erase, plain, AppService, Body, Request, Response};
use crate::body::RequestBody;

/// One connection to the command, seen from the request side.
type Sender = SendRequest<RequestBody>;

/// How long an idle connection to the command is kept.
const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// The most idle connections a worker keeps (more are closed as their
/// requests end).
const MAX_IDLE: usize = 1024;

/// The command's port and the connections to it.
struct Upstream {
    pool: Arc<Pool>,
    /// How long the command may take to start answering a request.
    timeout: Option<Duration>,
    /// The upgrade protocols the command may be handed.
    upgrades: Vec<String>,
}

/// The connections to the command: kept alive between requests until the
/// worker stops the command, then closed, so that the command's own
/// graceful stop (which waits for its idle keep-alive connections, as
/// Node's `server.close()` does) is not held up by zdr's.
pub(super) struct Pool {
    port: u16,
    idle: Mutex<Idle>,
}

struct Idle {
    /// False once closed: a request then has a connection of its own.
    open: bool,
    /// Idle connections and since when, the most recently used last.
    conns: Vec<(Sender, Instant)>,
}

impl Pool {
    fn new(port: u16) -> Pool {
        Pool {
            port,
            idle: Mutex::new(Idle {
                open: true,
                conns: Vec::new(),
            }),
        }
    }

    /// The most recently used idle connection still open.
    fn take(&self) -> Option<Sender> {
        let mut idle = self.idle.lock().ok()?;
        while let Some((sender, _)) = idle.conns.pop() {
            if !sender.is_closed() {
                return Some(sender);
            }
        }
        None
    }

    /// Keeps `sender` for the next request (unless the pool is closed or
    /// full); drops connections idle past [`IDLE_TIMEOUT`].
    fn put(&self, sender: Sender) {
        let Ok(mut idle) = self.idle.lock() else {
            return;
        };
        if !idle.open || sender.is_closed() {
            return;
        }
        let now = Instant::now();
        let stale = idle
            .conns
            .iter()
            .take_while(|(_, since)| now.duration_since(*since) > IDLE_TIMEOUT)
            .count();
        idle.conns.drain(..stale);
        if idle.conns.len() < MAX_IDLE {
            idle.conns.push((sender, now));
        }
    }

    /// A new connection to the command.
    async fn connect(&self) -> Result<Sender, Unreachable> {
        let stream = tokio::net::TcpStream::connect((Ipv4Addr::LOCALHOST, self.port))
            .await
            .map_err(|e| Unreachable(e.to_string()))?;
        let _ = stream.set_nodelay(true);
        let (sender, conn) = hyper::client::conn::http1::Builder::new()
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|e| Unreachable(e.to_string()))?;
        tokio::spawn(conn.with_upgrades());
        Ok(sender)
    }

    /// Sends `req` on an idle connection, or on a new one when none is
    /// idle or the one taken turned out closed: before the request was
    /// written, or (for an idempotent request without a body, which can
    /// be sent again, as nginx does on a cached connection) before any
    /// answer came.
    async fn send(
        &self,
        mut req: Request,
    ) -> Result<(http::Response<Incoming>, Sender), Unreachable> {
        while let Some(mut sender) = self.take() {
            if sender.ready().await.is_err() {
                continue;
            }
            let again = replayable(&req);
            match sender.try_send_request(req).await {
                Ok(res) => return Ok((res, sender)),
                Err(mut e) => match (e.take_message(), again) {
                    (Some(unsent), _) => req = unsent,
                    (None, Some(copy)) => req = copy,
                    (None, None) => return Err(Unreachable(e.into_error().to_string())),
                },
            }
        }
        let mut sender = self.connect().await?;
        match sender.send_request(req).await {
            Ok(res) => Ok((res, sender)),
            Err(e) => Err(Unreachable(e.to_string())),
        }
    }

    /// Closes the idle connections (those in use close as their requests
    /// end), and keeps no more.
    pub(super) fn close(&self) {
        let conns = match self.idle.lock() {
            Ok(mut idle) => {
                idle.open = false;
                std::mem::take(&mut idle.conns)
            }
            Err(_) => return,
        };
        drop(conns);
    }
}

/// A copy of `req` to send again on another connection, if it is safe
/// to send twice: an idempotent method (RFC 9110 §9.2.2) and no body.
fn replayable(req: &Request) -> Option<Request> {
    if !req.method().is_idempotent() || !req.body().is_end_stream() {
        return None;
    }
    let mut copy = Request::new(RequestBody::empty());
    *copy.method_mut() = req.method().clone();
    *copy.uri_mut() = req.uri().clone();
    *copy.version_mut() = req.version();
    *copy.headers_mut() = req.headers().clone();
    Some(copy)
}

/// Why the command could not be asked: what the 502 is logged with.
struct Unreachable(String);

/// The service that forwards to the command listening on `port`, and its
/// pool. A request the command does not start answering within `timeout`
/// gets a 504; one it cannot be reached for, a 502.
pub(super) fn service(
    port: u16,
    timeout: Option<Duration>,
    upgrades: Vec<String>,
) -> (AppService, Arc<Pool>) {
    let pool = Arc::new(Pool::new(port));
    let upstream = Arc::new(Upstream {
        pool: Arc::clone(&pool),
        timeout,
        upgrades,
    });
    let service = erase(tower::service_fn(move |req: Request| {
        let upstream = Arc::clone(&upstream);
        async move { Ok::<_, Infallible>(forward(&upstream, req).await) }
    }));
    (service, pool)
}

/// Whether the command answers `path` on `port` with a 2xx.
pub(super) async fn probe(port: u16, path: &str) -> bool {
    let Ok(stream) = tokio::net::TcpStream::connect((Ipv4Addr::LOCALHOST, port)).await else {
        return false;
    };
    let Ok((mut sender, conn)) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await
    else {
        return false;
    };
    tokio::spawn(conn);
    let req = http::Request::get(path)
        .header(HOST, format!("127.0.0.1:{port}"))
        .body(http_body_util::Empty::<bytes::Bytes>::new());
    let Ok(req) = req else { return false };
    let answer = tokio::time::timeout(Duration::from_secs(5), sender.send_request(req)).await;
    matches!(answer, Ok(Ok(res)) if res.status().is_success())
}

/// Forwards one request and returns the command's answer (or zdr's 502 or
/// 504).
async fn forward(upstream: &Upstream, mut req: Request) -> Response {
    let version = req.version();
    let client_upgrade = match translate::to_command(&mut req, &upstream.upgrades) {
        Ok(true) => Some(hyper::upgrade::on(&mut req)),
        Ok(false) => None,
        Err(Refusal::Method) => {
            let mut res = plain(StatusCode::METHOD_NOT_ALLOWED, "Method Not Allowed\n");
            res.headers_mut().insert(
                ALLOW,
                HeaderValue::from_static("GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"),
            );
            return res;
        }
        Err(Refusal::Malformed) => {
            tracing::warn!(
                event = crate::logging::LogEvent::ProxyError.name(),
                "cannot forward a request: it cannot be put into HTTP/1.1"
            );
            return plain(StatusCode::BAD_REQUEST, "Bad Request\n");
        }
    };
    let call = answer(&upstream.pool, req);
    let answer = match upstream.timeout {
        Some(t) => match tokio::time::timeout(t, call).await {
            Ok(answer) => answer,
            Err(_) => {
                tracing::warn!(
                    event = crate::logging::LogEvent::ProxyError.name(),
                    "worker {}: the command did not answer within {:.0}s",
                    std::process::id(),
                    t.as_secs_f64()
                );
                return plain(StatusCode::GATEWAY_TIMEOUT, "Gateway Timeout\n");
            }
        },
        None => call.await,
    };
    let mut res = match answer {
        Ok(Answer::Plain(res)) => res,
        Ok(Answer::Switched(mut res, sender)) => {
            let Some(client_side) = client_upgrade else {
                // A switch nobody asked for would make the connection a
                // blind tunnel past every check.
                tracing::warn!(
                    event = crate::logging::LogEvent::ProxyError.name(),
                    "worker {}: the command switched protocols unasked; answered 502",
                    std::process::id()
                );
                return plain(StatusCode::BAD_GATEWAY, "Bad Gateway\n");
            };
            let command_side = hyper::upgrade::on(&mut res);
            tokio::spawn(async move {
                // The connection is the tunnel's now; its sender goes with
                // it.
                let _sender = sender;
                if let (Ok(client), Ok(command)) = (client_side.await, command_side.await) {
                    let (mut a, mut b) = (TokioIo::new(client), TokioIo::new(command));
                    let _ = tokio::io::copy_bidirectional(&mut a, &mut b).await;
                }
            });
            *res.version_mut() = version;
            return res.map(Body::new);
        }
        Err(Unreachable(e)) => {
            tracing::warn!(
                event = crate::logging::LogEvent::ProxyError.name(),
                "worker {}: cannot reach the command: {e}",
                std::process::id()
            );
            return plain(StatusCode::BAD_GATEWAY, "Bad Gateway\n");
        }
    };
    translate::strip_hop_by_hop(res.headers_mut(), false);
    // The client's version, not the command's (an HTTP/1.0 server's answer
    // goes out as HTTP/1.1, with zdr's keep-alive).
    *res.version_mut() = version;
    res
}

/// The largest body zdr reads whole before it sends the head: a small
/// answer then leaves in one write (one packet, one wake-up of the
/// client), as nginx's buffering sends it. A larger one, or one of
/// unknown length (a stream of events may wait long for its first byte),
/// is streamed as it comes.
const WHOLE: u64 = 64 * 1024;

/// What the command answered.
enum Answer {
    /// A response, its body whole or streamed.
    Plain(Response),
    /// `101 Switching Protocols`, with the connection's sender.
    Switched(http::Response<Incoming>, Sender),
}

/// Sends `req` to the command and reads its answer: the head, and the
/// body too when it is small.
async fn answer(pool: &Arc<Pool>, req: Request) -> Result<Answer, Unreachable> {
    let (res, sender) = pool.send(req).await?;
    if res.status() == StatusCode::SWITCHING_PROTOCOLS {
        return Ok(Answer::Switched(res, sender));
    }
    let (head, mut body) = res.into_parts();
    if body.is_end_stream() {
        pool.put(sender);
        return Ok(Answer::Plain(Response::from_parts(head, Body::empty())));
    }
    if body.size_hint().exact().is_none_or(|n| n > WHOLE) {
        let body = FromCommand {
            inner: body,
            back: Some((sender, Arc::clone(pool))),
        };
        return Ok(Answer::Plain(Response::from_parts(head, Body::new(body))));
    }
    let broke_off = |e: hyper::Error| Unreachable(format!("its answer broke off: {e}"));
    let mut whole: Option<Bytes> = None;
    let mut more: Option<BytesMut> = None;
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame.map_err(broke_off)?.into_data() else {
            continue;
        };
        match (&whole, &mut more) {
            (None, _) => whole = Some(data),
            (Some(first), None) => {
                let mut joined = BytesMut::from(&first[..]);
                joined.extend_from_slice(&data);
                more = Some(joined);
            }
            (Some(_), Some(joined)) => joined.extend_from_slice(&data),
        }
    }
    pool.put(sender);
    let bytes = match (whole, more) {
        (_, Some(joined)) => joined.freeze(),
        (Some(first), None) => first,
        (None, None) => Bytes::new(),
    };
    Ok(Answer::Plain(Response::from_parts(head, Body::from(bytes))))
}

/// A streamed response body from the command, which gives its connection
/// back to the pool once it has ended (not if it fails or is dropped
/// before: the connection then closes).
struct FromCommand {
    inner: Incoming,
    /// The connection, until the body ends.
    back: Option<(Sender, Arc<Pool>)>,
}

impl http_body::Body for FromCommand {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => self.give_back(),
            Poll::Ready(Some(Ok(_))) if self.inner.is_end_stream() => self.give_back(),
            Poll::Ready(Some(Err(_))) => self.back = None,
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl FromCommand {
    fn give_back(&mut self) {
        if let Some((sender, pool)) = self.back.take() {
            pool.put(sender);
        }
    }
}
