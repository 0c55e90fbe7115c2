//! Proxy mode (`-p`) end to end: ckpool-rs pools on a regtest node as the upstream, a ckpool-rs
//! proxy in front of them, ckload miners and raw stratum clients behind it; and a scripted
//! upstream for the difficulty clamp. Without a node the node tests print "skipped" (locally)
//! or fail (in CI).
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
#[path = "support/scrape.rs"]
mod scrape;

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener};
use std::time::Duration;

use common::Target;
use loadtest::{Miner, MinerConfig};
use node::{RegtestNet, RegtestNode, WAIT, bitcoind_or_skip, wait_until};
use pool::{Client, PoolProcess, btcd_entry, free_port, regtest_config, wait_stats};
use serde_json::{Value, json};

/// Difficulty 2^-32: every hash is a share.
const TINY: f64 = 0.000_000_000_232_830_643_653_869_63;

/// A ckpool-rs pool on `node`.
fn start_pool(tag: &str, node: &RegtestNode) -> PoolProcess {
    let addr = node.new_address();
    let config = regtest_config(vec![btcd_entry(node)], Some(&addr), free_port());
    PoolProcess::start(tag, &config, &[])
}

/// A proxy config over `upstreams` (`host:port`), authorising as `proxyuser.<i>`.
fn proxy_config(upstreams: &[String], startdiff: f64) -> Value {
    let proxies: Vec<Value> = upstreams
        .iter()
        .enumerate()
        .map(|(i, u)| json!({"url": u, "auth": format!("proxyuser.{i}"), "pass": "x"}))
        .collect();
    json!({
        "proxy": proxies,
        "serverurl": [format!("127.0.0.1:{}", free_port())],
        "mindiff": TINY,
        "startdiff": startdiff,
        "threads": 2,
    })
}

fn start_proxy(tag: &str, config: &Value) -> PoolProcess {
    PoolProcess::start(tag, config, &["-p"])
}

/// The proxy's `upstreams` object from its admin stats.
fn upstreams(proxy: &PoolProcess) -> Value {
    proxy.stats()["upstreams"].clone()
}

fn latest_job(c: &mut Client) -> loadtest::work::Job {
    c.wait_for("a mining.notify", WAIT, |v| v["method"] == "mining.notify");
    let newest = c
        .seen
        .iter()
        .rev()
        .find(|m| m["method"] == "mining.notify")
        .cloned()
        .unwrap();
    loadtest::work::Job::from_notify_params(&newest["params"]).unwrap()
}

