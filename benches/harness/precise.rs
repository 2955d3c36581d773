//! The scenarios that steer the work on speed: systems interleaved
//! (A B C A B C …) after a warm-up, medians with min–max over repetitions,
//! `wrk` as the load generator, server and generator on disjoint cores when
//! the machine has enough; and deterministic instruction counts
//! (callgrind), which a noisy shared machine cannot blur.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;

use super::{children_of, get, which, Bench, Kind, Running, WORKERS};

/// The cores the servers run on and the cores the load generator runs on,
/// when there are at least four (else both share every core, and the
/// figures measure the pair).
pub fn core_split() -> Option<(Vec<usize>, Vec<usize>)> {
    let n = std::thread::available_parallelism().map_or(1, |n| n.get());
    (n >= 4).then(|| ((0..n / 2).collect(), (n / 2..n).collect()))
}

/// `wrk -t2 -c64` for `secs` seconds: requests per second, and whether any
/// request failed (a socket error or a non-2xx answer).
fn wrk(addr: SocketAddr, secs: u64) -> Option<(f64, bool)> {
    let wrk = which("wrk")?;
    let mut cmd = match core_split() {
        Some((_, client)) => {
            let mut c = Command::new(which("taskset")?);
            c.arg("-c")
                .arg(
                    client
                        .iter()
                        .map(|c| c.to_string())
                        .collect::<Vec<_>>()
                        .join(","),
                )
                .arg(wrk);
            c
        }
        None => Command::new(wrk),
    };
    let out = cmd
        .args(["-t", "2", "-c", "64", "-d", &format!("{secs}s")])
        .arg(format!("http://{addr}/"))
        .stderr(Stdio::null())
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let rps = text
        .lines()
        .find_map(|l| l.strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse().ok())?;
    let failed = text.contains("Socket errors") || text.contains("Non-2xx");
    Some((rps, failed))
}

/// Median, min and max.
fn spread(v: &[f64]) -> (f64, f64, f64) {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let median = if v.is_empty() {
        0.0
    } else if v.len() % 2 == 1 {
        v[v.len() / 2]
    } else {
        (v[v.len() / 2 - 1] + v[v.len() / 2]) / 2.0
    };
    (
        median,
        v.first().copied().unwrap_or(0.0),
        v.last().copied().unwrap_or(0.0),
    )
}

fn cell((median, min, max): (f64, f64, f64)) -> String {
    format!("{median:.0} ({min:.0}–{max:.0})")
}

/// The ratio of two systems' throughput, round by round: each round runs
/// every system back to back, so a drift of the machine between rounds
/// (another tenant, the clock) cancels out of each ratio. The median and
/// min–max of the rounds' ratios; none without a round with both.
fn paired(a: &[f64], b: &[f64]) -> Option<(f64, f64, f64)> {
    let ratios: Vec<f64> = a
        .iter()
        .zip(b)
        .filter(|(_, b)| **b > 0.0)
        .map(|(a, b)| a / b)
        .collect();
    (!ratios.is_empty()).then(|| spread(&ratios))
}

/// A ratio as the tables show it: median (min–max).
fn ratio_cell(r: Option<(f64, f64, f64)>) -> String {
    r.map_or_else(
        || "-".into(),
        |(m, lo, hi)| format!("{m:.2} ({lo:.2}–{hi:.2})"),
    )
}

/// A system for the interleaved runs: its name, the server, and what its
/// runs measured.
struct Contender {
    name: String,
    server: Running,
    runs: Vec<f64>,
    failed: bool,
    most_processes: usize,
}

impl Bench {
    fn repetitions(&self) -> usize {
        if self.opts.quick {
            3
        } else {
            5
        }
    }

    fn seconds(&self) -> u64 {
        if self.opts.quick {
            3
        } else {
            8
        }
    }

