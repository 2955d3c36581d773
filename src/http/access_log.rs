//! The access log, in Gunicorn's format language.
//!
//! The format is compiled once into segments; each request then costs one
//! pass over them and one write.

use std::fmt::Write as _;
use std::time::Duration;

use http::{HeaderMap, Method, Uri, Version};

use crate::logging::LogFile;

/// One access log, with its compiled format.
pub struct AccessLog {
    format: Vec<Segment>,
    /// JSON lines instead of the format.
    json: bool,
    out: LogFile,
}

#[derive(Debug, Clone, PartialEq)]
enum Segment {
    Literal(String),
    Var(Var),
}

#[derive(Debug, Clone, PartialEq)]
enum Var {
    Host,
    Dash,
    Time,
    RequestLine,
    Status,
    Bytes,
    BytesOrZero,
    Referer,
    UserAgent,
    Seconds,
    Micros,
    Millis,
    DecimalSeconds,
    Pid,
    Method,
    Path,
    Query,
    Protocol,
    RequestHeader(String),
    ResponseHeader(String),
}

fn compile(format: &str) -> Vec<Segment> {
    let mut out = Vec::new();
    let mut literal = String::new();
    let mut rest = format;
    while let Some(start) = rest.find("%(") {
        let Some(len) = rest[start..].find(")s") else {
            break;
        };
        literal.push_str(&rest[..start]);
        let name = &rest[start + 2..start + len];
        let var = match name {
            "h" => Some(Var::Host),
            "l" | "u" => Some(Var::Dash),
            "t" => Some(Var::Time),
            "r" => Some(Var::RequestLine),
            "s" => Some(Var::Status),
            "b" => Some(Var::Bytes),
            "B" => Some(Var::BytesOrZero),
            "f" => Some(Var::Referer),
            "a" => Some(Var::UserAgent),
            "T" => Some(Var::Seconds),
            "D" => Some(Var::Micros),
            "M" => Some(Var::Millis),
            "L" => Some(Var::DecimalSeconds),
            "p" => Some(Var::Pid),
            "m" => Some(Var::Method),
            "U" => Some(Var::Path),
            "q" => Some(Var::Query),
            "H" => Some(Var::Protocol),
            n if n.starts_with('{') && n.ends_with("}i") => {
                Some(Var::RequestHeader(n[1..n.len() - 2].to_ascii_lowercase()))
            }
            n if n.starts_with('{') && n.ends_with("}o") => {
                Some(Var::ResponseHeader(n[1..n.len() - 2].to_ascii_lowercase()))
            }
            _ => None,
        };
        match var {
            Some(var) => {
                if !literal.is_empty() {
                    out.push(Segment::Literal(std::mem::take(&mut literal)));
                }
                out.push(Segment::Var(var));
            }
            None => literal.push('-'),
        }
        rest = &rest[start + len + 2..];
    }
    literal.push_str(rest);
    literal.push('\n');
    out.push(Segment::Literal(literal));
    out
}

/// What the access log needs to know of one request and its response.
pub struct Entry<'a> {
    /// The client's address, or `-`.
    pub peer: &'a str,
    /// Request method.
    pub method: &'a Method,
    /// Request target.
    pub uri: &'a Uri,
    /// Protocol version.
    pub version: Version,
    /// Request headers.
    pub request_headers: &'a HeaderMap,
    /// Response status.
    pub status: u16,
    /// Response headers.
    pub response_headers: &'a HeaderMap,
    /// Response body length, when known.
    pub body_len: Option<u64>,
    /// Time to the response head.
    pub elapsed: Duration,
}

fn version_str(v: Version) -> &'static str {
    match v {
        Version::HTTP_09 => "HTTP/0.9",
        Version::HTTP_10 => "HTTP/1.0",
        Version::HTTP_2 => "HTTP/2.0",
        Version::HTTP_3 => "HTTP/3.0",
        _ => "HTTP/1.1",
    }
}

fn header<'h>(headers: &'h HeaderMap, name: &str) -> &'h str {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-")
}

impl AccessLog {
    /// Opens the log at `spec` (`-` for stdout) with a Gunicorn format, or
    /// as JSON lines.
    pub fn open(spec: &str, format: &str, json: bool) -> std::io::Result<AccessLog> {
        Ok(AccessLog {
            format: compile(format),
            json,
            out: LogFile::open(spec, true)?,
        })
    }

    /// One JSON line: the facts Gunicorn's placeholders name, by name.
    pub fn format_json(&self, e: &Entry<'_>) -> String {
        let line = serde_json::json!({
            "time": crate::logging::rfc3339_now(),
            "pid": std::process::id(),
            "remote_addr": e.peer,
            "method": e.method.as_str(),
            "path": e.uri.path(),
            "query": e.uri.query().unwrap_or(""),
            "protocol": version_str(e.version),
            "status": e.status,
            "bytes": e.body_len,
            "duration_us": e.elapsed.as_micros() as u64,
            "referer": e.request_headers.get("referer").and_then(|v| v.to_str().ok()),
            "user_agent": e.request_headers.get("user-agent").and_then(|v| v.to_str().ok()),
        });
        format!("{line}\n")
    }

