//! Python ASGI apps served in-process (`zdr serve MODULE:APP`, a build
//! with the `python` feature), against the real binary: the scope, bodies
//! both ways, streaming, an app that raises, lifespan startup and
//! shutdown, a reload of new code under load with nothing failed, and new
//! code that cannot import rolled back with its traceback.
#![cfg(feature = "python")]

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;
use nix::sys::signal::Signal;

/// An ASGI app in plain Python (no packages): answers in the demo's
/// `pid=… generation=…` form, so that the tests' load and replies read it.
const APP: &str = r#"
import os

VERSION = "VERSION_MARK"
# The process that imported this module (a loader's, under --preload).
LOADED_IN = os.getpid()

import atexit

def _at_exit():
    with open(f"atexit-{os.getpid()}", "w") as f:
        f.write("done")

atexit.register(_at_exit)

async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                if os.path.exists("fail-startup"):
                    await send({"type": "lifespan.startup.failed", "message": "no database"})
                    return
                scope["state"]["greeting"] = "hello-from-lifespan"
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                with open(f"shutdown-{os.getpid()}", "w") as f:
                    f.write("done")
                await send({"type": "lifespan.shutdown.complete"})
                return
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    path = scope["path"]
    if path == "/raise":
        raise ValueError("the app was asked to raise")
    if path == "/block":
        import time
        time.sleep(60)
    if path == "/stream":
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/plain")]})
        for i in range(50):
            await send({"type": "http.response.body", "body": b"%05d\n" % i, "more_body": True})
        await send({"type": "http.response.body", "body": b""})
        return
    headers = dict(scope["headers"])
    text = (
        f"pid={os.getpid()} generation={os.environ['ZDR_GENERATION']} version={VERSION}"
        f" loaded={LOADED_IN} worker={os.environ['ZDR_WORKER_ID']} method={scope['method']} path={path.replace(' ', '_')} raw={scope['raw_path'].decode()}"
        f" query={scope['query_string'].decode()} body={len(body)} sum={sum(body) % 65521}"
        f" http={scope['http_version']} scheme={scope['scheme']} client={scope['client'][0]}"
        f" host={headers.get(b'host', b'').decode()} state={scope['state'].get('greeting')}\n"
    )
    await send({"type": "http.response.start", "status": 201 if path == "/created" else 200,
                "headers": [(b"content-type", b"text/plain"), (b"x-app", b"python")]})
    await send({"type": "http.response.body", "body": text.encode()})
"#;

fn write_app(dir: &Path, version: &str) {
    write_file(&dir.join("app.py"), &APP.replace("VERSION_MARK", version));
}

fn serve(dir: &TempDir, workers: usize) -> Server {
    serve_app(dir, &["--workers", &workers.to_string()], "app:app", None)
}

/// `zdr serve ARGS --chdir DIR APP`, with `venv` as its `VIRTUAL_ENV`,
/// once it is ready.
fn serve_app(dir: &TempDir, args: &[&str], app: &str, venv: Option<&Path>) -> Server {
    let chdir = dir.0.to_string_lossy().into_owned();
    let mut all = args.to_vec();
    all.extend_from_slice(&["--chdir", &chdir, app]);
    let mut launch = Launch::serve(&all);
    if let Some(venv) = venv {
        launch = launch.env("VIRTUAL_ENV", &venv.to_string_lossy());
    }
    let server = launch.start();
    server.wait_ready();
    server
}

/// `zdr reload --wait`: whether it succeeded, and what it said.
fn reload(server: &Server) -> (bool, String) {
    let out = server.control(&["reload", "--wait", "--timeout", "60"]);
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), said)
}

/// New code for `app.py` that cannot import.
const BROKEN_ASGI: &str = "async def app(scope, receive, send)\n    pass\n";

/// Writes `source`, code that cannot import, to `file` and reloads: the
/// reload fails with the traceback naming the file, and the app at
/// `version` still answers; returns its answer.
fn rolled_back(server: &Server, dir: &TempDir, file: &str, source: &str, version: &str) -> Reply {
    write_file(&dir.path(file), source);
    let (ok, said) = reload(server);
    assert!(!ok, "{said}");
    assert!(said.contains("SyntaxError"), "{said}");
    assert!(said.contains(file), "{said}");
    let reply = server.get("/");
    assert_eq!(reply.status, 200, "{reply:?}");
    assert!(
        reply.body.contains(&format!("version={version}")),
        "{reply:?}"
    );
    reply
}

/// Keep-alive and new-connection load while `deploy` writes new code and
/// the server reloads: the reload succeeds, generation 2 answers the load,
/// and no request fails.
fn new_code_under_load(server: &Server, deploy: impl FnOnce()) {
    let rt = runtime();
    let load = rt.block_on(async { load::start(server.addr(), "/", 4, 2) });
    load.wait_for_more(100);
    deploy();
    let (ok, said) = reload(server);
    assert!(ok, "{said}\n{}", server.log_text());
    load.wait_for_generation(2, 100);
    let report = rt.block_on(load.stop());
    assert_eq!(report.failed, 0, "{:?}", report.failures);
}