    /// Runs every contender `repetitions` times, interleaved, each run
    /// after a one-second warm-up, counting the processes of each (master
    /// and workers) while it runs.
    fn interleave(&mut self, contenders: &mut [Contender]) {
        let (reps, secs) = (self.repetitions(), self.seconds());
        for rep in 0..reps {
            for c in contenders.iter_mut() {
                eprintln!("  {} run {}/{reps}", c.name, rep + 1);
                let _ = wrk(c.server.addr, 1);
                let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
                let watcher = {
                    let (stop, pid) = (std::sync::Arc::clone(&stop), c.server.pid());
                    std::thread::spawn(move || {
                        let mut most = 0;
                        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                            most = most.max(children_of(pid).len());
                            std::thread::sleep(Duration::from_millis(20));
                        }
                        most
                    })
                };
                if let Some((rps, failed)) = wrk(c.server.addr, secs) {
                    c.runs.push(rps);
                    c.failed |= failed;
                }
                stop.store(true, std::sync::atomic::Ordering::Relaxed);
                c.most_processes = c.most_processes.max(watcher.join().unwrap_or(0));
            }
        }
    }

    /// Steady throughput: zdr, bare hyper and nginx, interleaved.
    pub fn throughput(&mut self) {
        if which("wrk").is_none() {
            self.skip("throughput", "all", "wrk not installed", 5);
            return;
        }
        let mut contenders = Vec::new();
        for kind in [Kind::Zdr { preload: false }, Kind::Bare, Kind::Nginx] {
            match self.start(kind, &[], &[]) {
                Ok(server) => contenders.push(Contender {
                    name: kind.name().to_owned(),
                    server,
                    runs: Vec::new(),
                    failed: false,
                    most_processes: 0,
                }),
                Err(why) => self.skip("throughput", kind.name(), &why, 5),
            }
        }
        eprintln!("throughput: interleaved");
        self.interleave(&mut contenders);
        let runs_of = |name: &str| {
            contenders
                .iter()
                .find(|c| c.name == name)
                .map(|c| c.runs.clone())
        };
        let (nginx, bare) = (runs_of("nginx"), runs_of("bare hyper"));
        for c in &contenders {
            let s = spread(&c.runs);
            let over_nginx = nginx.as_ref().and_then(|n| paired(&c.runs, n));
            let over_bare = bare.as_ref().and_then(|b| paired(&c.runs, b));
            let record = json!({
                "runs_rps": c.runs, "median_rps": s.0, "min_rps": s.1, "max_rps": s.2,
                "over_nginx": over_nginx.map(|r| r.0), "over_nginx_min_max": over_nginx.map(|r| [r.1, r.2]),
                "over_bare": over_bare.map(|r| r.0), "over_bare_min_max": over_bare.map(|r| [r.1, r.2]),
                "failed": c.failed, "pinned": core_split().is_some(),
            });
            let cells = vec![
                cell(s),
                ratio_cell(over_nginx),
                ratio_cell(over_bare),
                c.failed.to_string(),
                c.runs.len().to_string(),
            ];
            self.row("throughput", &c.name, cells, record);
        }
    }

    /// Recycling at saturation: with `--max-requests 1000
    /// --max-requests-jitter 100` (with and without `--preload`) and with
    /// `--max-requests 10000 --max-requests-jitter 1000`, against the same
    /// server without it, interleaved; and the most processes seen at once.
    pub fn recycle(&mut self) {
        if which("wrk").is_none() {
            self.skip("recycle", "all", "wrk not installed", 6);
            return;
        }
        // The recycling servers say on their metrics endpoint how many
        // workers they replaced, for the replacements made against those
        // asked for (requests ÷ (limit × 1.1)).
        let metrics = [super::free_addr(), super::free_addr(), super::free_addr()];
        let with = |limit: u64, bind: SocketAddr| -> Vec<String> {
            [
                "--max-requests".to_owned(),
                limit.to_string(),
                "--max-requests-jitter".to_owned(),
                (limit / 10).to_string(),
                "--metrics-bind".to_owned(),
                bind.to_string(),
            ]
            .into()
        };
        let args = [
            with(1000, metrics[0]),
            with(1000, metrics[1]),
            with(10000, metrics[2]),
        ];
        let args: Vec<Vec<&str>> = args
            .iter()
            .map(|a| a.iter().map(String::as_str).collect())
            .collect();
        let mut contenders = Vec::new();
        // Where each recycling server says what it did, and its limit.
        let mut scrape_at: BTreeMap<String, (SocketAddr, f64)> = BTreeMap::new();
        for (name, kind, extra, at) in [
            ("zdr", Kind::Zdr { preload: false }, &[][..], None),
            (
                "zdr, recycling at 1000",
                Kind::Zdr { preload: false },
                &args[0][..],
                Some((metrics[0], 1000.0)),
            ),
            (
                "zdr --preload, recycling at 1000",
                Kind::Zdr { preload: true },
                &args[1][..],
                Some((metrics[1], 1000.0)),
            ),
            (
                "zdr, recycling at 10000",
                Kind::Zdr { preload: false },
                &args[2][..],
                Some((metrics[2], 10000.0)),
            ),
        ] {
            if let Some(at) = at {
                scrape_at.insert(name.to_owned(), at);
            }
            match self.start(kind, extra, &[]) {
                Ok(server) => contenders.push(Contender {
                    name: name.to_owned(),
                    server,
                    runs: Vec::new(),
                    failed: false,
                    most_processes: 0,
                }),
                Err(why) => self.skip("recycle", name, &why, 6),
            }
        }
        eprintln!("recycle: interleaved");
        self.interleave(&mut contenders);
        let base = contenders
            .iter()
            .find(|c| c.name == "zdr")
            .map(|c| c.runs.clone());
        for c in &contenders {
            let s = spread(&c.runs);
            let ratio = base.as_ref().and_then(|b| paired(&c.runs, b));
            // Replacements made ÷ asked for (requests ÷ (limit × 1.1)).
            let replaced = scrape_at.get(&c.name).and_then(|(at, limit)| {
                let text = super::get_body(*at, "/metrics").ok()?;
                let made = sample(&text, "zdr_worker_restarts_total{cause=\"max_requests\"}")?;
                let requests: f64 = text
                    .lines()
                    .filter(|l| l.starts_with("zdr_requests_total{"))
                    .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                    .sum();
                Some((made, made / (requests / (limit * 1.1))))
            });
            let record = json!({
                "runs_rps": c.runs, "median_rps": s.0, "min_rps": s.1, "max_rps": s.2,
                "over_no_recycling": ratio.map(|r| r.0),
                "over_no_recycling_min_max": ratio.map(|r| [r.1, r.2]),
                "most_worker_processes": c.most_processes,
                "workers": WORKERS, "failed": c.failed,
                "replacements": replaced.map(|r| r.0),
                "replacements_of_asked": replaced.map(|r| r.1),
            });
            let cells = vec![
                cell(s),
                ratio_cell(ratio),
                replaced.map_or_else(
                    || "-".to_owned(),
                    |(made, of)| format!("{made:.0} ({:.0} %)", 100.0 * of),
                ),
                c.most_processes.to_string(),
                c.failed.to_string(),
                c.runs.len().to_string(),
            ];
            self.row("recycle", &c.name, cells, record);
        }
    }

    /// The CPU one worker's life costs, whatever the request rate: spawn,
    /// boot, one request, drain and exit, with `--max-requests 1`, one
    /// life after another; the master's own CPU and its reaped workers'.
    pub fn worker_life(&mut self) {
        let lives = if self.opts.quick { 60 } else { 200 };
        for (name, preload) in [("zdr", false), ("zdr --preload", true)] {
            eprintln!("worker life: {name}");
            let dir = self.dir();
            match worker_life_cpu(preload, &dir, lives) {
                Ok((master, workers)) => {
                    let per = |ms: f64| ms / f64::from(lives);
                    self.row(
                        "worker_life",
                        name,
                        vec![
                            format!("{:.2}", per(master + workers)),
                            format!("{:.2}", per(master)),
                            format!("{:.2}", per(workers)),
                            lives.to_string(),
                        ],
                        json!({
                            "cpu_ms_per_life": per(master + workers),
                            "master_ms_per_life": per(master),
                            "worker_ms_per_life": per(workers),
                            "lives": lives,
                        }),
                    );
                }
                Err(why) => self.skip("worker_life", name, &why, 4),
            }
            let _ = std::fs::remove_dir_all(&dir);
        }
    }

    /// Instructions per keep-alive request, counted by callgrind in the
    /// serving process (zdr: 1 worker × 1 thread; bare hyper: 1 thread):
    /// (Ir over 4,000 requests after 1,000 of warm-up) / 4,000.
    pub fn instructions(&mut self) {
        for tool in ["valgrind", "callgrind_control", "h2load"] {
            if which(tool).is_none() {
                self.skip("instructions", "all", &format!("{tool} not installed"), 3);
                return;
            }
        }
        let mut counts = BTreeMap::new();
        let mut parts: BTreeMap<&str, BTreeMap<String, u64>> = BTreeMap::new();
        // Bare hyper as `#[tokio::main]` with one worker thread gives it,
        // and on a current-thread runtime (what zdr runs with --threads 1).
        const BARE_CURRENT: &str = "bare hyper, current-thread runtime";
        // The fair pair: an app as users write one (`Server::service` with
        // a `tower::service_fn`) and bare hyper on a current-thread runtime,
        // both answering the same static bytes.
        const ZDR_HELLO: &str = "zdr, static hello (Server::service + service_fn)";
        const BARE_HELLO: &str = "bare hyper, current-thread, static hello";
        for (name, kind, bare_threads, hello) in [
            ("zdr", Kind::Zdr { preload: false }, "1", false),
            (Kind::Bare.name(), Kind::Bare, "1", false),
            (BARE_CURRENT, Kind::Bare, "0", false),
            (ZDR_HELLO, Kind::Zdr { preload: false }, "1", true),
            (BARE_HELLO, Kind::Bare, "0", true),
        ] {
            eprintln!("instructions: {name}");
            let dir = self.dir();
            match instructions_per_request(kind, bare_threads, hello, &dir) {
                Ok((ir, where_)) => {
                    counts.insert(name, ir);
                    parts.insert(name, where_);
                }
                Err(why) => self.skip("instructions", name, &why, 3),
            }
            let _ = std::fs::remove_dir_all(&dir);
        }
        let bare = counts.get(Kind::Bare.name()).copied();
        let bare_hello = counts.get(BARE_HELLO).copied();
        for (name, ir) in &counts {
            // Each pair against its own bare hyper.
            let against = if name.contains("hello") {
                bare_hello
            } else {
                bare
            };
            let ratio = against.map(|b| *ir as f64 / b as f64);
            self.row(
                "instructions",
                name,
                vec![
                    ir.to_string(),
                    ratio
                        .map(|r| format!("{r:.2}"))
                        .unwrap_or_else(|| "-".into()),
                    "4000".into(),
                ],
                json!({ "instructions_per_request": ir, "over_bare": ratio, "requests": 4000 }),
            );
        }
        // Where the fair pair's instructions go: zdr's own functions one
        // by one, the rest by crate, against bare hyper's.
        let (Some(zdr), Some(bare)) = (parts.get(ZDR_HELLO), parts.get(BARE_HELLO)) else {
            return;
        };
        let mut rows: Vec<(&String, u64, u64)> = zdr
            .keys()
            .chain(bare.keys())
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .map(|part| {
                let z = zdr.get(part).copied().unwrap_or(0);
                let b = bare.get(part).copied().unwrap_or(0);
                (part, z, b)
            })
            .filter(|(_, z, b)| z.max(b) >= &10)
            .collect();
        rows.sort_by_key(|(_, z, b)| std::cmp::Reverse(z.abs_diff(*b)));
        for (part, z, b) in rows {
            self.row(
                "instructions_where",
                part,
                vec![
                    z.to_string(),
                    b.to_string(),
                    format!("{:+}", z as i64 - b as i64),
                ],
                json!({ "zdr": z, "bare_hyper": b }),
            );
        }
    }

    /// Memory per idle keep-alive connection: the serving process's PSS
    /// growth over N connections that each made one request.
    pub fn conn_memory(&mut self) {
        let n = if self.opts.quick { 2000 } else { 5000 };
        for kind in [Kind::Zdr { preload: false }, Kind::Bare] {
            let name = kind.name();
            eprintln!("connection memory: {name}");
            let extra: &[&str] = match kind {
                Kind::Zdr { .. } => &["--worker-connections", "20000", "--keep-alive", "600"],
                _ => &[],
            };
            let server = match self.start(kind, extra, &[]) {
                Ok(s) => s,
                Err(why) => {
                    self.skip("conn_memory", name, &why, 3);
                    continue;
                }
            };
            let serving: Vec<u32> = match kind {
                Kind::Bare => vec![server.pid()],
                _ => children_of(server.pid()),
            };
            for _ in 0..200 {
                let _ = get(server.addr, "/");
            }
            let before = pss_kib(&serving);
            let mut held = Vec::with_capacity(n);
            for _ in 0..n {
                match one_request_kept(server.addr) {
                    Ok(s) => held.push(s),
                    Err(e) => {
                        eprintln!("  stopped at {} connections: {e}", held.len());
                        break;
                    }
                }
            }
            // Every worker's growth: the accept queue spreads connections.
            let after = pss_kib(&serving);
            let per = (after.saturating_sub(before)) as f64 / held.len().max(1) as f64;
            self.row(
                "conn_memory",
                name,
                vec![format!("{per:.1}"), held.len().to_string(), format!("{}", (after - before.min(after)) / 1024)],
                json!({ "kib_per_connection": per, "connections": held.len(), "pss_growth_kib": after.saturating_sub(before) }),
            );
            drop(held);
        }
    }
}