    /// Reopens the log file (SIGUSR1).
    pub fn reopen(&self) -> std::io::Result<()> {
        self.out.reopen()
    }

    /// Formats one line.
    pub fn format(&self, e: &Entry<'_>) -> String {
        let mut line = String::with_capacity(160);
        let path_and_query = e.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
        for seg in &self.format {
            let _ = match seg {
                Segment::Literal(s) => line.write_str(s),
                Segment::Var(v) => match v {
                    Var::Host => line.write_str(e.peer),
                    Var::Dash => line.write_str("-"),
                    Var::Time => {
                        let f = time::macros::format_description!(
                            "[[[day]/[month repr:short]/[year]:[hour]:[minute]:[second] +0000]"
                        );
                        line.write_str(
                            &time::OffsetDateTime::now_utc()
                                .format(&f)
                                .unwrap_or_default(),
                        )
                    }
                    Var::RequestLine => {
                        write!(
                            line,
                            "{} {} {}",
                            e.method,
                            path_and_query,
                            version_str(e.version)
                        )
                    }
                    Var::Status => write!(line, "{}", e.status),
                    Var::Bytes => match e.body_len {
                        Some(n) => write!(line, "{n}"),
                        None => line.write_str("-"),
                    },
                    Var::BytesOrZero => write!(line, "{}", e.body_len.unwrap_or(0)),
                    Var::Referer => line.write_str(header(e.request_headers, "referer")),
                    Var::UserAgent => line.write_str(header(e.request_headers, "user-agent")),
                    Var::Seconds => write!(line, "{}", e.elapsed.as_secs()),
                    Var::Micros => write!(line, "{}", e.elapsed.as_micros()),
                    Var::Millis => write!(line, "{}", e.elapsed.as_millis()),
                    Var::DecimalSeconds => write!(line, "{:.6}", e.elapsed.as_secs_f64()),
                    Var::Pid => write!(line, "<{}>", std::process::id()),
                    Var::Method => line.write_str(e.method.as_str()),
                    Var::Path => line.write_str(e.uri.path()),
                    Var::Query => line.write_str(e.uri.query().unwrap_or("")),
                    Var::Protocol => line.write_str(version_str(e.version)),
                    Var::RequestHeader(h) => line.write_str(header(e.request_headers, h)),
                    Var::ResponseHeader(h) => line.write_str(header(e.response_headers, h)),
                },
            };
        }
        line
    }

    /// Writes one line.
    pub fn log(&self, e: &Entry<'_>) {
        let line = if self.json {
            self.format_json(e)
        } else {
            self.format(e)
        };
        self.out.write_record(line.as_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::DEFAULT_ACCESS_LOG_FORMAT;

    fn entry<'a>(uri: &'a Uri, req: &'a HeaderMap, res: &'a HeaderMap) -> Entry<'a> {
        Entry {
            peer: "10.0.0.1",
            method: &Method::GET,
            uri,
            version: Version::HTTP_11,
            request_headers: req,
            status: 200,
            response_headers: res,
            body_len: Some(12),
            elapsed: Duration::from_micros(1500),
        }
    }

    #[test]
    fn gunicorn_default_format() {
        let log = AccessLog {
            format: compile(DEFAULT_ACCESS_LOG_FORMAT),
            json: false,
            out: LogFile::open("-", true).unwrap(),
        };
        let uri: Uri = "/a?b=1".parse().unwrap();
        let mut req = HeaderMap::new();
        req.insert("user-agent", "curl/8".parse().unwrap());
        let res = HeaderMap::new();
        let line = log.format(&entry(&uri, &req, &res));
        let (head, tail) = line.split_once(" [").unwrap();
        assert_eq!(head, "10.0.0.1 - -");
        let (_time, tail) = tail.split_once("] ").unwrap();
        assert_eq!(tail, "\"GET /a?b=1 HTTP/1.1\" 200 12 \"-\" \"curl/8\"\n");
    }

    #[test]
    fn every_placeholder_and_unknown_ones() {
        let f = "%(m)s %(U)s %(q)s %(H)s %(s)s %(B)s %(D)s %(M)s %(L)s %({x-id}i)s %({Content-Type}o)s %(zz)s %(";
        let log = AccessLog {
            format: compile(f),
            json: false,
            out: LogFile::open("-", true).unwrap(),
        };
        let uri: Uri = "/p?q=2".parse().unwrap();
        let mut req = HeaderMap::new();
        req.insert("x-id", "abc".parse().unwrap());
        let mut res = HeaderMap::new();
        res.insert("content-type", "text/plain".parse().unwrap());
        let line = log.format(&entry(&uri, &req, &res));
        assert_eq!(
            line,
            "GET /p q=2 HTTP/1.1 200 12 1500 1 0.001500 abc text/plain - %(\n"
        );
    }
}
