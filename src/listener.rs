//! Listening sockets: parsed from `--bind`, bound once by the master, and
//! inherited by every worker as plain file descriptors.
//!
//! All workers accept from the same socket (one shared accept queue), so a
//! worker that stops accepting never loses a queued connection: the others
//! take it.

use std::fmt;
use std::io;
use std::net::{SocketAddr, TcpListener, ToSocketAddrs};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use socket2::{Domain, Socket, Type};

/// A configured listening address.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum BindAddr {
    /// `HOST:PORT` or `[IPV6]:PORT`; the host may be a name.
    Tcp {
        /// Host name or IP literal (without brackets).
        host: String,
        /// Port; 0 picks a free one.
        port: u16,
    },
    /// `unix:PATH`.
    Unix(PathBuf),
    /// `fd://N`: a listening socket this process inherited.
    Fd(RawFd),
}

impl FromStr for BindAddr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        // Gunicorn's explicit form.
        let s = s.strip_prefix("tcp://").unwrap_or(s);
        if let Some(path) = s.strip_prefix("unix:") {
            let path = path.strip_prefix("//").unwrap_or(path);
            if path.is_empty() {
                return Err(format!("{s:?}: unix: needs a path"));
            }
            return Ok(BindAddr::Unix(PathBuf::from(path)));
        }
        if let Some(n) = s.strip_prefix("fd://") {
            return n
                .parse::<RawFd>()
                .ok()
                .filter(|n| *n >= 0)
                .map(BindAddr::Fd)
                .ok_or_else(|| format!("{s:?}: fd:// needs a file descriptor number"));
        }
        let bad = || format!("{s:?} is not HOST:PORT, [IPV6]:PORT, unix:PATH or fd://N");
        let (host, port) = if let Some(rest) = s.strip_prefix('[') {
            let (host, rest) = rest.split_once(']').ok_or_else(bad)?;
            let port = match rest.strip_prefix(':') {
                Some(p) => p,
                None if rest.is_empty() => "8000",
                None => return Err(bad()),
            };
            (host, port)
        } else {
            match s.rsplit_once(':') {
                Some((host, _)) if host.contains(':') => return Err(bad()),
                Some((host, port)) => (host, port),
                None => (s, "8000"),
            }
        };
        let port = match port.parse::<u16>() {
            Ok(port) => port,
            Err(_) if !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) => {
                return Err(format!(
                    "{s:?}: port {port} is out of range (1 to 65535, or 0 for any free port)"
                ))
            }
            Err(_) => return Err(bad()),
        };
        if host.is_empty() || host.contains(char::is_whitespace) {
            return Err(bad());
        }
        Ok(BindAddr::Tcp {
            host: host.to_owned(),
            port,
        })
    }
}

impl TryFrom<String> for BindAddr {
    type Error = String;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<BindAddr> for String {
    fn from(b: BindAddr) -> String {
        b.to_string()
    }
}

impl fmt::Display for BindAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BindAddr::Tcp { host, port } if host.contains(':') => write!(f, "[{host}]:{port}"),
            BindAddr::Tcp { host, port } => write!(f, "{host}:{port}"),
            BindAddr::Unix(path) => write!(f, "unix:{}", path.display()),
            BindAddr::Fd(fd) => write!(f, "fd://{fd}"),
        }
    }
}

/// What kind of socket a listener is, so a worker can rebuild it from a
/// bare file descriptor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Kind {
    /// A TCP socket.
    Tcp,
    /// A Unix stream socket.
    Unix,
}

/// A bound listening socket, owned by the master.
#[derive(Debug)]
pub struct Listener {
    /// The address it was configured as.
    pub addr: BindAddr,
    /// The socket.
    pub fd: OwnedFd,
    /// Its kind.
    pub kind: Kind,
    /// A Unix socket file this process created and removes on exit.
    unlink_on_exit: Option<PathBuf>,
}

/// A listener as passed to a worker: a descriptor number and its kind.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct Inherited {
    /// The descriptor, open in the worker.
    pub fd: RawFd,
    /// Its kind.
    pub kind: Kind,
}

