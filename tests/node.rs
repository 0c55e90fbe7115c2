//! ckpool's node protocol (ckpool.md §5.3) against the real binary on a regtest node: the pool
//! side (`nodeserver`): the handshake only on those addresses, the current job's transactions
//! and workinfo at once, a new job's new transactions then its workinfo, and a block found by a
//! node's miner sent back to the node links as a `block` message. Without a node these print
//! "skipped" (locally) or fail (in CI).
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

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::Target;
use common::stratum::node::{WorkInfo, parse_transactions};
use node::{RegtestNet, RegtestNode, WAIT, bitcoind_or_skip, wait_until};
use pool::{Client, PoolProcess, btcd_entry, free_port, regtest_config, wait_stats};
use serde_json::{Value, json};

/// ckpool 0.9.9's node handshake, as its node sends it.
const NODE_HANDSHAKE: &[u8] = b"{\"method\": \"mining.node\", \"params\": [\"ckpool\\/0.9.9\"]}\n";

/// Coins to spend: 101 blocks to the node's wallet.
fn fund(node: &RegtestNode) {
    node.generate(101);
}

fn send_tx(node: &RegtestNode) -> String {
    let to = node.new_address();
    node.rpc("sendtoaddress", json!([to, 1.0]))
        .as_str()
        .unwrap()
        .to_owned()
}

/// A pool with an ordinary listener and a `nodeserver` listener.
fn pool_with_node_port(node: &RegtestNode, tag: &str) -> (PoolProcess, SocketAddr) {
    let payout = node.new_address();
    let (direct, link) = (free_port(), free_port());
    let mut config = regtest_config(vec![btcd_entry(node)], Some(&payout), direct);
    config["nodeserver"] = json!([format!("127.0.0.1:{link}")]);
    let pool = PoolProcess::start(tag, &config, &[]);
    (pool, SocketAddr::from(([127, 0, 0, 1], link)))
}

fn is_link_msg(v: &Value, method: &str) -> bool {
    v["node.method"] == method && v.get("client_id").is_none()
}

/// A workinfo as the test client read it, read back by the codec.
fn workinfo_of(v: &Value) -> WorkInfo {
    WorkInfo::parse(v.to_string().as_bytes()).unwrap()
}

