//! The master (Gunicorn's "arbiter"): binds the listeners, starts and
//! watches the workers, and turns signals into reloads and stops. It never
//! serves traffic and runs no threads, so `fork` is always safe.
//!
//! Its event loop is one short cycle: wait for a signal, a doorbell ring
//! (a worker's scoreboard slot changed) or a timer; then act on signals,
//! reap exited workers, watch the living ones (readiness, heartbeats,
//! request limits, deadlines), advance the rollout and the stop, and
//! start whatever workers are missing.

mod control;
mod notify;
mod output;
mod pidfile;
mod rollout;
mod scrape;
mod signals;
mod spawn;
mod upgrade;

use std::collections::hash_map::RandomState;
use std::ffi::OsString;
use std::hash::{BuildHasher, Hasher};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use tracing::{error, info, warn};

use crate::app::{LoadedApp, Loader};
use crate::config::{Settings, Sources};
use crate::control::{ReloadOutcome, Request, Response, Status, WorkerStatus};
use crate::listener::{self, BindAddr, Listener};
use crate::scoreboard::{monotonic_ms, Doorbell, Scoreboard, SlotState};
use crate::worker::{RequestLimit, WorkerSpec};
use control::ControlServer;
use output::Output;
use pidfile::Pidfile;
use rollout::{Cause, Rollout, Verdict};
use scrape::ScrapeServer;
use signals::Signals;

/// Replacements for recycled workers (request or memory limit) in flight
/// at once, for the whole server: it never runs more than this many
/// processes beyond its workers for recycling.
const MAX_SURGE: usize = 1;

/// A generation: the workers started together with one configuration (and,
/// with `--preload`, one loaded app).
pub(crate) struct Generation {
    pub(crate) id: u64,
    pub(crate) settings: Arc<Settings>,
    pub(crate) app: Option<Arc<LoadedApp>>,
    /// The executable its workers run, without `--preload`.
    pub(crate) exe: Option<Arc<spawn::Executable>>,
}

/// What the master is doing with a worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    /// Booting or serving as part of its generation.
    Active,
    /// Serving, but to be drained once its replacement is ready.
    Retiring,
    /// Sent SIGTERM; killed if still alive at the deadline.
    Draining { deadline: Instant },
    /// Being killed; SIGKILL at the deadline if still alive.
    Killing { deadline: Instant },
}

