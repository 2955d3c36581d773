//! A worker process: boots the app, accepts on the inherited listeners,
//! serves, and drains on SIGTERM.
//!
//! A worker is started either by `exec` of the server's binary (the master
//! passes a [`WorkerSpec`] in the environment) or, with `--preload`, by
//! `fork` of the master after the app's load step. Either way the tokio
//! runtime is created here, after the fork.
//!
//! Boot: load (unless preloaded) → build the service → pass the readiness
//! check → accept → report *ready* on the scoreboard. On SIGTERM the worker
//! reports *draining*, stops accepting (the listener stays open in the
//! others, so nothing queued is lost), lets every connection finish or
//! close as described in [`crate::http`], and exits. SIGQUIT and SIGINT
//! exit at once.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::signal::unix::{signal, SignalKind};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};

use std::os::fd::AsRawFd;

use crate::app::{LoadedApp, Loader, WorkerInfo};
use crate::handoff::{Handed, Queue, SocketKind};
use crate::http::access_log::AccessLog;
use crate::http::{self, Peer, Shared};
use crate::listener::WorkerListener;
use crate::scoreboard::{Doorbell, Scoreboard, Slot, SlotState};

use crate::boot::{
    boot_dispositions, boot_failed, end_boot_dispositions, WorkerSpec, GAVE_UP, SPEC_ENV,
};

/// Runs an exec'd worker if this process is one; `None` otherwise.
pub(crate) fn main_if_worker(loader: &Loader) -> Option<ExitCode> {
    let spec = std::env::var_os(SPEC_ENV)?;
    boot_dispositions();
    // The app's own child processes are not workers.
    std::env::remove_var(SPEC_ENV);
    let spec: WorkerSpec = match serde_json::from_str(&spec.to_string_lossy()) {
        Ok(spec) => spec,
        Err(e) => {
            eprintln!("zdr: error: bad {SPEC_ENV}: {e}");
            return Some(ExitCode::FAILURE);
        }
    };
    if let Some(fd) = spec.exe_fd {
        // Kept open across the exec only so that it could be run by name.
        let _ = nix::unistd::close(fd);
    }
    // Inheritable only across the exec: whatever this worker starts (its
    // command, which `zdr serve -- CMD` starts while the app loads) gets
    // neither the listening sockets, which would keep them open after
    // zdr has closed them, nor the handoff queue. Socket mode passes the
    // listeners on by design, with descriptors of their own.
    let inherited = spec.listeners.iter().map(|l| l.fd);
    for fd in inherited.chain(spec.handoff.iter().flatten().copied()) {
        let _ = crate::sys::set_cloexec(fd, true);
    }
    crate::sys::name_after_executable();
    if let Err(e) = crate::logging::init(&spec.settings) {
        eprintln!("zdr: error: {e}");
        return Some(ExitCode::FAILURE);
    }
    // SAFETY: the master passed these descriptors in the spec for this
    // worker to own; each is adopted once.
    let board = match unsafe { Scoreboard::attach(spec.scoreboard_fd) } {
        Ok(board) => board,
        Err(e) => {
            tracing::error!(
                event = crate::logging::LogEvent::WorkerTrouble.name(),
                "worker cannot map the scoreboard: {e}"
            );
            return Some(ExitCode::FAILURE);
        }
    };
    // SAFETY: as above.
    let bell = match unsafe { Doorbell::from_inherited(spec.doorbell_fd) } {
        Ok(bell) => bell,
        Err(e) => {
            tracing::error!(
                event = crate::logging::LogEvent::WorkerTrouble.name(),
                "worker cannot open the doorbell: {e}"
            );
            return Some(ExitCode::FAILURE);
        }
    };
    let code = run(spec, Arc::new(board), bell, None, loader);
    Some(ExitCode::from(code as u8))
}

/// Runs a worker to completion and returns its exit code. `app` is the
/// preloaded app, or `None` to run the load step here.
pub(crate) fn run(
    spec: WorkerSpec,
    board: Arc<Scoreboard>,
    bell: Doorbell,
    app: Option<Arc<LoadedApp>>,
    loader: &Loader,
) -> i32 {
    // Before the app loads and before any thread exists (the runtime comes
    // later): this process is single-threaded here.
    for (key, value) in &spec.settings.raw_env {
        std::env::set_var(key, value);
    }
    let pid = std::process::id();
    WorkerInfo::set(WorkerInfo {
        pid,
        generation: spec.generation,
        master_pid: spec.master_pid,
    });
    // Every worker, forked or spawned, dies with its master from here on
    // (set after any change of credentials, which would clear it); one
    // whose master died before this point sees it and stops.
    // A command's worker gets a fast stop instead of SIGKILL, to end the
    // command's whole tree first (see `crate::process_tree`); its liveness
    // thread is the backstop should its runtime not get to it.
    let _ = nix::sys::prctl::set_pdeathsig(if spec.settings.command.is_empty() {
        nix::sys::signal::Signal::SIGKILL
    } else {
        nix::sys::signal::Signal::SIGQUIT
    });
    if nix::unistd::getppid().as_raw() as u32 != spec.master_pid {
        return 1;
    }
    // Lives as long as the process.
    let board: &'static Scoreboard = Box::leak(Box::new(board));
    let slot = board.slot(spec.slot);
    let bell = Arc::new(bell);

    if spec.settings.pass_socket && !spec.settings.command.is_empty() {
        // It serves no HTTP, so it takes no handed-over connection (one
        // leaving takes back what nobody takes), and its command must not
        // inherit the queue.
        for fd in spec.handoff.iter().flatten() {
            let _ = nix::unistd::close(*fd);
        }
        return crate::command::socket::run(&spec, slot, bell);
    }
    let app = match app {
        Some(app) => app,
        // `zdr serve -- CMD`: the command is this worker's app.
        None if !spec.settings.command.is_empty() => Arc::new(crate::command::load(&spec)),
        None => match loader() {
            Ok(app) => Arc::new(app),
            Err(e) => return boot_failed(slot, &bell, &e),
        },
    };
    // One thread: the worker's own thread runs everything (one allocator
    // arena, no hand-offs between threads). More: a pool of that many.
    let runtime = if spec.settings.threads == 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(spec.settings.threads)
            .thread_name("zdr-worker")
            .enable_all()
            .build()
    };
    let runtime = match runtime {
        Ok(rt) => rt,
        Err(e) => {
            return boot_failed(
                slot,
                &bell,
                &anyhow::anyhow!("cannot start the runtime: {e}"),
            )
        }
    };
    let code = runtime.block_on(serve(spec, board, bell, app));
    runtime.shutdown_background();
    code
}

