//! Open-loop overload: requests offered at a fixed rate whatever the
//! server answers (as clients arriving from outside do, unlike a closed
//! loop of connections that each wait for their answer), each on a new
//! connection, each given up after a client timeout; and a health probe
//! beside them, every 100 ms.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::{Bench, Kind, WORKERS};

/// What each system's workers serve, one request at a time each: 40
/// requests a second in all, with 2 workers.
const HANDLER_MS: u64 = 50;
const CAPACITY: f64 = WORKERS as f64 * 1000.0 / HANDLER_MS as f64;

/// The loads offered, as multiples of capacity; the first is the
/// unloaded baseline the others' p99 is set against.
const LOADS: [f64; 4] = [0.25, 1.0, 3.0, 10.0];

impl Bench {
    /// Overload: a 50 ms handler that holds its worker (a blocking call in
    /// a zdr handler on a current-thread runtime, `time.sleep` in a
    /// one-thread gunicorn gthread worker and in an async uvicorn app),
    /// offered 0.25x, 1x, 3x and 10x capacity open-loop, each on a fresh
    /// server; goodput, latency of the answered, shedding and the health
    /// probe's answers.
    pub fn overload(&mut self) {
        let secs = std::env::var("OVERLOAD_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(if self.opts.quick { 5 } else { 20 });
        let block = format!("/block?ms={HANDLER_MS}");
        let slow = format!("/slow?ms={HANDLER_MS}");
        let systems: [(&str, Kind, &[&str], &str, &str); 4] = [
            (
                "zdr --max-queue-time 0.01",
                Kind::Zdr { preload: false },
                &["--max-queue-time", "0.01", "--threads", "1"],
                &block,
                "/_zdr/live",
            ),
            (
                "zdr (no shedding)",
                Kind::Zdr { preload: false },
                &["--threads", "1"],
                &block,
                "/_zdr/live",
            ),
            (
                "gunicorn gthread --threads 1",
                Kind::Gunicorn { gthread: true },
                &["--threads", "1"],
                &slow,
                "/",
            ),
            ("uvicorn", Kind::Uvicorn, &[], &block, "/"),
        ];
        for (name, kind, extra, path, probe) in systems {
            if std::env::var("OVERLOAD_ONLY").is_ok_and(|only| !name.contains(&only)) {
                continue;
            }
            let mut unloaded_p99 = None;
            for load in LOADS {
                eprintln!("overload: {name}, {load}x");
                let server = match self.start(kind, extra, &[]) {
                    Ok(s) => s,
                    Err(why) => {
                        self.skip("overload", name, &why, 7);
                        break;
                    }
                };
                let rate = CAPACITY * load;
                let o = run(
                    &self.rt,
                    server.addr,
                    path,
                    probe,
                    rate,
                    Duration::from_secs(secs),
                );
                drop(server);
                let goodput = o.ok_latencies_us.len() as f64 / secs as f64;
                let p50 = Outcome::quantile_ms(&o.ok_latencies_us, 0.50);
                let p99 = Outcome::quantile_ms(&o.ok_latencies_us, 0.99);
                let base = *unloaded_p99.get_or_insert(p99);
                let health_p99 = Outcome::quantile_ms(&o.probe_latencies_us, 0.99);
                let health_max = Outcome::quantile_ms(&o.probe_latencies_us, 1.0);
                let cells = vec![
                    format!("{load}x ({rate:.0}/s)"),
                    format!("{goodput:.1} ({:.0} %)", 100.0 * goodput / CAPACITY),
                    format!("{p50:.0} / {p99:.0}"),
                    format!("{:.1}", if base > 0.0 { p99 / base } else { 0.0 }),
                    format!(
                        "{:.0} ({})",
                        o.shed as f64 / secs as f64,
                        if o.shed == o.shed_with_retry_after {
                            "all"
                        } else {
                            "not all"
                        }
                    ),
                    format!("{} / {}", o.timed_out, o.errors + o.other_status),
                    format!("{health_p99:.0} / {health_max:.0} ({})", o.probe_failed),
                ];
                let record = json!({
                    "load": load, "offered_per_s": rate, "secs": secs, "offered": o.offered,
                    "goodput_per_s": goodput, "of_capacity": goodput / CAPACITY,
                    "p50_ms": p50, "p99_ms": p99, "p99_over_unloaded": p99 / base.max(f64::MIN_POSITIVE),
                    "shed": o.shed, "shed_with_retry_after": o.shed_with_retry_after,
                    "timed_out": o.timed_out, "errors": o.errors, "other_status": o.other_status,
                    "health_p99_ms": health_p99, "health_max_ms": health_max,
                    "health_failed": o.probe_failed, "client_timeout_s": CLIENT_TIMEOUT.as_secs(),
                });
                self.row("overload", name, cells, record);
            }
        }
    }
}

/// How long a client waits for its answer before giving up (a load
/// balancer's or a browser's patience is longer; a user's is not).
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(2);

/// How often the health probe asks.
const PROBE_EVERY: Duration = Duration::from_millis(100);

/// What one overload run saw.
#[derive(Debug, Default, Clone)]
pub struct Outcome {
    /// Requests offered.
    pub offered: u64,
    /// Answered 200 within the client timeout, with their latency (µs).
    pub ok_latencies_us: Vec<u64>,
    /// Answered 503 (shed), with `Retry-After` or not.
    pub shed: u64,
    pub shed_with_retry_after: u64,
    /// Any other status.
    pub other_status: u64,
    /// Given up at the client timeout.
    pub timed_out: u64,
    /// Refused, reset or closed unanswered.
    pub errors: u64,
    /// The health probe: latencies of its 200s (µs), and its failures
    /// (other status, timeout, error).
    pub probe_latencies_us: Vec<u64>,
    pub probe_failed: u64,
}

impl Outcome {
    /// The latency at quantile `q` of `values` (µs), in ms.
    pub fn quantile_ms(values: &[u64], q: f64) -> f64 {
        if values.is_empty() {
            return 0.0;
        }
        let mut v = values.to_vec();
        v.sort_unstable();
        let i = ((v.len() - 1) as f64 * q).round() as usize;
        v[i] as f64 / 1000.0
    }
}

/// What one request came to.
enum Answer {
    Status(u16, bool),
    TimedOut,
    Failed,
}

/// One request on a new connection: its status (and whether it carried
/// `Retry-After`), or how it failed.
async fn ask(addr: SocketAddr, path: &str) -> Answer {
    let exchange = async {
        let mut s = TcpStream::connect(addr).await?;
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await?;
        let mut raw = Vec::with_capacity(512);
        s.read_to_end(&mut raw).await?;
        let text = String::from_utf8_lossy(&raw);
        let status = text
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse::<u16>().ok())
            .ok_or_else(|| std::io::Error::other("no status"))?;
        let retry_after = text
            .split("\r\n\r\n")
            .next()
            .is_some_and(|head| head.to_ascii_lowercase().contains("\r\nretry-after:"));
        Ok::<_, std::io::Error>((status, retry_after))
    };
    match tokio::time::timeout(CLIENT_TIMEOUT, exchange).await {
        Ok(Ok((status, retry_after))) => Answer::Status(status, retry_after),
        Ok(Err(_)) => Answer::Failed,
        Err(_) => Answer::TimedOut,
    }
}

