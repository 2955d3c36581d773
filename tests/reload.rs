//! Zero-downtime reloads against the real binary: HUP under load, requests
//! in flight across a HUP, rollback of a generation that cannot boot,
//! scaling signals and hung-worker detection.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::*;
use nix::sys::signal::Signal;

fn ten_hups_under_load(extra: &[&str]) {
    let mut args = vec!["--workers", "3"];
    args.extend_from_slice(extra);
    let server = Launch::serve(&args).start();
    server.wait_ready();
    server.wait_workers(3);
    let rt = runtime();
    let load = rt.block_on(async { load::start(server.addr(), "/", 3, 3) });
    let watch = server.watch_capacity();
    for i in 1..=10u64 {
        server.signal(Signal::SIGHUP);
        server.wait_for_log(
            &format!("Reload to generation {} complete", i + 1),
            Duration::from_secs(30),
        );
    }
    // Traffic goes on after the last reload, on the last generation.
    load.wait_for_generation(11, 100);
    let capacity = watch.stop();
    let report = rt.block_on(load.stop());
    eprintln!(
        "load across 10 reloads: {} ok, {} failed, {} workers seen, {capacity:?}",
        report.ok,
        report.failed,
        report.by_pid.len()
    );

    assert_eq!(report.failed, 0, "failures: {:?}", report.failures);
    assert!(
        report.ok > 100,
        "too little traffic to mean anything: {report:?}"
    );
    assert_eq!(server.log_count("rolled back"), 0, "{}", server.log_text());
    assert!(
        report.generations.contains(&11),
        "generation 11 never answered: {:?}",
        report.generations
    );
    assert!(
        capacity.min_serving >= 3,
        "serving workers dropped to {}",
        capacity.min_serving
    );
    let last = server.wait_generation_ready(11, 3);
    for _ in 0..6 {
        let r = server.get("/");
        assert_eq!(r.generation(), 11);
        assert!(last.contains(&r.pid()));
    }
}

#[test]
fn ten_reloads_under_load_fail_no_request() {
    ten_hups_under_load(&[]);
}

#[test]
fn ten_reloads_under_load_fail_no_request_with_preload() {
    ten_hups_under_load(&["--preload"]);
}

#[test]
fn requests_in_flight_finish_on_the_old_generation() {
    let server = Launch::serve(&["--workers", "2", "--graceful-timeout", "120"]).start();
    server.wait_ready();
    let old = server.wait_generation_ready(1, 2);
    let addr = server.addr();
    // Twenty requests in flight on the old workers, for as long as the
    // test keeps them.
    let held = hold_requests(addr, 20, &old);
    server.signal(Signal::SIGHUP);
    server.wait_for_log("Generation 2 ready", Duration::from_secs(60));
    // The new generation takes every new request while the old one
    // finishes its own: once the old workers have heard the drain (their
    // listeners closed to them), none of them accepts again.
    server.wait_old_generations_stop_accepting(2);
    for _ in 0..10 {
        let r = server.get("/");
        assert_eq!(r.generation(), 2);
        assert!(!old.contains(&r.pid()));
    }
    assert!(
        old.iter().all(|p| alive(*p)),
        "an old worker quit with requests in flight"
    );
    assert_eq!(server.log_count("Reload to generation 2 complete"), 0);
    for h in held {
        let r = h.finish().expect("a request in flight failed");
        assert_eq!(r.status, 200);
        assert_eq!(r.generation(), 1);
        assert_eq!(r.field("received").as_deref(), Some("2"));
        assert!(old.contains(&r.pid()));
    }
    server.wait_for_log("Reload to generation 2 complete", Duration::from_secs(30));
    assert!(old.iter().all(|p| !alive(*p)));
}

