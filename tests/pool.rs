//! End to end against real regtest nodes: the ckpool-rs binary, the ckload test miner, and raw
//! stratum clients. Without a node these print "skipped" (locally) or fail (in CI).
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

use std::time::{Duration, Instant};

use common::address::{Network, script_for_address};
use common::{Difficulty, Target};
use loadtest::{Miner, MinerConfig, MinerReport};
use node::{RegtestNet, RegtestNode, WAIT, bitcoind_or_skip, wait_until};
use pool::{Client, PoolProcess, btcd_entry, free_port, regtest_config, wait_stats};
use serde_json::{Value, json};

const BTCSIG: &[u8] = b"/ckpool-rs test/";

/// A fresh payout address of `node` and a pool config mining to it through `node` alone.
fn pool_config(node: &RegtestNode) -> (String, Value) {
    let addr = node.new_address();
    let config = regtest_config(vec![btcd_entry(node)], Some(&addr), free_port());
    (addr, config)
}

fn decode_block(node: &RegtestNode, hash: &str) -> bitcoin::Block {
    let hex = node.rpc("getblock", json!([hash, 0]));
    let raw = hex::decode(hex.as_str().expect("raw block hex")).unwrap();
    bitcoin::consensus::deserialize(&raw).unwrap()
}

fn in_main_chain(node: &RegtestNode, hash: &str) -> bool {
    node.rpc("getblockheader", json!([hash]))["confirmations"]
        .as_i64()
        .unwrap_or(-1)
        >= 1
}

fn mine_blocks(pool: &PoolProcess, user: &str, blocks: u64) -> MinerReport {
    let mut cfg = MinerConfig::new(pool.addr, user);
    cfg.stop_after_blocks = Some(blocks);
    cfg.duration = Some(Duration::from_secs(150));
    Miner::start(cfg).unwrap().wait(Duration::from_secs(180))
}

/// A miner that sends 10 shares/s and stops at a block (so a raw client's jobs stay current),
/// once it has had 3 shares accepted.
fn start_honest_miner(addr: std::net::SocketAddr, user: &str) -> Miner {
    let mut cfg = MinerConfig::new(addr, user);
    cfg.duration = Some(Duration::from_secs(120));
    cfg.max_shares_per_sec = 10.0;
    cfg.pause_after_block = true;
    let honest = Miner::start(cfg).unwrap();
    wait_until("the honest miner to get shares accepted", WAIT, || {
        honest.report().accepted >= 3
    });
    honest
}

#[test]
fn pool_mode_mines_blocks_paying_the_configured_address() {
    let Some(exe) = bitcoind_or_skip("pool_mode_mines_blocks_paying_the_configured_address") else {
        return;
    };
    let net = RegtestNet::start(&exe, 2);
    let node = &net.nodes[0];
    let (addr, config) = pool_config(node);
    let pool = PoolProcess::start("poolmode", &config, &[]);
    let h0 = node.height();

    let report = mine_blocks(&pool, "tester.w1", 5);
    assert!(report.blocks_accepted >= 5, "{report:?}");
    assert!(report.error.is_none(), "{report:?}");
    wait_until("the node to take 5 blocks", WAIT, || {
        node.height() >= h0 + 5
    });

    let payout = script_for_address(&addr, Network::Regtest).unwrap();
    let mut in_chain = 0;
    for hash in &report.block_hashes {
        let block = decode_block(node, hash);
        assert!(block.check_merkle_root(), "{hash}");
        let coinbase = &block.txdata[0];
        assert!(coinbase.is_coinbase());
        assert_eq!(
            coinbase.output[0].script_pubkey.as_bytes(),
            &payout[..],
            "block {hash} pays elsewhere"
        );
        let sig = coinbase.input[0].script_sig.as_bytes();
        assert!(
            sig.windows(BTCSIG.len()).any(|w| w == BTCSIG),
            "block {hash} lacks btcsig"
        );
        in_chain += usize::from(in_main_chain(node, hash));
    }
    assert!(
        in_chain >= 5,
        "only {in_chain} of {:?} are in the main chain",
        report.block_hashes
    );
    assert_eq!(
        node.height() - h0,
        in_chain as u64,
        "height rose by another amount than our blocks"
    );

    // The pool counted exactly what the miner saw.
    let stats = wait_stats(&pool, "pool counts to match the miner", WAIT, |s| {
        s["accepted"] == report.accepted && s["rejected"] == report.rejected
    });
    assert!(report.accepted >= 5);
    assert_eq!(
        stats["users"]["tester"]["workers"]["tester.w1"]["accepted"],
        report.accepted
    );
    println!("pool mode: {report:?}");
}

