//! Python apps served in-process (`zdr serve MODULE:APP`, the `python`
//! feature): an ASGI app (or a WSGI one, run in a pool of `--threads`
//! threads) called from zdr's own HTTP layer, with no second parser and no
//! loopback hop.
//!
//! A worker runs the app on a thread of its own, `zdr-python`, which holds
//! the interpreter and runs an asyncio event loop (uvloop's when it is
//! installed). The runtime thread, which serves HTTP, never takes the
//! GIL: it queues work in the [`Bridge`] and wakes the loop through an
//! eventfd; the loop's thread answers through each request's
//! [`call::CallState`], whose waker wakes the runtime. So a slow app never
//! blocks the runtime, and the runtime never waits for Python.
//!
//! | event | runtime thread | Python thread |
//! |---|---|---|
//! | worker boots | starts the thread, waits | imports the app, runs lifespan `startup` |
//! | request | queues a call (and forwards its body) | `app(scope, receive, send)` |
//! | the app sends | takes the head, streams the body | `send` stores it, wakes the runtime |
//! | client gone | marks the call disconnected | `receive` says `http.disconnect` |
//! | worker drained | queues the shutdown, waits | lifespan `shutdown`, the loop stops |
//!
//! With `--preload`, the app is imported once per generation by a loader
//! process that forks the generation's workers ([`preload`]); each worker
//! then starts its Python thread with the app it inherited.
//!
//! When the worker ends, what the app registered with `atexit` runs; the
//! interpreter itself is not finalised.

mod call;
pub(crate) mod preload;

use std::ffi::CString;
use std::os::fd::{AsFd, AsRawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::eventfd::{EfdFlags, EventFd};
use pyo3::prelude::*;
use pyo3::types::{PyList, PyTuple};

use crate::app::{BoxFuture, LoadedApp};
use crate::boot::WorkerSpec;

/// zdr's half of the ASGI protocol, in Python (run in the app's thread).
const GLUE: &str = include_str!("glue.py");

/// What [`Bridge::post`] queues for the Python thread (the kinds `glue.py`
/// reads).
enum Wake {
    /// A new request.
    New(Arc<call::CallState>),
    /// A call the app waits on may go on (body bytes came, room was made,
    /// the client left).
    Resume(Arc<call::CallState>),
    /// The worker has drained: run lifespan `shutdown`, then stop.
    Shutdown(Arc<Done>),
    /// The worker has started draining (`zdr.worker.wait_draining()`
    /// resolves).
    Draining,
}

/// The queue between the runtime thread and the Python thread.
pub(crate) struct Bridge {
    queue: Mutex<Vec<Wake>>,
    /// Written when the queue stops being empty; the event loop reads it.
    wake: EventFd,
    /// The Python thread still runs its loop.
    alive: AtomicBool,
    /// When the event loop last ran its ticker ([`crate::sys::monotonic_ns`]);
    /// 0 before it first did.
    ticked_ns: AtomicU64,
    /// The app's requests run in threads (WSGI) that take new calls from
    /// `calls` themselves, not through the event loop.
    threaded: AtomicBool,
    calls: Mutex<std::collections::VecDeque<Arc<call::CallState>>>,
    /// Notified when a call is queued in `calls`, or when they close.
    called: std::sync::Condvar,
    /// No more calls: the threads waiting in `calls` end.
    closed: AtomicBool,
    /// The worker drains (a reload, a stop, its request limit).
    draining: AtomicBool,
    /// Sheds calls that waited too long in this queue (`--max-queue-time`).
    shed: Option<crate::http::shed::Shedder>,
}

impl Bridge {
    /// Whether `call`, taken by the app's side now, is shed for having
    /// waited too long in the queue: then the runtime answers it 503, and
    /// the app never sees it.
    fn shed_if_late(&self, call: &Arc<call::CallState>) -> bool {
        let now = crate::sys::monotonic_ns();
        call.taken(now);
        let Some(shedder) = &self.shed else {
            return false;
        };
        let waited = now.saturating_sub(call.queued_ns());
        if !shedder.decide_taken(now, waited) {
            return false;
        }
        call.shed(waited);
        true
    }

    /// Queues `wake` for the Python thread, waking it if the queue was
    /// empty.
    fn post(&self, wake: Wake) {
        let wake = match wake {
            Wake::New(call) if self.threaded.load(Ordering::Relaxed) => {
                if let Ok(mut calls) = self.calls.lock() {
                    calls.push_back(call);
                }
                self.called.notify_one();
                return;
            }
            other => other,
        };
        let first = match self.queue.lock() {
            Ok(mut queue) => {
                queue.push(wake);
                queue.len() == 1
            }
            Err(_) => return,
        };
        if first {
            let _ = nix::unistd::write(self.wake.as_fd(), &1u64.to_ne_bytes());
        }
    }
}

/// The queue as the Python thread sees it.
#[pyclass(frozen)]
struct Inbox(Arc<Bridge>);

#[pymethods]
impl Inbox {
    /// From now on, new calls are taken by threads with [`Inbox::next_call`].
    fn serve_in_threads(&self) {
        self.0.threaded.store(true, Ordering::Relaxed);
    }

    /// The next new call, waited for without the GIL; `None` once the
    /// worker stops.
    fn next_call(&self, py: Python<'_>) -> Option<call::Call> {
        let bridge = &self.0;
        py.allow_threads(|| {
            let mut calls = bridge.calls.lock().ok()?;
            loop {
                if let Some(call) = calls.pop_front() {
                    if bridge.shed_if_late(&call) {
                        continue;
                    }
                    return Some(call::Call::new(call));
                }
                if bridge.closed.load(Ordering::Relaxed) {
                    return None;
                }
                calls = bridge.called.wait(calls).ok()?;
            }
        })
    }

    /// Whether the worker drains.
    fn draining(&self) -> bool {
        self.0.draining.load(Ordering::Relaxed)
    }

    /// The event loop runs (called by its ticker).
    fn tick(&self) {
        self.0
            .ticked_ns
            .store(crate::sys::monotonic_ns(), Ordering::Relaxed);
    }

    /// Everything queued since the last take, as `(kind, object)` pairs.
    fn take<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let taken = match self.0.queue.lock() {
            Ok(mut queue) => std::mem::take(&mut *queue),
            Err(_) => Vec::new(),
        };
        let list = PyList::empty(py);
        for wake in taken {
            let (kind, object): (u8, Bound<'py, PyAny>) = match wake {
                Wake::New(c) if self.0.shed_if_late(&c) => continue,
                Wake::New(c) => (0, call::Call::new(c).into_pyobject(py)?.into_any()),
                Wake::Resume(c) => (1, call::Call::new(c).into_pyobject(py)?.into_any()),
                Wake::Shutdown(d) => (2, DoneRef(d).into_pyobject(py)?.into_any()),
                Wake::Draining => (3, py.None().into_bound(py)),
            };
            let kind = kind.into_pyobject(py)?.into_any();
            list.append(PyTuple::new(py, [kind, object])?)?;
        }
        Ok(list)
    }
}

