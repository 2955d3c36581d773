//! The decider driven through its table: a simulated shell starts "workers"
//! (pids from a counter), marks them ready, exits them and moves a clock;
//! the tests read the decisions. Nothing here forks or sleeps.

use std::collections::BTreeMap;

use super::*;

const SEC: Duration = Duration::from_secs(1);

fn settings(workers: usize) -> Settings {
    let mut s = Settings::resolve(Default::default()).expect("defaults resolve");
    s.workers = workers;
    s.graceful_timeout = 30.0;
    s.boot_timeout = 30.0;
    s.timeout = 30.0;
    s.shutdown_delay = 0.0;
    s
}

/// What a simulated worker's slot says.
#[derive(Debug, Clone)]
struct Slot {
    state: SlotState,
    requests: u64,
    silent_ms: u64,
    in_flight: u32,
    owned: u64,
    counters: RequestCounters,
}

/// The decider with a pretend shell around it.
struct Sim {
    m: Machine,
    now: Instant,
    next_pid: i32,
    slots: BTreeMap<i32, Slot>,
    generation_of: BTreeMap<i32, u64>,
    /// Settings the next Prepare loads, or why it fails.
    next_config: Result<Settings, String>,
    /// Every action so far.
    log: Vec<Action>,
    /// Whether Spawn fails for want of a slot.
    slots_full: bool,
    exited: Option<u8>,
}

impl Sim {
    /// A server started with `s`, before its first tick.
    fn start(s: Settings) -> Sim {
        let now = Instant::now();
        let mut sim = Sim {
            m: Machine::new(s.workers, 1, now),
            now,
            next_pid: 100,
            slots: BTreeMap::new(),
            generation_of: BTreeMap::new(),
            next_config: Ok(s.clone()),
            log: Vec::new(),
            slots_full: false,
            exited: None,
        };
        sim.feed(Event::Prepared {
            generation: 1,
            client: None,
            result: Ok(Arc::new(s)),
        });
        sim
    }

    /// A server whose first generation of `workers` serves.
    fn serving(workers: usize) -> Sim {
        let mut sim = Sim::start(settings(workers));
        sim.tick();
        sim.ready_all();
        assert_eq!(sim.m.state(), State::Serving);
        sim.log.clear();
        sim
    }

    /// Feeds an event and everything the pretend shell answers; returns
    /// the actions it caused.
    fn feed(&mut self, event: Event) -> Vec<Action> {
        let mut queue = vec![event];
        let mut all = Vec::new();
        while !queue.is_empty() {
            let event = queue.remove(0);
            for action in self.m.handle(event, self.now) {
                match &action {
                    Action::Prepare { generation, client } => {
                        queue.push(Event::Prepared {
                            generation: *generation,
                            client: *client,
                            result: self.next_config.clone().map(Arc::new),
                        });
                    }
                    Action::Spawn { generation } if self.slots_full => {
                        queue.push(Event::SpawnFailed {
                            generation: *generation,
                            why: SpawnFailure::NoSlot,
                        })
                    }
                    Action::Spawn { generation } => {
                        let pid = self.next_pid;
                        self.next_pid += 1;
                        self.slots.insert(
                            pid,
                            Slot {
                                state: SlotState::Booting,
                                requests: 0,
                                silent_ms: 0,
                                in_flight: 0,
                                owned: 0,
                                counters: RequestCounters::default(),
                            },
                        );
                        self.generation_of.insert(pid, *generation);
                        queue.push(Event::Spawned {
                            generation: *generation,
                            pid: Pid::from_raw(pid),
                            request_limit: None,
                        });
                    }
                    Action::Exit(code) => self.exited = Some(*code),
                    _ => {}
                }
                all.push(action);
            }
        }
        self.log.extend(all.iter().cloned());
        all
    }

    /// `workers` ready workers of generation 1, each with a request limit
    /// of `limit` (the pretend shell gives none; set as the real one
    /// would).
    fn recycling(workers: usize, limit: u64) -> Sim {
        let mut s = settings(workers);
        s.max_requests = limit;
        let mut sim = Sim::start(s);
        sim.tick();
        for w in &mut sim.m.workers {
            w.request_limit = RequestLimit::new(limit, 0);
        }
        sim.ready_all();
        sim
    }

    fn tick(&mut self) -> Vec<Action> {
        let memory = self.m.wants_memory(self.now);
        let observed = self
            .slots
            .iter()
            .map(|(pid, s)| Observed {
                pid: Pid::from_raw(*pid),
                state: s.state,
                requests: s.requests,
                silent_ms: s.silent_ms,
                in_flight: s.in_flight,
                owned_bytes: memory.then_some(s.owned),
                counters: s.counters.clone(),
            })
            .collect();
        self.feed(Event::Tick(observed))
    }

    fn advance(&mut self, d: Duration) -> Vec<Action> {
        self.now += d;
        self.tick()
    }

    fn signal(&mut self, sig: Sig) -> Vec<Action> {
        self.feed(Event::Signal(sig))
    }

    fn pids(&self, generation: u64) -> Vec<i32> {
        self.m
            .workers()
            .iter()
            .filter(|w| w.generation == generation)
            .map(|w| w.pid.as_raw())
            .collect()
    }

    fn role(&self, pid: i32) -> Role {
        self.m
            .workers()
            .iter()
            .find(|w| w.pid.as_raw() == pid)
            .map(|w| w.role)
            .expect("a living worker")
    }

    fn set_state(&mut self, pid: i32, state: SlotState) {
        if let Some(s) = self.slots.get_mut(&pid) {
            s.state = state;
        }
    }

    /// Every booting worker becomes ready; then a tick.
    fn ready_all(&mut self) -> Vec<Action> {
        for s in self.slots.values_mut() {
            if s.state == SlotState::Booting {
                s.state = SlotState::Ready;
            }
        }
        self.tick()
    }

    /// Worker `pid` exits with `status`.
    fn exit(&mut self, pid: i32, status: &str) -> Vec<Action> {
        let slot = self.slots.remove(&pid).expect("a simulated worker");
        self.feed(Event::Exited {
            pid: Pid::from_raw(pid),
            exit: Exit {
                status: status.into(),
                gave_up: false,
                state: slot.state,
                message: String::new(),
                requests: slot.requests,
                tail: Vec::new(),
            },
        })
    }

