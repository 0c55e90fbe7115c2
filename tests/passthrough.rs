//! ckpool's passthrough protocol against the real binary on a regtest node: the pool side
//! (`passthroughserver`) replaying the lines a real ckpool 0.9.9 passthrough sent, refusals on
//! ordinary listeners, and passthrough mode (`-P`) in front of a ckpool-rs pool with miners
//! behind it. Without a node these print "skipped" (locally) or fail (in CI).
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

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::time::Duration;

use node::{RegtestNet, RegtestNode, WAIT, bitcoind_or_skip, wait_until};
use pool::{Client, PoolProcess, btcd_entry, free_port, regtest_config, wait_stats};
use serde_json::{Value, json};

const CAPTURE: &str = include_str!("../common/tests/data/ckpool-0.9.9-passthrough-link.jsonl");

/// The capture's lines in one direction, as sent.
fn capture(dir: &str) -> Vec<String> {
    CAPTURE
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["dir"] == dir)
        .map(|v| v["line"].as_str().unwrap().to_owned())
        .collect()
}

fn keys(v: &Value) -> BTreeSet<String> {
    v.as_object()
        .map(|o| o.keys().cloned().collect())
        .unwrap_or_default()
}

/// A pool with an ordinary listener and a `passthroughserver` listener.
fn pool_with_passthrough_port(
    node: &RegtestNode,
    tag: &str,
    extra: &Value,
) -> (PoolProcess, SocketAddr) {
    let payout = node.new_address();
    let (direct, link) = (free_port(), free_port());
    let mut config = regtest_config(vec![btcd_entry(node)], Some(&payout), direct);
    config["passthroughserver"] = json!([format!("127.0.0.1:{link}")]);
    if let Some(o) = extra.as_object() {
        for (k, v) in o {
            config[k] = v.clone();
        }
    }
    let pool = PoolProcess::start(tag, &config, &[]);
    (pool, SocketAddr::from(([127, 0, 0, 1], link)))
}

/// Reads lines from a link until `pred` holds for one; returns it.
fn link_wait(c: &mut Client, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
    c.wait_for(what, WAIT, pred)
}

