//! One function per fuzz target. Each takes arbitrary bytes and panics only on a finding.

use std::io::Read;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::address::{Network, script_for_address};
use common::stratum::{self, Method, Parser, codes};
use common::target::hash_difficulty;
use common::template::{Template, parse_rpc_hash, rpc_hash_hex};
use common::{ConnId, Difficulty, admin, config, hash, merkle};
use serde_json::{Value, json};
use stratifier::share::{ShareInput, hash_share, roll_version};
use stratifier::{Job, PoolConfig};

use crate::reader::Reader;
use crate::setup::{self, Rig, SOLO_USER};

/// Most ntime seconds a share may roll past its job's (the stratifier's limit, as ckpool's).
const MAX_NTIME_ROLL: u32 = 7000;

// ---- stratum_line ---------------------------------------------------------------------------

/// The stratum line parser on arbitrary bytes: the fast path and simd-json read every line the
/// same way, and a reply echoing the id of any line that parsed is JSON.
pub fn stratum_line(data: &[u8]) {
    let mut parser = Parser::new();
    let slow = format!("{:?}", parser.parse_slow(data));
    let parsed = parser.parse(data);
    assert_eq!(
        format!("{parsed:?}"),
        slow,
        "the fast path and simd-json disagree on {:?}",
        String::from_utf8_lossy(data)
    );
    let Ok(req) = parsed else {
        return;
    };
    let _ = req.method_name();
    for i in 0..10 {
        let _ = req.param_str(i);
        let _ = req.param(i).and_then(stratum::value_as_f64);
    }
    let mut out = Vec::new();
    stratum::reply_result(&mut out, &req.id, b"true");
    stratum::reply_error(&mut out, &req.id, codes::OTHER, "Method not found");
    stratum::reply_reject(&mut out, &req.id, codes::DUPLICATE, "Duplicate");
    for line in json_lines(&out) {
        assert!(line.get("id").is_some(), "no id in {line}");
    }
}

// ---- shard_dispatch ----------------------------------------------------------------------------

/// Connection slots the harness uses.
const SLOTS: u8 = 4;
/// Most events per input.
const MAX_EVENTS: usize = 64;

/// A Pool and one Shard under arbitrary open/line/close/tick/job events on a few connections.
///
/// Asserts: nothing panics; every send is whole JSON lines to an open connection; a line gets at
/// most one reply, exactly one if it is a request that calls for one, with its id echoed; the
/// shard only closes open connections; sessions and the pool's client count follow opens and
/// closes (none leak).
pub fn shard_dispatch(data: &[u8]) {
    let mut r = Reader::new(data);
    let mut rig = Rig::new(r.u8() & 1 == 1);
    // Per slot: its generation and whether it is open.
    let mut slots = [(0u16, false); SLOTS as usize];
    let mut own_parser = Parser::new();
    for _ in 0..MAX_EVENTS {
        if r.is_empty() {
            break;
        }
        let op = r.below(10);
        let slot = r.below(SLOTS);
        let (generation, open) = slots[usize::from(slot)];
        let c = setup::conn(slot, generation);
        match op {
            0 => {
                if !open {
                    rig.open(c);
                    slots[usize::from(slot)].1 = true;
                }
                check_sends(&mut rig, &slots, None);
            }
            1 => {
                if open {
                    close_slot(&mut rig, &mut slots, c);
                }
            }
            2..=5 => {
                let (job_id, ntime) = rig.job_id_and_ntime();
                let line = request_line(&mut r, &job_id, ntime);
                rig.line(c, &line);
                let replies = check_sends(&mut rig, &slots, Some(c));
                if !open {
                    assert_eq!(replies, 0, "a reply on a closed connection");
                } else {
                    let want = expected_replies(&mut own_parser, &line);
                    match want {
                        Some(want) => {
                            assert_eq!(replies, want, "replies to {}", lossy(&line));
                        }
                        None => assert!(replies <= 1, "{replies} replies to {}", lossy(&line)),
                    }
                }
            }
            6 => {
                rig.now += Duration::from_millis(u64::from(r.u16()) * 50);
                rig.tick();
                check_sends(&mut rig, &slots, None);
            }
            7 => {
                let flags = r.u8();
                rig.new_job(flags & 1 == 1, u32::from(flags >> 1));
                check_sends(&mut rig, &slots, None);
            }
            8 => {
                rig.renew_extranonce1(c);
                check_sends(&mut rig, &slots, None);
            }
            _ => {
                rig.now += Duration::from_millis(u64::from(r.u8()));
            }
        }
        for closed in rig.take_closed() {
            let slot = usize::try_from(closed.slot()).unwrap_or(usize::MAX);
            let Some(&(generation, open)) = slots.get(slot) else {
                panic!("the shard closed {closed}, which the harness never opened");
            };
            assert!(
                open && generation == closed.generation(),
                "the shard closed {closed}, which is not open (slot generation {generation}, open {open})"
            );
            close_slot(&mut rig, &mut slots, closed);
        }
        let open_now = slots.iter().filter(|s| s.1).count();
        assert_eq!(
            rig.sessions(),
            open_now,
            "sessions do not follow opens and closes"
        );
        assert_eq!(
            rig.clients(),
            open_now as u64,
            "the pool's client count does not follow opens and closes"
        );
    }
    for slot in 0..SLOTS {
        let (generation, open) = slots[usize::from(slot)];
        if open {
            close_slot(&mut rig, &mut slots, setup::conn(slot, generation));
        }
    }
    assert_eq!(
        rig.sessions(),
        0,
        "sessions left after every connection closed"
    );
    assert_eq!(
        rig.clients(),
        0,
        "clients counted after every connection closed"
    );
}

fn close_slot(rig: &mut Rig, slots: &mut [(u16, bool)], c: ConnId) {
    rig.close(c);
    if let Some(s) = usize::try_from(c.slot())
        .ok()
        .and_then(|i| slots.get_mut(i))
    {
        s.0 = s.0.wrapping_add(1);
        s.1 = false;
    }
}

/// Checks everything sent since the last call and returns how many replies went to `to`.
fn check_sends(rig: &mut Rig, slots: &[(u16, bool)], to: Option<ConnId>) -> usize {
    let mut replies = 0;
    for (c, bytes) in rig.take_sent() {
        let slot = usize::try_from(c.slot()).unwrap_or(usize::MAX);
        let open = slots
            .get(slot)
            .is_some_and(|&(g, open)| open && g == c.generation());
        assert!(open, "sent {} to {c}, which is not open", lossy(&bytes));
        for line in json_lines(&bytes) {
            if Some(c) == to && line.get("result").is_some() {
                replies += 1;
            }
        }
    }
    replies
}

/// How many replies `line` must get from an open session, if that is certain.
fn expected_replies(parser: &mut Parser, line: &[u8]) -> Option<usize> {
    let Ok(req) = parser.parse(line) else {
        // "Invalid JSON, disconnecting".
        return Some(1);
    };
    Some(match &req.method {
        Method::Missing if req.is_response => 0,
        Method::Name(m) if m == "mining.term" => 0,
        _ => 1,
    })
}