    /// Every worker sent SIGTERM, SIGQUIT or SIGKILL exits.
    fn exit_signalled(&mut self) -> Vec<Action> {
        let pids: Vec<i32> = self
            .m
            .workers()
            .iter()
            .filter(|w| !w.role.serves())
            .map(|w| w.pid.as_raw())
            .collect();
        let mut all = Vec::new();
        for pid in pids {
            all.extend(self.exit(pid, "exited with status 0"));
        }
        all.extend(self.tick());
        all
    }
}

fn signals_to(actions: &[Action], sig: Signal) -> Vec<i32> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Signal(pid, s) if *s == sig => Some(pid.as_raw()),
            _ => None,
        })
        .collect()
}

fn spawns(actions: &[Action]) -> Vec<u64> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Spawn { generation } => Some(*generation),
            _ => None,
        })
        .collect()
}

fn logged(actions: &[Action], level: Level, text: &str) -> bool {
    actions
        .iter()
        .any(|a| matches!(a, Action::Log(l, _, m) if *l == level && m.contains(text)))
}

fn answers(actions: &[Action], what: Awaited) -> Vec<Response> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Answer(w, r) if *w == what => Some(r.clone()),
            _ => None,
        })
        .collect()
}

fn client(id: u64, wait: bool) -> Client {
    Client { id, wait }
}

#[test]
fn a_superseded_reload_wait_follows_the_newer_reload_and_is_never_told_of_a_rollback() {
    let mut sim = Sim::serving(2);
    sim.feed(Event::Reload {
        client: client(9, true),
        canary: None,
    });
    sim.tick();
    assert_eq!(sim.m.booting().map(|g| g.id), Some(2));
    // A HUP arrives while generation 2 boots.
    let actions = sim.signal(Sig::Hup);
    let follow = actions
        .iter()
        .position(|a| *a == Action::Follow { from: 2, to: 3 })
        .expect("the waiting client follows generation 3");
    // Its own abandoned rollout is answered only after the client moved on.
    let abandoned = actions
        .iter()
        .position(|a| matches!(a, Action::Answer(Awaited::Reload(2), _)));
    assert!(abandoned.is_none_or(|i| i > follow), "{actions:?}");
    assert!(logged(
        &actions,
        Level::WARN,
        "superseded by a newer reload (generation 3)"
    ));
    // Generation 3 comes up: the answer the client now waits for is a
    // success.
    sim.tick();
    let mut done = sim.ready_all();
    for _ in 0..5 {
        done.extend(sim.exit_signalled());
        done.extend(sim.tick());
    }
    let answered = answers(&done, Awaited::Reload(3));
    assert!(answered.len() == 1 && answered[0].ok, "{done:?}");
}

#[test]
fn a_reload_during_the_first_boot_keeps_the_workers_that_answer() {
    // Generation 1 boots 2 workers; one answers, then a reload comes and
    // its generation fails to boot.
    let mut sim = Sim::start(settings(2));
    sim.tick();
    let first = sim.pids(1);
    sim.set_state(first[0], SlotState::Ready);
    sim.tick();
    assert_eq!(sim.m.state(), State::Booting);
    sim.next_config = Ok(settings(2));
    sim.signal(Sig::Hup);
    sim.tick();
    // The first generation serves on; the reload boots beside it.
    assert_eq!(sim.m.state(), State::Reloading);
    assert_eq!(sim.m.serving().map(|g| g.id), Some(1));
    assert!(first.iter().all(|p| sim.role(*p) == Role::Active));
    let second = sim.pids(2);
    assert!(!second.is_empty());
    sim.exit(second[0], "exited with status 3");
    sim.tick();
    // Rolled back to generation 1, which is still there and completes.
    assert_eq!(sim.m.state(), State::Serving, "{:?}", sim.log);
    assert_eq!(sim.m.serving().map(|g| g.id), Some(1));
    assert_eq!(sim.exited, None);
    assert!(logged(
        &sim.log,
        Level::INFO,
        "serves with 1 of 2 workers ready"
    ));
    sim.exit_signalled();
    sim.ready_all();
    assert_eq!(ready_serving(&sim), 2);
    // With no worker ready yet, a reload still supersedes the boot, and
    // says so; it completes as any reload does, once the first
    // generation's workers have gone.
    let mut sim = Sim::start(settings(2));
    sim.tick();
    let first = sim.pids(1);
    sim.next_config = Ok(settings(2));
    let actions = sim.signal(Sig::Hup);
    assert!(logged(
        &actions,
        Level::WARN,
        "The start of generation 1 superseded by a newer reload (generation 2)"
    ));
    assert_eq!(sim.m.state(), State::Booting);
    assert_eq!(sim.m.booting().map(|g| g.id), Some(2));
    sim.tick();
    sim.ready_all();
    assert_eq!(sim.m.state(), State::Serving, "{:?}", sim.log);
    assert!(
        !logged(&sim.log, Level::INFO, "Reload to generation 2 complete"),
        "complete while a worker of generation 1 runs"
    );
    for pid in first {
        sim.exit(pid, "exited with status 0");
    }
    sim.tick();
    assert!(
        logged(&sim.log, Level::INFO, "Reload to generation 2 complete"),
        "{:?}",
        sim.log
    );
}

#[test]
fn start_boots_then_serves() {
    let mut sim = Sim::start(settings(3));
    assert_eq!(sim.m.state(), State::Booting);
    assert_eq!(spawns(&sim.tick()), vec![1, 1, 1]);
    let actions = sim.ready_all();
    assert_eq!(sim.m.state(), State::Serving);
    assert!(logged(
        &actions,
        Level::INFO,
        "Ready: generation 1, 3 workers"
    ));
    assert!(actions
        .iter()
        .any(|a| matches!(a, Action::Notify(Notice::Ready(_)))));
}

#[test]
fn hup_rolls_out_and_drains_the_old_generation_once_all_new_are_ready() {
    let mut sim = Sim::serving(2);
    let old = sim.pids(1);
    sim.feed(Event::Reload {
        client: client(7, true),
        canary: None,
    });
    assert_eq!(sim.m.state(), State::Reloading);
    assert!(sim.log.contains(&Action::Hold(7, Awaited::Reload(2))));
    assert_eq!(spawns(&sim.tick()), vec![2, 2]);
    // One new worker ready: nothing is drained yet.
    let first = sim.pids(2)[0];
    sim.set_state(first, SlotState::Ready);
    assert!(signals_to(&sim.tick(), Signal::SIGTERM).is_empty());
    let actions = sim.ready_all();
    assert_eq!(signals_to(&actions, Signal::SIGTERM), old);
    assert_eq!(sim.m.state(), State::Serving);
    assert!(actions.contains(&Action::Forget { generation: 1 }));
    // `reload --wait` is answered once no old worker accepts.
    assert!(answers(&actions, Awaited::Reload(2)).is_empty());
    for pid in &old {
        sim.set_state(*pid, SlotState::Draining);
    }
    let answered = answers(&sim.tick(), Awaited::Reload(2));
    assert_eq!(answered.len(), 1);
    assert!(answered[0].ok);
    for pid in old {
        assert!(logged(
            &sim.exit(pid, "exited with status 0"),
            Level::INFO,
            "Worker exiting"
        ));
    }
    assert!(logged(
        &sim.log,
        Level::INFO,
        "Reload to generation 2 complete"
    ));
}

