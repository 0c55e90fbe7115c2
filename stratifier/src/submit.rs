//! The steps of checking a `mining.submit`, as plain functions the shard runs in order:
//! [`parse`] the parameters, [`hash`] the share, [`decide`] its verdict, and record it
//! ([`block_candidate`] for a block, [`share_record`] for the share log). None of them allocates
//! except where a record is asked for; the shard does the session and counter bookkeeping.

use common::stratum::{self, Value};
use common::target::hash_difficulty;
use common::{Difficulty, block};
use simd_json::prelude::*;

use crate::job::{Enonce1, ExtranonceLayout, Job};
use crate::pool::{BlockCandidate, ShareRecord};
use crate::reject::Reject;
use crate::share::{ShareHash, ShareInput, hash_share};

/// Largest ntime roll accepted past the job's time, in seconds (ckpool's value).
pub(crate) const MAX_NTIME_ROLL: u32 = 7000;

/// A submission's parameters, checked for form.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Submission<'a> {
    /// The worker name as sent.
    pub(crate) worker: &'a str,
    /// The job id as sent (hex; looked up later).
    pub(crate) job_id: &'a str,
    /// extranonce2, hex of an even, non-zero length (its length is checked against the
    /// source's later).
    pub(crate) nonce2: &'a str,
    /// ntime.
    pub(crate) ntime: u32,
    /// nonce (the first 8 hex digits of what was sent).
    pub(crate) nonce: u32,
    /// Rolled version bits, within the session's mask.
    pub(crate) version_bits: Option<u32>,
}

/// Step 1: the parameters, in ckpool's order of checks: an array of at least five, a worker,
/// a job id, extranonce2, ntime, nonce, then the optional version bits (which must lie within
/// `mask`).
pub(crate) fn parse<'a>(
    params: Option<&'a [Value<'a>]>,
    mask: u32,
) -> Result<Submission<'a>, Reject> {
    let params = params.ok_or(Reject::ParamsNotArray)?;
    let [worker, job_id, nonce2, ntime, nonce, rest @ ..] = params else {
        return Err(Reject::InvalidArraySize);
    };
    let worker = worker
        .as_str()
        .filter(|w| !w.is_empty())
        .ok_or(Reject::NoUsername)?;
    let job_id = job_id
        .as_str()
        .filter(|j| !j.is_empty())
        .ok_or(Reject::NoJobId)?;
    let nonce2 = nonce2
        .as_str()
        .filter(|n| !n.is_empty() && n.len() % 2 == 0 && n.bytes().all(|b| b.is_ascii_hexdigit()))
        .ok_or(Reject::NoNonce2)?;
    let ntime = ntime
        .as_str()
        .filter(|n| n.len() % 2 == 0)
        .and_then(stratum::hex_u32)
        .ok_or(Reject::NoNtime)?;
    let nonce = nonce
        .as_str()
        .filter(|n| n.len() >= 8)
        .and_then(|n| n.get(..8))
        .and_then(stratum::hex_u32)
        .ok_or(Reject::NoNonce)?;
    let version_bits = match rest.first() {
        None => None,
        Some(v) if v.is_null() => None,
        Some(v) => Some(
            v.as_str()
                .and_then(stratum::hex_u32)
                .ok_or(Reject::InvalidVersionMask)?,
        ),
    };
    if let Some(bits) = version_bits
        && bits & !mask != 0
    {
        return Err(Reject::InvalidVersionMask);
    }
    Ok(Submission {
        worker,
        job_id,
        nonce2,
        ntime,
        nonce,
        version_bits,
    })
}

/// extranonce2 decoded into `buf`, if it has the source's length.
pub(crate) fn nonce2<'b>(
    hex_text: &str,
    layout: &ExtranonceLayout,
    buf: &'b mut [u8; ExtranonceLayout::MAX_NONCE2],
) -> Result<&'b [u8], Reject> {
    let n2len = layout.nonce2_len();
    let en2 = buf.get_mut(..n2len).ok_or(Reject::InvalidNonce2Length)?;
    if hex_text.len() != n2len * 2 || hex::decode_to_slice(hex_text, &mut *en2).is_err() {
        return Err(Reject::InvalidNonce2Length);
    }
    Ok(en2)
}