/// Why a listener could not be made.
#[derive(Debug, thiserror::Error)]
#[error("cannot bind {addr}: {message}")]
pub struct BindError {
    /// The address.
    pub addr: BindAddr,
    /// Why, in one line.
    pub message: String,
}

impl Listener {
    /// Binds (or, for `fd://`, adopts) a listening socket.
    pub fn bind(addr: &BindAddr, backlog: u32) -> Result<Listener, BindError> {
        let fail = |message: String| BindError {
            addr: addr.clone(),
            message,
        };
        let describe = |e: io::Error| match e.kind() {
            io::ErrorKind::AddrInUse => "address already in use".to_owned(),
            io::ErrorKind::PermissionDenied => "permission denied".to_owned(),
            io::ErrorKind::AddrNotAvailable => "address not available on this host".to_owned(),
            _ => e.to_string(),
        };
        let backlog = i32::try_from(backlog).unwrap_or(i32::MAX);
        match addr {
            BindAddr::Tcp { host, port } => {
                let sockaddr = (host.as_str(), *port)
                    .to_socket_addrs()
                    .map_err(|e| {
                        fail(format!(
                            "cannot resolve the host {host:?} ({e}); give an IP address or a \
                             name this machine resolves, as HOST:PORT (a host alone gets port \
                             8000), [IPV6]:PORT, unix:PATH or fd://N"
                        ))
                    })?
                    .next()
                    .ok_or_else(|| fail(format!("{host:?} resolves to no address")))?;
                let socket = Socket::new(Domain::for_address(sockaddr), Type::STREAM, None)
                    .map_err(|e| fail(e.to_string()))?;
                socket
                    .set_reuse_address(true)
                    .map_err(|e| fail(e.to_string()))?;
                if sockaddr.is_ipv6() {
                    socket.set_only_v6(true).map_err(|e| fail(e.to_string()))?;
                }
                socket
                    .bind(&sockaddr.into())
                    .map_err(|e| fail(describe(e)))?;
                socket.listen(backlog).map_err(|e| fail(describe(e)))?;
                Ok(Listener {
                    addr: addr.clone(),
                    fd: socket.into(),
                    kind: Kind::Tcp,
                    unlink_on_exit: None,
                })
            }
            BindAddr::Unix(path) => {
                if path.exists() {
                    // A socket file nobody listens on is left over from a
                    // crash: replace it. One that answers is in use.
                    match std::os::unix::net::UnixStream::connect(path) {
                        Ok(_) => return Err(fail("address already in use".to_owned())),
                        Err(_) => {
                            let meta =
                                std::fs::symlink_metadata(path).map_err(|e| fail(e.to_string()))?;
                            use std::os::unix::fs::FileTypeExt;
                            if !meta.file_type().is_socket() {
                                return Err(fail("the path exists and is not a socket".to_owned()));
                            }
                            std::fs::remove_file(path).map_err(|e| fail(e.to_string()))?;
                        }
                    }
                }
                let listener = UnixListener::bind(path).map_err(|e| fail(describe(e)))?;
                let socket = Socket::from(OwnedFd::from(listener));
                socket.listen(backlog).map_err(|e| fail(describe(e)))?;
                Ok(Listener {
                    addr: addr.clone(),
                    fd: socket.into(),
                    kind: Kind::Unix,
                    unlink_on_exit: Some(path.clone()),
                })
            }
            BindAddr::Fd(n) => {
                let raw = *n;
                let is_listening = nix::sys::socket::getsockopt(
                    &unsafe_borrow(raw),
                    nix::sys::socket::sockopt::AcceptConn,
                )
                .map_err(|e| fail(format!("not an open socket: {e}")))?;
                if !is_listening {
                    return Err(fail("the socket is not listening".to_owned()));
                }
                let local = nix::sys::socket::getsockname::<nix::sys::socket::SockaddrStorage>(raw)
                    .map_err(|e| fail(e.to_string()))?;
                let kind = if local.as_unix_addr().is_some() {
                    Kind::Unix
                } else {
                    Kind::Tcp
                };
                // SAFETY: the descriptor was handed to this process to own
                // (`fd://N`), and was just checked to be an open socket.
                let fd = unsafe { OwnedFd::from_raw_fd(raw) };
                crate::sys::set_cloexec(fd.as_raw_fd(), true).map_err(|e| fail(e.to_string()))?;
                Ok(Listener {
                    addr: addr.clone(),
                    fd,
                    kind,
                    unlink_on_exit: None,
                })
            }
        }
    }

