//! Moving averages of accepted difficulty per second, for hashrates and shares per second.
//!
//! The share path only adds to cumulative counters. A sampler (`Pool::sample_rates`, called
//! every couple of seconds by the daemon) takes the difference since its previous sample and
//! folds it into continuous exponentially weighted moving averages, one per window:
//!
//! `rate = rate * exp(-dt/W) + (d/dt) * (1 - exp(-dt/W))`
//!
//! where `d` was accepted during the `dt` seconds since the previous sample. For a rate that is
//! constant between samples the result does not depend on how often it is sampled, so a late
//! sample costs no accuracy. The decay factors depend only on `dt`, so one sample computes them
//! once ([`Decay`]) and applies them to every worker.

use std::time::Duration;

/// Hashes per unit of difficulty: a share of difficulty 1 takes 2^32 hashes on average.
pub const HASHES_PER_DIFF: f64 = 4_294_967_296.0;

/// Windows of the pool hashrate: 1 minute, 5 and 15 minutes, 1 and 6 hours, 1 and 7 days.
pub const POOL_WINDOWS: [Duration; 7] = [
    Duration::from_secs(60),
    Duration::from_secs(300),
    Duration::from_secs(900),
    Duration::from_secs(3600),
    Duration::from_secs(6 * 3600),
    Duration::from_secs(86_400),
    Duration::from_secs(7 * 86_400),
];

/// Windows of user and worker hashrates: 1 and 5 minutes, 1 hour, 1 and 7 days.
pub const USER_WINDOWS: [Duration; 5] = [
    Duration::from_secs(60),
    Duration::from_secs(300),
    Duration::from_secs(3600),
    Duration::from_secs(86_400),
    Duration::from_secs(7 * 86_400),
];

/// Windows of the pool's shares per second: 1, 5 and 15 minutes, 1 hour.
pub const SPS_WINDOWS: [Duration; 4] = [
    Duration::from_secs(60),
    Duration::from_secs(300),
    Duration::from_secs(900),
    Duration::from_secs(3600),
];

/// The decay factors `exp(-dt/W)` of one sampling interval `dt`, for `N` windows.
#[derive(Debug, Clone, Copy)]
pub struct Decay<const N: usize> {
    dt: f64,
    keep: [f64; N],
}

impl<const N: usize> Decay<N> {
    /// Factors for an interval of `dt` over `windows`, or `None` when `dt` is zero (nothing to
    /// fold in yet: the caller keeps its previous sample as the baseline).
    pub fn new(dt: Duration, windows: &[Duration; N]) -> Option<Self> {
        let dt = dt.as_secs_f64();
        if dt <= 0.0 {
            return None;
        }
        let keep = windows.map(|w| {
            let w = w.as_secs_f64();
            if w > 0.0 { (-dt / w).exp() } else { 0.0 }
        });
        Some(Self { dt, keep })
    }
}

/// Moving averages of one quantity per second, one per window.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Ema<const N: usize> {
    rates: [f64; N],
}

impl<const N: usize> Default for Ema<N> {
    fn default() -> Self {
        Self { rates: [0.0; N] }
    }
}

impl<const N: usize> Ema<N> {
    /// Folds in `amount` accumulated over the interval `decay` was made for.
    pub fn update(&mut self, amount: f64, decay: &Decay<N>) {
        let per_sec = amount / decay.dt;
        for (rate, keep) in self.rates.iter_mut().zip(decay.keep) {
            *rate = *rate * keep + per_sec * (1.0 - keep);
        }
    }

    /// Averages as [`Ema::rates`] gave them (a state handed over from another process).
    pub fn from_rates(rates: [f64; N]) -> Self {
        Self { rates }
    }

    /// Decays the averages as an interval of `gap` with nothing accepted would (the same
    /// [`Ema::update`], with an amount of zero): how figures saved before a restart are brought
    /// up to date. A zero gap changes nothing.
    pub fn idle(&mut self, gap: Duration, windows: &[Duration; N]) {
        if let Some(decay) = Decay::new(gap, windows) {
            self.update(0.0, &decay);
        }
    }

    /// The averages per second, in window order.
    pub fn rates(&self) -> [f64; N] {
        self.rates
    }

