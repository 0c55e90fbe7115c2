//! Deterministic simulation: a shard driven in memory by a fake miner on a manual clock.
#![allow(
    clippy::unwrap_used,
    clippy::panic,
    clippy::indexing_slicing,
    missing_docs,
    reason = "test code"
)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ckpool_stratifier::share::{ShareInput, hash_share, roll_version};
use ckpool_stratifier::{
    AuthVerdict, ClientId, ExtranonceLayout, Origin, Pool, PoolConfig, RecordingOut, Shard,
    SourceId, Work as SourceWork,
};
use common::address::{Network, script_for_address};
use common::template::{Template, TemplateTx};
use common::{ConnId, Difficulty, Target};
use serde_json::{Value, json};

const PAYOUT: &str = "mnNghRjeAKbTqkvMYaE6kzkpsfWVdt3TRZ";
/// Network difficulty 1: CPU shares at 2^-32 never solve blocks.
const HARD_BITS: u32 = 0x1d00ffff;
/// Regtest: half of all hashes solve a block.
const EASY_BITS: u32 = 0x207fffff;

fn template(prev: u8, bits: u32, txs: usize) -> Arc<Template> {
    use bitcoin::hashes::Hash as _;
    let transactions = (0..txs)
        .map(|i| {
            let tx = bitcoin::Transaction {
                version: bitcoin::transaction::Version::ONE,
                lock_time: bitcoin::absolute::LockTime::ZERO,
                input: vec![bitcoin::TxIn {
                    previous_output: bitcoin::OutPoint::new(
                        bitcoin::Txid::from_byte_array([i as u8 + 1; 32]),
                        0,
                    ),
                    ..Default::default()
                }],
                output: vec![bitcoin::TxOut {
                    value: bitcoin::Amount::from_sat(1000),
                    script_pubkey: bitcoin::ScriptBuf::new(),
                }],
            };
            let txid = tx.compute_txid().to_byte_array();
            TemplateTx {
                data: bitcoin::consensus::serialize(&tx),
                txid,
                wtxid: txid,
            }
        })
        .collect();
    Arc::new(Template {
        version: 0x2000_0000,
        prev_hash: [prev; 32],
        bits,
        curtime: 1_700_000_000,
        height: 1000,
        coinbase_value: 50_0000_0000,
        coinbase_flags: Vec::new(),
        transactions,
        default_witness_commitment: None,
        rules: Vec::new(),
    })
}

struct Sim {
    pool: Arc<Pool>,
    shard: Shard,
    out: RecordingOut,
    now: Instant,
}

fn sim_with(solo: bool, bits: u32, tweak: impl FnOnce(&mut PoolConfig)) -> Sim {
    let payout = (!solo).then(|| script_for_address(PAYOUT, Network::Regtest).unwrap());
    let mut cfg = PoolConfig::new(Network::Regtest, payout);
    cfg.solo = solo;
    cfg.mindiff = Difficulty::MIN;
    cfg.startdiff = Difficulty::MIN;
    tweak(&mut cfg);
    let pool = Pool::new(cfg, 1, Instant::now());
    let now = Instant::now();
    pool.new_template(template(1, bits, 3), now).unwrap();
    Sim {
        shard: Shard::new(Arc::clone(&pool)),
        pool,
        out: RecordingOut::default(),
        now,
    }
}

fn sim() -> Sim {
    sim_with(false, HARD_BITS, |_| {})
}

fn peer() -> SocketAddr {
    "127.0.0.1:5000".parse().unwrap()
}

/// What a miner learnt from the pool.
#[derive(Default, Clone)]
struct Work {
    en1: Vec<u8>,
    n2len: usize,
    diff: f64,
    job: Option<Vec<Value>>,
}

impl Sim {
    fn open(&mut self, n: u32) -> ConnId {
        let c = ConnId::new(0, 0, n);
        self.shard.on_open(self.now, c, peer(), 0);
        c
    }

    fn line(&mut self, c: impl Into<ClientId> + Copy, v: Value) -> Vec<Value> {
        self.raw(c, v.to_string().as_bytes())
    }

    fn raw(&mut self, c: impl Into<ClientId> + Copy, bytes: &[u8]) -> Vec<Value> {
        self.shard.on_line(self.now, c, bytes, &mut self.out);
        self.out.take_json(c)
    }

    fn connect(&mut self, n: u32, user: &str) -> (ConnId, Work) {
        let c = self.open(n);
        (c, self.login(c, user))
    }

    /// Subscribes and authorises `c` as `user`.
    fn login(&mut self, c: impl Into<ClientId> + Copy, user: &str) -> Work {
        let mut w = Work::default();
        let r = self.line(
            c,
            json!({"id":1,"method":"mining.subscribe","params":["test/1.0"]}),
        );
        absorb(&mut w, &r);
        let r = self.line(
            c,
            json!({"id":2,"method":"mining.authorize","params":[user,"x"]}),
        );
        assert_eq!(r[0]["result"], true, "{r:?}");
        absorb(&mut w, &r);
        w
    }

    fn new_block(&mut self, prev: u8, bits: u32) -> Vec<Value> {
        let job = self
            .pool
            .new_template(template(prev, bits, 0), self.now)
            .unwrap();
        self.shard.on_job(&job, &mut self.out);
        Vec::new()
    }
}

fn absorb(w: &mut Work, msgs: &[Value]) {
    for m in msgs {
        if m["method"] == "mining.set_difficulty" {
            w.diff = m["params"][0].as_f64().unwrap();
        } else if m["method"] == "mining.notify" {
            w.job = Some(m["params"].as_array().unwrap().clone());
        } else if m["id"] == 1 && m["result"].is_array() {
            w.en1 = hex::decode(m["result"][1].as_str().unwrap()).unwrap();
            w.n2len = m["result"][2].as_u64().unwrap() as usize;
        }
    }
}

fn h32(s: &str) -> [u8; 32] {
    hex::decode(s).unwrap().try_into().unwrap()
}

/// Hashes a share from notify params the way a miner does.
fn share_hash(w: &Work, en2: &[u8], ntime: u32, nonce: u32, vbits: u32, mask: u32) -> [u8; 32] {
    let job = w.job.as_ref().unwrap();
    let coinb1 = hex::decode(job[2].as_str().unwrap()).unwrap();
    let coinb2 = hex::decode(job[3].as_str().unwrap()).unwrap();
    let branch: Vec<[u8; 32]> = job[4]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| h32(b.as_str().unwrap()))
        .collect();
    let mut prev = h32(job[1].as_str().unwrap());
    for c in prev.chunks_exact_mut(4) {
        c.reverse();
    }
    let version = u32::from_str_radix(job[5].as_str().unwrap(), 16).unwrap();
    let bits = u32::from_str_radix(job[6].as_str().unwrap(), 16).unwrap();
    let input = ShareInput {
        coinb1: &coinb1,
        enonce1: &w.en1,
        enonce2: en2,
        coinb2: &coinb2,
        branch: &branch,
        version: roll_version(version, vbits, mask),
        prev_hash: &prev,
        ntime,
        bits,
        nonce,
    };
    hash_share(&input, &mut Vec::new()).hash
}

/// Finds a nonce whose hash meets `want` and (optionally) does not meet `avoid`.
fn grind(w: &Work, en2: &[u8], want: Target, avoid: Option<Target>) -> u32 {
    let ntime = u32::from_str_radix(w.job.as_ref().unwrap()[7].as_str().unwrap(), 16).unwrap();
    (0u32..)
        .find(|&n| {
            let h = share_hash(w, en2, ntime, n, 0, 0);
            want.is_met_by(&h) && avoid.is_none_or(|a| !a.is_met_by(&h))
        })
        .unwrap()
}

fn submit(w: &Work, user: &str, en2: &[u8], nonce: u32) -> Value {
    let job = w.job.as_ref().unwrap();
    json!({"id": 9, "method": "mining.submit",
        "params": [user, job[0], hex::encode(en2), job[7], format!("{nonce:08x}")]})
}

fn good_share(w: &Work, user: &str, en2: &[u8]) -> Value {
    let nonce = grind(w, en2, Difficulty::from_f64(w.diff).unwrap().target(), None);
    submit(w, user, en2, nonce)
}

fn assert_reject(r: &[Value], code: i64, reason: &str) {
    let reply = r
        .iter()
        .find(|m| m["id"] == 9)
        .unwrap_or_else(|| panic!("no reply in {r:?}"));
    assert_eq!(reply["result"], false, "{reply}");
    assert_eq!(reply["error"][0], code, "{reply}");
    assert_eq!(reply["error"][1], reason, "{reply}");
    assert_eq!(reply["reject-reason"], reason, "{reply}");
}

#[test]
fn subscribe_reply_shape_then_difficulty_then_clean_notify() {
    let mut s = sim();
    let c = s.open(1);
    let r = s.line(
        c,
        json!({"id":"a","method":"mining.subscribe","params":["cgminer/4.10"]}),
    );
    assert_eq!(r.len(), 3, "{r:?}");
    assert_eq!(r[0]["id"], "a");
    assert_eq!(r[0]["error"], Value::Null);
    assert_eq!(r[0]["result"][0][0][0], "mining.notify");
    assert_eq!(r[0]["result"][1].as_str().unwrap().len(), 8);
    assert_eq!(r[0]["result"][2], 8);
    assert_eq!(r[1]["method"], "mining.set_difficulty");
    assert_eq!(r[2]["method"], "mining.notify");
    assert_eq!(r[2]["params"][8], true);
}

#[test]
fn accepted_share_and_stats() {
    let mut s = sim();
    let (c, w) = s.connect(1, "alice.rig1");
    let r = s.line(c, good_share(&w, "alice.rig1", &[0; 8]));
    assert_eq!(r[0]["result"], true, "{r:?}");
    assert_eq!(r[0]["error"], Value::Null);
    let st = s.pool.stats();
    assert_eq!((st.accepted, st.rejected), (1, 0));
    assert_eq!(st.users["alice"].workers["alice.rig1"].accepted, 1);
}

#[test]
fn long_worker_names_are_kept_truncated_and_match_in_full_or_truncated() {
    let mut s = sim();
    let long = format!("alice.{}", "r".repeat(200));
    let kept = &long[..127];
    let (c, w) = s.connect(1, &long);
    let r = s.line(c, good_share(&w, &long, &[2; 8]));
    assert_eq!(r[0]["result"], true, "the full name: {r:?}");
    let r = s.line(c, good_share(&w, kept, &[3; 8]));
    assert_eq!(r[0]["result"], true, "the kept name: {r:?}");
    let r = s.line(c, good_share(&w, "alice.rig1", &[4; 8]));
    assert_reject(&r, 20, "Worker mismatch");
    let st = s.pool.stats();
    assert_eq!(st.users["alice"].workers[kept].accepted, 2);
}

#[test]
fn duplicate_share() {
    let mut s = sim();
    let (c, w) = s.connect(1, "alice");
    let share = good_share(&w, "alice", &[1; 8]);
    assert_eq!(s.line(c, share.clone())[0]["result"], true);
    assert_reject(&s.line(c, share), 22, "Duplicate");
    assert_eq!(s.pool.stats().reject_reasons["Duplicate"], 1);
}

#[test]
fn stale_share_after_new_block() {
    let mut s = sim();
    let (c, w) = s.connect(1, "alice");
    let share = good_share(&w, "alice", &[2; 8]);
    s.new_block(2, HARD_BITS);
    assert_reject(&s.line(c, share), 21, "Stale");
}