/// (a) and (b): miners' shares are accepted by the proxy, those meeting the upstream
/// difficulty (every one here) are accepted by the pool under the proxy's user, blocks found
/// through the proxy reach the node, and a version-rolled share goes up with its version bits:
/// the block it solves is in the node with the rolled version.
#[test]
fn proxy_forwards_shares_and_blocks_with_version_bits_to_the_upstream_pool() {
    let Some(exe) =
        bitcoind_or_skip("proxy_forwards_shares_and_blocks_with_version_bits_to_the_upstream_pool")
    else {
        return;
    };
    let net = RegtestNet::start(&exe, 2);
    let node = &net.nodes[0];
    let pool = start_pool("pxup", node);
    let web: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let mut config = proxy_config(&[pool.addr.to_string()], TINY);
    config["webserver"] = web.to_string().into();
    let proxy = start_proxy("pxa", &config);

    // A plain miner through the proxy mines a block.
    let mut cfg = MinerConfig::new(proxy.addr, "farm.rig1");
    cfg.stop_after_blocks = Some(1);
    cfg.duration = Some(Duration::from_secs(40));
    let report = Miner::start(cfg).unwrap().wait(Duration::from_secs(50));
    assert!(report.error.is_none(), "{report:?}");
    assert!(report.accepted >= 1, "{report:?}");
    assert!(report.blocks_accepted >= 1, "{report:?}");
    let hash = report.block_hashes[0].clone();
    wait_until("the proxied block to reach the node", WAIT, || {
        node.try_rpc("getblockheader", json!([hash])).is_ok()
    });
    // The pool counted the proxy's shares under the proxy's upstream user.
    let stats = wait_stats(&pool, "the proxy's shares at the pool", WAIT, |s| {
        s["users"]["proxyuser"]["workers"]["proxyuser.0"]["accepted"]
            .as_u64()
            .unwrap_or(0)
            >= 1
    });
    assert_eq!(stats["users"].as_object().unwrap().len(), 1, "{stats}");
    let up = upstreams(&proxy);
    assert!(up["servers"][0]["accepted"].as_u64().unwrap() >= 1, "{up}");
    assert_eq!(up["servers"][0]["state"], "active", "{up}");
    assert!(
        up["users"]["farm"]["accepted"].as_u64().unwrap() >= 1,
        "{up}"
    );
    assert_eq!(up["active"], 0, "{up}");

    // The webserver: the upstream connection is up and its accepted count is what the
    // upstream pool accepted from the proxy (the miner has stopped: the counts settle).
    let pool_url = pool.addr.to_string();
    let main = [("url", pool_url.as_str()), ("role", "main")];
    wait_until(
        "the upstream's verdicts in the proxy's metrics",
        WAIT,
        || {
            let at_pool = pool.stats()["users"]["proxyuser"]["workers"]["proxyuser.0"]["accepted"]
                .as_u64()
                .unwrap_or(0);
            let m = scrape::scrape(web);
            let accepted = [main[0], main[1], ("result", "accepted")];
            at_pool >= 1
                && scrape::metric(&m, "ckpool_upstream_shares_total", &accepted)
                    == Some(at_pool as f64)
        },
    );
    let m = scrape::scrape(web);
    assert_eq!(scrape::metric(&m, "ckpool_upstream_up", &main), Some(1.0));
    assert_eq!(
        scrape::metric(
            &m,
            "ckpool_upstream_shares_total",
            &[("result", "rejected")]
        ),
        Some(0.0)
    );
    assert!(scrape::metric(&m, "ckpool_upstream_difficulty", &main).is_some());
    assert!(scrape::metric(&m, "ckpool_upstream_miners", &main).is_some());
    assert!(scrape::metric(&m, "ckpool_shares_total", &[("result", "accepted")]) >= Some(1.0));
    assert!(scrape::metric(&m, "ckpool_bitcoind_active", &[]).is_none());
    assert_eq!(
        scrape::metric(&m, "ckpool_upstream_failovers_total", &[]),
        Some(0.0)
    );
    let api = scrape::get_json(web, "/api/upstreams");
    assert_eq!(api["servers"][0]["state"], "active", "{api}");
    assert_eq!(api["connections"][0]["url"], pool_url.as_str(), "{api}");
    assert_eq!(scrape::get(web, "/").0, 200);

    // A version-rolling client: the mask it is offered is the pool's answer to the proxy
    // (ckpool-rs grants 1fffe000) within the proxy's own version_mask (the same by default).
    wait_stats(&pool, "the pool's job on the new tip", WAIT, |s| {
        s["job"][1].as_u64() == Some(node.height() + 1)
    });
    let mut c = Client::connect(proxy.addr);
    c.send(&json!({"id": 1, "method": "mining.configure",
        "params": [["version-rolling"], {"version-rolling.mask": "ffffffff"}]}));
    let conf = c.reply(1);
    assert_eq!(conf["result"]["version-rolling.mask"], "1fffe000", "{conf}");
    c.seen.clear();
    let (en1, n2len) = c.login("asic.1");
    let en1 = hex::decode(en1).unwrap();
    // Wait for the proxy's job on the tip the first block made.
    let tip = node.rpc("getbestblockhash", json!([]));
    let job = loop {
        let job = latest_job(&mut c);
        let mut prev = job.prev_hash;
        prev.reverse();
        if hex::encode(prev) == tip.as_str().unwrap() {
            break job;
        }
        c.seen.clear();
    };
    let bits = 0x0000_6000u32;
    let version = job.version | bits;
    let en2 = vec![7u8; n2len];
    let network = Target::from_compact(job.nbits);
    let nonce = (0u32..)
        .find(|&n| network.is_met_by(&job.share_hash(&en1, &en2, version, n)))
        .unwrap();
    let mut header_hash = job.share_hash(&en1, &en2, version, nonce);
    c.send(&json!({"id": 5, "method": "mining.submit",
        "params": ["asic.1", job.job_id, hex::encode(&en2), format!("{:08x}", job.ntime),
                   format!("{nonce:08x}"), format!("{bits:08x}")]}));
    assert_eq!(c.reply(5)["result"], true);
    header_hash.reverse();
    let block_hash = hex::encode(header_hash);
    wait_until("the rolled block to reach the node", WAIT, || {
        node.try_rpc("getblockheader", json!([block_hash])).is_ok()
    });
    let header = node.rpc("getblockheader", json!([block_hash]));
    assert_eq!(
        header["version"].as_u64().unwrap() as u32 & 0x1fff_e000,
        bits,
        "{header}"
    );
    wait_until("the rolled share's upstream verdict", WAIT, || {
        upstreams(&proxy)["users"]["asic"]["accepted"].as_u64() >= Some(1)
    });
}