#[test]
fn a_configuration_that_does_not_load_changes_nothing() {
    let mut sim = Sim::serving(2);
    sim.next_config = Err("Reload aborted, configuration unchanged: bad".into());
    let actions = sim.feed(Event::Reload {
        client: client(3, true),
        canary: None,
    });
    assert_eq!(sim.m.state(), State::Serving);
    assert!(matches!(&actions[..], [.., Action::Reply(3, r)] if !r.ok));
    assert!(spawns(&sim.tick()).is_empty());
    // The generation number is not used up.
    sim.next_config = Ok(settings(2));
    sim.signal(Sig::Hup);
    assert_eq!(sim.m.booting().map(|g| g.id), Some(2));
}

#[test]
fn a_failing_new_generation_is_rolled_back_and_the_old_keeps_serving() {
    let mut sim = Sim::serving(2);
    let old = sim.pids(1);
    sim.feed(Event::Reload {
        client: client(9, true),
        canary: None,
    });
    sim.tick();
    let new = sim.pids(2);
    let actions = sim.exit(new[0], "exited with status 3");
    let actions = [actions, sim.tick()].concat();
    assert!(logged(
        &actions,
        Level::ERROR,
        "Reload to generation 2 rolled back"
    ));
    assert_eq!(signals_to(&actions, Signal::SIGTERM), vec![new[1]]);
    let answered = answers(&actions, Awaited::Reload(2));
    assert!(answered.len() == 1 && !answered[0].ok);
    assert_eq!(sim.m.state(), State::Serving);
    assert_eq!(sim.m.serving().map(|g| g.id), Some(1));
    assert!(old.iter().all(|p| sim.role(*p) == Role::Active));
}

#[test]
fn the_boot_timeout_rolls_back() {
    let mut sim = Sim::serving(1);
    sim.signal(Sig::Hup);
    sim.tick();
    let actions = sim.advance(31 * SEC);
    assert!(logged(
        &actions,
        Level::ERROR,
        "only 0 of 1 workers were ready after the boot timeout"
    ));
    assert_eq!(sim.m.state(), State::Serving);
}

#[test]
fn a_first_generation_that_cannot_boot_stops_the_server_with_exit_code_1() {
    let mut sim = Sim::start(settings(2));
    sim.tick();
    let pid = sim.pids(1)[0];
    sim.exit(pid, "exited with status 3");
    let actions = sim.tick();
    assert!(logged(&actions, Level::ERROR, "Cannot start"));
    assert_eq!(sim.m.state(), State::Stopping(StopKind::Fast));
    sim.exit_signalled();
    assert_eq!(sim.exited, Some(1));
}

/// Issue row 1: a stop reaches a worker in every phase of its life, and the
/// booting workers of a superseded generation are killed, never left to
/// start accepting.
#[test]
fn a_stop_reaches_booting_workers_and_a_superseded_generation_is_killed() {
    let mut sim = Sim::serving(2);
    sim.signal(Sig::Hup);
    sim.tick();
    let booting = sim.pids(2);
    let actions = sim.signal(Sig::Hup);
    assert_eq!(signals_to(&actions, Signal::SIGTERM), booting);
    assert!(logged(&actions, Level::WARN, "superseded"));
    sim.tick();
    let newest = sim.pids(3);
    assert_eq!(newest.len(), 2);
    let actions = sim.signal(Sig::Term);
    let mut stopped = signals_to(&actions, Signal::SIGTERM);
    stopped.sort();
    let mut expected = [sim.pids(1), newest].concat();
    expected.sort();
    assert_eq!(stopped, expected, "every worker, booting or not, is told");
    // Booting workers exit at once; the old ones drain.
    sim.exit_signalled();
    assert_eq!(sim.exited, Some(0));
}

/// Issue row 2: HUP after WINCH starts exactly one generation.
#[test]
fn hup_after_winch_starts_exactly_one_generation() {
    let mut sim = Sim::serving(2);
    let actions = sim.signal(Sig::Winch);
    assert_eq!(signals_to(&actions, Signal::SIGTERM), sim.pids(1));
    sim.exit_signalled();
    assert_eq!(sim.m.state(), State::Paused);
    assert!(spawns(&sim.advance(SEC)).is_empty(), "paused: no top-up");
    sim.signal(Sig::Hup);
    assert_eq!(spawns(&sim.tick()), vec![2, 2]);
    assert!(spawns(&sim.advance(SEC)).is_empty());
    sim.ready_all();
    assert_eq!(sim.m.state(), State::Serving);
    assert!(spawns(&sim.advance(SEC)).is_empty());
    assert_eq!(sim.m.workers().len(), 2);
}

/// Issue row 3: scale past the bound is refused; TTIN stops at it.
#[test]
fn scaling_is_bounded() {
    let mut sim = Sim::serving(1);
    let actions = sim.feed(Event::Scale {
        workers: 100_000,
        client: 4,
    });
    assert!(
        matches!(&actions[..], [Action::Reply(4, r)] if !r.ok && r.message.contains("at most"))
    );
    let actions = sim.feed(Event::Scale {
        workers: 0,
        client: 5,
    });
    assert!(matches!(&actions[..], [Action::Reply(5, r)] if !r.ok));
    sim.feed(Event::Scale {
        workers: MAX_WORKERS,
        client: 6,
    });
    let actions = sim.signal(Sig::Ttin);
    assert!(logged(&actions, Level::WARN, "that is the most"));
    assert_eq!(sim.m.target(), MAX_WORKERS);
    sim.signal(Sig::Ttou);
    assert_eq!(sim.m.target(), MAX_WORKERS - 1);
}

