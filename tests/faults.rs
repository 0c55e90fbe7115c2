//! Issue #18's fault-injection proof, end to end: the real binary against real regtest nodes,
//! an honest ckload miner mining through each fault, and afterwards its own tally checked
//! against the pool's: every share the pool answered `true` is in the user's totals (admin
//! `users`, or the stats files across a restart) and in the share log (`-L`).
//!
//! The faults: a node SIGKILLed while the pool mines on it; a node whose RPC stalls
//! (`getblocktemplate` and `submitblock` never answered); ZMQ connected to an endpoint that
//! never says anything while blocks arrive; a node answering malformed JSON; the pool itself
//! SIGKILLed with a block pending, then restarted. (The share-log disk failing is
//! `tests/oplog.rs::an_unwritable_share_log_keeps_the_pool_mining_and_shows_in_stats`.)
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
#[path = "support/rpc_proxy.rs"]
mod rpc_proxy;

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use loadtest::{Miner, MinerConfig, MinerReport};
use node::{RegtestNet, RegtestNode, WAIT, bitcoind_or_skip, wait_until};
use pool::{
    Client, PoolProcess, btcd_entry, free_port, regtest_config, share_log_lines, wait_stats,
};
use rpc_proxy::RpcProxy;
use serde_json::{Value, json};

/// Every share is judged at exactly this difficulty (vardiff pinned: `mindiff` = `maxdiff`), so
/// a user's difficulty total is its share count times this, exactly.
const DIFF: f64 = 1.0 / 4_294_967_296.0;

/// A pool config over `btcd` paying `addr`, every share at [`DIFF`], stats files every second.
fn config(btcd: Vec<Value>, addr: &str) -> Value {
    let mut c = regtest_config(btcd, Some(addr), free_port());
    c["mindiff"] = json!(DIFF);
    c["startdiff"] = json!(DIFF);
    c["maxdiff"] = json!(DIFF);
    c["statsupdate"] = json!(1);
    c
}

/// A `btcd` entry for `node` reached through `proxy`.
fn proxied(node: &RegtestNode, proxy: &RpcProxy) -> Value {
    let mut e = btcd_entry(node);
    e["url"] = json!(proxy.addr.to_string());
    e
}

fn proxy_for(node: &RegtestNode, refuse: bool) -> RpcProxy {
    RpcProxy::start(node.rpc_url().trim_start_matches("http://"), refuse)
}

/// An honest miner at 10 shares/s for at most 150 s (it finds regtest blocks too: half of all
/// hashes are). With `pause_after_block` false it keeps submitting on a job it found a block
/// on, so shares flow while the pool cannot get new work.
fn start_miner(pool: &PoolProcess, user: &str, pause_after_block: bool) -> Miner {
    let mut cfg = MinerConfig::new(pool.addr, user);
    cfg.duration = Some(Duration::from_secs(150));
    cfg.max_shares_per_sec = 10.0;
    cfg.pause_after_block = pause_after_block;
    Miner::start(cfg).unwrap()
}

/// The pool's figures for `user` (admin `users`), `Null` when it has none.
fn user_stats(pool: &PoolProcess, user: &str) -> Value {
    pool.admin("users")
        .and_then(|t| serde_json::from_str::<Value>(&t).ok())
        .map_or(Value::Null, |v| v["users"][user].clone())
}

/// The user's accepted share count in the pool.
fn user_accepted(pool: &PoolProcess, user: &str) -> u64 {
    user_stats(pool, user)["accepted"].as_u64().unwrap_or(0)
}

/// Whether `hash` (RPC order) is in `node`'s best chain.
fn in_main_chain(node: &RegtestNode, hash: &str) -> bool {
    node.try_rpc("getblockheader", json!([hash]))
        .ok()
        .and_then(|h| h["confirmations"].as_i64())
        .is_some_and(|c| c >= 1)
}

/// The block files under `logdir/blocks`, by state: `hex` (pending), `done`, `stale`...
fn block_files(logdir: &Path) -> BTreeMap<String, Vec<PathBuf>> {
    let mut by_state: BTreeMap<String, Vec<PathBuf>> = BTreeMap::new();
    let Ok(dir) = std::fs::read_dir(logdir.join("blocks")) else {
        return by_state;
    };
    for f in dir.map(|e| e.unwrap().path()) {
        let name = f.file_name().unwrap().to_string_lossy().into_owned();
        let state = name.rsplit('.').next().unwrap_or_default().to_owned();
        by_state.entry(state).or_default().push(f);
    }
    by_state
}