/// A request as miners send them (with fuzzed fields), or raw bytes.
fn request_line(r: &mut Reader<'_>, job_id: &str, ntime: u32) -> Vec<u8> {
    let pick = r.below(16);
    if pick == 15 {
        return r.bytes().to_vec();
    }
    let mut msg = serde_json::Map::new();
    match r.below(5) {
        0 => {}
        1 => {
            msg.insert("id".into(), Value::Null);
        }
        2 => {
            msg.insert("id".into(), json!(r.string()));
        }
        _ => {
            msg.insert("id".into(), json!(r.u16()));
        }
    }
    let (method, params): (String, Value) = match pick {
        0 => {
            let agent = pick_str(
                r,
                &["bitaxe v2.2", "cgminer/4.10.0", "NiceHash/1.0", "gminer"],
            );
            if r.u8() & 1 == 0 {
                ("mining.subscribe".into(), json!([agent]))
            } else {
                let sid = format!("{:08x}", r.u32() & 0xff);
                ("mining.subscribe".into(), json!([agent, sid]))
            }
        }
        1 | 2 => {
            let user = pick_str(r, &["fuzz.rig", SOLO_USER, "", ".x", "a/b", "fuzz_2"]);
            let pass = pick_str(r, &["x", "d=16", "fd=1024", "d=0.001", "fd=0"]);
            ("mining.authorize".into(), json!([user, pass]))
        }
        3 => {
            let mask = format!("{:08x}", r.u32());
            (
                "mining.configure".into(),
                json!([["version-rolling", "minimum-difficulty", "subscribe-extranonce", "x"],
                    {"version-rolling.mask": mask, "minimum-difficulty.value": r.u16()}]),
            )
        }
        4 => (
            "mining.suggest_difficulty".into(),
            json!([f64::from(r.u16()) / 16.0]),
        ),
        5 => {
            let mut t = [0u8; 32];
            t.iter_mut()
                .skip(usize::from(r.below(32)))
                .for_each(|b| *b = r.u8());
            ("mining.suggest_target".into(), json!([hex::encode(t)]))
        }
        6 => ("mining.extranonce.subscribe".into(), json!([])),
        7 => ("mining.get_transactions".into(), json!([job_id])),
        8 => ("mining.get_txnhashes".into(), json!([job_id])),
        9 => ("mining.ping".into(), json!([])),
        10 => ("mining.term".into(), json!([])),
        11 | 12 => {
            let user = pick_str(r, &["fuzz.rig", SOLO_USER, "fuzz"]);
            let job = if r.u8() < 200 {
                job_id.to_owned()
            } else {
                format!("{:x}", r.u64())
            };
            let nonce2 = hex::encode(r.take(8));
            let ntime = format!("{:08x}", ntime.wrapping_add(u32::from(r.u16())));
            let nonce = format!("{:08x}", r.u32());
            if r.u8() & 1 == 0 {
                (
                    "mining.submit".into(),
                    json!([user, job, nonce2, ntime, nonce]),
                )
            } else {
                let vbits = format!("{:08x}", r.u32());
                (
                    "mining.submit".into(),
                    json!([user, job, nonce2, ntime, nonce, vbits]),
                )
            }
        }
        13 => {
            msg.insert("result".into(), json!(true));
            msg.insert("error".into(), Value::Null);
            return serde_json::to_vec(&msg).unwrap_or_default();
        }
        _ => (r.string(), json!([r.string(), r.u8()])),
    };
    msg.insert("method".into(), method.into());
    if r.u8() != 0xff {
        msg.insert("params".into(), params);
    }
    serde_json::to_vec(&msg).unwrap_or_default()
}

fn pick_str(r: &mut Reader<'_>, options: &[&str]) -> String {
    let i = usize::from(r.u8());
    match options.get(i) {
        Some(s) => (*s).to_owned(),
        None if i % 4 == 0 => r.string(),
        None => options
            .get(i % options.len().max(1))
            .copied()
            .unwrap_or("")
            .to_owned(),
    }
}

// ---- submit -----------------------------------------------------------------------------------

/// What the miner learnt from the pool.
#[derive(Default)]
struct Work {
    enonce1: Vec<u8>,
    nonce2_len: usize,
    /// The lowest difficulty the pool ever set (shares are judged at most this hard).
    min_diff: Option<f64>,
    /// The last difficulty set (shares are judged at least this easy).
    last_diff: Option<f64>,
    mask: u32,
    notify: Vec<Value>,
}