#[test]
fn bad_nonce2_length() {
    let mut s = sim();
    let (c, w) = s.connect(1, "alice");
    let mut share = good_share(&w, "alice", &[3; 8]);
    share["params"][2] = json!("0303030303");
    assert_reject(&s.line(c, share), 20, "Invalid nonce2 length");
}

#[test]
fn above_target() {
    let mut s = sim();
    let (c, mut w) = s.connect(1, "alice");
    // Raise the difficulty far above what nonce 0..N reach, then submit an easy hash.
    let r = s.line(
        c,
        json!({"id":5,"method":"mining.suggest_difficulty","params":[1_000_000]}),
    );
    assert_eq!(r[0]["result"], true);
    absorb(&mut w, &r);
    assert_eq!(w.diff, 1_000_000.0);
    // A fresh job, so the old-difficulty window no longer applies.
    s.new_block(3, HARD_BITS);
    absorb(&mut w, &s.out.take_json(c));
    let nonce = grind(
        &w,
        &[4; 8],
        Difficulty::MIN.target(),
        Some(Difficulty::from_f64(1e6).unwrap().target()),
    );
    assert_reject(
        &s.line(c, submit(&w, "alice", &[4; 8], nonce)),
        23,
        "Above target",
    );
}

#[test]
fn bad_job_id() {
    let mut s = sim();
    let (c, w) = s.connect(1, "alice");
    let mut share = good_share(&w, "alice", &[5; 8]);
    share["params"][1] = json!("deadbeef");
    assert_reject(&s.line(c, share.clone()), 21, "Invalid JobID");
    share["params"][1] = json!("not hex");
    assert_reject(&s.line(c, share), 21, "Invalid JobID");
}

#[test]
fn malformed_submits() {
    let mut s = sim();
    let (c, w) = s.connect(1, "alice");
    let good = good_share(&w, "alice", &[6; 8]);
    let cases: Vec<(Value, &str)> = vec![
        (
            json!({"id":9,"method":"mining.submit","params":"x"}),
            "Params not array",
        ),
        (json!({"id":9,"method":"mining.submit"}), "Params not array"),
        (
            json!({"id":9,"method":"mining.submit","params":["alice","1","00"]}),
            "Invalid array size",
        ),
        (
            json!({"id":9,"method":"mining.submit","params":[5, good["params"][1], good["params"][2], good["params"][3], good["params"][4]]}),
            "No username",
        ),
        (
            json!({"id":9,"method":"mining.submit","params":["alice", "", good["params"][2], good["params"][3], good["params"][4]]}),
            "No job_id",
        ),
        (
            json!({"id":9,"method":"mining.submit","params":["alice", good["params"][1], "xyz", good["params"][3], good["params"][4]]}),
            "No nonce2",
        ),
        (
            json!({"id":9,"method":"mining.submit","params":["alice", good["params"][1], good["params"][2], [], good["params"][4]]}),
            "No ntime",
        ),
        (
            json!({"id":9,"method":"mining.submit","params":["alice", good["params"][1], good["params"][2], good["params"][3], "12"]}),
            "No nonce",
        ),
        (
            json!({"id":9,"method":"mining.submit","params":["alice", good["params"][1], good["params"][2], good["params"][3], "zzzzzzzz"]}),
            "No nonce",
        ),
        (
            json!({"id":9,"method":"mining.submit","params":["bob", good["params"][1], good["params"][2], good["params"][3], good["params"][4]]}),
            "Worker mismatch",
        ),
    ];
    for (msg, reason) in cases {
        assert_reject(&s.line(c, msg), 20, reason);
    }
    // The honest share still goes through afterwards.
    assert_eq!(s.line(c, good)[0]["result"], true);
}

#[test]
fn ntime_out_of_range() {
    let mut s = sim();
    let (c, w) = s.connect(1, "alice");
    let mut share = good_share(&w, "alice", &[7; 8]);
    share["params"][3] = json!(format!("{:08x}", 1_700_000_000u32 - 1));
    assert_reject(&s.line(c, share.clone()), 20, "Ntime out of range");
    share["params"][3] = json!(format!("{:08x}", 1_700_000_000u32 + 7001));
    assert_reject(&s.line(c, share), 20, "Ntime out of range");
}

#[test]
fn version_rolling_within_and_outside_mask() {
    let mut s = sim();
    let c = s.open(1);
    let r = s.line(c, json!({"id":3,"method":"mining.configure","params":[["version-rolling"],{"version-rolling.mask":"ffffffff","version-rolling.min-bit-count":2}]}));
    assert_eq!(r[0]["result"]["version-rolling"], true);
    assert_eq!(r[0]["result"]["version-rolling.mask"], "1fffe000");
    let mut w = Work::default();
    absorb(
        &mut w,
        &s.line(c, json!({"id":1,"method":"mining.subscribe","params":[]})),
    );
    absorb(
        &mut w,
        &s.line(
            c,
            json!({"id":2,"method":"mining.authorize","params":["v","x"]}),
        ),
    );
    let ntime = u32::from_str_radix(w.job.as_ref().unwrap()[7].as_str().unwrap(), 16).unwrap();
    let vbits = 0x0000_2000;
    let target = Difficulty::from_f64(w.diff).unwrap().target();
    let nonce = (0u32..)
        .find(|&n| target.is_met_by(&share_hash(&w, &[8; 8], ntime, n, vbits, 0x1fff_e000)))
        .unwrap();
    let mut share = submit(&w, "v", &[8; 8], nonce);
    share["params"]
        .as_array_mut()
        .unwrap()
        .push(json!("00002000"));
    assert_eq!(s.line(c, share.clone())[0]["result"], true);
    share["params"][5] = json!("e0000000");
    assert_reject(&s.line(c, share), 20, "Invalid version mask");
}

#[test]
fn configure_intersects_masks() {
    let mut s = sim();
    let c = s.open(1);
    let r = s.line(c, json!({"id":3,"method":"mining.configure","params":[["version-rolling","unknown-ext"],{"version-rolling.mask":"00ffe000"}]}));
    assert_eq!(r[0]["result"]["version-rolling.mask"], "00ffe000");
    assert_eq!(r[0]["result"]["unknown-ext"], false);
}

#[test]
fn suggest_difficulty_before_subscribe_is_applied_and_answered() {
    let mut s = sim();
    let c = s.open(1);
    let r = s.line(
        c,
        json!({"id":4,"method":"mining.suggest_difficulty","params":[0.5]}),
    );
    assert_eq!(r[0]["result"], true);
    let r = s.line(c, json!({"id":1,"method":"mining.subscribe","params":[]}));
    assert_eq!(r[1]["method"], "mining.set_difficulty");
    assert_eq!(r[1]["params"][0], 0.5);
}

#[test]
fn messages_before_subscribe_get_errors_not_disconnects() {
    let mut s = sim();
    let c = s.open(1);
    let r = s.line(
        c,
        json!({"id":2,"method":"mining.authorize","params":["a","x"]}),
    );
    assert_eq!(r[0]["result"], false);
    assert_eq!(r[0]["error"][0], 25);
    let r = s.line(
        c,
        json!({"id":9,"method":"mining.submit","params":["a","1","00","00","00"]}),
    );
    assert_eq!(r[0]["error"][0], 25);
    let r = s.line(c, json!({"id":7,"method":"mining.nonsense","params":[]}));
    assert_eq!(r[0]["error"][1], "Method not found");
    assert!(s.out.closed.is_empty());
}

#[test]
fn unauthorised_submit_gets_error_24() {
    let mut s = sim();
    let c = s.open(1);
    s.line(c, json!({"id":1,"method":"mining.subscribe","params":[]}));
    let r = s.line(
        c,
        json!({"id":9,"method":"mining.submit","params":["a","1","00","00","00"]}),
    );
    assert_eq!(r[0]["error"][0], 24);
}

#[test]
fn garbage_line_gets_error_and_disconnect() {
    let mut s = sim();
    let c = s.open(1);
    let r = s.raw(c, b"GET / HTTP/1.1");
    assert_eq!(r[0]["error"][0], 20);
    assert_eq!(s.out.closed, vec![c]);
}

#[test]
fn never_authorising_client_dropped_after_60s() {
    let mut s = sim();
    let lazy = s.open(1);
    s.line(
        lazy,
        json!({"id":1,"method":"mining.subscribe","params":[]}),
    );
    let (good, _) = s.connect(2, "alice");
    s.now += Duration::from_secs(59);
    s.shard.on_tick(s.now, &mut s.out);
    assert!(s.out.closed.is_empty());
    s.now += Duration::from_secs(2);
    s.shard.on_tick(s.now, &mut s.out);
    assert_eq!(s.out.closed, vec![lazy]);
    assert!(!s.out.closed.contains(&good.into()));
}

/// Sessions parked for resume now (the pool's `disconnected`, after a sampling round).
fn parked(s: &mut Sim) -> u64 {
    s.pool.sample_rates(s.now);
    s.pool.stats().disconnected
}

/// Subscribes and authorises `c` as `user`: (session id, extranonce1 as sent, work).
fn login_with_session(s: &mut Sim, c: ConnId, user: &str) -> (String, Value, Work) {
    let mut w = Work::default();
    let r = s.line(
        c,
        json!({"id":1,"method":"mining.subscribe","params":["x"]}),
    );
    let sid = r[0]["result"][0][0][1].as_str().unwrap().to_owned();
    let en1 = r[0]["result"][1].clone();
    absorb(&mut w, &r);
    let r = s.line(
        c,
        json!({"id":2,"method":"mining.authorize","params":[user,"x"]}),
    );
    assert_eq!(r[0]["result"], true, "{r:?}");
    absorb(&mut w, &r);
    (sid, en1, w)
}

#[test]
fn session_resume_reuses_enonce1() {
    let mut s = sim();
    let c = s.open(1);
    let (sid, en1, w) = login_with_session(&mut s, c, "alice.1");
    let r = s.line(c, good_share(&w, "alice.1", &[1; 8]));
    assert_eq!(r[0]["result"], true, "{r:?}");
    s.shard.on_close(s.now, c);
    // A session with an accepted share is kept for the whole resume window.
    s.now += Duration::from_secs(100);
    let c2 = s.open(2);
    let r = s.line(
        c2,
        json!({"id":1,"method":"mining.subscribe","params":["x", sid]}),
    );
    assert_eq!(r[0]["result"][1], en1);
    // A third connection asking for the same (now taken) session gets a fresh one.
    let c3 = s.open(3);
    let r = s.line(
        c3,
        json!({"id":1,"method":"mining.subscribe","params":["x", sid]}),
    );
    assert_ne!(r[0]["result"][1], en1);
}

/// As ckpool, only an authorised client's session is kept for resume; one that never had an
/// accepted share only for the short window (60 s), so throw-away sessions (subscribe and
/// leave, or authorise a new name and leave) do not fill the table for 10 minutes.
#[test]
fn only_authorised_sessions_are_parked_and_shareless_ones_briefly() {
    let mut s = sim();
    // Subscribed, never authorised: nothing parked, its extranonce1 is free again.
    let c = s.open(1);
    let r = s.line(
        c,
        json!({"id":1,"method":"mining.subscribe","params":["x"]}),
    );
    let sid = r[0]["result"][0][0][1].as_str().unwrap().to_owned();
    let en1 = r[0]["result"][1].clone();
    s.shard.on_close(s.now, c);
    assert_eq!(parked(&mut s), 0);
    let c = s.open(2);
    let r = s.line(
        c,
        json!({"id":1,"method":"mining.subscribe","params":["x", sid]}),
    );
    assert_ne!(
        r[0]["result"][1], en1,
        "an unauthorised session was resumed"
    );
    s.shard.on_close(s.now, c);

    // Authorised, no share: resumable within the short window, not after it.
    let resumes_after = |s: &mut Sim, n: u32, wait: u64| {
        let c = s.open(n);
        let (sid, en1, _) = login_with_session(s, c, "bob.1");
        s.shard.on_close(s.now, c);
        assert_eq!(parked(s), 1);
        s.now += Duration::from_secs(wait);
        let c = s.open(n + 1);
        let r = s.line(
            c,
            json!({"id":1,"method":"mining.subscribe","params":["x", sid]}),
        );
        let resumed = r[0]["result"][1] == en1;
        s.shard.on_close(s.now, c);
        s.now += Duration::from_secs(700);
        assert_eq!(parked(s), 0);
        resumed
    };
    assert!(resumes_after(&mut s, 10, 30));
    assert!(!resumes_after(&mut s, 20, 61));
}

