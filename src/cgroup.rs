//! A cgroup (v2) of its own for each `-- CMD` command, where zdr may make
//! one: then everything the command starts is found, and ended, by the
//! kernel's count rather than by its place in the process tree or the mark
//! in its environment (see [`crate::process_tree`], which still does the
//! ending in order: stop signal, grace, SIGKILL).
//!
//! - **Where.** Below the cgroup zdr runs in, when cgroup v2 is mounted and
//!   zdr may create cgroups there (root in a VM, a container with a
//!   writable cgroup namespace, a delegated subtree). Not under systemd
//!   (`INVOCATION_ID` set): systemd contains the service in its own cgroup
//!   and ends it with `KillMode=control-group`; zdr does not make cgroups
//!   below one systemd manages. Anywhere else, nothing changes: the
//!   process tree alone is used.
//! - **Name.** `zdr-<master pid>-<worker pid>`: the worker and the master
//!   can both find it without telling each other.
//! - **Joining.** The command moves itself in between fork and exec (it
//!   writes `0` to `cgroup.procs`), before it can start anything.
//! - **Ending.** When the worker ends its command's tree, and when the
//!   master reaps a worker (however it ended: killed outright, its orphans
//!   may have cleared their environment), `cgroup.kill` (or SIGKILL to
//!   each process listed, on kernels before 5.14), then the cgroup is
//!   removed once empty.

use std::ffi::CString;
use std::os::fd::FromRawFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::fcntl::OFlag;
use nix::sys::signal::{kill, Signal};
use nix::sys::stat::Mode;
use nix::unistd::Pid;

/// A command's cgroup, made before the command starts.
pub(crate) struct Group {
    dir: PathBuf,
    /// `<dir>/cgroup.procs`, ready for the forked child (which may not
    /// allocate).
    procs: CString,
}

impl Group {
    /// Makes the cgroup for the command of this worker, if zdr may.
    pub(crate) fn create(master: u32) -> Option<Group> {
        let dir = path(master, std::process::id())?;
        match std::fs::create_dir(&dir) {
            Ok(()) => {}
            // Left by an earlier worker with the same pid (its master
            // reaped it without removing it): empty it, then use it.
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => kill_all(&dir),
            Err(_) => return None,
        }
        let procs = CString::new(dir.join("cgroup.procs").as_os_str().as_bytes()).ok()?;
        Some(Group { dir, procs })
    }

    /// Moves the calling process into the cgroup. For the forked child,
    /// before exec: only async-signal-safe calls (open, write, close), no
    /// allocation. A failure leaves the command where it was.
    pub(crate) fn join_from_child(&self) {
        let Ok(fd) = nix::fcntl::open(
            self.procs.as_c_str(),
            OFlag::O_WRONLY | OFlag::O_CLOEXEC,
            Mode::empty(),
        ) else {
            return;
        };
        // SAFETY: `fd` was just opened here and is owned by nothing else;
        // the OwnedFd closes it when dropped.
        let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
        let _ = nix::unistd::write(&fd, b"0");
        drop(fd);
    }

    /// Ends whatever is left in the cgroup, and removes it.
    pub(crate) fn end(&self) -> usize {
        end_dir(&self.dir)
    }
}

/// Ends whatever is left in the cgroup of `worker`'s command and removes
/// it: for the master, when it reaps a worker. Returns how many processes
/// were still in it.
pub(crate) fn end(master: u32, worker: u32) -> usize {
    path(master, worker).map_or(0, |dir| end_dir(&dir))
}

/// Removes the cgroups a master that is gone left behind (killed with its
/// workers at once, so that nobody removed them): the empty ones. One
/// that still holds processes is left as it is (zdr never kills what it
/// did not start) and named, with how many it holds. For a master at its
/// start; returns those names and counts.
pub(crate) fn sweep() -> Vec<(String, usize)> {
    let Some(dir) = own_dir() else {
        return Vec::new();
    };
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Vec::new();
    };
    let mut held = Vec::new();
    for entry in entries.flatten() {
        let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
            continue;
        };
        let Some(master) = name
            .strip_prefix("zdr-")
            .and_then(|rest| rest.split_once('-'))
            .and_then(|(m, w)| w.parse::<u32>().ok().and(m.parse::<i32>().ok()))
        else {
            continue;
        };
        // A master still there keeps its own.
        if master <= 0 || kill(Pid::from_raw(master), None).is_ok() {
            continue;
        }
        if std::fs::remove_dir(entry.path()).is_err() {
            let n = pids(&entry.path()).len();
            if n > 0 {
                held.push((name, n));
            }
        }
    }
    held
}

fn end_dir(dir: &Path) -> usize {
    if !dir.exists() {
        return 0;
    }
    let left = pids(dir).len();
    kill_all(dir);
    // Removing fails while a process is still in it.
    let until = Instant::now() + Duration::from_secs(1);
    while std::fs::remove_dir(dir).is_err() && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(10));
    }
    left
}

/// SIGKILL to every process in the cgroup: `cgroup.kill` (Linux 5.14), or
/// each process listed.
fn kill_all(dir: &Path) {
    if std::fs::write(dir.join("cgroup.kill"), b"1").is_ok() {
        return;
    }
    for _ in 0..3 {
        let left = pids(dir);
        if left.is_empty() {
            return;
        }
        for pid in left {
            let _ = kill(pid, Signal::SIGKILL);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn pids(dir: &Path) -> Vec<Pid> {
    std::fs::read_to_string(dir.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .map(Pid::from_raw)
        .collect()
}

/// The cgroup for `worker`'s command, if zdr may make cgroups here.
fn path(master: u32, worker: u32) -> Option<PathBuf> {
    Some(own_dir()?.join(format!("zdr-{master}-{worker}")))
}

/// The cgroup (v2) this process is in, if zdr may make cgroups below it.
fn own_dir() -> Option<PathBuf> {
    if std::env::var_os("INVOCATION_ID").is_some() {
        return None;
    }
    let own = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let own = own.lines().find_map(|l| l.strip_prefix("0::"))?;
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let mount = cgroup2_mount(&mountinfo)?;
    Some(Path::new(&mount).join(own.trim_start_matches('/')))
}

/// Where cgroup v2 is mounted, from `/proc/self/mountinfo`.
fn cgroup2_mount(mountinfo: &str) -> Option<String> {
    mountinfo.lines().find_map(|line| {
        let (before, after) = line.split_once(" - ")?;
        (after.split_whitespace().next()? == "cgroup2")
            .then(|| before.split_whitespace().nth(4).map(str::to_owned))
            .flatten()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cgroup2_mount_is_found_among_others() {
        let info = "\
24 29 0:22 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
30 24 0:26 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
35 24 0:31 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";
        assert_eq!(
            cgroup2_mount(info).as_deref(),
            Some("/sys/fs/cgroup/unified")
        );
        assert_eq!(
            cgroup2_mount("24 29 0:22 / /sys/fs/cgroup rw - tmpfs tmpfs rw\n"),
            None
        );
    }
}
