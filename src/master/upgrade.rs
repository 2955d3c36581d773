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

use std::ffi::OsString;
use std::io;
use std::os::fd::RawFd;
use std::path::PathBuf;

use nix::sys::signal::{SigSet, SigmaskHow};
use serde::{Deserialize, Serialize};

use crate::config::Settings;
use crate::listener::{BindAddr, Inherited};
use crate::recycle::RequestLimit;

use nix::unistd::Pid;
use std::os::fd::AsRawFd;
use tracing::{error, info};

use super::machine::Event;
use super::output::Output;
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
    /// The control socket and its path.
    #[serde(default)]
    pub(crate) control: Option<(RawFd, PathBuf)>,
    /// The queue leaving workers hand connections over on.
    #[serde(default)]
    pub(crate) handoff: Option<[RawFd; 2]>,
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
        fds.extend(self.control.as_ref().map(|(fd, _)| *fd));
        fds.extend(self.handoff.iter().flatten());
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
    // The master is single-threaded, so changing its environment is safe.
    std::env::set_var(HANDOVER_ENV, json);
    let err = crate::sys::exec_in_place(exe, args);
    std::env::remove_var(HANDOVER_ENV);
    err
}

/// Whether this process was started by a binary upgrade (its handover is
/// still in the environment).
pub(crate) fn is_handover() -> bool {
    std::env::var_os(HANDOVER_ENV).is_some()
}

impl super::Master {
    /// Runs the binary on disk as `check --load-app` with the server's
    /// arguments; returns why it could not start.
    pub(super) fn start_upgrade_check(&mut self) -> Result<(), String> {
        info!(
            event = crate::logging::LogEvent::Upgrade.name(),
            "Binary upgrade: checking {}",
            self.exe.display()
        );
        let started = Output::pipe().and_then(|(output, stderr)| {
            let child = std::process::Command::new(&self.exe)
                .args(check_args(&self.args))
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::from(stderr))
                .spawn()?;
            Ok((Pid::from_raw(child.id() as i32), output))
        });
        match started {
            Ok((pid, output)) => {
                self.upgrade = Some(super::UpgradeCheck { pid, output });
                Ok(())
            }
            Err(e) => Err(format!("cannot run {}: {e}", self.exe.display())),
        }
    }

    /// The check exited: its verdict for the decider.
    pub(super) fn upgrade_check_ended(&mut self, status: String, success: bool) -> Event {
        let tail = self
            .upgrade
            .take()
            .map(|check| check.output.finish())
            .unwrap_or_default();
        let output = if tail.is_empty() || success {
            String::new()
        } else {
            format!("; its last output: {}", tail.join(" | "))
        };
        Event::UpgradeChecked {
            passed: success,
            report: format!("the new binary's check {status}{output}"),
        }
    }

    /// Re-executes the binary in place, handing everything over; returns
    /// only if that failed (then nothing changed).
    pub(super) fn exec_upgrade(&mut self) {
        info!(
            event = crate::logging::LogEvent::Upgrade.name(),
            "Binary upgrade: check passed; re-executing in place (pid {} stays)", self.pid
        );
        let handover = self.handover();
        let fds = handover.fds();
        for fd in &fds {
            let _ = crate::sys::set_cloexec(*fd, false);
        }
        let _ = std::io::Write::flush(&mut std::io::stderr());
        block_signals();
        let err = exec(&self.exe, &self.args, &handover);
        unblock_signals();
        for fd in &fds {
            let _ = crate::sys::set_cloexec(*fd, true);
        }
        error!(
            event = crate::logging::LogEvent::Upgrade.name(),
            "Binary upgrade failed: cannot execute {}: {err}; nothing changed",
            self.exe.display()
        );
    }

    fn handover(&self) -> Handover {
        Handover {
            exe: self.exe.clone(),
            listeners: self
                .listeners
                .iter()
                .map(|l| HandedListener {
                    addr: l.addr.clone(),
                    socket: l.inherited(),
                    owns_path: l.owns_socket_file(),
                })
                .collect(),
            control: Some((self.control.raw_fd(), self.control.path().to_owned())),
            scoreboard_fd: self.board.raw_fd(),
            bell_rx: self.bell_rx.as_raw_fd(),
            bell_tx: self.bell.raw_fd(),
            workers: self
                .machine
                .workers()
                .iter()
                .filter_map(|w| {
                    let h = self.handles.iter().find(|h| h.pid == w.pid)?;
                    Some(HandedWorker {
                        pid: w.pid.as_raw(),
                        slot: h.slot,
                        generation: w.generation,
                        draining: !w.role.serves(),
                        request_limit: w.request_limit,
                        announced_ready: w.announced_ready,
                        output_fd: h.output.as_ref().map(|o| o.fd().as_raw_fd()),
                    })
                })
                .collect(),
            serving: self
                .machine
                .serving()
                .map(|g| (g.id, (*g.settings).clone())),
            handoff: self.handoff.as_ref().map(crate::handoff::Pair::raw_fds),
            next_generation: self.machine.next_generation(),
            target: self.machine.target(),
        }
    }
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
