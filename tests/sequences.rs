//! Operator sequences and faults that combine: a stop while a preloaded
//! worker boots, HUP after WINCH, a scale past the bound, a crash after a
//! rollback, a master restarted after SIGKILL, and `zdr stop --wait`.

mod common;

use std::os::unix::process::CommandExt;
use std::time::Duration;

use common::*;
use nix::sys::signal::Signal;

#[test]
fn a_stop_reaches_a_preloaded_worker_while_it_boots() {
    // Workers that would take ten minutes to boot, and a graceful timeout
    // as long: only a stop that reaches them ends this quickly.
    let mut server = Launch::serve(&["--workers", "2", "--preload", "--graceful-timeout", "600"])
        .env("ZDR_DEMO_BOOT_MS", "600000")
        .start();
    let booting = wait_until(Duration::from_secs(60), || {
        let s = server.status();
        s.workers.len() == 2 && s.workers.iter().all(|w| w.state == "booting")
    });
    assert!(booting, "{}", server.log_text());
    let workers = server.worker_pids();
    server.signal(Signal::SIGTERM);
    server.wait_exit(Duration::from_secs(60));
    assert!(workers.iter().all(|p| !alive(*p)));
    assert_eq!(server.log_count("still busy at the graceful timeout"), 0);
}

#[test]
fn hup_after_winch_starts_exactly_one_generation() {
    let server = Launch::serve(&["--workers", "2"]).start();
    server.wait_ready();
    server.wait_generation_ready(1, 2);
    server.signal(Signal::SIGWINCH);
    assert!(
        wait_until(Duration::from_secs(60), || server
            .status()
            .workers
            .is_empty()),
        "workers left after WINCH"
    );
    server.signal(Signal::SIGHUP);
    let mut seen = Vec::new();
    let ok = wait_until(Duration::from_secs(60), || {
        let s = server.status();
        seen.extend(s.workers.iter().map(|w| (w.generation, w.pid)));
        s.workers.len() == 2
            && s.workers
                .iter()
                .all(|w| w.generation == 2 && w.state == "ready")
    });
    assert!(ok, "{}", server.log_text());
    assert!(
        seen.iter().all(|(generation, _)| *generation == 2),
        "a worker of the paused generation started: {seen:?}"
    );
    assert_eq!(server.get("/").generation(), 2);
}

#[test]
fn a_scale_past_the_bound_is_refused() {
    let server = Launch::serve(&["--workers", "1"]).start();
    server.wait_ready();
    let out = server.control(&["scale", "100000"]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("cannot scale to 100000 workers: at most 500"),
        "{stderr}"
    );
    assert_eq!(server.status().target_workers, 1);
    // The same bound for the setting itself.
    let out = Launch::raw(&["check", "--workers", "501"]).output();
    assert_ne!(out.status.code(), Some(0));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("`workers`: must be at most 500, got 501"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_rolled_back_generation_heals_with_its_own_binary() {
    let dir = TempDir::new("pinned");
    let exe = dir.path("zdr");
    std::fs::copy(zdr_bin(), &exe).unwrap();
    let server = Launch::serve(&["--workers", "2"]).exe(&exe).start();
    server.wait_ready();
    let before = server.wait_generation_ready(1, 2);
    deploy_script(&exe, "#!/bin/sh\necho 'broken build' >&2\nexit 3\n");
    let out = server.control(&["reload", "--wait"]);
    assert_eq!(out.status.code(), Some(1), "the reload must roll back");
    // A worker of the serving generation dies: its replacement runs the
    // generation's own binary, not the broken file now on disk.
    let victim = *before.iter().next().unwrap();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(victim as i32), Signal::SIGKILL).unwrap();
    assert!(wait_until(Duration::from_secs(60), || !server
        .status()
        .workers
        .iter()
        .any(|w| w.pid == victim)));
    let after = server.wait_generation_ready(1, 2);
    assert!(!after.contains(&victim));
    assert_eq!(server.get("/").generation(), 1);
    assert_eq!(server.log_count("backing off"), 0, "{}", server.log_text());
}

#[test]
fn stop_wait_returns_when_the_master_is_gone_and_says_whether_it_forced() {
    // Nothing in flight: 0, "stopped gracefully", and the master is gone
    // when the command returns (a script may check the pid or start a new
    // server next). A few times over: the race was there 2 runs in 5.
    for _ in 0..3 {
        let mut server = Launch::serve(&["--workers", "2"]).start();
        server.wait_ready();
        server.wait_workers(2);
        let out = server.control(&["stop", "--wait"]);
        assert_eq!(
            out.status.code(),
            Some(0),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            "stopped gracefully"
        );
        assert!(
            !alive(server.pid),
            "stop --wait returned while the master still ran"
        );
        assert_eq!(server.wait_exit(Duration::from_secs(60)).code(), Some(0));
    }

    // A request that outlasts the graceful timeout: 1, and why.
    let mut server = Launch::serve(&["--workers", "1", "--graceful-timeout", "1"]).start();
    server.wait_ready();
    let workers = server.wait_workers(1);
    let held = hold_requests(server.addr(), 1, &workers);
    let out = server.control(&["stop", "--wait"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("stopped; 1 worker(s) still had connections open at the graceful timeout"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    server.wait_exit(Duration::from_secs(60));
    drop(held);
}

#[test]
fn a_master_started_after_a_killed_one_takes_over_its_files() {
    let dir = TempDir::new("stale");
    let pidfile = dir.path("zdr.pid");
    let pid = pidfile.to_str().unwrap();
    let mut server = Launch::serve(&["--workers", "1", "--pid", pid]).start();
    server.wait_ready();
    server.signal(Signal::SIGKILL);
    server.wait_exit(Duration::from_secs(60));
    assert!(
        pidfile.exists(),
        "a killed master cannot remove its pidfile"
    );
    let out = Launch::raw(&["status", "--pid", pid]).output();
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no master listens there"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let server = Launch::serve(&["--workers", "1", "--pid", pid]).start();
    server.wait_ready();
    server.wait_for_log("named pid", Duration::from_secs(60));
    server.wait_for_log("was left by a master that is gone", Duration::from_secs(60));
    let out = Launch::raw(&["status", "--json", "--pid", pid]).output();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn only_root_and_the_masters_user_may_command_it() {
    if !as_root("running a client as another user") {
        return;
    }
    let server = Launch::serve(&["--workers", "1", "--user", "65534"]).start();
    server.wait_ready();
    server.wait_workers(1);
    let socket = server.control_socket();
    // As the workers' user: refused, and the server is untouched.
    let out = std::process::Command::new(zdr_bin())
        .args(["scale", "3", "--control-socket", socket.to_str().unwrap()])
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(server.status().target_workers, 1);
    // As root: obeyed.
    let out = Launch::raw(&["scale", "2", "--control-socket", socket.to_str().unwrap()]).output();
    assert!(out.status.success());
    server.wait_workers(2);
}
