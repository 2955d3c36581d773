//! Stopping: the signals a worker stops on, what each asks for, and the
//! wait for its connections to finish within the graceful timeout.

use crate::boot::GAVE_UP;
use crate::http::Shared;
use std::time::Duration;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::Semaphore;

/// Waits, up to the graceful timeout, for every connection to close (all
/// `capacity` permits back); returns the worker's exit code.
pub(super) async fn finish(capacity: usize, permits: &Semaphore, graceful: Duration) -> i32 {
    let all = u32::try_from(capacity).unwrap_or(u32::MAX);
    if tokio::time::timeout(graceful, permits.acquire_many(all))
        .await
        .is_err()
    {
        let open = capacity - permits.available_permits();
        tracing::warn!(
            event = crate::logging::LogEvent::GracefulTimeout.name(),
            "worker {}: graceful timeout with {open} connection(s) still open",
            std::process::id()
        );
        return GAVE_UP;
    }
    0
}

pub(super) enum Stop {
    Graceful,
    Fast,
}

/// The signals a worker acts on itself.
pub(super) struct StopSignals {
    term: tokio::signal::unix::Signal,
    quit: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    usr1: tokio::signal::unix::Signal,
}

impl StopSignals {
    pub(super) fn install() -> Option<StopSignals> {
        Some(StopSignals {
            term: signal(SignalKind::terminate()).ok()?,
            quit: signal(SignalKind::quit()).ok()?,
            int: signal(SignalKind::interrupt()).ok()?,
            usr1: signal(SignalKind::user_defined1()).ok()?,
        })
    }

    /// Any stop at all.
    pub(super) async fn stop(&mut self) {
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.quit.recv() => {}
            _ = self.int.recv() => {}
        }
    }
}

pub(super) async fn wait_for_stop(
    master_pid: u32,
    shared: &Shared,
    signals: &mut StopSignals,
) -> Stop {
    let StopSignals {
        term,
        quit,
        int,
        usr1,
    } = signals;
    let mut orphan_check = tokio::time::interval(Duration::from_millis(250));
    loop {
        tokio::select! {
            _ = term.recv() => return Stop::Graceful,
            _ = quit.recv() => return Stop::Fast,
            _ = int.recv() => return Stop::Fast,
            _ = usr1.recv() => {
                crate::logging::reopen();
                if let Some(log) = &shared.access_log {
                    if let Err(e) = log.reopen() {
                        tracing::error!(event = crate::logging::LogEvent::LogReopen.name(), "cannot reopen the access log: {e}");
                    }
                }
            }
            _ = orphan_check.tick() => {
                if nix::unistd::getppid().as_raw() as u32 != master_pid {
                    tracing::warn!(event = crate::logging::LogEvent::WorkerTrouble.name(), "worker {}: master {master_pid} is gone; exiting", std::process::id());
                    return Stop::Fast;
                }
            }
        }
    }
}
