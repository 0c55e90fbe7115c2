//! Handover at an upgrade: the pool's state and each live session serialised in one process
//! and taken over by another, which then judges every share as the first would have.
#![allow(
    clippy::unwrap_used,
    clippy::panic,
    clippy::indexing_slicing,
    missing_docs,
    reason = "test code"
)]

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ckpool_stratifier::share::{ShareInput, hash_share, roll_version};
use ckpool_stratifier::{
    ClientId, HandoverError, Pool, PoolConfig, RecordingOut, Shard, StatsSnapshot,
};
use common::address::{Network, script_for_address};
use common::template::Template;
use common::{ConnId, Difficulty, Target};
use proptest::prelude::*;
use serde_json::{Value, json};

const PAYOUT: &str = "mnNghRjeAKbTqkvMYaE6kzkpsfWVdt3TRZ";
/// Network difficulty 1: CPU shares at 2^-32 never solve blocks.
const HARD_BITS: u32 = 0x1d00ffff;

fn template(prev: u8) -> Arc<Template> {
    Arc::new(Template::empty([prev; 32], HARD_BITS))
}

/// A one-byte local extranonce1 (256 values), so that a value in use would soon be handed
/// out again if the tables forgot it.
fn config() -> PoolConfig {
    let payout = script_for_address(PAYOUT, Network::Regtest).unwrap();
    let mut cfg = PoolConfig::new(Network::Regtest, Some(payout));
    cfg.mindiff = Difficulty::MIN;
    cfg.startdiff = Difficulty::MIN;
    cfg.coinbase.nonce1_len = 1;
    cfg
}

struct Proc {
    pool: Arc<Pool>,
    shard: Shard,
    out: RecordingOut,
    now: Instant,
}

impl Proc {
    fn new(seed: u64, now: Instant) -> Self {
        let pool = Pool::new(config(), seed, now);
        Self {
            shard: Shard::new(Arc::clone(&pool)),
            pool,
            out: RecordingOut {
                shares: true,
                ..RecordingOut::default()
            },
            now,
        }
    }

    fn line(&mut self, c: impl Into<ClientId> + Copy, v: Value) -> Vec<Value> {
        self.shard
            .on_line(self.now, c, v.to_string().as_bytes(), &mut self.out);
        self.out.take_json(c)
    }

    fn open(&mut self, n: u32, peer: SocketAddr) -> ConnId {
        let c = ConnId::new(0, 0, n);
        self.shard.on_open(self.now, c, peer, 0);
        c
    }

    fn connect(&mut self, n: u32, user: &str) -> (ConnId, Work) {
        let c = self.open(n, peer());
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
        (c, w)
    }
}

fn peer() -> SocketAddr {
    "10.1.2.3:5000".parse().unwrap()
}

/// What a miner learnt from the pool.
#[derive(Default, Clone, Debug)]
struct Work {
    en1: Vec<u8>,
    sid: String,
    diff: f64,
    job: Option<Vec<Value>>,
}

fn absorb(w: &mut Work, msgs: &[Value]) {
    for m in msgs {
        if m["method"] == "mining.set_difficulty" {
            w.diff = m["params"][0].as_f64().unwrap();
        } else if m["method"] == "mining.notify" {
            w.job = Some(m["params"].as_array().unwrap().clone());
        } else if m["id"] == 1 && m["result"].is_array() {
            w.en1 = hex::decode(m["result"][1].as_str().unwrap()).unwrap();
            w.sid = m["result"][0][0][1].as_str().unwrap().to_owned();
        }
    }
}

fn h32(s: &str) -> [u8; 32] {
    hex::decode(s).unwrap().try_into().unwrap()
}

fn share_hash(w: &Work, en2: &[u8], ntime: u32, nonce: u32) -> [u8; 32] {
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
        version: roll_version(version, 0, 0),
        prev_hash: &prev,
        ntime,
        bits,
        nonce,
    };
    hash_share(&input, &mut Vec::new()).hash
}

/// A submit of a share on `w`'s job meeting `want` and (optionally) not `avoid`.
fn share(w: &Work, user: &str, en2: &[u8], want: f64, avoid: Option<f64>) -> Value {
    let target = |d: f64| -> Target { Difficulty::from_f64(d).unwrap().target() };
    let job = w.job.as_ref().unwrap();
    let ntime = u32::from_str_radix(job[7].as_str().unwrap(), 16).unwrap();
    let nonce = (0u32..)
        .find(|&n| {
            let h = share_hash(w, en2, ntime, n);
            target(want).is_met_by(&h) && avoid.is_none_or(|a| !target(a).is_met_by(&h))
        })
        .unwrap();
    json!({"id": 9, "method": "mining.submit",
        "params": [user, job[0], hex::encode(en2), job[7], format!("{nonce:08x}")]})
}

