//! Duplicate-share detection: the share hashes one job has accepted so far.
//!
//! A share's sha256d is uniform in its first 8 bytes (the zeros a share needs are at the other
//! end), so those bytes are the key and their own hash. A false duplicate needs two shares of
//! one job agreeing in 64 random bits (and in the byte that picks their set).
//!
//! Every connector thread checks shares of the current job, so the set is split in
//! [`STRIPES`] sets by another byte of the hash, each behind its own lock: two threads rarely
//! meet, and a set doubles in steps 64 times smaller than one set would (a set of a million
//! entries doubling under one lock stalls every thread for milliseconds).
//!
//! Once a newer job exists, a job's sets rarely get a new key: [`Seen::seal`] (called off the
//! share path, by the pool's housekeeping) turns each into one exactly-sized sorted slice
//! (8 bytes a key, against about 13 in a hash set at its usual load) searched by bisection,
//! plus a short sorted list of the keys that arrive after it, merged into the slice when it
//! fills. Each set is sealed under its own lock, so a check never misses a key and never sees
//! a set half converted; the current job's checks never take a lock the sealing holds.
//!
//! An open-addressing table of our own (linear probing over the keys, one cache line per new
//! key instead of the standard set's two) was measured no faster than the standard set:
//! `cargo bench -p ckpool-stratifier --bench seen` and BENCHMARKS.md §11. Public only for that
//! benchmark.

use std::collections::HashSet;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::atomic::{AtomicBool, Ordering};

use parking_lot::Mutex;

/// Number of sets per job.
pub const STRIPES: usize = 64;

/// Keys a sealed set takes in its list of late arrivals before they are merged into its slice:
/// this many, or a 64th of the slice if more (a merge copies the slice, so each late key pays
/// for copying at most 64 keys, and the list costs at most an eighth of a byte a key).
const LATE_MAX: usize = 64;

/// A job's set of share hashes.
#[derive(Debug)]
pub struct Seen {
    stripes: Box<[Stripe]>,
    /// Set once [`Seen::seal`] started: a second call has nothing to do.
    sealed: AtomicBool,
}

/// One set, on its own cache line so the locks of sets used by different threads do not share
/// one (4 KiB per job for the 64).
#[derive(Debug, Default)]
#[repr(align(64))]
struct Stripe(Mutex<Keys>);

type OpenSet = HashSet<u64, BuildHasherDefault<PrehashedU64>>;

/// The keys of one set.
#[derive(Debug)]
enum Keys {
    /// While the job is the newest: a hash set.
    Open(OpenSet),
    /// After [`Seen::seal`]: `sorted` (exactly sized) and `late`, both sorted, disjoint.
    Sealed { sorted: Box<[u64]>, late: Vec<u64> },
}

impl Default for Keys {
    fn default() -> Self {
        Self::Open(OpenSet::default())
    }
}

impl Keys {
    /// Records `key`; false when it was recorded before.
    fn insert(&mut self, key: u64) -> bool {
        match self {
            Self::Open(set) => set.insert(key),
            Self::Sealed { sorted, late } => {
                if sorted.binary_search(&key).is_ok() {
                    return false;
                }
                let Err(at) = late.binary_search(&key) else {
                    return false;
                };
                late.insert(at, key);
                if late.len() >= LATE_MAX.max(sorted.len() / 64) {
                    *sorted = merge(sorted, late);
                    *late = Vec::new();
                }
                true
            }
        }
    }

    fn len(&self) -> usize {
        match self {
            Self::Open(set) => set.len(),
            Self::Sealed { sorted, late } => sorted.len() + late.len(),
        }
    }

    fn for_each(&self, mut f: impl FnMut(u64)) {
        match self {
            Self::Open(set) => set.iter().copied().for_each(f),
            Self::Sealed { sorted, late } => {
                sorted.iter().copied().for_each(&mut f);
                late.iter().copied().for_each(f);
            }
        }
    }

    /// Turns an open set into a sealed one (a sealed one stays as it is).
    fn seal(&mut self) {
        if let Self::Open(set) = self {
            let mut sorted: Vec<u64> = Vec::with_capacity(set.len());
            sorted.extend(set.iter().copied());
            sorted.sort_unstable();
            *self = Self::Sealed {
                sorted: sorted.into_boxed_slice(),
                late: Vec::new(),
            };
        }
    }
}

/// The union of two sorted, disjoint lists, exactly sized.
fn merge(a: &[u64], b: &[u64]) -> Box<[u64]> {
    let mut out = Vec::with_capacity(a.len() + b.len());
    let (mut a, mut b) = (a.iter().peekable(), b.iter().peekable());
    loop {
        let next = match (a.peek(), b.peek()) {
            (Some(&&x), Some(&&y)) => {
                if x <= y {
                    a.next();
                    x
                } else {
                    b.next();
                    y
                }
            }
            (Some(&&x), None) => {
                a.next();
                x
            }
            (None, Some(&&y)) => {
                b.next();
                y
            }
            (None, None) => break,
        };
        out.push(next);
    }
    out.into_boxed_slice()
}

