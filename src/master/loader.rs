//! `--preload` for a Python app, the process half: each generation gets a
//! **loader**, a child forked from the master that imports the app once
//! and forks the generation's workers, which share the imported code
//! copy-on-write. The master never starts Python; a reload starts a new
//! loader, so new code is imported fresh (an interpreter cannot reliably
//! import a module again), and a loader whose import fails is the reload's
//! failure, with the traceback, rolled back as any other.
//!
//! | event | master | loader |
//! |---|---|---|
//! | generation prepared | forks the loader, waits (`--boot-timeout`) | imports, freezes the heap, says ready, or why not and exits |
//! | a worker to start | sends the spec and the worker's stderr | forks (see `python::preload`), answers the worker's pid |
//! | the worker runs | reaps it (it adopted it) | — |
//! | generation forgotten | drops its end of the socket | reads the end of it, exits |
//! | the master dies | — | dies too (its parent-death signal) |
//!
//! The two speak over a `SOCK_SEQPACKET` socket pair: one message each
//! way per request, the worker's stderr passed with `SCM_RIGHTS`.

use std::io::{self, IoSlice, IoSliceMut, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::poll::{PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{
    recvmsg, sendmsg, socketpair, AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags,
    SockFlag, SockType, UnixAddr,
};
use nix::unistd::{ForkResult, Pid};

use super::signals::Signals;
use super::spawn;
use crate::app::Loader as AppLoader;
use crate::boot::{self, WorkerSpec};
use crate::config::Settings;
use crate::python::preload::{self, Forked};
use crate::scoreboard::Scoreboard;

/// The loader's first answer: the app is imported.
const READY: u8 = b'R';
/// The loader's first answer: the import failed (the text follows).
const FAILED: u8 = b'F';
/// The answer to a spawn: the worker's pid follows.
const SPAWNED: u8 = b'P';
/// The answer to a spawn: it failed (the text follows).
const NOT_SPAWNED: u8 = b'E';
/// The master's request for a worker: its spec (JSON) follows, its
/// stderr comes with it.
const SPAWN: u8 = b'S';

/// The largest message either side sends (a worker's spec).
const MAX_MESSAGE: usize = 1 << 20;

/// How long a spawn may take the loader (a fork of a large process).
const SPAWN_BOUND: Duration = Duration::from_secs(30);

/// A generation's loader, as the master holds it.
pub(crate) struct PyLoader {
    pid: Pid,
    sock: OwnedFd,
}

/// What the loader needs from the master's memory.
pub(crate) struct LoaderParts<'a> {
    pub(crate) settings: Arc<Settings>,
    pub(crate) board: Arc<Scoreboard>,
    pub(crate) bell_fd: RawFd,
    pub(crate) signals: &'a Signals,
    /// The master's descriptors the loader must not keep.
    pub(crate) close: Vec<RawFd>,
    pub(crate) app_loader: &'a AppLoader,
    pub(crate) master_pid: u32,
    /// The generation it loads for.
    pub(crate) generation: u64,
}

impl PyLoader {
    /// Forks the loader and waits until it has imported the app (within
    /// `--boot-timeout`); on failure, why (the traceback).
    pub(crate) fn start(parts: LoaderParts<'_>) -> Result<PyLoader, String> {
        let (ours, theirs) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .map_err(|e| format!("cannot make the loader's socket: {e}"))?;
        let _ = io::stdout().flush();
        let _ = io::stderr().flush();
        let before = spawn::hold_signals();
        // SAFETY: the master runs no threads of its own, so the child is a
        // complete copy and may run any code.
        let forked = unsafe { preload::fork_process() };
        if !matches!(forked, Ok(ForkResult::Child)) {
            spawn::release_signals(&before);
        }
        match forked.map_err(|e| format!("cannot fork the loader: {e}"))? {
            ForkResult::Child => {
                drop(ours);
                parts.signals.uninstall();
                // A worker's boot dispositions: a stop ends the loader (it
                // holds no connection and no request), the master's other
                // signals do nothing here. The workers it forks keep them
                // until their runtime's handlers take over. (Through
                // signal-hook's registry, which the master's handlers are
                // in: a disposition set around it would not be undone.)
                boot::boot_dispositions();
                spawn::release_signals(&before);
                run(parts, theirs)
            }
            ForkResult::Parent { child } => {
                drop(theirs);
                let loader = PyLoader {
                    pid: child,
                    sock: ours,
                };
                let bound = parts.settings.boot_timeout();
                match loader.answer(bound) {
                    Ok((READY, _, _)) => Ok(loader),
                    Ok((FAILED, why, _)) => Err(why),
                    Ok(_) => Err("the loader answered out of turn".to_owned()),
                    Err(e) => {
                        // Killed here, reaped with the master's other
                        // children.
                        let _ = nix::sys::signal::kill(child, nix::sys::signal::Signal::SIGKILL);
                        Err(if e.kind() == io::ErrorKind::TimedOut {
                            format!(
                                "the app did not finish importing within --boot-timeout ({} s)",
                                bound.as_secs_f64()
                            )
                        } else {
                            format!("the loader ended while importing the app: {e}")
                        })
                    }
                }
            }
        }
    }

    /// The loader's pid.
    pub(crate) fn pid(&self) -> Pid {
        self.pid
    }

    /// The master's end of the loader's socket (for children that must
    /// not keep it).
    pub(crate) fn fd(&self) -> RawFd {
        self.sock.as_raw_fd()
    }

    /// Has the loader fork a worker for `spec`, with `stderr` as its
    /// standard error; returns its pid (the master's child by then).
    pub(crate) fn spawn(&self, spec: &WorkerSpec, stderr: &OwnedFd) -> io::Result<Pid> {
        let mut message = vec![SPAWN];
        serde_json::to_writer(&mut message, spec).map_err(io::Error::other)?;
        send(&self.sock, &message, Some(stderr.as_raw_fd()))?;
        match self.answer(SPAWN_BOUND)? {
            (SPAWNED, text, _) => text
                .parse::<i32>()
                .map(Pid::from_raw)
                .map_err(|_| io::Error::other("the loader answered no pid")),
            (_, why, _) => Err(io::Error::other(format!(
                "the loader could not fork: {why}"
            ))),
        }
    }

    /// Whether a [`PyLoader::spawn`] error says the loader is gone.
    pub(crate) fn is_gone(e: &io::Error) -> bool {
        matches!(
            e.kind(),
            io::ErrorKind::BrokenPipe
                | io::ErrorKind::ConnectionReset
                | io::ErrorKind::UnexpectedEof
        )
    }

    /// The loader's next message, waited for within `bound`.
    fn answer(&self, bound: Duration) -> io::Result<(u8, String, Option<OwnedFd>)> {
        let until = Instant::now() + bound;
        loop {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(io::ErrorKind::TimedOut.into());
            }
            let ms = u16::try_from(left.as_millis().max(1)).unwrap_or(u16::MAX);
            let mut fds = [PollFd::new(
                std::os::fd::AsFd::as_fd(&self.sock),
                PollFlags::POLLIN,
            )];
            match nix::poll::poll(&mut fds, PollTimeout::from(ms)) {
                Ok(0) | Err(nix::errno::Errno::EINTR) => continue,
                Ok(_) => return receive(&self.sock),
                Err(e) => return Err(e.into()),
            }
        }
    }
}

