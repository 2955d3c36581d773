//! The master's side of the control socket, served from its event loop
//! without threads: accept, read one request line, answer, close.

use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, RawFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::machine::Awaited;
use crate::control::{Request, Response};

const MAX_REQUEST: usize = 64 * 1024;

/// A client connection.
struct Conn {
    id: u64,
    stream: UnixStream,
    buf: Vec<u8>,
    /// What the client waits for, once its request is taken.
    waiting_for: Option<Awaited>,
}

/// The listening control socket and its clients.
pub(crate) struct ControlServer {
    path: PathBuf,
    listener: UnixListener,
    conns: Vec<Conn>,
    next_id: u64,
}

impl ControlServer {
    /// Listens at `path`, readable and writable by this user only. A
    /// leftover socket file nobody answers on is replaced; one a running
    /// server answers on is an error.
    pub(crate) fn bind(path: &Path) -> io::Result<ControlServer> {
        if path.exists() {
            if UnixStream::connect(path).is_ok() {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    format!(
                        "control socket {} is in use: is this server already running?",
                        path.display()
                    ),
                ));
            }
            tracing::warn!(
                event = crate::logging::LogEvent::MasterFiles.name(),
                "control socket {} was left by a master that is gone: taking it over",
                path.display()
            );
            std::fs::remove_file(path)?;
        }
        // Created with mode 0600 from the start: no moment in which another
        // user could connect. The master runs no other thread.
        let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o177));
        let bound = UnixListener::bind(path);
        nix::sys::stat::umask(old);
        let listener = bound.map_err(|e| {
            let fix = match e.raw_os_error() {
                Some(nix::libc::EROFS) | Some(nix::libc::EACCES) | Some(nix::libc::ENOENT) => {
                    "; give it a writable place: --control-socket PATH (ZDR_CONTROL_SOCKET), \
                     or a writable volume there (on Kubernetes with a read-only root \
                     filesystem, an emptyDir at /tmp, as deploy/kubernetes.yaml has)"
                }
                _ => "",
            };
            io::Error::new(
                e.kind(),
                format!(
                    "cannot listen on control socket {}: {e}{fix}",
                    path.display()
                ),
            )
        })?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
        ControlServer::serving(listener, path)
    }

    /// Serves on `listener`, the socket at `path`.
    fn serving(listener: UnixListener, path: &Path) -> io::Result<ControlServer> {
        listener.set_nonblocking(true)?;
        Ok(ControlServer {
            path: path.to_owned(),
            listener,
            conns: Vec::new(),
            next_id: 1,
        })
    }

    /// Takes over the listening socket `fd` at `path`, handed over by the
    /// previous image of this master.
    ///
    /// # Safety
    ///
    /// `fd` must be a listening Unix socket this process owns and that
    /// nothing else will close or adopt.
    pub(crate) unsafe fn adopt(fd: RawFd, path: &Path) -> io::Result<ControlServer> {
        // SAFETY: the caller hands over ownership of `fd`.
        let listener = unsafe { UnixListener::from_raw_fd(fd) };
        crate::sys::set_cloexec(fd, true)?;
        ControlServer::serving(listener, path)
    }

    /// The listening socket's descriptor, to hand over across exec.
    pub(crate) fn raw_fd(&self) -> RawFd {
        self.listener.as_raw_fd()
    }

    /// The socket's path.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// Descriptors to poll: the listener and every client.
    pub(crate) fn fds(&self) -> Vec<BorrowedFd<'_>> {
        let mut fds = vec![self.listener.as_fd()];
        fds.extend(self.conns.iter().map(|c| c.stream.as_fd()));
        fds
    }

    /// Accepts new clients and reads; returns the complete requests. A
    /// malformed request is answered here, and so is a client that is
    /// neither root nor the master's own user (`SO_PEERCRED`): code running
    /// in a worker as `--user` cannot command the server.
    pub(crate) fn poll(&mut self) -> Vec<(u64, Request)> {
        while crate::sys::readable(self.listener.as_fd()) {
            let Ok((mut stream, _)) = self.listener.accept() else {
                break;
            };
            let peer =
                nix::sys::socket::getsockopt(&stream, nix::sys::socket::sockopt::PeerCredentials)
                    .map(|c| c.uid());
            let me = nix::unistd::geteuid().as_raw();
            match peer {
                Ok(uid) if uid == 0 || uid == me => {}
                Ok(uid) => {
                    write_response(
                        &mut stream,
                        &Response::error(format!(
                            "permission denied: uid {uid} may not command this server (only root and uid {me})"
                        )),
                    );
                    continue;
                }
                Err(_) => continue,
            }
            if stream.set_nonblocking(true).is_ok() {
                self.conns.push(Conn {
                    id: self.next_id,
                    stream,
                    buf: Vec::new(),
                    waiting_for: None,
                });
                self.next_id += 1;
            }
        }
        let mut requests = Vec::new();
        let mut answered = Vec::new();
        for conn in &mut self.conns {
            if conn.waiting_for.is_some() {
                continue;
            }
            let mut chunk = [0u8; 4096];
            loop {
                match conn.stream.read(&mut chunk) {
                    Ok(0) => {
                        answered.push(conn.id);
                        break;
                    }
                    Ok(n) => conn.buf.extend_from_slice(&chunk[..n]),
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(_) => break,
                }
            }
            if let Some(end) = conn.buf.iter().position(|b| *b == b'\n') {
                match serde_json::from_slice::<Request>(&conn.buf[..end]) {
                    Ok(request) => requests.push((conn.id, request)),
                    Err(e) => {
                        write_response(
                            &mut conn.stream,
                            &Response::error(format!("bad request: {e}")),
                        );
                        answered.push(conn.id);
                    }
                }
                conn.buf.clear();
            } else if conn.buf.len() > MAX_REQUEST {
                answered.push(conn.id);
            }
        }
        self.conns.retain(|c| !answered.contains(&c.id));
        requests
    }

    /// Answers a client and closes its connection.
    pub(crate) fn respond(&mut self, id: u64, response: &Response) {
        if let Some(i) = self.conns.iter().position(|c| c.id == id) {
            let mut conn = self.conns.remove(i);
            write_response(&mut conn.stream, response);
        }
    }

    /// Keeps a client waiting for `what`.
    pub(crate) fn hold(&mut self, id: u64, what: Awaited) {
        if let Some(conn) = self.conns.iter_mut().find(|c| c.id == id) {
            conn.waiting_for = Some(what);
        }
    }

    /// The clients waiting for `from` wait for `to` instead.
    pub(crate) fn follow(&mut self, from: Awaited, to: Awaited) {
        for conn in &mut self.conns {
            if conn.waiting_for == Some(from) {
                conn.waiting_for = Some(to);
            }
        }
    }

    /// Answers the clients waiting for `what`.
    pub(crate) fn answer(&mut self, what: Awaited, response: &Response) {
        let waiting: Vec<u64> = self
            .conns
            .iter()
            .filter(|c| c.waiting_for == Some(what))
            .map(|c| c.id)
            .collect();
        for id in waiting {
            self.respond(id, response);
        }
    }

    /// Removes the socket file (the master is exiting).
    pub(crate) fn remove(&self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

fn write_response(stream: &mut UnixStream, response: &Response) {
    let Ok(mut line) = serde_json::to_string(response) else {
        return;
    };
    line.push('\n');
    // A client that does not read gets a second, not the master.
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_write_timeout(Some(Duration::from_secs(1)));
    let _ = stream.write_all(line.as_bytes());
}
