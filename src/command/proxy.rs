//! Forwarding a worker's requests to its command over loopback: pooled
//! keep-alive HTTP/1.1 connections, bodies streamed both ways, upgrades
//! (WebSocket) passed through, and the client's address and scheme (as zdr
//! resolved them) in `X-Forwarded-For` and `X-Forwarded-Proto`.

use std::convert::Infallible;
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Duration;

use http::header::{
    HeaderName, HeaderValue, CONNECTION, HOST, TE, TRAILER, TRANSFER_ENCODING, UPGRADE,
};
use http::{StatusCode, Uri, Version};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};

use crate::app::{erase, plain, AppService, Request, Response};
use crate::body::RequestBody;
use crate::forwarded::ClientInfo;

const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");
const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const FORWARDED: HeaderName = HeaderName::from_static("forwarded");

/// The command's port and a pool of connections to it.
struct Upstream {
    port: u16,
    client: Client<HttpConnector, RequestBody>,
    /// How long the command may take to start answering a request.
    timeout: Option<Duration>,
}

/// The service that forwards to the command listening on `port`. A
/// request the command does not start answering within `timeout` gets a
/// 504; one it cannot be reached for, a 502.
pub(super) fn service(port: u16, timeout: Option<Duration>) -> AppService {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    let client = Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(30))
        .build(connector);
    let upstream = Arc::new(Upstream {
        port,
        client,
        timeout,
    });
    erase(tower::service_fn(move |req: Request| {
        let upstream = Arc::clone(&upstream);
        async move { Ok::<_, Infallible>(forward(&upstream, req).await) }
    }))
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
    let client_upgrade = wants_upgrade(&req).then(|| hyper::upgrade::on(&mut req));
    if let Err(e) = prepare(&mut req, upstream.port, client_upgrade.is_some()) {
        tracing::warn!(
            event = crate::logging::LogEvent::ProxyError.name(),
            "cannot forward a request: {e}"
        );
        return plain(StatusCode::BAD_REQUEST, "Bad Request\n");
    }
    let call = upstream.client.request(req);
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
        if let Some(client_side) = client_upgrade {
            let command_side = hyper::upgrade::on(&mut res);
            tokio::spawn(async move {
                if let (Ok(client), Ok(command)) = (client_side.await, command_side.await) {
                    let (mut a, mut b) = (TokioIo::new(client), TokioIo::new(command));
                    let _ = tokio::io::copy_bidirectional(&mut a, &mut b).await;
                }
            });
        }
    } else {
        strip_hop_by_hop(res.headers_mut(), false);
    }
    // The client's version, not the command's (an HTTP/1.0 server's answer
    // goes out as HTTP/1.1, with zdr's keep-alive).
    *res.version_mut() = version;
    res.map(crate::app::Body::new)
}

/// Whether the client asks to switch protocols (HTTP/1.1 only).
fn wants_upgrade(req: &Request) -> bool {
    req.version() == Version::HTTP_11
        && req.headers().contains_key(UPGRADE)
        && req
            .headers()
            .get_all(CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
}

/// Points the request at the command: the loopback URI, HTTP/1.1 (an
/// HTTP/2 request keeps its authority as `Host`), no hop-by-hop headers,
/// and the forwarding headers replaced by what zdr resolved.
fn prepare(req: &mut Request, port: u16, upgrade: bool) -> Result<(), http::Error> {
    let path = req
        .uri()
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_owned();
    if !req.headers().contains_key(HOST) {
        if let Some(authority) = req.uri().authority() {
            let host = HeaderValue::from_str(authority.as_str())?;
            req.headers_mut().insert(HOST, host);
        }
    }
    *req.uri_mut() = Uri::builder()
        .scheme("http")
        .authority(format!("127.0.0.1:{port}"))
        .path_and_query(path)
        .build()?;
    *req.version_mut() = Version::HTTP_11;
    let client = req.extensions().get::<ClientInfo>().cloned();
    let headers = req.headers_mut();
    strip_hop_by_hop(headers, upgrade);
    headers.remove(FORWARDED);
    headers.remove(X_FORWARDED_FOR);
    headers.remove(X_FORWARDED_PROTO);
    if let Some(client) = client {
        if let Some(ip) = client.addr {
            headers.insert(X_FORWARDED_FOR, HeaderValue::from_str(&ip.to_string())?);
        }
        headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static(client.scheme));
    }
    Ok(())
}

/// Removes the headers that belong to one connection, not to the message
/// (RFC 9110 §7.6.1), keeping `Connection: upgrade` and `Upgrade` for an
/// upgrade.
fn strip_hop_by_hop(headers: &mut http::HeaderMap, upgrade: bool) {
    let named: Vec<HeaderName> = headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .filter(|n| !(upgrade && *n == UPGRADE))
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in [KEEP_ALIVE, PROXY_CONNECTION, TE, TRAILER, TRANSFER_ENCODING] {
        headers.remove(name);
    }
    if upgrade {
        headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
    } else {
        headers.remove(CONNECTION);
        headers.remove(UPGRADE);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_go_and_named_ones_too() {
        let mut h = http::HeaderMap::new();
        h.insert(CONNECTION, HeaderValue::from_static("close, x-private"));
        h.insert("x-private", HeaderValue::from_static("1"));
        h.insert(KEEP_ALIVE, HeaderValue::from_static("timeout=5"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h, false);
        assert!(h.get(CONNECTION).is_none() && h.get("x-private").is_none());
        assert!(h.get(KEEP_ALIVE).is_none());
        assert_eq!(h.get("x-kept").unwrap(), "1");
    }

    #[test]
    fn an_upgrade_keeps_its_connection_and_upgrade_headers() {
        let mut h = http::HeaderMap::new();
        h.insert(CONNECTION, HeaderValue::from_static("Upgrade"));
        h.insert(UPGRADE, HeaderValue::from_static("websocket"));
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h.get(CONNECTION).unwrap(), "upgrade");
        assert_eq!(h.get(UPGRADE).unwrap(), "websocket");
    }
}