    /// Adds another average of the same windows (averages of a sum are sums of averages).
    pub fn add(&mut self, other: &Self) {
        for (a, b) in self.rates.iter_mut().zip(other.rates) {
            *a += b;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `samples` regular samples of `dt` seconds at `per_sec` into `ema`.
    fn run<const N: usize>(
        ema: &mut Ema<N>,
        windows: &[Duration; N],
        per_sec: f64,
        dt: f64,
        samples: usize,
    ) {
        let decay = Decay::new(Duration::from_secs_f64(dt), windows).unwrap();
        for _ in 0..samples {
            ema.update(per_sec * dt, &decay);
        }
    }

    fn within(actual: f64, expected: f64, tolerance: f64) -> bool {
        (actual - expected).abs() <= tolerance * expected.abs()
    }

    #[test]
    fn constant_rate_converges_within_one_percent_after_five_windows() {
        let rate = 1234.5;
        let dt = 2.0;
        for (i, w) in POOL_WINDOWS.iter().enumerate() {
            let mut ema = Ema::<7>::default();
            let samples = (5.0 * w.as_secs_f64() / dt).ceil() as usize;
            run(&mut ema, &POOL_WINDOWS, rate, dt, samples);
            let got = ema.rates()[i];
            assert!(within(got, rate, 0.01), "window {w:?}: {got} vs {rate}");
        }
        let mut ema = Ema::<5>::default();
        let longest = USER_WINDOWS[4].as_secs_f64();
        run(
            &mut ema,
            &USER_WINDOWS,
            rate,
            dt,
            (5.0 * longest / dt) as usize,
        );
        for (w, got) in USER_WINDOWS.iter().zip(ema.rates()) {
            assert!(within(got, rate, 0.01), "window {w:?}: {got} vs {rate}");
        }
    }

    #[test]
    fn one_minute_rate_falls_below_one_percent_within_five_minutes_of_silence() {
        let mut ema = Ema::<5>::default();
        run(&mut ema, &USER_WINDOWS, 1000.0, 2.0, 3600);
        let before = ema.rates();
        assert!(within(before[0], 1000.0, 0.01));
        // Five minutes of samples with nothing accepted.
        run(&mut ema, &USER_WINDOWS, 0.0, 2.0, 150);
        let after = ema.rates();
        assert!(after[0] < before[0] * 0.01, "{} vs {}", after[0], before[0]);
        // The one-day window barely moved.
        assert!(after[3] > 0.99 * before[3], "{} vs {}", after[3], before[3]);
    }

    #[test]
    fn irregular_samples_match_regular_ones() {
        let rate = 77.0;
        let mut regular = Ema::<7>::default();
        run(&mut regular, &POOL_WINDOWS, rate, 2.0, 900); // 30 minutes
        // The same 30 minutes sampled at uneven intervals (0.3 s to 7.9 s, a cycle of four).
        let mut irregular = Ema::<7>::default();
        // In tenths of a second, so the steps add up to exactly 30 minutes.
        let steps: [u64; 4] = [3, 25, 79, 13];
        let mut t = 0;
        let mut i = 0;
        while t < 18_000 {
            let step = steps[i % steps.len()].min(18_000 - t);
            let decay = Decay::new(Duration::from_millis(step * 100), &POOL_WINDOWS).unwrap();
            irregular.update(rate * step as f64 / 10.0, &decay);
            t += step;
            i += 1;
        }
        for ((w, a), b) in POOL_WINDOWS
            .iter()
            .zip(regular.rates())
            .zip(irregular.rates())
        {
            assert!(within(b, a, 0.01), "window {w:?}: {b} vs {a}");
        }
        // And sampled every 10 s instead of every 2 s.
        let mut sparse = Ema::<7>::default();
        run(&mut sparse, &POOL_WINDOWS, rate, 10.0, 180);
        for (a, b) in regular.rates().iter().zip(sparse.rates()) {
            assert!(within(b, *a, 0.01), "{b} vs {a}");
        }
    }

    #[test]
    fn an_idle_gap_decays_as_that_many_empty_samples() {
        let mut sampled = Ema::<5>::from_rates([1000.0; 5]);
        let mut idled = sampled;
        // Ten minutes of 2 s samples with nothing accepted...
        run(&mut sampled, &USER_WINDOWS, 0.0, 2.0, 300);
        // ...and one idle gap of ten minutes: the same figures, e^(-600/W) of each.
        idled.idle(Duration::from_secs(600), &USER_WINDOWS);
        for ((w, a), b) in USER_WINDOWS.iter().zip(sampled.rates()).zip(idled.rates()) {
            let want = 1000.0 * (-600.0 / w.as_secs_f64()).exp();
            assert!(
                (a - want).abs() < 1e-9 * 1000.0,
                "window {w:?}: {a} vs {want}"
            );
            assert!(
                (b - want).abs() < 1e-9 * 1000.0,
                "window {w:?}: {b} vs {want}"
            );
        }
        // The 1-minute figure is all but gone; the 7-day one barely moved.
        assert!(idled.rates()[0] < 0.05);
        assert!(idled.rates()[4] > 999.0);
        // No gap, no change.
        let mut same = Ema::<5>::from_rates([5.0; 5]);
        same.idle(Duration::ZERO, &USER_WINDOWS);
        assert_eq!(same.rates(), [5.0; 5]);
    }

    #[test]
    fn zero_interval_is_not_an_update() {
        assert!(Decay::new(Duration::ZERO, &USER_WINDOWS).is_none());
    }

    #[test]
    fn sums_of_averages() {
        let decay = Decay::new(Duration::from_secs(2), &SPS_WINDOWS).unwrap();
        let (mut a, mut b, mut both) = (Ema::<4>::default(), Ema::<4>::default(), Ema::default());
        for i in 0..100 {
            let (x, y) = (f64::from(i % 7), f64::from(i % 3));
            a.update(x, &decay);
            b.update(y, &decay);
            both.update(x + y, &decay);
        }
        a.add(&b);
        for (s, t) in a.rates().iter().zip(both.rates()) {
            assert!((s - t).abs() < 1e-9);
        }
    }
}
