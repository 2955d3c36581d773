//! A small load generator that accounts for every request: concurrent
//! keep-alive clients and one-request-per-connection clients, run until
//! stopped.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::task::JoinHandle;

/// What a load run saw.
#[derive(Debug, Default)]
pub struct Report {
    pub ok: u64,
    pub failed: u64,
    /// The first few failures, with their cause.
    pub failures: Vec<String>,
    /// Requests answered per worker pid.
    pub by_pid: BTreeMap<u32, u64>,
    pub generations: BTreeSet<u64>,
    /// Latency of every successful request, in microseconds.
    pub latencies_us: Vec<u32>,
    /// Of the failures, the answers with status 500 (the demo app's
    /// injected errors), by the generation they name.
    pub errors_by_generation: BTreeMap<u64, u64>,
}

impl Report {
    fn merge(&mut self, other: Report) {
        self.ok += other.ok;
        self.failed += other.failed;
        for f in other.failures {
            if self.failures.len() < 10 {
                self.failures.push(f);
            }
        }
        for (pid, n) in other.by_pid {
            *self.by_pid.entry(pid).or_default() += n;
        }
        self.generations.extend(other.generations);
        for (g, n) in other.errors_by_generation {
            *self.errors_by_generation.entry(g).or_default() += n;
        }
        self.latencies_us.extend(other.latencies_us);
    }

    /// The latency at quantile `q` (0.0..=1.0), in milliseconds.
    pub fn latency_ms(&mut self, q: f64) -> f64 {
        if self.latencies_us.is_empty() {
            return 0.0;
        }
        self.latencies_us.sort_unstable();
        let i = ((self.latencies_us.len() - 1) as f64 * q).round() as usize;
        f64::from(self.latencies_us[i]) / 1000.0
    }

    fn fail(&mut self, why: String) {
        self.failed += 1;
        if self.failures.len() < 10 {
            self.failures.push(why);
        }
    }

    /// Counts one answer; returns the generation of a successful one.
    fn record(&mut self, status: u16, body: &[u8]) -> Option<u64> {
        if status != 200 {
            if status == 500 {
                let text = String::from_utf8_lossy(body);
                let generation = text
                    .split(|c: char| !c.is_ascii_alphanumeric())
                    .skip_while(|w| *w != "generation")
                    .nth(1)
                    .and_then(|g| g.parse().ok())
                    .unwrap_or(0);
                *self.errors_by_generation.entry(generation).or_default() += 1;
            }
            self.fail(format!("status {status}"));
            return None;
        }
        self.ok += 1;
        let text = String::from_utf8_lossy(body);
        let mut generation = None;
        for kv in text.split_whitespace() {
            if let Some(p) = kv.strip_prefix("pid=").and_then(|p| p.parse().ok()) {
                *self.by_pid.entry(p).or_default() += 1;
            }
            if let Some(g) = kv.strip_prefix("generation=").and_then(|g| g.parse().ok()) {
                self.generations.insert(g);
                generation = Some(g);
            }
        }
        Some(generation.unwrap_or(0))
    }
}

/// Successful requests so far, per generation: shared by the clients, so
/// that a test can wait for traffic to flow after an event.
#[derive(Clone, Default)]
pub struct Progress(Arc<Mutex<BTreeMap<u64, u64>>>);

impl Progress {
    fn count(&self, generation: u64) {
        *self.0.lock().unwrap().entry(generation).or_default() += 1;
    }

    /// Successful requests answered by `generation`.
    pub fn of(&self, generation: u64) -> u64 {
        self.0
            .lock()
            .unwrap()
            .get(&generation)
            .copied()
            .unwrap_or(0)
    }

    /// Successful requests answered by any generation.
    pub fn total(&self) -> u64 {
        self.0.lock().unwrap().values().sum()
    }
}

/// A running load.
pub struct Load {
    stop: Arc<AtomicBool>,
    tasks: Vec<JoinHandle<Report>>,
    progress: Progress,
}

