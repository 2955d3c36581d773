//! Who the client is, behind a proxy: `Forwarded`, `X-Forwarded-For` and
//! `X-Forwarded-Proto`, trusted only from the peers in
//! `forwarded_allow_ips`.

use std::net::IpAddr;

use http::header::{HeaderName, FORWARDED};
use http::HeaderMap;

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");

/// The client of a request, as zdr resolved it; in every request's
/// extensions (`req.extensions().get::<zdr::ClientInfo>()`) and used by the
/// access log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientInfo {
    /// The client's address: from a trusted proxy's headers, else the peer's
    /// (none over a Unix socket).
    pub addr: Option<IpAddr>,
    /// `http` or `https`: from a trusted proxy's headers, else how the
    /// client reached zdr.
    pub scheme: &'static str,
    /// Whether the peer was a trusted proxy whose headers were used.
    pub forwarded: bool,
    /// When the request's connection passes `--max-connection-age` (with
    /// its jitter); none without one. An app holding the connection past
    /// its upgrade (a WebSocket) should close it then:
    /// [`WorkerInfo::draining_or_aged`](crate::WorkerInfo::draining_or_aged).
    pub connection_expires: Option<std::time::Instant>,
}

/// The peers whose forwarding headers are trusted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllowList {
    any: bool,
    ips: Vec<IpAddr>,
}

impl AllowList {
    /// Parses `127.0.0.1,::1`; `*` trusts every peer.
    pub fn parse(items: &[String]) -> Result<AllowList, String> {
        let mut list = AllowList {
            any: false,
            ips: Vec::new(),
        };
        for item in items
            .iter()
            .flat_map(|i| i.split(','))
            .map(str::trim)
            .filter(|i| !i.is_empty())
        {
            if item == "*" {
                list.any = true;
            } else {
                list.ips.push(
                    item.parse()
                        .map_err(|_| format!("{item:?} is not an IP address or *"))?,
                );
            }
        }
        Ok(list)
    }

    fn trusts(&self, peer: IpAddr) -> bool {
        self.any
            || self.ips.contains(&peer)
            || self
                .ips
                .iter()
                .any(|ip| ip.to_canonical() == peer.to_canonical())
    }

    /// What holds for every request of one connection: whether its peer
    /// is trusted is decided once, not per request.
    pub fn peer(&self, peer: Option<IpAddr>, scheme: &'static str) -> PeerRule {
        PeerRule {
            direct: ClientInfo {
                addr: peer,
                scheme,
                forwarded: false,
                connection_expires: None,
            },
            trusted: peer.is_some_and(|p| self.trusts(p)),
        }
    }
}

/// How the requests of one connection resolve their client.
#[derive(Debug, Clone)]
pub struct PeerRule {
    direct: ClientInfo,
    trusted: bool,
}

impl PeerRule {
    /// Sets when the connection passes its maximum age.
    pub fn expires(mut self, at: Option<std::time::Instant>) -> PeerRule {
        self.direct.connection_expires = at;
        self
    }

    /// The connection's own client (the peer), which every request has
    /// unless a trusted peer's forwarding headers say otherwise.
    pub fn direct(&self) -> &ClientInfo {
        &self.direct
    }

