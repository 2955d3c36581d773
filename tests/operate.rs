//! Operating a running server: the control socket, `zdr status`,
//! `zdr reload --wait`, `zdr scale`, `zdr stop`.

mod common;

use std::collections::BTreeSet;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::time::Duration;

use common::*;
use nix::sys::signal::Signal;

fn status(pidfile: &str) -> serde_json::Value {
    let out = Launch::raw(&["status", "--json", "--pid", pidfile]).output();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn pids_of(status: &serde_json::Value, generation: u64, state: &str) -> BTreeSet<u32> {
    status["workers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|w| w["generation"] == generation && w["state"] == state)
        .map(|w| w["pid"].as_u64().unwrap() as u32)
        .collect()
}

#[test]
fn status_lists_the_workers_and_both_generations_during_a_reload() {
    let dir = TempDir::new("status");
    let pidfile = dir.path("zdr.pid");
    let pid = pidfile.to_str().unwrap();
    let exe = dir.path("zdr");
    std::fs::copy(zdr_bin(), &exe).unwrap();
    let server = Launch::serve(&["--workers", "3", "--pid", pid])
        .exe(&exe)
        .start();
    server.wait_ready();
    let workers = server.wait_workers(3);
    for _ in 0..5 {
        server.get("/");
    }
    let s = status(pid);
    assert_eq!(s["master_pid"].as_u64(), Some(server.pid as u64));
    assert_eq!(s["generation"].as_u64(), Some(1));
    assert_eq!(pids_of(&s, 1, "ready"), workers);
    let served: u64 = s["workers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["requests"].as_u64().unwrap())
        .sum();
    assert_eq!(served, 5);

    // The control socket belongs to this user alone.
    let meta = std::fs::metadata(format!("{pid}.ctl")).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    assert_eq!(meta.uid(), nix::unistd::getuid().as_raw());

    // During a reload: the new generation (a build that takes minutes to
    // boot) boots beside the old one.
    let script = dir.path("zdr.new");
    write_file(
        &script,
        &format!(
            "#!/bin/sh\nZDR_DEMO_BOOT_MS=600000 exec {} \"$@\"\n",
            zdr_bin().display()
        ),
    );
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::rename(&script, &exe).unwrap();
    server.signal(nix::sys::signal::Signal::SIGHUP);
    server.wait_for_log("Reload: starting generation 2", Duration::from_secs(60));
    let ok = wait_until(Duration::from_secs(30), || {
        pids_of(&status(pid), 2, "booting").len() == 3
    });
    let s = status(pid);
    assert!(ok, "{s}");
    assert_eq!(s["booting_generation"].as_u64(), Some(2));
    assert_eq!(pids_of(&s, 1, "ready"), workers);
    let text = String::from_utf8_lossy(&Launch::raw(&["status", "--pid", pid]).output().stdout)
        .into_owned();
    assert!(
        text.contains("generation 1 (generation 2 booting)"),
        "{text}"
    );
}

#[test]
fn reload_wait_reports_success_and_rollback() {
    let dir = TempDir::new("reloadwait");
    let exe = dir.path("zdr");
    std::fs::copy(zdr_bin(), &exe).unwrap();
    let pidfile = dir.path("zdr.pid");
    let pid = pidfile.to_str().unwrap();
    let server = Launch::serve(&["--workers", "2", "--pid", pid])
        .exe(&exe)
        .start();
    server.wait_ready();

    let out = Launch::raw(&["reload", "--wait", "--pid", pid]).output();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.starts_with("generation 2 ready: 2 workers in "),
        "{stdout}"
    );
    assert_eq!(server.get("/").generation(), 2);

    let broken = dir.path("zdr.new");
    write_file(
        &broken,
        "#!/bin/sh\necho 'cannot open config.yaml' >&2\nexit 4\n",
    );
    std::fs::set_permissions(&broken, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::rename(&broken, &exe).unwrap();
    // The client runs the test's own copy: the server's binary is broken now.
    let out = Launch::raw(&["reload", "--wait", "--pid", pid]).output();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("reload to generation 3 rolled back"),
        "{stderr}"
    );
    assert!(
        stderr.contains("exited with status 4; its last output: cannot open config.yaml"),
        "{stderr}"
    );
    assert_eq!(server.get("/").generation(), 2);
    let s = status(pid);
    assert_eq!(s["last_reload"]["completed"], false);
    assert_eq!(s["last_reload"]["generation"], 3);
}

#[test]
fn scale_and_stop_through_the_control_socket() {
    let dir = TempDir::new("scale");
    let sock = dir.path("ctl.sock");
    let sock_s = sock.to_str().unwrap();
    let mut server = Launch::serve(&["--workers", "1", "--control-socket", sock_s]).start();
    server.wait_ready();
    server.wait_workers(1);
    let out = Launch::raw(&["scale", "3", "--control-socket", sock_s]).output();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    server.wait_workers(3);
    let out = Launch::raw(&["stop", "--control-socket", sock_s]).output();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "stopping gracefully"
    );
    assert_eq!(server.wait_exit(Duration::from_secs(60)).code(), Some(0));
    assert!(!sock.exists(), "control socket left behind");
    let out = Launch::raw(&["status", "--control-socket", sock_s]).output();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot reach the server at"));
}

#[test]
fn health_probes_and_the_shutdown_delay() {
    // A delay longer than the test: everything below happens inside it,
    // whatever the machine's speed; SIGINT then ends it.
    let mut server = Launch::serve(&["--workers", "2", "--shutdown-delay", "600"]).start();
    server.wait_ready();
    server.wait_workers(2);
    for (path, body) in [
        ("/_zdr/live", "live\n"),
        ("/_zdr/ready", "ready\n"),
        ("/_zdr/startup", "started\n"),
    ] {
        let r = server.get(path);
        assert_eq!((r.status, r.body.as_str()), (200, body), "{path}");
    }

    server.signal(nix::sys::signal::Signal::SIGTERM);
    server.wait_for_log("Shutdown delay", Duration::from_secs(60));
    // During the delay: readiness fails, everything else is served.
    for _ in 0..5 {
        let ready = server.get("/_zdr/ready");
        assert_eq!((ready.status, ready.body.as_str()), (503, "stopping\n"));
        assert_eq!(server.get("/").status, 200);
        assert_eq!(server.get("/_zdr/live").status, 200);
    }
    assert_eq!(
        server.log_count("Worker exiting"),
        0,
        "workers drained before the delay ended"
    );
    assert!(server.status().workers.iter().all(|w| w.accepting));
    // A fast stop cuts the delay short.
    server.signal(nix::sys::signal::Signal::SIGINT);
    assert_eq!(server.wait_exit(Duration::from_secs(30)).code(), Some(0));
}

#[test]
fn the_workers_drain_when_the_shutdown_delay_ends() {
    let mut server = Launch::serve(&["--workers", "2", "--shutdown-delay", "1"]).start();
    server.wait_ready();
    let workers = server.wait_workers(2);
    server.signal(nix::sys::signal::Signal::SIGTERM);
    assert_eq!(server.wait_exit(Duration::from_secs(60)).code(), Some(0));
    let log = server.log_text();
    let delay = log.find("Shutdown delay").expect("the delay is logged");
    for pid in workers {
        let exiting = log
            .find(&format!("Worker exiting (pid: {pid}"))
            .unwrap_or_else(|| panic!("worker {pid} never exited; log:\n{log}"));
        assert!(
            delay < exiting,
            "worker {pid} exited before the delay; log:\n{log}"
        );
    }
}

#[test]
fn a_probe_turned_off_leaves_its_path_to_the_app() {
    let server =
        Launch::serve(&["--health-ready-path", "", "--health-live-path", "/healthz"]).start();
    server.wait_ready();
    assert_eq!(
        server.get("/_zdr/ready").status,
        404,
        "the demo app answers 404 itself"
    );
    assert_eq!(server.get("/healthz").body, "live\n");
    assert_eq!(server.get("/_zdr/live").status, 404);
}

#[test]
fn systemd_hears_ready_reloading_and_stopping() {
    let dir = TempDir::new("notify");
    let path = dir.path("notify.sock");
    let sock = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let recv = || {
        let mut buf = [0u8; 1024];
        let n = sock.recv(&mut buf).expect("a notification within 60 s");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    let mut server = Launch::serve(&["--workers", "2"])
        .env("NOTIFY_SOCKET", path.to_str().unwrap())
        .start();
    let ready = recv();
    assert!(
        ready.starts_with("READY=1\nSTATUS=2 workers ready, generation 1\n"),
        "{ready:?}"
    );
    server.signal(nix::sys::signal::Signal::SIGHUP);
    let reloading = recv();
    assert!(
        reloading.starts_with("RELOADING=1\nMONOTONIC_USEC="),
        "{reloading:?}"
    );
    let ready = recv();
    assert_eq!(ready, "READY=1\nSTATUS=2 workers ready, generation 2\n");
    server.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(recv().starts_with("STOPPING=1\n"));
    assert_eq!(server.wait_exit(Duration::from_secs(60)).code(), Some(0));
}

#[test]
fn systemd_socket_activation() {
    use std::os::fd::AsRawFd;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    // LISTEN_PID must name the server: a shell sets it to its own pid and
    // becomes the server with exec.
    let script = format!(
        "export LISTEN_PID=$$ LISTEN_FDS=1; exec {} serve --workers 2",
        zdr_bin().display()
    );
    let server = Launch::raw(&["-c", &script])
        .exe(std::path::Path::new("/bin/sh"))
        .fd3(listener.as_raw_fd())
        .start();
    drop(listener);
    server.wait_ready();
    assert!(
        server
            .log_text()
            .contains(&format!("Listening at: http://{addr}")),
        "{}",
        server.log_text()
    );
    server.wait_workers(2);
    assert_eq!(get(addr, "/").status, 200);
    // A reload keeps the activated socket.
    server.signal(nix::sys::signal::Signal::SIGHUP);
    server.wait_for_log("Reload to generation 2 complete", Duration::from_secs(60));
    assert_eq!(get(addr, "/").generation(), 2);
}

#[test]
fn a_worker_over_its_memory_limit_is_recycled_without_failures() {
    let server = Launch::serve(&["--workers", "2", "--max-worker-memory", "64M"]).start();
    server.wait_ready();
    let before = server.wait_workers(2);
    let rt = runtime();
    let load = rt.block_on(async { load::start(server.addr(), "/", 2, 2) });
    // One worker grows past the limit.
    let grown = server.get("/alloc?mb=100").pid();
    server.wait_for_log(
        &format!("Worker (pid: {grown}) owns"),
        Duration::from_secs(60),
    );
    assert!(
        wait_until(Duration::from_secs(60), || !alive(grown)),
        "the worker over its limit was not recycled"
    );
    load.wait_for_more(50);
    let report = rt.block_on(load.stop());
    assert_eq!(report.failed, 0, "{:?}", report.failures);
    let after = server.wait_workers(2);
    assert!(!after.contains(&grown));
    let untouched: Vec<_> = before.iter().filter(|p| **p != grown).collect();
    assert!(
        untouched.iter().all(|p| after.contains(p)),
        "only the worker over its limit is replaced"
    );
    assert!(server.log_text().contains("over --max-worker-memory 64M"));
}

#[test]
fn metrics_sum_over_workers_and_survive_reloads() {
    let server = Launch::serve(&["--workers", "3", "--metrics-bind", "127.0.0.1:0"]).start();
    server.wait_ready();
    let workers = server.wait_workers(3);
    for _ in 0..40 {
        assert_eq!(server.get("/").status, 200);
    }
    for _ in 0..7 {
        assert_eq!(server.get("/missing").status, 404);
    }
    let text = server.scrape();
    assert_eq!(metric(&text, "zdr_requests_total{class=\"2xx\"}"), 40.0);
    assert_eq!(metric(&text, "zdr_requests_total{class=\"4xx\"}"), 7.0);
    assert_eq!(metric(&text, "zdr_request_duration_seconds_count"), 47.0);
    // Buckets accumulate once, end at +Inf with the count, never decrease.
    assert_eq!(
        metric(&text, "zdr_request_duration_seconds_bucket{le=\"+Inf\"}"),
        47.0
    );
    let buckets: Vec<f64> = text
        .lines()
        .filter(|l| l.starts_with("zdr_request_duration_seconds_bucket"))
        .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
        .collect();
    assert!(buckets.windows(2).all(|w| w[0] <= w[1]), "{buckets:?}");
    assert_eq!(
        metric(&text, "zdr_workers{generation=\"1\",state=\"ready\"}"),
        3.0
    );
    assert_eq!(
        metric(&text, "zdr_reloads_total{outcome=\"completed\"}"),
        0.0
    );

    server.signal(nix::sys::signal::Signal::SIGHUP);
    server.wait_for_log("Reload to generation 2 complete", Duration::from_secs(60));
    assert!(workers.iter().all(|p| !alive(*p)));
    let text = server.scrape();
    assert_eq!(
        metric(&text, "zdr_requests_total{class=\"2xx\"}"),
        40.0,
        "the old workers' requests still count"
    );
    assert_eq!(
        metric(&text, "zdr_reloads_total{outcome=\"completed\"}"),
        1.0
    );
    assert_eq!(metric(&text, "zdr_reload_duration_seconds_count"), 1.0);
    assert_eq!(
        metric(&text, "zdr_workers{generation=\"2\",state=\"ready\"}"),
        3.0
    );

    let victim = *server.wait_workers(3).iter().next().unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(victim as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    assert!(wait_until(Duration::from_secs(60), || metric(
        &server.scrape(),
        "zdr_worker_restarts_total{cause=\"crash\"}"
    ) == 1.0));
}

#[test]
fn reload_wait_gives_up_at_its_timeout() {
    let dir = TempDir::new("reloadtimeout");
    let pidfile = dir.path("zdr.pid");
    let pid = pidfile.to_str().unwrap();
    let server = Launch::serve(&["--workers", "1", "--pid", pid])
        .env("ZDR_DEMO_BOOT_MS", "5000")
        .start();
    server.wait_ready();
    let out = Launch::raw(&["reload", "--wait", "--timeout", "0.5", "--pid", pid]).output();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("no answer from the server within"),
        "{stderr}"
    );
    // The reload itself goes on and completes.
    server.wait_for_log("Reload to generation 2 complete", Duration::from_secs(60));
}

#[test]
fn the_apps_readiness_check_gates_traffic_and_reloads() {
    let dir = TempDir::new("readyhook");
    let unready = dir.path("unready");
    let server = Launch::serve(&["--workers", "2", "--boot-timeout", "3"])
        .env("ZDR_DEMO_UNREADY_FILE", unready.to_str().unwrap())
        .start();
    server.wait_ready();
    server.wait_generation_ready(1, 2);
    assert_eq!(server.get("/_zdr/ready").body, "ready\n");

    // The app's check fails: the probe says so, the app still serves.
    write_file(&unready, "");
    let r = server.get("/_zdr/ready");
    assert_eq!(r.status, 503);
    assert_eq!(r.body, format!("not ready: {} exists\n", unready.display()));
    assert_eq!(server.get("/").status, 200);
    assert_eq!(server.get("/_zdr/live").status, 200);

    // A generation whose check never passes is rolled back at the boot
    // timeout; the old one serves on.
    server.signal(nix::sys::signal::Signal::SIGHUP);
    server.wait_for_log(
        "Reload to generation 2 rolled back",
        Duration::from_secs(60),
    );
    assert!(
        server
            .log_text()
            .contains("only 0 of 2 workers were ready after the boot timeout (3s)"),
        "{}",
        server.log_text()
    );
    // The rolled-back workers are killed; the old ones remain.
    server.wait_generation_ready(1, 2);
    assert_eq!(server.get("/").generation(), 1);

    // Once it passes, the next reload goes through.
    std::fs::remove_file(&unready).unwrap();
    server.signal(nix::sys::signal::Signal::SIGHUP);
    server.wait_for_log("Reload to generation 3 complete", Duration::from_secs(60));
    assert_eq!(server.get("/").generation(), 3);
    assert_eq!(server.get("/_zdr/ready").status, 200);
}

#[test]
fn metrics_count_connections_restart_causes_and_rollbacks() {
    let dir = TempDir::new("metrics");
    let exe = dir.path("zdr");
    std::fs::copy(zdr_bin(), &exe).unwrap();
    let server = Launch::serve(&[
        "--workers",
        "1",
        "--metrics-bind",
        "127.0.0.1:0",
        "--max-requests",
        "5",
        "--timeout",
        "3",
    ])
    .exe(&exe)
    .start();
    server.wait_ready();
    server.wait_generation_ready(1, 1);

    // A hung worker is killed: cause timeout.
    let addr = server.addr();
    let _hung = std::thread::spawn(move || try_get(addr, "/block?ms=60000"));
    assert!(
        wait_until(Duration::from_secs(60), || metric(
            &server.scrape(),
            "zdr_worker_restarts_total{cause=\"timeout\"}"
        ) == 1.0),
        "{}",
        server.scrape()
    );
    let workers = server.wait_generation_ready(1, 1);
    // Connections open now.
    let held = hold_requests(server.addr(), 3, &workers);
    assert_eq!(metric(&server.scrape(), "zdr_connections"), 3.0);
    for h in held {
        assert_eq!(h.finish().unwrap().status, 200);
    }
    // A worker at its request limit is replaced: cause max_requests.
    for _ in 0..6 {
        assert_eq!(server.get("/").status, 200);
    }
    assert!(
        wait_until(Duration::from_secs(60), || metric(
            &server.scrape(),
            "zdr_worker_restarts_total{cause=\"max_requests\"}"
        ) >= 1.0),
        "{}",
        server.scrape()
    );
    // A reload that cannot boot counts as rolled back.
    deploy_script(&exe, "#!/bin/sh\nexit 3\n");
    server.signal(nix::sys::signal::Signal::SIGHUP);
    server.wait_for_log("rolled back", Duration::from_secs(60));
    let text = server.scrape();
    assert_eq!(
        metric(&text, "zdr_reloads_total{outcome=\"rolled_back\"}"),
        1.0
    );
    assert_eq!(
        metric(&text, "zdr_reloads_total{outcome=\"completed\"}"),
        0.0
    );
}

/// A scrape with these request headers: (content type, body).
fn scrape_with(addr: std::net::SocketAddr, headers: &str) -> (String, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: m\r\n{headers}Connection: close\r\n\r\n"
    )
    .unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let reply = parse_reply(&raw).expect("a metrics answer");
    let content_type = reply.header("content-type").unwrap_or("").to_owned();
    (content_type, reply.body)
}

/// The exposition parses with the Prometheus project's own Python parsers
/// in both formats (OpenMetrics when the scraper asks for it, the classic
/// text otherwise); counts stay exact across worker recycling; the
/// autoscaling gauges see a request in flight.
#[test]
fn metrics_parse_in_both_formats_and_count_across_recycling() {
    if !have_python(&["prometheus_client"]) || !have("promtool", &["--version"]) {
        return;
    }
    let server = Launch::serve(&[
        "--workers",
        "2",
        "--max-requests",
        "10",
        "--metrics-bind",
        "127.0.0.1:0",
    ])
    .start();
    server.wait_ready();
    server.wait_workers(2);
    // First, with fresh workers (none near its limit, so none drains under
    // it), a request in flight: one busy worker of the two serving ones.
    let held = HeldRequest::start(server.addr());
    assert!(wait_until(Duration::from_secs(30), || {
        let text = server.scrape();
        metric(&text, "zdr_requests_in_flight") == 1.0 && metric(&text, "zdr_workers_busy") == 1.0
    }));
    assert!(wait_until(Duration::from_secs(30), || metric(
        &server.scrape(),
        "zdr_workers_serving"
    ) == 2.0));
    assert_eq!(held.finish().unwrap().status, 200);
    assert!(wait_until(Duration::from_secs(30), || metric(
        &server.scrape(),
        "zdr_requests_in_flight"
    ) == 0.0));
    for _ in 0..99 {
        assert_eq!(server.get("/").status, 200);
    }
    assert!(wait_until(Duration::from_secs(60), || metric(
        &server.scrape(),
        "zdr_worker_restarts_total{cause=\"max_requests\"}"
    ) >= 2.0));
    let addr = server.metrics_addr();
    let (classic_type, classic) = scrape_with(addr, "");
    assert!(
        classic_type.starts_with("text/plain; version=0.0.4"),
        "{classic_type}"
    );
    assert_eq!(
        metric(&classic, "zdr_request_duration_seconds_count"),
        100.0
    );
    assert_eq!(
        metric(&classic, "zdr_request_duration_seconds_bucket{le=\"+Inf\"}"),
        100.0
    );
    assert_eq!(metric(&classic, "zdr_requests_total{class=\"2xx\"}"), 100.0);
    assert!(
        classic.contains("# TYPE zdr_requests_total counter"),
        "{classic}"
    );
    assert!(!classic.contains("# EOF"));
    let (om_type, om) = scrape_with(
        addr,
        "Accept: application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5\r\n",
    );
    assert!(
        om_type.starts_with("application/openmetrics-text"),
        "{om_type}"
    );
    assert!(om.trim_end().ends_with("# EOF"), "{om}");
    for (format, text) in [("classic", &classic), ("openmetrics", &om)] {
        let dir = TempDir::new("metrics-parse");
        let file = dir.path("metrics.txt");
        write_file(&file, text);
        let parser = if format == "classic" {
            "from prometheus_client.parser import text_string_to_metric_families as p"
        } else {
            "from prometheus_client.openmetrics.parser import text_string_to_metric_families as p"
        };
        let script = format!(
            "{parser}\nimport sys\nfams = {{f.name: f for f in p(open(sys.argv[1]).read())}}\n\
             c = [s.value for s in fams['zdr_request_duration_seconds'].samples if s.name.endswith('_count')]\n\
             print(len(fams), int(c[0]))"
        );
        let out = std::process::Command::new("python3")
            .args(["-c", &script, file.to_str().unwrap()])
            .output()
            .unwrap();
        let said = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{format}: {said}");
        assert!(said.trim().ends_with(" 100"), "{format}: {said}");
    }
    // Prometheus's own linter accepts the classic text.
    let promtool = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn();
    match promtool {
        Ok(mut child) => {
            use std::io::Write;
            child
                .stdin
                .take()
                .unwrap()
                .write_all(classic.as_bytes())
                .unwrap();
            let out = child.wait_with_output().unwrap();
            assert!(
                out.status.success(),
                "promtool: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Err(e) => panic!("promtool: {e}"),
    }
}

/// The kubelet's termination sequence, replayed: clients keep opening new
/// connections and reusing keep-alive ones while readiness is polled; on
/// SIGTERM readiness turns 503, traffic is still served (the endpoint is
/// removed only once the 503 is seen), then the workers drain and the
/// master exits 0. Not one request fails.
#[test]
fn the_kubelet_termination_sequence_fails_no_request() {
    // The delay only has to outlast the ten requests the test waits for
    // after the first 503: a generous bound, not a measured duration.
    let mut server = Launch::serve(&["--workers", "2", "--shutdown-delay", "30"]).start();
    server.wait_ready();
    server.wait_workers(2);
    let rt = runtime();
    let load = rt.block_on(async { load::start(server.addr(), "/", 4, 2) });
    load.wait_for_more(50);
    server.signal(Signal::SIGTERM);
    // The kubelet's readiness probe, polled until it fails.
    assert!(
        wait_until(Duration::from_secs(30), || server.get("/_zdr/ready").status
            == 503),
        "readiness never failed after SIGTERM"
    );
    // The endpoint is still in the load balancer for a moment: served.
    load.wait_for_more(10);
    // Removed from the endpoints: no new traffic.
    let report = rt.block_on(load.stop());
    assert_eq!(report.failed, 0, "{:?}", report.failures);
    assert_eq!(server.wait_exit(Duration::from_secs(120)).code(), Some(0));
}

/// As PID 1 of a container (here a new PID namespace), the master reaps
/// every orphan reparented to it, not only its own workers. A command's
/// orphans go to its worker (their subreaper) first; one that cleared its
/// environment (so carries no mark of this master, which ends only those
/// that do) reaches the master when that worker is killed outright, and is
/// reaped there when it exits: at the end of its sleep, or at once where
/// the command had a cgroup (the master empties it).
#[test]
fn as_pid_1_it_reaps_orphans() {
    let unshare = std::path::Path::new("/usr/bin/unshare");
    if !as_root("a PID namespace") {
        return;
    }
    if !unshare.exists() {
        skip_or_fail(
            "/usr/bin/unshare is missing",
            "`apt-get install util-linux` (scripts/test installs it, as root)",
        );
        return;
    }
    let zdr = zdr_bin();
    let mut server = Launch::raw(&[
        "--pid",
        "--fork",
        "--kill-child",
        zdr.to_str().unwrap(),
        "serve",
        "--bind",
        "127.0.0.1:0",
        "--workers",
        "1",
        "--",
        "sh",
        "-c",
        "(env -i /bin/sleep 10 &); exec python3 -m http.server $PORT --bind 127.0.0.1",
    ])
    .exe(unshare)
    .start();
    let master = *children_of(server.pid)
        .iter()
        .next()
        .expect("the master, unshare's child");
    let orphan = |pid: &u32| {
        std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == "sleep")
    };
    // The orphan is its worker's (the subreaper's), not the master's.
    let (mut worker, mut sleeper) = (0, 0);
    assert!(
        wait_until(Duration::from_secs(30), || children_of(master).iter().any(
            |w| {
                let found = children_of(*w).into_iter().find(orphan);
                if let Some(pid) = found {
                    (worker, sleeper) = (*w, pid);
                }
                found.is_some()
            }
        )),
        "no orphan reached the worker"
    );
    server.wait_ready();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(worker as i32), Signal::SIGKILL).unwrap();
    // Its worker gone, the orphan is the master's child (the kernel gives
    // it to the nearest subreaper); once it exits, only the master can
    // reap it: it is gone for good, not a zombie, only if the master did.
    assert!(
        wait_until(Duration::from_secs(60), || !std::path::Path::new(&format!(
            "/proc/{sleeper}"
        ))
        .exists()),
        "the orphan {sleeper} was not reaped"
    );
    assert!(
        wait_until(Duration::from_secs(60), || !children_of(master)
            .iter()
            .any(orphan)
            && zombies(master) == 0),
        "an orphan was left unreaped: {} zombies",
        zombies(master)
    );
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(master as i32), Signal::SIGTERM).unwrap();
    assert_eq!(server.wait_exit(Duration::from_secs(60)).code(), Some(0));
}