/// The accounting check after a fault: every submit answered, the user's total at least the
/// miner's accepted count, then SIGTERM (exit 0) and the share log holding exactly the miner's
/// accepted shares plus `earlier_lines` (the lines of other miners, or of an earlier
/// instance).
fn check_accounting(pool: &mut PoolProcess, user: &str, report: &MinerReport, earlier_lines: u64) {
    assert_eq!(report.unanswered, 0, "{report:?}");
    assert!(report.accepted > 0, "{report:?}");
    wait_until(
        &format!("{user}'s total to reach ckload's {}", report.accepted),
        WAIT,
        || user_accepted(pool, user) >= report.accepted,
    );
    let counted = user_accepted(pool, user);
    pool.signal(libc::SIGTERM);
    let status = pool
        .wait_exit(Duration::from_secs(15))
        .unwrap_or_else(|| panic!("the pool still runs 15 s after SIGTERM"));
    assert_eq!(status.code(), Some(0), "exit status {status}");
    let (lines, rejected_lines) = share_log_lines(&pool.dir.join("logs"));
    println!(
        "{user}: ckload accepted {} rejected {} (blocks {}); the pool counted {counted}; \
         share log {lines} accepted and {rejected_lines} rejected lines",
        report.accepted, report.rejected, report.blocks_accepted
    );
    assert_eq!(lines, earlier_lines + report.accepted, "{report:?}");
}

#[test]
fn a_node_sigkilled_mid_mining_fails_over_and_every_accepted_share_counts() {
    let Some(exe) =
        bitcoind_or_skip("a_node_sigkilled_mid_mining_fails_over_and_every_accepted_share_counts")
    else {
        return;
    };
    // Three nodes, so that node 1 keeps a peer (and gives templates) with node 0 dead.
    let mut net = RegtestNet::start(&exe, 3);
    let addr = net.nodes[0].new_address();
    let btcd = vec![btcd_entry(&net.nodes[0]), btcd_entry(&net.nodes[1])];
    let mut pool = PoolProcess::start("fkillnode", &config(btcd, &addr), &["-L"]);
    let user = "killnode";
    let miner = start_miner(&pool, user, true);
    wait_until("shares and a block through node 0", WAIT, || {
        let r = miner.report();
        r.accepted >= 5 && r.blocks_accepted >= 1
    });

    net.nodes[0].kill();
    let t = Instant::now();
    wait_stats(&pool, "the pool to move to node 1", WAIT, |s| {
        s["server"] == 1
    });
    println!("failover after SIGKILL took {:?}", t.elapsed());
    let before = miner.report();
    let node1 = &net.nodes[1];
    wait_until(
        "a block found after the kill in node 1's chain",
        WAIT,
        || {
            miner.report().block_hashes[before.block_hashes.len()..]
                .iter()
                .any(|h| in_main_chain(node1, h))
        },
    );
    wait_until("10 more accepted shares", WAIT, || {
        miner.report().accepted >= before.accepted + 10
    });
    let report = miner.stop();
    check_accounting(&mut pool, user, &report, 0);
}

