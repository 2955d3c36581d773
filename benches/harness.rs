//! zdr's benchmark harness: zdr side by side with a bare hyper server,
//! Gunicorn and nginx, in one run on one machine. See `benches/README.md`.
//!
//! ```sh
//! cargo bench --bench harness                 # full run, about 5 minutes on 2 cores
//! cargo bench --bench harness -- --quick      # about 1.5 minutes
//! cargo bench --bench harness -- --only steady,reload --json out.json
//! ```
//!
//! The binary also plays two servers for the runs, by re-executing itself:
//! `--as-bare ADDR THREADS` is the bare hyper baseline (one process, the
//! same handler as zdr's demo app; `--as-bare ADDR THREADS hello` answers a
//! static `hello`), with `ZDR_BENCH_TABLE_APP` set it is a zdr app whose
//! load step builds a table of `TABLE_MB` megabytes, and with
//! `ZDR_BENCH_HELLO_APP` set a zdr app whose `tower::service_fn` answers the
//! same static `hello` as the bare one: the fair pair for instructions.

#[path = "../tests/common/load.rs"]
#[allow(dead_code)]
mod load;

#[path = "harness/precise.rs"]
mod precise;

#[path = "harness/overload.rs"]
mod overload;

/// The demo app, whose answer the bare hyper server gives too.
#[path = "../src/demo.rs"]
#[allow(dead_code)]
mod demo;

use std::collections::BTreeMap;
use std::io::Write as _;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    // The table app's master and its exec'd workers (which inherit the
    // environment, not the arguments) are this binary too.
    if std::env::var_os(TABLE_APP_ENV).is_some() {
        let code = table_app().run();
        std::process::exit(if code == std::process::ExitCode::SUCCESS {
            0
        } else {
            1
        });
    }
    if std::env::var_os(HELLO_APP_ENV).is_some() {
        let code = hello_app().run();
        std::process::exit(if code == std::process::ExitCode::SUCCESS {
            0
        } else {
            1
        });
    }
    if args.get(1).map(String::as_str) == Some("--as-bare") {
        let hello = args.get(4).map(String::as_str) == Some("hello");
        return bare::serve(&args[2], args[3].parse().unwrap_or(1), hello);
    }
    let opts = Opts::parse(&args[1..]);
    let mut bench = Bench::new(opts);
    bench.run();
}

// ---------------------------------------------------------------- options

struct Opts {
    quick: bool,
    only: Option<Vec<String>>,
    json: PathBuf,
    /// Also keep the run under `benches/results/`.
    save: bool,
    /// Rewrite the figures between the markers of this Markdown file.
    readme: Option<PathBuf>,
}

impl Opts {
    fn parse(args: &[String]) -> Opts {
        let mut opts = Opts {
            quick: false,
            only: None,
            json: PathBuf::from("target/zdr-bench.json"),
            save: false,
            readme: None,
        };
        let mut it = args.iter();
        while let Some(a) = it.next() {
            match a.as_str() {
                "--quick" => opts.quick = true,
                "--only" => {
                    opts.only = it.next().map(|s| s.split(',').map(str::to_owned).collect())
                }
                "--json" => opts.json = it.next().map(PathBuf::from).unwrap_or(opts.json),
                "--save" => opts.save = true,
                "--readme" => opts.readme = it.next().map(PathBuf::from),
                "--bench" => {}
                other => eprintln!("ignoring unknown argument {other:?}"),
            }
        }
        opts
    }

    fn wants(&self, scenario: &str) -> bool {
        self.only
            .as_ref()
            .is_none_or(|o| o.iter().any(|s| s == scenario))
    }

    fn duration(&self) -> Duration {
        if self.quick {
            Duration::from_secs(3)
        } else {
            Duration::from_secs(10)
        }
    }
}

// ---------------------------------------------------------------- systems

/// Worker processes for every system; the bare server gets the same total
/// number of threads in one process.
const WORKERS: usize = 2;
const KEEPALIVE_CLIENTS: usize = 32;
const FRESH_CLIENTS: usize = 8;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Zdr {
        preload: bool,
    },
    /// A zdr app whose load step builds a table of `TABLE_MB` megabytes.
    ZdrTable {
        preload: bool,
    },
    Bare,
    Gunicorn {
        gthread: bool,
    },
    /// `zdr serve -- gunicorn`: each zdr worker runs a one-process gunicorn
    /// gthread and forwards to it.
    ZdrCommand,
    /// `zdr serve -- uvicorn`, forwarded to (proxy mode) or handed the
    /// listening socket (`--pass-socket`).
    ZdrUvicorn {
        socket: bool,
    },
    Nginx,
    /// uvicorn's own `--workers`.
    Uvicorn,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Zdr { preload: false } => "zdr",
            Kind::Zdr { preload: true } => "zdr --preload",
            Kind::ZdrTable { preload: false } => "zdr table app",
            Kind::ZdrTable { preload: true } => "zdr table app, --preload",
            Kind::Bare => "bare hyper",
            Kind::Gunicorn { gthread: false } => "gunicorn sync",
            Kind::Gunicorn { gthread: true } => "gunicorn gthread",
            Kind::ZdrCommand => "zdr -- gunicorn gthread",
            Kind::ZdrUvicorn { socket: false } => "zdr -- uvicorn",
            Kind::ZdrUvicorn { socket: true } => "zdr --pass-socket -- uvicorn",
            Kind::Nginx => "nginx",
            Kind::Uvicorn => "uvicorn",
        }
    }

    fn installed(self) -> Result<(), String> {
        match self {
            Kind::ZdrUvicorn { .. } | Kind::Uvicorn => which("uvicorn")
                .map(|_| ())
                .ok_or_else(|| "uvicorn not installed".into()),
            Kind::Gunicorn { .. } | Kind::ZdrCommand => which("gunicorn")
                .map(|_| ())
                .ok_or_else(|| "gunicorn not installed".into()),
            Kind::Nginx => which("nginx")
                .map(|_| ())
                .ok_or_else(|| "nginx not installed".into()),
            _ => Ok(()),
        }
    }

    fn can_reload(self) -> bool {
        self != Kind::Bare
    }
}

