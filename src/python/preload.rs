//! `--preload` for a Python app, the Python half: importing the app once
//! in a generation's loader process, and forking a worker from it that
//! shares the imported code copy-on-write.
//!
//! The loader (the master's child, see `master::loader`) runs no threads:
//! it imports the app with the garbage collector off, then freezes what it
//! imported (`gc.freeze()`), so that a worker's collections never write to
//! the shared pages (Python's advice for fork without exec). Each worker
//! is forked through `PyOS_BeforeFork` / `PyOS_AfterFork_Child`, as
//! `os.fork()` does: the interpreter's locks and thread states are reset
//! in the child and `os.register_at_fork` hooks run.
//!
//! A worker must be the master's child (the master reaps it, and it dies
//! with the master), so the loader forks twice: the first child forks the
//! worker and exits at once, and the worker is adopted by the master,
//! which is a child subreaper. Both forks are the C library's `fork`, so
//! the process's `pthread_atfork` handlers run as they do for `os.fork()`.

use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::time::{Duration, Instant};

use nix::sys::wait::waitpid;
use nix::unistd::{ForkResult, Pid};
use pyo3::prelude::*;

use crate::app::LoadedApp;
use crate::boot::WorkerSpec;
use crate::config::Settings;

/// The app as the loader imported it.
pub(crate) struct Imported {
    app: Py<PyAny>,
    glue: Py<PyModule>,
}

/// Imports the app `settings` names, in the loader (of `generation`): its
/// `raw_env` set first, the working directory and an active virtualenv importable, the
/// collector off during the import and what it made frozen after. Returns
/// why not (with the traceback) when it fails.
pub(crate) fn import(
    settings: &Settings,
    generation: u64,
    master_pid: u32,
) -> Result<Imported, String> {
    pyo3::prepare_freethreaded_python();
    Python::with_gil(|py| -> PyResult<Result<Imported, String>> {
        // What the import may read: `raw_env`, and the generation and
        // master (not the worker: the loader forks them all).
        let mut env = settings.raw_env.clone();
        env.push(("ZDR_GENERATION".to_owned(), generation.to_string()));
        env.push(("ZDR_MASTER_PID".to_owned(), master_pid.to_string()));
        super::export_env(py, &env)?;
        let gc = py.import("gc")?;
        gc.call_method0("disable")?;
        let glue = super::prepare(py)?;
        let app = match super::import(&glue, &settings.app)? {
            Ok(app) => app,
            Err(why) => return Ok(Err(why)),
        };
        gc.call_method0("freeze")?;
        Ok(Ok(Imported {
            app,
            glue: glue.unbind(),
        }))
    })
    .unwrap_or_else(|e| Python::with_gil(|py| Err(super::describe(py, &e))))
}

/// Forks this process (a loader from its master) through the
/// interpreter's fork hooks when the process has a running interpreter
/// (the master the wheel's console script runs), plainly otherwise.
///
/// # Safety
///
/// As `fork`: the process runs no other thread that could hold a lock the
/// child needs (the master runs none).
pub(crate) unsafe fn fork_process() -> nix::Result<ForkResult> {
    // SAFETY: a query of the interpreter's state, safe at any time.
    if unsafe { pyo3::ffi::Py_IsInitialized() } == 0 {
        // SAFETY: the caller's.
        return unsafe { nix::unistd::fork() };
    }
    Python::with_gil(|_py| {
        // SAFETY: with the GIL, before a fork, as `os.fork()` calls it.
        unsafe { pyo3::ffi::PyOS_BeforeFork() };
        // SAFETY: the caller's.
        let forked = unsafe { nix::unistd::fork() };
        match forked {
            // SAFETY: each side of a fork made after `PyOS_BeforeFork`,
            // with the GIL.
            Ok(ForkResult::Child) => unsafe { pyo3::ffi::PyOS_AfterFork_Child() },
            _ => unsafe { pyo3::ffi::PyOS_AfterFork_Parent() },
        }
        forked
    })
}

