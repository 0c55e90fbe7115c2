//! Variable difficulty, as ckpool does it: aim for 0.3 shares per second per client, judged on a
//! 5-minute decaying average of accepted difficulty, with ckpool's hysteresis. A pure function of
//! its events and `now` (instants are kept relative to an `epoch`, the pool's, the same for every
//! call on one state).

use std::time::{Duration, Instant};

use common::Difficulty;

use crate::compact::Stamp;
use crate::handover::{HandoverError, Reader, Writer};

/// Target share rate (shares per second).
pub const TARGET_RATE: f64 = 0.3;
/// Window of the decaying average used for decisions.
const WINDOW: f64 = 300.0;

/// Per-client vardiff state.
#[derive(Debug, Clone)]
pub struct VarDiff {
    /// Decaying average of accepted difficulty per second over ~5 minutes.
    ///
    /// Kept in 4 bytes (computed in `f64`): its 24-bit precision is far finer than the
    /// decisions taken on it, and it keeps a session 8 bytes smaller.
    dsps: f32,
    /// When `dsps` was last updated.
    last_decay: Stamp,
    /// First share seen (for the start-up bias); [`Stamp::NEVER`] before it.
    first_share: Stamp,
    /// Time of the last difficulty change.
    last_change: Stamp,
    /// Shares since the last difficulty change.
    ssdc: u32,
}

/// Bounds a vardiff decision is clamped to.
#[derive(Debug, Clone, Copy)]
pub struct Bounds {
    /// Pool minimum.
    pub min: Difficulty,
    /// Client's suggested (or configured) minimum, if any.
    pub suggested: Option<Difficulty>,
    /// Pool maximum, if any.
    pub max: Option<Difficulty>,
    /// Network difficulty (a share never needs to be harder than a block).
    pub network: Difficulty,
}

impl VarDiff {
    /// Whether an accepted share was ever counted.
    pub fn had_share(&self) -> bool {
        self.first_share != Stamp::NEVER
    }

    /// Writes its state for a handover, its times as ages before `now`.
    pub(crate) fn save(&self, w: &mut Writer, epoch: Instant, now: Instant) {
        w.u32(self.dsps.to_bits());
        w.i64(self.last_decay.age(now, epoch));
        w.i64(self.first_share.age(now, epoch));
        w.i64(self.last_change.age(now, epoch));
        w.u32(self.ssdc);
    }

    /// Reads what [`VarDiff::save`] wrote, its times rebuilt against `now`.
    pub(crate) fn load(
        r: &mut Reader<'_>,
        epoch: Instant,
        now: Instant,
    ) -> Result<Self, HandoverError> {
        let dsps = f32::from_bits(r.u32()?);
        if !dsps.is_finite() || dsps < 0.0 {
            return Err(HandoverError::Malformed("vardiff rate"));
        }
        Ok(Self {
            dsps,
            last_decay: Stamp::from_age(r.i64()?, now, epoch),
            first_share: Stamp::from_age(r.i64()?, now, epoch),
            last_change: Stamp::from_age(r.i64()?, now, epoch),
            ssdc: r.u32()?,
        })
    }

    /// Fresh state at `now`.
    pub fn new(epoch: Instant, now: Instant) -> Self {
        let now = Stamp::of(now, epoch);
        Self {
            dsps: 0.0,
            last_decay: now,
            first_share: Stamp::NEVER,
            last_change: now,
            ssdc: 0,
        }
    }

    /// The decaying average of accepted difficulty per second.
    pub fn dsps(&self, epoch: Instant, now: Instant) -> f64 {
        let mut f = f64::from(self.dsps);
        decay(&mut f, 0.0, secs(self.last_decay.until(now, epoch)));
        f
    }

    /// Records a difficulty change made elsewhere (suggest_difficulty).
    pub fn changed(&mut self, epoch: Instant, now: Instant) {
        self.ssdc = 0;
        self.last_change = Stamp::of(now, epoch);
    }

