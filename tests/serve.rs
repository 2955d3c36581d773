//! The pre-fork server: workers, preload, graceful stop, crashes, bad input
//! and configuration precedence, against the real binary.

mod common;

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::*;
use nix::sys::signal::Signal;

#[test]
fn three_workers_serve_and_the_master_does_not() {
    // One connection per worker at a time: three requests in flight at
    // once must land on three different workers.
    let server = Launch::serve(&[
        "--workers",
        "3",
        "--threads",
        "2",
        "--worker-connections",
        "1",
    ])
    .start();
    server.wait_ready();
    let workers = server.wait_workers(3);
    assert!(!workers.contains(&server.pid));

    let addr = server.addr();
    let held = hold_requests(addr, 3, &workers);
    let replies: Vec<Reply> = held
        .into_iter()
        .map(|h| h.finish().expect("a held request failed"))
        .collect();
    let served: BTreeSet<u32> = replies.iter().map(|r| r.pid()).collect();
    assert!(replies.iter().all(|r| r.status == 200));
    assert_eq!(
        served, workers,
        "each of the 3 workers serves one of the 3 connections"
    );
    assert!(replies.iter().all(|r| r.generation() == 1));

    // The master's sockets (listeners, control) stay close-on-exec: they
    // are made inheritable only for the moment of a worker's spawn.
    let fds = std::fs::read_dir(format!("/proc/{}/fd", server.pid)).unwrap();
    for fd in fds.flatten() {
        let target = std::fs::read_link(fd.path()).unwrap_or_default();
        if !target.to_string_lossy().starts_with("socket:") {
            continue;
        }
        let name = fd.file_name().to_string_lossy().into_owned();
        // A descriptor closed since the listing has nothing to say.
        let Ok(info) = std::fs::read_to_string(format!("/proc/{}/fdinfo/{name}", server.pid))
        else {
            continue;
        };
        let flags = info
            .lines()
            .find_map(|l| l.strip_prefix("flags:"))
            .and_then(|f| u32::from_str_radix(f.trim(), 8).ok())
            .unwrap();
        assert!(
            flags & 0o2000000 != 0,
            "master fd {name} ({target:?}) is inheritable: {info}"
        );
    }

    // --threads 2: each worker runs exactly two runtime threads.
    for pid in &workers {
        let runtime_threads = thread_names(*pid)
            .iter()
            .filter(|n| *n == "zdr-worker")
            .count();
        assert_eq!(
            runtime_threads,
            2,
            "worker {pid} threads: {:?}",
            thread_names(*pid)
        );
    }
}

#[test]
fn keep_alive_reuses_then_closes_idle_connections() {
    let server = Launch::serve(&["--keep-alive", "1"]).start();
    server.wait_ready();
    let mut s = TcpStream::connect(server.addr()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let mut pids = Vec::new();
    for _ in 0..2 {
        s.write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n").unwrap();
        let mut buf = vec![0u8; 4096];
        let n = s.read(&mut buf).unwrap();
        let reply = parse_reply(&buf[..n]).expect("a whole response");
        assert_eq!(reply.status, 200);
        assert_eq!(reply.header("connection"), None);
        pids.push(reply.pid());
    }
    assert_eq!(pids[0], pids[1], "both requests on one connection");
    let idle_from = Instant::now();
    let mut buf = [0u8; 16];
    let n = s
        .read(&mut buf)
        .expect("the server closes, not the read timeout");
    assert_eq!(n, 0, "EOF after the keep-alive timeout");
    let idle = idle_from.elapsed();
    assert!(
        idle >= Duration::from_millis(900),
        "closed after {idle:?}, before the 1 s keep-alive"
    );
}

#[test]
fn http2_cleartext_is_served() {
    let server = Launch::serve(&[]).start();
    server.wait_ready();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let status = rt.block_on(async {
        let stream = tokio::net::TcpStream::connect(server.addr()).await.unwrap();
        let (mut sender, conn) = hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            hyper_util::rt::TokioIo::new(stream),
        )
        .await
        .unwrap();
        tokio::spawn(conn);
        let req = hyper::Request::get("http://test/")
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .unwrap();
        let res = sender.send_request(req).await.unwrap();
        (res.version(), res.status().as_u16())
    });
    assert_eq!(status, (hyper::Version::HTTP_2, 200));
}

#[test]
fn preload_runs_the_load_step_once_in_the_master() {
    let server = Launch::serve(&["--workers", "3", "--preload"]).start();
    server.wait_ready();
    let workers = server.wait_workers(3);
    let addr = server.addr();
    let replies: Vec<Reply> = (0..20).map(|_| get(addr, "/")).collect();
    for r in &replies {
        assert_eq!(r.field("loaded_in"), Some(server.pid.to_string()), "{r:?}");
        assert!(workers.contains(&r.pid()));
    }
    // Without --preload, each worker loads the app itself.
    let server = Launch::serve(&["--workers", "2"]).start();
    server.wait_ready();
    server.wait_workers(2);
    for _ in 0..10 {
        let r = server.get("/");
        assert_eq!(r.field("loaded_in"), Some(r.pid().to_string()));
    }
}

