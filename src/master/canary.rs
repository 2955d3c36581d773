//! The canary's verdict: a few workers of the new generation serve beside
//! the old ones, and their answers over the window decide whether the rest
//! of the generation follows (promote) or the reload is rolled back. Facts
//! in (each generation's request counters since the canary started, the
//! time), verdict out; no I/O.
//!
//! | check | fails when |
//! |---|---|
//! | errors | the canary's 5xx ratio is above `canary_max_error_ratio` **and** above the old generation's over the same window |
//! | latency | `canary_max_p99_ratio` > 0, both have requests, and the canary's p99 is above that many times the old one's |
//! | traffic | fewer than `canary_min_requests` reached the canary within three windows while the old generation had that many (traffic that did not reach the canary) |
//! | quiet | fewer than `canary_min_requests` reached either generation within three windows: as `canary_no_traffic` says (rollback by default, or promote) |
//!
//! Every verdict names the canary's share of the requests in its window.
//! Workers share keep-alive traffic by its rate (`crate::balance`), so a
//! canary gets its share even from clients that never open a new
//! connection (a load balancer's pool, a python-requests `Session`); a
//! server with no traffic at all cannot judge a canary, and says so.
//!
//! A canary worker that exits fails the rollout at once (the rollout's own
//! rule).

use std::time::Duration;

use crate::metrics::{RequestCounters, REQUEST_BUCKETS};

/// The thresholds, from the new generation's settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Policy {
    pub(crate) window: Duration,
    pub(crate) min_requests: u64,
    pub(crate) max_error_ratio: f64,
    pub(crate) max_p99_ratio: f64,
    /// What a canary on a quiet server comes to.
    pub(crate) no_traffic: crate::config::NoTraffic,
}

/// What to do with the canary now.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Verdict {
    /// Keep watching.
    Wait,
    /// Roll the rest of the generation out; the figures, for the log.
    Promote(String),
    /// Roll back, for this reason (with the figures).
    Fail(String),
}

/// One generation's figures over the window.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Figures {
    requests: u64,
    errors: u64,
    p99: Option<f64>,
}

impl Figures {
    fn of(c: &RequestCounters) -> Figures {
        let requests: u64 = c.by_class.iter().sum();
        Figures {
            requests,
            errors: c.by_class[4],
            p99: p99(c),
        }
    }

    /// "the canary answered N of the M requests in its window (X %)".
    fn share(&self, old: &Figures) -> String {
        let all = self.requests + old.requests;
        let pct = if all == 0 {
            0.0
        } else {
            100.0 * self.requests as f64 / all as f64
        };
        format!(
            "the canary answered {} of the {all} requests in its window ({pct:.0} %)",
            self.requests
        )
    }

    fn error_ratio(&self) -> f64 {
        if self.requests == 0 {
            0.0
        } else {
            self.errors as f64 / self.requests as f64
        }
    }
}

/// The upper bound of the bucket holding the 99th percentile (twice the
/// last bound for the overflow bucket); none without requests.
fn p99(c: &RequestCounters) -> Option<f64> {
    let total: u64 = c.buckets.iter().sum();
    if total == 0 {
        return None;
    }
    let wanted = (total as f64 * 0.99).ceil() as u64;
    let mut seen = 0;
    for (i, n) in c.buckets.iter().enumerate() {
        seen += n;
        if seen >= wanted {
            return Some(
                REQUEST_BUCKETS
                    .get(i)
                    .copied()
                    .unwrap_or(REQUEST_BUCKETS[REQUEST_BUCKETS.len() - 1] * 2.0),
            );
        }
    }
    None
}

