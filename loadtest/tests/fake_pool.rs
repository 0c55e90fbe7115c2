#![allow(clippy::unwrap_used, reason = "test code")]
//! The miner against a scripted fake pool that checks every share with `common`'s maths.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ckload::{Miner, MinerConfig, MinerEvent, MinerReport};
use common::Difficulty;
use common::Target;
use common::block::header;
use common::hash::{sha256d, sha256d_header};
use common::merkle::merkle_root_from_branch;
use serde_json::{Value, json};

const EN1: &str = "01020304";
const DIFF: f64 = 2.328_306_436_538_696_3e-10; // 2^-32
const VERSION: u32 = 0x2000_0000;
const POOL_MASK: u32 = 0x1fff_e000;
const SESSION: &str = "deadbeef";
const GENESIS_REGTEST: &str = "0f9188f13cb7b2c71f2a335e3a4fc328bf5beb436012afca590b1a11466e2206";

/// A plausible regtest coinbase split around an 8-byte extranonce (4 + 4) in the scriptSig.
fn coinb1() -> String {
    // version, 1 input, null prevout, scriptSig length 10: OP_1 (height 1), push 8.
    format!("02000000{}{}ffffffff0a5108", "01", "00".repeat(32))
}

fn coinb2() -> String {
    // sequence, 1 output of 50 BTC to a P2WPKH, locktime.
    format!(
        "ffffffff0100f2052a01000000160014{}00000000",
        "ab".repeat(20)
    )
}

/// Internal byte order → stratum's word-swapped hex (written independently of ckload).
fn stratum_prev(internal: &[u8; 32]) -> String {
    let mut b = *internal;
    for w in b.chunks_mut(4) {
        w.reverse();
    }
    hex::encode(b)
}

fn rpc_to_internal(rpc: &str) -> [u8; 32] {
    let mut h: [u8; 32] = hex::decode(rpc).unwrap().try_into().unwrap();
    h.reverse();
    h
}

fn to_rpc(h: &[u8; 32]) -> String {
    let mut b = *h;
    b.reverse();
    hex::encode(b)
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    /// Check every share and reply true only when it meets the target; a new job after a block.
    Honest,
    /// Cycle the replies: `[23,"Above target",null]`, ckpool's `reject-reason` Stale, then true.
    RejectCycle,
    /// Send `client.reconnect` right after authorising.
    Reconnect,
    /// Fail the subscribe with a string result, as ckpool does while initialising.
    Initialising,
}

#[derive(Default, Debug)]
struct PoolState {
    submits: u64,
    accepted: u64,
    rejected: BTreeMap<String, u64>,
    blocks: Vec<String>,
    bad_shares: u64,
    rolled_versions: HashSet<u32>,
    configured: bool,
    pongs: u64,
    unexpected: Vec<String>,
}

struct FakePool {
    addr: SocketAddr,
    state: Arc<Mutex<PoolState>>,
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
}

impl FakePool {
    fn start(mode: Mode, nbits: u32) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(Mutex::new(PoolState::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let (st, sp) = (Arc::clone(&state), Arc::clone(&stop));
        let handle = std::thread::spawn(move || {
            while !sp.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((s, _)) => Conn::new(s, mode, nbits, Arc::clone(&st), Arc::clone(&sp)).run(),
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        Self {
            addr,
            state,
            stop,
            handle: Some(handle),
        }
    }

    fn state<R>(&self, f: impl FnOnce(&PoolState) -> R) -> R {
        f(&self.state.lock().unwrap())
    }
}

impl Drop for FakePool {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            h.join().unwrap();
        }
    }
}

struct Conn {
    s: TcpStream,
    mode: Mode,
    nbits: u32,
    state: Arc<Mutex<PoolState>>,
    stop: Arc<AtomicBool>,
    job: u64,
    /// Live jobs: id → (prevhash, ntime).
    jobs: HashMap<u64, ([u8; 32], u32)>,
    prev: [u8; 32],
    mask: Option<u32>,
    seen: HashSet<[u8; 32]>,
}

impl Conn {
    fn new(
        s: TcpStream,
        mode: Mode,
        nbits: u32,
        state: Arc<Mutex<PoolState>>,
        stop: Arc<AtomicBool>,
    ) -> Self {
        s.set_nonblocking(false).unwrap();
        s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
        let prev = rpc_to_internal(GENESIS_REGTEST);
        Self {
            s,
            mode,
            nbits,
            state,
            stop,
            job: 0,
            jobs: HashMap::new(),
            prev,
            mask: None,
            seen: HashSet::new(),
        }
    }

    fn send(&mut self, v: &Value) {
        let mut line = v.to_string();
        line.push('\n');
        // The miner may already be gone; that ends the connection on the next read.
        let _ = self.s.write_all(line.as_bytes());
    }