#[test]
fn new_job_notifies_subscribed_miners_once() {
    let mut s = sim();
    let (c, _) = s.connect(1, "alice");
    let job = s
        .pool
        .new_template(template(9, HARD_BITS, 0), s.now)
        .unwrap();
    s.shard.on_job(&job, &mut s.out);
    s.shard.on_job(&job, &mut s.out);
    let msgs = s.out.take_json(c);
    assert_eq!(msgs.len(), 1);
    assert_eq!(msgs[0]["params"][8], true);
}

#[test]
fn block_solution_is_assembled_and_submitted_before_stale_check() {
    let mut s = sim_with(false, EASY_BITS, |_| {});
    let (c, w) = s.connect(1, "alice.rig");
    let net = Target::from_compact(EASY_BITS);
    let nonce = grind(&w, &[9; 8], net, None);
    let share = submit(&w, "alice.rig", &[9; 8], nonce);
    // Make the job stale first: the block must still be submitted.
    s.new_block(7, EASY_BITS);
    assert_reject(&s.line(c, share), 21, "Stale");
    let blocks = s.out.take_blocks();
    assert_eq!(blocks.len(), 1);
    let raw = hex::decode(blocks[0].hex.as_ref().unwrap()).unwrap();
    let block: bitcoin::Block = bitcoin::consensus::deserialize(&raw).unwrap();
    assert!(block.check_merkle_root());
    assert_eq!(block.txdata.len(), 4);
    assert_eq!(block.block_hash().to_string(), blocks[0].hash);
    let payout = script_for_address(PAYOUT, Network::Regtest).unwrap();
    assert_eq!(
        block.txdata[0].output[0].script_pubkey.as_bytes(),
        &payout[..]
    );
}

#[test]
fn a_replayed_block_solution_is_a_duplicate_and_makes_no_second_candidate() {
    let mut s = sim_with(false, EASY_BITS, |_| {});
    let (c, w) = s.connect(1, "alice.rig");
    let nonce = grind(&w, &[5; 8], Target::from_compact(EASY_BITS), None);
    let share = submit(&w, "alice.rig", &[5; 8], nonce);
    assert_eq!(s.line(c, share.clone())[0]["result"], true);
    assert_eq!(
        s.out.take_blocks().len(),
        1,
        "the first sighting is a block"
    );
    assert_reject(&s.line(c, share.clone()), 22, "Duplicate");
    assert_reject(&s.line(c, share), 22, "Duplicate");
    assert!(
        s.out.take_blocks().is_empty(),
        "a replay builds and queues no block"
    );
    let st = s.pool.stats();
    assert_eq!(st.blocks.len(), 1, "counted once");
    assert_eq!(st.users["alice"].blocks, 1);
    assert_eq!(st.reject_reasons["Duplicate"], 2);
}

#[test]
fn a_replayed_stale_block_solution_is_submitted_once() {
    // A block share on a job made stale by a new block is still submitted (it may win a race),
    // once: sent again, it stays "Stale" and makes no candidate.
    let mut s = sim_with(false, EASY_BITS, |_| {});
    let (c, w) = s.connect(1, "alice.rig");
    let nonce = grind(&w, &[6; 8], Target::from_compact(EASY_BITS), None);
    let share = submit(&w, "alice.rig", &[6; 8], nonce);
    s.new_block(7, EASY_BITS);
    assert_reject(&s.line(c, share.clone()), 21, "Stale");
    assert_reject(&s.line(c, share), 21, "Stale");
    assert_eq!(s.out.take_blocks().len(), 1);
}

#[test]
fn share_events_only_when_wanted() {
    let mut s = sim();
    let (c, w) = s.connect(1, "alice.rig1");
    let share = good_share(&w, "alice.rig1", &[1; 8]);
    assert_eq!(s.line(c, share.clone())[0]["result"], true);
    assert!(
        s.out.events.is_empty(),
        "nobody asked for shares: none built"
    );
    s.out.shares = true;
    let share2 = good_share(&w, "alice.rig1", &[2; 8]);
    assert_eq!(s.line(c, share2.clone())[0]["result"], true);
    assert_reject(&s.line(c, share2.clone()), 22, "Duplicate");
    // A submit refused before hashing (no such job) is not a share record.
    let mut bad = share;
    bad["params"][1] = json!("ffffffffffffffff");
    assert_reject(&s.line(c, bad), 21, "Invalid JobID");
    let recs = s.out.take_shares();
    assert_eq!(recs.len(), 2, "{recs:?}");
    let (ok, dup) = (&recs[0], &recs[1]);
    assert!(ok.result && ok.reject_reason.is_none());
    assert!(!dup.result);
    assert_eq!(
        dup.reject_reason,
        Some(ckpool_stratifier::Reject::Duplicate)
    );
    let job = w.job.as_ref().unwrap();
    assert_eq!(format!("{:016x}", ok.workinfoid), job[0].as_str().unwrap());
    assert_eq!(ok.enonce1, hex::encode(&w.en1));
    assert_eq!(ok.nonce2, hex::encode([2u8; 8]));
    assert_eq!(ok.nonce, share2["params"][4].as_str().unwrap());
    assert_eq!(ok.workername, "alice.rig1");
    assert_eq!(ok.username, "alice");
    assert_eq!(ok.address, "127.0.0.1");
    assert_eq!(ok.agent, "test/1.0");
    assert_eq!(ok.diff, w.diff);
    assert!(ok.sdiff >= ok.diff);
    let line = serde_json::to_value(dup).unwrap();
    assert_eq!(line["reject-reason"], "Duplicate");
    assert!(
        serde_json::to_value(ok)
            .unwrap()
            .get("reject-reason")
            .is_none()
    );
}

#[test]
fn failed_solo_authorisations_back_off_per_username() {
    let mut s = sim_with(true, EASY_BITS, |_| {});
    let auth = |s: &mut Sim, n: u32, user: &str| -> (ConnId, Vec<Value>) {
        let c = s.open(n);
        s.line(c, json!({"id":1,"method":"mining.subscribe","params":[]}));
        let r = s.line(
            c,
            json!({"id":2,"method":"mining.authorize","params":[user,"x"]}),
        );
        (c, r)
    };
    let throttled = "Failed authorisation, retry later";
    let (_, r) = auth(&mut s, 1, "bad.w1");
    assert_eq!(r[0]["error"][1], "Invalid address", "{r:?}");
    // Within 3 s the name (any worker of it) is refused unchecked, and the client dropped.
    let (c, r) = auth(&mut s, 2, "bad.w2");
    assert_eq!(r[0]["result"], false);
    assert_eq!(r[0]["error"][1], throttled, "{r:?}");
    assert!(s.out.closed.contains(&c.into()));
    // Other names are not affected.
    let (_, r) = auth(&mut s, 3, "mzBc4XEFSdzCDcTxAgf6EZXgsZWpztRhef.w");
    assert_eq!(r[0]["result"], true, "{r:?}");
    // After 3 s it is checked again; a second failure refuses it for 6 s.
    s.now += Duration::from_secs(3);
    let (_, r) = auth(&mut s, 4, "bad");
    assert_eq!(r[0]["error"][1], "Invalid address", "{r:?}");
    s.now += Duration::from_secs(5);
    let (_, r) = auth(&mut s, 5, "bad");
    assert_eq!(r[0]["error"][1], throttled, "{r:?}");
    s.now += Duration::from_secs(1);
    let (_, r) = auth(&mut s, 6, "bad");
    assert_eq!(r[0]["error"][1], "Invalid address", "{r:?}");
}

#[test]
fn solo_mode_pays_each_user() {
    let mut s = sim_with(true, EASY_BITS, |_| {});
    let c = s.open(1);
    s.line(c, json!({"id":1,"method":"mining.subscribe","params":[]}));
    let r = s.line(
        c,
        json!({"id":2,"method":"mining.authorize","params":["not-an-address.w","x"]}),
    );
    assert_eq!(r[0]["result"], false);
    let addr = "mzBc4XEFSdzCDcTxAgf6EZXgsZWpztRhef";
    let (c2, w) = s.connect(2, &format!("{addr}.w1"));
    let _ = c;
    let net = Target::from_compact(EASY_BITS);
    let nonce = grind(&w, &[1; 8], net, None);
    let r = s.line(c2, submit(&w, &format!("{addr}.w1"), &[1; 8], nonce));
    assert_eq!(r[0]["result"], true, "{r:?}");
    let blocks = s.out.take_blocks();
    let block: bitcoin::Block =
        bitcoin::consensus::deserialize(&hex::decode(blocks[0].hex.as_ref().unwrap()).unwrap())
            .unwrap();
    let script = script_for_address(addr, Network::Regtest).unwrap();
    assert_eq!(
        block.txdata[0].output[0].script_pubkey.as_bytes(),
        &script[..]
    );
}

#[test]
fn vardiff_raises_difficulty_for_a_fast_miner() {
    let mut s = sim();
    let (c, mut w) = s.connect(1, "fast");
    let start = w.diff;
    for i in 0..100u32 {
        s.now += Duration::from_millis(10);
        let en2 = i.to_be_bytes().repeat(2);
        let r = s.line(c, good_share(&w, "fast", &en2));
        assert_eq!(r[0]["result"], true, "{r:?}");
        absorb(&mut w, &r);
    }
    assert!(w.diff > start, "difficulty stayed at {start}");
}

fn core_template(name: &str) -> Arc<Template> {
    let text =
        std::fs::read_to_string(format!("{}/../testdata/{name}", env!("CARGO_MANIFEST_DIR")))
            .unwrap();
    Arc::new(Template::from_gbt(&serde_json::from_str(&text).unwrap()).unwrap())
}