#[test]
fn sigterm_lets_in_flight_requests_finish() {
    let mut server = Launch::serve(&["--workers", "2", "--graceful-timeout", "120"]).start();
    server.wait_ready();
    let workers = server.wait_workers(2);
    let addr = server.addr();
    // Every request is accepted before the stop begins.
    let held = hold_requests(addr, 20, &workers);
    server.signal(Signal::SIGTERM);
    // The workers stop accepting but wait for their requests.
    let ok = wait_until(Duration::from_secs(30), || {
        server.status().workers.iter().all(|w| !w.accepting)
    });
    assert!(ok, "the workers never began to drain");
    assert!(!server.has_exited() && workers.iter().all(|p| alive(*p)));
    let replies: Vec<_> = held.into_iter().map(|h| h.finish()).collect();
    let status = server.wait_exit(Duration::from_secs(30));
    assert_eq!(status.code(), Some(0), "log:\n{}", server.log_text());
    let ok = replies
        .iter()
        .filter(|r| matches!(r, Ok(r) if r.status == 200))
        .count();
    assert_eq!(ok, 20, "replies: {replies:?}");
    assert!(!listens(server.pid, addr), "port still open after stop");
    assert!(
        workers.iter().all(|p| !alive(*p)),
        "a worker outlived the master"
    );
}

#[test]
fn a_killed_worker_is_replaced() {
    let server = Launch::serve(&["--workers", "2"]).start();
    server.wait_ready();
    let before = server.wait_workers(2);
    let victim = *before.iter().next().unwrap();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(victim as i32), Signal::SIGKILL).unwrap();
    let ok = wait_until(Duration::from_secs(60), || {
        let now = server.worker_pids();
        now.len() == 2 && !now.contains(&victim)
    });
    assert!(ok, "worker not replaced; log:\n{}", server.log_text());
    server.wait_workers(2);
    for _ in 0..10 {
        assert_eq!(server.get("/").status, 200);
    }
    assert!(
        server
            .log_text()
            .contains(&format!("worker {victim} was killed by SIGKILL")),
        "{}",
        server.log_text()
    );
}

#[test]
fn workers_do_not_outlive_a_killed_master() {
    let mut server = Launch::serve(&["--workers", "3"]).start();
    server.wait_ready();
    let workers = server.wait_workers(3);
    server.signal(Signal::SIGKILL);
    server.wait_exit(Duration::from_secs(60));
    let gone = wait_until(Duration::from_secs(60), || {
        workers.iter().all(|p| !alive(*p))
    });
    assert!(gone, "workers still alive 60 s after the master died");
    // Nothing the server started holds its socket any more: no live
    // process is left in its process group. (Binding its port again would
    // race with the other tests, whose servers bind ephemeral ports.)
    let group = server.pid.to_string();
    let left: Vec<String> = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read_to_string(e.path().join("stat")).ok())
        .filter(|stat| {
            let Some((_, rest)) = stat.rsplit_once(')') else {
                return false;
            };
            let fields: Vec<&str> = rest.split_whitespace().collect();
            // state ppid pgrp …
            fields.get(2) == Some(&group.as_str()) && fields.first() != Some(&"Z")
        })
        .collect();
    assert!(left.is_empty(), "still in the server's group: {left:?}");
}

fn fails_with(launch: Launch, expected: &[&str]) {
    let out = launch.output();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_ne!(out.status.code(), Some(0), "should fail; stderr:\n{stderr}");
    for e in expected {
        assert!(stderr.contains(e), "stderr lacks {e:?}:\n{stderr}");
    }
}

#[test]
fn bad_configuration_is_named_and_nothing_starts() {
    let dir = TempDir::new("badcfg");
    let cfg = dir.path("zdr.toml");
    write_file(&cfg, "workers = 2\nwrkers = 3\n");
    let cfg_s = cfg.to_str().unwrap();
    fails_with(
        Launch::raw(&["serve", "-c", cfg_s]),
        &[&format!(
            "{cfg_s}:2: key `wrkers`: did you mean `workers`? unknown field `wrkers`"
        )],
    );
    write_file(&cfg, "bind = \"127.0.0.1:0\"\ntimeout = \"long\"\n");
    fails_with(
        Launch::raw(&["serve", "-c", cfg_s]),
        &[&format!(
            "{cfg_s}:2: key `timeout`: invalid type: string \"long\""
        )],
    );
    fails_with(
        Launch::raw(&["serve", "--bind", "localhost:http"]),
        &["setting `bind`", "localhost:http"],
    );
    fails_with(
        Launch::raw(&["serve", "-c", dir.path("missing.toml").to_str().unwrap()]),
        &["cannot read config file"],
    );
    fails_with(
        Launch::raw(&["serve"]).env("PORT", "eighty"),
        &["environment variable PORT"],
    );
    // A memory limit without a unit: 512 bytes was never meant.
    write_file(&cfg, "bind = \"127.0.0.1:0\"\nmax_worker_memory = 512\n");
    fails_with(
        Launch::raw(&["serve", "-c", cfg_s]),
        &[&format!(
            "{cfg_s}:2: key `max_worker_memory`: 512 would be 512 bytes, less than any worker needs: give a unit, like 512M"
        )],
    );
    fails_with(
        Launch::serve(&[]).env("ZDR_MAX_WORKER_MEMORY", "512"),
        &["512 would be 512 bytes", "like 512M"],
    );
}

#[test]
fn port_in_use_is_named() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    fails_with(
        Launch::raw(&["serve", "--bind", &addr]),
        &[&format!("cannot bind {addr}: address already in use")],
    );
}