/// A subscribed, authorised miner sends one `mining.submit` built from fuzzed fields (some
/// right, some wrong) against the segwit job, maybe twice.
///
/// Asserts: exactly one reply, echoing the id; an accepted share has the right worker, job,
/// nonce2 length, ntime range and version bits, and its hash (computed here from the notify the
/// miner saw) meets the difficulty sent; a share with all that right and a hash meeting the
/// difficulty is accepted; a valid share whose hash meets the network target produced a block, and every block candidate is a valid block (merkle root, witness commitment, proof of
/// work, hash, height) on the template's previous block; a second identical submit of an
/// accepted share is a duplicate.
pub fn submit(data: &[u8]) {
    let mut r = Reader::new(data);
    let flags = r.u8();
    let solo = flags & 1 == 1;
    let mut rig = Rig::new(solo);
    let c = setup::conn(1, 0);
    rig.open(c);
    let user = if solo {
        format!("{SOLO_USER}.rig")
    } else {
        "fuzz.rig".to_owned()
    };
    let mut w = Work {
        mask: rig.pool.config().version_mask,
        ..Work::default()
    };
    rig.line(
        c,
        br#"{"id":1,"method":"mining.subscribe","params":["fuzz/1.0"]}"#,
    );
    learn(&mut rig, c, &mut w);
    if flags & 2 == 2 {
        let line = json!({"id": 2, "method": "mining.configure",
            "params": [["version-rolling"], {"version-rolling.mask": format!("{:08x}", r.u32())}]});
        rig.line(c, line.to_string().as_bytes());
        learn(&mut rig, c, &mut w);
    }
    let auth = json!({"id": 3, "method": "mining.authorize", "params": [user, "x"]});
    rig.line(c, auth.to_string().as_bytes());
    learn(&mut rig, c, &mut w);
    if flags & 16 == 16 {
        // A harder difficulty, so that some shares fall short of it.
        let d = f64::from(r.u8() % 24 + 1) * 1e-9;
        let line = json!({"id": 4, "method": "mining.suggest_difficulty", "params": [d]});
        rig.line(c, line.to_string().as_bytes());
        learn(&mut rig, c, &mut w);
    }
    let job = rig.pool.current_job().expect("the rig has a job");
    assert!(
        !w.notify.is_empty(),
        "no notify after subscribe and authorize"
    );
    assert_eq!(w.nonce2_len, 8);

    let id = if flags & 4 == 4 {
        json!(r.string())
    } else {
        json!(r.u16())
    };
    let worker = match r.below(8) {
        0 => json!(r.string()),
        1 => json!("fuzz"),
        2 => json!(r.u8()),
        _ => json!(user),
    };
    let job_id = match r.below(8) {
        0 => json!(format!("{:x}", r.u64())),
        1 => json!(job.id_hex.to_uppercase()),
        2 => json!(r.string()),
        3 => json!(job.id_hex.trim_start_matches('0')),
        _ => json!(job.id_hex),
    };
    let nonce2 = match r.below(6) {
        0 => json!(hex::encode(r.bytes())),
        1 => json!(r.string()),
        _ => {
            let mut n2 = [0u8; 8];
            n2.iter_mut().for_each(|b| *b = r.u8());
            json!(hex::encode(n2))
        }
    };
    let ntime = match r.below(6) {
        0 => json!(format!("{:x}", r.u32())),
        1 => json!(r.string()),
        _ => {
            let delta = i32::from(r.u16() as i16) * 2;
            json!(format!("{:08x}", job.ntime.wrapping_add_signed(delta)))
        }
    };
    let nonce = match r.below(6) {
        0 => json!(r.string()),
        1 => json!(format!("{:x}", r.u32())),
        _ => json!(format!("{:08x}", r.u32())),
    };
    let mut params = vec![worker, job_id, nonce2, ntime, nonce];
    match r.below(6) {
        0 => params.push(Value::Null),
        1 => params.push(json!(format!("{:08x}", r.u32() & w.mask))),
        2 => params.push(json!(format!("{:08x}", r.u32()))),
        3 => params.push(json!(r.string())),
        _ => {}
    }
    let line = json!({"id": id, "method": "mining.submit", "params": params}).to_string();
    rig.line(c, line.as_bytes());
    let reply = one_reply(&mut rig, c, &id, &line);
    let accepted = reply.get("result") == Some(&json!(true));
    let diff = w.min_diff.expect("a difficulty was set");
    let fields = valid_fields(&w, &job, &user, &params);
    let hash = fields.as_ref().map(|f| share_hash(&w, &job, f));
    if accepted {
        let hash = hash.unwrap_or_else(|| panic!("accepted {line}, whose fields are wrong"));
        assert!(
            hash_difficulty(&hash) >= diff * (1.0 - 1e-9),
            "accepted a share of difficulty {} at {diff}: {line}",
            hash_difficulty(&hash)
        );
    } else if let Some(hash) = hash
        && hash_difficulty(&hash) >= w.last_diff.unwrap_or(diff) * (1.0 + 1e-9)
    {
        panic!(
            "rejected a good share of difficulty {}: {line}: {reply}",
            hash_difficulty(&hash)
        );
    }
    let blocks = std::mem::take(&mut *rig.blocks.lock().expect("not poisoned"));
    assert!(blocks.len() <= 1, "one share, {} blocks", blocks.len());
    if let Some(hash) = hash
        && job.network_target.is_met_by(&hash)
    {
        assert_eq!(
            blocks.len(),
            1,
            "a valid share solving a block made no block: {line}"
        );
    }
    for b in &blocks {
        check_block(b, &job, solo);
    }
    if flags & 8 == 8 {
        rig.line(c, line.as_bytes());
        let again = one_reply(&mut rig, c, &id, &line);
        if accepted {
            assert_eq!(again.get("result"), Some(&json!(false)), "{again}");
            assert_eq!(again["error"][0], json!(codes::DUPLICATE), "{again}");
        }
    }
}

/// Reads the lines sent to `c` into `w`.
fn learn(rig: &mut Rig, c: ConnId, w: &mut Work) {
    for (to, bytes) in rig.take_sent() {
        assert_eq!(to, c);
        for m in json_lines(&bytes) {
            match m.get("method").and_then(Value::as_str) {
                Some("mining.set_difficulty") => {
                    let d = m["params"][0].as_f64().expect("a number");
                    w.min_diff = Some(w.min_diff.map_or(d, |old: f64| old.min(d)));
                    w.last_diff = Some(d);
                }
                Some("mining.notify") => {
                    w.notify = m["params"].as_array().cloned().unwrap_or_default();
                }
                _ => {}
            }
            let result = &m["result"];
            if m["id"] == 1 {
                w.enonce1 = hex::decode(result[1].as_str().unwrap_or("")).expect("hex");
                w.nonce2_len = usize::try_from(result[2].as_u64().unwrap_or(0)).unwrap_or(0);
            }
            if let Some(mask) = result.get("version-rolling.mask").and_then(Value::as_str) {
                w.mask = u32::from_str_radix(mask, 16).expect("a hex mask");
            }
        }
    }
}

/// The one reply to a line, with its id checked.
fn one_reply(rig: &mut Rig, c: ConnId, id: &Value, line: &str) -> Value {
    let mut replies = Vec::new();
    for (to, bytes) in rig.take_sent() {
        assert_eq!(to, c);
        replies.extend(
            json_lines(&bytes)
                .into_iter()
                .filter(|m| m.get("result").is_some()),
        );
    }
    assert_eq!(replies.len(), 1, "replies to {line}: {replies:?}");
    let reply = replies.pop().expect("one reply");
    assert_eq!(&reply["id"], id, "reply to {line}");
    reply
}

/// A submission's fields as this harness reads them, independently of the stratifier.
struct Fields {
    enonce2: Vec<u8>,
    ntime: u32,
    nonce: u32,
    version_bits: u32,
}

/// The fields of a valid submission from `user` on `job`, or `None` if any is wrong.
fn valid_fields(w: &Work, job: &Job, user: &str, params: &[Value]) -> Option<Fields> {
    let hex_u32 = |s: &str| {
        (!s.is_empty() && s.len() <= 8 && s.bytes().all(|b| b.is_ascii_hexdigit()))
            .then(|| u32::from_str_radix(s, 16).ok())
            .flatten()
    };
    let s = |i: usize| params.get(i).and_then(Value::as_str);
    if s(0)? != user || u64::from_str_radix(s(1)?, 16).ok()? != job.id {
        return None;
    }
    let enonce2 = s(2).filter(|n| n.len() == 2 * w.nonce2_len)?;
    let enonce2 = hex::decode(enonce2).ok()?;
    let ntime = s(3).filter(|n| n.len() % 2 == 0).and_then(hex_u32)?;
    if ntime < job.ntime || ntime - job.ntime > MAX_NTIME_ROLL {
        return None;
    }
    let nonce = s(4).and_then(|n| n.get(..8)).and_then(hex_u32)?;
    let version_bits = match params.get(5) {
        None | Some(Value::Null) => 0,
        Some(v) => v.as_str().and_then(hex_u32)?,
    };
    (version_bits & !w.mask == 0).then_some(Fields {
        enonce2,
        ntime,
        nonce,
        version_bits,
    })
}

