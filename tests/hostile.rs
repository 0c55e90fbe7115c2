//! Hostile clients against the real binary on a regtest node, while an honest miner mines beside
//! them: a flood of throw-away usernames, a sweep of session ids from another address, and a
//! flood of invalid shares. Without a node these print "skipped" (locally) or fail (in CI).
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

use std::net::SocketAddr;
use std::time::Duration;

use loadtest::{Miner, MinerConfig};
use node::{RegtestNet, WAIT, bitcoind_or_skip, wait_until};
use pool::{Client, PoolProcess, btcd_entry, free_port, regtest_config, wait_stats};
use serde_json::{Value, json};

/// A miner that sends 10 shares/s and pauses at a block, once it has had 3 shares accepted.
fn start_honest_miner(addr: SocketAddr, user: &str) -> Miner {
    let mut cfg = MinerConfig::new(addr, user);
    cfg.duration = Some(Duration::from_secs(150));
    cfg.max_shares_per_sec = 10.0;
    cfg.pause_after_block = true;
    let honest = Miner::start(cfg).unwrap();
    wait_until("the honest miner to get shares accepted", WAIT, || {
        honest.report().accepted >= 3
    });
    honest
}

/// Subscribes, resuming `session` if given: (session id, extranonce1).
fn subscribe(c: &mut Client, session: Option<&str>) -> (String, String) {
    let params = match session {
        Some(s) => json!(["raw-test/1", s]),
        None => json!(["raw-test/1"]),
    };
    c.send(&json!({"id": 1, "method": "mining.subscribe", "params": params}));
    let r = c.reply(1);
    (
        r["result"][0][0][1].as_str().unwrap().to_owned(),
        r["result"][1].as_str().unwrap().to_owned(),
    )
}

/// A share with a job id that never exists.
fn bad_share(id: u64, user: &str) -> Value {
    json!({"id": id, "method": "mining.submit",
        "params": [user, "ffffffffffffffff", "0000000000000000", "00000000", "00000000"]})
}

fn user_names(stats: &Value) -> Vec<String> {
    stats["users"]
        .as_object()
        .map(|u| u.keys().cloned().collect())
        .unwrap_or_default()
}

#[test]
fn an_honest_miner_keeps_mining_beside_hostile_clients() {
    let Some(exe) = bitcoind_or_skip("an_honest_miner_keeps_mining_beside_hostile_clients") else {
        return;
    };
    let net = RegtestNet::start(&exe, 2);
    let node = &net.nodes[0];
    let payout = node.new_address();
    let (v4, v6) = (free_port(), free_port());
    let mut config = regtest_config(vec![btcd_entry(node)], Some(&payout), v4);
    // Two listeners: clients on the IPv6 one come from another address (::1).
    config["serverurl"] = json!([format!("127.0.0.1:{v4}"), format!("[::1]:{v6}")]);
    config["maxinvalidshares"] = json!(20);
    config["maxusersperip"] = json!(50);
    let mut pool = PoolProcess::start("hostile", &config, &[]);
    let other_addr: SocketAddr = format!("[::1]:{v6}").parse().unwrap();

    let honest = start_honest_miner(pool.addr, "honest.1");
    let accepted_at_start = honest.report().accepted;

    // 1. A session-id sweep from another address takes nothing. The victim subscribes,
    // authorises (only authorised sessions are kept for resume) and leaves; once the pool has
    // parked its session, the attacker (on ::1) tries its exact id and its neighbours, each
    // more than once.
    let mut victim = Client::connect(pool.addr);
    let (sid, en1) = subscribe(&mut victim, None);
    victim.send(&json!({"id": 2, "method": "mining.authorize", "params": ["victim.1", "x"]}));
    assert_eq!(victim.reply(2)["result"], true);
    drop(victim);
    wait_stats(&pool, "the victim's session to be parked", WAIT, |s| {
        s["disconnected"].as_u64().unwrap_or(0) >= 1
    });
    let id = u32::from_str_radix(&sid, 16).unwrap();
    for guess in [id, id, id.wrapping_sub(1), id.wrapping_add(1), id ^ 1] {
        let mut attacker = Client::connect(other_addr);
        let (_, got) = subscribe(&mut attacker, Some(&format!("{guess:08x}")));
        assert_ne!(got, en1, "the victim's extranonce1 went to another address");
    }
    // The victim, back from its own address, resumes its session.
    let mut victim = Client::connect(pool.addr);
    assert_eq!(
        subscribe(&mut victim, Some(&sid)),
        (sid.clone(), en1.clone())
    );
    drop(victim);

    // 2. 300 throw-away usernames, one bad share each, then gone: the stats are back to the
    // honest user alone.
    for i in 0..300u64 {
        let mut c = Client::connect(pool.addr);
        let user = format!("junk{i}");
        c.login(&user);
        c.send(&bad_share(3, &user));
        assert_eq!(c.reply(3)["reject-reason"], "Invalid JobID");
    }
    let stats = wait_stats(&pool, "the throw-away users to be forgotten", WAIT, |s| {
        user_names(s) == ["honest"]
    });
    assert!(stats["rejected"].as_u64().unwrap() >= 300, "{stats}");

    // 3. A flood of invalid shares: slowed (refused unchecked), then dropped.
    let mut flooder = Client::connect(pool.addr);
    flooder.login("flooder");
    for id in 10..60u64 {
        flooder.send(&bad_share(id, "flooder"));
    }
    assert!(flooder.wait_closed(WAIT), "the flooder was not dropped");
    let reasons: Vec<&str> = flooder
        .seen
        .iter()
        .filter_map(|v| v["reject-reason"].as_str())
        .collect();
    assert!(
        reasons.contains(&"Invalid JobID") && reasons.contains(&"Too many invalid shares"),
        "{reasons:?}"
    );
    // The first 10 (half the limit) were checked.
    assert_eq!(
        reasons
            .iter()
            .take(10)
            .filter(|r| **r == "Invalid JobID")
            .count(),
        10,
        "{reasons:?}"
    );

    // Through all of it the honest miner kept mining and the pool kept running.
    let before = honest.report().accepted;
    wait_until(
        "the honest miner to keep getting shares accepted",
        WAIT,
        || honest.report().accepted > before + 3,
    );
    assert!(honest.report().accepted > accepted_at_start);
    assert!(pool.is_running());
    let report = honest.stop();
    assert!(
        report.reject_reasons.keys().all(|r| r == "Stale") && report.rejected <= 3,
        "{report:?}"
    );
    assert!(
        pool.log_text().contains("too many invalid shares in a row"),
        "the drop is not in the log"
    );
}
