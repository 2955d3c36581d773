//! The signals and stops the README promises, each against the real binary:
//! fast stops, log reopening, graceful-timeout kills, new code on HUP, the
//! load step re-run on HUP with `--preload`, a binary upgrade that cannot
//! boot, crash back-off, and `zdr stop` with and without a control socket.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::*;
use nix::sys::signal::Signal;

#[test]
fn int_and_quit_stop_at_once_without_waiting_for_requests() {
    for signal in [Signal::SIGINT, Signal::SIGQUIT] {
        let mut server = Launch::serve(&["--workers", "2", "--graceful-timeout", "600"]).start();
        server.wait_ready();
        let workers = server.wait_workers(2);
        let held = hold_requests(server.addr(), 2, &workers);
        assert!(listens(server.pid, server.addr()), "{signal}: not listed");
        server.signal(signal);
        // The graceful timeout is ten minutes: only a fast stop ends here.
        let status = server.wait_exit(Duration::from_secs(60));
        assert_eq!(status.code(), Some(0), "{signal}: {}", server.log_text());
        assert!(workers.iter().all(|p| !alive(*p)), "{signal}");
        for h in held {
            let answer = h.read_without_finishing();
            assert!(
                answer.as_ref().map_or(true, |raw| raw.is_empty()),
                "{signal}: a request in flight was answered: {answer:?}"
            );
        }
        assert!(
            !listens(server.pid, server.addr()),
            "{signal}: still listening"
        );
    }
}

#[test]
fn term_kills_what_is_still_busy_at_the_graceful_timeout() {
    let mut server = Launch::serve(&["--workers", "1", "--graceful-timeout", "1"]).start();
    server.wait_ready();
    let workers = server.wait_workers(1);
    let held = hold_requests(server.addr(), 1, &workers);
    server.signal(Signal::SIGTERM);
    let status = server.wait_exit(Duration::from_secs(60));
    assert_eq!(status.code(), Some(0), "{}", server.log_text());
    let worker = workers.iter().next().unwrap();
    assert!(
        server.log_text().contains(&format!(
            "Worker (pid: {worker}) still busy at the graceful timeout; killing it"
        )) || server
            .log_text()
            .contains("graceful timeout with 1 connection(s) still open"),
        "{}",
        server.log_text()
    );
    for h in held {
        let answer = h.read_without_finishing();
        assert!(
            answer.as_ref().map_or(true, |raw| raw.is_empty()),
            "the request was answered: {answer:?}"
        );
    }
}

#[test]
fn usr1_reopens_the_error_and_access_logs() {
    let dir = TempDir::new("usr1");
    let (errors, access, sock) = (
        dir.path("error.log"),
        dir.path("access.log"),
        dir.path("zdr.sock"),
    );
    let mut server = Launch::raw(&[
        "serve",
        "--bind",
        &format!("unix:{}", sock.display()),
        "--workers",
        "1",
        "--error-logfile",
        errors.to_str().unwrap(),
        "--access-logfile",
        access.to_str().unwrap(),
        "--log-level",
        "warning",
    ])
    .spawn();
    // Nothing below warning reaches the error log; the test learns that
    // the server is up from its socket.
    assert!(
        wait_until(Duration::from_secs(30), || get_unix(&sock, "/").is_ok()),
        "the server never answered; error log:\n{}",
        std::fs::read_to_string(&errors).unwrap_or_default()
    );
    wait_for_file_text(&access, "\"GET / HTTP/1.1\" 200");
    let text = std::fs::read_to_string(&errors).unwrap_or_default();
    assert!(
        !text.contains("Booting worker"),
        "info lines at warning: {text}"
    );
    assert!(
        server.log_text().is_empty(),
        "stderr is not the error log: {}",
        server.log_text()
    );

    // Rotated away, as logrotate does, then USR1.
    std::fs::rename(&errors, dir.path("error.log.1")).unwrap();
    std::fs::rename(&access, dir.path("access.log.1")).unwrap();
    server.signal(Signal::SIGUSR1);
    assert!(
        wait_until(Duration::from_secs(30), || errors.exists()
            && access.exists()),
        "the logs were not reopened"
    );
    assert_eq!(get_unix(&sock, "/nowhere").unwrap().status, 404);
    wait_for_file_text(&access, "\"GET /nowhere HTTP/1.1\" 404");
    let rotated = std::fs::read_to_string(dir.path("access.log.1")).unwrap();
    assert!(!rotated.contains("/nowhere"), "{rotated}");
    // A warning after the reopen lands in the new error log.
    let pid = *server.worker_pids().iter().next().unwrap();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), Signal::SIGKILL).unwrap();
    wait_for_file_text(&errors, &format!("worker {pid} was killed by SIGKILL"));
    server.signal(Signal::SIGTERM);
    assert_eq!(server.wait_exit(Duration::from_secs(30)).code(), Some(0));
}

