//! The master's decider: every decision the master makes, as one state
//! machine with no I/O. Facts come in as an [`Event`] (a signal, a control
//! command, a worker started, ready or gone, the clock), and decisions go
//! out as a list of [`Action`]s (start a worker of generation N, drain a
//! pid, answer a client, exit) that the master's loop carries out. Results
//! of actions that can fail (loading a configuration, starting a process)
//! come back as events. Tests drive it with made-up facts and a made-up
//! clock, and read its decisions.
//!
//! # States
//!
//! | state        | meaning                                                        |
//! |--------------|----------------------------------------------------------------|
//! | **Booting**  | the first generation is starting; nothing serves yet           |
//! | **Serving**  | one generation serves, topped up to the target                 |
//! | **Reloading**| a new generation boots beside the serving one ([`super::rollout`]) |
//! | **Paused**   | WINCH stopped the workers; the master waits for HUP            |
//! | **Stopping** | draining (graceful, maybe after a shutdown delay) or quitting (fast) |
//!
//! A binary-upgrade check (USR2) runs beside Serving and Paused only.
//!
//! # Events in every state
//!
//! | event | Booting | Serving | Reloading | Paused | Stopping |
//! |---|---|---|---|---|---|
//! | HUP, `reload` | load the configuration; on success the booting generation is superseded (stopped, reported) and a new one boots, and the reload completes once the first generation's workers have gone; unless some of its workers are ready: then it serves on (Reloading) and the new one boots beside it | load; boot a new generation | load; supersede the booting one | load; boot a new generation (only that one) | refused: "the server is stopping" |
//! | `reload --wait` | as HUP; answered when the outcome is known (see below); superseded by a newer reload, it follows that one's outcome | ← | ← | ← | refused |
//! | a configuration that does not load | error logged, nothing changes, client told why | ← | ← | ← | — |
//! | TERM, `stop` | graceful stop (shutdown delay first, if set) | ← | ← | ← | already stopping: nothing |
//! | INT, QUIT, `stop --now` | fast stop | ← | ← | ← | a graceful stop turns fast; fast: nothing |
//! | TTIN / TTOU / `scale N` | target ±1 / N (1 ..= `MAX_WORKERS`) | ← | ← (the rollout waits for the new target) | ← (applies at the next HUP) | ignored, refused |
//! | WINCH | booting workers stopped, then Paused | workers drained, Paused | rollout abandoned (reported), all drained, Paused | nothing new | ignored |
//! | USR1 | logs reopened, workers told | ← | ← | ← | ← |
//! | USR2 | refused: busy | check the binary, then re-execute | refused: busy | check, re-execute | refused |
//! | a worker ready | counted toward the rollout | logged | counted toward the rollout | — | — |
//! | all new workers ready | Serving | — | old generation drained; Serving (a `reload --wait` is answered once no old worker accepts) | — | — |
//! | a worker of the booting generation exits, or the boot timeout passes | cannot start: fast stop, exit 1 (once a worker has been ready: the generation serves on with what it has, the others started again) | — | rolled back: booting workers stopped, old keeps serving | — | — |
//! | a serving worker exits unexpectedly | — | logged as an error, replaced (backing off while workers die before ready) | ← | not replaced | not replaced |
//! | a worker the master stopped exits | logged at info | ← | ← | ← | the last one: exit |
//! | no heartbeat, and no request begun or ended, for `--timeout` | killed (SIGABRT), replaced | ← | ← | ← | ← |
//! | request limit near (its last eighth, [`crate::recycle::PRESPAWN_SHARE`]) or memory limit reached | — | replacement started (at most [`MAX_SURGE`] at once; the worker nearest its request limit first), worker drained once it is ready and the request limit reached (or `PRESPAWN_PATIENCE` after its replacement started, or at once when a worker past its limit waits) | deferred until Serving | — | — |
//! | a reload with a canary | — | its canary workers start first, then are watched ([`super::canary`]): promoted (the rest starts) or rolled back with its figures | ← | ← | — |
//! | a batch of a `max_surge`/`max_unavailable` reload is ready | — | — | old workers drain while the ready ones stay at least target − unavailable; the next batch starts while every process fits in target + surge | — | — |
//! | the graceful timeout passes for a draining worker | SIGKILL | ← | ← | ← | ← (counted: `stop --wait` fails) |
//!
//! "←" means the same as the cell to its left.

use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use nix::unistd::Pid;
use tracing::Level;

use super::canary;
use super::rollout::{Cause, Rollout, Verdict};
use crate::config::{Settings, MAX_WORKERS};
use crate::control::{ReloadOutcome, Response};
use crate::logging::{count, LogEvent};
use crate::metrics::{RequestCounters, RestartCause};
use crate::recycle::{RequestLimit, MAX_SURGE};
use crate::scoreboard::SlotState;

/// A worker at this many times its request limit, waiting for its turn to
/// be replaced, means recycling falls behind what `--max-requests` asks.
const RECYCLING_BEHIND: u64 = 2;

/// How long a worker near its request limit serves on once its
/// replacement was started, waiting to reach the limit: at saturation it
/// does within milliseconds; with little traffic it is drained after this
/// a little short of its limit, so that the extra process does not linger.
const PRESPAWN_PATIENCE: Duration = Duration::from_secs(2);

/// How often at most the decider says that recycling falls behind.
const RECYCLING_BEHIND_SAID_EVERY: Duration = Duration::from_secs(60);

/// A generation: the workers started together from one configuration.
#[derive(Clone)]
pub(crate) struct Generation {
    /// Its number, from 1 up.
    pub(crate) id: u64,
    /// The settings its workers run with.
    pub(crate) settings: Arc<Settings>,
}

/// What the master is doing with a worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Role {
    /// Booting or serving as part of its generation.
    Active,
    /// Serving, but to be drained once its replacement is ready.
    Retiring,
    /// Sent SIGTERM; killed if still alive at the deadline.
    Draining { deadline: Instant },
    /// Being killed; SIGKILL at the deadline if still alive.
    Killing { deadline: Instant },
}

impl Role {
    /// Whether the worker is one of the server's serving workers (it may
    /// accept connections).
    pub(crate) fn serves(self) -> bool {
        matches!(self, Role::Active | Role::Retiring)
    }
}

/// A worker, as the decider knows it.
#[derive(Debug, Clone)]
pub(crate) struct Worker {
    pub(crate) pid: Pid,
    pub(crate) generation: u64,
    pub(crate) role: Role,
    pub(crate) request_limit: Option<RequestLimit>,
    /// It has been seen ready at least once.
    pub(crate) announced_ready: bool,
    pub(crate) spawned: Instant,
    /// Why it is being replaced, if it is.
    cause: Option<RestartCause>,
    /// When its replacement was started, for a worker retiring.
    retiring_since: Option<Instant>,
    /// Its generation's graceful timeout, kept with the worker: it may
    /// outlive its generation's place in the master.
    graceful: Duration,
    /// Its generation's heartbeat timeout.
    timeout: Option<Duration>,
    /// Its generation's memory limit, in bytes.
    memory_limit: Option<u64>,
    /// It reached the graceful timeout with connections open.
    gave_up: bool,
    /// Its scoreboard state when last observed.
    state: SlotState,
    /// Requests it had started when last observed.
    requests: u64,
    /// What it had answered when last observed.
    counters: RequestCounters,
    /// When a request was last seen to begin or end in it: progress the
    /// master sees in its slot's counters, however long its runtime takes
    /// to get to the heartbeat.
    progressed: Instant,
}

impl Worker {
    /// A worker adopted from the previous image after a binary upgrade.
    pub(crate) fn adopted(
        pid: Pid,
        generation: u64,
        draining: bool,
        request_limit: Option<RequestLimit>,
        announced_ready: bool,
        settings: Option<&Settings>,
        now: Instant,
    ) -> Worker {
        let graceful = settings.map(|s| s.graceful_timeout()).unwrap_or_default();
        Worker {
            pid,
            generation,
            role: if draining {
                Role::Draining {
                    deadline: now + graceful,
                }
            } else {
                Role::Active
            },
            request_limit,
            announced_ready,
            spawned: now,
            cause: None,
            graceful,
            timeout: settings.and_then(|s| s.timeout()),
            memory_limit: settings.and_then(|s| s.max_worker_memory).map(|m| m.0),
            gave_up: false,
            retiring_since: None,
            state: SlotState::Booting,
            requests: 0,
            counters: RequestCounters::default(),
            progressed: now,
        }
    }