/// (c): two upstream pools; the first stops. The miners stay on their connections: one that
/// sent `mining.extranonce.subscribe` gets `mining.set_extranonce` and a clean notify, and
/// the ckload miner keeps having shares accepted, now at the second pool.
#[test]
fn proxy_fails_over_to_the_second_upstream_keeping_its_miners() {
    let Some(exe) = bitcoind_or_skip("proxy_fails_over_to_the_second_upstream_keeping_its_miners")
    else {
        return;
    };
    let net = RegtestNet::start(&exe, 2);
    let node = &net.nodes[0];
    let mut first = start_pool("pxfo1", node);
    let second = start_pool("pxfo2", node);
    let proxy = start_proxy(
        "pxfo",
        &proxy_config(&[first.addr.to_string(), second.addr.to_string()], TINY),
    );

    let mut cfg = MinerConfig::new(proxy.addr, "farm.rig1");
    cfg.duration = Some(Duration::from_secs(45));
    cfg.max_shares_per_sec = 20.0;
    cfg.pause_after_block = false;
    cfg.extranonce_subscribe = true;
    let miner = Miner::start(cfg).unwrap();
    let mut c = Client::connect(proxy.addr);
    c.send(&json!({"id": 1, "method": "mining.subscribe", "params": ["raw/1"]}));
    let en1_before = c.reply(1)["result"][1].as_str().unwrap().to_owned();
    c.send(&json!({"id": 2, "method": "mining.extranonce.subscribe", "params": []}));
    assert_eq!(c.reply(2)["result"], true);
    c.send(&json!({"id": 3, "method": "mining.authorize", "params": ["raw.1", "x"]}));
    assert_eq!(c.reply(3)["result"], true);

    wait_until("shares accepted by the first upstream", WAIT, || {
        upstreams(&proxy)["servers"][0]["accepted"].as_u64() >= Some(3)
    });
    assert_eq!(upstreams(&proxy)["failovers"], 0);
    first.shutdown();
    // The raw client hears of its new extranonce1 on the same connection.
    let set = c.wait_for("mining.set_extranonce", WAIT, |v| {
        v["method"] == "mining.set_extranonce"
    });
    let en1_after = set["params"][0].as_str().unwrap();
    assert_ne!(en1_after, en1_before);
    c.seen.clear();
    let notify = c.wait_for("a notify after the switch", WAIT, |v| {
        v["method"] == "mining.notify"
    });
    assert_eq!(notify["params"][8], true, "{notify}");
    // The ckload miner keeps mining on its connection; its shares now reach the second pool.
    let before = miner.report().accepted;
    wait_until("shares accepted by the second upstream", WAIT, || {
        upstreams(&proxy)["servers"][1]["accepted"].as_u64() >= Some(3)
    });
    assert_eq!(upstreams(&proxy)["failovers"], 1);
    wait_until("the miner's shares accepted after the switch", WAIT, || {
        miner.report().accepted >= before + 3
    });
    let up = upstreams(&proxy);
    assert_eq!(up["active"], 1, "{up}");
    assert_eq!(up["servers"][1]["state"], "active", "{up}");
    let report = miner.report();
    assert!(report.error.is_none(), "{report:?}");
    assert!(
        !miner.is_finished(),
        "the miner was disconnected: {report:?}"
    );
    miner.request_stop();
    let stats = wait_stats(
        &second,
        "the proxy's shares at the second pool",
        WAIT,
        |s| {
            s["users"]["proxyuser"]["workers"]["proxyuser.1"]["accepted"]
                .as_u64()
                .unwrap_or(0)
                >= 1
        },
    );
    assert!(
        stats["users"]["proxyuser"]["workers"]
            .get("proxyuser.0")
            .is_none(),
        "{stats}"
    );
    // Only the shares in flight at the switch may be lost.
    assert!(miner.report().rejected <= 2 * 20, "{:?}", miner.report());
}

/// A scripted upstream pool: answers the handshake, sends difficulty 16 and a job, then
/// whatever lines the test sends through `more`.
fn scripted_upstream(more: std::sync::mpsc::Receiver<String>) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        stream
            .set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let mut w = stream.try_clone().unwrap();
        let mut r = BufReader::new(stream);
        let notify = json!({"id": null, "method": "mining.notify", "params": [
            "j1", "00".repeat(32), "01000000010000000000000000000000000000000000000000000000000000000000000000ffffffff20020a00",
            "ffffffff0100f2052a010000001600146f16fe7c495ba8261016383a1d4b5bf0e185c85100000000",
            [], "20000000", "17034219", "6553f100", true]});
        let mut sent_work = false;
        let end = std::time::Instant::now() + Duration::from_secs(60);
        while std::time::Instant::now() < end {
            let mut line = String::new();
            match r.read_line(&mut line) {
                Ok(0) => return,
                Ok(_) => {
                    let v: Value = serde_json::from_str(line.trim()).unwrap_or(Value::Null);
                    let result = match v["method"].as_str() {
                        Some("mining.configure") => {
                            json!({"version-rolling": true, "version-rolling.mask": "1fffe000"})
                        }
                        Some("mining.subscribe") => {
                            json!([[["mining.notify", "1"]], "aabbccdd", 8])
                        }
                        _ => json!(true),
                    };
                    let reply = json!({"id": v["id"], "result": result, "error": null});
                    if w.write_all(format!("{reply}\n").as_bytes()).is_err() {
                        return;
                    }
                    if v["method"] == "mining.authorize" && !sent_work {
                        sent_work = true;
                        let diff =
                            json!({"id": null, "method": "mining.set_difficulty", "params": [16]});
                        let _ = w.write_all(format!("{diff}\n{notify}\n").as_bytes());
                    }
                }
                Err(_) => {}
            }
            while let Ok(l) = more.try_recv() {
                let _ = w.write_all(format!("{l}\n").as_bytes());
            }
        }
    });
    addr
}