#[test]
fn a_generation_that_cannot_boot_is_rolled_back() {
    let dir = TempDir::new("rollback");
    let exe = dir.path("zdr");
    std::fs::copy(zdr_bin(), &exe).unwrap();
    let server = Launch::serve(&["--workers", "2"]).exe(&exe).start();
    server.wait_ready();
    let old = server.wait_workers(2);
    let rt = runtime();
    let load = rt.block_on(async { load::start(server.addr(), "/", 2, 2) });

    // Deploy a binary that dies at start-up.
    let broken = dir.path("zdr.new");
    write_file(
        &broken,
        "#!/bin/sh\necho 'fatal: cannot find libexample.so' >&2\nexit 3\n",
    );
    std::fs::set_permissions(&broken, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    std::fs::rename(&broken, &exe).unwrap();
    server.signal(Signal::SIGHUP);
    server.wait_for_log("rolled back", Duration::from_secs(30));
    // The old generation goes on serving after the rollback.
    load.wait_for_more(100);
    let report = rt.block_on(load.stop());

    assert_eq!(report.failed, 0, "failures: {:?}", report.failures);
    let line = server
        .log_text()
        .lines()
        .find(|l| l.contains("rolled back"))
        .unwrap()
        .to_owned();
    assert!(
        line.contains("Reload to generation 2 rolled back"),
        "{line}"
    );
    assert!(
        line.contains("exited with status 3; its last output: fatal: cannot find libexample.so"),
        "{line}"
    );
    assert!(line.contains("generation 1 keeps serving"), "{line}");
    assert_eq!(
        server.wait_generation_ready(1, 2),
        old,
        "the old workers must keep serving, untouched"
    );
    let served: BTreeSet<u32> = (0..10).map(|_| server.get("/").pid()).collect();
    assert!(served.is_subset(&old));
    assert_eq!(report.generations, BTreeSet::from([1]));
}

#[test]
fn a_bad_config_on_reload_changes_nothing() {
    let dir = TempDir::new("badreload");
    let cfg = dir.path("zdr.toml");
    write_file(&cfg, "workers = 2\n");
    let server = Launch::serve(&["--config", cfg.to_str().unwrap()]).start();
    server.wait_ready();
    let old = server.wait_workers(2);
    write_file(&cfg, "workers = 3\nthreads = \"many\"\n");
    server.signal(Signal::SIGHUP);
    server.wait_for_log(
        "Reload aborted, configuration unchanged",
        Duration::from_secs(60),
    );
    assert!(
        server
            .log_text()
            .contains(&format!("{}:2: key `threads`", cfg.display())),
        "{}",
        server.log_text()
    );
    assert_eq!(server.worker_pids(), old);
    assert_eq!(server.get("/").generation(), 1);

    // A good edit takes effect on the next HUP.
    write_file(&cfg, "workers = 3\n");
    server.signal(Signal::SIGHUP);
    server.wait_for_log("Reload to generation 2 complete", Duration::from_secs(60));
    let new = server.wait_workers(3);
    assert!(new.is_disjoint(&old));
}

#[test]
fn ttin_ttou_and_winch() {
    let server = Launch::serve(&["--workers", "2"]).start();
    server.wait_ready();
    server.wait_workers(2);
    server.signal(Signal::SIGTTIN);
    let three = server.wait_workers(3);
    // Signals of one kind sent together coalesce: wait for each effect.
    server.signal(Signal::SIGTTOU);
    server.wait_for_log("Number of workers: 2", Duration::from_secs(60));
    server.wait_workers(2);
    server.signal(Signal::SIGTTOU);
    server.wait_for_log("Number of workers: 1", Duration::from_secs(60));
    let one = server.wait_workers(1);
    assert!(one.is_subset(&three));
    // Never below one: the master answers the signal, and a status it
    // gives after that (its maintenance runs before it reads requests)
    // still shows the one worker, ready.
    server.signal(Signal::SIGTTOU);
    server.wait_for_log_count("Number of workers: 1", 2, Duration::from_secs(60));
    let socket = server.control_socket();
    let out = Launch::raw(&[
        "status",
        "--json",
        "--control-socket",
        socket.to_str().unwrap(),
    ])
    .output();
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status["target_workers"], 1);
    let listed: Vec<(u64, &str)> = status["workers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| (w["pid"].as_u64().unwrap(), w["state"].as_str().unwrap()))
        .collect();
    assert_eq!(listed, vec![(*one.iter().next().unwrap() as u64, "ready")]);
    assert_eq!(server.worker_pids(), one);
    assert_eq!(server.get("/").pid(), *one.iter().next().unwrap());

    server.signal(Signal::SIGWINCH);
    assert!(
        wait_until(Duration::from_secs(60), || server.worker_pids().is_empty()),
        "workers left after WINCH"
    );
    assert!(alive(server.pid), "WINCH must keep the master");
    server.signal(Signal::SIGHUP);
    server.wait_workers(2);
    assert_eq!(server.get("/").status, 200);
}

#[test]
fn a_hung_worker_is_killed_and_replaced() {
    let server = Launch::serve(&["--workers", "2", "--timeout", "3"]).start();
    server.wait_ready();
    let before = server.wait_workers(2);
    let addr = server.addr();
    // Blocks the runtime of whichever worker takes it for 60 s.
    let hung = std::thread::spawn(move || try_get(addr, "/block?ms=60000"));
    server.wait_for_log("WORKER TIMEOUT", Duration::from_secs(60));
    let victim = before
        .iter()
        .copied()
        .find(|p| {
            server
                .log_text()
                .contains(&format!("WORKER TIMEOUT (pid: {p}"))
        })
        .expect("the timed-out worker is one of ours");
    assert!(wait_until(Duration::from_secs(30), || !server
        .worker_pids()
        .contains(&victim)));
    let after = server.wait_workers(2);
    assert!(!after.contains(&victim));
    assert!(
        hung.join().unwrap().is_err(),
        "the hung request dies with its worker"
    );
    // A request longer than the timeout, on a healthy runtime, is not a
    // timeout.
    let slow = server.get("/slow?ms=6000");
    assert_eq!(slow.status, 200);
    assert_eq!(server.log_count("WORKER TIMEOUT"), 1);
}

#[test]
fn a_hup_during_a_reload_supersedes_it() {
    let dir = TempDir::new("supersede");
    let exe = dir.path("zdr");
    std::fs::copy(zdr_bin(), &exe).unwrap();
    let server = Launch::serve(&["--workers", "2"]).exe(&exe).start();
    server.wait_ready();
    let old = server.wait_generation_ready(1, 2);
    // Generation 2 runs a build that takes minutes to boot ...
    deploy_script(
        &exe,
        &format!(
            "#!/bin/sh\nZDR_DEMO_BOOT_MS=600000 exec {} \"$@\"\n",
            zdr_bin().display()
        ),
    );
    server.signal(Signal::SIGHUP);
    server.wait_for_log("Reload: starting generation 2", Duration::from_secs(60));
    let ok = wait_until(Duration::from_secs(30), || {
        server
            .status()
            .workers
            .iter()
            .filter(|w| w.generation == 2 && w.state == "booting")
            .count()
            == 2
    });
    assert!(ok, "generation 2 never booted: {:?}", server.status());
    // ... and a fixed build is deployed while it boots.
    deploy_script(
        &exe,
        &format!("#!/bin/sh\nexec {} \"$@\"\n", zdr_bin().display()),
    );
    server.signal(Signal::SIGHUP);
    server.wait_for_log("Reload to generation 3 complete", Duration::from_secs(30));
    assert!(server
        .log_text()
        .contains("Reload to generation 2 superseded"));
    assert_eq!(server.log_count("rolled back"), 0, "{}", server.log_text());
    let now = server.wait_generation_ready(3, 2);
    assert!(now.is_disjoint(&old));
    let generations: BTreeSet<u64> = (0..10).map(|_| server.get("/").generation()).collect();
    assert_eq!(generations, BTreeSet::from([3]));
}

#[test]
fn max_requests_recycles_workers_without_failures() {
    let server = Launch::serve(&[
        "--workers",
        "2",
        "--max-requests",
        "50",
        "--max-requests-jitter",
        "10",
    ])
    .start();
    server.wait_ready();
    let first = server.wait_workers(2);
    let rt = runtime();
    // One request per connection: a worker that stops accepting at its
    // limit takes no request beyond the ones it has already accepted.
    let load = rt.block_on(async { load::start(server.addr(), "/", 0, 3) });
    let watch = server.watch_capacity();
    assert!(
        wait_until(Duration::from_secs(120), || server
            .log_count("Worker exiting")
            >= 6
            && first.iter().all(|p| !alive(*p))),
        "fewer than 6 recycles; log:\n{}",
        server.log_text()
    );
    // Traffic goes on after the recycles.
    load.wait_for_more(50);
    let capacity = watch.stop();
    let report = rt.block_on(load.stop());

    assert_eq!(report.failed, 0, "failures: {:?}", report.failures);
    assert!(
        capacity.min_serving >= 2,
        "capacity dipped to {} serving workers",
        capacity.min_serving
    );
    assert!(
        first.iter().all(|p| !alive(*p)),
        "the first workers were never recycled"
    );
    let recycled: Vec<(u32, u64)> = report
        .by_pid
        .iter()
        .filter(|(p, _)| !alive(**p))
        .map(|(p, n)| (*p, *n))
        .collect();
    assert!(recycled.len() >= 6, "{recycled:?}");
    // No worker retires before its limit (50 + 0..=10): it serves on until
    // its replacement is ready, then drains.
    for (pid, n) in &recycled {
        assert!(
            *n >= 50,
            "worker {pid} was recycled after only {n} requests"
        );
    }
    // One recycled worker at a time: never more than one process beyond
    // the two workers.
    assert!(
        capacity.max_processes <= 3,
        "{} processes at once",
        capacity.max_processes
    );
    eprintln!("recycled workers and their requests: {recycled:?}");
}

/// Recycling hands a keep-alive connection to a sibling instead of closing
/// it: one connection, kept open by its client, is answered by worker after
/// worker as they reach their limit, and never told to close. Its requests
/// are plain GETs, uploads the app reads whole, and pairs sent in one write
/// (the second one read ahead by the worker that hands it over).
#[test]
fn recycling_hands_keep_alive_connections_to_a_sibling() {
    let server = Launch::serve(&[
        "--workers",
        "2",
        "--max-requests",
        "15",
        "--metrics-bind",
        "127.0.0.1:0",
    ])
    .start();
    server.wait_ready();
    let first = server.wait_workers(2);
    let mut conn = KeepAlive::open(server.addr());
    let get = b"GET / HTTP/1.1\r\nHost: t\r\n\r\n";
    let upload = b"POST /upload HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n\r\nhello";
    let mut pids = BTreeSet::new();
    let mut answered = 0;
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    // Until the connection has been answered by five workers and both of
    // the first ones are gone.
    while pids.len() < 5 || first.iter().any(|p| alive(*p)) {
        assert!(
            std::time::Instant::now() < deadline,
            "{answered} answers from {pids:?}; log:\n{}",
            server.log_text()
        );
        let (sent, expect): (Vec<u8>, usize) = match answered % 3 {
            0 => (get.to_vec(), 1),
            1 => (upload.to_vec(), 1),
            _ => ([&get[..], &get[..]].concat(), 2),
        };
        assert!(conn.send(&sent));
        for _ in 0..expect {
            let reply = conn.read().unwrap_or_else(|| {
                panic!(
                    "the connection ended after {answered} answers from {pids:?}; log:\n{}",
                    server.log_text()
                )
            });
            assert_eq!(reply.status, 200, "{reply:?}");
            assert_eq!(reply.header("connection"), None, "{reply:?}");
            pids.insert(reply.pid());
            answered += 1;
        }
    }
    assert!(
        server.log_count("Worker exiting") >= 3,
        "{}",
        server.log_text()
    );
    // Each worker that left handed the connection on.
    let handed = metric(&server.scrape(), "zdr_connections_handed_over_total");
    assert!(handed >= 4.0, "handed over {handed} times");
    eprintln!("{answered} answers on one connection from workers {pids:?}");
}

/// A reload hands idle keep-alive connections to the new generation: a
/// client that keeps its connection across the reload has its next request
/// answered by the new code, and is never told to close.
#[test]
fn a_reload_hands_idle_connections_to_the_new_generation() {
    let server = Launch::serve(&["--workers", "2", "--keep-alive", "600"]).start();
    server.wait_ready();
    let old = server.wait_generation_ready(1, 2);
    let mut conns: Vec<_> = (0..4).map(|_| KeepAlive::open(server.addr())).collect();
    let ask = |conn: &mut KeepAlive| {
        let reply = conn.get().expect("an answer on the same connection");
        assert_eq!(reply.status, 200, "{reply:?}");
        assert_eq!(reply.header("connection"), None, "{reply:?}");
        reply.generation()
    };
    for conn in &mut conns {
        assert_eq!(ask(conn), 1);
    }
    server.signal(Signal::SIGHUP);
    server.wait_for_log("Reload to generation 2 complete", Duration::from_secs(60));
    assert!(
        wait_until(Duration::from_secs(60), || old.iter().all(|p| !alive(*p))),
        "the old workers linger"
    );
    for conn in &mut conns {
        assert_eq!(ask(conn), 2);
    }
    assert_eq!(
        server.log_count("Worker exiting"),
        2,
        "{}",
        server.log_text()
    );
}

/// A large answer that its client reads slowly spans a reload whole: the
/// draining worker does not hand the connection over while hyper still
/// holds bytes of the body, and hands it over once the body is out, so the
/// client's next request on it is answered by the new generation.
#[test]
fn a_large_answer_read_slowly_spans_a_reload_then_its_connection_moves() {
    use std::io::Read as _;
    // Larger than what the loopback's socket buffers hold: the worker is
    // still sending when the reload comes.
    const N: usize = 48 << 20;
    let server = Launch::serve(&[
        "--workers",
        "1",
        "--keep-alive",
        "600",
        "--metrics-bind",
        "127.0.0.1:0",
    ])
    .start();
    server.wait_ready();
    let old = server.wait_generation_ready(1, 1);
    let mut conn = KeepAlive::open(server.addr());
    assert!(conn.send(format!("GET /bytes?n={N} HTTP/1.1\r\nHost: t\r\n\r\n").as_bytes()));
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        conn.reader().read_exact(&mut byte).expect("the head");
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).to_lowercase();
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(head.contains(&format!("content-length: {N}\r\n")), "{head}");
    assert!(!head.contains("connection: close"), "{head}");
    let mut body = vec![0u8; N];
    let first = 1 << 20;
    conn.reader()
        .read_exact(&mut body[..first])
        .expect("the body's first MiB");
    server.signal(Signal::SIGHUP);
    server.wait_for_log("Generation 2 ready", Duration::from_secs(60));
    server.wait_old_generations_stop_accepting(2);
    // The old worker is draining, and still sending.
    assert!(old.iter().all(|p| alive(*p)), "{}", server.log_text());
    conn.reader()
        .read_exact(&mut body[first..])
        .expect("the rest of the body");
    let wrong = body
        .iter()
        .enumerate()
        .position(|(i, b)| *b != b'a' + (i % 26) as u8);
    assert_eq!(wrong, None, "the body differs from what was sent");
    // The next request on the same connection: the new generation answers.
    let reply = conn.get().expect("an answer on the same connection");
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(reply.generation(), 2, "{reply:?}");
    assert_eq!(reply.header("connection"), None, "{reply:?}");
    assert!(
        wait_until(Duration::from_secs(60), || old.iter().all(|p| !alive(*p))),
        "the old worker lingers"
    );
    server.wait_for_log("Reload to generation 2 complete", Duration::from_secs(60));
    assert!(
        !server.log_text().contains("graceful timeout"),
        "{}",
        server.log_text()
    );
    let handed = metric(&server.scrape(), "zdr_connections_handed_over_total");
    assert_eq!(handed, 1.0, "{}", server.log_text());
}

