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
//! The keys are packed, off the share path, into one [`Packed`] set per job (Elias-Fano:
//! each key's low bits packed, its high bits as unary gaps; about 6.6 bytes a key for a job of
//! 12,000 shares, 6.0 for 600,000, against 8 in a sorted slice and about 13 in a hash set at its
//! usual load), shared by the job's 64 sets; each set keeps in its hash set only the keys it
//! took since. The pool's housekeeping packs a job when a newer one exists ([`Seen::seal`]),
//! and the current job whenever its hash sets hold at least [`PACK_MIN`] keys and a quarter
//! of those packed ([`Seen::pack_if_due`]), so a job is packed a few times over its life and
//! most of its keys live at the packed size. A check then looks in the packed keys (a few
//! words read) before its set's hash set. Every key keeps all its 64 bits, so packing adds no
//! false duplicate; the byte that picked a key's set no longer separates it from the same 64
//! bits in another set (a false duplicate then needs 64 random bits to agree, not 70). Each
//! set switches to new packed keys under its own lock, after they are built, and keeps in its
//! hash set the keys it took meanwhile: a check never misses a key and never sees a set half
//! converted.
//!
//! An open-addressing table of our own (linear probing over the keys, one cache line per new
//! key instead of the standard set's two) was measured no faster than the standard set:
//! `cargo bench -p ckpool-stratifier --bench seen` and BENCHMARKS.md §11. Public only for that
//! benchmark.

use std::collections::HashSet;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use parking_lot::Mutex;

/// Number of sets per job.
pub const STRIPES: usize = 64;

/// [`Seen::pack_if_due`] packs once at least this many keys wait in the hash sets.
const PACK_MIN: usize = 2048;

/// A job's set of share hashes.
#[derive(Debug)]
pub struct Seen {
    stripes: Box<[Stripe]>,
    /// Set once [`Seen::seal`] started: a second call has nothing to do.
    sealed: AtomicBool,
    /// Held by a packing ([`Seen::pack`]) and by [`Seen::keys`].
    packing: Mutex<()>,
}

/// One set, on its own cache line so the locks of sets used by different threads do not share
/// one (4 KiB per job for the 64).
#[derive(Debug, Default)]
#[repr(align(64))]
struct Stripe(Mutex<Keys>);

type OpenSet = HashSet<u64, BuildHasherDefault<PrehashedU64>>;

/// The keys of one set: those packed so far (the job's [`Packed`] keys, shared by its 64 sets,
/// of which `own` came from this set) and those it took since (`open`).
#[derive(Debug, Default)]
struct Keys {
    packed: Option<Arc<Packed>>,
    own: usize,
    open: OpenSet,
}

impl Keys {
    /// Records `key`; false when it was recorded before.
    fn insert(&mut self, key: u64) -> bool {
        !self.packed.as_ref().is_some_and(|p| p.contains(key)) && self.open.insert(key)
    }

    fn len(&self) -> usize {
        self.own + self.open.len()
    }
}

/// A sorted set of distinct `u64` keys in Elias-Fano form, read-only once built. With `n` keys
/// and `b` the bit length of `n`, each key's low `64 - b` bits are packed in `lows`, and its
/// high `b` bits `h` set bit `h + i` of `highs` (`i` its rank): the keys with high bits `h`
/// are the ones after the `h`-th zero of `highs`. About `66 - b` bits a key (`highs` has at
/// most `3n` bits); `zeros` notes where every [`ZERO_SAMPLE`]-th zero ends, so a look-up scans
/// at most a few words of `highs`.
#[derive(Debug, Default)]
pub(crate) struct Packed {
    n: usize,
    low_bits: u32,
    lows: Box<[u64]>,
    /// Bits past the last one used are ones (never taken for a zero).
    highs: Box<[u64]>,
    /// `zeros[k]`: the position just after the `k * ZERO_SAMPLE`-th zero of `highs`.
    zeros: Box<[u32]>,
}

/// One entry of [`Packed::zeros`] for this many zeros of `highs`.
const ZERO_SAMPLE: usize = 256;

impl Packed {
    /// Packs `keys`, which must be sorted and distinct.
    #[cfg(test)]
    fn new(keys: &[u64]) -> Self {
        Self::from_sorted(keys.len(), keys.iter().copied())
    }

