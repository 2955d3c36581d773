//! Prometheus metrics, aggregated over all workers by the master so that
//! one scrape sees the whole server. Workers count into their scoreboard
//! slots; the master adds what exited workers had counted, and encodes a
//! [`Snapshot`] with `prometheus-client`.

use std::collections::BTreeMap;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, NoLabelSet};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

/// Upper bounds, in seconds, of the request duration histogram's buckets.
pub const REQUEST_BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];

/// Upper bounds, in seconds, of the reload duration histogram's buckets.
pub const RELOAD_BUCKETS: [f64; 10] = [0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];

/// Request counters: by status class and by duration.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RequestCounters {
    /// Responses by status class: 1xx to 5xx.
    pub by_class: [u64; 5],
    /// Responses by duration bucket (not cumulative); the last counts those
    /// above every bound.
    pub buckets: [u64; REQUEST_BUCKETS.len() + 1],
    /// Sum of durations, in microseconds.
    pub sum_us: u64,
}

/// A client too slow for one of the timeouts, which closes its connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientTimeout {
    /// No complete request head within `--header-timeout`.
    Header = 0,
    /// A request body silent for `--body-timeout`.
    Body = 1,
    /// A response the client did not take for `--send-timeout`.
    Send = 2,
}

impl ClientTimeout {
    /// Every kind, in the order of [`Snapshot::client_timeouts`].
    pub const ALL: [ClientTimeout; 3] = [
        ClientTimeout::Header,
        ClientTimeout::Body,
        ClientTimeout::Send,
    ];

    /// Its label in the metrics.
    pub fn name(self) -> &'static str {
        match self {
            ClientTimeout::Header => "header",
            ClientTimeout::Body => "body",
            ClientTimeout::Send => "send",
        }
    }
}

/// What became of a leaving worker's attempt to hand a keep-alive
/// connection to a sibling.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandoffOutcome {
    /// Queued at once.
    Sent = 0,
    /// Queued after waiting for room in a full queue.
    SentAfterWait = 1,
    /// The queue stayed full (or no sibling stayed ready): the leaving
    /// worker kept the connection and answered its next request itself,
    /// with `Connection: close`.
    FellBack = 2,
    /// The send failed: kept and answered as for `FellBack`.
    Failed = 3,
}

impl HandoffOutcome {
    /// Every outcome, in the order of [`Snapshot::handoffs`].
    pub const ALL: [HandoffOutcome; 4] = [
        HandoffOutcome::Sent,
        HandoffOutcome::SentAfterWait,
        HandoffOutcome::FellBack,
        HandoffOutcome::Failed,
    ];

    /// Its label in the metrics.
    pub fn name(self) -> &'static str {
        match self {
            HandoffOutcome::Sent => "sent",
            HandoffOutcome::SentAfterWait => "sent_after_wait",
            HandoffOutcome::FellBack => "fell_back",
            HandoffOutcome::Failed => "failed",
        }
    }
}

/// How a crowded worker made room for waiting clients (see
/// `http::placement`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MadeRoom {
    /// An idle keep-alive connection closed.
    IdleClosed = 0,
    /// A response said `Connection: close` so that its connection takes
    /// its turn again.
    Rotated = 1,
}

impl MadeRoom {
    /// Every way, in the order of [`Snapshot::made_room`].
    pub const ALL: [MadeRoom; 2] = [MadeRoom::IdleClosed, MadeRoom::Rotated];

    /// Its label in the metrics.
    pub fn name(self) -> &'static str {
        match self {
            MadeRoom::IdleClosed => "idle_closed",
            MadeRoom::Rotated => "rotated",
        }
    }
}

/// Why a worker was replaced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RestartCause {
    /// It exited (or could not start) without being asked to.
    Crash = 0,
    /// It stopped sending heartbeats for `--timeout`.
    Timeout = 1,
    /// It reached its `--max-requests` limit.
    MaxRequests = 2,
    /// It owned more than `--max-worker-memory`.
    Memory = 3,
}

impl RestartCause {
    /// Every cause, in the order of [`Snapshot::restarts`].
    pub const ALL: [RestartCause; 4] = [
        RestartCause::Crash,
        RestartCause::Timeout,
        RestartCause::MaxRequests,
        RestartCause::Memory,
    ];

    /// Its label in the metrics.
    pub fn name(self) -> &'static str {
        match self {
            RestartCause::Crash => "crash",
            RestartCause::Timeout => "timeout",
            RestartCause::MaxRequests => "max_requests",
            RestartCause::Memory => "memory",
        }
    }

    /// Whether it is a recycle: a healthy worker replaced by policy, which
    /// counts against the surge budget.
    pub fn is_recycle(self) -> bool {
        matches!(self, RestartCause::MaxRequests | RestartCause::Memory)
    }
}