/// The stats files ckpool operators watch: `logs/pool/pool.status` (three JSON lines) and
/// `logs/users/<user>`, rewritten every `statsupdate` (1 s here) while a miner mines.
#[test]
fn stats_files_show_hashrate_and_users_while_a_miner_mines() {
    let Some(exe) = bitcoind_or_skip("stats_files_show_hashrate_and_users_while_a_miner_mines")
    else {
        return;
    };
    let net = RegtestNet::start(&exe, 2);
    let node = &net.nodes[0];
    let (_, mut config) = pool_config(node);
    config["statsupdate"] = json!(1);
    let pool = PoolProcess::start("statsfiles", &config, &[]);
    let miner = start_honest_miner(pool.addr, "statsuser.rig1");

    let logs = pool.dir.join("logs");
    let status_path = logs.join("pool/pool.status");
    let user_path = logs.join("users/statsuser");
    let read_json_lines = |path: &std::path::Path| -> Option<Vec<Value>> {
        let text = std::fs::read_to_string(path).ok()?;
        text.lines()
            .map(|l| serde_json::from_str::<Value>(l).ok())
            .collect()
    };
    let mut status = Vec::new();
    wait_until(
        "pool.status with a hashrate and accepted shares",
        WAIT,
        || {
            status = read_json_lines(&status_path).unwrap_or_default();
            status.len() == 3
                && status[1]["hashrate1m"].as_str().is_some_and(|h| h != "0")
                && status[2]["accepted"].as_f64().is_some_and(|a| a > 0.0)
        },
    );
    assert!(status[0]["runtime"].as_u64().is_some(), "{status:?}");
    assert!(status[0]["lastupdate"].as_u64().unwrap() > 1_600_000_000);
    assert!(status[0]["Users"].as_u64().unwrap() >= 1, "{status:?}");
    assert!(status[0]["Workers"].as_u64().unwrap() >= 1, "{status:?}");
    for key in [
        "hashrate5m",
        "hashrate15m",
        "hashrate1hr",
        "hashrate6hr",
        "hashrate1d",
        "hashrate7d",
    ] {
        assert!(status[1][key].is_string(), "{key}: {status:?}");
    }
    for key in [
        "diff",
        "rejected",
        "bestshare",
        "SPS1m",
        "SPS5m",
        "SPS15m",
        "SPS1h",
    ] {
        assert!(status[2][key].is_number(), "{key}: {status:?}");
    }

    let mut user = Value::Null;
    wait_until("users/statsuser listing the miner's worker", WAIT, || {
        user = std::fs::read_to_string(&user_path)
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or(Value::Null);
        user["worker"]
            .as_array()
            .is_some_and(|ws| ws.iter().any(|w| w["workername"] == "statsuser.rig1"))
    });
    assert!(user["hashrate1m"].is_string(), "{user}");
    assert!(
        user["lastshare"].as_u64().unwrap() > 1_600_000_000,
        "{user}"
    );
    assert!(user["shares"].as_f64().unwrap() > 0.0, "{user}");
    let worker = &user["worker"][0];
    assert_eq!(worker["workername"], "statsuser.rig1");
    assert!(worker["hashrate7d"].is_string(), "{user}");

    // The admin socket's stats carry the same figures as numbers.
    let stats = wait_stats(&pool, "hashrates in the admin stats", WAIT, |s| {
        s["hashrate1m"].as_f64().is_some_and(|h| h > 0.0)
            && s["users"]["statsuser"]["workers"]["statsuser.rig1"]["lastshare"]
                .as_u64()
                .is_some_and(|t| t > 0)
    });
    assert!(stats["users"]["statsuser"]["hashrate1m"].as_f64().unwrap() > 0.0);
    let report = miner.stop();
    assert!(report.accepted >= 3, "{report:?}");
    println!(
        "pool.status:\n{}users/statsuser:\n{}",
        std::fs::read_to_string(&status_path).unwrap_or_default(),
        std::fs::read_to_string(&user_path).unwrap_or_default()
    );
}

#[test]
fn solo_mode_pays_each_user_their_own_address() {
    let Some(exe) = bitcoind_or_skip("solo_mode_pays_each_user_their_own_address") else {
        return;
    };
    let net = RegtestNet::start(&exe, 2);
    let node = &net.nodes[0];
    let pool = PoolProcess::start(
        "solo",
        &regtest_config(vec![btcd_entry(node)], None, free_port()),
        &["-B"],
    );
    let alice = node.new_address();
    let bob = node.new_address();
    assert_ne!(alice, bob);

    // An address-less username is refused in solo mode.
    let mut c = Client::connect(pool.addr);
    c.send(&json!({"id": 1, "method": "mining.subscribe", "params": []}));
    c.reply(1);
    c.send(&json!({"id": 2, "method": "mining.authorize", "params": ["not-an-address", "x"]}));
    assert_eq!(c.reply(2)["result"], false);

    for (user, addr) in [
        (format!("{alice}.rig"), &alice),
        (format!("{bob}_rig"), &bob),
    ] {
        let report = mine_blocks(&pool, &user, 1);
        assert!(report.blocks_accepted >= 1, "{user}: {report:?}");
        let script = script_for_address(addr, Network::Regtest).unwrap();
        let hash = report.block_hashes.last().unwrap();
        wait_until("the block to reach the node", WAIT, || {
            node.try_rpc("getblockheader", json!([hash])).is_ok()
        });
        let block = decode_block(node, hash);
        assert_eq!(
            block.txdata[0].output[0].script_pubkey.as_bytes(),
            &script[..],
            "{user}'s block pays elsewhere"
        );
        assert!(in_main_chain(node, hash));
        // The next user must not start on a job whose block was just found: on regtest its first
        // share would be a second block for the same height, off the best chain.
        wait_stats(
            &pool,
            "the pool's job to build on the node's tip",
            WAIT,
            |s| s["job"][1].as_u64() == Some(node.height() + 1),
        );
    }
}

/// Grinds a share for `job` meeting `want` (and not `avoid`).
fn grind(
    job: &loadtest::work::Job,
    en1: &[u8],
    en2: &[u8],
    want: Target,
    avoid: Option<Target>,
) -> u32 {
    (0u32..)
        .find(|&n| {
            let h = job.share_hash(en1, en2, job.version, n);
            want.is_met_by(&h) && avoid.is_none_or(|a| !a.is_met_by(&h))
        })
        .unwrap()
}

