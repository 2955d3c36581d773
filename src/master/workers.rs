//! The master's hands on its worker processes: starting one, reaping the
//! ones that exited, and reading what their scoreboard slots say.

use std::collections::hash_map::RandomState;
use std::collections::VecDeque;
use std::hash::{BuildHasher, Hasher};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;

use nix::errno::Errno;
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use tracing::error;

use super::machine::{Event, Exit, Observed, SpawnFailure};
use super::output::Output;
use super::{report, spawn, Master};
use crate::boot::WorkerSpec;
use crate::recycle::RequestLimit;
use crate::scoreboard::{monotonic_ms, SlotState};

/// A worker process, as the master holds it.
pub(crate) struct Handle {
    pub(crate) pid: Pid,
    /// Its scoreboard slot.
    pub(crate) slot: usize,
    /// Its stderr, forwarded to the error log.
    pub(crate) output: Option<Output>,
}

impl Master {
    /// Starts a worker of generation `id`; returns what happened.
    pub(super) fn spawn_worker(&mut self, id: u64) -> Event {
        let failed = |why| Event::SpawnFailed {
            generation: id,
            why,
        };
        let Some(generation) = self.generations.get(id) else {
            return failed(SpawnFailure::Os(format!(
                "generation {id} is no longer kept"
            )));
        };
        let Some(slot_index) = self.board.free_slot() else {
            return failed(SpawnFailure::NoSlot);
        };
        let settings = Arc::clone(&generation.settings);
        let (app, exe) = (generation.app.clone(), generation.exe.clone());
        let handoff = self.handoff.as_ref().map(crate::handoff::Pair::raw_fds);
        let slot = self.board.slot(slot_index);
        slot.claim(id);
        if let Some(begun) = self.board.begun(slot_index) {
            begun.clear();
        }
        if let Some(held) = self.board.held(slot_index) {
            held.clear();
        }
        let request_limit = RequestLimit::new(
            settings.max_requests,
            random_below(settings.max_requests_jitter + 1),
        );
        let spec = WorkerSpec {
            generation: id,
            slot: slot_index,
            master_pid: self.pid,
            settings: (*settings).clone(),
            listeners: self
                .listeners
                .iter()
                .filter(|l| settings.bind.contains(&l.addr))
                .map(|l| l.inherited())
                .collect(),
            scoreboard_fd: self.board.raw_fd(),
            doorbell_fd: self.bell.raw_fd(),
            request_limit,
            exe_fd: None,
            handoff,
        };
        let (output, stderr) = match Output::pipe() {
            Ok(pair) => pair,
            Err(e) => {
                self.board.release(slot_index);
                return failed(SpawnFailure::Os(format!(
                    "cannot start a worker: no pipe for its output: {e}"
                )));
            }
        };
        let result = match self.spawn_by_loader(id, &spec, stderr, output.fd().as_raw_fd()) {
            Ok(spawned) => spawned,
            Err(stderr) => match app {
                Some(app) => {
                    let mut keep: Vec<RawFd> = spec.listeners.iter().map(|l| l.fd).collect();
                    keep.extend(spec.handoff.iter().flatten());
                    let mut close = self.own_fds();
                    close.retain(|fd| !keep.contains(fd));
                    close.push(output.fd().as_raw_fd());
                    spawn::fork(
                        spec,
                        spawn::ForkParts {
                            app,
                            board: Arc::clone(&self.board),
                            bell: &self.bell,
                            signals: &self.signals,
                            close,
                            stderr,
                            loader: &self.loader,
                        },
                    )
                }
                None => {
                    let name = settings.proc_name.as_deref().unwrap_or(&self.name);
                    let title = super::title::worker(name, id);
                    let exe = exe.unwrap_or_else(|| Arc::new(spawn::Executable::pin(&self.exe)));
                    spawn::exec(&exe, &title, &spec, stderr)
                }
            },
        };
        match result {
            Ok(pid) => {
                self.board.slot(slot_index).set_pid(pid.as_raw() as u32);
                self.handles.push(Handle {
                    pid,
                    slot: slot_index,
                    output: Some(output),
                });
                Event::Spawned {
                    generation: id,
                    pid,
                    request_limit,
                }
            }
            Err(e) => {
                self.board.release(slot_index);
                failed(SpawnFailure::Os(format!(
                    "cannot start a worker from {}: {e}",
                    self.exe.display()
                )))
            }
        }
    }