    /// Accounts an accepted share credited at `credited` while the client's difficulty is
    /// `current`; returns the new difficulty when it should change.
    pub fn on_share(
        &mut self,
        epoch: Instant,
        now: Instant,
        credited: Difficulty,
        current: Difficulty,
        bounds: Bounds,
    ) -> Option<Difficulty> {
        let stamp = Stamp::of(now, epoch);
        let elapsed = secs(self.last_decay.until(now, epoch));
        let mut f = f64::from(self.dsps);
        decay(&mut f, credited.to_f64(), elapsed);
        #[allow(clippy::cast_possible_truncation, reason = "stored at f32 precision")]
        {
            self.dsps = f as f32;
        }
        self.last_decay = stamp;
        if self.first_share == Stamp::NEVER {
            self.first_share = stamp;
        }
        let first = self.first_share;
        self.ssdc = self.ssdc.saturating_add(1);
        let since_change = self.last_change.until(now, epoch);
        if self.ssdc < 72 && since_change < Duration::from_secs(240) {
            return None;
        }
        if credited != current {
            // A share from before the last change: wait for shares at the new difficulty.
            self.ssdc = 0;
            return None;
        }
        let bias = 1.0 - (-secs(first.until(now, epoch)) / WINDOW).exp();
        if bias <= 0.0 {
            return None;
        }
        let dsps = f / bias;
        let current_f = current.to_f64();
        let drr = dsps / current_f;
        if drr > 0.15 && drr < 0.4 {
            return None;
        }
        let optimal = if bounds.suggested.is_some() {
            if drr < 0.5 {
                return None;
            }
            dsps * 2.4
        } else {
            dsps * (1.0 / TARGET_RATE)
        };
        // Whole difficulties are rounded as ckpool does; below 1 they stay fractional.
        let optimal = if optimal >= 1.0 {
            optimal.round()
        } else {
            optimal
        };
        let mut new = Difficulty::from_f64(optimal)?;
        new = new.max(bounds.min);
        if let Some(s) = bounds.suggested {
            new = new.max(s);
        }
        if let Some(m) = bounds.max {
            new = new.min(m);
        }
        new = new.min(bounds.network.max(bounds.min));
        if new == current {
            return None;
        }
        if new < current && self.ssdc == 1 {
            // The client just came back after a gap: give it a moment before lowering.
            self.last_change = stamp;
            return None;
        }
        self.ssdc = 0;
        self.last_change = stamp;
        Some(new)
    }
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

/// ckpool's decaying average: `f = (f + add/t * p) / (1 + p)`, `p = 1 - e^(-min(t/window, 36))`.
fn decay(f: &mut f64, add: f64, elapsed: f64) {
    let t = elapsed.max(0.001);
    let p = 1.0 - (-(t / WINDOW).min(36.0)).exp();
    *f = (*f + add / t * p) / (1.0 + p);
    if *f < 2e-16 {
        *f = 0.0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn d(x: f64) -> Difficulty {
        Difficulty::from_f64(x).unwrap()
    }

    fn bounds() -> Bounds {
        Bounds {
            min: d(1.0),
            suggested: None,
            max: None,
            network: d(1e12),
        }
    }

    /// Simulates a miner of `hashrate_diff_per_sec` submitting shares at its current difficulty.
    fn simulate(rate: f64, start: f64, secs_total: u64, b: Bounds) -> Difficulty {
        let t0 = Instant::now();
        let mut v = VarDiff::new(t0, t0);
        let mut diff = d(start);
        let mut t = 0.0f64;
        while t < secs_total as f64 {
            // Time to the next share at this difficulty, deterministic.
            t += diff.to_f64() / rate;
            let now = t0 + Duration::from_secs_f64(t);
            if let Some(n) = v.on_share(t0, now, diff, diff, b) {
                diff = n;
            }
        }
        diff
    }

    #[test]
    fn a_handed_over_vardiff_decides_as_the_original_would() {
        // A miner 60 s into its work, then handed to a process with another epoch and clock.
        let t0 = Instant::now();
        let mut a = VarDiff::new(t0, t0);
        let mut diff = d(1.0);
        let mut t = 0.0f64;
        while t < 60.0 {
            t += diff.to_f64() / 1000.0;
            if let Some(n) = a.on_share(t0, t0 + Duration::from_secs_f64(t), diff, diff, bounds()) {
                diff = n;
            }
        }
        assert!(diff > d(1.0), "moved before the handover");
        let at = t0 + Duration::from_secs_f64(t);
        let mut w = Writer::default();
        w.u8(1);
        a.save(&mut w, t0, at);
        assert_eq!(w.buf.len(), 1 + 32);
        let (epoch, now) = (at + Duration::from_secs(7), at + Duration::from_secs(1000));
        let mut r = Reader::new(&w.buf, 1).unwrap();
        let mut b = VarDiff::load(&mut r, epoch, now).unwrap();
        r.finish().unwrap();
        // From here on, both see the same shares at the same offsets: same decisions.
        let (mut da, mut db) = (diff, diff);
        let (mut changes, mut dt) = (0, Duration::ZERO);
        for i in 1..2000u32 {
            dt += Duration::from_millis(u64::from(i % 7) * 40 + 5);
            let (ra, rb) = (
                a.on_share(t0, at + dt, da, da, bounds()),
                b.on_share(epoch, now + dt, db, db, bounds()),
            );
            assert_eq!(ra, rb, "share {i}");
            if let (Some(x), Some(y)) = (ra, rb) {
                (da, db) = (x, y);
                changes += 1;
            }
        }
        assert!(changes > 0, "no decision was compared");
        assert!((a.dsps(t0, at) - b.dsps(epoch, now)).abs() <= 1e-9 * a.dsps(t0, at).max(1.0));
    }

    #[test]
    fn converges_up_to_target_rate() {
        // 1000 diff-1 shares per second of work: the right difficulty is ~3333.
        let got = simulate(1000.0, 1.0, 3600, bounds()).to_f64();
        assert!((2000.0..=5000.0).contains(&got), "{got}");
    }

    #[test]
    fn converges_down() {
        let got = simulate(10.0, 10_000.0, 7200, bounds()).to_f64();
        assert!((15.0..=60.0).contains(&got), "{got}");
    }

    #[test]
    fn stays_within_bounds() {
        let b = Bounds {
            min: d(1.0),
            suggested: None,
            max: Some(d(500.0)),
            network: d(1e12),
        };
        assert_eq!(simulate(1000.0, 1.0, 3600, b), d(500.0));
        let b = Bounds {
            min: d(1.0),
            suggested: None,
            max: None,
            network: d(100.0),
        };
        assert_eq!(simulate(1000.0, 1.0, 3600, b), d(100.0));
    }

    proptest! {
        #[test]
        fn never_leaves_bounds(rate in 0.01f64..1e6, start in 1.0f64..1e6, min in 0.001f64..10.0, max in 10.0f64..1e5) {
            let b = Bounds { min: d(min), suggested: None, max: Some(d(max)), network: d(1e9) };
            let got = simulate(rate, start.clamp(min, max), 1200, b);
            prop_assert!(got >= d(min) && got <= d(max), "{:?}", got);
        }
    }
}