#[test]
fn core_segwit_template_block_passes_merkle_and_witness_checks() {
    // Real Bitcoin Core output: 12 mempool transactions (legacy, P2SH-P2WPKH, P2WPKH, P2TR spends).
    let t = core_template("core-regtest-gbt-12tx-segwit.json");
    let payout_addr = "bcrt1qw508d6qejxtdg4y5r3zarvary0c5xw7kygt080";
    let payout = script_for_address(payout_addr, Network::Regtest).unwrap();
    let mut cfg = PoolConfig::new(Network::Regtest, Some(payout.clone()));
    cfg.mindiff = Difficulty::MIN;
    cfg.startdiff = Difficulty::MIN;
    cfg.coinbase.btcsig = b"/segwit test/".to_vec();
    let pool = Pool::new(cfg, 1, Instant::now());
    let now = Instant::now();
    pool.new_template(Arc::clone(&t), now).unwrap();
    let mut s = Sim {
        shard: Shard::new(Arc::clone(&pool)),
        pool,
        out: RecordingOut::default(),
        now,
    };
    let (c, w) = s.connect(1, "segwit.rig");
    assert_eq!(
        w.job.as_ref().unwrap()[4].as_array().unwrap().len(),
        4,
        "12 txs + coinbase: 4 branch levels"
    );
    let nonce = grind(&w, &[3; 8], Target::from_compact(t.bits), None);
    let r = s.line(c, submit(&w, "segwit.rig", &[3; 8], nonce));
    assert_eq!(r[0]["result"], true, "{r:?}");
    let blocks = s.out.take_blocks();
    assert_eq!(blocks.len(), 1);
    assert_eq!(blocks[0].height, 111);
    let block: bitcoin::Block =
        bitcoin::consensus::deserialize(&hex::decode(blocks[0].hex.as_ref().unwrap()).unwrap())
            .unwrap();
    assert_eq!(block.txdata.len(), 13);
    assert!(block.check_merkle_root(), "merkle root must be over txids");
    assert!(
        block.check_witness_commitment(),
        "witness commitment must be over wtxids"
    );
    assert_eq!(block.bip34_block_height().unwrap(), 111);
    let cb = &block.txdata[0];
    assert_eq!(cb.output[0].script_pubkey.as_bytes(), &payout[..]);
    assert_eq!(cb.output[0].value.to_sat(), t.coinbase_value);
    assert_eq!(
        cb.input[0].witness.len(),
        1,
        "coinbase carries the witness reserved value"
    );
    for (tx, tt) in block.txdata[1..].iter().zip(&t.transactions) {
        assert_eq!(
            bitcoin::hashes::Hash::to_byte_array(tx.compute_txid()),
            tt.txid
        );
    }
}

#[test]
fn get_transactions_and_txnhashes() {
    let mut s = sim();
    let (c, w) = s.connect(1, "alice");
    let job_id = w.job.as_ref().unwrap()[0].clone();
    let r = s.line(
        c,
        json!({"id":5,"method":"mining.get_transactions","params":[job_id]}),
    );
    assert_eq!(r[0]["result"], 3);
    let r = s.line(
        c,
        json!({"id":6,"method":"mining.get_txnhashes","params":[job_id]}),
    );
    assert_eq!(r[0]["result"].as_str().unwrap().split(' ').count(), 3);
    let r = s.line(
        c,
        json!({"id":7,"method":"mining.get_txnhashes","params":[job_id]}),
    );
    assert_eq!(r[0]["error"][1], "Ratelimit");
    let r = s.line(
        c,
        json!({"id":8,"method":"mining.get_transactions","params":["ffff"]}),
    );
    assert_eq!(r[0]["error"][0], 21);
}

// ---- Miner compatibility (issue 5): one test per quirk ------------------------------------

/// Network difficulty 2^32: no clamp to the network gets in the way of high difficulties.
const HUGE_BITS: u32 = 0x1900_ffff;

/// The raw lines sent to `c` since the last drain.
fn raw_lines(s: &mut Sim, c: ConnId) -> Vec<String> {
    let mut lines = Vec::new();
    let mut keep = Vec::new();
    for (conn, bytes) in s.out.sent.drain(..) {
        if conn == c {
            lines.extend(String::from_utf8(bytes).unwrap().lines().map(str::to_owned));
        } else {
            keep.push((conn, bytes));
        }
    }
    s.out.sent = keep;
    lines
}

#[test]
fn compat_bitaxe_session_replay() {
    // A real Bitaxe (AxeOS v2.2) session: subscribe, configure asking mask ffffffff, authorize
    // with a bech32 testnet address, suggest_difficulty 512 after authorize, a submit with
    // version bits. Solo mode on testnet with a real testnet template.
    let t = core_template("core-testnet3-gbt-2442185.json");
    let mut cfg = PoolConfig::new(Network::Testnet, None);
    cfg.solo = true;
    let pool = Pool::new(cfg, 1, Instant::now());
    let now = Instant::now();
    pool.new_template(t, now).unwrap();
    let mut s = Sim {
        shard: Shard::new(Arc::clone(&pool)),
        pool,
        out: RecordingOut::default(),
        now,
    };
    let c = s.open(1);
    let session = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../testdata/bitaxe-v2.2-session.jsonl"
    ))
    .unwrap();
    let mut replies = Vec::new();
    for line in session.lines().filter(|l| !l.trim().is_empty()) {
        replies.push(s.raw(c, line.as_bytes()));
    }
    // subscribe
    assert_eq!(replies[0][0]["id"], 1);
    assert!(replies[0][0]["result"][1].is_string(), "{:?}", replies[0]);
    assert_eq!(replies[0][0]["result"][2], 8);
    // configure: the intersection of ffffffff and our 1fffe000
    assert_eq!(replies[1][0]["result"]["version-rolling"], true);
    assert_eq!(replies[1][0]["result"]["version-rolling.mask"], "1fffe000");
    // authorize: the bech32 address is a valid solo user; its own job follows
    assert_eq!(replies[2][0]["result"], true, "{:?}", replies[2]);
    assert!(replies[2].iter().any(|m| m["method"] == "mining.notify"));
    // suggest_difficulty 512: answered, applied, and a clean notify follows the new difficulty
    assert_eq!(replies[3][0]["result"], true);
    assert_eq!(replies[3][1]["method"], "mining.set_difficulty");
    assert_eq!(replies[3][1]["params"][0], 512);
    assert_eq!(replies[3][2]["method"], "mining.notify");
    assert_eq!(replies[3][2]["params"][8], true);
    // the submit was made against another pool's job: a well-formed reject with a reason
    let r = &replies[4][0];
    assert_eq!(r["id"], 5);
    assert_eq!(r["result"], false);
    assert_eq!(r["error"][0], 21);
    assert_eq!(r["reject-reason"], "Invalid JobID");
}

#[test]
fn compat_version_bits_without_configure() {
    // Antminer S21 through rentals: rolls version bits without ever sending mining.configure.
    let mut s = sim();
    let (c, w) = s.connect(1, "s21");
    // The job carries the template's version, never rolled bits.
    assert_eq!(w.job.as_ref().unwrap()[5], "20000000");
    let ntime = u32::from_str_radix(w.job.as_ref().unwrap()[7].as_str().unwrap(), 16).unwrap();
    let target = Difficulty::from_f64(w.diff).unwrap().target();
    let nonce = (0u32..)
        .find(|&n| target.is_met_by(&share_hash(&w, &[5; 8], ntime, n, 0x0040_0000, 0x1fff_e000)))
        .unwrap();
    let mut share = submit(&w, "s21", &[5; 8], nonce);
    share["params"]
        .as_array_mut()
        .unwrap()
        .push(json!("00400000"));
    assert_eq!(
        s.line(c, share.clone())[0]["result"],
        true,
        "bits inside the default mask are accepted"
    );
    share["params"][5] = json!("80000000");
    assert_reject(&s.line(c, share), 20, "Invalid version mask");
}

#[test]
fn compat_suggest_target() {
    let mut s = sim_with(false, HUGE_BITS, |_| {});
    let c = s.open(1);
    // Target of difficulty 256: diff1 / 256.
    let target = format!("{:064x}", Difficulty::from_f64(256.0).unwrap().target().0);
    let r = s.line(
        c,
        json!({"id": 3, "method": "mining.suggest_target", "params": [target]}),
    );
    assert_eq!(r[0]["result"], true);
    let r = s.line(
        c,
        json!({"id": 1, "method": "mining.subscribe", "params": []}),
    );
    assert_eq!(r[1]["params"][0], 256);
}

#[test]
fn compat_minimum_difficulty_in_configure() {
    let mut s = sim_with(false, HUGE_BITS, |_| {});
    let c = s.open(1);
    let r = s.line(c, json!({"id": 3, "method": "mining.configure",
        "params": [["minimum-difficulty", "subscribe-extranonce"], {"minimum-difficulty.value": 2048}]}));
    assert_eq!(r[0]["result"]["minimum-difficulty"], true);
    let r = s.line(
        c,
        json!({"id": 1, "method": "mining.subscribe", "params": []}),
    );
    assert_eq!(r[1]["params"][0], 2048);
    let r = s.line(
        c,
        json!({"id": 4, "method": "mining.extranonce.subscribe", "params": []}),
    );
    assert_eq!(r[0]["result"], true);
}

#[test]
fn compat_password_minimum_and_fixed_difficulty() {
    let mut s = sim_with(false, HUGE_BITS, |_| {});
    let c = s.open(1);
    s.line(
        c,
        json!({"id": 1, "method": "mining.subscribe", "params": []}),
    );
    let r = s.line(
        c,
        json!({"id": 2, "method": "mining.authorize", "params": ["rental", "x,d=1024"]}),
    );
    assert_eq!(r[0]["result"], true);
    assert_eq!(r[1]["method"], "mining.set_difficulty");
    assert_eq!(r[1]["params"][0], 1024);
    assert_eq!(r[2]["method"], "mining.notify");

    // fd= fixes the difficulty: vardiff leaves it alone however fast the shares come.
    let mut s = sim();
    let c = s.open(1);
    let mut w = Work::default();
    absorb(
        &mut w,
        &s.line(
            c,
            json!({"id": 1, "method": "mining.subscribe", "params": []}),
        ),
    );
    // 2^-30: four hashes per share on average, cheap to grind here.
    let r = s.line(c, json!({"id": 2, "method": "mining.authorize", "params": ["fixed", "fd=0.000000000931322574615478515625"]}));
    absorb(&mut w, &r);
    assert_eq!(w.diff, 2f64.powi(-30));
    for i in 0..100u32 {
        s.now += Duration::from_millis(10);
        let r = s.line(c, good_share(&w, "fixed", &i.to_be_bytes().repeat(2)));
        assert_eq!(r[0]["result"], true);
        assert!(
            !r.iter().any(|m| m["method"] == "mining.set_difficulty"),
            "vardiff moved a fixed difficulty"
        );
    }
}

#[test]
fn compat_per_listener_difficulty() {
    let mut s = sim_with(false, HUGE_BITS, |cfg| {
        cfg.listener_diff = vec![
            ckpool_stratifier::ListenerDiff::default(),
            ckpool_stratifier::ListenerDiff {
                start: Some(Difficulty::from_f64(65536.0).unwrap()),
                min: Some(Difficulty::from_f64(1024.0).unwrap()),
            },
        ];
    });
    let low = ConnId::new(0, 0, 1);
    let high = ConnId::new(0, 0, 2);
    s.shard.on_open(s.now, low, peer(), 0);
    s.shard.on_open(s.now, high, peer(), 1);
    let r = s.line(
        low,
        json!({"id": 1, "method": "mining.subscribe", "params": []}),
    );
    assert!(r[1]["params"][0].as_f64().unwrap() < 1.0);
    let r = s.line(
        high,
        json!({"id": 1, "method": "mining.subscribe", "params": []}),
    );
    assert_eq!(r[1]["params"][0], 65536);
    // A suggestion below the listener's minimum is raised to it.
    let r = s.line(
        high,
        json!({"id": 3, "method": "mining.suggest_difficulty", "params": [1]}),
    );
    assert_eq!(r[1]["params"][0], 1024);
}

#[test]
fn compat_per_user_agent_minimum() {
    let mut s = sim_with(false, HUGE_BITS, |cfg| {
        cfg.agent_diff = vec![ckpool_stratifier::AgentDiff {
            pattern: "nicehash".into(),
            min: Difficulty::from_f64(500_000.0).unwrap(),
        }];
    });
    let c = s.open(1);
    let r = s.line(
        c,
        json!({"id": 1, "method": "mining.subscribe", "params": ["NiceHash/1.0.0"]}),
    );
    assert_eq!(r[1]["params"][0], 500_000);
    let other = s.open(2);
    let r = s.line(
        other,
        json!({"id": 1, "method": "mining.subscribe", "params": ["cgminer/4.12"]}),
    );
    assert!(r[1]["params"][0].as_f64().unwrap() < 1.0);
}

