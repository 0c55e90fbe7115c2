//! Hostile clients against the front-end modes: a passthrough (`-P`) and a proxy (`-p`), each in
//! front of a ckpool-rs pool on a regtest node, while an honest miner mines through the front end
//! beside them. Garbage and NUL bytes, non-UTF-8 bytes, a 10 MB line, deep nesting, huge numbers,
//! wrong types in every parameter, a never-reading client, subscribe-and-close churn and a connect
//! storm: the front end and the pool keep running, the honest miner keeps getting shares
//! accepted, and the front end's memory stays bounded. Without a node these print "skipped"
//! (locally) or fail (in CI).
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

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use loadtest::{Miner, MinerConfig};
use node::{RegtestNet, WAIT, bitcoind_or_skip, wait_until};
use pool::{Client, PoolProcess, btcd_entry, free_port, regtest_config};
use serde_json::json;

/// Difficulty 2^-32: every hash is a share.
const TINY: f64 = 0.000_000_000_232_830_643_653_869_63;

/// The process's resident set in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap()
}

fn honest_miner(addr: SocketAddr, user: &str) -> Miner {
    let mut cfg = MinerConfig::new(addr, user);
    cfg.duration = Some(Duration::from_secs(170));
    cfg.max_shares_per_sec = 10.0;
    cfg.pause_after_block = true;
    let m = Miner::start(cfg).unwrap();
    wait_until("the honest miner to get shares accepted", WAIT, || {
        m.report().accepted >= 3
    });
    m
}

/// Writes `bytes` to a fresh connection and reads what comes back until the server closes it or
/// `quiet` passes with nothing read; true if it closed.
fn poke(addr: SocketAddr, bytes: &[u8], quiet: Duration) -> bool {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
    // A server may close before taking everything (a line too long): that is an answer too.
    let _ = s.write_all(bytes);
    let mut buf = [0u8; 65536];
    let mut last = Instant::now();
    let end = Instant::now() + WAIT;
    while Instant::now() < end && last.elapsed() < quiet {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => last = Instant::now(),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return true,
        }
    }
    false
}

/// Every hostile input above against `front` (a running front end), then checks that the honest
/// miner (mining through `front`) kept going, and both processes run.
fn hostile_round(front: &mut PoolProcess, pool: &mut PoolProcess, honest: &Miner) {
    let addr = front.addr;
    let rss_before = rss_kib(front.pid());
    let quiet = Duration::from_millis(300);

    // Garbage, NUL bytes and non-UTF-8 bytes, then a valid request on the same connection.
    let mut c = Client::connect(addr);
    c.send_raw(b"\0\0\0garbage\xff\xfe\n{not json}\n\x00{\"id\":\n[]\n\"str\"\n");
    c.send(&json!({"id": 7, "method": "mining.configure", "params": [[], {}]}));
    let _ = c.wait_closed(quiet);
    // Non-UTF-8 and overlong names, wrong types in every parameter, huge numbers.
    let mut lines: Vec<Vec<u8>> = vec![
        b"{\"id\":1,\"method\":\"mining.subscribe\",\"params\":[\"\xff\xfe\xfd\"]}\n".to_vec(),
        b"{\"id\":2,\"method\":\"mining.authorize\",\"params\":[\"\xc3\x28.w\",\"x\"]}\n".to_vec(),
    ];
    for v in [
        json!({"id": 3, "method": "mining.subscribe", "params": {"a": 1}}),
        json!({"id": 4, "method": "mining.authorize", "params": [1, 2]}),
        json!({"id": 5, "method": "mining.authorize", "params": ["u".repeat(3000), null]}),
        json!({"id": 6, "method": "mining.submit", "params": [null, [], {}, 1.5, -1]}),
        json!({"id": 7, "method": "mining.submit", "params": ["u", "ffffffffffffffffffff", "zz", "0", "0"]}),
        json!({"id": 8, "method": "mining.suggest_difficulty", "params": ["x"]}),
        json!({"id": 9, "method": "mining.configure", "params": [["version-rolling"], {"version-rolling.mask": 7}]}),
        json!({"id": 10, "method": 17, "params": []}),
        json!({"id": [1, 2], "method": "mining.extranonce.subscribe", "params": "x"}),
        json!({"id": 11, "method": "mining.get_transactions", "params": [{}]}),
    ] {
        lines.push(format!("{v}\n").into_bytes());
    }
    lines.push(
        b"{\"id\":1e400,\"method\":\"mining.suggest_difficulty\",\"params\":[1e999]}\n".to_vec(),
    );
    lines.push(
        b"{\"id\":12,\"method\":\"mining.submit\",\"params\":[\"u\",\"1\",\"00\",\"99999999999999999999999999\",\"-0\"]}\n"
            .to_vec(),
    );
    for l in &lines {
        poke(addr, l, Duration::from_millis(100));
    }
    let all: Vec<u8> = lines.concat();
    poke(addr, &all, quiet);

    // Deep nesting inside a request.
    let deep = format!(
        "{{\"id\":1,\"method\":\"mining.subscribe\",\"params\":{}{}}}\n",
        "[".repeat(100_000),
        "]".repeat(100_000)
    );
    poke(addr, deep.as_bytes(), quiet);

    // A 10 MB line: closed.
    let big = vec![b'a'; 10 << 20];
    assert!(
        poke(addr, &big, Duration::from_secs(10)),
        "a 10 MB line did not close its connection"
    );

    // A never-reading client asking for replies as fast as it can, with a tiny receive buffer.
    let never = TcpStream::connect(addr).unwrap();
    {
        let fd = std::os::fd::AsRawFd::as_raw_fd(&never);
        let size: libc::c_int = 4096;
        // SAFETY: `fd` is an open socket and `size` outlives the call.
        unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_RCVBUF,
                (&raw const size).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            );
        }
    }
    never
        .set_write_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut w = &never;
    let _ = w.write_all(b"{\"id\":1,\"method\":\"mining.subscribe\",\"params\":[]}\n");
    let req = b"{\"id\":2,\"method\":\"mining.configure\",\"params\":[[],{}]}\n".repeat(1000);
    let end = Instant::now() + Duration::from_secs(10);
    while Instant::now() < end {
        if w.write_all(&req).is_err() {
            // The server stopped reading from it, or closed it.
            break;
        }
    }
    drop(never);

    // Subscribe-and-close churn, and a storm of connections held at once.
    for i in 0..200u32 {
        let mut s = TcpStream::connect(addr).unwrap();
        let _ = s.write_all(
            format!("{{\"id\":1,\"method\":\"mining.subscribe\",\"params\":[\"churn/{i}\"]}}\n")
                .as_bytes(),
        );
    }
    let storm: Vec<TcpStream> = (0..300)
        .filter_map(|_| TcpStream::connect(addr).ok())
        .collect();
    drop(storm);

    // Through all of it: both processes run, the honest miner keeps mining, and the front end
    // holds no more than a bounded amount of memory.
    assert!(
        front.is_running(),
        "the front end died:\n{}",
        front.log_text()
    );
    assert!(pool.is_running(), "the pool died:\n{}", pool.log_text());
    let before = honest.report().accepted;
    wait_until(
        "the honest miner to keep getting shares accepted",
        WAIT,
        || honest.report().accepted > before + 3,
    );
    let rss_after = rss_kib(front.pid());
    assert!(
        rss_after < rss_before + 64 * 1024,
        "the front end grew from {rss_before} KiB to {rss_after} KiB"
    );
    let mut ok = Client::connect(addr);
    ok.send(&json!({"id": 1, "method": "mining.subscribe", "params": ["late/1"]}));
    assert!(ok.reply(1)["result"].is_array(), "{:?}", ok.seen);
}

