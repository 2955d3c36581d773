//! The names of the error log's events: each line zdr writes says what
//! happened in a stable word (`"event": "worker.ready"` in the JSON form),
//! so that a log pipeline can match and alert on it without parsing the
//! message, which is written for people and may change.
//!
//! The list is declared here once; the README's table of events is checked
//! against it by a test.

/// Declares the events once: the enum, its list and each one's name.
macro_rules! log_events {
    ($($(#[$doc:meta])* $variant:ident => $name:literal,)*) => {
        /// What a line of the error log reports.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum LogEvent {
            $($(#[$doc])* $variant,)*
        }

        impl LogEvent {
            /// Every event, in the order of the README's table.
            #[cfg(test)]
            pub const ALL: &'static [LogEvent] = &[$(LogEvent::$variant,)*];

            /// The event's stable name, as the JSON log writes it.
            pub const fn name(self) -> &'static str {
                match self {
                    $(LogEvent::$variant => $name,)*
                }
            }
        }
    };
}

log_events! {
    /// The master starts: what it serves and zdr's version.
    MasterStarting => "master.starting",
    /// A listening socket is bound (or adopted), or closed.
    Listening => "master.listening",
    /// Where the control socket, the metrics endpoint or the watcher is.
    MasterEndpoint => "master.endpoint",
    /// The worker model in use, and the command the workers run.
    MasterConfig => "master.config",
    /// The master received a signal.
    Signal => "master.signal",
    /// A watched file changed (`--reload`).
    FileChanged => "master.file_changed",
    /// A request arrived on the control socket (reload, stop).
    ControlRequest => "master.control_request",
    /// The number of workers changed (TTIN, TTOU, `zdr scale`) or did not.
    WorkersScaled => "workers.scaled",
    /// WINCH: every worker stops, the master stays.
    WorkersPaused => "workers.paused",
    /// A reload begins: a new generation boots.
    ReloadStarted => "reload.started",
    /// A reload is not started (the server is stopping) or is superseded.
    ReloadIgnored => "reload.ignored",
    /// A reload is complete: the new generation serves and the old is gone.
    ReloadComplete => "reload.complete",
    /// A reload failed and was undone; the old generation keeps serving.
    ReloadRolledBack => "reload.rolled_back",
    /// A generation has all its workers ready.
    GenerationReady => "generation.ready",
    /// A generation started with fewer workers than wanted.
    GenerationPartial => "generation.partial",
    /// A canary serves, passes a step or is promoted.
    Canary => "reload.canary",
    /// The shutdown delay: readiness fails before the workers drain.
    ShutdownDelay => "stop.delay",
    /// A worker is forked.
    WorkerBooting => "worker.booting",
    /// A worker is ready to serve.
    WorkerReady => "worker.ready",
    /// A worker failed to boot, or cannot be started.
    WorkerBootFailed => "worker.boot_failed",
    /// A worker begins to drain, and why.
    WorkerDraining => "worker.draining",
    /// A worker reached a recycling limit (`--max-requests`, memory).
    WorkerRecycled => "worker.recycled",
    /// Recycling cannot keep up with `--max-requests`.
    RecyclingBehind => "worker.recycling_behind",
    /// A worker exited after draining.
    WorkerExited => "worker.exited",
    /// A worker died: killed by a signal, or exited with an error.
    WorkerDied => "worker.died",
    /// Workers die before becoming ready; the master backs off.
    CrashBackoff => "worker.crash_backoff",
    /// A worker made no progress for `--timeout` and is killed.
    WorkerTimeout => "worker.timeout",
    /// A worker still busy at `--graceful-timeout` is killed.
    GracefulTimeout => "worker.graceful_timeout",
    /// A worker's own trouble: its master is gone, it cannot map the
    /// scoreboard, it has no handoff or orphan backstop thread.
    WorkerTrouble => "worker.trouble",
    /// A request was not answered within `--request-timeout` (504).
    RequestTimeout => "request.timeout",
    /// A request was shed under overload (503).
    RequestShed => "request.shed",
    /// The app returned an error or panicked (500).
    AppError => "request.app_error",
    /// A keep-alive connection could not be handed to a sibling worker.
    HandoffFailed => "connection.handoff_failed",
    /// `--preload`: the app's load step left threads in the master.
    PreloadThreads => "master.preload_threads",
    /// A binary upgrade (SIGUSR2) is checked, carried out, or refused.
    Upgrade => "master.upgrade",
    /// A pidfile or control socket left by a master that is gone is taken
    /// over, or a file cannot be given to the workers' user.
    MasterFiles => "master.files",
    /// The master cannot start, or stops on an error.
    MasterError => "master.error",
    /// The master has stopped.
    MasterStopped => "master.stopped",
    /// A log file cannot be reopened (SIGUSR1).
    LogReopen => "log.reopen",
    /// `-- CMD`: the command started, or is awaited.
    CommandStarted => "command.started",
    /// `-- CMD`: a line of the command's own output.
    CommandOutput => "command.output",
    /// `-- CMD`: the command exited or was killed.
    CommandExited => "command.exited",
    /// `-- CMD`: a request could not be forwarded to the command.
    ProxyError => "command.proxy_error",
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_event_is_listed_once_with_its_own_name() {
        let names: std::collections::BTreeSet<_> = LogEvent::ALL.iter().map(|e| e.name()).collect();
        assert_eq!(names.len(), LogEvent::ALL.len());
        for e in LogEvent::ALL {
            assert!(
                e.name().contains('.')
                    && e.name()
                        .chars()
                        .all(|c| c.is_ascii_lowercase() || c == '.' || c == '_'),
                "{e:?}"
            );
        }
    }

    /// The README's table of events is the list above, in its order.
    #[test]
    fn the_readme_lists_every_event() {
        let readme = include_str!("../../README.md");
        let listed: Vec<&str> = readme
            .lines()
            .filter_map(|l| l.strip_prefix("| `")?.split('`').next())
            .filter(|n| {
                n.contains('.')
                    && !n.contains(' ')
                    && n.chars()
                        .all(|c| c.is_ascii_lowercase() || c == '.' || c == '_')
            })
            .collect();
        let declared: Vec<&str> = LogEvent::ALL.iter().map(|e| e.name()).collect();
        assert_eq!(listed, declared, "README.md's table of log events");
    }
}