impl Default for Seen {
    fn default() -> Self {
        Self {
            stripes: (0..STRIPES).map(|_| Stripe::default()).collect(),
            sealed: AtomicBool::new(false),
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

    /// Compacts every set for a job that is no longer the newest (see the module's header):
    /// about 8 bytes a key instead of 13, the hash sets freed. Checks stay exact and may run
    /// meanwhile (each set is converted under its own lock). Call it off the share path: it
    /// sorts every key. Only the first call does anything.
    pub fn seal(&self) {
        if self.sealed.swap(true, Ordering::Relaxed) {
            return;
        }
        for s in &self.stripes {
            s.0.lock().seal();
        }
    }

    /// Whether [`Seen::seal`] was called.
    pub fn is_sealed(&self) -> bool {
        self.sealed.load(Ordering::Relaxed)
    }

    /// Every key recorded, with its set's index (for a handover).
    pub(crate) fn keys(&self) -> Vec<(u8, u64)> {
        let mut out = Vec::new();
        for (i, s) in self.stripes.iter().enumerate() {
            let i = u8::try_from(i).unwrap_or(u8::MAX);
            s.0.lock().for_each(|k| out.push((i, k)));
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
    pub fn len(&self) -> usize {
        self.stripes.iter().map(|s| s.0.lock().len()).sum()
    }

    /// Whether no key was recorded.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
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
        assert!(seen.stripes.iter().all(|s| s.0.lock().len() > 0));
    }
    #[test]
    fn a_sealed_set_rejects_duplicates_and_takes_new_keys() {
        let seen = Seen::default();
        for i in 0..50_000 {
            assert!(seen.first_sighting(&hash_of(i)), "{i} new");
        }
        seen.seal();
        assert!(seen.is_sealed());
        assert!(
            seen.stripes
                .iter()
                .all(|s| matches!(&*s.0.lock(), Keys::Sealed { .. }))
        );
        for i in (0..50_000).step_by(7) {
            assert!(!seen.first_sighting(&hash_of(i)), "{i} seen before sealing");
        }
        // Enough late keys that every set merges its late list into its slice a few times.
        let late = 50_000..50_000 + (LATE_MAX * STRIPES * 3) as u64;
        for i in late.clone() {
            assert!(seen.first_sighting(&hash_of(i)), "{i} new after sealing");
        }
        for i in late.clone().chain(0..50_000).step_by(3) {
            assert!(!seen.first_sighting(&hash_of(i)), "{i} seen");
        }
        assert_eq!(seen.len(), 50_000 + late.count());
        // Sealed twice: nothing changes.
        seen.seal();
        assert!(!seen.first_sighting(&hash_of(1)));
        // The keys a handover writes are every key, once.
        let mut keys = seen.keys();
        keys.sort_unstable();
        keys.dedup();
        assert_eq!(keys.len(), seen.len());
    }

    #[test]
    fn a_sealed_slice_is_sorted_and_exactly_sized() {
        let seen = Seen::default();
        for i in 0..10_000 {
            seen.first_sighting(&hash_of(i));
        }
        seen.seal();
        for i in 10_000..10_100 {
            seen.first_sighting(&hash_of(i));
        }
        for s in &seen.stripes {
            let Keys::Sealed { sorted, late } = &*s.0.lock() else {
                panic!("not sealed");
            };
            assert!(sorted.windows(2).all(|w| w[0] < w[1]));
            assert!(late.windows(2).all(|w| w[0] < w[1]));
            assert!(late.len() < LATE_MAX.max(sorted.len() / 64));
            assert!(late.iter().all(|k| sorted.binary_search(k).is_err()));
        }
    }

    #[test]
    fn sealing_while_threads_check_loses_no_key() {
        // Four threads offer the same hashes, each once: exactly one sighting of each may be
        // new, whether it lands before, during or after the sealing that runs meanwhile. A
        // key lost by the sealing would be new a second time.
        const N: u64 = 40_000;
        for round in 0..4u64 {
            let seen = Seen::default();
            let firsts: usize = std::thread::scope(|s| {
                let workers: Vec<_> = (0..4u64)
                    .map(|t| {
                        let seen = &seen;
                        s.spawn(move || {
                            // Each thread in its own order, so they race on every key.
                            (0..N)
                                .map(|i| (i * (2 * t + 1) + round) % N)
                                .filter(|&i| seen.first_sighting(&hash_of(i)))
                                .count()
                        })
                    })
                    .collect();
                // Seal once some keys are in.
                while seen.len() < usize::try_from(N / 4).unwrap() {
                    std::thread::yield_now();
                }
                seen.seal();
                workers.into_iter().map(|w| w.join().unwrap()).sum()
            });
            assert_eq!(firsts, usize::try_from(N).unwrap(), "round {round}");
            assert_eq!(seen.len(), usize::try_from(N).unwrap());
            assert!((0..N).all(|i| !seen.first_sighting(&hash_of(i))));
        }
    }

    #[test]
    fn merge_is_the_sorted_union() {
        assert_eq!(
            &*merge(&[1, 4, 9], &[2, 3, 10, 11]),
            &[1, 2, 3, 4, 9, 10, 11]
        );
        assert_eq!(&*merge(&[], &[5]), &[5]);
        assert_eq!(&*merge(&[5], &[]), &[5]);
        assert!(merge(&[], &[]).is_empty());
    }
}
