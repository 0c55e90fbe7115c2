//! Jobs (ckpool's workbases): a template turned into the pieces stratum sends and checks against.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Instant;

use common::coinbase::{self, CoinbaseSpec, TxOutput};
use common::template::Template;
use common::{Difficulty, Target, merkle};

use crate::seen::Seen;

/// One job sent to miners.
#[derive(Debug)]
pub struct Job {
    /// Job id (sent as 16 hex digits).
    pub id: u64,
    /// The job id as sent.
    pub id_hex: String,
    /// The template it was built from.
    pub template: Arc<Template>,
    /// Block version from the template (never with rolled bits).
    pub version: u32,
    /// nBits.
    pub bits: u32,
    /// ntime the job was created with.
    pub ntime: u32,
    /// Network target from nBits.
    pub network_target: Target,
    /// Network difficulty.
    pub network_diff: Difficulty,
    /// Coinbase bytes before extranonce1 (the same for every user).
    pub coinb1: Vec<u8>,
    /// Coinbase bytes after extranonce2 for the pool's payout (empty in solo mode).
    pub coinb2: Vec<u8>,
    /// Merkle branch for the coinbase.
    pub branch: Vec<[u8; 32]>,
    /// Whether miners must drop older work (a new block).
    pub clean: bool,
    /// When the job was made.
    pub created: Instant,
    /// The `mining.notify` line as broadcast (pool mode; solo mode builds per user).
    pub notify: Arc<[u8]>,
    /// The same line with clean=true, for a miner's first job.
    pub notify_clean: Arc<[u8]>,
    /// Share hashes seen, for duplicate detection.
    seen: Seen,
    /// Pieces of the notify line around coinb2, for solo mode's per-user lines.
    notify_prefix: String,
    notify_suffix: String,
    notify_suffix_clean: String,
    coinbase_extra: [u8; 8],
}

/// Why a job could not be built.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    /// The coinbase could not be built.
    #[error(transparent)]
    Coinbase(#[from] coinbase::CoinbaseError),
}

/// What a coinbase needs besides the template.
#[derive(Debug, Clone)]
pub struct CoinbaseConfig {
    /// Pool tag.
    pub tag: Vec<u8>,
    /// Operator signature.
    pub btcsig: Vec<u8>,
    /// extranonce1 length.
    pub nonce1_len: usize,
    /// extranonce2 length.
    pub nonce2_len: usize,
    /// Donation: share in percent and the script paid.
    pub donation: Option<(f64, Vec<u8>)>,
}

