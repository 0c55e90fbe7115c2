//! The stratum writers produce exactly the bytes the stratifier writes today.
//!
//! Each oracle below is the stratifier's own way of building the line (stratifier/src/job.rs and
//! shard.rs at the time the writers were added), copied here so that switching the stratifier to
//! the writers cannot change a byte.
#![allow(missing_docs, reason = "tests")]
#![allow(clippy::unwrap_used, reason = "tests")]

use std::fmt::Write as _;

use ckpool_common::Difficulty;
use ckpool_common::stratum::write::{self, ConfigureAnswer, Notify};
use ckpool_common::stratum::{Parser, Value};
use proptest::prelude::*;
use simd_json::prelude::ValueBuilder as _;

/// The stratifier's `stratum_prevhash` (job.rs).
fn oracle_prevhash(prev: &[u8; 32]) -> String {
    let mut b = *prev;
    for w in b.chunks_exact_mut(4) {
        w.reverse();
    }
    hex::encode(b)
}

/// `Job::build`'s notify line (job.rs).
#[allow(clippy::too_many_arguments, reason = "the oracle takes every field")]
fn oracle_notify(
    id: u64,
    prev: &[u8; 32],
    coinb1: &[u8],
    coinb2: &[u8],
    branch: &[[u8; 32]],
    version: u32,
    bits: u32,
    curtime: u32,
    clean: bool,
) -> String {
    let id_hex = format!("{id:016x}");
    let mut prefix = String::with_capacity(512);
    prefix.push_str("{\"params\":[\"");
    prefix.push_str(&id_hex);
    prefix.push_str("\",\"");
    prefix.push_str(&oracle_prevhash(prev));
    prefix.push_str("\",\"");
    prefix.push_str(&hex::encode(coinb1));
    prefix.push_str("\",\"");
    let mut suffix = String::with_capacity(256 + branch.len() * 67);
    suffix.push_str("\",[");
    for (i, b) in branch.iter().enumerate() {
        if i > 0 {
            suffix.push(',');
        }
        suffix.push('"');
        suffix.push_str(&hex::encode(b));
        suffix.push('"');
    }
    let _ = write!(
        suffix,
        "],\"{:08x}\",\"{:08x}\",\"{:08x}\",",
        version, bits, curtime
    );
    let tail = "],\"id\":null,\"method\":\"mining.notify\"}\n";
    let suffix = format!("{suffix}{clean}{tail}");
    format!("{prefix}{}{suffix}", hex::encode(coinb2))
}

fn ids() -> Vec<Value<'static>> {
    vec![
        Value::from(7u64),
        Value::from(0u64),
        Value::String("abc".into()),
        Value::null(),
    ]
}

fn text(out: &[u8]) -> &str {
    std::str::from_utf8(out).unwrap()
}

