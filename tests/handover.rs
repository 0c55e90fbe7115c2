//! Zero-disconnect upgrades (`-H`, admin `restart`) end to end against a real regtest node: raw
//! stratum miners keep their TCP connections, sessions and jobs across the upgrade, and a failed
//! handover leaves the old instance serving them. The suite runs again with
//! `POOL_BACKEND=epoll` (and `POOL_HANDOFF=queue`), which the pools inherit.
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

use common::{Difficulty, Target};
use node::{RegtestNet, WAIT, bitcoind_or_skip, wait_until};
use pool::{Client, PoolProcess, btcd_entry, free_port, regtest_config};
use serde_json::{Value, json};

/// Miners per test.
const MINERS: usize = 20;

/// A raw miner: its connection, session and the job it works on. Its shares never meet the
/// network target, so the chain (and the job) stays put under the test.
struct RawMiner {
    c: Client,
    user: String,
    en1: String,
    n2: usize,
    diff: Option<f64>,
    job: loadtest::work::Job,
    /// The next extranonce2 counter (each share is unique).
    next: u64,
    /// Submits not yet answered: id → (what must come back, the share, for duplicates).
    next_id: u64,
}

impl RawMiner {
    fn connect(pool: &PoolProcess, user: &str) -> Self {
        let mut c = Client::connect(pool.addr);
        let (en1, n2) = c.login(user);
        let v = c.wait_for("a mining.notify", WAIT, |v| v["method"] == "mining.notify");
        let job = loadtest::work::Job::from_notify_params(&v["params"]).unwrap();
        let mut m = Self {
            c,
            user: user.to_owned(),
            en1,
            n2,
            diff: None,
            job,
            next: 1,
            next_id: 100,
        };
        m.diff = m.last_difficulty();
        m
    }

    fn last_difficulty(&self) -> Option<f64> {
        self.c
            .seen
            .iter()
            .rev()
            .find(|v| v["method"] == "mining.set_difficulty")
            .and_then(|v| v["params"][0].as_f64())
    }

    /// A share on `job`: (extranonce2, nonce).
    fn grind(&mut self, job: &loadtest::work::Job) -> (Vec<u8>, u32) {
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
        (en2, nonce)
    }

    /// Sends a share on `job` (without waiting); returns its id.
    fn send(&mut self, job: &loadtest::work::Job, en2: &[u8], nonce: u32) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        self.c.send(&json!({"id": id, "method": "mining.submit",
            "params": [self.user, job.job_id, hex::encode(en2), format!("{:08x}", job.ntime), format!("{nonce:08x}")]}));
        id
    }

    /// Submits a fresh share on its job and waits for the reply.
    fn share(&mut self) -> Value {
        let job = self.job.clone();
        let (en2, nonce) = self.grind(&job);
        let id = self.send(&job, &en2, nonce);
        self.c.reply(id)
    }

    /// The connection is still open (no EOF within a short read).
    fn assert_open(&mut self) {
        assert!(
            self.c.read_line().is_ok(),
            "{}: the connection was closed",
            self.user
        );
    }
}

fn start_pool(tag: &str) -> (RegtestNet, PoolProcess) {
    let exe = bitcoind_or_skip(tag).expect("checked by the caller");
    let net = RegtestNet::start(&exe, 2);
    let node = &net.nodes[0];
    let addr = node.new_address();
    let config = regtest_config(vec![btcd_entry(node)], Some(&addr), free_port());
    let pool = PoolProcess::start(tag, &config, &[]);
    (net, pool)
}

fn miners(pool: &PoolProcess, tag: &str) -> Vec<RawMiner> {
    let mut all: Vec<RawMiner> = (0..MINERS)
        .map(|i| RawMiner::connect(pool, &format!("{tag}.{i}")))
        .collect();
    for m in &mut all {
        let r = m.share();
        assert_eq!(r["result"], true, "{}: {r}", m.user);
    }
    all
}

/// Waits for `p` to exit and returns its status.
fn exited(p: &mut PoolProcess, what: &str) -> std::process::ExitStatus {
    p.wait_exit(WAIT).unwrap_or_else(|| {
        panic!("{what} did not exit; log:\n{}", p.log_text());
    })
}