/// The hash of a share with `f`, computed from the notify the miner saw.
fn share_hash(w: &Work, job: &Job, f: &Fields) -> [u8; 32] {
    let n = |i: usize| w.notify.get(i).and_then(Value::as_str).unwrap_or("");
    assert_eq!(n(0), job.id_hex);
    let coinb1 = hex::decode(n(2)).expect("coinb1 hex");
    let coinb2 = hex::decode(n(3)).expect("coinb2 hex");
    let branch: Vec<[u8; 32]> = w.notify[4]
        .as_array()
        .expect("a branch array")
        .iter()
        .map(|b| h32(b.as_str().unwrap_or("")))
        .collect();
    let mut prev = h32(n(1));
    for word in prev.chunks_exact_mut(4) {
        word.reverse();
    }
    let version = u32::from_str_radix(n(5), 16).expect("version hex");
    let bits = u32::from_str_radix(n(6), 16).expect("bits hex");
    let input = ShareInput {
        coinb1: &coinb1,
        enonce1: &w.enonce1,
        enonce2: &f.enonce2,
        coinb2: &coinb2,
        branch: &branch,
        version: roll_version(version, f.version_bits, w.mask),
        prev_hash: &prev,
        ntime: f.ntime,
        bits,
        nonce: f.nonce,
    };
    hash_share(&input, &mut Vec::new()).hash
}

/// A block candidate is a valid block on the job's template.
fn check_block(b: &stratifier::BlockCandidate, job: &Job, solo: bool) {
    use bitcoin::hashes::Hash as _;
    let bytes = hex::decode(
        b.hex
            .as_deref()
            .expect("a template job's block has its hex"),
    )
    .expect("block hex");
    let template = job.template().expect("the rig's jobs come from a template");
    let block: bitcoin::Block = bitcoin::consensus::deserialize(&bytes).expect("a block");
    assert!(block.check_merkle_root(), "bad merkle root");
    assert!(block.check_witness_commitment(), "bad witness commitment");
    assert_eq!(block.block_hash().to_string(), b.hash);
    assert!(
        block.header.validate_pow(block.header.target()).is_ok(),
        "block without the work"
    );
    assert_eq!(
        block.header.prev_blockhash.to_byte_array(),
        template.prev_hash
    );
    assert_eq!(block.bip34_block_height().ok(), Some(job.height()));
    assert_eq!(b.height, job.height());
    assert_eq!(block.txdata.len(), template.transactions.len() + 1);
    let paid: u64 = block.txdata[0]
        .output
        .iter()
        .map(|o| o.value.to_sat())
        .sum();
    assert_eq!(
        paid, template.coinbase_value,
        "coinbase pays the wrong total"
    );
    let payee = if solo { SOLO_USER } else { setup::PAYOUT };
    let script = script_for_address(payee, Network::Regtest).expect("a valid address");
    assert_eq!(
        block.txdata[0].output[0].script_pubkey.as_bytes(),
        &script[..]
    );
}

fn h32(s: &str) -> [u8; 32] {
    stratum::hex_exact::<32>(s).expect("32 bytes of hex")
}

// ---- gbt --------------------------------------------------------------------------------------

/// `getblocktemplate` parsing on arbitrary JSON (a whole RPC reply or its `result`), then a job
/// from every template that parses, in pool mode, solo mode and with a donation.
///
/// Asserts: the previous hash survives the RPC-order round trip; a job's notify line is JSON
/// with its 9 params; its merkle branch folds to the root of all transactions; the coinbase
/// pays exactly the template's value.
///
/// The generator's own reply handling (`parse_reply`, block-submit verdicts) is private, so it
/// is reached only through [`Template::from_gbt`].
pub fn gbt(data: &[u8]) {
    let Ok(v) = serde_json::from_slice::<Value>(data) else {
        return;
    };
    let v = v.get("result").cloned().unwrap_or(v);
    let Ok(t) = Template::from_gbt(&v) else {
        return;
    };
    assert_eq!(
        parse_rpc_hash(&rpc_hash_hex(&t.prev_hash)),
        Some(t.prev_hash)
    );
    let t = Arc::new(t);
    let payout = script_for_address(setup::PAYOUT, Network::Regtest).expect("valid address");
    let base = PoolConfig::new(Network::Regtest, Some(payout.clone())).coinbase;
    let mut donating = base.clone();
    donating.donation = Some((1.5, payout.clone()));
    for (cfg, pays) in [
        (&base, Some(&payout[..])),
        (&base, None),
        (&donating, Some(&payout[..])),
    ] {
        let Ok(job) = Job::build(7, Arc::clone(&t), true, pays, cfg, Instant::now()) else {
            continue;
        };
        let notify = json_lines(&job.notify);
        assert_eq!(notify.len(), 1);
        let params = notify[0]["params"].as_array().expect("notify params");
        assert_eq!(params.len(), 9);
        assert_eq!(params[0], json!(job.id_hex));
        assert_eq!(json_lines(&job.notify_clean)[0]["params"][8], json!(true));
        let mut coinbase = job.coinb1.clone();
        coinbase.extend_from_slice(&[0xab; 4]);
        coinbase.extend_from_slice(&[0xcd; 8]);
        coinbase.extend_from_slice(&job.coinb2);
        let cb_txid = hash::sha256d(&coinbase);
        let mut leaves = vec![cb_txid];
        leaves.extend(t.transactions.iter().map(|tx| tx.txid));
        assert_eq!(
            merkle::merkle_root_from_branch(&cb_txid, &job.branch),
            merkle::merkle_root(&leaves),
            "the merkle branch does not fold to the root"
        );
        if pays.is_some() {
            check_coinbase_value(&coinbase, t.coinbase_value);
        }
    }
}

/// The coinbase (as a legacy transaction) pays exactly `value` in total.
fn check_coinbase_value(coinbase: &[u8], value: u64) {
    let tx: bitcoin::Transaction =
        bitcoin::consensus::deserialize(coinbase).expect("the coinbase is a transaction");
    let paid = tx
        .output
        .iter()
        .try_fold(0u64, |sum, o| sum.checked_add(o.value.to_sat()));
    assert_eq!(paid, Some(value), "coinbase pays the wrong total");
}

// ---- admin_frame ------------------------------------------------------------------------------

/// The admin socket framing on an arbitrary byte stream, read whole and in small pieces.
///
/// Asserts: both reads give the same messages; each message is within the limits and written
/// again gives back exactly the bytes it was read from.
pub fn admin_frame(data: &[u8]) {
    let (&chunk, stream) = data.split_first().unwrap_or((&1, &[]));
    let whole = read_frames(&mut &stream[..]);
    let pieces = read_frames(&mut Pieces {
        data: stream,
        size: usize::from(chunk % 7) + 1,
    });
    assert_eq!(whole, pieces, "framing depends on how the bytes arrive");
    let mut written = Vec::new();
    for msg in &whole {
        assert!(!msg.is_empty());
        assert!(msg.len() <= admin::MAX_MESSAGE as usize);
        admin::write_message(&mut written, msg).expect("a message read can be written");
    }
    assert_eq!(
        written,
        stream.get(..written.len()).unwrap_or_default(),
        "messages written again differ from what was read"
    );
}

fn read_frames(r: &mut impl Read) -> Vec<Vec<u8>> {
    let mut frames = Vec::new();
    while let Ok(Some(msg)) = admin::read_message(r) {
        frames.push(msg);
    }
    frames
}