fn submit(id: u64, user: &str, job: &loadtest::work::Job, en2: &[u8], nonce: u32) -> Value {
    json!({"id": id, "method": "mining.submit",
        "params": [user, job.job_id, hex::encode(en2), format!("{:08x}", job.ntime), format!("{nonce:08x}")]})
}

fn latest_job(c: &mut Client, after: Option<&str>) -> loadtest::work::Job {
    let v = c.wait_for("a new mining.notify", WAIT, |v| {
        v["method"] == "mining.notify" && after.is_none_or(|a| v["params"][0] != a)
    });
    // Take the newest notify seen so far.
    let newest = c
        .seen
        .iter()
        .rev()
        .find(|m| m["method"] == "mining.notify")
        .cloned()
        .unwrap_or(v);
    loadtest::work::Job::from_notify_params(&newest["params"]).unwrap()
}

fn assert_reject(reply: &Value, code: i64, reason: &str) {
    assert_eq!(reply["result"], false, "{reply}");
    assert_eq!(reply["error"][0], code, "{reply}");
    assert_eq!(reply["error"][1], reason, "{reply}");
    assert_eq!(reply["reject-reason"], reason, "{reply}");
}

#[test]
fn bad_shares_and_bad_clients_while_an_honest_miner_keeps_mining() {
    let Some(exe) =
        bitcoind_or_skip("bad_shares_and_bad_clients_while_an_honest_miner_keeps_mining")
    else {
        return;
    };
    let net = RegtestNet::start(&exe, 2);
    let node = &net.nodes[0];
    let (_, mut config) = pool_config(node);
    config["authtimeout"] = json!(2);
    let mut pool = PoolProcess::start("badclients", &config, &[]);

    // The honest miner: it finds blocks too (half of regtest's hashes are), each making the
    // raw client's job stale; the checks below that need a current job go again when it is.
    let honest = start_honest_miner(pool.addr, "honest.1");

    // Garbage: an error reply, then the connection is closed.
    let mut garbage = Client::connect(pool.addr);
    garbage.send_raw(b"GET / HTTP/1.1\r\n");
    assert!(garbage.wait_closed(WAIT), "garbage client not disconnected");
    assert_eq!(
        garbage.seen.first().map(|v| v["error"][0].clone()),
        Some(json!(20))
    );

    // An oversized line (over the 16 KiB limit, no newline): disconnected.
    let mut big = Client::connect(pool.addr);
    let _ = std::io::Write::write_all(&mut big.stream, &vec![b'a'; 20 * 1024]);
    assert!(
        big.wait_closed(WAIT),
        "oversized-line client not disconnected"
    );

    // A client that subscribes but never authorises: dropped after authtimeout (2 s).
    let mut lazy = Client::connect(pool.addr);
    lazy.send(&json!({"id": 1, "method": "mining.subscribe", "params": []}));
    lazy.reply(1);
    let t = Instant::now();
    assert!(
        lazy.wait_closed(Duration::from_secs(10)),
        "never-authorising client not dropped"
    );
    assert!(
        t.elapsed() >= Duration::from_millis(1500),
        "dropped too early: {:?}",
        t.elapsed()
    );

    // A raw client submitting each kind of bad share.
    let mut c = Client::connect(pool.addr);
    let (en1, n2) = c.login("raw.1");
    let en1 = hex::decode(en1).unwrap();
    let job = latest_job(&mut c, None);
    let net_target = Target::from_compact(job.nbits);
    let share_target = Difficulty::MIN.target();
    let en2 = vec![7u8; n2];
    // Shares that are not blocks, so they do not change the chain under the test.
    let nonce = grind(&job, &en1, &en2, share_target, Some(net_target));

    c.send(&json!({"id": 10, "method": "mining.submit", "params": "nope"}));
    assert_reject(&c.reply(10), 20, "Params not array");
    c.send(&json!({"id": 11, "method": "mining.submit", "params": ["raw.1", "00"]}));
    assert_reject(&c.reply(11), 20, "Invalid array size");
    let mut bad_job = submit(12, "raw.1", &job, &en2, nonce);
    bad_job["params"][1] = json!("ffffffffffffffff");
    c.send(&bad_job);
    assert_reject(&c.reply(12), 21, "Invalid JobID");
    let mut short_n2 = submit(13, "raw.1", &job, &en2, nonce);
    short_n2["params"][2] = json!("0707");
    c.send(&short_n2);
    assert_reject(&c.reply(13), 20, "Invalid nonce2 length");

    // A valid share, then the same again: a duplicate. A block of the honest miner can make the
    // job stale between two lines; then both go again on the newest job, under new ids.
    let (mut job, mut nonce) = (job, nonce);
    let mut checked = false;
    for attempt in 0..10u64 {
        let (first, again) = (100 + 2 * attempt, 101 + 2 * attempt);
        c.send(&submit(first, "raw.1", &job, &en2, nonce));
        let r = c.reply(first);
        if r["result"] == true {
            c.send(&submit(again, "raw.1", &job, &en2, nonce));
            let r = c.reply(again);
            if r["reject-reason"] != "Stale" {
                assert_reject(&r, 22, "Duplicate");
                checked = true;
                break;
            }
        } else {
            assert_reject(&r, 21, "Stale");
        }
        job = latest_job(&mut c, Some(&job.job_id));
        nonce = grind(&job, &en1, &en2, share_target, Some(net_target));
    }
    assert!(checked, "the job went stale before every attempt");

    // Above target: ask for a huge difficulty, wait for a fresh job, submit an easy hash.
    c.send(&json!({"id": 16, "method": "mining.suggest_difficulty", "params": [1000000]}));
    assert_eq!(c.reply(16)["result"], true);
    let old_job = job;
    let new_block = node.generate(1).pop().unwrap();
    // The job that builds on the block just made (not a refresh of the previous one).
    c.wait_for("a notify on the new block", WAIT, |v| {
        v["method"] == "mining.notify"
            && loadtest::work::Job::from_notify_params(&v["params"])
                .is_ok_and(|j| j.prevhash_rpc() == new_block)
    });
    // The newest job (the honest miner may have found a block on top already, or find one
    // before the share arrives: then it goes again on the next job).
    let mut job = latest_job(&mut c, Some(&old_job.job_id));
    let mut checked = false;
    for id in 200..210u64 {
        let easy = grind(
            &job,
            &en1,
            &en2,
            share_target,
            Some(Difficulty::from_f64(1e6).unwrap().target()),
        );
        c.send(&submit(id, "raw.1", &job, &en2, easy));
        let r = c.reply(id);
        if r["reject-reason"] != "Stale" {
            assert_reject(&r, 23, "Above target");
            checked = true;
            break;
        }
        job = latest_job(&mut c, Some(&job.job_id));
    }
    assert!(checked, "the job went stale before every attempt");

    // Stale: a share for the job before the block we just made.
    let stale_nonce = grind(
        &old_job,
        &en1,
        &[8u8; 8][..n2],
        share_target,
        Some(net_target),
    );
    c.send(&submit(18, "raw.1", &old_job, &[8u8; 8][..n2], stale_nonce));
    assert_reject(&c.reply(18), 21, "Stale");

    // Through all of it the honest miner kept mining and the pool kept running.
    let before = honest.report().accepted;
    wait_until(
        "the honest miner to keep getting shares accepted",
        WAIT,
        || honest.report().accepted > before + 3,
    );
    assert!(pool.is_running());
    let report = honest.stop();
    // The honest miner finds blocks itself (half of all regtest hashes are blocks), so a share
    // in flight when its own block or the test's changes the tip may be stale; nothing else.
    assert!(
        report.reject_reasons.keys().all(|r| r == "Stale") && report.rejected <= 3,
        "{report:?}"
    );
    let log = pool.log_text();
    assert!(
        log.contains("unparseable line") && log.contains("did not authorise in time"),
        "log lacks the bad-client lines"
    );
}