#[test]
fn an_asgi_app_is_served_in_process() {
    let dir = TempDir::new("asgi");
    write_app(&dir.0, "1");
    let server = serve(&dir, 2);
    let workers = server.wait_generation_ready(1, 2);

    let reply = server.get("/a%20b/c?x=1&y=%20");
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(reply.header("x-app"), Some("python"), "{reply:?}");
    for field in [
        "version=1",
        "method=GET",
        "path=/a_b/c",
        "raw=/a%20b/c",
        "query=x=1&y=%20",
        "body=0",
        "http=1.1",
        "scheme=http",
        "client=127.0.0.1",
        "state=hello-from-lifespan",
    ] {
        assert!(reply.body.contains(field), "{field} in {reply:?}");
    }
    assert!(workers.contains(&reply.pid()), "{reply:?}");
    assert!(reply.body.contains("host=test "), "{reply:?}");

    // HTTP/2: the scope says so, and the authority is the host.
    if have("curl", &["--version"]) {
        let out = std::process::Command::new("curl")
            .args(["-s", "--http2-prior-knowledge", "--max-time", "60"])
            .arg(format!("http://{}/h2", server.addr()))
            .output()
            .expect("curl runs");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("http=2 "), "{text}");
        assert!(text.contains(&format!("host={} ", server.addr())), "{text}");
    }

    // A request body in many parts, read whole by the app.
    let body: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    let sum = body.iter().map(|b| u64::from(*b)).sum::<u64>() % 65521;
    let mut conn = KeepAlive::open(server.addr());
    let mut raw = format!(
        "POST /created HTTP/1.1\r\nHost: t\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    raw.extend_from_slice(&body);
    assert!(conn.send(&raw));
    let reply = conn.read().expect("an answer to the upload");
    assert_eq!(reply.status, 201, "{reply:?}");
    assert!(reply.body.contains("method=POST"), "{reply:?}");
    assert!(
        reply.body.contains(&format!("body={} ", body.len())),
        "{reply:?}"
    );
    assert!(reply.body.contains(&format!("sum={sum} ")), "{reply:?}");

    // A chunked upload on the same connection.
    assert!(conn.send(b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"));
    let reply = conn.read().expect("an answer to the chunked upload");
    assert!(reply.body.contains("body=11 "), "{reply:?}");

    // A response in parts, whole however the app's sends and zdr's reads
    // interleave.
    let expected: String = (0..50).map(|i| format!("{i:05}\n")).collect();
    for _ in 0..50 {
        assert!(conn.send(b"GET /stream HTTP/1.1\r\nHost: t\r\n\r\n"));
        let reply = conn.read().expect("the streamed answer");
        assert_eq!(reply.status, 200);
        assert_eq!(reply.body, expected);
    }

    // An app that raises: a 500, and the worker goes on.
    assert!(conn.send(b"GET /raise HTTP/1.1\r\nHost: t\r\n\r\n"));
    let reply = conn.read().expect("an answer to the raising request");
    assert_eq!(reply.status, 500, "{reply:?}");
    let reply = conn.get().expect("the connection goes on");
    assert_eq!(reply.status, 200, "{reply:?}");
    server.wait_for_log(
        "ValueError: the app was asked to raise",
        Duration::from_secs(60),
    );
    assert_eq!(server.wait_generation_ready(1, 2), workers);

    // Each worker runs the app on its Python thread, beside the runtime's.
    for pid in &workers {
        assert_eq!(thread_names(*pid), ["zdr", "zdr-python"], "worker {pid}");
    }

    // A graceful stop runs each worker's lifespan shutdown, then what the
    // app registered with atexit.
    let mut server = server;
    server.signal(Signal::SIGTERM);
    assert!(server.wait_exit(Duration::from_secs(60)).success());
    for pid in workers {
        for mark in ["shutdown", "atexit"] {
            let mark = dir.path(&format!("{mark}-{pid}"));
            assert_eq!(
                std::fs::read_to_string(&mark).ok().as_deref(),
                Some("done"),
                "{}: {}",
                mark.display(),
                server.log_text()
            );
        }
    }
}

#[test]
fn new_code_is_served_after_a_reload_under_load_and_code_that_cannot_import_is_rolled_back() {
    let dir = TempDir::new("asgi-reload");
    write_app(&dir.0, "1");
    let server = serve(&dir, 2);
    server.wait_generation_ready(1, 2);
    let rt = runtime();
    let load = rt.block_on(async { load::start(server.addr(), "/", 4, 2) });
    load.wait_for_more(100);

    // New code: served by the new generation, nothing failed.
    write_app(&dir.0, "2");
    let (ok, said) = reload(&server);
    assert!(ok, "{said}\n{}", server.log_text());
    load.wait_for_generation(2, 100);
    assert!(server.get("/").body.contains("version=2"));

    // Code that cannot import: the reload fails with the traceback, and
    // generation 2 keeps serving.
    rolled_back(&server, &dir, "app.py", BROKEN_ASGI, "2");
    load.wait_for_more(100);
    let report = rt.block_on(load.stop());
    assert_eq!(report.failed, 0, "{:?}", report.failures);
    assert!(report.generations.contains(&2), "{:?}", report.generations);
    assert!(!report.generations.contains(&3), "{:?}", report.generations);
    let reply = server.get("/");
    assert!(reply.body.contains("version=2"), "{reply:?}");
    assert_eq!(reply.generation(), 2);
}

/// An app that blocks its event loop is a hung worker: past `--timeout`
/// the worker aborts, its Python stack in the log, and a new one serves.
#[test]
fn an_app_that_blocks_its_loop_past_the_timeout_is_replaced() {
    let dir = TempDir::new("asgi-hang");
    write_app(&dir.0, "1");
    let server = serve_app(&dir, &["--workers", "1", "--timeout", "2"], "app:app", None);
    let first = server.wait_generation_ready(1, 1);
    let addr = server.addr();
    let blocked = std::thread::spawn(move || try_get(addr, "/block"));
    server.wait_for_log("the app has not run for", Duration::from_secs(60));
    // The request the hung app held fails with its worker.
    assert!(blocked.join().unwrap().is_err());
    server.wait_for_log("aborting the worker", Duration::from_secs(60));
    // faulthandler's dump: where the app was stuck.
    server.wait_for_log("app.py\", line", Duration::from_secs(60));
    // A new worker serves.
    let replaced = wait_until(Duration::from_secs(60), || {
        let s = server.status();
        s.workers.len() == 1
            && s.workers
                .iter()
                .all(|w| !first.contains(&w.pid) && w.state == "ready")
    });
    assert!(replaced, "{:?}\n{}", server.status(), server.log_text());
    let second = server.wait_generation_ready(1, 1);
    let reply = server.get("/");
    assert_eq!(reply.status, 200, "{reply:?}");
    assert!(second.contains(&reply.pid()));
}

/// A virtualenv of the CPython this build embeds (`/usr/bin/python3`)
/// with FastAPI and Flask, made once under `target/` and reused; `None` (the test
/// skipped or failed, as `skip_or_fail` says) if it cannot be made.
fn fastapi_venv() -> Option<std::path::PathBuf> {
    // One test makes it; the others wait for it.
    static MAKING: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _making = MAKING.lock().unwrap_or_else(|e| e.into_inner());
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/zdr-test-venv");
    let python = venv.join("bin/python");
    let ready = |python: &Path| {
        std::process::Command::new(python)
            .args(["-c", "import fastapi, flask"])
            .status()
            .is_ok_and(|s| s.success())
    };
    if ready(&python) {
        return Some(venv);
    }
    let made = std::process::Command::new("/usr/bin/python3")
        .args(["-m", "venv"])
        .arg(&venv)
        .status()
        .is_ok_and(|s| s.success())
        && std::process::Command::new(venv.join("bin/pip"))
            .args([
                "install",
                "--quiet",
                "--disable-pip-version-check",
                "fastapi",
                "flask",
            ])
            .status()
            .is_ok_and(|s| s.success());
    if made && ready(&python) {
        return Some(venv);
    }
    skip_or_fail(
        "no virtualenv with FastAPI and Flask for /usr/bin/python3",
        "network access for pip (the test makes target/zdr-test-venv)",
    );
    None
}

/// The seed's own shape: a FastAPI app with a readiness endpoint, served
/// by 3 workers with recycling and a graceful timeout, reloaded with new
/// code under load (a keep-alive pool, new connections, python-requests'
/// `Session` and httpx over HTTP/2) with nothing failed; new code that
/// cannot import is rolled back with its traceback.
const FASTAPI: &str = r#"
import os
from contextlib import asynccontextmanager
from fastapi import FastAPI
from fastapi.responses import PlainTextResponse

VERSION = "VERSION_MARK"

@asynccontextmanager
async def lifespan(app):
    app.state.ready = True
    yield

app = FastAPI(lifespan=lifespan)

@app.get("/", response_class=PlainTextResponse)
async def root():
    return f"pid={os.getpid()} generation={os.environ['ZDR_GENERATION']} version={VERSION}\n"

@app.get("/health/detailed")
async def health():
    return {"status": "ok", "ready": app.state.ready, "version": VERSION}
"#;

/// python-requests' `Session` and httpx over HTTP/2, each on its own
/// connection pool, asking until the file `argv[2]` exists and each has
/// been answered by the new code (at most 120 s); the file `argv[3]` is
/// made once both have been answered by the old code. Prints, per client, its
/// answers, the versions of the code that gave them, and its failures
/// (httpx's also: how many came over HTTP/2).
const CLIENTS: &str = r#"
import json, os, sys, threading, time, requests, httpx
url, stop_file, ready_file = sys.argv[1], sys.argv[2], sys.argv[3]
deadline = time.time() + 120
seen = {"requests": set(), "httpx": set()}
counts = {"requests": 0, "httpx": 0, "h2": 0, "failed": 0}
def going(name):
    if "1" in seen["requests"] and "1" in seen["httpx"] and not os.path.exists(ready_file):
        open(ready_file, "w").close()
    return time.time() < deadline and not (os.path.exists(stop_file) and "2" in seen[name])
def session():
    with requests.Session() as s:
        while going("requests"):
            try:
                r = s.get(url + "/health/detailed", timeout=30)
                r.raise_for_status()
                assert r.json()["status"] == "ok"
                seen["requests"].add(r.json()["version"])
                counts["requests"] += 1
            except Exception as e:
                print("requests failed:", repr(e), file=sys.stderr)
                counts["failed"] += 1
def h2():
    with httpx.Client(http1=False, http2=True, timeout=30) as c:
        while going("httpx"):
            try:
                r = c.get(url + "/")
                r.raise_for_status()
                seen["httpx"].add(r.text.split("version=")[1].strip())
                counts["httpx"] += 1
                counts["h2"] += r.http_version == "HTTP/2"
            except Exception as e:
                print("httpx failed:", repr(e), file=sys.stderr)
                counts["failed"] += 1
threads = [threading.Thread(target=session), threading.Thread(target=h2)]
for t in threads: t.start()
for t in threads: t.join()
print(json.dumps({"counts": counts, "seen": {k: sorted(v) for k, v in seen.items()}}))
"#;

#[test]
fn a_fastapi_app_reloads_new_code_under_real_clients_with_nothing_failed() {
    let Some(venv) = fastapi_venv() else {
        return;
    };
    if !have_python(&["requests", "httpx", "h2"]) {
        return;
    }
    let dir = TempDir::new("fastapi");
    let write = |version: &str| {
        write_file(
            &dir.path("main.py"),
            &FASTAPI.replace("VERSION_MARK", version),
        )
    };
    write("1");
    let server = serve_app(
        &dir,
        &[
            "--workers",
            "3",
            "--preload",
            "--max-requests",
            "1000",
            "--max-requests-jitter",
            "50",
            "--graceful-timeout",
            "30",
        ],
        "main:app",
        Some(&venv),
    );
    server.wait_generation_ready(1, 3);
    let health = server.get("/health/detailed");
    assert_eq!(health.status, 200, "{health:?}");
    assert!(health.body.contains(r#""ready":true"#), "{health:?}");

    let rt = runtime();
    let load = rt.block_on(async { load::start(server.addr(), "/", 4, 2) });
    let (stop, ready) = (dir.path("stop-clients"), dir.path("clients-ready"));
    let clients = std::process::Command::new("python3")
        .args(["-c", CLIENTS, &format!("http://{}", server.addr())])
        .arg(&stop)
        .arg(&ready)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("python3 runs");
    load.wait_for_more(200);
    // Every client is answered by the old code before the reload.
    assert!(
        wait_until(Duration::from_secs(120), || ready.exists()),
        "the clients never got going"
    );
    write("2");
    let (ok, said) = reload(&server);
    assert!(ok, "{said}\n{}", server.log_text());
    load.wait_for_generation(2, 200);
    assert!(server.get("/").body.contains("version=2"));
    write_file(&stop, "");
    let said = clients.wait_with_output().expect("the clients end");
    let report: serde_json::Value = serde_json::from_slice(&said.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&said.stderr)));
    let why = format!("{report}\n{}", String::from_utf8_lossy(&said.stderr));
    assert_eq!(report["counts"]["failed"], 0, "{why}");
    // Each client was answered by the old code and by the new.
    for client in ["requests", "httpx"] {
        assert_eq!(
            report["seen"][client],
            serde_json::json!(["1", "2"]),
            "{why}"
        );
    }
    assert_eq!(
        report["counts"]["h2"], report["counts"]["httpx"],
        "every httpx answer over HTTP/2: {why}"
    );

    // New code that cannot import: rolled back, its traceback said.
    rolled_back(
        &server,
        &dir,
        "main.py",
        "from fastapi import FastAPI\napp = FastAPI(\n",
        "2",
    );
    load.wait_for_more(100);
    let report = rt.block_on(load.stop());
    assert_eq!(report.failed, 0, "{:?}", report.failures);
    assert!(!report.generations.contains(&3), "{:?}", report.generations);
    assert!(server.get("/").body.contains("version=2"));
}

/// A WSGI app in plain Python, in the same `pid=… generation=…` form.
const WSGI: &str = r#"
import os

VERSION = "VERSION_MARK"

def app(environ, start_response):
    body = environ["wsgi.input"].read()
    path = environ["PATH_INFO"]
    if path == "/raise":
        raise ValueError("the WSGI app was asked to raise")
    if path == "/stream":
        start_response("200 OK", [("Content-Type", "text/plain")])
        return (b"%05d\n" % i for i in range(50))
    text = (
        f"pid={os.getpid()} generation={os.environ['ZDR_GENERATION']} version={VERSION}"
        f" method={environ['REQUEST_METHOD']} path={path} query={environ['QUERY_STRING']}"
        f" body={len(body)} type={environ.get('CONTENT_TYPE')} host={environ.get('HTTP_HOST')}\n"
    ).encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(text)))])
    return [text]
