//! The master (Gunicorn's "arbiter"): binds the listeners, starts and
//! watches the workers, and turns signals and commands into reloads and
//! stops. It never serves traffic and runs no threads, so `fork` is always
//! safe.
//!
//! It is two halves. [`machine`] decides: a state machine with no I/O,
//! fed facts ([`machine::Event`]) and answering with decisions
//! ([`machine::Action`]); its module doc has the table of what every event
//! means in every state. This module and its neighbours act: the event loop
//! waits for a signal, a doorbell ring (a worker's scoreboard slot
//! changed), a control command or a timer, turns what happened into events,
//! and carries out the actions, feeding back the results of those that can
//! fail.
//!
//! - [`generations`]: what each generation holds (settings, preloaded app,
//!   pinned executable), loading a new one, and the listeners they bind.
//! - [`workers`]: starting a worker, reaping, reading the scoreboard.
//! - [`report`]: `zdr status` and the metrics.
//! - [`upgrade`]: SIGUSR2, re-executing the master in place.
//! - [`control`], [`scrape`], [`signals`], [`output`], [`pidfile`],
//!   [`notify`]: the master's sockets, signals, pipes and files.

mod canary;
mod control;
mod generations;
#[cfg(feature = "python")]
mod loader;
mod machine;
mod notify;
mod output;
mod pidfile;
mod report;
mod rollout;
mod scrape;
mod signals;
mod spawn;
pub(crate) mod title;
mod upgrade;
mod watch;
mod workers;

use std::collections::VecDeque;
use std::ffi::OsString;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use nix::poll::{PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tracing::{error, info, warn, Level};

use crate::app::Loader;
use crate::config::{Settings, Sources};
use crate::control::{ReloadOutcome, Request, Response};
use crate::listener::{self, Listener};
use crate::scoreboard::{Doorbell, Scoreboard};
use control::ControlServer;
use generations::Generations;
use machine::{Action, Client, Event, Machine, Notice, Record, Sig};
use output::Output;
use pidfile::Pidfile;
use scrape::ScrapeServer;
use signals::Signals;
use workers::Handle;

/// A binary-upgrade check running.
struct UpgradeCheck {
    pid: Pid,
    output: Output,
}

/// The master process: the decider, and everything it acts on.
pub(crate) struct Master {
    machine: Machine,
    name: String,
    exe: PathBuf,
    /// The command line, to check and re-execute with on SIGUSR2.
    args: Vec<OsString>,
    upgrade: Option<UpgradeCheck>,
    control: ControlServer,
    started_at: Instant,
    last_reload: Option<ReloadOutcome>,
    /// The metrics endpoint, when `metrics_bind` is set.
    scrape: Option<ScrapeServer>,
    /// The address it was bound for.
    metrics_bind: Option<listener::BindAddr>,
    /// What exited workers had counted, and the server's other counters.
    totals: crate::metrics::Snapshot,
    pid: u32,
    sources: Sources,
    loader: Loader,
    listeners: Vec<Listener>,
    generations: Generations,
    board: Arc<Scoreboard>,
    bell_rx: OwnedFd,
    bell: Doorbell,
    /// The queue on which leaving workers hand connections to the others
    /// (see [`crate::handoff`]); none if it could not be made.
    handoff: Option<crate::handoff::Pair>,
    signals: Signals,
    pidfile: Option<Pidfile>,
    /// The worker processes, by pid.
    handles: Vec<Handle>,
    /// With `--reload`: the files whose change rolls out a reload.
    watch: Option<watch::Watch>,
    /// Whether the app is preloaded (a new executable then needs USR2).
    preload: bool,
}

/// Runs the server's master until it stops; returns the exit code. After a
/// binary upgrade, resumes the previous image's master instead.
pub(crate) fn serve(
    name: &str,
    sources: Sources,
    settings: Settings,
    loader: Loader,
    args: Vec<OsString>,
) -> u8 {
    let inputs = Inputs {
        name,
        sources,
        loader,
        args,
    };
    let master = match upgrade::take() {
        Some(Ok(handover)) => Master::resume(inputs, settings, handover),
        Some(Err(e)) => Err(anyhow::anyhow!("bad binary-upgrade handover: {e}")),
        None => Master::start(inputs, settings),
    };
    match master {
        Ok((master, first)) => master.run(first),
        Err(e) => {
            error!(
                event = crate::logging::LogEvent::MasterError.name(),
                "{e:#}"
            );
            1
        }
    }
}

/// What a master is made of that it either creates (at start) or takes
/// over (after a binary upgrade).
struct Base {
    machine: Machine,
    exe: PathBuf,
    listeners: Vec<Listener>,
    generations: Generations,
    board: Arc<Scoreboard>,
    bell_rx: OwnedFd,
    bell: Doorbell,
    handoff: Option<crate::handoff::Pair>,
    signals: Signals,
    handles: Vec<Handle>,
    /// The control socket, when the previous image handed it over.
    control: Option<ControlServer>,
}

/// What every master gets from the command line and the app.
struct Inputs<'a> {
    name: &'a str,
    sources: Sources,
    loader: Loader,
    args: Vec<OsString>,
}