/// A reader handing out at most `size` bytes a call.
struct Pieces<'a> {
    data: &'a [u8],
    size: usize,
}

impl Read for Pieces<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = buf.len().min(self.size).min(self.data.len());
        let (head, rest) = self.data.split_at(n);
        buf[..n].copy_from_slice(head);
        self.data = rest;
        Ok(n)
    }
}

// ---- config -----------------------------------------------------------------------------------

/// The ckpool.conf parser on arbitrary text.
///
/// Asserts: parsing is deterministic; an accepted configuration meets the documented ranges
/// (difficulties ordered, nonce lengths, donation, line length, threads, io and handoff names,
/// at least one bitcoind and one listen address).
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (first, again) = (config::parse(text), config::parse(text));
    let c = match (first, again) {
        (Ok(a), Ok(b)) => {
            assert_eq!(a.config, b.config, "parse is not deterministic");
            a.config
        }
        (Err(_), Err(_)) => return,
        _ => panic!("parse accepted and refused the same text"),
    };
    assert!(c.startdiff >= c.mindiff, "startdiff below mindiff");
    assert!(
        c.maxdiff.is_none_or(|m| m >= c.mindiff),
        "maxdiff below mindiff"
    );
    assert!(
        (2..=8).contains(&c.nonce1length),
        "nonce1length {}",
        c.nonce1length
    );
    assert!(
        (2..=8).contains(&c.nonce2length),
        "nonce2length {}",
        c.nonce2length
    );
    assert!(
        (0.0..=99.9).contains(&c.donation),
        "donation {}",
        c.donation
    );
    assert!((256..=1 << 24).contains(&c.maxlinelength));
    assert!(c.threads.is_none_or(|t| (1..=1024).contains(&t)));
    assert!(c.maxclients.is_none_or(|m| m >= 1));
    assert!(matches!(c.io.as_str(), "auto" | "epoll" | "uring"));
    assert!(matches!(c.handoff.as_str(), "inline" | "queue"));
    assert!(!c.btcd.is_empty() && !c.serverurl.is_empty());
    assert!(c.authtimeout >= Duration::from_secs(1));
    assert!(c.blockpoll >= Duration::from_millis(1));
    for d in c
        .listendiff
        .iter()
        .flat_map(|l| [l.startdiff, l.mindiff])
        .flatten()
    {
        assert!(d >= Difficulty::MIN);
    }
    for a in &c.useragentdiff {
        assert!(!a.pattern.is_empty());
        assert_eq!(a.pattern, a.pattern.to_ascii_lowercase());
    }
}

// ---- helpers ----------------------------------------------------------------------------------

/// Splits sent bytes into lines, asserting each is terminated and is a JSON object.
fn json_lines(bytes: &[u8]) -> Vec<Value> {
    assert_eq!(bytes.last(), Some(&b'\n'), "unterminated: {}", lossy(bytes));
    bytes
        .split(|&b| b == b'\n')
        .filter(|l| !l.is_empty())
        .map(|l| {
            let v: Value = serde_json::from_slice(l)
                .unwrap_or_else(|e| panic!("not JSON ({e}): {}", lossy(l)));
            assert!(v.is_object(), "not an object: {v}");
            v
        })
        .collect()
}

fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

// ---- rpc_reply --------------------------------------------------------------------------------

/// A `getblocktemplate` call through `generator::rpc::RpcClient` to a loopback HTTP server
/// answering with a fuzzed status and body (whole or chunked): the client's HTTP reading and
/// its JSON-RPC reply handling together.
///
/// Asserts what a JSON-RPC 1.0 reply means, as bitcoind sends them: the call returns `Ok` exactly
/// when the status is 200, the body is a JSON object whose `error` is absent or null and which
/// has a `result`, and then returns that `result`; a non-null `error` in an object is an
/// [`RpcError::Rpc`](generator::rpc::RpcError::Rpc) whatever the status. A result that parses
/// as a template goes on to [`Template::from_gbt`].
pub fn rpc_reply(data: &[u8]) {
    use generator::rpc::RpcError;
    let mut r = Reader::new(data);
    let status = match r.below(8) {
        0 => 500,
        1 => 404,
        2 => 401,
        3 => 503,
        // Any final status but those that carry no body by definition.
        4 => match 200 + r.u16() % 400 {
            204 | 205 | 304 => 200,
            s => s,
        },
        _ => 200,
    };
    let chunk = match r.u8() {
        0..=127 => None,
        c => Some(usize::from(c & 0x3f) + 1),
    };
    let body = r.take(usize::MAX);
    let got = crate::setup::rpc_call(status, chunk, body);
    let reply = serde_json::from_slice::<Value>(body).ok();
    let reply = reply.as_ref().and_then(Value::as_object);
    let error = reply.and_then(|o| o.get("error")).filter(|e| !e.is_null());
    let result = reply.and_then(|o| o.get("result"));
    match (&got, error, result) {
        (Ok(v), None, Some(result)) if status == 200 => {
            assert_eq!(v, result, "the result is not the reply's");
            let _ = Template::from_gbt(v);
        }
        (Err(e), None, Some(_)) if status == 200 => {
            panic!("a good reply {} failed: {e:?}", lossy(body))
        }
        (Err(RpcError::Rpc { .. }), Some(_), _) => {}
        (Err(RpcError::Rpc { .. }), None, _) => {
            panic!(
                "status {status}, body {}: {got:?} without an error member",
                lossy(body)
            )
        }
        (Err(e), Some(_), _) => panic!("an RPC error reply read as {e:?}: {}", lossy(body)),
        (Ok(v), _, _) => panic!("status {status}, body {}: Ok({v})", lossy(body)),
        (Err(_), None, _) => {}
    }
}

// ---- passthrough_frame ------------------------------------------------------------------------

/// The members a passthrough adds to a miner's line.
const DOWN_ROUTING: [&str; 3] = ["client_id", "address", "server"];
/// The members the upstream adds to a line for a miner.
const UP_ROUTING: [&str; 3] = ["client_id", "node.method", "client_ids"];