/// A reload moves the metrics endpoint when `metrics_bind` changes.
#[test]
fn metrics_bind_follows_a_reload() {
    let dir = TempDir::new("metricsbind");
    let config = dir.path("zdr.toml");
    write_file(&config, "metrics_bind = \"127.0.0.1:0\"\n");
    let server = Launch::serve(&["--config", config.to_str().unwrap()]).start();
    server.wait_ready();
    let first = server.metrics_addr();
    assert_eq!(get(first, "/metrics").status, 200);
    let free = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    write_file(&config, &format!("metrics_bind = \"{free}\"\n"));
    let out = server.control(&["reload", "--wait"]);
    assert!(out.status.success(), "{out:?}");
    let reply = get(free, "/metrics");
    assert_eq!(reply.status, 200);
    assert!(reply.body.contains("zdr_requests_total"));
    assert!(!listens(server.pid, first), "the old endpoint is closed");
}

/// `--max-connection-age`: keep-alive clients that would stay on their
/// first worker forever move, connection by connection, to a worker added
/// later; not one request fails on the way.
#[test]
fn max_connection_age_moves_pinned_keep_alive_clients() {
    let server = Launch::serve(&[
        "--workers",
        "1",
        "--max-connection-age",
        "1",
        "--max-connection-age-jitter",
        "0.5",
    ])
    .start();
    server.wait_ready();
    server.wait_workers(1);
    let rt = runtime();
    // Keep-alive clients only: without a maximum age none would reconnect.
    let load = rt.block_on(async { load::start(server.addr(), "/", 4, 0) });
    load.wait_for_more(50);
    let out = server.control(&["scale", "2"]);
    assert!(out.status.success());
    let newcomer = wait_until(Duration::from_secs(60), || {
        let s = server.status();
        s.workers.len() == 2 && s.workers.iter().all(|w| w.requests >= 10)
    });
    assert!(
        newcomer,
        "the added worker got no keep-alive client: {:?}",
        server.status().workers
    );
    let report = rt.block_on(load.stop());
    assert_eq!(report.failed, 0, "{:?}", report.failures);
}