/// A worker takes handed-over connections only within its
/// `--worker-connections`: when the worker that stays is full, the leaving
/// worker's connections are not piled onto it (the leaving one serves them
/// out itself).
#[test]
fn handed_over_connections_respect_the_connection_cap() {
    let server = Launch::serve(&[
        "--workers",
        "2",
        "--worker-connections",
        "2",
        "--keep-alive",
        "600",
    ])
    .start();
    server.wait_ready();
    let workers = server.wait_workers(2);
    // Four connections: both workers full.
    let mut conns = Vec::new();
    for _ in 0..4 {
        let mut conn = KeepAlive::open(server.addr());
        assert_eq!(conn.get().expect("an answer").status, 200);
        conns.push(conn);
    }
    assert!(wait_until(Duration::from_secs(30), || server
        .status()
        .workers
        .iter()
        .all(|w| w.connections == 2)));
    server.signal(Signal::SIGTTOU);
    let left = server.wait_workers(1);
    let gone: Vec<u32> = workers.difference(&left).copied().collect();
    assert!(
        wait_until(Duration::from_secs(60), || !alive(gone[0])),
        "the leaving worker lingers"
    );
    // The status reads the master's table, which drops the worker once it
    // reaped it: wait for that, not for the process alone.
    let mut stays: Vec<u64> = Vec::new();
    assert!(
        wait_until(Duration::from_secs(60), || {
            stays = server
                .status()
                .workers
                .iter()
                .map(|w| w.connections)
                .collect();
            stays.len() == 1
        }),
        "the master still lists the leaving worker: {stays:?}"
    );
    assert_eq!(stays, vec![2], "{}", server.log_text());
}