"#;

#[test]
fn a_wsgi_app_is_served_in_threads_and_reloads_under_load() {
    let dir = TempDir::new("wsgi");
    write_file(&dir.path("app.py"), &WSGI.replace("VERSION_MARK", "1"));
    let server = serve_app(&dir, &["--workers", "2", "--threads", "4"], "app:app", None);
    server.wait_generation_ready(1, 2);
    let reply = server.get("/a/b?x=1");
    for field in [
        "version=1",
        "method=GET",
        "path=/a/b",
        "query=x=1",
        "body=0",
        "host=test",
    ] {
        assert!(reply.body.contains(field), "{field} in {reply:?}");
    }
    let mut conn = KeepAlive::open(server.addr());
    let body = vec![b'x'; 1_000_000];
    let mut raw = format!(
        "POST /up HTTP/1.1\r\nHost: t\r\nContent-Type: text/x\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    raw.extend_from_slice(&body);
    assert!(conn.send(&raw));
    let reply = conn.read().expect("an answer to the upload");
    assert!(reply.body.contains("body=1000000 "), "{reply:?}");
    assert!(reply.body.contains("type=text/x "), "{reply:?}");
    let expected: String = (0..50).map(|i| format!("{i:05}\n")).collect();
    for _ in 0..20 {
        assert!(conn.send(b"GET /stream HTTP/1.1\r\nHost: t\r\n\r\n"));
        let reply = conn.read().expect("the streamed answer");
        assert_eq!(reply.body, expected);
    }
    assert!(conn.send(b"GET /raise HTTP/1.1\r\nHost: t\r\n\r\n"));
    assert_eq!(conn.read().expect("an answer").status, 500);
    server.wait_for_log(
        "ValueError: the WSGI app was asked to raise",
        Duration::from_secs(60),
    );

    new_code_under_load(&server, || {
        write_file(&dir.path("app.py"), &WSGI.replace("VERSION_MARK", "2"))
    });
    assert!(server.get("/").body.contains("version=2"));
}

/// A Flask app the same way, preloaded: JSON both ways, a reload of new
/// code under load with nothing failed, and code that cannot import
/// rolled back with its traceback.
#[test]
fn a_flask_app_reloads_new_code_under_load_with_nothing_failed() {
    let Some(venv) = fastapi_venv() else {
        return;
    };
    let dir = TempDir::new("flask");
    let app = r#"
import os
from flask import Flask, request, jsonify

VERSION = "VERSION_MARK"
app = Flask(__name__)

@app.get("/")
def root():
    return f"pid={os.getpid()} generation={os.environ['ZDR_GENERATION']} version={VERSION}\n"

@app.post("/echo")
def echo():
    return jsonify(got=request.get_json(), version=VERSION)
"#;
    write_file(&dir.path("main.py"), &app.replace("VERSION_MARK", "1"));
    let server = serve_app(
        &dir,
        &["--workers", "2", "--threads", "4", "--preload"],
        "main:app",
        Some(&venv),
    );
    server.wait_generation_ready(1, 2);
    let mut conn = KeepAlive::open(server.addr());
    let json = r#"{"a": [1, 2, 3]}"#;
    assert!(conn.send(
        format!(
            "POST /echo HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{json}",
            json.len()
        )
        .as_bytes()
    ));
    let reply = conn.read().expect("the echo");
    assert_eq!(reply.status, 200, "{reply:?}");
    assert!(reply.body.contains(r#""got":{"a":[1,2,3]}"#), "{reply:?}");

    new_code_under_load(&server, || {
        write_file(&dir.path("main.py"), &app.replace("VERSION_MARK", "2"))
    });
    assert!(server.get("/").body.contains("version=2"));

    // New code that cannot import: rolled back, its traceback said, and
    // generation 2 serves on.
    let reply = rolled_back(
        &server,
        &dir,
        "main.py",
        "from flask import Flask\napp = Flask(__name__\n",
        "2",
    );
    assert_eq!(reply.generation(), 2);
}

/// zdr's front holds for a Python app as for any: a body over
/// `--limit-request-body` is refused 413 (declared: before the app is
/// called; chunked past it: whatever the app answers, the app hearing
/// `http.disconnect`), two `Host` fields get 400 and a header field over
/// the limit 431, before the app; and the app serves on.
#[test]
fn the_front_refuses_what_the_limits_refuse_before_a_python_app() {
    let dir = TempDir::new("asgi-limits");
    write_app(&dir.0, "1");
    let server = serve_app(
        &dir,
        &[
            "--workers",
            "1",
            "--limit-request-body",
            "1000",
            "--limit-request-field_size",
            "200",
        ],
        "app:app",
        None,
    );
    let ask = |raw: &[u8]| {
        let mut conn = KeepAlive::open(server.addr());
        assert!(conn.send(raw));
        let reply = conn.read().expect("an answer");
        (reply, conn.read())
    };
    let (reply, next) = ask(b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 5000\r\n\r\n");
    assert_eq!(reply.status, 413, "{reply:?}");
    assert!(next.is_none(), "the connection closes");
    let mut chunked = b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    for _ in 0..3 {
        chunked.extend_from_slice(b"200\r\n");
        chunked.extend_from_slice(&[b'x'; 0x200]);
        chunked.extend_from_slice(b"\r\n");
    }
    chunked.extend_from_slice(b"0\r\n\r\n");
    let (reply, _) = ask(&chunked);
    assert_eq!(reply.status, 413, "{reply:?}");
    let (reply, _) = ask(b"GET / HTTP/1.1\r\nHost: t\r\nHost: u\r\n\r\n");
    assert_eq!(reply.status, 400, "{reply:?}");
    let long = format!(
        "GET / HTTP/1.1\r\nHost: t\r\nX-Long: {}\r\n\r\n",
        "a".repeat(300)
    );
    let (reply, _) = ask(long.as_bytes());
    assert_eq!(reply.status, 431, "{reply:?}");
    // Within the limits, the app answers.
    let reply = server.get("/");
    assert_eq!(reply.status, 200, "{reply:?}");
    assert!(reply.body.contains("version=1"), "{reply:?}");
}

#[test]
fn a_failed_lifespan_startup_fails_the_boot_with_its_message() {
    let dir = TempDir::new("asgi-startup");
    write_app(&dir.0, "1");
    write_file(&dir.path("fail-startup"), "");
    let chdir = dir.0.to_string_lossy().into_owned();
    let out = Launch::serve(&["--workers", "1", "--chdir", &chdir, "app:app"]).output();
    let said = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "{said}");
    assert!(
        said.contains("lifespan startup failed: no database"),
        "{said}"
    );
}

#[test]
fn a_bad_app_name_starts_nothing() {
    for (app, says) in [
        ("app", "is not MODULE:APP"),
        ("app:", "is not MODULE:APP"),
        ("my-app:app", "is not MODULE:APP"),
    ] {
        let out = Launch::serve(&["--workers", "1", app]).output();
        let said = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(!out.status.success(), "{app}: {said}");
        assert!(said.contains(says), "{app}: {said}");
    }
}

/// `--preload` with an app that cannot import: the master starts nothing
/// and says why, with the traceback.
#[test]
fn a_preloaded_app_that_cannot_import_starts_nothing() {
    let dir = TempDir::new("preload-broken");
    write_file(&dir.path("app.py"), "import no_such_module\n");
    let chdir = dir.0.to_string_lossy().into_owned();
    let out =
        Launch::serve(&["--workers", "2", "--chdir", &chdir, "--preload", "app:app"]).output();
    let said = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "{said}");
    assert!(said.contains("No module named 'no_such_module'"), "{said}");
    assert!(said.contains("app.py"), "{said}");
    assert!(!said.contains("Booting worker"), "{said}");
}

/// The process named `zdr-loader` among `master`'s children.
fn loaders(master: u32) -> Vec<u32> {
    children_of(master)
        .into_iter()
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|c| c.trim() == "zdr-loader")
        })
        .collect()
}

