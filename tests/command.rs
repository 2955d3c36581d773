//! `zdr serve -- CMD`: apps in other languages, each run by a zdr worker on
//! a private port and reached through it. The apps are the examples in
//! `examples/command/` (uvicorn, gunicorn, Node); `scripts/test` installs
//! them, and a missing one fails the test, naming it, unless
//! `ZDR_TEST_SKIP_MISSING` is set.

mod common;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::Duration;

use common::*;
use nix::sys::signal::Signal;

/// The example apps' directory.
fn apps() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples/command")
}

fn uvicorn() -> String {
    format!(
        "cd {} && exec uvicorn asgi_app:app --port $PORT --lifespan off --no-access-log",
        apps().display()
    )
}

fn gunicorn() -> String {
    format!(
        "cd {} && exec gunicorn wsgi_app:app --bind 127.0.0.1:$PORT --workers 1 --threads 4",
        apps().display()
    )
}

fn node() -> String {
    format!("cd {} && exec node server.js", apps().display())
}

/// A server of `workers` workers, each running `script` with `sh -c`.
fn serve(workers: usize, extra: &[&str], script: &str) -> Server {
    let workers = workers.to_string();
    let mut args = vec!["--workers", &workers];
    args.extend_from_slice(extra);
    args.extend_from_slice(&["--", "sh", "-c", script]);
    let server = Launch::serve(&args).start();
    server.wait_ready();
    server
}

/// Keep-alive and fresh-connection load while the server reloads
/// `reloads` times, each reload complete before the next: not one request
/// fails, and answers then come from the last generation.
fn reloads_under_load(server: &Server, reloads: u64) {
    let rt = runtime();
    let load = rt.block_on(async { load::start(server.addr(), "/", 4, 2) });
    load.wait_for_more(50);
    for _ in 0..reloads {
        let out = server.control(&["reload", "--wait", "--timeout", "60"]);
        assert!(
            out.status.success(),
            "reload failed: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            server.log_text()
        );
        load.wait_for_more(20);
    }
    let last = server.status().generation.expect("a serving generation");
    assert_eq!(last, 1 + reloads);
    load.wait_for_generation(last, 50);
    let report = rt.block_on(load.stop());
    eprintln!(
        "{} requests ok, {} failed, across {reloads} reloads",
        report.ok, report.failed
    );
    assert_eq!(report.failed, 0, "{:?}", report.failures);
    assert_eq!(server.get("/").generation(), last);
}

#[test]
fn uvicorn_reloads_without_a_failed_request() {
    if !have("uvicorn", &["--version"]) {
        return;
    }
    let server = serve(3, &[], &uvicorn());
    server.wait_generation_ready(1, 3);
    let reply = server.get("/");
    assert_eq!(reply.status, 200);
    assert_eq!(reply.generation(), 1);
    // The command's own pid, not the worker's: the app answers.
    assert!(!server.worker_pids().contains(&reply.pid()));
    // curl agrees, over HTTP/1.1 and over h2c (HTTP/2 at the front, HTTP/1.1
    // to the app).
    if have("curl", &["--version"]) {
        for flag in ["--http1.1", "--http2-prior-knowledge"] {
            let out = std::process::Command::new("curl")
                .args(["-s", "-i", flag, &format!("http://{}/", server.addr())])
                .output()
                .unwrap();
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            assert!(out.status.success(), "{flag}: {text}");
            assert!(
                text.lines().next().is_some_and(|l| l.contains(" 200")),
                "{flag}: {text}"
            );
            assert!(text.contains("generation=1"), "{flag}: {text}");
        }
    }
    reloads_under_load(&server, 10);
}

#[test]
fn gunicorn_reloads_without_a_failed_request() {
    if !have("gunicorn", &["--version"]) {
        return;
    }
    let server = serve(2, &[], &gunicorn());
    server.wait_generation_ready(1, 2);
    reloads_under_load(&server, 4);
}

