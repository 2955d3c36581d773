//! What the master reports: `zdr status` and the metrics, read from the
//! decider's workers, their scoreboard slots and /proc.

use nix::unistd::Pid;

use super::Master;
use crate::control::{Status, WorkerStatus};
use crate::scoreboard::SlotState;

impl Master {
    /// The figures a metrics scrape reports: the counters of the living
    /// workers plus those of the ones that exited.
    pub(super) fn metrics(&self) -> crate::metrics::Snapshot {
        let mut snapshot = self.totals.clone();
        for w in self.machine.workers() {
            let Some(slot) = self.slot_of(w.pid) else {
                continue;
            };
            let counters = slot.counters();
            let in_flight = u64::from(slot.in_flight());
            snapshot.parked += self.held_of(w.pid).map_or(0, |h| h.parked());
            snapshot.in_flight += in_flight;
            if w.role.serves() {
                snapshot.busy_workers += u64::from(in_flight > 0);
                snapshot.serving_workers += 1;
            }
            snapshot.requests.add(&counters);
            *snapshot
                .workers
                .entry((w.generation, w.state_name(slot.state()).to_owned()))
                .or_default() += 1;
        }
        snapshot.canary_workers = self.machine.canary_workers() as u64;
        snapshot.connections = self.board.total_connections();
        snapshot.client_timeouts = self.board.client_timeouts();
        snapshot.connections_handed_over = self.board.handed_over();
        snapshot.handoffs = self.board.handoffs();
        snapshot.made_room = self.board.made_room();
        snapshot.request_timeouts = self.board.request_timeouts();
        snapshot.requests_shed = self.board.shed();
        snapshot
    }

    /// The server's state, for `zdr status`.
    pub(super) fn status(&self) -> Status {
        let parents = parents();
        let workers = self
            .machine
            .workers()
            .iter()
            .filter_map(|w| {
                let slot = self.slot_of(w.pid)?;
                Some(WorkerStatus {
                    pid: w.pid.as_raw() as u32,
                    generation: w.generation,
                    state: w.state_name(slot.state()).to_owned(),
                    age_secs: w.spawned.elapsed().as_secs_f64(),
                    requests: slot.requests(),
                    connections: slot.connections(),
                    parked: self.held_of(w.pid).map_or(0, |h| h.parked()),
                    accepting: slot.state() == SlotState::Ready,
                    rss_bytes: rss_bytes(w.pid),
                    owned_bytes: tree_owned_bytes(w.pid, &parents),
                })
            })
            .collect();
        Status {
            master_pid: self.pid,
            state: self.machine.state().name().to_owned(),
            uptime_secs: self.started_at.elapsed().as_secs_f64(),
            generation: self.machine.serving().map(|g| g.id),
            booting_generation: self.machine.booting().map(|g| g.id),
            rollout: self.machine.rollout_summary(std::time::Instant::now()),
            bind: self.listeners.iter().map(|l| l.display_addr()).collect(),
            target_workers: self.machine.target(),
            workers,
            last_reload: self.last_reload.clone(),
        }
    }
}

/// A process's resident memory in bytes, from /proc (0 if it is gone).
pub(super) fn rss_bytes(pid: Pid) -> u64 {
    let page = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
        .ok()
        .flatten()
        .unwrap_or(4096) as u64;
    std::fs::read_to_string(format!("/proc/{pid}/statm"))
        .ok()
        .and_then(|t| t.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map_or(0, |pages| pages * page)
}

/// Where a process's threads are, from /proc: each one's name, state and
/// the kernel function it waits in (`zdr (sleeping in
/// hrtimer_nanosleep)`, `zdr (stopped)`), and its children's pids (a `--
/// CMD` worker's command). For the log line of a worker killed at
/// `--timeout`.
pub(super) fn where_stuck(pid: Pid) -> String {
    let mut threads = Vec::new();
    let mut children = Vec::new();
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .flatten();
    for task in tasks {
        let dir = task.path();
        let read = |name: &str| std::fs::read_to_string(dir.join(name)).unwrap_or_default();
        let comm = read("comm").trim().to_owned();
        let stat = read("stat");
        let state = stat
            .rsplit_once(')')
            .and_then(|(_, after)| after.split_whitespace().next())
            .map_or("?", |s| match s {
                "R" => "running",
                "S" => "sleeping",
                "D" => "in uninterruptible wait",
                "T" | "t" => "stopped",
                "Z" => "a zombie",
                _ => "?",
            });
        let wchan = read("wchan");
        let thread = match wchan.trim() {
            "" | "0" => format!("{comm} ({state})"),
            w => format!("{comm} ({state} in {w})"),
        };
        threads.push(thread);
        children.extend(read("children").split_whitespace().map(str::to_owned));
    }
    if threads.is_empty() {
        return "gone".to_owned();
    }
    let mut said = format!("threads: {}", threads.join(", "));
    if !children.is_empty() {
        said.push_str(&format!("; its command: pid {}", children.join(", ")));
    }
    said
}

/// Every process's parent, read from /proc once for a round of
/// [`tree_owned_bytes`].
pub(super) fn parents() -> Vec<(i32, i32)> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter_map(|p| {
            let stat = std::fs::read_to_string(format!("/proc/{p}/stat")).ok()?;
            let after = stat.rsplit_once(')')?.1;
            let ppid = after.split_whitespace().nth(1)?.parse().ok()?;
            Some((p, ppid))
        })
        .collect()
}

/// The memory a worker owns with its descendants (a `-- CMD` command and
/// whatever it starts): the sum of each one's [`owned_bytes`], given
/// every process's parent.
pub(super) fn tree_owned_bytes(pid: Pid, parents: &[(i32, i32)]) -> u64 {
    let mut family = vec![pid.as_raw()];
    let mut i = 0;
    while i < family.len() {
        let parent = family[i];
        family.extend(
            parents
                .iter()
                .filter(|(_, pp)| *pp == parent)
                .map(|(p, _)| *p),
        );
        i += 1;
    }
    family
        .into_iter()
        .map(|p| owned_bytes(Pid::from_raw(p)))
        .sum()
}

/// The memory a process owns alone (its private pages, "USS"), from
/// /proc/PID/smaps_rollup: unlike its resident size, it leaves out pages
/// shared copy-on-write with the master under `--preload`, which would
/// otherwise put every worker over a memory limit at once. Falls back to
/// the resident size where the kernel has no rollup.
pub(super) fn owned_bytes(pid: Pid) -> u64 {
    let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")) else {
        return rss_bytes(pid);
    };
    let kib: u64 = text
        .lines()
        .filter(|l| l.starts_with("Private_Clean:") || l.starts_with("Private_Dirty:"))
        .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        .sum();
    kib * 1024
}
