//! The metrics endpoint, served by the master from its event loop: accept,
//! read the request, answer with the Prometheus text, close.

use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsFd, BorrowedFd};
use std::time::Duration;

use crate::listener::BindAddr;

/// The listening metrics socket.
pub(crate) struct ScrapeServer {
    listener: TcpListener,
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
        Ok(ScrapeServer { listener })
    }

    /// Where it listens.
    pub(crate) fn local_addr(&self) -> String {
        self.listener
            .local_addr()
            .map(|a| a.to_string())
            .unwrap_or_default()
    }

    /// The descriptor to poll.
    pub(crate) fn fd(&self) -> BorrowedFd<'_> {
        self.listener.as_fd()
    }

    /// The clients waiting to be answered.
    pub(crate) fn accept(&self) -> Vec<TcpStream> {
        std::iter::from_fn(|| self.listener.accept().ok().map(|(s, _)| s))
            .take(16)
            .collect()
    }
}

/// Answers one scrape. A client gets a moment, not the master: the reads
/// and writes are bounded.
pub(crate) fn answer(mut stream: TcpStream, body: impl FnOnce() -> String) {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(Duration::from_millis(200)));
    let _ = stream.set_write_timeout(Some(Duration::from_secs(1)));
    let mut request = Vec::new();
    let mut buf = [0u8; 2048];
    while !request.windows(4).any(|w| w == b"\r\n\r\n") && request.len() < 8192 {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => request.extend_from_slice(&buf[..n]),
        }
    }
    let line = String::from_utf8_lossy(&request);
    let path = line.split_whitespace().nth(1).unwrap_or("");
    let (status, content_type, body) = if path == "/metrics" || path == "/" {
        ("200 OK", "text/plain; version=0.0.4; charset=utf-8", body())
    } else {
        (
            "404 Not Found",
            "text/plain",
            "metrics are at /metrics\n".to_owned(),
        )
    };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let _ = stream
        .write_all(head.as_bytes())
        .and_then(|_| stream.write_all(body.as_bytes()));
}