#[test]
fn pool_side_speaks_ckpool_node_messages() {
    let Some(exe) = bitcoind_or_skip("pool_side_speaks_ckpool_node_messages") else {
        return;
    };
    let net = RegtestNet::start(&exe, 2);
    let node = &net.nodes[0];
    fund(node);
    let first_txs = [send_tx(node), send_tx(node)];
    let (pool, link_addr) = pool_with_node_port(node, "node-pool-side");

    // mining.node is refused on the ordinary listener, and mining.passthrough on the node
    // listener (not a passthroughserver): both stay ordinary connections.
    let mut plain = Client::connect(pool.addr);
    plain.send_raw(NODE_HANDSHAKE);
    let refused = plain.wait_for("a refusal", WAIT, |v| {
        v.get("error").is_some_and(|e| !e.is_null())
    });
    assert_ne!(refused.get("result"), Some(&json!(true)), "{refused}");
    plain.login("direct");
    let mut pt_try = Client::connect(link_addr);
    pt_try.send_raw(b"{\"method\": \"mining.passthrough\", \"params\": [\"ckpool\\/0.9.9\"]}\n");
    let refused = pt_try.wait_for("a refusal", WAIT, |v| {
        v.get("error").is_some_and(|e| !e.is_null())
    });
    assert_ne!(refused.get("result"), Some(&json!(true)), "{refused}");

    // A node: ckpool's bare answer, then the current job's transactions and workinfo.
    let mut link = Client::connect(link_addr);
    link.send_raw(NODE_HANDSHAKE);
    let ok = link.wait_for("the handshake answer", WAIT, |v| v.get("result").is_some());
    assert_eq!(ok, json!({"result": true}));
    let txs = link.wait_for("transactions", WAIT, |v| is_link_msg(v, "transactions"));
    let txs = parse_transactions(txs.to_string().as_bytes()).unwrap();
    let wi = link.wait_for("a workinfo", WAIT, |v| is_link_msg(v, "workinfo"));
    let wi = workinfo_of(&wi);
    let rpc_txid = |t: &[u8; 32]| {
        let mut r = *t;
        r.reverse();
        hex::encode(r)
    };
    let named: Vec<String> = wi.txids.iter().map(rpc_txid).collect();
    for t in &first_txs {
        assert!(named.contains(t), "the workinfo names {t}: {named:?}");
    }
    assert_eq!(txs.len(), wi.txids.len());
    assert!(txs.iter().all(|t| wi.txids.contains(&t.txid)));
    // The same job the direct client has, field for field.
    let job_id = format!("{:016x}", wi.jobid);
    let notify = plain.wait_for("the workinfo's job as a notify", WAIT, |v| {
        v["method"] == "mining.notify" && v["params"][0] == job_id.as_str()
    });
    let p = &notify["params"];
    assert_eq!(p[0], format!("{:016x}", wi.jobid));
    assert_eq!(p[2], hex::encode(&wi.coinb1));
    assert_eq!(p[3], hex::encode(&wi.coinb2));
    let branch: Vec<String> = wi.branch.iter().map(hex::encode).collect();
    assert_eq!(p[4], json!(branch));
    assert_eq!(p[6], format!("{:08x}", wi.bits));
    assert_eq!(wi.branch, common::merkle::merkle_branch(&wi.txids));
    assert_eq!(wi.diff, Target::from_compact(wi.bits).difficulty_f64());
    assert_eq!((wi.enonce1varlen, wi.enonce2varlen), (4, 8));
    let s = wait_stats(&pool, "the node link in stats", WAIT, |s| {
        s["passthroughs"][0]["node"] == true
    });
    assert_eq!(s["passthroughs"].as_array().map(Vec::len), Some(1), "{s}");

    // A new job with one more transaction: that one alone is sent, then the workinfo.
    // bitcoind rebuilds its template for a changed mempool only 5 s after the previous one, so
    // an `update` right after the transaction may get the old template: ask again each second
    // until the new one comes.
    let third = send_tx(node);
    let is_new = |v: &Value| {
        is_link_msg(v, "transactions") && v["transaction"].as_array().map(Vec::len) == Some(1)
    };
    let end = Instant::now() + WAIT;
    let more = 'found: loop {
        assert_eq!(pool.admin("update").as_deref(), Some("updating"));
        let next = Instant::now() + Duration::from_secs(1);
        while Instant::now() < next {
            match link.read_line() {
                Ok(Some(v)) if is_new(&v) => break 'found v,
                Ok(_) => {}
                Err(()) => panic!("the node link closed; seen {:?}", link.seen),
            }
        }
        assert!(
            Instant::now() < end,
            "timed out waiting for the new transaction; seen {:?}",
            link.seen
        );
    };
    let more = parse_transactions(more.to_string().as_bytes()).unwrap();
    assert_eq!(more.len(), 1);
    assert_eq!(rpc_txid(&more[0].txid), third);
    let wi2 = link.wait_for("the new workinfo", WAIT, |v| {
        is_link_msg(v, "workinfo") && v["txns"] == 3
    });
    let wi2 = workinfo_of(&wi2);
    assert_eq!(wi2.txids.len(), 3);
    assert!(wi2.jobid > wi.jobid);

    // A miner of the node finds a block: the pool sends it to the node as a `block` message,
    // and submits it.
    let cid = 1;
    let sub = |v: Value| {
        let mut v = v;
        v["client_id"] = json!(cid);
        v["address"] = json!("10.1.2.3");
        v["server"] = json!(0);
        v
    };
    link.send(&sub(
        json!({"id": 1, "method": "mining.subscribe", "params": ["m/1"]}),
    ));
    let r = link.wait_for("the subscribe result", WAIT, |v| {
        v["client_id"] == cid && v["node.method"] == "subscribe.result"
    });
    let en1 = hex::decode(r["result"][1].as_str().unwrap()).unwrap();
    let n2len = r["result"][2].as_u64().unwrap() as usize;
    link.send(&sub(
        json!({"id": 2, "method": "mining.authorize", "params": ["nodeuser.rig", "x"]}),
    ));
    link.wait_for("the authorisation", WAIT, |v| {
        v["client_id"] == cid && v["node.method"] == "auth.result" && v["result"] == true
    });
    let n = link.wait_for("a notify for the miner", WAIT, |v| {
        v["client_id"] == cid && v["method"] == "mining.notify"
    });
    let p = &n["params"];
    let h32 = |v: &Value| u32::from_str_radix(v.as_str().unwrap(), 16).unwrap();
    let mut prev = [0u8; 32];
    hex::decode_to_slice(p[1].as_str().unwrap(), &mut prev).unwrap();
    for w in prev.chunks_exact_mut(4) {
        w.reverse();
    }
    let en2 = vec![0x5a; n2len];
    let coinbase = [
        hex::decode(p[2].as_str().unwrap()).unwrap(),
        en1.clone(),
        en2.clone(),
        hex::decode(p[3].as_str().unwrap()).unwrap(),
    ]
    .concat();
    let branch: Vec<[u8; 32]> = p[4]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            let mut x = [0u8; 32];
            hex::decode_to_slice(b.as_str().unwrap(), &mut x).unwrap();
            x
        })
        .collect();
    let root = common::merkle::merkle_root_from_branch(&common::hash::sha256d(&coinbase), &branch);
    let (version, bits, ntime) = (h32(&p[5]), h32(&p[6]), h32(&p[7]));
    let target = Target::from_compact(bits);
    let (nonce, header) = (0u32..)
        .map(|nonce| {
            (
                nonce,
                common::block::header(version, &prev, &root, ntime, bits, nonce),
            )
        })
        .find(|(_, h)| target.is_met_by(&common::hash::sha256d_header(h)))
        .unwrap();
    let height = node.height();
    link.send(&sub(json!({"id": 4, "method": "mining.submit", "params": [
        "nodeuser.rig", p[0], hex::encode(&en2), p[7], format!("{nonce:08x}")]})));
    let block = link.wait_for("a block message", WAIT, |v| is_link_msg(v, "block"));
    assert_eq!(block["swaphex"], hex::encode(header));
    assert_eq!(block["coinbasehex"], hex::encode(&coinbase));
    assert_eq!(block["cblen"], coinbase.len());
    assert_eq!(block["enonce1"], hex::encode(&en1));
    assert_eq!(block["nonce2"], hex::encode(&en2));
    assert_eq!(block["nonce"], format!("{nonce:08x}"));
    assert_eq!(block["ntime32"], ntime);
    assert_eq!(
        format!("{:016x}", block["jobid"].as_u64().unwrap()),
        p[0].as_str().unwrap()
    );
    assert_eq!(block["name"], "nodeuser.rig");
    link.wait_for("the share's verdict", WAIT, |v| {
        v["client_id"] == cid && v["node.method"] == "share.result" && v["result"] == true
    });
    wait_until("the block on the pool's node", WAIT, || {
        node.height() > height
    });
    wait_stats(&pool, "the node's miner in the pool's users", WAIT, |s| {
        s["users"].get("nodeuser").is_some()
    });
}