#[test]
fn compat_powers_of_two_and_integer_json() {
    let mut s = sim_with(false, HUGE_BITS, |cfg| cfg.diff_pow2 = true);
    let c = s.open(1);
    s.line(
        c,
        json!({"id": 1, "method": "mining.subscribe", "params": []}),
    );
    raw_lines(&mut s, c);
    let line =
        json!({"id": 3, "method": "mining.suggest_difficulty", "params": [1000]}).to_string();
    s.shard.on_line(s.now, c, line.as_bytes(), &mut s.out);
    // Sent as the JSON integer 512, not 512.0 or 1000.
    let lines = raw_lines(&mut s, c);
    assert!(
        lines
            .iter()
            .any(|l| l.contains("\"mining.set_difficulty\",\"params\":[512]")),
        "{lines:?}"
    );
    // Fractional difficulties only where the configuration allows them (mindiff below 1 here).
    let mut s = sim_with(false, HUGE_BITS, |cfg| cfg.mindiff = Difficulty::ONE);
    let c = s.open(1);
    let r = s.line(
        c,
        json!({"id": 3, "method": "mining.suggest_difficulty", "params": [0.001]}),
    );
    assert_eq!(r[0]["result"], true);
    let r = s.line(
        c,
        json!({"id": 1, "method": "mining.subscribe", "params": []}),
    );
    assert_eq!(r[1]["params"][0], 1);
}

#[test]
fn compat_difficulty_change_sends_notify_and_keeps_inflight_work_valid() {
    let mut s = sim_with(false, HUGE_BITS, |_| {});
    let (c, w) = s.connect(1, "nerdqaxe");
    // Work found at the current (low) difficulty on the current job...
    let share = good_share(&w, "nerdqaxe", &[6; 8]);
    // ...then the difficulty rises. The new difficulty comes with a clean notify at once.
    let r = s.line(
        c,
        json!({"id": 3, "method": "mining.suggest_difficulty", "params": [1_000_000]}),
    );
    assert_eq!(r[1]["method"], "mining.set_difficulty");
    assert_eq!(r[2]["method"], "mining.notify");
    assert_eq!(r[2]["params"][8], true);
    // The share on the job sent before the change is still accepted at the old difficulty.
    assert_eq!(s.line(c, share)[0]["result"], true);
}

/// A difficulty that one hash in about 1,024 meets: a share hashed with the wrong extranonce1
/// then fails, while grinding a good one stays quick.
fn one_in_1024() -> Difficulty {
    Difficulty::from_f64(2f64.powi(-22)).unwrap()
}

/// Grinds a nonce on `w`'s job that meets `d` with `w`'s extranonce1 and not with `other`'s.
fn grind_only_for(w: &Work, other: &Work, en2: &[u8], d: Difficulty) -> u32 {
    let ntime = u32::from_str_radix(w.job.as_ref().unwrap()[7].as_str().unwrap(), 16).unwrap();
    (0u32..)
        .find(|&n| {
            d.target().is_met_by(&share_hash(w, en2, ntime, n, 0, 0))
                && !d
                    .target()
                    .is_met_by(&share_hash(other, en2, ntime, n, 0, 0))
        })
        .unwrap()
}

#[test]
fn compat_set_extranonce_for_subscribed_miners() {
    // NiceHash and rentals subscribe with mining.extranonce.subscribe; when the pool must change
    // a session's extranonce1 (a proxy whose upstream changed), they get mining.set_extranonce
    // instead of a reconnect, and work already in flight still counts.
    let d = one_in_1024();
    let mut s = sim_with(false, HARD_BITS, |c| {
        c.mindiff = d;
        c.startdiff = d;
    });
    let (c, old) = s.connect(1, "rental");
    let r = s.line(
        c,
        json!({"id": 3, "method": "mining.extranonce.subscribe", "params": []}),
    );
    assert_eq!(r[0]["result"], true, "{r:?}");
    let inflight = good_share(&old, "rental", &[1; 8]);

    let en1 = s.shard.renew_extranonce1(s.now, c, &mut s.out).unwrap();
    let r = s.out.take_json(c);
    assert_eq!(r.len(), 2, "{r:?}");
    assert_eq!(r[0]["method"], "mining.set_extranonce");
    assert_eq!(r[0]["id"], Value::Null);
    let hex1 = r[0]["params"][0].as_str().unwrap();
    assert_eq!(hex1, format!("{:08x}", en1 as u32));
    assert_ne!(hex::decode(hex1).unwrap(), old.en1);
    assert_eq!(r[0]["params"][1], 8);
    assert_eq!(r[1]["method"], "mining.notify");
    assert_eq!(r[1]["params"][8], true, "the next notify is clean");
    assert!(s.out.closed.is_empty());
    let mut new = old.clone();
    new.en1 = hex::decode(hex1).unwrap();
    absorb(&mut new, &r);

    // Found with the old extranonce1 on the job sent before the change: accepted.
    assert_eq!(s.line(c, inflight)[0]["result"], true);
    // With the new one on the same job (re-sent clean under its id): accepted.
    let r = s.line(c, good_share(&new, "rental", &[2; 8]));
    assert_eq!(r[0]["result"], true, "{r:?}");

    // On a job sent after the change only the new extranonce1 counts.
    s.new_block(2, HARD_BITS);
    let r = s.out.take_json(c);
    absorb(&mut new, &r);
    let mut old_on_new_job = old.clone();
    absorb(&mut old_on_new_job, &r);
    let nonce = grind_only_for(&old_on_new_job, &new, &[3; 8], d);
    assert_reject(
        &s.line(c, submit(&old_on_new_job, "rental", &[3; 8], nonce)),
        23,
        "Above target",
    );
    let nonce = grind_only_for(&new, &old_on_new_job, &[4; 8], d);
    assert_eq!(
        s.line(c, submit(&new, "rental", &[4; 8], nonce))[0]["result"],
        true
    );
    let st = s.pool.stats();
    assert_eq!((st.accepted, st.rejected), (3, 1));
}

#[test]
fn compat_new_extranonce1_reconnects_miners_that_did_not_subscribe_to_it() {
    let mut s = sim();
    let c = s.open(1);
    let r = s.line(
        c,
        json!({"id":1,"method":"mining.subscribe","params":["cgminer/4.10"]}),
    );
    let sid = r[0]["result"][0][0][1].as_str().unwrap().to_owned();
    let old_en1 = r[0]["result"][1].as_str().unwrap().to_owned();
    // Authorised (only an authorised session is kept for resume).
    let r = s.line(
        c,
        json!({"id":2,"method":"mining.authorize","params":["carol.1","x"]}),
    );
    assert_eq!(r[0]["result"], true, "{r:?}");
    s.out.take_json(c);

    let en1 = s.shard.renew_extranonce1(s.now, c, &mut s.out).unwrap();
    let r = s.out.take_json(c);
    assert_eq!(r.len(), 1, "{r:?}");
    assert_eq!(r[0]["method"], "client.reconnect");
    assert_eq!(s.out.closed, vec![c]);
    s.shard.on_close(s.now, c);

    // Resuming the session on the new connection gives the new extranonce1.
    let c2 = s.open(2);
    let r = s.line(
        c2,
        json!({"id":1,"method":"mining.subscribe","params":["cgminer/4.10", sid]}),
    );
    let resumed = r[0]["result"][1].as_str().unwrap();
    assert_eq!(resumed, format!("{:08x}", en1 as u32));
    assert_ne!(resumed, old_en1);

    // Nothing to change on a connection that has not subscribed.
    let c3 = s.open(3);
    assert_eq!(s.shard.renew_extranonce1(s.now, c3, &mut s.out), None);
    assert!(s.out.take_json(c3).is_empty());
}

#[test]
fn totals_add_up_across_shards() {
    // Each shard counts into its own stripe of the pool totals; a snapshot adds them up.
    let mut a = sim();
    let mut b = Sim {
        shard: Shard::new(Arc::clone(&a.pool)),
        pool: Arc::clone(&a.pool),
        out: RecordingOut::default(),
        now: a.now,
    };
    let (ca, wa) = a.connect(1, "alice.a");
    let (cb, wb) = b.connect(2, "alice.b");
    assert_eq!(
        a.line(ca, good_share(&wa, "alice.a", &[1; 8]))[0]["result"],
        true
    );
    assert_eq!(
        b.line(cb, good_share(&wb, "alice.b", &[2; 8]))[0]["result"],
        true
    );
    let mut bad = good_share(&wb, "alice.b", &[3; 8]);
    bad["params"][1] = json!("ffffffffffffffff");
    assert_reject(&b.line(cb, bad), 21, "Invalid JobID");
    let st = a.pool.stats();
    assert_eq!((st.accepted, st.rejected), (2, 1));
    assert_eq!(st.reject_reasons["Invalid JobID"], 1);
    assert_eq!(st.users["alice"].accepted, 2);
    assert_eq!(st.users["alice"].workers["alice.b"].rejected, 1);
}

#[test]
fn sub_clients_are_sessions_of_their_own_and_close_with_their_connection() {
    let mut s = sim();
    let (p, q) = (ConnId::new(0, 0, 1), ConnId::new(0, 0, 2));
    // Two passthrough connections, each with sub-clients 1 and 2 (the same remote ids).
    let subs = [
        ClientId::Sub(p, 1),
        ClientId::Sub(p, 2),
        ClientId::Sub(q, 1),
        ClientId::Sub(q, 2),
    ];
    let mut work = Vec::new();
    for (i, &c) in subs.iter().enumerate() {
        s.shard.on_open(s.now, c, peer(), 0);
        work.push(s.login(c, &format!("user{i}.w")));
    }
    assert_eq!(s.shard.sessions(), 4);
    assert_eq!(s.pool.stats().clients, 4);
    // Four distinct sessions: four extranonce1s, and each sub-client's lines go to it alone.
    let mut en1s: Vec<_> = work.iter().map(|w| w.en1.clone()).collect();
    en1s.sort();
    en1s.dedup();
    assert_eq!(en1s.len(), 4);
    for (i, (&c, w)) in subs.iter().zip(&work).enumerate() {
        let user = format!("user{i}.w");
        let r = s.line(c, good_share(w, &user, &[i as u8; 8]));
        assert_eq!(r.len(), 1, "{r:?}");
        assert_eq!(r[0]["result"], true, "{r:?}");
        // Another sub-client's share is not this one's: its worker does not match.
        let other = (i + 1) % 4;
        let r = s.line(
            c,
            good_share(&work[other], &format!("user{other}.w"), &[9; 8]),
        );
        assert_eq!(r[0]["error"][1], "Worker mismatch", "{r:?}");
    }
    assert!(s.out.sent.is_empty(), "nothing went to anybody else");
    // A new job reaches every sub-client once.
    let job = s
        .pool
        .new_template(template(1, HARD_BITS, 1), s.now)
        .unwrap();
    s.shard.on_job(&job, &mut s.out);
    for &c in &subs {
        assert_eq!(s.out.take_json(c).len(), 1, "{c}");
    }
    // Closing p drops only p's sub-clients; q's keep working.
    s.shard.on_close(s.now, p);
    assert_eq!(s.shard.sessions(), 2);
    assert_eq!(s.pool.stats().clients, 2);
    assert!(
        s.line(subs[0], json!({"id":5,"method":"mining.ping"}))
            .is_empty()
    );
    for &c in &subs[2..] {
        assert_eq!(
            s.line(c, json!({"id":5,"method":"mining.ping"}))[0]["result"],
            "pong"
        );
    }
    // A sub-client alone can go; its connection's other sub-client stays.
    s.shard.on_close(s.now, subs[2]);
    assert_eq!(s.shard.sessions(), 1);
    assert_eq!(
        s.line(subs[3], json!({"id":6,"method":"mining.ping"}))[0]["result"],
        "pong"
    );
    // The same remote id on a new connection is a new client.
    let r = ConnId::new(0, 1, 1);
    s.shard.on_open(s.now, ClientId::Sub(r, 1), peer(), 0);
    let w = s.login(ClientId::Sub(r, 1), "late.w");
    assert!(!en1s.contains(&w.en1));
    assert_eq!(s.shard.sessions(), 2);
    // A passthrough connection (a direct session with a sub-client) whose close was lost: the
    // connector's next connection on its slot replaces both.
    let x = ConnId::new(0, 0, 9);
    s.shard.on_open(s.now, x, peer(), 0);
    s.shard.on_open(s.now, ClientId::Sub(x, 1), peer(), 0);
    assert_eq!(s.shard.sessions(), 4);
    let x2 = ConnId::new(0, 1, 9);
    s.shard.on_open(s.now, x2, peer(), 0);
    assert_eq!(s.shard.sessions(), 3);
    assert_eq!(s.pool.stats().clients, 3);
    assert!(
        s.line(ClientId::Sub(x, 1), json!({"id":5,"method":"mining.ping"}))
            .is_empty()
    );
}

