//! SIGUSR2, the binary upgrade that keeps the master's pid.
//!
//! 1. The executable now on disk runs `check --load-app` with the server's
//!    arguments: it loads the configuration and the app, then exits. A
//!    failure changes nothing.
//! 2. The master blocks its signals, clears close-on-exec on every
//!    descriptor it hands over (listeners, scoreboard, doorbell, workers'
//!    output pipes), writes a [`Handover`] into the environment and
//!    re-executes itself in place. Its pid stays, so its workers stay its
//!    children and Procfile platforms, containers and systemd keep tracking
//!    it.
//! 3. The new image adopts all that, unblocks its signals (any that arrived
//!    meanwhile are delivered now) and rolls out a new generation exactly
//!    as a reload does, with the same rollback.

use std::ffi::{CString, OsString};
use std::io;
use std::os::fd::RawFd;
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;

use nix::sys::signal::{SigSet, SigmaskHow};
use serde::{Deserialize, Serialize};

use crate::config::Settings;
use crate::listener::{BindAddr, Inherited};
use crate::worker::RequestLimit;

use super::signals::HANDLED;

/// The environment variable that carries the handover across exec.
const HANDOVER_ENV: &str = "ZDR_UPGRADE_HANDOVER";

/// Everything the new image of the master takes over.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct Handover {
    pub(crate) exe: PathBuf,
    pub(crate) listeners: Vec<HandedListener>,
    pub(crate) scoreboard_fd: RawFd,
    pub(crate) bell_rx: RawFd,
    pub(crate) bell_tx: RawFd,
    pub(crate) workers: Vec<HandedWorker>,
    pub(crate) serving: Option<(u64, Settings)>,
    pub(crate) next_generation: u64,
    pub(crate) target: usize,
}

/// A listening socket handed over.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct HandedListener {
    pub(crate) addr: BindAddr,
    pub(crate) socket: Inherited,
    pub(crate) owns_path: bool,
}

/// A running worker handed over.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct HandedWorker {
    pub(crate) pid: i32,
    pub(crate) slot: usize,
    pub(crate) generation: u64,
    pub(crate) draining: bool,
    pub(crate) request_limit: Option<RequestLimit>,
    pub(crate) announced_ready: bool,
    pub(crate) output_fd: Option<RawFd>,
}

impl Handover {
    /// Every descriptor the new image needs.
    pub(crate) fn fds(&self) -> Vec<RawFd> {
        let mut fds: Vec<RawFd> = self.listeners.iter().map(|l| l.socket.fd).collect();
        fds.extend([self.scoreboard_fd, self.bell_rx, self.bell_tx]);
        fds.extend(self.workers.iter().filter_map(|w| w.output_fd));
        fds
    }
}

/// The handover left by the previous image, if this process is one
/// re-executed by a binary upgrade. Removes it from the environment.
pub(crate) fn take() -> Option<Result<Handover, serde_json::Error>> {
    let text = std::env::var_os(HANDOVER_ENV)?;
    std::env::remove_var(HANDOVER_ENV);
    Some(serde_json::from_str(&text.to_string_lossy()))
}

/// The arguments that run the check: the server's own, with `serve`
/// replaced by `check --load-app`.
pub(crate) fn check_args(args: &[OsString]) -> Vec<OsString> {
    let mut out: Vec<OsString> = args.iter().skip(1).cloned().collect();
    match out.iter().position(|a| a == "serve") {
        Some(i) => {
            out[i] = "check".into();
            out.insert(i + 1, "--load-app".into());
        }
        None => out
            .splice(0..0, ["check".into(), "--load-app".into()])
            .for_each(drop),
    }
    out
}

fn handled_set() -> SigSet {
    let mut set = SigSet::empty();
    for sig in HANDLED {
        if let Ok(sig) = nix::sys::signal::Signal::try_from(sig) {
            set.add(sig);
        }
    }
    set
}

/// Holds the master's signals pending across exec.
pub(crate) fn block_signals() {
    let _ = nix::sys::signal::sigprocmask(SigmaskHow::SIG_BLOCK, Some(&handled_set()), None);
}

/// Lets held signals through (their handlers are installed).
pub(crate) fn unblock_signals() {
    let _ = nix::sys::signal::sigprocmask(SigmaskHow::SIG_UNBLOCK, Some(&handled_set()), None);
}

/// Re-executes `exe` with `args` and the handover; returns only on failure.
pub(crate) fn exec(exe: &std::path::Path, args: &[OsString], handover: &Handover) -> io::Error {
    let json = match serde_json::to_string(handover) {
        Ok(j) => j,
        Err(e) => return io::Error::other(e),
    };
    let to_c = |s: &[u8]| CString::new(s).map_err(io::Error::other);
    let program = match to_c(exe.as_os_str().as_bytes()) {
        Ok(p) => p,
        Err(e) => return e,
    };
    let argv: Result<Vec<CString>, io::Error> = args.iter().map(|a| to_c(a.as_bytes())).collect();
    let argv = match argv {
        Ok(a) => a,
        Err(e) => return e,
    };
    // The master is single-threaded, so changing its environment is safe.
    std::env::set_var(HANDOVER_ENV, json);
    let err = match nix::unistd::execv(&program, &argv) {
        Ok(never) => match never {},
        Err(e) => io::Error::from(e),
    };
    std::env::remove_var(HANDOVER_ENV);
    err
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_replaces_the_serve_subcommand() {
        let args: Vec<OsString> = ["/bin/app", "serve", "-w", "3"].map(OsString::from).into();
        assert_eq!(
            check_args(&args),
            ["check", "--load-app", "-w", "3"].map(OsString::from)
        );
    }
}
