//! The master's signals, without threads: each handler sets a flag and
//! writes a byte to a self-pipe that the event loop polls.

use std::io::{self, Read};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use nix::libc::c_int;
use signal_hook::consts::signal::*;
use signal_hook::SigId;

use super::machine::Sig;

/// The signals the master handles, in the order it acts on them when
/// several arrive together: stopping first.
pub(crate) const HANDLED: [c_int; 10] = [
    SIGINT, SIGQUIT, SIGTERM, SIGCHLD, SIGHUP, SIGUSR2, SIGWINCH, SIGTTIN, SIGTTOU, SIGUSR1,
];

/// Installed handlers and their pending flags.
pub(crate) struct Signals {
    pending: Vec<(c_int, Arc<AtomicBool>)>,
    wake: UnixStream,
    ids: Vec<SigId>,
}

impl Signals {
    /// Installs the handlers.
    pub(crate) fn install() -> io::Result<Signals> {
        let (wake, bell) = UnixStream::pair()?;
        wake.set_nonblocking(true)?;
        bell.set_nonblocking(true)?;
        let mut pending = Vec::new();
        let mut ids = Vec::new();
        for sig in HANDLED {
            let flag = Arc::new(AtomicBool::new(false));
            ids.push(signal_hook::flag::register(sig, Arc::clone(&flag))?);
            ids.push(signal_hook::low_level::pipe::register(
                sig,
                bell.try_clone()?,
            )?);
            pending.push((sig, flag));
        }
        Ok(Signals { pending, wake, ids })
    }

    /// The descriptor that becomes readable when a signal arrives.
    pub(crate) fn fd(&self) -> BorrowedFd<'_> {
        self.wake.as_fd()
    }

    /// The signals that arrived since the last call, stopping ones first.
    pub(crate) fn take(&mut self) -> Vec<c_int> {
        let mut buf = [0u8; 64];
        while matches!((&self.wake).read(&mut buf), Ok(n) if n > 0) {}
        self.pending
            .iter()
            .filter(|(_, flag)| flag.swap(false, Ordering::AcqRel))
            .map(|(sig, _)| *sig)
            .collect()
    }

    /// Removes the master's handlers, in a worker forked from it: the
    /// worker's runtime installs its own.
    pub(crate) fn uninstall(&self) {
        for id in &self.ids {
            signal_hook::low_level::unregister(*id);
        }
    }
}

/// A signal's conventional name, for logs.
pub(crate) fn name(sig: c_int) -> &'static str {
    match sig {
        SIGHUP => "SIGHUP",
        SIGINT => "SIGINT",
        SIGQUIT => "SIGQUIT",
        SIGTERM => "SIGTERM",
        SIGUSR1 => "SIGUSR1",
        SIGUSR2 => "SIGUSR2",
        SIGCHLD => "SIGCHLD",
        SIGWINCH => "SIGWINCH",
        SIGTTIN => "SIGTTIN",
        SIGTTOU => "SIGTTOU",
        _ => "signal",
    }
}

/// What a signal asks of the master (none for SIGCHLD: children are reaped
/// on every turn of the loop).
pub(crate) fn decode(sig: c_int) -> Option<Sig> {
    Some(match sig {
        SIGHUP => Sig::Hup,
        SIGINT => Sig::Int,
        SIGQUIT => Sig::Quit,
        SIGTERM => Sig::Term,
        SIGUSR1 => Sig::Usr1,
        SIGUSR2 => Sig::Usr2,
        SIGWINCH => Sig::Winch,
        SIGTTIN => Sig::Ttin,
        SIGTTOU => Sig::Ttou,
        _ => return None,
    })
}