fn which(cmd: &str) -> Option<PathBuf> {
    let candidates = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>());
    candidates
        .chain([PathBuf::from("/usr/sbin")])
        .map(|d| d.join(cmd))
        .find(|p| p.is_file())
}

fn free_addr() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").expect("a free port");
    l.local_addr().expect("local address")
}

/// A system under test, running.
struct Running {
    kind: Kind,
    child: Child,
    addr: SocketAddr,
    dir: PathBuf,
}

impl Running {
    fn start(
        kind: Kind,
        dir: &Path,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Result<Running, String> {
        kind.installed()?;
        std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
        let addr = free_addr();
        let bind = addr.to_string();
        let workers = WORKERS.to_string();
        let mut cmd = match kind {
            Kind::Zdr { preload } | Kind::ZdrTable { preload } => {
                let mut c = match kind {
                    Kind::ZdrTable { .. } => {
                        let mut c =
                            Command::new(std::env::current_exe().map_err(|e| e.to_string())?);
                        c.env(TABLE_APP_ENV, "1");
                        c
                    }
                    _ => Command::new(env!("CARGO_BIN_EXE_zdr")),
                };
                let control = dir.join("control.sock");
                c.args([
                    "serve",
                    "--bind",
                    &bind,
                    "--workers",
                    &workers,
                    "--log-level",
                    "warning",
                ])
                .args(["--boot-timeout", "120", "--control-socket"])
                .arg(&control);
                if preload {
                    c.arg("--preload");
                }
                c
            }
            Kind::Bare => {
                let mut c = Command::new(std::env::current_exe().map_err(|e| e.to_string())?);
                c.args(["--as-bare", &bind, &workers]);
                c
            }
            Kind::ZdrCommand => {
                std::fs::write(dir.join("wsgi_app.py"), GUNICORN_APP).map_err(|e| e.to_string())?;
                let gunicorn = which("gunicorn").ok_or("gunicorn not installed")?;
                // `$PORT` is each command's own: expanded by a shell.
                let script = format!(
                    "exec {} --bind 127.0.0.1:$PORT --workers 1 --worker-class gthread \
                     --threads 16 --log-level warning wsgi_app:app",
                    gunicorn.display()
                );
                let mut c = Command::new(env!("CARGO_BIN_EXE_zdr"));
                c.current_dir(dir)
                    .args(["serve", "--bind", &bind, "--workers", &workers])
                    .args(["--log-level", "warning", "--boot-timeout", "120"])
                    .arg("--control-socket")
                    .arg(dir.join("control.sock"))
                    .args(["--", "sh", "-c", &script]);
                c
            }
            Kind::ZdrUvicorn { socket } => {
                std::fs::write(dir.join("asgi_app.py"), UVICORN_APP).map_err(|e| e.to_string())?;
                let uvicorn = which("uvicorn").ok_or("uvicorn not installed")?;
                let script = format!(
                    "exec {} asgi_app:app --lifespan off --no-access-log --log-level warning {}",
                    uvicorn.display(),
                    if socket { "--fd 3" } else { "--port $PORT" }
                );
                let mut c = Command::new(env!("CARGO_BIN_EXE_zdr"));
                c.current_dir(dir)
                    .args(["serve", "--bind", &bind, "--workers", &workers])
                    .args(["--log-level", "warning", "--boot-timeout", "120"])
                    .arg("--control-socket")
                    .arg(dir.join("control.sock"));
                if socket {
                    c.args(["--pass-socket", "--worker-ready-delay", "1"]);
                }
                c.args(["--", "sh", "-c", &script]);
                c
            }
            Kind::Uvicorn => {
                std::fs::write(dir.join("asgi_app.py"), UVICORN_APP).map_err(|e| e.to_string())?;
                let mut c = Command::new(which("uvicorn").ok_or("uvicorn not installed")?);
                c.current_dir(dir)
                    .args(["asgi_app:app", "--host", "127.0.0.1", "--port"])
                    .arg(addr.port().to_string())
                    .args([
                        "--workers",
                        &workers,
                        "--lifespan",
                        "off",
                        "--no-access-log",
                    ])
                    .args(["--log-level", "warning"]);
                c
            }
            Kind::Gunicorn { gthread } => {
                std::fs::write(dir.join("wsgi_app.py"), GUNICORN_APP).map_err(|e| e.to_string())?;
                let mut c = Command::new(which("gunicorn").ok_or("gunicorn not installed")?);
                c.current_dir(dir).args([
                    "--bind",
                    &bind,
                    "--workers",
                    &workers,
                    "--log-level",
                    "warning",
                ]);
                if gthread {
                    c.args(["--worker-class", "gthread", "--threads", "16"]);
                }
                c.arg("wsgi_app:app");
                c
            }
            Kind::Nginx => {
                let conf = NGINX_CONF
                    .replace("{workers}", &workers)
                    .replace("{bind}", &bind)
                    .replace("{dir}", &dir.display().to_string());
                std::fs::write(dir.join("nginx.conf"), conf).map_err(|e| e.to_string())?;
                let mut c = Command::new(which("nginx").ok_or("nginx not installed")?);
                c.args([
                    "-p",
                    &dir.display().to_string(),
                    "-c",
                    &dir.join("nginx.conf").display().to_string(),
                ]);
                c
            }
        };
        die_with_harness(&mut cmd);
        cmd.args(extra)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let child = cmd
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", kind.name()))?;
        let running = Running {
            kind,
            child,
            addr,
            dir: dir.to_owned(),
        };
        let deadline = Instant::now() + Duration::from_secs(120);
        while Instant::now() < deadline {
            if running.is_ready() {
                return Ok(running);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Err(format!("{} was not ready within 120 s", kind.name()))
    }

    /// zdr: its master says every worker is ready. Others: the server
    /// answers and has its worker processes.
    fn is_ready(&self) -> bool {
        match self.kind {
            Kind::Zdr { .. }
            | Kind::ZdrTable { .. }
            | Kind::ZdrCommand
            | Kind::ZdrUvicorn { .. } => {
                let ask = zdr::control::send(
                    &self.dir.join("control.sock"),
                    &zdr::control::Request::Status,
                    Duration::from_secs(2),
                );
                ask.ok().and_then(|r| r.status).is_some_and(|s| {
                    s.booting_generation.is_none()
                        && s.workers.iter().filter(|w| w.state == "ready").count() == WORKERS
                })
            }
            Kind::Bare => get(self.addr, "/").is_ok_and(|s| s == 200),
            _ => get(self.addr, "/").is_ok_and(|s| s == 200) && self.workers().len() >= WORKERS,
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn workers(&self) -> Vec<u32> {
        children_of(self.pid())
    }

    fn signal(&self, sig: nix::sys::signal::Signal) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid() as i32), sig);
    }

    fn reload(&self) {
        self.signal(nix::sys::signal::Signal::SIGHUP);
    }

    /// Memory of the master and its workers: (RSS, PSS) in MiB.
    fn memory_mib(&self) -> (f64, f64) {
        let mut pids = vec![self.pid()];
        pids.extend(self.workers());
        let (mut rss, mut pss) = (0u64, 0u64);
        for pid in pids {
            let text =
                std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
            for line in text.lines() {
                let kb = |l: &str| {
                    l.split_whitespace()
                        .nth(1)
                        .and_then(|v| v.parse::<u64>().ok())
                        .unwrap_or(0)
                };
                if line.starts_with("Rss:") {
                    rss += kb(line);
                } else if line.starts_with("Pss:") {
                    pss += kb(line);
                }
            }
        }
        (rss as f64 / 1024.0, pss as f64 / 1024.0)
    }
}

impl Drop for Running {
    /// Stops the system and everything it started: each system runs in a
    /// process group of its own (a launcher script's grandchildren too).
    fn drop(&mut self) {
        let group = nix::unistd::Pid::from_raw(self.pid() as i32);
        let _ = nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if self.child.try_wait().ok().flatten().is_some() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGKILL);
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Puts a system under test in a process group of its own, and makes it
/// die with the harness should the harness be killed before it can stop it.
fn die_with_harness(cmd: &mut Command) {
    use std::os::unix::process::CommandExt;
    cmd.process_group(0);
    // Servers on their own cores, when the machine has cores to split.
    let cores = precise::core_split().and_then(|(server, _)| {
        let mut set = nix::sched::CpuSet::new();
        for c in server {
            set.set(c).ok()?;
        }
        Some(set)
    });
    // SAFETY: prctl and sched_setaffinity are async-signal-safe system
    // calls and allocate nothing; the set was built before the fork.
    unsafe {
        cmd.pre_exec(move || {
            nix::libc::prctl(
                nix::libc::PR_SET_PDEATHSIG,
                nix::libc::SIGKILL as nix::libc::c_ulong,
            );
            if let Some(set) = &cores {
                let _ = nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), set);
            }
            Ok(())
        });
    }
}

fn children_of(parent: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let Some((_, after)) = stat.rsplit_once(')') else {
            continue;
        };
        let mut f = after.split_whitespace();
        let state = f.next().unwrap_or("");
        if f.next().and_then(|p| p.parse::<u32>().ok()) == Some(parent) && state != "Z" {
            out.push(pid);
        }
    }
    out
}