#[test]
fn a_full_scoreboard_is_retried_and_said_once_per_ten_seconds() {
    let mut sim = Sim::serving(1);
    sim.slots_full = true;
    sim.signal(Sig::Ttin);
    let first = sim.tick();
    assert!(logged(&first, Level::ERROR, "scoreboard slots are in use"));
    let mut said = 0;
    for _ in 0..9 {
        let actions = sim.advance(SEC);
        said += usize::from(logged(&actions, Level::ERROR, "slots are in use"));
    }
    assert_eq!(said, 0);
    assert!(logged(&sim.advance(SEC), Level::ERROR, "slots are in use"));
}

/// Issue row 5: at most MAX_SURGE replacements in flight, whatever the
/// number of workers at their limit; a worker past it is drained as soon
/// as its replacement is ready.
#[test]
fn recycling_keeps_within_the_surge_budget() {
    let mut sim = Sim::recycling(3, 100);
    let first = sim.pids(1);
    for pid in &first {
        sim.slots.get_mut(pid).expect("slot").requests = 100;
    }
    let mut most = 0;
    let mut replaced = 0;
    for _ in 0..20 {
        let actions = [sim.tick(), sim.ready_all()].concat();
        most = most.max(sim.m.workers().len());
        for pid in signals_to(&actions, Signal::SIGTERM) {
            assert!(first.contains(&pid));
            replaced += 1;
            sim.exit(pid, "exited with status 0");
        }
    }
    assert_eq!(replaced, 3, "every worker at its limit was replaced");
    assert_eq!(most, 3 + MAX_SURGE);
    assert!(sim
        .log
        .contains(&Action::Record(Record::Restart(RestartCause::MaxRequests))));
}

/// A worker's replacement starts in the last eighth of its request limit,
/// so that at saturation it is ready when the limit is reached; the worker
/// serves on until then and is drained at its limit, not before.
#[test]
fn a_replacement_starts_as_its_worker_nears_the_limit_and_waits_for_it() {
    let mut sim = Sim::recycling(2, 100);
    let [a, b] = [sim.pids(1)[0], sim.pids(1)[1]];
    sim.slots.get_mut(&a).expect("slot").requests = 87;
    sim.tick();
    assert_eq!(sim.role(a), Role::Active, "not yet in its last eighth");
    sim.slots.get_mut(&a).expect("slot").requests = 88;
    let actions = sim.tick();
    assert_eq!(sim.role(a), Role::Retiring);
    assert!(logged(
        &actions,
        Level::INFO,
        "nears its request limit (88 of 100)"
    ));
    let actions = [sim.tick(), sim.ready_all()].concat();
    assert_eq!(sim.m.workers().len(), 3, "its replacement started");
    assert!(signals_to(&actions, Signal::SIGTERM).is_empty());
    // Ready, but the worker has requests left: it serves them.
    assert!(signals_to(&sim.tick(), Signal::SIGTERM).is_empty());
    sim.slots.get_mut(&a).expect("slot").requests = 100;
    let actions = sim.tick();
    assert_eq!(signals_to(&actions, Signal::SIGTERM), vec![a]);
    assert!(logged(
        &actions,
        Level::INFO,
        "reached its request limit (100 of 100); draining it"
    ));
    assert_eq!(sim.role(b), Role::Active);
}

/// With little traffic, a worker near its limit whose replacement is ready
/// does not keep the extra process for long: it is drained a little short
/// of its limit once its replacement has been started a while.
#[test]
fn a_worker_near_its_limit_without_traffic_is_drained_after_a_while() {
    let mut sim = Sim::recycling(2, 100);
    let a = sim.pids(1)[0];
    sim.slots.get_mut(&a).expect("slot").requests = 90;
    sim.tick();
    assert_eq!(sim.role(a), Role::Retiring);
    let actions = [sim.tick(), sim.ready_all()].concat();
    assert!(signals_to(&actions, Signal::SIGTERM).is_empty());
    assert!(signals_to(&sim.advance(SEC), Signal::SIGTERM).is_empty());
    let actions = sim.advance(2 * SEC);
    assert_eq!(signals_to(&actions, Signal::SIGTERM), vec![a]);
    assert!(logged(
        &actions,
        Level::INFO,
        "has had its replacement ready a while (90 of 100); draining it"
    ));
}

/// A worker near its limit whose replacement is ready does not hold the
/// surge budget from another worker already past its own: it is drained at
/// once, and the other's replacement starts.
#[test]
fn a_worker_past_its_limit_does_not_wait_for_one_that_only_nears_it() {
    let mut sim = Sim::recycling(2, 100);
    let [a, b] = [sim.pids(1)[0], sim.pids(1)[1]];
    sim.slots.get_mut(&a).expect("slot").requests = 90;
    sim.tick();
    sim.tick();
    sim.ready_all();
    assert_eq!(sim.role(a), Role::Retiring);
    sim.slots.get_mut(&b).expect("slot").requests = 100;
    let actions = sim.tick();
    assert_eq!(signals_to(&actions, Signal::SIGTERM), vec![a]);
    sim.exit(a, "exited with status 0");
    let actions = sim.tick();
    assert_eq!(sim.role(b), Role::Retiring);
    assert!(logged(
        &actions,
        Level::INFO,
        "reached its request limit (100 of 100)"
    ));
}

/// Of several workers whose replacements are due, the one furthest along
/// its limit goes first.
#[test]
fn the_worker_furthest_along_its_limit_is_replaced_first() {
    let mut sim = Sim::recycling(3, 100);
    let pids = sim.pids(1);
    for (pid, n) in pids.iter().zip([95, 130, 90]) {
        sim.slots.get_mut(pid).expect("slot").requests = n;
    }
    sim.tick();
    let roles: Vec<Role> = pids.iter().map(|p| sim.role(*p)).collect();
    assert_eq!(roles, vec![Role::Active, Role::Retiring, Role::Active]);
}

/// A worker far past its request limit that waits for the surge budget is
/// said at WARNING (once a minute at most), not overshot in silence.
#[test]
fn recycling_that_falls_behind_the_limit_is_said() {
    let mut sim = Sim::recycling(2, 100);
    let [a, b] = [sim.pids(1)[0], sim.pids(1)[1]];
    sim.slots.get_mut(&a).expect("slot").requests = 100;
    let actions = sim.tick();
    assert_eq!(sim.role(a), Role::Retiring);
    assert!(!logged(&actions, Level::WARN, "falls behind"));
    // The other at its limit waits its turn: nothing to say yet.
    sim.slots.get_mut(&b).expect("slot").requests = 150;
    assert!(!logged(&sim.tick(), Level::WARN, "falls behind"));
    // Twice past it, still waiting: said, naming it, once.
    sim.slots.get_mut(&b).expect("slot").requests = 200;
    let actions = sim.tick();
    assert!(logged(
        &actions,
        Level::WARN,
        &format!("worker (pid: {b}) has served 200 requests of its 100")
    ));
    assert!(!logged(&sim.advance(SEC), Level::WARN, "falls behind"));
    assert!(logged(&sim.advance(60 * SEC), Level::WARN, "falls behind"));
}