/// Scaling down (TTOU) closes no keep-alive connection either: the
/// leaving worker's connections are answered next by the workers that stay.
#[test]
fn scaling_down_hands_the_leaving_workers_connections_over() {
    // A keep-alive timeout long enough that no connection closes of its own
    // while the test waits.
    let server = Launch::serve(&["--workers", "3", "--keep-alive", "600"]).start();
    server.wait_ready();
    let workers = server.wait_workers(3);
    // Connections until every worker holds at least one.
    let mut conns = Vec::new();
    let mut holders = BTreeSet::new();
    while holders.len() < 3 {
        assert!(conns.len() < 300, "connections reach only {holders:?}");
        let mut conn = KeepAlive::open(server.addr());
        let reply = conn.get().expect("an answer");
        holders.insert(reply.pid());
        conns.push((conn, reply.pid()));
    }
    server.signal(Signal::SIGTTOU);
    let left = server.wait_workers(2);
    let gone: Vec<u32> = workers.difference(&left).copied().collect();
    assert_eq!(gone.len(), 1, "{workers:?} -> {left:?}");
    assert!(
        wait_until(Duration::from_secs(60), || !alive(gone[0])),
        "the leaving worker {} lingers",
        gone[0]
    );
    let mut moved = 0;
    for (conn, pid) in &mut conns {
        let reply = conn.get().expect("the connection still answers");
        assert_eq!(reply.status, 200, "{reply:?}");
        assert_eq!(reply.header("connection"), None, "{reply:?}");
        assert!(left.contains(&reply.pid()), "{reply:?} from {left:?}");
        if *pid == gone[0] {
            moved += 1;
        }
    }
    assert!(moved >= 1);
}

