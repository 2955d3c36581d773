//! A seeded chaos test on the real binary: under continuous keep-alive
//! load, a generator draws sequences of signals (HUP, TTIN, TTOU, WINCH,
//! USR2), control commands (`scale N`, `reload`, `reload --wait`), deploys
//! (a binary that cannot start, one that boots slowly, a configuration
//! that does not parse) and faults (SIGKILL or SIGSTOP of a worker), with
//! random gaps. Then it restores a
//! good build and checks that the server ends where it should: a
//! `reload --wait` succeeds, exactly the wanted number of workers run, all
//! ready and of that newest generation, the process table agrees with
//! `zdr status`, no child is a zombie, no request failed unless a worker was
//! killed under it, and TERM stops it all. Beside the load, a pool of idle
//! keep-alive connections is held through the sequence: not one is closed
//! without an answer, and each is answered by the final generation. An
//! event that takes connections down with it (a worker killed or stopped,
//! WINCH stopping every worker) ends the pool; a new one is opened at the
//! next event once a worker serves.
//!
//! `cargo test` runs a few fixed seeds. `ZDR_CHAOS_SEEDS=N` runs N seeds
//! from `ZDR_CHAOS_FIRST_SEED` (default 1) on demand, and
//! `ZDR_CHAOS_SOAK_MINUTES=M` as many as fit in M minutes (a soak); a
//! failure prints its seed and events, and the same seed replays them.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::*;
use nix::sys::signal::Signal;

/// A small deterministic generator (xorshift64*).
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

#[derive(Debug, Clone, Copy)]
enum Event {
    Hup,
    Ttin,
    Ttou,
    Winch,
    Scale(usize),
    ReloadWait,
    BrokenBinaryHup,
    BrokenConfigHup,
    KillWorker,
    StopWorker,
    Upgrade,
    SlowReload,
}

fn draw(rng: &mut Rng) -> Event {
    match rng.below(22) {
        20 => Event::Upgrade,
        21 => Event::SlowReload,
        0..=4 => Event::Hup,
        5..=6 => Event::Ttin,
        7..=8 => Event::Ttou,
        9 => Event::Winch,
        10..=11 => Event::Scale(1 + rng.below(3) as usize),
        12..=13 => Event::ReloadWait,
        14 => Event::BrokenBinaryHup,
        15 => Event::BrokenConfigHup,
        16..=17 => Event::KillWorker,
        _ => Event::StopWorker,
    }
}

/// Idle keep-alive connections held through each sequence.
const IDLE: usize = 200;

