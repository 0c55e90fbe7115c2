//! The duplicate-share set (64 striped `HashSet<u64>`s) against an open-addressing table of
//! our own (linear probing over the keys themselves, one cache line per new key instead of the
//! standard set's control bytes and bucket), as the share path uses them: a new hash per share,
//! inserted into a job's set that grows to 600,000, with the rest of a share's memory traffic in
//! between (here: 6 reads of random cache lines in 64 MiB, timed alone and subtracted). Rounds
//! alternate between the two, a fresh set each; the best round of each is printed (noise on a
//! shared VM only ever adds time). The hand-written table was never faster, so the pool uses the
//! standard set.
//!
//! Then the heap a job's set takes per share (counted by a global allocator that sums the bytes
//! asked for, without malloc's own overhead), open and after `Seen::seal`, and the time of a
//! check against a sealed set (a late share of a superseded job).
//!
//! `cargo bench -p ckpool-stratifier --bench seen`; under `cargo test --benches` (no `--bench`
//! argument) a small run, to check that it runs.
#![allow(
    missing_docs,
    clippy::unwrap_used,
    clippy::indexing_slicing,
    reason = "bench"
)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::hint::black_box;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use ckpool_stratifier::seen::{STRIPES, Seen};
use parking_lot::Mutex;

/// The system allocator, counting the bytes live.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call is passed on to the system allocator unchanged; the counter is only
// arithmetic on the sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size(), Ordering::Relaxed);
        // SAFETY: the caller's contract for `alloc`, passed on.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: the caller's contract for `dealloc`, passed on.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(new_size, Ordering::Relaxed);
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: the caller's contract for `realloc`, passed on.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Cache lines of other data a share touches between two inserts.
const OTHER_LINES: usize = 6;
/// Shares per job, rounds, bytes of other data: for a measurement, and for a test run.
const FULL: (usize, usize, usize) = (600_000, 7, 64 << 20);
const QUICK: (usize, usize, usize) = (20_000, 2, 1 << 20);

/// Slots of a table at its first key (512 bytes).
const FIRST_SLOTS: usize = 64;

/// The alternative: the same 64 stripes, each a linear-probing table of keys.
struct Linear(Box<[Mutex<Table>]>);

impl Linear {
    fn new() -> Self {
        Self((0..STRIPES).map(|_| Mutex::new(Table::default())).collect())
    }

    fn first_sighting(&self, hash: &[u8; 32]) -> bool {
        let mut low = [0u8; 8];
        low.copy_from_slice(&hash[..8]);
        self.0[usize::from(hash[8]) % STRIPES]
            .lock()
            .insert(u64::from_le_bytes(low))
    }
}

#[derive(Debug, Default)]
struct Table {
    /// Keys, 0 for a free slot; a power of two long, or empty before the first key.
    slots: Box<[u64]>,
    /// Keys in `slots`.
    len: usize,
    /// Whether the key 0 was seen.
    zero: bool,
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

/// xorshift64*: the hashes (uniform, as sha256d's) and the random lines.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn hash(&mut self) -> [u8; 32] {
        let mut h = [0u8; 32];
        for c in h.chunks_exact_mut(8) {
            c.copy_from_slice(&self.next().to_le_bytes());
        }
        h
    }
}

/// One round: `SHARES` inserts, each after `OTHER_LINES` random reads of `noise`; with
/// `insert` doing nothing, the reads alone.
fn round(
    shares: usize,
    noise: &[u64],
    seed: u64,
    mut insert: impl FnMut(&[u8; 32]) -> bool,
) -> Duration {
    let mut rng = Rng(seed);
    let hashes: Vec<[u8; 32]> = (0..shares).map(|_| rng.hash()).collect();
    let lines = noise.len() / 8;
    let mut sum = 0u64;
    let mut new = 0usize;
    let start = Instant::now();
    for h in &hashes {
        for _ in 0..OTHER_LINES {
            let i = usize::try_from(rng.next() % lines as u64).unwrap_or(0) * 8;
            sum = sum.wrapping_add(noise[i]);
        }
        new += usize::from(insert(h));
    }
    let took = start.elapsed();
    assert!(new == 0 || new == shares, "every hash is new once");
    black_box(sum);
    took
}