/// (d): the upstream's difficulty caps the miners': a miner starting above it is given the
/// upstream's at subscribe, and a lower upstream difficulty lowers it at once (fractional,
/// not clamped to 1).
#[test]
fn upstream_difficulty_below_a_miners_lowers_the_miner() {
    let (tx, rx) = std::sync::mpsc::channel();
    let upstream = scripted_upstream(rx);
    let proxy = start_proxy("pxdiff", &proxy_config(&[upstream], 64.0));
    let mut c = Client::connect(proxy.addr);
    c.login("farm.rig1");
    let first = c.wait_for("set_difficulty", WAIT, |v| {
        v["method"] == "mining.set_difficulty"
    });
    assert_eq!(first["params"][0].as_f64(), Some(16.0), "{first}");
    c.seen.clear();
    tx.send(json!({"id": null, "method": "mining.set_difficulty", "params": [0.5]}).to_string())
        .unwrap();
    let lowered = c.wait_for("the lowered difficulty", WAIT, |v| {
        v["method"] == "mining.set_difficulty"
    });
    assert_eq!(lowered["params"][0].as_f64(), Some(0.5), "{lowered}");
    let up = upstreams(&proxy);
    assert_eq!(up["difficulty"].as_f64(), Some(0.5), "{up}");
    assert_eq!(up["version_mask"], "1fffe000", "{up}");
}

