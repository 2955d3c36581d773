//! Socket mode (`--pass-socket`), for apps that accept inherited sockets
//! and drain correctly by themselves: the worker hands its command the
//! listening sockets as descriptors 3, 4, ... with `LISTEN_FDS`,
//! `LISTEN_FDNAMES` and the command's own `LISTEN_PID` (systemd's socket
//! activation), and serves nothing itself. The command is ready when it
//! sends `READY=1` to the worker's `NOTIFY_SOCKET`, or after
//! `--worker-ready-delay`. On a drain the command gets its stop signal at
//! once: whether keep-alive clients see errors then is up to the command's
//! own drain (the proxy mode exists for that).

use std::os::fd::RawFd;
use std::os::unix::process::CommandExt;
use std::sync::Arc;
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use tokio::signal::unix::{signal, SignalKind};

use crate::boot::WorkerSpec;
use crate::scoreboard::{Doorbell, Slot, SlotState};

/// The first descriptor a socket-activated program reads (`SD_LISTEN_FDS_START`).
const LISTEN_FDS_START: RawFd = 3;

/// Runs the worker of a socket-mode command to its end; returns its exit
/// code.
pub(crate) fn run(spec: &WorkerSpec, slot: &'static Slot, bell: Arc<Doorbell>) -> i32 {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            return crate::boot::boot_failed(
                slot,
                &bell,
                &anyhow::anyhow!("cannot start the runtime: {e}"),
            )
        }
    };
    let code = runtime.block_on(serve(spec, slot, &bell));
    runtime.shutdown_background();
    code
}