/// Upstream-style work (proxy mode): the upstream's coinbase halves and branch, as a
/// `mining.notify` gives them.
fn upstream_work(job_id: &str, prev: u8, clean: bool) -> SourceWork {
    SourceWork {
        origin: Origin::Upstream {
            job_id: job_id.into(),
        },
        prev_hash: [prev; 32],
        coinb1: (0..41u8).collect(),
        coinb2: vec![0xee; 30],
        branch: vec![[3; 32], [4; 32]],
        version: 0x2000_0000,
        bits: EASY_BITS,
        ntime: 1_700_000_100,
        clean,
        height: 0,
    }
}

#[test]
fn two_work_sources_feed_one_shard_each_miner_on_its_own() {
    let mut s = sim_with(false, EASY_BITS, |_| {});
    let layout = ExtranonceLayout::new(&[0xaa, 0xbb, 0xcc], 2, 6).unwrap();
    let up = s.pool.add_source(layout).unwrap();
    assert_eq!(up, SourceId(1));
    let up_job = s
        .pool
        .new_work(up, upstream_work("up-1", 9, true), s.now)
        .unwrap();
    assert_eq!(up_job.source, up);
    // A miner on the pool's own work, and one on the upstream's.
    let (a, wa) = s.connect(1, "alice.a");
    let b = ConnId::new(0, 0, 2);
    s.shard.on_open_in(s.now, b, peer(), 0, up);
    let wb = s.login(b, "bob.b");
    assert_eq!((wa.en1.len(), wa.n2len), (4, 8));
    assert_eq!((wb.en1.len(), wb.n2len), (5, 6));
    assert_eq!(&wb.en1[..3], &[0xaa, 0xbb, 0xcc], "the upstream's prefix");
    let (ja, jb) = (wa.job.clone().unwrap(), wb.job.clone().unwrap());
    assert_eq!(jb[0], up_job.id_hex.as_str());
    assert_eq!(jb[2], hex::encode((0..41u8).collect::<Vec<_>>()));
    assert_eq!(jb[3], hex::encode([0xee; 30]));
    assert_eq!(jb[4].as_array().unwrap().len(), 2);
    assert_eq!(jb[7], "6553f164");
    assert_ne!(ja[0], jb[0]);
    assert_eq!(
        ja[0],
        s.pool.current_job().unwrap().id_hex.as_str(),
        "source 0 is the template's"
    );

    // Shares are checked against each miner's own source: its job, extranonce and nonce2 length.
    let net = Target::from_compact(EASY_BITS);
    let share_of = |w: &Work, user: &str, en2: &[u8]| {
        let d = Difficulty::from_f64(w.diff).unwrap().target();
        submit(w, user, en2, grind(w, en2, d, Some(net)))
    };
    assert_eq!(
        s.line(a, share_of(&wa, "alice.a", &[1; 8]))[0]["result"],
        true
    );
    assert_eq!(
        s.line(b, share_of(&wb, "bob.b", &[1; 6]))[0]["result"],
        true
    );
    // B's nonce2 is 6 bytes: 8 is wrong for it, and A's job is not B's.
    let mut wrong = share_of(&wb, "bob.b", &[2; 6]);
    wrong["params"][2] = json!(hex::encode([2u8; 8]));
    assert_reject(&s.line(b, wrong), 20, "Invalid nonce2 length");
    let mut other = share_of(&wb, "bob.b", &[3; 6]);
    other["params"][1] = ja[0].clone();
    assert_reject(&s.line(b, other), 21, "Invalid JobID");
    assert!(s.out.take_blocks().is_empty());

    // New work reaches only the miners of its source.
    let up2 = s
        .pool
        .new_work(up, upstream_work("up-2", 9, false), s.now)
        .unwrap();
    s.shard.on_job(&up2, &mut s.out);
    assert!(s.out.take_json(a).is_empty());
    let got = s.out.take_json(b);
    assert_eq!(got.len(), 1);
    assert_eq!(got[0]["params"][0], up2.id_hex.as_str());
    assert_eq!(got[0]["params"][8], false, "same previous block, not clean");
    let mut wb = wb;
    absorb(&mut wb, &got);
    let t2 = s
        .pool
        .new_template(template(1, EASY_BITS, 3), s.now)
        .unwrap();
    s.shard.on_job(&t2, &mut s.out);
    assert!(s.out.take_json(b).is_empty());
    let mut wa = wa;
    absorb(&mut wa, &s.out.take_json(a));
    assert_eq!(wa.job.as_ref().unwrap()[0], t2.id_hex.as_str());

    // A block on each source: the template's is assembled, the upstream's is left to the
    // upstream (no transactions here).
    let nonce = grind(&wa, &[7; 8], net, None);
    assert_eq!(
        s.line(a, submit(&wa, "alice.a", &[7; 8], nonce))[0]["result"],
        true
    );
    let nonce = grind(&wb, &[7; 6], net, None);
    assert_eq!(
        s.line(b, submit(&wb, "bob.b", &[7; 6], nonce))[0]["result"],
        true
    );
    let blocks = s.out.take_blocks();
    assert_eq!(blocks.len(), 2, "{blocks:?}");
    assert_eq!(
        (blocks[0].source, blocks[0].job_id),
        (SourceId::TEMPLATE, t2.id)
    );
    let block: bitcoin::Block =
        bitcoin::consensus::deserialize(&hex::decode(blocks[0].hex.as_ref().unwrap()).unwrap())
            .unwrap();
    assert!(block.check_merkle_root());
    assert_eq!((blocks[1].source, blocks[1].job_id), (up, up2.id));
    assert!(blocks[1].hex.is_none());
    assert_eq!(s.pool.stats().blocks.len(), 2);

    // A session parked on one source does not resume on another.
    let sid = {
        let c = ConnId::new(0, 0, 3);
        s.shard.on_open_in(s.now, c, peer(), 0, up);
        let r = s.line(
            c,
            json!({"id":1,"method":"mining.subscribe","params":["x"]}),
        );
        s.shard.on_close(s.now, c);
        r[0]["result"][0][0][1].as_str().unwrap().to_owned()
    };
    let c = s.open(4);
    let r = s.line(
        c,
        json!({"id":1,"method":"mining.subscribe","params":["x", sid]}),
    );
    assert_ne!(
        r[0]["result"][0][0][1],
        sid.as_str(),
        "a new session on source 0"
    );
}

#[test]
fn parent_workinfo_source_assembles_its_blocks() {
    // Node mode: work rebuilt from a parent pool's workinfo, transactions included. Here the
    // workinfo is made from a template with 3 transactions; the parent gave this node the
    // extranonce1 prefix 0x5a5b and leaves 2 local bytes and 8 of extranonce2.
    let mut s = sim_with(false, EASY_BITS, |_| {});
    let t = template(4, EASY_BITS, 3);
    let payout = script_for_address(PAYOUT, Network::Regtest).unwrap();
    let cfg = s.pool.config().clone();
    let wi =
        ckpool_stratifier::Job::build(1, Arc::clone(&t), true, Some(&payout), &cfg.coinbase, s.now)
            .unwrap();
    let parent = s
        .pool
        .add_source(ExtranonceLayout::new(&[0x5a, 0x5b], 2, 8).unwrap())
        .unwrap();
    let job = s
        .pool
        .new_work(
            parent,
            SourceWork {
                origin: Origin::Parent {
                    workinfo_id: 77,
                    transactions: t.transactions.clone().into(),
                    witness: t.has_witness_commitment(),
                },
                prev_hash: t.prev_hash,
                coinb1: wi.coinb1.clone(),
                coinb2: wi.coinb2.clone(),
                branch: wi.branch.clone(),
                version: t.version,
                bits: t.bits,
                ntime: t.curtime,
                clean: true,
                height: t.height,
            },
            s.now,
        )
        .unwrap();
    let c = ConnId::new(0, 0, 1);
    s.shard.on_open_in(s.now, c, peer(), 0, parent);
    let w = s.login(c, "carol.n");
    assert_eq!(&w.en1[..2], &[0x5a, 0x5b]);
    let nonce = grind(&w, &[1; 8], Target::from_compact(EASY_BITS), None);
    assert_eq!(
        s.line(c, submit(&w, "carol.n", &[1; 8], nonce))[0]["result"],
        true
    );
    let blocks = s.out.take_blocks();
    assert_eq!(blocks.len(), 1);
    assert_eq!(
        (blocks[0].source, blocks[0].job_id, blocks[0].height),
        (parent, job.id, 1000)
    );
    let block: bitcoin::Block =
        bitcoin::consensus::deserialize(&hex::decode(blocks[0].hex.as_ref().unwrap()).unwrap())
            .unwrap();
    assert_eq!(block.txdata.len(), 4);
    assert!(block.check_merkle_root());
    assert_eq!(block.block_hash().to_string(), blocks[0].hash);
    assert_eq!(job.transactions().len(), 3);
}

fn open_from(s: &mut Sim, n: u32, ip: [u8; 4]) -> ConnId {
    let c = ConnId::new(0, 0, n);
    s.shard.on_open(s.now, c, SocketAddr::from((ip, 40_000)), 0);
    c
}

/// Subscribes `c`, resuming `session` if given: (session id, extranonce1 hex).
fn subscribe_as(s: &mut Sim, c: ConnId, session: Option<&str>) -> (String, String) {
    let params = match session {
        Some(sid) => json!(["x", sid]),
        None => json!(["x"]),
    };
    let r = s.line(
        c,
        json!({"id":1,"method":"mining.subscribe","params":params}),
    );
    (
        r[0]["result"][0][0][1].as_str().unwrap().to_owned(),
        r[0]["result"][1].as_str().unwrap().to_owned(),
    )
}