/// Issue row 6: the owned memory decides, and such a worker drains as soon
/// as its replacement is ready.
#[test]
fn a_worker_over_its_memory_limit_is_replaced() {
    let mut s = settings(2);
    s.max_worker_memory = Some(crate::config::ByteSize(1 << 20));
    let mut sim = Sim::start(s);
    sim.tick();
    sim.ready_all();
    let pid = sim.pids(1)[0];
    sim.slots.get_mut(&pid).expect("slot").owned = 2 << 20;
    let actions = sim.advance(2 * SEC);
    assert!(logged(&actions, Level::INFO, "over --max-worker-memory"));
    assert_eq!(sim.role(pid), Role::Retiring);
    assert_eq!(spawns(&actions), vec![1]);
    let actions = sim.ready_all();
    assert_eq!(signals_to(&actions, Signal::SIGTERM), vec![pid]);
}

/// Issue row 8: a worker the master stopped is logged at info; only an
/// unexpected exit is an error, and it is replaced.
#[test]
fn only_unexpected_exits_are_errors() {
    let mut sim = Sim::serving(2);
    sim.signal(Sig::Ttou);
    let actions = sim.tick();
    let drained = signals_to(&actions, Signal::SIGTERM);
    assert_eq!(drained.len(), 1);
    let actions = sim.exit(drained[0], "was killed by SIGTERM");
    assert!(logged(&actions, Level::INFO, "Worker exiting"));
    assert!(!actions
        .iter()
        .any(|a| matches!(a, Action::Log(Level::ERROR, _, _))));
    let survivor = sim.pids(1)[0];
    let actions = sim.exit(survivor, "was killed by SIGSEGV");
    assert!(logged(&actions, Level::ERROR, "died"));
    assert!(actions.contains(&Action::Record(Record::Restart(RestartCause::Crash))));
    assert_eq!(spawns(&sim.tick()), vec![1]);
}

/// Issue row 9: `stop --wait` is answered when the master exits, with
/// whether it had to force.
#[test]
fn stop_wait_answers_at_exit_and_says_if_it_forced() {
    let mut sim = Sim::serving(2);
    let actions = sim.feed(Event::Stop {
        graceful: true,
        client: client(11, true),
    });
    assert!(actions.contains(&Action::Hold(11, Awaited::Exit)));
    assert!(actions.contains(&Action::CloseListeners));
    // One worker finishes; the other is still busy at the graceful timeout.
    let pids = sim.pids(1);
    sim.exit(pids[0], "exited with status 0");
    let actions = sim.advance(31 * SEC);
    assert_eq!(signals_to(&actions, Signal::SIGKILL), vec![pids[1]]);
    let actions = sim.exit(pids[1], "was killed by SIGKILL");
    let actions = [actions, sim.tick()].concat();
    let answered = answers(&actions, Awaited::Exit);
    assert!(answered.len() == 1 && !answered[0].ok);
    assert_eq!(sim.exited, Some(0));
    assert!(sim.advance(SEC).is_empty(), "nothing after the exit");
}

#[test]
fn term_during_a_reload_abandons_it_and_answers_its_waiters() {
    let mut sim = Sim::serving(1);
    sim.feed(Event::Reload {
        client: client(2, true),
        canary: None,
    });
    sim.tick();
    let actions = sim.signal(Sig::Term);
    let answered = answers(&actions, Awaited::Reload(2));
    assert!(answered.len() == 1 && !answered[0].ok);
    assert!(spawns(&sim.advance(SEC)).is_empty());
    let actions = sim.feed(Event::Reload {
        client: client(3, false),
        canary: None,
    });
    assert!(matches!(&actions[..], [.., Action::Reply(3, r)] if !r.ok));
    sim.exit_signalled();
    assert_eq!(sim.exited, Some(0));
}

#[test]
fn int_after_term_turns_the_stop_fast() {
    let mut sim = Sim::serving(2);
    sim.signal(Sig::Term);
    let actions = sim.signal(Sig::Int);
    assert_eq!(signals_to(&actions, Signal::SIGQUIT), sim.pids(1));
    assert_eq!(sim.m.state(), State::Stopping(StopKind::Fast));
    // A second TERM changes nothing.
    assert!(signals_to(&sim.signal(Sig::Term), Signal::SIGTERM).is_empty());
}

#[test]
fn the_shutdown_delay_holds_the_drain() {
    let mut s = settings(1);
    s.shutdown_delay = 5.0;
    let mut sim = Sim::start(s);
    sim.tick();
    sim.ready_all();
    let actions = sim.signal(Sig::Term);
    assert!(actions.contains(&Action::MarkStopping));
    assert!(signals_to(&actions, Signal::SIGTERM).is_empty());
    assert!(signals_to(&sim.advance(4 * SEC), Signal::SIGTERM).is_empty());
    assert_eq!(signals_to(&sim.advance(SEC), Signal::SIGTERM), sim.pids(1));
}

#[test]
fn a_silent_worker_is_aborted_then_killed() {
    let mut sim = Sim::serving(1);
    let pid = sim.pids(1)[0];
    let slot = sim.slots.get_mut(&pid).expect("slot");
    slot.silent_ms = 31_000;
    slot.in_flight = 3;
    // Its heartbeat says 31 s, but the master has not yet watched it for
    // that long without a request begun or ended.
    assert!(signals_to(&sim.tick(), Signal::SIGABRT).is_empty());
    sim.now += Duration::from_secs(31);
    let actions = sim.tick();
    assert!(logged(
        &actions,
        Level::ERROR,
        &format!("WORKER TIMEOUT (pid: {pid}, generation 1): no progress for 31.0s (no heartbeat, no request begun or ended), 3 request(s) in flight")
    ));
    assert_eq!(signals_to(&actions, Signal::SIGABRT), vec![pid]);
    assert_eq!(
        signals_to(&sim.advance(2 * SEC), Signal::SIGKILL),
        vec![pid]
    );
    let actions = sim.exit(pid, "was killed by SIGKILL");
    assert!(actions.contains(&Action::Record(Record::Restart(RestartCause::Timeout))));
}