/// Offers `rate` requests a second of `path` for `secs`, probing
/// `probe_path` beside them; returns once every request has its answer
/// or has timed out.
pub fn run(
    runtime: &tokio::runtime::Runtime,
    addr: SocketAddr,
    path: &str,
    probe_path: &str,
    rate: f64,
    secs: Duration,
) -> Outcome {
    runtime.block_on(async {
        let outcome = Arc::new(Mutex::new(Outcome::default()));
        let start = Instant::now();
        let end = start + secs;
        let mut tasks = Vec::new();
        // The probe.
        {
            let outcome = Arc::clone(&outcome);
            let probe_path = probe_path.to_owned();
            tasks.push(tokio::spawn(async move {
                let mut tick = tokio::time::interval(PROBE_EVERY);
                while Instant::now() < end {
                    tick.tick().await;
                    let began = Instant::now();
                    let answer = ask(addr, &probe_path).await;
                    let took = began.elapsed().as_micros() as u64;
                    let mut o = outcome.lock().expect("outcome");
                    match answer {
                        Answer::Status(200, _) => o.probe_latencies_us.push(took),
                        _ => o.probe_failed += 1,
                    }
                }
            }));
        }
        // The load: request n leaves at start + n / rate.
        let gap = Duration::from_secs_f64(1.0 / rate);
        let mut n: u32 = 0;
        loop {
            let at = start + gap * n;
            if at >= end {
                break;
            }
            tokio::time::sleep_until(at.into()).await;
            n += 1;
            let outcome = Arc::clone(&outcome);
            let path = path.to_owned();
            tasks.push(tokio::spawn(async move {
                let answer = ask(addr, &path).await;
                let took = at.elapsed().as_micros() as u64;
                let mut o = outcome.lock().expect("outcome");
                o.offered += 1;
                match answer {
                    Answer::Status(200, _) => o.ok_latencies_us.push(took),
                    Answer::Status(503, retry_after) => {
                        o.shed += 1;
                        o.shed_with_retry_after += u64::from(retry_after);
                    }
                    Answer::Status(..) => o.other_status += 1,
                    Answer::TimedOut => o.timed_out += 1,
                    Answer::Failed => o.errors += 1,
                }
            }));
        }
        for t in tasks {
            let _ = t.await;
        }
        let o = outcome.lock().expect("outcome").clone();
        o
    })
}