/// What hashing a share needs besides the job.
#[derive(Clone, Copy)]
pub(crate) struct HashInput<'a> {
    /// The source's extranonce layout.
    pub(crate) layout: &'a ExtranonceLayout,
    /// The session's extranonce1 number.
    pub(crate) enonce1: u64,
    /// Its previous extranonce1 number, when the job was sent before it changed.
    pub(crate) old_enonce1: Option<u64>,
    /// coinb2 (the user's own in solo mode).
    pub(crate) coinb2: &'a [u8],
    /// extranonce2.
    pub(crate) enonce2: &'a [u8],
    /// The header version with the rolled bits.
    pub(crate) version: u32,
    /// ntime.
    pub(crate) ntime: u32,
    /// nonce.
    pub(crate) nonce: u32,
    /// The difficulty the share is judged at.
    pub(crate) judged: Difficulty,
}

/// A hashed share, with the extranonce1 it was hashed with.
pub(crate) struct Hashed {
    /// Header and hash.
    pub(crate) share: ShareHash,
    /// The extranonce1 used.
    pub(crate) enonce1: Enonce1,
    /// The difficulty the hash achieved.
    pub(crate) sdiff: f64,
}

/// Step 2: hashes the share; the coinbase it was hashed with is left in `scratch` (a block
/// is assembled from it). A share on a job sent before the session's extranonce1 changed may
/// have used either value: the old one is tried when the current one makes no share.
pub(crate) fn hash(job: &Job, h: &HashInput<'_>, scratch: &mut Vec<u8>) -> Hashed {
    let mut enonce1 = h.layout.enonce1(h.enonce1);
    let mut input = ShareInput {
        coinb1: &job.coinb1,
        enonce1: enonce1.as_ref(),
        enonce2: h.enonce2,
        coinb2: h.coinb2,
        branch: &job.branch,
        version: h.version,
        prev_hash: &job.prev_hash,
        ntime: h.ntime,
        bits: job.bits,
        nonce: h.nonce,
    };
    let mut share = hash_share(&input, scratch);
    let counts = |x: &[u8; 32]| h.judged.target().is_met_by(x) || job.network_target.is_met_by(x);
    if let Some(old_enonce1) = h.old_enonce1.filter(|&o| o != h.enonce1)
        && !counts(&share.hash)
    {
        let old = h.layout.enonce1(old_enonce1);
        input.enonce1 = old.as_ref();
        let alt = hash_share(&input, scratch);
        if counts(&alt.hash) {
            share = alt;
            enonce1 = old;
        } else {
            // Leave the coinbase of the current extranonce1 in `scratch`.
            input.enonce1 = enonce1.as_ref();
            share = hash_share(&input, scratch);
        }
    }
    Hashed {
        sdiff: hash_difficulty(&share.hash),
        share,
        enonce1,
    }
}

/// Step 3: the verdict, in ckpool's order: stale job, ntime out of range, above the target,
/// duplicate. `first_sighting` is asked last, and only if every other check passed (it records
/// the hash).
pub(crate) fn decide(
    stale: bool,
    ntime: u32,
    job_ntime: u32,
    meets_target: bool,
    first_sighting: impl FnOnce() -> bool,
) -> Result<(), Reject> {
    if stale {
        Err(Reject::Stale)
    } else if ntime < job_ntime || ntime > job_ntime.saturating_add(MAX_NTIME_ROLL) {
        Err(Reject::NtimeOutOfRange)
    } else if !meets_target {
        Err(Reject::AboveTarget)
    } else if !first_sighting() {
        Err(Reject::Duplicate)
    } else {
        Ok(())
    }
}

/// Step 4a: the block a share solved, assembled from the coinbase in `coinbase` (`None` as
/// the hex for upstream work: the upstream has the transactions and submits it).
pub(crate) fn block_candidate(
    job: &Job,
    share: &ShareHash,
    coinbase: &[u8],
    worker: String,
) -> BlockCandidate {
    let hex = job.can_assemble().then(|| {
        hex::encode(block::assemble(
            &share.header,
            coinbase,
            job.has_witness_commitment(),
            job.transactions(),
        ))
    });
    BlockCandidate {
        height: job.height(),
        hash: common::template::rpc_hash_hex(&share.hash),
        hex,
        source: job.source,
        worker,
        job_id: job.id,
        solve: None,
    }
}