/// The end of the lifespan's shutdown, as the runtime waits for it.
struct Done {
    seconds: f64,
    tx: Mutex<Option<tokio::sync::oneshot::Sender<()>>>,
}

/// [`Done`] as the Python thread sees it.
#[pyclass(frozen)]
struct DoneRef(Arc<Done>);

#[pymethods]
impl DoneRef {
    /// How long the shutdown may take.
    fn seconds(&self) -> f64 {
        self.0.seconds
    }

    /// The shutdown has ended.
    fn set(&self) {
        if let Some(tx) = self.0.tx.lock().ok().and_then(|mut t| t.take()) {
            let _ = tx.send(());
        }
    }
}

/// Where a worker's app comes from.
pub(crate) enum Source {
    /// `MODULE:APP`, imported by the worker's Python thread.
    Import(String),
    /// Imported before the fork, by the generation's loader (`--preload`),
    /// with zdr's glue module.
    Preloaded { app: Py<PyAny>, glue: Py<PyModule> },
}

/// The worker's app: `MODULE:APP`, imported in this worker.
pub(crate) fn load(spec: &WorkerSpec) -> anyhow::Result<LoadedApp> {
    load_from(spec, Source::Import(spec.settings.app.clone()))
}

/// The worker's app, from `source`.
pub(crate) fn load_from(spec: &WorkerSpec, source: Source) -> anyhow::Result<LoadedApp> {
    let name = spec.settings.app.clone();
    let source = Arc::new(Mutex::new(Some(source)));
    // What the app reads from `os.environ`: `raw_env` and the worker's
    // identity (an interpreter that was running before the worker set
    // them, as the wheel's or a loader's, has not seen them).
    let mut env = spec.settings.raw_env.clone();
    env.extend([
        ("ZDR_WORKER_ID".to_owned(), spec.slot.to_string()),
        ("ZDR_GENERATION".to_owned(), spec.generation.to_string()),
        ("ZDR_MASTER_PID".to_owned(), spec.master_pid.to_string()),
    ]);
    // The worker's identity, as a command's worker gives its command (the
    // worker is still single-threaded here).
    for (key, value) in [
        ("ZDR_WORKER_ID", spec.slot.to_string()),
        ("ZDR_GENERATION", spec.generation.to_string()),
        ("ZDR_MASTER_PID", spec.master_pid.to_string()),
    ] {
        std::env::set_var(key, value);
    }
    let wake = EventFd::from_value_and_flags(0, EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)?;
    let bridge = Arc::new(Bridge {
        queue: Mutex::new(Vec::new()),
        wake,
        alive: AtomicBool::new(false),
        ticked_ns: AtomicU64::new(0),
        threaded: AtomicBool::new(false),
        calls: Mutex::new(std::collections::VecDeque::new()),
        called: std::sync::Condvar::new(),
        closed: AtomicBool::new(false),
        draining: AtomicBool::new(false),
        shed: spec
            .settings
            .max_queue_time()
            .map(crate::http::shed::Shedder::new),
    });
    let (started, alive, stopped, ticking) = (
        Arc::clone(&bridge),
        Arc::clone(&bridge),
        Arc::clone(&bridge),
        Arc::clone(&bridge),
    );
    // The loop's ticker runs a few times per --timeout.
    // A WSGI app's requests run in a pool of `--threads` threads (as
    // Gunicorn's gthread worker's).
    let threads = spec.settings.threads.max(1);
    let interface = match spec.settings.interface {
        crate::config::Interface::Auto => "auto",
        crate::config::Interface::Asgi => "asgi",
        crate::config::Interface::Wsgi => "wsgi",
    };
    let tick_every = spec
        .settings
        .timeout()
        .map_or(1.0, |t| (t.as_secs_f64() / 4.0).clamp(0.05, 1.0));
    Ok(LoadedApp {
        // The scope's `client` and `scheme`.
        client_info: true,
        make_service: Box::new(move || {
            let (bridge, name, env) = (Arc::clone(&started), name.clone(), env.clone());
            let source = source.lock().ok().and_then(|mut s| s.take());
            Box::pin(async move {
                let source =
                    source.ok_or_else(|| anyhow::anyhow!("the Python app was already started"))?;
                let (tx, rx) = tokio::sync::oneshot::channel();
                let thread = Arc::clone(&bridge);
                std::thread::Builder::new()
                    .name("zdr-python".to_owned())
                    .spawn(move || {
                        run(
                            &name, source, &env, &thread, tick_every, threads, interface, tx,
                        )
                    })?;
                match rx.await {
                    Ok(Ok(())) => {
                        // The app hears of the drain (`zdr.worker`).
                        let told = Arc::clone(&bridge);
                        tokio::spawn(async move {
                            crate::app::WorkerInfo::draining().await;
                            told.draining.store(true, Ordering::Relaxed);
                            told.post(Wake::Draining);
                        });
                        Ok(crate::app::erase(call::Asgi::new(bridge)))
                    }
                    Ok(Err(why)) => Err(anyhow::anyhow!("{why}")),
                    Err(_) => Err(anyhow::anyhow!("the Python thread ended while starting")),
                }
            }) as BoxFuture<_>
        }),
        ready: Arc::new(move || {
            let up = alive.alive.load(Ordering::Relaxed);
            Box::pin(async move {
                if up {
                    Ok(())
                } else {
                    Err(anyhow::anyhow!("the app's event loop has stopped"))
                }
            }) as BoxFuture<_>
        }),
        silence: Some(Arc::new(move || {
            let ticked = ticking.ticked_ns.load(Ordering::Relaxed);
            (ticked != 0 && ticking.alive.load(Ordering::Relaxed))
                .then(|| Duration::from_nanos(crate::sys::monotonic_ns().saturating_sub(ticked)))
        })),
        stop: Some(Arc::new(move |grace: Duration| {
            let bridge = Arc::clone(&stopped);
            Box::pin(async move {
                if !bridge.alive.load(Ordering::Relaxed) {
                    return 0;
                }
                // The threads waiting for calls end.
                bridge.closed.store(true, Ordering::Relaxed);
                if let Ok(_calls) = bridge.calls.lock() {
                    bridge.called.notify_all();
                }
                let (tx, rx) = tokio::sync::oneshot::channel();
                bridge.post(Wake::Shutdown(Arc::new(Done {
                    seconds: grace.as_secs_f64(),
                    tx: Mutex::new(Some(tx)),
                })));
                // A little past the app's own bound, for the loop to stop.
                let _ = tokio::time::timeout(grace + Duration::from_millis(500), rx).await;
                0
            }) as BoxFuture<_>
        })),
    })
}