#[test]
fn stalled_rpc_fails_over_and_blocks_reach_the_other_node_without_stalling_shares() {
    let Some(exe) = bitcoind_or_skip(
        "stalled_rpc_fails_over_and_blocks_reach_the_other_node_without_stalling_shares",
    ) else {
        return;
    };
    let net = RegtestNet::start(&exe, 2);
    let proxy = proxy_for(&net.nodes[0], false);
    let addr = net.nodes[0].new_address();
    let btcd = vec![proxied(&net.nodes[0], &proxy), btcd_entry(&net.nodes[1])];
    let mut pool = PoolProcess::start("fstall", &config(btcd, &addr), &["-L"]);
    let node0 = &net.nodes[0];
    let node1 = &net.nodes[1];
    // `finder` pauses after each block until new work comes, so each of its blocks is the first
    // at its height.
    let finder = start_miner(&pool, "stallfinder", true);
    wait_until("a block of the finder's in node 0's chain", WAIT, || {
        finder
            .report()
            .block_hashes
            .iter()
            .any(|h| in_main_chain(node0, h))
    });
    assert_eq!(pool.stats()["server"], 0);

    // 1. Node 0 hangs on submitblock (templates still come): a block found now is offered to
    //    node 0 first and must reach node 1 while node 0 still hangs, within seconds: with
    //    another node to offer it to, submitblock waits at most 5 s on each node but the last,
    //    not the 30 s RPC timeout.
    proxy.set_stall(&["submitblock"]);
    let t0 = Instant::now();
    let before = finder.report();
    wait_until(
        "a block found while node 0 hangs on submitblock in node 1's chain",
        Duration::from_secs(75),
        || {
            finder.report().block_hashes[before.block_hashes.len()..]
                .iter()
                .any(|h| in_main_chain(node1, h))
        },
    );
    println!(
        "a block reached node 1 {:?} into the submitblock stall",
        t0.elapsed()
    );
    assert!(
        t0.elapsed() < Duration::from_secs(25),
        "a hung node held the block for {:?}",
        t0.elapsed()
    );
    assert!(proxy.stalled() >= 1, "no submitblock held");

    // 2. Node 0 hangs on getblocktemplate: the next block needs a template, which times out
    //    after 10 s: failover to node 1. `steady` never pauses, so shares keep coming on the current job
    //    meanwhile, and their replies must not wait for the node.
    proxy.set_stall(&["getblocktemplate"]);
    let steady = start_miner(&pool, "stallsteady", false);
    let t1 = Instant::now();
    wait_until("steady's first shares", WAIT, || {
        steady.report().accepted >= 1
    });
    let steady_before = steady.report();
    node1.generate(1);
    wait_stats(
        &pool,
        "the pool to move to node 1",
        Duration::from_secs(75),
        |s| s["server"] == 1,
    );
    println!(
        "failover {:?} into the template stall ({} requests held in all)",
        t1.elapsed(),
        proxy.stalled()
    );
    // With another node to ask, a template waits at most 10 s on a hung one, not the 30 s RPC
    // timeout.
    assert!(
        t1.elapsed() < Duration::from_secs(25),
        "a hung node held the template for {:?}",
        t1.elapsed()
    );
    let steady_during = steady.report();
    assert!(
        steady_during.accepted >= steady_before.accepted + 10,
        "shares stalled with getblocktemplate: {steady_during:?}"
    );
    assert!(steady_during.unanswered <= 5, "{steady_during:?}");

    proxy.set_stall(&[]);
    let finder_after = finder.report();
    wait_until("new blocks and shares after the stall", WAIT, || {
        finder.report().blocks_accepted > finder_after.blocks_accepted
            && steady.report().accepted >= steady_during.accepted + 10
    });
    let finder = finder.stop();
    let steady = steady.stop();
    assert_eq!(finder.unanswered, 0, "{finder:?}");
    assert!(
        user_accepted(&pool, "stallfinder") >= finder.accepted,
        "{finder:?}"
    );
    check_accounting(&mut pool, "stallsteady", &steady, finder.accepted);
}

/// The RPC (display) order of a `mining.notify` prevhash (8 words each byte-swapped).
fn notify_prevhash_to_rpc(prevhash: &str) -> Option<String> {
    let mut bytes = hex::decode(prevhash).ok()?;
    for w in bytes.chunks_exact_mut(4) {
        w.reverse();
    }
    bytes.reverse();
    Some(hex::encode(bytes))
}

