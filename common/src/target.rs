//! Exact difficulty and target maths on 256-bit integers.
//!
//! A [`Difficulty`] is fixed point with 32 fractional bits, so fractional difficulties down to
//! 2^-32 are exact; a [`Target`] is a 256-bit integer. Difficulty 1 is the target
//! `0xffff * 2^208` (bitcoin's "truediffone").

use std::fmt;

/// Share or network difficulty, fixed point in units of 2^-32.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub struct Difficulty(u128);

impl Difficulty {
    /// Difficulty 1.
    pub const ONE: Self = Self(1 << 32);
    /// The smallest difficulty, 2^-32.
    pub const MIN: Self = Self(1);

    /// From raw units of 2^-32 (0 is raised to [`Difficulty::MIN`]).
    pub const fn from_units(units: u128) -> Self {
        if units == 0 { Self::MIN } else { Self(units) }
    }

    /// Raw units of 2^-32.
    pub const fn units(self) -> u128 {
        self.0
    }

    /// From a float; `None` for NaN, infinities, zero, negatives and values above 2^95.
    pub fn from_f64(d: f64) -> Option<Self> {
        todo!("helper A {d}")
    }

    /// As a float (for estimates and display).
    pub fn to_f64(self) -> f64 {
        todo!("helper A {}", self.0)
    }

    /// Whether the value is a whole number.
    pub const fn is_whole(self) -> bool {
        self.0 & 0xffff_ffff == 0
    }

    /// The share target for this difficulty: `floor(diff1 * 2^32 / units)`.
    pub fn target(self) -> Target {
        todo!("helper A {}", self.0)
    }

    /// Appends the value as JSON: an integer when whole, else a decimal with enough digits.
    pub fn write_json(self, out: &mut Vec<u8>) {
        todo!("helper A {} {}", self.0, out.len())
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
pub struct Target(pub ruint::aliases::U256);

impl Target {
    /// The largest target.
    pub const MAX: Self = Self(ruint::aliases::U256::MAX);

    /// Expands a compact `nBits` value (negative or overflowing encodings give 0 / MAX).
    pub fn from_compact(bits: u32) -> Self {
        todo!("helper A {bits}")
    }

    /// Whether a hash in internal byte order (little-endian number) meets this target.
    pub fn is_met_by(&self, hash: &[u8; 32]) -> bool {
        todo!("helper A {:?} {}", self, hash.len())
    }

    /// Difficulty of this target as a float (diff1 / target).
    pub fn difficulty_f64(&self) -> f64 {
        todo!("helper A {:?}", self)
    }

    /// Difficulty of this target, rounded down to a whole unit of 2^-32 (at least [`Difficulty::MIN`]).
    pub fn difficulty(&self) -> Difficulty {
        todo!("helper A {:?}", self)
    }
}

/// Difficulty a hash (internal byte order) achieves, as a float: diff1 / hash.
pub fn hash_difficulty(hash: &[u8; 32]) -> f64 {
    todo!("helper A {}", hash.len())
}