#[test]
fn failover_to_the_second_node_and_back() {
    let Some(exe) = bitcoind_or_skip("failover_to_the_second_node_and_back") else {
        return;
    };
    let mut net = RegtestNet::start(&exe, 3);
    let addr = net.nodes[0].new_address();
    let btcd = vec![btcd_entry(&net.nodes[0]), btcd_entry(&net.nodes[1])];
    let pool = PoolProcess::start(
        "failover",
        &regtest_config(btcd, Some(&addr), free_port()),
        &[],
    );
    assert_eq!(pool.stats()["server"], 0);

    let mut cfg = MinerConfig::new(pool.addr, "failover.1");
    cfg.duration = Some(Duration::from_secs(150));
    cfg.max_shares_per_sec = 10.0;
    let miner = Miner::start(cfg).unwrap();
    wait_until("shares before failover", WAIT, || {
        miner.report().accepted >= 3
    });

    net.nodes[0].stop();
    let t = Instant::now();
    wait_stats(
        &pool,
        "the pool to move to node 1",
        Duration::from_secs(10),
        |s| s["server"] == 1,
    );
    let moved = t.elapsed();
    println!("failover took {moved:?}");
    assert!(moved <= Duration::from_secs(2), "failover took {moved:?}");
    let before = miner.report();
    wait_until("blocks found through node 1", WAIT, || {
        miner.report().blocks_accepted > before.blocks_accepted
    });
    wait_until("node 1 to have the new blocks", WAIT, || {
        net.nodes[1].height() > 1
    });

    net.start_again(0);
    let t = Instant::now();
    wait_stats(
        &pool,
        "the pool to move back to node 0",
        Duration::from_secs(60),
        |s| s["server"] == 0,
    );
    println!("fail-back took {:?} after restart", t.elapsed());
    let before = miner.report().accepted;
    wait_until("shares after fail-back", WAIT, || {
        miner.report().accepted > before + 3
    });
    let report = miner.stop();
    assert!(report.error.is_none(), "{report:?}");
}

