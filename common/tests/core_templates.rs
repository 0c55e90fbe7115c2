#![allow(clippy::unwrap_used, reason = "test code")]
#![allow(missing_docs, reason = "test code")]
#![allow(clippy::panic, reason = "test code")]
//! End-to-end checks of the bitcoin helpers against real Bitcoin Core `getblocktemplate` output:
//! coinbase, merkle branch, witness commitment and block assembly, with the `bitcoin` crate as the
//! independent judge.

use bitcoin::address::KnownHrp;
use bitcoin::hashes::Hash;
use bitcoin::{Address, Network, PubkeyHash, WitnessProgram, WitnessVersion};
use ckpool_common::Target;
use ckpool_common::address::script_for_address;
use ckpool_common::block::{assemble, header};
use ckpool_common::coinbase::{CoinbaseSpec, TxOutput, build};
use ckpool_common::hash::{sha256d, sha256d_header};
use ckpool_common::merkle::{
    merkle_branch, merkle_root, merkle_root_from_branch, witness_commitment,
};
use ckpool_common::template::Template;
use serde_json::Value;

const EN1: [u8; 4] = [0xde, 0xad, 0xbe, 0xef];
const EN2: [u8; 8] = [1, 2, 3, 4, 5, 6, 7, 8];

fn load(name: &str) -> Value {
    let path = format!("{}/../testdata/{name}", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let v: Value = serde_json::from_str(&text).unwrap();
    v.get("result").cloned().unwrap_or(v)
}

fn network_of(name: &str) -> Network {
    if name.contains("regtest") {
        Network::Regtest
    } else if name.contains("signet") {
        Network::Signet
    } else if name.contains("testnet3") {
        Network::Testnet
    } else {
        panic!("unknown network for {name}")
    }
}

/// A payout address string for `network`, a different kind per network for coverage.
fn payout_address(network: Network) -> String {
    let hrp = KnownHrp::from(network);
    let addr = match network {
        Network::Regtest => Address::from_witness_program(
            WitnessProgram::new(WitnessVersion::V0, &[0x11; 20]).unwrap(),
            hrp,
        ),
        Network::Signet => Address::from_witness_program(
            WitnessProgram::new(WitnessVersion::V1, &[0x22; 32]).unwrap(),
            hrp,
        ),
        _ => Address::p2pkh(PubkeyHash::from_byte_array([0x33; 20]), network),
    };
    addr.to_string()
}

fn core_template_files() -> Vec<String> {
    let dir = format!("{}/../testdata", env!("CARGO_MANIFEST_DIR"));
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.starts_with("core-") && n.ends_with(".json"))
        .collect();
    names.sort();
    names
}

struct Built {
    template: Template,
    coinbase: Vec<u8>,
    payout: Vec<u8>,
    block: bitcoin::Block,
    raw: Vec<u8>,
}

fn build_block(name: &str) -> Built {
    let template = Template::from_gbt(&load(name)).unwrap();
    let network = network_of(name);
    let payout = script_for_address(&payout_address(network), network).unwrap();
    let outputs = [TxOutput {
        value: template.coinbase_value,
        script: payout.clone(),
    }];
    let cb = build(&CoinbaseSpec {
        height: template.height,
        flags: &template.coinbase_flags,
        extra: b"\x5a\xa5",
        nonce1_len: EN1.len(),
        nonce2_len: EN2.len(),
        tag: b"ckpool-rs",
        btcsig: b"test sig",
        outputs: &outputs,
        witness_commitment: template.default_witness_commitment.as_deref(),
    })
    .unwrap();
    let coinbase = [cb.coinb1.as_slice(), &EN1, &EN2, cb.coinb2.as_slice()].concat();
    let coinbase_txid = sha256d(&coinbase);

    // Merkle root the stratum way: branch from txids, folded with the coinbase txid.
    let txids: Vec<[u8; 32]> = template.transactions.iter().map(|t| t.txid).collect();
    let branch = merkle_branch(&txids);
    let root = merkle_root_from_branch(&coinbase_txid, &branch);
    let mut leaves = vec![coinbase_txid];
    leaves.extend_from_slice(&txids);
    assert_eq!(root, merkle_root(&leaves), "{name}");

    let hdr = header(
        template.version,
        &template.prev_hash,
        &root,
        template.curtime,
        template.bits,
        0,
    );
    let raw = assemble(
        &hdr,
        &coinbase,
        template.has_witness_commitment(),
        &template.transactions,
    );
    let block: bitcoin::Block = bitcoin::consensus::deserialize(&raw)
        .unwrap_or_else(|e| panic!("{name}: block does not decode: {e}"));
    assert_eq!(
        block.block_hash().to_byte_array(),
        sha256d_header(&hdr),
        "{name}"
    );
    Built {
        template,
        coinbase,
        payout,
        block,
        raw,
    }
}

