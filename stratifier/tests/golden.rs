//! Template jobs are byte-identical to what the template-only job builder made before work
//! sources existed: `data/template-jobs.golden` was printed by that code (commit f325901) for
//! the jobs below; a change to a notify line or a coinbase shows here.
#![allow(
    clippy::unwrap_used,
    clippy::indexing_slicing,
    missing_docs,
    reason = "test code"
)]

use std::sync::Arc;
use std::time::Instant;

use ckpool_stratifier::{Job, PoolConfig};
use common::address::{Network, script_for_address};
use common::template::Template;

fn line(j: &Job) -> String {
    format!(
        "GOLDEN {} {} {} {}",
        String::from_utf8_lossy(&j.notify).trim_end(),
        String::from_utf8_lossy(&j.notify_clean).trim_end(),
        hex::encode(&j.coinb1),
        hex::encode(&j.coinb2)
    )
}

#[test]
fn template_jobs_are_byte_identical_to_before() {
    let golden = include_str!("data/template-jobs.golden");
    let mut got = Vec::new();
    let payout =
        script_for_address("mnNghRjeAKbTqkvMYaE6kzkpsfWVdt3TRZ", Network::Regtest).unwrap();
    let mut cfg = PoolConfig::new(Network::Regtest, Some(payout.clone()));
    cfg.coinbase.donation = Some((1.5, payout.clone()));
    let mut t = Template::empty([7; 32], 0x207f_ffff);
    t.height = 1234;
    t.curtime = 1_700_000_123;
    for (clean, pay) in [
        (true, Some(&payout[..])),
        (false, Some(&payout[..])),
        (true, None),
    ] {
        let j = Job::build(
            0x0000_0001_0000_0002,
            Arc::new(t.clone()),
            clean,
            pay,
            &cfg.coinbase,
            Instant::now(),
        )
        .unwrap();
        got.push(line(&j));
        let c2 = j.coinb2_for(&payout, &cfg.coinbase).unwrap();
        got.push(format!(
            "GOLDEN-SOLO {} {}",
            hex::encode(&c2),
            String::from_utf8_lossy(&j.notify_with(&c2, false)).trim_end()
        ));
    }
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../testdata/core-regtest-gbt-12tx-segwit.json"
    ))
    .unwrap();
    let t = Template::from_gbt(&serde_json::from_str(&text).unwrap()).unwrap();
    let cfg = PoolConfig::new(Network::Regtest, Some(payout.clone()));
    let j = Job::build(
        0x0000_0001_0000_0003,
        Arc::new(t),
        false,
        Some(&payout[..]),
        &cfg.coinbase,
        Instant::now(),
    )
    .unwrap();
    got.push(line(&j));
    let want: Vec<&str> = golden.lines().collect();
    assert_eq!(want.len(), got.len());
    for (w, g) in want.iter().zip(&got) {
        assert_eq!(w, g);
    }
}