/// The solution of a block-solving share as the pool's `block` message to its nodes carries
/// it: the header and coinbase it was hashed with and the share's own fields.
pub(crate) fn block_solve(
    job: &Job,
    hashed: &Hashed,
    sub: &Submission<'_>,
    coinbase: &[u8],
    worker: &str,
) -> common::stratum::node::BlockSolve {
    common::stratum::node::BlockSolve {
        enonce1: hashed.enonce1.as_ref().to_vec(),
        nonce: sub.nonce,
        nonce2: hex::decode(sub.nonce2).unwrap_or_default(),
        ntime: sub.ntime,
        version_mask: sub.version_bits.unwrap_or(0),
        jobid: job.id,
        diff: hashed.sdiff,
        name: worker.to_owned(),
        coinbase: coinbase.to_vec(),
        header: hashed.share.header,
    }
}

/// Who sent a share, for its record.
pub(crate) struct Submitter<'a> {
    /// Full worker name.
    pub(crate) worker: String,
    /// User name.
    pub(crate) user: &'a str,
    /// Peer address (without the port).
    pub(crate) address: String,
    /// User agent.
    pub(crate) agent: &'a str,
}

/// Step 4b: the share log's record of a hashed share.
pub(crate) fn share_record(
    job: &Job,
    sub: &Submission<'_>,
    hashed: &Hashed,
    judged: Difficulty,
    verdict: Result<(), Reject>,
    from: Submitter<'_>,
) -> ShareRecord {
    ShareRecord {
        workinfoid: job.id,
        height: job.height(),
        enonce1: hex::encode(hashed.enonce1.as_ref()),
        nonce2: sub.nonce2.to_owned(),
        nonce: format!("{:08x}", sub.nonce),
        ntime: format!("{:08x}", sub.ntime),
        diff: judged.to_f64(),
        sdiff: hashed.sdiff,
        hash: common::template::rpc_hash_hex(&hashed.share.hash),
        result: verdict.is_ok(),
        reject_reason: verdict.err(),
        workername: from.worker,
        username: from.user.to_owned(),
        address: from.address,
        agent: from.agent.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Instant;

    use common::Target;
    use common::stratum::Parser;
    use common::template::Template;

    use super::*;
    use crate::job::{Origin, SourceId, Work};

    /// A parsed submission's fields, owned.
    type Fields = (String, String, String, u32, u32, Option<u32>);

    fn parsed(params: &str, mask: u32) -> Result<Fields, Reject> {
        let line = format!(r#"{{"id":1,"method":"mining.submit","params":{params}}}"#);
        let mut p = Parser::new();
        let req = p.parse(line.as_bytes()).unwrap_or_else(|e| panic!("{e}"));
        parse(req.params_array(), mask).map(|s| {
            (
                s.worker.to_owned(),
                s.job_id.to_owned(),
                s.nonce2.to_owned(),
                s.ntime,
                s.nonce,
                s.version_bits,
            )
        })
    }

    #[test]
    fn parse_checks_in_ckpools_order() {
        let ok = r#"["w","1a","00ff","6553f100","0000abcd"]"#;
        assert_eq!(
            parsed(ok, 0),
            Ok((
                "w".into(),
                "1a".into(),
                "00ff".into(),
                0x6553_f100,
                0xabcd,
                None
            ))
        );
        for (params, want) in [
            (r#"{"a":1}"#, Reject::ParamsNotArray),
            (r#"["w","1a","00ff","6553f100"]"#, Reject::InvalidArraySize),
            (
                r#"["","1a","00ff","6553f100","0000abcd"]"#,
                Reject::NoUsername,
            ),
            // The first failing check wins.
            (r#"["",1,"0","x","y"]"#, Reject::NoUsername),
            (r#"["w","","00ff","6553f100","0000abcd"]"#, Reject::NoJobId),
            (
                r#"["w","1a","0ff","6553f100","0000abcd"]"#,
                Reject::NoNonce2,
            ),
            (r#"["w","1a","zz","6553f100","0000abcd"]"#, Reject::NoNonce2),
            (r#"["w","1a","00ff","553f100","0000abcd"]"#, Reject::NoNtime),
            (r#"["w","1a","00ff","6553f100","abcd"]"#, Reject::NoNonce),
            (
                r#"["w","1a","00ff","6553f100","0000abcd","xyz"]"#,
                Reject::InvalidVersionMask,
            ),
            (
                r#"["w","1a","00ff","6553f100","0000abcd","00001000"]"#,
                Reject::InvalidVersionMask,
            ),
        ] {
            assert_eq!(
                parsed(params, 0x1fff_e000).map(|_| ()),
                Err(want),
                "{params}"
            );
        }
        // Bits within the mask, a null, and a long nonce (its first 8 digits count).
        let rolled = r#"["w","1a","00ff","6553f100","0000abcdff","1fffe000"]"#;
        assert_eq!(
            parsed(rolled, 0x1fff_e000).map(|s| (s.4, s.5)),
            Ok((0xabcd, Some(0x1fff_e000)))
        );
        let null = r#"["w","1a","00ff","6553f100","0000abcd",null]"#;
        assert_eq!(parsed(null, 0).map(|s| s.5), Ok(None));
    }

    #[test]
    fn nonce2_must_have_the_sources_length() {
        let layout = ExtranonceLayout::new(&[1], 2, 4).unwrap();
        let mut buf = [0u8; ExtranonceLayout::MAX_NONCE2];
        assert_eq!(
            nonce2("0a0b0c0d", &layout, &mut buf),
            Ok(&[10u8, 11, 12, 13][..])
        );
        assert_eq!(
            nonce2("0a0b0c", &layout, &mut buf),
            Err(Reject::InvalidNonce2Length)
        );
        assert_eq!(
            nonce2("0a0b0c0d0e", &layout, &mut buf),
            Err(Reject::InvalidNonce2Length)
        );
    }

    #[test]
    fn decide_in_ckpools_order_and_looks_up_duplicates_last() {
        let t = 1_000_000;
        let never = || -> bool { panic!("the duplicate set is only asked last") };
        assert_eq!(decide(true, t - 1, t, false, never), Err(Reject::Stale));
        assert_eq!(
            decide(false, t - 1, t, false, never),
            Err(Reject::NtimeOutOfRange)
        );
        assert_eq!(
            decide(false, t + MAX_NTIME_ROLL + 1, t, true, never),
            Err(Reject::NtimeOutOfRange)
        );
        assert_eq!(
            decide(false, t + MAX_NTIME_ROLL, t, false, never),
            Err(Reject::AboveTarget)
        );
        assert_eq!(decide(false, t, t, true, || false), Err(Reject::Duplicate));
        assert_eq!(decide(false, t, t, true, || true), Ok(()));
    }

    fn jobs() -> (Job, Job) {
        let t = Arc::new(Template::empty([5; 32], 0x207f_ffff));
        let cfg = crate::PoolConfig::new(common::address::Network::Regtest, None).coinbase;
        let own = Job::build(1, Arc::clone(&t), true, Some(&[0x51]), &cfg, Instant::now()).unwrap();
        let work = Work {
            origin: Origin::Upstream { job_id: "u".into() },
            prev_hash: own.prev_hash,
            coinb1: own.coinb1.clone(),
            coinb2: own.coinb2.clone(),
            branch: Vec::new(),
            version: own.version,
            bits: own.bits,
            ntime: own.ntime,
            clean: true,
            height: 0,
        };
        let up = Job::from_work(2, SourceId(1), work, Instant::now());
        (own, up)
    }

    #[test]
    fn hashing_tries_the_old_extranonce1_only_when_the_new_one_makes_no_share() {
        let (job, _) = jobs();
        let layout = ExtranonceLayout::new(&[], 4, 8).unwrap();
        // A target no hash meets (difficulty 2^64): neither extranonce1 counts, so the hash and
        // coinbase left are the current one's.
        let mut h = HashInput {
            layout: &layout,
            enonce1: 7,
            old_enonce1: Some(6),
            coinb2: &job.coinb2,
            enonce2: &[0; 8],
            version: job.version,
            ntime: job.ntime,
            nonce: 0,
            judged: Difficulty::from_f64(2f64.powi(64)).unwrap(),
        };
        let mut scratch = Vec::new();
        let both_fail = hash(&job, &h, &mut scratch);
        let current_only = hash(
            &job,
            &HashInput {
                old_enonce1: None,
                ..h
            },
            &mut Vec::new(),
        );
        if !job.network_target.is_met_by(&both_fail.share.hash) {
            assert_eq!(both_fail.share, current_only.share);
            assert_eq!(both_fail.enonce1.as_ref(), [0, 0, 0, 7]);
        }
        let expected_cb = [&job.coinb1[..], &[0, 0, 0, 7], &[0; 8], &job.coinb2[..]].concat();
        assert_eq!(
            scratch, expected_cb,
            "the current extranonce1's coinbase is left"
        );
        // A nonce whose hash meets the target only with the old extranonce1 counts with it.
        h.judged = Difficulty::from_f64(2f64.powi(-20)).unwrap();
        let want = h.judged.target();
        let with = |en1: u64, nonce: u32| {
            hash(
                &job,
                &HashInput {
                    enonce1: en1,
                    old_enonce1: None,
                    nonce,
                    ..h
                },
                &mut Vec::new(),
            )
            .share
            .hash
        };
        let nonce = (0u32..)
            .find(|&n| {
                want.is_met_by(&with(6, n))
                    && !want.is_met_by(&with(7, n))
                    && !job.network_target.is_met_by(&with(7, n))
            })
            .unwrap_or_default();
        let got = hash(&job, &HashInput { nonce, ..h }, &mut scratch);
        assert_eq!(got.enonce1.as_ref(), [0, 0, 0, 6]);
        assert_eq!(got.share.hash, with(6, nonce));
        assert!(got.sdiff >= h.judged.to_f64());
    }

    #[test]
    fn block_candidates_carry_the_block_only_when_the_transactions_are_known() {
        let (own, up) = jobs();
        let share = ShareHash {
            header: [0; 80],
            hash: [0; 32],
        };
        let coinbase = [&own.coinb1[..], &[0; 12], &own.coinb2[..]].concat();
        let b = block_candidate(&own, &share, &coinbase, "w".into());
        assert!(b.hex.as_deref().is_some_and(|h| h.len() > 160));
        assert_eq!(
            (b.job_id, b.source, b.height),
            (1, SourceId::TEMPLATE, own.height())
        );
        let b = block_candidate(&up, &share, &coinbase, "w".into());
        assert!(b.hex.is_none());
        assert_eq!((b.job_id, b.source), (2, SourceId(1)));
        let _ = Target::from_compact(0x207f_ffff);
    }

    #[test]
    fn share_records_say_what_the_share_log_needs() {
        let (job, _) = jobs();
        let sub = Submission {
            worker: "alice.rig",
            job_id: "1",
            nonce2: "00000000000000ff",
            ntime: 0x6553_f100,
            nonce: 0xab,
            version_bits: None,
        };
        let layout = ExtranonceLayout::new(&[0xee], 3, 8).unwrap();
        let hashed = Hashed {
            share: ShareHash {
                header: [0; 80],
                hash: [1; 32],
            },
            enonce1: layout.enonce1(0x0102_0304),
            sdiff: 12.5,
        };
        let from = || Submitter {
            worker: "alice.rig".into(),
            user: "alice",
            address: "10.0.0.1".into(),
            agent: "cgminer",
        };
        let d = Difficulty::from_f64(2.0).unwrap();
        let ok = share_record(&job, &sub, &hashed, d, Ok(()), from());
        assert_eq!((ok.workinfoid, ok.height), (1, job.height()));
        assert_eq!(ok.enonce1, "ee020304");
        assert_eq!(
            (ok.nonce2.as_str(), ok.nonce.as_str(), ok.ntime.as_str()),
            ("00000000000000ff", "000000ab", "6553f100")
        );
        assert_eq!((ok.diff, ok.sdiff), (2.0, 12.5));
        assert_eq!(ok.hash, "01".repeat(32));
        assert!(ok.result && ok.reject_reason.is_none());
        assert_eq!(
            (ok.workername.as_str(), ok.username.as_str()),
            ("alice.rig", "alice")
        );
        assert_eq!(
            (ok.address.as_str(), ok.agent.as_str()),
            ("10.0.0.1", "cgminer")
        );
        let bad = share_record(&job, &sub, &hashed, d, Err(Reject::Stale), from());
        assert!(!bad.result);
        assert_eq!(bad.reject_reason, Some(Reject::Stale));
    }
}
