//! A `-H` upgrade under load, end to end against a real regtest node: 200 ckload miners
//! (the ckload library, workers as threads on two 127.0.0.x source addresses) submit shares
//! steadily while a new instance takes the pool over. No miner is disconnected, every submit
//! is answered exactly once, none is rejected, accepted shares go on after the upgrade with no
//! stretch of a second without one, and every miner's session id still resumes its session in
//! the new process. The suite runs again with `POOL_BACKEND=epoll`, which the pools inherit.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    missing_docs,
    reason = "test code"
)]

#[path = "support/node.rs"]
mod node;
#[path = "support/pool.rs"]
mod pool;

use std::time::{Duration, Instant};

use loadtest::run::{Launcher, RunSpec, Scenario, run, summary};
use node::{RegtestNet, WAIT, bitcoind_or_skip};
use pool::{PoolProcess, btcd_entry, free_port, regtest_config, wait_stats};
use serde_json::json;

/// 2^-32, the pool's lowest difficulty: every hash meets it but the top 2^-16 of the range.
const MIN_DIFF: f64 = 0.000_000_000_232_830_643_653_869_63;
/// Miners.
const MINERS: u32 = 200;
/// Shares per second over all miners (2 per miner).
const RATE: f64 = 400.0;

#[test]
fn handover_under_load_keeps_every_miner_and_answers_every_submit() {
    let tag = "handover_under_load_keeps_every_miner_and_answers_every_submit";
    let Some(exe) = bitcoind_or_skip(tag) else {
        return;
    };
    let t_test = Instant::now();
    let net = RegtestNet::start(&exe, 2);
    let node = &net.nodes[0];
    let addr = node.new_address();
    let mut cfg = regtest_config(vec![btcd_entry(node)], Some(&addr), free_port());
    // Pin the difficulty: vardiff would raise it to the network difficulty, where every valid
    // share is a block (and each block makes the shares in flight stale).
    cfg["maxdiff"] = json!(MIN_DIFF);
    let mut old = PoolProcess::start("ho-load", &cfg, &[]);

    let mut spec = RunSpec::new(Scenario::Steady, old.addr, MINERS);
    spec.workers = 2;
    spec.sources = vec!["127.0.0.2".parse().unwrap(), "127.0.0.3".parse().unwrap()];
    spec.ramp = Duration::from_secs(2);
    spec.duration = Duration::from_secs(16);
    spec.drain = Duration::from_secs(5);
    spec.rate = RATE;
    spec.resume_at_end = true;
    spec.progress = true;
    let load = std::thread::spawn(move || run(&spec, &Launcher::InProcess).unwrap());

    // Every miner logged in and shares flowing (≈ 2 s of them), then the upgrade.
    wait_stats(&old, "every miner connected and submitting", WAIT, |s| {
        s["clients"] == MINERS && s["accepted"].as_u64().unwrap_or(0) >= 800
    });
    let before = old.stats()["accepted"].as_u64().unwrap();
    let t_ho = Instant::now();
    let mut new = old.spawn_sibling(&["-H"], &[], "new.log");
    let status = old.wait_exit(WAIT).unwrap_or_else(|| {
        panic!(
            "the old instance did not hand over; old log:\n{}\nnew log:\n{}",
            old.log_text(),
            new.log_text()
        )
    });
    let took = t_ho.elapsed();
    assert!(
        status.success(),
        "old exit: {status}; log:\n{}",
        old.log_text()
    );
    assert!(new.is_running(), "new log:\n{}", new.log_text());
    let log = new.log_text();
    assert!(
        log.contains(&format!(
            "took the running instance over connections={MINERS}"
        )),
        "new log:\n{log}"
    );
    let at_takeover = new.stats()["accepted"].as_u64().unwrap();
    assert!(at_takeover >= before, "{at_takeover} < {before}");

    let report = load.join().unwrap();
    println!("{}", summary(&report));
    println!(
        "handover took {:.0} ms from the start of the new instance; accepted per second: {:?}",
        took.as_secs_f64() * 1000.0,
        report.accepts.per_second
    );
    let c = &report.counters;
    // No miner was disconnected, reconnected, or subscribed twice: their sessions (and ids)
    // are the ones from before the upgrade.
    assert_eq!(report.error_count(), 0, "{}", summary(&report));
    assert_eq!(c.disconnects, 0);
    assert_eq!(c.reconnects, 0);
    assert_eq!(c.reconnect_requests, 0);
    assert_eq!((c.connected, c.subscribed, c.authorized), (200, 200, 200));
    // Every submit answered exactly once; none rejected, none a duplicate.
    assert!(c.submitted > 2000, "only {} submits", c.submitted);
    assert_eq!(c.accepted + c.rejected, c.submitted, "{c:?}");
    assert_eq!((c.unanswered, report.outstanding()), (0, 0));
    assert_eq!(c.unknown_replies, 0);
    assert_eq!(c.rejected, 0, "{:?}", report.rejected_by_reason);
    assert_eq!(report.unexpected_replies, 0);
    // Accepted shares went on after the upgrade: the new instance counted more than it took
    // over, and the totals it carries are ckload's.
    assert!(c.accepted > at_takeover, "{} <= {at_takeover}", c.accepted);
    wait_stats(&new, "the pool's count to match ckload's", WAIT, |s| {
        s["accepted"] == c.accepted && s["rejected"] == 0
    });
    // Pool-wide, no second without an accepted share, nor a second at under half the rate.
    let a = &report.accepts;
    assert!(a.median_per_100ms > 0, "{a:?}");
    assert!(a.longest_gap_ms < 1000, "{a:?}");
    assert!(a.longest_dip_ms < 1000, "{a:?}");
    // Every session id still resumes its session, in the new process.
    assert_eq!(c.end_resume_attempts, 200);
    assert_eq!(c.end_resume_ok, 200, "{c:?}");
    let elapsed = t_test.elapsed();
    assert!(elapsed < Duration::from_secs(60), "took {elapsed:?}");
    new.shutdown();
}
