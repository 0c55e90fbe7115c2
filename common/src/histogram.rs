//! A latency histogram of relaxed atomic counters with fixed buckets, for figures written by one
//! thread (or a few) and read now and then by another (the metrics endpoint). Observing is a
//! bucket search over [`BOUNDS_US`] and three relaxed `fetch_add`s: no lock, no allocation.
//!
//! The buckets are the same for every histogram, from 10 µs to 10 s on a 1-2.5-5 ladder, so
//! that one set serves a shard's reply latency and a node's RPC latency alike.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds of the buckets, in microseconds; one more bucket (`+Inf`) holds the rest.
pub const BOUNDS_US: [u64; 19] = [
    10, 25, 50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000,
    500_000, 1_000_000, 2_500_000, 5_000_000, 10_000_000,
];

/// Buckets, including the last (`+Inf`) one.
const BUCKETS: usize = BOUNDS_US.len() + 1;

/// A histogram of durations (see the module's documentation).
#[derive(Debug)]
pub struct Histogram {
    /// Observations per bucket (not cumulative); the last is `+Inf`.
    counts: [AtomicU64; BUCKETS],
    /// Sum of the observations, in nanoseconds.
    sum_ns: AtomicU64,
}

/// A histogram's figures at one moment.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Snapshot {
    /// Sum of the observations, in seconds.
    pub sum: f64,
    /// Number of observations.
    pub count: u64,
    /// `(upper bound in seconds, observations in this bucket)`, not cumulative, the last bound
    /// `f64::INFINITY` (the shape `prometheus-client`'s encoder takes).
    pub buckets: Vec<(f64, u64)>,
}

impl Snapshot {
    /// Adds `other`'s observations to this one's (both from [`Histogram::snapshot`]).
    pub fn merge(&mut self, other: &Self) {
        if self.buckets.is_empty() {
            self.buckets = other.buckets.iter().map(|&(b, _)| (b, 0)).collect();
        }
        self.sum += other.sum;
        self.count += other.count;
        for (mine, theirs) in self.buckets.iter_mut().zip(&other.buckets) {
            mine.1 += theirs.1;
        }
    }
}

impl Default for Histogram {
    fn default() -> Self {
        Self::new()
    }
}

impl Histogram {
    /// An empty histogram (`const`, so a `static` can hold one).
    pub const fn new() -> Self {
        Self {
            counts: [const { AtomicU64::new(0) }; BUCKETS],
            sum_ns: AtomicU64::new(0),
        }
    }

    /// Records one observation of `d`.
    pub fn observe(&self, d: Duration) {
        self.observe_n(d, 1);
    }

    /// Records `n` observations of `d` each (a batch of requests answered together).
    pub fn observe_n(&self, d: Duration, n: u64) {
        if n == 0 {
            return;
        }
        let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        let i = BOUNDS_US.partition_point(|&b| b < us);
        if let Some(c) = self.counts.get(i) {
            c.fetch_add(n, Ordering::Relaxed);
        }
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.sum_ns
            .fetch_add(ns.saturating_mul(n), Ordering::Relaxed);
    }

    /// The figures now (each counter read once; a concurrent observation may be half in).
    pub fn snapshot(&self) -> Snapshot {
        let mut buckets = Vec::with_capacity(BUCKETS);
        let mut count = 0;
        for (i, c) in self.counts.iter().enumerate() {
            let n = c.load(Ordering::Relaxed);
            count += n;
            let bound = BOUNDS_US
                .get(i)
                .map_or(f64::INFINITY, |&us| us as f64 / 1e6);
            buckets.push((bound, n));
        }
        Snapshot {
            sum: self.sum_ns.load(Ordering::Relaxed) as f64 / 1e9,
            count,
            buckets,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn observations_land_in_their_bucket_and_add_up() {
        let h = Histogram::new();
        h.observe(Duration::from_micros(10)); // on the bound: the 10 µs bucket
        h.observe(Duration::from_micros(11)); // the 25 µs bucket
        h.observe_n(Duration::from_millis(3), 4); // the 5 ms bucket, four times
        h.observe(Duration::from_secs(60)); // +Inf
        h.observe_n(Duration::from_secs(1), 0); // nothing
        let s = h.snapshot();
        assert_eq!(s.count, 7);
        assert_eq!(s.buckets.len(), BOUNDS_US.len() + 1);
        assert_eq!(s.buckets[0], (10e-6, 1));
        assert_eq!(s.buckets[1], (25e-6, 1));
        assert_eq!(s.buckets[8], (5e-3, 4));
        assert_eq!(s.buckets[BOUNDS_US.len()], (f64::INFINITY, 1));
        let want = 10e-6 + 11e-6 + 4.0 * 3e-3 + 60.0;
        assert!((s.sum - want).abs() < 1e-9, "{}", s.sum);

        let mut total = Snapshot::default();
        total.merge(&s);
        total.merge(&s);
        assert_eq!(total.count, 14);
        assert_eq!(total.buckets[8].1, 8);
        assert!((total.sum - 2.0 * want).abs() < 1e-9);
    }
}
