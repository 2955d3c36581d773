//! The rollout state machine: a new generation booting to replace the one
//! that serves (at start, there is none yet).
//!
//! ```text
//!             spawn N workers
//!   (none) ──────────────────▶ Booting ──all N ready──────▶ Complete: drain the old generation
//!                               │  │
//!                               │  └─a worker exits, or ──▶ Failed:  stop the new generation;
//!                               │    boot timeout passes             the old one keeps serving
//!                               └─newer reload (SIGHUP)──▶ Superseded: stop it, start the newer
//! ```
//!
//! The master feeds it facts (workers ready, a worker's exit) and acts on
//! its [`Verdict`]; the rules live here alone.

use std::time::{Duration, Instant};

/// Why a rollout was started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Cause {
    /// The server's first generation.
    Start,
    /// A reload (SIGHUP).
    Reload,
}

/// A generation booting to take over.
pub(crate) struct Rollout {
    pub(crate) cause: Cause,
    pub(crate) started: Instant,
    deadline: Instant,
    boot_timeout: Duration,
    failure: Option<String>,
}

/// What to do with a rollout now.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Keep waiting.
    Pending,
    /// Every worker is ready: switch over.
    Complete,
    /// Abandon it, for this reason.
    Failed(String),
}

impl Rollout {
    /// Starts a rollout that must be complete within `boot_timeout`.
    pub(crate) fn new(cause: Cause, now: Instant, boot_timeout: Duration) -> Rollout {
        Rollout {
            cause,
            started: now,
            deadline: now + boot_timeout,
            boot_timeout,
            failure: None,
        }
    }

    /// Records that one of its workers exited or could not be started; the
    /// first cause is the one reported.
    pub(crate) fn worker_failed(&mut self, cause: String) {
        self.failure.get_or_insert(cause);
    }

    /// Gives the workers still to start a whole boot timeout from `now`
    /// (after a canary: the rest of the generation starts then).
    pub(crate) fn restart_clock(&mut self, now: Instant, extra: Duration) {
        self.deadline = now + self.boot_timeout + extra;
    }

    /// Decides, given how many of `target` workers are ready.
    pub(crate) fn judge(&self, ready: usize, target: usize, now: Instant) -> Verdict {
        if let Some(cause) = &self.failure {
            Verdict::Failed(cause.clone())
        } else if ready >= target {
            Verdict::Complete
        } else if now >= self.deadline {
            let secs = self.boot_timeout.as_secs_f64();
            Verdict::Failed(format!(
                "only {ready} of {target} workers were ready after the boot timeout ({secs}s)"
            ))
        } else {
            Verdict::Pending
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rollout(now: Instant) -> Rollout {
        Rollout::new(Cause::Reload, now, Duration::from_secs(5))
    }

    #[test]
    fn completes_only_when_every_worker_is_ready() {
        let now = Instant::now();
        let r = rollout(now);
        assert_eq!(r.judge(0, 3, now), Verdict::Pending);
        assert_eq!(
            r.judge(2, 3, now + Duration::from_secs(4)),
            Verdict::Pending
        );
        assert_eq!(
            r.judge(3, 3, now + Duration::from_secs(4)),
            Verdict::Complete
        );
    }

    #[test]
    fn fails_at_the_boot_timeout() {
        let now = Instant::now();
        let r = rollout(now);
        let Verdict::Failed(why) = r.judge(2, 3, now + Duration::from_secs(5)) else {
            panic!()
        };
        assert_eq!(
            why,
            "only 2 of 3 workers were ready after the boot timeout (5s)"
        );
    }

    #[test]
    fn a_failed_worker_fails_it_even_when_the_others_are_ready() {
        let now = Instant::now();
        let mut r = rollout(now);
        r.worker_failed("worker 12 exited with status 3: boom".into());
        r.worker_failed("a later cause is not the reported one".into());
        assert_eq!(
            r.judge(3, 3, now),
            Verdict::Failed("worker 12 exited with status 3: boom".into())
        );
    }
}