#[test]
fn with_zmq_silent_polling_brings_new_blocks_to_miners() {
    let Some(exe) = bitcoind_or_skip("with_zmq_silent_polling_brings_new_blocks_to_miners") else {
        return;
    };
    let net = RegtestNet::start(&exe, 2);
    let node = &net.nodes[0];
    // An endpoint that takes the connection and never says anything.
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("tcp://{}", silent.local_addr().unwrap());
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for c in silent.incoming() {
            held.push(c);
        }
    });
    let addr = node.new_address();
    let mut cfg = config(vec![btcd_entry(node)], &addr);
    cfg["zmqblock"] = json!(endpoint);
    cfg["blockpoll"] = json!(100);
    let mut pool = PoolProcess::start("fzmq", &cfg, &["-L"]);
    let user = "zmqsilent";
    let miner = start_miner(&pool, user, true);
    let mut watcher = Client::connect(pool.addr);
    watcher.login("zmqwatch");
    watcher.wait_for("the first job", WAIT, |v| v["method"] == "mining.notify");
    wait_until("shares before the blocks", WAIT, || {
        miner.report().accepted >= 5
    });

    let mut latencies = Vec::new();
    for round in 0..3 {
        let t0 = Instant::now();
        let hash = node.generate(1).pop().unwrap();
        let height = node.rpc("getblockheader", json!([hash]))["height"]
            .as_u64()
            .unwrap();
        // The notify is for this block, or for one the pool's miner found on top of it.
        watcher.wait_for(
            &format!("a clean notify on block {hash} (height {height}) or later"),
            Duration::from_secs(5),
            |v| {
                v["method"] == "mining.notify"
                    && v["params"][8] == true
                    && v["params"][1]
                        .as_str()
                        .and_then(notify_prevhash_to_rpc)
                        .and_then(|h| node.try_rpc("getblockheader", json!([h])).ok())
                        .and_then(|h| h["height"].as_u64())
                        .is_some_and(|h| h >= height)
            },
        );
        let dt = t0.elapsed();
        println!("round {round}: generated block to clean notify in {dt:?}");
        latencies.push(dt);
    }
    latencies.sort();
    // blockpoll is 100 ms; the rest is slack for a loaded machine.
    let slowest = latencies[latencies.len() - 1];
    assert!(slowest < Duration::from_secs(2), "slowest {slowest:?}");
    let before = miner.report().accepted;
    wait_until("10 more accepted shares after the blocks", WAIT, || {
        miner.report().accepted >= before + 10
    });
    let report = miner.stop();
    drop(watcher);
    check_accounting(&mut pool, user, &report, 0);
}

#[test]
fn malformed_json_from_the_node_keeps_the_current_job_and_recovers() {
    let Some(exe) =
        bitcoind_or_skip("malformed_json_from_the_node_keeps_the_current_job_and_recovers")
    else {
        return;
    };
    let net = RegtestNet::start(&exe, 2);
    let node = &net.nodes[0];
    let proxy = proxy_for(node, false);
    let addr = node.new_address();
    let mut pool = PoolProcess::start(
        "fgarbage",
        &config(vec![proxied(node, &proxy)], &addr),
        &["-L"],
    );
    let user = "garbage";
    let miner = start_miner(&pool, user, false);
    wait_until("shares before the garbage", WAIT, || {
        miner.report().accepted >= 5
    });

    proxy.set_garbage(true);
    let before = miner.report();
    wait_until(
        "the pool to get malformed replies",
        Duration::from_secs(10),
        || proxy.garbled() >= 5,
    );
    wait_until(
        "30 shares accepted on the current job while the node answers garbage",
        Duration::from_secs(30),
        || miner.report().accepted >= before.accepted + 30,
    );
    let during = miner.report();
    assert_eq!(during.unanswered.min(5), during.unanswered, "{during:?}");
    let found: Vec<String> = during.block_hashes[before.block_hashes.len()..].to_vec();
    assert!(
        !found.is_empty(),
        "no block found during the garbage: {during:?}"
    );
    proxy.set_garbage(false);
    println!("{} malformed replies", proxy.garbled());

    // Recovered: a block the miner found while the node could not take it (during the garbage,
    // or a sibling at the same height found just before) reaches the node, and new work
    // follows.
    let stuck_at = node.height();
    wait_until("a block of the miner's on the node again", WAIT, || {
        node.try_rpc("getblockhash", json!([stuck_at + 1]))
            .ok()
            .and_then(|h| h.as_str().map(str::to_owned))
            .is_some_and(|h| miner.report().block_hashes.contains(&h))
    });
    wait_until("a new job and 10 more accepted shares", WAIT, || {
        let r = miner.report();
        r.notifies > during.notifies && r.accepted >= during.accepted + 10
    });
    let report = miner.stop();
    let log = pool.log_text();
    let complaints: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("WARN") || l.contains("ERROR"))
        .take(5)
        .collect();
    println!("the pool said: {complaints:#?}");
    assert!(
        log.contains("CRITICAL: No bitcoinds active"),
        "nothing logged about the garbage: {complaints:#?}"
    );
    check_accounting(&mut pool, user, &report, 0);
}

/// The user's difficulty total in its stats file, `<logdir>/users/<user>` (`shares`), 0 if none.
fn stats_file_diff(logdir: &Path, user: &str) -> f64 {
    std::fs::read_to_string(logdir.join("users").join(user))
        .ok()
        .and_then(|t| serde_json::from_str::<Value>(&t).ok())
        .and_then(|v| v["shares"].as_f64())
        .unwrap_or(0.0)
}