impl Master {
    /// Binds, preloads when asked, and returns the master with its first
    /// event: the first generation, prepared.
    fn start(inputs: Inputs<'_>, settings: Settings) -> anyhow::Result<(Master, Event)> {
        let pid = std::process::id();
        // What is served: the app, or the command a `-- CMD` server runs.
        if !settings.app.is_empty() {
            info!(
                event = crate::logging::LogEvent::MasterStarting.name(),
                "Starting {} (zdr {}, Python in-process)",
                settings.app,
                env!("CARGO_PKG_VERSION")
            );
        } else if settings.command.is_empty() {
            info!(
                event = crate::logging::LogEvent::MasterStarting.name(),
                "Starting {} (zdr {})",
                inputs.name,
                env!("CARGO_PKG_VERSION")
            );
        } else {
            info!(
                event = crate::logging::LogEvent::MasterStarting.name(),
                "Starting zdr {} for the command {:?}",
                env!("CARGO_PKG_VERSION"),
                settings.command[0]
            );
        }
        crate::tls::acceptor(&settings)?;
        let listeners = listener::bind_all(&settings.bind, settings.backlog)?;
        for l in &listeners {
            info!(
                event = crate::logging::LogEvent::Listening.name(),
                "Listening at: {} ({pid})",
                l.url(settings.certfile.is_some())
            );
        }
        let (bell_rx, bell) = Doorbell::pair()?;
        let now = Instant::now();
        let base = Base {
            machine: Machine::new(settings.workers, 1, now),
            exe: crate::sys::current_exe()?,
            listeners,
            generations: Generations::default(),
            board: Arc::new(Scoreboard::create()?),
            bell_rx,
            bell,
            handoff: crate::handoff::Pair::new()
                .inspect_err(|e| {
                    warn!(
                        event = crate::logging::LogEvent::MasterConfig.name(),
                        "no connection handoff between workers: {e}"
                    )
                })
                .ok(),
            signals: Signals::install()?,
            handles: Vec::new(),
            control: None,
        };
        info!(
            event = crate::logging::LogEvent::MasterConfig.name(),
            "Using worker: tokio (threads={}, worker_connections={}){}",
            settings.threads,
            settings.worker_connections,
            if settings.preload { ", preload" } else { "" }
        );
        if !settings.command.is_empty() {
            info!(
                event = crate::logging::LogEvent::MasterConfig.name(),
                "Each worker runs the command {:?} and {}",
                settings.command.join(" "),
                if settings.pass_socket {
                    "hands it the listening sockets (--pass-socket)"
                } else {
                    "forwards to it"
                }
            );
        }
        let mut master = Master::assemble(inputs, &settings, base)?;
        let settings = Arc::new(settings);
        let generation = master.machine.next_generation();
        if let Err(e) = master.add_generation(generation, Arc::clone(&settings)) {
            master.cleanup();
            return Err(e);
        }
        let first = Event::Prepared {
            generation,
            client: None,
            result: Ok(settings),
        };
        Ok((master, first))
    }