async fn serve(
    spec: WorkerSpec,
    board: &'static Scoreboard,
    bell: Arc<Doorbell>,
    app: Arc<LoadedApp>,
) -> i32 {
    let slot = board.slot(spec.slot);
    start_heartbeat(slot, spec.settings.timeout(), spec.master_pid);
    // The worker's own handlers, from here on: a stop while it boots ends
    // the boot, and one that comes later is seen by `wait_for_stop`.
    let Some(mut signals) = StopSignals::install() else {
        return boot_failed(
            slot,
            &bell,
            &anyhow::anyhow!("cannot install signal handlers"),
        );
    };
    end_boot_dispositions();
    let (shared, listeners) = match boot(&spec, board, &bell, &app, &mut signals).await {
        Ok(booted) => booted,
        Err(end) => {
            // What the boot started (a command and its tree) ends with it.
            if let Some(stop) = &app.stop {
                stop(Duration::ZERO).await;
            }
            return match end {
                BootEnd::Stopped => 0,
                BootEnd::Failed(e) => boot_failed(slot, &bell, &e),
            };
        }
    };
    // Draining starts from a signal: at its request limit a worker rings
    // the master, which drains it once its replacement is ready.
    let (drain_tx, drain_rx) = watch::channel(false);
    crate::app::WorkerInfo::set_draining(drain_rx.clone());
    let capacity = spec.settings.worker_connections;
    let permits = Arc::new(Semaphore::new(capacity));
    let accepting: Vec<_> = listeners
        .into_iter()
        .map(|listener| {
            tokio::spawn(accept_loop(
                listener,
                Arc::clone(&shared),
                drain_rx.clone(),
                Arc::clone(&permits),
                capacity,
            ))
        })
        .collect();
    let receiving = shared.handoff.as_ref().map(|queue| {
        tokio::spawn(receive_handoffs(
            Arc::clone(queue),
            Arc::clone(&shared),
            drain_rx.clone(),
            Arc::clone(&permits),
        ))
    });
    let balancing = shared
        .handoff
        .is_some()
        .then(|| tokio::spawn(balance(Arc::clone(&shared), drain_rx.clone())));
    slot.set_state(SlotState::Ready);
    bell.ring();

    let graceful = spec.settings.graceful_timeout();
    match wait_for_stop(spec.master_pid, &shared, &mut signals).await {
        Stop::Fast => {
            return match &app.stop {
                Some(stop) => stop(Duration::ZERO).await,
                None => 0,
            }
        }
        Stop::Graceful => {}
    }
    let draining_since = tokio::time::Instant::now();
    // The slot says draining before anything drains: a sibling handing
    // over a connection reads it (see `crate::handoff`).
    slot.set_state(SlotState::Draining);
    let _ = drain_tx.send(true);
    bell.ring();
    let mut listeners = Vec::with_capacity(accepting.len());
    for task in accepting {
        if let Ok(listener) = task.await {
            listeners.push(listener);
        }
    }
    let swept = if shared.board.stopping() {
        sweep(&listeners, &shared, &drain_rx, &permits)
    } else {
        0
    };
    // This worker's copies of the listening sockets close here.
    drop(listeners);
    if let Some(task) = balancing {
        let _ = task.await;
    }
    let taken = match receiving {
        Some(task) => task.await.unwrap_or(0),
        None => 0,
    };
    let code = finish(capacity + swept + taken, &permits, graceful).await;
    let code = match &shared.handoff {
        Some(queue) => {
            let left = graceful.saturating_sub(draining_since.elapsed());
            code.max(reclaim(queue, &shared, &drain_rx, &permits, capacity, left).await)
        }
        None => code,
    };
    match &app.stop {
        Some(stop) => {
            let left = graceful.saturating_sub(draining_since.elapsed());
            code.max(stop(left).await)
        }
        None => code,
    }
}