#[test]
fn usr2_upgrades_the_binary_keeping_the_master_pid() {
    let dir = TempDir::new("usr2");
    let exe = dir.path("zdr");
    let real = dir.path("zdr-real");
    std::fs::copy(zdr_bin(), &exe).unwrap();
    std::fs::copy(zdr_bin(), &real).unwrap();
    for preload in [false, true] {
        std::fs::copy(zdr_bin(), &exe).unwrap();
        let args: &[&str] = if preload {
            &["--workers", "2", "--preload"]
        } else {
            &["--workers", "2"]
        };
        let server = Launch::serve(args).exe(&exe).start();
        server.wait_ready();
        let old = server.wait_workers(2);
        let rt = runtime();
        let load = rt.block_on(async { load::start(server.addr(), "/", 2, 2) });

        // A binary whose check fails: nothing changes.
        deploy_script(
            &exe,
            "#!/bin/sh\necho 'bad build: missing symbol' >&2\nexit 1\n",
        );
        server.signal(Signal::SIGUSR2);
        server.wait_for_log("Binary upgrade aborted", Duration::from_secs(60));
        assert!(server
            .log_text()
            .contains("check exited with status 1; its last output: bad build: missing symbol"));
        assert_eq!(server.worker_pids(), old);

        // A build that answers differently: same master, new code.
        deploy_script(
            &exe,
            &format!(
                "#!/bin/sh\nZDR_DEMO_MESSAGE=v2 exec {} \"$@\"\n",
                real.display()
            ),
        );
        // `zdr status` answers all through the upgrade: the control socket
        // is handed over across exec, never closed.
        let socket = server.control_socket();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let asker = {
            let stop = std::sync::Arc::clone(&stop);
            std::thread::spawn(move || {
                let (mut answered, mut refused) = (0u32, Vec::new());
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    match zdr::control::send(
                        &socket,
                        &zdr::control::Request::Status,
                        Duration::from_secs(30),
                    ) {
                        Ok(_) => answered += 1,
                        Err(e) => refused.push(e.to_string()),
                    }
                }
                (answered, refused)
            })
        };
        server.signal(Signal::SIGUSR2);
        server.wait_for_log("Reload to generation 2 complete", Duration::from_secs(60));
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let (answered, refused) = asker.join().unwrap();
        assert!(answered > 0);
        assert!(
            refused.is_empty(),
            "preload={preload}: {} of {} status requests failed, first: {:?}",
            refused.len(),
            refused.len() as u32 + answered,
            refused.first()
        );
        load.wait_for_generation(2, 50);
        let report = rt.block_on(load.stop());
        assert_eq!(report.failed, 0, "preload={preload}: {:?}", report.failures);
        assert!(
            alive(server.pid),
            "the master's pid must survive the upgrade"
        );
        assert!(server
            .log_text()
            .contains(&format!("pid {} stays", server.pid)));
        let new = server.wait_workers(2);
        assert!(new.is_disjoint(&old));
        for _ in 0..6 {
            let r = server.get("/");
            assert_eq!(r.field("message").as_deref(), Some("v2"), "{r:?}");
            assert_eq!(r.generation(), 2);
            if preload {
                assert_eq!(
                    r.field("loaded_in"),
                    Some(server.pid.to_string()),
                    "preloaded by the upgraded master"
                );
            }
        }
    }
}

#[test]
fn upgraded_connections_outlive_a_reload_until_they_close() {
    use std::io::{Read, Write};
    let server = Launch::serve(&["--workers", "1", "--graceful-timeout", "20"]).start();
    server.wait_ready();
    let old = server.wait_workers(1);
    let mut s = upgrade_to_echo(server.addr());

    server.signal(Signal::SIGHUP);
    server.wait_for_log("Generation 2 ready", Duration::from_secs(60));
    server.wait_old_generations_stop_accepting(2);
    assert_eq!(server.get("/").generation(), 2);
    // The old worker drains but keeps the upgraded connection working.
    for word in [&b"still here"[..], b"after the reload"] {
        s.write_all(word).unwrap();
        let mut echoed = vec![0u8; word.len()];
        s.read_exact(&mut echoed).unwrap();
        assert_eq!(echoed, word);
    }
    assert!(
        old.iter().all(|p| alive(*p)),
        "the old worker left with an upgraded connection open"
    );
    assert_eq!(server.log_count("Reload to generation 2 complete"), 0);
    drop(s);
    server.wait_for_log("Reload to generation 2 complete", Duration::from_secs(60));
    assert!(old.iter().all(|p| !alive(*p)));
}