    /// Takes over from the previous image of this master after a binary
    /// upgrade; its first event rolls out a generation of the new code.
    fn resume(
        inputs: Inputs<'_>,
        settings: Settings,
        h: upgrade::Handover,
    ) -> anyhow::Result<(Master, Event)> {
        let signals = Signals::install()?;
        upgrade::unblock_signals();
        let listeners = h
            .listeners
            .into_iter()
            .map(|l| {
                // SAFETY: the previous image handed each listener over
                // across exec, once, for this process to own.
                unsafe { Listener::adopt(l.addr, l.socket, l.owns_path) }
            })
            .collect::<Result<Vec<_>, _>>()?;
        // SAFETY: the previous image owned the doorbell's read end and
        // handed it over across exec.
        let bell_rx = unsafe { OwnedFd::from_raw_fd(h.bell_rx) };
        crate::sys::set_cloexec(bell_rx.as_raw_fd(), true)?;
        let now = Instant::now();
        let mut generations = Generations::default();
        let serving = h.serving.map(|(id, s)| {
            let settings = Arc::new(s);
            generations.insert(
                id,
                generations::Resources {
                    settings: Arc::clone(&settings),
                    app: None,
                    exe: Some(Arc::new(spawn::Executable::pin(&h.exe))),
                    #[cfg(feature = "python")]
                    python: None,
                },
            );
            machine::Generation { id, settings }
        });
        let serving_settings = serving.as_ref().map(|g| Arc::clone(&g.settings));
        let mut handles = Vec::new();
        let workers = h
            .workers
            .into_iter()
            .map(|w| {
                let pid = Pid::from_raw(w.pid);
                handles.push(Handle {
                    pid,
                    slot: w.slot,
                    // SAFETY: handed over across exec, once, like the listeners.
                    output: w.output_fd.and_then(|fd| unsafe { Output::adopt(fd) }.ok()),
                });
                machine::Worker::adopted(
                    pid,
                    w.generation,
                    w.draining,
                    w.request_limit,
                    w.announced_ready,
                    serving_settings.as_deref(),
                    now,
                )
            })
            .collect::<Vec<_>>();
        info!(
            event = crate::logging::LogEvent::Upgrade.name(),
            "Binary upgrade: now running {} (zdr {}), pid {}; adopted {} workers",
            h.exe.display(),
            env!("CARGO_PKG_VERSION"),
            std::process::id(),
            workers.len()
        );
        let base = Base {
            machine: Machine::adopt(h.target, h.next_generation, serving, workers, now),
            exe: h.exe,
            listeners,
            generations,
            // SAFETY: handed over across exec, once, like the listeners.
            board: Arc::new(unsafe { Scoreboard::attach(h.scoreboard_fd) }?),
            bell_rx,
            // SAFETY: handed over across exec, once, like the listeners.
            bell: unsafe { Doorbell::from_inherited(h.bell_tx) }?,
            handoff: match h.handoff {
                Some(fds) => {
                    // SAFETY: handed over across exec, once, like the
                    // listeners (the adopted workers hold it too).
                    let pair = unsafe { crate::handoff::Pair::adopt(fds) };
                    for fd in pair.raw_fds() {
                        crate::sys::set_cloexec(fd, true)?;
                    }
                    Some(pair)
                }
                None => crate::handoff::Pair::new().ok(),
            },
            signals,
            handles,
            control: h.control.and_then(|(fd, path)| {
                // SAFETY: handed over across exec, once, like the listeners.
                unsafe { ControlServer::adopt(fd, &path) }.ok()
            }),
        };
        let master = Master::assemble(inputs, &settings, base)?;
        Ok((master, Event::Signal(Sig::Hup)))
    }