fn main() {
    let measure = std::env::args().any(|a| a == "--bench");
    #[allow(non_snake_case, reason = "the constants of a run")]
    let (SHARES, ROUNDS, NOISE_BYTES) = if measure { FULL } else { QUICK };
    let noise: Vec<u64> = (0..NOISE_BYTES / 8).map(|i| i as u64).collect();
    let (mut base, mut std_set, mut linear) = (Vec::new(), Vec::new(), Vec::new());
    for r in 0..ROUNDS {
        let seed = 0x9e37_79b9_7f4a_7c15 ^ r as u64;
        base.push(round(SHARES, &noise, seed, |_| false));
        let set = Seen::default();
        std_set.push(round(SHARES, &noise, seed, |h| set.first_sighting(h)));
        let set = Linear::new();
        linear.push(round(SHARES, &noise, seed, |h| set.first_sighting(h)));
    }
    let best = |v: &[Duration]| v.iter().min().copied().unwrap_or_default();
    let ns = |d: Duration| d.as_nanos() as f64 / SHARES as f64;
    let b = ns(best(&base));
    println!(
        "{SHARES} shares into one job's set, {OTHER_LINES} random cache lines read between two: \
         best of {ROUNDS} rounds, other reads ({b:.0} ns per share) subtracted"
    );
    println!(
        "  striped HashSet<u64> (the pool's): {:.0} ns per share",
        ns(best(&std_set)) - b
    );
    println!(
        "  striped linear probing:            {:.0} ns per share",
        ns(best(&linear)) - b
    );

    // Heap per share, open and sealed, for a few job sizes (the churn soak's jobs hold about
    // 12,000 shares).
    let sizes: &[usize] = if measure {
        &[1_000, 12_000, 100_000, 600_000]
    } else {
        &[1_000, 12_000]
    };
    println!("heap bytes per share of one job's set (bytes asked of the allocator):");
    for &n in sizes {
        let mut rng = Rng(0x5eed ^ n as u64);
        let hashes: Vec<[u8; 32]> = (0..n).map(|_| rng.hash()).collect();
        let before = LIVE.load(Ordering::Relaxed);
        let set = Seen::default();
        for h in &hashes {
            set.first_sighting(h);
        }
        let open = LIVE.load(Ordering::Relaxed) - before;
        set.seal();
        let sealed = LIVE.load(Ordering::Relaxed) - before;
        println!(
            "  {n:>7} shares: open {:.1}, sealed {:.1} (including the 4 KiB of the 64 locks)",
            open as f64 / n as f64,
            sealed as f64 / n as f64
        );
        drop(set);
    }

    // A sealed set's check: the time of a late share on a superseded job (new keys, which
    // go to the short list and are merged now and then, and known ones, rejected).
    let n = SHARES;
    let mut rng = Rng(0xa11ce);
    let hashes: Vec<[u8; 32]> = (0..n).map(|_| rng.hash()).collect();
    let late: Vec<[u8; 32]> = (0..n / 10).map(|_| rng.hash()).collect();
    let set = Seen::default();
    for h in &hashes {
        set.first_sighting(h);
    }
    let start = Instant::now();
    set.seal();
    let seal_took = start.elapsed();
    let start = Instant::now();
    let new = late.iter().filter(|h| set.first_sighting(h)).count();
    let late_ns = start.elapsed().as_nanos() as f64 / late.len() as f64;
    assert_eq!(new, late.len());
    let start = Instant::now();
    let dup = hashes.iter().filter(|h| !set.first_sighting(h)).count();
    let dup_ns = start.elapsed().as_nanos() as f64 / hashes.len() as f64;
    assert_eq!(dup, hashes.len());
    println!(
        "sealing a set of {n} shares took {:.1} ms; then a new share on it {late_ns:.0} ns, \
         a duplicate {dup_ns:.0} ns (no other reads between)",
        seal_took.as_secs_f64() * 1e3
    );
}