/// Which side of [`fork_worker`] this is.
pub(crate) enum Forked {
    /// The loader, with the new worker's pid.
    Loader(Pid),
    /// The new worker (single-threaded, its interpreter reset for it).
    Worker,
}

/// Forks a worker from the loader (twice: see the module doc). In the
/// worker, the collector is on again; it is not yet the master's child
/// until [`wait_for_adoption`] says so.
pub(crate) fn fork_worker() -> io::Result<Forked> {
    let (read, write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    let forked = Python::with_gil(|_py| {
        // SAFETY: called with the GIL held, before a fork, as `os.fork()`
        // calls it.
        unsafe { pyo3::ffi::PyOS_BeforeFork() };
        // SAFETY: the loader runs no threads of its own (it warns if the
        // import left some), so the child is a complete copy.
        match unsafe { nix::unistd::fork() } {
            Ok(ForkResult::Child) => {
                // SAFETY: the first child, single-threaded, forks once
                // more and leaves: it only makes system calls until `_exit`.
                match unsafe { nix::unistd::fork() } {
                    Ok(ForkResult::Child) => {
                        // SAFETY: in the child of a fork made after
                        // `PyOS_BeforeFork`, with the GIL it held.
                        unsafe { pyo3::ffi::PyOS_AfterFork_Child() };
                        Ok(Forked::Worker)
                    }
                    Ok(ForkResult::Parent { child }) => {
                        let _ = nix::unistd::write(write.as_fd(), &child.as_raw().to_ne_bytes());
                        // SAFETY: ends this process without running
                        // anything of the loader's.
                        unsafe { nix::libc::_exit(0) }
                    }
                    // SAFETY: as above.
                    Err(_) => unsafe { nix::libc::_exit(1) },
                }
            }
            Ok(ForkResult::Parent { child }) => {
                // SAFETY: in the parent of a fork made after
                // `PyOS_BeforeFork`, with the GIL.
                unsafe { pyo3::ffi::PyOS_AfterFork_Parent() };
                Ok(Forked::Loader(child))
            }
            Err(e) => {
                // SAFETY: as above; no child was made.
                unsafe { pyo3::ffi::PyOS_AfterFork_Parent() };
                Err(io::Error::from(e))
            }
        }
    })?;
    match forked {
        Forked::Worker => {
            drop((read, write));
            Python::with_gil(|py| -> PyResult<()> {
                py.import("gc")?.call_method0("enable")?;
                Ok(())
            })
            .map_err(|e| io::Error::other(e.to_string()))?;
            Ok(Forked::Worker)
        }
        Forked::Loader(first) => {
            drop(write);
            let _ = waitpid(first, None);
            let mut pid = [0u8; 4];
            match nix::unistd::read(read.as_raw_fd(), &mut pid) {
                Ok(4) => Ok(Forked::Loader(Pid::from_raw(i32::from_ne_bytes(pid)))),
                _ => Err(io::Error::other("the worker's fork failed")),
            }
        }
    }
}

/// Waits, in a just-forked worker, until the master has adopted it (its
/// first parent exits at once); false if that did not happen within
/// `bound` (the master is gone).
pub(crate) fn wait_for_adoption(master: u32, bound: Duration) -> bool {
    let until = Instant::now() + bound;
    while nix::unistd::getppid().as_raw() as u32 != master {
        if Instant::now() > until {
            return false;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    true
}

/// The worker's app, from what the loader imported, as any worker runs it
/// (its identity goes to `os.environ` on its Python thread).
pub(crate) fn worker_app(spec: &WorkerSpec, imported: &Imported) -> anyhow::Result<LoadedApp> {
    let source = Python::with_gil(|py| -> PyResult<super::Source> {
        Ok(super::Source::Preloaded {
            app: imported.app.clone_ref(py),
            glue: imported.glue.clone_ref(py),
        })
    })
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    super::load_from(spec, source)
}