/// Every miner: the same connection answers; a duplicate of `dups[i]` is a duplicate, a fresh
/// share on the job from before is accepted; extranonce1 and difficulty are as before.
fn check_sessions_survived(miners: &mut [RawMiner], before: &[(String, Option<f64>)]) {
    for (m, (en1, diff)) in miners.iter_mut().zip(before) {
        assert_eq!(&m.en1, en1);
        let r = m.share();
        assert_eq!(r["result"], true, "{}: {r}", m.user);
        assert_eq!(m.last_difficulty(), *diff, "{}: difficulty changed", m.user);
        // No new subscribe answer or extranonce change came.
        assert!(
            !m.c.seen
                .iter()
                .any(|v| v["method"] == "mining.set_extranonce"),
            "{}",
            m.user
        );
        m.assert_open();
    }
}

/// The handover under way while every miner submits: each submit is answered and accepted,
/// by whichever instance read it.
#[test]
fn handover_keeps_every_miner_connection_session_and_job() {
    let tag = "handover_keeps_every_miner_connection_session_and_job";
    if bitcoind_or_skip(tag).is_none() {
        return;
    }
    let (_node, mut old) = start_pool("ho-keep");
    let mut ms = miners(&old, "keep");
    let before: Vec<(String, Option<f64>)> = ms.iter().map(|m| (m.en1.clone(), m.diff)).collect();

    // One share each before the upgrade, kept to be submitted again after it.
    let mut pre = Vec::new();
    for m in &mut ms {
        let job = m.job.clone();
        let (en2, nonce) = m.grind(&job);
        let id = m.send(&job, &en2, nonce);
        assert_eq!(m.c.reply(id)["result"], true);
        pre.push((job, en2, nonce));
    }

    let t0 = Instant::now();
    let mut new = old.spawn_sibling(&["-H"], &[], "new.log");
    // Shares keep coming while the new instance starts and takes over.
    let mut pending: Vec<Vec<u64>> = vec![Vec::new(); ms.len()];
    while old.is_running() {
        assert!(
            t0.elapsed() < WAIT,
            "the old instance did not hand over; old log:\n{}\nnew log:\n{}",
            old.log_text(),
            new.log_text()
        );
        for (m, p) in ms.iter_mut().zip(&mut pending) {
            if p.len() < 50 {
                let job = m.job.clone();
                let (en2, nonce) = m.grind(&job);
                p.push(m.send(&job, &en2, nonce));
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let status = exited(&mut old, "the old instance");
    assert!(
        status.success(),
        "old exit: {status}; log:\n{}",
        old.log_text()
    );
    assert!(new.is_running(), "new log:\n{}", new.log_text());
    wait_until("the new instance's pid file", WAIT, || {
        new.pidfile_pid() == Some(new.pid())
    });
    assert_eq!(new.admin("ping").as_deref(), Some("pong"));

    // Every share sent across the upgrade was answered, and accepted.
    for (m, ids) in ms.iter_mut().zip(&pending) {
        for id in ids {
            let r = m.c.reply(*id);
            assert_eq!(r["result"], true, "{}: {r}", m.user);
        }
    }
    // A share from before the upgrade again: a duplicate, judged with the old books.
    for (m, (job, en2, nonce)) in ms.iter_mut().zip(&pre) {
        let id = m.send(job, en2, *nonce);
        let r = m.c.reply(id);
        assert_eq!(r["reject-reason"], "Duplicate", "{}: {r}", m.user);
    }
    check_sessions_survived(&mut ms, &before);
    let log = old.log_text();
    assert!(log.contains("handover committed"), "old log:\n{log}");
    assert!(
        new.log_text()
            .contains("handover: took the running instance over"),
        "new log:\n{}",
        new.log_text()
    );
    assert!(
        new.log_text().contains(&format!(
            "took the running instance over connections={MINERS}"
        )),
        "new log:\n{}",
        new.log_text()
    );
    assert!(
        !new.log_text().contains("session refused"),
        "new log:\n{}",
        new.log_text()
    );
    let across: usize = pending.iter().map(Vec::len).sum();
    assert!(
        across >= MINERS,
        "only {across} shares sent across the upgrade"
    );
    // The totals moved with the pool state: the new instance counts every share accepted by
    // either (2 before the upgrade, those across it and 1 after, per miner) and the duplicates.
    let stats = new.stats();
    assert_eq!(
        stats["accepted"].as_u64(),
        Some((3 * MINERS + across) as u64),
        "{stats}"
    );
    assert_eq!(stats["reject_reasons"]["Duplicate"], MINERS, "{stats}");
    assert_eq!(stats["clients"], MINERS, "{stats}");
}

/// A new instance that asks with another state version is refused: it exits non-zero with the
/// reason, and the old one never stopped serving.
#[test]
fn a_refused_handover_leaves_the_old_instance_serving() {
    let tag = "a_refused_handover_leaves_the_old_instance_serving";
    if bitcoind_or_skip(tag).is_none() {
        return;
    }
    let (_node, old) = start_pool("ho-refuse");
    let mut ms = miners(&old, "refuse");
    let before: Vec<(String, Option<f64>)> = ms.iter().map(|m| (m.en1.clone(), m.diff)).collect();
    let mut new = old.spawn_sibling(
        &["-H"],
        &[("CKPOOL_RS_HANDOVER_TEST_VERSION", "999")],
        "new.log",
    );
    let status = exited(&mut new, "the refused instance");
    assert!(!status.success(), "{status}");
    let newlog = new.log_text();
    assert!(
        newlog.contains("refused") && newlog.contains("version"),
        "new log:\n{newlog}"
    );
    assert!(
        old.log_text().contains("handover request refused"),
        "old log:\n{}",
        old.log_text()
    );
    assert_eq!(old.pidfile_pid(), Some(old.pid()));
    check_sessions_survived(&mut ms, &before);
}

/// A new instance that dies in the middle (after the listeners and the pool state, with the
/// connections' batch in hand): the old one takes every connection back and serves on.
#[test]
fn a_new_instance_dying_mid_handover_gives_every_miner_back() {
    let tag = "a_new_instance_dying_mid_handover_gives_every_miner_back";
    if bitcoind_or_skip(tag).is_none() {
        return;
    }
    let (_node, mut old) = start_pool("ho-die");
    let mut ms = miners(&old, "die");
    let before: Vec<(String, Option<f64>)> = ms.iter().map(|m| (m.en1.clone(), m.diff)).collect();
    let mut new = old.spawn_sibling(
        &["-H"],
        &[("CKPOOL_RS_HANDOVER_TEST_EXIT_AFTER_BATCHES", "1")],
        "new.log",
    );
    let status = exited(&mut new, "the dying instance");
    assert_eq!(status.code(), Some(86), "new log:\n{}", new.log_text());
    wait_until("the old instance to take its miners back", WAIT, || {
        old.log_text().contains("handover failed; serving on")
    });
    assert!(old.is_running());
    let log = old.log_text();
    assert!(
        log.contains(&format!("taken_back={MINERS}")),
        "old log:\n{log}"
    );
    assert_eq!(old.pidfile_pid(), Some(old.pid()));
    check_sessions_survived(&mut ms, &before);
    // New miners are still accepted too.
    let mut late = RawMiner::connect(&old, "die.late");
    assert_eq!(late.share()["result"], true);
}

/// `restart` on the admin socket: the running instance starts its own binary with `-H`, which
/// takes it over; the miners carry on with the new process.
#[test]
fn admin_restart_upgrades_in_place() {
    let tag = "admin_restart_upgrades_in_place";
    if bitcoind_or_skip(tag).is_none() {
        return;
    }
    let (_node, mut old) = start_pool("ho-restart");
    let mut ms = miners(&old, "restart");
    let before: Vec<(String, Option<f64>)> = ms.iter().map(|m| (m.en1.clone(), m.diff)).collect();
    let reply = old.admin("restart").expect("restart reply");
    let new_pid: u32 = reply
        .strip_prefix("restarting ")
        .unwrap_or_else(|| panic!("restart answered {reply:?}"))
        .parse()
        .unwrap();
    let status = exited(&mut old, "the old instance");
    assert!(status.success(), "{status}; log:\n{}", old.log_text());
    // The new process is not the test's child: it answers on the admin socket.
    wait_until("the restarted instance's pid file", WAIT, || {
        old.pidfile_pid() == Some(new_pid)
    });
    assert_eq!(old.admin("ping").as_deref(), Some("pong"));
    check_sessions_survived(&mut ms, &before);
    assert_eq!(old.admin("shutdown").as_deref(), Some("exiting"));
    let pid = rustix::process::Pid::from_raw(i32::try_from(new_pid).unwrap()).unwrap();
    wait_until("the restarted instance to exit", WAIT, || {
        rustix::process::test_kill_process(pid).is_err()
    });
}

/// More connections than the new instance's open-files limit (io_uring: a connection holds no
/// regular descriptor once installed): the batches follow the room the new instance reports,
/// and every miner is handed over.
#[test]
fn handover_beyond_the_open_files_limit_goes_in_batches() {
    let tag = "handover_beyond_the_open_files_limit_goes_in_batches";
    if bitcoind_or_skip(tag).is_none() {
        return;
    }
    if std::env::var("POOL_BACKEND").as_deref() == Ok("epoll") || connector::probe_uring().is_err()
    {
        eprintln!("{tag}: skipped (needs io_uring: with epoll each connection is a descriptor)");
        return;
    }
    const CONNS: usize = 400;
    const NOFILE: u64 = 256;
    let (_node, mut old) = start_pool("ho-limit");
    assert_eq!(old.stats()["io"], "uring");
    // A few miners that submit, and many that are only logged in.
    let mut ms = miners(&old, "limit");
    let before: Vec<(String, Option<f64>)> = ms.iter().map(|m| (m.en1.clone(), m.diff)).collect();
    let mut idle: Vec<Client> = (0..CONNS - MINERS)
        .map(|i| {
            let mut c = Client::connect(old.addr);
            c.login(&format!("limit.idle{i}"));
            c
        })
        .collect();
    let mut new = old.spawn_sibling_limited(&["-H"], &[], "new.log", Some(NOFILE));
    let status = exited(&mut old, "the old instance");
    assert!(
        status.success(),
        "{status}; old log:\n{}\nnew log:\n{}",
        old.log_text(),
        new.log_text()
    );
    assert!(new.is_running(), "new log:\n{}", new.log_text());
    let log = new.log_text();
    assert!(
        log.contains(&format!(
            "took the running instance over connections={CONNS}"
        )),
        "new log:\n{log}"
    );
    check_sessions_survived(&mut ms, &before);
    // The idle ones too: still open, and their session answers a subscribe as before.
    for c in &mut idle {
        assert!(c.read_line().is_ok(), "an idle connection was closed");
    }
    let stats = new.stats();
    assert_eq!(stats["clients"], CONNS, "{stats}");
    // More than one batch went, none above the limit.
    let sizes: Vec<u64> = old
        .log_text()
        .lines()
        .filter(|l| l.contains("handover: batch acked"))
        .filter_map(|l| {
            let at = l.find("connections=")? + "connections=".len();
            l[at..]
                .split(|c: char| !c.is_ascii_digit())
                .next()?
                .parse()
                .ok()
        })
        .collect();
    assert!(sizes.len() >= 2, "batches {sizes:?}");
    assert_eq!(sizes.iter().sum::<u64>(), CONNS as u64, "batches {sizes:?}");
    assert!(sizes.iter().all(|&n| n < NOFILE), "batches {sizes:?}");
}

/// As ckpool: a second instance with neither `-k` nor `-H` refuses to start beside a live one
/// (exit non-zero, saying which flags to use); with `-k` it stops the old one and takes its
/// place.
#[test]
fn without_k_or_h_a_second_instance_refuses_and_k_replaces_the_old() {
    let tag = "without_k_or_h_a_second_instance_refuses_and_k_replaces_the_old";
    if bitcoind_or_skip(tag).is_none() {
        return;
    }
    let (_node, mut old) = start_pool("ho-flags");
    let mut plain = old.spawn_sibling(&[], &[], "plain.log");
    let status = exited(&mut plain, "the second instance");
    assert!(!status.success(), "{status}");
    let log = plain.log_text();
    assert!(
        log.contains("already running") && log.contains("-k") && log.contains("-H"),
        "log:\n{log}"
    );
    assert!(old.is_running());
    assert_eq!(old.pidfile_pid(), Some(old.pid()));

    let mut killer = old.spawn_sibling(&["-k"], &[], "killer.log");
    exited(&mut old, "the old instance, killed by -k");
    wait_until("the -k instance's pid file", WAIT, || {
        killer.pidfile_pid() == Some(killer.pid())
    });
    wait_until("the -k instance to serve", WAIT, || {
        killer.admin("ping").as_deref() == Some("pong")
    });
    assert!(killer.is_running(), "log:\n{}", killer.log_text());
    let mut m = RawMiner::connect(&killer, "flags.1");
    assert_eq!(m.share()["result"], true);
}