/// ckpool's passthrough/node framing (`common::stratum::passthrough` and
/// `common::stratum::node`), both roles and both directions.
///
/// Input: a selector byte; when odd, a `workinfo` and a `block` built from the following bytes;
/// when even, a client id, a server index, an address and a name (agent or `node.method`), then
/// one line that goes through every decoder.
///
/// Asserts, besides "no panic": every decoder reads a line as a JSON reader (serde_json, last
/// member of a name wins, escapes in names decoded) reads it whenever that reader takes it and
/// it is within the codec's limits; what a decoder gives back (the miner's line, the line for a
/// miner) is one compact JSON line without any routing member, which encoded again with the ids
/// it came with gives the same bytes and decodes to the same ids; a miner's line keeps none of
/// the routing members the miner supplied; ids, addresses and agents round-trip through
/// `encode_miner_line`, `encode_for_client`, `term` and `handshake`; a node message read is
/// written back and read again to the same value (`workinfo`, `transactions`, `block`) and is a
/// link message with its `node.method` on the passthrough side.
pub fn passthrough_frame(data: &[u8]) {
    use common::stratum::passthrough::{self, FromDownstream, FromUpstream, Role};
    let mut r = Reader::new(data);
    let sel = r.u8();
    if sel & 1 == 1 {
        node_built(&mut r);
        return;
    }
    let role = if sel & 2 == 0 {
        Role::Passthrough
    } else {
        Role::Node
    };
    let id = r.u64();
    let server = r.u64();
    let address = r.string();
    let name = r.string();
    let line = r.take(usize::MAX);

    // The lines the codec writes itself.
    let mut h = Vec::new();
    passthrough::handshake(&mut h, role, &name);
    let mut scratch = Vec::new();
    match passthrough::decode_downstream(one_line(&h), &mut scratch) {
        FromDownstream::Handshake {
            role: got,
            agent: Some(a),
            multicast: false,
        } => {
            assert_eq!(got, role, "handshake role");
            assert_eq!(unescape(a).as_deref(), Some(name.as_str()), "agent");
        }
        other => panic!("handshake {} read as {other:?}", lossy(&h)),
    }
    assert!(scratch.is_empty());
    assert_eq!(
        passthrough::decode_upstream(one_line(passthrough::HANDSHAKE_OK), &mut scratch),
        FromUpstream::HandshakeOk
    );
    let mut t = Vec::new();
    passthrough::term(&mut t, id, &address, server);
    assert_eq!(
        passthrough::decode_downstream(one_line(&t), &mut scratch),
        FromDownstream::Term { client_id: id },
        "term {}",
        lossy(&t)
    );
    assert!(scratch.is_empty());
    let drop = format!("dropclient={id}");
    assert_eq!(
        passthrough::decode_upstream(drop.as_bytes(), &mut scratch).dropclient(),
        Some(id)
    );

    let json = json_object(line);
    let shape = shape(line);
    // Within the codec's limits, a line any JSON reader takes as an object is an object here.
    let whole =
        json.is_some() && shape.is_some_and(|(depth, members)| depth <= 33 && members <= 32);

    check_downstream(line, json.as_ref(), whole);
    check_upstream(line, json.as_ref(), whole, shape);

    // A miner's line through the passthrough and back on the pool side.
    let mut e = Vec::new();
    let encoded = passthrough::encode_miner_line(&mut e, line, id, &address, server);
    let text = matches!(
        passthrough::decode_upstream(line, &mut Vec::new()),
        FromUpstream::Text(_)
    );
    // Refused: what is no object, and what would have more members than the pool side reads.
    let members = shape.map_or(usize::MAX, |(_, members)| members);
    assert!(!text || encoded.is_err(), "text encoded: {}", lossy(line));
    assert!(
        text || members > 29 || encoded.is_ok(),
        "an object refused: {}",
        lossy(line)
    );
    assert!(
        !whole || members > 29 || encoded.is_ok(),
        "a JSON object refused: {}",
        lossy(line)
    );
    if encoded.is_err() {
        assert!(e.is_empty(), "a refused line was written");
    } else {
        let mut o = Vec::new();
        match passthrough::decode_downstream(one_line(&e), &mut o) {
            FromDownstream::Miner {
                client_id,
                address: a,
                server: s,
            } => {
                assert_eq!(client_id, id, "client_id of {}", lossy(&e));
                assert_eq!(a.and_then(unescape).as_deref(), Some(address.as_str()));
                assert_eq!(s, Some(server));
                let mut again = Vec::new();
                passthrough::encode_miner_line(&mut again, one_line(&o), id, &address, server)
                    .expect("a decoded miner line encodes");
                assert_eq!(lossy(&again), lossy(&e), "re-encoded miner line differs");
                if let Some(m) = &json {
                    assert_eq!(
                        json_object(&o).as_ref(),
                        Some(&without(m, &DOWN_ROUTING)),
                        "the miner's line as the pool reads it: {}",
                        lossy(&o)
                    );
                }
            }
            FromDownstream::Term { client_id } => {
                assert_eq!(client_id, id);
                if let Some(m) = &json {
                    assert_eq!(m.get("method").and_then(Value::as_str), Some("mining.term"));
                }
            }
            other => panic!("miner line {} read back as {other:?}", lossy(&e)),
        }
    }

    // A line for a miner from the upstream, and what the miner gets.
    let mut e = Vec::new();
    let encoded = passthrough::encode_for_client(&mut e, line, &name, id);
    assert!(!text || encoded.is_err(), "text encoded: {}", lossy(line));
    assert!(
        text || members > 30 || encoded.is_ok(),
        "an object refused: {}",
        lossy(line)
    );
    if encoded.is_err() {
        assert!(e.is_empty(), "a refused line was written");
    } else {
        let mut o = Vec::new();
        let plain = !name.bytes().any(|b| b == b'"' || b == b'\\' || b < 0x20);
        match passthrough::decode_upstream(one_line(&e), &mut o) {
            FromUpstream::Client {
                client_id,
                node_method,
            } => {
                assert_eq!(client_id, id, "client_id of {}", lossy(&e));
                assert_eq!(node_method, plain.then_some(name.as_str()), "node.method");
            }
            other => panic!("line for a miner {} read back as {other:?}", lossy(&e)),
        }
        let mut again = Vec::new();
        passthrough::encode_for_client(&mut again, one_line(&o), &name, id)
            .expect("a decoded line for a miner encodes");
        assert_eq!(
            lossy(&again),
            lossy(&e),
            "re-encoded line for a miner differs"
        );
        if let Some(m) = &json {
            assert_eq!(
                json_object(&o).as_ref(),
                Some(&without(m, &UP_ROUTING)),
                "the line the miner gets: {}",
                lossy(&o)
            );
        }
    }

    node_lines(line);
}