#[test]
fn a_worker_whose_requests_begin_or_end_lives_without_a_heartbeat() {
    // A runtime so busy that its heartbeat task waits: the master sees its
    // progress in the slot's counters instead.
    let mut sim = Sim::serving(1);
    let pid = sim.pids(1)[0];
    for step in 1..=10u64 {
        let slot = sim.slots.get_mut(&pid).expect("slot");
        slot.silent_ms = step * 10_000;
        if step % 2 == 0 {
            slot.requests += 1;
        } else {
            slot.counters.by_class[1] += 1;
        }
        let actions = sim.advance(10 * SEC);
        assert!(
            signals_to(&actions, Signal::SIGABRT).is_empty(),
            "step {step}: {actions:?}"
        );
    }
    // Then neither: killed once the timeout (30 s) has passed since the
    // last request it ended.
    assert!(signals_to(&sim.advance(20 * SEC), Signal::SIGABRT).is_empty());
    let actions = sim.advance(11 * SEC);
    assert_eq!(signals_to(&actions, Signal::SIGABRT), vec![pid]);
    assert!(logged(
        &actions,
        Level::ERROR,
        &format!("WORKER TIMEOUT (pid: {pid}, generation 1): no progress for 31.0s")
    ));
}

#[test]
fn workers_dying_before_ready_are_restarted_one_at_a_time_with_back_off() {
    let mut sim = Sim::serving(3);
    for pid in sim.pids(1) {
        sim.exit(pid, "exited with status 1");
    }
    // Three died, but none of them before becoming ready: no back-off.
    assert_eq!(spawns(&sim.tick()), vec![1, 1, 1]);
    let fresh = sim.pids(1);
    sim.exit(fresh[0], "exited with status 1");
    let actions = sim.exit(fresh[1], "exited with status 1");
    assert!(logged(&actions, Level::WARN, "backing off"));
    assert!(spawns(&sim.tick()).is_empty(), "waits out the back-off");
    assert_eq!(spawns(&sim.advance(SEC)), vec![1], "then one at a time");
    assert!(spawns(&sim.tick()).is_empty());
    assert_eq!(
        spawns(&sim.ready_all()),
        vec![1],
        "a ready worker ends the streak"
    );
}

#[test]
fn usr2_is_refused_while_busy_and_aborted_by_a_reload_during_the_check() {
    let mut sim = Sim::serving(1);
    sim.signal(Sig::Hup);
    assert!(logged(&sim.signal(Sig::Usr2), Level::WARN, "busy"));
    sim.tick();
    sim.ready_all();
    let actions = sim.signal(Sig::Usr2);
    assert!(actions.contains(&Action::StartUpgradeCheck));
    sim.signal(Sig::Hup);
    let actions = sim.feed(Event::UpgradeChecked {
        passed: true,
        report: String::new(),
    });
    assert!(!actions.contains(&Action::ExecUpgrade));
    assert!(logged(&actions, Level::WARN, "aborted"));
}

#[test]
fn a_passed_check_re_executes_and_a_slow_one_is_killed() {
    let mut sim = Sim::serving(1);
    sim.signal(Sig::Usr2);
    assert!(sim.advance(31 * SEC).contains(&Action::KillUpgradeCheck));
    let actions = sim.feed(Event::UpgradeChecked {
        passed: false,
        report: "the new binary's check was killed by SIGKILL".into(),
    });
    assert!(logged(&actions, Level::ERROR, "nothing changed"));
    sim.signal(Sig::Usr2);
    let actions = sim.feed(Event::UpgradeChecked {
        passed: true,
        report: String::new(),
    });
    assert!(actions.contains(&Action::ExecUpgrade));
}

#[test]
fn usr1_reopens_logs_and_tells_every_worker() {
    let mut sim = Sim::serving(2);
    let actions = sim.signal(Sig::Usr1);
    assert!(actions.contains(&Action::ReopenLogs));
    assert_eq!(signals_to(&actions, Signal::SIGUSR1), sim.pids(1));
}

use crate::test_rng::Rng;

/// Every event in every state: random sequences of signals, commands,
/// readiness, crashes, failing configurations and time. Invariants hold
/// after every step, and once things settle the server has exactly its
/// target of ready workers, all of the newest generation.
#[test]
fn random_sequences_keep_the_invariants() {
    for seed in 1..=300u64 {
        let mut rng = Rng::seeded(seed);
        let workers = 1 + rng.below(3) as usize;
        // A third of the seeds start mid-way through the first boot, with
        // one worker answering and the others still booting.
        let mut sim = if rng.below(3) == 0 {
            let mut sim = Sim::start(settings(workers));
            sim.tick();
            if let Some(pid) = sim.pids(1).first().copied() {
                sim.set_state(pid, SlotState::Ready);
            }
            sim.tick();
            sim
        } else {
            Sim::serving(workers)
        };
        let mut trail = Vec::new();
        for _ in 0..60 {
            let choice = rng.below(16);
            trail.push(choice);
            match choice {
                0 => drop(sim.signal(Sig::Hup)),
                1 => drop(sim.signal(Sig::Ttin)),
                2 => drop(sim.signal(Sig::Ttou)),
                3 => drop(sim.signal(Sig::Winch)),
                4 => drop(sim.signal(Sig::Usr2)),
                5 => drop(sim.feed(Event::UpgradeChecked {
                    passed: rng.below(2) == 0,
                    report: String::new(),
                })),
                6 => {
                    sim.next_config = if rng.below(3) == 0 {
                        Err("Reload aborted: bad".into())
                    } else {
                        let mut s = settings(1 + rng.below(4) as usize);
                        s.max_surge = rng.below(3) as usize;
                        s.max_unavailable = rng.below(3) as usize;
                        if rng.below(4) == 0 {
                            // A canary in steps that needs no traffic: it
                            // grows step by step, unless something intervenes.
                            s.canary_seconds = 1.0;
                            s.canary_min_requests = 0;
                            s.canary_steps = vec![
                                crate::config::CanaryStep::Workers(1),
                                crate::config::CanaryStep::Percent(50),
                            ];
                        }
                        Ok(s)
                    };
                }
                7 => drop(sim.feed(Event::Scale {
                    workers: rng.below(6) as usize,
                    client: 1,
                })),
                8 | 9 => drop(sim.ready_all()),
                10 => {
                    // A random worker crashes, whatever it was doing.
                    let pids: Vec<i32> = sim.slots.keys().copied().collect();
                    if !pids.is_empty() {
                        let pid = pids[rng.below(pids.len() as u64) as usize];
                        sim.exit(pid, "was killed by SIGKILL");
                    }
                }
                11 => drop(sim.exit_signalled()),
                12 => drop(sim.advance(Duration::from_millis(rng.below(40_000)))),
                _ => drop(sim.tick()),
            }
            check_invariants(&sim, seed, &trail);
            // A server that has served never exits unless told to stop
            // (no stop is drawn here): not for a failed reload, not for
            // crashes.
            assert_eq!(sim.exited, None, "seed {seed}: exited after {trail:?}");
        }
        // Settle: a good configuration, HUP, workers become ready, the
        // signalled ones exit, time passes.
        sim.next_config = Ok(settings(2));
        sim.signal(Sig::Hup);
        for _ in 0..40 {
            sim.ready_all();
            sim.exit_signalled();
            sim.advance(SEC * 10);
        }
        let newest = sim.m.serving().map(|g| g.id);
        let workers = sim.m.workers();
        assert_eq!(sim.m.state(), State::Serving, "seed {seed}: {trail:?}");
        assert_eq!(workers.len(), sim.m.target(), "seed {seed}: {trail:?}");
        assert!(
            workers
                .iter()
                .all(|w| Some(w.generation) == newest && w.role == Role::Active),
            "seed {seed}: {trail:?}"
        );
        // And the stop always ends in an exit.
        sim.signal(Sig::Term);
        for _ in 0..10 {
            sim.exit_signalled();
            sim.advance(SEC * 40);
        }
        assert_eq!(sim.exited, Some(0), "seed {seed}: {trail:?}");
    }
}