    /// Packs the `n` keys `keys` gives, which must be sorted and distinct.
    fn from_sorted(n: usize, keys: impl Iterator<Item = u64>) -> Self {
        if n == 0 {
            return Self::default();
        }
        // n < 2^32 here (a job's shares), so low_bits >= 32 and the buckets fit a u32.
        let high_bits = usize::BITS - n.leading_zeros();
        let low_bits = 64u32.saturating_sub(high_bits);
        let buckets = 1usize << (64 - low_bits);
        let high_len = n + buckets;
        let mut lows = vec![0u64; (n * low_bits as usize).div_ceil(64)];
        let mut highs = vec![0u64; high_len.div_ceil(64)];
        let mask = low_mask(low_bits);
        for (i, k) in keys.take(n).enumerate() {
            let h = usize::try_from(k.checked_shr(low_bits).unwrap_or(0)).unwrap_or(usize::MAX);
            let pos = h + i;
            if let Some(w) = highs.get_mut(pos / 64) {
                *w |= 1 << (pos % 64);
            }
            set_bits(&mut lows, i * low_bits as usize, low_bits, k & mask);
        }
        if !high_len.is_multiple_of(64)
            && let Some(last) = highs.last_mut()
        {
            *last |= !0u64 << (high_len % 64);
        }
        let mut zeros = Vec::with_capacity(buckets / ZERO_SAMPLE + 1);
        zeros.push(0u32);
        let mut passed = 0usize;
        for (w, &word) in highs.iter().enumerate() {
            let mut z = !word;
            while z != 0 {
                passed += 1;
                if passed.is_multiple_of(ZERO_SAMPLE) {
                    let after = w * 64 + z.trailing_zeros() as usize + 1;
                    zeros.push(u32::try_from(after).unwrap_or(u32::MAX));
                }
                z &= z - 1;
            }
        }
        Self {
            n,
            low_bits,
            lows: lows.into_boxed_slice(),
            highs: highs.into_boxed_slice(),
            zeros: zeros.into_boxed_slice(),
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.n
    }

    fn low(&self, i: usize) -> u64 {
        get_bits(&self.lows, i * self.low_bits as usize, self.low_bits)
    }

    fn bit(&self, pos: usize) -> Option<bool> {
        self.highs.get(pos / 64).map(|w| w >> (pos % 64) & 1 == 1)
    }

    /// The position just after the `r`-th zero of `highs` (0 for `r == 0`).
    fn after_zeros(&self, r: usize) -> Option<usize> {
        let mut pos = *self.zeros.get(r / ZERO_SAMPLE)? as usize;
        let mut left = r % ZERO_SAMPLE;
        while left > 0 {
            let word = *self.highs.get(pos / 64)?;
            let mut z = !word >> (pos % 64);
            let here = z.count_ones() as usize;
            if here < left {
                left -= here;
                pos = (pos / 64 + 1) * 64;
                continue;
            }
            for _ in 1..left {
                z &= z - 1;
            }
            return Some(pos + z.trailing_zeros() as usize + 1);
        }
        Some(pos)
    }

    /// Whether `key` is in the set.
    fn contains(&self, key: u64) -> bool {
        if self.n == 0 {
            return false;
        }
        let Ok(h) = usize::try_from(key.checked_shr(self.low_bits).unwrap_or(0)) else {
            return false;
        };
        let lo = key & low_mask(self.low_bits);
        let Some(mut pos) = self.after_zeros(h) else {
            return false;
        };
        // The ones from here to the next zero are the keys whose high bits are `h`, in order.
        while let Some(i) = pos.checked_sub(h).filter(|&i| i < self.n) {
            if self.bit(pos) != Some(true) {
                return false;
            }
            let low = self.low(i);
            if low >= lo {
                return low == lo;
            }
            pos += 1;
        }
        false
    }

    /// Every key, in order.
    fn for_each(&self, f: impl FnMut(u64)) {
        self.iter().for_each(f);
    }

    /// Every key, in order.
    fn iter(&self) -> PackedIter<'_> {
        PackedIter {
            packed: self,
            word: 0,
            ones: self.highs.first().copied().unwrap_or(0),
            i: 0,
        }
    }

