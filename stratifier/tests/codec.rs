//! One stratum codec: every line the stratifier writes is, byte for byte, what the codec's
//! writers (`common::stratum::write`) produce for the same values.
#![allow(
    clippy::unwrap_used,
    clippy::indexing_slicing,
    missing_docs,
    reason = "test code"
)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use ckpool_stratifier::{ClientId, Pool, PoolConfig, RecordingOut, Shard};
use common::address::{Network, script_for_address};
use common::stratum::write::{self, ConfigureAnswer};
use common::stratum::{Value, codes};
use common::template::Template;
use common::{ConnId, Difficulty};

const PAYOUT: &str = "mnNghRjeAKbTqkvMYaE6kzkpsfWVdt3TRZ";

fn lines(out: &mut RecordingOut, c: ClientId) -> Vec<Vec<u8>> {
    let mut got = Vec::new();
    for (to, bytes) in out.sent.drain(..) {
        assert_eq!(to, c);
        for l in bytes.split_inclusive(|&b| b == b'\n') {
            got.push(l.to_vec());
        }
    }
    got
}

fn expect(f: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    let mut v = Vec::new();
    f(&mut v);
    v
}

fn id(n: u64) -> Value<'static> {
    Value::from(n)
}

#[test]
fn every_line_is_the_codecs() {
    let payout = script_for_address(PAYOUT, Network::Regtest).unwrap();
    let mut cfg = PoolConfig::new(Network::Regtest, Some(payout));
    cfg.mindiff = Difficulty::MIN;
    cfg.startdiff = Difficulty::ONE;
    let pool = Pool::new(cfg, 1, Instant::now());
    let now = Instant::now();
    let job = pool
        .new_template(Arc::new(Template::empty([3; 32], 0x1d00_ffff)), now)
        .unwrap();
    let layout = pool.layout(ckpool_stratifier::SourceId::TEMPLATE).unwrap();
    let mut shard = Shard::new(Arc::clone(&pool));
    let mut out = RecordingOut::default();
    let c = ClientId::Direct(ConnId::new(0, 0, 1));
    let peer: SocketAddr = "10.0.0.1:3333".parse().unwrap();
    shard.on_open(now, c, peer, 0);

    // Authorisation before subscribing: refused with result false.
    shard.on_line(
        now,
        c,
        br#"{"id":7,"method":"mining.authorize","params":["a","x"]}"#,
        &mut out,
    );
    assert_eq!(
        lines(&mut out, c),
        [expect(|b| write::reply_refused(
            b,
            &id(7),
            codes::NOT_SUBSCRIBED,
            "Not subscribed"
        ))]
    );

    // Configure with many extensions, one twice: every answer, sorted, the last one kept.
    shard.on_line(
        now,
        c,
        br#"{"id":1,"method":"mining.configure","params":[["zeta","version-rolling","alpha","subscribe-extranonce","minimum-difficulty","alpha"],{"version-rolling.mask":"ffffffff","minimum-difficulty.value":2}]}"#,
        &mut out,
    );
    let got = lines(&mut out, c);
    let answers = [
        ConfigureAnswer::Unknown("zeta"),
        ConfigureAnswer::VersionRolling {
            mask: pool.config().version_mask,
        },
        ConfigureAnswer::Unknown("alpha"),
        ConfigureAnswer::SubscribeExtranonce,
        ConfigureAnswer::MinimumDifficulty(true),
        ConfigureAnswer::Unknown("alpha"),
    ];
    assert_eq!(
        got[0],
        expect(|b| write::configure_result(b, &id(1), &answers))
    );
    // Before subscribing, the suggested difficulty is kept and sent with the subscribe reply.
    assert_eq!(got.len(), 1, "{got:?}");

    // Subscribe: the result, the difficulty, the first job (clean).
    shard.on_line(
        now,
        c,
        br#"{"id":2,"method":"mining.subscribe","params":["cgminer/4"]}"#,
        &mut out,
    );
    let got = lines(&mut out, c);
    let sub: serde_json::Value = serde_json::from_slice(&got[0]).unwrap();
    let sid = u32::from_str_radix(sub["result"][0][0][1].as_str().unwrap(), 16).unwrap();
    let en1 = hex::decode(sub["result"][1].as_str().unwrap()).unwrap();
    assert_eq!(
        got[0],
        expect(|b| write::subscribe_result(b, &id(2), sid, &en1, layout.nonce2_len()))
    );
    let two = Difficulty::from_f64(2.0).unwrap();
    assert_eq!(got[1], expect(|b| write::set_difficulty(b, two)));
    let notify = |clean| {
        expect(|b| {
            write::notify(
                b,
                &write::Notify {
                    job_id: &job.id_hex,
                    prev_hash: &job.prev_hash,
                    coinb1: &job.coinb1,
                    coinb2: &job.coinb2,
                    branch: &job.branch,
                    version: job.version,
                    bits: job.bits,
                    ntime: job.ntime,
                    clean,
                },
            );
        })
    };
    assert_eq!(got[2], notify(true));
    assert_eq!(&*job.notify, &notify(job.clean)[..]);

    // Authorise, then again: true both times.
    for n in [3, 4] {
        shard.on_line(
            now,
            c,
            format!(r#"{{"id":{n},"method":"mining.authorize","params":["alice.1","x"]}}"#)
                .as_bytes(),
            &mut out,
        );
        let mut want = vec![expect(|b| write::reply_true(b, &id(n)))];
        if n == 3 {
            // cgminer's agent contains "gminer": the welcome message.
            want.push(expect(|b| {
                write::show_message(b, "Authorised, welcome to ckpool-rs alice!");
            }));
        }
        assert_eq!(lines(&mut out, c), want);
    }

    // Ping, an unknown method, extranonce.subscribe.
    shard.on_line(now, c, br#"{"id":5,"method":"mining.ping"}"#, &mut out);
    assert_eq!(
        lines(&mut out, c),
        [expect(|b| write::reply_pong(b, &id(5)))]
    );
    shard.on_line(now, c, br#"{"id":6,"method":"x.y","params":[]}"#, &mut out);
    assert_eq!(
        lines(&mut out, c),
        [expect(|b| write::reply_error(
            b,
            &id(6),
            codes::METHOD_NOT_FOUND,
            "Method not found"
        ))]
    );
    shard.on_line(
        now,
        c,
        br#"{"id":8,"method":"mining.extranonce.subscribe","params":[]}"#,
        &mut out,
    );
    assert_eq!(
        lines(&mut out, c),
        [expect(|b| write::reply_true(b, &id(8)))]
    );

    // A rejected share.
    shard.on_line(
        now,
        c,
        br#"{"id":9,"method":"mining.submit","params":["alice.1","ffff","0000000000000000","00000000","00000000"]}"#,
        &mut out,
    );
    assert_eq!(
        lines(&mut out, c),
        [expect(|b| write::reply_reject(
            b,
            &id(9),
            codes::JOB_NOT_FOUND,
            "Invalid JobID"
        ))]
    );

    // A new extranonce1: set_extranonce, then the job again with clean=true.
    shard.renew_extranonce1(now, c, &mut out).unwrap();
    let got = lines(&mut out, c);
    let v: serde_json::Value = serde_json::from_slice(&got[0]).unwrap();
    let en1_new = hex::decode(v["params"][0].as_str().unwrap()).unwrap();
    assert_ne!(en1_new, en1);
    assert_eq!(
        got[0],
        expect(|b| write::set_extranonce(b, &en1_new, layout.nonce2_len()))
    );
    assert_eq!(got[1], notify(true));
}

#[test]
fn solo_notify_lines_are_the_codecs() {
    let mut cfg = PoolConfig::new(Network::Regtest, None);
    cfg.solo = true;
    let pool = Pool::new(cfg, 1, Instant::now());
    let now = Instant::now();
    let job = pool
        .new_template(Arc::new(Template::empty([5; 32], 0x1d00_ffff)), now)
        .unwrap();
    let script = script_for_address(PAYOUT, Network::Regtest).unwrap();
    let coinb2 = job.coinb2_for(&script, &pool.config().coinbase).unwrap();
    for clean in [false, true] {
        let want = expect(|b| {
            write::notify(
                b,
                &write::Notify {
                    job_id: &job.id_hex,
                    prev_hash: &job.prev_hash,
                    coinb1: &job.coinb1,
                    coinb2: &coinb2,
                    branch: &job.branch,
                    version: job.version,
                    bits: job.bits,
                    ntime: job.ntime,
                    // `false` asks for the job's own flag.
                    clean: clean || job.clean,
                },
            );
        });
        assert_eq!(&*job.notify_with(&coinb2, clean), &want[..]);
    }
}