/// A blocking GET; the status.
/// `GET path` on a connection of its own: the whole answer, as text.
fn exchange(addr: SocketAddr, path: &str) -> std::io::Result<String> {
    use std::io::Read;
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    Ok(String::from_utf8_lossy(&raw).into_owned())
}

fn get(addr: SocketAddr, path: &str) -> std::io::Result<u16> {
    exchange(addr, path)?
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other("bad response"))
}

/// The body of `GET path`, if it is a 200.
fn get_body(addr: SocketAddr, path: &str) -> std::io::Result<String> {
    let text = exchange(addr, path)?;
    match text.split_once("\r\n\r\n") {
        Some((head, body)) if head.starts_with("HTTP/1.1 200") => Ok(body.to_owned()),
        _ => Err(std::io::Error::other("not a 200")),
    }
}

const GUNICORN_APP: &str = r#"import os, time
# With TABLE_MB set, a table of that size, built at import (so, with
# --preload, in the master).
TABLE = bytes(range(256)) * (int(os.environ.get("TABLE_MB", "0")) * 4096)
def app(environ, start_response):
    if environ.get("PATH_INFO") == "/slow":
        ms = int((environ.get("QUERY_STRING") or "ms=0").split("ms=")[-1] or 0)
        time.sleep(min(ms, 60000) / 1000)
    pid = os.getpid()
    body = f"pid={pid} generation=0 loaded_in={pid}\n".encode()
    start_response("200 OK", [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(body)))])
    return [body]
