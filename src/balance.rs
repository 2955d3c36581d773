//! Balancing keep-alive traffic between workers: a worker that answers
//! well above its siblings' average hands some of its idle HTTP/1.1
//! connections over (through the handoff queue), so that a pool of
//! long-lived connections (a load balancer's, a python-requests
//! `Session`'s) spreads evenly, and a worker that has just joined — added
//! by TTIN or `scale`, or a reload's canary — gets its share of traffic
//! that never opens a new connection. A decider: each worker gives it the
//! request counters of every ready worker once a [`TICK`], and it answers
//! how many requests a second of traffic to shed; no I/O.
//!
//! | fact | decision |
//! |---|---|
//! | this worker's first tick (it only measures), fewer than two ready workers, or no connections | shed nothing |
//! | this worker's rate is at most [`OVER`] times the mean, or above it by less than [`MIN_EXCESS`] requests a second | shed nothing |
//! | above both | shed `rate − mean` |
//!
//! Handed-over connections go to the least loaded first: each worker knows
//! its [`Balancer::rank`] among the ready workers (by rate, then by the
//! requests over its life, then the newest generation first, so a new
//! worker, a canary among them, comes before an idle old one)
//! and leaves a connection in the queue that long to those ranked before
//! it.
//!
//! The worker's connections then pick themselves ([`fits`]): each, by its
//! own rate, takes a share of what is to shed while moving it does not
//! widen the gap between this worker and the least loaded one
//! ([`Balancer::room`]: how far that one is below the mean). A single
//! connection carrying all the traffic may so go from worker to worker,
//! once it has settled on each: over time each gets its share of it.
//!
//! A worker that sheds leaves handed-over connections to its siblings in
//! that tick (so connections do not go round among the busy), and a
//! connection handed over is not moved again for [`SETTLE`]: no
//! ping-pong. While any worker drains (a reload, recycling, a
//! scale-down), its connections come first: workers take them at once,
//! move nothing for balance, and weigh afresh once it has gone.

use std::collections::HashMap;
use std::time::Duration;

/// How often a worker weighs its load against its siblings'.
pub(crate) const TICK: Duration = Duration::from_millis(250);

/// A worker sheds when its rate is above this many times the mean.
pub(crate) const OVER: f64 = 1.1;

/// ... and above it by at least this many requests a second (below it,
/// the difference is noise).
pub(crate) const MIN_EXCESS: f64 = 5.0;

/// How long a connection handed over stays where it went before it may be
/// moved again for balance.
pub(crate) const SETTLE: Duration = Duration::from_secs(2);

/// One ready worker's counter, as read from the scoreboard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Sample {
    /// Its slot.
    pub(crate) slot: usize,
    /// Its pid (a slot reused by another worker starts over).
    pub(crate) pid: u32,
    /// Requests it has begun, over its life.
    pub(crate) requests: u64,
    /// Its generation.
    pub(crate) generation: u64,
}

/// One worker's view of the others, kept between ticks.
#[derive(Debug, Default)]
pub(crate) struct Balancer {
    /// Each ready worker's counter at the last tick; `None` before the
    /// first.
    last: Option<HashMap<usize, (u32, u64)>>,
    rank: usize,
    room: f64,
}

impl Balancer {
    /// Weighs this tick's samples (of every ready worker, this one among
    /// them, `elapsed` after the last) and returns how many requests a
    /// second this worker, holding `connections`, should shed.
    pub(crate) fn tick(
        &mut self,
        me: usize,
        samples: &[Sample],
        elapsed: Duration,
        connections: usize,
    ) -> f64 {
        let secs = elapsed.as_secs_f64();
        let now: HashMap<usize, (u32, u64)> = samples
            .iter()
            .map(|s| (s.slot, (s.pid, s.requests)))
            .collect();
        let Some(last) = self.last.replace(now) else {
            return 0.0;
        };
        if secs <= 0.0 {
            return 0.0;
        }
        // A worker that became ready since the last tick (TTIN, `scale`,
        // a canary) counts from zero: every request it began was within
        // the tick, so its rate is never overstated, and its siblings
        // start giving it its share at once.
        let rates: Vec<(usize, f64)> = samples
            .iter()
            .filter_map(|s| {
                let before = match last.get(&s.slot) {
                    Some(&(pid, before)) if pid == s.pid => before,
                    _ => 0,
                };
                (s.requests >= before).then(|| (s.slot, (s.requests - before) as f64 / secs))
            })
            .collect();
        self.rank = 0;
        self.room = 0.0;
        let Some(&(_, mine)) = rates.iter().find(|(slot, _)| *slot == me) else {
            return 0.0;
        };
        if rates.len() < 2 {
            return 0.0;
        }
        let of = |slot: usize| {
            samples
                .iter()
                .find(|s| s.slot == slot)
                .map_or((0, 0), |s| (s.requests, s.generation))
        };
        let key = |&(slot, rate): &(usize, f64)| {
            let (lifetime, generation) = of(slot);
            (rate, lifetime, std::cmp::Reverse(generation), slot)
        };
        let my_key = key(&(me, mine));
        self.rank = rates
            .iter()
            .filter(|r| key(r).partial_cmp(&my_key) == Some(std::cmp::Ordering::Less))
            .count();
        let mean = rates.iter().map(|(_, r)| r).sum::<f64>() / rates.len() as f64;
        let least = rates.iter().map(|(_, r)| *r).fold(f64::INFINITY, f64::min);
        self.room = (mean - least).max(0.0);
        if connections == 0 || mine <= mean * OVER || mine - mean < MIN_EXCESS {
            return 0.0;
        }
        mine - mean
    }