#[test]
fn a_session_id_sweep_from_another_address_resumes_nothing() {
    let mut s = sim();
    let mut victims = Vec::new();
    for i in 0..5u32 {
        let c = open_from(&mut s, i, [10, 0, 0, 1 + i as u8]);
        let (sid, en1) = subscribe_as(&mut s, c, None);
        // Authorised: only such sessions are kept for resume.
        let r = s.line(
            c,
            json!({"id":2,"method":"mining.authorize","params":[format!("v{i}.1"),"x"]}),
        );
        assert_eq!(r[0]["result"], true, "{r:?}");
        s.shard.on_close(s.now, c);
        victims.push((sid, en1));
    }
    // Ids are not sequential: nothing to sweep from one's own id.
    let ids: Vec<u32> = victims
        .iter()
        .map(|(sid, _)| u32::from_str_radix(sid, 16).unwrap())
        .collect();
    assert!(ids.windows(2).all(|w| w[0].abs_diff(w[1]) > 16), "{ids:x?}");
    // The attacker even knows every id exactly, and tries each several times.
    let mut n = 100;
    for (sid, en1) in &victims {
        for _ in 0..3 {
            let c = open_from(&mut s, n, [192, 0, 2, 66]);
            n += 1;
            let (got_sid, got_en1) = subscribe_as(&mut s, c, Some(sid));
            assert_ne!(
                &got_en1, en1,
                "a victim's extranonce1 went to another address"
            );
            assert_ne!(&got_sid, sid);
            s.shard.on_close(s.now, c);
        }
    }
    // The victims, back from their own addresses, resume their sessions.
    for (i, (sid, en1)) in victims.iter().enumerate() {
        let c = open_from(&mut s, 1000 + i as u32, [10, 0, 0, 1 + i as u8]);
        let got = subscribe_as(&mut s, c, Some(sid));
        assert_eq!(&got, &(sid.clone(), en1.clone()));
    }
}

#[test]
fn a_wrapped_two_byte_extranonce1_is_never_one_in_use() {
    let mut s = sim_with(false, HARD_BITS, |c| {
        c.coinbase.nonce1_len = 2;
        c.max_parked = 64;
    });
    let mut live = std::collections::HashSet::new();
    for i in 0..2000u32 {
        let c = open_from(&mut s, i, [10, 1, 0, 1]);
        let (_, en1) = subscribe_as(&mut s, c, None);
        assert_eq!(en1.len(), 4);
        assert!(live.insert(en1));
    }
    // 70,000 more come and go: the 65,536 values wrap, none of the live ones is handed out.
    let c = ConnId::new(0, 0, 5000);
    for g in 0..70_000u32 {
        let c = ConnId::new(0, (g % 60_000) as u16, c.slot());
        s.shard.on_open(s.now, c, "10.2.0.1:1".parse().unwrap(), 0);
        let (_, en1) = subscribe_as(&mut s, c, None);
        assert!(!live.contains(&en1), "{en1} is in use (round {g})");
        s.shard.on_close(s.now, c);
    }
}

/// Authorises `c` as `user` (already open) and sends one share with a bad job id.
fn login_and_bad_share(s: &mut Sim, c: ConnId, user: &str) {
    s.login(c, user);
    let r = s.line(
        c,
        json!({"id":9,"method":"mining.submit","params":[user,"ffff","0000000000000000","00000000","00000000"]}),
    );
    assert_reject(&r, 21, "Invalid JobID");
}

#[test]
fn throwaway_usernames_with_a_bad_share_each_are_forgotten_on_close() {
    let mut s = sim();
    let (a, wa) = s.connect(1, "alice.rig1");
    let r = s.line(a, good_share(&wa, "alice.rig1", &[0; 8]));
    assert_eq!(r[0]["result"], true);
    let (b, wb) = s.connect(2, "bob");
    let r = s.line(b, good_share(&wb, "bob", &[1; 8]));
    assert_eq!(r[0]["result"], true);
    // Bob also has a rig that only ever sent a bad share: it goes when it closes, bob stays.
    let b2 = s.open(3);
    login_and_bad_share(&mut s, b2, "bob.broken");
    assert_eq!(s.pool.stats().users["bob"].workers.len(), 2);
    s.shard.on_close(s.now, b2);
    assert_eq!(s.pool.stats().users["bob"].workers.len(), 1);
    let registry = s.pool.registry();
    assert_eq!(registry.users(), 2);
    // 3,000 throw-away names from as many addresses, one bad share each, then gone.
    for i in 0..3000u32 {
        let c = open_from(&mut s, 100 + i, [10, 9, (i >> 8) as u8, i as u8]);
        login_and_bad_share(&mut s, c, &format!("junk{i}"));
        if i == 2999 {
            assert_eq!(s.pool.registry().users(), 3, "a connected one is listed");
        }
        s.shard.on_close(s.now, c);
    }
    assert_eq!(s.pool.registry().users(), 2);
    let st = s.pool.stats();
    assert_eq!(st.users.keys().collect::<Vec<_>>(), ["alice", "bob"]);
    // Their shares still count in the pool totals.
    assert_eq!((st.accepted, st.rejected), (2, 3001));
}

#[test]
fn one_address_creates_a_bounded_number_of_users() {
    let mut s = sim_with(false, HARD_BITS, |c| c.max_users_per_ip = 50);
    let mut conns = Vec::new();
    for i in 0..200u32 {
        let c = open_from(&mut s, i, [192, 0, 2, 7]);
        login_and_bad_share(&mut s, c, &format!("flood{i}"));
        conns.push(c);
    }
    // All still connected: 50 users, the other 150's shares in the totals only.
    assert_eq!(s.pool.registry().users(), 50);
    assert_eq!(s.pool.stats().rejected, 200);
    // Another address is not held back by that one.
    let c = open_from(&mut s, 500, [192, 0, 2, 8]);
    login_and_bad_share(&mut s, c, "other");
    assert_eq!(s.pool.registry().users(), 51);
    // Once they go, the address can create users again.
    for c in conns {
        s.shard.on_close(s.now, c);
    }
    assert_eq!(s.pool.registry().users(), 1);
    let c = open_from(&mut s, 600, [192, 0, 2, 7]);
    login_and_bad_share(&mut s, c, "again");
    assert_eq!(s.pool.registry().users(), 2);
}

#[test]
fn users_idle_past_stats_idle_are_forgotten() {
    let mut s = sim_with(false, HARD_BITS, |c| {
        c.stats_idle = Duration::from_secs(3600);
    });
    let (a, wa) = s.connect(1, "alice");
    assert_eq!(
        s.line(a, good_share(&wa, "alice", &[0; 8]))[0]["result"],
        true
    );
    let (b, wb) = s.connect(2, "bob");
    assert_eq!(
        s.line(b, good_share(&wb, "bob", &[0; 8]))[0]["result"],
        true
    );
    // Alice leaves; bob stays connected, idle.
    s.shard.on_close(s.now, a);
    s.pool.sample_rates(s.now);
    s.pool.sample_rates(s.now + Duration::from_secs(1800));
    assert_eq!(s.pool.registry().users(), 2, "not idle long enough");
    s.pool.sample_rates(s.now + Duration::from_secs(3601));
    let st = s.pool.stats();
    assert_eq!(
        st.users.keys().collect::<Vec<_>>(),
        ["bob"],
        "bob is connected"
    );
    assert_eq!(st.accepted, 2, "the totals keep alice's share");
}

#[test]
fn a_flood_of_invalid_shares_is_slowed_then_dropped_and_counted() {
    let mut s = sim_with(false, HARD_BITS, |c| c.max_invalid_shares = 40);
    let (c, w) = s.connect(1, "flood");
    let bad = json!({"id":9,"method":"mining.submit","params":["flood","ffff","0000000000000000","00000000","00000000"]});
    // Up to half the limit, every share is checked.
    for _ in 0..20 {
        assert_reject(&s.line(c, bad.clone()), 21, "Invalid JobID");
    }
    // Then one in 8 is checked; the others are refused unchecked.
    let mut reasons = Vec::new();
    for _ in 20..39 {
        let r = s.line(c, bad.clone());
        reasons.push(r[0]["error"][1].as_str().unwrap().to_owned());
    }
    assert!(s.out.closed.is_empty(), "dropped early");
    let checked = reasons.iter().filter(|r| *r == "Invalid JobID").count();
    assert_eq!(checked, 2, "{reasons:?}");
    assert_eq!(
        reasons
            .iter()
            .filter(|r| *r == "Too many invalid shares")
            .count(),
        17
    );
    // The 40th in a row: refused, then the client is dropped, once, and counted.
    let r = s.line(c, bad.clone());
    assert_eq!(r[0]["result"], false);
    assert_eq!(s.out.closed, [ClientId::Direct(c)]);
    s.line(c, bad.clone());
    assert_eq!(s.out.closed.len(), 1, "dropped once");
    let st = s.pool.stats();
    assert_eq!(s.pool.registry().dropped_invalid(), 1);
    assert_eq!(st.rejected, 41);
    assert_eq!(st.reject_reasons["Too many invalid shares"], 17 + 1);
    let _ = w;
}

#[test]
fn an_accepted_share_ends_a_run_and_stale_shares_do_not_count() {
    let mut s = sim_with(false, HARD_BITS, |c| c.max_invalid_shares = 10);
    let (c, w) = s.connect(1, "miner");
    let bad = json!({"id":9,"method":"mining.submit","params":["miner","ffff","0000000000000000","00000000","00000000"]});
    for round in 0..5u8 {
        for _ in 0..6 {
            s.line(c, bad.clone());
        }
        // Past half the limit only one share in 8 is checked (refusals unchecked count too):
        // the good share is refused twice unchecked, then checked and accepted at the 8th.
        let good = good_share(&w, "miner", &[round; 8]);
        let replies: Vec<Value> = (0..3).map(|_| s.line(c, good.clone())[0].clone()).collect();
        assert_eq!(
            replies[0]["error"][1], "Too many invalid shares",
            "round {round}"
        );
        assert_eq!(
            replies[1]["error"][1], "Too many invalid shares",
            "round {round}"
        );
        assert_eq!(replies[2]["result"], true, "round {round}: {replies:?}");
    }
    assert!(s.out.closed.is_empty());
    // Stale shares (after a new block) are not invalid: 30 of them drop nobody.
    let stale = good_share(&w, "miner", &[9; 8]);
    s.new_block(2, HARD_BITS);
    for _ in 0..30 {
        assert_reject(&s.line(c, stale.clone()), 21, "Stale");
    }
    assert!(s.out.closed.is_empty());
    assert_eq!(s.pool.registry().dropped_invalid(), 0);
}