struct Worker {
    pid: Pid,
    slot: usize,
    generation: u64,
    role: Role,
    request_limit: Option<RequestLimit>,
    announced_ready: bool,
    /// Its stderr, forwarded to the error log.
    output: Option<Output>,
    /// Why it is being replaced: timeout, max_requests or memory (a
    /// worker over its memory limit drains as soon as its replacement is
    /// ready; the others at their request limit). Also the restart metric.
    restart_cause: Option<&'static str>,
    spawned: Instant,
    /// Its generation's graceful timeout, kept with the worker: a worker
    /// outlives its generation's place in the master (a rollout abandoned
    /// by a stop, say) and must still drain by its own settings.
    graceful: Duration,
    /// It reached the graceful timeout with connections open: it gave
    /// them up itself, or the master killed it.
    gave_up: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StopKind {
    Graceful,
    Fast,
}

struct Stop {
    kind: StopKind,
    exit_code: u8,
    /// Workers that reached the graceful timeout with connections open.
    forced: usize,
    /// With a shutdown delay: when to start draining the workers.
    drain_at: Option<Instant>,
}

/// A reload whose new generation is serving, while the old one drains.
struct Switchover {
    generation: u64,
    requested: Instant,
    /// The answer for `zdr reload --wait`, given once no worker of an older
    /// generation accepts any more: from then on every new connection
    /// reaches the new generation.
    reply: Option<Response>,
}

/// A binary upgrade waiting for the new binary's check.
struct UpgradeCheck {
    pid: Pid,
    output: Output,
    deadline: Instant,
}

/// The master process.
pub(crate) struct Master {
    name: String,
    exe: PathBuf,
    /// The command line, to check and re-execute with on SIGUSR2.
    args: Vec<OsString>,
    upgrade: Option<UpgradeCheck>,
    control: ControlServer,
    started_at: Instant,
    last_reload: Option<ReloadOutcome>,
    next_memory_check: Instant,
    /// The metrics endpoint, when `metrics_bind` is set.
    scrape: Option<ScrapeServer>,
    /// What exited workers had counted, and the server's other counters.
    totals: crate::metrics::Snapshot,
    pid: u32,
    sources: Sources,
    loader: Loader,
    listeners: Vec<Listener>,
    board: Arc<Scoreboard>,
    bell_rx: OwnedFd,
    bell: Doorbell,
    signals: Signals,
    pidfile: Option<Pidfile>,
    workers: Vec<Worker>,
    serving: Option<Generation>,
    rollout: Option<Rollout>,
    switchover: Option<Switchover>,
    next_generation: u64,
    target: usize,
    paused: bool,
    stop: Option<Stop>,
    /// Consecutive workers that died before becoming ready.
    crash_streak: u32,
    /// When the master last said that no scoreboard slot was free.
    slots_full_since: Option<Instant>,
    next_spawn: Instant,
}

/// Runs the server's master until it stops; returns the exit code. After a
/// binary upgrade, resumes the previous image's master instead.
pub(crate) fn serve(
    name: &str,
    sources: Sources,
    settings: Settings,
    loader: Loader,
    args: Vec<OsString>,
) -> ExitCode {
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
        Ok(master) => ExitCode::from(master.run()),
        Err(e) => {
            error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

/// What a master is made of that it either creates (at start) or takes
/// over (after a binary upgrade).
struct Base {
    exe: PathBuf,
    listeners: Vec<Listener>,
    board: Arc<Scoreboard>,
    bell_rx: OwnedFd,
    bell: Doorbell,
    signals: Signals,
    workers: Vec<Worker>,
    serving: Option<Generation>,
    next_generation: u64,
    target: usize,
}

/// What every master gets from the command line and the app.
struct Inputs<'a> {
    name: &'a str,
    sources: Sources,
    loader: Loader,
    args: Vec<OsString>,
}

impl Master {
    fn start(inputs: Inputs<'_>, settings: Settings) -> anyhow::Result<Master> {
        let pid = std::process::id();
        info!(
            "Starting {} (zdr {})",
            inputs.name,
            env!("CARGO_PKG_VERSION")
        );
        crate::tls::acceptor(&settings)?;
        let listeners = listener::bind_all(&settings.bind, settings.backlog)?;
        for l in &listeners {
            info!("Listening at: {} ({pid})", l.display_addr());
        }
        let (bell_rx, bell) = Doorbell::pair()?;
        let base = Base {
            exe: std::env::current_exe()?,
            listeners,
            board: Arc::new(Scoreboard::create()?),
            bell_rx,
            bell,
            signals: Signals::install()?,
            workers: Vec::new(),
            serving: None,
            next_generation: 1,
            target: settings.workers,
        };
        info!(
            "Using worker: tokio (threads={}, worker_connections={}){}",
            settings.threads,
            settings.worker_connections,
            if settings.preload { ", preload" } else { "" }
        );
        let mut master = Master::assemble(inputs, &settings, base)?;
        let settings = Arc::new(settings);
        let app = match master.preload(&settings) {
            Ok(app) => app,
            Err(e) => {
                master.cleanup();
                return Err(e);
            }
        };
        master.begin_rollout(settings, app, Cause::Start);
        Ok(master)
    }

    /// Takes over from the previous image of this master after a binary
    /// upgrade, then rolls out a generation of the new code.
    fn resume(
        inputs: Inputs<'_>,
        settings: Settings,
        h: upgrade::Handover,
    ) -> anyhow::Result<Master> {
        let signals = Signals::install()?;
        upgrade::unblock_signals();
        let listeners = h
            .listeners
            .into_iter()
            .map(|l| Listener::adopt(l.addr, l.socket, l.owns_path))
            .collect::<Result<Vec<_>, _>>()?;
        // SAFETY: the previous image owned the doorbell's read end and
        // handed it over across exec.
        let bell_rx = unsafe { OwnedFd::from_raw_fd(h.bell_rx) };
        listener::set_cloexec(bell_rx.as_raw_fd(), true)?;
        let now = Instant::now();
        let serving = h.serving.map(|(id, s)| Generation {
            id,
            settings: Arc::new(s),
            app: None,
            exe: Some(Arc::new(spawn::Executable::pin(&h.exe))),
        });
        let graceful = serving
            .as_ref()
            .map(|g| g.settings.graceful_timeout())
            .unwrap_or_default();
        let workers = h
            .workers
            .into_iter()
            .map(|w| Worker {
                pid: Pid::from_raw(w.pid),
                slot: w.slot,
                generation: w.generation,
                role: if w.draining {
                    Role::Draining {
                        deadline: now + graceful,
                    }
                } else {
                    Role::Active
                },
                request_limit: w.request_limit,
                announced_ready: w.announced_ready,
                output: w.output_fd.and_then(|fd| Output::adopt(fd).ok()),
                restart_cause: None,
                spawned: now,
                graceful,
                gave_up: false,
            })
            .collect::<Vec<_>>();
        info!(
            "Binary upgrade: now running {} (zdr {}), pid {}; adopted {} workers",
            h.exe.display(),
            env!("CARGO_PKG_VERSION"),
            std::process::id(),
            workers.len()
        );
        let base = Base {
            exe: h.exe,
            listeners,
            board: Arc::new(Scoreboard::attach(h.scoreboard_fd)?),
            bell_rx,
            bell: Doorbell::from_inherited(h.bell_tx)?,
            signals,
            workers,
            serving,
            next_generation: h.next_generation,
            target: h.target,
        };
        let mut master = Master::assemble(inputs, &settings, base)?;
        let _ = master.reload();
        Ok(master)
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
        let control = ControlServer::bind(&crate::control::master_socket_path(settings, pid))?;
        info!("Control socket: {}", control.path().display());
        let scrape = settings
            .metrics_bind
            .as_ref()
            .map(ScrapeServer::bind)
            .transpose()?;
        if let Some(s) = &scrape {
            info!("Metrics at: http://{}/metrics", s.local_addr());
        }
        let pidfile = settings
            .pidfile
            .as_deref()
            .map(Pidfile::create)
            .transpose()?;
        give_pidfile_to_workers(settings, pidfile.as_ref().map(|p| p.path()));
        let now = Instant::now();
        Ok(Master {
            name: name.to_owned(),
            exe: base.exe,
            args,
            upgrade: None,
            control,
            started_at: now,
            last_reload: None,
            next_memory_check: now,
            scrape,
            totals: crate::metrics::Snapshot {
                reload_duration: crate::metrics::Histogram::new(&crate::metrics::RELOAD_BUCKETS),
                ..Default::default()
            },
            pid,
            sources,
            loader,
            listeners: base.listeners,
            board: base.board,
            bell_rx: base.bell_rx,
            bell: base.bell,
            signals: base.signals,
            pidfile,
            workers: base.workers,
            serving: base.serving,
            rollout: None,
            switchover: None,
            next_generation: base.next_generation,
            target: base.target,
            paused: false,
            slots_full_since: None,
            stop: None,
            crash_streak: 0,
            next_spawn: now,
        })
    }

    /// SIGUSR2: check the binary on disk, then re-execute it in place.
    fn begin_upgrade(&mut self) {
        if self.stop.is_some() || self.upgrade.is_some() || self.rollout.is_some() {
            warn!("Binary upgrade ignored: the master is busy (stopping, upgrading or reloading)");
            return;
        }
        let Some(serving) = &self.serving else {
            warn!("Binary upgrade ignored: no generation is serving");
            return;
        };
        let boot_timeout = serving.settings.boot_timeout();
        info!("Binary upgrade: checking {}", self.exe.display());
        let started = Output::pipe().and_then(|(output, stderr)| {
            let child = std::process::Command::new(&self.exe)
                .args(upgrade::check_args(&self.args))
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::from(stderr))
                .spawn()?;
            Ok((Pid::from_raw(child.id() as i32), output))
        });
        match started {
            Ok((pid, output)) => {
                self.upgrade = Some(UpgradeCheck {
                    pid,
                    output,
                    deadline: Instant::now() + boot_timeout,
                })
            }
            Err(e) => error!(
                "Binary upgrade aborted: cannot run {}: {e}",
                self.exe.display()
            ),
        }
    }

    /// The check exited: re-execute, or log why not.
    fn finish_upgrade_check(&mut self, status: String, success: bool) {
        let Some(check) = self.upgrade.take() else {
            return;
        };
        let tail = check.output.finish();
        if !success {
            let output = if tail.is_empty() {
                String::new()
            } else {
                format!("; its last output: {}", tail.join(" | "))
            };
            error!(
                "Binary upgrade aborted: the new binary's check {status}{output}; nothing changed"
            );
            return;
        }
        if self.rollout.is_some() || self.stop.is_some() {
            warn!("Binary upgrade aborted: a reload or stop began during the check");
            return;
        }
        info!(
            "Binary upgrade: check passed; re-executing in place (pid {} stays)",
            self.pid
        );
        let handover = self.handover();
        let fds = handover.fds();
        for fd in &fds {
            let _ = listener::set_cloexec(*fd, false);
        }
        let _ = std::io::Write::flush(&mut std::io::stderr());
        upgrade::block_signals();
        let err = upgrade::exec(&self.exe, &self.args, &handover);
        upgrade::unblock_signals();
        for fd in &fds {
            let _ = listener::set_cloexec(*fd, true);
        }
        error!(
            "Binary upgrade failed: cannot execute {}: {err}; nothing changed",
            self.exe.display()
        );
    }

    fn handover(&self) -> upgrade::Handover {
        upgrade::Handover {
            exe: self.exe.clone(),
            listeners: self
                .listeners
                .iter()
                .map(|l| upgrade::HandedListener {
                    addr: l.addr.clone(),
                    socket: l.inherited(),
                    owns_path: l.owns_socket_file(),
                })
                .collect(),
            scoreboard_fd: self.board.raw_fd(),
            bell_rx: self.bell_rx.as_raw_fd(),
            bell_tx: self.bell.raw_fd(),
            workers: self
                .workers
                .iter()
                .map(|w| upgrade::HandedWorker {
                    pid: w.pid.as_raw(),
                    slot: w.slot,
                    generation: w.generation,
                    draining: !matches!(w.role, Role::Active | Role::Retiring),
                    request_limit: w.request_limit,
                    announced_ready: w.announced_ready,
                    output_fd: w.output.as_ref().map(|o| o.fd().as_raw_fd()),
                })
                .collect(),
            serving: self.serving.as_ref().map(|g| (g.id, (*g.settings).clone())),
            next_generation: self.next_generation,
            target: self.target,
        }
    }

    /// The event loop.
    fn run(mut self) -> u8 {
        loop {
            self.maintain();
            self.wait();
            for sig in self.signals.take() {
                self.on_signal(sig);
            }
            self.reap();
            self.watch_workers();
            self.advance_rollout();
            if let Some(code) = self.advance_stop() {
                self.cleanup();
                return code;
            }
        }
    }

    fn wait(&mut self) {
        let busy = self.rollout.is_some()
            || self.stop.is_some()
            || self.workers.iter().any(|w| w.role != Role::Active);
        let timeout = if busy { 100u16 } else { 500 };
        let mut fds = vec![
            PollFd::new(self.signals.fd(), PollFlags::POLLIN),
            PollFd::new(self.bell_rx.as_fd(), PollFlags::POLLIN),
        ];
        let outputs = self.workers.iter().filter_map(|w| w.output.as_ref());
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
        let outputs = self.workers.iter_mut().filter_map(|w| w.output.as_mut());
        for (output, readable) in outputs.zip(readable) {
            if readable {
                output.pump();
            }
        }
        if let Some(mut scrape) = self.scrape.take() {
            scrape.serve(|| self.metrics().encode());
            self.scrape = Some(scrape);
        }
        let requests = self.control.poll();
        for (id, request) in requests {
            self.on_request(id, request);
        }
    }

    /// A command from the control socket.
    fn on_request(&mut self, id: u64, request: Request) {
        let response = match request {
            Request::Status => Response {
                status: Some(self.status()),
                ..Response::ok("status")
            },
            Request::Reload { wait } => {
                info!("Reload requested on the control socket");
                match self.reload() {
                    Ok(generation) if wait => {
                        self.control.hold(id, generation);
                        return;
                    }
                    Ok(generation) => {
                        Response::ok(format!("reload started: generation {generation}"))
                    }
                    Err(why) => Response::error(why),
                }
            }
            Request::Stop { graceful, wait } => {
                info!("Stop requested on the control socket");
                self.begin_stop(if graceful {
                    StopKind::Graceful
                } else {
                    StopKind::Fast
                });
                if wait {
                    self.control.hold_until_exit(id);
                    return;
                }
                Response::ok(if graceful {
                    "stopping gracefully"
                } else {
                    "stopping"
                })
            }
            Request::Scale { workers } if (1..=crate::config::MAX_WORKERS).contains(&workers) => {
                self.target = workers;
                info!("Number of workers: {workers}");
                Response::ok(format!("scaling to {workers} workers"))
            }
            Request::Scale { workers: 0 } => Response::error("a server needs at least 1 worker"),
            Request::Scale { workers } => Response::error(format!(
                "cannot scale to {workers} workers: at most {} (two generations must fit side by side)",
                crate::config::MAX_WORKERS
            )),
        };
        self.control.respond(id, &response);
    }

    /// The figures a metrics scrape reports: the counters of the living
    /// workers plus those of the ones that exited.
    fn metrics(&self) -> crate::metrics::Snapshot {
        let mut snapshot = self.totals.clone();
        for w in &self.workers {
            let slot = self.board.slot(w.slot);
            snapshot.requests.add(&slot.counters());
            *snapshot
                .workers
                .entry((w.generation, self.worker_state(w).to_owned()))
                .or_default() += 1;
        }
        snapshot.connections = self.board.total_connections();
        snapshot.client_timeouts = self.board.client_timeouts();
        snapshot
    }

    /// A worker's state, as `zdr status` and the metrics name it.
    fn worker_state(&self, w: &Worker) -> &'static str {
        match (w.role, self.board.slot(w.slot).state()) {
            (Role::Killing { .. }, _) => "exiting",
            (Role::Draining { .. }, _) | (_, SlotState::Draining) => "draining",
            (Role::Retiring, _) => "retiring",
            (_, SlotState::Ready) => "ready",
            _ => "booting",
        }
    }

