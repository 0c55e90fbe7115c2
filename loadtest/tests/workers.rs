#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    missing_docs,
    reason = "test code"
)]
//! The load generator end to end through real worker processes (`ckload worker`, re-executed
//! from the built binary), each bound to its own loopback source address, against a small fake
//! pool that checks every share with `common`'s maths (not ckload's).

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ckload::run::{Launcher, RunSpec, Scenario, run, summary};
use ckload::stats::ShareKind;
use common::block::header;
use common::hash::{sha256d, sha256d_header};
use common::merkle::merkle_root_from_branch;
use common::{Difficulty, Target};
use serde_json::{Value, json};

const NBITS: u32 = 0x207f_ffff;
const VERSION: u32 = 0x2000_0000;
const NTIME: u32 = 0x6500_0000;
/// The version bits the fake pool lets miners roll (BIP320's).
const POOL_MASK: u32 = 0x1fff_e000;

fn coinb1() -> Vec<u8> {
    hex::decode(
        "02000000010000000000000000000000000000000000000000000000000000000000000000ffffffff0a5108",
    )
    .unwrap()
}

fn coinb2() -> Vec<u8> {
    hex::decode(format!(
        "ffffffff0100f2052a01000000160014{}00000000",
        "cd".repeat(20)
    ))
    .unwrap()
}

#[derive(Default)]
struct Seen {
    peers: BTreeSet<IpAddr>,
    accepted: u64,
    above_target: u64,
    blocks: u64,
    /// When each connection (by extranonce1) reached end of file.
    closed_at: Vec<(u32, Instant)>,
    /// When the slow connection's last reply began to be written.
    last_slow_reply: Option<Instant>,
    /// Accepted submits that carried non-zero version bits.
    rolled: u64,
    /// Submits with version bits outside the mask, or without bits after rolling was granted.
    bad_version_bits: u64,
}

struct FakePool {
    addr: SocketAddr,
    seen: Arc<Mutex<Seen>>,
    stop: Arc<AtomicBool>,
}

impl FakePool {
    fn start() -> Self {
        Self::start_with(Duration::ZERO)
    }