/// The `key=` field of an answer's body.
fn field(reply: &Reply, key: &str) -> String {
    reply
        .field(key)
        .unwrap_or_else(|| panic!("no {key}= in {reply:?}"))
}

/// `--preload`: a generation's loader imports the app once and forks its
/// workers, which the master adopts; a worker that dies is forked again
/// from the same import; a reload imports new code in a new loader under
/// load with nothing failed, and the old loader leaves with its
/// generation; code that cannot import is rolled back with its traceback;
/// lifespan startup and shutdown run in each worker.
#[test]
fn a_preloaded_app_is_imported_once_per_generation_and_reloads_new_code() {
    let dir = TempDir::new("preload");
    write_app(&dir.0, "1");
    let server = serve_app(&dir, &["--workers", "3", "--preload"], "app:app", None);
    let workers = server.wait_generation_ready(1, 3);
    let master = server.pid;
    let [loader] = loaders(master)[..] else {
        panic!("one loader: {:?}", loaders(master));
    };
    assert!(!workers.contains(&loader));
    // The workers are the master's children, not the loader's.
    let children = children_of(master);
    assert!(
        workers.iter().all(|w| children.contains(w)),
        "{workers:?} {children:?}"
    );
    assert!(children_of(loader).is_empty());
    let mut seen = std::collections::BTreeSet::new();
    assert!(wait_until(Duration::from_secs(60), || {
        let reply = server.get("/");
        assert_eq!(field(&reply, "loaded"), loader.to_string(), "{reply:?}");
        assert_eq!(field(&reply, "state"), "hello-from-lifespan", "{reply:?}");
        seen.insert(reply.pid());
        seen.len() == 3
    }));

    // A worker that dies is forked again from the same import.
    let victim = *workers.iter().next().expect("a worker");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(victim as i32), Signal::SIGKILL)
        .expect("kill");
    let mut replaced = std::collections::BTreeSet::new();
    assert!(
        wait_until(Duration::from_secs(60), || {
            let status = server.status();
            replaced = status.workers.iter().map(|w| w.pid).collect();
            status.workers.len() == 3
                && status.workers.iter().all(|w| w.state == "ready")
                && !replaced.contains(&victim)
        }),
        "a worker in the place of {victim}: {replaced:?}"
    );
    let fresh = *replaced.difference(&workers).next().expect("a new worker");
    assert!(wait_until(Duration::from_secs(60), || {
        let reply = server.get("/");
        assert_eq!(field(&reply, "loaded"), loader.to_string(), "{reply:?}");
        reply.pid() == fresh
    }));

    // New code: a new loader imports it, under load, nothing failed.
    new_code_under_load(&server, || write_app(&dir.0, "2"));
    let reply = server.get("/");
    assert!(reply.body.contains("version=2"), "{reply:?}");
    let second: u32 = field(&reply, "loaded").parse().expect("a pid");
    assert_ne!(second, loader);
    assert!(
        wait_until(Duration::from_secs(60), || loaders(master) == [second]),
        "the old loader leaves with its generation: {:?}",
        loaders(master)
    );

    // Code that cannot import: the reload fails with its traceback, and
    // generation 2 serves on from the same loader.
    let reply = rolled_back(&server, &dir, "app.py", BROKEN_ASGI, "2");
    assert_eq!(field(&reply, "loaded"), second.to_string());
    // The failed loader leaves once it has said why.
    assert!(
        wait_until(Duration::from_secs(60), || loaders(master) == [second]),
        "{:?}",
        loaders(master)
    );

    // A loader that is gone (the OOM killer's choice, say) is started
    // again when its generation next needs a worker: it imports what is
    // on disk then, as a worker that is not preloaded does.
    write_app(&dir.0, "2");
    let kill = |pid: u32| {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), Signal::SIGKILL)
            .expect("kill")
    };
    kill(second);
    assert!(wait_until(Duration::from_secs(30), || !alive(second)));
    let before = server.wait_generation_ready(2, 3);
    let victim = *before.iter().next().expect("a worker");
    kill(victim);
    server.wait_for_log("is gone", Duration::from_secs(60));
    let mut third = 0;
    assert!(
        wait_until(Duration::from_secs(60), || {
            third = loaders(master).first().copied().unwrap_or(0);
            let status = server.status();
            third != 0
                && status.workers.len() == 3
                && status
                    .workers
                    .iter()
                    .all(|w| w.state == "ready" && w.pid != victim)
        }),
        "{}",
        server.log_text()
    );
    assert_ne!(third, second);
    assert!(wait_until(Duration::from_secs(60), || {
        let reply = server.get("/");
        reply.field("loaded") == Some(third.to_string())
    }));

    // A graceful stop: each worker runs its lifespan shutdown, and the
    // loader leaves with the master.
    let last = server.wait_generation_ready(2, 3);
    let mut server = server;
    server.signal(Signal::SIGTERM);
    assert!(server.wait_exit(Duration::from_secs(60)).success());
    for pid in last {
        assert!(dir.path(&format!("shutdown-{pid}")).exists(), "{pid}");
        // What the app registered with atexit at import, in the loader,
        // ran in each worker.
        assert!(dir.path(&format!("atexit-{pid}")).exists(), "{pid}");
    }
    // The loader leaves with its master.
    assert!(wait_until(Duration::from_secs(30), || !alive(third)));
}