/// Starts a server with its output dropped, to die with the harness.
fn spawn_quiet(cmd: &mut Command) -> Result<std::process::Child, String> {
    super::die_with_harness(cmd);
    cmd.stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| e.to_string())
}

/// A process's CPU time in milliseconds: its own (utime + stime) and its
/// reaped children's (cutime + cstime), from `/proc/PID/stat`.
fn cpu_ms(pid: u32) -> Option<(f64, f64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, after) = stat.rsplit_once(')')?;
    // After the name: state is field 3, utime field 14 ... cstime field 17.
    let f: Vec<f64> = after
        .split_whitespace()
        .skip(11)
        .take(4)
        .filter_map(|v| v.parse().ok())
        .collect();
    let tick = 1000.0 / nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK).ok()?? as f64;
    (f.len() == 4).then(|| ((f[0] + f[1]) * tick, (f[2] + f[3]) * tick))
}

/// Runs `lives` worker lives one after another (`--workers 1
/// --max-requests 1`: one request, then wait until its worker is replaced
/// and reaped); the master's CPU and its reaped workers' over them, in ms.
fn worker_life_cpu(preload: bool, dir: &Path, lives: u32) -> Result<(f64, f64), String> {
    std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    let addr = super::free_addr();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_zdr"));
    cmd.args(["serve", "--workers", "1", "--max-requests", "1"])
        .args(["--log-level", "warning", "--bind", &addr.to_string()])
        .arg("--control-socket")
        .arg(dir.join("control.sock"));
    if preload {
        cmd.arg("--preload");
    }
    let mut child = spawn_quiet(&mut cmd)?;
    let master = child.id();
    let result = (|| {
        let deadline = Instant::now() + Duration::from_secs(60);
        // The one worker, once it alone is serving (after any recycle the
        // first answers caused).
        let settled = |from: Option<u32>| -> Result<u32, String> {
            let until = Instant::now() + Duration::from_secs(30);
            loop {
                let now = children_of(master);
                if let [pid] = now[..] {
                    if Some(pid) != from {
                        return Ok(pid);
                    }
                }
                if Instant::now() > until {
                    return Err(format!("no single new worker within 30 s: {now:?}"));
                }
                std::thread::sleep(Duration::from_millis(2));
            }
        };
        while get(addr, "/").ok() != Some(200) {
            if Instant::now() > deadline {
                return Err("not serving within 60 s".to_owned());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let mut worker = settled(None)?;
        // The first life's end, so that the count starts with a fresh one.
        if get(addr, "/").ok() == Some(200) {
            worker = settled(Some(worker))?;
        }
        let before = cpu_ms(master).ok_or("no /proc stat for the master")?;
        for _ in 0..lives {
            if get(addr, "/").ok() != Some(200) {
                return Err("a request failed".to_owned());
            }
            worker = settled(Some(worker))?;
        }
        let after = cpu_ms(master).ok_or("no /proc stat for the master")?;
        Ok((after.0 - before.0, after.1 - before.1))
    })();
    let _ = child.kill();
    let _ = child.wait();
    result
}

/// Opens a connection, sends one keep-alive request, reads the whole
/// answer, and keeps the connection.
fn one_request_kept(addr: SocketAddr) -> std::io::Result<std::net::TcpStream> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    s.write_all(b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n")?;
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    loop {
        let n = s.read(&mut buf)?;
        if n == 0 {
            return Err(std::io::Error::other("closed"));
        }
        got.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&got);
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let length: usize = head
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse().ok())?
                })
                .unwrap_or(0);
            if body.len() >= length {
                return Ok(s);
            }
        }
    }
}