/// An upgraded connection is the app's: zdr cannot close it without
/// breaking it. The demo's polite echo waits for
/// `WorkerInfo::draining_or_aged` and ends it itself: when its worker drains (a reload, with a graceful
/// timeout far longer than the test), and when the connection passes
/// `--max-connection-age`.
#[test]
fn an_app_closes_its_upgraded_connections_when_draining_or_aged() {
    use std::io::{Read, Write};
    let read_to_end = |s: &mut std::net::TcpStream| {
        let mut rest = Vec::new();
        s.read_to_end(&mut rest)
            .map(|_| rest)
            .map_err(|e| e.to_string())
    };
    let server = Launch::serve(&["--workers", "1", "--graceful-timeout", "600"]).start();
    server.wait_ready();
    let old = server.wait_workers(1);
    let mut echo = upgrade_to_echo_at(server.addr(), "/echo?polite=1");
    echo.write_all(b"ping").unwrap();
    let mut got = [0u8; 4];
    echo.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"ping");
    server.signal(Signal::SIGHUP);
    // The echo ends (the read timeout is 60 s), and with it the old worker,
    // long before its graceful timeout.
    assert_eq!(read_to_end(&mut echo), Ok(Vec::new()));
    assert!(wait_until(Duration::from_secs(60), || old
        .iter()
        .all(|pid| !alive(*pid))));
    drop(server);

    let server = Launch::serve(&["--workers", "1", "--max-connection-age", "1"]).start();
    server.wait_ready();
    let mut echo = upgrade_to_echo_at(server.addr(), "/echo?polite=1");
    echo.write_all(b"pong").unwrap();
    echo.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"pong");
    assert_eq!(read_to_end(&mut echo), Ok(Vec::new()), "never closed");
}