    /// A pool that answers the submits of its first connection (extranonce1 1) `slow` late.
    fn start_with(slow: Duration) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Seen::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let next_en1 = Arc::new(AtomicU64::new(1));
        let (seen2, stop2) = (Arc::clone(&seen), Arc::clone(&stop));
        std::thread::spawn(move || {
            while !stop2.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((s, peer)) => {
                        seen2.lock().unwrap().peers.insert(peer.ip());
                        let en1 = u32::try_from(next_en1.fetch_add(1, Ordering::Relaxed)).unwrap();
                        let (seen3, stop3) = (Arc::clone(&seen2), Arc::clone(&stop2));
                        let delay = if en1 == 1 { slow } else { Duration::ZERO };
                        std::thread::spawn(move || serve(s, en1, &seen3, &stop3, delay));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Self { addr, seen, stop }
    }
}

impl Drop for FakePool {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn serve(s: TcpStream, en1: u32, seen: &Mutex<Seen>, stop: &AtomicBool, delay: Duration) {
    s.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let mut w = s.try_clone().unwrap();
    let mut r = BufReader::new(s);
    let prev = [7u8; 32];
    let share_target = Difficulty::MIN.target();
    let net = Target::from_compact(NBITS);
    let mut line = String::new();
    let mut rolling = false;
    while !stop.load(Ordering::Relaxed) {
        line.clear();
        match r.read_line(&mut line) {
            Ok(0) => {
                seen.lock().unwrap().closed_at.push((en1, Instant::now()));
                return;
            }
            Ok(_) => {}
            Err(_) => continue,
        }
        let Ok(msg) = serde_json::from_str::<Value>(&line) else {
            return;
        };
        let id = msg["id"].clone();
        let reply = match msg["method"].as_str() {
            Some("mining.configure") => {
                rolling = true;
                json!({"id": id, "result": {"version-rolling": true, "version-rolling.mask": format!("{POOL_MASK:08x}")}, "error": null})
            }
            Some("mining.subscribe") => {
                json!({"id": id, "result": [[["mining.notify", "5e55"]], format!("{en1:08x}"), 4], "error": null})
            }
            Some("mining.authorize") => {
                let mut out = json!({"id": id, "result": true, "error": null}).to_string();
                out.push('\n');
                out.push_str(&json!({"id": null, "method": "mining.set_difficulty", "params": [Difficulty::MIN.to_f64()]}).to_string());
                out.push('\n');
                let mut stratum_prev = prev;
                for word in stratum_prev.chunks_mut(4) {
                    word.reverse();
                }
                out.push_str(&json!({"id": null, "method": "mining.notify", "params": [
                    "1", hex::encode(stratum_prev), hex::encode(coinb1()), hex::encode(coinb2()), [],
                    format!("{VERSION:08x}"), format!("{NBITS:08x}"), format!("{NTIME:08x}"), true
                ]}).to_string());
                out.push('\n');
                if w.write_all(out.as_bytes()).is_err() {
                    return;
                }
                continue;
            }
            Some("mining.submit") => {
                let p = &msg["params"];
                let en2 = hex::decode(p[2].as_str().unwrap()).unwrap();
                let ntime = u32::from_str_radix(p[3].as_str().unwrap(), 16).unwrap();
                let nonce = u32::from_str_radix(p[4].as_str().unwrap(), 16).unwrap();
                let bits = p[5].as_str().map(|b| u32::from_str_radix(b, 16).unwrap());
                if bits.is_some() != rolling || bits.is_some_and(|b| b & !POOL_MASK != 0) {
                    seen.lock().unwrap().bad_version_bits += 1;
                }
                // ckpool's formula: the job's version with the bits ORed in.
                let version = VERSION | bits.unwrap_or(0);
                let mut cb = coinb1();
                cb.extend_from_slice(&en1.to_be_bytes());
                cb.extend_from_slice(&en2);
                cb.extend_from_slice(&coinb2());
                let root = merkle_root_from_branch(&sha256d(&cb), &[]);
                let hash = sha256d_header(&header(version, &prev, &root, ntime, NBITS, nonce));
                let mut st = seen.lock().unwrap();
                if net.is_met_by(&hash) {
                    st.blocks += 1;
                }
                if share_target.is_met_by(&hash) && ntime == NTIME {
                    st.accepted += 1;
                    if bits.is_some_and(|b| b != 0) {
                        st.rolled += 1;
                    }
                    json!({"id": id, "result": true, "error": null})
                } else {
                    st.above_target += 1;
                    json!({"id": id, "result": false, "error": [23, "Above target", null], "reject-reason": "Above target"})
                }
            }
            _ => json!({"id": id, "result": null, "error": [20, "Method not found", null]}),
        };
        let submit = msg["method"].as_str() == Some("mining.submit");
        if submit && !delay.is_zero() {
            std::thread::sleep(delay);
        }
        // Taken before the write: whatever the reply causes (the other miners closing) comes
        // after it, however late this thread runs again.
        let writing = Instant::now();
        if w.write_all(format!("{reply}\n").as_bytes()).is_err() {
            return;
        }
        if submit && !delay.is_zero() {
            seen.lock().unwrap().last_slow_reply = Some(writing);
        }
    }
}

fn ckload_exe() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_ckload"))
}

#[test]
fn worker_processes_from_two_source_addresses_merge_exactly() {
    let pool = FakePool::start();
    let mut spec = RunSpec::new(Scenario::Steady, pool.addr, 40);
    spec.workers = 2;
    spec.sources = vec!["127.0.0.2".parse().unwrap(), "127.0.0.3".parse().unwrap()];
    spec.ramp = Duration::from_millis(500);
    spec.duration = Duration::from_secs(4);
    spec.drain = Duration::from_secs(2);
    spec.rate = 80.0;
    spec.low_difficulty_rate = 0.05;
    spec.progress = false;
    let report = run(&spec, &Launcher::Processes { exe: ckload_exe() }).unwrap();
    println!("{}", summary(&report));

    assert!(
        report.worker_failures.is_empty(),
        "{:?}",
        report.worker_failures
    );
    assert_eq!(report.error_count(), 0, "{}", summary(&report));
    assert_eq!(report.counters.authorized, 40);
    assert_eq!(report.peak_authorized, 40);
    assert_eq!(report.counters.blocks_submitted, 0);
    let seen = pool.seen.lock().unwrap();
    assert_eq!(
        seen.peers,
        ["127.0.0.2", "127.0.0.3"]
            .iter()
            .map(|a| a.parse().unwrap())
            .collect::<BTreeSet<IpAddr>>()
    );
    assert_eq!(seen.blocks, 0, "ckload submitted block solutions");
    // The merged counts are exactly what the fake pool saw.
    assert_eq!(report.counters.accepted, seen.accepted);
    assert_eq!(report.counters.rejected, seen.above_target);
    assert!(seen.accepted > 100, "{} accepted", seen.accepted);
    let low = &report.shares[ShareKind::LowDifficulty.as_str()];
    assert!(low.submitted > 0);
    assert_eq!(
        low.rejected.get("Above target").copied(),
        Some(low.submitted)
    );
    assert_eq!(report.unexpected_replies, 0);
    // The merged histogram holds every worker's samples.
    assert_eq!(
        report.latency["submit"].count,
        report.counters.accepted + report.counters.rejected
    );
    assert_eq!(report.latency["login"].count, 40);
    assert!(report.ckload.cpu_secs > 0.0);
}

/// Slow replies are listed with when they were sent; at the end no miner closes its connection
/// while another still waits for a reply (the close storm would delay reading it, and count
/// ckload's own teardown as the pool's latency).
#[test]
fn slow_submits_are_reported_and_the_end_waits_for_every_reply() {
    let slow = Duration::from_millis(150);
    let pool = FakePool::start_with(slow);
    let mut spec = RunSpec::new(Scenario::Steady, pool.addr, 8);
    spec.workers = 1;
    spec.ramp = Duration::from_millis(300);
    spec.duration = Duration::from_secs(2);
    spec.drain = Duration::from_secs(2);
    spec.rate = 80.0;
    spec.progress = false;
    let report = run(&spec, &Launcher::InProcess).unwrap();
    println!("{}", summary(&report));
    assert_eq!(report.error_count(), 0, "{}", summary(&report));
    let s = &report.slow_submits;
    assert!(s.count >= 2, "{s:?}");
    assert!(
        s.largest
            .iter()
            .all(|b| u128::from(b.max_ms) >= slow.as_millis()
                && b.workers == 1
                && b.at_secs >= 0.0),
        "{s:?}"
    );
    // The fast miners never took as long.
    assert!(
        report.latency["submit_window"].count > s.count,
        "{report:?}"
    );
    // One miner in eight is slow: more than 1 % of every second's submits, so each second's
    // p99 is the slow reply's latency (2 significant figures).
    let secs = &report.submit_seconds;
    assert!(!secs.p99_us.is_empty(), "{secs:?}");
    let slow_us = u64::try_from(slow.as_micros()).unwrap() * 99 / 100;
    assert!(secs.median_p99_us >= slow_us, "{secs:?}");
    assert!(secs.worst_p99_us >= secs.median_p99_us, "{secs:?}");

    let seen = pool.seen.lock().unwrap();
    let last = seen.last_slow_reply.expect("the slow miner was answered");
    let fast_closes: Vec<_> = seen.closed_at.iter().filter(|(en1, _)| *en1 != 1).collect();
    assert_eq!(fast_closes.len(), 7, "{:?}", seen.closed_at);
    for (en1, at) in fast_closes {
        assert!(
            *at >= last,
            "miner {en1} closed {:?} before the last slow reply",
            last.duration_since(*at)
        );
        // ... and soon after it: told, not waiting for the drain time (2 s) to run out.
        assert!(
            at.duration_since(last) < Duration::from_millis(300),
            "miner {en1} closed {:?} after the last slow reply",
            at.duration_since(last)
        );
    }
}

/// Miners that negotiate version rolling submit rolled versions the pool recomputes the same
/// share hash from (and only bits inside the granted mask).
#[test]
fn version_rolling_miners_submit_rolled_shares() {
    let pool = FakePool::start();
    let mut spec = RunSpec::new(Scenario::Steady, pool.addr, 6);
    spec.workers = 1;
    spec.version_rolling = Some(0xffff_ffff);
    spec.ramp = Duration::from_millis(300);
    spec.duration = Duration::from_secs(2);
    spec.drain = Duration::from_secs(2);
    spec.rate = 60.0;
    spec.progress = false;
    let report = run(&spec, &Launcher::InProcess).unwrap();
    println!("{}", summary(&report));
    assert_eq!(report.error_count(), 0, "{}", summary(&report));
    assert_eq!(report.counters.authorized, 6);
    let seen = pool.seen.lock().unwrap();
    assert_eq!(seen.bad_version_bits, 0);
    assert_eq!(
        seen.above_target, 0,
        "rolled shares judged at another version"
    );
    assert!(seen.accepted > 20, "{} accepted", seen.accepted);
    assert_eq!(seen.rolled, seen.accepted);
    assert_eq!(report.counters.accepted, seen.accepted);
}

#[test]
fn refuses_non_loopback_targets() {
    let out = std::process::Command::new(ckload_exe())
        .args([
            "steady",
            "--url",
            "192.0.2.1:3333",
            "--miners",
            "1",
            "--duration",
            "1",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not a loopback address"), "{err}");
    let out = std::process::Command::new(ckload_exe())
        .args([
            "steady",
            "--url",
            "127.0.0.1:1",
            "--source-addrs",
            "10.0.0.1",
            "--miners",
            "1",
            "--duration",
            "1",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not loopback"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