/// Userproxy (`-u`) over a solo-mode ckpool-rs pool (user names must be addresses there, so
/// any other name is refused): two users get an upstream connection each with their own
/// credentials, and their shares are accepted at the pool as their own users; a name the pool
/// refuses fails that miner's authorisation; `maxupstreams` bounds the connections; a miner
/// that cannot take `mining.set_extranonce` is reconnected and resumes onto its user's
/// connection.
#[test]
fn userproxy_gives_each_user_its_own_upstream_connection() {
    let Some(exe) = bitcoind_or_skip("userproxy_gives_each_user_its_own_upstream_connection")
    else {
        return;
    };
    let net = RegtestNet::start(&exe, 2);
    let node = &net.nodes[0];
    let pool = PoolProcess::start(
        "upxpool",
        &regtest_config(vec![btcd_entry(node)], None, free_port()),
        &["-B"],
    );
    let (main_user, alice, bob) = (node.new_address(), node.new_address(), node.new_address());
    let mut config = proxy_config(&[pool.addr.to_string()], TINY);
    config["proxy"][0]["auth"] = json!(main_user);
    // The main connection and two users.
    config["maxupstreams"] = json!(3);
    let proxy = PoolProcess::start("upx", &config, &["-u"]);
    let connections = |p: &PoolProcess| upstreams(p)["connections"].clone();
    wait_until("the main upstream connection", WAIT, || {
        connections(&proxy)[0]["state"] == "active"
    });

    // Refused upstream: the miner's authorisation fails with the pool's reason, and the
    // connection opened for it is closed.
    let mut bad = Client::connect(proxy.addr);
    bad.send(&json!({"id": 1, "method": "mining.subscribe", "params": ["raw/1"]}));
    bad.reply(1);
    bad.send(&json!({"id": 2, "method": "mining.authorize", "params": ["notanaddress.1", "x"]}));
    let r = bad.reply(2);
    assert_eq!(r["result"], false, "{r}");
    assert_eq!(r["error"][0], 24, "{r}");
    wait_until("the refused user's connection to close", WAIT, || {
        connections(&proxy).as_array().map(Vec::len) == Some(1)
    });

    // Two users, each with a ckload miner taking mining.set_extranonce.
    let miner = |user: &str| {
        let mut cfg = MinerConfig::new(proxy.addr, format!("{user}.rig1"));
        cfg.duration = Some(Duration::from_secs(60));
        cfg.max_shares_per_sec = 10.0;
        cfg.pause_after_block = false;
        cfg.extranonce_subscribe = true;
        Miner::start(cfg).unwrap()
    };
    let (ma, mb) = (miner(&alice), miner(&bob));
    wait_until("both users' shares accepted upstream", WAIT, || {
        let up = upstreams(&proxy);
        up["users"][&alice]["accepted"].as_u64() >= Some(3)
            && up["users"][&bob]["accepted"].as_u64() >= Some(3)
    });
    let stats = wait_stats(&pool, "both users' shares at the pool", WAIT, |s| {
        [&alice, &bob].iter().all(|u| {
            s["users"][u.as_str()]["workers"][u.as_str()]["accepted"]
                .as_u64()
                .unwrap_or(0)
                >= 3
        })
    });
    // Shares are counted as each user (their connections authorise as the user name).
    let users: Vec<&String> = stats["users"].as_object().unwrap().keys().collect();
    assert!(!users.contains(&&"notanaddress".to_owned()), "{stats}");
    // Three connections at the pool: the main one and one per user.
    let clients: Value = serde_json::from_str(&pool.admin("clients").unwrap()).unwrap();
    let mut authorised: Vec<String> = clients["clients"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|c| c["user"].as_str().map(str::to_owned))
        .collect();
    authorised.sort();
    let mut want = vec![main_user.clone(), alice.clone(), bob.clone()];
    want.sort();
    assert_eq!(authorised, want, "{clients}");
    // The connections' `miners` are counted every 200 ms.
    wait_until(
        "both user connections with a miner and shares",
        WAIT,
        || {
            let c = connections(&proxy);
            c.as_array().map(Vec::len) == Some(3)
                && c.as_array()
                    .unwrap()
                    .iter()
                    .skip(1)
                    .all(|c| c["miners"].as_u64() >= Some(1) && c["accepted"].as_u64() >= Some(3))
        },
    );
    let conns = connections(&proxy);
    let roles: Vec<(&str, &str)> = conns
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["role"].as_str().unwrap(),
                c["user"].as_str().unwrap_or(""),
            )
        })
        .collect();
    assert_eq!(roles.len(), 3, "{conns}");
    assert!(roles.contains(&("user", alice.as_str())), "{conns}");
    assert!(roles.contains(&("user", bob.as_str())), "{conns}");
    for c in conns.as_array().unwrap().iter().skip(1) {
        assert_eq!(c["state"], "active", "{conns}");
        assert!(c["accepted"].as_u64() >= Some(3), "{conns}");
        assert!(c["miners"].as_u64() >= Some(1), "{conns}");
    }

    // maxupstreams reached: a third user is refused, and says why.
    let carol = node.new_address();
    let mut c = Client::connect(proxy.addr);
    c.send(&json!({"id": 1, "method": "mining.subscribe", "params": ["raw/1"]}));
    c.reply(1);
    c.send(&json!({"id": 2, "method": "mining.authorize", "params": [carol, "x"]}));
    let r = c.reply(2);
    assert_eq!(r["result"], false, "{r}");
    assert_eq!(r["error"][1], "Too many upstream connections", "{r}");

    // A miner without mining.extranonce.subscribe: authorised, then reconnected; with its
    // session id it resumes on bob's connection and its share is accepted there.
    let mut c = Client::connect(proxy.addr);
    c.send(&json!({"id": 1, "method": "mining.subscribe", "params": ["raw/1"]}));
    let sid = c.reply(1)["result"][0][0][1].as_str().unwrap().to_owned();
    c.send(&json!({"id": 2, "method": "mining.authorize", "params": [format!("{bob}.raw"), "x"]}));
    assert_eq!(c.reply(2)["result"], true);
    c.wait_for("client.reconnect", WAIT, |v| {
        v["method"] == "client.reconnect"
    });
    assert!(
        c.wait_closed(WAIT),
        "not disconnected after client.reconnect"
    );
    let mut c = Client::connect(proxy.addr);
    c.send(&json!({"id": 1, "method": "mining.subscribe", "params": ["raw/1", sid]}));
    let r = c.reply(1);
    assert_eq!(r["result"][0][0][1], sid.as_str(), "session resumed: {r}");
    let (en1, n2len) = (
        hex::decode(r["result"][1].as_str().unwrap()).unwrap(),
        r["result"][2].as_u64().unwrap() as usize,
    );
    c.send(&json!({"id": 2, "method": "mining.authorize", "params": [format!("{bob}.raw"), "x"]}));
    assert_eq!(c.reply(2)["result"], true);
    let bob_before = upstreams(&proxy)["users"][&bob]["accepted"]
        .as_u64()
        .unwrap();
    // The other miners find blocks all the time (regtest): a share on a job a block made
    // stale is refused, so submit on the newest job until one is taken.
    let mut taken = false;
    for id in 5..15u64 {
        let job = latest_job(&mut c);
        c.send(&json!({"id": id, "method": "mining.submit",
            "params": [format!("{bob}.raw"), job.job_id, hex::encode(vec![9u8; n2len]),
                       format!("{:08x}", job.ntime), "00000000"]}));
        let r = c.reply(id);
        if r["result"] == true {
            taken = true;
            break;
        }
        assert_eq!(r["error"][1], "Stale", "{r}");
        c.seen.clear();
    }
    assert!(taken, "no share of the resumed miner accepted");
    wait_stats(&pool, "the resumed miner's share at the pool", WAIT, |s| {
        s["users"][bob.as_str()]["workers"][bob.as_str()]["accepted"]
            .as_u64()
            .unwrap_or(0)
            > 0
    });
    assert!(!en1.is_empty());
    wait_until("the resumed miner's upstream verdict", WAIT, || {
        upstreams(&proxy)["users"][&bob]["accepted"].as_u64() > Some(bob_before)
    });
    for m in [ma, mb] {
        let report = m.report();
        assert!(report.error.is_none(), "{report:?}");
        assert!(!m.is_finished(), "a miner was disconnected: {report:?}");
        m.request_stop();
    }
}