fn reply(r: &[Value]) -> &Value {
    r.iter()
        .find(|m| m["id"] == 9)
        .unwrap_or_else(|| panic!("no reply in {r:?}"))
}

/// The parts of a snapshot a handover must keep (rates aside, which are sampled).
fn totals(s: &StatsSnapshot) -> String {
    let users: Vec<String> = s
        .users
        .iter()
        .map(|(name, u)| {
            let workers: Vec<String> = u
                .workers
                .iter()
                .map(|(n, w)| {
                    format!(
                        "{n}:{}:{}:{}:{}",
                        w.accepted, w.rejected, w.accepted_diff, w.bestshare
                    )
                })
                .collect();
            format!(
                "{name}:{}:{}:{}:{}:{workers:?}",
                u.accepted, u.rejected, u.accepted_diff, u.blocks
            )
        })
        .collect();
    format!(
        "{} {} {} {} {:?} {:?} {:?} {users:?}",
        s.accepted, s.rejected, s.accepted_diff, s.bestshare, s.reject_reasons, s.blocks, s.job
    )
}

#[test]
fn a_pool_and_its_miners_move_to_a_new_process_mid_work() {
    let t0 = Instant::now();
    let mut old = Proc::new(1, t0);
    old.pool.new_template(template(1), t0).unwrap();
    let (a, mut wa) = old.connect(1, "alice.rig1");
    let (b, mut wb) = old.connect(2, "bob");
    let start = wa.diff;

    // Alice: one share accepted, then enough fast shares for vardiff to raise her difficulty.
    let first = share(&wa, "alice.rig1", &[0; 8], start, None);
    assert_eq!(old.line(a, first.clone())[0]["result"], true);
    for i in 1..500u32 {
        old.now += Duration::from_millis(10);
        let en2 = i.to_be_bytes().repeat(2);
        let r = old.line(a, share(&wa, "alice.rig1", &en2, wa.diff, None));
        assert_eq!(reply(&r)["result"], true, "{r:?}");
        absorb(&mut wa, &r);
        if wa.diff != start {
            break;
        }
    }
    let raised = wa.diff;
    assert!(raised > start, "vardiff did not move");
    // A second job on the same block: the first stays live (and judged at the old difficulty).
    let job1 = wa.clone();
    let j2 = old.pool.new_template(template(1), old.now).unwrap();
    old.shard.on_job(&j2, &mut old.out);
    absorb(&mut wa, &old.out.take_json(a));
    absorb(&mut wb, &old.out.take_json(b));
    assert_ne!(wa.job.as_ref().unwrap()[0], job1.job.as_ref().unwrap()[0]);
    let r = old.line(b, share(&wb, "bob", &[7; 8], wb.diff, None));
    assert_eq!(reply(&r)["result"], true, "{r:?}");
    let r = old.line(b, share(&wb, "bob", &[7; 8], wb.diff, None));
    assert_eq!(reply(&r)["reject-reason"], "Duplicate", "{r:?}");

    // Carol disconnects: her session is parked for resume.
    let (c, wc) = old.connect(3, "carol");
    old.shard.on_close(old.now, c);
    let before = old.pool.stats();

    // The handover.
    let blob_a = old.shard.export_session(old.now, a).unwrap();
    let blob_b = old.shard.export_session(old.now, b).unwrap();
    assert!(old.shard.export_session(old.now, a).is_none(), "gone");
    assert_eq!(old.shard.sessions(), 0);
    let state = old.pool.export_state(old.now);
    assert!(blob_a.len() < 160, "{} bytes", blob_a.len());

    // The new process: another clock reading, another seed, other connection ids.
    let t1 = old.now + Duration::from_secs(2);
    let mut new = Proc::new(99, t1);
    new.pool.import_state(t1, &state).unwrap();
    let (a2, b2) = (ConnId::new(0, 0, 11), ConnId::new(0, 0, 12));
    new.shard.adopt_session(t1, a2, peer(), 0, &blob_a).unwrap();
    new.shard.adopt_session(t1, b2, peer(), 0, &blob_b).unwrap();
    assert_eq!(
        new.shard.adopt_session(t1, a2, peer(), 0, &blob_a),
        Err(HandoverError::InUse("client id"))
    );
    assert_eq!(new.shard.sessions(), 2);

    // Totals, users and workers, blocks and the current job are the same.
    let after = new.pool.stats();
    assert_eq!(totals(&after), totals(&before));
    assert_eq!(after.clients, 2);

    // Alice's share accepted before is a duplicate; a fresh one on the old job that only
    // meets her old difficulty is accepted, at that difficulty, as the old process would.
    let r = new.line(a2, first);
    assert_eq!(reply(&r)["reject-reason"], "Duplicate", "{r:?}");
    let r = new.line(a2, share(&job1, "alice.rig1", &[9; 8], start, Some(raised)));
    assert_eq!(reply(&r)["result"], true, "{r:?}");
    let rec = new.out.take_shares();
    let last = rec.last().unwrap();
    assert!(last.result);
    assert_eq!(last.diff, start);
    assert_eq!(last.workername, "alice.rig1");
    // On the newer job, her raised difficulty holds.
    let r = new.line(a2, share(&wa, "alice.rig1", &[9; 8], start, Some(raised)));
    assert_eq!(reply(&r)["reject-reason"], "Above target", "{r:?}");
    let r = new.line(a2, share(&wa, "alice.rig1", &[10; 8], raised, None));
    assert_eq!(reply(&r)["result"], true, "{r:?}");
    // Bob's duplicate set came along too.
    let r = new.line(b2, share(&wb, "bob", &[7; 8], wb.diff, None));
    assert_eq!(reply(&r)["reject-reason"], "Duplicate", "{r:?}");

    // A subscribe again answers as before: same session id, extranonce1 and difficulty.
    let r = new.line(
        a2,
        json!({"id":1,"method":"mining.subscribe","params":["test/1.0"]}),
    );
    let mut again = Work::default();
    absorb(&mut again, &r);
    assert_eq!((&again.sid, &again.en1), (&wa.sid, &wa.en1));
    assert_eq!(again.diff, raised);
    assert_eq!(again.job.as_ref().unwrap()[0], wa.job.as_ref().unwrap()[0]);

    // The next job has the id and the line the old process would have sent.
    let j3_old = old.pool.new_template(template(1), t1).unwrap();
    let j3 = new.pool.new_template(template(1), t1).unwrap();
    assert_eq!(j3.id, j3_old.id);
    assert_eq!(j3.notify, j3_old.notify);
    new.shard.on_job(&j3, &mut new.out);
    let sent: Vec<&Vec<u8>> = new
        .out
        .sent
        .iter()
        .filter(|(c, _)| *c == ClientId::from(b2))
        .map(|(_, l)| l)
        .collect();
    assert_eq!(sent, [&j3.notify.to_vec()]);

    // Carol resumes from her address (not from another), with her extranonce1.
    let other: SocketAddr = "10.9.9.9:5000".parse().unwrap();
    let c_other = new.open(20, other);
    let r = new.line(
        c_other,
        json!({"id":1,"method":"mining.subscribe","params":["x", wc.sid]}),
    );
    let mut w = Work::default();
    absorb(&mut w, &r);
    assert_ne!(w.en1, wc.en1, "resumed from another address");
    let c2 = new.open(21, peer());
    let r = new.line(
        c2,
        json!({"id":1,"method":"mining.subscribe","params":["x", wc.sid]}),
    );
    let mut w = Work::default();
    absorb(&mut w, &r);
    assert_eq!((&w.sid, &w.en1), (&wc.sid, &wc.en1));

    // New subscribes never get an extranonce1 or session id in use: the 256 one-byte values
    // run out with every held one skipped.
    let mut en1s: HashSet<Vec<u8>> = [&wa.en1, &wb.en1, &wc.en1, &again.en1]
        .into_iter()
        .cloned()
        .collect();
    let mut sids: HashSet<String> = [&wa.sid, &wb.sid, &wc.sid].into_iter().cloned().collect();
    assert_eq!(en1s.len(), 3);
    // Alice, Bob, Carol, and the one given to the client from the other address.
    en1s.insert(hex::decode(r_en1(&mut new, c_other)).unwrap());
    let mut n = 100;
    loop {
        n += 1;
        let c = new.open(n, peer());
        let r = new.line(
            c,
            json!({"id":1,"method":"mining.subscribe","params":["x"]}),
        );
        if r[0]["error"] != Value::Null {
            assert_eq!(r[0]["error"][1], "Server full", "{r:?}");
            break;
        }
        let mut w = Work::default();
        absorb(&mut w, &r);
        assert!(en1s.insert(w.en1.clone()), "{:?} handed out twice", w.en1);
        assert!(
            sids.insert(w.sid.clone()),
            "session id {} handed out twice",
            w.sid
        );
    }
    assert_eq!(en1s.len(), 256);
}

