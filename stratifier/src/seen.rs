//! Duplicate-share detection: the share hashes one job has accepted so far.
//!
//! A share's sha256d is uniform in its first 8 bytes (the zeros a share needs are at the other
//! end), so those bytes are the key and their low bits its slot, with no hashing of our own. A
//! false duplicate needs two shares of one job agreeing in 64 random bits.
//!
//! Every connector thread checks shares of the current job, so the set is split in
//! [`STRIPES`] tables by another byte of the hash, each behind its own lock: two threads rarely
//! meet, and a table doubles in steps 64 times smaller than one set would (a set of a million
//! entries doubling under one lock stalls every thread for milliseconds).
//!
//! Each table is open addressing with linear probing over the keys themselves (0 marks a free
//! slot; the key 0 has a flag of its own). Checking a new key, the common case, touches one
//! cache line and writes the line it read. `hashbrown`'s set touched two: its control bytes and
//! then, for the insert, the bucket, a second cache miss that the unlock, a locked instruction,
//! had to wait for (the profile in BENCHMARKS.md §11).

use parking_lot::Mutex;

/// Number of tables per job.
pub(crate) const STRIPES: usize = 64;

/// Slots of a table at its first key (512 bytes).
const FIRST_SLOTS: usize = 64;

/// A job's set of share hashes.
#[derive(Debug)]
pub(crate) struct Seen {
    stripes: Box<[Stripe]>,
}

/// One table, on its own cache line so the locks of tables used by different threads do not
/// share one (4 KiB per job for the 64).
#[derive(Debug, Default)]
#[repr(align(64))]
struct Stripe(Mutex<Table>);

#[derive(Debug, Default)]
struct Table {
    /// Keys, 0 for a free slot; a power of two long, or empty before the first key.
    slots: Box<[u64]>,
    /// Keys in `slots`.
    len: usize,
    /// Whether the key 0 was seen.
    zero: bool,
}

impl Default for Seen {
    fn default() -> Self {
        Self {
            stripes: (0..STRIPES).map(|_| Stripe::default()).collect(),
        }
    }
}

impl Seen {
    /// Records `hash`; false when it was recorded before.
    pub(crate) fn first_sighting(&self, hash: &[u8; 32]) -> bool {
        let [k0, k1, k2, k3, k4, k5, k6, k7, pick, ..] = *hash;
        let key = u64::from_le_bytes([k0, k1, k2, k3, k4, k5, k6, k7]);
        // A byte the key does not contain picks the table, so each table's keys keep all
        // their bits for the slot.
        self.stripes
            .get(usize::from(pick) % STRIPES)
            .is_none_or(|s| s.0.lock().insert(key))
    }

    /// Keys recorded, over every table.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.stripes
            .iter()
            .map(|s| {
                let t = s.0.lock();
                t.len + usize::from(t.zero)
            })
            .sum()
    }
}

impl Table {
    /// Inserts `key`; false when it was there.
    fn insert(&mut self, key: u64) -> bool {
        if key == 0 {
            return !std::mem::replace(&mut self.zero, true);
        }
        // At most 3/4 full: a miss then probes ~8 slots, one or two cache lines.
        if (self.len + 1) * 4 > self.slots.len() * 3 {
            self.grow();
        }
        if place(&mut self.slots, key) {
            self.len += 1;
            true
        } else {
            false
        }
    }

    fn grow(&mut self) {
        let n = (self.slots.len() * 2).max(FIRST_SLOTS);
        let old = std::mem::replace(&mut self.slots, vec![0; n].into_boxed_slice());
        for key in old.iter().copied().filter(|&k| k != 0) {
            place(&mut self.slots, key);
        }
    }
}

/// Puts `key` (not 0) in the first free slot from its own, unless it is there already; `slots`
/// is a power of two long and never full. False when it was there.
fn place(slots: &mut [u64], key: u64) -> bool {
    let mask = slots.len().wrapping_sub(1);
    // The key's low bits are uniform: they are the slot. Truncation is the point.
    #[allow(
        clippy::cast_possible_truncation,
        reason = "the low bits pick the slot"
    )]
    let mut i = key as usize & mask;
    for _ in 0..slots.len() {
        match slots.get_mut(i) {
            Some(s) if *s == key => return false,
            Some(s) if *s == 0 => {
                *s = key;
                return true;
            }
            _ => i = (i + 1) & mask,
        }
    }
    // Unreachable while the table is kept under 3/4 full: say "seen" rather than loop.
    false
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
    fn colliding_slots_and_the_zero_key_are_kept_apart() {
        let mut t = Table::default();
        // Same low bits, hence the same slot at every size: a chain of probes.
        let keys: Vec<u64> = (1..=200u64).map(|i| i << 40).collect();
        for &k in &keys {
            assert!(t.insert(k));
        }
        assert!(t.insert(0));
        assert!(!t.insert(0));
        for &k in &keys {
            assert!(!t.insert(k));
        }
        assert!(t.insert(5 << 40 | 1));
        assert_eq!(t.len, 201);
        assert!(t.slots.len() >= 256 && t.slots.len().is_power_of_two());
    }

    #[test]
    fn tables_stay_at_most_three_quarters_full() {
        let mut t = Table::default();
        for k in 1..=10_000u64 {
            assert!(t.insert(k.wrapping_mul(0x9e37_79b9_7f4a_7c15)));
            assert!(
                t.len * 4 <= t.slots.len() * 3,
                "{} in {}",
                t.len,
                t.slots.len()
            );
        }
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
        assert!(seen.stripes.iter().all(|s| s.0.lock().len > 0));
    }
}