#[test]
fn an_app_that_fails_to_load_stops_the_start() {
    for preload in [false, true] {
        let mut launch =
            Launch::serve(&["--workers", "2"]).env("ZDR_DEMO_LOAD_ERROR", "cannot open data.db");
        if preload {
            launch = Launch::serve(&["--workers", "2", "--preload"])
                .env("ZDR_DEMO_LOAD_ERROR", "cannot open data.db");
        }
        let out = launch.output();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            out.status.code(),
            Some(1),
            "preload={preload}; stderr:\n{stderr}"
        );
        let errors: Vec<&str> = stderr
            .lines()
            .filter(|l| l.contains("Cannot start") || l.contains("ERROR] the app"))
            .collect();
        assert_eq!(
            errors.len(),
            1,
            "one error line naming the cause; stderr:\n{stderr}"
        );
        assert!(
            errors[0].contains("demo app: cannot open data.db"),
            "{}",
            errors[0]
        );
    }
}

fn check(launch: Launch) -> toml::Table {
    let out = launch.output();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).parse().unwrap()
}

#[test]
fn precedence_file_then_env_then_flags() {
    let dir = TempDir::new("prec");
    let cfg = dir.path("zdr.toml");
    write_file(
        &cfg,
        "workers = 2\nkeepalive = 7\nbind = [\"127.0.0.1:9001\"]\n",
    );
    let c = cfg.to_str().unwrap();
    let t = check(Launch::raw(&["check", "-c", c]));
    assert_eq!(t["workers"].as_integer(), Some(2));
    let t = check(Launch::raw(&["check", "-c", c]).env("ZDR_WORKERS", "3"));
    assert_eq!(t["workers"].as_integer(), Some(3));
    assert_eq!(t["keepalive"].as_float(), Some(7.0));
    let t = check(Launch::raw(&["check", "-c", c, "--workers", "4"]).env("ZDR_WORKERS", "3"));
    assert_eq!(t["workers"].as_integer(), Some(4));
    // The platform's PORT and WEB_CONCURRENCY sit below the file.
    let t = check(
        Launch::raw(&["check"])
            .env("PORT", "5123")
            .env("WEB_CONCURRENCY", "5"),
    );
    assert_eq!(
        t["bind"].as_array().unwrap()[0].as_str(),
        Some("0.0.0.0:5123")
    );
    assert_eq!(t["workers"].as_integer(), Some(5));
    let t = check(
        Launch::raw(&["check", "-c", c])
            .env("PORT", "5123")
            .env("WEB_CONCURRENCY", "5"),
    );
    assert_eq!(
        t["bind"].as_array().unwrap()[0].as_str(),
        Some("127.0.0.1:9001")
    );
    assert_eq!(t["workers"].as_integer(), Some(2));
}

#[test]
fn port_variable_binds_all_interfaces() {
    let server = Launch::raw(&["serve"])
        .env("PORT", "0")
        .env("WEB_CONCURRENCY", "2")
        .start();
    server.wait_ready();
    assert!(server.log_text().contains("Listening at: http://0.0.0.0:"));
    server.wait_workers(2);
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], server.port()));
    assert_eq!(get(addr, "/").status, 200);
}

#[test]
fn pidfile_is_written_and_removed() {
    let dir = TempDir::new("pid");
    let pidfile = dir.path("zdr.pid");
    let mut server = Launch::serve(&["--pid", pidfile.to_str().unwrap()]).start();
    server.wait_ready();
    assert_eq!(
        std::fs::read_to_string(&pidfile).unwrap().trim(),
        server.pid.to_string()
    );
    server.signal(Signal::SIGTERM);
    assert_eq!(server.wait_exit(Duration::from_secs(60)).code(), Some(0));
    assert!(!pidfile.exists());
}

#[test]
fn access_log_uses_gunicorn_format() {
    let dir = TempDir::new("access");
    let log = dir.path("access.log");
    let server = Launch::serve(&["--access-logfile", log.to_str().unwrap()]).start();
    server.wait_ready();
    let slow = server.get("/slow?ms=1");
    assert_eq!(slow.status, 200);
    assert_eq!(server.get("/nope").status, 404);
    let ok = wait_until(Duration::from_secs(60), || {
        std::fs::read_to_string(&log).is_ok_and(|t| t.lines().count() == 2)
    });
    assert!(ok);
    let text = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines[0].starts_with("127.0.0.1 - - ["), "{}", lines[0]);
    let tail = format!(
        "] \"GET /slow?ms=1 HTTP/1.1\" 200 {} \"-\" \"-\"",
        slow.body.len()
    );
    assert!(
        lines[0].ends_with(&tail),
        "{} does not end with {tail}",
        lines[0]
    );
    assert!(
        lines[1].contains("\"GET /nope HTTP/1.1\" 404 10 \"-\" \"-\""),
        "{}",
        lines[1]
    );
}

#[test]
fn unix_socket_and_several_binds() {
    let dir = TempDir::new("unix");
    let sock = dir.path("zdr.sock");
    let unix = format!("unix:{}", sock.display());
    let mut server = Launch::serve(&["--bind", &unix]).start();
    server.wait_ready();
    assert_eq!(server.get("/").status, 200);
    let mut s = std::os::unix::net::UnixStream::connect(&sock).unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    assert_eq!(parse_reply(&raw).unwrap().status, 200);
    server.signal(Signal::SIGTERM);
    server.wait_exit(Duration::from_secs(60));
    assert!(!sock.exists(), "socket file left behind");
}

#[test]
fn help_reads_like_gunicorn() {
    let out = Launch::raw(&["serve", "--help"]).output();
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--bind",
        "--workers",
        "--threads",
        "--worker-connections",
        "--backlog",
        "--timeout",
        "--graceful-timeout",
        "--keep-alive",
        "--max-requests",
        "--max-requests-jitter",
        "--preload",
        "--pid",
        "--log-level",
        "--access-logfile",
        "--error-logfile",
        "--access-log-format",
        "--config",
    ] {
        assert!(help.contains(flag), "help lacks {flag}:\n{help}");
    }
    assert!(help.contains("ZDR_WORKERS"));
}

