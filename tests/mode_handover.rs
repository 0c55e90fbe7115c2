//! `-H` in the other modes, end to end against a real regtest node: a passthrough (`-P`) in
//! front of a ckpool-rs pool hands its miners and its upstream link over, and the pool sees the
//! same link throughout; a passthrough whose new instance dies half way serves on with both; a
//! redirector (`-R`) and a node (`-N`) carry their own state along; a passthrough with its
//! upstream down refuses `-H` plainly; a proxy (`-p`) and a userproxy (`-u`) hand their
//! miners and every upstream connection over, the upstream pool seeing the same connections. The suite runs again with
//! `POOL_BACKEND=epoll`, which the processes inherit.
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
use std::time::{Duration, Instant};

use common::{Difficulty, Target};
use node::{RegtestNet, RegtestNode, WAIT, bitcoind_or_skip, wait_until};
use pool::{Client, PoolProcess, btcd_entry, free_port, regtest_config, wait_stats};
use serde_json::{Value, json};

/// Miners behind the passthrough.
const MINERS: usize = 6;

/// A raw miner behind the passthrough: its connection, session and the job it works on. Its
/// shares never meet the network target, so the chain (and the job) stays put.
struct RawMiner {
    c: Client,
    user: String,
    en1: String,
    n2: usize,
    job: loadtest::work::Job,
    next: u64,
    next_id: u64,
}

impl RawMiner {
    fn connect(addr: SocketAddr, user: &str) -> Self {
        Self::login(Client::connect(addr), user)
    }

    fn login(mut c: Client, user: &str) -> Self {
        let (en1, n2) = c.login(user);
        let v = c.wait_for("a mining.notify", WAIT, |v| v["method"] == "mining.notify");
        let job = loadtest::work::Job::from_notify_params(&v["params"]).unwrap();
        Self {
            c,
            user: user.to_owned(),
            en1,
            n2,
            job,
            next: 1,
            next_id: 100,
        }
    }

    /// A userproxy miner: it takes `mining.set_extranonce`, so its authorisation moves it to
    /// its user's own upstream connection; it works on what it is given there.
    fn connect_moving(addr: SocketAddr, user: &str) -> Self {
        let mut c = Client::connect(addr);
        c.send(&json!({"id": 1, "method": "mining.subscribe", "params": ["raw-test/1"]}));
        c.reply(1);
        c.send(&json!({"id": 3, "method": "mining.extranonce.subscribe", "params": []}));
        c.send(&json!({"id": 2, "method": "mining.authorize", "params": [user, "x"]}));
        assert_eq!(c.reply(2)["result"], true);
        let se = c.wait_for("mining.set_extranonce", WAIT, |v| {
            v["method"] == "mining.set_extranonce"
        });
        let pos = c
            .seen
            .iter()
            .position(|v| v["method"] == "mining.set_extranonce")
            .unwrap();
        // Only what came after the move counts from now on.
        c.seen = c.seen.split_off(pos + 1);
        let v = c.wait_for("a mining.notify", WAIT, |v| v["method"] == "mining.notify");
        let job = loadtest::work::Job::from_notify_params(&v["params"]).unwrap();
        Self {
            c,
            user: user.to_owned(),
            en1: se["params"][0].as_str().unwrap().to_owned(),
            n2: se["params"][1].as_u64().unwrap() as usize,
            job,
            next: 1,
            next_id: 100,
        }
    }

    /// Sends a fresh share on its job (without waiting); returns its id.
    fn send_share(&mut self) -> u64 {
        let job = self.job.clone();
        let en1 = hex::decode(&self.en1).unwrap();
        let en2 = loadtest::work::extranonce2_bytes(self.next, self.n2);
        self.next += 1;
        let net = Target::from_compact(job.nbits);
        let want: Target = Difficulty::MIN.target();
        let nonce = (0u32..)
            .find(|&n| {
                let h = job.share_hash(&en1, &en2, job.version, n);
                want.is_met_by(&h) && !net.is_met_by(&h)
            })
            .unwrap();
        let id = self.next_id;
        self.next_id += 1;
        self.c.send(&json!({"id": id, "method": "mining.submit",
            "params": [self.user, job.job_id, hex::encode(&en2), format!("{:08x}", job.ntime), format!("{nonce:08x}")]}));
        id
    }

    /// Submits a fresh share and asserts it is accepted.
    fn share_accepted(&mut self) {
        let id = self.send_share();
        let r = self.c.reply(id);
        assert_eq!(r["result"], true, "{}: {r}", self.user);
    }

