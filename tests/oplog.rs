//! The operator's view, end to end against a real regtest node: the log file (escaped peer
//! strings, reopened on SIGHUP and `loglevel`) and the share log (`-L`: every accepted share
//! written, a share-log directory that cannot be created counted and retried while the pool
//! keeps mining). Without a node these print "skipped" (locally) or fail (in CI).
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

use std::path::{Path, PathBuf};
use std::time::Duration;

use loadtest::{Miner, MinerConfig};
use node::{RegtestNet, RegtestNode, WAIT, bitcoind_or_skip, wait_until};
use pool::{
    Client, PoolProcess, btcd_entry, free_port, regtest_config, share_log_lines, temp_dir,
    wait_stats,
};
use serde_json::{Value, json};

fn pool_config(node: &RegtestNode) -> Value {
    let addr = node.new_address();
    let mut config = regtest_config(vec![btcd_entry(node)], Some(&addr), free_port());
    config["statsupdate"] = json!(3600);
    config
}

/// The pool's log file, `<logdir>/<name>.log` (the harness runs it in `pool.dir`, logdir
/// `logs`, named after the test's tag).
fn log_file(pool: &PoolProcess, tag: &str) -> PathBuf {
    pool.dir.join(format!("logs/{tag}.log"))
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

#[test]
fn peer_strings_are_logged_escaped() {
    let Some(exe) = bitcoind_or_skip("peer_strings_are_logged_escaped") else {
        return;
    };
    let net = RegtestNet::start(&exe, 2);
    let pool = PoolProcess::start("logescape", &pool_config(&net.nodes[0]), &[]);
    let file = log_file(&pool, "logescape");

    let agent = "evil/1.0\n[2026-01-01 00:00:00.000] ERROR forged line\u{1b}[31m red\r";
    let mut c = Client::connect(pool.addr);
    c.send(&json!({"id": 1, "method": "mining.subscribe", "params": [agent]}));
    assert!(c.reply(1)["result"].is_array());
    c.send(&json!({"id": 2, "method": "mining.authorize", "params": ["escaper.1", "x"]}));
    assert_eq!(c.reply(2)["result"], true);

    wait_until("the authorisation in the log file", WAIT, || {
        read(&file).contains("escaper.1")
    });
    let text = read(&file);
    let line = text
        .lines()
        .find(|l| l.contains("authorised") && l.contains("escaper.1"))
        .unwrap_or_else(|| panic!("no authorised line in {text}"));
    assert!(
        line.contains(r"agent=evil/1.0\n[2026-01-01 00:00:00.000] ERROR forged line\x1b[31m red\r"),
        "{line}"
    );
    for (n, l) in text.lines().enumerate() {
        assert!(!l.starts_with("[2026-01-01"), "forged line {n}: {l}");
        assert!(
            !l.contains(['\u{1b}', '\r']),
            "control character on line {n}: {l:?}"
        );
    }
    // Stderr gets the same escaped lines.
    assert!(pool.log_text().contains(r"ERROR forged line\x1b[31m"));
    assert!(!pool.log_text().contains('\u{1b}'));
}

#[test]
fn sighup_and_loglevel_reopen_the_log_file() {
    let Some(exe) = bitcoind_or_skip("sighup_and_loglevel_reopen_the_log_file") else {
        return;
    };
    let net = RegtestNet::start(&exe, 2);
    let pool = PoolProcess::start("logreopen", &pool_config(&net.nodes[0]), &[]);
    let file = log_file(&pool, "logreopen");
    wait_until("the log file", WAIT, || {
        read(&file).contains("listening for miners")
    });

    // logrotate without copytruncate: move the file away, then SIGHUP.
    let rotated = pool.dir.join("logs/logreopen.log.1");
    std::fs::rename(&file, &rotated).unwrap();
    pool.signal(libc::SIGHUP);
    wait_until("a new log file", WAIT, || {
        read(&file).contains("log file reopened")
    });
    // It gets the lines logged from now on (an admin client is logged at debug).
    assert_eq!(pool.admin("ping").as_deref(), Some("pong"));
    wait_until("a line in the new file", WAIT, || {
        read(&file).contains("admin client connected")
    });
    assert!(
        read(&rotated).contains("listening for miners"),
        "the old lines stay in the rotated file"
    );
    assert!(!read(&file).contains("listening for miners"));

    // ckpmsg's loglevel=N sets the level and reopens the file too.
    let rotated2 = pool.dir.join("logs/logreopen.log.2");
    std::fs::rename(&file, &rotated2).unwrap();
    assert_eq!(pool.admin("loglevel=7").as_deref(), Some("success"));
    wait_until("the file reopened by loglevel", WAIT, || {
        read(&file).contains("log file reopened")
    });
    // ... and the level: at 4 (warning) an authorisation (info) is not logged, back at 7 it is.
    assert_eq!(pool.admin("loglevel=4").as_deref(), Some("success"));
    let login = |agent: &str| {
        let mut c = Client::connect(pool.addr);
        c.send(&json!({"id": 1, "method": "mining.subscribe", "params": [agent]}));
        c.reply(1);
        c.send(&json!({"id": 2, "method": "mining.authorize", "params": ["level.1", "x"]}));
        assert_eq!(c.reply(2)["result"], true);
    };
    login("quiet-agent");
    assert_eq!(pool.admin("loglevel=7").as_deref(), Some("success"));
    login("loud-agent");
    // One writer, in order: had the first been logged, it would be there by now.
    wait_until("the second authorisation logged", WAIT, || {
        read(&file).contains("loud-agent")
    });
    assert!(!read(&file).contains("quiet-agent"), "logged at level 4");
    assert_eq!(pool.admin("loglevel=9").as_deref(), Some("Invalid"));
    assert_eq!(pool.admin("loglevel=x").as_deref(), Some("Invalid"));
    // The pool still runs after all this.
    assert_eq!(pool.admin("ping").as_deref(), Some("pong"));
}

/// A miner at `rate` shares/s (it finds regtest blocks too: half of all hashes are).
fn start_miner(pool: &PoolProcess, user: &str, rate: f64) -> Miner {
    let mut cfg = MinerConfig::new(pool.addr, user);
    cfg.duration = Some(Duration::from_secs(120));
    cfg.max_shares_per_sec = rate;
    Miner::start(cfg).unwrap()
}

#[test]
fn every_accepted_share_is_in_the_share_log_after_sigterm() {
    let Some(exe) = bitcoind_or_skip("every_accepted_share_is_in_the_share_log_after_sigterm")
    else {
        return;
    };
    let net = RegtestNet::start(&exe, 2);
    let mut pool = PoolProcess::start("sharelogterm", &pool_config(&net.nodes[0]), &["-L"]);
    let miner = start_miner(&pool, "sharelog.1", 50.0);
    wait_until("40 accepted shares", WAIT, || miner.report().accepted >= 40);
    // Every reply read, then SIGTERM at once: the last lines are still only in memory.
    let report = miner.stop();
    pool.signal(libc::SIGTERM);
    let status = pool
        .wait_exit(Duration::from_secs(5))
        .unwrap_or_else(|| panic!("the pool still runs 5 s after SIGTERM"));
    assert_eq!(status.code(), Some(0), "exit status {status}");
    assert_eq!(report.unanswered, 0, "{report:?}");
    assert!(report.blocks_accepted >= 1, "{report:?}");

    let (accepted, rejected) = share_log_lines(&pool.dir.join("logs"));
    assert_eq!(accepted, report.accepted, "{report:?}");
    println!(
        "{accepted} accepted and {rejected} rejected lines; the miner had {} and {}",
        report.accepted, report.rejected
    );
}

#[test]
fn an_unwritable_share_log_keeps_the_pool_mining_and_shows_in_stats() {
    let Some(exe) =
        bitcoind_or_skip("an_unwritable_share_log_keeps_the_pool_mining_and_shows_in_stats")
    else {
        return;
    };
    let net = RegtestNet::start(&exe, 2);
    let node = &net.nodes[0];
    let mut config = pool_config(node);
    let web = std::net::SocketAddr::from(([127, 0, 0, 1], free_port()));
    config["webserver"] = json!(web.to_string());
    let mut pool = PoolProcess::start("sharelogfail", &config, &["-L"]);
    let logdir = pool.dir.join("logs");
    let miner = start_miner(&pool, "sharelog.2", 20.0);
    wait_until("5 accepted shares", WAIT, || miner.report().accepted >= 5);

    // Tests run as root, where a read-only mode does not stop writes: put a file where each
    // next height's share-log directory goes instead, so creating it fails. The miner finds
    // blocks, so the pool soon works on those heights.
    let tip = node.height();
    let blockers: Vec<PathBuf> = (tip + 2..tip + 1000)
        .map(|h| logdir.join(format!("{h:08x}")))
        .collect();
    for b in &blockers {
        std::fs::write(b, b"in the way").unwrap();
    }
    let failing = wait_stats(&pool, "a share-log write error", WAIT, |s| {
        s["sharelog"]["write_errors"].as_u64() >= Some(1)
    });
    let accepted_then = miner.report().accepted;
    println!("failing: {}", failing["sharelog"]);
    // The pool keeps mining: shares accepted, blocks found, lines kept for the retry.
    wait_until("20 more accepted shares while failing", WAIT, || {
        miner.report().accepted >= accepted_then + 20
    });
    let s = pool.stats();
    assert!(s["sharelog"]["pending"].as_u64() >= Some(1), "{s}");
    assert!(
        s["sharelog"]["write_errors"].as_u64() >= Some(2),
        "retried every second: {s}"
    );
    assert!(node.height() > tip + 1, "no block found while failing");
    // And in the metrics.
    let errors = metric_value(web, "ckpool_sharelog_write_errors");
    assert!(errors >= 2.0, "ckpool_sharelog_write_errors {errors}");
    wait_until("the failure in the log file", WAIT, || {
        read(&log_file(&pool, "sharelogfail")).contains("cannot write the share log")
    });

    // Fixed: the kept lines are written, and nothing was lost.
    for b in &blockers {
        std::fs::remove_file(b).unwrap();
    }
    let report = miner.stop();
    wait_stats(&pool, "the share log to catch up", WAIT, |s| {
        s["sharelog"]["pending"] == 0 && s["sharelog"]["written"].as_u64() >= Some(report.accepted)
    });
    // The user's total counts every share the miner had accepted, the failing disk or not.
    let users: Value = serde_json::from_str(&pool.admin("users").expect("users")).unwrap();
    assert!(
        users["users"]["sharelog"]["accepted"].as_u64() >= Some(report.accepted),
        "{users} against {report:?}"
    );
    pool.signal(libc::SIGTERM);
    let status = pool
        .wait_exit(Duration::from_secs(5))
        .unwrap_or_else(|| panic!("the pool still runs 5 s after SIGTERM"));
    assert_eq!(status.code(), Some(0), "exit status {status}");
    assert_eq!(report.unanswered, 0, "{report:?}");
    let (accepted, _) = share_log_lines(&logdir);
    assert_eq!(accepted, report.accepted, "{report:?}");
}

/// Sends an admin command to the socket in `sockdir`; `None` if it is not there (yet).
fn admin(sockdir: &Path, cmd: &str) -> Option<String> {
    let mut s = std::os::unix::net::UnixStream::connect(sockdir.join("listener")).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    common::admin::write_message(&mut s, cmd.as_bytes()).ok()?;
    let reply = common::admin::read_message(&mut s).ok()??;
    Some(String::from_utf8_lossy(&reply).into_owned())
}

#[test]
fn daemonised_the_pool_logs_to_its_file_only() {
    let Some(exe) = bitcoind_or_skip("daemonised_the_pool_logs_to_its_file_only") else {
        return;
    };
    let net = RegtestNet::start(&exe, 2);
    let dir = temp_dir("logdaemon");
    let cfg = dir.join("ckpool.conf");
    std::fs::write(&cfg, pool_config(&net.nodes[0]).to_string()).unwrap();
    let sockdir = dir.join("sock");
    let stderr = dir.join("stderr");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ckpool-rs"))
        .args(["-D", "-c"])
        .arg(&cfg)
        .arg("-s")
        .arg(&sockdir)
        .args(["-n", "logdaemon", "-l", "7"])
        .current_dir(&dir)
        .stderr(std::fs::File::create(&stderr).unwrap())
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    // Whatever happens below, the daemon is stopped: by admin, else by its pid.
    struct Stop(PathBuf);
    impl Drop for Stop {
        fn drop(&mut self) {
            if admin(&self.0, "shutdown").is_none()
                && let Ok(pid) = std::fs::read_to_string(self.0.join("main.pid"))
                && let Ok(pid) = pid.trim().parse::<libc::pid_t>()
            {
                // SAFETY: kill(2) takes plain integers; the pid file names the daemon this
                // test started (it is removed when that daemon exits).
                let _ = unsafe { libc::kill(pid, libc::SIGTERM) };
            }
        }
    }
    let stop = Stop(sockdir.clone());
    wait_until("the daemon to answer", WAIT, || {
        admin(&sockdir, "ping").as_deref() == Some("pong")
    });
    let file = dir.join("logs/logdaemon.log");
    wait_until("the log file", WAIT, || {
        read(&file).contains("listening for miners")
    });
    assert!(read(&file).contains("starting"), "{}", read(&file));
    drop(stop);
    wait_until("the daemon to exit", WAIT, || {
        !sockdir.join("main.pid").exists()
    });
    // The pid file goes before the last lines are written out, as the process ends.
    wait_until("the last lines in the log file", WAIT, || {
        read(&file).contains("shutdown complete")
    });
    // The parent printed the pid; nothing was logged to the terminal.
    assert_eq!(read(&stderr), "");
    let _ = std::fs::remove_dir_all(&dir);
}

/// The value of the first sample of `name` (a counter's `_total` included) in `/metrics`.
fn metric_value(web: std::net::SocketAddr, name: &str) -> f64 {
    use std::io::{Read as _, Write as _};
    let mut s = std::net::TcpStream::connect(web).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find(|l| l.starts_with(name))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in /metrics:\n{text}"))
}