#[test]
fn node_reloads_without_a_failed_request_and_passes_upgrades_through() {
    if !have("node", &["--version"]) {
        return;
    }
    // The example's upgrade is `echo`, which zdr forwards when told to
    // (WebSocket only, by default).
    let server = serve(2, &["--proxy-upgrades", "echo,websocket"], &node());
    server.wait_generation_ready(1, 2);
    // An upgraded connection reaches the app and echoes.
    let mut echo = upgrade_to_echo(server.addr());
    std::io::Write::write_all(&mut echo, b"ping").unwrap();
    let mut got = [0u8; 4];
    std::io::Read::read_exact(&mut echo, &mut got).unwrap();
    assert_eq!(&got, b"ping");
    drop(echo);
    reloads_under_load(&server, 4);
}

/// A Node app stops at once after its worker drains: zdr closes its idle
/// pooled connections to the app before the app's stop signal, so an app
/// that waits for its open connections to end (Node's `server.close()`
/// before Node 19, here written out) has nothing of zdr's to wait for. Ten stops after
/// keep-alive load, none reaching the graceful timeout (`zdr stop --wait`
/// exits 1 if one did).
#[test]
fn node_stops_without_waiting_for_zdrs_idle_connections() {
    if !have("node", &["--version"]) {
        return;
    }
    // As Node before 19 (and many servers) stop: exit once every open
    // connection has ended, idle keep-alive ones included. (Node 19+'s
    // `server.close()` closes its idle ones itself.)
    let app = "const http = require('http'); const open = new Set(); \
               const server = http.createServer((req, res) => res.end('ok')); \
               server.on('connection', (s) => { open.add(s); s.on('close', () => { \
                 open.delete(s); if (stopping && open.size === 0) process.exit(0); }); }); \
               let stopping = false; \
               process.on('SIGTERM', () => { stopping = true; \
                 if (open.size === 0) process.exit(0); }); \
               server.listen(Number(process.env.PORT), '127.0.0.1');";
    let script = format!("exec node -e \"{app}\"");
    let rt = runtime();
    for round in 0..10 {
        let server = serve(2, &["--graceful-timeout", "20"], &script);
        server.wait_generation_ready(1, 2);
        let load = rt.block_on(async { load::start(server.addr(), "/", 16, 0) });
        load.wait_for_more(200);
        let report = rt.block_on(load.stop());
        assert_eq!(report.failed, 0, "{:?}", report.failures);
        let out = server.control(&["stop", "--wait", "--timeout", "60"]);
        let log = server.log_text();
        assert!(
            out.status.success(),
            "round {round}: {}\n{log}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(!log.contains("graceful timeout"), "round {round}:\n{log}");
    }
}

/// Requests in flight when a reload starts are answered by the old
/// generation's app, after the new generation took over.
#[test]
fn requests_in_flight_finish_across_a_reload() {
    if !have("uvicorn", &["--version"]) {
        return;
    }
    let server = serve(2, &[], &uvicorn());
    server.wait_generation_ready(1, 2);
    let held: Vec<HeldRequest> = (0..3).map(|_| HeldRequest::start(server.addr())).collect();
    // The app has each request (it waits for the rest of its body).
    assert!(wait_until(Duration::from_secs(30), || {
        server
            .status()
            .workers
            .iter()
            .map(|w| w.requests)
            .sum::<u64>()
            >= 3
    }));
    server.signal(Signal::SIGHUP);
    assert!(wait_until(Duration::from_secs(60), || {
        let s = server.status();
        s.generation == Some(2)
            && s.workers
                .iter()
                .filter(|w| w.generation == 2 && w.state == "ready")
                .count()
                == 2
    }));
    server.wait_old_generations_stop_accepting(2);
    for h in held {
        let reply = h.finish().expect("an answer");
        assert_eq!(reply.status, 200, "{}", reply.body);
        assert_eq!(reply.generation(), 1);
        assert_eq!(reply.field("received").as_deref(), Some("2"));
    }
    assert_eq!(server.get("/").generation(), 2);
}

/// A command that exits at boot rolls the reload back, with the command's
/// own words in `reload --wait`'s answer; the old generation serves on.
#[test]
fn a_command_that_fails_to_boot_is_rolled_back() {
    if !have("uvicorn", &["--version"]) {
        return;
    }
    let dir = TempDir::new("command-config");
    let config = dir.path("zdr.toml");
    let toml = |script: &str| {
        format!(
            "workers = 2\nboot_timeout = 20\ncommand = [\"sh\", \"-c\", {}]\n",
            toml_string(script)
        )
    };
    write_file(&config, &toml(&uvicorn()));
    let server = Launch::serve(&["--config", config.to_str().unwrap()]).start();
    server.wait_ready();
    server.wait_generation_ready(1, 2);
    write_file(
        &config,
        &toml("echo 'cannot import module app' >&2; exit 3"),
    );
    let out = server.control(&["reload", "--wait", "--timeout", "60"]);
    let said =
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{said}");
    assert!(said.contains("rolled back"), "{said}");
    assert!(said.contains("cannot import module app"), "{said}");
    assert_eq!(server.get("/").generation(), 1);
    // A command that never listens: rolled back at the boot timeout.
    write_file(
        &config,
        "workers = 1\nboot_timeout = 2\ncommand = [\"sleep\", \"600\"]\n",
    );
    let out = server.control(&["reload", "--wait", "--timeout", "60"]);
    let said =
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{said}");
    assert!(said.contains("boot timeout"), "{said}");
    assert_eq!(server.get("/").generation(), 1);
}

/// A reload from the proxy mode to socket mode, whose workers serve no
/// HTTP themselves and so take no handed-over connection: a keep-alive
/// connection of the old generation is not left waiting in the handoff
/// queue. Its old worker takes it back and serves it as a draining worker
/// does: the next request on it is answered, or the connection is closed
/// between requests; it never hangs.
#[test]
fn a_reload_to_socket_mode_leaves_no_connection_waiting() {
    if !have("gunicorn", &["--version"]) || !have("uvicorn", &["--version"]) {
        return;
    }
    let dir = TempDir::new("command-mode-switch");
    let config = dir.path("zdr.toml");
    let toml = |script: &str, socket: bool| {
        format!(
            "workers = 1\nkeepalive = 600\npass_socket = {socket}\ncommand = [\"sh\", \"-c\", {}]\n",
            toml_string(script)
        )
    };
    write_file(&config, &toml(&uvicorn(), false));
    let server = Launch::serve(&["--config", config.to_str().unwrap()]).start();
    server.wait_ready();
    let old = server.wait_generation_ready(1, 1);
    let mut conn = KeepAlive::open(server.addr());
    assert_eq!(conn.get().expect("an answer").status, 200);
    let gunicorn = format!(
        "cd {} && exec gunicorn wsgi_app:app --workers 1 --threads 4",
        apps().display()
    );
    write_file(&config, &toml(&gunicorn, true));
    let out = server.control(&["reload", "--wait", "--timeout", "60"]);
    assert!(out.status.success(), "{out:?}");
    assert!(
        wait_until(Duration::from_secs(60), || old.iter().all(|p| !alive(*p))),
        "the old worker lingers"
    );
    // Answered (by the old worker, before it left) or closed between
    // requests; a read that times out fails the test.
    if let Some(reply) = conn.get() {
        assert_eq!(reply.status, 200);
    }
}

/// A command that dies while serving takes its worker out of service; a
/// new pair replaces it.
#[test]
fn a_command_that_dies_is_replaced_with_its_worker() {
    if !have("uvicorn", &["--version"]) {
        return;
    }
    let server = serve(1, &[], &uvicorn());
    let before = server.wait_workers(1);
    let app_pid = server.get("/").pid();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(app_pid as i32), Signal::SIGKILL).unwrap();
    server.wait_for_log("the worker leaves service", Duration::from_secs(30));
    assert!(wait_until(Duration::from_secs(60), || {
        let now = server.worker_pids();
        now.len() == 1 && now != before && server.status().workers.iter().all(|w| w.accepting)
    }));
    let reply = server.get("/");
    assert_eq!(reply.status, 200);
    assert_ne!(reply.pid(), app_pid);
}

