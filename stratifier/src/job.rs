//! Jobs (ckpool's workbases): a template turned into the pieces stratum sends and checks against.

use std::collections::HashSet;
use std::fmt::Write as _;
use std::hash::BuildHasherDefault;
use std::sync::Arc;
use std::time::Instant;

use common::coinbase::{self, CoinbaseSpec, TxOutput};
use common::template::Template;
use common::{Difficulty, Target, merkle};
use parking_lot::Mutex;

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
    /// Share hashes seen, for duplicate detection: their first 8 bytes, which sha256d makes
    /// uniform (the zeros a share's hash needs are at the other end), used as their own hash.
    /// A false duplicate needs two shares of one job agreeing in 64 random bits.
    ///
    /// Split in [`SEEN_STRIPES`] sets by another byte of the hash: every connector thread
    /// checks shares of the current job, and one lock would be taken by all of them for every
    /// share, and held through each doubling of a set that reaches a million entries (a
    /// stall of milliseconds for every thread). Striped, two threads rarely meet, and each
    /// set grows in steps 64 times smaller.
    seen: Box<[SeenStripe]>,
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
            seen: new_seen(),
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
        first_sighting(&self.seen, hash)
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

    fn hash_of(i: u64) -> [u8; 32] {
        common::hash::sha256d(&i.to_le_bytes())
    }

    #[test]
    fn duplicates_are_found_across_stripes_and_threads() {
        let seen = new_seen();
        // Two threads sight the same 20,000 hashes: each hash is new to exactly one of them.
        let firsts: usize = std::thread::scope(|scope| {
            let workers: Vec<_> = (0..2)
                .map(|_| {
                    scope.spawn(|| {
                        (0..20_000u64)
                            .filter(|&i| first_sighting(&seen, &hash_of(i)))
                            .count()
                    })
                })
                .collect();
            workers.into_iter().map(|w| w.join().unwrap()).sum()
        });
        assert_eq!(firsts, 20_000);
        assert!(!first_sighting(&seen, &hash_of(7)));
        assert!(first_sighting(&seen, &hash_of(20_000)));
        // Every stripe got some of them.
        assert!(seen.iter().all(|s| !s.0.lock().is_empty()));
    }
}

/// A [`Hasher`](std::hash::Hasher) for keys that are already uniformly random `u64`s.
#[derive(Default)]
struct PrehashedU64(u64);

/// Number of duplicate-detection sets per job.
const SEEN_STRIPES: usize = 64;

/// One duplicate-detection set, on its own cache line so stripes used by different threads do
/// not share one (4 KiB per job for the 64).
#[derive(Debug, Default)]
#[repr(align(64))]
struct SeenStripe(Mutex<HashSet<u64, BuildHasherDefault<PrehashedU64>>>);

fn new_seen() -> Box<[SeenStripe]> {
    (0..SEEN_STRIPES).map(|_| SeenStripe::default()).collect()
}

/// Records `hash` in `seen`; false when it was there already.
fn first_sighting(seen: &[SeenStripe], hash: &[u8; 32]) -> bool {
    let mut low = [0u8; 8];
    low.copy_from_slice(hash.get(..8).unwrap_or(&[0; 8]));
    // A byte the key does not contain picks the stripe, so each set's keys keep all their bits
    // (the set uses the key as its own hash).
    let stripe = usize::from(hash.get(8).copied().unwrap_or(0)) % SEEN_STRIPES;
    seen.get(stripe)
        .is_none_or(|s| s.0.lock().insert(u64::from_le_bytes(low)))
}

impl std::hash::Hasher for PrehashedU64 {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        // Only `write_u64` is used by `HashSet<u64>`; fold anything else in so it still works.
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}