"#;

const UVICORN_APP: &str = r#"import os, time
async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    if scope["path"] == "/block":
        # A handler with a blocking call: it holds the event loop.
        ms = int(scope["query_string"].decode().split("ms=")[-1] or 0)
        time.sleep(min(ms, 60000) / 1000)
    body = f"pid={os.getpid()} generation={os.environ.get('ZDR_GENERATION', '0')}\n".encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
"#;

const NGINX_CONF: &str = r#"worker_processes {workers};
daemon off;
master_process on;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    keepalive_requests 100000;
    server {
        listen {bind};
        location / { default_type text/plain; return 200 "pid=$pid generation=0 loaded_in=$pid\n"; }
    }
}
"#;

// ---------------------------------------------------------------- the bare hyper baseline

mod bare {
    use std::convert::Infallible;

    use hyper_util::rt::{TokioExecutor, TokioIo};
    use hyper_util::server::conn::auto;

    /// One process, `threads` runtime threads (0: a current-thread
    /// runtime), the demo app's handler, or (`hello`) a static answer as
    /// [`super::hello_app`] gives.
    pub fn serve(addr: &str, threads: usize, hello: bool) {
        let rt = match threads {
            0 => tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build(),
            n => tokio::runtime::Builder::new_multi_thread()
                .worker_threads(n)
                .enable_all()
                .build(),
        }
        .expect("runtime");
        // The demo's load step, once.
        let app: &'static super::demo::Demo = Box::leak(Box::new(super::demo::Demo::from_env()));
        rt.block_on(async {
            let listener = tokio::net::TcpListener::bind(addr).await.expect("bind");
            loop {
                let Ok((stream, peer)) = listener.accept().await else {
                    continue;
                };
                let _ = stream.set_nodelay(true);
                if hello {
                    tokio::spawn(async move {
                        let svc = hyper::service::service_fn(|_req| async {
                            Ok::<_, Infallible>(http::Response::new(super::hello_body()))
                        });
                        let _ = auto::Builder::new(TokioExecutor::new())
                            .serve_connection(TokioIo::new(stream), svc)
                            .await;
                    });
                    continue;
                }
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |_req| {
                        // The demo's own answer, by the same function; the
                        // client as zdr would resolve it.
                        let client = zdr::ClientInfo {
                            addr: Some(peer.ip()),
                            scheme: "http",
                            forwarded: false,
                            connection_expires: None,
                        };
                        let res = super::demo::hello(app, Some(&client), None);
                        async move { Ok::<_, Infallible>(res) }
                    });
                    let _ = auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
    }
}

// ---------------------------------------------------------------- the table app (memory)

const TABLE_APP_ENV: &str = "ZDR_BENCH_TABLE_APP";

struct Table {
    values: Vec<u64>,
}

fn table_app() -> zdr::Server<Table> {
    zdr::Server::new("bench-table")
        .load(|| {
            let mb: usize = std::env::var("TABLE_MB")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(200);
            let len = mb * 1024 * 1024 / 8;
            Ok(Table {
                values: (0..len as u64).map(|i| i ^ 0x5555).collect(),
            })
        })
        .service(|table: std::sync::Arc<Table>| async move {
            Ok(tower::service_fn(move |_req: zdr::Request| {
                let n = table.values.len();
                async move {
                    Ok::<_, std::convert::Infallible>(http::Response::new(format!("entries={n}\n")))
                }
            }))
        })
}

// ---------------------------------------------------------------- the hello app (instructions)

const HELLO_APP_ENV: &str = "ZDR_BENCH_HELLO_APP";

/// The static answer both sides of the fair instructions pair give.
fn hello_body() -> http_body_util::Full<bytes::Bytes> {
    http_body_util::Full::new(bytes::Bytes::from_static(b"hello\n"))
}

/// A zdr app as a user writes one: `Server::service` with a
/// `tower::service_fn` answering a static `hello`.
fn hello_app() -> zdr::Server<()> {
    zdr::Server::new("bench-hello").service(|_: std::sync::Arc<()>| async move {
        Ok(tower::service_fn(|_req: zdr::Request| async {
            Ok::<_, std::convert::Infallible>(http::Response::new(hello_body()))
        }))
    })
}

// ---------------------------------------------------------------- scenarios

struct Bench {
    opts: Opts,
    rt: tokio::runtime::Runtime,
    results: Vec<Value>,
    tables: BTreeMap<&'static str, Vec<String>>,
    scratch: PathBuf,
    counter: u32,
}

/// Figures from one load run.
struct Measured {
    rps: f64,
    ok: u64,
    failed: u64,
    failures: Vec<String>,
    p50: f64,
    p99: f64,
    max: f64,
    by_pid: BTreeMap<u32, u64>,
}

impl Measured {
    fn fairness(&self) -> Option<f64> {
        if self.by_pid.len() < 2 {
            return None;
        }
        let max = *self.by_pid.values().max()? as f64;
        let min = *self.by_pid.values().min()? as f64;
        Some(max / min.max(1.0))
    }
}

const SYSTEMS: [Kind; 9] = [
    Kind::Zdr { preload: false },
    Kind::Zdr { preload: true },
    Kind::Bare,
    Kind::Gunicorn { gthread: false },
    Kind::Gunicorn { gthread: true },
    Kind::ZdrCommand,
    Kind::ZdrUvicorn { socket: false },
    Kind::ZdrUvicorn { socket: true },
    Kind::Nginx,
];

impl Bench {
    fn new(opts: Opts) -> Bench {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let scratch = std::env::temp_dir().join(format!("zdr-bench-{}", std::process::id()));
        Bench {
            opts,
            rt,
            results: Vec::new(),
            tables: BTreeMap::new(),
            scratch,
            counter: 0,
        }
    }

    fn dir(&mut self) -> PathBuf {
        self.counter += 1;
        self.scratch.join(self.counter.to_string())
    }

    fn start(
        &mut self,
        kind: Kind,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Result<Running, String> {
        let dir = self.dir();
        Running::start(kind, &dir, extra, env)
    }

    /// Drives load for `duration`, calling `during` every second.
    fn load(&self, addr: SocketAddr, duration: Duration, mut during: impl FnMut(u32)) -> Measured {
        let load = self
            .rt
            .block_on(async { load::start(addr, "/", KEEPALIVE_CLIENTS, FRESH_CLIENTS) });
        let started = Instant::now();
        let mut second = 0;
        while started.elapsed() < duration {
            std::thread::sleep(Duration::from_millis(50));
            let s = started.elapsed().as_secs() as u32;
            if s > second {
                second = s;
                during(second);
            }
        }
        let mut report = self.rt.block_on(load.stop());
        let elapsed = started.elapsed().as_secs_f64();
        Measured {
            rps: report.ok as f64 / elapsed,
            ok: report.ok,
            failed: report.failed,
            failures: report.failures.clone(),
            p50: report.latency_ms(0.50),
            p99: report.latency_ms(0.99),
            max: report.latency_ms(1.0),
            by_pid: report.by_pid.clone(),
        }
    }

    fn row(&mut self, scenario: &'static str, system: &str, cells: Vec<String>, record: Value) {
        self.tables
            .entry(scenario)
            .or_default()
            .push(format!("| {system} | {} |", cells.join(" | ")));
        let mut record = record;
        record["scenario"] = json!(scenario);
        record["system"] = json!(system);
        self.results.push(record);
        eprintln!("  {scenario} / {system}: done");
    }

    fn skip(&mut self, scenario: &'static str, system: &str, why: &str, columns: usize) {
        let mut cells = vec![format!("skipped: {why}")];
        cells.extend(std::iter::repeat_n(String::new(), columns - 1));
        self.row(scenario, system, cells, json!({ "skipped": why }));
    }

    fn run(&mut self) {
        let started = Instant::now();
        let mut steady: BTreeMap<&'static str, Measured> = BTreeMap::new();
        if self.opts.wants("steady") || self.opts.wants("reload") || self.opts.wants("fairness") {
            for kind in SYSTEMS {
                eprintln!("steady: {}", kind.name());
                match self.start(kind, &[], &[]) {
                    Ok(server) => {
                        let m = self.load(server.addr, self.opts.duration(), |_| {});
                        let wrk = wrk_rps(server.addr, self.opts.duration());
                        let fair = m.fairness();
                        self.row(
                            "steady",
                            kind.name(),
                            vec![
                                format!("{:.0}", m.rps),
                                wrk.map(|w| format!("{w:.0}")).unwrap_or_else(|| "-".into()),
                                m.failed.to_string(),
                                format!("{:.2}", m.p50),
                                format!("{:.2}", m.p99),
                                format!("{:.1}", m.max),
                                fair.map(|f| format!("{f:.2}")).unwrap_or_else(|| "-".into()),
                            ],
                            json!({ "rps": m.rps, "wrk_rps": wrk, "ok": m.ok, "failed": m.failed, "p50_ms": m.p50, "p99_ms": m.p99, "max_ms": m.max, "fairness_max_over_min": fair, "requests_by_worker": m.by_pid.values().collect::<Vec<_>>() }),
                        );
                        steady.insert(kind.name(), m);
                    }
                    Err(why) => self.skip("steady", kind.name(), &why, 7),
                }
            }
        }
        if self.opts.wants("reload") {
            for kind in SYSTEMS.into_iter().filter(|k| k.can_reload()) {
                eprintln!("reload every second: {}", kind.name());
                match self.start(kind, &[], &[]) {
                    Ok(server) => {
                        let m = self.load(server.addr, self.opts.duration(), |_| server.reload());
                        let base = steady.get(kind.name());
                        let dip = base.map(|b| 100.0 * (1.0 - m.rps / b.rps));
                        let p99_ratio = base.map(|b| m.p99 / b.p99.max(0.001));
                        self.row(
                            "reload",
                            kind.name(),
                            vec![
                                format!("{:.0}", m.rps),
                                m.failed.to_string(),
                                format!("{:.2}", m.p99),
                                p99_ratio.map(|r| format!("{r:.2}")).unwrap_or_else(|| "-".into()),
                                format!("{:.1}", m.max),
                                dip.map(|d| format!("{d:.1}%")).unwrap_or_else(|| "-".into()),
                            ],
                            json!({ "rps": m.rps, "ok": m.ok, "failed": m.failed, "failures": m.failures, "p99_ms": m.p99, "p99_over_steady": p99_ratio, "max_ms": m.max, "throughput_dip_pct": dip }),
                        );
                    }
                    Err(why) => self.skip("reload", kind.name(), &why, 6),
                }
            }
        }
        if self.opts.wants("reload_duration") {
            for (kind, boot_ms) in [
                (Kind::Zdr { preload: false }, "0"),
                (Kind::Zdr { preload: false }, "500"),
                (Kind::Zdr { preload: true }, "0"),
                (Kind::Gunicorn { gthread: false }, "0"),
                (Kind::Nginx, "0"),
            ] {
                let name = format!("{} (boot {boot_ms} ms)", kind.name());
                eprintln!("reload duration: {name}");
                match self.start(kind, &[], &[("ZDR_DEMO_BOOT_MS", boot_ms)]) {
                    Ok(server) => {
                        let runs: Vec<f64> =
                            (0..5).filter_map(|_| reload_duration(&server)).collect();
                        let median = median(&runs);
                        self.row(
                            "reload_duration",
                            &name,
                            vec![
                                median
                                    .map(|m| format!("{m:.0}"))
                                    .unwrap_or_else(|| "timeout".into()),
                                runs.iter()
                                    .map(|r| format!("{r:.0}"))
                                    .collect::<Vec<_>>()
                                    .join(", "),
                            ],
                            json!({ "median_ms": median, "runs_ms": runs }),
                        );
                    }
                    Err(why) => self.skip("reload_duration", &name, &why, 2),
                }
            }
        }
        if self.opts.wants("inflight") {
            for kind in [
                Kind::Zdr { preload: false },
                Kind::Gunicorn { gthread: true },
            ] {
                for (event, sig) in [
                    ("reload", nix::sys::signal::Signal::SIGHUP),
                    ("stop", nix::sys::signal::Signal::SIGTERM),
                ] {
                    let name = format!("{} across {event}", kind.name());
                    eprintln!("in flight: {name}");
                    match self.start(kind, &["--graceful-timeout", "30"], &[]) {
                        Ok(server) => {
                            let addr = server.addr;
                            let slow: Vec<_> = (0..20)
                                .map(|_| std::thread::spawn(move || get(addr, "/slow?ms=3000")))
                                .collect();
                            std::thread::sleep(Duration::from_millis(500));
                            server.signal(sig);
                            let completed = slow
                                .into_iter()
                                .map(|h| h.join())
                                .filter(|r| matches!(r, Ok(Ok(200))))
                                .count();
                            self.row(
                                "inflight",
                                &name,
                                vec![format!("{completed}/20")],
                                json!({ "completed": completed, "of": 20 }),
                            );
                        }
                        Err(why) => self.skip("inflight", &name, &why, 1),
                    }
                }
            }
        }
        if self.opts.wants("memory") {
            let mb = if self.opts.quick { "50" } else { "200" };
            for preload in [false, true] {
                let name = format!(
                    "zdr table app, {mb} MB table{}",
                    if preload { ", --preload" } else { "" }
                );
                eprintln!("memory: {name}");
                let table = self.start(Kind::ZdrTable { preload }, &[], &[("TABLE_MB", mb)]);
                self.memory_row(&name, mb, table);
            }
            let name = format!("gunicorn sync --preload, {mb} MB table");
            eprintln!("memory: {name}");
            let gunicorn = self.start(
                Kind::Gunicorn { gthread: false },
                &["--preload"],
                &[("TABLE_MB", mb)],
            );
            self.memory_row(&name, mb, gunicorn);
        }
        if self.opts.wants("recycle") {
            self.recycle();
        }
        if self.opts.wants("overload") {
            self.overload();
        }
        if self.opts.wants("worker_life") {
            self.worker_life();
        }
        if self.opts.wants("throughput") {
            self.throughput();
        }
        if self.opts.wants("conn_memory") {
            self.conn_memory();
        }
        if self.opts.wants("instructions") {
            self.instructions();
        }
        self.print(started.elapsed());
        let _ = std::fs::remove_dir_all(&self.scratch);
    }

    /// One row of the memory scenario: the server's RSS and PSS against
    /// the table it holds.
    fn memory_row(&mut self, name: &str, mb: &str, server: Result<Running, String>) {
        match server {
            Ok(server) => {
                let (rss, pss) = server.memory_mib();
                let table: f64 = mb.parse().unwrap_or(1.0);
                self.row(
                    "memory",
                    name,
                    vec![format!("{rss:.0}"), format!("{pss:.0}"), format!("{:.2}", pss / table)],
                    json!({ "rss_mib": rss, "pss_mib": pss, "pss_over_table": pss / table, "table_mib": table }),
                );
            }
            Err(why) => self.skip("memory", name, &why, 3),
        }
    }

    fn print(&self, took: Duration) {
        let headers: BTreeMap<&str, &str> = BTreeMap::from([
            ("steady", "| system | req/s | wrk req/s | failed | p50 ms | p99 ms | max ms | busiest/idlest worker |\n|---|---|---|---|---|---|---|---|"),
            ("reload", "| system (HUP every second) | req/s | failed | p99 ms | p99 / steady | max ms | throughput dip |\n|---|---|---|---|---|---|---|"),
            ("reload_duration", "| system | median ms (signal to old workers gone) | runs |\n|---|---|---|"),
            ("inflight", "| 20 requests of 3 s in flight | completed |\n|---|---|"),
            ("memory", "| system | RSS MiB (sum) | PSS MiB (sum) | PSS / table |\n|---|---|---|---|"),
            ("recycle", "| system (wrk -t2 -c64, interleaved) | req/s median (min–max) | of no recycling, round by round: median (min–max) | workers replaced (of those asked for: requests ÷ (limit × 1.1)) | most processes at once (master's children) | any failed | runs |\n|---|---|---|---|---|---|---|"),
            ("worker_life", "| system (`--workers 1 --max-requests 1`, one life after another) | CPU ms per worker life | master ms | worker ms | lives |\n|---|---|---|---|---|"),
            ("throughput", "| system (wrk -t2 -c64, interleaved) | req/s median (min–max) | / nginx, round by round | / bare hyper, round by round | any failed | runs |\n|---|---|---|---|---|---|"),
            ("conn_memory", "| system | KiB per idle keep-alive connection (PSS growth) | connections | PSS growth MiB |\n|---|---|---|---|"),
            ("overload", "| system (2 workers, one 50 ms request at a time each: capacity 40/s) | offered | goodput req/s (of capacity) | p50 / p99 ms of 200s | p99 / unloaded p99 | shed 503/s (with Retry-After) | timed out / failed | health p99 / max ms (failed) |\n|---|---|---|---|---|---|---|---|"),
            ("instructions", "| system (1 serving thread) | instructions per keep-alive request | / bare hyper | requests counted |\n|---|---|---|---|"),
            ("instructions_where", "| where (the static hello pair; each function's own instructions per request; zdr's functions one by one, the rest by crate) | zdr | bare hyper | zdr − bare |\n|---|---|---|---|"),
        ]);
        let mut out = String::new();
        out.push_str(&format!(
            "zdr benchmark, {} workers per system, {} keep-alive + {} one-request-per-connection clients, {} s per run, {} cores\n\n",
            WORKERS,
            KEEPALIVE_CLIENTS,
            FRESH_CLIENTS,
            self.opts.duration().as_secs(),
            std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0)
        ));
        for scenario in [
            "instructions",
            "instructions_where",
            "throughput",
            "recycle",
            "overload",
            "worker_life",
            "conn_memory",
            "steady",
            "reload",
            "reload_duration",
            "inflight",
            "memory",
        ] {
            if let Some(rows) = self.tables.get(scenario) {
                out.push_str(&format!(
                    "### {scenario}\n\n{}\n{}\n\n",
                    headers[scenario],
                    rows.join("\n")
                ));
            }
        }
        let machine = machine();
        out.push_str(&format!(
            "(run took {:.0} s; {}; {})\n",
            took.as_secs_f64(),
            machine["cpu"].as_str().unwrap_or("?"),
            if precise::core_split().is_some() {
                "servers and wrk on disjoint cores"
            } else {
                "servers and load generator share the cores"
            }
        ));
        print!("{out}");
        let date = command_text("date", &["-u", "+%Y-%m-%dT%H:%M:%SZ"]);
        let commit = command_text("git", &["rev-parse", "--short", "HEAD"]);
        let doc = json!({
            "quick": self.opts.quick, "date": date, "commit": commit, "machine": machine,
            "results": self.results,
        });
        if self.opts.save {
            let day = date.get(..10).unwrap_or("undated");
            let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join(format!("benches/results/{day}-{commit}.json"));
            let _ = std::fs::create_dir_all(path.parent().unwrap_or(Path::new(".")));
            match std::fs::write(
                &path,
                serde_json::to_string_pretty(&doc).unwrap_or_default(),
            ) {
                Ok(()) => eprintln!("results kept in {}", path.display()),
                Err(e) => eprintln!("cannot write {}: {e}", path.display()),
            }
        }
        if let Some(readme) = &self.opts.readme {
            let section = format!(
                "Measured {date} at {commit} ({}, {} cores{}), `cargo bench --bench harness -- {}`:\n\n{}",
                machine["cpu"].as_str().unwrap_or("?"),
                machine["cores"],
                if precise::core_split().is_some() { ", servers and wrk on disjoint cores" } else { ", servers and load generator sharing them" },
                std::env::args().skip(1).filter(|a| a != "--bench").collect::<Vec<_>>().join(" "),
                out.split("\n\n").skip(1).collect::<Vec<_>>().join("\n\n"),
            );
            rewrite_between_markers(readme, &section);
        }
        if let Some(parent) = self.opts.json.parent() {
            let _ = std::fs::create_dir_all(parent);
        }
        match std::fs::write(
            &self.opts.json,
            serde_json::to_string_pretty(&doc).unwrap_or_default(),
        ) {
            Ok(()) => eprintln!("results written to {}", self.opts.json.display()),
            Err(e) => eprintln!("cannot write {}: {e}", self.opts.json.display()),
        }
    }
}

/// Sends HUP and times it until every worker that was there is gone.
fn reload_duration(server: &Running) -> Option<f64> {
    let old = server.workers();
    let started = Instant::now();
    server.reload();
    while started.elapsed() < Duration::from_secs(30) {
        let now = server.workers();
        if old.iter().all(|p| !now.contains(p)) && now.len() >= WORKERS {
            let took = started.elapsed().as_secs_f64() * 1000.0;
            std::thread::sleep(Duration::from_millis(200));
            return Some(took);
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    None
}

fn median(v: &[f64]) -> Option<f64> {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied()
}

/// wrk's requests per second with 32 connections, when wrk is installed.
fn wrk_rps(addr: SocketAddr, duration: Duration) -> Option<f64> {
    let wrk = which("wrk")?;
    let out = Command::new(wrk)
        .args([
            "-t",
            "1",
            "-c",
            "32",
            "-d",
            &format!("{}s", duration.as_secs().min(5)),
            &format!("http://{addr}/"),
        ])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| l.strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse().ok())
}

/// What the figures were measured on.
fn machine() -> Value {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")?
                .split_once(':')
                .map(|(_, v)| v.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    json!({
        "cpu": cpu,
        "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "kernel": command_text("uname", &["-r"]),
    })
}

/// A command's output, trimmed; empty if it cannot run.
fn command_text(program: &str, args: &[&str]) -> String {
    Command::new(program)
        .args(args)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

/// Replaces what lies between `<!-- bench:begin -->` and `<!-- bench:end -->`.
fn rewrite_between_markers(path: &Path, section: &str) {
    let (begin, end) = ("<!-- bench:begin -->", "<!-- bench:end -->");
    let Ok(text) = std::fs::read_to_string(path) else {
        eprintln!("cannot read {}", path.display());
        return;
    };
    let (Some(a), Some(b)) = (text.find(begin), text.find(end)) else {
        eprintln!("{} has no {begin} … {end} section", path.display());
        return;
    };
    let new = format!(
        "{}{begin}\n{}\n{}",
        &text[..a],
        section.trim_end(),
        &text[b..]
    );
    match std::fs::write(path, new) {
        Ok(()) => eprintln!("figures written into {}", path.display()),
        Err(e) => eprintln!("cannot write {}: {e}", path.display()),
    }
}