#[test]
fn check_validates_without_binding_and_load_app_runs_the_load_step() {
    // A port in use does not matter to check: it binds nothing.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let bind = taken.local_addr().unwrap().to_string();
    let t = check(Launch::raw(&["check", "--bind", &bind, "--workers", "3"]));
    assert_eq!(t["workers"].as_integer(), Some(3));
    assert_eq!(
        t["bind"].as_array().unwrap()[0].as_str(),
        Some(bind.as_str())
    );
    // Without --load-app the app is not loaded; with it, its failure is
    // the check's.
    let broken = || Launch::raw(&["check"]).env("ZDR_DEMO_LOAD_ERROR", "no database");
    check(broken());
    let out = Launch::raw(&["check", "--load-app"])
        .env("ZDR_DEMO_LOAD_ERROR", "no database")
        .output();
    assert_ne!(out.status.code(), Some(0));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("demo app: no database"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = Launch::raw(&["check", "--load-app"]).output();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn every_zdr_variable_reaches_its_setting() {
    let dir = TempDir::new("envvars");
    let d = dir.0.to_str().unwrap();
    let file = |name: &str| format!("{d}/{name}");
    // (variable, value, key in check's output, value there)
    std::fs::write(file("zdr.toml"), "workers = 6\n").unwrap();
    let cases: Vec<(&str, String, &str, String)> = vec![
        ("ZDR_CONFIG", file("zdr.toml"), "workers", "6".into()),
        (
            "ZDR_BIND",
            "127.0.0.1:9555".into(),
            "bind",
            "[\"127.0.0.1:9555\"]".into(),
        ),
        ("ZDR_BACKLOG", "77".into(), "backlog", "77".into()),
        ("ZDR_WORKERS", "4".into(), "workers", "4".into()),
        ("ZDR_THREADS", "3".into(), "threads", "3".into()),
        (
            "ZDR_WORKER_CONNECTIONS",
            "55".into(),
            "worker_connections",
            "55".into(),
        ),
        ("ZDR_TIMEOUT", "12".into(), "timeout", "12.0".into()),
        (
            "ZDR_GRACEFUL_TIMEOUT",
            "13".into(),
            "graceful_timeout",
            "13.0".into(),
        ),
        (
            "ZDR_BOOT_TIMEOUT",
            "14".into(),
            "boot_timeout",
            "14.0".into(),
        ),
        ("ZDR_KEEPALIVE", "5".into(), "keepalive", "5.0".into()),
        (
            "ZDR_MAX_REQUESTS",
            "100".into(),
            "max_requests",
            "100".into(),
        ),
        (
            "ZDR_MAX_WORKER_MEMORY",
            "512M".into(),
            "max_worker_memory",
            "\"512M\"".into(),
        ),
        (
            "ZDR_MAX_REQUESTS_JITTER",
            "9".into(),
            "max_requests_jitter",
            "9".into(),
        ),
        ("ZDR_PRELOAD", "true".into(), "preload", "true".into()),
        (
            "ZDR_PIDFILE",
            file("a.pid"),
            "pidfile",
            format!("\"{}\"", file("a.pid")),
        ),
        (
            "ZDR_CONTROL_SOCKET",
            file("c.sock"),
            "control_socket",
            format!("\"{}\"", file("c.sock")),
        ),
        (
            "ZDR_LIMIT_REQUEST_LINE",
            "0".into(),
            "limit_request_line",
            "0".into(),
        ),
        (
            "ZDR_LIMIT_REQUEST_FIELDS",
            "7".into(),
            "limit_request_fields",
            "7".into(),
        ),
        (
            "ZDR_LIMIT_REQUEST_FIELD_SIZE",
            "0".into(),
            "limit_request_field_size",
            "0".into(),
        ),
        (
            "ZDR_LIMIT_REQUEST_BODY",
            "1M".into(),
            "limit_request_body",
            "\"1M\"".into(),
        ),
        (
            "ZDR_HEADER_TIMEOUT",
            "4".into(),
            "header_timeout",
            "4.0".into(),
        ),
        ("ZDR_BODY_TIMEOUT", "5".into(), "body_timeout", "5.0".into()),
        ("ZDR_SEND_TIMEOUT", "6".into(), "send_timeout", "6.0".into()),
        (
            "ZDR_REQUEST_TIMEOUT",
            "7".into(),
            "request_timeout",
            "7.0".into(),
        ),
        (
            "ZDR_MAX_QUEUE_TIME",
            "0.05".into(),
            "max_queue_time",
            "0.05".into(),
        ),
        (
            "ZDR_FORWARDED_ALLOW_IPS",
            "10.0.0.1".into(),
            "forwarded_allow_ips",
            "[\"10.0.0.1\"]".into(),
        ),
        (
            "FORWARDED_ALLOW_IPS",
            "10.0.0.2".into(),
            "forwarded_allow_ips",
            "[\"10.0.0.2\"]".into(),
        ),
        (
            "ZDR_USER",
            "65534".into(),
            "run_as",
            "[65534, 65534]".into(),
        ),
        (
            "ZDR_GROUP",
            "65534".into(),
            "run_as",
            format!("[{}, 65534]", nix::unistd::getuid()),
        ),
        ("ZDR_UMASK", "027".into(), "umask", "23".into()),
        ("ZDR_CHDIR", d.into(), "chdir", format!("\"{d}\"")),
        (
            "ZDR_METRICS_BIND",
            "127.0.0.1:9556".into(),
            "metrics_bind",
            "\"127.0.0.1:9556\"".into(),
        ),
        (
            "ZDR_SHUTDOWN_DELAY",
            "3".into(),
            "shutdown_delay",
            "3.0".into(),
        ),
        (
            "ZDR_HEALTH_LIVE_PATH",
            "/l".into(),
            "health_live_path",
            "\"/l\"".into(),
        ),
        (
            "ZDR_HEALTH_READY_PATH",
            "/r".into(),
            "health_ready_path",
            "\"/r\"".into(),
        ),
        (
            "ZDR_HEALTH_STARTUP_PATH",
            "/s".into(),
            "health_startup_path",
            "\"/s\"".into(),
        ),
        (
            "ZDR_LOGLEVEL",
            "debug".into(),
            "loglevel",
            "\"debug\"".into(),
        ),
        (
            "ZDR_ERRORLOG",
            file("e.log"),
            "errorlog",
            format!("\"{}\"", file("e.log")),
        ),
        (
            "ZDR_ACCESSLOG",
            file("a.log"),
            "accesslog",
            format!("\"{}\"", file("a.log")),
        ),
        (
            "ZDR_ACCESS_LOG_FORMAT",
            "%(s)s".into(),
            "access_log_format",
            "\"%(s)s\"".into(),
        ),
        ("ZDR_RELOAD", "true".into(), "reload", "true".into()),
        ("ZDR_MAX_SURGE", "2".into(), "max_surge", "2".into()),
        ("ZDR_CANARY", "1".into(), "canary", "1".into()),
        (
            "ZDR_MAX_UNAVAILABLE",
            "1".into(),
            "max_unavailable",
            "1".into(),
        ),
        (
            "ZDR_CANARY_STEPS",
            "1,50%".into(),
            "canary_steps",
            "[\"1\", \"50%\"]".into(),
        ),
        (
            "ZDR_CANARY_SECONDS",
            "15".into(),
            "canary_seconds",
            "15.0".into(),
        ),
        (
            "ZDR_CANARY_MIN_REQUESTS",
            "500".into(),
            "canary_min_requests",
            "500".into(),
        ),
        (
            "ZDR_CANARY_MAX_ERROR_RATIO",
            "0.05".into(),
            "canary_max_error_ratio",
            "0.05".into(),
        ),
        (
            "ZDR_CANARY_MAX_P99_RATIO",
            "3".into(),
            "canary_max_p99_ratio",
            "3.0".into(),
        ),
        (
            "ZDR_CANARY_NO_TRAFFIC",
            "Promote".into(),
            "canary_no_traffic",
            "\"promote\"".into(),
        ),
        (
            "ZDR_MAX_CONNECTION_AGE",
            "30".into(),
            "max_connection_age",
            "30.0".into(),
        ),
        (
            "ZDR_MAX_CONNECTION_AGE_JITTER",
            "5".into(),
            "max_connection_age_jitter",
            "5.0".into(),
        ),
        (
            "ZDR_MAX_CONNECTION_AGE_GRACE",
            "7".into(),
            "max_connection_age_grace",
            "7.0".into(),
        ),
        (
            "ZDR_PASS_SOCKET",
            "true".into(),
            "pass_socket",
            "true".into(),
        ),
        (
            "ZDR_WORKER_READY_DELAY",
            "2".into(),
            "worker_ready_delay",
            "2.0".into(),
        ),
        (
            "ZDR_LOG_FORMAT",
            "JSON".into(),
            "log_format",
            "\"json\"".into(),
        ),
        (
            "ZDR_INTERFACE",
            "WSGI".into(),
            "interface",
            "\"wsgi\"".into(),
        ),
        (
            "ZDR_PROC_NAME",
            "shop".into(),
            "proc_name",
            "\"shop\"".into(),
        ),
        (
            "ZDR_WORKER_READY_PATH",
            "/health".into(),
            "worker_ready_path",
            "\"/health\"".into(),
        ),
        (
            "ZDR_WORKER_STOP_SIGNAL",
            "sigint".into(),
            "worker_stop_signal",
            "2".into(),
        ),
        (
            "ZDR_PROXY_UPGRADES",
            "WebSocket,echo".into(),
            "proxy_upgrades",
            "[\"websocket\", \"echo\"]".into(),
        ),
    ];
    for (var, value, key, expected) in &cases {
        let t = check(Launch::raw(&["check"]).env(var, value));
        let got = t
            .get(*key)
            .unwrap_or_else(|| panic!("{var}: no {key} in check's output: {t}"))
            .to_string();
        assert_eq!(&got, expected, "{var}={value}");
    }
    // The certificate settings are checked together.
    let out = Launch::raw(&["check"])
        .env("ZDR_CERTFILE", &file("missing.pem"))
        .env("ZDR_KEYFILE", &file("missing.key"))
        .env("ZDR_CA_CERTS", &file("ca.pem"))
        .output();
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("missing.pem"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Every variable a flag declares (as `zdr serve --help` shows it) is in
    // the table above.
    let help = Launch::raw(&["serve", "--help"]).output();
    let help = String::from_utf8_lossy(&help.stdout).into_owned();
    let vars: Vec<&str> = help
        .split("[env: ")
        .skip(1)
        .filter_map(|rest| rest.split(['=', ']']).next())
        .collect();
    assert!(vars.len() > 20, "no variables in --help: {help}");
    for var in vars {
        assert!(
            cases.iter().any(|c| c.0 == var)
                || ["ZDR_CERTFILE", "ZDR_KEYFILE", "ZDR_CA_CERTS"].contains(&var),
            "{var} is not tested"
        );
    }
}

#[test]
fn umask_and_chdir_shape_the_files_it_makes() {
    let dir = TempDir::new("chdir");
    let mut server = Launch::serve(&[
        "--chdir",
        dir.0.to_str().unwrap(),
        "--umask",
        "077",
        "--pid",
        "zdr.pid",
        "--access-logfile",
        "access.log",
    ])
    .start();
    server.wait_ready();
    server.wait_workers(1);
    assert_eq!(server.get("/").status, 200);
    // Relative paths are under --chdir; files are made under --umask.
    let pidfile = dir.path("zdr.pid");
    wait_for_file_text(&dir.path("access.log"), "\"GET / HTTP/1.1\" 200");
    for file in [pidfile.clone(), dir.path("access.log")] {
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(&file).unwrap().permissions(),
        );
        assert_eq!(mode & 0o077, 0, "{} has mode {mode:o}", file.display());
    }
    let cwd = std::fs::read_link(format!("/proc/{}/cwd", server.pid)).unwrap();
    assert_eq!(cwd, dir.0.canonicalize().unwrap());
    server.signal(Signal::SIGTERM);
    assert_eq!(server.wait_exit(Duration::from_secs(60)).code(), Some(0));
    assert!(!pidfile.exists());
}

#[test]
fn backlog_sets_the_listen_queue() {
    // ss shows a listening socket's backlog as its Send-Q (/proc/net/tcp
    // does not show it).
    if !have("ss", &["--version"]) {
        return;
    }
    let server = Launch::serve(&["--backlog", "77"]).start();
    server.wait_ready();
    let out = std::process::Command::new("ss")
        .args(["-ltnH", &format!("sport = :{}", server.port())])
        .output()
        .expect("ss runs");
    let text = String::from_utf8_lossy(&out.stdout);
    let send_q: Vec<&str> = text
        .lines()
        .filter_map(|l| l.split_whitespace().nth(2))
        .collect();
    assert_eq!(send_q, ["77"], "{text}");
}

/// Builds (if `cargo test` has not already) and returns an example binary.
fn example(name: &str) -> std::path::PathBuf {
    let dir = zdr_bin().parent().unwrap().join("examples");
    let exe = dir.join(name);
    if !exe.exists() {
        let status = std::process::Command::new(env!("CARGO"))
            .args(["build", "--example", name])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .status()
            .unwrap();
        assert!(status.success(), "cargo build --example {name}");
    }
    exe
}

#[test]
fn the_examples_serve_and_reload() {
    // An app names itself and its version, beside zdr's.
    let out = std::process::Command::new(example("axum"))
        .arg("--version")
        .output()
        .unwrap();
    let version = String::from_utf8_lossy(&out.stdout);
    assert!(
        version.starts_with("axum ") && version.contains("(zdr "),
        "{version}"
    );
    let server = Launch::serve(&["--workers", "2"])
        .exe(&example("axum"))
        .env("GREETING", "Bonjour")
        .start();
    server.wait_ready();
    server.wait_workers(2);
    let r = server.get("/hello/zdr");
    assert_eq!(r.status, 200);
    assert!(
        r.body.starts_with("Bonjour, zdr! (request 1 of worker "),
        "{}",
        r.body
    );
    assert_eq!(server.get("/_zdr/ready").status, 200);
    // It asked for its requests' clients: an axum extractor gets each.
    let r = server.get("/whoami");
    assert_eq!(
        (r.status, r.body.as_str()),
        (200, "you are 127.0.0.1 over http\n")
    );
    server.signal(Signal::SIGHUP);
    server.wait_for_log("Reload to generation 2 complete", Duration::from_secs(60));
    assert_eq!(server.get("/").body, "axum on zdr\n");

    let server = Launch::serve(&["--workers", "2", "--preload"])
        .exe(&example("preload"))
        .env("TABLE_MB", "64")
        .start();
    server.wait_ready();
    server.wait_workers(2);
    // The table is shared copy-on-write: resident in every worker, owned
    // by none (what --max-worker-memory counts).
    for w in server.status().workers {
        assert!(w.rss_bytes > 64 << 20, "{w:?}");
        assert!(w.owned_bytes < 32 << 20, "{w:?}");
    }
    // It did not ask for its requests' clients: they carry none.
    assert_eq!(server.get("/client").body, "client: not asked for\n");
    let r = server.get("/lookup/7");
    assert_eq!(r.status, 200);
    assert!(
        r.body
            .ends_with(&format!("(table built in pid {})\n", server.pid)),
        "{}",
        r.body
    );
}

/// Gunicorn's habits: flags in one variable (`ZDR_CMD_ARGS`, under the
/// command line's own), a log level in capitals, `tcp://` binds, and
/// `-e`/`raw_env` reaching the app, re-read on a reload.
#[test]
fn gunicorn_habits_work() {
    let dir = TempDir::new("habits");
    let config = dir.path("zdr.toml");
    write_file(&config, "raw_env = [\"ZDR_DEMO_MESSAGE=first\"]\n");
    let server = Launch::raw(&[
        "serve",
        "--config",
        config.to_str().unwrap(),
        "--log-level",
        "INFO",
    ])
    .env(
        "ZDR_CMD_ARGS",
        "--bind tcp://127.0.0.1:0 --workers 2 --log-level WARNING",
    )
    .start();
    server.wait_for_log("Listening at", Duration::from_secs(30));
    // The command line's --log-level INFO wins over ZDR_CMD_ARGS's.
    server.wait_ready();
    server.wait_generation_ready(1, 2);
    assert_eq!(server.get("/").field("message").as_deref(), Some("first"));
    write_file(&config, "raw_env = [\"ZDR_DEMO_MESSAGE=second\"]\n");
    let out = server.control(&["reload", "--wait"]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(server.get("/").field("message").as_deref(), Some("second"));
    // A binary upgrade re-reads ZDR_CMD_ARGS once: its bind is not doubled.
    let pid = server.pid;
    server.signal(Signal::SIGUSR2);
    server.wait_generation_ready(3, 2);
    assert_eq!(server.pid, pid);
    assert_eq!(server.get("/").field("message").as_deref(), Some("second"));
    assert!(!server.log_text().contains("Binary upgrade failed"));
    // A malformed pair is refused, naming the setting.
    let out = Launch::raw(&["check", "-e", "NOEQUALS"]).output();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("raw_env"));
}

/// `ps` names the master, each worker, their server and the worker's
/// generation; `top` and `pgrep` (the kernel's short name) still see the
/// program's name.
#[test]
fn processes_have_titles() {
    let server = Launch::serve(&["--workers", "2", "--name", "shop"]).start();
    server.wait_ready();
    let title = |pid: &u32| {
        std::fs::read_to_string(format!("/proc/{pid}/cmdline"))
            .unwrap_or_default()
            .replace('\0', " ")
    };
    let comm = |pid: &u32| {
        std::fs::read_to_string(format!("/proc/{pid}/comm"))
            .unwrap_or_default()
            .trim()
            .to_owned()
    };
    assert!(
        title(&server.pid).starts_with("zdr: master [shop] serve "),
        "{}",
        title(&server.pid)
    );
    assert_eq!(comm(&server.pid), "zdr");
    let workers = server.wait_generation_ready(1, 2);
    for pid in &workers {
        assert!(
            title(pid).starts_with("zdr: worker [shop] gen 1"),
            "{}",
            title(pid)
        );
        assert_eq!(comm(pid), "zdr");
        // --threads 1 (the default): the runtime runs on the worker's own
        // thread, and an app's worker has no other (the master watches its
        // progress from outside, in its scoreboard slot).
        assert_eq!(thread_names(*pid), vec!["zdr".to_owned()], "worker {pid}");
    }
    let out = server.control(&["reload", "--wait"]);
    assert!(out.status.success());
    for pid in server.wait_generation_ready(2, 2) {
        assert!(
            title(&pid).starts_with("zdr: worker [shop] gen 2"),
            "{}",
            title(&pid)
        );
    }
}

/// `--log-format json`: both logs write one JSON object per line.
#[test]
fn json_logs_are_one_object_per_line() {
    let dir = TempDir::new("jsonlog");
    let access = dir.path("access.log");
    let mut server = Launch::serve(&[
        "--log-format",
        "json",
        "--access-logfile",
        access.to_str().unwrap(),
    ])
    .start();
    server.wait_for_log("\"Listening at: ", Duration::from_secs(30));
    assert!(wait_until(Duration::from_secs(30), || server
        .status()
        .workers
        .iter()
        .all(|w| w.state == "ready")));
    assert_eq!(server.get("/json?x=1").status, 404);
    let text = wait_for_file_text(&access, "/json");
    let line: serde_json::Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
    assert_eq!(line["path"], "/json");
    assert_eq!(line["query"], "x=1");
    assert_eq!(line["status"], 404);
    assert_eq!(line["method"], "GET");
    let first = server.worker_pids();
    // A reload and a stop, for their events.
    server.signal(nix::sys::signal::Signal::SIGHUP);
    server.wait_generation_ready(2, 1);
    server.wait_for_log("reload.complete", Duration::from_secs(60));
    let second = server.worker_pids();
    server.signal(nix::sys::signal::Signal::SIGTERM);
    server.wait_exit(Duration::from_secs(60));
    let mut roles = std::collections::BTreeSet::new();
    let mut events = std::collections::BTreeSet::new();
    for l in server.log_text().lines().filter(|l| !l.trim().is_empty()) {
        let v: serde_json::Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"));
        assert!(
            v["level"].is_string() && v["message"].is_string() && v["pid"].is_u64(),
            "{l}"
        );
        assert!(
            v["source"].as_str().is_some_and(|s| s.starts_with("zdr")),
            "{l}"
        );
        // Who said it: the master, or a worker with its generation.
        match v["role"].as_str() {
            Some("master") => assert_eq!(v["pid"], server.pid, "{l}"),
            Some("worker") => {
                assert_eq!(v["worker_pid"], v["pid"], "{l}");
                let pid = v["pid"].as_u64().unwrap() as u32;
                let generation = if first.contains(&pid) { 1 } else { 2 };
                assert!(first.contains(&pid) || second.contains(&pid), "{l}");
                assert_eq!(v["generation"], generation, "{l}");
            }
            _ => panic!("no role: {l}"),
        }
        roles.insert(v["role"].as_str().unwrap_or_default().to_owned());
        // Every line zdr writes names its event in a stable word.
        let event = v["event"]
            .as_str()
            .unwrap_or_else(|| panic!("no event: {l}"));
        events.insert(event.to_owned());
    }
    assert!(roles.contains("master"), "{roles:?}");
    for expected in [
        "master.starting",
        "master.listening",
        "worker.booting",
        "worker.ready",
        "master.signal",
        "reload.started",
        "generation.ready",
        "reload.complete",
        "worker.exited",
        "master.stopped",
    ] {
        assert!(events.contains(expected), "{expected} not in {events:?}");
    }
}

/// An error about a value that came from a `ZDR_*` variable names it.
#[test]
fn a_bad_value_from_the_environment_names_its_variable() {
    let out = Launch::raw(&["check"]).env("ZDR_WORKERS", "0").output();
    assert!(!out.status.success());
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        said.contains("`workers`") && said.contains("ZDR_WORKERS"),
        "{said}"
    );
    let out = Launch::raw(&["check", "--workers", "0"]).output();
    assert!(!String::from_utf8_lossy(&out.stderr).contains("ZDR_WORKERS"));
}

/// A negative number is refused with a clear error, whichever way it comes.
#[test]
fn negative_numbers_are_refused_clearly() {
    for (args, env) in [
        (&["check", "--workers", "-1"][..], None),
        (&["check"][..], Some(("ZDR_WORKERS", "-2"))),
        (&["check", "--timeout", "-1"][..], None),
    ] {
        let mut launch = Launch::raw(args);
        if let Some((k, v)) = env {
            launch = launch.env(k, v);
        }
        let out = launch.output();
        let said = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?}");
        assert!(
            said.contains("must not be negative") || said.contains(">= 0"),
            "{args:?}: {said}"
        );
    }
}

