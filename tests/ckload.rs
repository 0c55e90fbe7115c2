//! ckload against the real ckpool-rs binary on real regtest nodes: a small steady run with the
//! invalid-share knobs and forced blocks, and a churn run with session resume. Driven through
//! the ckload library (workers as threads, each bound to its own 127.0.0.x source address).
//! Without a node these print "skipped" (locally) or fail (in CI).
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

use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use loadtest::rpc::RpcTarget;
use loadtest::run::{Launcher, Report, RunSpec, Scenario, run, summary};
use loadtest::stats::ShareKind;
use node::{RPC_PASS, RPC_USER, RegtestNet, WAIT, bitcoind_or_skip};
use pool::{PoolProcess, btcd_entry, free_port, regtest_config, share_log_lines, wait_stats};
use serde_json::json;

/// 2^-32, the pool's lowest difficulty: every hash meets it but the top 2^-16 of the range.
const MIN_DIFF: f64 = 0.000_000_000_232_830_643_653_869_63;

/// The tests load the machine; one at a time keeps the latencies meaningful.
static SERIAL: Mutex<()> = Mutex::new(());

fn start_pool(net: &RegtestNet, tag: &str, flags: &[&str]) -> PoolProcess {
    let node = &net.nodes[0];
    let addr = node.new_address();
    let mut cfg = regtest_config(vec![btcd_entry(node)], Some(&addr), free_port());
    // Pin the difficulty: vardiff would raise it to the network difficulty, where every valid
    // share is a block.
    cfg["maxdiff"] = json!(MIN_DIFF);
    PoolProcess::start(tag, &cfg, flags)
}

fn base_spec(pool: &PoolProcess, scenario: Scenario, miners: u32) -> RunSpec {
    let mut spec = RunSpec::new(scenario, pool.addr, miners);
    spec.workers = 2;
    spec.sources = vec!["127.0.0.2".parse().unwrap(), "127.0.0.3".parse().unwrap()];
    spec.progress = true;
    // Replies can lag by seconds on a loaded CI machine; a short drain would count them unanswered.
    spec.drain = Duration::from_secs(10);
    spec
}

fn assert_no_errors(r: &Report) {
    assert_eq!(r.error_count(), 0, "errors in the run:\n{}", summary(r));
    assert!(r.worker_failures.is_empty(), "{:?}", r.worker_failures);
    assert_eq!(r.errors.total(), 0, "{:?}", r.errors);
}