    /// The server's state, for `zdr status`.
    fn status(&self) -> Status {
        let workers = self
            .workers
            .iter()
            .map(|w| {
                let slot = self.board.slot(w.slot);
                let state = self.worker_state(w);
                WorkerStatus {
                    pid: w.pid.as_raw() as u32,
                    generation: w.generation,
                    state: state.to_owned(),
                    age_secs: w.spawned.elapsed().as_secs_f64(),
                    requests: slot.requests(),
                    connections: slot.connections(),
                    accepting: slot.state() == SlotState::Ready,
                    rss_bytes: rss_bytes(w.pid),
                    owned_bytes: owned_bytes(w.pid),
                }
            })
            .collect();
        Status {
            master_pid: self.pid,
            uptime_secs: self.started_at.elapsed().as_secs_f64(),
            generation: self.serving.as_ref().map(|g| g.id),
            booting_generation: self.rollout.as_ref().map(|r| r.generation.id),
            bind: self.listeners.iter().map(|l| l.display_addr()).collect(),
            target_workers: self.target,
            workers,
            last_reload: self.last_reload.clone(),
        }
    }

    fn on_signal(&mut self, sig: i32) {
        use signal_hook::consts::signal::*;
        if sig != SIGCHLD {
            info!("Handling signal: {}", signals::name(sig));
        }
        match sig {
            SIGTERM => self.begin_stop(StopKind::Graceful),
            SIGINT | SIGQUIT => self.begin_stop(StopKind::Fast),
            SIGHUP => {
                let _ = self.reload();
            }
            SIGTTIN if self.target >= crate::config::MAX_WORKERS => {
                warn!(
                    "Number of workers stays {}: that is the most a server runs",
                    self.target
                );
            }
            SIGTTIN => {
                self.target += 1;
                info!("Number of workers: {}", self.target);
            }
            SIGTTOU => {
                self.target = self.target.saturating_sub(1).max(1);
                info!("Number of workers: {}", self.target);
            }
            SIGWINCH => {
                info!("Stopping all workers; the master stays (SIGHUP starts them again)");
                self.paused = true;
                self.abandon_rollout();
                let pids: Vec<Pid> = self.workers.iter().map(|w| w.pid).collect();
                for pid in pids {
                    self.drain(pid);
                }
            }
            SIGUSR1 => {
                crate::logging::reopen();
                for w in &self.workers {
                    let _ = kill(w.pid, Signal::SIGUSR1);
                }
            }
            SIGUSR2 => self.begin_upgrade(),
            _ => {}
        }
    }

