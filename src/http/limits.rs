//! What the front refuses before any app sees a request: the request
//! line, header and body limits, a target or `Host` that would be guessed
//! at, a transfer coding zdr does not decode.

use crate::app::Request;
use http::header::{CONTENT_LENGTH, TRANSFER_ENCODING};
use http::{StatusCode, Version};

/// Limits on what a client sends, beyond those hyper enforces itself (the
/// number of header fields, malformed heads: 431 and 400).
pub(crate) struct Limits {
    /// Longest request line; 0 for none.
    pub(crate) line: usize,
    /// Longest header field; 0 for none.
    pub(crate) field_size: usize,
    /// Most header fields (hyper enforces it for HTTP/1; zdr for HTTP/2).
    pub(crate) fields: usize,
    /// Largest Content-Length.
    pub(crate) body: Option<u64>,
}

impl Limits {
    /// The status a request that breaks a limit or is malformed gets, if
    /// it does. One pass over the header fields does every field check.
    pub(super) fn check(&self, req: &Request) -> Option<(StatusCode, &'static str)> {
        const BAD: Option<(StatusCode, &str)> = Some((StatusCode::BAD_REQUEST, "Bad Request\n"));
        let http1 = req.version() < Version::HTTP_2;
        let (mut hosts, mut malformed, mut too_large) = (0u32, false, false);
        let mut length = None;
        let mut host = None;
        let mut codings = None;
        for (name, value) in req.headers() {
            let bytes = value.as_bytes();
            // A field counts as its line does: `name: value` and its CRLF.
            too_large |=
                self.field_size > 0 && name.as_str().len() + bytes.len() + 4 > self.field_size;
            // (hyper's HTTP/1 parser and the HTTP/2 decoder refuse control
            // characters in a field value themselves; tests/hardening.rs
            // holds them to it. HTTP/1's parser drops the whitespace around
            // a value; HTTP/2 has none to drop, and a value that starts or
            // ends with it is malformed: RFC 9113 §8.2.1.)
            malformed |= !http1
                && matches!(
                    (bytes.first(), bytes.last()),
                    (Some(b' ' | b'\t'), _) | (_, Some(b' ' | b'\t'))
                );
            if name == http::header::HOST {
                hosts += 1;
                malformed |= !valid_host(bytes);
                host = Some(bytes);
            }
            if length.is_none() && name == CONTENT_LENGTH {
                length = Some(value);
            }
            if http1 && name == TRANSFER_ENCODING {
                codings = Some(value);
            }
        }
        if malformed || hosts > 1 || malformed_target(req, hosts, host) {
            return BAD;
        }
        // A transfer coding zdr does not decode would reach the app as the
        // body itself (RFC 9112 §6.1: 501).
        if codings.is_some_and(|v| !v.as_bytes().trim_ascii().eq_ignore_ascii_case(b"chunked")) {
            return Some((StatusCode::NOT_IMPLEMENTED, "Not Implemented\n"));
        }
        if self.line > 0 {
            let target = req.uri().path_and_query().map_or(1, |p| p.as_str().len());
            // METHOD SP TARGET SP HTTP/1.1
            if req.method().as_str().len() + target + 10 > self.line {
                return Some((StatusCode::URI_TOO_LONG, "Request-URI Too Long\n"));
            }
        }
        if too_large || (!http1 && req.headers().len() > self.fields) {
            return Some((
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                "Request Header Fields Too Large\n",
            ));
        }
        if let Some(max) = self.body {
            let length = length.and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
            if length.is_some_and(|n| n > max) {
                return Some((StatusCode::PAYLOAD_TOO_LARGE, "Payload Too Large\n"));
            }
        }
        None
    }
}

/// Whether a request's target (with the number of its `Host` fields and
/// the last one's value) is malformed in ways hyper lets through.
///
/// HTTP/1 (RFC 9112 §3.2-3.2.4): no `Host` in HTTP/1.1 unless the target
/// is in absolute form; an authority alone as the target of a method other
/// than CONNECT. HTTP/2 (RFC 9113 §8.3.1): no authority at all (neither
/// `:authority` nor `Host`), or a `Host` that names another authority than
/// `:authority`; an `:authority` that is not a host and port (userinfo).
/// Both: `*` with a method other than OPTIONS; bytes no URI may hold. With
/// the field checks of [`Limits::check`] (two `Host` fields, an invalid
/// host, control characters or, in HTTP/2, whitespace at either end of a
/// value), they get 400 and never reach the app, as in nginx.
pub(super) fn malformed_target(req: &Request, hosts: u32, host: Option<&[u8]>) -> bool {
    let uri = req.uri();
    let method = req.method();
    let asterisk = uri.path() == "*" && method != http::Method::OPTIONS;
    let form = if req.version() >= Version::HTTP_2 {
        match uri.authority() {
            None => hosts == 0 && method != http::Method::CONNECT,
            Some(authority) => {
                !valid_host(authority.as_str().as_bytes())
                    || host.is_some_and(|h| !h.eq_ignore_ascii_case(authority.as_str().as_bytes()))
            }
        }
    } else if uri.authority().is_none() {
        // Origin form (`/path`) or `*`.
        hosts == 0 && req.version() == Version::HTTP_11
    } else {
        // Absolute form, or an authority alone.
        uri.scheme().is_none() && method != http::Method::CONNECT
    };
    form || asterisk
        // Controls, space, non-ASCII (RFC 3986).
        || uri.path_and_query().is_some_and(|p| {
            p.as_str()
                .bytes()
                .fold(false, |bad, b| bad | (b <= b' ') | (b >= 0x7f))
        })
}

/// Whether a `Host` value is a host with an optional port: a reg-name or
/// IP literal (RFC 3986 unreserved, sub-delims, percent-encoding, `[`, `]`
/// and `:`), with no userinfo. Empty is allowed.
pub(super) fn valid_host(host: &[u8]) -> bool {
    host.iter().fold(true, |ok, b| ok & HOST_BYTES[*b as usize])
}

/// The bytes [`valid_host`] accepts.
pub(super) const HOST_BYTES: [bool; 256] = {
    let mut table = [false; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        table[b] = c.is_ascii_alphanumeric()
            || matches!(
                c,
                b'-' | b'.'
                    | b'_'
                    | b'~'
                    | b'!'
                    | b'$'
                    | b'&'
                    | b'\''
                    | b'('
                    | b')'
                    | b'*'
                    | b'+'
                    | b','
                    | b';'
                    | b'='
                    | b':'
                    | b'['
                    | b']'
                    | b'%'
            );
        b += 1;
    }
    table
};