/// Sends one message (`kind` is its first byte), with a descriptor.
fn send(sock: &OwnedFd, message: &[u8], fd: Option<RawFd>) -> io::Result<()> {
    let iov = [IoSlice::new(message)];
    let fds: Vec<RawFd> = fd.into_iter().collect();
    let cmsg = [ControlMessage::ScmRights(&fds)];
    let cmsgs: &[ControlMessage<'_>] = if fds.is_empty() { &[] } else { &cmsg };
    sendmsg::<UnixAddr>(sock.as_raw_fd(), &iov, cmsgs, MsgFlags::MSG_NOSIGNAL, None)?;
    Ok(())
}

/// Receives one message: its first byte, the rest as text, and the
/// descriptor it carried. The end of the stream is an error.
fn receive(sock: &OwnedFd) -> io::Result<(u8, String, Option<OwnedFd>)> {
    let mut buf = vec![0u8; MAX_MESSAGE];
    let mut space = nix::cmsg_space!([RawFd; 1]);
    let (len, fd) = {
        let mut iov = [IoSliceMut::new(&mut buf)];
        let msg = recvmsg::<UnixAddr>(
            sock.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )?;
        let mut fd = None;
        for cmsg in msg.cmsgs()? {
            if let ControlMessageOwned::ScmRights(rights) = cmsg {
                for raw in rights {
                    // SAFETY: the kernel just installed this descriptor in
                    // this process; nothing else owns it.
                    let owned = unsafe { OwnedFd::from_raw_fd(raw) };
                    if fd.is_none() {
                        fd = Some(owned);
                    }
                }
            }
        }
        (msg.bytes, fd)
    };
    if len == 0 {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    let text = String::from_utf8_lossy(&buf[1..len]).into_owned();
    Ok((buf[0], text, fd))
}

/// Sends `kind` followed by `text`.
fn say(sock: &OwnedFd, kind: u8, text: &str) -> io::Result<()> {
    let mut message = Vec::with_capacity(1 + text.len());
    message.push(kind);
    message.extend_from_slice(text.as_bytes());
    send(sock, &message, None)
}

/// The loader's life: it dies with the master, imports the app, says so,
/// then forks a worker for each spec the master sends until the master
/// drops its end.
fn run(parts: LoaderParts<'_>, sock: OwnedFd) -> ! {
    let _ = nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL);
    if nix::unistd::getppid().as_raw() as u32 != parts.master_pid {
        std::process::exit(1);
    }
    for fd in &parts.close {
        let _ = nix::unistd::close(*fd);
    }
    // The master alone speaks to systemd.
    std::env::remove_var("NOTIFY_SOCKET");
    let comm = nix::sys::prctl::get_name().ok();
    let _ = nix::sys::prctl::set_name(c"zdr-loader");
    let imported = match preload::import(&parts.settings, parts.generation, parts.master_pid) {
        Ok(imported) => imported,
        Err(why) => {
            let _ = say(&sock, FAILED, &why);
            std::process::exit(boot::BOOT_ERROR);
        }
    };
    if let Some(n) = spawn::thread_count().filter(|n| *n > 1) {
        tracing::warn!(
            event = crate::logging::LogEvent::PreloadThreads.name(),
            "Importing {} left {n} threads running in its loader; the workers it forks get \
             only the calling thread",
            parts.settings.app
        );
    }
    if say(&sock, READY, "").is_err() {
        std::process::exit(0);
    }
    loop {
        let (json, stderr) = match receive(&sock) {
            Ok((SPAWN, json, Some(stderr))) => (json, stderr),
            Ok(_) => {
                let _ = say(&sock, NOT_SPAWNED, "a request it does not know");
                continue;
            }
            // The master dropped its end: the generation is over.
            Err(_) => std::process::exit(0),
        };
        let spec: WorkerSpec = match serde_json::from_str(&json) {
            Ok(spec) => spec,
            Err(e) => {
                let _ = say(&sock, NOT_SPAWNED, &format!("a spec it cannot read: {e}"));
                continue;
            }
        };
        let before = spawn::hold_signals();
        match preload::fork_worker() {
            Ok(Forked::Loader(pid)) => {
                spawn::release_signals(&before);
                drop(stderr);
                let _ = say(&sock, SPAWNED, &pid.as_raw().to_string());
            }
            Ok(Forked::Worker) => {
                spawn::release_signals(&before);
                if let Some(comm) = &comm {
                    let _ = nix::sys::prctl::set_name(comm);
                }
                if !preload::wait_for_adoption(parts.master_pid, Duration::from_secs(10)) {
                    std::process::exit(1);
                }
                let app = match preload::worker_app(&spec, &imported) {
                    Ok(app) => Arc::new(app),
                    Err(e) => {
                        eprintln!("zdr: error: {e:#}");
                        std::process::exit(boot::BOOT_ERROR);
                    }
                };
                spawn::become_worker(
                    spec,
                    app,
                    parts.board,
                    parts.bell_fd,
                    stderr,
                    &[sock.as_raw_fd()],
                    parts.app_loader,
                )
            }
            Err(e) => {
                spawn::release_signals(&before);
                drop(stderr);
                let _ = say(&sock, NOT_SPAWNED, &e.to_string());
            }
        }
    }
}