    /// SIGHUP: re-read the configuration and roll out a new generation.
    /// SIGHUP (or `zdr reload`): re-read the configuration and roll out a
    /// new generation. Returns its id, or why nothing changed.
    fn reload(&mut self) -> Result<u64, String> {
        let result = self.try_reload();
        if let Err(why) = &result {
            // Tell systemd the reload is over: nothing changed.
            if let Some(g) = &self.serving {
                notify::ready(&format!(
                    "{} workers ready, generation {}; {why}",
                    self.target, g.id
                ));
            }
        }
        result
    }

    fn try_reload(&mut self) -> Result<u64, String> {
        if self.stop.is_some() {
            return Err("the server is stopping".to_owned());
        }
        notify::reloading();
        let settings = match self.sources.load() {
            Ok(s) => Arc::new(s),
            Err(e) => {
                let why = format!("Reload aborted, configuration unchanged: {e}");
                error!("{why}");
                return Err(why);
            }
        };
        if let Err(e) = crate::tls::acceptor(&settings) {
            let why = format!("Reload aborted, the old certificate stays: {e:#}");
            error!("{why}");
            return Err(why);
        }
        for addr in &settings.bind {
            if !self.listeners.iter().any(|l| &l.addr == addr) {
                match Listener::bind(addr, settings.backlog) {
                    Ok(l) => {
                        info!("Listening at: {} ({})", l.display_addr(), self.pid);
                        self.listeners.push(l);
                    }
                    Err(e) => {
                        let why = format!("Reload aborted: {e}");
                        error!("{why}");
                        self.prune_listeners();
                        return Err(why);
                    }
                }
            }
        }
        let app = match self.preload(&settings) {
            Ok(app) => app,
            Err(e) => {
                let why = format!("Reload aborted: {e:#}");
                error!("{why}");
                self.prune_listeners();
                return Err(why);
            }
        };
        if let Some(old) = &self.rollout {
            let (id, started) = (old.generation.id, old.started);
            warn!("Reload to generation {id} superseded by a newer reload");
            self.abandon_rollout();
            self.record_reload(
                id,
                started,
                0,
                Err("superseded by a newer reload".to_owned()),
            );
        }
        self.target = settings.workers;
        crate::logging::reopen();
        Ok(self.begin_rollout(settings, app, Cause::Reload))
    }

    /// Runs the app's load step here when preloading.
    fn preload(&self, settings: &Settings) -> anyhow::Result<Option<Arc<LoadedApp>>> {
        if !settings.preload {
            return Ok(None);
        }
        let app = (self.loader)().map_err(|e| e.context("the app failed to load"))?;
        if let Some(n) = spawn::thread_count().filter(|n| *n > 1) {
            warn!("The app's load step left {n} threads running in the master; forked workers get only the calling thread");
        }
        Ok(Some(Arc::new(app)))
    }

    fn begin_rollout(
        &mut self,
        settings: Arc<Settings>,
        app: Option<Arc<LoadedApp>>,
        cause: Cause,
    ) -> u64 {
        let id = self.next_generation;
        self.next_generation += 1;
        let boot_timeout = settings.boot_timeout();
        if cause == Cause::Reload {
            info!(
                "Reload: starting generation {id} with {} workers",
                self.target
            );
        }
        let exe = app
            .is_none()
            .then(|| Arc::new(spawn::Executable::pin(&self.exe)));
        let generation = Generation {
            id,
            settings,
            app,
            exe,
        };
        self.rollout = Some(Rollout::new(
            generation,
            cause,
            Instant::now(),
            boot_timeout,
        ));
        self.next_spawn = Instant::now();
        id
    }

    /// Stops the workers of an unfinished rollout: drained if they are
    /// already accepting, killed if still booting.
    fn abandon_rollout(&mut self) {
        let Some(rollout) = self.rollout.take() else {
            return;
        };
        let id = rollout.generation.id;
        let pids: Vec<Pid> = self
            .workers
            .iter()
            .filter(|w| w.generation == id)
            .map(|w| w.pid)
            .collect();
        for pid in pids {
            self.retire_now(pid);
        }
        self.prune_listeners();
    }

    fn retire_now(&mut self, pid: Pid) {
        let Some(w) = self.workers.iter().find(|w| w.pid == pid) else {
            return;
        };
        if self.board.slot(w.slot).state() == SlotState::Ready {
            self.drain(pid);
        } else {
            self.kill_worker(pid, Signal::SIGKILL);
        }
    }

    /// Workers of `generation` that are ready and not leaving.
    fn ready_workers(&self, generation: u64) -> usize {
        self.workers
            .iter()
            .filter(|w| w.generation == generation && w.role == Role::Active)
            .filter(|w| self.board.slot(w.slot).state() == SlotState::Ready)
            .count()
    }

    fn advance_rollout(&mut self) {
        let Some(rollout) = &self.rollout else { return };
        let ready = self.ready_workers(rollout.generation.id);
        match rollout.judge(ready, self.target, Instant::now()) {
            Verdict::Pending => {}
            Verdict::Complete => self.commit_rollout(),
            Verdict::Failed(why) => self.roll_back(why),
        }
    }

