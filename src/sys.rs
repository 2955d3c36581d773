//! Small operating-system helpers that several layers share.

use std::io;
use std::os::fd::RawFd;

/// Sets or clears `FD_CLOEXEC` on a descriptor.
pub(crate) fn set_cloexec(fd: RawFd, on: bool) -> io::Result<()> {
    use nix::fcntl::{fcntl, FcntlArg, FdFlag};
    let flags = if on {
        FdFlag::FD_CLOEXEC
    } else {
        FdFlag::empty()
    };
    fcntl(fd, FcntlArg::F_SETFD(flags))
        .map(|_| ())
        .map_err(io::Error::from)
}