async fn serve(spec: &WorkerSpec, slot: &'static Slot, bell: &Doorbell) -> i32 {
    let (Ok(mut term), Ok(mut quit), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::quit()),
        signal(SignalKind::interrupt()),
    ) else {
        return crate::boot::boot_failed(
            slot,
            bell,
            &anyhow::anyhow!("cannot install signal handlers"),
        );
    };
    crate::boot::end_boot_dispositions();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        loop {
            tick.tick().await;
            slot.beat();
        }
    });
    let settings = &spec.settings;
    let notify_path = std::env::temp_dir().join(format!("zdr-notify-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&notify_path);
    let notify = match tokio::net::UnixDatagram::bind(&notify_path) {
        Ok(n) => n,
        Err(e) => {
            return crate::boot::boot_failed(
                slot,
                bell,
                &anyhow::anyhow!("cannot open {}: {e}", notify_path.display()),
            )
        }
    };
    let _cleanup = RemoveOnDrop(notify_path.clone());
    let fds: Vec<RawFd> = spec.listeners.iter().map(|l| l.fd).collect();
    let child = match start(spec, &fds, &notify_path) {
        Ok(child) => child,
        Err(e) => return crate::boot::boot_failed(slot, bell, &e),
    };
    let pid = child.pid;
    let mut exited = child.exited.clone();

    // Ready: READY=1 on the notify socket, or the delay.
    let ready = async {
        let mut buf = [0u8; 4096];
        match settings.worker_ready_delay() {
            Some(delay) => tokio::time::sleep(delay).await,
            None => loop {
                if let Ok(n) = notify.recv(&mut buf).await {
                    let text = String::from_utf8_lossy(&buf[..n]);
                    if text.lines().any(|l| l.trim() == "READY=1") {
                        break;
                    }
                }
            },
        }
    };
    tokio::select! {
        _ = ready => {}
        _ = exited.wait_for(|s| s.is_some()) => {
            let status = child.exited.borrow().clone().unwrap_or_default();
            let said = child.last_words().await;
            return crate::boot::boot_failed(slot, bell, &anyhow::anyhow!(
                "the command {status} before it was ready{said}"));
        }
        _ = term.recv() => { child.kill_group(); return 0; }
        _ = quit.recv() => { child.kill_group(); return 0; }
        _ = int.recv() => { child.kill_group(); return 0; }
    }
    slot.set_state(SlotState::Ready);
    bell.ring();

    let mut orphan_check = tokio::time::interval(Duration::from_millis(250));
    let graceful = loop {
        tokio::select! {
            _ = term.recv() => break true,
            _ = quit.recv() => break false,
            _ = int.recv() => break false,
            _ = exited.wait_for(|s| s.is_some()) => {
                let status = child.exited.borrow().clone().unwrap_or_default();
                tracing::error!(event = crate::logging::LogEvent::CommandExited.name(), "worker {}: the command (pid: {pid}) {status}; the worker leaves service", std::process::id());
                slot.set_state(SlotState::Draining);
                bell.ring();
                child.kill_group();
                return 1;
            }
            _ = orphan_check.tick() => {
                if nix::unistd::getppid().as_raw() as u32 != spec.master_pid {
                    break false;
                }
            }
        }
    };
    slot.set_state(SlotState::Draining);
    bell.ring();
    if !graceful {
        child.kill_group();
        return 0;
    }
    stop(&child, settings).await
}

/// Gives the command its stop signal and up to the graceful timeout to
/// exit, then kills its process group and ends what it left running;
/// returns the worker's exit code.
async fn stop(child: &super::Child, settings: &crate::config::Settings) -> i32 {
    let pid = child.pid;
    let mut exited = child.exited.clone();
    if let Ok(sig) = Signal::try_from(settings.worker_stop_signal) {
        let _ = kill(pid, sig);
    }
    let began = tokio::time::Instant::now();
    let gone = tokio::time::timeout(
        settings.graceful_timeout(),
        exited.wait_for(|s| s.is_some()),
    )
    .await
    .is_ok();
    child.kill_group();
    let left = settings.graceful_timeout().saturating_sub(began.elapsed());
    super::end_tree(child, settings.worker_stop_signal, left).await;
    if gone {
        0
    } else {
        tracing::warn!(
            event = crate::logging::LogEvent::CommandExited.name(),
            "worker {}: the command (pid: {pid}) still ran at the graceful timeout; killed",
            std::process::id()
        );
        crate::boot::GAVE_UP
    }
}

/// Removes the notify socket's file when the worker ends.
struct RemoveOnDrop(std::path::PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Starts the command with the listening sockets at 3, 4, ..., and
/// `LISTEN_PID` set to its own pid by a shell that then execs it.
fn start(
    spec: &WorkerSpec,
    fds: &[RawFd],
    notify: &std::path::Path,
) -> anyhow::Result<super::Child> {
    let command = &spec.settings.command;
    let names: Vec<String> = (0..fds.len()).map(|i| format!("zdr{i}")).collect();
    let mut cmd = std::process::Command::new("/bin/sh");
    cmd.args(["-c", "LISTEN_PID=$$; export LISTEN_PID; exec \"$@\"", "zdr"])
        .args(command)
        .env("LISTEN_FDS", fds.len().to_string())
        .env("LISTEN_FDNAMES", names.join(":"))
        .env("NOTIFY_SOCKET", notify)
        .env("ZDR_WORKER_ID", spec.slot.to_string())
        .env("ZDR_GENERATION", spec.generation.to_string())
        .env("ZDR_MASTER_PID", spec.master_pid.to_string());
    let fds = fds.to_vec();
    // SAFETY: the closure runs in the forked child before exec and makes
    // only async-signal-safe calls (prctl, fcntl, dup2).
    unsafe {
        cmd.pre_exec(move || {
            nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(std::io::Error::from)?;
            // Out of the way first (a listener may already sit at 3, 4,
            // ...), then into place, inheritable.
            let mut high = Vec::with_capacity(fds.len());
            for fd in &fds {
                let moved = nix::fcntl::fcntl(*fd, nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(100))
                    .map_err(std::io::Error::from)?;
                high.push(moved);
            }
            for (i, fd) in high.iter().enumerate() {
                let target = LISTEN_FDS_START + i as RawFd;
                nix::unistd::dup2(*fd, target).map_err(std::io::Error::from)?;
                nix::fcntl::fcntl(
                    target,
                    nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::empty()),
                )
                .map_err(std::io::Error::from)?;
            }
            Ok(())
        });
    }
    super::spawn(cmd, 0, spec.master_pid)
}