/// `--interface asgi`: an ASGI app behind a decorator that hides its
/// coroutine is taken for WSGI by `auto` (its requests fail, 500) and
/// served when named; a kind that is neither is refused, naming the flag.
#[test]
fn the_interface_flag_names_an_app_auto_takes_for_the_other_kind() {
    let dir = TempDir::new("interface");
    write_file(
        &dir.path("app.py"),
        r#"
async def _app(scope, receive, send):
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"hidden asgi"})

def hide(f):
    def app(scope, receive, send):
        return f(scope, receive, send)
    return app

app = hide(_app)
"#,
    );
    let auto = serve_app(&dir, &["--workers", "1"], "app:app", None);
    assert_eq!(auto.get("/").status, 500);
    drop(auto);
    let named = serve_app(
        &dir,
        &["--workers", "1", "--interface", "asgi"],
        "app:app",
        None,
    );
    let reply = named.get("/");
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(reply.body, "hidden asgi");
    drop(named);
    let chdir = dir.0.to_string_lossy().into_owned();
    let out = Launch::serve(&["--chdir", &chdir, "--interface", "rsgi", "app:app"]).output();
    let said = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "{said}");
    assert!(said.contains("--interface"), "{said}");
}

/// A real browser against Python apps in-process: headless Chromium over
/// HTTPS and HTTP/2, logging in as sites do (`/set` sets three cookies
/// and redirects to `/get`, which reads them back), against a FastAPI app
/// (ASGI) and a Flask one (WSGI), both preloaded. Chromium sends each
/// cookie as a field of its own; each app gets all three, in one field,
/// and is told `https` and HTTP/2.
#[test]
fn a_browser_over_http2_logs_in_to_fastapi_and_flask_apps() {
    if !have("chromium", &["--version"]) {
        return;
    }
    let Some(venv) = fastapi_venv() else {
        return;
    };
    let dir = TempDir::new("py-browser");
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let (cert, key) = (dir.path("cert.pem"), dir.path("key.pem"));
    write_file(&cert, &certified.cert.pem());
    write_file(&key, &certified.signing_key.serialize_pem());
    write_file(
        &dir.path("asgi_cookies.py"),
        r#"
from fastapi import FastAPI, Request
from fastapi.responses import RedirectResponse

app = FastAPI()

@app.get("/set")
def set_cookies():
    response = RedirectResponse("/get", status_code=302)
    for name, value in (("a", "1"), ("b", "2"), ("c", "3")):
        response.set_cookie(name, value, secure=True)
    return response

@app.get("/get")
def get_cookies(request: Request):
    return {"cookies": dict(request.cookies), "fields": len(request.headers.getlist("cookie")),
            "scheme": request.url.scheme, "http": request.scope["http_version"]}
"#,
    );
    // The Flask app the proxy's browser test serves behind gunicorn.
    let flask = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/interop/cookie_app.py"),
    )
    .expect("the cookie app");
    write_file(&dir.path("wsgi_cookies.py"), &flask);
    for (app, http) in [("asgi_cookies:app", "2"), ("wsgi_cookies:app", "HTTP/2")] {
        let server = serve_app(
            &dir,
            &[
                "--workers",
                "2",
                "--preload",
                "--certfile",
                cert.to_str().unwrap(),
                "--keyfile",
                key.to_str().unwrap(),
            ],
            app,
            Some(&venv),
        );
        let profile = dir.path(&format!("profile-{}", app.replace(':', "-")));
        let url = format!("https://localhost:{}/set", server.port());
        let seen = browser_json(&url, &profile, &format!("{app}:\n{}", server.log_text()));
        assert_eq!(
            seen["cookies"],
            serde_json::json!({"a": "1", "b": "2", "c": "3"}),
            "{app}: {seen}"
        );
        assert_eq!(seen["fields"], 1, "{app}: {seen}");
        assert_eq!(seen["scheme"], "https", "{app}: {seen}");
        assert_eq!(seen["http"], http, "{app}: {seen}");
    }
}

