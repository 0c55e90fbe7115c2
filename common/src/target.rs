//! Exact difficulty and target maths on 256-bit integers.
//!
//! A [`Difficulty`] is fixed point with 32 fractional bits, so fractional difficulties down to
//! 2^-32 are exact; a [`Target`] is a 256-bit integer. Difficulty 1 is the target
//! `0xffff * 2^208` (bitcoin's "truediffone").

use std::fmt;
use std::num::NonZeroU128;

use ruint::aliases::U256;

/// Share or network difficulty, fixed point in units of 2^-32.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub struct Difficulty(NonZeroU128);

impl Difficulty {
    /// Difficulty 1.
    pub const ONE: Self = Self::from_units(1 << 32);
    /// The smallest difficulty, 2^-32.
    pub const MIN: Self = Self(NonZeroU128::MIN);

    /// From raw units of 2^-32 (0 is raised to [`Difficulty::MIN`]). Never zero, so an
    /// `Option<Difficulty>` is as small as a `Difficulty`.
    pub const fn from_units(units: u128) -> Self {
        match NonZeroU128::new(units) {
            Some(u) => Self(u),
            None => Self::MIN,
        }
    }

    /// Raw units of 2^-32.
    pub const fn units(self) -> u128 {
        self.0.get()
    }

    /// From a float; `None` for NaN, infinities, zero, negatives and values above 2^95.
    pub fn from_f64(d: f64) -> Option<Self> {
        if !d.is_finite() || d <= 0.0 || d > MAX_F64 {
            return None;
        }
        // Scaling by a power of two is exact; rounding to the nearest unit happens once here.
        let units = (d * UNIT_F64).round();
        // `units` is in [0, 2^127], so the conversion is exact.
        Some(Self::from_units(units as u128))
    }

    /// As a float (for estimates and display).
    pub fn to_f64(self) -> f64 {
        self.units() as f64 / UNIT_F64
    }

    /// Whether the value is a whole number.
    pub const fn is_whole(self) -> bool {
        self.units() & 0xffff_ffff == 0
    }

    /// The share target for this difficulty: `floor(diff1 * 2^32 / units)`.
    pub fn target(self) -> Target {
        // `units` is never 0 (constructors raise it to MIN), so the division cannot fail.
        Target(
            DIFF1_SHIFTED
                .checked_div(U256::from(self.units()))
                .unwrap_or(U256::MAX),
        )
    }

    /// Appends the value as JSON: an integer when whole, else a decimal with enough digits.
    ///
    /// Whole values are written exactly (`1`, `42`, `1000000`). Other values are written as the
    /// shortest decimal that parses back to the same `f64` (no exponent notation, e.g. `0.5` or
    /// `0.00000000023283064365386963`), so that `from_f64` of the parsed number gives back the
    /// same units whenever the value needs at most 53 significant bits (every difficulty below
    /// 2^21 does), and is within one part in 2^53 otherwise.
    pub fn write_json(self, out: &mut Vec<u8>) {
        use std::io::Write as _;
        // Writing to a Vec cannot fail.
        let _ = if self.is_whole() {
            write!(out, "{}", self.units() >> 32)
        } else {
            write!(out, "{}", self.to_f64())
        };
    }

    /// A whole difficulty (0 is raised to [`Difficulty::MIN`]).
    pub const fn from_whole(d: u64) -> Self {
        Self::from_units((d as u128) << 32)
    }
}

impl fmt::Display for Difficulty {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut v = Vec::new();
        self.write_json(&mut v);
        f.write_str(&String::from_utf8_lossy(&v))
    }
}

/// A 256-bit target; a hash (read as a little-endian integer) meets it when `hash <= target`.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub struct Target(pub U256);

impl Target {
    /// The largest target.
    pub const MAX: Self = Self(U256::MAX);

    /// Expands a compact `nBits` value (negative or overflowing encodings give 0 / MAX).
    pub fn from_compact(bits: u32) -> Self {
        let exponent = bits >> 24;
        let mantissa = bits & 0x007f_ffff;
        if mantissa == 0 {
            return Self(U256::ZERO);
        }
        if bits & 0x0080_0000 != 0 {
            return Self(U256::ZERO);
        }
        let value = U256::from(mantissa);
        if exponent <= 3 {
            return Self(value >> (8 * (3 - exponent) as usize));
        }
        let shift = 8 * (exponent - 3) as usize;
        // The mantissa has at most 23 significant bits; anything shifted past bit 255 overflows.
        if value.bit_len() + shift > 256 {
            return Self::MAX;
        }
        Self(value << shift)
    }