/// `zdr check` prints the configuration in the config file's own form,
/// which reads back as the same configuration, and says it is fine.
#[test]
fn check_prints_a_configuration_that_reads_back_and_says_it_is_ok() {
    let dir = TempDir::new("roundtrip");
    let first = dir.path("zdr.toml");
    write_file(
        &first,
        "workers = 3\nworker_stop_signal = \"INT\"\nmax_queue_time = 0.5\n",
    );
    let out = Launch::raw(&["check", "-c", first.to_str().unwrap()]).output();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).trim(),
        "configuration OK"
    );
    let printed = String::from_utf8_lossy(&out.stdout).into_owned();
    let again = dir.path("printed.toml");
    write_file(&again, &printed);
    let out = Launch::raw(&["check", "-c", again.to_str().unwrap()]).output();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), printed);
}

/// Messages that name the fix: a config value of the wrong type says what
/// it should be; a port out of range says so; a pidfile in a missing
/// directory names the pidfile; a failed start leaves no control socket.
#[test]
fn bad_input_is_refused_with_the_fix() {
    let dir = TempDir::new("messages");
    let said = |out: std::process::Output| -> (Option<i32>, String) {
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let cfg = dir.path("zdr.toml");
    write_file(&cfg, "workers = \"many\"\n");
    let (code, err) = said(Launch::raw(&["check", "-c", cfg.to_str().unwrap()]).output());
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("zdr.toml:1: key `workers`: invalid type: string \"many\", expected a whole number, as in `workers = 4` (no quotes)"),
        "{err}"
    );
    let (code, err) = said(Launch::raw(&["check", "--bind", "127.0.0.1:99999"]).output());
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("port 99999 is out of range (1 to 65535, or 0 for any free port)"),
        "{err}"
    );
    // A pidfile whose directory is missing: named as the pidfile's.
    let missing = dir.path("no-such-dir").join("zdr.pid");
    let (code, err) = said(Launch::serve(&["--pid", missing.to_str().unwrap()]).output());
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("cannot write the pidfile in"), "{err}");
    assert!(err.contains("no such directory"), "{err}");
    assert!(!err.contains("control socket"), "{err}");
    // A start that fails after its control socket is made removes it.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let metrics = taken.local_addr().unwrap().to_string();
    let tmp = dir.0.to_str().unwrap();
    let (code, err) = said(
        Launch::serve(&["--metrics-bind", &metrics])
            .env("TMPDIR", tmp)
            .output(),
    );
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("cannot bind metrics address"), "{err}");
    let left: Vec<_> = std::fs::read_dir(&dir.0)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".ctl"))
        .collect();
    assert!(left.is_empty(), "control socket files left: {left:?}");
}