/// `--max-requests` recycles the pairs, replacement first: no request
/// fails.
#[test]
fn max_requests_recycles_commands_without_a_failed_request() {
    if !have("uvicorn", &["--version"]) {
        return;
    }
    let server = serve(2, &["--max-requests", "200"], &uvicorn());
    server.wait_generation_ready(1, 2);
    let rt = runtime();
    let load = rt.block_on(async { load::start(server.addr(), "/", 4, 0) });
    server.wait_for_log_count("reached its request limit", 3, Duration::from_secs(120));
    load.wait_for_more(100);
    let report = rt.block_on(load.stop());
    assert_eq!(report.failed, 0, "{:?}", report.failures);
}

/// Stopping the server stops every command, however it was started.
#[test]
fn a_stop_leaves_no_command_behind() {
    if !have("uvicorn", &["--version"]) {
        return;
    }
    let mut server = serve(2, &[], &uvicorn());
    server.wait_generation_ready(1, 2);
    let apps: Vec<u32> = (0..20).map(|_| server.get("/").pid()).collect();
    server.signal(Signal::SIGTERM);
    assert_eq!(server.wait_exit(Duration::from_secs(60)).code(), Some(0));
    for pid in apps {
        assert!(
            !std::path::Path::new(&format!("/proc/{pid}")).exists()
                || std::fs::read_to_string(format!("/proc/{pid}/stat"))
                    .is_ok_and(|s| s.contains(") Z ")),
            "command {pid} outlived the server"
        );
    }
}

