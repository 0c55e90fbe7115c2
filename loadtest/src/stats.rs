//! Measurements: latency histograms that merge exactly across workers, event counters, and
//! per-kind share results.
//!
//! Histograms hold microseconds in an [`hdrhistogram::Histogram`] (3 significant figures, 1 µs to
//! one hour). Between processes they travel as hdrhistogram's V2 serialization in hex, so the
//! merged percentiles are exactly those of one histogram fed every sample.

use std::collections::BTreeMap;
use std::time::Duration;

use hdrhistogram::Histogram;
use hdrhistogram::serialization::{Deserializer, Serializer, V2Serializer};
use serde::{Deserialize, Serialize};

use crate::Error;

/// Largest latency a histogram tracks (longer samples are clamped to it): one hour in µs.
pub const HIST_MAX_US: u64 = 3_600_000_000;
/// Distinct error texts kept per worker before the rest are counted under `"other"`.
const MAX_ERROR_KINDS: usize = 64;

/// A latency histogram in microseconds.
#[derive(Clone, Debug)]
pub struct Hist(Histogram<u64>);

impl Default for Hist {
    fn default() -> Self {
        Self::new()
    }
}

impl Hist {
    /// An empty histogram (1 µs to [`HIST_MAX_US`], 3 significant figures).
    #[expect(
        clippy::expect_used,
        reason = "constant bounds that hdrhistogram accepts"
    )]
    pub fn new() -> Self {
        Self(Histogram::new_with_bounds(1, HIST_MAX_US, 3).expect("valid histogram bounds"))
    }

    /// An empty histogram at 2 significant figures (a tenth of the memory), for the many
    /// short ones of a run: one per second of the window.
    #[expect(
        clippy::expect_used,
        reason = "constant bounds that hdrhistogram accepts"
    )]
    pub fn coarse() -> Self {
        Self(Histogram::new_with_bounds(1, HIST_MAX_US, 2).expect("valid histogram bounds"))
    }

    /// Records one duration.
    pub fn record(&mut self, d: Duration) {
        self.record_us(u64::try_from(d.as_micros()).unwrap_or(HIST_MAX_US));
    }

    /// Records one value in microseconds (clamped to [`HIST_MAX_US`]).
    pub fn record_us(&mut self, us: u64) {
        self.0.saturating_record(us.min(HIST_MAX_US));
    }

    /// Number of samples.
    pub fn len(&self) -> u64 {
        self.0.len()
    }

    /// Whether no sample was recorded.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Adds every sample of `other`.
    pub fn merge(&mut self, other: &Self) {
        // Same bounds on both sides, so adding cannot fail; saturating on overflow is fine.
        if self.0.add(&other.0).is_err() {
            for v in other.0.iter_recorded() {
                let _ = self.0.record_n(v.value_iterated_to(), v.count_at_value());
            }
        }
    }

    /// Forgets every sample.
    pub fn reset(&mut self) {
        self.0.reset();
    }

    /// The value at quantile `q` (0..=1) in µs, 0 when empty.
    pub fn quantile_us(&self, q: f64) -> u64 {
        if self.0.is_empty() {
            0
        } else {
            self.0.value_at_quantile(q)
        }
    }

    /// Count, min, mean, p50, p90, p99, p99.9 and max.
    pub fn summary(&self) -> LatencySummary {
        if self.0.is_empty() {
            return LatencySummary::default();
        }
        LatencySummary {
            count: self.0.len(),
            min_us: self.0.min(),
            mean_us: self.0.mean(),
            p50_us: self.0.value_at_quantile(0.5),
            p90_us: self.0.value_at_quantile(0.9),
            p99_us: self.0.value_at_quantile(0.99),
            p999_us: self.0.value_at_quantile(0.999),
            max_us: self.0.max(),
        }
    }

    /// hdrhistogram's V2 serialization, hex encoded.
    pub fn to_v2_hex(&self) -> String {
        let mut bytes = Vec::new();
        // Writing into a Vec cannot fail; an empty string decodes as an empty histogram.
        if V2Serializer::new().serialize(&self.0, &mut bytes).is_err() {
            return String::new();
        }
        hex::encode(bytes)
    }

    /// Decodes [`Hist::to_v2_hex`] output.
    pub fn from_v2_hex(text: &str) -> Result<Self, Error> {
        if text.is_empty() {
            return Ok(Self::new());
        }
        let bytes =
            hex::decode(text).map_err(|e| Error::Protocol(format!("histogram hex: {e}")))?;
        let h: Histogram<u64> = Deserializer::new()
            .deserialize(&mut bytes.as_slice())
            .map_err(|e| Error::Protocol(format!("histogram V2: {e:?}")))?;
        let mut out = Self::new();
        for v in h.iter_recorded() {
            out.0
                .saturating_record_n(v.value_iterated_to(), v.count_at_value());
        }
        Ok(out)
    }
}