    /// Heap bytes it holds.
    #[cfg(test)]
    fn heap_bytes(&self) -> usize {
        (self.lows.len() + self.highs.len()) * 8 + self.zeros.len() * 4
    }
}

/// [`Packed::iter`].
struct PackedIter<'a> {
    packed: &'a Packed,
    /// Index in `highs` of `ones`.
    word: usize,
    /// The ones of that word not yet read.
    ones: u64,
    /// Keys read so far.
    i: usize,
}

impl Iterator for PackedIter<'_> {
    type Item = u64;

    fn next(&mut self) -> Option<u64> {
        let p = self.packed;
        if self.i >= p.n {
            return None;
        }
        while self.ones == 0 {
            self.word += 1;
            self.ones = *p.highs.get(self.word)?;
        }
        let pos = self.word * 64 + self.ones.trailing_zeros() as usize;
        let h = (pos - self.i) as u64;
        let key = h.checked_shl(p.low_bits).unwrap_or(0) | p.low(self.i);
        self.i += 1;
        self.ones &= self.ones - 1;
        Some(key)
    }
}

/// The sorted union of two sorted iterators, each key once.
fn union(a: impl Iterator<Item = u64>, b: impl Iterator<Item = u64>) -> impl Iterator<Item = u64> {
    let (mut a, mut b) = (a.peekable(), b.peekable());
    std::iter::from_fn(move || match (a.peek().copied(), b.peek().copied()) {
        (Some(x), Some(y)) => {
            if x <= y {
                a.next();
                if x == y {
                    b.next();
                }
                Some(x)
            } else {
                b.next();
                Some(y)
            }
        }
        (Some(_), None) => a.next(),
        (None, _) => b.next(),
    })
}

fn low_mask(bits: u32) -> u64 {
    if bits >= 64 { !0 } else { (1u64 << bits) - 1 }
}

/// Writes the low `bits` bits of `v` at bit offset `at` of `words` (LSB first).
fn set_bits(words: &mut [u64], at: usize, bits: u32, v: u64) {
    if bits == 0 {
        return;
    }
    let (w, b) = (at / 64, (at % 64) as u32);
    if let Some(x) = words.get_mut(w) {
        *x |= v << b;
    }
    if b + bits > 64
        && let Some(x) = words.get_mut(w + 1)
    {
        *x |= v >> (64 - b);
    }
}

/// Reads `bits` bits at bit offset `at` of `words`.
fn get_bits(words: &[u64], at: usize, bits: u32) -> u64 {
    if bits == 0 {
        return 0;
    }
    let (w, b) = (at / 64, (at % 64) as u32);
    let mut v = words.get(w).map_or(0, |x| x >> b);
    if b + bits > 64 {
        v |= words.get(w + 1).map_or(0, |x| x << (64 - b));
    }
    v & low_mask(bits)
}