impl RequestCounters {
    /// Adds another worker's counters.
    pub fn add(&mut self, other: &RequestCounters) {
        for (a, b) in self.by_class.iter_mut().zip(other.by_class) {
            *a += b;
        }
        for (a, b) in self.buckets.iter_mut().zip(other.buckets) {
            *a += b;
        }
        self.sum_us += other.sum_us;
    }

    /// The bucket a duration falls in.
    pub fn bucket(seconds: f64) -> usize {
        REQUEST_BUCKETS
            .iter()
            .position(|b| seconds <= *b)
            .unwrap_or(REQUEST_BUCKETS.len())
    }
}

/// A histogram as counts per bucket (not cumulative), with sum.
#[derive(Debug, Clone, Default)]
pub struct Histogram {
    /// Counts per bucket; one more than the bounds, for +Inf.
    pub counts: Vec<u64>,
    /// Sum of observations.
    pub sum: f64,
}

impl Histogram {
    /// An empty histogram over `bounds`.
    pub fn new(bounds: &[f64]) -> Histogram {
        Histogram {
            counts: vec![0; bounds.len() + 1],
            sum: 0.0,
        }
    }

    /// Records one observation.
    pub fn observe(&mut self, bounds: &[f64], value: f64) {
        let i = bounds
            .iter()
            .position(|b| value <= *b)
            .unwrap_or(bounds.len());
        self.counts[i] += 1;
        self.sum += value;
    }
}

/// Everything a scrape reports.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// Requests over the server's life.
    pub requests: RequestCounters,
    /// Connections open now.
    pub connections: u64,
    /// Of those, idle HTTP/1.1 connections parked out of their tasks.
    pub parked: u64,
    /// Requests being answered now.
    pub in_flight: u64,
    /// Serving workers with at least one request in flight now.
    pub busy_workers: u64,
    /// Serving workers (ready, accepting or about to be replaced).
    pub serving_workers: u64,
    /// Workers now, by (generation, state).
    pub workers: BTreeMap<(u64, String), u64>,
    /// Reloads that completed.
    pub reloads_completed: u64,
    /// Reloads that were rolled back.
    pub reloads_rolled_back: u64,
    /// How long reloads took, in seconds.
    pub reload_duration: Histogram,
    /// Canary steps judged: `[promoted, failed]`.
    pub canary_verdicts: [u64; 2],
    /// Workers in the canary being booted or watched now; 0 without one.
    pub canary_workers: u64,
    /// Workers restarted, by [`RestartCause`].
    pub restarts: [u64; 4],
    /// Connections closed for a client's slowness, by [`ClientTimeout`].
    pub client_timeouts: [u64; 3],
    /// Keep-alive connections a leaving worker handed to a sibling.
    pub connections_handed_over: u64,
    /// Handoff attempts, by [`HandoffOutcome`].
    pub handoffs: [u64; 4],
    /// Connections a crowded worker closed for waiting clients, by
    /// [`MadeRoom`].
    pub made_room: [u64; 2],
    /// Requests answered 504 at `--request-timeout`.
    pub request_timeouts: u64,
    /// Requests shed (answered 503) at `--max-queue-time`.
    pub requests_shed: u64,
}

/// The content type of the OpenMetrics text exposition.
pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The content type of Prometheus's classic text exposition.
pub const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Turns the OpenMetrics text (what the encoder writes) into Prometheus's
/// classic text format, for scrapers that do not ask for OpenMetrics: a
/// counter's `# HELP` and `# TYPE` name its samples' `_total` name, and
/// there is no `# EOF`.
pub fn to_prometheus_text(openmetrics: &str) -> String {
    let mut out = String::with_capacity(openmetrics.len());
    let counters: Vec<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.strip_suffix(" counter"))
        .collect();
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let renamed = ["# HELP ", "# TYPE "].iter().find_map(|prefix| {
            let rest = line.strip_prefix(prefix)?;
            let (name, tail) = rest.split_once(' ')?;
            counters
                .contains(&name)
                .then(|| format!("{prefix}{name}_total {tail}"))
        });
        match renamed {
            Some(line) => out.push_str(&line),
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

impl Snapshot {
    /// The OpenMetrics text exposition.
    pub fn encode(self) -> String {
        let mut registry = Registry::with_prefix("zdr");
        registry.register_collector(Box::new(self));
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &registry).is_err() {
            out.clear();
        }
        out
    }
}

/// Buckets as the encoder takes them: each bucket's own count (it
/// accumulates them itself), the last one's bound `f64::MAX`, which it
/// writes as `+Inf`.
fn buckets(counts: &[u64], bounds: &[f64]) -> Vec<(f64, u64)> {
    counts
        .iter()
        .zip(bounds.iter().copied().chain([f64::MAX]))
        .map(|(c, b)| (b, *c))
        .collect()
}

