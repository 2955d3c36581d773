//! The command's process tree: everything a `-- CMD` command starts ends
//! with its worker, however it was started (in the background,
//! double-forked, daemonized, in a session of its own with `setsid`).
//!
//! - The worker is the **subreaper** of its command (Linux's
//!   `PR_SET_CHILD_SUBREAPER`): a descendant whose parent exits becomes the
//!   worker's child instead of init's, so the whole tree stays below the
//!   worker and can be found from it. The worker reaps every child
//!   ([`reap`]): the command's exit is reported, the others are only
//!   collected.
//! - When the command stops, or the worker ends, every descendant left is
//!   signalled ([`end`]): the stop signal first, SIGKILL after a grace.
//! - A worker killed outright (SIGKILL at the graceful timeout) cannot do
//!   that; its orphans then become the master's children (the master is a
//!   subreaper too), and the master ends those that carry this master's
//!   mark in their environment (`ZDR_MASTER_PID`, set for every command and
//!   inherited by what it starts): [`is_ours`].
//!
//! What escapes: a descendant that clears its environment *and* outlives
//! a worker killed outright; and everything, if the master and the worker
//! are both killed at once with SIGKILL. A cgroup (systemd's
//! `KillMode=control-group`, a container's) closes both gaps.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::Pid;

/// Makes this process the subreaper of everything it starts.
pub(crate) fn become_subreaper() -> std::io::Result<()> {
    nix::sys::prctl::set_child_subreaper(true).map_err(std::io::Error::from)
}

/// Every live descendant of `root`, found through /proc (parents before
/// their children). Zombies are left out: they are already gone, and only
/// wait to be reaped.
pub(crate) fn descendants(root: Pid) -> Vec<Pid> {
    let mut children: HashMap<i32, Vec<i32>> = HashMap::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        if let Some((ppid, state)) = parent_and_state(pid) {
            if state != 'Z' && state != 'X' {
                children.entry(ppid).or_default().push(pid);
            }
        }
    }
    let mut found = Vec::new();
    let mut queue = VecDeque::from([root.as_raw()]);
    while let Some(pid) = queue.pop_front() {
        for &child in children.get(&pid).map(Vec::as_slice).unwrap_or_default() {
            found.push(Pid::from_raw(child));
            queue.push_back(child);
        }
    }
    found
}

/// A process's parent and state, from `/proc/PID/stat` (whose command
/// name, in parentheses, may hold anything, spaces and parentheses too).
fn parent_and_state(pid: i32) -> Option<(i32, char)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &stat[stat.rfind(')')? + 1..];
    let mut fields = after.split_ascii_whitespace();
    let state = fields.next()?.chars().next()?;
    let ppid = fields.next()?.parse().ok()?;
    Some((ppid, state))
}