/// `zdr reload --wait` on a terminal shows the rollout as it goes (each
/// generation's workers booting, ready, draining), then the outcome; with
/// `--quiet`, or when its output is not a terminal, only the outcome.
#[test]
fn reload_wait_shows_its_progress_on_a_terminal() {
    if !have("script", &["--version"]) {
        return;
    }
    // Each worker takes a while to boot: the progress has something to show.
    let server = Launch::serve(&["--workers", "2"])
        .env("ZDR_DEMO_BOOT_MS", "1500")
        .start();
    server.wait_ready();
    server.wait_workers(2);
    let ctl = server.control_socket();
    // `script` gives the command a terminal and copies what it shows.
    let on_a_terminal = |extra: &str| {
        let line = format!(
            "{} reload --wait --timeout 120 --control-socket {}{extra}",
            zdr_bin().display(),
            ctl.display()
        );
        let out = std::process::Command::new("script")
            .args(["-qec", &line, "/dev/null"])
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    let (code, shown) = on_a_terminal("");
    assert_eq!(code, Some(0), "{shown}");
    // A line of the rollout as it was at some moment (booting, ready or
    // draining): whichever the twice-a-second look caught, not a window
    // the test must hit.
    let progress = shown
        .lines()
        .find(|l| l.starts_with("generation 2: "))
        .unwrap_or_else(|| panic!("no progress line:\n{shown}"));
    // `generation 2: 2 booting; generation 1: 2 ready; …`, as it was
    // when the look was taken.
    assert!(
        progress["generation 2: ".len()..].starts_with(|c: char| c.is_ascii_digit()),
        "{progress}"
    );
    assert!(
        shown.contains("generation 2 ready: 2 workers in "),
        "{shown}"
    );
    let (code, shown) = on_a_terminal(" --quiet");
    assert_eq!(code, Some(0), "{shown}");
    assert!(!shown.contains("generation 3: "), "{shown}");
    assert!(
        shown.contains("generation 3 ready: 2 workers in "),
        "{shown}"
    );
    // Not a terminal: the outcome alone.
    let out = server.control(&["reload", "--wait", "--timeout", "120"]);
    let said =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{said}");
    assert!(!said.contains("generation 4: "), "{said}");
    assert!(said.contains("generation 4 ready: 2 workers in "), "{said}");
}