    /// The connection is open, and the session is the one it had (no new subscribe answer, no
    /// reconnect or extranonce change was sent to it).
    fn assert_same_session(&mut self) {
        assert!(
            self.c.read_line().is_ok(),
            "{}: the connection was closed",
            self.user
        );
        for v in &self.c.seen {
            assert!(
                v["method"] != "mining.set_extranonce" && v["method"] != "client.reconnect",
                "{}: {v}",
                self.user
            );
        }
    }
}

/// A pool on `node` with a `passthroughserver` listener (returned).
fn pool_with_passthrough_port(node: &RegtestNode, tag: &str) -> (PoolProcess, SocketAddr) {
    pool_with_passthrough_port_in(node, tag, "inline")
}

/// [`pool_with_passthrough_port`] with the `handoff` variant given.
fn pool_with_passthrough_port_in(
    node: &RegtestNode,
    tag: &str,
    handoff: &str,
) -> (PoolProcess, SocketAddr) {
    let payout = node.new_address();
    let (direct, link) = (free_port(), free_port());
    let mut config = regtest_config(vec![btcd_entry(node)], Some(&payout), direct);
    config["passthroughserver"] = json!([format!("127.0.0.1:{link}")]);
    config["handoff"] = json!(handoff);
    let pool = PoolProcess::start(tag, &config, &[]);
    (pool, SocketAddr::from(([127, 0, 0, 1], link)))
}

/// A passthrough (`-P`) in front of `upstream`, once its link is up.
fn start_passthrough(tag: &str, upstream: SocketAddr) -> PoolProcess {
    let config = json!({
        "serverurl": [format!("127.0.0.1:{}", free_port())],
        "proxy": [{"url": upstream.to_string(), "auth": "unused", "pass": "x"}],
        "threads": 2,
        "zmqblock": null,
    });
    let pt = PoolProcess::start(tag, &config, &["-P"]);
    wait_stats(&pt, "the passthrough's upstream to be up", WAIT, |s| {
        s["upstream"]["state"] == "up"
    });
    pt
}

/// The pool's connector counters: (connections accepted ever, closed ever).
fn pool_connections(pool: &PoolProcess) -> (u64, u64) {
    let v: Value = serde_json::from_str(&pool.admin("connectorstats").unwrap()).unwrap();
    (
        v["clients"]["generated"].as_u64().unwrap(),
        v["dead"]["generated"].as_u64().unwrap(),
    )
}

/// The pool's passthrough links: `[(peer, subclients)]`. (The pool's connector counts the
/// link and the start-up probe of its ordinary port.)
fn pool_links(pool: &PoolProcess) -> Vec<(String, u64)> {
    pool.stats()["passthroughs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            (
                l["peer"].as_str().unwrap().to_owned(),
                l["subclients"].as_u64().unwrap(),
            )
        })
        .collect()
}

fn exited(p: &mut PoolProcess, what: &str) -> std::process::ExitStatus {
    p.wait_exit(WAIT)
        .unwrap_or_else(|| panic!("{what} did not exit; log:\n{}", p.log_text()))
}

/// What the pool saw of the passthrough: its links (`[(peer, subclients)]`) and its connector's
/// counters.
type PoolView = (Vec<(String, u64)>, (u64, u64));

/// A pool, a passthrough in front of it with [`MINERS`] miners that got a share accepted, and
/// the pool's view of the link once it counts them all.
fn passthrough_with_miners(
    tag: &str,
    node: &RegtestNode,
) -> (PoolProcess, PoolProcess, Vec<RawMiner>, PoolView) {
    passthrough_with_miners_in(tag, node, "inline")
}

/// [`passthrough_with_miners`] with the pool's `handoff` variant given.
fn passthrough_with_miners_in(
    tag: &str,
    node: &RegtestNode,
    handoff: &str,
) -> (PoolProcess, PoolProcess, Vec<RawMiner>, PoolView) {
    let (pool, link_addr) = pool_with_passthrough_port_in(node, &format!("{tag}-pool"), handoff);
    let pt = start_passthrough(&format!("{tag}-pt"), link_addr);
    let mut ms: Vec<RawMiner> = (0..MINERS)
        .map(|i| RawMiner::connect(pt.addr, &format!("{tag}.{i}")))
        .collect();
    for m in &mut ms {
        m.share_accepted();
    }
    wait_stats(&pool, "the miners as the link's sub-clients", WAIT, |s| {
        s["passthroughs"][0]["subclients"] == MINERS && s["clients"] == MINERS
    });
    let links = pool_links(&pool);
    assert_eq!(links.len(), 1, "{links:?}");
    let conns = pool_connections(&pool);
    (pool, pt, ms, (links, conns))
}