/// Beats the worker's heartbeat on the scoreboard, several times per
/// heartbeat timeout, while the worker makes progress: a task of its own
/// beats whenever the runtime gets to it, and a thread beats for it
/// whenever requests begin or end between two looks. A worker so busy
/// that the task waits behind a thousand connections is still answering,
/// so it lives; one whose runtime is stuck (or that is stopped) does
/// neither, and the master kills it at `--timeout`.
///
/// The thread is also the backstop of a worker whose master is gone: if
/// the worker is still there a few seconds after (its runtime stuck), the
/// thread ends what the worker started and the worker itself.
fn start_heartbeat(slot: &'static Slot, timeout: Option<Duration>, master_pid: u32) {
    let beat = timeout
        .map(|t| (t / 4).min(Duration::from_secs(1)))
        .unwrap_or(Duration::from_secs(1))
        .max(Duration::from_millis(50));
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(beat);
        loop {
            tick.tick().await;
            slot.beat();
        }
    });
    // Progress seen from outside the runtime's queue.
    let progress = move || {
        let answered: u64 = slot.counters().by_class.iter().sum();
        (slot.requests(), answered)
    };
    let spawned = std::thread::Builder::new()
        .name("zdr-liveness".into())
        .spawn(move || {
            let mut last = progress();
            let mut orphaned_since = None;
            loop {
                std::thread::sleep(beat);
                if nix::unistd::getppid().as_raw() as u32 != master_pid {
                    let since = *orphaned_since.get_or_insert_with(std::time::Instant::now);
                    if since.elapsed() >= ORPHAN_BACKSTOP {
                        crate::process_tree::end(nix::sys::signal::Signal::SIGKILL, Duration::ZERO);
                        std::process::exit(1);
                    }
                }
                let now = progress();
                if now != last {
                    slot.beat();
                    last = now;
                }
            }
        });
    if let Err(e) = spawned {
        tracing::warn!(
            event = crate::logging::LogEvent::WorkerTrouble.name(),
            "no liveness thread ({e}): the heartbeat relies on the runtime alone"
        );
    }
}

/// How long a worker whose master is gone may take to stop by itself
/// before its liveness thread ends it.
const ORPHAN_BACKSTOP: Duration = Duration::from_secs(5);

/// How a boot ended early.
enum BootEnd {
    /// A stop signal came.
    Stopped,
    /// It failed, for this reason.
    Failed(anyhow::Error),
}