#[test]
fn hup_without_preload_rolls_out_the_new_binary() {
    let dir = TempDir::new("newcode");
    let exe = dir.path("zdr");
    std::fs::copy(zdr_bin(), &exe).unwrap();
    let server = Launch::serve(&["--workers", "2"]).exe(&exe).start();
    server.wait_ready();
    server.wait_generation_ready(1, 2);
    assert_eq!(server.get("/").field("message"), None);
    deploy_script(&exe, &wrapper("ZDR_DEMO_MESSAGE=v2"));
    server.signal(Signal::SIGHUP);
    server.wait_for_log("Reload to generation 2 complete", Duration::from_secs(30));
    let now = server.wait_generation_ready(2, 2);
    for _ in 0..6 {
        let r = server.get("/");
        assert_eq!(r.field("message").as_deref(), Some("v2"), "{r:?}");
        assert!(now.contains(&r.pid()));
    }
}

#[test]
fn hup_with_preload_runs_the_load_step_again_in_the_master() {
    let server = Launch::serve(&["--workers", "2", "--preload"]).start();
    server.wait_ready();
    server.wait_generation_ready(1, 2);
    let master = server.pid.to_string();
    for _ in 0..4 {
        let r = server.get("/");
        assert_eq!(r.field("loaded_in"), Some(master.clone()));
        assert_eq!(r.field("loads").as_deref(), Some("1"));
    }
    server.signal(Signal::SIGHUP);
    server.wait_for_log("Reload to generation 2 complete", Duration::from_secs(30));
    server.wait_generation_ready(2, 2);
    for _ in 0..4 {
        let r = server.get("/");
        assert_eq!(r.generation(), 2);
        assert_eq!(r.field("loaded_in"), Some(master.clone()));
        assert_eq!(r.field("loads").as_deref(), Some("2"), "loaded again");
    }
}

#[test]
fn usr2_rolls_back_a_binary_that_passes_its_check_but_cannot_boot() {
    for preload in [false, true] {
        let dir = TempDir::new("usr2boot");
        let exe = dir.path("zdr");
        std::fs::copy(zdr_bin(), &exe).unwrap();
        let fail = dir.path("fail");
        write_file(&fail, "");
        let mut args = vec!["--workers", "2"];
        if preload {
            args.push("--preload");
        }
        let server = Launch::serve(&args).exe(&exe).start();
        server.wait_ready();
        let old = server.wait_generation_ready(1, 2);
        let rt = runtime();
        let load = rt.block_on(async { load::start(server.addr(), "/", 2, 2) });
        // Its load step (the check) passes; its workers fail to boot.
        deploy_script(
            &exe,
            &wrapper(&format!("ZDR_DEMO_BOOT_FAIL_FILE={}", fail.display())),
        );
        server.signal(Signal::SIGUSR2);
        server.wait_for_log("Binary upgrade: check passed", Duration::from_secs(30));
        server.wait_for_log(
            "Reload to generation 2 rolled back",
            Duration::from_secs(60),
        );
        load.wait_for_more(50);
        let report = rt.block_on(load.stop());
        assert_eq!(report.failed, 0, "preload={preload}: {:?}", report.failures);
        assert_eq!(report.generations, BTreeSet::from([1]));
        assert!(alive(server.pid));
        assert!(
            server.log_text().contains(&format!(
                "failed to boot: demo app: {} exists",
                fail.display()
            )),
            "{}",
            server.log_text()
        );
        // The failed generation's workers go; the old ones stay.
        assert_eq!(server.wait_generation_ready(1, 2), old, "preload={preload}");
    }
}