/// Proxy mode: a share meeting the upstream's difficulty leaves as `Event::Upstream` with the
/// upstream job id, local extranonce1 part ‖ extranonce2 and the version bits; one below it does
/// not; the upstream's difficulty caps the miners' (at subscribe, and at once when it falls);
/// moving the miners to a new source tells the extranonce-subscribed one and reconnects the
/// other.
#[test]
fn upstream_shares_diff_cap_and_moving_miners_to_a_new_source() {
    let mut s = sim_with(false, HARD_BITS, |c| c.startdiff = Difficulty::ONE);
    let up = s
        .pool
        .add_source(ExtranonceLayout::new(&[0xaa, 0xbb], 2, 6).unwrap())
        .unwrap();
    let mut work = upstream_work("up-1", 9, true);
    work.bits = HARD_BITS;
    let cap = 2f64.powi(-28);
    s.pool.set_upstream_diff(up, cap).unwrap();
    assert_eq!(s.pool.upstream_diff(up), Some(cap));
    s.pool.new_work(up, work, s.now).unwrap();
    let a = ConnId::new(0, 0, 1);
    s.shard.on_open_in(s.now, a, peer(), 0, up);
    let r = s.line(
        a,
        json!({"id":3,"method":"mining.configure","params":[["version-rolling"],{"version-rolling.mask":"ffffffff"}]}),
    );
    assert_eq!(r[0]["result"]["version-rolling"], true);
    let mut wa = s.login(a, "farm.a");
    assert_eq!(
        wa.diff, cap,
        "startdiff 1 capped by the upstream's difficulty"
    );
    assert_eq!(
        s.line(
            a,
            json!({"id":4,"method":"mining.extranonce.subscribe","params":[]})
        )[0]["result"],
        true
    );
    let b = ConnId::new(0, 0, 2);
    s.shard.on_open_in(s.now, b, peer(), 0, up);
    s.login(b, "farm.b");

    // A rolled share meeting the cap goes upstream with everything the upstream needs.
    let ntime = u32::from_str_radix(wa.job.as_ref().unwrap()[7].as_str().unwrap(), 16).unwrap();
    let en2 = [5u8; 6];
    let (vbits, mask) = (0x0000_4000, 0x1fff_e000);
    let want = Difficulty::from_f64(cap).unwrap().target();
    let nonce = (0u32..)
        .find(|&n| want.is_met_by(&share_hash(&wa, &en2, ntime, n, vbits, mask)))
        .unwrap();
    let mut share = submit(&wa, "farm.a", &en2, nonce);
    share["params"]
        .as_array_mut()
        .unwrap()
        .push(json!(format!("{vbits:08x}")));
    assert_eq!(s.line(a, share)[0]["result"], true);
    let ups = s.out.take_upstream();
    assert_eq!(ups.len(), 1);
    let u = &ups[0];
    assert!(matches!(&u.job.origin, Origin::Upstream { job_id } if job_id == "up-1"));
    assert_eq!(u.extranonce2(), [&wa.en1[2..], &en2[..]].concat());
    assert_eq!((u.ntime, u.nonce), (ntime, nonce));
    assert_eq!(u.version_bits, Some(vbits));
    assert_eq!(&**u.user, "farm");
    assert!(u.sdiff >= cap && !u.stale);

    // A higher upstream difficulty lowers nobody; a share below it stays here.
    let high = 2f64.powi(-20);
    s.pool.set_upstream_diff(up, high).unwrap();
    assert_eq!(
        s.shard
            .limit_source_diff(s.now, up, Difficulty::from_f64(high).unwrap(), &mut s.out),
        0
    );
    let nonce = grind(
        &wa,
        &[6; 6],
        want,
        Some(Difficulty::from_f64(high).unwrap().target()),
    );
    assert_eq!(
        s.line(a, submit(&wa, "farm.a", &[6; 6], nonce))[0]["result"],
        true
    );
    assert!(s.out.take_upstream().is_empty());
    // A lower one lowers both miners at once.
    let low = 2f64.powi(-30);
    s.pool.set_upstream_diff(up, low).unwrap();
    assert_eq!(
        s.shard
            .limit_source_diff(s.now, up, Difficulty::from_f64(low).unwrap(), &mut s.out),
        2
    );
    let got = s.out.take_json(a);
    assert_eq!(got[0]["method"], "mining.set_difficulty");
    assert_eq!(got[0]["params"][0].as_f64(), Some(low));
    absorb(&mut wa, &got);

    // The upstream changed: a new source; A is told, B is reconnected.
    let up2 = s
        .pool
        .add_source(ExtranonceLayout::new(&[0xcc, 0xdd, 0xee], 2, 6).unwrap())
        .unwrap();
    let j2 = s
        .pool
        .new_work(up2, upstream_work("up2-1", 10, true), s.now)
        .unwrap();
    s.out.take_json(b);
    assert_eq!(s.shard.move_source(s.now, up, up2, &mut s.out), (1, 1));
    let got = s.out.take_json(a);
    assert_eq!(got[0]["method"], "mining.set_extranonce");
    let en1 = hex::decode(got[0]["params"][0].as_str().unwrap()).unwrap();
    assert_eq!(&en1[..3], &[0xcc, 0xdd, 0xee]);
    assert_eq!(got[0]["params"][1], 6);
    assert_eq!(got[1]["params"][0], j2.id_hex.as_str());
    assert_eq!(got[1]["params"][8], true);
    assert_eq!(s.out.take_json(b)[0]["method"], "client.reconnect");
    assert_eq!(s.out.closed, vec![ClientId::Direct(b)]);
    // New work of the new source reaches A; a share on it with the new extranonce1 is accepted.
    wa.en1 = en1;
    absorb(&mut wa, &got);
    let share = good_share(&wa, "farm.a", &[1; 6]);
    assert_eq!(s.line(a, share)[0]["result"], true);
}

#[test]
fn userproxy_authorisation_waits_for_the_upstream_and_moves_the_miner() {
    let mut s = sim_with(false, HARD_BITS, |c| {
        c.external_auth = Some(Duration::from_secs(10));
    });
    let global = s
        .pool
        .add_source(ExtranonceLayout::new(&[0xaa, 0xbb], 2, 6).unwrap())
        .unwrap();
    s.pool
        .new_work(global, upstream_work("g-1", 9, true), s.now)
        .unwrap();
    let user = s
        .pool
        .add_source(ExtranonceLayout::new(&[0xcc, 0xdd, 0xee], 2, 6).unwrap())
        .unwrap();
    let uj = s
        .pool
        .new_work(user, upstream_work("u-1", 9, true), s.now)
        .unwrap();
    let open = |s: &mut Sim, n: u32| {
        let c = ConnId::new(0, 0, n);
        s.shard.on_open_in(s.now, c, peer(), 0, global);
        c
    };
    let auth = |s: &mut Sim, c: ConnId, worker: &str| {
        s.line(
            c,
            json!({"id":"a7","method":"mining.authorize","params":[worker,"secret"]}),
        )
    };

    // A miner that takes mining.set_extranonce: no answer until the verdict, then it is moved.
    let a = open(&mut s, 1);
    assert_eq!(
        s.line(
            a,
            json!({"id":4,"method":"mining.extranonce.subscribe","params":[]})
        )[0]["result"],
        true
    );
    let mut wa = Work::default();
    absorb(
        &mut wa,
        &s.line(
            a,
            json!({"id":1,"method":"mining.subscribe","params":["t/1"]}),
        ),
    );
    assert_eq!(&wa.en1[..2], &[0xaa, 0xbb]);
    assert!(auth(&mut s, a, "alice.rig1").is_empty(), "no answer yet");
    let reqs = s.out.take_authorise();
    assert_eq!(reqs.len(), 1);
    assert_eq!(
        (&*reqs[0].user, &*reqs[0].worker, &*reqs[0].pass),
        ("alice", "alice.rig1", "secret")
    );
    assert!(!format!("{:?}", reqs[0]).contains("secret"));
    assert_eq!(s.shard.pending_authorisations(), 1);
    assert!(
        s.shard
            .finish_authorise(s.now, a, &AuthVerdict::Accept(user), &mut s.out)
    );
    let got = s.out.take_json(a);
    assert_eq!(got[0]["method"], "mining.set_extranonce");
    let en1 = hex::decode(got[0]["params"][0].as_str().unwrap()).unwrap();
    assert_eq!(&en1[..3], &[0xcc, 0xdd, 0xee]);
    assert_eq!(
        (&got[1]["id"], &got[1]["result"]),
        (&json!("a7"), &json!(true))
    );
    let notify = got.iter().find(|m| m["method"] == "mining.notify").unwrap();
    assert_eq!(notify["params"][0], uj.id_hex.as_str());
    assert_eq!(notify["params"][8], true);
    // Its shares on the user's work are accepted and leave for that work's upstream.
    wa.en1 = en1;
    absorb(&mut wa, &got);
    assert_eq!(
        s.line(a, good_share(&wa, "alice.rig1", &[1; 6]))[0]["result"],
        true
    );
    // A second verdict finds nothing waiting.
    assert!(
        !s.shard
            .finish_authorise(s.now, a, &AuthVerdict::Accept(user), &mut s.out)
    );

    // One that does not: authorised, then reconnected; it resumes onto the user's source
    // with its session id once that source is joinable.
    let b = open(&mut s, 2);
    let r = s.line(
        b,
        json!({"id":1,"method":"mining.subscribe","params":["t/1"]}),
    );
    let sid = r[0]["result"][0][0][1].as_str().unwrap().to_owned();
    assert!(auth(&mut s, b, "bob").is_empty());
    s.shard
        .finish_authorise(s.now, b, &AuthVerdict::Accept(user), &mut s.out);
    let got = s.out.take_json(b);
    assert_eq!(got[0]["result"], true);
    assert_eq!(got[1]["method"], "client.reconnect");
    assert!(s.out.closed.contains(&ClientId::Direct(b)));
    s.shard.on_close(s.now, b);
    s.pool.set_source_joinable(user, true);
    let b2 = open(&mut s, 3);
    let r = s.line(
        b2,
        json!({"id":1,"method":"mining.subscribe","params":["t/1", sid]}),
    );
    let en1 = hex::decode(r[0]["result"][1].as_str().unwrap()).unwrap();
    assert_eq!(
        &en1[..3],
        &[0xcc, 0xdd, 0xee],
        "resumed on the user's source"
    );
    assert_eq!(r[2]["params"][0], uj.id_hex.as_str());
    // Not joinable: a resume stays on the source the connection opened on.
    let c = open(&mut s, 4);
    let r = s.line(
        c,
        json!({"id":1,"method":"mining.subscribe","params":["t/1"]}),
    );
    let sid = r[0]["result"][0][0][1].as_str().unwrap().to_owned();
    s.shard.on_close(s.now, c);
    s.pool.set_source_joinable(user, false);
    let c2 = open(&mut s, 5);
    let r = s.line(
        c2,
        json!({"id":1,"method":"mining.subscribe","params":["t/1", sid]}),
    );
    assert_eq!(
        &hex::decode(r[0]["result"][1].as_str().unwrap()).unwrap()[..2],
        &[0xaa, 0xbb]
    );

    // Refused upstream: the miner is told why, and the name is refused for a while.
    let d = open(&mut s, 6);
    s.line(
        d,
        json!({"id":1,"method":"mining.subscribe","params":["t/1"]}),
    );
    assert!(auth(&mut s, d, "carol").is_empty());
    assert_eq!(
        s.out.take_authorise().last().map(|r| r.client),
        Some(d.into())
    );
    s.shard.finish_authorise(
        s.now,
        d,
        &AuthVerdict::Refuse(Arc::from("Invalid address")),
        &mut s.out,
    );
    let got = s.out.take_json(d);
    assert_eq!(got[0]["id"], "a7");
    assert_eq!(got[0]["result"], false);
    assert_eq!(got[0]["error"], json!([24, "Invalid address", null]));
    let got = auth(&mut s, d, "carol");
    assert_eq!(got[0]["error"][1], "Failed authorisation, retry later");
    assert!(s.out.take_authorise().is_empty());

    // No verdict in time: refused by the tick past the deadline, not before.
    let e = open(&mut s, 7);
    s.line(
        e,
        json!({"id":1,"method":"mining.subscribe","params":["t/1"]}),
    );
    assert!(auth(&mut s, e, "dave").is_empty());
    assert_eq!(
        auth(&mut s, e, "dave")[0]["error"][1],
        "Authorisation in progress"
    );
    s.shard.on_tick(s.now + Duration::from_secs(9), &mut s.out);
    assert!(s.out.take_json(e).is_empty());
    s.shard.on_tick(s.now + Duration::from_secs(11), &mut s.out);
    let got = s.out.take_json(e);
    assert_eq!(
        got[0]["error"],
        json!([24, "Upstream did not answer", null])
    );
    assert_eq!(s.shard.pending_authorisations(), 0);
}