/// What a person sees: `--version` on every subcommand, shell completions
/// and man pages made from the command line's own definitions, and counts
/// in the singular where there is one.
#[test]
fn versions_completions_man_pages_and_plurals() {
    let version = env!("CARGO_PKG_VERSION");
    for sub in ["serve", "check", "status", "reload", "stop", "scale"] {
        let out = Launch::raw(&[sub, "--version"]).output();
        let said = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(out.status.success(), "{sub}: {said}");
        assert!(said.trim().ends_with(version), "{sub}: {said}");
    }
    let out = Launch::raw(&["completions", "bash"]).output();
    let bash = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success());
    assert!(
        bash.contains("_zdr()") && bash.contains("--max-queue-time"),
        "{bash}"
    );
    let out = Launch::raw(&["completions", "zsh"]).output();
    assert!(String::from_utf8_lossy(&out.stdout).contains("#compdef zdr"));
    let out = Launch::raw(&["man"]).output();
    let page = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(page.contains(".TH zdr 1"), "{page}");
    let out = Launch::raw(&["man", "serve"]).output();
    let page = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(page.contains(".TH zdr-serve 1"), "{page}");
    assert!(page.contains("max\\-queue\\-time"), "{page}");
    let out = Launch::raw(&["man", "nonsense"]).output();
    assert_eq!(out.status.code(), Some(1));
    // One worker, said as one.
    let server = Launch::serve(&["--workers", "1"]).start();
    server.wait_ready();
    server.wait_workers(1);
    server.wait_for_log(
        "Ready: generation 1, 1 worker, in ",
        Duration::from_secs(60),
    );
    let out = server.control(&["status"]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(text.contains(", 1 worker wanted"), "{text}");
}
