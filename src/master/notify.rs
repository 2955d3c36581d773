//! systemd's service notifications, for `Type=notify` and
//! `Type=notify-reload` units. Without `NOTIFY_SOCKET` every call is a
//! no-op.

use sd_notify::NotifyState;

fn send(states: &[NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(false, states) {
        tracing::debug!("systemd notification failed: {e}");
    }
}

/// The server serves: the first generation, or the one after a reload (or
/// its rollback).
pub(crate) fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// A reload began.
pub(crate) fn reloading() {
    send(&[
        NotifyState::Reloading,
        NotifyState::monotonic_usec_now().unwrap_or(NotifyState::MonotonicUsec(0)),
    ]);
}

/// The server is stopping.
pub(crate) fn stopping() {
    send(&[NotifyState::Stopping, NotifyState::Status("stopping")]);
}
