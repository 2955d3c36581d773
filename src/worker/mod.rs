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

mod accept;
mod handoff;
mod stop;

use accept::{accept_loop, sweep};
use handoff::{balance, receive_handoffs, reclaim};
use stop::{finish, wait_for_stop, Stop, StopSignals};

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{watch, Semaphore};

use crate::app::{LoadedApp, Loader, WorkerInfo};
use crate::http::access_log::AccessLog;
use crate::http::Shared;
use crate::listener::WorkerListener;
use crate::scoreboard::{Doorbell, Scoreboard, Slot, SlotState};

use crate::boot::{boot_dispositions, boot_failed, end_boot_dispositions, WorkerSpec, SPEC_ENV};

/// Runs an exec'd worker if this process is one; `None` otherwise.
pub(crate) fn main_if_worker(loader: &Loader) -> Option<u8> {
    let spec = std::env::var_os(SPEC_ENV)?;
    boot_dispositions();
    // The app's own child processes are not workers.
    std::env::remove_var(SPEC_ENV);
    let spec: WorkerSpec = match serde_json::from_str(&spec.to_string_lossy()) {
        Ok(spec) => spec,
        Err(e) => {
            eprintln!("zdr: error: bad {SPEC_ENV}: {e}");
            return Some(1);
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
        return Some(1);
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
            return Some(1);
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
            return Some(1);
        }
    };
    let code = run(spec, Arc::new(board), bell, None, loader);
    Some(code as u8)
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
    // command's whole tree first (see `crate::process_tree`); its orphan
    // backstop thread (see `start_heartbeat`) ends it should its runtime
    // not get to it.
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
        // `zdr serve MODULE:APP`: a Python app, imported in this worker.
        #[cfg(feature = "python")]
        None if !spec.settings.app.is_empty() => match crate::python::load(&spec) {
            Ok(app) => Arc::new(app),
            Err(e) => return boot_failed(slot, &bell, &e),
        },
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
    start_heartbeat(
        slot,
        spec.settings.timeout(),
        spec.master_pid,
        !spec.settings.command.is_empty(),
        app.silence.clone(),
    );
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
    // Draining starts from a signal: at its request limit a worker rings
    // the master, which drains it once its replacement is ready. Known
    // before the app's service is made, which may wait for it.
    let (drain_tx, drain_rx) = watch::channel(false);
    crate::app::WorkerInfo::set_draining(drain_rx.clone());
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
    let parking = tokio::spawn(crate::http::lot::Lot::run(
        Arc::clone(&shared),
        drain_rx.clone(),
    ));
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
    // Every parked connection is resumed, to be handed over or drained.
    let _ = parking.await;
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
/// heartbeat timeout, whenever the runtime gets to it. A worker so busy
/// that this task waits behind a thousand connections is still answering:
/// the master sees its requests begin and end in its slot and lets it
/// live; one whose runtime is stuck (or that is stopped) does neither, and
/// the master kills it at `--timeout`.
///
/// A command's worker (`zdr serve -- CMD`) also gets a thread, the
/// backstop of a worker whose master is gone: its master's death only
/// asks it to stop (it ends the command's whole tree first), so if it is
/// still there a few seconds after (its runtime stuck), the thread ends
/// what the worker started and the worker itself. An app's worker needs
/// none (its master's death kills it) and stays single-threaded, which
/// spares every request the C library's multi-threaded paths (cancellable
/// system calls, locked allocations).
///
/// An app that runs on a thread of its own (a Python app's event loop)
/// says how long it has been silent ([`crate::app::LoadedApp::silence`]):
/// past `--timeout`, the worker aborts itself, as Gunicorn's master aborts
/// a worker whose app hangs (the app's stack goes to the log first, where
/// the app's language can dump it).
fn start_heartbeat(
    slot: &'static Slot,
    timeout: Option<Duration>,
    master_pid: u32,
    command: bool,
    silence: Option<crate::app::Silence>,
) {
    let beat = timeout
        .map(|t| (t / 4).min(Duration::from_secs(1)))
        .unwrap_or(Duration::from_secs(1))
        .max(Duration::from_millis(50));
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(beat);
        loop {
            tick.tick().await;
            if let (Some(silence), Some(timeout)) = (&silence, timeout) {
                if let Some(silent) = silence().filter(|s| *s > timeout) {
                    tracing::error!(
                        event = crate::logging::LogEvent::WorkerTrouble.name(),
                        "worker {}: the app has not run for {:.1} s (--timeout {} s): aborting the worker",
                        std::process::id(),
                        silent.as_secs_f64(),
                        timeout.as_secs_f64()
                    );
                    std::process::abort();
                }
            }
            slot.beat();
        }
    });
    if !command {
        return;
    }
    let spawned = std::thread::Builder::new()
        .name("zdr-orphan".into())
        .spawn(move || {
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
            }
        });
    if let Err(e) = spawned {
        tracing::warn!(
            event = crate::logging::LogEvent::WorkerTrouble.name(),
            "no orphan backstop thread ({e}): a stuck worker whose master died may outlive it"
        );
    }
}

/// How long a worker whose master is gone may take to stop by itself
/// before its orphan backstop thread ends it.
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
        lot: crate::http::lot::Lot::new(board.held(spec.slot)),
    });
    Ok((shared, listeners))
}