    fn commit_rollout(&mut self) {
        let Some(rollout) = self.rollout.take() else {
            return;
        };
        let id = rollout.generation.id;
        let ms = rollout.started.elapsed().as_millis();
        self.paused = false;
        let old = self.serving.replace(rollout.generation);
        let retiring: Vec<Pid> = self
            .workers
            .iter()
            .filter(|w| w.generation != id && matches!(w.role, Role::Active | Role::Retiring))
            .map(|w| w.pid)
            .collect();
        match (rollout.cause, old) {
            (Cause::Start, _) | (_, None) => {
                info!(
                    "Ready: generation {id}, {} workers, in {ms} ms",
                    self.target
                );
            }
            (Cause::Reload, Some(old)) => {
                info!(
                    "Generation {id} ready: {n}/{n} workers in {ms} ms; draining generation {} ({} workers)",
                    old.id,
                    retiring.len(),
                    n = self.target
                );
                // A reload that completed before this one took over is
                // answered now.
                if let Some(Switchover {
                    generation,
                    reply: Some(reply),
                    ..
                }) = self.switchover.take()
                {
                    self.control.reload_finished(generation, &reply);
                }
                self.switchover = Some(Switchover {
                    generation: id,
                    requested: rollout.started,
                    reply: None,
                });
            }
        }
        for pid in retiring {
            self.drain(pid);
        }
        self.prune_listeners();
        self.check_switchover();
        if rollout.cause == Cause::Reload {
            self.record_reload(id, rollout.started, self.target, Ok(()));
        }
        notify::ready(&format!("{} workers ready, generation {id}", self.target));
    }

    /// Remembers how a reload ended and tells whoever waits for it.
    fn record_reload(
        &mut self,
        generation: u64,
        started: Instant,
        workers_ready: usize,
        result: Result<(), String>,
    ) {
        let outcome = ReloadOutcome {
            generation,
            completed: result.is_ok(),
            duration_ms: started.elapsed().as_millis() as u64,
            workers_ready,
            error: result.as_ref().err().cloned(),
        };
        let message = match &result {
            Ok(()) => format!(
                "generation {generation} ready: {workers_ready} workers in {} ms",
                outcome.duration_ms
            ),
            Err(why) => format!("reload to generation {generation} rolled back: {why}"),
        };
        let response = Response {
            ok: result.is_ok(),
            message,
            status: None,
            reload: Some(outcome.clone()),
        };
        match (&mut self.switchover, result.is_ok()) {
            (Some(s), true) if s.generation == generation => s.reply = Some(response),
            _ => self.control.reload_finished(generation, &response),
        }
        match result {
            Ok(()) => self.totals.reloads_completed += 1,
            Err(_) => self.totals.reloads_rolled_back += 1,
        }
        let secs = outcome.duration_ms as f64 / 1000.0;
        self.totals
            .reload_duration
            .observe(&crate::metrics::RELOAD_BUCKETS, secs);
        self.last_reload = Some(outcome);
    }

    fn roll_back(&mut self, why: String) {
        let Some(rollout) = &self.rollout else { return };
        let (id, cause, started) = (rollout.generation.id, rollout.cause, rollout.started);
        let ready = self.ready_workers(id);
        self.abandon_rollout();
        if cause == Cause::Reload {
            self.record_reload(id, started, ready, Err(why.clone()));
        }
        match (&self.serving, cause) {
            (None, Cause::Start) => {
                error!("Cannot start: {why}");
                self.begin_stop(StopKind::Fast);
                if let Some(stop) = &mut self.stop {
                    stop.exit_code = 1;
                }
            }
            (Some(serving), _) => {
                error!(
                    "Reload to generation {id} rolled back: {why}; generation {} keeps serving",
                    serving.id
                );
                let status = format!(
                    "{} workers ready, generation {}; reload rolled back",
                    self.target, serving.id
                );
                notify::ready(&status);
            }
            (None, _) => error!("Generation {id} failed: {why}"),
        }
    }

    /// Logs the end of a reload once the last worker of older generations
    /// has exited.
    fn check_switchover(&mut self) {
        let Some(s) = &mut self.switchover else {
            return;
        };
        let old_accepting = self.workers.iter().any(|w| {
            w.generation < s.generation && self.board.slot(w.slot).state() == SlotState::Ready
        });
        if !old_accepting {
            if let Some(reply) = s.reply.take() {
                self.control.reload_finished(s.generation, &reply);
            }
        }
        if self.workers.iter().all(|w| w.generation >= s.generation) {
            info!(
                "Reload to generation {} complete in {} ms",
                s.generation,
                s.requested.elapsed().as_millis()
            );
            self.switchover = None;
        }
    }

    /// Closes listeners that neither the serving nor the booting generation
    /// binds any more.
    fn prune_listeners(&mut self) {
        let wanted = |addr: &BindAddr| {
            [
                self.serving.as_ref(),
                self.rollout.as_ref().map(|r| &r.generation),
            ]
            .into_iter()
            .flatten()
            .any(|g| g.settings.bind.contains(addr))
        };
        let (keep, close): (Vec<_>, Vec<_>) = std::mem::take(&mut self.listeners)
            .into_iter()
            .partition(|l| wanted(&l.addr));
        for l in close {
            info!("Closing listener {}", l.display_addr());
            l.remove_socket_file();
        }
        self.listeners = keep;
    }

    fn begin_stop(&mut self, kind: StopKind) {
        self.board.set_stopping();
        self.rollout = None;
        match &mut self.stop {
            Some(stop) if stop.kind == StopKind::Graceful && kind == StopKind::Fast => {
                stop.kind = kind;
                stop.drain_at = None;
            }
            Some(_) => return,
            None => {
                notify::stopping();
                let delay = match kind {
                    StopKind::Graceful => self
                        .current_settings()
                        .map(|s| s.shutdown_delay())
                        .unwrap_or_default(),
                    StopKind::Fast => Duration::ZERO,
                };
                let drain_at = (!delay.is_zero()).then(|| Instant::now() + delay);
                self.stop = Some(Stop {
                    kind,
                    exit_code: 0,
                    forced: 0,
                    drain_at,
                });
                if drain_at.is_some() {
                    info!(
                        "Shutdown delay: readiness fails for {:.1}s, then the workers drain",
                        delay.as_secs_f64()
                    );
                    return;
                }
            }
        }
        self.signal_stop(kind);
    }