/// `import zdr`: the app knows its worker (`zdr.worker`, also the ASGI
/// scope's `extensions["zdr"]["worker"]`) and hears when it drains: a
/// stream of events held open across a reload ends politely (its last
/// event, then the end of the answer), rather than being cut at the
/// graceful timeout; with `--preload` as without. The scope also says how
/// long the connection has left under `--max-connection-age`.
#[test]
fn an_app_hears_its_worker_drain_and_ends_its_stream() {
    use std::io::{Read, Write};
    let dir = TempDir::new("draining");
    write_file(
        &dir.path("app.py"),
        r#"
import zdr

async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    worker = scope["extensions"]["zdr"]["worker"]
    assert worker is zdr.worker
    if scope["path"] == "/events":
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream")]})
        await send({"type": "http.response.body", "more_body": True,
                    "body": f"data: hello from generation {worker.generation}\n\n".encode()})
        await worker.wait_draining()
        await send({"type": "http.response.body",
                    "body": f"data: bye, draining={worker.draining()}\n\n".encode()})
        return
    left = scope["extensions"]["zdr"]["connection_expires_in"]
    age = "none" if left is None else ("ok" if 0 < left <= 3600 else f"bad:{left}")
    text = f"pid={worker.pid} generation={worker.generation} draining={worker.draining()} age={age}\n"
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": text.encode()})
"#,
    );
    for preload in [false, true] {
        let mut args = vec!["--workers", "1", "--graceful-timeout", "300"];
        if preload {
            args.extend(["--preload", "--max-connection-age", "3600"]);
        }
        let server = serve_app(&dir, &args, "app:app", None);
        let reply = server.get("/");
        assert!(
            reply.body.contains("generation=1 draining=False"),
            "{reply:?}"
        );
        // The connection's age limit, when there is one.
        let age = if preload { "ok" } else { "none" };
        assert_eq!(field(&reply, "age"), age, "{reply:?}");
        let mut events = std::net::TcpStream::connect(server.addr()).expect("connect");
        events
            .set_read_timeout(Some(Duration::from_secs(120)))
            .expect("timeout");
        events
            .write_all(b"GET /events HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
            .expect("send");
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        while !String::from_utf8_lossy(&got).contains("hello from generation 1") {
            let n = events.read(&mut buf).expect("the first event");
            assert!(n > 0, "{}", String::from_utf8_lossy(&got));
            got.extend_from_slice(&buf[..n]);
        }
        let (ok, said) = reload(&server);
        assert!(ok, "{said}");
        // The rest of the answer: the last event, then its end.
        loop {
            let n = events.read(&mut buf).expect("the rest of the stream");
            if n == 0 {
                break;
            }
            got.extend_from_slice(&buf[..n]);
        }
        let text = String::from_utf8_lossy(&got);
        assert!(text.contains("data: bye, draining=True"), "{text}");
        assert!(
            text.ends_with("0\r\n\r\n"),
            "the answer ended whole: {text}"
        );
        let reply = server.get("/");
        assert!(
            reply.body.contains("generation=2 draining=False"),
            "{reply:?}"
        );
    }
}

/// Sends raw bytes and reads the answer until the server closes; its
/// status, if any.
fn raw_status(addr: std::net::SocketAddr, bytes: &[u8]) -> Option<u16> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(60)))
        .expect("timeout");
    let _ = s.write_all(bytes);
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    String::from_utf8_lossy(&raw)
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
}

