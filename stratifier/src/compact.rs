//! Small forms of the values every session keeps, so that an idle miner costs the stratifier
//! under 200 bytes: difficulties in 8 bytes, instants in 8, shared names behind thin pointers.

use std::borrow::Borrow;
use std::fmt;
use std::num::NonZeroU64;
use std::ops::Deref;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::Difficulty;

/// A [`Difficulty`] in 8 bytes (a `Difficulty` is a 16-byte, 16-aligned `u128` of 2^-32 units).
///
/// Up to 2^63 units (difficulty 2^31, a share per few seconds from about 3 EH/s) it is exact.
/// Above, it keeps the 55 leading bits and rounds down; the miner is told the packed value
/// (`mining.set_difficulty` carries a 53-bit float anyway), so pool and miner always agree.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct PackedDiff(NonZeroU64);

const WIDE: u64 = 1 << 63;
const MANTISSA_BITS: u32 = 55;
const MANTISSA: u64 = (1 << MANTISSA_BITS) - 1;

impl PackedDiff {
    pub(crate) fn new(d: Difficulty) -> Self {
        let units = d.units();
        let packed = match u64::try_from(units) {
            Ok(u) if u < WIDE => u,
            _ => {
                let bits = 128 - units.leading_zeros();
                let shift = bits - MANTISSA_BITS;
                // At most 55 significant bits remain, so the cast keeps them all.
                #[allow(clippy::cast_possible_truncation, reason = "55 bits by construction")]
                let mantissa = (units >> shift) as u64;
                WIDE | (u64::from(shift) << MANTISSA_BITS) | (mantissa & MANTISSA)
            }
        };
        // A difficulty is never zero units, and the wide form has its top bit set.
        Self(NonZeroU64::new(packed).unwrap_or(NonZeroU64::MIN))
    }

    pub(crate) fn get(self) -> Difficulty {
        let p = self.0.get();
        if p & WIDE == 0 {
            return Difficulty::from_units(u128::from(p));
        }
        let shift = (p >> MANTISSA_BITS) & 0xff;
        // The wide form always had bit 54 set: restore it along with the stored bits.
        let mantissa = u128::from((p & MANTISSA) | (1 << (MANTISSA_BITS - 1)));
        Difficulty::from_units(mantissa << shift)
    }

    /// `d` as it is kept (and so as the miner must be told it).
    pub(crate) fn round(d: Difficulty) -> Difficulty {
        Self::new(d).get()
    }

    /// Its packed bits, for a handover blob.
    pub(crate) fn raw(self) -> u64 {
        self.0.get()
    }

    /// A difficulty from [`PackedDiff::raw`]'s bits; `None` for zero.
    pub(crate) fn from_raw(raw: u64) -> Option<Self> {
        NonZeroU64::new(raw).map(Self)
    }
}

/// An instant in 8 bytes (an `Instant` takes 16): signed nanoseconds from a reference instant
/// (the pool's epoch, given to [`crate::Pool::new`]; the stratifier reads no clock), so instants
/// before the reference are kept exactly too. Stamps are only compared with stamps of the same
/// epoch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Stamp(i64);

impl Stamp {
    /// Never set; further back than any real instant.
    pub(crate) const NEVER: Self = Self(i64::MIN);

    pub(crate) fn of(t: Instant, epoch: Instant) -> Self {
        let nanos = |d: Duration| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX);
        if t >= epoch {
            Self(nanos(t - epoch))
        } else {
            Self(nanos(epoch - t).saturating_neg().max(i64::MIN + 1))
        }
    }

    /// Nanoseconds from this stamp to `now` (negative for a stamp after `now`), or `i64::MIN`
    /// for [`Stamp::NEVER`]: what a handover blob carries.
    pub(crate) fn age(self, now: Instant, epoch: Instant) -> i64 {
        if self == Self::NEVER {
            return i64::MIN;
        }
        Self::of(now, epoch).0.saturating_sub(self.0)
    }

    /// The stamp [`Stamp::age`] gave `age`, against this `now` and `epoch`.
    pub(crate) fn from_age(age: i64, now: Instant, epoch: Instant) -> Self {
        if age == i64::MIN {
            return Self::NEVER;
        }
        Self(Self::of(now, epoch).0.saturating_sub(age).max(i64::MIN + 1))
    }

    /// Time from `self` to `now`, zero if `now` is earlier.
    pub(crate) fn until(self, now: Instant, epoch: Instant) -> Duration {
        let d = Self::of(now, epoch).0.saturating_sub(self.0);
        Duration::from_nanos(u64::try_from(d).unwrap_or(0))
    }
}

/// A shared string behind a thin pointer (8 bytes, where an `Arc<str>` takes 16): user names and
/// user agents, of which a farm's miners share a few.
#[derive(Clone, PartialEq, Eq, Hash)]
pub(crate) struct Name(Arc<Box<str>>);

impl Name {
    pub(crate) fn new(s: &str) -> Self {
        Self(Arc::new(Box::from(s)))
    }

    /// The shared string itself (no copy).
    pub(crate) fn shared(&self) -> Arc<Box<str>> {
        Arc::clone(&self.0)
    }

    /// Holders of this copy (an interner prunes the names only it holds).
    pub(crate) fn holders(&self) -> usize {
        Arc::strong_count(&self.0)
    }
}

impl Deref for Name {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl Borrow<str> for Name {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self)
    }
}