    /// Its state as `zdr status` and the metrics name it, given its
    /// scoreboard state now.
    pub(crate) fn state_name(&self, slot: SlotState) -> &'static str {
        match (self.role, slot) {
            (Role::Killing { .. }, _) => "exiting",
            (Role::Draining { .. }, _) | (_, SlotState::Draining) => "draining",
            (Role::Retiring, _) => "retiring",
            (_, SlotState::Ready) => "ready",
            _ => "booting",
        }
    }
}

/// A control client, and whether it waits for the outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Client {
    pub(crate) id: u64,
    pub(crate) wait: bool,
}

/// The signals the master acts on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Sig {
    Hup,
    Term,
    Int,
    Quit,
    Ttin,
    Ttou,
    Winch,
    Usr1,
    Usr2,
}

/// What one worker's scoreboard slot says now.
#[derive(Debug, Clone)]
pub(crate) struct Observed {
    pub(crate) pid: Pid,
    pub(crate) state: SlotState,
    pub(crate) requests: u64,
    /// Milliseconds since its last heartbeat.
    pub(crate) silent_ms: u64,
    /// Requests it is answering now.
    pub(crate) in_flight: u32,
    /// The memory it owns, when measured (see [`Machine::wants_memory`]).
    pub(crate) owned_bytes: Option<u64>,
    /// What it has answered, for a canary's verdict.
    pub(crate) counters: RequestCounters,
}

/// How a worker ended.
#[derive(Debug, Clone)]
pub(crate) struct Exit {
    /// "exited with status N" or "was killed by SIGX".
    pub(crate) status: String,
    /// It exited with the code of a worker that gave up connections at
    /// the graceful timeout.
    pub(crate) gave_up: bool,
    /// Its last scoreboard state.
    pub(crate) state: SlotState,
    /// Its boot error, if it left one.
    pub(crate) message: String,
    pub(crate) requests: u64,
    /// The last lines of its output.
    pub(crate) tail: Vec<String>,
}

/// Why a worker could not be started.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum SpawnFailure {
    /// Every scoreboard slot is taken (by draining workers).
    NoSlot,
    /// The system refused (fork, exec, a pipe), with its error.
    Os(String),
}

/// A fact for the decider.
#[derive(Debug, Clone)]
pub(crate) enum Event {
    /// A signal to the master.
    Signal(Sig),
    /// `zdr reload`, with a canary of this many workers if asked.
    Reload {
        client: Client,
        canary: Option<usize>,
    },
    /// `zdr stop`.
    Stop { graceful: bool, client: Client },
    /// `zdr scale N`.
    Scale { workers: usize, client: u64 },
    /// The result of [`Action::Prepare`]: the new configuration (the
    /// listeners it adds are bound and, with `--preload`, its app is
    /// loaded), or why not.
    Prepared {
        generation: u64,
        client: Option<Client>,
        result: Result<Arc<Settings>, String>,
    },
    /// [`Action::Spawn`] started this worker.
    Spawned {
        generation: u64,
        pid: Pid,
        request_limit: Option<RequestLimit>,
    },
    /// [`Action::Spawn`] failed.
    SpawnFailed { generation: u64, why: SpawnFailure },
    /// A worker exited (reaped).
    Exited { pid: Pid, exit: Exit },
    /// The clock, and what every living worker's slot says.
    Tick(Vec<Observed>),
    /// The binary-upgrade check ended (or could not start).
    UpgradeChecked { passed: bool, report: String },
}

/// What a held control client waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Awaited {
    /// The outcome of the reload to this generation.
    Reload(u64),
    /// The master's exit.
    Exit,
}

/// A message for systemd.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Notice {
    Ready(String),
    Reloading,
    Stopping,
}

/// A figure for the metrics and `zdr status`.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Record {
    Restart(RestartCause),
    Reload(ReloadOutcome),
    /// A canary step judged: promoted, or failed (and rolled back).
    Canary {
        promoted: bool,
    },
}

/// A decision, for the master's loop to carry out.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Action {
    Log(Level, LogEvent, String),
    /// Load the configuration for `generation` (and bind, and preload);
    /// answer with [`Event::Prepared`].
    Prepare {
        generation: u64,
        client: Option<Client>,
    },
    /// Start a worker of `generation`; answer with [`Event::Spawned`] or
    /// [`Event::SpawnFailed`].
    Spawn {
        generation: u64,
    },
    /// Send a signal to a worker.
    Signal(Pid, Signal),
    /// No worker of `generation` will be started any more: drop what it
    /// holds (its app, its executable) and close listeners nobody binds.
    Forget {
        generation: u64,
    },
    /// Close the master's listening sockets (a stop).
    CloseListeners,
    /// Tell the workers through the scoreboard that the server stops.
    MarkStopping,
    ReopenLogs,
    Notify(Notice),
    /// Run the binary-upgrade check; answer with [`Event::UpgradeChecked`].
    StartUpgradeCheck,
    KillUpgradeCheck,
    /// Re-execute the binary in place.
    ExecUpgrade,
    /// Answer a control client.
    Reply(u64, Response),
    /// Keep a control client waiting.
    Hold(u64, Awaited),
    /// The clients waiting for the reload to generation `from` wait for
    /// the reload to `to` instead (a newer reload superseded theirs).
    Follow {
        from: u64,
        to: u64,
    },
    /// Answer every client waiting for this.
    Answer(Awaited, Response),
    Record(Record),
    /// Exit with this code.
    Exit(u8),
}

/// How a stop goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StopKind {
    Graceful,
    Fast,
}

#[derive(Debug, Clone, Copy)]
struct Stop {
    kind: StopKind,
    exit_code: u8,
    /// Workers that reached the graceful timeout with connections open.
    forced: usize,
    /// With a shutdown delay: when to start draining the workers.
    drain_at: Option<Instant>,
}

/// The exclusive part of the master's state (see the module's tables).
#[derive(Debug, Clone, Copy)]
enum Phase {
    /// Booting, Serving or Reloading: what boots and what serves says which.
    Running,
    /// WINCH: the serving generation is not topped up until a reload.
    Paused,
    Stopping(Stop),
    /// The master has decided to exit.
    Exited,
}

/// The state's name, for the tables and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum State {
    Booting,
    Serving,
    Reloading,
    Paused,
    Stopping(StopKind),
    Exited,
}

impl State {
    /// Its name in `zdr status`.
    pub(crate) fn name(self) -> &'static str {
        match self {
            State::Booting => "booting",
            State::Serving => "serving",
            State::Reloading => "reloading",
            State::Paused => "paused",
            State::Stopping(StopKind::Graceful) => "stopping",
            State::Stopping(StopKind::Fast) => "stopping fast",
            State::Exited => "exiting",
        }
    }
}

/// A reload whose new generation serves while the old one drains.
struct Switchover {
    generation: u64,
    requested: Instant,
    /// The answer for `zdr reload --wait`, given once no worker of an older
    /// generation accepts.
    reply: Option<Response>,
}

/// A generation booting, and its rollout.
struct Booting {
    generation: Generation,
    rollout: Rollout,
    /// Its canary, until promoted.
    canary: Option<Canary>,
}

/// How a batched reload may stray from the target.
#[derive(Debug, Clone, Copy)]
struct Batch {
    /// Processes beyond the target (`max_surge`).
    surge: usize,
    /// Ready workers below the target (`max_unavailable`).
    unavailable: usize,
}

/// A canary: the first workers of a reload, judged before the rest.
struct Canary {
    workers: usize,
    /// The larger canaries that follow once this one passes.
    next: std::collections::VecDeque<usize>,
    /// The step now watched, from 1.
    step: usize,
    policy: canary::Policy,
    /// When every canary worker was ready, and what each worker had
    /// answered then.
    started: Option<(Instant, Vec<(Pid, RequestCounters)>)>,
}

