//! The control socket: how `zdr status`, `zdr reload`, `zdr stop` and
//! `zdr scale` talk to a running master.
//!
//! The master listens on a Unix socket (mode 0600, removed on exit). A
//! client sends one JSON [`Request`] on one line and reads one JSON
//! [`Response`] line back; for `reload` with `wait`, the answer comes when
//! the reload has completed or rolled back.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config::Settings;
use crate::listener::BindAddr;

/// A command for the master.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "lowercase")]
pub enum Request {
    /// Report the server's state.
    Status,
    /// Roll out a new generation; with `wait`, answer once it completed or
    /// rolled back.
    Reload {
        /// Answer only when the reload is over.
        wait: bool,
        /// Start this many workers of the new generation as a canary, judged
        /// before the rest (overrides the `canary` setting; 0: none).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        canary: Option<usize>,
    },
    /// Stop the server, gracefully or at once.
    Stop {
        /// Let in-flight requests finish.
        graceful: bool,
        /// Answer only when the master exits: ok if every worker finished
        /// in time, an error if some had to be killed.
        #[serde(default)]
        wait: bool,
    },
    /// Run this many workers.
    Scale {
        /// The new number of workers (at least 1).
        workers: usize,
    },
}

/// The master's answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Response {
    /// Whether the command succeeded.
    pub ok: bool,
    /// One line saying what happened.
    pub message: String,
    /// The server's state, for `status`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<Status>,
    /// The reload's outcome, for `reload`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reload: Option<ReloadOutcome>,
}

impl Response {
    /// A plain success.
    pub fn ok(message: impl Into<String>) -> Response {
        Response {
            ok: true,
            message: message.into(),
            status: None,
            reload: None,
        }
    }

    /// A plain failure.
    pub fn error(message: impl Into<String>) -> Response {
        Response {
            ok: false,
            message: message.into(),
            status: None,
            reload: None,
        }
    }
}

/// A running server's state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Status {
    /// The master's pid.
    pub master_pid: u32,
    /// What the master is doing: booting, serving, reloading, paused (after
    /// SIGWINCH) or stopping.
    #[serde(default)]
    pub state: String,
    /// Seconds since the master started.
    pub uptime_secs: f64,
    /// The generation that serves.
    pub generation: Option<u64>,
    /// A generation booting to replace it, during a reload.
    pub booting_generation: Option<u64>,
    /// How that reload stands: its canary, its batches.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<String>,
    /// Listening addresses.
    pub bind: Vec<String>,
    /// The number of workers a generation should have.
    pub target_workers: usize,
    /// Every worker, of every generation.
    pub workers: Vec<WorkerStatus>,
    /// The last reload's outcome, if there was one.
    pub last_reload: Option<ReloadOutcome>,
}

/// One worker's state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkerStatus {
    /// Its pid.
    pub pid: u32,
    /// Its generation.
    pub generation: u64,
    /// `booting`, `ready`, `retiring` (its replacement is starting),
    /// `draining` or `exiting`.
    pub state: String,
    /// Seconds since it was started.
    pub age_secs: f64,
    /// Requests it has served.
    pub requests: u64,
    /// Connections open now.
    pub connections: u64,
    /// Of those, idle HTTP/1.1 connections parked out of their tasks (a
    /// few hundred bytes each); 0 from a server of an earlier build.
    #[serde(default)]
    pub parked: u64,
    /// Whether the worker itself says it takes new connections: false
    /// before it is ready and once it has begun to drain.
    #[serde(default)]
    pub accepting: bool,
    /// Resident memory, in bytes.
    pub rss_bytes: u64,
    /// Memory it owns alone (private pages, not shared copy-on-write with
    /// the master), in bytes: what `--max-worker-memory` limits.
    #[serde(default)]
    pub owned_bytes: u64,
}

/// How a reload ended.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReloadOutcome {
    /// The generation it started.
    pub generation: u64,
    /// Whether the new generation took over.
    pub completed: bool,
    /// Milliseconds from the reload's start to the switch (or the rollback).
    pub duration_ms: u64,
    /// Workers ready in the new generation.
    pub workers_ready: usize,
    /// Why it was rolled back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Where a server's control socket is: the `control_socket` setting, else