/// The hardening in front of a Python app, as in front of any app:
/// malformed heads get 400 and never reach the app; a request past
/// `--request-timeout` is answered 504, the app hears its client has
/// gone, and the worker serves on; under overload (a WSGI app whose one
/// thread each of six requests at once holds for a second), requests
/// queued past `--max-queue-time` are shed 503 with `Retry-After`, at
/// least one is served, and the worker serves on.
#[test]
fn the_hardening_holds_in_front_of_python_apps() {
    let dir = TempDir::new("py-hardening");
    write_file(
        &dir.path("asgi_app.py"),
        r#"
import os

CALLS = 0

async def app(scope, receive, send):
    global CALLS
    if scope["type"] != "http":
        return
    CALLS += 1
    message = await receive()
    if scope["path"] == "/hang":
        # Waits for the client to leave (zdr's 504 ends the call).
        while message["type"] != "http.disconnect":
            message = await receive()
        with open("heard-disconnect", "w") as f:
            f.write("yes")
        return
    body = f"pid={os.getpid()} calls={CALLS}\n".encode()
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": body})
"#,
    );
    write_file(
        &dir.path("wsgi_app.py"),
        r#"
import os, time

def app(environ, start_response):
    if environ["PATH_INFO"] == "/block":
        time.sleep(1)
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [f"pid={os.getpid()}\n".encode()]
"#,
    );
    let server = serve_app(
        &dir,
        &["--workers", "1", "--request-timeout", "3"],
        "asgi_app:app",
        None,
    );
    let first = server.get("/");
    assert_eq!(field(&first, "calls"), "1", "{first:?}");
    for (what, bytes) in [
        ("no Host in HTTP/1.1", &b"GET / HTTP/1.1\r\n\r\n"[..]),
        (
            "two Host fields",
            b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
        ),
        ("an invalid Host", b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n"),
        (
            "not HTTP",
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n",
        ),
    ] {
        assert_eq!(raw_status(server.addr(), bytes), Some(400), "{what}");
    }
    // None of them reached the app.
    let reply = server.get("/");
    assert_eq!(field(&reply, "calls"), "2", "{reply:?}");
    let hung = server.get("/hang");
    assert_eq!(hung.status, 504, "{hung:?}");
    wait_for_file_text(&dir.path("heard-disconnect"), "yes");
    let after = server.get("/");
    assert_eq!(after.status, 200, "{after:?}");
    assert_eq!(after.pid(), first.pid(), "the worker serves on");
    drop(server);

    let server = serve_app(
        &dir,
        &[
            "--workers",
            "1",
            "--threads",
            "1",
            "--max-queue-time",
            "0.01",
        ],
        "wsgi_app:app",
        None,
    );
    let first = server.get("/");
    // The app's recent response time, from fast requests.
    for _ in 0..16 {
        assert_eq!(server.get("/").status, 200);
    }
    let addr = server.addr();
    let answers: Vec<Reply> = (0..6)
        .map(|_| std::thread::spawn(move || get(addr, "/block")))
        .collect::<Vec<_>>()
        .into_iter()
        .map(|c| c.join().expect("a client"))
        .collect();
    let served = answers.iter().filter(|r| r.status == 200).count();
    let shed: Vec<&Reply> = answers.iter().filter(|r| r.status == 503).collect();
    assert_eq!(served + shed.len(), 6, "{answers:?}");
    assert!(served >= 1, "{answers:?}");
    assert!(!shed.is_empty(), "{answers:?}");
    for r in &shed {
        assert_eq!(r.header("retry-after"), Some("1"), "{r:?}");
    }
    let after = server.get("/");
    assert_eq!(after.status, 200, "{after:?}");
    assert_eq!(after.pid(), first.pid(), "the worker serves on");
}

/// `zdr check --load-app` imports a Python app as a worker would: code
/// that cannot import fails the check with its traceback (before a
/// deploy, not at the reload); code that imports passes.
#[test]
fn check_load_app_imports_a_python_app() {
    let dir = TempDir::new("check-app");
    let chdir = dir.0.to_string_lossy().into_owned();
    write_file(&dir.path("app.py"), BROKEN_ASGI);
    let out = Launch::raw(&["check", "--load-app", "--chdir", &chdir, "app:app"]).output();
    let said = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "{said}");
    assert!(said.contains("SyntaxError"), "{said}");
    assert!(said.contains("app.py"), "{said}");
    write_app(&dir.0, "1");
    let out = Launch::raw(&["check", "--load-app", "--chdir", &chdir, "app:app"]).output();
    let said = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{said}");
    assert!(said.contains("configuration OK"), "{said}");
}