/// The passthrough is upgraded with `-H` while its miners submit: every miner keeps its
/// connection and session, every share sent across the upgrade is answered and accepted, and
/// the pool saw the same link throughout (one connection ever, the same peer, no sub-client
/// ended).
#[test]
fn passthrough_handover_keeps_the_miners_and_the_upstream_link() {
    let tag = "passthrough_handover_keeps_the_miners_and_the_upstream_link";
    let Some(exe) = bitcoind_or_skip(tag) else {
        return;
    };
    let net = RegtestNet::start(&exe, 2);
    let (pool, mut old, mut ms, (links, conns)) = passthrough_with_miners("mho-pt", &net.nodes[0]);

    let t0 = Instant::now();
    let mut new = old.spawn_sibling(&["-P", "-H"], &[], "new.log");
    let mut pending: Vec<Vec<u64>> = vec![Vec::new(); ms.len()];
    while old.is_running() {
        assert!(
            t0.elapsed() < WAIT,
            "the old passthrough did not hand over; old log:\n{}\nnew log:\n{}",
            old.log_text(),
            new.log_text()
        );
        for (m, p) in ms.iter_mut().zip(&mut pending) {
            if p.len() < 30 {
                p.push(m.send_share());
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let status = exited(&mut old, "the old passthrough");
    assert!(status.success(), "{status}; log:\n{}", old.log_text());
    assert!(new.is_running(), "new log:\n{}", new.log_text());
    wait_until("the new passthrough's pid file", WAIT, || {
        new.pidfile_pid() == Some(new.pid())
    });
    assert_eq!(new.admin("ping").as_deref(), Some("pong"));

    // Every share sent across the upgrade was answered, and accepted, on the same connection.
    for (m, ids) in ms.iter_mut().zip(&pending) {
        for id in ids {
            let r = m.c.reply(*id);
            assert_eq!(r["result"], true, "{}: {r}", m.user);
        }
    }
    // And after it.
    for m in &mut ms {
        m.share_accepted();
        m.assert_same_session();
    }
    let across: usize = pending.iter().map(Vec::len).sum();
    assert!(across >= MINERS, "only {across} shares across the upgrade");

    // The pool saw nothing: the same link (no connection accepted or closed since, the same
    // peer), and every sub-client still there.
    assert_eq!(pool_connections(&pool), conns);
    assert_eq!(pool_links(&pool), links);
    let stats = pool.stats();
    assert_eq!(stats["clients"], MINERS, "{stats}");
    let log = old.log_text();
    assert!(log.contains("handover committed"), "old log:\n{log}");
    let newlog = new.log_text();
    assert!(
        newlog.contains(&format!(
            "handover: took the running instance over miners={MINERS}"
        )),
        "new log:\n{newlog}"
    );
    // No replay: the new instance did not re-establish anyone.
    let s = new.stats();
    assert_eq!(s["upstream"]["state"], "up", "{s}");
    assert_eq!(s["miners"], MINERS, "{s}");
    assert_eq!(s["replayed"], 0, "{s}");
    // A miner that comes now is served by the new instance through the same link.
    let mut late = RawMiner::connect(new.addr, "mho-pt.late");
    late.share_accepted();
    assert_eq!(pool_connections(&pool), conns);
}

/// The pool behind a passthrough is upgraded with `-H` while the passthrough's miners submit:
/// the link is handed over with every sub-client's session, so the passthrough's upstream
/// never goes down (no failover, no replay), every miner keeps its session, every share sent
/// across the upgrade is answered and accepted, and the new pool lists the link with all its
/// sub-clients.
#[test]
fn pool_handover_carries_a_passthrough_link_with_its_subclients() {
    pool_handover_with_a_link(
        "pool_handover_carries_a_passthrough_link_with_its_subclients",
        "inline",
    );
}

/// The same with the pool's stratifier on threads of its own (`handoff` `queue`).
#[test]
fn pool_handover_carries_a_passthrough_link_with_its_subclients_queue() {
    pool_handover_with_a_link(
        "pool_handover_carries_a_passthrough_link_with_its_subclients_queue",
        "queue",
    );
}

fn pool_handover_with_a_link(tag: &str, handoff: &str) {
    let Some(exe) = bitcoind_or_skip(tag) else {
        return;
    };
    let net = RegtestNet::start(&exe, 2);
    let (mut old, pt, mut ms, (links, _)) =
        passthrough_with_miners_in(&format!("mho-pl-{handoff}"), &net.nodes[0], handoff);
    let pt_before = pt.stats();
    assert_eq!(pt_before["replayed"], 0, "{pt_before}");

    let t0 = Instant::now();
    let mut new = old.spawn_sibling(&["-H"], &[], "new.log");
    let mut pending: Vec<Vec<u64>> = vec![Vec::new(); ms.len()];
    while old.is_running() {
        assert!(
            t0.elapsed() < WAIT,
            "the old pool did not hand over; old log:\n{}\nnew log:\n{}",
            old.log_text(),
            new.log_text()
        );
        for (m, p) in ms.iter_mut().zip(&mut pending) {
            if p.len() < 30 {
                p.push(m.send_share());
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let status = exited(&mut old, "the old pool");
    assert!(status.success(), "{status}; log:\n{}", old.log_text());
    assert!(new.is_running(), "new log:\n{}", new.log_text());
    wait_until("the new pool's pid file", WAIT, || {
        new.pidfile_pid() == Some(new.pid())
    });
    // Every share sent across the upgrade was answered, and accepted.
    for (m, ids) in ms.iter_mut().zip(&pending) {
        for id in ids {
            let r = m.c.reply(*id);
            assert_eq!(r["result"], true, "{}: {r}", m.user);
        }
    }
    for m in &mut ms {
        m.share_accepted();
        m.assert_same_session();
    }
    let across: usize = pending.iter().map(Vec::len).sum();
    assert!(across >= MINERS, "only {across} shares across the upgrade");
    // The new pool has the same link with every sub-client.
    assert_eq!(pool_links(&new), links);
    let stats = new.stats();
    assert_eq!(stats["clients"], MINERS, "{stats}");
    let newlog = new.log_text();
    assert!(
        newlog.contains("handover: passthrough link adopted with its sub-clients"),
        "new log:\n{newlog}"
    );
    // The passthrough saw nothing: its upstream never went down and nobody was replayed.
    let s = pt.stats();
    assert_eq!(s["upstream"]["state"], "up", "{s}");
    assert_eq!(s["replayed"], 0, "{s}");
    assert_eq!(s["replay_closed"], 0, "{s}");
    assert_eq!(s["miners"], MINERS, "{s}");
    assert!(
        !pt.log_text().contains("upstream down"),
        "passthrough log:\n{}",
        pt.log_text()
    );
    // A miner that comes now is served through the same link.
    let mut late = RawMiner::connect(pt.addr, &format!("mho-pl-{handoff}.late"));
    late.share_accepted();
    wait_stats(&new, "the late miner as a sub-client", WAIT, |s| {
        s["passthroughs"][0]["subclients"] == MINERS + 1
    });
}

/// The new passthrough dies after the link and the first batch reached it: the old one takes
/// its miners back, reads from the same link again, and serves on.
#[test]
fn passthrough_new_instance_dying_mid_handover_leaves_the_old_serving() {
    let tag = "passthrough_new_instance_dying_mid_handover_leaves_the_old_serving";
    let Some(exe) = bitcoind_or_skip(tag) else {
        return;
    };
    let net = RegtestNet::start(&exe, 2);
    let (pool, old, mut ms, (links, conns)) = passthrough_with_miners("mho-die", &net.nodes[0]);
    let mut new = old.spawn_sibling(
        &["-P", "-H"],
        &[("CKPOOL_RS_HANDOVER_TEST_EXIT_AFTER_BATCHES", "1")],
        "new.log",
    );
    let status = exited(&mut new, "the dying passthrough");
    assert_eq!(status.code(), Some(86), "new log:\n{}", new.log_text());
    wait_until("the old passthrough to take its miners back", WAIT, || {
        old.log_text().contains("handover failed; serving on")
    });
    let log = old.log_text();
    // Every miner, and the upstream link's connection (its connector thread reads it).
    assert!(
        log.contains(&format!("taken_back={}", MINERS + 1)),
        "old log:\n{log}"
    );
    assert_eq!(old.pidfile_pid(), Some(old.pid()));
    for m in &mut ms {
        m.share_accepted();
        m.assert_same_session();
    }
    assert_eq!(pool_connections(&pool), conns);
    assert_eq!(pool_links(&pool), links);
    let mut late = RawMiner::connect(old.addr, "mho-die.late");
    late.share_accepted();
}

/// A raw stratum client connected to `to` from the loopback address `src` (the redirector's
/// stickiness is per source address).
fn connect_from(src: std::net::IpAddr, to: SocketAddr) -> Client {
    use rustix::net::{AddressFamily, SocketType, bind, connect, socket};
    let fd = socket(AddressFamily::INET, SocketType::STREAM, None).unwrap();
    bind(&fd, &SocketAddr::new(src, 0)).unwrap();
    connect(&fd, &to).unwrap();
    let stream = std::net::TcpStream::from(fd);
    stream
        .set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    Client::from_stream(stream)
}

fn reconnects(c: &Client) -> Vec<Value> {
    c.seen
        .iter()
        .filter(|v| v["method"] == "client.reconnect")
        .cloned()
        .collect()
}

/// A redirector (`-R`) hands over like a passthrough, with what it knows: a miner watched
/// before the upgrade is redirected after it on its first accepted share, to the next address
/// round-robin; an IP redirected before the upgrade sticks to its address after it; the pool
/// sees the same link throughout.
#[test]
fn redirector_handover_keeps_its_watch_and_ip_table() {
    let tag = "redirector_handover_keeps_its_watch_and_ip_table";
    let Some(exe) = bitcoind_or_skip(tag) else {
        return;
    };
    let net = RegtestNet::start(&exe, 2);
    let (pool, link_addr) = pool_with_passthrough_port(&net.nodes[0], "mho-rd-pool");
    let (a, b) = (free_port(), free_port());
    let config = json!({
        "serverurl": [format!("127.0.0.1:{}", free_port())],
        "proxy": [{"url": link_addr.to_string(), "auth": "unused", "pass": "x"}],
        "redirecturl": [format!("127.0.0.1:{a}"), format!("localhost:{b}")],
        "threads": 2,
        "zmqblock": null,
    });
    let mut old = PoolProcess::start("mho-rd", &config, &["-R"]);
    wait_stats(&old, "the redirector's upstream to be up", WAIT, |s| {
        s["upstream"]["state"] == "up"
    });
    let first = json!(["127.0.0.1", a.to_string(), 0]);
    let second = json!(["localhost", b.to_string(), 0]);
    // Miner A (127.0.0.1): redirected to the first address after its accepted share.
    let mut ma = RawMiner::connect(old.addr, "rdA.1");
    ma.share_accepted();
    let r = ma.c.wait_for("client.reconnect", WAIT, |v| {
        v["method"] == "client.reconnect"
    });
    assert_eq!(r["params"], first, "{r}");
    // Miner C (127.0.0.2): watched, no share yet.
    let mut mc = RawMiner::login(connect_from([127, 0, 0, 2].into(), old.addr), "rdC.1");
    assert!(reconnects(&mc.c).is_empty(), "{:?}", mc.c.seen);
    wait_stats(&pool, "two sub-clients", WAIT, |s| {
        s["passthroughs"][0]["subclients"] == 2
    });
    let (links, conns) = (pool_links(&pool), pool_connections(&pool));

    let new = old.spawn_sibling(&["-R", "-H"], &[], "new.log");
    let status = exited(&mut old, "the old redirector");
    assert!(
        status.success(),
        "{status}; old log:
{}
new log:
{}",
        old.log_text(),
        new.log_text()
    );
    wait_until("the new redirector's pid file", WAIT, || {
        new.pidfile_pid() == Some(new.pid())
    });
    // C's first accepted share, after the upgrade: the next address.
    mc.share_accepted();
    let r = mc.c.wait_for("client.reconnect", WAIT, |v| {
        v["method"] == "client.reconnect"
    });
    assert_eq!(r["params"], second, "{r}");
    assert_eq!(reconnects(&mc.c).len(), 1);
    // A: redirected before, not again.
    ma.share_accepted();
    assert_eq!(reconnects(&ma.c).len(), 1, "{:?}", ma.c.seen);
    // B from 127.0.0.1: sent where A went as soon as it is authorised.
    let mut mb = Client::connect(new.addr);
    mb.login("rdB.1");
    let r = mb.wait_for("client.reconnect", WAIT, |v| {
        v["method"] == "client.reconnect"
    });
    assert_eq!(r["params"], first, "{r}");
    let s = wait_stats(&new, "the redirects counted", WAIT, |s| {
        s["redirect"]["redirected"] == 3
    });
    assert_eq!(s["mode"], "redirector", "{s}");
    assert_eq!(s["redirect"]["by_ip"], 1, "{s}");
    assert_eq!(s["redirect"]["ips"], 2, "{s}");
    assert_eq!(s["replayed"], 0, "{s}");
    // The same link at the pool, with B added.
    assert_eq!(pool_connections(&pool), conns);
    let now = pool_links(&pool);
    assert_eq!(now.len(), 1, "{now:?}");
    assert_eq!(now[0].0, links[0].0);
}

/// A node (`-N`, with its own bitcoind) hands over like a passthrough, with the jobs and
/// transactions it rebuilt from the pool's messages: the new node knows them at once (the pool
/// sends each transaction once, and a job only on a new template), its miner carries on, and
/// the pool sees the same link.
#[test]
fn node_handover_keeps_the_jobs_and_transactions_it_rebuilt() {
    let tag = "node_handover_keeps_the_jobs_and_transactions_it_rebuilt";
    let Some(exe) = bitcoind_or_skip(tag) else {
        return;
    };
    let net = RegtestNet::start(&exe, 2);
    let (pools_btcd, nodes_btcd) = (&net.nodes[0], &net.nodes[1]);
    // A transaction in the pool's template, so that the pool sends its node `transactions`.
    pools_btcd.generate(101);
    let to = pools_btcd.new_address();
    pools_btcd.rpc("sendtoaddress", json!([to, 1.0]));
    let payout = pools_btcd.new_address();
    let link = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let mut config = regtest_config(vec![btcd_entry(pools_btcd)], Some(&payout), free_port());
    config["nodeserver"] = json!([link.to_string()]);
    let pool = PoolProcess::start("mho-node-pool", &config, &[]);
    let config = json!({
        "serverurl": [format!("127.0.0.1:{}", free_port())],
        "proxy": [{"url": link.to_string(), "auth": "unused", "pass": "x"}],
        "btcd": [btcd_entry(nodes_btcd)],
        "blockpoll": 100,
        "zmqblock": null,
        "threads": 2,
    });
    let mut old = PoolProcess::start("mho-node", &config, &["-N"]);
    wait_stats(&old, "the node's jobs and transactions", WAIT, |s| {
        s["upstream"]["state"] == "up"
            && s["node"]["jobs"].as_u64() >= Some(1)
            && s["node"]["transactions"].as_u64() >= Some(1)
    });
    let mut m = RawMiner::connect(old.addr, "mho-node.1");
    m.share_accepted();
    let before = wait_stats(&old, "the node counting the share", WAIT, |s| {
        s["node"]["shares"].as_u64() >= Some(1)
    })["node"]
        .clone();
    wait_stats(&pool, "the node's miner at the pool", WAIT, |s| {
        s["passthroughs"][0]["subclients"] == 1
    });
    let (links, conns) = (pool_links(&pool), pool_connections(&pool));

    let mut new = old.spawn_sibling(&["-N", "-H"], &[], "new.log");
    let status = exited(&mut old, "the old node");
    assert!(
        status.success(),
        "{status}; old log:\n{}\nnew log:\n{}",
        old.log_text(),
        new.log_text()
    );
    wait_until("the new node's pid file", WAIT, || {
        new.pidfile_pid() == Some(new.pid())
    });
    let after = new.stats();
    assert_eq!(after["mode"], "node", "{after}");
    assert_eq!(after["upstream"]["state"], "up", "{after}");
    for k in ["jobs", "transactions", "workinfos", "shares"] {
        assert!(
            after["node"][k].as_u64() >= before[k].as_u64(),
            "{k}: before {before}, after {after}"
        );
    }
    assert!(after["node"]["transactions"].as_u64() >= Some(1), "{after}");
    m.share_accepted();
    m.assert_same_session();
    wait_stats(&new, "the new node counting the share", WAIT, |s| {
        s["node"]["shares"].as_u64() > before["shares"].as_u64()
    });
    assert_eq!(pool_connections(&pool), conns);
    assert_eq!(pool_links(&pool), links);
    assert!(new.is_running(), "new log:\n{}", new.log_text());
}

/// A passthrough whose upstream is down refuses to hand over (its link has no connection to
/// give): the new instance exits 1 saying why, the old one keeps `main.pid` and serves on.
#[test]
fn a_passthrough_with_its_upstream_down_refuses_to_hand_over() {
    // Nothing listens on the upstream's address; no node is needed.
    let upstream = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let config = json!({
        "serverurl": [format!("127.0.0.1:{}", free_port())],
        "proxy": [{"url": upstream.to_string(), "auth": "unused", "pass": "x"}],
        "threads": 2,
        "zmqblock": null,
    });
    let mut old = PoolProcess::start("mho-down", &config, &["-P"]);
    assert_eq!(old.stats()["upstream"]["state"], "down");
    let mut new = old.spawn_sibling(&["-P", "-H"], &[], "new.log");
    let status = exited(&mut new, "the -H passthrough");
    assert_eq!(status.code(), Some(1), "log:\n{}", new.log_text());
    let log = new.log_text();
    assert!(log.contains("the upstream link is down"), "log:\n{log}");
    wait_until("the old passthrough to serve on", WAIT, || {
        old.log_text().contains("handover failed; serving on")
    });
    assert!(old.is_running());
    assert_eq!(old.pidfile_pid(), Some(old.pid()));
    assert_eq!(old.admin("ping").as_deref(), Some("pong"));
}

/// Difficulty 2^-32: every hash is a share.
const TINY: f64 = 0.000_000_000_232_830_643_653_869_63;

/// The proxy's upstream connections from its admin stats.
fn up_conns(proxy: &PoolProcess) -> Vec<Value> {
    proxy.stats()["upstreams"]["connections"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

/// Upstream-accepted shares over every connection of the proxy.
fn up_accepted(proxy: &PoolProcess) -> u64 {
    up_conns(proxy)
        .iter()
        .map(|c| c["accepted"].as_u64().unwrap_or(0))
        .sum()
}

/// What the upstream pool saw of the proxy: its connector's counters and the connections
/// it lists (`[(id, user)]`, sorted).
fn upstream_view(pool: &PoolProcess) -> ((u64, u64), Vec<(u64, String)>) {
    let clients: Value = serde_json::from_str(&pool.admin("clients").unwrap()).unwrap();
    let mut list: Vec<(u64, String)> = clients["clients"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["id"].as_u64().unwrap_or(0),
                c["user"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect();
    list.sort();
    (pool_connections(pool), list)
}

/// A regtest pool and a proxy (`-p`, or `-u` with `userproxy`) in front of it, with a raw
/// miner per name in `users` that got a share accepted, once the upstream accepted one share
/// per miner.
fn proxy_with_miners(
    tag: &str,
    node: &RegtestNode,
    userproxy: bool,
    users: &[String],
) -> (PoolProcess, PoolProcess, Vec<RawMiner>) {
    let main_user = node.new_address();
    let pool = PoolProcess::start(
        &format!("{tag}-pool"),
        &regtest_config(vec![btcd_entry(node)], None, free_port()),
        &["-B"],
    );
    let config = json!({
        "proxy": [{"url": pool.addr.to_string(), "auth": main_user, "pass": "x"}],
        "serverurl": [format!("127.0.0.1:{}", free_port())],
        "mindiff": TINY,
        "startdiff": TINY,
        "maxupstreams": 3,
        "threads": 2,
    });
    let flag = if userproxy { "-u" } else { "-p" };
    let proxy = PoolProcess::start(&format!("{tag}-px"), &config, &[flag]);
    wait_until("the main upstream connection", WAIT, || {
        up_conns(&proxy).first().map(|c| c["state"].clone()) == Some(json!("active"))
    });
    let mut ms: Vec<RawMiner> = users
        .iter()
        .map(|u| {
            if userproxy {
                RawMiner::connect_moving(proxy.addr, u)
            } else {
                RawMiner::connect(proxy.addr, u)
            }
        })
        .collect();
    for m in &mut ms {
        m.share_accepted();
    }
    let want = ms.len() as u64;
    wait_until("the miners' shares accepted upstream", WAIT, || {
        up_accepted(&proxy) >= want
    });
    (pool, proxy, ms)
}

/// The proxy is upgraded with `-H` while its miners submit; every miner keeps its connection
/// and session, every share sent across the upgrade is answered and accepted, the upstream
/// pool saw the same connections throughout (no connection accepted or closed, the same ids
/// and users: no new subscribe or authorize), and the new proxy's upstream counters go on from
/// the old one's.
fn proxy_handover(tag: &str, userproxy: bool) {
    let Some(exe) = bitcoind_or_skip(tag) else {
        return;
    };
    let net = RegtestNet::start(&exe, 2);
    let node = &net.nodes[0];
    let users: Vec<String> = if userproxy {
        let (alice, bob) = (node.new_address(), node.new_address());
        vec![
            format!("{alice}.1"),
            format!("{alice}.2"),
            format!("{bob}.1"),
            format!("{bob}.2"),
        ]
    } else {
        (0..4).map(|i| format!("{tag}.{i}")).collect()
    };
    let (pool, mut old, mut ms) = proxy_with_miners(tag, node, userproxy, &users);
    let want_conns = if userproxy { 3 } else { 1 };
    wait_until("the proxy's upstream connections", WAIT, || {
        let c = up_conns(&old);
        c.len() == want_conns && c.iter().all(|c| c["state"] == "active")
    });
    let before = upstream_view(&pool);
    assert_eq!(before.1.len(), want_conns, "{before:?}");
    let accepted_before = up_accepted(&old);

    let flag = if userproxy { "-u" } else { "-p" };
    let t0 = Instant::now();
    let mut new = old.spawn_sibling(&[flag, "-H"], &[], "new.log");
    let mut pending: Vec<Vec<u64>> = vec![Vec::new(); ms.len()];
    while old.is_running() {
        assert!(
            t0.elapsed() < WAIT,
            "the old proxy did not hand over; old log:\n{}\nnew log:\n{}",
            old.log_text(),
            new.log_text()
        );
        for (m, p) in ms.iter_mut().zip(&mut pending) {
            if p.len() < 30 {
                p.push(m.send_share());
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let status = exited(&mut old, "the old proxy");
    assert!(status.success(), "{status}; log:\n{}", old.log_text());
    assert!(new.is_running(), "new log:\n{}", new.log_text());
    wait_until("the new proxy's pid file", WAIT, || {
        new.pidfile_pid() == Some(new.pid())
    });
    for (m, ids) in ms.iter_mut().zip(&pending) {
        for id in ids {
            let r = m.c.reply(*id);
            assert_eq!(r["result"], true, "{}: {r}", m.user);
        }
    }
    for m in &mut ms {
        m.share_accepted();
        m.assert_same_session();
    }
    let across: usize = pending.iter().map(Vec::len).sum();
    // Every share is at least the upstream's difficulty: all of them go up, and are accepted
    // there through the connections handed over.
    let total = accepted_before + across as u64 + ms.len() as u64;
    let end = Instant::now() + WAIT;
    while up_accepted(&new) < total {
        assert!(
            Instant::now() < end,
            "upstream accepted {} of {total} (before {accepted_before}, across {across}); upstreams {}; old log:\n{}\nnew log:\n{}",
            up_accepted(&new),
            new.stats()["upstreams"],
            old.log_text(),
            new.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let conns = up_conns(&new);
    assert_eq!(conns.len(), want_conns, "{conns:?}");
    assert!(conns.iter().all(|c| c["state"] == "active"), "{conns:?}");
    // The upstream pool saw nothing.
    assert_eq!(upstream_view(&pool), before);
    let newlog = new.log_text();
    assert!(
        newlog.contains(&format!(
            "handover: took the running instance over miners={}",
            ms.len()
        )),
        "new log:\n{newlog}"
    );
    // A miner that comes now is served by the new instance.
    let late_user = users[0].replace(".1", ".late");
    let mut late = if userproxy {
        RawMiner::connect_moving(new.addr, &late_user)
    } else {
        RawMiner::connect(new.addr, &late_user)
    };
    late.share_accepted();
    assert_eq!(upstream_view(&pool).0, before.0);
}

#[test]
fn proxy_handover_keeps_the_miners_and_the_upstream_connection() {
    proxy_handover("mho-pxho", false);
}

#[test]
fn userproxy_handover_keeps_every_users_upstream_connection() {
    proxy_handover("mho-upxho", true);
}

/// The new proxy dies after the state and the first batch reached it: the old one takes its
/// miners back, reads from the same upstream connection again, and serves on: its miners'
/// shares are accepted, locally and upstream, and the upstream pool saw nothing.
#[test]
fn proxy_new_instance_dying_mid_handover_leaves_the_old_serving() {
    let tag = "mho-pxdie";
    let Some(exe) = bitcoind_or_skip(tag) else {
        return;
    };
    let net = RegtestNet::start(&exe, 2);
    let users: Vec<String> = (0..4).map(|i| format!("mho-pxdie.{i}")).collect();
    let (pool, old, mut ms) = proxy_with_miners(tag, &net.nodes[0], false, &users);
    let before = upstream_view(&pool);
    let mut new = old.spawn_sibling(
        &["-p", "-H"],
        &[("CKPOOL_RS_HANDOVER_TEST_EXIT_AFTER_BATCHES", "1")],
        "new.log",
    );
    let status = exited(&mut new, "the dying proxy");
    assert_eq!(status.code(), Some(86), "new log:\n{}", new.log_text());
    wait_until("the old proxy to take its miners back", WAIT, || {
        old.log_text().contains("handover failed; serving on")
    });
    let log = old.log_text();
    assert!(
        log.contains(&format!("taken_back={}", ms.len())),
        "old log:\n{log}"
    );
    assert_eq!(old.pidfile_pid(), Some(old.pid()));
    let accepted = up_accepted(&old);
    for m in &mut ms {
        m.share_accepted();
        m.assert_same_session();
    }
    let want = accepted + ms.len() as u64;
    wait_until(
        "the shares after the failure accepted upstream",
        WAIT,
        || up_accepted(&old) >= want,
    );
    assert_eq!(upstream_view(&pool), before);
    let mut late = RawMiner::connect(old.addr, "mho-pxdie.late");
    late.share_accepted();
}