    /// The compact `nBits` encoding of this target (rounded down, as Bitcoin Core's `GetCompact`).
    pub fn to_compact(&self) -> u32 {
        let mut size = self.0.byte_len();
        let mut compact: u32 = if size <= 3 {
            let low = self.0.as_limbs().first().copied().unwrap_or(0);
            // At most 24 bits are set here.
            (low << (8 * (3 - size))) as u32
        } else {
            let shifted = self.0 >> (8 * (size - 3));
            shifted.as_limbs().first().copied().unwrap_or(0) as u32
        };
        // The sign bit must stay clear: move one byte into the exponent instead.
        if compact & 0x0080_0000 != 0 {
            compact >>= 8;
            size += 1;
        }
        compact | ((size as u32) << 24)
    }

    /// Whether a hash in internal byte order (little-endian number) meets this target.
    pub fn is_met_by(&self, hash: &[u8; 32]) -> bool {
        U256::from_le_bytes(*hash) <= self.0
    }

    /// Difficulty of this target as a float (diff1 / target).
    pub fn difficulty_f64(&self) -> f64 {
        DIFF1_F64 / f64::from(self.0)
    }

    /// Difficulty of this target, rounded down to a whole unit of 2^-32 (at least [`Difficulty::MIN`]).
    pub fn difficulty(&self) -> Difficulty {
        match DIFF1_SHIFTED.checked_div(self.0) {
            None => Difficulty(NonZeroU128::MAX),
            Some(units) => Difficulty::from_units(u128::try_from(units).unwrap_or(u128::MAX)),
        }
    }
}

/// Difficulty a hash (internal byte order) achieves, as a float: diff1 / hash.
///
/// A zero hash gives `f64::INFINITY`.
pub fn hash_difficulty(hash: &[u8; 32]) -> f64 {
    DIFF1_F64 / f64::from(U256::from_le_bytes(*hash))
}

/// Difficulty 1 as a target: `0xffff * 2^208`.
pub const DIFF1: Target = Target(U256::from_limbs([0, 0, 0, 0xffff_0000]));

/// `diff1 * 2^32`: dividing it by a difficulty in units of 2^-32 gives the target.
const DIFF1_SHIFTED: U256 = U256::from_limbs([0, 0, 0, 0xffff_0000_0000_0000]);

/// Difficulty 1's target as a float (exact: 65535 * 2^208).
const DIFF1_F64: f64 = 65535.0 * TWO_104 * TWO_104;

/// 2^104 as a float.
const TWO_104: f64 = (1u128 << 104) as f64;

/// One difficulty in units: 2^32.
const UNIT_F64: f64 = 4_294_967_296.0;