#[test]
fn reload_adds_and_removes_bind_addresses() {
    let dir = TempDir::new("rebind");
    let cfg = dir.path("zdr.toml");
    let sock = dir.path("extra.sock");
    write_file(&cfg, "bind = \"127.0.0.1:0\"\n");
    let server = Launch::raw(&["serve", "--config", cfg.to_str().unwrap()]).start();
    server.wait_ready();
    let tcp = server.addr();

    write_file(
        &cfg,
        &format!("bind = [\"127.0.0.1:0\", \"unix:{}\"]\n", sock.display()),
    );
    server.signal(Signal::SIGHUP);
    server.wait_for_log("Reload to generation 2 complete", Duration::from_secs(60));
    assert_eq!(
        get(tcp, "/").generation(),
        2,
        "the unchanged address keeps its socket"
    );
    assert!(listens(server.pid, tcp), "the kept address is listed");
    let mut s = std::os::unix::net::UnixStream::connect(&sock).expect("the new address answers");
    use std::io::{Read, Write};
    s.write_all(b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    assert_eq!(parse_reply(&raw).unwrap().generation(), 2);

    write_file(&cfg, &format!("bind = \"unix:{}\"\n", sock.display()));
    server.signal(Signal::SIGHUP);
    server.wait_for_log("Reload to generation 3 complete", Duration::from_secs(60));
    assert!(
        !listens(server.pid, tcp),
        "the removed address still accepts"
    );
    assert!(std::os::unix::net::UnixStream::connect(&sock).is_ok());
}

#[test]
fn a_draining_worker_hands_http1_to_the_new_generation_and_sends_http2_goaway() {
    use std::io::Write;
    let server = Launch::serve(&["--workers", "1", "--graceful-timeout", "120"]).start();
    server.wait_ready();
    let old = server.wait_generation_ready(1, 1);
    let addr = server.addr();

    // HTTP/1.1: a keep-alive connection with a request in flight.
    let mut h1 = std::net::TcpStream::connect(addr).unwrap();
    h1.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    h1.write_all(b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\n\r\nx")
        .unwrap();
    // HTTP/2: a connection with a stream in flight (its body not finished).
    let rt = runtime();
    let (mut h2_body, h2_response, h2_conn) = rt.block_on(async {
        let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (mut sender, conn) = hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            hyper_util::rt::TokioIo::new(stream),
        )
        .await
        .unwrap();
        let conn = tokio::spawn(conn);
        let (body_tx, body_rx) = tokio::sync::mpsc::channel::<
            Result<hyper::body::Frame<bytes::Bytes>, std::convert::Infallible>,
        >(1);
        let body = http_body_util::StreamBody::new(tokio_stream_from(body_rx));
        let req = hyper::Request::post("http://test/").body(body).unwrap();
        let response = tokio::spawn(async move { sender.send_request(req).await });
        body_tx
            .send(Ok(hyper::body::Frame::data(bytes::Bytes::from_static(
                b"x",
            ))))
            .await
            .unwrap();
        (body_tx, response, conn)
    });
    assert!(
        wait_until(Duration::from_secs(60), || accepted_connections(
            &old,
            addr.port()
        ) == 2),
        "both connections reach the worker"
    );

    server.signal(Signal::SIGHUP);
    server.wait_for_log("Generation 2 ready", Duration::from_secs(60));
    server.wait_old_generations_stop_accepting(2);

    // HTTP/1.1: the request in flight is answered by the old generation,
    // not told to close; the connection then goes to the new generation,
    // which answers the next request on it.
    let mut h1 = KeepAlive::from_stream(h1);
    assert!(h1.send(b"y"));
    let reply = h1.read().expect("a whole response");
    assert_eq!(reply.status, 200);
    assert_eq!(reply.generation(), 1);
    assert_eq!(reply.header("connection"), None, "{reply:?}");
    let reply = h1.get().expect("an answer on the same connection");
    assert_eq!(reply.status, 200);
    assert_eq!(reply.generation(), 2, "{reply:?}");
    assert_eq!(reply.header("connection"), None, "{reply:?}");

    // HTTP/2: the stream in flight completes; the connection then ends
    // cleanly (GOAWAY, not a reset), and takes no new stream.
    let (status, conn_result) = rt.block_on(async {
        h2_body
            .send(Ok(hyper::body::Frame::data(bytes::Bytes::from_static(
                b"y",
            ))))
            .await
            .unwrap();
        drop(std::mem::replace(
            &mut h2_body,
            tokio::sync::mpsc::channel(1).0,
        ));
        let response = h2_response
            .await
            .unwrap()
            .expect("the stream in flight is answered");
        let status = response.status().as_u16();
        use http_body_util::BodyExt;
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert!(String::from_utf8_lossy(&body).contains("generation=1"));
        let conn = tokio::time::timeout(Duration::from_secs(60), h2_conn)
            .await
            .expect("the HTTP/2 connection closes once drained");
        (status, conn.unwrap())
    });
    assert_eq!(status, 200);
    assert!(conn_result.is_ok(), "{conn_result:?}");
    server.wait_for_log("Reload to generation 2 complete", Duration::from_secs(60));
}

/// A stream of a channel's items.
fn tokio_stream_from<T: Send + 'static>(
    mut rx: tokio::sync::mpsc::Receiver<T>,
) -> impl futures_util::Stream<Item = T> {
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

/// `--reload` (development): a new build of the executable, or an edited
/// config file, rolls out by itself, with the usual readiness gate.
#[test]
fn reload_flag_rolls_out_a_new_build_and_an_edited_config() {
    let dir = TempDir::new("watch");
    let exe = dir.path("zdr");
    std::fs::copy(zdr_bin(), &exe).unwrap();
    let config = dir.path("zdr.toml");
    write_file(&config, "workers = 1\n");
    let server = Launch::serve(&["--reload", "--config", config.to_str().unwrap()])
        .exe(&exe)
        .start();
    server.wait_ready();
    server.wait_generation_ready(1, 1);
    // A new build lands (as cargo's does: a whole new file).
    deploy_script(&exe, &wrapper("ZDR_DEMO_MESSAGE=rebuilt"));
    server.wait_generation_ready(2, 1);
    assert_eq!(server.get("/").field("message").as_deref(), Some("rebuilt"));
    // An edited configuration.
    write_file(&config, "workers = 2\n");
    server.wait_generation_ready(3, 2);
    assert!(server.log_text().contains("changed: reloading"));
}

/// A reload under load with `args`: the most worker processes and the
/// fewest serving workers seen while it ran; not one request fails.
fn batched_reload(workers: usize, args: &[&str]) -> (usize, usize) {
    let n = workers.to_string();
    let mut all = vec!["--workers", n.as_str()];
    all.extend(args);
    let server = Launch::serve(&all).start();
    server.wait_ready();
    server.wait_generation_ready(1, workers);
    let rt = runtime();
    let load = rt.block_on(async { load::start(server.addr(), "/", 4, 2) });
    load.wait_for_more(50);
    let watch = server.watch_capacity();
    let out = server.control(&["reload", "--wait", "--timeout", "120"]);
    assert!(out.status.success(), "{out:?}");
    server.wait_generation_ready(2, workers);
    load.wait_for_generation(2, 50);
    let capacity = watch.stop();
    let report = rt.block_on(load.stop());
    assert_eq!(report.failed, 0, "{:?}", report.failures);
    assert!(capacity.samples > 0);
    (capacity.max_processes, capacity.min_serving)
}

/// `--max-surge 2` with 6 workers: a reload replaces them two at a time,
/// never running more than 8 processes nor fewer than 6 serving workers,
/// and not one request fails.
#[test]
fn a_batched_reload_stays_within_its_surge() {
    let (most, fewest) = batched_reload(6, &["--max-surge", "2"]);
    assert!(most <= 8, "{most} processes at once");
    assert!(fewest >= 6, "only {fewest} serving at one point");
}

/// `--max-unavailable 1` with no surge and 3 workers: a memory-bound
/// reload that never runs more than 3 worker processes, with at least 2
/// serving, and not one request fails.
#[test]
fn a_reload_with_max_unavailable_never_exceeds_the_workers() {
    let (most, fewest) = batched_reload(3, &["--max-unavailable", "1"]);
    assert!(most <= 3, "{most} processes at once");
    assert!(fewest >= 2, "only {fewest} serving at one point");
}

/// A canary reload: a faulty canary (half its answers are errors, set
/// through `raw_env` in the config file) is rolled back with its figures,
/// and no request fails except the canary's own injected errors; a
/// healthy canary is promoted and its generation takes over.
#[test]
fn a_faulty_canary_is_rolled_back_and_a_healthy_one_promoted() {
    let dir = TempDir::new("canary");
    let config = dir.path("zdr.toml");
    let toml = |rate: &str| {
        format!(
            "workers = 3\ncanary = 1\ncanary_seconds = 2\ncanary_min_requests = 20\n\
             raw_env = [\"ZDR_DEMO_ERROR_RATE={rate}\"]\n"
        )
    };
    write_file(&config, &toml("0"));
    let server = Launch::serve(&["--config", config.to_str().unwrap()]).start();
    server.wait_ready();
    server.wait_generation_ready(1, 3);
    let addr = server.addr();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let client = {
        let stop = std::sync::Arc::clone(&stop);
        std::thread::spawn(move || {
            let mut seen: Vec<(u16, u64)> = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let r = get(addr, "/");
                let generation = r
                    .field("generation")
                    .and_then(|g| g.parse().ok())
                    .unwrap_or(0);
                seen.push((r.status, generation));
            }
            seen
        })
    };
    write_file(&config, &toml("0.5"));
    let out = server.control(&["reload", "--wait", "--timeout", "120"]);
    let said = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success(),
        "the faulty canary was promoted: {said}"
    );
    assert!(said.contains("canary failed: error ratio"), "{said}");
    assert_eq!(server.status().generation, Some(1));

    write_file(&config, &toml("0"));
    let out = server.control(&["reload", "--wait", "--timeout", "120"]);
    assert!(out.status.success(), "{out:?}");
    assert!(server.log_text().contains("promoted"));
    server.wait_generation_ready(3, 3);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let seen = client.join().unwrap();
    let injected = seen.iter().filter(|(s, _)| *s == 500).count();
    assert!(injected > 0, "the canary answered no request");
    assert!(
        seen.iter()
            .all(|(s, g)| *s == 200 || (*s == 500 && *g == 2)),
        "a failure outside the canary's injected errors: {:?}",
        seen.iter()
            .find(|(s, g)| !(*s == 200 || (*s == 500 && *g == 2)))
    );
    assert!(seen.iter().any(|(s, g)| *s == 200 && *g == 3));
}