fn check_invariants(sim: &Sim, seed: u64, trail: &[u64]) {
    let m = &sim.m;
    let serving = m.serving().map(|g| g.id);
    let booting = m.booting().map(|g| g.id);
    for w in m.workers() {
        // A worker of neither the serving nor the booting generation is
        // always on its way out.
        if Some(w.generation) != serving && Some(w.generation) != booting {
            assert!(!w.role.serves(), "seed {seed}: stray {w:?} after {trail:?}");
        }
    }
    if let (Some(s), Some(b)) = (serving, booting) {
        assert!(b > s, "seed {seed}: booting {b} not newer than {s}");
    }
    let retiring = m
        .workers()
        .iter()
        .filter(|w| w.role == Role::Retiring)
        .count();
    assert!(retiring <= MAX_SURGE, "seed {seed}");
    if matches!(m.state(), State::Stopping(_)) {
        assert!(
            m.workers().iter().all(|w| !w.role.serves())
                || matches!(
                    m.phase,
                    Phase::Stopping(Stop {
                        drain_at: Some(_),
                        ..
                    })
                ),
            "seed {seed}: a worker still serves during a stop"
        );
    }
}

/// Serving workers whose slot says ready.
fn ready_serving(sim: &Sim) -> usize {
    sim.m
        .workers()
        .iter()
        .filter(|w| w.role.serves() && w.state == SlotState::Ready)
        .count()
}

/// A server with `s`, serving, then a HUP that reloads to `s` again.
fn serving_then_reload(s: Settings) -> Sim {
    let mut sim = Sim::start(s.clone());
    sim.tick();
    sim.ready_all();
    sim.next_config = Ok(s);
    sim.signal(Sig::Hup);
    sim
}

/// Lets a reload run its course, every worker ready as soon as it starts
/// and exiting as soon as it is signalled: the most processes and the
/// fewest ready serving workers seen on the way.
fn roll_out(sim: &mut Sim) -> (usize, usize) {
    let (mut most, mut least) = (0, usize::MAX);
    for _ in 0..40 {
        sim.tick();
        most = most.max(sim.m.workers().len());
        least = least.min(ready_serving(sim));
        sim.ready_all();
        most = most.max(sim.m.workers().len());
        least = least.min(ready_serving(sim));
        sim.exit_signalled();
        if sim.m.state() == State::Serving {
            break;
        }
    }
    (most, least)
}

/// `max_surge`: a reload replaces the workers a batch at a time, never
/// running more than target + batch processes (draining ones included)
/// nor fewer than target ready; a failing batch rolls back and the old
/// generation is topped up again.
#[test]
fn a_batched_reload_stays_within_its_surge_and_never_dips() {
    let mut s = settings(6);
    s.max_surge = 2;
    let mut sim = serving_then_reload(s);
    let (most, least) = roll_out(&mut sim);
    assert_eq!(sim.m.state(), State::Serving);
    assert_eq!(most, 8, "never more than 6 + 2 processes");
    assert_eq!(least, 6, "never fewer than 6 ready");
    assert!(sim.m.workers().iter().all(|w| w.generation == 2));
    assert_eq!(sim.m.workers().len(), 6);

    // A batch that fails: rolled back, and generation 2 is whole again.
    sim.signal(Sig::Hup);
    sim.tick();
    let first_batch = sim.pids(3);
    assert_eq!(first_batch.len(), 2);
    sim.exit(first_batch[0], "exited with status 3");
    sim.tick();
    sim.exit_signalled();
    for _ in 0..5 {
        sim.advance(SEC);
        sim.ready_all();
    }
    assert_eq!(sim.m.state(), State::Serving);
    assert_eq!(ready_serving(&sim), 6);
    assert!(sim.m.workers().iter().all(|w| w.generation == 2));
}

/// Answers `ok` 2xx and `errors` 5xx on worker `pid`'s counters.
fn answer(sim: &mut Sim, pid: i32, ok: u64, errors: u64) {
    let slot = sim.slots.get_mut(&pid).expect("a simulated worker");
    slot.counters.by_class[1] += ok;
    slot.counters.by_class[4] += errors;
    slot.counters.buckets[2] += ok + errors;
}