#[test]
fn sigkill_with_a_block_pending_then_restart_resubmits_it_once_and_keeps_the_totals() {
    let Some(exe) = bitcoind_or_skip(
        "sigkill_with_a_block_pending_then_restart_resubmits_it_once_and_keeps_the_totals",
    ) else {
        return;
    };
    let net = RegtestNet::start(&exe, 2);
    let node = &net.nodes[0];
    // Refusing submitblock keeps the blocks found pending (on disk, retried) at the kill.
    let proxy = proxy_for(node, true);
    let addr = node.new_address();
    let mut pool = PoolProcess::start(
        "fsigkill",
        &config(vec![proxied(node, &proxy)], &addr),
        &["-L"],
    );
    let logdir = pool.dir.join("logs");
    let user = "sigkill";
    let miner = start_miner(&pool, user, false);
    wait_until("20 shares and a block pending", WAIT, || {
        let r = miner.report();
        r.accepted >= 20 && r.blocks_accepted >= 1 && proxy.refused() >= 1
    });
    // What the pool has surely written by now: the miner's count at this moment, once the
    // share log and the user's stats file show it (lines are written within a second, stats
    // files every second; both go on while the miner mines).
    let seen = miner.report();
    wait_until("the share log and the stats file to catch up", WAIT, || {
        pool.stats()["sharelog"]["written"].as_u64() >= Some(seen.accepted)
            && stats_file_diff(&logdir, user) >= seen.accepted as f64 * DIFF
    });
    let tip = node.height();

    pool.signal(libc::SIGKILL);
    pool.wait_exit(Duration::from_secs(10))
        .unwrap_or_else(|| panic!("the pool survived SIGKILL"));
    let killed = miner.stop();
    let pending = block_files(&logdir).remove("hex").unwrap_or_default();
    assert!(!pending.is_empty(), "no block pending at the kill");
    assert_eq!(node.height(), tip, "a refused block reached the node");
    let (lines, _) = share_log_lines(&logdir);
    println!(
        "killed: ckload saw {} accepted ({} when the files were checked), the share log has {lines}, \
         {} blocks pending",
        killed.accepted,
        seen.accepted,
        pending.len()
    );
    assert!(
        lines >= seen.accepted && lines <= killed.accepted,
        "{lines} lines, {} seen, {killed:?}",
        seen.accepted
    );

    // Restarted with the node reachable: the pending blocks are submitted at start, once.
    proxy.set_refuse(false);
    let mut pool2 = pool.spawn_sibling(&["-L"], &[], "pool2.log");
    wait_until("the restarted pool to answer", WAIT, || {
        pool2.admin("ping").as_deref() == Some("pong")
    });
    wait_until("the pending blocks settled", WAIT, || {
        !block_files(&logdir).contains_key("hex")
    });
    let files = block_files(&logdir);
    println!("block files after the restart: {files:?}");
    let done = files.get("done").map_or(0, Vec::len);
    assert!(done >= 1, "{files:?}");
    assert!(node.height() > tip, "no block reached the node");
    let headers = proxy.submitted_headers();
    let mut once = headers.clone();
    once.sort();
    once.dedup();
    assert_eq!(
        once.len(),
        headers.len(),
        "a block submitted twice: {headers:?}"
    );
    assert_eq!(
        headers.len(),
        pending.len(),
        "each pending block submitted once"
    );

    // The share journal gave the share log back what its writer had not written: every share
    // ckload saw accepted is there now.
    let (lines, _) = share_log_lines(&logdir);
    assert!(
        lines >= killed.accepted,
        "{lines} share-log lines after the restart, {} accepted",
        killed.accepted
    );

    // The user's totals were read back: at least what was on disk before the kill.
    let restored = user_stats(&pool2, user);
    let restored_diff = restored["accepted_diff"].as_f64().unwrap_or(0.0);
    println!("restored {restored}");
    assert!(
        restored_diff >= killed.accepted as f64 * DIFF,
        "restored {restored}, {} accepted before the kill",
        killed.accepted
    );

    // And mining goes on, every share counted on top.
    let miner = start_miner(&pool2, user, true);
    wait_until("20 accepted shares after the restart", WAIT, || {
        miner.report().accepted >= 20
    });
    let report = miner.stop();
    let total = user_stats(&pool2, user)["accepted_diff"]
        .as_f64()
        .unwrap_or(0.0);
    assert!(
        total >= restored_diff + report.accepted as f64 * DIFF,
        "{total} < {restored_diff} + {} shares",
        report.accepted
    );
    check_accounting(&mut pool2, user, &report, lines);
}