#[test]
fn every_core_template_builds_a_valid_block() {
    let files = core_template_files();
    assert!(files.len() >= 6, "{files:?}");
    for name in &files {
        let Built {
            template,
            coinbase,
            payout,
            block,
            raw,
        } = build_block(name);

        assert_eq!(bitcoin::consensus::serialize(&block), raw, "{name}");
        assert!(block.check_merkle_root(), "{name}");
        assert_eq!(block.txdata.len(), template.transactions.len() + 1);

        // The coinbase: txid form equals what we hashed, pays the intended script and value.
        let cb = &block.txdata[0];
        assert!(cb.is_coinbase(), "{name}");
        assert_eq!(
            cb.compute_txid().to_byte_array(),
            sha256d(&coinbase),
            "{name}"
        );
        assert_eq!(
            cb.output[0].script_pubkey.as_bytes(),
            payout.as_slice(),
            "{name}"
        );
        assert_eq!(
            cb.output[0].value.to_sat(),
            template.coinbase_value,
            "{name}"
        );
        let script_sig = cb.input[0].script_sig.as_bytes();
        assert!(script_sig.len() <= 100, "{name}");
        let height_push = bitcoin::script::Builder::new()
            .push_int(i64::try_from(template.height).unwrap())
            .into_script();
        assert!(script_sig.starts_with(height_push.as_bytes()), "{name}");
        if template.height > 16 {
            assert_eq!(
                block.bip34_block_height().unwrap(),
                template.height,
                "{name}"
            );
        }

        // Template transactions went in unchanged and in order.
        for (tx, ttx) in block.txdata[1..].iter().zip(&template.transactions) {
            assert_eq!(tx.compute_txid().to_byte_array(), ttx.txid, "{name}");
            assert_eq!(tx.compute_wtxid().to_byte_array(), ttx.wtxid, "{name}");
        }

        // Witness commitment: from wtxids, equal to Core's, and accepted by the bitcoin crate.
        if let Some(script) = &template.default_witness_commitment {
            assert_eq!(script.len(), 38, "{name}");
            assert_eq!(
                &script[..6],
                &[0x6a, 0x24, 0xaa, 0x21, 0xa9, 0xed],
                "{name}"
            );
            let wtxids: Vec<[u8; 32]> = template.transactions.iter().map(|t| t.wtxid).collect();
            assert_eq!(
                witness_commitment(&wtxids, &[0; 32]),
                script[6..38],
                "{name}"
            );
            assert_eq!(
                cb.output.last().unwrap().script_pubkey.as_bytes(),
                script.as_slice()
            );
            assert_eq!(cb.output.last().unwrap().value.to_sat(), 0);
            assert_eq!(cb.input[0].witness.len(), 1, "{name}");
            assert!(block.check_witness_commitment(), "{name}");
        }
    }
}

#[test]
fn txids_and_wtxids_are_not_interchangeable() {
    for name in [
        "core-regtest-gbt-12tx-segwit.json",
        "core-testnet3-gbt-2442185.json",
    ] {
        let Built {
            template, block, ..
        } = build_block(name);
        assert!(
            template.transactions.iter().any(|t| t.txid != t.wtxid),
            "{name} has segwit transactions"
        );
        let txids: Vec<[u8; 32]> = template.transactions.iter().map(|t| t.txid).collect();
        let wtxids: Vec<[u8; 32]> = template.transactions.iter().map(|t| t.wtxid).collect();
        let core = template.default_witness_commitment.as_deref().unwrap();
        // The commitment from txids would be wrong.
        assert_ne!(witness_commitment(&txids, &[0; 32]), core[6..38], "{name}");
        // A merkle root from wtxids would be wrong.
        let cb_txid = block.txdata[0].compute_txid().to_byte_array();
        let wrong = merkle_root_from_branch(&cb_txid, &merkle_branch(&wtxids));
        assert_ne!(wrong, block.header.merkle_root.to_byte_array(), "{name}");
        assert_eq!(
            merkle_root_from_branch(&cb_txid, &merkle_branch(&txids)),
            block.header.merkle_root.to_byte_array()
        );
    }
}

#[test]
fn small_heights_use_core_encoding() {
    for (name, height, prefix) in [
        ("core-regtest-gbt-height1-empty.json", 1, &[0x51][..]),
        ("core-regtest-gbt-height16-empty.json", 16, &[0x60][..]),
        (
            "core-regtest-gbt-height17-empty.json",
            17,
            &[0x01, 0x11][..],
        ),
        ("core-signet51-gbt-height1.json", 1, &[0x51][..]),
    ] {
        let Built {
            template, block, ..
        } = build_block(name);
        assert_eq!(template.height, height);
        let script_sig = block.txdata[0].input[0].script_sig.as_bytes();
        assert!(
            script_sig.starts_with(prefix),
            "{name}: {}",
            hex::encode(script_sig)
        );
        // The byte after the height is the next push, not part of a longer number.
        assert_eq!(
            script_sig[prefix.len()],
            2,
            "{name}: the extra push follows"
        );
    }
}

#[test]
fn signet_template() {
    let v = load("core-signet51-gbt-height1.json");
    let template = Template::from_gbt(&v).unwrap();
    assert!(template.rules.iter().any(|r| r == "!signet"));
    let target_hex = v.get("target").and_then(Value::as_str).unwrap();
    let mut be = [0u8; 32];
    hex::decode_to_slice(target_hex, &mut be).unwrap();
    let target = Target::from_compact(template.bits);
    assert_eq!(target.0.to_be_bytes::<32>(), be);
    let diff = target.difficulty_f64();
    assert!((diff - 0.0011).abs() < 0.00005, "{diff}");
    // Shares at difficulty 1 are harder than a block here.
    assert!(ckpool_common::Difficulty::ONE.target() < target);
}

#[test]
fn regtest_and_testnet_targets_match_template() {
    for name in [
        "core-regtest-gbt-12tx-segwit.json",
        "core-testnet3-gbt-2442185.json",
    ] {
        let v = load(name);
        let template = Template::from_gbt(&v).unwrap();
        let target_hex = v.get("target").and_then(Value::as_str).unwrap();
        assert_eq!(
            format!("{:064x}", Target::from_compact(template.bits).0),
            target_hex,
            "{name}"
        );
    }
}