#[test]
fn workers_that_die_while_booting_are_restarted_with_back_off() {
    let dir = TempDir::new("backoff");
    let fail = dir.path("fail");
    let server = Launch::serve(&["--workers", "2"])
        .env("ZDR_DEMO_BOOT_FAIL_FILE", fail.to_str().unwrap())
        .start();
    server.wait_ready();
    let before = server.wait_generation_ready(1, 2);
    // From now on, new workers die while booting.
    write_file(&fail, "");
    let victim = *before.iter().next().unwrap();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(victim as i32), Signal::SIGKILL).unwrap();
    server.wait_for_log(
        "3 workers in a row died before becoming ready; backing off",
        Duration::from_secs(60),
    );
    // The surviving worker serves throughout.
    for _ in 0..5 {
        assert_eq!(server.get("/").status, 200);
    }
    // Fixed: the next start succeeds and the server is whole again.
    std::fs::remove_file(&fail).unwrap();
    let after = server.wait_generation_ready(1, 2);
    assert!(!after.contains(&victim));
    assert!(before.iter().any(|p| after.contains(p)));
}

#[test]
fn stop_now_and_the_pidfile_fallback() {
    // `zdr stop --now` on the control socket: a fast stop.
    let dir = TempDir::new("stopnow");
    let pidfile = dir.path("zdr.pid");
    let pid = pidfile.to_str().unwrap();
    let mut server =
        Launch::serve(&["--workers", "1", "--pid", pid, "--graceful-timeout", "600"]).start();
    server.wait_ready();
    let workers = server.wait_workers(1);
    let held = hold_requests(server.addr(), 1, &workers);
    let out = Launch::raw(&["stop", "--now", "--pid", pid]).output();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "stopping");
    assert_eq!(server.wait_exit(Duration::from_secs(60)).code(), Some(0));
    drop(held);

    // With the control socket gone, `zdr stop` signals the pid in the
    // pidfile instead.
    let mut server = Launch::serve(&["--workers", "1", "--pid", pid]).start();
    server.wait_ready();
    server.wait_workers(1);
    std::fs::remove_file(format!("{pid}.ctl")).unwrap();
    let out = Launch::raw(&["stop", "--pid", pid]).output();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!(
            "sent SIGTERM to {} (from the pidfile; the control socket did not answer)",
            server.pid
        )
    );
    assert_eq!(server.wait_exit(Duration::from_secs(60)).code(), Some(0));
    assert!(server.log_text().contains("Handling signal: SIGTERM"));
}

#[test]
fn a_graceful_stop_serves_what_is_queued_and_refuses_what_comes_after() {
    let mut server = Launch::serve(&[
        "--workers",
        "1",
        "--worker-connections",
        "1",
        "--graceful-timeout",
        "120",
    ])
    .start();
    server.wait_ready();
    let workers = server.wait_workers(1);
    let addr = server.addr();
    // The worker's one connection is busy; a second request waits in the
    // listen queue, not accepted.
    let busy = hold_requests(addr, 1, &workers).pop().unwrap();
    let queued = std::thread::spawn(move || try_get(addr, "/"));
    assert!(
        wait_until(Duration::from_secs(60), || queued_connections(addr.port())
            == 1),
        "the second connection never reached the queue"
    );
    assert_eq!(accepted_connections(&workers, addr.port()), 1);

    server.signal(Signal::SIGTERM);
    // Once every copy of the listener is closed, a new connection is
    // refused at once rather than left waiting.
    let refused = wait_until(Duration::from_secs(60), || {
        matches!(
            std::net::TcpStream::connect(addr),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused
        )
    });
    assert!(refused, "new connections are not refused during the drain");
    // The queued request is served, and so is the one in flight.
    let r = queued
        .join()
        .unwrap()
        .expect("the queued request was dropped");
    assert_eq!(r.status, 200);
    assert_eq!(r.header("connection"), Some("close"));
    assert_eq!(busy.finish().expect("the request in flight").status, 200);
    assert_eq!(server.wait_exit(Duration::from_secs(60)).code(), Some(0));
}