    fn send_raw(&mut self, line: &str) {
        let _ = self.s.write_all(line.as_bytes());
    }

    fn notify(&mut self, clean: bool) {
        self.job += 1;
        if clean {
            self.jobs.clear();
        }
        let ntime = 0x6500_0000 + u32::try_from(self.job).unwrap();
        self.jobs.insert(self.job, (self.prev, ntime));
        let msg = json!({"id": null, "method": "mining.notify", "params": [
            format!("{:x}", self.job), stratum_prev(&self.prev), coinb1(), coinb2(), [],
            format!("{VERSION:08x}"), format!("{:08x}", self.nbits), format!("{ntime:08x}"), clean
        ]});
        self.send(&msg);
    }

    fn run(mut self) {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        while !self.stop.load(Ordering::Relaxed) {
            match self.s.read(&mut chunk) {
                Ok(0) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    continue;
                }
                Err(_) => return,
            }
            while let Some(pos) = buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = buf.drain(..=pos).collect();
                let msg: Value = serde_json::from_slice(&line).unwrap();
                self.handle(&msg);
            }
        }
    }

    fn handle(&mut self, msg: &Value) {
        let id = msg["id"].clone();
        match msg["method"].as_str() {
            Some("mining.configure") => {
                self.state.lock().unwrap().configured = true;
                self.mask = Some(POOL_MASK);
                self.send(&json!({"id": id, "error": null, "result":
                    {"version-rolling": true, "version-rolling.mask": format!("{POOL_MASK:08x}")}}));
            }
            Some("mining.subscribe") => {
                if self.mode == Mode::Initialising {
                    self.send(&json!({"id": id, "result": "Initialising", "error": null}));
                    return;
                }
                self.send(&json!({"id": id, "error": null,
                    "result": [[["mining.notify", SESSION]], EN1, 4]}));
                // Junk the miner must log and skip.
                self.send_raw("this is not json\n");
                self.send_raw("{\"id\":null,\"method\":\"mining.notify\",\"params\":[1]}\n");
                self.send_raw("[1,2,3]\n");
                self.send(
                    &json!({"id": null, "method": "mining.set_difficulty", "params": [DIFF]}),
                );
                self.notify(true);
            }
            Some("mining.authorize") => {
                self.send(&json!({"id": id, "result": true, "error": null}));
                self.send(&json!({"id": 4242, "method": "mining.ping", "params": []}));
                self.send(&json!({"id": null, "method": "client.show_message", "params": ["hi"]}));
                self.send(&json!({"id": null, "method": "mining.unknown_thing", "params": []}));
                if self.mode == Mode::Reconnect {
                    self.send(&json!({"id": null, "method": "client.reconnect", "params": []}));
                }
            }
            Some("mining.submit") => self.submit(&id, &msg["params"]),
            Some(other) => self.state.lock().unwrap().unexpected.push(other.to_owned()),
            None => {
                if id == json!(4242) && msg["result"] == json!("pong") {
                    self.state.lock().unwrap().pongs += 1;
                }
            }
        }
    }

    /// Recomputes the share from the submit fields with `common`'s functions.
    fn check_share(&mut self, p: &Value) -> Result<([u8; 32], bool), String> {
        let p = p.as_array().ok_or("params")?;
        let job =
            u64::from_str_radix(p[1].as_str().ok_or("job")?, 16).map_err(|e| e.to_string())?;
        let (prev, job_ntime) = *self.jobs.get(&job).ok_or("Stale")?;
        let en2 = hex::decode(p[2].as_str().ok_or("en2")?).map_err(|e| e.to_string())?;
        if en2.len() != 4 {
            return Err("nonce2 length".into());
        }
        let ntime = u32::from_str_radix(p[3].as_str().ok_or("ntime")?, 16).unwrap();
        if ntime != job_ntime {
            return Err("ntime".into());
        }
        let nonce_hex = p[4].as_str().ok_or("nonce")?;
        if nonce_hex.len() != 8 {
            return Err("nonce length".into());
        }
        let nonce = u32::from_str_radix(nonce_hex, 16).unwrap();
        let mut version = VERSION;
        if let Some(bits) = p.get(5) {
            let mask = self.mask.ok_or("version bits without configure")?;
            let bits = u32::from_str_radix(bits.as_str().ok_or("bits")?, 16).unwrap();
            if bits & !mask != 0 {
                return Err("Invalid version mask".into());
            }
            version = (VERSION & !mask) | (bits & mask);
            self.state.lock().unwrap().rolled_versions.insert(bits);
        }
        let mut cb = hex::decode(coinb1()).unwrap();
        cb.extend(hex::decode(EN1).unwrap());
        cb.extend(&en2);
        cb.extend(hex::decode(coinb2()).unwrap());
        let root = merkle_root_from_branch(&sha256d(&cb), &[]);
        let hash = sha256d_header(&header(version, &prev, &root, ntime, self.nbits, nonce));
        if !self.seen.insert(hash) {
            return Err("Duplicate".into());
        }
        let block = Target::from_compact(self.nbits).is_met_by(&hash);
        if !block
            && !Difficulty::from_f64(DIFF)
                .unwrap()
                .target()
                .is_met_by(&hash)
        {
            return Err("Above target".into());
        }
        Ok((hash, block))
    }

    fn submit(&mut self, id: &Value, params: &Value) {
        let n = {
            let mut st = self.state.lock().unwrap();
            st.submits += 1;
            st.submits
        };
        let checked = self.check_share(params);
        if checked.is_err() {
            self.state.lock().unwrap().bad_shares += 1;
        }
        let reply = match self.mode {
            Mode::RejectCycle => match n % 3 {
                1 => json!({"id": id, "result": false, "error": [23, "Above target", null]}),
                2 => json!({"id": id, "result": false, "error": null, "reject-reason": "Stale"}),
                _ => json!({"id": id, "result": true, "error": null}),
            },
            _ => match &checked {
                Ok(_) => json!({"id": id, "result": true, "error": null}),
                Err(e) => json!({"id": id, "result": false, "error": [20, e, null]}),
            },
        };
        {
            let mut st = self.state.lock().unwrap();
            if reply["result"] == json!(true) {
                st.accepted += 1;
                // Recorded before the reply goes out: once the miner has its answer, the test
                // may look (it raced, seen once in CI).
                if self.mode != Mode::RejectCycle
                    && let Ok((hash, true)) = checked
                {
                    st.blocks.push(to_rpc(&hash));
                }
            } else {
                let reason = reply["error"][1]
                    .as_str()
                    .or(reply["reject-reason"].as_str());
                *st.rejected.entry(reason.unwrap().to_owned()).or_default() += 1;
            }
        }
        self.send(&reply);
        // A found block moves the fake chain on.
        if self.mode != Mode::RejectCycle
            && let Ok((hash, true)) = checked
        {
            self.prev = hash;
            self.notify(true);
        }
        // In the reject test, keep the work flowing with a routine update now and then.
        if self.mode == Mode::RejectCycle && n % 4 == 0 {
            self.notify(false);
        }
    }
}