/// The master's state.
pub(crate) struct Machine {
    phase: Phase,
    serving: Option<Generation>,
    booting: Option<Booting>,
    switchover: Option<Switchover>,
    /// A binary-upgrade check running, with its deadline (None once killed).
    upgrade: Option<Option<Instant>>,
    workers: Vec<Worker>,
    target: usize,
    next_generation: u64,
    /// Consecutive workers that died before becoming ready.
    crash_streak: u32,
    next_spawn: Instant,
    next_memory_check: Instant,
    /// When the decider last said that no scoreboard slot was free.
    slots_full_logged: Option<Instant>,
    /// When the decider last said that recycling falls behind the
    /// request limit.
    recycling_behind_logged: Option<Instant>,
    /// The canary asked for by the reload being prepared.
    canary_request: Option<usize>,
    /// A worker has been ready at least once: the server has served, and
    /// from then on only a stop ends it.
    served: bool,
}

/// Actions being collected for one event.
struct Out(Vec<Action>);

impl Out {
    fn push(&mut self, a: Action) {
        self.0.push(a);
    }
    fn info(&mut self, e: LogEvent, m: String) {
        self.0.push(Action::Log(Level::INFO, e, m));
    }
    fn warn(&mut self, e: LogEvent, m: String) {
        self.0.push(Action::Log(Level::WARN, e, m));
    }
    fn error(&mut self, e: LogEvent, m: String) {
        self.0.push(Action::Log(Level::ERROR, e, m));
    }
}

impl Machine {
    /// A master with no worker yet, `target` workers wanted, whose next
    /// generation is `next_generation`.
    pub(crate) fn new(target: usize, next_generation: u64, now: Instant) -> Machine {
        Machine {
            phase: Phase::Running,
            serving: None,
            booting: None,
            switchover: None,
            upgrade: None,
            workers: Vec::new(),
            target,
            next_generation,
            crash_streak: 0,
            next_spawn: now,
            next_memory_check: now,
            slots_full_logged: None,
            recycling_behind_logged: None,
            canary_request: None,
            served: false,
        }
    }

    /// A master taking over a serving generation and its workers (after a
    /// binary upgrade).
    pub(crate) fn adopt(
        target: usize,
        next_generation: u64,
        serving: Option<Generation>,
        workers: Vec<Worker>,
        now: Instant,
    ) -> Machine {
        Machine {
            serving,
            workers,
            ..Machine::new(target, next_generation, now)
        }
    }

    /// The state, as the module's table names it.
    pub(crate) fn state(&self) -> State {
        match (self.phase, &self.serving, &self.booting) {
            (Phase::Exited, _, _) => State::Exited,
            (Phase::Stopping(s), _, _) => State::Stopping(s.kind),
            (Phase::Paused, _, None) => State::Paused,
            (_, None, _) => State::Booting,
            (_, Some(_), Some(_)) => State::Reloading,
            (Phase::Running, Some(_), None) => State::Serving,
        }
    }

    /// The workers the master has.
    pub(crate) fn workers(&self) -> &[Worker] {
        &self.workers
    }

    /// The generation that serves.
    pub(crate) fn serving(&self) -> Option<&Generation> {
        self.serving.as_ref()
    }

    /// The generation booting to replace it.
    pub(crate) fn booting(&self) -> Option<&Generation> {
        self.booting.as_ref().map(|b| &b.generation)
    }

    /// How the reload under way stands, in words, for `zdr status`.
    pub(crate) fn rollout_summary(&self, now: Instant) -> Option<String> {
        let b = self.booting.as_ref()?;
        let ready = self.ready_workers(b.generation.id);
        let id = b.generation.id;
        Some(match (&b.canary, self.batch()) {
            (Some(c), _) => {
                let step = if c.step > 1 || !c.next.is_empty() {
                    format!(" (step {} of {})", c.step, c.step + c.next.len())
                } else {
                    String::new()
                };
                match &c.started {
                    None => format!(
                        "generation {id}: canary{step} booting ({ready} of {} ready)",
                        c.workers
                    ),
                    Some((since, _)) => format!(
                        "generation {id}: canary{step} of {} watched for {:.0}s of at least {:.0}s",
                        count(c.workers as u64, "worker"),
                        now.saturating_duration_since(*since).as_secs_f64(),
                        c.policy.window.as_secs_f64()
                    ),
                }
            }
            (None, Some(batch)) => format!(
                "generation {id}: in batches (max surge {}, max unavailable {}), {ready} of {} ready",
                batch.surge, batch.unavailable, self.target
            ),
            (None, None) => format!("generation {id}: {ready} of {} ready", self.target),
        })
    }

    /// The size of the canary being booted or watched; 0 without one.
    pub(crate) fn canary_workers(&self) -> usize {
        self.booting
            .as_ref()
            .and_then(|b| b.canary.as_ref())
            .map_or(0, |c| c.workers)
    }

    /// How many workers each generation should have.
    pub(crate) fn target(&self) -> usize {
        self.target
    }

    /// The number the next generation will get.
    pub(crate) fn next_generation(&self) -> u64 {
        self.next_generation
    }

    /// Whether things are moving (a rollout, a stop, a worker leaving), so
    /// that the loop should look again soon.
    pub(crate) fn busy(&self) -> bool {
        self.booting.is_some()
            || matches!(self.phase, Phase::Stopping(_))
            || self.workers.iter().any(|w| w.role != Role::Active)
    }

    /// Whether the next [`Event::Tick`] should carry memory readings: some
    /// worker has a memory limit and a second has passed since the last.
    pub(crate) fn wants_memory(&self, now: Instant) -> bool {
        now >= self.next_memory_check && self.workers.iter().any(|w| w.memory_limit.is_some())
    }

    /// Decides what an event means now.
    pub(crate) fn handle(&mut self, event: Event, now: Instant) -> Vec<Action> {
        let mut out = Out(Vec::new());
        if matches!(self.phase, Phase::Exited) {
            return out.0;
        }
        match event {
            Event::Signal(sig) => self.on_signal(sig, now, &mut out),
            Event::Reload { client, canary } => {
                self.canary_request = canary;
                self.reload(Some(client), &mut out)
            }
            Event::Stop { graceful, client } => {
                let kind = if graceful {
                    StopKind::Graceful
                } else {
                    StopKind::Fast
                };
                self.stop(kind, now, &mut out);
                if client.wait {
                    out.push(Action::Hold(client.id, Awaited::Exit));
                } else {
                    let text = if graceful {
                        "stopping gracefully"
                    } else {
                        "stopping"
                    };
                    out.push(Action::Reply(client.id, Response::ok(text)));
                }
            }
            Event::Scale { workers, client } => {
                let response = self.scale(workers, &mut out);
                out.push(Action::Reply(client, response));
            }
            Event::Prepared {
                generation,
                client,
                result,
            } => self.prepared(generation, client, result, now, &mut out),
            Event::Spawned {
                generation,
                pid,
                request_limit,
            } => self.spawned(generation, pid, request_limit, now, &mut out),
            Event::SpawnFailed { generation, why } => {
                self.spawn_failed(generation, why, now, &mut out)
            }
            Event::Exited { pid, exit } => self.exited(pid, exit, now, &mut out),
            Event::Tick(observed) => self.tick(&observed, now, &mut out),
            Event::UpgradeChecked { passed, report } => {
                self.upgrade_checked(passed, report, &mut out)
            }
        }
        out.0
    }

    fn stopping(&self) -> bool {
        matches!(self.phase, Phase::Stopping(_))
    }

    fn on_signal(&mut self, sig: Sig, now: Instant, out: &mut Out) {
        match sig {
            Sig::Term => self.stop(StopKind::Graceful, now, out),
            Sig::Int | Sig::Quit => self.stop(StopKind::Fast, now, out),
            Sig::Hup => {
                self.canary_request = None;
                self.reload(None, out)
            }
            Sig::Ttin | Sig::Ttou if self.stopping() => out.info(
                LogEvent::WorkersScaled,
                "Number of workers unchanged: the server is stopping".into(),
            ),
            Sig::Ttin if self.target >= MAX_WORKERS => out.warn(
                LogEvent::WorkersScaled,
                format!(
                    "Number of workers stays {}: that is the most a server runs",
                    self.target
                ),
            ),
            Sig::Ttin => {
                self.target += 1;
                out.info(
                    LogEvent::WorkersScaled,
                    format!("Number of workers: {}", self.target),
                );
            }
            Sig::Ttou => {
                self.target = self.target.saturating_sub(1).max(1);
                out.info(
                    LogEvent::WorkersScaled,
                    format!("Number of workers: {}", self.target),
                );
            }
            Sig::Winch if self.stopping() => {}
            Sig::Winch => {
                out.info(
                    LogEvent::WorkersPaused,
                    "Stopping all workers; the master stays (SIGHUP starts them again)".into(),
                );
                self.phase = Phase::Paused;
                self.abandon_rollout("stopped by SIGWINCH", now, out);
                let pids: Vec<Pid> = self.workers.iter().map(|w| w.pid).collect();
                for pid in pids {
                    self.drain(pid, now, out);
                }
            }
            Sig::Usr1 => {
                out.push(Action::ReopenLogs);
                for w in &self.workers {
                    out.push(Action::Signal(w.pid, Signal::SIGUSR1));
                }
            }
            Sig::Usr2 => self.begin_upgrade(now, out),
        }
    }

