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

use node::{RegtestNet, RegtestNode, WAIT, bitcoind_or_skip, wait_until};
use pool::{Client, PoolProcess, btcd_entry, free_port, regtest_config};
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
    assert_eq!(pool.admin("loglevel=9").as_deref(), Some("Invalid"));
    assert_eq!(pool.admin("loglevel=x").as_deref(), Some("Invalid"));
    // The pool still runs after all this.
    assert_eq!(pool.admin("ping").as_deref(), Some("pong"));
}