    /// Collects every exited child: workers become [`Event::Exited`], the
    /// binary-upgrade check its verdict; any other child (an orphan
    /// adopted as PID 1) is only reaped.
    pub(super) fn reap(&mut self, events: &mut VecDeque<Event>) {
        loop {
            let (pid, status, code) = match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(pid, code)) => {
                    (pid, format!("exited with status {code}"), Some(code))
                }
                Ok(WaitStatus::Signaled(pid, sig, _)) => {
                    (pid, format!("was killed by {sig}"), None)
                }
                Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => break,
                Ok(_) | Err(Errno::EINTR) => continue,
                Err(e) => {
                    error!(
                        event = crate::logging::LogEvent::MasterError.name(),
                        "waitpid failed: {e}"
                    );
                    break;
                }
            };
            if self.upgrade.as_ref().is_some_and(|u| u.pid == pid) {
                events.push_back(self.upgrade_check_ended(status, code == Some(0)));
                continue;
            }
            let Some(index) = self.handles.iter().position(|h| h.pid == pid) else {
                continue;
            };
            let handle = self.handles.remove(index);
            if code.is_none() {
                // Killed outright: what its command started was left to
                // this master (a subreaper), and ends here.
                let mut known: Vec<Pid> = self.handles.iter().map(|h| h.pid).collect();
                known.extend(self.upgrade.as_ref().map(|u| u.pid));
                known.extend(self.generations.loader_pids());
                let ended = crate::process_tree::end_orphans(&known);
                if ended > 0 {
                    tracing::warn!(
                        event = crate::logging::LogEvent::WorkerDied.name(),
                        "Worker (pid: {pid}) {status}: ended the {ended} process(es) its command \
                         had left running"
                    );
                }
            }
            // What is left in its command's cgroup (where there is one):
            // nothing after a worker's own stop; after a kill, whatever
            // its command had started, found by the kernel's count.
            let in_group = crate::cgroup::end(std::process::id(), pid.as_raw() as u32);
            if in_group > 0 {
                tracing::warn!(
                    event = crate::logging::LogEvent::WorkerDied.name(),
                    "Worker (pid: {pid}) {status}: ended the {in_group} process(es) left in its \
                     command's cgroup"
                );
            }
            let tail = handle.output.map(Output::finish).unwrap_or_default();
            let slot = self.board.slot(handle.slot);
            let exit = Exit {
                status,
                gave_up: code == Some(crate::boot::GAVE_UP),
                state: slot.state(),
                message: slot.message(),
                requests: slot.requests(),
                tail,
            };
            self.totals.requests.add(&slot.counters());
            self.board.release(handle.slot);
            events.push_back(Event::Exited { pid, exit });
        }
    }

    /// What every worker's slot says now (with its memory, once a second
    /// when some worker has a limit).
    pub(super) fn observe(&self) -> Vec<Observed> {
        let now_ms = monotonic_ms();
        let memory = self.machine.wants_memory(std::time::Instant::now());
        // Read once for every worker, and only when memory is measured.
        let parents = if memory {
            report::parents()
        } else {
            Vec::new()
        };
        self.handles
            .iter()
            .map(|h| {
                let slot = self.board.slot(h.slot);
                Observed {
                    pid: h.pid,
                    state: slot.state(),
                    requests: slot.requests(),
                    silent_ms: now_ms.saturating_sub(slot.heartbeat_ms()),
                    in_flight: slot.in_flight(),
                    owned_bytes: memory.then(|| report::tree_owned_bytes(h.pid, &parents)),
                    counters: slot.counters(),
                }
            })
            .collect()
    }

    /// Workers that serve and whose slot says they accept, for the
    /// scoreboard's header (workers read it to fail readiness when none is
    /// left).
    pub(super) fn accepting(&self) -> usize {
        self.machine
            .workers()
            .iter()
            .filter(|w| w.role.serves())
            .filter_map(|w| self.handles.iter().find(|h| h.pid == w.pid))
            .filter(|h| self.board.slot(h.slot).state() == SlotState::Ready)
            .count()
    }

    /// The slot of worker `pid`.
    pub(super) fn slot_of(&self, pid: Pid) -> Option<&crate::scoreboard::Slot> {
        let h = self.handles.iter().find(|h| h.pid == pid)?;
        Some(self.board.slot(h.slot))
    }

    /// What worker `pid` holds now, beside its slot (see
    /// [`crate::scoreboard::Held`]).
    pub(super) fn held_of(&self, pid: Pid) -> Option<&crate::scoreboard::Held> {
        let h = self.handles.iter().find(|h| h.pid == pid)?;
        self.board.held(h.slot)
    }

    /// The requests worker `pid` names as in flight (see
    /// [`crate::scoreboard::Begun`]), as a phrase for a log line:
    /// `GET /report (for 31.2s), …`, or why there are none to name.
    pub(super) fn named_in_flight(&self, pid: Pid) -> String {
        let Some(h) = self.handles.iter().find(|h| h.pid == pid) else {
            return "not known".to_owned();
        };
        let Some(begun) = self.board.begun(h.slot) else {
            return "not named by its build".to_owned();
        };
        let now_ms = crate::scoreboard::monotonic_ms();
        let named: Vec<String> = begun
            .named()
            .into_iter()
            .map(|n| {
                let secs = now_ms.saturating_sub(n.began_ms) as f64 / 1000.0;
                format!("{} (for {secs:.1}s)", n.what)
            })
            .collect();
        if named.is_empty() {
            "none".to_owned()
        } else {
            named.join(", ")
        }
    }
}

/// A random number in `0..n` (n > 0), from the standard library's per-process
/// random keys.
fn random_below(n: u64) -> u64 {
    let mut h = RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos(),
    );
    h.finish() % n.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jitter_stays_in_range() {
        for _ in 0..200 {
            assert!(random_below(11) <= 10);
        }
        assert_eq!(random_below(1), 0);
    }
}