    /// Sends every worker its stop signal, and closes the master's copies
    /// of the listening sockets: once the workers have taken what is
    /// queued and closed theirs, a new connection is refused at once
    /// instead of waiting in a queue nobody accepts from.
    fn signal_stop(&mut self, kind: StopKind) {
        for l in std::mem::take(&mut self.listeners) {
            l.remove_socket_file();
        }
        let pids: Vec<Pid> = self.workers.iter().map(|w| w.pid).collect();
        for pid in pids {
            match kind {
                StopKind::Graceful => self.drain(pid),
                StopKind::Fast => self.kill_worker(pid, Signal::SIGQUIT),
            }
        }
    }

    fn advance_stop(&mut self) -> Option<u8> {
        let stop = self.stop.as_mut()?;
        if stop.drain_at.is_some_and(|at| Instant::now() >= at) {
            stop.drain_at = None;
            let kind = stop.kind;
            self.signal_stop(kind);
        }
        let stop = self.stop.as_ref()?;
        if self.workers.is_empty() {
            info!("Shutting down: Master");
            let (code, forced, kind) = (stop.exit_code, stop.forced, stop.kind);
            let answer = match (kind, forced) {
                (StopKind::Graceful, 0) => Response::ok("stopped gracefully"),
                (StopKind::Graceful, n) => Response::error(format!(
                    "stopped; {n} worker(s) still had connections open at the graceful timeout"
                )),
                (StopKind::Fast, _) => Response::ok("stopped"),
            };
            self.control.exiting(&answer);
            return Some(code);
        }
        None
    }

    /// Sends SIGTERM and sets the graceful deadline.
    fn drain(&mut self, pid: Pid) {
        let Some(w) = self.workers.iter().find(|w| w.pid == pid) else {
            return;
        };
        if matches!(w.role, Role::Draining { .. } | Role::Killing { .. }) {
            return;
        }
        let graceful = w.graceful;
        if let Some(w) = self.workers.iter_mut().find(|w| w.pid == pid) {
            w.role = Role::Draining {
                deadline: Instant::now() + graceful,
            };
            let _ = kill(pid, Signal::SIGTERM);
        }
    }

    fn kill_worker(&mut self, pid: Pid, signal: Signal) {
        let Some(w) = self.workers.iter_mut().find(|w| w.pid == pid) else {
            return;
        };
        let grace = if signal == Signal::SIGKILL {
            Duration::from_secs(3600)
        } else {
            Duration::from_secs(1)
        };
        w.role = Role::Killing {
            deadline: Instant::now() + grace,
        };
        let _ = kill(pid, signal);
    }

    /// The settings of the serving generation (else the booting one).
    fn current_settings(&self) -> Option<&Settings> {
        self.serving
            .as_ref()
            .or(self.rollout.as_ref().map(|r| &r.generation))
            .map(|g| &*g.settings)
    }

    fn generation_settings(&self, id: u64) -> Option<&Settings> {
        [
            self.serving.as_ref(),
            self.rollout.as_ref().map(|r| &r.generation),
        ]
        .into_iter()
        .flatten()
        .find(|g| g.id == id)
        .map(|g| &*g.settings)
        .or_else(|| self.serving.as_ref().map(|g| &*g.settings))
    }