/// A canary starts only its workers, is watched for its window, then is
/// promoted (the rest starts) or rolled back with its figures.
#[test]
fn a_canary_is_promoted_or_rolled_back_on_its_figures() {
    let mut s = settings(4);
    s.canary_seconds = 10.0;
    s.canary_min_requests = 50;
    let mut sim = Sim::start(s.clone());
    sim.tick();
    sim.ready_all();
    sim.next_config = Ok(s);
    // A faulty canary: half its answers are errors.
    sim.feed(Event::Reload {
        client: client(5, true),
        canary: Some(1),
    });
    assert_eq!(spawns(&sim.tick()), vec![2], "only the canary starts");
    assert!(sim
        .m
        .rollout_summary(sim.now)
        .is_some_and(|r| r.contains("canary booting")));
    sim.ready_all();
    assert!(sim
        .m
        .rollout_summary(sim.now)
        .is_some_and(|r| r.contains("canary of 1 worker watched")));
    let canary = sim.pids(2)[0];
    answer(&mut sim, canary, 50, 50);
    for pid in sim.pids(1) {
        answer(&mut sim, pid, 100, 0);
    }
    assert!(spawns(&sim.advance(5 * SEC)).is_empty(), "still watching");
    let actions = sim.advance(6 * SEC);
    let answered = answers(&actions, Awaited::Reload(2));
    assert!(answered.len() == 1 && !answered[0].ok);
    assert!(
        answered[0]
            .message
            .contains("canary failed: error ratio 0.50"),
        "{}",
        answered[0].message
    );
    assert_eq!(signals_to(&actions, Signal::SIGTERM), vec![canary]);
    assert_eq!(sim.m.serving().map(|g| g.id), Some(1));

    // A healthy canary: promoted, then the rest of the generation.
    sim.exit_signalled();
    sim.feed(Event::Reload {
        client: client(6, true),
        canary: Some(1),
    });
    assert_eq!(spawns(&sim.tick()), vec![3]);
    sim.ready_all();
    let canary = sim.pids(3)[0];
    answer(&mut sim, canary, 100, 0);
    let actions = sim.advance(11 * SEC);
    assert!(logged(&actions, Level::INFO, "promoted"));
    assert_eq!(spawns(&actions), vec![3, 3, 3]);
    let actions = sim.ready_all();
    assert_eq!(
        signals_to(&actions, Signal::SIGTERM).len(),
        4,
        "the old generation drains"
    );
    assert_eq!(sim.m.serving().map(|g| g.id), Some(3));
}

/// A canary in steps (`1,50%,100%` of 4): 1 worker, then 2, each watched
/// and judged; the rest follows the last; a failing step rolls back every
/// canary worker. Steps that do not grow, or reach the whole generation,
/// are skipped.
#[test]
fn a_canary_grows_in_steps_and_any_step_can_roll_back() {
    use crate::config::CanaryStep;
    let mut s = settings(4);
    s.canary_seconds = 10.0;
    s.canary_min_requests = 50;
    s.canary_steps = vec![
        CanaryStep::Workers(1),
        CanaryStep::Workers(1),
        CanaryStep::Percent(50),
        CanaryStep::Percent(100),
    ];
    let mut sim = Sim::start(s.clone());
    sim.tick();
    sim.ready_all();
    sim.next_config = Ok(s.clone());
    // A plain HUP uses the configured steps.
    sim.signal(Sig::Hup);
    assert_eq!(spawns(&sim.tick()), vec![2], "step 1: one worker");
    sim.ready_all();
    assert!(sim
        .m
        .rollout_summary(sim.now)
        .is_some_and(|r| r.contains("canary (step 1 of 2) of 1 worker watched")));
    let first = sim.pids(2)[0];
    answer(&mut sim, first, 100, 0);
    let actions = sim.advance(11 * SEC);
    assert!(logged(&actions, Level::INFO, "passed step 1"));
    assert!(actions.contains(&Action::Record(Record::Canary { promoted: true })));
    assert_eq!(spawns(&actions), vec![2], "step 2: one more, two in all");
    assert_eq!(sim.m.canary_workers(), 2);
    sim.ready_all();
    // Step 2's window starts now: the counters before it do not count.
    for pid in sim.pids(2) {
        answer(&mut sim, pid, 50, 0);
    }
    assert!(spawns(&sim.advance(5 * SEC)).is_empty(), "still watching");
    let actions = sim.advance(6 * SEC);
    assert!(logged(&actions, Level::INFO, "promoted"));
    assert_eq!(spawns(&actions), vec![2, 2], "the rest follows");
    sim.ready_all();
    assert_eq!(sim.m.serving().map(|g| g.id), Some(2));
    assert_eq!(sim.m.canary_workers(), 0);

    // A second step that fails rolls back both canary workers.
    sim.exit_signalled();
    sim.next_config = Ok(s);
    sim.signal(Sig::Hup);
    sim.tick();
    sim.ready_all();
    let first = sim.pids(3)[0];
    answer(&mut sim, first, 100, 0);
    sim.advance(11 * SEC);
    sim.ready_all();
    for pid in sim.pids(3) {
        answer(&mut sim, pid, 30, 30);
    }
    let actions = sim.advance(11 * SEC);
    assert!(actions.contains(&Action::Record(Record::Canary { promoted: false })));
    let mut stopped = signals_to(&actions, Signal::SIGTERM);
    stopped.sort();
    let mut canaries = sim.pids(3);
    canaries.sort();
    assert_eq!(stopped, canaries);
    assert_eq!(sim.m.serving().map(|g| g.id), Some(2));
}

/// The sizes a canary takes, from the reload, the steps or `canary`.
#[test]
fn canary_sizes_come_from_the_reload_then_the_steps_then_canary() {
    use crate::config::CanaryStep;
    let mut s = settings(10);
    assert!(super::canary_steps(None, &s, 10).is_empty());
    s.canary = 2;
    assert_eq!(super::canary_steps(None, &s, 10), vec![2]);
    s.canary_steps = vec![CanaryStep::Percent(10), CanaryStep::Percent(50)];
    assert_eq!(super::canary_steps(None, &s, 10), vec![1, 5]);
    assert_eq!(super::canary_steps(Some(3), &s, 10), vec![3]);
    // A canary as large as the generation is no canary.
    assert!(super::canary_steps(Some(10), &s, 10).is_empty());
}

/// `max_unavailable` with no surge: a reload never runs more than the
/// target's processes; an old worker drains first, and its replacement
/// starts once it is gone; never fewer than target - 1 ready.
#[test]
fn a_reload_with_max_unavailable_stays_within_the_target() {
    let mut s = settings(4);
    s.max_unavailable = 1;
    let mut sim = serving_then_reload(s);
    let (most, least) = roll_out(&mut sim);
    assert_eq!(sim.m.state(), State::Serving);
    assert_eq!(most, 4, "never more than the target's processes");
    assert_eq!(least, 3, "never fewer than 3 ready");
    assert!(sim.m.workers().iter().all(|w| w.generation == 2));

    // max_unavailable as large as the target still keeps one ready.
    let mut s = settings(3);
    s.max_unavailable = 10;
    let mut sim = Sim::start(s.clone());
    sim.tick();
    sim.ready_all();
    sim.next_config = Ok(s);
    sim.signal(Sig::Hup);
    let (_, least) = roll_out(&mut sim);
    assert_eq!(sim.m.state(), State::Serving);
    assert_eq!(least, 1);
}