impl Job {
    /// Builds a job. `payout` is the pool's script in pool mode, `None` in solo mode.
    pub fn build(
        id: u64,
        template: Arc<Template>,
        clean: bool,
        payout: Option<&[u8]>,
        cfg: &CoinbaseConfig,
        now: Instant,
    ) -> Result<Self, JobError> {
        let network_target = Target::from_compact(template.bits);
        let extra = id.to_le_bytes();
        // In solo mode coinb1 is built with a placeholder output; it does not depend on outputs.
        let placeholder = [0x51u8];
        let cb = build_coinbase(&template, cfg, &extra, payout.unwrap_or(&placeholder))?;
        let txids: Vec<[u8; 32]> = template.transactions.iter().map(|t| t.txid).collect();
        let branch = merkle::merkle_branch(&txids);
        let id_hex = format!("{id:016x}");
        let mut prefix = String::with_capacity(512);
        prefix.push_str("{\"params\":[\"");
        prefix.push_str(&id_hex);
        prefix.push_str("\",\"");
        prefix.push_str(&stratum_prevhash(&template.prev_hash));
        prefix.push_str("\",\"");
        prefix.push_str(&hex::encode(&cb.coinb1));
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
            template.version, template.bits, template.curtime
        );
        let tail = "],\"id\":null,\"method\":\"mining.notify\"}\n";
        let suffix_clean = format!("{suffix}true{tail}");
        let suffix = format!("{suffix}{clean}{tail}");
        let coinb2 = if payout.is_some() {
            cb.coinb2
        } else {
            Vec::new()
        };
        let coinb2_hex = hex::encode(&coinb2);
        let notify: Arc<[u8]> = format!("{prefix}{coinb2_hex}{suffix}").into_bytes().into();
        let notify_clean: Arc<[u8]> = format!("{prefix}{coinb2_hex}{suffix_clean}")
            .into_bytes()
            .into();
        Ok(Self {
            id,
            id_hex,
            version: template.version,
            bits: template.bits,
            ntime: template.curtime,
            network_target,
            network_diff: network_target.difficulty(),
            coinb1: cb.coinb1,
            coinb2,
            branch,
            clean,
            created: now,
            notify,
            notify_clean,
            seen: Seen::default(),
            notify_prefix: prefix,
            notify_suffix: suffix,
            notify_suffix_clean: suffix_clean,
            coinbase_extra: extra,
            template,
        })
    }

    /// coinb2 paying `script` (solo mode), with the same coinb1 as the job's.
    pub fn coinb2_for(&self, script: &[u8], cfg: &CoinbaseConfig) -> Result<Vec<u8>, JobError> {
        Ok(build_coinbase(&self.template, cfg, &self.coinbase_extra, script)?.coinb2)
    }

    /// A `mining.notify` line carrying `coinb2` (solo mode).
    pub fn notify_with(&self, coinb2: &[u8], clean: bool) -> Arc<[u8]> {
        let suffix = if clean {
            &self.notify_suffix_clean
        } else {
            &self.notify_suffix
        };
        let mut s =
            String::with_capacity(self.notify_prefix.len() + coinb2.len() * 2 + suffix.len());
        s.push_str(&self.notify_prefix);
        s.push_str(&hex::encode(coinb2));
        s.push_str(suffix);
        s.into_bytes().into()
    }

    /// Records a share hash; false when it was seen before.
    pub fn first_sighting(&self, hash: &[u8; 32]) -> bool {
        self.seen.first_sighting(hash)
    }

    /// Height of the block this job builds.
    pub fn height(&self) -> u64 {
        self.template.height
    }
}

fn build_coinbase(
    template: &Template,
    cfg: &CoinbaseConfig,
    extra: &[u8],
    payout: &[u8],
) -> Result<coinbase::Coinbase, JobError> {
    let mut outputs = Vec::with_capacity(2);
    let mut value = template.coinbase_value;
    if let Some((pct, script)) = &cfg.donation {
        // Integer maths on satoshis; the percentage has at most one decimal that matters.
        let per_mille = (pct * 10.0).round() as u64;
        let donation = template.coinbase_value.saturating_mul(per_mille) / 1000;
        if donation > 0 {
            value -= donation;
            outputs.push(TxOutput {
                value,
                script: payout.to_vec(),
            });
            outputs.push(TxOutput {
                value: donation,
                script: script.clone(),
            });
        }
    }
    if outputs.is_empty() {
        outputs.push(TxOutput {
            value,
            script: payout.to_vec(),
        });
    }
    let spec = CoinbaseSpec {
        height: template.height,
        flags: &template.coinbase_flags,
        extra,
        nonce1_len: cfg.nonce1_len,
        nonce2_len: cfg.nonce2_len,
        tag: &cfg.tag,
        btcsig: &cfg.btcsig,
        outputs: &outputs,
        witness_commitment: template.default_witness_commitment.as_deref(),
    };
    Ok(coinbase::build(&spec)?)
}

/// The previous-block hash in stratum's form: internal byte order with each 4-byte word reversed.
pub fn stratum_prevhash(prev: &[u8; 32]) -> String {
    let mut b = *prev;
    for w in b.chunks_exact_mut(4) {
        w.reverse();
    }
    hex::encode(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prevhash_word_swap() {
        // RPC order 00000000 00000000 ... ab: internal order reverses it; the stratum form
        // reverses each word of the internal order, so it ends in the zero words.
        let rpc = "000000000000000000049c5a7e1d2e3f4a5b6c7d8e9fa0b1c2d3e4f5a6b7c8d9";
        let internal = common::template::parse_rpc_hash(rpc).unwrap();
        let s = stratum_prevhash(&internal);
        assert!(s.ends_with("0000000000000000"), "{s}");
        assert_eq!(&s[..8], "a6b7c8d9");
    }
}