    /// The URL-ish name the socket is reachable at, with the real port when
    /// `:0` was asked for (`http://127.0.0.1:41234`, `unix:/run/app.sock`).
    pub fn display_addr(&self) -> String {
        self.url(false)
    }

    /// The address as a URL: `https://` when serving TLS.
    pub fn url(&self, tls: bool) -> String {
        let scheme = if tls { "https" } else { "http" };
        let sock = socket2::SockRef::from(&self.fd);
        match self.kind {
            Kind::Tcp => match sock.local_addr().ok().and_then(|a| a.as_socket()) {
                Some(SocketAddr::V6(a)) => format!("{scheme}://[{}]:{}", a.ip(), a.port()),
                Some(a) => format!("{scheme}://{a}"),
                None => self.addr.to_string(),
            },
            Kind::Unix => self.addr.to_string(),
        }
    }

    /// The listener as a worker will see it.
    pub fn inherited(&self) -> Inherited {
        Inherited {
            fd: self.fd.as_raw_fd(),
            kind: self.kind,
        }
    }

    /// Rebuilds a master's listener from a descriptor this process inherited
    /// across `exec` (binary upgrade), keeping ownership of its socket file.
    ///
    /// # Safety
    ///
    /// `inherited.fd` must be an open descriptor that this process owns and
    /// that nothing else closes or adopts.
    pub(crate) unsafe fn adopt(
        addr: BindAddr,
        inherited: Inherited,
        owns_path: bool,
    ) -> io::Result<Listener> {
        // SAFETY: the caller hands over a descriptor this process owns.
        let fd = unsafe { OwnedFd::from_raw_fd(inherited.fd) };
        crate::sys::set_cloexec(fd.as_raw_fd(), true)?;
        let unlink_on_exit = match (&addr, owns_path) {
            (BindAddr::Unix(p), true) => Some(p.clone()),
            _ => None,
        };
        Ok(Listener {
            addr,
            fd,
            kind: inherited.kind,
            unlink_on_exit,
        })
    }

    /// Whether this process created the socket's file (and removes it).
    pub fn owns_socket_file(&self) -> bool {
        self.unlink_on_exit.is_some()
    }

    /// Removes the Unix socket file this process created, if any. Called by
    /// the master as it exits.
    pub fn remove_socket_file(&self) {
        if let Some(path) = &self.unlink_on_exit {
            let _ = std::fs::remove_file(path);
        }
    }
}

fn unsafe_borrow(fd: RawFd) -> std::os::fd::BorrowedFd<'static> {
    // SAFETY: used only for the duration of one getsockopt call on a
    // descriptor number the user named; if it is not open the call fails
    // with EBADF, which is reported.
    unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) }
}

/// Listening sockets passed by systemd socket activation (`LISTEN_FDS` for
/// this pid), as `fd://N` addresses; none without. Clears the variables so
/// that workers do not take them for their own.
pub fn activated_sockets() -> Vec<BindAddr> {
    sd_notify::listen_fds()
        .map(|fds| fds.map(BindAddr::Fd).collect())
        .unwrap_or_default()
}

/// Binds every address, or fails naming the first that cannot be bound.
pub fn bind_all(addrs: &[BindAddr], backlog: u32) -> Result<Vec<Listener>, BindError> {
    addrs.iter().map(|a| Listener::bind(a, backlog)).collect()
}

/// A worker's side: turns inherited descriptors back into tokio listeners.
pub(crate) enum WorkerListener {
    /// TCP.
    Tcp(tokio::net::TcpListener),
    /// Unix.
    Unix(tokio::net::UnixListener),
}

