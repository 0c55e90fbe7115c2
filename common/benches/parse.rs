#![allow(missing_docs, reason = "bench")]
//! Stratum line parsing: a `mining.submit` line through the fast path and through simd-json, and
//! on the client side a share verdict and a `mining.set_difficulty`.

use std::hint::black_box;

use ckpool_common::stratum::Parser;
use criterion::{Criterion, criterion_group, criterion_main};

const SUBMIT: &[u8] = br#"{"params": ["ckload.1234", "1a2b3c4d5e6f7081", "0000000a", "6500abcd", "1234abcd"], "id": 1234567, "method": "mining.submit"}"#;

const VERDICT: &[u8] = br#"{"id":1234567,"result":true,"error":null}"#;
const SET_DIFFICULTY: &[u8] = br#"{"id":null,"method":"mining.set_difficulty","params":[1024]}"#;

fn parse(c: &mut Criterion) {
    let mut p = Parser::new();
    c.bench_function("parse/submit_fast_path", |b| {
        b.iter(|| p.parse(black_box(SUBMIT)).is_ok())
    });
    c.bench_function("parse/submit_simd_json", |b| {
        b.iter(|| p.parse_slow(black_box(SUBMIT)).is_ok())
    });
    c.bench_function("parse/verdict_fast_path", |b| {
        b.iter(|| {
            p.parse_message(black_box(VERDICT))
                .is_ok_and(|m| m.accepted())
        })
    });
    c.bench_function("parse/set_difficulty_message", |b| {
        b.iter(|| p.parse_message(black_box(SET_DIFFICULTY)).is_ok())
    });
}

criterion_group!(benches, parse);
criterion_main!(benches);