/// Ends every descendant of this process: `signal` first, then SIGKILL
/// to those still there after `grace`, until none is left (or a bound of a
/// few seconds, for a tree that forks as fast as it is killed). Blocks.
/// Returns how many processes were signalled.
pub(crate) fn end(signal: Signal, grace: Duration) -> usize {
    let me = Pid::this();
    let mut signalled = 0;
    let first = descendants(me);
    if first.is_empty() {
        return 0;
    }
    if signal != Signal::SIGKILL && !grace.is_zero() {
        for &pid in &first {
            if kill(pid, signal).is_ok() {
                signalled += 1;
            }
        }
        let until = Instant::now() + grace;
        while Instant::now() < until && !descendants(me).is_empty() {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    let until = Instant::now() + Duration::from_secs(5);
    loop {
        let left = descendants(me);
        if left.is_empty() || Instant::now() >= until {
            break;
        }
        for pid in left {
            if kill(pid, Signal::SIGKILL).is_ok() {
                signalled += 1;
            }
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    signalled
}

/// Reaps every child of this process, from a thread of its own (waiting
/// blocks), until `command` has exited and no child is left: `on_exit`
/// gets the command's status; the others (its orphans, adopted by this
/// subreaper) are only collected.
pub(crate) fn reap(
    command: Pid,
    on_exit: impl FnOnce(WaitStatus) + Send + 'static,
) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("zdr-command".into())
        .spawn(move || {
            let mut on_exit = Some(on_exit);
            loop {
                match waitpid(None, None) {
                    Ok(status @ (WaitStatus::Exited(pid, _) | WaitStatus::Signaled(pid, _, _)))
                        if pid == command =>
                    {
                        if let Some(f) = on_exit.take() {
                            f(status);
                        }
                    }
                    Ok(_) | Err(nix::errno::Errno::EINTR) => {}
                    // No child left. Orphans may still come (a child of
                    // the command that outlives it is adopted only as its
                    // parent exits), but with the command gone the worker
                    // ends them itself ([`end`]); look again a little later.
                    Err(nix::errno::Errno::ECHILD) if on_exit.is_none() => {
                        std::thread::sleep(Duration::from_millis(100));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(100)),
                }
            }
        })?;
    Ok(())
}

/// Ends, with SIGKILL, the orphans a worker killed outright left to the
/// master (its subreaper): the master's children that are not among
/// `known` (its workers and helpers) and carry its mark, with everything
/// below them. A few passes, for a tree caught forking. Returns how many
/// processes were killed.
pub(crate) fn end_orphans(known: &[Pid]) -> usize {
    let me = Pid::this();
    let mut killed = 0;
    for _ in 0..3 {
        let orphans: Vec<Pid> = children(me)
            .into_iter()
            .filter(|p| !known.contains(p) && is_ours(*p, me))
            .collect();
        if orphans.is_empty() {
            break;
        }
        for orphan in orphans {
            let mut tree = descendants(orphan);
            tree.insert(0, orphan);
            for pid in tree {
                if kill(pid, Signal::SIGKILL).is_ok() {
                    killed += 1;
                }
            }
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    killed
}

/// The live children of `parent`.
fn children(parent: Pid) -> Vec<Pid> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            parent_and_state(*pid).is_some_and(|(ppid, state)| {
                ppid == parent.as_raw() && state != 'Z' && state != 'X'
            })
        })
        .map(Pid::from_raw)
        .collect()
}

/// Whether process `pid` carries the mark of this master's commands:
/// `ZDR_MASTER_PID=<master>` in the environment it was started with.
pub(crate) fn is_ours(pid: Pid, master: Pid) -> bool {
    let Ok(environ) = std::fs::read(format!("/proc/{pid}/environ")) else {
        return false;
    };
    let mark = format!("ZDR_MASTER_PID={master}");
    environ.split(|b| *b == 0).any(|var| var == mark.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_parent_is_read_past_a_command_name_with_spaces_and_parentheses() {
        let me = std::process::id() as i32;
        let (ppid, state) = parent_and_state(me).unwrap();
        assert_eq!(ppid, nix::unistd::getppid().as_raw());
        assert!(matches!(state, 'R' | 'S'), "{state}");
    }

    #[test]
    fn descendants_are_found_below_their_root() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let pid = Pid::from_raw(child.id() as i32);
        assert!(descendants(Pid::this()).contains(&pid));
        assert!(!descendants(pid).contains(&Pid::this()));
        let _ = child.kill();
        let _ = child.wait();
        assert!(!descendants(Pid::this()).contains(&pid));
    }

    #[test]
    fn the_mark_is_read_from_the_environment_a_process_started_with() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .env("ZDR_MASTER_PID", "4242")
            .spawn()
            .unwrap();
        let pid = Pid::from_raw(child.id() as i32);
        // The parent may run on while the child's exec is still setting
        // up its new environment (vfork): read it once it is there.
        let until = Instant::now() + Duration::from_secs(30);
        while !is_ours(pid, Pid::from_raw(4242)) && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(is_ours(pid, Pid::from_raw(4242)));
        assert!(!is_ours(pid, Pid::from_raw(424)));
        let _ = child.kill();
        let _ = child.wait();
    }
}
