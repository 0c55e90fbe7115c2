//! Stats that survive a restart, end to end against a real regtest node: a pool with a miner
//! mining is stopped with SIGTERM (which writes the stats files a last time) and started again
//! on the same log directory; right after, the admin `stats`, the web API and the rewritten
//! files show the same share totals and best shares, and hashrates equal to the saved ones
//! decayed by the time since they were saved (bounds computed from the measured times). A
//! garbage user file is skipped with a warning. Without a node these print "skipped" (locally)
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

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use loadtest::{Miner, MinerConfig};
use node::{RegtestNet, RegtestNode, WAIT, bitcoind_or_skip, wait_until};
use pool::{PoolProcess, btcd_entry, free_port, regtest_config, temp_dir, wait_stats};
use serde_json::{Value, json};

/// Unix time now, in seconds with a fraction.
fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// A pool on `node` writing its stats files every second into `logdir`, with a web listener.
fn config(node: &RegtestNode, logdir: &Path, web: SocketAddr) -> Value {
    let mut c = regtest_config(
        vec![btcd_entry(node)],
        Some(&node.new_address()),
        free_port(),
    );
    c["logdir"] = json!(logdir.display().to_string());
    c["statsupdate"] = json!(1);
    c["webserver"] = json!(web.to_string());
    c
}

/// One HTTP/1.0 GET; the body as JSON.
fn get_json(addr: SocketAddr, path: &str) -> Value {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: test\r\n\r\n").unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").expect("an HTTP response");
    assert!(
        head.starts_with("HTTP/1.0 200") || head.starts_with("HTTP/1.1 200"),
        "{head}"
    );
    serde_json::from_str(body).unwrap_or_else(|e| panic!("GET {path}: {e}: {body}"))
}

/// A file's text and modification time (unix seconds), read whole between two looks at the
/// same inode and time (the pool replaces its files by renaming); `None` if it is not there.
fn read_stable(path: &Path) -> Option<(String, f64)> {
    loop {
        let before = std::fs::metadata(path).ok()?;
        let text = std::fs::read_to_string(path).ok()?;
        let after = std::fs::metadata(path).ok()?;
        if before.ino() == after.ino() && before.modified().ok() == after.modified().ok() {
            let t = after.modified().ok()?.duration_since(UNIX_EPOCH).ok()?;
            return Some((text, t.as_secs_f64()));
        }
    }
}

/// The three lines of a `pool.status`.
fn pool_status(text: &str) -> [Value; 3] {
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3, "{text}");
    [lines[0].clone(), lines[1].clone(), lines[2].clone()]
}

/// A hashrate as the files write it (`"1.23k"`, `"0.055"`).
fn rate(v: &Value) -> f64 {
    let s = v.as_str().unwrap_or_else(|| panic!("not a string: {v}"));
    let (num, scale) = match s.chars().last().unwrap() {
        'k' => (&s[..s.len() - 1], 1e3),
        'M' => (&s[..s.len() - 1], 1e6),
        'G' => (&s[..s.len() - 1], 1e9),
        'T' => (&s[..s.len() - 1], 1e12),
        _ => (s, 1.0),
    };
    num.parse::<f64>().unwrap() * scale
}

/// How far a hashrate written as a string can be from the figure behind it: three
/// significant digits, or three decimals below 1.
fn rounding(v: f64) -> f64 {
    if v < 1.0 { 0.0005 } else { v * 0.005 }
}

/// Asserts that `got` is `saved` (a figure read from a file, so rounded) decayed over a window
/// of `window` seconds for between `dmin` and `dmax` seconds; `got_rounded` when `got` was read
/// from a file too.
fn assert_decayed(
    what: &str,
    saved: f64,
    got: f64,
    window: f64,
    (dmin, dmax): (f64, f64),
    got_rounded: bool,
) {
    assert!(dmin >= 0.0 && dmax >= dmin, "{what}: gap {dmin}..{dmax}");
    let slack = if got_rounded { rounding(got) } else { 0.0 };
    let lo = (saved - rounding(saved)) * (-dmax / window).exp() - slack;
    let hi = (saved + rounding(saved)) * (-dmin / window).exp() + slack;
    assert!(
        lo <= got && got <= hi,
        "{what}: {got} is not {saved} decayed by {dmin:.2}..{dmax:.2} s over {window} s ({lo}..{hi})"
    );
}

