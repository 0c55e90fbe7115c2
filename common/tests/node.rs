//! ckpool's node messages against the captured ckpool 0.9.9 node link: every `workinfo` and
//! `transactions` line the pool sent reads back and is written again to the same bytes, and the
//! work it describes is consistent (the merkle branch is that of the transactions it names, the
//! difficulty that of its target).
#![allow(missing_docs, reason = "tests")]
#![allow(clippy::unwrap_used, clippy::panic, reason = "tests")]

use ckpool_common::Target;
use ckpool_common::merkle;
use ckpool_common::stratum::node::{self, WorkInfo};
use ckpool_common::stratum::passthrough::{self, FromUpstream};

const NODE: &str = include_str!("data/ckpool-0.9.9-node-link.jsonl");

/// The lines the pool sent its node that carry `node.method` `method` and no `client_id`.
fn link_lines(method: &str) -> Vec<String> {
    NODE.lines()
        .filter_map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (v["dir"] == "to_passthrough").then(|| v["line"].as_str().unwrap().to_owned())
        })
        .filter(|line| {
            let mut scratch = Vec::new();
            matches!(
                passthrough::decode_upstream(line.as_bytes(), &mut scratch),
                FromUpstream::Link { node_method: Some(m) } if m == method
            )
        })
        .collect()
}

#[test]
fn workinfo_lines_read_back_and_are_written_to_the_byte() {
    let lines = link_lines(node::WORKINFO);
    assert_eq!(lines.len(), 3, "the capture holds three workinfos");
    let txs = node::parse_transactions(link_lines(node::TRANSACTIONS)[0].as_bytes()).unwrap();
    for line in &lines {
        let wi = WorkInfo::parse(line.as_bytes()).unwrap();
        let mut out = Vec::new();
        wi.write(&mut out);
        assert_eq!(String::from_utf8(out).unwrap(), format!("{line}\n"));
        // What it says holds together: 8 transactions, all of them sent before; the branch is
        // theirs; the difficulty is the target's; the job id is the notify's.
        assert_eq!(wi.txids.len(), 8);
        let sent: Vec<[u8; 32]> = txs.iter().map(|t| t.txid).collect();
        for t in &wi.txids {
            assert!(
                sent.contains(t),
                "a workinfo names a transaction never sent"
            );
        }
        assert_eq!(wi.branch, merkle::merkle_branch(&wi.txids));
        let target = Target::from_compact(wi.bits);
        assert_eq!(target.0.to_be_bytes::<32>(), wi.target);
        assert_eq!(target.difficulty_f64(), wi.diff);
        assert_eq!((wi.enonce1varlen, wi.enonce2varlen), (4, 8));
        assert_eq!(
            format!("{:016x}", wi.jobid),
            format!("6b1242ec{:08x}", wi.jobid & 0xffff_ffff)
        );
        assert_eq!(wi.curtime, wi.ntime);
    }
}

#[test]
fn transactions_line_reads_back_and_is_written_to_the_byte() {
    let lines = link_lines(node::TRANSACTIONS);
    assert_eq!(lines.len(), 1);
    let txs = node::parse_transactions(lines[0].as_bytes()).unwrap();
    assert_eq!(txs.len(), 8);
    // These are segwit spends: ckpool sends each one's wtxid as `hash`, not its txid.
    assert!(txs.iter().all(|t| t.txid != t.wtxid));
    let mut out = Vec::new();
    node::write_transactions(&mut out, &txs);
    assert_eq!(String::from_utf8(out).unwrap(), format!("{}\n", lines[0]));
}

#[test]
fn malformed_node_messages_are_errors_not_panics() {
    let good = link_lines(node::WORKINFO).remove(0);
    for bad in [
        String::new(),
        "dropclient=1".to_owned(),
        "[]".to_owned(),
        good.replace("\"txns\":8", "\"txns\":9"),
        good.replace("\"nbit\":\"207fffff\"", "\"nbit\":\"7fffff\""),
        good.replace("\"prevhash\":\"92", "\"prevhash\":\"zz"),
        good.replace("\"jobid\":", "\"job\":"),
    ] {
        assert!(WorkInfo::parse(bad.as_bytes()).is_err(), "{bad:.80}");
    }
    assert!(node::parse_transactions(br#"{"transaction":[{"hash":"00","data":"0011"}]}"#).is_err());
    assert!(node::parse_transactions(br#"{"transaction":7}"#).is_err());
    assert_eq!(
        node::parse_transactions(br#"{"transaction":[]}"#),
        Ok(Vec::new())
    );
}