/// Recruiting: with a 1-byte local extranonce1 part (`nonce2length` 7 behind a pool giving 8
/// bytes) a connection holds 256 miners; once 224 are subscribed on it, another upstream
/// connection is recruited with the same credentials and new miners are placed on it, where
/// their shares are accepted by the pool.
#[test]
fn proxy_recruits_another_upstream_connection_when_the_extranonce_space_fills() {
    let Some(exe) = bitcoind_or_skip(
        "proxy_recruits_another_upstream_connection_when_the_extranonce_space_fills",
    ) else {
        return;
    };
    let net = RegtestNet::start(&exe, 2);
    let node = &net.nodes[0];
    let pool = start_pool("pxrcpool", node);
    let mut config = proxy_config(&[pool.addr.to_string()], TINY);
    config["nonce2length"] = json!(7);
    let proxy = start_proxy("pxrc", &config);
    let connections = |p: &PoolProcess| upstreams(p)["connections"].clone();
    wait_until("the main upstream connection", WAIT, || {
        connections(&proxy)[0]["state"] == "active"
    });

    // Fill 7/8 of the first connection's 256 extranonce1 values with subscribed clients.
    let mut fillers = Vec::new();
    let mut prefix = None;
    for _ in 0..224 {
        let mut c = Client::connect(proxy.addr);
        c.send(&json!({"id": 1, "method": "mining.subscribe", "params": ["filler/1"]}));
        let r = c.reply(1);
        let en1 = r["result"][1].as_str().unwrap().to_owned();
        assert_eq!(r["result"][2], 7, "{r}");
        let p = en1[..en1.len() - 2].to_owned();
        assert_eq!(
            prefix.get_or_insert_with(|| p.clone()),
            &p,
            "all on one connection"
        );
        fillers.push(c);
    }
    let first_prefix = prefix.unwrap();
    wait_until("a recruited connection with work", WAIT, || {
        let c = connections(&proxy);
        c.as_array().map(Vec::len) == Some(2)
            && c[1]["role"] == "recruit"
            && c[1]["state"] == "active"
            && c[1]["difficulty"].is_number()
            // Its first job came (its work is counted from then on, and new miners placed there);
            // its difficulty alone comes before that (raced once in CI).
            && c[1]["miners"].is_number()
    });
    // New miners go to the recruited connection: another upstream extranonce1.
    let mut probe = Client::connect(proxy.addr);
    probe.send(&json!({"id": 1, "method": "mining.subscribe", "params": ["probe/1"]}));
    let en1 = probe.reply(1)["result"][1].as_str().unwrap().to_owned();
    assert_ne!(
        &en1[..en1.len() - 2],
        first_prefix,
        "a new miner still on the full connection"
    );
    let mut cfg = MinerConfig::new(proxy.addr, "farm.late");
    cfg.duration = Some(Duration::from_secs(40));
    cfg.max_shares_per_sec = 10.0;
    cfg.pause_after_block = false;
    let miner = Miner::start(cfg).unwrap();
    wait_until(
        "the late miner's shares accepted through the recruit",
        WAIT,
        || {
            let c = connections(&proxy);
            c[1]["accepted"].as_u64() >= Some(3) && miner.report().accepted >= 3
        },
    );
    // `miners` is refreshed every 200 ms.
    wait_until("the recruit's miners counted", WAIT, || {
        connections(&proxy)[1]["miners"].as_u64() >= Some(2)
    });
    let c = connections(&proxy);
    assert!(c[0]["miners"].as_u64() >= Some(224), "{c}");
    assert_eq!(c[0]["accepted"], 0, "{c}");
    // Two connections at the pool, both authorised as the proxy's user.
    let clients: Value = serde_json::from_str(&pool.admin("clients").unwrap()).unwrap();
    let users: Vec<&str> = clients["clients"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|c| c["worker"].as_str())
        .collect();
    assert_eq!(users, ["proxyuser.0", "proxyuser.0"], "{clients}");
    wait_stats(&pool, "the late miner's shares at the pool", WAIT, |s| {
        s["users"]["proxyuser"]["workers"]["proxyuser.0"]["accepted"]
            .as_u64()
            .unwrap_or(0)
            >= 3
    });
    let report = miner.report();
    assert!(report.error.is_none(), "{report:?}");
    miner.request_stop();
    drop(fillers);
}