#[test]
fn unparseable_config_exits_2_with_a_clear_error() {
    let dir = pool::temp_dir("badconf");
    let cfg = dir.join("bad.conf");
    std::fs::write(&cfg, "{\"btcd\": [ {\"url\": ").unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ckpool-rs"))
        .arg("-c")
        .arg(&cfg)
        .arg("-s")
        .arg(dir.join("sock"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("bad.conf") && err.contains("not valid JSON"),
        "{err}"
    );
    std::fs::write(&cfg, "{\"mindiff\": \"one\"}").unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ckpool-rs"))
        .arg("-c")
        .arg(&cfg)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("mindiff"));
    // A bad handoff, from the file, the flag or the environment.
    std::fs::write(&cfg, "{\"handoff\": \"spin\"}").unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ckpool-rs"))
        .arg("-c")
        .arg(&cfg)
        .env_remove("POOL_HANDOFF")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("handoff"));
    std::fs::write(&cfg, "{}").unwrap();
    for (flags, env) in [(&["--handoff", "spin"][..], None), (&[][..], Some("spin"))] {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_ckpool-rs"));
        cmd.arg("-c").arg(&cfg).args(flags);
        match env {
            Some(v) => cmd.env("POOL_HANDOFF", v),
            None => cmd.env_remove("POOL_HANDOFF"),
        };
        let out = cmd.output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{flags:?} {env:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("handoff spin is not one of"), "{err}");
    }
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn notifier_and_ckpmsg_reach_the_running_pool() {
    let Some(exe) = bitcoind_or_skip("notifier_and_ckpmsg_reach_the_running_pool") else {
        return;
    };
    let net = RegtestNet::start(&exe, 2);
    let node = &net.nodes[0];
    let (_, mut config) = pool_config(node);
    // No ZMQ, polling once an hour, routine refresh every 10 minutes: only the notifier can
    // tell the pool about a new block within the deadline below.
    config["blockpoll"] = json!(3_600_000);
    config["update_interval"] = json!(600);
    let pool = PoolProcess::start("notifier", &config, &[]);
    let mut c = Client::connect(pool.addr);
    c.login("watcher");
    let first = latest_job(&mut c, None);

    let hash = node.generate(1).pop().unwrap();
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_notifier"))
        .arg("-s")
        .arg(&pool.sockdir)
        .arg(&hash)
        .status()
        .unwrap();
    assert!(status.success());
    let job = latest_job(&mut c, Some(&first.job_id));
    assert_eq!(job.prevhash_rpc(), hash);
    assert!(job.clean);

    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ckpmsg"))
        .arg("-s")
        .arg(&pool.sockdir)
        .args(["ping", "stats", "bogus"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[0], "pong");
    let stats: Value = serde_json::from_str(lines[1]).unwrap();
    assert_eq!(stats["clients"], 1);
    // POOL_HANDOFF reaches the pool (the suite can be rerun with the queue handoff).
    let handoff = std::env::var("POOL_HANDOFF").unwrap_or_else(|_| "inline".into());
    assert_eq!(stats["handoff"], handoff.as_str());
    assert_eq!(lines[2], "unknown");
}

#[test]
fn plain_and_version_rolling_miners_both_mine_blocks() {
    let Some(exe) = bitcoind_or_skip("plain_and_version_rolling_miners_both_mine_blocks") else {
        return;
    };
    let net = RegtestNet::start(&exe, 2);
    let node = &net.nodes[0];
    let (_, config) = pool_config(node);
    let pool = PoolProcess::start("compat", &config, &[]);

    // cpuminer style: subscribe, authorize, submit; no configure, no version bits.
    let plain = mine_blocks(&pool, "cpuminer.1", 2);
    assert!(plain.blocks_accepted >= 2, "{plain:?}");
    assert_eq!(plain.version_mask, None);
    // Let the pool move past the last block before the next miner starts, so it does not start
    // on a job whose block was just found (on regtest that would race for the same height).
    // (The miner stops on the pool's reply; the block reaches the node a moment later.)
    wait_stats(
        &pool,
        "the pool's job to build on the node's tip",
        WAIT,
        |s| s["job"][1].as_u64() == Some(node.height() + 1),
    );

    // A version-rolling client (BIP310 configure, asks for the whole mask).
    let mut cfg = MinerConfig::new(pool.addr, "asic.1");
    cfg.version_rolling = Some(0xffff_ffff);
    cfg.stop_after_blocks = Some(2);
    cfg.duration = Some(Duration::from_secs(150));
    let rolling = Miner::start(cfg).unwrap().wait(Duration::from_secs(180));
    assert!(rolling.blocks_accepted >= 2, "{rolling:?}");
    assert_eq!(
        rolling.version_mask,
        Some(0x1fff_e000),
        "configure must answer the intersection"
    );
    for report in [&plain, &rolling] {
        // Only shares racing a new block may be refused.
        assert!(
            report.reject_reasons.keys().all(|r| r == "Stale"),
            "{report:?}"
        );
    }

    // Every block both miners found reached the node and is valid there; on regtest two solutions
    // for one height can race, so each miner needs at least one in the best chain.
    let mut rolled_any = false;
    for report in [&plain, &rolling] {
        let mut in_chain = 0;
        for hash in &report.block_hashes {
            wait_until("the block to reach the node", WAIT, || {
                node.try_rpc("getblockheader", json!([hash])).is_ok()
            });
            let block = decode_block(node, hash);
            assert!(block.check_merkle_root());
            rolled_any |= block.header.version.to_consensus() & 0x1fff_e000 != 0;
            in_chain += usize::from(in_main_chain(node, hash));
        }
        assert!(
            in_chain >= 1,
            "no block of {:?} in the best chain",
            report.block_hashes
        );
    }
    println!("blocks with rolled version bits among them: {rolled_any}");
}

#[test]
fn io_uring_refused_falls_back_to_epoll_and_serves_miners() {
    let Some(exe) = bitcoind_or_skip("io_uring_refused_falls_back_to_epoll_and_serves_miners")
    else {
        return;
    };
    let net = RegtestNet::start(&exe, 2);
    let node = &net.nodes[0];
    let (addr, config) = pool_config(node);
    // The probe fails as when seccomp or kernel.io_uring_disabled refuses io_uring.
    let pool = PoolProcess::start_with_env(
        "fallback",
        &config,
        &["--io", "auto"],
        &[("CKPOOL_IO_URING_DISABLE", "1")],
    );
    assert_eq!(pool.stats()["io"], "epoll");
    let report = mine_blocks(&pool, "fallback.1", 1);
    assert!(
        report.blocks_accepted >= 1 && report.rejected == 0,
        "{report:?}"
    );
    assert!(
        pool.log_text().contains("io_uring"),
        "the fallback reason is logged"
    );
    drop(pool);

    // Where the kernel allows it, auto picks io_uring (unless the run forces epoll).
    if std::env::var("POOL_BACKEND").as_deref() != Ok("epoll") && connector::probe_uring().is_ok() {
        let config = regtest_config(vec![btcd_entry(node)], Some(&addr), free_port());
        let pool = PoolProcess::start("uring", &config, &[]);
        assert_eq!(pool.stats()["io"], "uring");
        let report = mine_blocks(&pool, "uring.1", 1);
        assert!(
            report.blocks_accepted >= 1 && report.rejected == 0,
            "{report:?}"
        );
    }
}

#[test]
fn queue_handoff_serves_miners_and_drops_bad_clients() {
    let Some(exe) = bitcoind_or_skip("queue_handoff_serves_miners_and_drops_bad_clients") else {
        return;
    };
    let net = RegtestNet::start(&exe, 2);
    let node = &net.nodes[0];
    let (addr, config) = pool_config(node);
    // The flag wins over POOL_HANDOFF, so this runs the queue variant in every suite run.
    let pool = PoolProcess::start("queue", &config, &["--handoff", "queue"]);
    assert_eq!(pool.stats()["handoff"], "queue");
    assert!(
        pool.log_text().contains("stratifier handoff"),
        "the handoff is logged at start"
    );

    // A raw client: subscribe, authorise, a notify, an accepted share, a duplicate refused.
    let mut c = Client::connect(pool.addr);
    let (en1, n2) = c.login("queue.raw");
    let en1 = hex::decode(en1).unwrap();
    let job = latest_job(&mut c, None);
    let en2 = vec![5u8; n2];
    let nonce = grind(
        &job,
        &en1,
        &en2,
        Difficulty::MIN.target(),
        Some(Target::from_compact(job.nbits)),
    );
    c.send(&submit(10, "queue.raw", &job, &en2, nonce));
    assert_eq!(c.reply(10)["result"], true);
    c.send(&submit(11, "queue.raw", &job, &en2, nonce));
    assert_reject(&c.reply(11), 22, "Duplicate");

    // A miner finds a block and the node takes it.
    let h0 = node.height();
    let report = mine_blocks(&pool, "queue.1", 1);
    assert!(
        report.blocks_accepted >= 1 && report.accepted >= 1 && report.rejected == 0,
        "{report:?}"
    );
    let hash = report.block_hashes.last().unwrap();
    wait_until("the block to reach the node", WAIT, || {
        node.try_rpc("getblockheader", json!([hash])).is_ok()
    });
    assert!(node.height() > h0);
    let block = decode_block(node, hash);
    assert!(block.check_merkle_root());
    assert_eq!(
        block.txdata[0].output[0].script_pubkey.as_bytes(),
        &script_for_address(&addr, Network::Regtest).unwrap()[..],
    );

    // An honest miner keeps mining while a client sends a malformed line. It starts once the
    // pool's job builds on the block just found, so its shares do not race that block.
    wait_stats(
        &pool,
        "the pool's job to build on the node's tip",
        WAIT,
        |s| s["job"][1].as_u64() == Some(node.height() + 1),
    );
    let honest = start_honest_miner(pool.addr, "queue.honest");
    let mut garbage = Client::connect(pool.addr);
    // The valid request after the malformed line (same write, so the same batch) is not answered:
    // the stratifier thread drops a connection's input once it has closed it.
    garbage.send_raw(
        b"GET / HTTP/1.1\r\n{\"id\": 1, \"method\": \"mining.subscribe\", \"params\": []}\n",
    );
    assert!(garbage.wait_closed(WAIT), "garbage client not disconnected");
    assert_eq!(garbage.seen.len(), 1, "{:?}", garbage.seen);
    assert_eq!(garbage.seen[0]["error"][0], 20, "{:?}", garbage.seen);
    let before = honest.report().accepted;
    wait_until(
        "the honest miner to keep getting shares accepted",
        WAIT,
        || honest.report().accepted > before + 3,
    );
    let report = honest.stop();
    // Only a share racing a block the honest miner found itself may be refused.
    assert!(
        report.reject_reasons.keys().all(|r| r == "Stale"),
        "{report:?}"
    );
    // The raw client's session is still served too.
    c.send(&json!({"id": 12, "method": "mining.suggest_difficulty", "params": [1]}));
    assert_eq!(c.reply(12)["result"], true);
    assert!(pool.log_text().contains("unparseable line"));
}

/// SIGTERM right after the pool answered the share that solved a block: the pool still hands the
/// block to the node (the generator's shutdown submits what is queued), joins its threads,
/// removes its pid file and admin socket, and exits 0 within 5 s.
#[test]
fn sigterm_right_after_a_block_still_submits_it_and_exits_0() {
    let Some(exe) = bitcoind_or_skip("sigterm_right_after_a_block_still_submits_it_and_exits_0")
    else {
        return;
    };
    let net = RegtestNet::start(&exe, 2);
    let node = &net.nodes[0];
    let (addr, mut config) = pool_config(node);
    config["statsupdate"] = json!(3600);
    let mut pool = PoolProcess::start("sigterm", &config, &["-L"]);
    let tip = node.rpc("getbestblockhash", json!([]));

    let mut c = Client::connect(pool.addr);
    let (en1, n2) = c.login("sigterm.1");
    let en1 = hex::decode(en1).unwrap();
    let job = latest_job(&mut c, None);
    assert_eq!(json!(job.prevhash_rpc()), tip, "the job builds on the tip");
    let en2 = vec![9u8; n2];
    let nonce = grind(&job, &en1, &en2, Target::from_compact(job.nbits), None);
    let mut hash = job.share_hash(&en1, &en2, job.version, nonce);
    hash.reverse();
    let hash = hex::encode(hash);

    c.send(&submit(10, "sigterm.1", &job, &en2, nonce));
    assert_eq!(c.reply(10)["result"], true);
    pool.signal(libc::SIGTERM);
    let t = Instant::now();
    let status = pool.wait_exit(Duration::from_secs(5));
    let took = t.elapsed();
    let status = status.unwrap_or_else(|| panic!("the pool still runs 5 s after SIGTERM"));
    assert_eq!(status.code(), Some(0), "exit status {status}");
    println!("the pool exited {took:?} after SIGTERM");

    // The node has the block, as its best block, paying the pool.
    assert_eq!(node.rpc("getbestblockhash", json!([])), json!(hash));
    let block = decode_block(node, &hash);
    assert_eq!(
        block.txdata[0].output[0].script_pubkey.as_bytes(),
        &script_for_address(&addr, Network::Regtest).unwrap()[..],
    );
    // It cleaned up after itself and flushed its logs.
    assert!(!pool.sockdir.join("main.pid").exists(), "pid file left");
    assert!(!pool.sockdir.join("listener").exists(), "admin socket left");
    let log = pool.log_text();
    assert!(log.contains("shutdown complete"), "{log}");
    let status_file = std::fs::read_to_string(pool.dir.join("logs/pool/pool.status")).unwrap();
    assert!(
        status_file.lines().count() == 3,
        "pool.status written at shutdown: {status_file}"
    );
    let height_dir = pool.dir.join(format!("logs/{:08x}", node.height()));
    let shares: usize = std::fs::read_dir(&height_dir)
        .unwrap_or_else(|e| panic!("{}: {e}", height_dir.display()))
        .map(|f| std::fs::read_to_string(f.unwrap().path()).unwrap())
        .map(|text| text.lines().filter(|l| l.contains(&hash)).count())
        .sum();
    assert_eq!(shares, 1, "the block's share is in the share log");
}

/// Every mode flag, and the binary run as ckproxy, ckpassthrough, cknode or ckredirector, reads
/// its own config file and checks it before starting anything: exit 2 naming what is wrong.
#[test]
fn each_mode_reads_and_checks_its_own_config() {
    let dir = pool::temp_dir("modes");
    let exe = std::path::Path::new(env!("CARGO_BIN_EXE_ckpool-rs"));
    let run = |program: &std::path::Path, flags: &[&str]| {
        let out = std::process::Command::new(program)
            .args(flags)
            .arg("-s")
            .arg(dir.join("sock"))
            .current_dir(&dir)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    // Passthrough mode is implemented: it goes on to read its config (absent here), and one
    // without a "proxy" entry is refused, exit 2.
    let (code, err) = run(exe, &["-P"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("cannot read config ckpassthrough.conf"),
        "{err}"
    );
    std::fs::write(
        dir.join("ckpassthrough.conf"),
        r#"{"serverurl": "127.0.0.1:0"}"#,
    )
    .unwrap();
    let link = dir.join("ckpassthrough");
    std::os::unix::fs::symlink(exe, &link).unwrap();
    let (code, err) = run(&link, &[]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("\"proxy\" entry"), "{err}");
    // Redirector mode is implemented (`-R` or the binary named ckredirector): it reads
    // ckredirector.conf and needs "redirecturl" entries that resolve.
    let (code, err) = run(exe, &["-R"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("cannot read config ckredirector.conf"),
        "{err}"
    );
    let link = dir.join("ckredirector");
    std::os::unix::fs::symlink(exe, &link).unwrap();
    for (redirect, want) in [
        (json!([]), "\"redirecturl\" entry"),
        (json!(["no.such.host.invalid:3333"]), "does not resolve"),
        (json!(["127.0.0.1"]), "not host:port"),
    ] {
        let conf = json!({"serverurl": "127.0.0.1:0", "redirecturl": redirect,
            "proxy": [{"url": "127.0.0.1:1", "auth": "a", "pass": "x"}]});
        std::fs::write(dir.join("ckredirector.conf"), conf.to_string()).unwrap();
        let (code, err) = run(&link, &[]);
        assert_eq!(code, Some(2), "{redirect}: {err}");
        assert!(err.contains(want), "{redirect}: {err}");
    }
    // Node mode is implemented: -N reads cknode.conf, and cknode without a "proxy" entry exits 2 before
    // it starts anything.
    let (code, err) = run(exe, &["-N"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("cannot read config cknode.conf"), "{err}");
    std::fs::write(dir.join("cknode.conf"), r#"{"serverurl": "127.0.0.1:0"}"#).unwrap();
    let link = dir.join("cknode");
    std::os::unix::fs::symlink(exe, &link).unwrap();
    let (code, err) = run(&link, &[]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("\"proxy\" entry"), "{err}");
    // Two mode flags, or solo with a proxy mode, are refused too.
    for flags in [&["-p", "-P"][..], &["-B", "-p"][..]] {
        let (code, err) = run(exe, flags);
        assert_eq!(code, Some(2), "{flags:?}: {err}");
    }
    // Proxy and userproxy mode are implemented: they go on to read their config (absent here).
    for flag in ["-p", "-u"] {
        let (code, err) = run(exe, &[flag]);
        assert_eq!(code, Some(2), "{flag}: {err}");
        assert!(
            err.contains("cannot read config ckproxy.conf"),
            "{flag}: {err}"
        );
    }
    // Without a mode flag, the plain binary goes on to read its config (absent here).
    let (code, err) = run(exe, &[]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("cannot read config ckpool.conf"), "{err}");
    let _ = std::fs::remove_dir_all(dir);
}

/// As above, but bitcoind cannot be reached for the block at first: the generator is still
/// retrying it when SIGTERM arrives, and an admin client is connected and silent (as a stuck
/// monitoring script would be). The pool keeps at the block until the node has it (here: after
/// four refusals, about 350 ms of retries), and only then exits, 0, within 5 s.
#[test]
fn sigterm_while_the_block_is_being_retried_waits_for_it() {
    let Some(exe) = bitcoind_or_skip("sigterm_while_the_block_is_being_retried_waits_for_it")
    else {
        return;
    };
    let net = RegtestNet::start(&exe, 2);
    let node = &net.nodes[0];
    let proxy = rpc_proxy::RpcProxy::start(
        node.rpc_url()
            .trim_start_matches("http://")
            .trim_end_matches('/'),
        true,
    );
    let addr = node.new_address();
    let btcd =
        json!({"url": proxy.addr.to_string(), "auth": node.rpc_user(), "pass": node.rpc_pass()});
    let config = regtest_config(vec![btcd], Some(&addr), free_port());
    let mut pool = PoolProcess::start("sigtermretry", &config, &[]);
    // A silent admin client, holding the admin thread in its request read.
    let _silent = std::os::unix::net::UnixStream::connect(pool.sockdir.join("listener")).unwrap();
    wait_until("the admin thread to take the silent client", WAIT, || {
        pool.log_text().contains("admin client connected")
    });

    let mut c = Client::connect(pool.addr);
    let (en1, n2) = c.login("retry.1");
    let en1 = hex::decode(en1).unwrap();
    let job = latest_job(&mut c, None);
    let en2 = vec![4u8; n2];
    let nonce = grind(&job, &en1, &en2, Target::from_compact(job.nbits), None);
    let mut hash = job.share_hash(&en1, &en2, job.version, nonce);
    hash.reverse();
    let hash = hex::encode(hash);

    c.send(&submit(10, "retry.1", &job, &en2, nonce));
    assert_eq!(c.reply(10)["result"], true);
    pool.signal(libc::SIGTERM);
    let t = Instant::now();
    // Four refused attempts while the pool shuts down: it is still trying, it has not exited.
    wait_until(
        "four refused submissions (the pool gave up on the block?)",
        Duration::from_secs(4),
        || proxy.refused() >= 4,
    );
    proxy.set_refuse(false);
    let status = pool.wait_exit(Duration::from_secs(5).saturating_sub(t.elapsed()));
    let took = t.elapsed();
    let status = status.unwrap_or_else(|| panic!("the pool still runs 5 s after SIGTERM"));
    assert_eq!(status.code(), Some(0), "exit status {status}");
    let refusals: Vec<Duration> = proxy
        .refusals()
        .iter()
        .map(|r| r.saturating_duration_since(t))
        .collect();
    println!("the pool exited {took:?} after SIGTERM; refusals at {refusals:?}");
    assert_eq!(node.rpc("getbestblockhash", json!([])), json!(hash));
}

/// SIGINT stops the pool as SIGTERM does: miners are disconnected, the pid file and the admin
/// socket are removed, and it exits 0 within 5 s.
#[test]
fn sigint_disconnects_miners_and_exits_0() {
    let Some(exe) = bitcoind_or_skip("sigint_disconnects_miners_and_exits_0") else {
        return;
    };
    let net = RegtestNet::start(&exe, 2);
    let (_, config) = pool_config(&net.nodes[0]);
    let mut pool = PoolProcess::start("sigint", &config, &[]);
    assert!(pool.sockdir.join("main.pid").exists());
    let mut c = Client::connect(pool.addr);
    c.login("sigint.1");
    pool.signal(libc::SIGINT);
    let status = pool
        .wait_exit(Duration::from_secs(5))
        .unwrap_or_else(|| panic!("the pool still runs 5 s after SIGINT"));
    assert_eq!(status.code(), Some(0), "exit status {status}");
    assert!(c.wait_closed(WAIT), "the miner was not disconnected");
    assert!(!pool.sockdir.join("main.pid").exists(), "pid file left");
    assert!(!pool.sockdir.join("listener").exists(), "admin socket left");
    assert!(pool.log_text().contains("shutdown complete"));
}