/// The Python thread: imports the app (unless preloaded), runs its
/// startup, tells `started` how that went, then runs the event loop until
/// the shutdown stops it.
#[allow(clippy::too_many_arguments)]
fn run(
    name: &str,
    source: Source,
    env: &[(String, String)],
    bridge: &Arc<Bridge>,
    tick_every: f64,
    threads: usize,
    interface: &str,
    started: tokio::sync::oneshot::Sender<Result<(), String>>,
) {
    let mut started = Some(started);
    // Starts the interpreter in a worker of the binary (the Python that
    // hosts the wheel's extension module has one already).
    pyo3::prepare_freethreaded_python();
    let outcome = Python::with_gil(|py| -> PyResult<Result<(), String>> {
        export_env(py, env)?;
        let (glue, app) = match source {
            Source::Import(name) => {
                let glue = prepare(py)?;
                match import(&glue, &name)? {
                    Ok(app) => (glue, app),
                    Err(why) => return Ok(Err(why)),
                }
            }
            Source::Preloaded { app, glue } => (glue.into_bound(py), app),
        };
        let event_loop = glue.call_method0("make_loop")?;
        py.import("asyncio")?
            .call_method1("set_event_loop", (&event_loop,))?;
        let inbox = Inbox(Arc::clone(bridge));
        let runner = glue.getattr("Runner")?.call1((
            app,
            &event_loop,
            bridge.wake.as_fd().as_raw_fd(),
            inbox,
            tick_every,
            threads,
            interface,
        ))?;
        let (ok, why): (bool, String) = runner.call_method1("startup", (py.None(),))?.extract()?;
        if !ok {
            return Ok(Err(format!("{name}: lifespan startup failed: {why}")));
        }
        bridge.alive.store(true, Ordering::Relaxed);
        if let Some(tx) = started.take() {
            let _ = tx.send(Ok(()));
        }
        let ran = event_loop.call_method0("run_forever");
        bridge.alive.store(false, Ordering::Relaxed);
        ran?;
        event_loop.call_method0("close")?;
        Ok(Ok(()))
    });
    let outcome = outcome.unwrap_or_else(|e| Python::with_gil(|py| Err(describe(py, &e))));
    match (started.take(), outcome) {
        (Some(tx), outcome) => {
            let _ = tx.send(outcome);
        }
        (None, Err(why)) => tracing::error!(
            event = crate::logging::LogEvent::AppError.name(),
            "the app's event loop stopped: {why}"
        ),
        (None, Ok(())) => {}
    }
}

