//! Full share check: coinbase build, sha256d, merkle fold, header sha256d, target compares.
#![allow(missing_docs, clippy::unwrap_used, reason = "bench")]

use std::hint::black_box;

use ckpool_stratifier::share::{ShareInput, hash_share};
use common::{Difficulty, Target};
use criterion::{Criterion, criterion_group, criterion_main};

fn bench(c: &mut Criterion) {
    // A realistic job: ~100-byte coinb1, 8-byte en1+en2 slots, ~120-byte coinb2 (two outputs and
    // a witness commitment), a 12-level merkle branch (a ~3000-transaction block).
    let coinb1 = vec![0x11u8; 100];
    let coinb2 = vec![0x22u8; 120];
    let branch: Vec<[u8; 32]> = (0..12u8).map(|i| [i; 32]).collect();
    let prev = [0x33u8; 32];
    let share_target = Difficulty::from_f64(65536.0).unwrap().target();
    let network = Target::from_compact(0x1702_5049);
    let mut scratch = Vec::with_capacity(512);
    let mut nonce = 0u32;
    c.bench_function("full share check (12-level branch)", |b| {
        b.iter(|| {
            nonce = nonce.wrapping_add(1);
            let input = ShareInput {
                coinb1: &coinb1,
                enonce1: &[1, 2, 3, 4],
                enonce2: &[0, 0, 0, 0, 0, 0, 0, 7],
                coinb2: &coinb2,
                branch: &branch,
                version: 0x2000_0000,
                prev_hash: &prev,
                ntime: 0x6500_0000,
                bits: 0x1702_5049,
                nonce,
            };
            let h = hash_share(black_box(&input), &mut scratch);
            black_box((share_target.is_met_by(&h.hash), network.is_met_by(&h.hash)))
        });
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
