//! Starting a worker process: `exec` of the binary on disk, or (with
//! `--preload`) `fork` of the master after the app's load step.

use std::io::{self, Write};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;

use nix::sys::signal::{sigprocmask, SigSet, SigmaskHow, Signal};
use nix::unistd::{ForkResult, Pid};

use crate::app::{LoadedApp, Loader};
use crate::boot::{self, WorkerSpec, SPEC_ENV};
use crate::scoreboard::{Doorbell, Scoreboard};
use crate::worker;

use super::signals::{Signals, HANDLED};

/// The executable a generation's workers run, opened when the generation
/// starts: replacing the file on disk afterwards (a deploy, a broken
/// build, a rollback) does not change what that generation's new workers
/// run, so a rolled-back generation heals with its own code.
#[derive(Debug)]
pub(crate) struct Executable {
    path: std::path::PathBuf,
    /// The file as it was when the generation started; `None` if it could
    /// not be opened (then the path is run, and fails as it would).
    file: Option<OwnedFd>,
}

impl Executable {
    /// Opens the file at `path` now.
    pub(crate) fn pin(path: &Path) -> Executable {
        let file = match std::fs::File::open(path) {
            Ok(f) => Some(OwnedFd::from(f)),
            Err(e) => {
                tracing::warn!(
                    event = crate::logging::LogEvent::MasterFiles.name(),
                    "cannot open {}: {e}; its workers run it by name",
                    path.display()
                );
                None
            }
        };
        Executable {
            path: path.to_owned(),
            file,
        }
    }
}