/// The extranonce1 a subscribed client has, by subscribing again.
fn r_en1(p: &mut Proc, c: ConnId) -> String {
    let r = p.line(
        c,
        json!({"id":1,"method":"mining.subscribe","params":["x"]}),
    );
    r[0]["result"][1].as_str().unwrap().to_owned()
}

/// A pool and a session blob from a short run.
fn blobs() -> (Vec<u8>, Vec<u8>) {
    let t0 = Instant::now();
    let mut p = Proc::new(1, t0);
    p.pool.new_template(template(1), t0).unwrap();
    let (a, w) = p.connect(1, "alice.rig1");
    let r = p.line(a, share(&w, "alice.rig1", &[1; 8], w.diff, None));
    assert_eq!(reply(&r)["result"], true);
    let (c, _) = p.connect(2, "carol");
    p.shard.on_close(p.now, c);
    let session = p.shard.export_session(p.now, a).unwrap();
    (p.pool.export_state(p.now), session)
}

fn fresh() -> (Arc<Pool>, Shard, Instant) {
    let t = Instant::now();
    let pool = Pool::new(config(), 5, t);
    let shard = Shard::new(Arc::clone(&pool));
    (pool, shard, t)
}

#[test]
fn truncated_or_wrong_version_blobs_are_refused() {
    let (state, session) = blobs();
    for n in 0..state.len() {
        let (pool, _, t) = fresh();
        assert!(pool.import_state(t, &state[..n]).is_err(), "{n} bytes");
    }
    for n in 0..session.len() {
        let (pool, mut shard, t) = fresh();
        pool.import_state(t, &state).unwrap();
        let c = ConnId::new(0, 0, 1);
        assert!(
            shard.adopt_session(t, c, peer(), 0, &session[..n]).is_err(),
            "{n} bytes"
        );
        assert_eq!(shard.sessions(), 0);
    }
    let (pool, mut shard, t) = fresh();
    let mut bad = state.clone();
    // Format 1 (before best shares per round and ever) is another version now.
    bad[0] = 1;
    assert_eq!(pool.import_state(t, &bad), Err(HandoverError::Version(1)));
    let mut long = state.clone();
    long.push(0);
    assert_eq!(pool.import_state(t, &long), Err(HandoverError::Trailing(1)));
    let mut bad = session.clone();
    bad[0] = 0;
    let c = ConnId::new(0, 0, 1);
    assert_eq!(
        shard.adopt_session(t, c, peer(), 0, &bad),
        Err(HandoverError::Version(0))
    );
    // The good ones go in; a pool that has work already refuses a state.
    pool.import_state(t, &state).unwrap();
    assert!(pool.import_state(t, &state).is_err());
    shard.adopt_session(t, c, peer(), 0, &session).unwrap();
    assert_eq!(shard.sessions(), 1);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn random_bytes_are_refused_without_a_panic(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
        let (pool, mut shard, t) = fresh();
        let _ = pool.import_state(t, &bytes);
        let mut session = bytes.clone();
        if let Some(v) = session.first_mut() {
            *v = 1;
        }
        let _ = shard.adopt_session(t, ConnId::new(0, 0, 1), peer(), 0, &session);
        prop_assert!(shard.sessions() <= 1);
    }

    #[test]
    fn corrupted_blobs_never_panic(flip in 0usize..10_000, to in any::<u8>()) {
        let (state, session) = blobs();
        let (pool, mut shard, t) = fresh();
        let mut s = state.clone();
        let i = flip % s.len();
        s[i] = to;
        let _ = pool.import_state(t, &s);
        let mut b = session.clone();
        let i = flip % b.len();
        b[i] = to;
        let _ = shard.adopt_session(t, ConnId::new(0, 0, 1), peer(), 0, &b);
        prop_assert!(shard.sessions() <= 1);
    }
}