/// Percentiles of one histogram, in microseconds.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LatencySummary {
    /// Samples.
    pub count: u64,
    /// Smallest sample.
    pub min_us: u64,
    /// Mean.
    pub mean_us: f64,
    /// Median.
    pub p50_us: u64,
    /// 90th percentile.
    pub p90_us: u64,
    /// 99th percentile.
    pub p99_us: u64,
    /// 99.9th percentile.
    pub p999_us: u64,
    /// Largest sample.
    pub max_us: u64,
}

macro_rules! counters {
    ($($(#[doc = $doc:literal])+ $name:ident,)*) => {
        /// Event counts of a run (one worker's, or merged).
        #[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
        pub struct Counters {
            $($(#[doc = $doc])+ #[serde(default)] pub $name: u64,)*
        }

        impl Counters {
            /// Adds `other` field by field.
            pub fn merge(&mut self, other: &Self) {
                $(self.$name += other.$name;)*
            }
        }
    };
}

counters! {
    /// TCP connects started.
    connect_attempts,
    /// TCP connects that failed or timed out.
    connect_failures,
    /// TCP connects that succeeded.
    connected,
    /// Subscribe replies with an extranonce1.
    subscribed,
    /// Subscribe replies without one (errors).
    subscribe_failures,
    /// Authorize replies with `result: true`.
    authorized,
    /// Authorize replies refusing the worker.
    authorize_failures,
    /// Handshake replies (configure, subscribe, authorize) that did not come in time.
    handshake_timeouts,
    /// Connections the pool closed or broke while the miner wanted them.
    disconnects,
    /// Reconnects after a disconnect or a churn step.
    reconnects,
    /// Churn disconnects (on purpose).
    churn_disconnects,
    /// Lines from the pool that could not be used (not JSON, bad notify, unknown reply id).
    protocol_errors,
    /// Of those, replies to no request in flight: a second reply to one submit shows here.
    unknown_replies,
    /// `mining.notify` messages.
    notifies,
    /// `mining.set_difficulty` messages.
    difficulty_changes,
    /// `mining.ping` answered.
    pings,
    /// `client.reconnect` requests from the pool.
    reconnect_requests,
    /// Subscribes that passed a session id to resume.
    resume_attempts,
    /// Of those, the ones that got the same extranonce1 back.
    resume_ok,
    /// Of those, the ones that got a different extranonce1.
    resume_mismatch,
    /// sha256d header hashes computed while grinding.
    hashes,
    /// `mining.submit` sent.
    submitted,
    /// Submits the pool accepted.
    accepted,
    /// Submits the pool rejected.
    rejected,
    /// Submits without a reply when the connection ended.
    unanswered,
    /// Submits sent after the ramp (the measurement window).
    hold_submitted,
    /// Of those, the ones accepted.
    hold_accepted,
    /// Submits whose hash met the network target.
    blocks_submitted,
    /// Submits not sent: no share of the wanted kind exists at the pool's difficulty, or the
    /// grind budget ran out.
    shares_skipped,
    /// Invalid-share knobs that fell back to a valid share (no older block's job yet, or no
    /// earlier share to duplicate).
    knob_fallbacks,
    /// End-of-run resume checks (`--resume-at-end`): miners that reconnected once more after
    /// the run, passing their session id.
    end_resume_attempts,
    /// Of those, the ones that got their extranonce1 back.
    end_resume_ok,
    /// Of those, the ones that got a different extranonce1.
    end_resume_mismatch,
    /// Of those, the ones whose check failed (no connect, no subscribe reply, an error).
    end_resume_failures,
}

/// The kind of share a submit was meant to be.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ShareKind {
    /// Meets the share target, on the current job.
    Valid,
    /// Meets the share target, on a job from before the current block.
    Stale,
    /// A repeat of an earlier share on the current block.
    Duplicate,
    /// Misses the share target.
    LowDifficulty,
}

impl ShareKind {
    /// Every kind, in report order.
    pub const ALL: [Self; 4] = [
        Self::Valid,
        Self::Stale,
        Self::Duplicate,
        Self::LowDifficulty,
    ];

    /// Name in reports.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Valid => "valid",
            Self::Stale => "stale",
            Self::Duplicate => "duplicate",
            Self::LowDifficulty => "low_difficulty",
        }
    }

    /// The reject reason a pool gives for this kind (ckpool's wording), `None` for valid shares.
    pub const fn expected_reason(self) -> Option<&'static str> {
        match self {
            Self::Valid => None,
            Self::Stale => Some("Stale"),
            Self::Duplicate => Some("Duplicate"),
            Self::LowDifficulty => Some("Above target"),
        }
    }

    pub(crate) const fn index(self) -> usize {
        match self {
            Self::Valid => 0,
            Self::Stale => 1,
            Self::Duplicate => 2,
            Self::LowDifficulty => 3,
        }
    }
}

/// Results of the submits of one [`ShareKind`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KindStats {
    /// Submits sent.
    pub submitted: u64,
    /// Accepted by the pool.
    pub accepted: u64,
    /// Rejected, by reason text.
    pub rejected: BTreeMap<String, u64>,
    /// Rejected as "Stale" although sent on the current job, because a new block reached the
    /// pool before the share (a new-block notify arrived around the reply). Also counted in
    /// `rejected`.
    pub raced_block: u64,
    /// Not answered before the connection ended.
    pub unanswered: u64,
}