/// Runs `exe` (as it was when its generation started) as a worker, with
/// `stderr` as its standard error.
pub(crate) fn exec(
    exe: &Executable,
    title: &str,
    spec: &WorkerSpec,
    stderr: OwnedFd,
) -> io::Result<Pid> {
    let pinned = exe.file.as_ref().map(|f| f.as_raw_fd());
    let spec = WorkerSpec {
        exe_fd: pinned,
        ..spec.clone()
    };
    let json = serde_json::to_string(&spec).map_err(io::Error::other)?;
    let mut inherit: Vec<RawFd> = spec.listeners.iter().map(|l| l.fd).collect();
    inherit.push(spec.scoreboard_fd);
    inherit.push(spec.doorbell_fd);
    inherit.extend(spec.handoff.iter().flatten());
    let run_as = spec.settings.run_as;
    // The descriptor stays open across the exec: whatever runs next may
    // open the file by this name again (a script's interpreter; a wrapper
    // such as valgrind that re-executes it). The worker closes it.
    if let Some(fd) = pinned {
        inherit.push(fd);
    }
    let mut cmd = match pinned {
        // The kernel resolves the child's own descriptor at the exec.
        Some(fd) => Command::new(format!("/proc/self/fd/{fd}")),
        None => Command::new(&exe.path),
    };
    // The master alone speaks to systemd.
    cmd.env_remove("NOTIFY_SOCKET");
    cmd.arg0(title)
        .env(SPEC_ENV, json)
        .stdin(Stdio::null())
        .stderr(Stdio::from(stderr));
    let child = match run_as {
        // No credentials to change: nothing runs between fork and exec, so
        // the standard library spawns with `posix_spawn` (a vfork: the
        // master's memory is neither copied nor torn down again). The
        // descriptors to pass are inheritable for the moment of the spawn
        // (the master runs no other thread, so nothing else can exec
        // meanwhile). Every worker sets its parent-death signal itself and
        // checks its parent (`worker::run`).
        None => {
            let opened = inherit
                .iter()
                .try_for_each(|fd| crate::sys::set_cloexec(*fd, false));
            let child = opened.and_then(|()| cmd.spawn());
            // Closed again whatever happened, each of them.
            for fd in &inherit {
                let _ = crate::sys::set_cloexec(*fd, true);
            }
            child?
        }
        Some((uid, gid)) => {
            let groups = [gid];
            // SAFETY: runs in the child between fork and exec; it makes only
            // async-signal-safe system calls (fcntl, setgroups, setgid,
            // setuid) and does not allocate: `inherit` and `groups` were
            // built before the fork.
            unsafe {
                cmd.pre_exec(move || {
                    for fd in &inherit {
                        if nix::libc::fcntl(*fd, nix::libc::F_SETFD, 0) != 0 {
                            return Err(io::Error::last_os_error());
                        }
                    }
                    if nix::libc::setgroups(1, groups.as_ptr()) != 0
                        || nix::libc::setgid(gid) != 0
                        || nix::libc::setuid(uid) != 0
                    {
                        return Err(io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
            cmd.spawn()?
        }
    };
    Ok(Pid::from_raw(child.id() as i32))
}

/// What a forked worker needs from the master's memory.
pub(crate) struct ForkParts<'a> {
    pub(crate) app: Arc<LoadedApp>,
    pub(crate) board: Arc<Scoreboard>,
    pub(crate) bell: &'a Doorbell,
    pub(crate) signals: &'a Signals,
    /// The master's descriptors the worker must not keep.
    pub(crate) close: Vec<RawFd>,
    /// The worker's standard error.
    pub(crate) stderr: OwnedFd,
    pub(crate) loader: &'a Loader,
}

/// Forks a worker from the master, sharing the preloaded app copy-on-write.
pub(crate) fn fork(spec: WorkerSpec, parts: ForkParts<'_>) -> io::Result<Pid> {
    let _ = io::stdout().flush();
    let _ = io::stderr().flush();
    // Signals are held from before the fork until the child has its own
    // dispositions: one sent to the child at its first instruction is
    // delivered then, not swallowed by the master's handlers.
    let before = hold_signals();
    // SAFETY: the master runs no threads of its own (no runtime, no logging
    // thread), so the child is a complete copy and may run any code; the
    // master warns if the app's load step left threads running.
    let forked = unsafe { nix::unistd::fork() };
    if !matches!(forked, Ok(ForkResult::Child)) {
        release_signals(&before);
    }
    match forked? {
        ForkResult::Parent { child } => Ok(child),
        ForkResult::Child => {
            parts.signals.uninstall();
            boot::boot_dispositions();
            release_signals(&before);
            become_worker(
                spec,
                parts.app,
                parts.board,
                parts.bell.raw_fd(),
                parts.stderr,
                &parts.close,
                parts.loader,
            )
        }
    }
}

/// The rest of a forked child's life, once it has its boot dispositions:
/// the worker's credentials, its standard error, closing the descriptors
/// it must not keep (`close`), then the worker, whose exit code ends the
/// process. The child is single-threaded until the worker's runtime
/// starts.
pub(crate) fn become_worker(
    spec: WorkerSpec,
    app: Arc<LoadedApp>,
    board: Arc<Scoreboard>,
    bell_fd: RawFd,
    stderr: OwnedFd,
    close: &[RawFd],
    loader: &Loader,
) -> ! {
    // Single-threaded still: the worker's runtime does not exist yet.
    std::env::remove_var("NOTIFY_SOCKET");
    if let Some((uid, gid)) = spec.settings.run_as {
        use nix::unistd::{setgid, setgroups, setuid, Gid, Uid};
        let dropped = setgroups(&[Gid::from_raw(gid)])
            .and_then(|_| setgid(Gid::from_raw(gid)))
            .and_then(|_| setuid(Uid::from_raw(uid)));
        if let Err(e) = dropped {
            eprintln!("zdr: error: worker cannot switch to uid {uid}, gid {gid}: {e}");
            std::process::exit(boot::BOOT_ERROR);
        }
    }
    let _ = nix::unistd::dup2(stderr.as_raw_fd(), 2);
    drop(stderr);
    for fd in close {
        let _ = nix::unistd::close(*fd);
    }
    let code = match nix::unistd::dup(bell_fd)
        .map_err(io::Error::from)
        .and_then(|fd| {
            // SAFETY: `dup` just made this descriptor for this process
            // alone.
            unsafe { Doorbell::from_inherited(fd) }
        }) {
        Ok(bell) => worker::run(spec, board, bell, Some(app), loader),
        Err(e) => {
            tracing::error!(
                event = crate::logging::LogEvent::WorkerTrouble.name(),
                "worker cannot open the doorbell: {e}"
            );
            1
        }
    };
    std::process::exit(code)
}

/// The signals held across a fork, so that a child handles them with its
/// own dispositions from its first instruction; returns the mask to
/// restore (in the parent at once, in the child once it has them).
pub(crate) fn hold_signals() -> SigSet {
    let mut held = SigSet::empty();
    for sig in HANDLED {
        if let Ok(sig) = Signal::try_from(sig) {
            held.add(sig);
        }
    }
    let mut before = SigSet::empty();
    let _ = sigprocmask(SigmaskHow::SIG_BLOCK, Some(&held), Some(&mut before));
    before
}

/// Restores the signal mask [`hold_signals`] returned.
pub(crate) fn release_signals(before: &SigSet) {
    let _ = sigprocmask(SigmaskHow::SIG_SETMASK, Some(before), None);
}

/// The number of threads in this process, from /proc.
pub(crate) fn thread_count() -> Option<usize> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|n| n.trim().parse().ok())
}
