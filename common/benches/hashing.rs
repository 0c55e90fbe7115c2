#![allow(missing_docs, reason = "bench")]
#![allow(clippy::unwrap_used, reason = "bench")]
//! Hashing micro-benches: header sha256d, coinbase sha256d, merkle root from a branch.

use std::hint::black_box;

use ckpool_common::hash::{Sha256dMidstate, sha256d, sha256d_header};
use ckpool_common::merkle::merkle_root_from_branch;
use criterion::{Criterion, criterion_group, criterion_main};

fn bytes<const N: usize>(seed: u8) -> [u8; N] {
    let mut out = [0u8; N];
    for (i, b) in out.iter_mut().enumerate() {
        *b = (i as u8).wrapping_mul(31).wrapping_add(seed);
    }
    out
}

fn hashing(c: &mut Criterion) {
    let header: [u8; 80] = bytes(1);
    c.bench_function("sha256d_header/80B", |b| {
        b.iter(|| sha256d_header(black_box(&header)))
    });

    let coinbase: [u8; 150] = bytes(2);
    c.bench_function("sha256d/coinbase_150B", |b| {
        b.iter(|| sha256d(black_box(&coinbase)))
    });

    // The same coinbase with the first 64 bytes (part of coinb1) cached per job.
    let (coinb1, rest) = coinbase.split_at(64);
    let (enonce, coinb2) = rest.split_at(12);
    let mid = Sha256dMidstate::new(coinb1);
    c.bench_function("sha256d/coinbase_150B_midstate", |b| {
        b.iter(|| mid.finish(black_box(&[enonce, coinb2])))
    });

    let txid: [u8; 32] = bytes(3);
    let branch: Vec<[u8; 32]> = (0..12u8).map(|i| bytes(i.wrapping_mul(17))).collect();
    c.bench_function("merkle_root_from_branch/12_levels", |b| {
        b.iter(|| merkle_root_from_branch(black_box(&txid), black_box(&branch)))
    });
}

criterion_group!(benches, hashing);
criterion_main!(benches);