#[test]
fn stats_survive_a_restart_decayed_by_the_gap() {
    let Some(exe) = bitcoind_or_skip("stats_survive_a_restart_decayed_by_the_gap") else {
        return;
    };
    let net = RegtestNet::start(&exe, 2);
    let node = &net.nodes[0];
    let logdir = temp_dir("restart-logs");
    let users = logdir.join("users");
    let status_path = logdir.join("pool/pool.status");

    // The first pool, with a miner for a few seconds.
    let web1: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let mut first = PoolProcess::start("restart1", &config(node, &logdir, web1), &[]);
    let mut cfg = MinerConfig::new(first.addr, "restart.rig1");
    cfg.duration = Some(Duration::from_secs(60));
    cfg.max_shares_per_sec = 50.0;
    let miner = Miner::start(cfg).unwrap();
    wait_until("150 accepted shares", WAIT, || {
        miner.report().accepted >= 150
    });
    let report = miner.stop();
    assert!(report.blocks_accepted >= 1, "{report:?}");
    let before = wait_stats(&first, "the pool to count every share", WAIT, |s| {
        s["accepted"].as_u64() == Some(report.accepted)
    });
    assert!(before["bestever"].as_f64().unwrap() > 0.0, "{before}");
    first.signal(libc::SIGTERM);
    let status = first
        .wait_exit(Duration::from_secs(10))
        .expect("the pool still runs 10 s after SIGTERM");
    assert_eq!(status.code(), Some(0), "exit status {status}");

    // What it saved at shutdown.
    let (saved_status, _) = read_stable(&status_path).expect("pool.status");
    let [s1, s2, s3] = pool_status(&saved_status);
    let lastupdate = s1["lastupdate"].as_f64().unwrap();
    let (saved_user, _) = read_stable(&users.join("restart")).expect("users/restart");
    let saved_user: Value = serde_json::from_str(&saved_user).unwrap();
    println!("saved:\n{saved_status}{saved_user:#}");
    assert!(saved_user["shares"].as_f64().unwrap() > 0.0, "{saved_user}");
    assert!(
        saved_user["bestever"].as_f64().unwrap() > 0.0,
        "{saved_user}"
    );
    assert!(rate(&saved_user["hashrate1m"]) > 0.0, "{saved_user}");
    assert!(rate(&s2["hashrate1m"]) > 0.0, "{saved_status}");
    let saved_worker = &saved_user["worker"][0];
    assert_eq!(saved_worker["workername"], "restart.rig1");
    // A garbage user file: skipped with a warning, not fatal.
    std::fs::write(users.join("garbage"), b"{\"hashrate1m\": \x00\xff").unwrap();

    // Down for at least 4 s after the save, so that the decay is well beyond the rounding of
    // the saved figures (a 1-minute rate loses 6.5% in 4 s, rounding is at most 0.5%).
    let down_until = lastupdate + 4.0;
    while unix_now() < down_until {
        std::thread::sleep(Duration::from_millis(50));
    }

    // The second pool, on the same log directory, and no miner.
    let web2: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let spawned = unix_now();
    let second = PoolProcess::start("restart2", &config(node, &logdir, web2), &[]);
    let asked = unix_now();
    let after = second.stats();
    let answered = unix_now();
    // The figures are as of the last rate sample: at most 2 s (and some slack) before the
    // question, and not before the pool started.
    let gap = |t0: f64, t1: f64| ((t0 - 2.5).max(spawned) - lastupdate, t1 - lastupdate);
    println!("gap at the admin query: {:?}", gap(asked, answered));

    // Admin `stats`: the same totals and best shares, hashrates decayed.
    let user = &after["users"]["restart"];
    assert_eq!(
        user["accepted_diff"].as_f64(),
        saved_user["shares"].as_f64(),
        "{after}"
    );
    assert_eq!(
        user["bestshare"].as_f64(),
        saved_user["bestshare"].as_f64(),
        "{after}"
    );
    assert_eq!(
        user["bestever"].as_f64(),
        saved_user["bestever"].as_f64(),
        "{after}"
    );
    assert_eq!(user["lastshare"], saved_user["lastshare"], "{after}");
    let worker = &user["workers"]["restart.rig1"];
    assert_eq!(
        worker["accepted_diff"].as_f64(),
        saved_worker["shares"].as_f64()
    );
    assert_eq!(
        worker["bestever"].as_f64(),
        saved_worker["bestever"].as_f64()
    );
    assert_eq!(
        after["accepted_diff"].as_f64(),
        s3["accepted"].as_f64(),
        "{after}"
    );
    assert_eq!(
        after["rejected"].as_u64(),
        s3["rejected"].as_u64(),
        "{after}"
    );
    assert_eq!(
        after["bestshare"].as_f64(),
        s3["bestshare"].as_f64(),
        "{after}"
    );
    let saved1m = rate(&saved_user["hashrate1m"]);
    let now1m = user["hashrate1m"].as_f64().unwrap();
    assert!(
        now1m < saved1m - rounding(saved1m),
        "not decayed: {now1m} vs {saved1m}"
    );
    for (key, window) in [
        ("hashrate1m", 60.0),
        ("hashrate5m", 300.0),
        ("hashrate1hr", 3600.0),
    ] {
        let g = gap(asked, answered);
        assert_decayed(
            &format!("admin user {key}"),
            rate(&saved_user[key]),
            user[key].as_f64().unwrap(),
            window,
            g,
            false,
        );
        assert_decayed(
            &format!("admin pool {key}"),
            rate(&s2[key]),
            after[key].as_f64().unwrap(),
            window,
            g,
            false,
        );
    }

    // The web API reads the same registry.
    let asked = unix_now();
    let api = get_json(web2, "/api/users/restart");
    let answered = unix_now();
    assert_eq!(
        api["accepted_diff"].as_f64(),
        saved_user["shares"].as_f64(),
        "{api}"
    );
    assert_eq!(
        api["bestshare"].as_f64(),
        saved_user["bestshare"].as_f64(),
        "{api}"
    );
    assert_eq!(
        api["bestever"].as_f64(),
        saved_user["bestever"].as_f64(),
        "{api}"
    );
    assert_decayed(
        "API user hashrate1m",
        rate(&saved_user["hashrate1m"]),
        api["hashrate1m"].as_f64().unwrap(),
        60.0,
        gap(asked, answered),
        false,
    );

    // The files the second pool writes say the same.
    let mut rewritten = None;
    wait_until("the second pool to rewrite the user file", WAIT, || {
        rewritten = read_stable(&users.join("restart")).filter(|(_, t)| *t > spawned);
        rewritten.is_some()
    });
    let (text, written) = rewritten.unwrap();
    let new_user: Value = serde_json::from_str(&text).unwrap();
    println!("rewritten:\n{new_user:#}");
    for key in ["shares", "bestshare", "bestever", "lastshare"] {
        assert_eq!(new_user[key], saved_user[key], "{key}");
        assert_eq!(
            new_user["worker"][0][key], saved_worker[key],
            "worker {key}"
        );
    }
    let g = gap(written, written);
    for (key, window) in [
        ("hashrate1m", 60.0),
        ("hashrate5m", 300.0),
        ("hashrate1hr", 3600.0),
    ] {
        assert_decayed(
            &format!("user file {key}"),
            rate(&saved_user[key]),
            rate(&new_user[key]),
            window,
            g,
            true,
        );
    }
    let mut rewritten = None;
    wait_until("the second pool to rewrite pool.status", WAIT, || {
        rewritten = read_stable(&status_path).filter(|(_, t)| *t > spawned);
        rewritten.is_some()
    });
    let (text, written) = rewritten.unwrap();
    let [n1, n2, n3] = pool_status(&text);
    assert!(n1["lastupdate"].as_f64().unwrap() > lastupdate, "{text}");
    for key in ["accepted", "rejected", "bestshare"] {
        assert_eq!(n3[key], s3[key], "pool.status {key}");
    }
    for (key, window) in [
        ("hashrate1m", 60.0),
        ("hashrate5m", 300.0),
        ("hashrate1hr", 3600.0),
    ] {
        assert_decayed(
            &format!("pool.status {key}"),
            rate(&s2[key]),
            rate(&n2[key]),
            window,
            gap(written, written),
            true,
        );
    }

    // The garbage file was warned about, and the pool runs.
    let log = second.log_text();
    assert!(
        log.lines()
            .any(|l| l.contains("stats file not read back") && l.contains("garbage")),
        "no warning about users/garbage in:\n{log}"
    );
    assert!(log.contains("stats read back"), "{log}");
    assert_eq!(second.admin("ping").as_deref(), Some("pong"));
    drop(second);
    let _ = std::fs::remove_dir_all(&logdir);
}