/// Starts `keepalive` clients that reuse connections and `fresh` clients
/// that open one connection per request, all sending `GET path`.
pub fn start(addr: SocketAddr, path: &str, keepalive: usize, fresh: usize) -> Load {
    let stop = Arc::new(AtomicBool::new(false));
    let progress = Progress::default();
    let mut tasks = Vec::new();
    for i in 0..keepalive + fresh {
        let stop = Arc::clone(&stop);
        let progress = progress.clone();
        let path = path.to_owned();
        let reuse = i < keepalive;
        tasks.push(tokio::spawn(async move {
            client(addr, path, reuse, stop, progress).await
        }));
    }
    Load {
        stop,
        tasks,
        progress,
    }
}

impl Load {
    /// Successful requests so far, live.
    pub fn progress(&self) -> Progress {
        self.progress.clone()
    }

    /// Waits (up to a generous bound) until `n` more requests than now have
    /// succeeded: traffic still flows.
    pub fn wait_for_more(&self, n: u64) {
        let from = self.progress.total();
        assert!(
            wait_until(Duration::from_secs(30), || self.progress.total()
                >= from + n),
            "traffic stopped: {} requests in 30 s",
            self.progress.total() - from
        );
    }

    /// Waits until `generation` has answered at least `n` requests.
    pub fn wait_for_generation(&self, generation: u64, n: u64) {
        assert!(
            wait_until(Duration::from_secs(30), || self.progress.of(generation)
                >= n),
            "generation {generation} answered only {} requests in 30 s",
            self.progress.of(generation)
        );
    }

    /// Stops the clients (each finishes its request in flight) and sums up.
    pub async fn stop(self) -> Report {
        self.stop.store(true, Ordering::Relaxed);
        let mut total = Report::default();
        for t in self.tasks {
            total.merge(t.await.expect("load client panicked"));
        }
        total
    }
}

type Sender = http1::SendRequest<Empty<Bytes>>;

async fn connect(addr: SocketAddr) -> Result<Sender, String> {
    let stream = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let _ = stream.set_nodelay(true);
    let (sender, conn) = http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    tokio::spawn(conn);
    Ok(sender)
}

async fn client(
    addr: SocketAddr,
    path: String,
    reuse: bool,
    stop: Arc<AtomicBool>,
    progress: Progress,
) -> Report {
    let mut report = Report::default();
    let mut sender: Option<Sender> = None;
    while !stop.load(Ordering::Relaxed) {
        let connect_started = std::time::Instant::now();
        let mut s = match sender.take() {
            Some(s) if !s.is_closed() => s,
            _ => match connect(addr).await {
                Ok(s) => s,
                Err(e) => {
                    report.fail(e);
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
        };
        let mut req = hyper::Request::get(path.as_str()).header("host", "test");
        if !reuse {
            req = req.header("connection", "close");
        }
        let req = req.body(Empty::new()).expect("valid request");
        let result = tokio::time::timeout(Duration::from_secs(30), async {
            s.ready().await.map_err(|e| format!("ready: {e}"))?;
            let res = s
                .send_request(req)
                .await
                .map_err(|e| format!("send: {e}"))?;
            let status = res.status().as_u16();
            let close = res
                .headers()
                .get("connection")
                .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"close"));
            let body = res
                .into_body()
                .collect()
                .await
                .map_err(|e| format!("body: {e}"))?
                .to_bytes();
            Ok::<_, String>((status, close, body))
        })
        .await
        .unwrap_or_else(|_| Err("timeout".to_owned()));
        match result {
            Ok((status, close, body)) => {
                if let Some(generation) = report.record(status, &body) {
                    progress.count(generation);
                }
                if status == 200 {
                    report
                        .latencies_us
                        .push(connect_started.elapsed().as_micros().min(u32::MAX as u128) as u32);
                }
                if reuse && !close {
                    sender = Some(s);
                }
            }
            Err(e) => report.fail(e),
        }
    }
    report
}

/// Polls `cond` every 20 ms until it holds or `timeout` passes (this file
/// stands alone: the benchmark harness includes it too).
fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + timeout;
    while !cond() {
        if std::time::Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    true
}
