//! Forwarding a worker's requests to its command over loopback: pooled
//! keep-alive HTTP/1.1 connections, bodies streamed both ways, the
//! upgrades `--proxy-upgrades` allows (WebSocket) passed through. What a
//! request becomes on the way is decided in [`super::translate`].

use std::convert::Infallible;
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::header::{HeaderValue, ALLOW, HOST};
use http::StatusCode;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};

use super::translate::{self, Refusal};
use crate::app::{erase, plain, AppService, Request, Response};
use crate::body::RequestBody;

type HttpClient = Client<HttpConnector, RequestBody>;

/// The command's port and the connections to it.
struct Upstream {
    port: u16,
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
    pooled: Mutex<Option<HttpClient>>,
    /// A connection per request, once the pool is closed.
    fresh: HttpClient,
}

impl Pool {
    fn new() -> Pool {
        let client = |idle: usize| {
            let mut connector = HttpConnector::new();
            connector.set_nodelay(true);
            Client::builder(TokioExecutor::new())
                .pool_idle_timeout(Duration::from_secs(30))
                .pool_max_idle_per_host(idle)
                .build(connector)
        };
        Pool {
            pooled: Mutex::new(Some(client(usize::MAX))),
            fresh: client(0),
        }
    }

    fn client(&self) -> HttpClient {
        match self.pooled.lock().ok().and_then(|p| p.clone()) {
            Some(pooled) => pooled,
            None => self.fresh.clone(),
        }
    }

    /// Closes the idle connections (those in use close as their requests
    /// end), and keeps no more.
    pub(super) fn close(&self) {
        let pooled = self.pooled.lock().ok().and_then(|mut p| p.take());
        drop(pooled);
    }
}

/// The service that forwards to the command listening on `port`, and its
/// pool. A request the command does not start answering within `timeout`
/// gets a 504; one it cannot be reached for, a 502.
pub(super) fn service(
    port: u16,
    timeout: Option<Duration>,
    upgrades: Vec<String>,
) -> (AppService, Arc<Pool>) {
    let pool = Arc::new(Pool::new());
    let upstream = Arc::new(Upstream {
        port,
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
    let client_upgrade = match translate::to_command(&mut req, upstream.port, &upstream.upgrades) {
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
    let call = upstream.pool.client().request(req);
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
        Ok(res) => res,
        Err(e) => {
            tracing::warn!(
                event = crate::logging::LogEvent::ProxyError.name(),
                "worker {}: cannot reach the command: {e}",
                std::process::id()
            );
            return plain(StatusCode::BAD_GATEWAY, "Bad Gateway\n");
        }
    };
    if res.status() == StatusCode::SWITCHING_PROTOCOLS {
        let Some(client_side) = client_upgrade else {
            // A switch nobody asked for would make the connection a blind
            // tunnel past every check.
            tracing::warn!(
                event = crate::logging::LogEvent::ProxyError.name(),
                "worker {}: the command switched protocols unasked; answered 502",
                std::process::id()
            );
            return plain(StatusCode::BAD_GATEWAY, "Bad Gateway\n");
        };
        let command_side = hyper::upgrade::on(&mut res);
        tokio::spawn(async move {
            if let (Ok(client), Ok(command)) = (client_side.await, command_side.await) {
                let (mut a, mut b) = (TokioIo::new(client), TokioIo::new(command));
                let _ = tokio::io::copy_bidirectional(&mut a, &mut b).await;
            }
        });
    } else {
        translate::strip_hop_by_hop(res.headers_mut(), false);
    }
    // The client's version, not the command's (an HTTP/1.0 server's answer
    // goes out as HTTP/1.1, with zdr's keep-alive).
    *res.version_mut() = version;
    res.map(crate::app::Body::new)
}
