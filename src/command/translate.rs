//! What a request becomes on its way to the command: an HTTP/1.1 request
//! to the command's loopback port that says exactly what zdr resolved and
//! nothing a client could forge. No I/O: the proxy ([`super::proxy`])
//! carries it out.
//!
//! - **The target** (RFC 9112 §3.2, RFC 9113 §8.3.1): origin form; `Host`
//!   is the request's authority: an HTTP/2 request's `:authority` (the
//!   front refused a `host` field that disagrees with it), an absolute-form
//!   target's own authority (whatever `Host` said), else the client's
//!   `Host` (empty for an HTTP/1.0 request without one, as RFC 9112 asks).
//! - **Cookies** an HTTP/2 client sent as several fields are joined with
//!   `; ` into one (RFC 9113 §8.2.3): HTTP/1.1 servers join repeated
//!   fields with `,`, which splits no cookie.
//! - **Forwarding headers**: every header of the forwarding family
//!   ([`FORWARDING`], underscore spellings too) is removed, then
//!   `X-Forwarded-For`, `-Proto`, `-Host`, `-Port` and `Forwarded` are set
//!   from what zdr resolved. From a trusted peer (`--forwarded-allow-ips`)
//!   the client and scheme are the ones its headers named, and its
//!   `X-Forwarded-Host`, `-Port` and `-Prefix` are kept; from anyone else,
//!   nothing the client said about itself reaches the app.
//! - **Upgrades**: only the protocols in `--proxy-upgrades` (WebSocket by
//!   default; never `h2c`) are forwarded; another `Upgrade` is dropped and
//!   the request goes on as a plain one. `CONNECT` is refused (405).
//! - **Hop-by-hop headers** (RFC 9110 §7.6.1) stay on their hop.

use http::header::{
    HeaderName, HeaderValue, CONNECTION, COOKIE, HOST, TE, TRAILER, TRANSFER_ENCODING, UPGRADE,
};
use http::uri::PathAndQuery;
use http::{HeaderMap, Method, Uri, Version};

use std::net::IpAddr;

use crate::app::Request;
use crate::forwarded::ClientInfo;

const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");
const HTTP2_SETTINGS: HeaderName = HeaderName::from_static("http2-settings");
const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
const X_FORWARDED_PORT: HeaderName = HeaderName::from_static("x-forwarded-port");
const X_FORWARDED_PREFIX: HeaderName = HeaderName::from_static("x-forwarded-prefix");
const FORWARDED: HeaderName = HeaderName::from_static("forwarded");

/// The forwarding family: headers through which a client could tell an
/// app who it is, where it connected and how. Each is removed from every
/// request (with its underscore spelling, which WSGI and CGI servers read
/// as the same variable), and the first five are set again from what zdr
/// resolved.
pub const FORWARDING: [&str; 22] = [
    "forwarded",
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-host",
    "x-forwarded-port",
    "x-forwarded-prefix",
    "x-forwarded-ssl",
    "x-forwarded-protocol",
    "x-forwarded-scheme",
    "x-forwarded-server",
    "x-forwarded-uri",
    "x-original-forwarded-for",
    "x-original-host",
    "x-real-ip",
    "x-client-ip",
    "x-cluster-client-ip",
    "true-client-ip",
    "cf-connecting-ip",
    "fastly-client-ip",
    "x-url-scheme",
    "x-scheme",
    "front-end-https",
];

/// Why a request is not forwarded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Refusal {
    /// `CONNECT`: zdr is no tunnel (405).
    Method,
    /// The request cannot be put into HTTP/1.1 (400).
    Malformed,
}