/// Judges the canary from what each generation answered since it started,
/// `elapsed` into the window.
pub(crate) fn judge(
    policy: &Policy,
    canary: &RequestCounters,
    old: &RequestCounters,
    elapsed: Duration,
) -> Verdict {
    let (new, base) = (Figures::of(canary), Figures::of(old));
    if elapsed < policy.window {
        return Verdict::Wait;
    }
    if new.requests < policy.min_requests {
        if elapsed >= policy.window * 3 {
            let quiet = base.requests < policy.min_requests;
            if quiet && policy.no_traffic == crate::config::NoTraffic::Promote {
                return Verdict::Promote(format!(
                    "the server had too little traffic to judge a canary ({} requests \
                     to the canary, {} to the old generation in {:.0}s); promoted as \
                     canary_no_traffic = \"promote\" says",
                    new.requests,
                    base.requests,
                    elapsed.as_secs_f64()
                ));
            }
            let fix = if quiet {
                "the server had too little traffic to judge a canary: reload without \
                 --canary, send traffic during the window, lower canary_min_requests, \
                 or set canary_no_traffic = \"promote\""
            } else {
                "traffic reached the old generation but not the canary: its clients \
                 may hold HTTP/2 connections (which stay on their worker) or \
                 connections too quiet to move; set max_connection_age so that they \
                 reconnect, lengthen canary_seconds, or reload without --canary"
            };
            return Verdict::Fail(format!(
                "only {} requests reached the canary in {:.0}s, fewer than canary_min_requests {} \
                 ({}); {fix}",
                new.requests,
                elapsed.as_secs_f64(),
                policy.min_requests,
                new.share(&base)
            ));
        }
        return Verdict::Wait;
    }
    let ratio = new.error_ratio();
    if ratio > policy.max_error_ratio && ratio > base.error_ratio() {
        return Verdict::Fail(format!(
            "error ratio {ratio:.2} > {} over {} requests (old generation {:.2}); {}",
            policy.max_error_ratio,
            new.requests,
            base.error_ratio(),
            new.share(&base)
        ));
    }
    if let (true, Some(p_new), Some(p_old)) = (policy.max_p99_ratio > 0.0, new.p99, base.p99) {
        if p_new > policy.max_p99_ratio * p_old {
            return Verdict::Fail(format!(
                "p99 {:.0} ms > {} x the old generation's {:.0} ms over {} requests; {}",
                p_new * 1000.0,
                policy.max_p99_ratio,
                p_old * 1000.0,
                new.requests,
                new.share(&base)
            ));
        }
    }
    Verdict::Promote(format!(
        "error ratio {ratio:.3} over {} requests (old generation {:.3}){}; {}",
        new.requests,
        base.error_ratio(),
        new.p99
            .map(|p| format!(", p99 {:.1} ms", p * 1000.0))
            .unwrap_or_default(),
        new.share(&base)
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    fn policy() -> Policy {
        Policy {
            window: 10 * S,
            min_requests: 100,
            max_error_ratio: 0.01,
            max_p99_ratio: 2.0,
            no_traffic: crate::config::NoTraffic::Rollback,
        }
    }

    /// Counters of `ok` 2xx and `errors` 5xx answers, all in bucket `b`.
    fn counters(ok: u64, errors: u64, b: usize) -> RequestCounters {
        let mut c = RequestCounters::default();
        c.by_class[1] = ok;
        c.by_class[4] = errors;
        c.buckets[b] = ok + errors;
        c
    }

    #[test]
    fn the_table() {
        let p = policy();
        let healthy = counters(500, 0, 2);
        let rows: [(RequestCounters, RequestCounters, Duration, &str); 7] = [
            // Too early, whatever the figures.
            (counters(0, 500, 2), healthy.clone(), 5 * S, "wait"),
            // Healthy after the window: promoted.
            (counters(300, 1, 2), healthy.clone(), 10 * S, "promote"),
            // Half errors: rolled back.
            (counters(150, 150, 2), healthy.clone(), 10 * S, "fail"),
            // As bad as the old generation: not the canary's fault.
            (
                counters(150, 150, 2),
                counters(250, 250, 2),
                10 * S,
                "promote",
            ),
            // Five times slower: rolled back.
            (counters(300, 0, 5), healthy.clone(), 10 * S, "fail"),
            // Too little traffic: wait, then give up.
            (counters(20, 0, 2), healthy.clone(), 20 * S, "wait"),
            (counters(20, 0, 2), healthy.clone(), 30 * S, "fail"),
        ];
        for (i, (canary, old, elapsed, want)) in rows.iter().enumerate() {
            let got = match judge(&p, canary, old, *elapsed) {
                Verdict::Wait => "wait",
                Verdict::Promote(_) => "promote",
                Verdict::Fail(_) => "fail",
            };
            assert_eq!(got, *want, "row {i}");
        }
    }

    #[test]
    fn a_failure_says_its_figures() {
        let Verdict::Fail(why) = judge(
            &policy(),
            &counters(412, 400, 2),
            &counters(500, 0, 2),
            10 * S,
        ) else {
            panic!()
        };
        assert_eq!(
            why,
            "error ratio 0.49 > 0.01 over 812 requests (old generation 0.00); \
             the canary answered 812 of the 1312 requests in its window (62 %)"
        );
    }

    #[test]
    fn too_little_traffic_says_whether_the_server_was_quiet_or_the_canary_missed_it() {
        let judge_traffic =
            |old| match judge(&policy(), &counters(3, 0, 2), &counters(old, 0, 2), 30 * S) {
                Verdict::Fail(why) => why,
                other => panic!("{other:?}"),
            };
        let quiet = judge_traffic(10);
        assert!(
            quiet.starts_with("only 3 requests reached the canary in 30s"),
            "{quiet}"
        );
        assert!(quiet.contains("(23 %)"), "{quiet}");
        assert!(
            quiet.contains("too little traffic to judge a canary"),
            "{quiet}"
        );
        let missed = judge_traffic(5000);
        assert!(
            missed.contains("reached the old generation but not the canary"),
            "{missed}"
        );
    }

    #[test]
    fn the_p99_is_its_buckets_bound() {
        let mut c = counters(98, 0, 1);
        c.buckets[7] += 2;
        c.by_class[1] += 2;
        assert_eq!(p99(&c), Some(REQUEST_BUCKETS[7]));
        assert_eq!(p99(&RequestCounters::default()), None);
    }
}