/// Userproxy failover: a user's own upstream connection follows the `proxy` entries as the main
/// one does. When the first pool goes, the user's connection comes up on the second, with the
/// user's credentials; the user's miner stays connected (it takes `mining.set_extranonce`) and
/// its shares are accepted there as the user's.
#[test]
fn userproxy_user_connections_fail_over_with_the_users_credentials() {
    let Some(exe) =
        bitcoind_or_skip("userproxy_user_connections_fail_over_with_the_users_credentials")
    else {
        return;
    };
    let net = RegtestNet::start(&exe, 2);
    let node = &net.nodes[0];
    let solo = |tag: &str| {
        PoolProcess::start(
            tag,
            &regtest_config(vec![btcd_entry(node)], None, free_port()),
            &["-B"],
        )
    };
    let mut first = solo("upfo1");
    let second = solo("upfo2");
    let (main_user, alice) = (node.new_address(), node.new_address());
    let mut config = proxy_config(&[first.addr.to_string(), second.addr.to_string()], TINY);
    config["proxy"][0]["auth"] = json!(main_user);
    config["proxy"][1]["auth"] = json!(main_user);
    let proxy = PoolProcess::start("upfo", &config, &["-u"]);
    let connections = |p: &PoolProcess| upstreams(p)["connections"].clone();
    let alice_conn = |p: &PoolProcess| {
        connections(p)
            .as_array()
            .and_then(|c| c.iter().find(|c| c["user"] == alice.as_str()).cloned())
    };
    let mut cfg = MinerConfig::new(proxy.addr, format!("{alice}.rig1"));
    cfg.duration = Some(Duration::from_secs(60));
    cfg.max_shares_per_sec = 10.0;
    cfg.pause_after_block = false;
    cfg.extranonce_subscribe = true;
    let miner = Miner::start(cfg).unwrap();
    let accepted_at = |p: &PoolProcess| {
        p.stats()["users"][alice.as_str()]["workers"][alice.as_str()]["accepted"]
            .as_u64()
            .unwrap_or(0)
    };
    wait_until("alice's shares accepted by the first pool", WAIT, || {
        accepted_at(&first) >= 3
    });
    let conn = alice_conn(&proxy).unwrap();
    assert_eq!(conn["url"], first.addr.to_string(), "{conn}");
    assert_eq!(accepted_at(&second), 0);

    first.shutdown();
    wait_until("alice's connection up on the second pool", WAIT, || {
        alice_conn(&proxy)
            .is_some_and(|c| c["state"] == "active" && c["url"] == second.addr.to_string().as_str())
    });
    let before = miner.report().accepted;
    wait_until(
        "alice's shares accepted by the second pool, as alice",
        WAIT,
        || accepted_at(&second) >= 3,
    );
    wait_until("the miner's shares accepted after the switch", WAIT, || {
        miner.report().accepted >= before + 3
    });
    // One connection for alice at the second pool, authorised as alice (not the main user).
    let clients: Value = serde_json::from_str(&second.admin("clients").unwrap()).unwrap();
    let users: Vec<&str> = clients["clients"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|c| c["user"].as_str())
        .collect();
    assert_eq!(
        users.iter().filter(|u| **u == alice.as_str()).count(),
        1,
        "{clients}"
    );
    let conns = connections(&proxy);
    assert_eq!(conns.as_array().map(Vec::len), Some(2), "{conns}");
    let report = miner.report();
    assert!(report.error.is_none(), "{report:?}");
    assert!(
        !miner.is_finished(),
        "the miner was disconnected: {report:?}"
    );
    miner.request_stop();
}