/// Turns `req` into the request for the command. Returns whether an
/// upgrade is forwarded (the answer may then be a 101).
pub(super) fn to_command(req: &mut Request, upgrades: &[String]) -> Result<bool, Refusal> {
    if req.method() == Method::CONNECT {
        return Err(Refusal::Method);
    }
    let version = req.version();
    let authority = authority(req);
    let upgrade = version == Version::HTTP_11 && keep_allowed_upgrades(req.headers_mut(), upgrades);
    let uri = req.uri();
    if uri.scheme().is_some() || uri.authority().is_some() {
        // Origin form: the authority is in `Host`.
        let path = uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"));
        *req.uri_mut() = Uri::from(path);
    }
    *req.version_mut() = Version::HTTP_11;
    let client = req.extensions().get::<ClientInfo>().cloned();
    let headers = req.headers_mut();
    if let Some(authority) = &authority {
        let host = HeaderValue::from_str(authority).map_err(|_| Refusal::Malformed)?;
        headers.insert(HOST, host);
    } else if !headers.contains_key(HOST) {
        headers.insert(HOST, HeaderValue::from_static(""));
    }
    if version >= Version::HTTP_2 {
        join_cookies(headers);
    }
    strip_hop_by_hop(headers, upgrade);
    forwarding_headers(headers, client.as_ref());
    Ok(upgrade)
}

/// The authority the request names, when it is not the client's `Host`
/// field: HTTP/2's `:authority`, or an absolute-form target's.
fn authority(req: &Request) -> Option<String> {
    let uri = req.uri();
    let absolute = uri.scheme().is_some() || req.version() >= Version::HTTP_2;
    absolute
        .then(|| uri.authority().map(|a| a.as_str().to_owned()))
        .flatten()
}

/// Joins the `cookie` fields of an HTTP/2 request into one, with `; `.
fn join_cookies(headers: &mut HeaderMap) {
    if headers.get_all(COOKIE).iter().nth(1).is_none() {
        return;
    }
    let mut joined = Vec::new();
    for v in headers.get_all(COOKIE) {
        if !joined.is_empty() {
            joined.extend_from_slice(b"; ");
        }
        joined.extend_from_slice(v.as_bytes());
    }
    if let Ok(v) = HeaderValue::from_bytes(&joined) {
        headers.insert(COOKIE, v);
    }
}

