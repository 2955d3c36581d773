//! The metrics endpoint, served by the master from its event loop without
//! blocking it: clients are read as their bytes arrive, answered once their
//! request is complete, and dropped if it does not come within 5 s.

use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsFd, BorrowedFd};
use std::time::{Duration, Instant};

use crate::listener::BindAddr;

const REQUEST_DEADLINE: Duration = Duration::from_secs(5);
const MAX_REQUEST: usize = 8192;

struct Client {
    stream: TcpStream,
    request: Vec<u8>,
    since: Instant,
}

/// The listening metrics socket and its clients.
pub(crate) struct ScrapeServer {
    listener: TcpListener,
    clients: Vec<Client>,
}

impl ScrapeServer {
    /// Listens on `addr` (a TCP address).
    pub(crate) fn bind(addr: &BindAddr) -> io::Result<ScrapeServer> {
        let BindAddr::Tcp { host, port } = addr else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "metrics_bind must be HOST:PORT",
            ));
        };
        let listener = TcpListener::bind((host.as_str(), *port)).map_err(|e| {
            io::Error::new(e.kind(), format!("cannot bind metrics address {addr}: {e}"))
        })?;
        listener.set_nonblocking(true)?;
        Ok(ScrapeServer {
            listener,
            clients: Vec::new(),
        })
    }

    /// Where it listens.
    pub(crate) fn local_addr(&self) -> String {
        self.listener
            .local_addr()
            .map(|a| a.to_string())
            .unwrap_or_default()
    }

    /// The descriptors to poll: the listener and every client.
    pub(crate) fn fds(&self) -> Vec<BorrowedFd<'_>> {
        let mut fds = vec![self.listener.as_fd()];
        fds.extend(self.clients.iter().map(|c| c.stream.as_fd()));
        fds
    }

    /// Accepts and reads; answers every client whose request is complete
    /// with `body()` (computed once, if anyone asks).
    pub(crate) fn serve(&mut self, body: impl FnOnce() -> String) {
        while crate::sys::readable(self.listener.as_fd()) {
            let Ok((stream, _)) = self.listener.accept() else {
                break;
            };
            if stream.set_nonblocking(true).is_ok() {
                self.clients.push(Client {
                    stream,
                    request: Vec::new(),
                    since: Instant::now(),
                });
            }
        }
        let mut body = Some(body);
        let mut text: Option<String> = None;
        self.clients.retain_mut(|c| {
            let mut buf = [0u8; 2048];
            loop {
                match c.stream.read(&mut buf) {
                    Ok(0) => return false,
                    Ok(n) => c.request.extend_from_slice(&buf[..n]),
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(_) => return false,
                }
            }
            if c.request.windows(4).any(|w| w == b"\r\n\r\n") {
                if text.is_none() {
                    text = body.take().map(|f| f());
                }
                answer(&mut c.stream, &c.request, text.as_deref().unwrap_or(""));
                return false;
            }
            c.request.len() < MAX_REQUEST && c.since.elapsed() < REQUEST_DEADLINE
        });
    }
}

/// Writes the answer; small enough to fit the socket buffer, with a bound
/// for a client that does not read.
fn answer(stream: &mut TcpStream, request: &[u8], metrics: &str) {
    let line = String::from_utf8_lossy(request);
    let path = line.split_whitespace().nth(1).unwrap_or("");
    // OpenMetrics for a scraper that asks for it (Prometheus does), the
    // classic text format for everyone else.
    let openmetrics = line
        .lines()
        .filter_map(|l| l.split_once(':'))
        .filter(|(name, _)| name.trim().eq_ignore_ascii_case("accept"))
        .any(|(_, value)| value.contains("application/openmetrics-text"));
    let classic;
    let (status, content_type, body) = if path == "/metrics" || path == "/" {
        if openmetrics {
            ("200 OK", crate::metrics::OPENMETRICS, metrics)
        } else {
            classic = crate::metrics::to_prometheus_text(metrics);
            ("200 OK", crate::metrics::PROMETHEUS_TEXT, classic.as_str())
        }
    } else {
        ("404 Not Found", "text/plain", "metrics are at /metrics\n")
    };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_write_timeout(Some(Duration::from_secs(1)));
    let _ = stream
        .write_all(head.as_bytes())
        .and_then(|_| stream.write_all(body.as_bytes()));
}