fn wait_until(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let end = Instant::now() + limit;
    while !cond() {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn drain(rx: &Receiver<MinerEvent>) -> Vec<MinerEvent> {
    rx.try_iter().collect()
}

fn run_honest(version_rolling: Option<u32>) -> (MinerReport, Vec<MinerEvent>, FakePool) {
    let pool = FakePool::start(Mode::Honest, 0x207f_ffff);
    let mut cfg = MinerConfig::new(pool.addr, "bcrt1qtest.worker1");
    cfg.stop_after_blocks = Some(3);
    cfg.max_shares_per_sec = 50.0;
    cfg.version_rolling = version_rolling;
    let (miner, rx) = Miner::start_with_events(cfg).unwrap();
    let report = miner.wait(Duration::from_secs(60));
    let events = drain(&rx);
    (report, events, pool)
}

fn check_honest(report: &MinerReport, events: &[MinerEvent], pool: &FakePool) {
    assert_eq!(report.error, None, "{report:?}");
    assert_eq!(report.blocks_accepted, 3, "{report:?}");
    assert!(report.accepted >= 3);
    assert_eq!(report.rejected, 0, "{report:?}");
    assert_eq!(report.unanswered, 0);
    assert_eq!(report.submitted, report.accepted);
    assert_eq!(report.extranonce1.as_deref(), Some(EN1));
    assert_eq!(report.session_id.as_deref(), Some(SESSION));
    assert_eq!(report.last_difficulty, Some(DIFF));
    assert_eq!(report.authorized, Some(true));
    assert!(report.notifies >= 3, "{report:?}");
    assert!(report.hashes >= report.submitted);
    pool.state(|st| {
        assert_eq!(st.bad_shares, 0, "{st:?}");
        assert_eq!(st.accepted, report.accepted);
        assert_eq!(st.submits, report.submitted);
        assert_eq!(st.blocks, report.block_hashes);
        assert_eq!(st.pongs, 1);
        assert!(st.unexpected.is_empty(), "{st:?}");
    });
    // Each job yields one block solution at most (pause after block).
    assert_eq!(report.blocks_submitted, 3);

    assert!(matches!(
        events.first(),
        Some(MinerEvent::Subscribed { extranonce1, nonce2_len: 4, session: Some(s) })
            if extranonce1 == EN1 && s == SESSION
    ));
    assert!(events.contains(&MinerEvent::Authorized(true)));
    assert!(events.contains(&MinerEvent::Difficulty(DIFF)));
    let first_notify = events.iter().find_map(|e| match e {
        MinerEvent::Notify {
            job_id,
            prevhash_rpc,
            clean,
            ..
        } => Some((job_id.clone(), prevhash_rpc.clone(), *clean)),
        _ => None,
    });
    assert_eq!(
        first_notify,
        Some(("1".to_owned(), GENESIS_REGTEST.to_owned(), true))
    );
    let blocks = events
        .iter()
        .filter(|e| {
            matches!(
                e,
                MinerEvent::ShareResult {
                    accepted: true,
                    block: true,
                    ..
                }
            )
        })
        .count();
    assert_eq!(blocks, 3);
    assert_eq!(events.last(), Some(&MinerEvent::Disconnected));
}

#[test]
fn mines_blocks_against_a_checking_pool() {
    let (report, events, pool) = run_honest(None);
    check_honest(&report, &events, &pool);
    assert_eq!(report.version_mask, None);
    pool.state(|st| assert!(!st.configured && st.rolled_versions.is_empty()));
}

#[test]
fn mines_blocks_with_version_rolling() {
    let (report, events, pool) = run_honest(Some(0x1fff_e000));
    check_honest(&report, &events, &pool);
    assert_eq!(report.version_mask, Some(POOL_MASK));
    assert_eq!(
        serde_json::to_value(&report).unwrap()["version_mask"],
        json!("1fffe000")
    );
    pool.state(|st| {
        assert!(st.configured);
        assert!(st.rolled_versions.iter().any(|&b| b != 0), "{st:?}");
    });
}

#[test]
fn counts_rejects_by_reason() {
    // A hard network target: no blocks, every hash is a share at difficulty 2^-32.
    let pool = FakePool::start(Mode::RejectCycle, 0x1d00_ffff);
    let mut cfg = MinerConfig::new(pool.addr, "alice");
    cfg.max_shares_per_sec = 200.0;
    let miner = Miner::start(cfg).unwrap();
    wait_until("12 submits", Duration::from_secs(30), || {
        pool.state(|st| st.submits >= 12)
    });
    let report = miner.stop();
    assert_eq!(report.error, None, "{report:?}");
    assert_eq!(report.unanswered, 0, "{report:?}");
    assert_eq!(report.blocks_submitted, 0);
    assert_eq!(report.submitted, report.accepted + report.rejected);
    pool.state(|st| {
        assert_eq!(st.bad_shares, 0, "{st:?}");
        assert_eq!(st.submits, report.submitted);
        assert_eq!(st.accepted, report.accepted);
        assert_eq!(st.rejected, report.reject_reasons);
    });
    assert!(report.reject_reasons["Above target"] >= 4, "{report:?}");
    assert!(report.reject_reasons["Stale"] >= 4, "{report:?}");
    assert_eq!(report.reject_reasons.len(), 2);
}

#[test]
fn rate_limit_holds() {
    let pool = FakePool::start(Mode::RejectCycle, 0x1d00_ffff);
    let mut cfg = MinerConfig::new(pool.addr, "alice");
    cfg.max_shares_per_sec = 10.0;
    cfg.duration = Some(Duration::from_millis(1500));
    let miner = Miner::start(cfg).unwrap();
    let report = miner.wait(Duration::from_secs(20));
    assert_eq!(report.error, None, "{report:?}");
    // One second of burst plus 1.5 s at 10/s, with slack for the handshake.
    assert!(
        report.submitted >= 5 && report.submitted <= 26,
        "{report:?}"
    );
    assert!(report.elapsed_secs < 10.0);
}

#[test]
fn stops_on_client_reconnect() {
    let pool = FakePool::start(Mode::Reconnect, 0x1d00_ffff);
    let cfg = MinerConfig::new(pool.addr, "alice");
    let (miner, rx) = Miner::start_with_events(cfg).unwrap();
    wait_until("the miner to stop", Duration::from_secs(10), || {
        miner.is_finished()
    });
    let report = miner.stop();
    assert!(
        report
            .error
            .as_deref()
            .unwrap_or("")
            .contains("client.reconnect"),
        "{report:?}"
    );
    assert_eq!(drain(&rx).last(), Some(&MinerEvent::Disconnected));
}

#[test]
fn subscribe_failure_is_an_error() {
    let pool = FakePool::start(Mode::Initialising, 0x207f_ffff);
    let miner = Miner::start(MinerConfig::new(pool.addr, "alice")).unwrap();
    let report = miner.wait(Duration::from_secs(10));
    assert!(
        report
            .error
            .as_deref()
            .unwrap_or("")
            .contains("Initialising"),
        "{report:?}"
    );
    assert_eq!(report.submitted, 0);
    assert_eq!(report.extranonce1, None);
}

#[test]
fn connect_refused_is_an_io_error() {
    let addr = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    assert!(Miner::start(MinerConfig::new(addr, "alice")).is_err());
}