/// Sets `pairs` in `os.environ` (and so in the process's environment).
fn export_env(py: Python<'_>, pairs: &[(String, String)]) -> PyResult<()> {
    let environ = py.import("os")?.getattr("environ")?;
    for (key, value) in pairs {
        environ.set_item(key, value)?;
    }
    Ok(())
}

/// Imports `name` (`MODULE:APP`) with the glue's `load`: the app, or why
/// not (with the traceback).
fn import(glue: &Bound<'_, PyModule>, name: &str) -> PyResult<Result<PyObject, String>> {
    let (app, failed): (Option<PyObject>, Option<String>) =
        glue.call_method1("load", (name,))?.extract()?;
    Ok(app.ok_or_else(|| {
        format!(
            "cannot import {name}:\n{}",
            failed.unwrap_or_default().trim_end()
        )
    }))
}

/// Makes the working directory importable (as `python -m` does, and
/// Gunicorn and uvicorn) and an active virtualenv's packages too; returns
/// the glue module.
fn prepare(py: Python<'_>) -> PyResult<Bound<'_, PyModule>> {
    let sys = py.import("sys")?;
    let path = sys.getattr("path")?;
    if let Ok(cwd) = std::env::current_dir() {
        path.call_method1("insert", (0, cwd))?;
    }
    if let Some(venv) = std::env::var_os("VIRTUAL_ENV") {
        let version = sys.getattr("version_info")?;
        let (major, minor): (u32, u32) = (
            version.getattr("major")?.extract()?,
            version.getattr("minor")?.extract()?,
        );
        let site = std::path::Path::new(&venv)
            .join("lib")
            .join(format!("python{major}.{minor}"))
            .join("site-packages");
        if !site.is_dir() {
            tracing::warn!(
                event = crate::logging::LogEvent::WorkerTrouble.name(),
                "VIRTUAL_ENV={} has no {}: is it a virtualenv of Python {major}.{minor}, \
                 the Python this zdr embeds? Its packages are not importable",
                std::path::Path::new(&venv).display(),
                site.display()
            );
        }
        py.import("site")?.call_method1("addsitedir", (site,))?;
    }
    let code =
        CString::new(GLUE).map_err(|e| pyo3::exceptions::PyValueError::new_err(e.to_string()))?;
    let glue = PyModule::from_code(py, &code, c"zdr_asgi.py", c"zdr_asgi")?;
    // `import zdr` gives the app its worker (before the app is imported,
    // which may import it).
    glue.call_method0("install_module")?;
    Ok(glue)
}

/// A Python error with its traceback.
fn describe(py: Python<'_>, err: &PyErr) -> String {
    let trace = err
        .traceback(py)
        .and_then(|t| t.format().ok())
        .unwrap_or_default();
    format!("{trace}{err}")
}