/// A canary in steps (`canary_steps`, used by a plain HUP): a healthy one
/// passes each step and is promoted; a slow one (its p99 well above the
/// old generation's) is rolled back. The metrics count both verdicts.
/// No request fails.
#[test]
fn a_stepped_canary_is_promoted_and_a_slow_one_rolled_back() {
    let dir = TempDir::new("canary-steps");
    let config = dir.path("zdr.toml");
    let toml = |latency_ms: u32| {
        format!(
            "workers = 4\ncanary_steps = [\"1\", \"50%\", \"100%\"]\ncanary_seconds = 2\n\
             canary_min_requests = 5\ncanary_max_p99_ratio = 8\nmetrics_bind = \"127.0.0.1:0\"\n\
             raw_env = [\"ZDR_DEMO_LATENCY_MS={latency_ms}\"]\n"
        )
    };
    // Every answer takes at least 20 ms, so that a busy machine's noise
    // cannot make a healthy canary's p99 eight times the old one's; the
    // slow canary takes a second (its p99 forty times the old one's), and
    // needs only 5 answers in its window.
    write_file(&config, &toml(20));
    let server = Launch::serve(&["--config", config.to_str().unwrap()]).start();
    server.wait_ready();
    server.wait_generation_ready(1, 4);
    let addr = server.addr();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let clients: Vec<_> = (0..4)
        .map(|_| {
            let stop = std::sync::Arc::clone(&stop);
            std::thread::spawn(move || {
                let (mut ok, mut failed) = (0u64, 0u64);
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    match get(addr, "/").status {
                        200 => ok += 1,
                        _ => failed += 1,
                    }
                }
                (ok, failed)
            })
        })
        .collect();
    let out = server.control(&["reload", "--wait", "--timeout", "120"]);
    assert!(out.status.success(), "{out:?}");
    let log = server.log_text();
    assert!(log.contains("passed step 1"), "{log}");
    assert!(log.contains("Canary of generation 2 promoted"), "{log}");
    server.wait_generation_ready(2, 4);

    write_file(&config, &toml(1000));
    server.signal(Signal::SIGHUP);
    assert!(
        wait_until(Duration::from_secs(120), || server
            .log_text()
            .contains("canary failed: p99")),
        "{}",
        server.log_text()
    );
    assert!(wait_until(Duration::from_secs(60), || server
        .status()
        .workers
        .iter()
        .all(|w| w.generation == 2)));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (mut ok, mut failed) = (0, 0);
    for c in clients {
        let (o, f) = c.join().unwrap();
        ok += o;
        failed += f;
    }
    assert_eq!(failed, 0, "{ok} ok");
    let text = server.scrape();
    assert_eq!(
        metric(&text, "zdr_canary_verdicts_total{verdict=\"failed\"}"),
        1.0
    );
    assert!(metric(&text, "zdr_canary_verdicts_total{verdict=\"promoted\"}") >= 2.0);
    assert_eq!(metric(&text, "zdr_canary_workers"), 0.0);
}