/// beside the pidfile (`app.pid` → `app.pid.ctl`), else in the temporary
/// directory, named after the first bind address. `None` when the first
/// address is an ephemeral port (`:0`) or an inherited socket (`fd://N`),
/// which name no server: the master
/// then names the socket after its pid, and a client needs `--pid` or
/// `--control-socket`.
pub(crate) fn socket_path(settings: &Settings) -> Option<PathBuf> {
    if let Some(path) = &settings.control_socket {
        return Some(path.clone());
    }
    if let Some(pidfile) = &settings.pidfile {
        let mut name = pidfile.clone().into_os_string();
        name.push(".ctl");
        return Some(PathBuf::from(name));
    }
    let tag: String = match settings.bind.first() {
        Some(BindAddr::Tcp { port: 0, .. } | BindAddr::Fd(_)) => return None,
        Some(BindAddr::Unix(p)) => p.display().to_string(),
        Some(other) => other.to_string(),
        None => return None,
    };
    let tag: String = tag
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' {
                c
            } else {
                '-'
            }
        })
        .collect();
    Some(std::env::temp_dir().join(format!("zdr-{}.ctl", tag.trim_matches('-'))))
}

/// The socket path a master uses: [`socket_path`], or one named after its
/// pid.
pub(crate) fn master_socket_path(settings: &Settings, pid: u32) -> PathBuf {
    socket_path(settings).unwrap_or_else(|| std::env::temp_dir().join(format!("zdr-{pid}.ctl")))
}

/// Sends one request and waits (up to `timeout`) for the answer.
///
/// A status request whose connection is cut before any answer is sent once
/// more: a binary upgrade hands the listening socket to the new image, but
/// a connection the old image had accepted and not yet read ends with it.
/// (Other requests are not sent twice: the first may have been acted on.)
pub fn send(path: &Path, request: &Request, timeout: Duration) -> std::io::Result<Response> {
    send_to_master(path, request, timeout).map(|(response, _)| response)
}

/// As [`send`], with the pid of the process that answered (from the
/// socket's peer credentials; none if the system does not say): a client
/// that asked the master to stop waits for that process to be gone.
pub fn send_to_master(
    path: &Path,
    request: &Request,
    timeout: Duration,
) -> std::io::Result<(Response, Option<u32>)> {
    match send_once(path, request, timeout) {
        Err(e)
            if *request == Request::Status
                && matches!(
                    e.kind(),
                    std::io::ErrorKind::ConnectionReset
                        | std::io::ErrorKind::BrokenPipe
                        | std::io::ErrorKind::UnexpectedEof
                ) =>
        {
            send_once(path, request, timeout)
        }
        other => other,
    }
}

fn send_once(
    path: &Path,
    request: &Request,
    timeout: Duration,
) -> std::io::Result<(Response, Option<u32>)> {
    let mut stream = UnixStream::connect(path)?;
    let master = nix::sys::socket::getsockopt(&stream, nix::sys::socket::sockopt::PeerCredentials)
        .ok()
        .and_then(|c| u32::try_from(c.pid()).ok())
        .filter(|pid| *pid > 0);
    stream.set_read_timeout(Some(timeout))?;
    let mut line = serde_json::to_string(request).map_err(std::io::Error::other)?;
    line.push('\n');
    stream.write_all(line.as_bytes())?;
    let mut answer = String::new();
    if BufReader::new(stream).read_line(&mut answer)? == 0 {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    serde_json::from_str(&answer)
        .map(|response| (response, master))
        .map_err(|e| std::io::Error::other(format!("bad answer from the server: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_one_json_line() {
        let r = Request::Reload {
            wait: true,
            canary: None,
        };
        assert_eq!(
            serde_json::to_string(&r).unwrap(),
            r#"{"command":"reload","wait":true}"#
        );
        let back: Request = serde_json::from_str(r#"{"command":"scale","workers":4}"#).unwrap();
        assert_eq!(back, Request::Scale { workers: 4 });
    }

    #[test]
    fn socket_path_defaults() {
        let mut s = Settings::resolve(Default::default()).unwrap();
        assert_eq!(
            socket_path(&s),
            Some(std::env::temp_dir().join("zdr-127.0.0.1-8000.ctl"))
        );
        s.bind = vec!["127.0.0.1:0".parse().unwrap()];
        assert_eq!(socket_path(&s), None);
        assert_eq!(
            master_socket_path(&s, 42),
            std::env::temp_dir().join("zdr-42.ctl")
        );
        s.pidfile = Some("/run/app.pid".into());
        assert_eq!(socket_path(&s), Some(PathBuf::from("/run/app.pid.ctl")));
        s.control_socket = Some("/run/ctl.sock".into());
        assert_eq!(socket_path(&s), Some(PathBuf::from("/run/ctl.sock")));
    }
}