/// `decode_downstream` on an arbitrary line (the pool side of a passthrough or node link).
fn check_downstream(line: &[u8], json: Option<&serde_json::Map<String, Value>>, whole: bool) {
    use common::stratum::passthrough::{self, FromDownstream, Role};
    let mut out = Vec::new();
    let got = passthrough::decode_downstream(line, &mut out);
    let cid = json
        .and_then(|m| m.get("client_id"))
        .and_then(Value::as_u64);
    let method = json.and_then(|m| m.get("method")).and_then(Value::as_str);
    if whole && cid.is_some() {
        assert!(
            matches!(got, FromDownstream::Miner { client_id, .. } | FromDownstream::Term { client_id } if Some(client_id) == cid),
            "{} read as {got:?}",
            lossy(line)
        );
    }
    match got {
        FromDownstream::Invalid => assert!(out.is_empty()),
        FromDownstream::Handshake {
            role,
            agent,
            multicast,
        } => {
            assert!(out.is_empty());
            if let Some(m) = json {
                assert_eq!(cid, None);
                assert_eq!(
                    multicast,
                    m.get("multicast") == Some(&Value::Bool(true)),
                    "multicast of {}",
                    lossy(line)
                );
                let want = match role {
                    Role::Passthrough => "mining.passthrough",
                    Role::Node => "mining.node",
                };
                assert_eq!(method, Some(want));
                let first = m.get("params").and_then(|p| p.get(0));
                if let Some(a) = agent {
                    assert_eq!(unescape(a).as_deref(), first.and_then(Value::as_str));
                }
            }
        }
        FromDownstream::Term { client_id } => {
            assert!(out.is_empty());
            if json.is_some() {
                assert_eq!(cid, Some(client_id));
                assert_eq!(method, Some("mining.term"));
            }
        }
        FromDownstream::Miner {
            client_id,
            address,
            server,
        } => {
            let o = one_line(&out);
            assert!(o.starts_with(b"{") && o.ends_with(b"}"), "{}", lossy(&out));
            // No routing member is left for the pool to read from the miner's line.
            assert!(
                matches!(
                    passthrough::decode_downstream(o, &mut Vec::new()),
                    FromDownstream::Invalid | FromDownstream::Handshake { .. }
                ),
                "routing survives in {}",
                lossy(&out)
            );
            if let Some(m) = json {
                assert_eq!(cid, Some(client_id));
                assert_eq!(json_object(o), Some(without(m, &DOWN_ROUTING)));
                let addr = m.get("address").and_then(Value::as_str);
                assert_eq!(address.is_some(), addr.is_some(), "address");
                if let Some(a) = address {
                    assert_eq!(unescape(a).as_deref(), addr);
                }
                assert_eq!(server, m.get("server").and_then(Value::as_u64), "server");
            }
            // The same line sent again by a passthrough reads the same, unless it is too big to
            // carry the three routing members within 32 (a line that came without some of
            // them, which no passthrough sends): then the encoder refuses it.
            let addr = address.and_then(unescape).unwrap_or_default();
            let mut e = Vec::new();
            let encoded =
                passthrough::encode_miner_line(&mut e, o, client_id, &addr, server.unwrap_or(0));
            if shape(o).is_some_and(|(_, members)| members > 29) {
                assert!(encoded.is_err() && e.is_empty(), "{}", lossy(o));
                return;
            }
            encoded.expect("a decoded miner line encodes");
            let mut again = Vec::new();
            match passthrough::decode_downstream(one_line(&e), &mut again) {
                FromDownstream::Miner { client_id: c, .. }
                | FromDownstream::Term { client_id: c } => {
                    assert_eq!(c, client_id);
                }
                other => panic!("{} read back as {other:?}", lossy(&e)),
            }
            if !again.is_empty() {
                assert_eq!(lossy(&again), lossy(&out), "the miner's line changed");
            }
        }
    }
}

/// `decode_upstream` on an arbitrary line (the passthrough or node side).
fn check_upstream(
    line: &[u8],
    json: Option<&serde_json::Map<String, Value>>,
    whole: bool,
    shape: Option<(usize, usize)>,
) {
    use common::stratum::passthrough::{self, FromUpstream};
    let mut out = Vec::new();
    let got = passthrough::decode_upstream(line, &mut out);
    let cid = json
        .and_then(|m| m.get("client_id"))
        .and_then(Value::as_u64);
    let nm = json
        .and_then(|m| m.get("node.method"))
        .and_then(Value::as_str);
    if whole {
        let handshake_ok = cid.is_none()
            && shape.is_some_and(|(_, members)| members == 1)
            && json.is_some_and(|m| m.len() == 1 && m.get("result") == Some(&Value::Bool(true)));
        match got {
            FromUpstream::Client { client_id, .. } => assert_eq!(Some(client_id), cid),
            FromUpstream::Clients { .. } => {
                assert!(cid.is_none(), "{}", lossy(line));
                assert!(
                    json.is_some_and(|m| m.get("client_ids").is_some_and(Value::is_array)),
                    "{}",
                    lossy(line)
                );
            }
            FromUpstream::HandshakeOk => assert!(handshake_ok, "{}", lossy(line)),
            FromUpstream::Link { .. } => {
                assert!(cid.is_none() && !handshake_ok, "{}", lossy(line));
            }
            FromUpstream::Text(_) => panic!("a JSON object read as text: {}", lossy(line)),
        }
    }
    match got {
        FromUpstream::Text(t) => {
            assert_eq!(t, line);
            assert!(out.is_empty());
            let _ = got.dropclient();
        }
        FromUpstream::HandshakeOk | FromUpstream::Link { .. } => {
            assert!(out.is_empty());
            assert_eq!(got.dropclient(), None);
            if let FromUpstream::Link {
                node_method: Some(n),
            } = got
                && json.is_some()
            {
                assert_eq!(Some(n), nm);
            }
        }
        FromUpstream::Clients { ids, node_method } => {
            let o = one_line(&out);
            assert!(o.starts_with(b"{") && o.ends_with(b"}"), "{}", lossy(&out));
            assert!(
                matches!(
                    passthrough::decode_upstream(o, &mut Vec::new()),
                    FromUpstream::Link { .. } | FromUpstream::HandshakeOk
                ),
                "routing survives in {}",
                lossy(&out)
            );
            let mut list = Vec::new();
            let read = passthrough::client_ids(ids, &mut list);
            if let Some(m) = json {
                assert_eq!(json_object(o), Some(without(m, &UP_ROUTING)));
                if node_method.is_some() {
                    assert_eq!(node_method, nm);
                }
                let want: Option<Vec<u64>> = m
                    .get("client_ids")
                    .and_then(Value::as_array)
                    .and_then(|a| a.iter().map(Value::as_u64).collect());
                if read {
                    assert_eq!(Some(&list), want.as_ref(), "{}", lossy(line));
                }
            }
            if read {
                let mut e = Vec::new();
                passthrough::encode_for_clients(&mut e, o, node_method.unwrap_or("x"), &list)
                    .expect("a decoded multicast line encodes");
                let mut again = Vec::new();
                match passthrough::decode_upstream(one_line(&e), &mut again) {
                    FromUpstream::Clients { ids: i, .. } => {
                        let mut back = Vec::new();
                        assert!(passthrough::client_ids(i, &mut back));
                        assert_eq!(back, list);
                    }
                    other => panic!("{} read back as {other:?}", lossy(&e)),
                }
                assert_eq!(
                    lossy(&again),
                    lossy(&out),
                    "the line for the miners changed"
                );
            }
        }
        FromUpstream::Client {
            client_id,
            node_method,
        } => {
            let o = one_line(&out);
            assert!(o.starts_with(b"{") && o.ends_with(b"}"), "{}", lossy(&out));
            // Nothing routes the line the miner gets anywhere.
            assert!(
                !matches!(
                    passthrough::decode_upstream(o, &mut Vec::new()),
                    FromUpstream::Client { .. }
                ),
                "routing survives in {}",
                lossy(&out)
            );
            if let Some(m) = json {
                assert_eq!(Some(client_id), cid);
                if node_method.is_some() {
                    assert_eq!(node_method, nm);
                }
                assert_eq!(json_object(o), Some(without(m, &UP_ROUTING)));
            }
            let mut e = Vec::new();
            let encoded =
                passthrough::encode_for_client(&mut e, o, node_method.unwrap_or("x"), client_id);
            // Too big to carry `node.method` and `client_id` within 32 members (it came without
            // one of them): refused.
            if self::shape(o).is_some_and(|(_, members)| members > 30) {
                assert!(encoded.is_err() && e.is_empty(), "{}", lossy(o));
                return;
            }
            encoded.expect("a decoded line for a miner encodes");
            let mut again = Vec::new();
            match passthrough::decode_upstream(one_line(&e), &mut again) {
                FromUpstream::Client { client_id: c, .. } => assert_eq!(c, client_id),
                other => panic!("{} read back as {other:?}", lossy(&e)),
            }
            assert_eq!(lossy(&again), lossy(&out), "the line for the miner changed");
        }
    }
}