    fn scale(&mut self, workers: usize, out: &mut Out) -> Response {
        if self.stopping() {
            return Response::error("the server is stopping");
        }
        match workers {
            0 => Response::error("a server needs at least 1 worker"),
            n if n > MAX_WORKERS => Response::error(format!(
                "cannot scale to {n} workers: at most {MAX_WORKERS} (two generations must fit side by side)"
            )),
            n => {
                self.target = n;
                out.info(LogEvent::WorkersScaled, format!("Number of workers: {n}"));
                Response::ok(format!("scaling to {n} workers"))
            }
        }
    }

    /// HUP or `zdr reload`: ask for the configuration to be loaded.
    fn reload(&mut self, client: Option<Client>, out: &mut Out) {
        if self.stopping() {
            out.info(
                LogEvent::ReloadIgnored,
                "Reload ignored: the server is stopping".into(),
            );
            if let Some(c) = client {
                out.push(Action::Reply(
                    c.id,
                    Response::error("the server is stopping"),
                ));
            }
            return;
        }
        out.push(Action::Notify(Notice::Reloading));
        out.push(Action::Prepare {
            generation: self.next_generation,
            client,
        });
    }

    fn prepared(
        &mut self,
        id: u64,
        client: Option<Client>,
        result: Result<Arc<Settings>, String>,
        now: Instant,
        out: &mut Out,
    ) {
        let settings = match result {
            Ok(settings) if !self.stopping() && id == self.next_generation => settings,
            Ok(_) => {
                out.push(Action::Forget { generation: id });
                if let Some(c) = client {
                    out.push(Action::Reply(
                        c.id,
                        Response::error("the server is stopping"),
                    ));
                }
                return;
            }
            Err(why) => {
                out.error(LogEvent::ReloadRolledBack, why.clone());
                // Tell systemd the reload is over: nothing changed.
                if let Some(g) = &self.serving {
                    out.push(Action::Notify(Notice::Ready(format!(
                        "{} ready, generation {}; {why}",
                        count(self.target as u64, "worker"),
                        g.id
                    ))));
                }
                if let Some(c) = client {
                    out.push(Action::Reply(c.id, Response::error(why)));
                }
                return;
            }
        };
        let cause = if self.serving.is_none() && self.booting.is_none() {
            Cause::Start
        } else {
            Cause::Reload
        };
        let first_serves = self.serving.is_none()
            && self.booting.as_ref().is_some_and(|b| {
                b.rollout.cause == Cause::Start && self.ready_workers(b.generation.id) > 0
            });
        if first_serves {
            // The first generation already answers with some of its
            // workers: it serves on (its other workers still booting), and
            // the reload boots beside it, so that a reload that fails is
            // rolled back to it instead of leaving nothing serving.
            if let Some(b) = self.booting.take() {
                let first = b.generation.id;
                out.info(LogEvent::ReloadStarted, format!(
                    "Generation {first} serves with {} of {} workers ready; the reload boots beside it",
                    self.ready_workers(first),
                    self.target
                ));
                self.serving = Some(b.generation);
                out.push(Action::Notify(Notice::Ready(format!(
                    "{} ready, generation {first}",
                    count(self.ready_workers(first) as u64, "worker")
                ))));
            }
        } else if let Some((old, was)) = self
            .booting
            .as_ref()
            .map(|b| (b.generation.id, b.rollout.cause))
        {
            let what = match was {
                Cause::Start => "The start of generation",
                Cause::Reload => "Reload to generation",
            };
            out.warn(
                LogEvent::ReloadIgnored,
                format!("{what} {old} superseded by a newer reload (generation {id})"),
            );
            // Whoever waits for it is told how the newer one ends: nothing
            // failed, and what will serve is the newer one.
            out.push(Action::Follow { from: old, to: id });
            self.abandon_rollout(
                &format!("superseded by a newer reload (generation {id})"),
                now,
                out,
            );
        }
        if cause == Cause::Reload {
            self.target = settings.workers;
            out.push(Action::ReopenLogs);
            out.info(
                LogEvent::ReloadStarted,
                format!(
                    "Reload: starting generation {id} with {}",
                    count(self.target as u64, "worker")
                ),
            );
        }
        let boot_timeout = settings.boot_timeout();
        let steps = canary_steps(self.canary_request.take(), &settings, self.target);
        let canary = (cause == Cause::Reload && !steps.is_empty()).then(|| {
            let mut next: std::collections::VecDeque<usize> = steps.into();
            let workers = next.pop_front().unwrap_or(1);
            out.info(
                LogEvent::ReloadStarted,
                format!(
                    "Reload: generation {id} starts with a canary of {workers} workers{}",
                    if next.is_empty() {
                        String::new()
                    } else {
                        format!(", growing to {next:?} workers in steps")
                    }
                ),
            );
            Canary {
                workers,
                next,
                step: 1,
                policy: canary::Policy {
                    window: Duration::from_secs_f64(settings.canary_seconds),
                    min_requests: settings.canary_min_requests,
                    max_error_ratio: settings.canary_max_error_ratio,
                    max_p99_ratio: settings.canary_max_p99_ratio,
                    no_traffic: settings.canary_no_traffic,
                },
                started: None,
            }
        });
        self.booting = Some(Booting {
            generation: Generation { id, settings },
            rollout: Rollout::new(cause, now, boot_timeout),
            canary,
        });
        self.next_generation = id + 1;
        self.next_spawn = now;
        if let Some(c) = client {
            out.push(if c.wait {
                Action::Hold(c.id, Awaited::Reload(id))
            } else {
                Action::Reply(
                    c.id,
                    Response::ok(format!("reload started: generation {id}")),
                )
            });
        }
    }

    /// Stops the workers of an unfinished rollout and reports it.
    fn abandon_rollout(&mut self, why: &str, now: Instant, out: &mut Out) {
        let Some(b) = self.booting.take() else {
            return;
        };
        let id = b.generation.id;
        let ready = self.ready_workers(id);
        // SIGTERM for all: a ready worker drains, and a booting one exits
        // at once (it handles stops from its first instruction).
        let pids: Vec<Pid> = self
            .workers
            .iter()
            .filter(|w| w.generation == id)
            .map(|w| w.pid)
            .collect();
        for pid in pids {
            self.drain(pid, now, out);
        }
        out.push(Action::Forget { generation: id });
        if b.rollout.cause == Cause::Reload {
            self.record_reload(id, b.rollout.started, ready, Err(why.to_owned()), now, out);
        }
    }

    fn begin_upgrade(&mut self, now: Instant, out: &mut Out) {
        if self.stopping() || self.upgrade.is_some() || self.booting.is_some() {
            out.warn(
                LogEvent::Upgrade,
                "Binary upgrade ignored: the master is busy (stopping, upgrading or reloading)"
                    .into(),
            );
            return;
        }
        let Some(serving) = &self.serving else {
            out.warn(
                LogEvent::Upgrade,
                "Binary upgrade ignored: no generation is serving".into(),
            );
            return;
        };
        self.upgrade = Some(Some(now + serving.settings.boot_timeout()));
        out.push(Action::StartUpgradeCheck);
    }

    fn upgrade_checked(&mut self, passed: bool, report: String, out: &mut Out) {
        if self.upgrade.take().is_none() {
            return;
        }
        if !passed {
            out.error(
                LogEvent::Upgrade,
                format!("Binary upgrade aborted: {report}; nothing changed"),
            );
        } else if self.booting.is_some() || self.stopping() {
            out.warn(
                LogEvent::Upgrade,
                "Binary upgrade aborted: a reload or stop began during the check".into(),
            );
        } else {
            out.push(Action::ExecUpgrade);
        }
    }