/// A load balancer's pool in front of a preloaded Python app: 2,000 idle
/// keep-alive connections, opened before a reload of new code (with
/// keep-alive and new-connection load beside them). Not one is closed
/// without an answer: each connection's next request is answered by the
/// new generation.
#[test]
fn a_pool_of_idle_connections_outlives_reloads_of_a_preloaded_app() {
    use common::idle::Pool;
    const N: usize = 2000;
    {
        use nix::sys::resource::{getrlimit, setrlimit, Resource};
        let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).expect("getrlimit");
        let want = (2 * N as u64 + 1024).min(hard);
        if soft < want {
            setrlimit(Resource::RLIMIT_NOFILE, want, hard).expect("setrlimit");
        }
    }
    let dir = TempDir::new("py-pool");
    write_app(&dir.0, "1");
    let connections = (N + 100).to_string();
    let server = serve_app(
        &dir,
        &[
            "--workers",
            "3",
            "--preload",
            "--keep-alive",
            "300",
            "--worker-connections",
            &connections,
        ],
        "app:app",
        None,
    );
    let old = server.wait_generation_ready(1, 3);
    let rt = runtime();
    let mut pool = rt.block_on(Pool::open(server.addr(), N));
    let load = rt.block_on(async { load::start(server.addr(), "/", 4, 2) });
    load.wait_for_more(50);
    write_app(&dir.0, "2");
    let (ok, said) = reload(&server);
    assert!(ok, "{said}");
    server.wait_generation_ready(2, 3);
    assert!(
        wait_until(Duration::from_secs(120), || old.iter().all(|p| !alive(*p))),
        "the old workers linger"
    );
    let round = rt.block_on(pool.round());
    round.assert_all_answered("reload", N);
    assert_eq!(
        round.by_generation.keys().copied().collect::<Vec<_>>(),
        vec![2],
        "{round:?}"
    );
    let report = rt.block_on(load.stop());
    assert_eq!(report.failed, 0, "the load beside: {:?}", report.failures);
    assert!(report.generations.contains(&2), "{:?}", report.generations);
}