/// The largest difficulty [`Difficulty::from_f64`] accepts: 2^95.
const MAX_F64: f64 = (1u128 << 95) as f64;

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn json(d: Difficulty) -> String {
        let mut v = Vec::new();
        d.write_json(&mut v);
        String::from_utf8(v).unwrap()
    }

    fn round_trip(d: Difficulty) -> Difficulty {
        let s = json(d);
        let f: f64 = s.parse().unwrap();
        // Valid JSON number (serde_json's default float parser is not correctly rounded, so only
        // the syntax is checked with it).
        assert!(
            serde_json::from_str::<serde_json::Value>(&s)
                .unwrap()
                .is_number(),
            "{s}"
        );
        Difficulty::from_f64(f).unwrap()
    }

    #[test]
    fn diff1_target() {
        let t = Difficulty::ONE.target();
        assert_eq!(t, DIFF1);
        assert_eq!(t, Target::from_compact(0x1d00ffff));
        assert_eq!(t.difficulty(), Difficulty::ONE);
        assert_eq!(t.difficulty_f64(), 1.0);
        assert_eq!(Difficulty::MIN.target().0, DIFF1_SHIFTED);
    }

    #[test]
    fn compact_expansion() {
        // Regtest / testnet3 / signet values from the test templates.
        assert_eq!(
            Target::from_compact(0x207fffff).0,
            U256::from(0x7fffffu32) << 232usize
        );
        let t = Target::from_compact(0x192495f8);
        assert_eq!(
            format!("{:064x}", t.0),
            "000000000000002495f800000000000000000000000000000000000000000000"
        );
        // Small exponents shift right.
        assert_eq!(Target::from_compact(0x01123456).0, U256::from(0x12u32));
        assert_eq!(Target::from_compact(0x02123456).0, U256::from(0x1234u32));
        assert_eq!(Target::from_compact(0x03123456).0, U256::from(0x123456u32));
        assert_eq!(
            Target::from_compact(0x04123456).0,
            U256::from(0x12345600u32)
        );
        // Negative and zero encodings.
        assert_eq!(Target::from_compact(0x04923456).0, U256::ZERO);
        assert_eq!(Target::from_compact(0x00000000).0, U256::ZERO);
        assert_eq!(Target::from_compact(0x20000000).0, U256::ZERO);
        // Overflow.
        assert_eq!(Target::from_compact(0xff123456), Target::MAX);
        assert_eq!(
            Target::from_compact(0x22000001).0,
            U256::from(1u32) << 248usize
        );
        assert_eq!(Target::from_compact(0x23000001), Target::MAX);
        assert_eq!(Target::from_compact(0x21010000), Target::MAX);
        assert_eq!(Target::from_compact(0x22000100), Target::MAX);
    }

    #[test]
    fn compact_matches_bitcoin_crate() {
        for bits in [
            0x1d00ffffu32,
            0x207fffff,
            0x192495f8,
            0x1e0377ae,
            0x17034219,
            0x03123456,
        ] {
            let ours = Target::from_compact(bits);
            let theirs =
                bitcoin::Target::from_compact(bitcoin::CompactTarget::from_consensus(bits));
            assert_eq!(
                ours.0.to_be_bytes::<32>(),
                theirs.to_be_bytes(),
                "{bits:08x}"
            );
            assert_eq!(ours.to_compact(), bits);
        }
    }

    #[test]
    fn is_met_by_reads_little_endian() {
        let t = Target::from_compact(0x1d00ffff);
        let mut hash = [0u8; 32];
        assert!(t.is_met_by(&hash));
        hash[27] = 0xff;
        hash[26] = 0xff;
        assert!(t.is_met_by(&hash));
        hash[0] = 1;
        assert!(!t.is_met_by(&hash));
        hash = [0; 32];
        hash[28] = 1;
        assert!(!t.is_met_by(&hash));
        assert!(Target::MAX.is_met_by(&[0xff; 32]));
        assert!(!Target(U256::ZERO).is_met_by(&[
            0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
            0, 0, 0
        ]));
    }

    #[test]
    fn hash_difficulty_values() {
        assert_eq!(hash_difficulty(&[0; 32]), f64::INFINITY);
        let diff1 = DIFF1.0.to_le_bytes::<32>();
        assert_eq!(hash_difficulty(&diff1), 1.0);
        let half = (DIFF1.0 >> 1usize).to_le_bytes::<32>();
        assert_eq!(hash_difficulty(&half), 2.0);
        assert!(hash_difficulty(&[0xff; 32]) < 1e-9);
    }

    #[test]
    fn target_difficulty_edges() {
        assert_eq!(
            Target(U256::ZERO).difficulty(),
            Difficulty::from_units(u128::MAX)
        );
        assert_eq!(Target::MAX.difficulty(), Difficulty::MIN);
        assert_eq!(
            Target(U256::from(1u32)).difficulty(),
            Difficulty::from_units(u128::MAX)
        );
        assert_eq!(Target(U256::ZERO).difficulty_f64(), f64::INFINITY);
        let signet = Target::from_compact(0x1e0377ae);
        assert!((signet.difficulty_f64() - 0.001126515290698186).abs() < 1e-12);
    }

    #[test]
    fn from_f64_edges() {
        assert_eq!(Difficulty::from_f64(f64::NAN), None);
        assert_eq!(Difficulty::from_f64(f64::INFINITY), None);
        assert_eq!(Difficulty::from_f64(f64::NEG_INFINITY), None);
        assert_eq!(Difficulty::from_f64(0.0), None);
        assert_eq!(Difficulty::from_f64(-0.0), None);
        assert_eq!(Difficulty::from_f64(-1.0), None);
        assert_eq!(Difficulty::from_f64(2f64.powi(95) * 1.000001), None);
        assert_eq!(
            Difficulty::from_f64(2f64.powi(95)),
            Some(Difficulty::from_units(1 << 127))
        );
        assert_eq!(Difficulty::from_f64(1e-300), Some(Difficulty::MIN));
        assert_eq!(
            Difficulty::from_f64(f64::MIN_POSITIVE / 4.0),
            Some(Difficulty::MIN)
        );
        assert_eq!(Difficulty::from_f64(1.0), Some(Difficulty::ONE));
        assert_eq!(
            Difficulty::from_f64(0.5),
            Some(Difficulty::from_units(1 << 31))
        );
        assert_eq!(
            Difficulty::from_f64(512.0),
            Some(Difficulty::from_whole(512))
        );
        assert_eq!(Difficulty::from_units(0), Difficulty::MIN);
        assert_eq!(Difficulty::from_whole(0), Difficulty::MIN);
    }

    #[test]
    fn json_formats() {
        assert_eq!(json(Difficulty::ONE), "1");
        assert_eq!(json(Difficulty::from_whole(42)), "42");
        assert_eq!(json(Difficulty::from_whole(1_000_000)), "1000000");
        assert_eq!(json(Difficulty::from_whole(u64::MAX)), u64::MAX.to_string());
        assert_eq!(
            json(Difficulty::from_units(u128::MAX)),
            "79228162514264340000000000000"
        );
        assert_eq!(json(Difficulty::from_units(1 << 31)), "0.5");
        assert_eq!(json(Difficulty::from_f64(1.25).unwrap()), "1.25");
        assert_eq!(
            json(Difficulty::from_f64(0.001).unwrap())
                .parse::<f64>()
                .unwrap(),
            0.0009999999310821295
        );
        let min = json(Difficulty::MIN);
        assert!(min.starts_with("0.000000000232830643653869"), "{min}");
        assert_eq!(round_trip(Difficulty::MIN), Difficulty::MIN);
        // The form given in the design notes also parses back to the minimum.
        assert_eq!(
            Difficulty::from_f64("0.0000000002328306436538696".parse().unwrap()),
            Some(Difficulty::MIN)
        );
        assert_eq!(Difficulty::from_whole(7).to_string(), "7");
    }

    proptest! {
        #[test]
        fn target_monotonic(a in 1u128..=u128::MAX, b in 1u128..=u128::MAX) {
            let (lo, hi) = if a <= b { (a, b) } else { (b, a) };
            prop_assert!(Difficulty::from_units(lo).target() >= Difficulty::from_units(hi).target());
        }

        #[test]
        fn target_difficulty_inverts(units in 1u128..(1u128 << 127)) {
            let d = Difficulty::from_units(units);
            let back = d.target().difficulty().units();
            // floor(K / floor(K / u)) is u, or a little above when u is near sqrt(K) or larger.
            prop_assert!(back >= units);
            let slack = (units >> 96) + 1;
            prop_assert!(back - units <= slack, "{} -> {}", units, back);
        }

        #[test]
        fn target_difficulty_inverts_small(units in 1u128..(1u128 << 64)) {
            let d = Difficulty::from_units(units);
            prop_assert_eq!(d.target().difficulty(), d);
        }

        #[test]
        fn json_round_trip_exact_below_2_53(units in 1u128..(1u128 << 53)) {
            let d = Difficulty::from_units(units);
            let back = round_trip(d).units();
            prop_assert!(back.abs_diff(units) <= 1, "{} -> {}", units, back);
            prop_assert_eq!(back, units);
        }

        #[test]
        fn json_round_trip_relative(units in 1u128..(1u128 << 127)) {
            let d = Difficulty::from_units(units);
            let s = json(d);
            prop_assert!(!s.contains(['e', 'E', '-', '+']), "{}", s);
            prop_assert!(s.bytes().next().is_some_and(|c| c.is_ascii_digit()));
            let back = round_trip(d).units();
            let err = back.abs_diff(units) as f64 / units as f64;
            prop_assert!(err <= 2f64.powi(-52), "{} -> {}", units, back);
        }

        #[test]
        fn whole_json_is_exact(d in 1u64..=u64::MAX) {
            prop_assert_eq!(json(Difficulty::from_whole(d)), d.to_string());
        }

        #[test]
        fn from_f64_small_values(f in 1e-30f64..1e-5) {
            let d = Difficulty::from_f64(f).unwrap();
            let expect = ((f * 2f64.powi(32)).round() as u128).max(1);
            prop_assert_eq!(d.units(), expect);
        }
    }
}