    /// Opens what every master has of its own (control socket, metrics,
    /// pidfile) and puts the master together.
    fn assemble(inputs: Inputs<'_>, settings: &Settings, base: Base) -> anyhow::Result<Master> {
        let Inputs {
            name,
            sources,
            loader,
            args,
        } = inputs;
        let pid = std::process::id();
        // What a worker killed outright leaves running comes to the master,
        // which ends it (see `crate::process_tree`).
        if let Err(e) = crate::process_tree::become_subreaper() {
            warn!(
                event = crate::logging::LogEvent::MasterConfig.name(),
                "cannot become a subreaper ({e}): what a killed worker's command leaves running may outlive it"
            );
        }
        for (group, n) in crate::cgroup::sweep() {
            warn!(
                event = crate::logging::LogEvent::MasterConfig.name(),
                "the cgroup {group} of a zdr master that is gone still holds {n} process(es); \
                 zdr leaves them (it did not start them). A master killed with its workers \
                 at once cannot end its commands: run zdr under systemd \
                 (KillMode=control-group) or in a container to have them ended"
            );
        }
        // The pidfile's directory first: the control socket's default
        // place is beside the pidfile, and a missing directory is the
        // pidfile's problem to name.
        if let Some(dir) = settings
            .pidfile
            .as_deref()
            .and_then(std::path::Path::parent)
            .filter(|d| !d.as_os_str().is_empty() && !d.is_dir())
        {
            anyhow::bail!(
                "cannot write the pidfile in {}: no such directory; create it, or give --pid a path in one that exists",
                dir.display()
            );
        }
        // Kept across a binary upgrade, so that `zdr status` never finds
        // it refusing; bound anew if the settings moved it.
        let path = crate::control::master_socket_path(settings, pid);
        let control = match base.control {
            Some(handed) if handed.path() == path => handed,
            handed => {
                if let Some(old) = handed {
                    old.remove();
                }
                ControlServer::bind(&path)?
            }
        };
        info!(
            event = crate::logging::LogEvent::MasterEndpoint.name(),
            "Control socket: {}",
            control.path().display()
        );
        // A start that fails from here leaves no socket file behind.
        let opened = (|| -> anyhow::Result<_> {
            let scrape = settings
                .metrics_bind
                .as_ref()
                .map(ScrapeServer::bind)
                .transpose()?;
            let pidfile = settings
                .pidfile
                .as_deref()
                .map(Pidfile::create)
                .transpose()?;
            Ok((scrape, pidfile))
        })();
        let (scrape, pidfile) = match opened {
            Ok(opened) => opened,
            Err(e) => {
                control.remove();
                return Err(e);
            }
        };
        if let Some(s) = &scrape {
            info!(
                event = crate::logging::LogEvent::MasterEndpoint.name(),
                "Metrics at: http://{}/metrics",
                s.local_addr()
            );
        }
        give_pidfile_to_workers(settings, pidfile.as_ref().map(|p| p.path()));
        let watch = settings.reload.then(|| {
            let mut files = vec![base.exe.clone()];
            files.extend(sources.config_file.clone());
            files.extend(settings.reload_extra_files.iter().cloned());
            info!(
                event = crate::logging::LogEvent::MasterEndpoint.name(),
                "Watching {} for changes (--reload)",
                files
                    .iter()
                    .map(|f| f.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            watch::Watch::new(files)
        });
        Ok(Master {
            machine: base.machine,
            name: name.to_owned(),
            exe: base.exe,
            args,
            upgrade: None,
            control,
            started_at: Instant::now(),
            last_reload: None,
            scrape,
            metrics_bind: settings.metrics_bind.clone(),
            totals: crate::metrics::Snapshot {
                reload_duration: crate::metrics::Histogram::new(&crate::metrics::RELOAD_BUCKETS),
                ..Default::default()
            },
            pid,
            sources,
            loader,
            listeners: base.listeners,
            generations: base.generations,
            board: base.board,
            bell_rx: base.bell_rx,
            bell: base.bell,
            handoff: base.handoff,
            signals: base.signals,
            pidfile,
            handles: base.handles,
            watch,
            preload: settings.preload,
        })
    }

    /// The event loop: wait, turn what happened into events, let the
    /// machine decide, act. Returns the exit code.
    fn run(mut self, first: Event) -> u8 {
        let mut events = VecDeque::from([first]);
        loop {
            if let Some(code) = self.feed(&mut events) {
                self.cleanup();
                return code;
            }
            self.wait(&mut events);
            for raw in self.signals.take() {
                if let Some(sig) = signals::decode(raw) {
                    info!(
                        event = crate::logging::LogEvent::Signal.name(),
                        "Handling signal: {}",
                        signals::name(raw)
                    );
                    events.push_back(Event::Signal(sig));
                }
            }
            if let Some(changed) = self.watch.as_mut().and_then(|w| w.poll(Instant::now())) {
                // New code under --preload needs the master to run it.
                let upgrade = self.preload && changed == self.exe;
                info!(
                    event = crate::logging::LogEvent::FileChanged.name(),
                    "{} changed: {}",
                    changed.display(),
                    if upgrade {
                        "binary upgrade"
                    } else {
                        "reloading"
                    }
                );
                events.push_back(Event::Signal(if upgrade { Sig::Usr2 } else { Sig::Hup }));
            }
            if let Some(code) = self.feed(&mut events) {
                self.cleanup();
                return code;
            }
            self.reap(&mut events);
            events.push_back(Event::Tick(self.observe()));
        }
    }

    /// Hands each event to the machine and carries out its decisions,
    /// until no event is left. Returns the exit code once it decides to
    /// exit.
    fn feed(&mut self, events: &mut VecDeque<Event>) -> Option<u8> {
        while let Some(event) = events.pop_front() {
            for action in self.machine.handle(event, Instant::now()) {
                if let Some(code) = self.act(action, events) {
                    return Some(code);
                }
            }
        }
        self.board.set_accepting(self.accepting());
        None
    }

    /// Carries out one decision; results come back as events.
    fn act(&mut self, action: Action, events: &mut VecDeque<Event>) -> Option<u8> {
        match action {
            Action::Log(level, event, message) => {
                let event = event.name();
                match level {
                    Level::ERROR => error!(event, "{message}"),
                    Level::WARN => warn!(event, "{message}"),
                    _ => info!(event, "{message}"),
                }
            }
            Action::Prepare { generation, client } => {
                let result = self.prepare(generation);
                events.push_back(Event::Prepared {
                    generation,
                    client,
                    result,
                });
            }
            Action::Spawn { generation } => events.push_back(self.spawn_worker(generation)),
            Action::Signal(pid, signal) => {
                if signal == Signal::SIGABRT {
                    // Killed at --timeout: where it was stuck, read before
                    // the signal changes it.
                    tracing::error!(
                        event = crate::logging::LogEvent::WorkerTimeout.name(),
                        "Worker (pid: {pid}) at its timeout: {}; requests in flight: {}",
                        report::where_stuck(pid),
                        self.named_in_flight(pid)
                    );
                }
                let _ = kill(pid, signal);
            }
            Action::Forget { generation } => {
                self.generations.remove(generation);
                self.prune_listeners();
            }
            Action::CloseListeners => {
                for l in std::mem::take(&mut self.listeners) {
                    l.remove_socket_file();
                }
            }
            Action::MarkStopping => self.board.set_stopping(),
            Action::ReopenLogs => crate::logging::reopen(),
            Action::Notify(Notice::Ready(status)) => notify::ready(&status),
            Action::Notify(Notice::Reloading) => notify::reloading(),
            Action::Notify(Notice::Stopping) => notify::stopping(),
            Action::StartUpgradeCheck => {
                if let Err(report) = self.start_upgrade_check() {
                    events.push_back(Event::UpgradeChecked {
                        passed: false,
                        report,
                    });
                }
            }
            Action::KillUpgradeCheck => {
                if let Some(check) = &self.upgrade {
                    let _ = kill(check.pid, Signal::SIGKILL);
                }
            }
            Action::ExecUpgrade => self.exec_upgrade(),
            Action::Reply(id, response) => self.control.respond(id, &response),
            Action::Hold(id, what) => self.control.hold(id, what),
            Action::Follow { from, to } => self
                .control
                .follow(machine::Awaited::Reload(from), machine::Awaited::Reload(to)),
            Action::Answer(what, response) => self.control.answer(what, &response),
            Action::Record(Record::Restart(cause)) => self.totals.restarts[cause as usize] += 1,
            Action::Record(Record::Canary { promoted }) => {
                self.totals.canary_verdicts[usize::from(!promoted)] += 1;
            }
            Action::Record(Record::Reload(outcome)) => {
                match outcome.completed {
                    true => self.totals.reloads_completed += 1,
                    false => self.totals.reloads_rolled_back += 1,
                }
                let secs = outcome.duration_ms as f64 / 1000.0;
                self.totals
                    .reload_duration
                    .observe(&crate::metrics::RELOAD_BUCKETS, secs);
                self.last_reload = Some(outcome);
            }
            Action::Exit(code) => return Some(code),
        }
        None
    }

    /// Waits for something to happen (a signal, a doorbell ring, a
    /// worker's output, a control or metrics client, or a short timeout),
    /// then serves what needs no decision: output, metrics scrapes and
    /// `zdr status`. Control commands become events.
    fn wait(&mut self, events: &mut VecDeque<Event>) {
        let timeout = if self.machine.busy() { 100u16 } else { 500 };
        let mut fds = vec![
            PollFd::new(self.signals.fd(), PollFlags::POLLIN),
            PollFd::new(self.bell_rx.as_fd(), PollFlags::POLLIN),
        ];
        let outputs = self.handles.iter().filter_map(|h| h.output.as_ref());
        fds.extend(outputs.map(|o| PollFd::new(o.fd(), PollFlags::POLLIN)));
        let n_outputs = fds.len() - 2;
        fds.extend(
            self.control
                .fds()
                .into_iter()
                .map(|fd| PollFd::new(fd, PollFlags::POLLIN)),
        );
        if let Some(scrape) = &self.scrape {
            fds.extend(
                scrape
                    .fds()
                    .into_iter()
                    .map(|fd| PollFd::new(fd, PollFlags::POLLIN)),
            );
        }
        let _ = nix::poll::poll(&mut fds, PollTimeout::from(timeout));
        let readable: Vec<bool> = fds[2..2 + n_outputs]
            .iter()
            .map(|f| f.revents().is_some_and(|r| !r.is_empty()))
            .collect();
        drop(fds);
        let mut buf = [0u8; 256];
        while matches!(nix::unistd::read(self.bell_rx.as_raw_fd(), &mut buf), Ok(n) if n > 0) {}
        let outputs = self.handles.iter_mut().filter_map(|h| h.output.as_mut());
        for (output, readable) in outputs.zip(readable) {
            if readable {
                output.pump();
            }
        }
        if let Some(check) = &mut self.upgrade {
            check.output.pump();
        }
        if let Some(mut scrape) = self.scrape.take() {
            scrape.serve(|| self.metrics().encode());
            self.scrape = Some(scrape);
        }
        for (id, request) in self.control.poll() {
            let client = |wait| Client { id, wait };
            let event = match request {
                Request::Status => {
                    let response = Response {
                        status: Some(self.status()),
                        ..Response::ok("status")
                    };
                    self.control.respond(id, &response);
                    continue;
                }
                Request::Reload { wait, canary } => {
                    info!(
                        event = crate::logging::LogEvent::ControlRequest.name(),
                        "Reload requested on the control socket"
                    );
                    Event::Reload {
                        client: client(wait),
                        canary,
                    }
                }
                Request::Stop { graceful, wait } => {
                    info!(
                        event = crate::logging::LogEvent::ControlRequest.name(),
                        "Stop requested on the control socket"
                    );
                    Event::Stop {
                        graceful,
                        client: client(wait),
                    }
                }
                Request::Scale { workers } => Event::Scale {
                    workers,
                    client: id,
                },
            };
            events.push_back(event);
        }
    }

    /// Every descriptor the master owns (the scoreboard and the doorbell's
    /// bell aside, which workers share): what a worker forked from it must
    /// close, so that, say, a control socket never answers from a worker.
    fn own_fds(&self) -> Vec<RawFd> {
        let mut fds: Vec<RawFd> = self.listeners.iter().map(|l| l.fd.as_raw_fd()).collect();
        fds.push(self.bell_rx.as_raw_fd());
        fds.push(self.signals.fd().as_raw_fd());
        fds.extend(self.control.fds().iter().map(|fd| fd.as_raw_fd()));
        fds.extend(
            self.handles
                .iter()
                .filter_map(|h| h.output.as_ref())
                .map(|o| o.fd().as_raw_fd()),
        );
        fds.extend(self.upgrade.as_ref().map(|u| u.output.fd().as_raw_fd()));
        if let Some(scrape) = &self.scrape {
            fds.extend(scrape.fds().iter().map(|fd| fd.as_raw_fd()));
        }
        fds.extend(self.handoff.iter().flat_map(crate::handoff::Pair::raw_fds));
        fds.extend(self.generations.loader_fds());
        fds
    }

    fn cleanup(&mut self) {
        self.control.remove();
        for l in &self.listeners {
            l.remove_socket_file();
        }
        if let Some(p) = &self.pidfile {
            p.remove();
            tracing::debug!("removed pidfile {}", p.path().display());
        }
    }
}

/// Gives the pidfile to the user the workers run as. The control socket
/// stays the master's: only root and the master's own user may command the
/// server (the control server checks each client's credentials).
fn give_pidfile_to_workers(settings: &Settings, pidfile: Option<&std::path::Path>) {
    let (Some((uid, gid)), Some(path)) = (settings.run_as, pidfile) else {
        return;
    };
    let owner = (
        Some(nix::unistd::Uid::from_raw(uid)),
        Some(nix::unistd::Gid::from_raw(gid)),
    );
    if let Err(e) = nix::unistd::chown(path, owner.0, owner.1) {
        warn!(
            event = crate::logging::LogEvent::MasterFiles.name(),
            "cannot give {} to uid {uid}, gid {gid}: {e}",
            path.display()
        );
    }
}