impl Default for Seen {
    fn default() -> Self {
        Self {
            stripes: (0..STRIPES).map(|_| Stripe::default()).collect(),
            sealed: AtomicBool::new(false),
            packing: Mutex::new(()),
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

    /// Packs every key of a job that is no longer the newest (see the module's header): the
    /// rest of its life it takes few. Only the first call does anything. Call it off the share
    /// path, as [`Seen::pack`].
    pub fn seal(&self) {
        if self.sealed.swap(true, Ordering::Relaxed) {
            return;
        }
        self.pack();
    }

    /// Packs the keys taken since the last packing when they are many: at least
    /// [`PACK_MIN`] and a quarter of those already packed, so a job's keys are packed a few
    /// times over its life (each packing costs all its keys) and at most about a fifth of
    /// them wait in hash sets. Returns whether it packed. Call it off the share path, every
    /// few seconds, for the current job too.
    pub fn pack_if_due(&self) -> bool {
        let packed = self
            .stripes
            .first()
            .and_then(|s| s.0.lock().packed.as_ref().map(|p| p.n))
            .unwrap_or(0);
        let open: usize = self.stripes.iter().map(|s| s.0.lock().open.len()).sum();
        if open < PACK_MIN.max(packed / 4) {
            return false;
        }
        self.pack();
        true
    }

    /// Packs every key taken so far: the packed ones and each set's open ones (copied set by
    /// set, under its lock), merged and packed anew; then each set, under its lock, drops from
    /// its hash set the keys now packed and takes the new packed set. A check never misses a
    /// key: before its set switches it sees the old packed keys and its whole hash set, after,
    /// the new packed keys and what its hash set took since the copy. Calls are serialised.
    fn pack(&self) {
        let _one = self.packing.lock();
        let old = self
            .stripes
            .first()
            .and_then(|s| s.0.lock().packed.clone())
            .unwrap_or_default();
        let mut fresh: Vec<u64> = Vec::new();
        for s in &self.stripes {
            fresh.extend(s.0.lock().open.iter().copied());
        }
        if fresh.is_empty() {
            return;
        }
        fresh.sort_unstable();
        fresh.dedup();
        // Built from the merged keys as they are read, twice (to count, then to pack), so
        // that no list of every key is allocated beside the two packed sets.
        let n = union(old.iter(), fresh.iter().copied()).count();
        let packed = Arc::new(Packed::from_sorted(
            n,
            union(old.iter(), fresh.iter().copied()),
        ));
        for s in &self.stripes {
            let mut keys = s.0.lock();
            let before = keys.open.len();
            keys.open.retain(|k| fresh.binary_search(k).is_err());
            keys.own += before - keys.open.len();
            keys.open.shrink_to_fit();
            keys.packed = Some(Arc::clone(&packed));
        }
    }

    /// Whether [`Seen::seal`] was called.
    pub fn is_sealed(&self) -> bool {
        self.sealed.load(Ordering::Relaxed)
    }

    /// Every key recorded, with its set's index (for a handover). The packed keys are given
    /// once, under set 0: they no longer say which set took them, and any set will do, since
    /// a set's check looks at every packed key.
    pub(crate) fn keys(&self) -> Vec<(u8, u64)> {
        let mut out = Vec::new();
        let _one = self.packing.lock();
        if let Some(packed) = self.stripes.first().and_then(|s| s.0.lock().packed.clone()) {
            packed.for_each(|k| out.push((0, k)));
        }
        for (i, s) in self.stripes.iter().enumerate() {
            let i = u8::try_from(i).unwrap_or(u8::MAX);
            out.extend(s.0.lock().open.iter().map(|&k| (i, k)));
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
        assert!(seen.stripes.iter().all(|s| {
            let k = s.0.lock();
            k.packed.is_some() && k.open.is_empty()
        }));
        for i in (0..50_000).step_by(7) {
            assert!(!seen.first_sighting(&hash_of(i)), "{i} seen before sealing");
        }
        // Late keys in every set.
        let late = 50_000..50_000 + (64 * STRIPES * 3) as u64;
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
    fn sealed_sets_share_one_packed_set_and_keep_their_late_keys() {
        let seen = Seen::default();
        for i in 0..10_000 {
            seen.first_sighting(&hash_of(i));
        }
        seen.seal();
        for i in 10_000..10_100 {
            seen.first_sighting(&hash_of(i));
        }
        let first = seen.stripes[0].0.lock().packed.clone().expect("packed");
        assert_eq!(first.len(), 10_000);
        let (mut own, mut late_keys) = (0, 0);
        for s in &seen.stripes {
            let k = s.0.lock();
            assert!(Arc::ptr_eq(k.packed.as_ref().expect("packed"), &first));
            assert!(k.open.iter().all(|&x| !first.contains(x)));
            own += k.own;
            late_keys += k.open.len();
        }
        assert_eq!((own, late_keys), (10_000, 100));
        // Under 6.7 bytes a key at this size (8 in a sorted slice).
        assert!(
            first.heap_bytes() * 10 < 10_000 * 67,
            "{}",
            first.heap_bytes()
        );
    }

    #[test]
    fn packing_over_and_over_while_threads_check_loses_no_key() {
        // As the sealing test, with the current job's packing run again and again meanwhile.
        const N: u64 = 40_000;
        let seen = Seen::default();
        let done = AtomicBool::new(false);
        let (firsts, packings) = std::thread::scope(|s| {
            let workers: Vec<_> = (0..4u64)
                .map(|t| {
                    let seen = &seen;
                    s.spawn(move || {
                        (0..N)
                            .map(|i| (i * (2 * t + 1) + 3) % N)
                            .filter(|&i| seen.first_sighting(&hash_of(i)))
                            .count()
                    })
                })
                .collect();
            let packer = s.spawn(|| {
                let mut n = 0;
                while !done.load(Ordering::Relaxed) {
                    seen.pack();
                    n += 1;
                }
                n
            });
            let firsts: usize = workers.into_iter().map(|w| w.join().unwrap()).sum();
            done.store(true, Ordering::Relaxed);
            (firsts, packer.join().unwrap())
        });
        assert!(packings > 1, "{packings}");
        assert_eq!(firsts, usize::try_from(N).unwrap());
        assert_eq!(seen.len(), usize::try_from(N).unwrap());
        assert!((0..N).all(|i| !seen.first_sighting(&hash_of(i))));
        let mut keys = seen.keys();
        keys.sort_unstable();
        keys.dedup();
        assert_eq!(keys.len(), usize::try_from(N).unwrap());
    }

    #[test]
    fn packing_is_due_at_a_quarter_of_the_packed_keys() {
        let seen = Seen::default();
        let mut i = 0;
        let mut add = |n: u64| {
            for _ in 0..n {
                assert!(seen.first_sighting(&hash_of(i)));
                i += 1;
            }
        };
        add(PACK_MIN as u64 - 1);
        assert!(!seen.pack_if_due());
        add(1);
        assert!(seen.pack_if_due());
        add(10_000);
        assert!(seen.pack_if_due());
        // 12,048 packed: due again at 3,012 new keys.
        add(3_011);
        assert!(!seen.pack_if_due());
        add(1);
        assert!(seen.pack_if_due());
        assert_eq!(seen.len(), 15_060);
        assert!(seen.stripes.iter().all(|s| s.0.lock().open.is_empty()));
    }

    #[test]
    fn union_is_sorted_and_takes_each_key_once() {
        let u = |a: &[u64], b: &[u64]| -> Vec<u64> {
            union(a.iter().copied(), b.iter().copied()).collect()
        };
        assert_eq!(u(&[1, 4, 9], &[2, 4, 10, 11]), [1, 2, 4, 9, 10, 11]);
        assert_eq!(u(&[], &[5]), [5]);
        assert_eq!(u(&[5], &[]), [5]);
        assert!(u(&[], &[]).is_empty());
    }

    /// A small deterministic generator (xorshift) for the packed-set tests.
    fn keys(seed: u64, n: usize) -> Vec<u64> {
        let mut x = seed | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x
            })
            .collect()
    }

    #[test]
    fn a_packed_set_holds_exactly_its_keys() {
        for (n, seed) in [
            (1, 1),
            (2, 2),
            (3, 3),
            (255, 4),
            (256, 5),
            (257, 6),
            (1_000, 7),
            (70_000, 8),
        ] {
            let mut k = keys(seed, n);
            // Edge values, and runs of neighbours (shared high bits, adjacent lows).
            k.extend([0, 1, u64::MAX, u64::MAX - 1, 1 << 63, (1 << 63) - 1]);
            k.extend((0..40).map(|j| 0x1234_5678_9abc_0000 + j * 3));
            k.sort_unstable();
            k.dedup();
            let p = Packed::new(&k);
            assert_eq!(p.len(), k.len());
            for &x in &k {
                assert!(p.contains(x), "n {n}: {x:#x} missing");
            }
            let mut back = Vec::new();
            p.for_each(|x| back.push(x));
            assert_eq!(back, k, "n {n}: keys read back");
            let set: std::collections::BTreeSet<u64> = k.iter().copied().collect();
            let probes = keys(seed ^ 0xdead_beef, 20_000).into_iter().chain(
                k.iter()
                    .flat_map(|&x| [x.wrapping_add(1), x.wrapping_sub(1), x ^ 1 << 40]),
            );
            for x in probes {
                assert_eq!(p.contains(x), set.contains(&x), "n {n}: {x:#x}");
            }
        }
        let empty = Packed::new(&[]);
        assert!(!empty.contains(0) && !empty.contains(u64::MAX));
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
}