impl Collector for Snapshot {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let mut family = enc.encode_descriptor(
            "requests",
            "Requests answered, by status class",
            None,
            MetricType::Counter,
        )?;
        for (i, n) in self.requests.by_class.iter().enumerate() {
            let labels = [("class", format!("{}xx", i + 1))];
            ConstCounter::new(*n).encode(family.encode_family(&labels)?)?;
        }
        let count: u64 = self.requests.buckets.iter().sum();
        let request_buckets = buckets(&self.requests.buckets, &REQUEST_BUCKETS);
        enc.encode_descriptor(
            "request_duration_seconds",
            "Time to the response head",
            None,
            MetricType::Histogram,
        )?
        .encode_histogram::<NoLabelSet>(
            self.requests.sum_us as f64 / 1e6,
            count,
            &request_buckets,
            None,
        )?;
        ConstGauge::new(self.connections as i64).encode(enc.encode_descriptor(
            "connections",
            "Connections open now",
            None,
            MetricType::Gauge,
        )?)?;
        ConstGauge::new(self.parked as i64).encode(enc.encode_descriptor(
            "connections_parked",
            "Idle HTTP/1.1 connections parked out of their tasks now (counted in zdr_connections)",
            None,
            MetricType::Gauge,
        )?)?;
        ConstGauge::new(self.in_flight as i64).encode(enc.encode_descriptor(
            "requests_in_flight",
            "Requests being answered now",
            None,
            MetricType::Gauge,
        )?)?;
        ConstGauge::new(self.busy_workers as i64).encode(enc.encode_descriptor(
            "workers_busy",
            "Serving workers with a request in flight now (divide by zdr_workers_serving for a utilisation ratio)",
            None,
            MetricType::Gauge,
        )?)?;
        ConstGauge::new(self.serving_workers as i64).encode(enc.encode_descriptor(
            "workers_serving",
            "Workers that serve now",
            None,
            MetricType::Gauge,
        )?)?;
        let mut family = enc.encode_descriptor(
            "workers",
            "Worker processes, by generation and state",
            None,
            MetricType::Gauge,
        )?;
        for ((generation, state), n) in &self.workers {
            let labels = [
                ("generation", generation.to_string()),
                ("state", state.clone()),
            ];
            ConstGauge::new(*n as i64).encode(family.encode_family(&labels)?)?;
        }
        let mut family =
            enc.encode_descriptor("reloads", "Reloads, by outcome", None, MetricType::Counter)?;
        for (outcome, n) in [
            ("completed", self.reloads_completed),
            ("rolled_back", self.reloads_rolled_back),
        ] {
            ConstCounter::new(n).encode(family.encode_family(&[("outcome", outcome)])?)?;
        }
        let count: u64 = self.reload_duration.counts.iter().sum();
        let reload_buckets = buckets(&self.reload_duration.counts, &RELOAD_BUCKETS);
        enc.encode_descriptor(
            "reload_duration_seconds",
            "From the reload's start to the switch or the rollback",
            None,
            MetricType::Histogram,
        )?
        .encode_histogram::<NoLabelSet>(
            self.reload_duration.sum,
            count,
            &reload_buckets,
            None,
        )?;
        let mut family = enc.encode_descriptor(
            "canary_verdicts",
            "Canary steps judged, by verdict (a failed one rolls its reload back)",
            None,
            MetricType::Counter,
        )?;
        for (verdict, n) in [
            ("promoted", self.canary_verdicts[0]),
            ("failed", self.canary_verdicts[1]),
        ] {
            ConstCounter::new(n).encode(family.encode_family(&[("verdict", verdict)])?)?;
        }
        ConstGauge::new(self.canary_workers as i64).encode(enc.encode_descriptor(
            "canary_workers",
            "Workers of the new generation serving as a canary now",
            None,
            MetricType::Gauge,
        )?)?;
        ConstCounter::new(self.connections_handed_over).encode(enc.encode_descriptor(
            "connections_handed_over",
            "Keep-alive connections a leaving worker (recycled, scaled down) handed to a sibling instead of closing them",
            None,
            MetricType::Counter,
        )?)?;
        let mut family = enc.encode_descriptor(
            "connection_handoffs",
            "A leaving worker's attempts to hand a keep-alive connection to a sibling, by outcome (fell_back and failed: the leaving worker answered the next request itself, with Connection: close)",
            None,
            MetricType::Counter,
        )?;
        for outcome in HandoffOutcome::ALL {
            ConstCounter::new(self.handoffs[outcome as usize])
                .encode(family.encode_family(&[("outcome", outcome.name())])?)?;
        }
        let mut family = enc.encode_descriptor(
            "connections_made_room",
            "Connections a worker at --worker-connections closed while new clients waited, by how (idle_closed: an idle keep-alive connection; rotated: a response said Connection: close)",
            None,
            MetricType::Counter,
        )?;
        for how in MadeRoom::ALL {
            ConstCounter::new(self.made_room[how as usize])
                .encode(family.encode_family(&[("how", how.name())])?)?;
        }
        ConstCounter::new(self.request_timeouts).encode(enc.encode_descriptor(
            "request_timeouts",
            "Requests not answered within --request-timeout: zdr answered 504 and dropped the app's work on them",
            None,
            MetricType::Counter,
        )?)?;
        ConstCounter::new(self.requests_shed).encode(enc.encode_descriptor(
            "requests_shed",
            "Requests a busy worker answered 503 with Retry-After because they waited longer than --max-queue-time (and the app's recent response time) to be started",
            None,
            MetricType::Counter,
        )?)?;
        let mut family = enc.encode_descriptor(
            "client_timeouts",
            "Connections closed because the client was too slow, by timeout",
            None,
            MetricType::Counter,
        )?;
        for kind in ClientTimeout::ALL {
            let n = self.client_timeouts[kind as usize];
            ConstCounter::new(n).encode(family.encode_family(&[("kind", kind.name())])?)?;
        }
        let mut family = enc.encode_descriptor(
            "worker_restarts",
            "Workers replaced, by cause",
            None,
            MetricType::Counter,
        )?;
        for cause in RestartCause::ALL {
            let n = self.restarts[cause as usize];
            ConstCounter::new(n).encode(family.encode_family(&[("cause", cause.name())])?)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_classic_format_names_counters_by_their_samples_and_has_no_eof() {
        let om = "# HELP zdr_reloads Reloads\n# TYPE zdr_reloads counter\n# UNIT zdr_reloads x\n\
                  zdr_reloads_total 1\n# TYPE zdr_connections gauge\nzdr_connections 2\n# EOF\n";
        assert_eq!(
            to_prometheus_text(om),
            "# HELP zdr_reloads_total Reloads\n# TYPE zdr_reloads_total counter\n\
             zdr_reloads_total 1\n# TYPE zdr_connections gauge\nzdr_connections 2\n"
        );
    }

    #[test]
    fn encodes_the_prometheus_text_format() {
        let mut s = Snapshot::default();
        s.requests.by_class[1] = 7;
        s.requests.buckets[RequestCounters::bucket(0.002)] = 7;
        s.requests.sum_us = 14_000;
        s.workers.insert((2, "ready".into()), 3);
        s.reloads_completed = 1;
        s.reload_duration = Histogram::new(&RELOAD_BUCKETS);
        s.reload_duration.observe(&RELOAD_BUCKETS, 0.02);
        s.restarts[RestartCause::Memory as usize] = 2;
        s.connections_handed_over = 5;
        s.handoffs = [4, 1, 2, 3];
        s.made_room = [6, 7];
        s.request_timeouts = 8;
        s.requests_shed = 9;
        s.connections = 12;
        s.parked = 10;
        let text = s.encode();
        for line in [
            "zdr_requests_shed_total 9",
            "zdr_connections 12",
            "zdr_connections_parked 10",
            "zdr_request_timeouts_total 8",
            "zdr_connections_made_room_total{how=\"idle_closed\"} 6",
            "zdr_connections_made_room_total{how=\"rotated\"} 7",
            "zdr_connection_handoffs_total{outcome=\"sent\"} 4",
            "zdr_connection_handoffs_total{outcome=\"sent_after_wait\"} 1",
            "zdr_connection_handoffs_total{outcome=\"fell_back\"} 2",
            "zdr_connection_handoffs_total{outcome=\"failed\"} 3",
            "zdr_requests_total{class=\"2xx\"} 7",
            "zdr_request_duration_seconds_count 7",
            "zdr_request_duration_seconds_bucket{le=\"0.0025\"} 7",
            "zdr_request_duration_seconds_bucket{le=\"0.001\"} 0",
            "zdr_workers{generation=\"2\",state=\"ready\"} 3",
            "zdr_reloads_total{outcome=\"completed\"} 1",
            "zdr_reload_duration_seconds_bucket{le=\"0.05\"} 1",
            "zdr_worker_restarts_total{cause=\"memory\"} 2",
            "zdr_worker_restarts_total{cause=\"crash\"} 0",
            "zdr_request_duration_seconds_bucket{le=\"5.0\"} 7",
            "zdr_request_duration_seconds_bucket{le=\"+Inf\"} 7",
            "zdr_reload_duration_seconds_bucket{le=\"+Inf\"} 1",
            "zdr_client_timeouts_total{kind=\"body\"} 0",
            "zdr_connections_handed_over_total 5",
        ] {
            assert!(text.contains(line), "no {line:?} in:\n{text}");
        }
    }
}