/// Keeps in `Upgrade` only the protocols the command may be handed, and
/// says whether one is left. Without one, the request goes on as a plain
/// request (its `Upgrade` and `HTTP2-Settings` removed).
fn keep_allowed_upgrades(headers: &mut HeaderMap, allowed: &[String]) -> bool {
    let asked = headers.contains_key(UPGRADE)
        && headers
            .get_all(CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
    let kept: Vec<&str> = if asked {
        headers
            .get_all(UPGRADE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .filter(|p| {
                let name = p.split('/').next().unwrap_or_default();
                allowed.iter().any(|a| a.eq_ignore_ascii_case(name))
            })
            .collect()
    } else {
        Vec::new()
    };
    let value = (!kept.is_empty())
        .then(|| HeaderValue::from_str(&kept.join(", ")).ok())
        .flatten();
    headers.remove(HTTP2_SETTINGS);
    match value {
        Some(v) => {
            headers.insert(UPGRADE, v);
            true
        }
        None => {
            headers.remove(UPGRADE);
            false
        }
    }
}

/// Removes the headers that belong to one connection, not to the message
/// (RFC 9110 §7.6.1), keeping `Connection: upgrade` and `Upgrade` for an
/// upgrade.
pub(super) fn strip_hop_by_hop(headers: &mut HeaderMap, upgrade: bool) {
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

/// Whether `name` is of the forwarding family, in either spelling.
fn is_forwarding(name: &HeaderName) -> bool {
    let name = name.as_str();
    // Every name of the family starts with one of these.
    if !matches!(name.as_bytes().first(), Some(b'x' | b'f' | b't' | b'c')) {
        return false;
    }
    FORWARDING.iter().any(|f| {
        f.len() == name.len()
            && f.bytes()
                .zip(name.bytes())
                .all(|(f, n)| f == n || (f == b'-' && n == b'_'))
    })
}

/// Replaces the forwarding family with what zdr resolved for `client`.
fn forwarding_headers(headers: &mut HeaderMap, client: Option<&ClientInfo>) {
    let trusted = client.is_some_and(|c| c.forwarded);
    // What a trusted proxy said that zdr does not resolve itself.
    let kept: Vec<(HeaderName, HeaderValue)> = if trusted {
        [X_FORWARDED_HOST, X_FORWARDED_PORT, X_FORWARDED_PREFIX]
            .into_iter()
            .filter_map(|n| headers.get(&n).cloned().map(|v| (n, v)))
            .collect()
    } else {
        Vec::new()
    };
    let family: Vec<HeaderName> = headers
        .keys()
        .filter(|n| is_forwarding(n))
        .cloned()
        .collect();
    for name in family {
        headers.remove(name);
    }
    for (name, value) in kept {
        headers.insert(name, value);
    }
    let Some(client) = client else { return };
    // A cheap copy (the value's bytes are shared), so that `headers` can
    // change while it is read.
    let host_value = headers
        .get(&X_FORWARDED_HOST)
        .or_else(|| headers.get(HOST))
        .cloned();
    let host = host_value
        .as_ref()
        .and_then(|h| h.to_str().ok())
        .unwrap_or_default();
    if !host.is_empty() && !headers.contains_key(&X_FORWARDED_HOST) {
        if let Some(v) = &host_value {
            headers.insert(X_FORWARDED_HOST, v.clone());
        }
    }
    if !headers.contains_key(&X_FORWARDED_PORT) {
        let port = match port_of(host) {
            Some(port) => HeaderValue::from_str(port).ok(),
            None if client.scheme == "https" => Some(HeaderValue::from_static("443")),
            None => Some(HeaderValue::from_static("80")),
        };
        if let Some(port) = port {
            headers.insert(X_FORWARDED_PORT, port);
        }
    }
    headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static(client.scheme));
    let mut forwarded = String::with_capacity(32 + host.len());
    if let Some(ip) = client.addr {
        forwarded.push_str("for=");
        // RFC 7239 §6: an IPv6 address is quoted and in brackets.
        let v6 = ip.is_ipv6();
        if v6 {
            forwarded.push_str("\"[");
        }
        let start = forwarded.len();
        push_ip(&mut forwarded, ip);
        if let Ok(v) = HeaderValue::from_str(&forwarded[start..]) {
            headers.insert(X_FORWARDED_FOR, v);
        }
        forwarded.push_str(if v6 { "]\";" } else { ";" });
    }
    if !host.is_empty() {
        forwarded.push_str("host=\"");
        forwarded.extend(host.chars().filter(|c| !matches!(c, '"' | '\\')));
        forwarded.push_str("\";");
    }
    forwarded.push_str("proto=");
    forwarded.push_str(client.scheme);
    if let Ok(v) = HeaderValue::from_str(&forwarded) {
        headers.insert(FORWARDED, v);
    }
}

/// Writes `ip` as text (an IPv4 address without the formatting
/// machinery: it is written on every forwarded request).
fn push_ip(out: &mut String, ip: IpAddr) {
    match ip {
        IpAddr::V4(ip) => {
            for (i, octet) in ip.octets().into_iter().enumerate() {
                if i > 0 {
                    out.push('.');
                }
                if octet >= 100 {
                    out.push(char::from(b'0' + octet / 100));
                }
                if octet >= 10 {
                    out.push(char::from(b'0' + octet / 10 % 10));
                }
                out.push(char::from(b'0' + octet % 10));
            }
        }
        IpAddr::V6(ip) => {
            use std::fmt::Write;
            let _ = write!(out, "{ip}");
        }
    }
}

/// The port in a `Host` value, if it names one.
fn port_of(host: &str) -> Option<&str> {
    let (_, port) = host.rsplit_once(':')?;
    // `[::1]` alone has colons but no port.
    (!port.ends_with(']') && port.parse::<u16>().is_ok()).then_some(port)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::body::RequestBody;

    fn request(version: Version, uri: &str, fields: &[(&str, &str)]) -> Request {
        let mut b = http::Request::builder().version(version).uri(uri);
        for (k, v) in fields {
            b = b.header(*k, *v);
        }
        b.body(RequestBody::empty()).unwrap()
    }

    fn client(addr: &str, scheme: &'static str, forwarded: bool) -> ClientInfo {
        ClientInfo {
            addr: Some(addr.parse().unwrap()),
            scheme,
            forwarded,
            connection_expires: None,
        }
    }

    fn websocket() -> Vec<String> {
        vec!["websocket".to_owned()]
    }

    fn values<'a>(req: &'a Request, name: &str) -> Vec<&'a str> {
        req.headers()
            .get_all(name)
            .iter()
            .map(|v| v.to_str().unwrap())
            .collect()
    }

    #[test]
    fn http2_cookie_fields_are_joined_into_one() {
        let mut req = request(
            Version::HTTP_2,
            "https://example.com/get",
            &[("cookie", "a=1"), ("cookie", "b=2"), ("cookie", "c=3")],
        );
        assert_eq!(to_command(&mut req, &websocket()), Ok(false));
        assert_eq!(values(&req, "cookie"), ["a=1; b=2; c=3"]);
        assert_eq!(req.version(), Version::HTTP_11);
        assert_eq!(req.uri(), "/get");
    }

    #[test]
    fn host_is_the_authority_the_request_names() {
        for (version, uri, fields, host) in [
            // HTTP/2: `:authority` becomes Host.
            (
                Version::HTTP_2,
                "https://example.com/x",
                &[][..],
                "example.com",
            ),
            (
                Version::HTTP_2,
                "https://example.com:8443/x",
                &[("host", "example.com:8443")][..],
                "example.com:8443",
            ),
            // Absolute form: the target's authority wins over Host.
            (
                Version::HTTP_11,
                "http://right.example/x",
                &[("host", "wrong.example")][..],
                "right.example",
            ),
            // Origin form: the client's Host.
            (
                Version::HTTP_11,
                "/x",
                &[("host", "example.com")][..],
                "example.com",
            ),
            // HTTP/1.0 without Host: an empty one (RFC 9112 §3.2).
            (Version::HTTP_10, "/x", &[][..], ""),
        ] {
            let mut req = request(version, uri, fields);
            to_command(&mut req, &websocket()).unwrap();
            assert_eq!(values(&req, "host"), [host], "{uri}");
            // Origin form, as RFC 9112 §3.2.1 asks of a request to a server.
            assert_eq!(req.uri(), "/x");
        }
    }

    #[test]
    fn an_address_is_written_as_its_display_writes_it() {
        for ip in [
            "0.0.0.0",
            "1.2.3.4",
            "9.10.99.100",
            "127.0.0.1",
            "255.255.255.255",
            "::1",
            "2001:db8::7",
        ] {
            let ip: IpAddr = ip.parse().unwrap();
            let mut text = String::new();
            push_ip(&mut text, ip);
            assert_eq!(text, ip.to_string());
        }
    }

    #[test]
    fn connect_is_refused() {
        let mut req = request(
            Version::HTTP_11,
            "example.com:443",
            &[("host", "example.com:443")],
        );
        *req.method_mut() = Method::CONNECT;
        assert_eq!(to_command(&mut req, &websocket()), Err(Refusal::Method));
    }

    #[test]
    fn only_allowed_upgrades_are_forwarded_and_never_h2c_settings() {
        for (upgrade, allowed, forwarded) in [
            ("websocket", websocket(), Some("websocket")),
            ("WebSocket", websocket(), Some("WebSocket")),
            ("h2c", websocket(), None),
            ("h2c, websocket", websocket(), Some("websocket")),
            ("foo/2", vec!["foo".to_owned()], Some("foo/2")),
            ("websocket", vec![], None),
        ] {
            let mut req = request(
                Version::HTTP_11,
                "/chat",
                &[
                    ("host", "example.com"),
                    ("connection", "Upgrade, HTTP2-Settings"),
                    ("upgrade", upgrade),
                    ("http2-settings", "AAMAAABkAAQAoAAAAAIAAAAA"),
                ],
            );
            let up = to_command(&mut req, &allowed).unwrap();
            assert_eq!(up, forwarded.is_some(), "{upgrade}");
            assert!(req.headers().get("http2-settings").is_none());
            match forwarded {
                Some(p) => {
                    assert_eq!(values(&req, "upgrade"), [p]);
                    assert_eq!(values(&req, "connection"), ["upgrade"]);
                }
                None => {
                    assert!(req.headers().get("upgrade").is_none(), "{upgrade}");
                    assert!(req.headers().get("connection").is_none(), "{upgrade}");
                }
            }
        }
        // No `Connection: upgrade`: no upgrade, whatever `Upgrade` says.
        let mut req = request(
            Version::HTTP_11,
            "/",
            &[("host", "a"), ("upgrade", "websocket")],
        );
        assert_eq!(to_command(&mut req, &websocket()), Ok(false));
        assert!(req.headers().get("upgrade").is_none());
    }

    #[test]
    fn an_untrusted_clients_forwarding_headers_are_all_replaced() {
        let mut fields: Vec<(String, String)> = FORWARDING
            .iter()
            .map(|n| (n.to_string(), "evil".to_owned()))
            .collect();
        fields.extend(
            FORWARDING
                .iter()
                .map(|n| (n.replace('-', "_"), "evil".to_owned())),
        );
        fields.push(("host".to_owned(), "example.com:8080".to_owned()));
        fields.push(("x-kept".to_owned(), "1".to_owned()));
        let borrowed: Vec<(&str, &str)> = fields
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let mut req = request(Version::HTTP_11, "/", &borrowed);
        req.extensions_mut()
            .insert(client("203.0.113.7", "http", false));
        to_command(&mut req, &websocket()).unwrap();
        let h = req.headers();
        for (name, _) in h {
            assert!(
                h.get(name).unwrap() != "evil",
                "{name} passed from an untrusted client"
            );
        }
        assert_eq!(values(&req, "x-forwarded-for"), ["203.0.113.7"]);
        assert_eq!(values(&req, "x-forwarded-proto"), ["http"]);
        assert_eq!(values(&req, "x-forwarded-host"), ["example.com:8080"]);
        assert_eq!(values(&req, "x-forwarded-port"), ["8080"]);
        assert_eq!(
            values(&req, "forwarded"),
            ["for=203.0.113.7;host=\"example.com:8080\";proto=http"]
        );
        assert_eq!(values(&req, "x-kept"), ["1"]);
    }

    #[test]
    fn a_trusted_proxy_is_passed_on_as_resolved() {
        let mut req = request(
            Version::HTTP_11,
            "/",
            &[
                ("host", "internal:8000"),
                ("x-forwarded-for", "2001:db8::1, 10.0.0.2"),
                ("x-forwarded-proto", "https"),
                ("x-forwarded-host", "shop.example"),
                ("x-forwarded-prefix", "/shop"),
                ("x-real-ip", "6.6.6.6"),
            ],
        );
        // As zdr resolved it from the proxy's headers.
        req.extensions_mut()
            .insert(client("2001:db8::1", "https", true));
        to_command(&mut req, &websocket()).unwrap();
        assert_eq!(values(&req, "x-forwarded-for"), ["2001:db8::1"]);
        assert_eq!(values(&req, "x-forwarded-proto"), ["https"]);
        assert_eq!(values(&req, "x-forwarded-host"), ["shop.example"]);
        assert_eq!(values(&req, "x-forwarded-prefix"), ["/shop"]);
        assert_eq!(values(&req, "x-forwarded-port"), ["443"]);
        assert!(req.headers().get("x-real-ip").is_none());
        assert_eq!(
            values(&req, "forwarded"),
            ["for=\"[2001:db8::1]\";host=\"shop.example\";proto=https"]
        );
    }

    #[test]
    fn hop_by_hop_headers_go_and_named_ones_too() {
        let mut h = HeaderMap::new();
        h.insert(CONNECTION, HeaderValue::from_static("close, x-private"));
        h.insert("x-private", HeaderValue::from_static("1"));
        h.insert(KEEP_ALIVE, HeaderValue::from_static("timeout=5"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h, false);
        assert!(h.get(CONNECTION).is_none() && h.get("x-private").is_none());
        assert!(h.get(KEEP_ALIVE).is_none());
        assert_eq!(h.get("x-kept").unwrap(), "1");
    }
}