    /// Collects every exited child.
    fn reap(&mut self) {
        loop {
            match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(pid, code))
                    if self.upgrade.as_ref().is_some_and(|u| u.pid == pid) =>
                {
                    self.finish_upgrade_check(format!("exited with status {code}"), code == 0)
                }
                Ok(WaitStatus::Signaled(pid, sig, _))
                    if self.upgrade.as_ref().is_some_and(|u| u.pid == pid) =>
                {
                    self.finish_upgrade_check(format!("was killed by {sig}"), false)
                }
                Ok(WaitStatus::Exited(pid, code)) => {
                    if code == crate::worker::GAVE_UP {
                        if let Some(w) = self.workers.iter_mut().find(|w| w.pid == pid) {
                            w.gave_up = true;
                        }
                    }
                    self.on_exit(pid, format!("exited with status {code}"))
                }
                Ok(WaitStatus::Signaled(pid, sig, _)) => {
                    self.on_exit(pid, format!("was killed by {sig}"))
                }
                Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => break,
                Ok(_) | Err(Errno::EINTR) => continue,
                Err(e) => {
                    error!("waitpid failed: {e}");
                    break;
                }
            }
        }
        self.check_switchover();
    }

    fn on_exit(&mut self, pid: Pid, status: String) {
        let Some(index) = self.workers.iter().position(|w| w.pid == pid) else {
            return;
        };
        let mut w = self.workers.remove(index);
        if let (true, Some(stop)) = (w.gave_up, &mut self.stop) {
            stop.forced += 1;
        }
        let tail = w.output.take().map(Output::finish).unwrap_or_default();
        let slot = self.board.slot(w.slot);
        let (state, message, requests) = (slot.state(), slot.message(), slot.requests());
        self.totals.requests.add(&slot.counters());
        self.board.release(w.slot);
        if let Some(cause) = w.restart_cause {
            *self.totals.restarts.entry(cause).or_default() += 1;
        }
        // Expected: the master stopped it, or it retired itself at its
        // request limit once its replacement was ready.
        let expected = matches!(w.role, Role::Draining { .. } | Role::Killing { .. })
            || (w.role == Role::Retiring && state == SlotState::Draining);
        if expected {
            info!(
                "Worker exiting (pid: {pid}, generation {}, {requests} requests): {status}",
                w.generation
            );
            return;
        }
        let cause = match state {
            SlotState::BootFailed if !message.is_empty() => {
                format!("worker {pid} failed to boot: {message}")
            }
            _ if tail.is_empty() => format!("worker {pid} {status}"),
            _ => format!(
                "worker {pid} {status}; its last output: {}",
                tail.join(" | ")
            ),
        };
        if state != SlotState::Ready && !w.announced_ready {
            self.crash_streak += 1;
            let delay = backoff(self.crash_streak);
            self.next_spawn = Instant::now() + delay;
            if self.crash_streak > 1
                && self
                    .rollout
                    .as_ref()
                    .is_none_or(|r| r.generation.id != w.generation)
            {
                warn!(
                    "{} workers in a row died before becoming ready; backing off {} ms before the next start",
                    self.crash_streak,
                    delay.as_millis()
                );
            }
        }
        match &mut self.rollout {
            Some(r) if r.generation.id == w.generation => r.worker_failed(cause),
            _ if self.stop.is_none() => {
                *self.totals.restarts.entry("crash").or_default() += 1;
                error!(
                    "Worker (pid: {pid}, generation {}) died: {cause}",
                    w.generation
                )
            }
            _ => {}
        }
    }

    /// Logs each worker that became ready, with the rollout's progress.
    fn announce_ready(&mut self) {
        let booting = self.rollout.as_ref().map(|r| r.generation.id);
        for i in 0..self.workers.len() {
            let w = &self.workers[i];
            if w.announced_ready || self.board.slot(w.slot).state() != SlotState::Ready {
                continue;
            }
            self.workers[i].announced_ready = true;
            self.crash_streak = 0;
            let (pid, generation) = (self.workers[i].pid, self.workers[i].generation);
            if booting == Some(generation) {
                let ready = self
                    .workers
                    .iter()
                    .filter(|o| o.generation == generation && o.announced_ready)
                    .count();
                info!(
                    "Worker ready (pid: {pid}, generation {generation}): {ready}/{}",
                    self.target
                );
            } else {
                info!("Worker ready (pid: {pid}, generation {generation})");
            }
        }
    }

    /// Readiness, heartbeats, request limits and deadlines.
    fn watch_workers(&mut self) {
        self.announce_ready();
        let accepting = self
            .workers
            .iter()
            .filter(|w| matches!(w.role, Role::Active | Role::Retiring))
            .filter(|w| self.board.slot(w.slot).state() == SlotState::Ready)
            .count();
        self.board.set_accepting(accepting);
        if let Some(check) = &mut self.upgrade {
            check.output.pump();
            if Instant::now() >= check.deadline {
                error!("Binary upgrade: the new binary's check is taking longer than the boot timeout; killing it");
                let _ = kill(check.pid, Signal::SIGKILL);
            }
        }
        let now = Instant::now();
        let now_ms = monotonic_ms();
        let recycling_allowed = self.rollout.is_none() && self.stop.is_none();
        // Memory is read from /proc once a second, not on every wake-up.
        let check_memory = now >= self.next_memory_check;
        if check_memory {
            self.next_memory_check = now + Duration::from_secs(1);
        }
        let mut to_kill: Vec<(Pid, Signal)> = Vec::new();
        // The recycling budget: recycled workers not yet gone (awaiting
        // their replacement, or draining), for the whole server.
        let mut retiring = self
            .workers
            .iter()
            .filter(|w| {
                w.role == Role::Retiring
                    || (matches!(w.role, Role::Draining { .. })
                        && matches!(w.restart_cause, Some("max_requests" | "memory")))
            })
            .count();
        for i in 0..self.workers.len() {
            let settings = self
                .generation_settings(self.workers[i].generation)
                .cloned();
            let w = &mut self.workers[i];
            let slot = self.board.slot(w.slot);
            let state = slot.state();
            match w.role {
                Role::Active | Role::Retiring => {
                    let timeout = settings.as_ref().and_then(|s| s.timeout());
                    if let Some(timeout) = timeout.filter(|_| state == SlotState::Ready) {
                        let silent = now_ms.saturating_sub(slot.heartbeat_ms());
                        if silent > timeout.as_millis() as u64 {
                            error!(
                                "WORKER TIMEOUT (pid: {}, generation {}): no heartbeat for {:.1}s; killing it",
                                w.pid,
                                w.generation,
                                silent as f64 / 1000.0
                            );
                            to_kill.push((w.pid, Signal::SIGABRT));
                            w.restart_cause = Some("timeout");
                            continue;
                        }
                    }
                    let may_recycle = recycling_allowed && retiring < MAX_SURGE;
                    if w.role == Role::Active
                        && may_recycle
                        && w.request_limit
                            .is_some_and(|l| slot.requests() >= l.prespawn_at)
                    {
                        info!(
                            "Worker (pid: {}) reached its request limit ({} of {}); starting its replacement",
                            w.pid,
                            slot.requests(),
                            w.request_limit.map_or(0, |l| l.limit)
                        );
                        w.role = Role::Retiring;
                        w.restart_cause = Some("max_requests");
                        retiring += 1;
                    }
                    let limit = settings.as_ref().and_then(|s| s.max_worker_memory);
                    if let Some(limit) = limit.filter(|_| {
                        check_memory
                            && w.role == Role::Active
                            && recycling_allowed
                            && retiring < MAX_SURGE
                    }) {
                        let owned = owned_bytes(w.pid);
                        if owned > limit.0 {
                            info!(
                                "Worker (pid: {}) owns {:.0} MiB, over --max-worker-memory {limit}; starting its replacement",
                                w.pid,
                                owned as f64 / 1048576.0
                            );
                            w.role = Role::Retiring;
                            w.restart_cause = Some("memory");
                            retiring += 1;
                        }
                    }
                }
                Role::Draining { deadline } if now >= deadline => {
                    warn!(
                        "Worker (pid: {}) still busy at the graceful timeout; killing it",
                        w.pid
                    );
                    to_kill.push((w.pid, Signal::SIGKILL));
                    w.gave_up = true;
                }
                Role::Killing { deadline } if now >= deadline => {
                    to_kill.push((w.pid, Signal::SIGKILL))
                }
                _ => {}
            }
        }
        for (pid, sig) in to_kill {
            self.kill_worker(pid, sig);
        }
        // A retiring worker is drained once its generation again has every
        // worker it should have, ready.
        if let Some(id) = self.serving.as_ref().map(|g| g.id) {
            let ready = self.ready_workers(id);
            if ready >= self.target {
                // Replacements are ready: each retiring worker may now stop
                // at its limit by itself, and one already past it drains now.
                let done: Vec<Pid> = self
                    .workers
                    .iter()
                    .filter(|w| w.role == Role::Retiring)
                    .filter(|w| {
                        let slot = self.board.slot(w.slot);
                        slot.allow_retire();
                        w.restart_cause == Some("memory")
                            || w.request_limit.is_some_and(|l| slot.requests() >= l.limit)
                    })
                    .map(|w| w.pid)
                    .collect();
                for pid in done {
                    self.drain(pid);
                }
            }
        }
    }

    /// Starts missing workers of the serving and the booting generation,
    /// and drains extra ones.
    fn maintain(&mut self) {
        if self.stop.is_some() || Instant::now() < self.next_spawn {
            return;
        }
        // After WINCH the serving generation is not topped up; a reload
        // (HUP) starts the next one, and only that one.
        let serving = self.serving.as_ref().filter(|_| !self.paused);
        let ids: Vec<u64> = [serving, self.rollout.as_ref().map(|r| &r.generation)]
            .into_iter()
            .flatten()
            .map(|g| g.id)
            .collect();
        for id in ids {
            let active: Vec<Pid> = self
                .workers
                .iter()
                .filter(|w| w.generation == id && w.role == Role::Active)
                .map(|w| w.pid)
                .collect();
            if active.len() < self.target {
                let missing = if self.crash_streak > 0 {
                    1
                } else {
                    self.target - active.len()
                };
                for _ in 0..missing {
                    self.spawn(id);
                }
                if self.crash_streak > 0 {
                    return;
                }
            } else if active.len() > self.target && self.rollout.is_none() {
                for pid in &active[self.target..] {
                    self.drain(*pid);
                }
            }
        }
    }

    fn spawn(&mut self, id: u64) {
        let generation = [
            self.serving.as_ref(),
            self.rollout.as_ref().map(|r| &r.generation),
        ]
        .into_iter()
        .flatten()
        .find(|g| g.id == id);
        let Some(generation) = generation else { return };
        let Some(slot_index) = self.board.free_slot() else {
            // Draining workers hold every slot: wait for them, and say so
            // once every ten seconds, not at every turn of the loop.
            let now = Instant::now();
            self.next_spawn = now + Duration::from_secs(1);
            if self
                .slots_full_since
                .is_none_or(|t| now >= t + Duration::from_secs(10))
            {
                error!(
                    "Cannot start a worker: all {} scoreboard slots are in use (draining workers hold them); retrying every second",
                    crate::scoreboard::CAPACITY
                );
                self.slots_full_since = Some(now);
            }
            return;
        };
        let settings = Arc::clone(&generation.settings);
        let app = generation.app.clone();
        let exe = generation.exe.clone();
        let slot = self.board.slot(slot_index);
        slot.claim(id);
        let request_limit = match settings.max_requests {
            0 => None,
            n => RequestLimit::new(n + random_below(settings.max_requests_jitter + 1)),
        };
        let spec = WorkerSpec {
            generation: id,
            slot: slot_index,
            master_pid: self.pid,
            settings: (*settings).clone(),
            listeners: self
                .listeners
                .iter()
                .filter(|l| settings.bind.contains(&l.addr))
                .map(|l| l.inherited())
                .collect(),
            scoreboard_fd: self.board.raw_fd(),
            doorbell_fd: self.bell.raw_fd(),
            request_limit,
            exe_fd: None,
        };
        let (output, stderr) = match Output::pipe() {
            Ok(pair) => pair,
            Err(e) => {
                self.board.release(slot_index);
                error!("Cannot start a worker: no pipe for its output: {e}");
                return;
            }
        };
        let result = match app {
            Some(app) => {
                let keep: Vec<RawFd> = spec.listeners.iter().map(|l| l.fd).collect();
                let mut close = self.own_fds();
                close.retain(|fd| !keep.contains(fd));
                close.push(output.fd().as_raw_fd());
                spawn::fork(
                    spec,
                    spawn::ForkParts {
                        app,
                        board: Arc::clone(&self.board),
                        bell: &self.bell,
                        signals: &self.signals,
                        close,
                        stderr,
                        loader: &self.loader,
                    },
                )
            }
            None => {
                let title = format!("zdr: worker [{}]", self.name);
                let exe = exe.unwrap_or_else(|| Arc::new(spawn::Executable::pin(&self.exe)));
                spawn::exec(&exe, &title, &spec, stderr)
            }
        };
        match result {
            Ok(pid) => {
                slot.set_pid(pid.as_raw() as u32);
                info!("Booting worker with pid: {pid} (generation {id})");
                self.workers.push(Worker {
                    pid,
                    slot: slot_index,
                    generation: id,
                    role: Role::Active,
                    request_limit,
                    announced_ready: false,
                    output: Some(output),
                    restart_cause: None,
                    spawned: Instant::now(),
                    graceful: settings.graceful_timeout(),
                    gave_up: false,
                });
            }
            Err(e) => {
                self.board.release(slot_index);
                let cause = format!("cannot start a worker from {}: {e}", self.exe.display());
                self.crash_streak += 1;
                self.next_spawn = Instant::now() + backoff(self.crash_streak);
                match &mut self.rollout {
                    Some(r) if r.generation.id == id => r.worker_failed(cause),
                    _ => error!("{cause}"),
                }
            }
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
            self.workers
                .iter()
                .filter_map(|w| w.output.as_ref())
                .map(|o| o.fd().as_raw_fd()),
        );
        fds.extend(self.upgrade.as_ref().map(|u| u.output.fd().as_raw_fd()));
        if let Some(scrape) = &self.scrape {
            fds.extend(scrape.fds().iter().map(|fd| fd.as_raw_fd()));
        }
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
            "cannot give {} to uid {uid}, gid {gid}: {e}",
            path.display()
        );
    }
}