#[test]
fn a_passthrough_serves_on_beside_hostile_miners() {
    let Some(exe) = bitcoind_or_skip("a_passthrough_serves_on_beside_hostile_miners") else {
        return;
    };
    let net = RegtestNet::start(&exe, 2);
    let node = &net.nodes[0];
    let payout = node.new_address();
    let link = free_port();
    let mut config = regtest_config(vec![btcd_entry(node)], Some(&payout), free_port());
    config["passthroughserver"] = json!([format!("127.0.0.1:{link}")]);
    let mut pool = PoolProcess::start("hm-pt-pool", &config, &[]);
    let pt_config = json!({
        "serverurl": [format!("127.0.0.1:{}", free_port())],
        "proxy": [{"url": format!("127.0.0.1:{link}"), "auth": "unused", "pass": "x"}],
        "threads": 2,
        "zmqblock": null,
        "maxlinelength": 16384,
    });
    let mut pt = PoolProcess::start("hm-pt", &pt_config, &["-P"]);
    pool::wait_stats(&pt, "the upstream to be up", WAIT, |s| {
        s["upstream"]["state"] == "up"
    });
    let honest = honest_miner(pt.addr, "honest.1");
    hostile_round(&mut pt, &mut pool, &honest);
    let stats = pt.stats();
    assert_eq!(stats["upstream"]["state"], "up", "{stats}");
    let report = honest.stop();
    assert!(
        report.reject_reasons.keys().all(|r| r == "Stale") && report.rejected <= 3,
        "{report:?}"
    );
}

#[test]
fn a_proxy_serves_on_beside_hostile_miners() {
    let Some(exe) = bitcoind_or_skip("a_proxy_serves_on_beside_hostile_miners") else {
        return;
    };
    let net = RegtestNet::start(&exe, 2);
    let node = &net.nodes[0];
    let payout = node.new_address();
    let config = regtest_config(vec![btcd_entry(node)], Some(&payout), free_port());
    let mut pool = PoolProcess::start("hm-px-pool", &config, &[]);
    let px_config = json!({
        "proxy": [{"url": pool.addr.to_string(), "auth": "proxyuser", "pass": "x"}],
        "serverurl": [format!("127.0.0.1:{}", free_port())],
        "mindiff": TINY,
        "startdiff": TINY,
        "threads": 2,
        "maxlinelength": 16384,
    });
    let mut px = PoolProcess::start("hm-px", &px_config, &["-p"]);
    let honest = honest_miner(px.addr, "honest.1");
    hostile_round(&mut px, &mut pool, &honest);
    let report = honest.stop();
    assert!(
        report.reject_reasons.keys().all(|r| r == "Stale") && report.rejected <= 3,
        "{report:?}"
    );
}