proptest! {
    #[test]
    fn notify_matches_the_stratifier(
        id in any::<u64>(),
        prev in any::<[u8; 32]>(),
        coinb1 in prop::collection::vec(any::<u8>(), 0..120),
        coinb2 in prop::collection::vec(any::<u8>(), 0..120),
        branch in prop::collection::vec(any::<[u8; 32]>(), 0..13),
        version in any::<u32>(),
        bits in any::<u32>(),
        ntime in any::<u32>(),
        clean in any::<bool>(),
    ) {
        let want = oracle_notify(id, &prev, &coinb1, &coinb2, &branch, version, bits, ntime, clean);
        let job_id = format!("{id:016x}");
        let mut out = b"kept".to_vec();
        write::notify(&mut out, &Notify {
            job_id: &job_id,
            prev_hash: &prev,
            coinb1: &coinb1,
            coinb2: &coinb2,
            branch: &branch,
            version,
            bits,
            ntime,
            clean,
        });
        prop_assert_eq!(text(&out), format!("kept{want}"));
        // Solo mode's pieces around coinb2 give the same line.
        let mut pieces = Vec::new();
        write::notify_prefix(&mut pieces, &job_id, &prev, &coinb1);
        write::write_hex(&mut pieces, &coinb2);
        write::notify_suffix(&mut pieces, &branch, version, bits, ntime, clean);
        prop_assert_eq!(text(&pieces), want);
    }

    #[test]
    fn subscribe_result_matches_the_stratifier(
        sid in any::<u32>(),
        en1 in prop::collection::vec(any::<u8>(), 0..9),
        n2 in 0usize..17,
        pick in 0usize..4,
    ) {
        let id = &ids()[pick];
        // shard.rs `subscribe`.
        let result = format!(
            "[[[\"mining.notify\",\"{:08x}\"]],\"{}\",{}]",
            sid,
            hex::encode(&en1),
            n2
        );
        let mut want = Vec::new();
        write::reply_result(&mut want, id, result.as_bytes());
        let mut out = Vec::new();
        write::subscribe_result(&mut out, id, sid, &en1, n2);
        prop_assert_eq!(text(&out), text(&want));
    }

    #[test]
    fn configure_result_matches_the_stratifier(
        exts in prop::collection::vec(
            prop_oneof![
                Just("version-rolling".to_owned()),
                Just("minimum-difficulty".to_owned()),
                Just("subscribe-extranonce".to_owned()),
                Just("version-rolling.mask".to_owned()),
                "[a-z\"\\\\é.-]{0,12}",
            ],
            0..40,
        ),
        mask in any::<u32>(),
        min_ok in any::<bool>(),
        pick in 0usize..4,
    ) {
        let id = &ids()[pick];
        // shard.rs `configure`: a serde_json map, written with `to_string`.
        let mut result = serde_json::Map::new();
        let mut answers = Vec::new();
        for ext in &exts {
            match ext.as_str() {
                "version-rolling" => {
                    result.insert("version-rolling".into(), true.into());
                    result.insert("version-rolling.mask".into(), format!("{mask:08x}").into());
                    answers.push(ConfigureAnswer::VersionRolling { mask });
                }
                "minimum-difficulty" => {
                    result.insert("minimum-difficulty".into(), min_ok.into());
                    answers.push(ConfigureAnswer::MinimumDifficulty(min_ok));
                }
                "subscribe-extranonce" => {
                    result.insert("subscribe-extranonce".into(), true.into());
                    answers.push(ConfigureAnswer::SubscribeExtranonce);
                }
                other => {
                    result.insert(other.into(), false.into());
                    answers.push(ConfigureAnswer::Unknown(other));
                }
            }
        }
        let raw = serde_json::Value::Object(result).to_string();
        let mut want = Vec::new();
        write::reply_result(&mut want, id, raw.as_bytes());
        let mut out = Vec::new();
        write::configure_result(&mut out, id, &answers);
        prop_assert_eq!(text(&out), text(&want));
    }

    #[test]
    fn refusal_matches_the_stratifier(code in -5i32..30, msg in "\\PC{0,30}", pick in 0usize..4) {
        let id = &ids()[pick];
        // shard.rs `reply_auth_fail`.
        let mut want = Vec::with_capacity(96);
        want.extend_from_slice(b"{\"id\":");
        write::write_value(&mut want, id);
        want.extend_from_slice(format!(",\"result\":false,\"error\":[{code},").as_bytes());
        write::write_str(&mut want, &msg);
        want.extend_from_slice(b",null]}\n");
        let mut out = Vec::new();
        write::reply_refused(&mut out, id, code, &msg);
        prop_assert_eq!(text(&out), text(&want));
    }

    #[test]
    fn set_extranonce_matches_the_old_writer(en1 in prop::collection::vec(any::<u8>(), 0..9), n2 in 0usize..100) {
        let mut want = b"{\"id\":null,\"method\":\"mining.set_extranonce\",\"params\":[\"".to_vec();
        want.extend_from_slice(hex::encode(&en1).as_bytes());
        want.extend_from_slice(b"\",");
        want.extend_from_slice(n2.to_string().as_bytes());
        want.extend_from_slice(b"]}\n");
        let mut out = Vec::new();
        write::set_extranonce(&mut out, &en1, n2);
        prop_assert_eq!(text(&out), text(&want));
    }
}