/// A ckpool-rs node (`-N`) with its own bitcoind `btcd` in front of the pool's `nodeserver`
/// address `link`, taking miners on `miners`.
fn start_node(tag: &str, btcd: &RegtestNode, link: SocketAddr, miners: u16) -> PoolProcess {
    let config = json!({
        "serverurl": [format!("127.0.0.1:{miners}")],
        "proxy": [{"url": link.to_string(), "auth": "unused", "pass": "x"}],
        "btcd": [btcd_entry(btcd)],
        "blockpoll": 100,
        "zmqblock": null,
        "threads": 2,
    });
    PoolProcess::start(tag, &config, &["-N"])
}

#[test]
fn a_node_submits_its_miners_blocks_to_its_own_bitcoind() {
    let Some(exe) = bitcoind_or_skip("a_node_submits_its_miners_blocks_to_its_own_bitcoind") else {
        return;
    };
    // The pool's bitcoind takes no submitblock from the pool (a proxy refuses it): a block
    // reaches the chain only through the ckpool-rs node's own submission to its bitcoind.
    let net = RegtestNet::start(&exe, 2);
    let (pools_btcd, nodes_btcd) = (&net.nodes[0], &net.nodes[1]);
    let base = nodes_btcd.height();
    let proxy = rpc_proxy::RpcProxy::start(
        pools_btcd
            .rpc_url()
            .trim_start_matches("http://")
            .trim_end_matches('/'),
        true,
    );
    let payout = pools_btcd.new_address();
    let link = free_port();
    let link_addr = SocketAddr::from(([127, 0, 0, 1], link));
    let mut btcd = btcd_entry(pools_btcd);
    btcd["url"] = json!(proxy.addr.to_string());
    let mut config = regtest_config(vec![btcd], Some(&payout), free_port());
    config["nodeserver"] = json!([link_addr.to_string()]);
    let pool = PoolProcess::start("node-chain-pool", &config, &[]);
    let miner_port = free_port();
    let nd = start_node("node-chain-node", nodes_btcd, link_addr, miner_port);
    let s = wait_stats(&nd, "the node's link and first job", WAIT, |s| {
        s["upstream"]["state"] == "up" && s["node"]["jobs"].as_u64() >= Some(1)
    });
    assert_eq!(s["mode"], "node");
    wait_stats(&pool, "the node link at the pool", WAIT, |s| {
        s["passthroughs"][0]["node"] == true
    });

    let mut cfg = loadtest::MinerConfig::new(
        SocketAddr::from(([127, 0, 0, 1], miner_port)),
        "nodeminer.rig",
    );
    cfg.duration = Some(Duration::from_secs(120));
    cfg.max_shares_per_sec = 10.0;
    let miner = loadtest::Miner::start(cfg).unwrap();
    wait_until("a block on the node's own bitcoind", WAIT, || {
        nodes_btcd.height() > base
    });
    wait_until("shares accepted through the node", WAIT, || {
        miner.report().accepted >= 3
    });
    // The node found it itself, before the pool's `block` message for it came back.
    let log = nd.log_text();
    let solved: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("BLOCK SOLVED by a miner of this node"))
        .collect();
    assert!(!solved.is_empty(), "no local solve in the node's log");
    let first_hash = nodes_btcd.rpc("getblockhash", json!([base + 1]));
    let first_hash = first_hash.as_str().unwrap();
    let line = solved
        .iter()
        .find(|l| l.contains(first_hash))
        .unwrap_or_else(|| panic!("the node's bitcoind has block {first_hash}, which the node did not log as solved: {solved:?}"));
    let local = log.find(line).unwrap();
    if let Some(from_pool) = log.find("the pool found a block") {
        assert!(
            local < from_pool,
            "the pool's block message came before the local solve"
        );
    }
    // The pool's own submission was refused: the block reached the chain through the node.
    assert!(proxy.refused() >= 1, "the pool never tried to submit");
    // The node kept the block on disk (its generator's block file), settled once its bitcoind
    // had it.
    let blocks = nd.dir.join("logs").join("blocks");
    wait_until("the node's block file, settled", WAIT, || {
        std::fs::read_dir(&blocks).is_ok_and(|d| {
            d.filter_map(Result::ok).any(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                name.contains(first_hash) && name.ends_with(".hex.done")
            })
        })
    });
    // The node's statistics, and the pool's: the miner is a user there.
    let s = wait_stats(&nd, "the node's worker figures", WAIT, |s| {
        s["node"]["workers"]["nodeminer.rig"]["hashrate1m"].as_f64() > Some(0.0)
    });
    assert!(s["node"]["blocks_found"].as_u64() >= Some(1), "{s}");
    // The pool's own `block` messages reach the node too (it submits them as well).
    wait_stats(&nd, "a block message from the pool", WAIT, |s| {
        s["node"]["block_messages"].as_u64() >= Some(1)
    });
    assert!(s["node"]["shares"].as_u64() >= Some(3), "{s}");
    wait_stats(&pool, "the node's miner in the pool's users", WAIT, |s| {
        s["users"].get("nodeminer").is_some()
    });
    drop(miner);
}