impl KindStats {
    /// Adds `other`.
    pub fn merge(&mut self, other: &Self) {
        self.submitted += other.submitted;
        self.accepted += other.accepted;
        for (reason, n) in &other.rejected {
            *self.rejected.entry(reason.clone()).or_default() += n;
        }
        self.raced_block += other.raced_block;
        self.unanswered += other.unanswered;
    }

    /// Rejections total.
    pub fn rejected_total(&self) -> u64 {
        self.rejected.values().sum()
    }

    /// Replies that were not what this kind should get: for valid shares any reject, for the
    /// others an acceptance or a reason other than the expected one (block races excepted).
    pub fn unexpected(&self, kind: ShareKind) -> u64 {
        match kind.expected_reason() {
            None => self.rejected_total().saturating_sub(self.raced_block),
            Some(want) => {
                let other_reasons: u64 = self
                    .rejected
                    .iter()
                    .filter(|(r, _)| r.as_str() != want)
                    .map(|(_, n)| *n)
                    .sum();
                let raced = if kind == ShareKind::Stale {
                    0
                } else {
                    self.raced_block
                };
                self.accepted + other_reasons.saturating_sub(raced)
            }
        }
    }
}

/// Error texts with counts, bounded in how many distinct texts it keeps.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ErrorCounts(pub BTreeMap<String, u64>);

impl ErrorCounts {
    /// Counts one occurrence of `what`.
    pub fn add(&mut self, what: &str) {
        self.add_n(what, 1);
    }

    /// Counts `n` occurrences of `what`.
    pub fn add_n(&mut self, what: &str, n: u64) {
        if let Some(c) = self.0.get_mut(what) {
            *c += n;
        } else if self.0.len() < MAX_ERROR_KINDS {
            self.0.insert(what.to_owned(), n);
        } else {
            *self.0.entry("other".to_owned()).or_default() += n;
        }
    }

    /// Adds `other`.
    pub fn merge(&mut self, other: &Self) {
        for (k, n) in &other.0 {
            self.add_n(k, *n);
        }
    }

    /// Total count.
    pub fn total(&self) -> u64 {
        self.0.values().sum()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "test code")]
mod tests {
    use super::*;

    #[test]
    fn histograms_merge_exactly_through_v2_hex() {
        let mut a = Hist::new();
        let mut b = Hist::new();
        let mut all = Hist::new();
        for i in 1..=1000u64 {
            a.record_us(i * 7);
            all.record_us(i * 7);
        }
        for i in 1..=500u64 {
            b.record_us(i * 1000);
            all.record_us(i * 1000);
        }
        let mut merged = Hist::from_v2_hex(&a.to_v2_hex()).unwrap();
        merged.merge(&Hist::from_v2_hex(&b.to_v2_hex()).unwrap());
        assert_eq!(merged.summary(), all.summary());
        assert_eq!(merged.len(), 1500);
        assert!(Hist::from_v2_hex("").unwrap().is_empty());
        assert!(Hist::from_v2_hex("zz").is_err());
        assert_eq!(Hist::new().summary(), LatencySummary::default());
    }

    #[test]
    fn huge_samples_are_clamped() {
        let mut h = Hist::new();
        h.record(Duration::from_secs(10 * 3600));
        assert_eq!(h.len(), 1);
        assert!(h.summary().max_us >= HIST_MAX_US - HIST_MAX_US / 500);
    }

    #[test]
    fn counters_and_kinds_merge() {
        let mut a = Counters {
            submitted: 3,
            accepted: 2,
            ..Counters::default()
        };
        a.merge(&Counters {
            submitted: 4,
            rejected: 1,
            ..Counters::default()
        });
        assert_eq!((a.submitted, a.accepted, a.rejected), (7, 2, 1));

        let mut k = KindStats::default();
        k.rejected.insert("Duplicate".into(), 5);
        let mut other = KindStats::default();
        other.rejected.insert("Duplicate".into(), 1);
        other.rejected.insert("Stale".into(), 1);
        other.raced_block = 1;
        k.merge(&other);
        assert_eq!(k.rejected_total(), 7);
        assert_eq!(k.unexpected(ShareKind::Duplicate), 0);
        k.accepted = 1;
        assert_eq!(k.unexpected(ShareKind::Duplicate), 1);
        let mut valid = KindStats::default();
        valid.rejected.insert("Stale".into(), 2);
        valid.raced_block = 2;
        assert_eq!(valid.unexpected(ShareKind::Valid), 0);
    }

    #[test]
    fn error_counts_are_bounded() {
        let mut e = ErrorCounts::default();
        for i in 0..100 {
            e.add(&format!("e{i}"));
        }
        e.add("e0");
        assert_eq!(e.total(), 101);
        assert_eq!(e.0.len(), MAX_ERROR_KINDS + 1);
        assert_eq!(e.0["e0"], 2);
    }
}
