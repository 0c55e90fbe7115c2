//! New blocks reach miners through ZMQ `hashblock`, fast. Its own test binary, so nothing else
//! runs beside it while it measures.
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

use node::{RegtestNet, bitcoind_or_skip};
use pool::{Client, PoolProcess, btcd_entry, free_port, regtest_config};
use serde_json::json;

#[test]
fn new_block_reaches_miners_within_100ms_through_zmq() {
    let Some(exe) = bitcoind_or_skip("new_block_reaches_miners_within_100ms_through_zmq") else {
        return;
    };
    let net = RegtestNet::start(&exe, 2);
    let node = &net.nodes[0];
    let addr = node.new_address();
    let mut config = regtest_config(vec![btcd_entry(node)], Some(&addr), free_port());
    // Polling every hour: only ZMQ can tell the pool about the block in time.
    config["blockpoll"] = json!(3_600_000);
    config["zmqblock"] = json!(node.zmq_endpoint().expect("node 0 publishes ZMQ"));
    let pool = PoolProcess::start("zmq", &config, &[]);
    let mut c = Client::connect(pool.addr);
    c.login("watcher");
    c.wait_for("the first job", node::WAIT, |v| {
        v["method"] == "mining.notify"
    });

    let mut latencies = Vec::new();
    for round in 0..5 {
        // The clock starts before the block is made, so the figure is an upper bound.
        let t0 = Instant::now();
        let hash = node.generate(1).pop().unwrap();
        let generated = t0.elapsed();
        let mut want = common::template::parse_rpc_hash(&hash).unwrap();
        for w in want.chunks_exact_mut(4) {
            w.reverse();
        }
        let want = hex::encode(want);
        c.wait_for(
            &format!("notify for block {hash}"),
            Duration::from_secs(5),
            |v| {
                v["method"] == "mining.notify"
                    && v["params"][1] == want.as_str()
                    && v["params"][8] == true
            },
        );
        let dt = t0.elapsed();
        println!(
            "round {round}: new block to clean notify in {dt:?} (generate RPC took {generated:?})"
        );
        latencies.push(dt);
    }
    latencies.sort();
    println!("latencies {latencies:?}");
    assert!(
        latencies[latencies.len() - 1] < Duration::from_millis(100),
        "slowest {:?}",
        latencies.last()
    );
    assert!(pool.log_text().contains("new job"));
}