/// The socket inodes a process holds.
fn socket_inodes(pid: u32) -> BTreeSet<String> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|fds| {
            fds.flatten()
                .filter_map(|fd| std::fs::read_link(fd.path()).ok())
                .map(|t| t.to_string_lossy().into_owned())
                .filter(|t| t.starts_with("socket:"))
                .collect()
        })
        .unwrap_or_default()
}

/// The command (proxy mode) inherits none of zdr's sockets: not the
/// listening sockets, which it would keep open after zdr closed them (new
/// connections would queue on them instead of being refused), nor the
/// queue on which workers hand connections over.
#[test]
fn a_command_inherits_none_of_zdrs_sockets() {
    if !have("uvicorn", &["--version"]) {
        return;
    }
    let server = serve(1, &[], &uvicorn());
    server.wait_generation_ready(1, 1);
    let command = server.get("/").pid();
    let master = socket_inodes(server.pid);
    let held = socket_inodes(command);
    assert!(!master.is_empty() && !held.is_empty());
    let shared: Vec<_> = master.intersection(&held).collect();
    assert!(
        shared.is_empty(),
        "the command holds the master's {shared:?}"
    );
}

/// Socket mode: the command gets the listening sockets (LISTEN_FDS) and
/// says when it is ready (READY=1 on NOTIFY_SOCKET, as gunicorn does), or
/// counts as ready after `--worker-ready-delay` (uvicorn, which cannot say).
#[test]
fn socket_mode_hands_the_command_the_listening_sockets() {
    if !have("gunicorn", &["--version"]) || !have("uvicorn", &["--version"]) {
        return;
    }
    let gunicorn = format!(
        "cd {} && exec gunicorn wsgi_app:app --workers 1 --threads 4",
        apps().display()
    );
    let server = serve(2, &["--pass-socket"], &gunicorn);
    server.wait_generation_ready(1, 2);
    let reply = server.get("/");
    assert_eq!(reply.status, 200);
    assert_eq!(reply.generation(), 1);
    let out = server.control(&["reload", "--wait", "--timeout", "60"]);
    assert!(out.status.success(), "{out:?}");
    assert!(wait_until(Duration::from_secs(60), || server
        .get("/")
        .generation()
        == 2));

    let uvicorn = format!(
        "cd {} && exec uvicorn asgi_app:app --fd 3 --lifespan off",
        apps().display()
    );
    let server = serve(1, &["--pass-socket", "--worker-ready-delay", "1"], &uvicorn);
    server.wait_generation_ready(1, 1);
    assert!(wait_until(Duration::from_secs(30), || server
        .get("/")
        .status
        == 200));
}