impl WorkerListener {
    /// Whether a connection waits in the socket's accept queue now.
    pub(crate) fn has_waiting(&self) -> bool {
        use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
        use std::os::fd::AsFd;
        let fd = match self {
            WorkerListener::Tcp(l) => l.as_fd(),
            WorkerListener::Unix(l) => l.as_fd(),
        };
        let mut fds = [PollFd::new(fd, PollFlags::POLLIN)];
        poll(&mut fds, PollTimeout::ZERO).is_ok_and(|n| n > 0)
            && fds[0]
                .revents()
                .is_some_and(|r| r.contains(PollFlags::POLLIN))
    }

    /// Rebuilds a listener from a descriptor inherited from the master.
    /// Must run inside the worker's runtime.
    ///
    /// # Safety
    ///
    /// `inherited.fd` must be an open descriptor that this process owns and
    /// that nothing else closes or adopts.
    pub(crate) unsafe fn from_inherited(inherited: Inherited) -> io::Result<WorkerListener> {
        // SAFETY: the master passed this descriptor to the worker to own;
        // nothing else in the worker uses it.
        let fd = unsafe { OwnedFd::from_raw_fd(inherited.fd) };
        crate::sys::set_cloexec(fd.as_raw_fd(), true)?;
        match inherited.kind {
            Kind::Tcp => {
                let std = TcpListener::from(fd);
                std.set_nonblocking(true)?;
                Ok(WorkerListener::Tcp(tokio::net::TcpListener::from_std(std)?))
            }
            Kind::Unix => {
                let std = UnixListener::from(fd);
                std.set_nonblocking(true)?;
                Ok(WorkerListener::Unix(tokio::net::UnixListener::from_std(
                    std,
                )?))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_form() {
        let tcp = |h: &str, p| BindAddr::Tcp {
            host: h.to_owned(),
            port: p,
        };
        assert_eq!("127.0.0.1:8000".parse(), Ok(tcp("127.0.0.1", 8000)));
        assert_eq!("0.0.0.0:0".parse(), Ok(tcp("0.0.0.0", 0)));
        assert_eq!("[::1]:9000".parse(), Ok(tcp("::1", 9000)));
        assert_eq!("[::]".parse(), Ok(tcp("::", 8000)));
        assert_eq!("localhost".parse(), Ok(tcp("localhost", 8000)));
        assert_eq!(
            "unix:/run/app.sock".parse(),
            Ok(BindAddr::Unix("/run/app.sock".into()))
        );
        assert_eq!("fd://3".parse(), Ok(BindAddr::Fd(3)));
        for bad in [
            "",
            "host:port",
            "1.2.3.4:99999",
            "::1:80",
            "unix:",
            "fd://x",
            ":80",
        ] {
            assert!(bad.parse::<BindAddr>().is_err(), "{bad:?} should not parse");
        }
        // A port out of range is said to be, not called a malformed address.
        assert_eq!(
            "127.0.0.1:99999".parse::<BindAddr>(),
            Err("\"127.0.0.1:99999\": port 99999 is out of range (1 to 65535, or 0 for any free port)".to_owned())
        );
    }

    #[test]
    fn a_host_that_does_not_resolve_is_named_with_the_forms() {
        let addr: BindAddr = "nonsense.invalid".parse().unwrap();
        let Err(err) = Listener::bind(&addr, 16) else {
            panic!("nonsense.invalid resolved");
        };
        let err = err.to_string();
        assert!(
            err.contains("cannot resolve the host \"nonsense.invalid\""),
            "{err}"
        );
        assert!(err.contains("a host alone gets port 8000"), "{err}");
    }

    #[test]
    fn display_round_trips() {
        for s in ["127.0.0.1:8000", "[::1]:80", "unix:/tmp/a.sock", "fd://5"] {
            assert_eq!(s.parse::<BindAddr>().unwrap().to_string(), s);
        }
    }

    #[test]
    fn port_in_use_is_named() {
        let first = Listener::bind(&"127.0.0.1:0".parse().unwrap(), 16).unwrap();
        let port = first
            .display_addr()
            .rsplit(':')
            .next()
            .unwrap()
            .parse::<u16>()
            .unwrap();
        let addr: BindAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let err = Listener::bind(&addr, 16).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("cannot bind 127.0.0.1:{port}: address already in use")
        );
    }
}