    /// What a trusted peer's forwarding headers say of a request's client;
    /// `None` when the request has no such headers or the peer is not
    /// trusted, and so its client is [`direct`](PeerRule::direct).
    pub fn forwarded(&self, headers: &HeaderMap) -> Option<ClientInfo> {
        if !self.trusted {
            return None;
        }
        // One pass over the fields, keeping the first of each name (what
        // `HeaderMap::get` would return), instead of three lookups.
        let (mut fwd, mut xff, mut xfp) = (None, None, None);
        for (name, value) in headers {
            if *name == FORWARDED {
                fwd = fwd.or(Some(value));
            } else if name == X_FORWARDED_FOR {
                xff = xff.or(Some(value));
            } else if name == X_FORWARDED_PROTO {
                xfp = xfp.or(Some(value));
            }
        }
        if fwd.is_none() && xff.is_none() && xfp.is_none() {
            return None;
        }
        let (mut addr, mut proto) = (None, None);
        if let Some(fwd) = fwd.and_then(|v| v.to_str().ok()) {
            // The first element describes the client: for=...;proto=...
            let first = fwd.split(',').next().unwrap_or("");
            for pair in first.split(';') {
                let Some((k, v)) = pair.split_once('=') else {
                    continue;
                };
                let v = v.trim().trim_matches('"');
                match k.trim().to_ascii_lowercase().as_str() {
                    "for" => addr = parse_node(v),
                    "proto" => proto = Some(v.to_ascii_lowercase()),
                    _ => {}
                }
            }
        }
        if addr.is_none() {
            addr = xff
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.split(',').next())
                .and_then(|v| parse_node(v.trim()));
        }
        if proto.is_none() {
            proto = xfp
                .and_then(|v| v.to_str().ok())
                .map(|v| v.trim().to_ascii_lowercase());
        }
        let scheme = match proto.as_deref() {
            Some("https") => "https",
            Some("http") => "http",
            _ => self.direct.scheme,
        };
        let forwarded = addr.is_some() || scheme != self.direct.scheme;
        Some(ClientInfo {
            addr: addr.or(self.direct.addr),
            scheme,
            forwarded,
            connection_expires: self.direct.connection_expires,
        })
    }
}

/// An address as proxies write it: `1.2.3.4`, `1.2.3.4:80`, `[::1]:80`, `::1`.
fn parse_node(v: &str) -> Option<IpAddr> {
    if let Ok(ip) = v.parse() {
        return Some(ip);
    }
    if let Some(rest) = v.strip_prefix('[') {
        return rest.split(']').next()?.parse().ok();
    }
    v.rsplit_once(':')?.0.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The client of a request with `headers`, as a connection resolves it.
    fn resolve(rule: PeerRule, headers: &HeaderMap) -> ClientInfo {
        rule.forwarded(headers)
            .unwrap_or_else(|| rule.direct().clone())
    }

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        pairs
            .iter()
            .map(|(k, v)| (http::HeaderName::from_static(k), v.parse().unwrap()))
            .collect()
    }

    #[test]
    fn trusted_proxies_only() {
        let list = AllowList::parse(&["127.0.0.1,::1".to_owned()]).unwrap();
        let h = headers(&[
            ("x-forwarded-for", "203.0.113.7, 10.0.0.1"),
            ("x-forwarded-proto", "https"),
        ]);
        let trusted = resolve(list.peer(Some("127.0.0.1".parse().unwrap()), "http"), &h);
        assert_eq!(
            trusted,
            ClientInfo {
                addr: Some("203.0.113.7".parse().unwrap()),
                scheme: "https",
                forwarded: true,
                connection_expires: None,
            }
        );
        let untrusted = resolve(list.peer(Some("198.51.100.2".parse().unwrap()), "http"), &h);
        assert_eq!(
            untrusted,
            ClientInfo {
                addr: Some("198.51.100.2".parse().unwrap()),
                scheme: "http",
                forwarded: false,
                connection_expires: None,
            }
        );
    }

    #[test]
    fn forwarded_header_wins() {
        let list = AllowList::parse(&["*".to_owned()]).unwrap();
        let h = headers(&[
            (
                "forwarded",
                "for=\"[2001:db8::1]:4711\";proto=https, for=10.0.0.1",
            ),
            ("x-forwarded-for", "1.1.1.1"),
        ]);
        let c = resolve(list.peer(Some("10.0.0.9".parse().unwrap()), "http"), &h);
        assert_eq!(c.addr, Some("2001:db8::1".parse().unwrap()));
        assert_eq!(c.scheme, "https");
        assert!(AllowList::parse(&["not-an-ip".to_owned()]).is_err());
    }

    #[test]
    fn a_request_without_forwarding_headers_has_the_peer_as_client() {
        let list = AllowList::parse(&["127.0.0.1".to_owned()]).unwrap();
        let rule = list.peer(Some("127.0.0.1".parse().unwrap()), "https");
        assert_eq!(rule.forwarded(&headers(&[("accept", "*/*")])), None);
        assert_eq!(rule.direct().addr, Some("127.0.0.1".parse().unwrap()));
        assert_eq!(rule.direct().scheme, "https");
        assert!(!rule.direct().forwarded);
    }
}
