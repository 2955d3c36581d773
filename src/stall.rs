//! A timer for a peer that stops making progress: armed when an operation
//! first has to wait, re-armed only after progress, so that a steady
//! stream of small waits costs one timer, not one per wait. The body
//! timeout (a client that stops sending its body) and the send timeout (a
//! client that stops reading its response) both use it.

use std::future::Future;
use std::pin::Pin;
use std::task::Context;
use std::time::Duration;

use tokio::time::{Instant, Sleep};

/// How long a peer may go without progress, and the timer that says when
/// it has.
#[derive(Debug)]
pub(crate) struct Stall {
    after: Duration,
    /// Allocated on the first wait only.
    timer: Option<Pin<Box<Sleep>>>,
    /// Whether the timer is armed for the current wait.
    waiting: bool,
}

impl Stall {
    /// A peer may wait this long between two steps of progress.
    pub(crate) fn new(after: Duration) -> Stall {
        Stall {
            after,
            timer: None,
            waiting: false,
        }
    }

    /// The allowed wait.
    pub(crate) fn after(&self) -> Duration {
        self.after
    }

    /// The peer made progress: the next wait starts a new count.
    pub(crate) fn progress(&mut self) {
        self.waiting = false;
    }

    /// The operation has to wait: whether the peer has now been silent for
    /// the whole allowed time (else `cx` is woken when it has).
    pub(crate) fn expired(&mut self, cx: &mut Context<'_>) -> bool {
        let deadline = Instant::now() + self.after;
        let timer = self
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        if !self.waiting {
            timer.as_mut().reset(deadline);
            self.waiting = true;
        }
        timer.as_mut().poll(cx).is_ready()
    }
}