/// SIGKILL while a miner mines, with the stats files never rewritten in the run (`statsupdate`
/// an hour): the share journal alone brings every share the pool answered `true` back into the
/// user's totals and the share log (`-L`) at the restart, and replaying it again after a second SIGKILL counts nothing
/// twice; a clean stop after that writes the files, and a third start reads the same totals
/// from them.
#[test]
fn sigkill_mid_mining_loses_no_accepted_share_from_the_totals() {
    let Some(exe) = bitcoind_or_skip("sigkill_mid_mining_loses_no_accepted_share_from_the_totals")
    else {
        return;
    };
    let net = RegtestNet::start(&exe, 2);
    let node = &net.nodes[0];
    let addr = node.new_address();
    let mut c = config(vec![btcd_entry(node)], &addr);
    c["statsupdate"] = json!(3600);
    let mut pool = PoolProcess::start("fjournal", &c, &["-L"]);
    let logdir = pool.dir.join("logs");
    let user = "journal";
    let miner = start_miner(&pool, user, true);
    wait_until("40 accepted shares", WAIT, || miner.report().accepted >= 40);
    pool.signal(libc::SIGKILL);
    pool.wait_exit(Duration::from_secs(10))
        .unwrap_or_else(|| panic!("the pool survived SIGKILL"));
    let killed = miner.stop();
    assert_eq!(
        stats_file_diff(&logdir, user),
        0.0,
        "a stats file was written: the test would not show the journal"
    );
    let totals = |p: &PoolProcess| {
        let u = user_stats(p, user);
        (
            u["accepted_diff"].as_f64().unwrap_or(0.0),
            u["accepted"].as_u64().unwrap_or(0),
        )
    };
    let start = |p: &PoolProcess, log: &str| {
        let p2 = p.spawn_sibling(&["-L"], &[], log);
        wait_until("the restarted pool to answer", WAIT, || {
            p2.admin("ping").as_deref() == Some("pong")
        });
        p2
    };

    let mut pool2 = start(&pool, "pool2.log");
    let (diff, count) = totals(&pool2);
    println!(
        "ckload: {} accepted of {} submitted ({} unanswered); restored: {count} shares, {} x DIFF",
        killed.accepted,
        killed.submitted,
        killed.unanswered,
        diff / DIFF
    );
    assert!(
        diff >= killed.accepted as f64 * DIFF,
        "restored {} x DIFF < {} accepted",
        diff / DIFF,
        killed.accepted
    );
    assert!(
        diff <= killed.submitted as f64 * DIFF,
        "restored {} x DIFF > {} submitted: counted twice",
        diff / DIFF,
        killed.submitted
    );
    assert!(
        count >= killed.accepted && count <= killed.submitted,
        "{count}"
    );
    // The share log too: the lines its writer had not written came back from the journal,
    // each once.
    let (lines, _) = share_log_lines(&logdir);
    println!("share log: {lines} accepted lines after the restart");
    assert_eq!(lines, count, "share log lines against the restored count");

    // Killed again before any stats write: the same journal, read again, gives the same.
    pool2.signal(libc::SIGKILL);
    pool2
        .wait_exit(Duration::from_secs(10))
        .unwrap_or_else(|| panic!("the pool survived SIGKILL"));
    let mut pool3 = start(&pool2, "pool3.log");
    assert_eq!(
        totals(&pool3),
        (diff, count),
        "a second replay changed the totals"
    );
    assert_eq!(
        share_log_lines(&logdir).0,
        lines,
        "a second recovery wrote lines again"
    );

    // A clean stop writes the stats files (and prunes the journal); the next start reads
    // them, with nothing counted twice.
    pool3.signal(libc::SIGTERM);
    let status = pool3
        .wait_exit(Duration::from_secs(15))
        .unwrap_or_else(|| panic!("the pool still runs 15 s after SIGTERM"));
    assert_eq!(status.code(), Some(0), "exit status {status}");
    assert_eq!(stats_file_diff(&logdir, user), diff);
    let left = std::fs::read_dir(logdir.join("pool").join("journal"))
        .map(|d| d.count())
        .unwrap_or(0);
    assert_eq!(left, 0, "journal segments left after a clean stop");
    let mut pool4 = start(&pool3, "pool4.log");
    assert_eq!(totals(&pool4).0, diff, "the files read back differ");
    pool4.signal(libc::SIGTERM);
    let _ = pool4.wait_exit(Duration::from_secs(15));
}