    fn stop(&mut self, kind: StopKind, now: Instant, out: &mut Out) {
        match &mut self.phase {
            Phase::Stopping(stop) if stop.kind == StopKind::Graceful && kind == StopKind::Fast => {
                stop.kind = kind;
                stop.drain_at = None;
            }
            Phase::Stopping(_) | Phase::Exited => return,
            Phase::Running | Phase::Paused => {
                out.push(Action::MarkStopping);
                out.push(Action::Notify(Notice::Stopping));
                self.abandon_rollout("the server is stopping", now, out);
                let delay = match kind {
                    StopKind::Graceful => self
                        .serving
                        .as_ref()
                        .map(|g| g.settings.shutdown_delay())
                        .unwrap_or_default(),
                    StopKind::Fast => Duration::ZERO,
                };
                let drain_at = (!delay.is_zero()).then(|| now + delay);
                self.phase = Phase::Stopping(Stop {
                    kind,
                    exit_code: 0,
                    forced: 0,
                    drain_at,
                });
                if drain_at.is_some() {
                    out.info(
                        LogEvent::ShutdownDelay,
                        format!(
                            "Shutdown delay: readiness fails for {:.1}s, then the workers drain",
                            delay.as_secs_f64()
                        ),
                    );
                    return;
                }
            }
        }
        self.signal_stop(kind, now, out);
    }

    /// Closes the master's listeners (once the workers have taken what is
    /// queued and closed theirs, a new connection is refused at once) and
    /// sends every worker its stop.
    fn signal_stop(&mut self, kind: StopKind, now: Instant, out: &mut Out) {
        out.push(Action::CloseListeners);
        let pids: Vec<Pid> = self.workers.iter().map(|w| w.pid).collect();
        for pid in pids {
            match kind {
                StopKind::Graceful => self.drain(pid, now, out),
                StopKind::Fast => self.kill(pid, Signal::SIGQUIT, now, out),
            }
        }
    }

    /// Sends SIGTERM and sets the graceful deadline.
    fn drain(&mut self, pid: Pid, now: Instant, out: &mut Out) {
        let Some(w) = self.workers.iter_mut().find(|w| w.pid == pid) else {
            return;
        };
        if !w.role.serves() {
            return;
        }
        w.role = Role::Draining {
            deadline: now + w.graceful,
        };
        out.push(Action::Signal(pid, Signal::SIGTERM));
    }

    /// Sends `signal`, then SIGKILL if the worker outlives a grace.
    fn kill(&mut self, pid: Pid, signal: Signal, now: Instant, out: &mut Out) {
        let Some(w) = self.workers.iter_mut().find(|w| w.pid == pid) else {
            return;
        };
        let grace = if signal == Signal::SIGKILL {
            Duration::from_secs(3600)
        } else {
            Duration::from_secs(1)
        };
        w.role = Role::Killing {
            deadline: now + grace,
        };
        out.push(Action::Signal(pid, signal));
    }

    /// Workers of `generation` that are ready and not leaving.
    fn ready_workers(&self, generation: u64) -> usize {
        self.workers
            .iter()
            .filter(|w| w.generation == generation && w.role == Role::Active)
            .filter(|w| w.state == SlotState::Ready)
            .count()
    }

    /// The settings of a generation the master still starts workers of.
    fn settings_of(&self, id: u64) -> Option<&Arc<Settings>> {
        [self.serving.as_ref(), self.booting()]
            .into_iter()
            .flatten()
            .find(|g| g.id == id)
            .map(|g| &g.settings)
    }

    fn spawned(
        &mut self,
        generation: u64,
        pid: Pid,
        request_limit: Option<RequestLimit>,
        now: Instant,
        out: &mut Out,
    ) {
        let settings = self.settings_of(generation).cloned();
        let mut w = Worker::adopted(
            pid,
            generation,
            false,
            request_limit,
            false,
            settings.as_deref(),
            now,
        );
        w.spawned = now;
        out.info(
            LogEvent::WorkerBooting,
            format!("Booting worker with pid: {pid} (generation {generation})"),
        );
        self.workers.push(w);
        // A generation that is neither serving nor booting any more (it was
        // superseded while the start was under way) gets no new worker.
        if settings.is_none() || self.stopping() {
            self.kill(pid, Signal::SIGKILL, now, out);
        }
    }

    fn spawn_failed(&mut self, generation: u64, why: SpawnFailure, now: Instant, out: &mut Out) {
        match why {
            SpawnFailure::NoSlot => {
                // Draining workers hold every slot: wait for them, and say
                // so once every ten seconds, not at every turn of the loop.
                self.next_spawn = now + Duration::from_secs(1);
                if self
                    .slots_full_logged
                    .is_none_or(|t| now >= t + Duration::from_secs(10))
                {
                    out.error(LogEvent::WorkerBootFailed, format!(
                        "Cannot start a worker: all {} scoreboard slots are in use (draining workers hold them); retrying every second",
                        crate::scoreboard::CAPACITY
                    ));
                    self.slots_full_logged = Some(now);
                }
            }
            SpawnFailure::Os(cause) => {
                self.crash_streak += 1;
                self.next_spawn = now + backoff(self.crash_streak);
                match &mut self.booting {
                    Some(b) if b.generation.id == generation => b.rollout.worker_failed(cause),
                    _ => out.error(LogEvent::WorkerBootFailed, cause),
                }
            }
        }
    }

    fn exited(&mut self, pid: Pid, exit: Exit, now: Instant, out: &mut Out) {
        let Some(index) = self.workers.iter().position(|w| w.pid == pid) else {
            return;
        };
        let mut w = self.workers.remove(index);
        w.gave_up |= exit.gave_up;
        if let (true, Phase::Stopping(stop)) = (w.gave_up, &mut self.phase) {
            stop.forced += 1;
        }
        if let Some(cause) = w.cause {
            out.push(Action::Record(Record::Restart(cause)));
        }
        // Expected: the master stopped it, or it drained itself while
        // retiring.
        let expected = matches!(w.role, Role::Draining { .. } | Role::Killing { .. })
            || (w.role == Role::Retiring && exit.state == SlotState::Draining);
        if expected {
            out.info(
                LogEvent::WorkerExited,
                format!(
                    "Worker exiting (pid: {pid}, generation {}, {}): {}",
                    w.generation,
                    count(exit.requests, "request"),
                    exit.status
                ),
            );
            self.check_switchover(now, out);
            return;
        }
        let cause = match exit.state {
            SlotState::BootFailed if !exit.message.is_empty() => {
                format!("worker {pid} failed to boot: {}", exit.message)
            }
            _ if exit.tail.is_empty() => format!("worker {pid} {}", exit.status),
            _ => format!(
                "worker {pid} {}; its last output: {}",
                exit.status,
                exit.tail.join(" | ")
            ),
        };
        let booting = self.booting.as_ref().map(|b| b.generation.id);
        if exit.state != SlotState::Ready && !w.announced_ready {
            self.crash_streak += 1;
            let delay = backoff(self.crash_streak);
            self.next_spawn = now + delay;
            if self.crash_streak > 1 && booting != Some(w.generation) {
                out.warn(LogEvent::CrashBackoff, format!(
                    "{} workers in a row died before becoming ready; backing off {} ms before the next start",
                    self.crash_streak,
                    delay.as_millis()
                ));
            }
        }
        let stopping = self.stopping();
        match &mut self.booting {
            Some(b) if b.generation.id == w.generation => b.rollout.worker_failed(cause),
            _ if !stopping => {
                out.push(Action::Record(Record::Restart(RestartCause::Crash)));
                out.error(
                    LogEvent::WorkerDied,
                    format!(
                        "Worker (pid: {pid}, generation {}) died: {cause}",
                        w.generation
                    ),
                );
            }
            _ => {}
        }
        self.check_switchover(now, out);
    }