/// The PSS of these processes, in KiB.
fn pss_kib(pids: &[u32]) -> u64 {
    pids.iter()
        .map(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
                .unwrap_or_default()
                .lines()
                .find_map(|l| l.strip_prefix("Pss:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
                .unwrap_or(0)
        })
        .sum()
}

/// Starts `kind` under callgrind with one serving thread, warms it up and
/// counts the instructions its serving process spends on 4,000 requests.
fn instructions_per_request(
    kind: Kind,
    bare_threads: &str,
    hello: bool,
    dir: &Path,
) -> Result<(u64, BTreeMap<String, u64>), String> {
    std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    let addr = super::free_addr();
    let out_file = dir.join("cg.%p");
    let mut cmd = Command::new("valgrind");
    cmd.arg("--tool=callgrind")
        .arg(format!("--callgrind-out-file={}", out_file.display()));
    match kind {
        Kind::Bare => {
            cmd.arg(std::env::current_exe().map_err(|e| e.to_string())?)
                .args(["--as-bare", &addr.to_string(), bare_threads]);
            if hello {
                cmd.arg("hello");
            }
        }
        _ => {
            cmd.arg("--trace-children=yes");
            if hello {
                cmd.arg(std::env::current_exe().map_err(|e| e.to_string())?)
                    .env(super::HELLO_APP_ENV, "1");
            } else {
                cmd.arg(env!("CARGO_BIN_EXE_zdr"));
            }
            cmd.args([
                "serve",
                "--workers",
                "1",
                "--threads",
                "1",
                "--log-level",
                "warning",
            ])
            .args(["--bind", &addr.to_string(), "--control-socket"])
            .arg(dir.join("control.sock"));
        }
    }
    let mut child = spawn_quiet(&mut cmd)?;
    let result = (|| {
        let deadline = Instant::now() + Duration::from_secs(300);
        while get(addr, "/").ok() != Some(200) {
            if Instant::now() > deadline {
                return Err("not serving within 300 s under valgrind".to_owned());
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        let serving = match kind {
            Kind::Bare => child.id(),
            _ => *children_of(child.id())
                .first()
                .ok_or("no worker under valgrind")?,
        };
        let h2load = |n: &str| {
            Command::new("h2load")
                .args(["--h1", "-n", n, "-c", "4"])
                .arg(format!("http://{addr}/"))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .map_err(|e| e.to_string())
        };
        let dump = || {
            Command::new("callgrind_control")
                .args(["-d", &serving.to_string()])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .map_err(|e| e.to_string())
        };
        h2load("1000")?;
        dump()?;
        h2load("4000")?;
        dump()?;
        // The newest dump of the serving process holds the 4,000 requests.
        let prefix = format!("cg.{serving}.");
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let mut dumps: Vec<(u32, std::path::PathBuf)> = std::fs::read_dir(dir)
                .map_err(|e| e.to_string())?
                .flatten()
                .filter_map(|e| {
                    let name = e.file_name().to_string_lossy().into_owned();
                    let part = name.strip_prefix(&prefix)?.parse().ok()?;
                    Some((part, e.path()))
                })
                .collect();
            dumps.sort();
            if let Some((2.., path)) = dumps.last() {
                let text = std::fs::read_to_string(path).map_err(|e| e.to_string())?;
                if let Some(ir) = text.lines().find_map(|l| {
                    l.strip_prefix("summary:")
                        .or_else(|| l.strip_prefix("totals:"))
                        .and_then(|v| v.trim().parse::<u64>().ok())
                }) {
                    let parts = exclusive_by_part(&text)
                        .into_iter()
                        .map(|(part, ir)| (part, ir / 4000))
                        .collect();
                    return Ok((ir / 4000, parts));
                }
            }
            if Instant::now() > deadline {
                return Err("no callgrind dump".into());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    })();
    let group = nix::unistd::Pid::from_raw(child.id() as i32);
    let _ = nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGTERM);
    let deadline = Instant::now() + Duration::from_secs(30);
    while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGKILL);
    let _ = child.wait();
    result
}

/// A callgrind profile's instructions by where they ran, each function's
/// own (exclusive) cost: zdr's own functions one by one (`zdr::…`), and
/// the rest by crate (`hyper`, `tokio`, …), the C library as `libc`.
/// Cost lines after a `calls=` line are a call's inclusive cost and are
/// skipped; `fn=`, `cfn=`, `ob=` and `cob=` may define a compressed name.
fn exclusive_by_part(profile: &str) -> BTreeMap<String, u64> {
    let mut fns: BTreeMap<String, String> = BTreeMap::new();
    let mut objs: BTreeMap<String, String> = BTreeMap::new();
    let mut current: Option<String> = None;
    let mut object = String::new();
    let mut after_call = false;
    let mut parts: BTreeMap<String, u64> = BTreeMap::new();
    // `(id) name` or `(id)`: the name, remembered by its id.
    fn named(rest: &str, names: &mut BTreeMap<String, String>) -> Option<String> {
        let rest = rest.strip_prefix('(')?;
        let (id, name) = rest.split_once(')')?;
        let name = name.trim();
        if !name.is_empty() {
            names.insert(id.to_owned(), name.to_owned());
        }
        names.get(id).cloned()
    }
    for line in profile.lines() {
        if let Some(rest) = line.strip_prefix("fn=") {
            current = named(rest, &mut fns);
        } else if let Some(rest) = line.strip_prefix("cfn=") {
            named(rest, &mut fns);
        } else if let Some(rest) = line.strip_prefix("ob=") {
            object = named(rest, &mut objs).unwrap_or_default();
        } else if let Some(rest) = line.strip_prefix("cob=") {
            named(rest, &mut objs);
        } else if line.starts_with("calls=") {
            after_call = true;
        } else if line.starts_with(|c: char| c.is_ascii_digit() || c == '+' || c == '-' || c == '*')
        {
            if std::mem::take(&mut after_call) {
                continue;
            }
            let (Some(name), Some(ir)) = (
                &current,
                line.split_whitespace()
                    .last()
                    .and_then(|c| c.parse::<u64>().ok()),
            ) else {
                continue;
            };
            let part = if object.contains("libc.so") || object.contains("ld-linux") {
                "libc".to_owned()
            } else {
                let bare = name.trim_start_matches(['<', '&']);
                if bare.starts_with("zdr::") {
                    // Generic arguments dropped: one row per function.
                    let mut depth = 0;
                    bare.chars()
                        .filter(|c| {
                            match c {
                                '<' => depth += 1,
                                // The `>` closing the leading `<` too.
                                '>' => depth = (depth - 1).max(0),
                                _ => return depth == 0,
                            }
                            false
                        })
                        .collect()
                } else {
                    bare.split("::").next().unwrap_or(bare).to_owned()
                }
            };
            *parts.entry(part).or_default() += ir;
        }
    }
    parts
}

/// One sample's value in Prometheus text, by its name and labels.
fn sample(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}