/// An upstream that stops reading while miners submit fast: the proxy holds the shares its
/// link's queue has no room for and sends them once the upstream reads again, so every share
/// the proxy accepted reaches the upstream (none dropped), in order.
#[test]
fn a_stalled_upstream_loses_no_accepted_share() {
    const SHARES: u64 = 30_000;
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let upstream = listener.local_addr().unwrap().to_string();
    let (resume_tx, resume_rx) = std::sync::mpsc::channel::<()>();
    let (count_tx, count_rx) = std::sync::mpsc::channel::<(u64, u64)>();
    std::thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        stream
            .set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let mut w = stream.try_clone().unwrap();
        let mut r = BufReader::new(stream);
        let notify = json!({"id": null, "method": "mining.notify", "params": [
            "j1", "00".repeat(32), "01000000010000000000000000000000000000000000000000000000000000000000000000ffffffff20020a00",
            "ffffffff0100f2052a010000001600146f16fe7c495ba8261016383a1d4b5bf0e185c85100000000",
            [], "20000000", "17034219", "6553f100", true]});
        let (mut submits, mut in_order, mut last) = (0u64, 0u64, 0u64);
        let mut stalled = false;
        let end = std::time::Instant::now() + Duration::from_secs(240);
        while std::time::Instant::now() < end {
            if stalled {
                // Not reading: the proxy's writes fill the socket, then its link's queue.
                if resume_rx.recv_timeout(Duration::from_millis(50)).is_ok() {
                    stalled = false;
                }
                continue;
            }
            let mut line = String::new();
            match r.read_line(&mut line) {
                Ok(0) => return,
                Ok(_) => {
                    let v: Value = serde_json::from_str(line.trim()).unwrap_or(Value::Null);
                    let result = match v["method"].as_str() {
                        Some("mining.configure") => json!({"version-rolling": false}),
                        Some("mining.subscribe") => {
                            json!([[["mining.notify", "1"]], "aabbccdd", 8])
                        }
                        Some("mining.submit") => {
                            submits += 1;
                            // The extranonce2's local part and the miner's counter: in order?
                            let n = v["params"][4]
                                .as_str()
                                .map_or(0, |h| u64::from_str_radix(h, 16).unwrap_or(0));
                            if n > last {
                                in_order += 1;
                            }
                            last = n;
                            let _ = count_tx.send((submits, in_order));
                            json!(true)
                        }
                        _ => json!(true),
                    };
                    let reply = json!({"id": v["id"], "result": result, "error": null});
                    if w.write_all(format!("{reply}\n").as_bytes()).is_err() {
                        return;
                    }
                    if v["method"] == "mining.authorize" {
                        let diff = json!({"id": null, "method": "mining.set_difficulty",
                            "params": [TINY]});
                        let _ = w.write_all(format!("{diff}\n{notify}\n").as_bytes());
                        stalled = true;
                    }
                }
                Err(_) => {}
            }
        }
    });
    let proxy = start_proxy("pxstall", &proxy_config(&[upstream], TINY));
    // The proxy takes miners once the upstream gave work, which the upstream gives and then
    // stops reading.
    let mut c = Client::connect(proxy.addr);
    let (_, n2) = c.login("farm.rig1");
    let job = latest_job(&mut c);
    let mut stream = c.stream.try_clone().unwrap();
    let reader = std::thread::spawn(move || {
        let mut r = BufReader::new(c.stream);
        r.get_ref()
            .set_read_timeout(Some(Duration::from_secs(60)))
            .unwrap();
        let (mut accepted, mut above, mut other) = (0u64, 0u64, 0u64);
        while accepted + above + other < SHARES {
            let mut line = String::new();
            match r.read_line(&mut line) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    let v: Value = serde_json::from_str(line.trim()).unwrap_or(Value::Null);
                    if v["id"].as_u64().is_some_and(|id| id >= 1000) {
                        if v["result"] == true {
                            accepted += 1;
                        } else if v["reject-reason"] == "Above target" {
                            // 2^-32 is not quite every hash: one in 65,536 misses it.
                            above += 1;
                        } else {
                            other += 1;
                        }
                    }
                }
            }
        }
        (accepted, above, other)
    });
    // Every hash is a share at 2^-32, and at the upstream's 2^-32 every share goes up.
    let mut batch = String::new();
    for i in 1..=SHARES {
        let en2 = format!("{:0w$x}", i, w = n2 * 2);
        let line = json!({"id": 999 + i, "method": "mining.submit",
            "params": ["farm.rig1", job.job_id, en2, format!("{:08x}", job.ntime), format!("{i:08x}")]});
        batch.push_str(&format!("{line}\n"));
        if i % 500 == 0 {
            stream.write_all(batch.as_bytes()).unwrap();
            batch.clear();
        }
    }
    let (accepted, above, other) = reader.join().unwrap();
    assert_eq!(accepted + above, SHARES, "the proxy's answers");
    assert_eq!(other, 0, "unexpected answers");
    assert!(above <= 5, "{above} above target");
    // The upstream has read nothing yet: the shares are in the socket, the link's queue and
    // the proxy's backlog. Now it reads.
    resume_tx.send(()).unwrap();
    let mut got = (0, 0);
    let end = std::time::Instant::now() + Duration::from_secs(120);
    while got.0 < accepted && std::time::Instant::now() < end {
        if let Ok(c) = count_rx.recv_timeout(Duration::from_millis(500)) {
            got = c;
        }
    }
    assert_eq!(got.0, accepted, "shares that reached the upstream");
    assert_eq!(got.1, accepted, "in the order the miner sent them");
    let up = wait_stats(&proxy, "every verdict counted", WAIT, |s| {
        s["upstreams"]["servers"][0]["accepted"].as_u64() == Some(accepted)
    });
    assert_eq!(up["upstreams"]["dropped"], 0, "{}", up["upstreams"]);
}