    fn tick(&mut self, observed: &[Observed], now: Instant, out: &mut Out) {
        for o in observed {
            if let Some(w) = self.workers.iter_mut().find(|w| w.pid == o.pid) {
                if o.requests != w.requests || o.counters.by_class != w.counters.by_class {
                    w.progressed = now;
                }
                w.state = o.state;
                w.requests = o.requests;
                w.counters = o.counters.clone();
            }
        }
        if observed.iter().any(|o| o.owned_bytes.is_some()) {
            self.next_memory_check = now + Duration::from_secs(1);
        }
        self.announce_ready(now, out);
        if let Some(Some(deadline)) = self.upgrade {
            if now >= deadline {
                out.error(LogEvent::Upgrade, "Binary upgrade: the new binary's check is taking longer than the boot timeout; killing it".into());
                out.push(Action::KillUpgradeCheck);
                self.upgrade = Some(None);
            }
        }
        self.watch_workers(observed, now, out);
        self.drain_replaced(now, out);
        self.drain_replaced_by_batch(now, out);
        self.advance_rollout(now, out);
        self.check_switchover(now, out);
        if self.advance_stop(now, out) {
            return;
        }
        self.maintain(now, out);
    }

    /// Logs each worker that became ready, with the rollout's progress.
    fn announce_ready(&mut self, now: Instant, out: &mut Out) {
        let booting = self.booting.as_ref().map(|b| b.generation.id);
        for i in 0..self.workers.len() {
            let w = &self.workers[i];
            if w.announced_ready || w.state != SlotState::Ready {
                continue;
            }
            let (pid, generation) = (w.pid, w.generation);
            self.workers[i].announced_ready = true;
            self.served = true;
            if self.crash_streak > 0 {
                // The streak is over: what is missing starts now.
                self.crash_streak = 0;
                self.next_spawn = self.next_spawn.min(now);
            }
            if booting == Some(generation) {
                let ready = self
                    .workers
                    .iter()
                    .filter(|o| o.generation == generation && o.announced_ready)
                    .count();
                out.info(
                    LogEvent::WorkerReady,
                    format!(
                        "Worker ready (pid: {pid}, generation {generation}): {ready}/{}",
                        self.target
                    ),
                );
            } else {
                out.info(
                    LogEvent::WorkerReady,
                    format!("Worker ready (pid: {pid}, generation {generation})"),
                );
            }
        }
    }

    /// Heartbeats, request and memory limits, and deadlines.
    fn watch_workers(&mut self, observed: &[Observed], now: Instant, out: &mut Out) {
        let recycling_allowed = self.booting.is_none() && !self.stopping();
        // The surge budget: recycled workers not yet gone, server-wide.
        let mut recycling = self
            .workers
            .iter()
            .filter(|w| {
                w.role == Role::Retiring
                    || (matches!(w.role, Role::Draining { .. })
                        && w.cause.is_some_and(RestartCause::is_recycle))
            })
            .count();
        let mut to_kill: Vec<(Pid, Signal)> = Vec::new();
        // The worker furthest past its request limit while it waits for
        // the surge budget: (pid, requests, limit).
        let mut behind: Option<(Pid, u64, u64)> = None;
        // The worker whose replacement is due, nearest its request limit:
        // (pid, requests ÷ limit).
        let mut due: Option<(Pid, f64)> = None;
        for w in &mut self.workers {
            let seen = observed.iter().find(|o| o.pid == w.pid);
            match w.role {
                Role::Active | Role::Retiring => {
                    if let (Some(timeout), Some(o)) = (w.timeout, seen) {
                        // Silent: neither a heartbeat nor a request begun
                        // or ended.
                        let idle_ms = now.saturating_duration_since(w.progressed).as_millis();
                        let silent_ms = o.silent_ms.min(idle_ms as u64);
                        if o.state == SlotState::Ready && silent_ms > timeout.as_millis() as u64 {
                            out.error(LogEvent::WorkerTimeout, format!(
                                "WORKER TIMEOUT (pid: {}, generation {}): no progress for {:.1}s (no heartbeat, no request begun or ended), {} request(s) in flight; killing it",
                                w.pid,
                                w.generation,
                                silent_ms as f64 / 1000.0,
                                o.in_flight
                            ));
                            to_kill.push((w.pid, Signal::SIGABRT));
                            w.cause = Some(RestartCause::Timeout);
                            continue;
                        }
                    }
                    if w.role != Role::Active || !recycling_allowed {
                        continue;
                    }
                    if recycling >= MAX_SURGE {
                        if let Some(limit) = w
                            .request_limit
                            .filter(|l| w.requests >= l.limit.saturating_mul(RECYCLING_BEHIND))
                        {
                            if behind.is_none_or(|(_, r, _)| w.requests > r) {
                                behind = Some((w.pid, w.requests, limit.limit));
                            }
                        }
                        continue;
                    }
                    if let Some(limit) = w.request_limit.filter(|l| l.due(w.requests)) {
                        // The one nearest (or furthest past) its limit goes
                        // first, once all have been looked at.
                        let share = w.requests as f64 / limit.limit as f64;
                        if due.is_none_or(|(_, s)| share > s) {
                            due = Some((w.pid, share));
                        }
                        continue;
                    }
                    let owned = seen.and_then(|o| o.owned_bytes);
                    if let (Some(limit), Some(owned)) = (w.memory_limit, owned) {
                        if owned > limit {
                            out.info(LogEvent::WorkerRecycled, format!(
                                "Worker (pid: {}) owns {:.0} MiB, over --max-worker-memory {}; starting its replacement",
                                w.pid,
                                owned as f64 / 1048576.0,
                                crate::config::ByteSize(limit)
                            ));
                            w.role = Role::Retiring;
                            w.retiring_since = Some(now);
                            w.cause = Some(RestartCause::Memory);
                            recycling += 1;
                        }
                    }
                }
                Role::Draining { deadline } if now >= deadline => {
                    out.warn(
                        LogEvent::GracefulTimeout,
                        format!(
                            "Worker (pid: {}) still busy at the graceful timeout; killing it",
                            w.pid
                        ),
                    );
                    w.gave_up = true;
                    to_kill.push((w.pid, Signal::SIGKILL));
                }
                Role::Killing { deadline } if now >= deadline => {
                    to_kill.push((w.pid, Signal::SIGKILL))
                }
                _ => {}
            }
        }
        if let Some(w) = due
            .filter(|_| recycling < MAX_SURGE)
            .and_then(|(pid, _)| self.workers.iter_mut().find(|w| w.pid == pid))
        {
            if let Some(limit) = w.request_limit {
                let what = if limit.reached(w.requests) {
                    "reached its request limit"
                } else {
                    "nears its request limit"
                };
                out.info(
                    LogEvent::WorkerRecycled,
                    format!(
                        "Worker (pid: {}) {what} ({} of {}); starting its replacement",
                        w.pid, w.requests, limit.limit
                    ),
                );
                w.role = Role::Retiring;
                w.retiring_since = Some(now);
                w.cause = Some(RestartCause::MaxRequests);
            }
        }
        for (pid, sig) in to_kill {
            self.kill(pid, sig, now, out);
        }
        if let Some((pid, requests, limit)) = behind {
            if self
                .recycling_behind_logged
                .is_none_or(|t| now >= t + RECYCLING_BEHIND_SAID_EVERY)
            {
                out.warn(LogEvent::RecyclingBehind, format!(
                    "Recycling falls behind --max-requests: worker (pid: {pid}) has served {requests} requests of its {limit} and waits its turn (one replacement at a time server-wide); a higher --max-requests recycles as often as it says"
                ));
                self.recycling_behind_logged = Some(now);
            }
        }
    }

    /// Drains retiring workers once their generation again has every worker
    /// it should have, ready: one over its memory limit at once, one near
    /// its request limit once it reaches it — or at once, if another worker
    /// past its limit waits for the surge budget it holds.
    fn drain_replaced(&mut self, now: Instant, out: &mut Out) {
        let Some(id) = self.serving.as_ref().map(|g| g.id) else {
            return;
        };
        if self.ready_workers(id) < self.target {
            return;
        }
        let another_waits = self.workers.iter().any(|w| {
            w.role == Role::Active && w.request_limit.is_some_and(|l| l.reached(w.requests))
        });
        let done: Vec<(Pid, Option<String>)> = self
            .workers
            .iter()
            .filter(|w| w.role == Role::Retiring)
            .filter_map(|w| {
                if w.cause == Some(RestartCause::Memory) {
                    return Some((w.pid, None));
                }
                let limit = w.request_limit?;
                let why = if limit.reached(w.requests) {
                    "reached its request limit"
                } else if another_waits {
                    "yields to a worker past its limit"
                } else if w
                    .retiring_since
                    .is_some_and(|since| now >= since + PRESPAWN_PATIENCE)
                {
                    "has had its replacement ready a while"
                } else {
                    return None;
                };
                Some((
                    w.pid,
                    Some(format!(
                        "Worker (pid: {}) {why} ({} of {}); draining it",
                        w.pid, w.requests, limit.limit
                    )),
                ))
            })
            .collect();
        for (pid, said) in done {
            if let Some(said) = said {
                out.info(LogEvent::WorkerDraining, said);
            }
            self.drain(pid, now, out);
        }
    }