/// The node messages' readers on an arbitrary line: what they read is written back and read
/// again to the same value, and the written line is a link message with its `node.method`.
fn node_lines(line: &[u8]) {
    use common::stratum::node::{self, BlockSolve, WorkInfo};
    if let Ok(w) = WorkInfo::parse(line) {
        check_workinfo(&w);
    }
    if let Ok(txs) = node::parse_transactions(line) {
        let mut out = Vec::new();
        node::write_transactions(&mut out, &txs);
        assert_eq!(
            node::parse_transactions(&out),
            Ok(txs),
            "transactions round trip"
        );
        assert_link(&out, node::TRANSACTIONS);
    }
    if let Ok(b) = BlockSolve::parse(line) {
        check_block_solve(&b);
    }
}

/// A `workinfo` and a `block` made of fuzzed fields round-trip.
fn node_built(r: &mut Reader<'_>) {
    use common::stratum::node::{BlockSolve, NodeMsgError, WorkInfo};
    let w = WorkInfo {
        jobid: r.u64(),
        target: hash32(r.take(32)),
        diff: finite(r.u64()),
        version: r.u32(),
        curtime: r.u32(),
        prev_hash: hash32(r.take(32)),
        ntime: r.u32(),
        bits: r.u32(),
        coinbase_value: r.u64(),
        height: r.u64(),
        flags: r.bytes().to_vec(),
        txids: hashes(r),
        branch: hashes(r),
        coinb1: r.bytes().to_vec(),
        coinb2: r.bytes().to_vec(),
        enonce1varlen: usize::from(r.u8()),
        enonce2varlen: usize::from(r.u8()),
    };
    check_workinfo(&w);
    let mut header = [0u8; 80];
    let h = r.take(80);
    header[..h.len()].copy_from_slice(h);
    let b = BlockSolve {
        enonce1: r.bytes().to_vec(),
        nonce: r.u32(),
        nonce2: r.bytes().to_vec(),
        ntime: r.u32(),
        version_mask: r.u32(),
        jobid: r.u64(),
        diff: finite(r.u64()),
        name: r.string(),
        coinbase: r.bytes().to_vec(),
        header,
    };
    if b.coinbase.is_empty() {
        let mut out = Vec::new();
        b.write(&mut out);
        assert_eq!(
            BlockSolve::parse(&out),
            Err(NodeMsgError::Field("coinbasehex"))
        );
    } else {
        check_block_solve(&b);
    }
}

fn check_workinfo(w: &common::stratum::node::WorkInfo) {
    use common::stratum::node::{self, WorkInfo};
    let mut out = Vec::new();
    w.write(&mut out);
    let back = WorkInfo::parse(&out).unwrap_or_else(|e| panic!("{e}: {}", lossy(&out)));
    assert_eq!(&back, w, "workinfo round trip: {}", lossy(&out));
    let mut again = Vec::new();
    back.write(&mut again);
    assert_eq!(lossy(&again), lossy(&out));
    assert_link(&out, node::WORKINFO);
}

fn check_block_solve(b: &common::stratum::node::BlockSolve) {
    use common::stratum::node::{self, BlockSolve};
    let mut out = Vec::new();
    b.write(&mut out);
    let back = BlockSolve::parse(&out).unwrap_or_else(|e| panic!("{e}: {}", lossy(&out)));
    assert_eq!(&back, b, "block round trip: {}", lossy(&out));
    assert_link(&out, node::BLOCK);
}

/// A node message written by the pool reaches a passthrough or node as a link message.
fn assert_link(written: &[u8], method: &str) {
    use common::stratum::passthrough::{self, FromUpstream};
    assert_eq!(
        passthrough::decode_upstream(one_line(written), &mut Vec::new()),
        FromUpstream::Link {
            node_method: Some(method)
        },
        "{}",
        lossy(written)
    );
}

/// Up to 5 hashes.
fn hashes(r: &mut Reader<'_>) -> Vec<[u8; 32]> {
    (0..r.below(6)).map(|_| hash32(r.take(32))).collect()
}

/// Up to 32 bytes, zero-padded.
fn hash32(b: &[u8]) -> [u8; 32] {
    let mut h = [0u8; 32];
    h[..b.len()].copy_from_slice(b);
    h
}

/// A finite `f64` from its bits (0 otherwise: jansson cannot write the rest either).
fn finite(bits: u64) -> f64 {
    Some(f64::from_bits(bits))
        .filter(|d| d.is_finite())
        .unwrap_or(0.0)
}

/// A written line without its newline, which must be its only one.
fn one_line(b: &[u8]) -> &[u8] {
    let line = b
        .strip_suffix(b"\n")
        .unwrap_or_else(|| panic!("unterminated: {}", lossy(b)));
    assert!(!line.contains(&b'\n'), "more than one line: {}", lossy(b));
    line
}

/// The line as serde_json reads it, when it is an object.
fn json_object(b: &[u8]) -> Option<serde_json::Map<String, Value>> {
    match serde_json::from_slice::<Value>(b).ok()? {
        Value::Object(m) => Some(m),
        _ => None,
    }
}

fn without(m: &serde_json::Map<String, Value>, keys: &[&str]) -> serde_json::Map<String, Value> {
    let mut m = m.clone();
    for k in keys {
        m.remove(*k);
    }
    m
}

/// A string's contents as written (escapes kept), decoded.
fn unescape(raw: &str) -> Option<String> {
    serde_json::from_str(&format!("\"{raw}\"")).ok()
}

/// For JSON text: the deepest nesting of arrays and objects (the line's object is 1) and the
/// members of the outermost object (its commas plus one). `None` for unbalanced text.
fn shape(b: &[u8]) -> Option<(usize, usize)> {
    let (mut level, mut deepest, mut commas) = (0usize, 0usize, 0usize);
    let (mut in_str, mut escaped) = (false, false);
    for &c in b {
        if in_str {
            if escaped {
                escaped = false;
            } else if c == b'\\' {
                escaped = true;
            } else if c == b'"' {
                in_str = false;
            }
            continue;
        }
        match c {
            b'"' => in_str = true,
            b'{' | b'[' => {
                level += 1;
                deepest = deepest.max(level);
            }
            b'}' | b']' => level = level.checked_sub(1)?,
            b',' if level == 1 => commas += 1,
            _ => {}
        }
    }
    Some((deepest, commas + 1))
}