#[test]
fn a_session_is_adopted_as_a_passthroughs_sub_client_and_judged_the_same() {
    let t0 = Instant::now();
    let mut old = Proc::new(1, t0);
    old.pool.new_template(template(1), t0).unwrap();
    let (a, w) = old.connect(1, "dave.x");
    let first = share(&w, "dave.x", &[3; 8], w.diff, None);
    assert_eq!(reply(&old.line(a, first.clone()))["result"], true);
    let blob = old.shard.export_session(old.now, a).unwrap();
    let state = old.pool.export_state(old.now);
    let mut new = Proc::new(2, old.now);
    new.pool.import_state(new.now, &state).unwrap();
    let sub = ClientId::Sub(ConnId::new(0, 0, 40), 5);
    new.shard
        .adopt_session(new.now, sub, peer(), 0, &blob)
        .unwrap();
    assert_reject_reason(&new.line(sub, first), "Duplicate");
    let r = new.line(sub, share(&w, "dave.x", &[4; 8], w.diff, None));
    assert_eq!(reply(&r)["result"], true, "{r:?}");
    assert_eq!(new.pool.stats().users["dave"].workers["dave.x"].accepted, 2);
    // Closing it parks it, as any session.
    new.shard.on_close(new.now, sub);
    new.pool.sample_rates(new.now);
    assert_eq!(new.pool.stats().disconnected, 1);
}

fn assert_reject_reason(r: &[Value], reason: &str) {
    assert_eq!(reply(r)["reject-reason"], reason, "{r:?}");
}