    /// A reload in batches (`max_surge` or `max_unavailable` > 0): how far
    /// it may go above and below the target. At least one worker stays
    /// ready whatever `max_unavailable` says.
    fn batch(&self) -> Option<Batch> {
        let b = self.booting.as_ref()?;
        let settings = &b.generation.settings;
        let batch = Batch {
            surge: settings.max_surge,
            unavailable: settings.max_unavailable.min(self.target.saturating_sub(1)),
        };
        (batch.surge + batch.unavailable > 0
            && self.serving.is_some()
            && b.rollout.cause == Cause::Reload)
            .then_some(batch)
    }

    /// In a batched reload, drains as many old workers as the ready ones
    /// exceed `target - max_unavailable`: the server never has fewer ready.
    fn drain_replaced_by_batch(&mut self, now: Instant, out: &mut Out) {
        let Some((batch, id)) = self
            .batch()
            .zip(self.booting.as_ref().map(|b| b.generation.id))
        else {
            return;
        };
        let ready_new = self.ready_workers(id);
        let old: Vec<Pid> = self
            .workers
            .iter()
            .filter(|w| w.generation != id && w.role.serves())
            .map(|w| w.pid)
            .collect();
        let excess = (ready_new + old.len() + batch.unavailable).saturating_sub(self.target);
        for pid in old.into_iter().take(excess) {
            self.drain(pid, now, out);
        }
    }

    fn advance_rollout(&mut self, now: Instant, out: &mut Out) {
        if self.booting.as_ref().is_some_and(|b| b.canary.is_some()) {
            return self.advance_canary(now, out);
        }
        let Some(b) = &self.booting else { return };
        let ready = self.ready_workers(b.generation.id);
        match b.rollout.judge(ready, self.target, now) {
            Verdict::Pending => {}
            Verdict::Complete => self.commit_rollout(now, out),
            Verdict::Failed(why) => self.roll_back(why, now, out),
        }
    }

    /// A canary boots, then is watched: promoted (the rest of the
    /// generation starts) or rolled back.
    fn advance_canary(&mut self, now: Instant, out: &mut Out) {
        let Some(b) = &self.booting else { return };
        let Some(c) = &b.canary else { return };
        let id = b.generation.id;
        let ready = self.ready_workers(id);
        let verdict = match (b.rollout.judge(ready, c.workers, now), &c.started) {
            (Verdict::Failed(why), _) => Err(why),
            (Verdict::Pending, None) => return,
            (_, None) => {
                // Every canary worker is ready: the window opens.
                let baseline = self
                    .workers
                    .iter()
                    .map(|w| (w.pid, w.counters.clone()))
                    .collect();
                let window = c.policy.window;
                out.info(
                    LogEvent::Canary,
                    format!(
                        "Canary of generation {id} serving ({}); watching it for {:.0}s",
                        count(c.workers as u64, "worker"),
                        window.as_secs_f64()
                    ),
                );
                if let Some(b) = &mut self.booting {
                    b.rollout.restart_clock(now, window * 3);
                    if let Some(c) = &mut b.canary {
                        c.started = Some((now, baseline));
                    }
                }
                return;
            }
            (_, Some((started, baseline))) => {
                let (mut new, mut old) = (RequestCounters::default(), RequestCounters::default());
                for w in &self.workers {
                    let before = baseline.iter().find(|(p, _)| *p == w.pid).map(|(_, c)| c);
                    let delta = since(&w.counters, before);
                    if w.generation == id {
                        new.add(&delta);
                    } else {
                        old.add(&delta);
                    }
                }
                match canary::judge(
                    &c.policy,
                    &new,
                    &old,
                    now.saturating_duration_since(*started),
                ) {
                    canary::Verdict::Wait => return,
                    canary::Verdict::Promote(figures) => Ok(figures),
                    canary::Verdict::Fail(why) => Err(format!("canary failed: {why}")),
                }
            }
        };
        match verdict {
            Ok(figures) => {
                out.push(Action::Record(Record::Canary { promoted: true }));
                let Some(b) = &mut self.booting else { return };
                b.rollout.restart_clock(now, Duration::ZERO);
                let Some(c) = &mut b.canary else { return };
                match c.next.pop_front() {
                    Some(workers) => {
                        out.info(LogEvent::Canary, format!(
                            "Canary of generation {id} passed step {}: {figures}; growing it to {workers} workers",
                            c.step
                        ));
                        c.workers = workers;
                        c.step += 1;
                        c.started = None;
                    }
                    None => {
                        out.info(
                            LogEvent::Canary,
                            format!(
                                "Canary of generation {id} promoted: {figures}; starting the rest"
                            ),
                        );
                        b.canary = None;
                    }
                }
            }
            Err(why) => {
                out.push(Action::Record(Record::Canary { promoted: false }));
                self.roll_back(why, now, out)
            }
        }
    }

    fn commit_rollout(&mut self, now: Instant, out: &mut Out) {
        let Some(b) = self.booting.take() else {
            return;
        };
        let id = b.generation.id;
        let started = b.rollout.started;
        let ms = now.saturating_duration_since(started).as_millis();
        if let Phase::Paused = self.phase {
            self.phase = Phase::Running;
        }
        let old = self.serving.replace(b.generation);
        let retiring: Vec<Pid> = self
            .workers
            .iter()
            .filter(|w| w.generation != id && w.role.serves())
            .map(|w| w.pid)
            .collect();
        match (b.rollout.cause, &old) {
            (Cause::Reload, Some(old)) => {
                out.info(LogEvent::GenerationReady, format!(
                    "Generation {id} ready: {n}/{n} workers in {ms} ms; draining generation {} ({})",
                    old.id,
                    count(retiring.len() as u64, "worker"),
                    n = self.target
                ));
            }
            _ => {
                out.info(
                    LogEvent::GenerationReady,
                    format!(
                        "Ready: generation {id}, {}, in {ms} ms",
                        count(self.target as u64, "worker")
                    ),
                );
            }
        }
        if b.rollout.cause == Cause::Reload {
            // A reload that completed before this one took over is
            // answered now. This one completes once no older worker runs
            // (also when it superseded the start: the first generation's
            // workers stop first).
            if let Some(Switchover {
                generation,
                reply: Some(reply),
                ..
            }) = self.switchover.take()
            {
                out.push(Action::Answer(Awaited::Reload(generation), reply));
            }
            self.switchover = Some(Switchover {
                generation: id,
                requested: started,
                reply: None,
            });
        }
        for pid in retiring {
            self.drain(pid, now, out);
        }
        if let Some(old) = old {
            out.push(Action::Forget { generation: old.id });
        }
        if b.rollout.cause == Cause::Reload {
            self.record_reload(id, started, self.target, Ok(()), now, out);
        }
        self.check_switchover(now, out);
        out.push(Action::Notify(Notice::Ready(format!(
            "{} ready, generation {id}",
            count(self.target as u64, "worker")
        ))));
    }