    /// How far below the mean the least loaded ready worker was at the
    /// last tick, in requests a second.
    pub(crate) fn room(&self) -> f64 {
        self.room
    }

    /// How many ready workers the last tick found less loaded than this
    /// one (by rate, then by requests over their life): 0 for the least.
    pub(crate) fn rank(&self) -> usize {
        self.rank
    }
}

/// Whether a connection answering `rate` requests a second should move
/// while its worker is still `left` above the mean and the least loaded
/// worker `room` below it: the worker must still be above the mean, the
/// gap between the two must not widen (`rate ≤ left + room`, give or take
/// [`SLACK`]: a connection's rate is its average here, the worker's that of
/// the last tick), and a connection with less traffic than [`MIN_MOVE`]
/// does not move.
pub(crate) fn fits(rate: f64, left: f64, room: f64) -> bool {
    rate >= MIN_MOVE && left > 0.0 && rate <= (left + room) * SLACK
}

/// The least traffic a connection must carry to move for balance, in
/// requests a second: an idle keep-alive connection moves no load, and
/// thousands of them would otherwise each take a sliver of the budget.
pub(crate) const MIN_MOVE: f64 = 1.0;

/// How far the two measures of [`fits`] may disagree.
pub(crate) const SLACK: f64 = 1.2;

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    fn samples(counts: &[(usize, u32, u64)]) -> Vec<Sample> {
        counts
            .iter()
            .map(|&(slot, pid, requests)| Sample {
                slot,
                pid,
                requests,
                // Pids here grow with the generation.
                generation: u64::from(pid),
            })
            .collect()
    }

    /// Runs two ticks: the first only records, the second decides.
    fn decide(
        me: usize,
        first: &[(usize, u32, u64)],
        second: &[(usize, u32, u64)],
        conns: usize,
    ) -> f64 {
        let mut b = Balancer::default();
        assert_eq!(
            b.tick(me, &samples(first), S, conns),
            0.0,
            "the first tick only measures"
        );
        b.tick(me, &samples(second), S, conns)
    }

    /// (me, first tick, second tick, connections, expected to shed); a
    /// tick is (slot, pid, requests) of each ready worker.
    type Row = (
        usize,
        &'static [(usize, u32, u64)],
        &'static [(usize, u32, u64)],
        usize,
        f64,
    );

    #[test]
    fn table() {
        // (me, first tick, second tick, connections, expected to shed)
        let rows: &[Row] = &[
            // Alone: nobody to give to.
            (0, &[(0, 10, 0)], &[(0, 10, 500)], 8, 0.0),
            // Even: nothing moves.
            (
                0,
                &[(0, 10, 0), (1, 11, 0)],
                &[(0, 10, 100), (1, 11, 100)],
                8,
                0.0,
            ),
            // Busiest of two, 300 against 100 (mean 200): sheds 100.
            (
                0,
                &[(0, 10, 0), (1, 11, 0)],
                &[(0, 10, 300), (1, 11, 100)],
                9,
                100.0,
            ),
            // The idle one sheds nothing.
            (
                1,
                &[(0, 10, 0), (1, 11, 0)],
                &[(0, 10, 300), (1, 11, 100)],
                9,
                0.0,
            ),
            // Within 10 % of the mean: noise.
            (
                0,
                &[(0, 10, 0), (1, 11, 0)],
                &[(0, 10, 105), (1, 11, 95)],
                9,
                0.0,
            ),
            // Far above in ratio, but by under 5 requests a second: noise.
            (
                0,
                &[(0, 10, 0), (1, 11, 0)],
                &[(0, 10, 6), (1, 11, 0)],
                9,
                0.0,
            ),
            // A worker new since the last tick (TTIN) counts from zero:
            // 300, 100, 0 (mean 133).
            (
                0,
                &[(0, 10, 0), (1, 11, 0)],
                &[(0, 10, 300), (1, 11, 100), (2, 12, 0)],
                9,
                300.0 - 400.0 / 3.0,
            ),
            // ... and with what it began in the tick: 300, 100, 20 (mean 140).
            (
                0,
                &[(0, 10, 0), (1, 11, 0)],
                &[(0, 10, 300), (1, 11, 100), (2, 12, 20)],
                9,
                160.0,
            ),
            // A slot taken by a new pid starts over from zero: 300, 10.
            (
                0,
                &[(0, 10, 0), (1, 11, 50)],
                &[(0, 10, 300), (1, 99, 10)],
                9,
                145.0,
            ),
            // No connections to give.
            (
                0,
                &[(0, 10, 0), (1, 11, 0)],
                &[(0, 10, 300), (1, 11, 0)],
                0,
                0.0,
            ),
        ];
        for (i, &(me, first, second, conns, want)) in rows.iter().enumerate() {
            let got = decide(me, first, second, conns);
            if got > 0.0 {
                let mut b = Balancer::default();
                b.tick(me, &samples(first), S, conns);
                b.tick(me, &samples(second), S, conns);
                assert!(b.rank() > 0, "row {i}");
            }
            assert!((got - want).abs() < 1e-9, "row {i}: {got} against {want}");
        }
    }

    #[test]
    fn the_least_loaded_ranks_first_and_a_new_worker_before_an_idle_old_one() {
        let mut ranks = Vec::new();
        for me in 0..4 {
            let mut b = Balancer::default();
            b.tick(
                me,
                &samples(&[(0, 10, 1000), (1, 11, 5000), (2, 12, 900), (3, 13, 0)]),
                S,
                4,
            );
            // 0 is idle with 1000 over its life, 1 busy, 2 busier, 3 new.
            b.tick(
                me,
                &samples(&[(0, 10, 1000), (1, 11, 5100), (2, 12, 1100), (3, 13, 0)]),
                S,
                4,
            );
            ranks.push(b.rank());
        }
        assert_eq!(ranks, vec![1, 2, 3, 0]);
        // Two idle workers that never served: the newer generation first
        // (the canary before the old generation's idle workers).
        let rank = |me| {
            let mut b = Balancer::default();
            let idle = samples(&[(0, 12, 0), (1, 11, 0), (2, 10, 500)]);
            b.tick(me, &idle, S, 1);
            b.tick(me, &samples(&[(0, 12, 0), (1, 11, 0), (2, 10, 900)]), S, 1);
            b.rank()
        };
        assert_eq!([rank(0), rank(1), rank(2)], [0, 1, 2]);
    }

    #[test]
    fn a_connection_moves_only_if_its_worker_gets_closer_to_the_mean() {
        assert!(!fits(0.0, 50.0, 50.0), "no traffic, nothing to move");
        assert!(
            !fits(0.5, 50.0, 50.0),
            "an idle keep-alive connection stays"
        );
        assert!(fits(30.0, 50.0, 0.0));
        assert!(
            fits(80.0, 50.0, 50.0),
            "50 over and 50 under become 30 under and 30 over"
        );
        assert!(fits(100.0, 50.0, 50.0), "the gap stays: it may go round");
        assert!(fits(115.0, 50.0, 50.0), "within the measures' slack");
        assert!(!fits(121.0, 50.0, 50.0), "the gap would widen");
        assert!(!fits(10.0, 0.0, 100.0), "not above the mean any more");
    }

    #[test]
    fn seeded_sequences_shed_only_above_the_mean_and_never_below_it() {
        // A small xorshift: the same sequences every run.
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for _ in 0..300 {
            let workers = 1 + (next() % 6) as usize;
            let mut counts: Vec<u64> = vec![0; workers];
            let mut b = Balancer::default();
            let me = (next() % workers as u64) as usize;
            for _ in 0..20 {
                let before = counts.clone();
                for c in counts.iter_mut() {
                    *c += next() % 500;
                }
                let conns = (next() % 200) as usize;
                let s: Vec<Sample> = counts
                    .iter()
                    .enumerate()
                    .map(|(slot, &requests)| Sample {
                        slot,
                        pid: 100 + slot as u32,
                        requests,
                        generation: 1,
                    })
                    .collect();
                let shed = b.tick(me, &s, S, conns);
                assert!(shed >= 0.0);
                assert!(b.rank() < workers);
                assert!(shed == 0.0 || b.rank() > 0, "the least loaded never sheds");
                if shed > 0.0 {
                    assert!(conns > 0);
                    let rates: Vec<f64> = counts
                        .iter()
                        .zip(&before)
                        .map(|(a, b)| (a - b) as f64)
                        .collect();
                    let mean = rates.iter().sum::<f64>() / rates.len() as f64;
                    assert!(
                        rates[me] > mean * OVER,
                        "shed from {} against mean {mean}",
                        rates[me]
                    );
                    // Shedding all of it lands exactly on the mean, and the
                    // least loaded is `room` below it.
                    assert!((rates[me] - shed - mean).abs() < 1e-6);
                    let least = rates.iter().copied().fold(f64::INFINITY, f64::min);
                    assert!((mean - least - b.room()).abs() < 1e-6);
                }
            }
        }
    }
}
