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

/// Replaces this process's image with `exe`, run with `args` (the first is
/// what `ps` shows as the program); the pid stays. Returns only on failure.
pub(crate) fn exec_in_place(exe: &std::path::Path, args: &[std::ffi::OsString]) -> io::Error {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let to_c = |s: &[u8]| CString::new(s).map_err(io::Error::other);
    let program = match to_c(exe.as_os_str().as_bytes()) {
        Ok(p) => p,
        Err(e) => return e,
    };
    let argv: Result<Vec<CString>, io::Error> = args.iter().map(|a| to_c(a.as_bytes())).collect();
    let argv = match argv {
        Ok(a) => a,
        Err(e) => return e,
    };
    match nix::unistd::execv(&program, &argv) {
        Ok(never) => match never {},
        Err(e) => io::Error::from(e),
    }
}

/// Gives this process the short kernel name (`comm`: what `top`, `pgrep`
/// and `ps -o comm` show) of its executable's file name, as a shell would
/// have: a process started through `/proc/self/fd/N` is otherwise named
/// `N`.
pub(crate) fn name_after_executable() {
    if let Ok(exe) = current_exe() {
        set_comm(&comm_of(&exe));
    }
}

/// The `comm` for a process running `exe`: its file name.
fn comm_of(exe: &std::path::Path) -> String {
    let name = exe
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    name.trim_end_matches(" (deleted)").to_owned()
}

/// Sets this process's `comm`, cut to its 15 bytes.
fn set_comm(name: &str) {
    let short: Vec<u8> = name.bytes().take(15).filter(|b| *b != 0).collect();
    if let Ok(name) = std::ffi::CString::new(short) {
        let _ = nix::sys::prctl::set_name(&name);
    }
}

/// Whether a descriptor has something to read (for a listening socket: a
/// connection to accept), without waiting. Checked before an `accept`
/// that would most often find nothing: Linux builds and tears down a
/// whole socket file for an `accept` that fails with `EAGAIN`, which a
/// master that wakes many times a second would pay every time.
pub(crate) fn readable(fd: std::os::fd::BorrowedFd<'_>) -> bool {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    let mut fds = [PollFd::new(fd, PollFlags::POLLIN)];
    matches!(poll(&mut fds, PollTimeout::ZERO), Ok(n) if n > 0)
        && fds[0].revents().is_some_and(|r| !r.is_empty())
}

/// The monotonic clock (`CLOCK_MONOTONIC`, the one `Instant` reads) in
/// nanoseconds: what is timed on every request is a read and a
/// subtraction, without `Instant`'s `Duration` arithmetic.
pub(crate) fn monotonic_ns() -> u64 {
    use nix::time::{clock_gettime, ClockId};
    clock_gettime(ClockId::CLOCK_MONOTONIC).map_or(0, |t| {
        (t.tv_sec() as u64)
            .wrapping_mul(1_000_000_000)
            .wrapping_add(t.tv_nsec() as u64)
    })
}

/// Asks the allocator to give the free memory of its heaps back to the
/// kernel. glibc's malloc keeps a freed block's pages resident unless the
/// block is at its heap's top, so the buffers of thousands of connections
/// freed between live allocations (the parked connections' own records)
/// would stay in the worker's memory for good; `malloc_trim` returns
/// every whole free page. Elsewhere, nothing.
pub(crate) fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim takes no pointer and only walks the allocator's
    // own free lists under its locks; any thread may call it at any time.
    unsafe {
        nix::libc::malloc_trim(0);
    }
}

/// The variable a host names the program's executable in (see
/// [`current_exe`]).
pub(crate) const EXECUTABLE_ENV: &str = "ZDR_EXECUTABLE";

/// What [`EXECUTABLE_ENV`] said when the program started.
static EXECUTABLE: std::sync::OnceLock<Option<std::path::PathBuf>> = std::sync::OnceLock::new();

/// Takes [`EXECUTABLE_ENV`] out of the environment, kept for
/// [`current_exe`]: what this process starts (a command, its children)
/// does not inherit it. Called first thing, while the process is
/// single-threaded.
pub(crate) fn take_executable_env() {
    let named = std::env::var_os(EXECUTABLE_ENV)
        .filter(|exe| !exe.is_empty())
        .map(std::path::PathBuf::from);
    if named.is_some() {
        std::env::remove_var(EXECUTABLE_ENV);
    }
    let _ = EXECUTABLE.set(named);
}

/// The executable that runs this program, to re-execute and to start
/// workers from: the one its host named in `ZDR_EXECUTABLE` (the Python
/// wheel's console script: `/proc/self/exe` would name the base
/// interpreter, which loses the virtualenv), else the running image.
pub(crate) fn current_exe() -> std::io::Result<std::path::PathBuf> {
    match EXECUTABLE.get() {
        Some(Some(exe)) => Ok(exe.clone()),
        _ => std::env::current_exe(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn comm_is_the_file_name() {
        assert_eq!(comm_of(std::path::Path::new("/usr/bin/zdr")), "zdr");
        assert_eq!(comm_of(std::path::Path::new("/srv/app (deleted)")), "app");
    }

    #[test]
    fn a_listener_is_readable_once_a_client_waits() {
        use std::os::fd::AsFd;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        assert!(!super::readable(listener.as_fd()));
        let _client = std::net::TcpStream::connect(listener.local_addr().expect("addr"));
        // The handshake's last step may still be on its way on a loaded
        // machine: wait for it, within a generous bound.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while !super::readable(listener.as_fd()) {
            assert!(std::time::Instant::now() < deadline, "never readable");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let _ = listener.accept();
        assert!(!super::readable(listener.as_fd()));
    }

    #[test]
    fn the_monotonic_clock_measures_what_instant_measures() {
        // A span measured by `monotonic_ns` around one measured by
        // `Instant` is at least as long: the same fine-grained clock (a
        // coarse one would read the same value across a millisecond).
        let ns1 = super::monotonic_ns();
        let i1 = std::time::Instant::now();
        std::thread::sleep(std::time::Duration::from_millis(1));
        let i2 = std::time::Instant::now();
        let ns2 = super::monotonic_ns();
        assert!(ns1 > 0);
        assert!(ns2 - ns1 >= i2.duration_since(i1).as_nanos() as u64);
    }
}