    fn roll_back(&mut self, why: String, now: Instant, out: &mut Out) {
        let Some(id) = self.booting.as_ref().map(|b| b.generation.id) else {
            return;
        };
        if self.serving.is_none() && self.served {
            // The first generation has served (some of its workers were
            // ready): it is what the server has, so it serves on with the
            // workers it has, and the missing ones are started again (with
            // the crash back-off) instead of the server exiting.
            if let Some(b) = self.booting.take() {
                out.error(LogEvent::GenerationPartial, format!(
                    "Generation {id} did not start in full ({why}); it serves with the workers it has and starts the others again"
                ));
                self.serving = Some(b.generation);
                out.push(Action::Notify(Notice::Ready(format!(
                    "{} ready, generation {id}",
                    count(self.ready_workers(id) as u64, "worker")
                ))));
            }
            return;
        }
        self.abandon_rollout(&why, now, out);
        match &self.serving {
            None => {
                out.error(LogEvent::MasterError, format!("Cannot start: {why}"));
                self.stop(StopKind::Fast, now, out);
                if let Phase::Stopping(stop) = &mut self.phase {
                    stop.exit_code = 1;
                }
            }
            Some(serving) => {
                out.error(
                    LogEvent::ReloadRolledBack,
                    format!(
                        "Reload to generation {id} rolled back: {why}; generation {} keeps serving",
                        serving.id
                    ),
                );
                out.push(Action::Notify(Notice::Ready(format!(
                    "{} ready, generation {}; reload rolled back",
                    count(self.target as u64, "worker"),
                    serving.id
                ))));
            }
        }
    }

    /// Remembers how a reload ended and tells whoever waits for it.
    fn record_reload(
        &mut self,
        generation: u64,
        started: Instant,
        workers_ready: usize,
        result: Result<(), String>,
        now: Instant,
        out: &mut Out,
    ) {
        let outcome = ReloadOutcome {
            generation,
            completed: result.is_ok(),
            duration_ms: now.saturating_duration_since(started).as_millis() as u64,
            workers_ready,
            error: result.as_ref().err().cloned(),
        };
        let message = match &result {
            Ok(()) => format!(
                "generation {generation} ready: {} in {} ms",
                count(workers_ready as u64, "worker"),
                outcome.duration_ms
            ),
            Err(why) => format!("reload to generation {generation} rolled back: {why}"),
        };
        let response = Response {
            ok: result.is_ok(),
            message,
            status: None,
            reload: Some(outcome.clone()),
        };
        match (&mut self.switchover, result.is_ok()) {
            (Some(s), true) if s.generation == generation => s.reply = Some(response),
            _ => out.push(Action::Answer(Awaited::Reload(generation), response)),
        }
        out.push(Action::Record(Record::Reload(outcome)));
    }

    /// Answers `reload --wait` once no worker of an older generation
    /// accepts, and logs the end of a reload once the last one has exited.
    fn check_switchover(&mut self, now: Instant, out: &mut Out) {
        let Some(s) = &mut self.switchover else {
            return;
        };
        let old_accepting = self
            .workers
            .iter()
            .any(|w| w.generation < s.generation && w.state == SlotState::Ready);
        if !old_accepting {
            if let Some(reply) = s.reply.take() {
                out.push(Action::Answer(Awaited::Reload(s.generation), reply));
            }
        }
        if self.workers.iter().all(|w| w.generation >= s.generation) {
            out.info(
                LogEvent::ReloadComplete,
                format!(
                    "Reload to generation {} complete in {} ms",
                    s.generation,
                    now.saturating_duration_since(s.requested).as_millis()
                ),
            );
            if let Some(reply) = s.reply.take() {
                out.push(Action::Answer(Awaited::Reload(s.generation), reply));
            }
            self.switchover = None;
        }
    }

    /// Starts the shutdown delay's drain when it is due; exits once no
    /// worker is left. Returns whether the master exits.
    fn advance_stop(&mut self, now: Instant, out: &mut Out) -> bool {
        let Phase::Stopping(stop) = &mut self.phase else {
            return false;
        };
        if stop.drain_at.is_some_and(|at| now >= at) {
            stop.drain_at = None;
            let kind = stop.kind;
            self.signal_stop(kind, now, out);
        }
        let Phase::Stopping(stop) = self.phase else {
            return false;
        };
        if !self.workers.is_empty() {
            return false;
        }
        out.info(LogEvent::MasterStopped, "Shutting down: Master".into());
        let answer = match (stop.kind, stop.forced) {
            (StopKind::Graceful, 0) => Response::ok("stopped gracefully"),
            (StopKind::Graceful, n) => Response::error(format!(
                "stopped; {n} worker(s) still had connections open at the graceful timeout"
            )),
            (StopKind::Fast, _) => Response::ok("stopped"),
        };
        out.push(Action::Answer(Awaited::Exit, answer));
        out.push(Action::Exit(stop.exit_code));
        self.phase = Phase::Exited;
        true
    }

    /// Starts the missing workers of the serving and the booting generation,
    /// and drains extra ones.
    fn maintain(&mut self, now: Instant, out: &mut Out) {
        if self.stopping() || now < self.next_spawn {
            return;
        }
        // While paused the serving generation is not topped up; a reload
        // starts the next one, and only that one. Nor during a batched
        // reload, which replaces it worker by worker.
        let batch = self.batch();
        let serving = self
            .serving
            .as_ref()
            .filter(|_| !matches!(self.phase, Phase::Paused) && batch.is_none());
        let ids: Vec<u64> = [serving, self.booting()]
            .into_iter()
            .flatten()
            .map(|g| g.id)
            .collect();
        for id in ids {
            let active: Vec<Pid> = self
                .workers
                .iter()
                .filter(|w| w.generation == id && w.role == Role::Active)
                .map(|w| w.pid)
                .collect();
            // A canary's generation starts only its canary workers first.
            let wanted = self
                .booting
                .as_ref()
                .filter(|b| b.generation.id == id)
                .and_then(|b| b.canary.as_ref())
                .map_or(self.target, |c| c.workers);
            if active.len() < wanted {
                // After crashes, one at a time; in a batched reload, only as
                // many as keep every process within target + batch.
                let mut missing = if self.crash_streak > 0 {
                    1
                } else {
                    wanted - active.len()
                };
                if let Some(batch) = batch.filter(|_| Some(id) == self.booting().map(|g| g.id)) {
                    let room = (self.target + batch.surge).saturating_sub(self.workers.len());
                    missing = missing.min(room);
                    // Each batch has the boot timeout to become ready: the
                    // wait for room (old workers draining) does not count.
                    if let (true, Some(b)) = (missing > 0, &mut self.booting) {
                        b.rollout.restart_clock(now, Duration::ZERO);
                    }
                }
                for _ in 0..missing {
                    out.push(Action::Spawn { generation: id });
                }
                if self.crash_streak > 0 {
                    // The next start waits until this one is known to
                    // work, or for the back-off.
                    self.next_spawn = now + backoff(self.crash_streak);
                    return;
                }
            } else if active.len() > self.target && self.booting.is_none() {
                for pid in &active[self.target..] {
                    self.drain(*pid, now, out);
                }
            }
        }
    }
}

/// The canary's sizes for a reload of `target` workers: the reload's own
/// (`zdr reload --canary N`), else `canary_steps`, else `canary`; each
/// larger than the one before and smaller than the whole generation (which
/// follows the last).
fn canary_steps(requested: Option<usize>, settings: &Settings, target: usize) -> Vec<usize> {
    let sizes: Vec<usize> = match requested {
        Some(n) => vec![n],
        None if !settings.canary_steps.is_empty() => {
            settings.canary_steps.iter().map(|s| s.of(target)).collect()
        }
        None => vec![settings.canary],
    };
    let mut steps: Vec<usize> = Vec::new();
    for n in sizes {
        if n > 0 && n < target && steps.last().is_none_or(|last| n > *last) {
            steps.push(n);
        }
    }
    steps
}

/// What `now` counts beyond `before` (a worker's counters at the canary's
/// start; none for a worker started since).
fn since(now: &RequestCounters, before: Option<&RequestCounters>) -> RequestCounters {
    let Some(before) = before else {
        return now.clone();
    };
    let mut d = RequestCounters::default();
    for (i, n) in now.by_class.iter().enumerate() {
        d.by_class[i] = n.saturating_sub(before.by_class[i]);
    }
    for (i, n) in now.buckets.iter().enumerate() {
        d.buckets[i] = n.saturating_sub(before.buckets[i]);
    }
    d.sum_us = now.sum_us.saturating_sub(before.sum_us);
    d
}

/// Delay before the next start after `streak` workers in a row died before
/// becoming ready: 0.1 s, doubling up to 6.4 s.
pub(crate) fn backoff(streak: u32) -> Duration {
    Duration::from_millis(100 << streak.clamp(1, 7).saturating_sub(1))
}

#[cfg(test)]
mod tests;
