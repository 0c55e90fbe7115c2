#![allow(missing_docs, clippy::unwrap_used, reason = "bench")]
//! ckpool's passthrough framing of one share: a miner's `mining.submit` framed for the upstream
//! (`encode_miner_line`), read on the pool side (`decode_downstream`), and the pool's
//! `share.result` read on the passthrough (`decode_upstream`), lines of the ckpool 0.9.9 capture.

use std::hint::black_box;

use ckpool_common::stratum::passthrough::{self, FromDownstream, FromUpstream};
use criterion::{Criterion, criterion_group, criterion_main};

const SUBMIT: &[u8] = br#"{"params": ["capture.cpu", "6b1242ec00000001", "0000000000000000", "6b1242ff", "c0ee2000"], "id": 4, "method": "mining.submit"}"#;
const SHARE_RESULT: &[u8] =
    br#"{"result":true,"error":null,"id":4,"node.method":"share.result","client_id":3}"#;

fn framing(c: &mut Criterion) {
    let (mut up, mut back) = (Vec::with_capacity(512), Vec::with_capacity(512));
    c.bench_function("passthrough/share_both_ways", |b| {
        b.iter(|| {
            up.clear();
            back.clear();
            passthrough::encode_miner_line(&mut up, black_box(SUBMIT), 3, "127.0.0.1", 0).unwrap();
            let line = up.strip_suffix(b"\n").unwrap_or(&up);
            let pool = matches!(
                passthrough::decode_downstream(line, &mut back),
                FromDownstream::Miner { client_id: 3, .. }
            );
            back.clear();
            let miner = matches!(
                passthrough::decode_upstream(black_box(SHARE_RESULT), &mut back),
                FromUpstream::Client { client_id: 3, .. }
            );
            pool && miner
        })
    });
}

criterion_group!(benches, framing);
criterion_main!(benches);
