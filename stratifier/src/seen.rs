//! Duplicate-share detection: the share hashes one job has accepted so far.
//!
//! A share's sha256d is uniform in its first 8 bytes (the zeros a share needs are at the other
//! end), so those bytes are the key and their own hash. A false duplicate needs two shares of
//! one job agreeing in 64 random bits.
//!
//! Every connector thread checks shares of the current job, so the set is split in
//! [`STRIPES`] sets by another byte of the hash, each behind its own lock: two threads rarely
//! meet, and a set doubles in steps 64 times smaller than one set would (a set of a million
//! entries doubling under one lock stalls every thread for milliseconds).
//!
//! An open-addressing table of our own (linear probing over the keys, one cache line per new
//! key instead of the standard set's two) was measured no faster than the standard set:
//! `cargo bench -p ckpool-stratifier --bench seen` and BENCHMARKS.md §11. Public only for that
//! benchmark.

use std::collections::HashSet;
use std::hash::{BuildHasherDefault, Hasher};

use parking_lot::Mutex;

/// Number of sets per job.
pub const STRIPES: usize = 64;

/// A job's set of share hashes.
#[derive(Debug)]
pub struct Seen {
    stripes: Box<[Stripe]>,
}

/// One set, on its own cache line so the locks of sets used by different threads do not share
/// one (4 KiB per job for the 64).
#[derive(Debug, Default)]
#[repr(align(64))]
struct Stripe(Mutex<HashSet<u64, BuildHasherDefault<PrehashedU64>>>);

impl Default for Seen {
    fn default() -> Self {
        Self {
            stripes: (0..STRIPES).map(|_| Stripe::default()).collect(),
        }
    }
}

impl Seen {
    /// Records `hash`; false when it was recorded before.
    pub fn first_sighting(&self, hash: &[u8; 32]) -> bool {
        let [k0, k1, k2, k3, k4, k5, k6, k7, pick, ..] = *hash;
        let key = u64::from_le_bytes([k0, k1, k2, k3, k4, k5, k6, k7]);
        // A byte the key does not contain picks the set, so each set's keys keep all their
        // bits for its own hashing.
        self.stripes
            .get(usize::from(pick) % STRIPES)
            .is_none_or(|s| s.0.lock().insert(key))
    }

    /// Every key recorded, with its set's index (for a handover).
    pub(crate) fn keys(&self) -> Vec<(u8, u64)> {
        let mut out = Vec::new();
        for (i, s) in self.stripes.iter().enumerate() {
            let i = u8::try_from(i).unwrap_or(u8::MAX);
            out.extend(s.0.lock().iter().map(|&k| (i, k)));
        }
        out
    }

    /// Records `key` in set `stripe`, as [`Seen::keys`] gave it; false for a set that does not
    /// exist.
    pub(crate) fn insert_key(&self, stripe: u8, key: u64) -> bool {
        self.stripes.get(usize::from(stripe)).is_some_and(|s| {
            s.0.lock().insert(key);
            true
        })
    }

    /// Keys recorded, over every set.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.stripes.iter().map(|s| s.0.lock().len()).sum()
    }
}

/// A [`Hasher`] for keys that are already uniformly random `u64`s.
#[derive(Default)]
struct PrehashedU64(u64);

impl Hasher for PrehashedU64 {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        // Only `write_u64` is used by `HashSet<u64>`; fold anything else in so it still works.
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hash_of(i: u64) -> [u8; 32] {
        common::hash::sha256d(&i.to_le_bytes())
    }

    #[test]
    fn each_hash_is_new_once() {
        let seen = Seen::default();
        for i in 0..50_000 {
            assert!(seen.first_sighting(&hash_of(i)), "{i} new");
        }
        for i in (0..50_000).step_by(7) {
            assert!(!seen.first_sighting(&hash_of(i)), "{i} seen");
        }
        assert!(seen.first_sighting(&hash_of(50_000)));
        assert_eq!(seen.len(), 50_001);
    }

    #[test]
    fn duplicates_are_found_across_stripes_and_threads() {
        let seen = Seen::default();
        let firsts: usize = std::thread::scope(|s| {
            let workers: Vec<_> = (0..4)
                .map(|_| {
                    s.spawn(|| {
                        (0..20_000u64)
                            .filter(|&i| seen.first_sighting(&hash_of(i)))
                            .count()
                    })
                })
                .collect();
            workers.into_iter().map(|w| w.join().unwrap()).sum()
        });
        assert_eq!(firsts, 20_000);
        assert!(!seen.first_sighting(&hash_of(7)));
        assert!(seen.first_sighting(&hash_of(20_000)));
        // Every stripe got some of them.
        assert!(seen.stripes.iter().all(|s| !s.0.lock().is_empty()));
    }
}