#[test]
fn pool_side_speaks_ckpool_passthrough_framing() {
    let Some(exe) = bitcoind_or_skip("pool_side_speaks_ckpool_passthrough_framing") else {
        return;
    };
    let net = RegtestNet::start(&exe, 2);
    let node = &net.nodes[0];
    let (pool, link_addr) =
        pool_with_passthrough_port(node, "pt-pool-side", &json!({"authtimeout": 2}));
    let to_pool = capture("to_pool");
    let to_pt = capture("to_passthrough");

    // (c) On the ordinary listener the handshake is refused with a stratum error, and so is
    // mining.node on the passthrough listener; both stay ordinary connections.
    let mut plain = Client::connect(pool.addr);
    plain.send_raw(format!("{}\n", to_pool[0]).as_bytes());
    plain.send(&json!({"id": 5, "method": "mining.configure", "params": [[], {}]}));
    let refused = plain.wait_for("a refusal", WAIT, |v| {
        v.get("error").is_some_and(|e| !e.is_null())
    });
    assert!(
        refused.get("result").is_none_or(|r| r != &json!(true)),
        "{refused}"
    );
    assert!(
        plain.reply(5)["result"].is_object(),
        "still an ordinary client"
    );
    let mut node_try = Client::connect(link_addr);
    node_try.send_raw(b"{\"method\": \"mining.node\", \"params\": [\"ckpool\\/0.9.9\"]}\n");
    let refused = node_try.wait_for("a refusal", WAIT, |v| {
        v.get("error").is_some_and(|e| !e.is_null())
    });
    assert_ne!(refused.get("result"), Some(&json!(true)), "{refused}");
    // (authtimeout is 2 s here, for client 77 below)
    plain.login("direct");
    node_try.login("nodetry");

    // (d) The capture's pool-bound lines on the passthrough listener. The handshake gets
    // ckpool's exact bytes.
    let mut link = Client::connect(link_addr);
    link.send_raw(format!("{}\n", to_pool[0]).as_bytes());
    let mut raw = String::new();
    {
        use std::io::BufRead;
        let mut r = std::io::BufReader::new(link.stream.try_clone().unwrap());
        link.stream.set_read_timeout(Some(WAIT)).unwrap();
        r.read_line(&mut raw).unwrap();
        link.stream
            .set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
    }
    assert_eq!(raw, "{\"result\":true}\n");

    // The miners' lines, submits rewritten onto our jobs (every hash is a share here).
    let mut jobs: HashMap<u64, (String, String, usize)> = HashMap::new();
    let mut submitted = 0;
    for line in &to_pool[1..] {
        let mut v: Value = serde_json::from_str(line).unwrap();
        let cid = v["client_id"].as_u64().unwrap();
        if v["method"] == "mining.submit" {
            let (job, ntime, n2) = match jobs.get(&cid) {
                Some(j) => j.clone(),
                None => {
                    let n = link_wait(&mut link, "a notify", |m| {
                        m["client_id"] == cid && m["method"] == "mining.notify"
                    });
                    let s = link_wait(&mut link, "a subscribe result", |m| {
                        m["client_id"] == cid && m["node.method"] == "subscribe.result"
                    });
                    let j = (
                        n["params"][0].as_str().unwrap().to_owned(),
                        n["params"][7].as_str().unwrap().to_owned(),
                        s["result"][2].as_u64().unwrap() as usize,
                    );
                    jobs.insert(cid, j.clone());
                    j
                }
            };
            v["params"][1] = json!(job);
            v["params"][2] = json!(format!("{:0w$x}", submitted + 1, w = n2 * 2));
            v["params"][3] = json!(ntime);
            submitted += 1;
        }
        link.send(&v);
    }
    assert!(submitted >= 2, "the capture has submits");
    // Every kind of line ckpool sent has its counterpart with the same members, for a client.
    let mut kinds: HashMap<String, BTreeSet<String>> = HashMap::new();
    for l in &to_pt[1..] {
        let v: Value = serde_json::from_str(l).unwrap();
        kinds.insert(v["node.method"].as_str().unwrap().to_owned(), keys(&v));
    }
    for (kind, want) in &kinds {
        let got = link_wait(&mut link, kind, |m| m["node.method"] == kind.as_str());
        assert_eq!(&keys(&got), want, "{kind}: {got}");
        assert!(got["client_id"].is_u64(), "{got}");
    }
    let share = link_wait(&mut link, "an accepted share", |m| {
        m["node.method"] == "share.result" && m["result"] == true
    });
    assert_eq!(share["error"], Value::Null);

    // The sub-clients are users in the pool's stats, with the address the passthrough gave.
    wait_stats(&pool, "the capture's users", WAIT, |s| {
        s["users"].get("bench").is_some() && s["accepted"].as_u64().unwrap_or(0) >= 1
    });
    link.send(
        &json!({"id": 1, "method": "mining.subscribe", "params": ["x/1"],
        "client_id": 77, "address": "10.9.8.7", "server": 0}),
    );
    link_wait(&mut link, "client 77's subscribe result", |m| {
        m["client_id"] == 77 && m["node.method"] == "subscribe.result"
    });
    // (the log is written by a thread of its own)
    wait_until("an 'address via peer' line for 10.9.8.7", WAIT, || {
        pool.log_text()
            .lines()
            .any(|l| l.contains("address via peer") && l.contains("10.9.8.7"))
    });
    // Client 77 never authorises: the pool drops it with ckpool's raw `dropclient=77`.
    let drop = link_wait(&mut link, "dropclient=77", |m| {
        m.as_str().is_some_and(|s| s.trim_end() == "dropclient=77")
    });
    assert!(drop.is_string());

    // The capture ended with mining.term for its three miners: those sessions are gone, the
    // pool keeps the direct clients, and a new sub-client works. Closing the link ends it.
    link.send(
        &json!({"id": 1, "method": "mining.subscribe", "params": ["x/1"],
        "client_id": 88, "address": "10.9.8.8", "server": 0}),
    );
    link.send(
        &json!({"id": 2, "method": "mining.authorize", "params": ["late.w", "x"],
        "client_id": 88, "address": "10.9.8.8", "server": 0}),
    );
    link_wait(&mut link, "client 88's authorisation", |m| {
        m["client_id"] == 88 && m["node.method"] == "auth.result" && m["result"] == true
    });
    wait_stats(&pool, "two direct clients and one sub-client", WAIT, |s| {
        s["clients"].as_u64() == Some(3)
    });
    drop_link(link);
    wait_stats(&pool, "the link's sub-client to end", WAIT, |s| {
        s["clients"].as_u64() == Some(2)
    });
    plain.send(&json!({"id": 6, "method": "mining.configure", "params": [[], {}]}));
    assert!(plain.reply(6)["result"].is_object());
    wait_until("the link's close in the log", WAIT, || {
        pool.log_text().contains("passthrough disconnected")
    });
}

fn drop_link(link: Client) {
    let _ = link.stream.shutdown(std::net::Shutdown::Both);
    drop(link);
}