#[test]
fn steady_load_with_invalid_share_knobs_and_forced_blocks() {
    let Some(exe) = bitcoind_or_skip("steady_load_with_invalid_share_knobs_and_forced_blocks")
    else {
        return;
    };
    let _serial = SERIAL.lock().unwrap_or_else(PoisonError::into_inner);
    let net = RegtestNet::start(&exe, 2);
    // With the share log (-L): after the run and a SIGTERM, its accepted lines are ckload's.
    let mut pool = start_pool(&net, "ckload-steady", &["-L"]);
    let node = &net.nodes[0];

    let mut spec = base_spec(&pool, Scenario::Steady, 200);
    spec.ramp = Duration::from_secs(2);
    spec.duration = Duration::from_secs(20);
    spec.rate = 200.0;
    spec.stale_rate = 0.05;
    spec.duplicate_rate = 0.05;
    spec.low_difficulty_rate = 0.005;
    spec.blocks = 3;
    spec.block_interval = Duration::from_secs(4);
    spec.rpc = Some(RpcTarget::new(&node.rpc_url(), RPC_USER, RPC_PASS).unwrap());
    spec.pool_pid = Some(pool_pid(&pool));
    let h0 = node.height();
    let report = run(&spec, &Launcher::InProcess).unwrap();
    println!("{}", summary(&report));

    assert_no_errors(&report);
    let c = &report.counters;
    assert_eq!(c.connected, 200);
    assert_eq!(c.authorized, 200);
    assert_eq!(report.peak_authorized, 200);
    assert_eq!(c.blocks_submitted, 0, "ckload must not submit blocks");
    assert_eq!(c.shares_skipped, 0);
    assert!(c.accepted > 1000, "only {} shares accepted", c.accepted);
    assert!(report.rates.accepted_per_sec > 100.0, "{:?}", report.rates);
    let submit = &report.latency["submit"];
    assert!(submit.p99_us < 500_000, "submit p99 {} µs", submit.p99_us);
    assert_eq!(submit.count, c.accepted + c.rejected);

    // Every kind got exactly the replies it should.
    assert_eq!(report.unexpected_replies, 0, "{}", summary(&report));
    let kind = |k: ShareKind| &report.shares[k.as_str()];
    let valid = kind(ShareKind::Valid);
    assert!(valid.accepted > 1000);
    for (k, reason) in [
        (ShareKind::Stale, "Stale"),
        (ShareKind::Duplicate, "Duplicate"),
        (ShareKind::LowDifficulty, "Above target"),
    ] {
        let s = kind(k);
        assert!(s.submitted > 0, "no {} shares sent", k.as_str());
        assert_eq!(s.accepted, 0, "{} shares accepted", k.as_str());
        assert!(
            s.rejected.get(reason).copied().unwrap_or(0) > 0,
            "{}: {:?}",
            k.as_str(),
            s.rejected
        );
        assert_eq!(s.unexpected(k), 0, "{}: {:?}", k.as_str(), s);
    }
    // Stale shares are only ever "Stale"; the others may race a new block and be "Stale" too
    // (counted in raced_block), nothing else.
    assert_eq!(
        kind(ShareKind::Stale).rejected.keys().collect::<Vec<_>>(),
        vec!["Stale"]
    );

    // The forced blocks: each reached every miner.
    let f = &report.fanout;
    assert_eq!(f.blocks.len(), 3);
    assert!(f.blocks.iter().all(|b| b.hash.is_some()), "{:?}", f.blocks);
    assert_eq!(node.height(), h0 + 3);
    assert_eq!(f.block_to_last.count, 3, "{f:?}");
    assert!(f.jobs_measured >= 3);
    assert!(f.jobs.iter().any(|j| j.receivers == 200 && j.clean));

    // Pool usage was sampled.
    let p = report.pool.as_ref().unwrap();
    assert!(p.rss_kib_end > 0 && p.cpu_secs > 0.0, "{p:?}");

    // The pool counted what ckload saw.
    wait_stats(&pool, "pool counts to match ckload", WAIT, |s| {
        s["accepted"] == c.accepted && s["rejected"] == c.rejected
    });

    // SIGTERM: the share log is flushed, and holds every accepted share (stale, duplicate and
    // low-difficulty ones among the rejected, which may be summarised, never more than sent).
    pool.signal(libc::SIGTERM);
    let status = pool
        .wait_exit(Duration::from_secs(5))
        .unwrap_or_else(|| panic!("the pool still runs 5 s after SIGTERM"));
    assert_eq!(status.code(), Some(0), "exit status {status}");
    let (accepted, rejected) = share_log_lines(&pool.dir.join("logs"));
    assert_eq!(accepted, c.accepted, "share log's accepted lines");
    assert!(
        rejected <= c.rejected,
        "{rejected} rejected lines, {} rejects",
        c.rejected
    );
}

#[test]
fn churn_resumes_sessions_with_the_same_extranonce1() {
    let Some(exe) = bitcoind_or_skip("churn_resumes_sessions_with_the_same_extranonce1") else {
        return;
    };
    let _serial = SERIAL.lock().unwrap_or_else(PoisonError::into_inner);
    let net = RegtestNet::start(&exe, 2);
    let pool = start_pool(&net, "ckload-churn", &[]);
    let mut spec = base_spec(&pool, Scenario::Churn, 100);
    spec.ramp = Duration::from_secs(1);
    spec.duration = Duration::from_secs(8);
    spec.rate = 50.0;
    spec.churn_per_sec = 0.2;
    let report = run(&spec, &Launcher::InProcess).unwrap();
    println!("{}", summary(&report));
    assert_no_errors(&report);
    let c = &report.counters;
    assert!(c.churn_disconnects >= 20, "{c:?}");
    assert_eq!(c.resume_attempts, c.reconnects);
    assert_eq!(c.resume_ok, c.resume_attempts, "{c:?}");
    assert!(c.resume_ok >= 20, "{c:?}");
    assert_eq!(c.resume_mismatch, 0);
    assert_eq!(c.connected, 100 + c.reconnects);
    assert!(c.accepted > 100);
    assert_eq!(report.unexpected_replies, 0);
}

/// The pool's pid, from its pid file in the socket directory.
fn pool_pid(pool: &PoolProcess) -> u32 {
    let text = std::fs::read_to_string(pool.sockdir.join("main.pid"))
        .or_else(|_| std::fs::read_to_string(pool.sockdir.join("ckpool-rs.pid")))
        .expect("the pool's pid file");
    text.trim().parse().expect("a pid")
}