#[test]
fn check_load_app_finds_the_commands_program() {
    let out = Launch::raw(&["check", "--load-app", "--", "no-such-program-here"]).output();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no-such-program-here"));
    let out = Launch::raw(&["check", "--load-app", "--", "sh", "-c", "true"]).output();
    assert!(out.status.success());
}

#[test]
fn preload_has_no_meaning_for_a_command() {
    let out = Launch::raw(&["check", "--preload", "--", "true"]).output();
    assert!(!out.status.success());
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        said.contains("preload") && said.contains("has no meaning with a command"),
        "{said}"
    );
}

/// A TOML basic string.
fn toml_string(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

/// `--max-worker-memory` counts what the command and its children own,
/// not only the worker in front of them.
#[test]
fn max_worker_memory_counts_the_commands_memory() {
    if !have("python3", &["--version"]) {
        return;
    }
    let app = "import http.server as h, os\n\
               held = b'x' * (96 << 20)\n\
               h.ThreadingHTTPServer(('127.0.0.1', int(os.environ['PORT'])), h.SimpleHTTPRequestHandler).serve_forever()";
    let server = Launch::serve(&["--max-worker-memory", "48M", "--", "python3", "-c", app]).start();
    server.wait_ready();
    server.wait_for_log("over --max-worker-memory", Duration::from_secs(60));
    // Its own figure in `zdr status` counts the command's memory too.
    assert!(wait_until(Duration::from_secs(60), || server
        .status()
        .workers
        .iter()
        .any(|w| w.owned_bytes > 48 << 20)));
}

/// What a person sees with a command: the banner names the command, not
/// the built-in app, and a line the command logs at ERROR or WARNING
/// keeps its level in zdr's log.
#[test]
fn the_banner_names_the_command_and_its_lines_keep_their_level() {
    if !have("python3", &["--version"]) {
        return;
    }
    let app = "import http.server as h, os, sys\n\
               print('ERROR:    the cache is cold', file=sys.stderr, flush=True)\n\
               print('WARNING:  slow start', file=sys.stderr, flush=True)\n\
               print('INFO:     GET /error 500', file=sys.stderr, flush=True)\n\
               h.ThreadingHTTPServer(('127.0.0.1', int(os.environ['PORT'])), h.SimpleHTTPRequestHandler).serve_forever()";
    let server = Launch::serve(&["--workers", "1", "--", "python3", "-c", app]).start();
    server.wait_ready();
    server.wait_for_log("GET /error 500", Duration::from_secs(60));
    let log = server.log_text();
    assert!(log.contains("Starting zdr "), "{log}");
    assert!(log.contains(" for the command \"python3\""), "{log}");
    assert!(!log.contains("Starting demo"), "{log}");
    let line = |needle: &str| {
        log.lines()
            .find(|l| l.contains("] [command ") && l.contains(needle))
            .unwrap_or_else(|| panic!("no {needle:?} in:\n{log}"))
            .to_owned()
    };
    assert!(
        line("the cache is cold").contains("[ERROR] [command "),
        "{log}"
    );
    assert!(line("slow start").contains("[WARNING] [command "), "{log}");
    assert!(line("GET /error 500").contains("[INFO] [command "), "{log}");
}