/// The exact lines, as a miner receives them.
#[test]
fn pinned_lines() {
    let id7 = Value::from(7u64);
    let sid = Value::String("x1".into());
    let mut out = Vec::new();
    write::reply_true(&mut out, &id7);
    write::reply_result(&mut out, &sid, b"3");
    write::reply_pong(&mut out, &Value::null());
    write::reply_error(&mut out, &id7, -3, "Method not found");
    write::reply_reject(&mut out, &id7, 23, "Above target");
    write::reply_refused(&mut out, &sid, 24, "Invalid address");
    write::subscribe_result(
        &mut out,
        &Value::from(1u64),
        0x6b12_42ef,
        &[0xed, 0x42, 0x12, 0x6b],
        8,
    );
    write::set_difficulty(&mut out, Difficulty::from_whole(512));
    write::set_difficulty(&mut out, Difficulty::from_f64(0.5).unwrap());
    write::set_extranonce(&mut out, &[0x00, 0xab, 0x12, 0xff], 8);
    write::reconnect(&mut out);
    write::reconnect_to(&mut out, "pool.example", 3334, 5);
    write::show_message(&mut out, "Authorised, welcome to ckpool-rs bob!");
    write::configure_result(
        &mut out,
        &Value::from(3u64),
        &[
            ConfigureAnswer::VersionRolling { mask: 0x1fff_e000 },
            ConfigureAnswer::Unknown("info"),
            ConfigureAnswer::SubscribeExtranonce,
            ConfigureAnswer::MinimumDifficulty(true),
        ],
    );
    let want = concat!(
        "{\"id\":7,\"result\":true,\"error\":null}\n",
        "{\"id\":\"x1\",\"result\":3,\"error\":null}\n",
        "{\"id\":null,\"result\":\"pong\",\"error\":null}\n",
        "{\"id\":7,\"result\":null,\"error\":[-3,\"Method not found\",null]}\n",
        "{\"id\":7,\"result\":false,\"error\":[23,\"Above target\",null],\"reject-reason\":\"Above target\"}\n",
        "{\"id\":\"x1\",\"result\":false,\"error\":[24,\"Invalid address\",null]}\n",
        "{\"id\":1,\"result\":[[[\"mining.notify\",\"6b1242ef\"]],\"ed42126b\",8],\"error\":null}\n",
        "{\"id\":null,\"method\":\"mining.set_difficulty\",\"params\":[512]}\n",
        "{\"id\":null,\"method\":\"mining.set_difficulty\",\"params\":[0.5]}\n",
        "{\"id\":null,\"method\":\"mining.set_extranonce\",\"params\":[\"00ab12ff\",8]}\n",
        "{\"id\":null,\"method\":\"client.reconnect\",\"params\":[]}\n",
        "{\"id\":null,\"method\":\"client.reconnect\",\"params\":[\"pool.example\",3334,5]}\n",
        "{\"id\":null,\"method\":\"client.show_message\",\"params\":[\"Authorised, welcome to ckpool-rs bob!\"]}\n",
        "{\"id\":3,\"result\":{\"info\":false,\"minimum-difficulty\":true,\"subscribe-extranonce\":true,\"version-rolling\":true,\"version-rolling.mask\":\"1fffe000\"},\"error\":null}\n",
    );
    assert_eq!(text(&out), want);
}

/// A notify written from the fields of one real ckpool 0.9.9 sent is that line, byte for byte
/// (ckpool and the stratifier share the key order).
#[test]
fn notify_reproduces_a_real_ckpool_line() {
    let capture = include_str!("data/ckpool-0.9.9-proxy-upstream.jsonl");
    let mut checked = 0;
    for rec in capture.lines() {
        let rec: serde_json::Value = serde_json::from_str(rec).unwrap();
        let line = rec["line"].as_str().unwrap();
        if !line.contains("\"method\":\"mining.notify\"") {
            continue;
        }
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        let p = &v["params"];
        let h = |i: usize| hex::decode(p[i].as_str().unwrap()).unwrap();
        let u = |i: usize| u32::from_str_radix(p[i].as_str().unwrap(), 16).unwrap();
        let mut prev: [u8; 32] = h(1).try_into().unwrap();
        for w in prev.chunks_exact_mut(4) {
            w.reverse();
        }
        let branch: Vec<[u8; 32]> = p[4]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| {
                hex::decode(b.as_str().unwrap())
                    .unwrap()
                    .try_into()
                    .unwrap()
            })
            .collect();
        let mut out = Vec::new();
        write::notify(
            &mut out,
            &Notify {
                job_id: p[0].as_str().unwrap(),
                prev_hash: &prev,
                coinb1: &h(2),
                coinb2: &h(3),
                branch: &branch,
                version: u(5),
                bits: u(6),
                ntime: u(7),
                clean: p[8].as_bool().unwrap(),
            },
        );
        assert_eq!(text(&out), format!("{line}\n"));
        checked += 1;
    }
    assert!(checked >= 3, "{checked} notify lines");
}

/// Writers append: they never clear or reorder what the caller's buffer holds, and a reused
/// buffer with enough capacity does not reallocate.
#[test]
fn writers_append_without_reallocating() {
    let mut p = Parser::new();
    let req = p
        .parse(br#"{"id":99,"method":"mining.submit","params":["w","j","00","00","00"]}"#)
        .unwrap();
    let mut out = Vec::with_capacity(4096);
    out.extend_from_slice(b"head\n");
    let ptr = out.as_ptr();
    write::reply_true(&mut out, &req.id);
    write::reply_reject(&mut out, &req.id, 21, "Stale");
    write::set_difficulty(&mut out, Difficulty::from_whole(1024));
    assert_eq!(out.as_ptr(), ptr);
    assert!(out.starts_with(b"head\n{\"id\":99,\"result\":true"));
}
