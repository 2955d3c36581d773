//! A worker process's contract with its master, apart from how it serves:
//! the spec the master hands it, the signal dispositions it boots with,
//! how it reports a failed boot, and the exit codes the master reads. Both
//! kinds of worker (zdr serving, and a command handed the sockets) keep it.

use serde::{Deserialize, Serialize};

use crate::config::Settings;
use crate::listener::Inherited;
use crate::recycle::RequestLimit;
use crate::scoreboard::{Doorbell, Slot, SlotState};

/// The environment variable that carries a [`WorkerSpec`] to an exec'd
/// worker.
pub(crate) const SPEC_ENV: &str = "ZDR_WORKER_SPEC";

/// The exit code of a worker whose app failed to boot (Gunicorn's).
pub(crate) const BOOT_ERROR: i32 = 3;

/// A worker's exit code when the graceful timeout passed with connections
/// still open: it drained, but not all of them.
pub(crate) const GAVE_UP: i32 = 4;

/// Everything a worker needs from its master.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct WorkerSpec {
    pub(crate) generation: u64,
    pub(crate) slot: usize,
    pub(crate) master_pid: u32,
    pub(crate) settings: Settings,
    pub(crate) listeners: Vec<Inherited>,
    pub(crate) scoreboard_fd: i32,
    pub(crate) doorbell_fd: i32,
    /// When to be recycled, if ever.
    pub(crate) request_limit: Option<RequestLimit>,
    /// The descriptor of the executable the master ran this worker from
    /// (its generation's pinned file), for the worker to close.
    #[serde(default)]
    pub(crate) exe_fd: Option<i32>,
    /// The server's handoff queue (sending end, receiving end), when the
    /// master made one.
    #[serde(default)]
    pub(crate) handoff: Option<[i32; 2]>,
}

/// The signal actions a worker boots with, removed once its runtime's own
/// handlers are in place.
static BOOT_ACTIONS: std::sync::Mutex<Vec<signal_hook::SigId>> = std::sync::Mutex::new(Vec::new());

/// Gives a new worker the signal actions it boots with, before any of its
/// own handlers exist: a stop (TERM, INT, QUIT) ends it at once, and the
/// signals only the master acts on (HUP, USR1, USR2, WINCH, TTIN, TTOU) do
/// nothing, so that a log reopen (USR1) does not kill a booting worker. A
/// forked worker would otherwise keep the master's handlers, which set
/// flags nobody reads: a stop would be lost until it had booted. They go
/// through the same registry as the runtime's handlers, which install
/// themselves beside them.
pub(crate) fn boot_dispositions() {
    use signal_hook::consts::signal::*;
    let mut ids = Vec::new();
    for sig in [SIGTERM, SIGINT, SIGQUIT] {
        // SAFETY: the action only calls `_exit`, which is
        // async-signal-safe; a just-forked child is single-threaded.
        if let Ok(id) = unsafe { signal_hook::low_level::register(sig, || nix::libc::_exit(0)) } {
            ids.push(id);
        }
    }
    for sig in [SIGHUP, SIGUSR1, SIGUSR2, SIGWINCH, SIGTTIN, SIGTTOU] {
        // SAFETY: the action does nothing at all.
        if let Ok(id) = unsafe { signal_hook::low_level::register(sig, || {}) } {
            ids.push(id);
        }
    }
    if let Ok(mut actions) = BOOT_ACTIONS.lock() {
        *actions = ids;
    }
}

/// Removes the boot-time actions: the runtime's handlers take over.
pub(crate) fn end_boot_dispositions() {
    let ids = BOOT_ACTIONS
        .lock()
        .map(|mut a| std::mem::take(&mut *a))
        .unwrap_or_default();
    for id in ids {
        signal_hook::low_level::unregister(id);
    }
}

/// Reports a failed boot to the master (the scoreboard's message and
/// state, then the doorbell); the worker's exit code.
pub(crate) fn boot_failed(slot: &Slot, bell: &Doorbell, err: &anyhow::Error) -> i32 {
    let message = format!("{err:#}");
    tracing::error!(
        event = crate::logging::LogEvent::WorkerBootFailed.name(),
        "worker {} failed to boot: {message}",
        std::process::id()
    );
    slot.set_message(&message);
    slot.set_state(SlotState::BootFailed);
    bell.ring();
    BOOT_ERROR
}