impl fmt::Debug for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&**self, f)
    }
}

/// A short string in 16 bytes: up to 14 bytes inline (a worker name's suffix after its user:
/// `.rig1`, `_s19-07`), longer ones behind a thin pointer. `CompactString` takes 24.
#[derive(Clone, PartialEq, Eq)]
pub(crate) enum ShortStr {
    /// Up to [`ShortStr::INLINE`] bytes of UTF-8 (a whole string, so a char boundary).
    Inline {
        /// Bytes used.
        len: u8,
        /// The text, then zeros.
        buf: [u8; 14],
    },
    /// Longer text.
    Heap(Box<Box<str>>),
}

impl ShortStr {
    /// Bytes kept inline.
    pub(crate) const INLINE: usize = 14;

    pub(crate) fn new(s: &str) -> Self {
        let mut buf = [0u8; Self::INLINE];
        match (buf.get_mut(..s.len()), u8::try_from(s.len())) {
            (Some(dst), Ok(len)) => {
                dst.copy_from_slice(s.as_bytes());
                Self::Inline { len, buf }
            }
            _ => Self::Heap(Box::new(Box::from(s))),
        }
    }

    /// The bytes, without the UTF-8 check of [`ShortStr::as_str`] (for comparisons).
    pub(crate) fn as_bytes(&self) -> &[u8] {
        match self {
            Self::Inline { len, buf } => buf.get(..usize::from(*len)).unwrap_or(&[]),
            Self::Heap(s) => s.as_bytes(),
        }
    }

    pub(crate) fn as_str(&self) -> &str {
        match self {
            Self::Inline { len, buf } => buf
                .get(..usize::from(*len))
                .and_then(|b| std::str::from_utf8(b).ok())
                .unwrap_or(""),
            Self::Heap(s) => s,
        }
    }
}

impl fmt::Display for ShortStr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for ShortStr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn sizes() {
        assert_eq!(size_of::<PackedDiff>(), 8);
        assert_eq!(size_of::<Option<PackedDiff>>(), 8);
        assert_eq!(size_of::<Stamp>(), 8);
        assert_eq!(size_of::<Name>(), 8);
        assert_eq!(size_of::<Option<Name>>(), 8);
        assert_eq!(size_of::<ShortStr>(), 16);
    }

    #[test]
    fn packed_difficulties_at_the_edges() {
        for units in [1u128, 2, (1 << 32) + 1, (1 << 63) - 1] {
            let d = Difficulty::from_units(units);
            assert_eq!(PackedDiff::new(d).get(), d, "{units} is exact");
        }
        for units in [1u128 << 63, u128::MAX, (1 << 100) + (1 << 45), 3 << 70] {
            let d = Difficulty::from_units(units);
            let got = PackedDiff::new(d).get();
            assert!(got <= d, "rounds down");
            assert!(
                got.units() >= units - (units >> 54),
                "keeps 55 bits of {units}"
            );
            assert_eq!(PackedDiff::round(got), got, "a kept value packs exactly");
        }
    }

    proptest! {
        #[test]
        fn packing_is_monotonic_and_idempotent(a in 1u128.., b in 1u128..) {
            let (pa, pb) = (PackedDiff::round(Difficulty::from_units(a)), PackedDiff::round(Difficulty::from_units(b)));
            if a <= b {
                prop_assert!(pa <= pb);
            }
            prop_assert_eq!(PackedDiff::round(pa), pa);
            prop_assert!(pa.units() <= a);
        }
    }

    #[test]
    fn stamps_measure_time_either_side_of_the_epoch() {
        let epoch = Instant::now();
        let now = epoch + Duration::from_secs(1);
        // Before the epoch too.
        let earlier = now.checked_sub(Duration::from_secs(5));
        let s = Stamp::of(now, epoch);
        assert_eq!(
            s.until(now + Duration::from_millis(1500), epoch),
            Duration::from_millis(1500)
        );
        assert_eq!(s.until(now, epoch), Duration::ZERO);
        if let Some(e) = earlier {
            assert!(Stamp::of(e, epoch) < Stamp::of(epoch, epoch));
            assert_eq!(
                Stamp::of(e, epoch).until(now, epoch),
                Duration::from_secs(5)
            );
            assert_eq!(s.until(e, epoch), Duration::ZERO, "never negative");
        }
        assert!(Stamp::NEVER < Stamp::of(now, epoch));
    }

    #[test]
    fn short_strings_keep_their_text_inline_or_not() {
        for s in [
            "",
            ".rig1",
            "_fourteen-byte",
            "é.rig",
            ".a-much-longer-worker-name",
            "ü",
        ] {
            let k = ShortStr::new(s);
            assert_eq!(k.as_str(), s);
            assert_eq!(k.as_bytes(), s.as_bytes());
            assert_eq!(k.to_string(), s);
            assert_eq!(
                matches!(k, ShortStr::Inline { .. }),
                s.len() <= ShortStr::INLINE,
                "{s}"
            );
        }
        assert_eq!(ShortStr::new("_fourteen-byte").as_str().len(), 14);
    }

    #[test]
    fn names_compare_and_hash_as_their_text() {
        let mut set = std::collections::HashSet::new();
        set.insert(Name::new("alice"));
        assert!(set.contains("alice"));
        assert_eq!(&*Name::new("bob"), "bob");
        assert_eq!(Name::new("x").to_string(), "x");
    }
}