fn run_seed(seed: u64, events: usize) {
    let dir = TempDir::new(&format!("chaos-{seed}"));
    let exe = dir.path("zdr");
    std::fs::copy(zdr_bin(), &exe).unwrap();
    let config = dir.path("zdr.toml");
    let good_config =
        "workers = 2\ngraceful_timeout = 20\nboot_timeout = 10\ntimeout = 5\nkeepalive = 600\n";
    write_file(&config, good_config);
    let mut server = Launch::serve(&["--config", config.to_str().unwrap()])
        .exe(&exe)
        .start();
    server.wait_ready();
    server.wait_generation_ready(1, 2);
    let rt = runtime();
    let load = rt.block_on(async { load::start(server.addr(), "/", 2, 2) });
    let mut idle = Some(rt.block_on(common::idle::Pool::open(server.addr(), IDLE)));
    // The index of the event after which the pool was opened.
    let mut idle_from = 0;
    let mut rng = Rng::new(seed);
    let mut log = Vec::new();
    let mut faults = 0;
    let mut stopped = Vec::new();
    for _ in 0..events {
        let event = draw(&mut rng);
        log.push(format!("{event:?}"));
        match event {
            Event::Hup => server.signal(Signal::SIGHUP),
            Event::Ttin => server.signal(Signal::SIGTTIN),
            Event::Ttou => server.signal(Signal::SIGTTOU),
            Event::Winch => server.signal(Signal::SIGWINCH),
            Event::Scale(n) => {
                let out = server.control(&["scale", &n.to_string()]);
                assert!(out.status.success(), "seed {seed}: scale {n}: {out:?}");
            }
            Event::ReloadWait => {
                // Its outcome depends on what else is going on (a newer
                // reload supersedes it, a WINCH abandons it); it must answer.
                let out = server.control(&["reload", "--wait", "--timeout", "60"]);
                let stderr = String::from_utf8_lossy(&out.stderr);
                assert!(
                    !stderr.contains("no answer from the server"),
                    "seed {seed}: reload --wait got no answer; events {log:?}"
                );
            }
            Event::BrokenBinaryHup => {
                deploy_script(&exe, "#!/bin/sh\necho 'broken build' >&2\nexit 3\n");
                server.signal(Signal::SIGHUP);
                server.wait_for_log_count("rolled back", 1, Duration::from_secs(60));
                deploy_script(&exe, &wrapper(""));
            }
            Event::BrokenConfigHup => {
                write_file(&config, "workers = \"many\"\n");
                let aborted = server.log_count("Reload aborted");
                server.signal(Signal::SIGHUP);
                server.wait_for_log_count("Reload aborted", aborted + 1, Duration::from_secs(60));
                write_file(&config, good_config);
            }
            Event::Upgrade => server.signal(Signal::SIGUSR2),
            Event::SlowReload => {
                // A build that takes a while to boot; `reload` answers once
                // the new generation has pinned it, so the good build can go
                // back on disk at once.
                deploy_script(&exe, &wrapper("ZDR_DEMO_BOOT_MS=1500"));
                let _ = server.control(&["reload"]);
                deploy_script(&exe, &wrapper(""));
            }
            Event::KillWorker | Event::StopWorker => {
                let pids: Vec<u32> = server.worker_pids().into_iter().collect();
                if !pids.is_empty() {
                    let victim = pids[rng.below(pids.len() as u64) as usize];
                    let signal = if matches!(event, Event::KillWorker) {
                        Signal::SIGKILL
                    } else {
                        stopped.push(victim);
                        Signal::SIGSTOP
                    };
                    let _ =
                        nix::sys::signal::kill(nix::unistd::Pid::from_raw(victim as i32), signal);
                    faults += 1;
                }
            }
        }
        if matches!(event, Event::KillWorker | Event::StopWorker | Event::Winch) {
            idle = None;
        } else if idle.is_none() && server.status().workers.iter().any(|w| w.state == "ready") {
            idle = Some(rt.block_on(common::idle::Pool::open(server.addr(), IDLE)));
            idle_from = log.len();
        }
        std::thread::sleep(Duration::from_millis(rng.below(300)));
    }

    // Settle: a good build and configuration, then a reload that must
    // succeed.
    deploy_script(&exe, &wrapper(""));
    write_file(&config, good_config);
    let out = server.control(&["reload", "--wait", "--timeout", "120"]);
    assert!(
        out.status.success(),
        "seed {seed}: the final reload failed: {}; events {log:?}\n{}",
        String::from_utf8_lossy(&out.stderr),
        server.log_text()
    );
    let generation = server.status().generation.expect("a serving generation");
    let settled = wait_until(Duration::from_secs(120), || {
        let s = server.status();
        s.workers.len() == s.target_workers
            && s.workers
                .iter()
                .all(|w| w.generation == generation && w.state == "ready" && w.accepting)
    });
    let status = server.status();
    assert!(
        settled,
        "seed {seed}: never settled: {status:?}; events {log:?}\n{}",
        server.log_text()
    );
    assert_eq!(
        status.target_workers, 2,
        "seed {seed}: HUP restores the configured workers"
    );
    let listed: BTreeSet<u32> = status.workers.iter().map(|w| w.pid).collect();
    assert!(
        wait_until(Duration::from_secs(60), || server.worker_pids() == listed
            && zombies(server.pid) == 0),
        "seed {seed}: processes {:?} but status {listed:?}; events {log:?}",
        server.worker_pids()
    );
    // Traffic flows on the settled generation.
    load.wait_for_generation(generation, 50);
    let round = match &mut idle {
        Some(pool) => rt.block_on(pool.round()),
        None => {
            // Broken by the last event: opened now, it has seen only the
            // settling reload.
            let mut pool = rt.block_on(common::idle::Pool::open(server.addr(), IDLE));
            idle_from = log.len();
            rt.block_on(pool.round())
        }
    };
    let report = rt.block_on(load.stop());
    eprintln!(
        "seed {seed}: {} events ({faults} faults), {} requests ok, {} failed, final generation {generation}",
        log.len(),
        report.ok,
        report.failed
    );
    eprintln!(
        "seed {seed}: {} of {IDLE} idle keep-alive connections (held since event {idle_from}) answered, {} closed unanswered",
        round.answered,
        round.lost.len(),
    );
    let server_log = if round.lost.is_empty() {
        String::new()
    } else {
        server.log_text()
    };
    round.assert_all_answered(
        &format!("seed {seed}, held since event {idle_from} of {log:?}\n{server_log}"),
        IDLE,
    );
    assert_eq!(
        round.by_generation.keys().copied().collect::<Vec<_>>(),
        vec![generation],
        "seed {seed}: {round:?}; events {log:?}"
    );
    if faults == 0 {
        assert_eq!(
            report.failed, 0,
            "seed {seed}: {:?}; events {log:?}",
            report.failures
        );
    }
    for pid in stopped {
        // A stopped worker is killed by the heartbeat timeout; wake any
        // survivor so that nothing is left behind.
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), Signal::SIGCONT);
    }
    server.signal(Signal::SIGTERM);
    assert_eq!(
        server.wait_exit(Duration::from_secs(60)).code(),
        Some(0),
        "seed {seed}: events {log:?}"
    );
}

#[test]
fn seeded_operator_sequences_end_where_they_should() {
    let seeds: u64 = std::env::var("ZDR_CHAOS_SEEDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let first: u64 = std::env::var("ZDR_CHAOS_FIRST_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    // The soak: seeds one after another until the minutes are up.
    if let Some(minutes) = std::env::var("ZDR_CHAOS_SOAK_MINUTES")
        .ok()
        .and_then(|v| v.parse::<f64>().ok())
    {
        let until = std::time::Instant::now() + Duration::from_secs_f64(minutes * 60.0);
        let mut seed = first;
        while std::time::Instant::now() < until {
            run_seed(seed, 14);
            seed += 1;
        }
        eprintln!("soak: seeds {first}..{} in {minutes} minutes", seed - 1);
        return;
    }
    for seed in first..first + seeds {
        run_seed(seed, 14);
    }
}