/// A process's resident memory in bytes, from /proc (0 if it is gone).
fn rss_bytes(pid: Pid) -> u64 {
    let page = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
        .ok()
        .flatten()
        .unwrap_or(4096) as u64;
    std::fs::read_to_string(format!("/proc/{pid}/statm"))
        .ok()
        .and_then(|t| t.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map_or(0, |pages| pages * page)
}

/// The memory a process owns alone (its private pages, "USS"), from
/// /proc/PID/smaps_rollup: unlike its resident size, it leaves out pages
/// shared copy-on-write with the master under `--preload`, which would
/// otherwise put every worker over a memory limit at once. Falls back to
/// the resident size where the kernel has no rollup.
fn owned_bytes(pid: Pid) -> u64 {
    let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")) else {
        return rss_bytes(pid);
    };
    let kib: u64 = text
        .lines()
        .filter(|l| l.starts_with("Private_Clean:") || l.starts_with("Private_Dirty:"))
        .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        .sum();
    kib * 1024
}

/// Delay before the next start after `streak` workers in a row died before
/// becoming ready: 0.1 s, doubling up to 6.4 s.
fn backoff(streak: u32) -> Duration {
    Duration::from_millis(100 << streak.clamp(1, 7).saturating_sub(1))
}

/// A random number in `0..n` (n > 0), from the standard library's per-process
/// random keys.
fn random_below(n: u64) -> u64 {
    let mut h = RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos(),
    );
    h.finish() % n.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_caps() {
        assert_eq!(backoff(1), Duration::from_millis(100));
        assert_eq!(backoff(2), Duration::from_millis(200));
        assert_eq!(backoff(4), Duration::from_millis(800));
        assert_eq!(backoff(30), Duration::from_millis(6400));
    }

    #[test]
    fn jitter_stays_in_range() {
        for _ in 0..200 {
            assert!(random_below(11) <= 10);
        }
        assert_eq!(random_below(1), 0);
    }
}