/// Boots: builds the service, waits for the app's readiness check, and
/// opens everything serving needs (listeners, TLS, access log). A stop
/// signal ends it at any step.
async fn boot(
    spec: &WorkerSpec,
    board: &'static Scoreboard,
    bell: &Arc<Doorbell>,
    app: &LoadedApp,
    signals: &mut StopSignals,
) -> Result<(Arc<Shared>, Vec<WorkerListener>), BootEnd> {
    let settings = &spec.settings;
    let service = tokio::select! {
        made = (app.make_service)() => made.map_err(BootEnd::Failed)?,
        _ = signals.stop() => return Err(BootEnd::Stopped),
    };
    let ready = async {
        let mut attempts = 0u32;
        while let Err(e) = (app.ready)().await {
            attempts += 1;
            if attempts == 1 || attempts % 10 == 0 {
                tracing::warn!(
                    event = crate::logging::LogEvent::WorkerTrouble.name(),
                    "worker {} not ready yet: {e:#}",
                    std::process::id()
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    };
    tokio::select! {
        _ = ready => {}
        _ = signals.stop() => return Err(BootEnd::Stopped),
    }
    let mut listeners = Vec::with_capacity(spec.listeners.len());
    for inherited in &spec.listeners {
        // SAFETY: as the scoreboard's; the spec lists each listener once.
        let listener = unsafe { WorkerListener::from_inherited(*inherited) }.map_err(|e| {
            BootEnd::Failed(anyhow::anyhow!(
                "cannot use listener fd {}: {e}",
                inherited.fd
            ))
        })?;
        listeners.push(listener);
    }
    let tls = crate::tls::acceptor(settings).map_err(BootEnd::Failed)?;
    let access_log = match &settings.accesslog {
        Some(path) => Some(
            AccessLog::open(
                path,
                &settings.access_log_format,
                settings.log_format == crate::config::LogFormat::Json,
            )
            .map_err(|e| BootEnd::Failed(e.into()))?,
        ),
        None => None,
    };
    let forwarded = crate::forwarded::AllowList::parse(&settings.forwarded_allow_ips)
        .map_err(|e| BootEnd::Failed(anyhow::anyhow!("forwarded_allow_ips: {e}")))?;
    // Only plain sockets are handed over (a TLS session lives in the
    // process that made it); a worker serving TLS takes them too, and
    // serves them plain, as they came.
    let handoff = match spec.handoff {
        // SAFETY: the spec names the server's queue, inherited (or forked)
        // for this worker alone to use.
        Some(fds) => match unsafe { crate::handoff::Queue::from_inherited(fds) } {
            Ok(queue) => Some(Arc::new(queue)),
            Err(e) => {
                tracing::warn!(
                    event = crate::logging::LogEvent::WorkerTrouble.name(),
                    "no connection handoff: {e}"
                );
                None
            }
        },
        None => None,
    };
    let limit_bell = Arc::clone(bell);
    let slot = board.slot(spec.slot);
    let shared = Arc::new(Shared {
        service,
        builders: Shared::builders(settings),
        keepalive: settings.keepalive(),
        access_log,
        board,
        slot_index: spec.slot,
        slot,
        // Named only for the account of a kill at --timeout: with no
        // timeout, no request pays for it.
        begun: settings.timeout().and_then(|_| board.begun(spec.slot)),
        client_info: app.client_info,
        request_limit: spec.request_limit,
        on_limit: Box::new(move || limit_bell.ring()),
        limits: crate::http::Limits {
            line: settings.limit_request_line,
            field_size: settings.limit_request_field_size,
            fields: settings.limit_request_fields,
            body: settings.limit_request_body.map(|b| b.0),
        },
        tls,
        header_timeout: settings.header_timeout(),
        max_age: (settings.max_connection_age > 0.0).then(|| crate::http::MaxAge {
            age: Duration::from_secs_f64(settings.max_connection_age),
            jitter: Duration::from_secs_f64(settings.max_connection_age_jitter),
            grace: Duration::from_secs_f64(settings.max_connection_age_grace),
        }),
        body_timeout: settings.body_timeout(),
        send_timeout: settings.send_timeout(),
        request_timeout: settings.request_timeout(),
        shed: settings
            .max_queue_time()
            .map(crate::http::shed::Shedder::new),
        forwarded,
        probes: crate::http::Probes {
            live: settings.health_live_path.clone(),
            ready: settings.health_ready_path.clone(),
            startup: settings.health_startup_path.clone(),
        },
        ready: Arc::clone(&app.ready),
        handoff,
        placement: crate::http::placement::Placement::default(),
    });
    Ok((shared, listeners))
}

/// How long the first connection in the handoff queue may stay first
/// before a worker that is leaving takes the queue back: a ready worker
/// takes one within microseconds, and one a busy machine holds back for a
/// while should still get it.
const RECLAIM_AFTER: Duration = Duration::from_secs(1);

/// How often a leaving worker with nothing left to serve looks at the
/// queue at first, while it waits for it to empty: ready workers take a
/// handed connection within a millisecond or two, and a worker that
/// lingers holds up the next recycling (one at a time, server-wide). The
/// runtime's timers tick in milliseconds, so these waits block its thread,
/// which has nothing else to run.
const QUICK_LOOK: Duration = Duration::from_micros(200);

/// How many quick looks before the leaving worker looks every
/// [`RECLAIM_LOOK`] instead.
const QUICK_LOOKS: u32 = 50;

/// How often a leaving worker looks at the queue after its quick looks,
/// or while it still serves connections.
const RECLAIM_LOOK: Duration = Duration::from_millis(10);

/// Once its own connections are done, a leaving worker takes back what is
/// still queued if nobody takes it (the ready workers may all be ones that
/// serve no HTTP themselves, as in socket mode, or all at their cap), and
/// serves it as a draining worker does, not handing it on: no connection
/// is left waiting in the queue. While the ready workers take (the first
/// in the queue changes), it leaves the queue to them: what it took back
/// would stay with a worker that is leaving, and a client that asks only
/// after its graceful timeout would find it closed. Returns the exit code
/// of that wait.
async fn reclaim(
    queue: &Queue,
    shared: &Arc<Shared>,
    drain: &watch::Receiver<bool>,
    permits: &Arc<Semaphore>,
    capacity: usize,
    left: Duration,
) -> i32 {
    let mut extra = 0;
    let deadline = tokio::time::Instant::now() + left;
    // The first connection queued, and since when it has been first.
    let mut first = None;
    let mut since = tokio::time::Instant::now();
    let mut quick = 0;
    loop {
        let now = tokio::time::Instant::now();
        let head = queue.head();
        if head.is_none() || now >= deadline {
            break;
        }
        if head != first {
            first = head;
            since = now;
        } else if now - since >= RECLAIM_AFTER {
            // Nobody took anything for a while: nobody will.
            while let Ok(Some(h)) = queue.try_recv() {
                extra += serve_handed(h, shared, drain, permits, Taken::Back);
            }
            first = None;
            continue;
        }
        if quick < QUICK_LOOKS && extra == 0 && permits.available_permits() >= capacity {
            quick += 1;
            std::thread::sleep(QUICK_LOOK);
        } else {
            tokio::time::sleep_until((now + RECLAIM_LOOK).min(deadline)).await;
        }
    }
    if extra == 0 && permits.available_permits() >= capacity {
        return 0;
    }
    finish(
        capacity + extra,
        permits,
        deadline.saturating_duration_since(tokio::time::Instant::now()),
    )
    .await
}

/// Waits, up to the graceful timeout, for every connection to close (all
/// `capacity` permits back); returns the worker's exit code.
async fn finish(capacity: usize, permits: &Semaphore, graceful: Duration) -> i32 {
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

enum Stop {
    Graceful,
    Fast,
}

/// The signals a worker acts on itself.
struct StopSignals {
    term: tokio::signal::unix::Signal,
    quit: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    usr1: tokio::signal::unix::Signal,
}

impl StopSignals {
    fn install() -> Option<StopSignals> {
        Some(StopSignals {
            term: signal(SignalKind::terminate()).ok()?,
            quit: signal(SignalKind::quit()).ok()?,
            int: signal(SignalKind::interrupt()).ok()?,
            usr1: signal(SignalKind::user_defined1()).ok()?,
        })
    }

    /// Any stop at all.
    async fn stop(&mut self) {
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.quit.recv() => {}
            _ = self.int.recv() => {}
        }
    }
}

async fn wait_for_stop(master_pid: u32, shared: &Shared, signals: &mut StopSignals) -> Stop {
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

/// How long, and how many times at most, a worker over its share of
/// connections waits before accepting anyway.
const BALANCE_WAIT: Duration = Duration::from_micros(250);
const BALANCE_WAITS: u32 = 20;

/// Accepts on one listener until the worker drains; returns the listener.
async fn accept_loop(
    listener: WorkerListener,
    shared: Arc<Shared>,
    mut drain: watch::Receiver<bool>,
    permits: Arc<Semaphore>,
    capacity: usize,
) -> WorkerListener {
    accept_until_drained(&listener, &shared, &mut drain, &permits, capacity).await;
    listener
}

/// Accepts connections until the worker drains.
async fn accept_until_drained(
    listener: &WorkerListener,
    shared: &Arc<Shared>,
    drain: &mut watch::Receiver<bool>,
    permits: &Arc<Semaphore>,
    capacity: usize,
) {
    let mut backoff = Backoff::default();
    loop {
        // At the cap, a look at the queue every moment: clients waiting
        // there, with no ready sibling below the cap to accept them, make
        // the worker crowded (see `http::placement`).
        // Below the cap, a permit is taken at once: no timer, no clock read
        // on the accept path.
        let permit = match Arc::clone(permits).try_acquire_owned() {
            Ok(p) => p,
            Err(tokio::sync::TryAcquireError::Closed) => return,
            Err(tokio::sync::TryAcquireError::NoPermits) => loop {
                tokio::select! {
                    biased;
                    _ = drain.wait_for(|d| *d) => return,
                    p = Arc::clone(permits).acquire_owned() => break match p {
                        Ok(p) => p,
                        Err(_) => return,
                    },
                    _ = tokio::time::sleep(crate::http::placement::CHECK) => {
                        shared.placement.looked(
                            listener.has_waiting()
                                && !shared.board.ready_sibling_below(shared.slot_index, capacity),
                        );
                    }
                }
            },
        };
        if shared.placement.is_crowded() && permits.available_permits() > 0 {
            // Room again (with the permit just taken, and more).
            shared.placement.looked(false);
        }
        if !wait_for_share(shared, drain).await {
            return;
        }
        let accepted = tokio::select! {
            biased;
            _ = drain.wait_for(|d| *d) => return,
            a = accept(listener) => a,
        };
        match accepted {
            Ok((stream, peer)) => {
                start_serving(stream, peer, permit, shared, drain, accepted_now())
            }
            Err(e) if is_transient(&e) => {}
            // Out of descriptors or memory: the other workers take the queue.
            Err(e) => backoff.after(format!("accept failed: {e}")).await,
        }
    }
}

/// Holding more than its share of the server's connections, a worker
/// gives the others a moment to take the next one (accepted or handed
/// over): processes sharing one queue otherwise pile work on whichever is
/// busiest. Returns false if the worker started draining meanwhile.
///
/// An overloaded worker does not wait: its runtime is busy, so a moment's
/// timer would last until its current request is done, while the clients
/// it takes are the ones it answers first (see [`http::shed`]).
async fn wait_for_share(shared: &Shared, drain: &mut watch::Receiver<bool>) -> bool {
    if shared.shed.as_ref().is_some_and(|s| s.overloaded()) {
        return true;
    }
    for _ in 0..BALANCE_WAITS {
        if !shared.board.over_share(shared.slot_index) {
            break;
        }
        tokio::select! {
            biased;
            _ = drain.wait_for(|d| *d) => return false,
            _ = tokio::time::sleep(BALANCE_WAIT) => {}
        }
    }
    true
}

/// Backing off after a failure that retrying at once would only repeat (out
/// of descriptors or memory): a pause, and an error said once every ten
/// seconds at most.
#[derive(Default)]
struct Backoff {
    last_said: Option<std::time::Instant>,
}

impl Backoff {
    /// Says `what` (unless said lately) and returns the pause to await.
    fn after(&mut self, what: String) -> tokio::time::Sleep {
        if self
            .last_said
            .is_none_or(|t| t.elapsed() >= Duration::from_secs(10))
        {
            tracing::error!(
                event = crate::logging::LogEvent::WorkerTrouble.name(),
                "worker {}: {what}; retrying every 100 ms",
                std::process::id()
            );
            self.last_said = Some(std::time::Instant::now());
        }
        tokio::time::sleep(Duration::from_millis(100))
    }
}

/// The origin of a connection accepted now.
fn accepted_now() -> http::Origin {
    http::Origin::Accepted {
        at_ns: crate::sys::monotonic_ns(),
    }
}

/// Serves a connection in a task of its own.
fn start_serving(
    stream: Stream,
    peer: Peer,
    permit: OwnedSemaphorePermit,
    shared: &Arc<Shared>,
    drain: &watch::Receiver<bool>,
    origin: http::Origin,
) {
    let (shared, drain) = (Arc::clone(shared), drain.clone());
    // Counted now, not in the task, so that the share check before the
    // next accept sees it.
    let seat = (shared.board, shared.slot_index);
    let send_timeout = shared.send_timeout;
    if let Some(shed) = &shared.shed {
        shed.accepted();
    }
    match stream {
        Stream::Tcp(s) => {
            let io = Tracked::new(s, permit, seat, send_timeout);
            tokio::spawn(serve_maybe_tls(io, peer, shared, drain, origin));
        }
        Stream::Unix(s) => {
            let io = Tracked::new(s, permit, seat, send_timeout);
            tokio::spawn(serve_maybe_tls(io, peer, shared, drain, origin));
        }
    }
}

/// A permit for a connection a draining worker takes whatever its cap (it
/// accepts nothing more): a free one, or one added past the cap. Returns it
/// (`None` if another task took the added one first) with how many permits
/// were added, which the worker's last wait must count (0 or 1).
fn permit_past_cap(permits: &Arc<Semaphore>) -> (Option<OwnedSemaphorePermit>, usize) {
    if let Ok(permit) = Arc::clone(permits).try_acquire_owned() {
        return (Some(permit), 0);
    }
    permits.add_permits(1);
    (Arc::clone(permits).try_acquire_owned().ok(), 1)
}

/// When the whole server stops, the master has closed its copies of the
/// listening sockets; each worker takes what is already queued before it
/// closes its own. Once the last copy is closed, new connections are
/// refused at once, and none that was queued is dropped. (On a reload the
/// next generation takes the queue instead.) Connections taken past the
/// worker's cap get permits of their own; returns how many.
fn sweep(
    listeners: &[WorkerListener],
    shared: &Arc<Shared>,
    drain: &watch::Receiver<bool>,
    permits: &Arc<Semaphore>,
) -> usize {
    use futures_util::FutureExt;
    let mut extra = 0;
    for listener in listeners {
        loop {
            match accept(listener).now_or_never() {
                Some(Ok((stream, peer))) => {
                    let (permit, added) = permit_past_cap(permits);
                    extra += added;
                    let Some(permit) = permit else {
                        break;
                    };
                    start_serving(stream, peer, permit, shared, drain, accepted_now());
                }
                Some(Err(e)) if is_transient(&e) => {}
                // Nothing queued (or no descriptor left to take it with).
                _ => break,
            }
        }
    }
    extra
}

/// Serves a connection, after the TLS handshake when serving HTTPS. The
/// handshake runs in the connection's task, bounded by the header timeout.
async fn serve_maybe_tls<I>(
    io: I,
    mut peer: Peer,
    shared: Arc<Shared>,
    drain: watch::Receiver<bool>,
    origin: http::Origin,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + http::Passable + 'static,
{
    if let Some(shed) = &shared.shed {
        shed.reading();
    }
    let acceptor = match (&shared.tls, &origin) {
        (Some(acceptor), http::Origin::Accepted { .. }) => acceptor.clone(),
        _ => return http::serve(io, peer, shared, drain, origin).await,
    };
    // Boxed: a plain connection's task is not sized for TLS's state (its
    // handshake and its stream), which every idle connection would carry.
    Box::pin(async move {
        match tokio::time::timeout(shared.header_timeout, acceptor.accept(io)).await {
            Ok(Ok(stream)) => {
                peer.scheme = "https";
                http::serve(stream, peer, shared, drain, origin).await
            }
            Ok(Err(e)) => tracing::debug!("TLS handshake failed: {e}"),
            Err(_) => tracing::debug!("TLS handshake timed out"),
        }
    })
    .await
}

/// A connection's socket, carrying its share of the worker's connection
/// cap and its count on the scoreboard. Both are given back when the socket
/// is dropped, which for an upgraded connection (WebSocket) is when the app
/// is done with it, not when hyper hands it over: a draining worker waits
/// for it, up to the graceful timeout.
///
/// It closes with a lingering close: once the response is out it shuts
/// its sending side, then reads and drops whatever the client still sends
/// until the client closes too (or is silent for [`LINGER`], or
/// [`LINGER_MAX`] passes), so that unread
/// request bytes never turn the close into a reset that could destroy the
/// response on its way.
struct Tracked<I> {
    io: I,
    _permit: OwnedSemaphorePermit,
    seat: (&'static Scoreboard, usize),
    /// Set once the sending side is shut: when the lingering close began,
    /// and when it ends unless the client sends more.
    linger: Option<(tokio::time::Instant, Pin<Box<tokio::time::Sleep>>)>,
    /// How long a write may wait for the client to take more (the send
    /// timeout).
    send_stall: Option<crate::stall::Stall>,
}

/// How long a closing connection waits for more from its client (nginx's
/// `lingering_timeout`), and for its client to close at all
/// (`lingering_time`).
const LINGER: Duration = Duration::from_secs(2);
const LINGER_MAX: Duration = Duration::from_secs(30);

impl<I> Tracked<I> {
    fn new(
        io: I,
        permit: OwnedSemaphorePermit,
        seat: (&'static Scoreboard, usize),
        send_timeout: Option<Duration>,
    ) -> Tracked<I> {
        seat.0.add_connections(seat.1, 1);
        Tracked {
            io,
            _permit: permit,
            seat,
            linger: None,
            send_stall: send_timeout.map(crate::stall::Stall::new),
        }
    }

    /// A write's outcome, held to the send timeout: a client that takes
    /// nothing for that long has its connection closed.
    fn within_send_timeout<T>(
        &mut self,
        cx: &mut Context<'_>,
        poll: Poll<std::io::Result<T>>,
    ) -> Poll<std::io::Result<T>> {
        let Some(stall) = &mut self.send_stall else {
            return poll;
        };
        if poll.is_ready() {
            stall.progress();
            return poll;
        }
        if !stall.expired(cx) {
            return Poll::Pending;
        }
        self.seat
            .0
            .count_timeout(crate::metrics::ClientTimeout::Send);
        Poll::Ready(Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "the client took nothing for the send timeout",
        )))
    }
}

impl<I> Drop for Tracked<I> {
    fn drop(&mut self) {
        self.seat.0.add_connections(self.seat.1, -1);
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for Tracked<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<I: AsyncRead + AsyncWrite + Unpin> AsyncWrite for Tracked<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let poll = Pin::new(&mut self.io).poll_write(cx, buf);
        self.within_send_timeout(cx, poll)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let poll = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.within_send_timeout(cx, poll)
    }
    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let poll = Pin::new(&mut self.io).poll_flush(cx);
        self.within_send_timeout(cx, poll)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        let (began, until) = match &mut this.linger {
            Some((began, until)) => (*began, until),
            None => {
                std::task::ready!(Pin::new(&mut this.io).poll_shutdown(cx))?;
                let now = tokio::time::Instant::now();
                let (_, until) = this
                    .linger
                    .insert((now, Box::pin(tokio::time::sleep(LINGER))));
                (now, until)
            }
        };
        let mut scratch = [0u8; 2048];
        loop {
            if std::future::Future::poll(until.as_mut(), cx).is_ready() {
                return Poll::Ready(Ok(()));
            }
            let mut buf = ReadBuf::new(&mut scratch);
            match Pin::new(&mut this.io).poll_read(cx, &mut buf) {
                Poll::Ready(Ok(())) if !buf.filled().is_empty() => {
                    // More from the client: wait for the rest, within bounds.
                    let next = tokio::time::Instant::now() + LINGER;
                    until.as_mut().reset(next.min(began + LINGER_MAX));
                }
                // The client closed (or failed): nothing is left to reset.
                Poll::Ready(_) => return Poll::Ready(Ok(())),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

enum Stream {
    Tcp(tokio::net::TcpStream),
    Unix(tokio::net::UnixStream),
}

impl http::Passable for Tracked<tokio::net::TcpStream> {
    fn passable(&self) -> Option<(std::os::fd::RawFd, SocketKind)> {
        Some((self.io.as_raw_fd(), SocketKind::Tcp))
    }
}

impl http::Passable for Tracked<tokio::net::UnixStream> {
    fn passable(&self) -> Option<(std::os::fd::RawFd, SocketKind)> {
        Some((self.io.as_raw_fd(), SocketKind::Unix))
    }
}

impl<I> http::Passable for tokio_rustls::server::TlsStream<I> {}

/// Takes the connections leaving siblings hand over until this worker
/// drains; then, once no sibling is midway through handing one over,
/// takes what is still queued (see [`crate::handoff`]). Returns how many
/// permits it added past the worker's cap.
async fn receive_handoffs(
    queue: Arc<Queue>,
    shared: Arc<Shared>,
    mut drain: watch::Receiver<bool>,
    permits: Arc<Semaphore>,
) -> usize {
    let mut extra = 0;
    let mut backoff = Backoff::default();
    loop {
        let ready = tokio::select! {
            biased;
            _ = drain.wait_for(|d| *d) => break,
            r = queue.readable() => r,
        };
        // Within the worker's connection cap, as for an accept (and only
        // once a connection waits, so that no permit is parked here): at
        // the cap, handed connections wait in the queue for another worker.
        let taken = match ready {
            Ok(()) => {
                let defer = if shared.board.any_draining() {
                    // A leaving worker's connections: taken at once.
                    None
                } else if shared.placement.giving() {
                    Some(GIVER_DEFERS)
                } else {
                    match shared.placement.rank() {
                        0 => None,
                        rank => Some(RANK_DEFERS * rank.min(10) as u32),
                    }
                };
                if let Some(defer) = defer {
                    // Leaves it a moment to a sibling less loaded.
                    tokio::select! {
                        biased;
                        _ = drain.wait_for(|d| *d) => break,
                        _ = tokio::time::sleep(defer) => {}
                    }
                    if queue.is_empty() {
                        // A sibling took it.
                        queue.settle();
                        continue;
                    }
                }
                if !wait_for_share(&shared, &mut drain).await {
                    break;
                }
                let permit = tokio::select! {
                    biased;
                    _ = drain.wait_for(|d| *d) => break,
                    p = Arc::clone(&permits).acquire_owned() => match p {
                        Ok(p) => p,
                        Err(_) => break,
                    },
                };
                queue.take().map(|h| h.map(|h| (h, permit)))
            }
            Err(e) => Err(e),
        };
        match taken {
            Ok(Some((h, permit))) => {
                extra += serve_handed(h, &shared, &drain, &permits, Some(permit));
            }
            // Another worker took it.
            Ok(None) => {}
            Err(e) => {
                backoff
                    .after(format!("cannot take a handed-over connection: {e}"))
                    .await
            }
        }
    }
    // The slot said draining before the drain signal; the fence orders that
    // before the count is read.
    std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
    let deadline = tokio::time::Instant::now() + HANDOFF_SETTLE;
    while shared.board.handoffs_in_progress() > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    while let Ok(Some(h)) = queue.try_recv() {
        extra += serve_handed(h, &shared, &drain, &permits, None);
    }
    extra
}

/// Weighs this worker's load against its ready siblings' once a
/// [`crate::balance::TICK`] and asks its connections to move when it
/// carries more than its share (see [`crate::balance`]), until it drains.
async fn balance(shared: Arc<Shared>, mut drain: watch::Receiver<bool>) {
    let mut balancer = crate::balance::Balancer::default();
    let mut tick = tokio::time::interval(crate::balance::TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last = tokio::time::Instant::now();
    loop {
        tokio::select! {
            biased;
            _ = drain.wait_for(|d| *d) => break,
            _ = tick.tick() => {}
        }
        let now = tokio::time::Instant::now();
        if shared.board.any_draining() {
            // A worker is leaving: its connections come first, taken by
            // whoever is quickest, and the rates are not this one's to
            // judge by. Balance starts over once it has gone.
            balancer = crate::balance::Balancer::default();
            shared.placement.set_rank(0);
            shared.placement.give(0.0, 0.0);
            last = now;
            continue;
        }
        let give = balancer.tick(
            shared.slot_index,
            &shared.board.ready_samples(),
            now - last,
            shared.slot.connections() as usize,
        );
        last = now;
        if give > 0.0 {
            tracing::debug!(
                "worker {}: {give:.0} requests a second above the mean; asking connections to move",
                std::process::id()
            );
        }
        shared.placement.set_rank(balancer.rank());
        shared.placement.give(give, balancer.room());
    }
    shared.placement.set_rank(0);
    shared.placement.give(0.0, 0.0);
}

/// How long a worker that gives connections away for balance leaves a
/// handed-over one in the queue for a sibling before it takes it itself
/// (should every other ready worker be giving too, or serve no HTTP).
const GIVER_DEFERS: Duration = Duration::from_millis(100);

/// How long a worker leaves a handed-over connection in the queue for
/// each ready sibling less loaded than itself (see [`crate::balance`]).
const RANK_DEFERS: Duration = Duration::from_millis(10);

/// The longest a draining worker waits for siblings midway through a
/// handoff (each takes microseconds; a sibling stopped meanwhile by the
/// machine does not hold it).
const HANDOFF_SETTLE: Duration = Duration::from_secs(1);

/// How a handed-over connection comes to this worker.
enum Taken {
    /// Within its cap, with this permit.
    Within(OwnedSemaphorePermit),
    /// Past its cap if need be (a draining worker's last look at the
    /// queue: it accepts nothing more); it may still hand it on.
    Draining,
    /// Taken back once its own connections were done, because nobody else
    /// took it: served here to its end, not handed on.
    Back,
}

impl From<Option<OwnedSemaphorePermit>> for Taken {
    fn from(permit: Option<OwnedSemaphorePermit>) -> Taken {
        permit.map_or(Taken::Draining, Taken::Within)
    }
}

/// Serves a connection another worker handed over; returns 1 if it took a
/// permit past the worker's cap.
fn serve_handed(
    handed: Handed,
    shared: &Arc<Shared>,
    drain: &watch::Receiver<bool>,
    permits: &Arc<Semaphore>,
    taken: impl Into<Taken>,
) -> usize {
    let taken = taken.into();
    let hand_on = !matches!(taken, Taken::Back);
    let (permit, extra) = match taken {
        Taken::Within(permit) => (permit, 0),
        Taken::Draining | Taken::Back => match permit_past_cap(permits) {
            (Some(permit), added) => (permit, added),
            (None, added) => return added,
        },
    };
    let stream = match handed.kind {
        SocketKind::Tcp => {
            let std = std::net::TcpStream::from(handed.socket);
            let ip = std.peer_addr().ok().map(|a| a.ip());
            std.set_nonblocking(true)
                .and_then(|()| tokio::net::TcpStream::from_std(std))
                .map(|s| (Stream::Tcp(s), ip))
        }
        SocketKind::Unix => {
            let std = std::os::unix::net::UnixStream::from(handed.socket);
            std.set_nonblocking(true)
                .and_then(|()| tokio::net::UnixStream::from_std(std))
                .map(|s| (Stream::Unix(s), None))
        }
    };
    match stream {
        Ok((stream, ip)) => start_serving(
            stream,
            Peer { ip, scheme: "http" },
            permit,
            shared,
            drain,
            http::Origin::Handed {
                carried: handed.carried,
                age: handed.age,
                hand_on,
            },
        ),
        Err(e) => tracing::debug!("cannot serve a handed-over connection: {e}"),
    }
    extra
}

async fn accept(listener: &WorkerListener) -> std::io::Result<(Stream, Peer)> {
    match listener {
        WorkerListener::Tcp(l) => {
            let (s, addr) = l.accept().await?;
            let _ = s.set_nodelay(true);
            Ok((
                Stream::Tcp(s),
                Peer {
                    ip: Some(addr.ip()),
                    scheme: "http",
                },
            ))
        }
        WorkerListener::Unix(l) => {
            let (s, _) = l.accept().await?;
            Ok((
                Stream::Unix(s),
                Peer {
                    ip: None,
                    scheme: "http",
                },
            ))
        }
    }
}

fn is_transient(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        ConnectionAborted | ConnectionReset | Interrupted | WouldBlock
    ) || e.raw_os_error() == Some(nix::libc::EPROTO)
}