/// A client that has connected but not yet sent its request when its
/// worker starts draining (a busy machine can hold a client back between
/// the two) is still answered, with `Connection: close`: the connection
/// gets the header timeout for its first request, not the short grace an
/// idle keep-alive connection gets.
#[test]
fn a_connection_whose_request_comes_late_in_a_drain_is_answered() {
    use std::io::{Read, Write};
    let server = Launch::serve(&["--workers", "1", "--header-timeout", "60"]).start();
    server.wait_ready();
    let old = server.wait_workers(1);
    let mut s = std::net::TcpStream::connect(server.addr()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    assert!(wait_until(Duration::from_secs(30), || server
        .status()
        .workers
        .iter()
        .any(|w| w.connections >= 1)));
    server.signal(Signal::SIGHUP);
    server.wait_old_generations_stop_accepting(2);
    // Well past the idle grace (1 s), well within the header timeout.
    std::thread::sleep(Duration::from_secs(3));
    s.write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n").unwrap();
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    let reply = parse_reply(&raw).expect("an answer, not a closed connection");
    assert_eq!(reply.status, 200);
    assert_eq!(reply.generation(), 1);
    assert_eq!(reply.header("connection"), Some("close"));
    assert!(wait_until(Duration::from_secs(60), || old
        .iter()
        .all(|p| !alive(*p))));
}

/// A canary on a server with no traffic at all: by default the reload is
/// rolled back after three windows with the reason and the fixes;
/// `canary_no_traffic = "promote"` promotes it instead (a quiet staging
/// server deploys anyway).
#[test]
fn a_canary_on_a_quiet_server_follows_canary_no_traffic() {
    let dir = TempDir::new("canary-quiet");
    let config = dir.path("zdr.toml");
    let toml = |policy: &str| {
        format!(
            "workers = 2\ncanary = 1\ncanary_seconds = 1\ncanary_min_requests = 20\n\
             canary_no_traffic = \"{policy}\"\n"
        )
    };
    write_file(&config, &toml("rollback"));
    let server = Launch::serve(&["--config", config.to_str().unwrap()]).start();
    server.wait_generation_ready(1, 2);

    let out = server.control(&["reload", "--wait", "--timeout", "120"]);
    let said = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "{said}");
    assert!(
        said.contains("too little traffic to judge a canary")
            && said.contains("canary_no_traffic = \"promote\""),
        "{said}"
    );
    assert_eq!(server.status().generation, Some(1));

    write_file(&config, &toml("promote"));
    let out = server.control(&["reload", "--wait", "--timeout", "120"]);
    assert!(out.status.success(), "{out:?}");
    server.wait_generation_ready(3, 2);
    assert!(server
        .log_text()
        .contains("promoted as canary_no_traffic = \"promote\" says"));
}

/// `reload --wait` whose reload a HUP supersedes while it boots is told
/// how the newer reload ends (here: generation 3 took over), never that
/// its own was rolled back: nothing failed.
#[test]
fn a_superseded_reload_wait_reports_the_newer_reloads_outcome() {
    // While this file exists, a booting worker waits for readiness: the
    // HUP lands while generation 2 boots, whatever the machine's speed.
    let dir = TempDir::new("superseded");
    let unready = dir.path("unready");
    let server = Launch::serve(&["--workers", "2"])
        .env("ZDR_DEMO_UNREADY_FILE", unready.to_str().unwrap())
        .start();
    server.wait_generation_ready(1, 2);
    write_file(&unready, "");
    let socket = server.control_socket();
    let waiting = std::thread::spawn(move || {
        zdr::control::send(
            &socket,
            &zdr::control::Request::Reload {
                wait: true,
                canary: None,
            },
            Duration::from_secs(120),
        )
    });
    server.wait_for_log("Reload: starting generation 2", Duration::from_secs(60));
    server.signal(Signal::SIGHUP);
    server.wait_for_log(
        "Reload to generation 2 superseded by a newer reload (generation 3)",
        Duration::from_secs(60),
    );
    std::fs::remove_file(&unready).unwrap();
    let answer = waiting
        .join()
        .unwrap()
        .expect("reload --wait got an answer");
    assert!(answer.ok, "{answer:?}");
    assert_eq!(
        answer.reload.as_ref().map(|r| r.generation),
        Some(3),
        "{answer:?}"
    );
    assert!(server
        .log_text()
        .contains("Reload to generation 2 superseded by a newer reload (generation 3)"));
    server.wait_generation_ready(3, 2);
}
