//! Jobs (ckpool's workbases): work from a source turned into the pieces stratum sends and checks
//! against. A job is built from a plain description of its work ([`Work`]) and where it came
//! from ([`Origin`]): a bitcoind template, an upstream pool's `mining.notify`, or a parent pool's
//! workinfo.

use std::sync::Arc;
use std::time::Instant;

use common::coinbase::{self, CoinbaseSpec, TxOutput};
use common::stratum::write;
use common::template::{Template, TemplateTx};
use common::{Difficulty, Target, merkle};

use crate::handover::{HandoverError, Reader, Writer};
use crate::seen::Seen;

/// A work source: the index of its job book in the pool. Source 0 is the pool's own
/// (bitcoind templates, [`crate::Pool::new_template`]); others are added with
/// [`crate::Pool::add_source`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct SourceId(pub u16);

impl SourceId {
    /// The pool's own source: bitcoind templates.
    pub const TEMPLATE: Self = Self(0);

    pub(crate) fn index(self) -> usize {
        usize::from(self.0)
    }
}

/// Where a job's work came from.
#[derive(Debug, Clone)]
pub enum Origin {
    /// A bitcoind block template (pool and solo modes).
    Template(Arc<Template>),
    /// An upstream pool's `mining.notify` (proxy modes): its job id there. The upstream pool
    /// has the transactions; a block found on it is the upstream's to submit.
    Upstream {
        /// The upstream's job id, to submit shares there under.
        job_id: String,
    },
    /// A parent pool's workinfo (node mode), with the transactions to build a block from.
    Parent {
        /// The parent's workinfo id.
        workinfo_id: u64,
        /// The block's transactions after the coinbase.
        transactions: Arc<[TemplateTx]>,
        /// Whether the coinbase carries a witness commitment (the block is serialised with
        /// the coinbase witness).
        witness: bool,
    },
}

/// The work of one job in plain terms: what a `mining.notify` carries, and where it came from.
#[derive(Debug, Clone)]
pub struct Work {
    /// Its origin.
    pub origin: Origin,
    /// Previous block hash, internal byte order.
    pub prev_hash: [u8; 32],
    /// Coinbase bytes before extranonce1.
    pub coinb1: Vec<u8>,
    /// Coinbase bytes after extranonce2.
    pub coinb2: Vec<u8>,
    /// Merkle branch of the coinbase.
    pub branch: Vec<[u8; 32]>,
    /// Block version (without rolled bits).
    pub version: u32,
    /// nBits.
    pub bits: u32,
    /// ntime.
    pub ntime: u32,
    /// Whether miners must drop older work.
    pub clean: bool,
    /// Height of the block it builds (0 when unknown).
    pub height: u64,
}

impl Work {
    /// Upstream work from the parameters of an upstream pool's `mining.notify`: job id,
    /// previous hash (stratum's word-swapped form), coinb1, coinb2, merkle branch, version,
    /// nBits, ntime, clean. `None` if any is missing or malformed. The height is read from the
    /// coinbase's BIP34 push when there is one (0 otherwise).
    pub fn from_notify(params: &[serde_json::Value]) -> Option<Self> {
        let [
            job_id,
            prev,
            coinb1,
            coinb2,
            branch,
            version,
            bits,
            ntime,
            clean,
            ..,
        ] = params
        else {
            return None;
        };
        let hex32 = |v: &serde_json::Value| -> Option<[u8; 32]> {
            let mut b = [0u8; 32];
            hex::decode_to_slice(v.as_str()?, &mut b).ok()?;
            Some(b)
        };
        let word = |v: &serde_json::Value| common::stratum::hex_u32(v.as_str()?);
        let coinb1 = hex::decode(coinb1.as_str()?).ok()?;
        Some(Self {
            origin: Origin::Upstream {
                job_id: job_id.as_str()?.to_owned(),
            },
            prev_hash: prevhash_from_stratum(prev.as_str()?)?,
            height: bip34_height(&coinb1).unwrap_or(0),
            coinb1,
            coinb2: hex::decode(coinb2.as_str()?).ok()?,
            branch: branch
                .as_array()?
                .iter()
                .map(hex32)
                .collect::<Option<Vec<_>>>()?,
            version: word(version)?,
            bits: word(bits)?,
            ntime: word(ntime)?,
            clean: clean.as_bool()?,
        })
    }
}

/// The height a coinbase's script starts with (BIP34), from coinb1: version (4), one input
/// (1), its outpoint (36), the script length (1 byte: coinbase scripts are under 253 bytes),
/// then a push of the height.
fn bip34_height(coinb1: &[u8]) -> Option<u64> {
    let script = coinb1.get(42..)?;
    let (&n, rest) = script.split_first()?;
    // OP_0 and OP_1..OP_16 for the lowest heights, as Core writes them.
    match n {
        0x00 => return Some(0),
        0x51..=0x60 => return Some(u64::from(n - 0x50)),
        _ => {}
    }
    let n = usize::from(n);
    if !(1..=8).contains(&n) {
        return None;
    }
    let bytes = rest.get(..n)?;
    let mut le = [0u8; 8];
    le.get_mut(..n)?.copy_from_slice(bytes);
    Some(u64::from_le_bytes(le))
}

/// How the extranonce of a source's miners is laid out: `extranonce1 = prefix ‖ local part`,
/// then `extranonce2` of `nonce2_len` bytes. The prefix is what the upstream gave (empty for
/// the pool's own source); the local part tells the source's miners apart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExtranonceLayout {
    prefix: Vec<u8>,
    local_len: usize,
    nonce2_len: usize,
}

/// Why an extranonce layout is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LayoutError {
    /// The prefix is longer than [`ExtranonceLayout::MAX_PREFIX`].
    #[error("extranonce1 prefix of {0} bytes (at most 15)")]
    Prefix(usize),
    /// The local part is not 1 to 8 bytes.
    #[error("local extranonce1 part of {0} bytes (1 to 8)")]
    Local(usize),
    /// extranonce2 is not 1 to [`ExtranonceLayout::MAX_NONCE2`] bytes.
    #[error("extranonce2 of {0} bytes (1 to 16)")]
    Nonce2(usize),
}

impl ExtranonceLayout {
    /// The longest upstream prefix taken.
    pub const MAX_PREFIX: usize = 15;
    /// The longest extranonce2.
    pub const MAX_NONCE2: usize = 16;

    /// A layout: `prefix` (at most 15 bytes), a local part of `local_len` bytes (1 to 8), and
    /// `nonce2_len` bytes of extranonce2 for the miners (1 to 16).
    pub fn new(prefix: &[u8], local_len: usize, nonce2_len: usize) -> Result<Self, LayoutError> {
        if prefix.len() > Self::MAX_PREFIX {
            return Err(LayoutError::Prefix(prefix.len()));
        }
        if !(1..=8).contains(&local_len) {
            return Err(LayoutError::Local(local_len));
        }
        if !(1..=Self::MAX_NONCE2).contains(&nonce2_len) {
            return Err(LayoutError::Nonce2(nonce2_len));
        }
        Ok(Self {
            prefix: prefix.to_vec(),
            local_len,
            nonce2_len,
        })
    }

    /// The pool's own layout: no prefix, `nonce1_len` local bytes (at most 8 are used) and
    /// `nonce2_len` bytes of extranonce2, as the coinbase config says.
    pub(crate) fn own(cfg: &CoinbaseConfig) -> Self {
        Self {
            prefix: Vec::new(),
            local_len: cfg.nonce1_len.min(8),
            nonce2_len: cfg.nonce2_len,
        }
    }

    /// The prefix.
    pub fn prefix(&self) -> &[u8] {
        &self.prefix
    }

    /// Bytes of the local part.
    pub fn local_len(&self) -> usize {
        self.local_len
    }

    /// Bytes of extranonce2.
    pub fn nonce2_len(&self) -> usize {
        self.nonce2_len
    }

    /// Bytes of extranonce1 (prefix and local part).
    pub fn nonce1_len(&self) -> usize {
        self.prefix.len() + self.local_len
    }

    /// The extranonce1 of local number `local`: the prefix, then the low `local_len` bytes of
    /// `local`, big-endian. On the stack: the share path calls it for every share.
    pub(crate) fn enonce1(&self, local: u64) -> Enonce1 {
        let mut bytes = [0u8; 24];
        let p = self.prefix.len();
        let n = p + self.local_len;
        if let (Some(dst), Some(lo)) = (
            bytes.get_mut(..n),
            local.to_be_bytes().get(8 - self.local_len..),
        ) {
            let (head, tail) = dst.split_at_mut(p);
            head.copy_from_slice(&self.prefix);
            tail.copy_from_slice(lo);
        }
        Enonce1 {
            bytes,
            len: u8::try_from(n).unwrap_or(0),
        }
    }
}

/// The extranonce1 bytes a miner sees, on the stack.
#[derive(Clone, Copy)]
pub(crate) struct Enonce1 {
    bytes: [u8; 24],
    len: u8,
}

impl AsRef<[u8]> for Enonce1 {
    fn as_ref(&self) -> &[u8] {
        self.bytes.get(..usize::from(self.len)).unwrap_or(&[])
    }
}

/// One job sent to miners.
#[derive(Debug)]
pub struct Job {
    /// Job id (sent as 16 hex digits).
    pub id: u64,
    /// The job id as sent.
    pub id_hex: String,
    /// The source whose book holds it.
    pub source: SourceId,
    /// Where its work came from.
    pub origin: Origin,
    /// Previous block hash, internal byte order.
    pub prev_hash: [u8; 32],
    /// Block version (never with rolled bits).
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
    height: u64,
    /// Share hashes seen, for duplicate detection.
    seen: Seen,
    /// Pieces of the notify line around coinb2, for solo mode's per-user lines.
    notify_prefix: Vec<u8>,
    notify_suffix: Vec<u8>,
    notify_suffix_clean: Vec<u8>,
    coinbase_extra: [u8; 8],
}

/// Why a job could not be built.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    /// The coinbase could not be built.
    #[error(transparent)]
    Coinbase(#[from] coinbase::CoinbaseError),
    /// Only a template job can pay another script (solo mode).
    #[error("not a template job: its coinbase cannot be rebuilt")]
    NotATemplate,
    /// No such work source.
    #[error("no work source {0}")]
    NoSource(u16),
    /// Every source id is taken (65,536 sources).
    #[error("too many work sources")]
    TooManySources,
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
    /// Builds a job of the pool's own source from a template. `payout` is the pool's script in
    /// pool mode, `None` in solo mode.
    pub fn build(
        id: u64,
        template: Arc<Template>,
        clean: bool,
        payout: Option<&[u8]>,
        cfg: &CoinbaseConfig,
        now: Instant,
    ) -> Result<Self, JobError> {
        let extra = id.to_le_bytes();
        // In solo mode coinb1 is built with a placeholder output; it does not depend on outputs.
        let placeholder = [0x51u8];
        let cb = build_coinbase(&template, cfg, &extra, payout.unwrap_or(&placeholder))?;
        let txids: Vec<[u8; 32]> = template.transactions.iter().map(|t| t.txid).collect();
        let work = Work {
            prev_hash: template.prev_hash,
            coinb1: cb.coinb1,
            coinb2: if payout.is_some() {
                cb.coinb2
            } else {
                Vec::new()
            },
            branch: merkle::merkle_branch(&txids),
            version: template.version,
            bits: template.bits,
            ntime: template.curtime,
            clean,
            height: template.height,
            origin: Origin::Template(template),
        };
        let mut job = Self::from_work(id, SourceId::TEMPLATE, work, now);
        job.coinbase_extra = extra;
        Ok(job)
    }

    /// Builds a job of `source` from `work` as given.
    pub fn from_work(id: u64, source: SourceId, work: Work, now: Instant) -> Self {
        let network_target = Target::from_compact(work.bits);
        let id_hex = format!("{id:016x}");
        // Every line goes through the stratum codec's writers: the prefix up to coinb2, then
        // coinb2, then the tail (once as sent, once with clean=true for a miner's first job).
        let mut prefix = Vec::with_capacity(512);
        write::notify_prefix(&mut prefix, &id_hex, &work.prev_hash, &work.coinb1);
        let tail = |clean| {
            let mut t = Vec::with_capacity(128 + work.branch.len() * 67);
            write::notify_suffix(
                &mut t,
                &work.branch,
                work.version,
                work.bits,
                work.ntime,
                clean,
            );
            t
        };
        let (suffix, suffix_clean) = (tail(work.clean), tail(true));
        let line = |suffix: &[u8]| -> Arc<[u8]> {
            let mut l = Vec::with_capacity(prefix.len() + work.coinb2.len() * 2 + suffix.len());
            l.extend_from_slice(&prefix);
            write::write_hex(&mut l, &work.coinb2);
            l.extend_from_slice(suffix);
            l.into()
        };
        let notify = line(&suffix);
        let notify_clean = line(&suffix_clean);
        Self {
            id,
            id_hex,
            source,
            prev_hash: work.prev_hash,
            version: work.version,
            bits: work.bits,
            ntime: work.ntime,
            network_target,
            network_diff: network_target.difficulty(),
            coinb1: work.coinb1,
            coinb2: work.coinb2,
            branch: work.branch,
            clean: work.clean,
            created: now,
            notify,
            notify_clean,
            height: work.height,
            seen: Seen::default(),
            notify_prefix: prefix,
            notify_suffix: suffix,
            notify_suffix_clean: suffix_clean,
            coinbase_extra: [0; 8],
            origin: work.origin,
        }
    }

    /// The template it was built from, for a template job.
    pub fn template(&self) -> Option<&Arc<Template>> {
        match &self.origin {
            Origin::Template(t) => Some(t),
            Origin::Upstream { .. } | Origin::Parent { .. } => None,
        }
    }

    /// The block's transactions after the coinbase, when known (not for upstream work).
    pub fn transactions(&self) -> &[TemplateTx] {
        match &self.origin {
            Origin::Template(t) => &t.transactions,
            Origin::Parent { transactions, .. } => transactions,
            Origin::Upstream { .. } => &[],
        }
    }

    /// Whether a block can be assembled from a solution (the transactions are known).
    pub fn can_assemble(&self) -> bool {
        !matches!(self.origin, Origin::Upstream { .. })
    }

    /// Whether the block is serialised with the coinbase witness.
    pub(crate) fn has_witness_commitment(&self) -> bool {
        match &self.origin {
            Origin::Template(t) => t.has_witness_commitment(),
            Origin::Parent { witness, .. } => *witness,
            Origin::Upstream { .. } => false,
        }
    }

    /// coinb2 paying `script` (solo mode), with the same coinb1 as the job's.
    pub fn coinb2_for(&self, script: &[u8], cfg: &CoinbaseConfig) -> Result<Vec<u8>, JobError> {
        let t = self.template().ok_or(JobError::NotATemplate)?;
        Ok(build_coinbase(t, cfg, &self.coinbase_extra, script)?.coinb2)
    }

    /// A `mining.notify` line carrying `coinb2` (solo mode).
    pub fn notify_with(&self, coinb2: &[u8], clean: bool) -> Arc<[u8]> {
        let suffix = if clean {
            &self.notify_suffix_clean
        } else {
            &self.notify_suffix
        };
        let mut l = Vec::with_capacity(self.notify_prefix.len() + coinb2.len() * 2 + suffix.len());
        l.extend_from_slice(&self.notify_prefix);
        write::write_hex(&mut l, coinb2);
        l.extend_from_slice(suffix);
        l.into()
    }

    /// Records a share hash; false when it was seen before.
    pub fn first_sighting(&self, hash: &[u8; 32]) -> bool {
        self.seen.first_sighting(hash)
    }

    /// Compacts the job's duplicate set once a newer job exists ([`Seen::seal`]): off the
    /// share path, it sorts every key. Duplicates are still found.
    pub(crate) fn seal_seen(&self) {
        self.seen.seal();
    }

    /// Packs the keys waiting in the job's duplicate hash sets when they are many
    /// ([`Seen::pack_if_due`]): off the share path, every few seconds.
    pub(crate) fn pack_seen_if_due(&self) -> bool {
        self.seen.pack_if_due()
    }

    /// Whether [`Job::seal_seen`] was called.
    pub(crate) fn seen_sealed(&self) -> bool {
        self.seen.is_sealed()
    }

    /// Height of the block this job builds (0 when unknown).
    pub fn height(&self) -> u64 {
        self.height
    }

    /// Writes the job for a handover: its id, its work and origin, its age before `now` and
    /// the share hashes it has seen.
    pub(crate) fn save(&self, w: &mut Writer, now: Instant) {
        w.u64(self.id);
        w.u16(self.source.0);
        save_origin(w, &self.origin);
        w.array(&self.prev_hash);
        w.bytes(&self.coinb1);
        w.bytes(&self.coinb2);
        w.len(self.branch.len());
        for b in &self.branch {
            w.array(b);
        }
        w.u32(self.version);
        w.u32(self.bits);
        w.u32(self.ntime);
        w.bool(self.clean);
        w.u64(self.height);
        w.age(self.created, now);
        w.array(&self.coinbase_extra);
        let keys = self.seen.keys();
        w.len(keys.len());
        for (stripe, key) in keys {
            w.u8(stripe);
            w.u64(key);
        }
    }

    /// Rebuilds a job [`Job::save`] wrote, with the same id, lines and duplicate set.
    pub(crate) fn load(r: &mut Reader<'_>, now: Instant) -> Result<Self, HandoverError> {
        let id = r.u64()?;
        let source = SourceId(r.u16()?);
        let origin = load_origin(r)?;
        let prev_hash = r.array()?;
        let coinb1 = r.bytes()?.to_vec();
        let coinb2 = r.bytes()?.to_vec();
        let n = r.count(32)?;
        let mut branch = Vec::with_capacity(n);
        for _ in 0..n {
            branch.push(r.array()?);
        }
        let work = Work {
            origin,
            prev_hash,
            coinb1,
            coinb2,
            branch,
            version: r.u32()?,
            bits: r.u32()?,
            ntime: r.u32()?,
            clean: r.bool("clean")?,
            height: r.u64()?,
        };
        let created = r.age(now)?;
        let mut job = Self::from_work(id, source, work, created);
        job.coinbase_extra = r.array()?;
        let n = r.count(9)?;
        for _ in 0..n {
            let (stripe, key) = (r.u8()?, r.u64()?);
            if !job.seen.insert_key(stripe, key) {
                return Err(HandoverError::Malformed("duplicate set"));
            }
        }
        Ok(job)
    }
}

fn save_txs(w: &mut Writer, txs: &[TemplateTx]) {
    w.len(txs.len());
    for t in txs {
        w.bytes(&t.data);
        w.array(&t.txid);
        w.array(&t.wtxid);
    }
}

fn load_txs(r: &mut Reader<'_>) -> Result<Vec<TemplateTx>, HandoverError> {
    let n = r.count(68)?;
    let mut txs = Vec::with_capacity(n);
    for _ in 0..n {
        txs.push(TemplateTx {
            data: r.bytes()?.to_vec(),
            txid: r.array()?,
            wtxid: r.array()?,
        });
    }
    Ok(txs)
}

fn save_origin(w: &mut Writer, origin: &Origin) {
    match origin {
        Origin::Template(t) => {
            w.u8(0);
            w.u32(t.version);
            w.array(&t.prev_hash);
            w.u32(t.bits);
            w.u32(t.curtime);
            w.u64(t.height);
            w.u64(t.coinbase_value);
            w.bytes(&t.coinbase_flags);
            save_txs(w, &t.transactions);
            match &t.default_witness_commitment {
                None => w.u8(0),
                Some(c) => {
                    w.u8(1);
                    w.bytes(c);
                }
            }
            w.len(t.rules.len());
            for rule in &t.rules {
                w.str(rule);
            }
        }
        Origin::Upstream { job_id } => {
            w.u8(1);
            w.str(job_id);
        }
        Origin::Parent {
            workinfo_id,
            transactions,
            witness,
        } => {
            w.u8(2);
            w.u64(*workinfo_id);
            save_txs(w, transactions);
            w.bool(*witness);
        }
    }
}

fn load_origin(r: &mut Reader<'_>) -> Result<Origin, HandoverError> {
    Ok(match r.u8()? {
        0 => {
            let version = r.u32()?;
            let prev_hash = r.array()?;
            let bits = r.u32()?;
            let curtime = r.u32()?;
            let height = r.u64()?;
            let coinbase_value = r.u64()?;
            let coinbase_flags = r.bytes()?.to_vec();
            let transactions = load_txs(r)?;
            let default_witness_commitment = if r.bool("witness commitment")? {
                Some(r.bytes()?.to_vec())
            } else {
                None
            };
            let n = r.count(4)?;
            let mut rules = Vec::with_capacity(n);
            for _ in 0..n {
                rules.push(r.str("rule")?.to_owned());
            }
            Origin::Template(Arc::new(Template {
                version,
                prev_hash,
                bits,
                curtime,
                height,
                coinbase_value,
                coinbase_flags,
                transactions,
                default_witness_commitment,
                rules,
            }))
        }
        1 => Origin::Upstream {
            job_id: r.str("upstream job id")?.to_owned(),
        },
        2 => Origin::Parent {
            workinfo_id: r.u64()?,
            transactions: load_txs(r)?.into(),
            witness: r.bool("witness")?,
        },
        _ => return Err(HandoverError::Malformed("job origin")),
    })
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

/// The previous-block hash from stratum's form (the inverse of [`stratum_prevhash`]).
pub fn prevhash_from_stratum(s: &str) -> Option<[u8; 32]> {
    let mut b = [0u8; 32];
    hex::decode_to_slice(s, &mut b).ok()?;
    for w in b.chunks_exact_mut(4) {
        w.reverse();
    }
    Some(b)
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
    fn extranonce_layouts_put_the_prefix_before_the_local_part() {
        let l = ExtranonceLayout::new(&[0xaa, 0xbb], 3, 6).unwrap();
        assert_eq!(
            l.enonce1(0x0102_0304).as_ref(),
            [0xaa, 0xbb, 0x02, 0x03, 0x04]
        );
        assert_eq!((l.nonce1_len(), l.nonce2_len(), l.local_len()), (5, 6, 3));
        let full = ExtranonceLayout::new(&[7; 15], 8, 16).unwrap();
        let en1 = full.enonce1(u64::MAX);
        assert_eq!(en1.as_ref().len(), 23);
        assert_eq!(
            en1.as_ref()[14..],
            [7, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]
        );
        assert_eq!(
            ExtranonceLayout::new(&[0; 16], 2, 4),
            Err(LayoutError::Prefix(16))
        );
        assert_eq!(ExtranonceLayout::new(&[], 0, 4), Err(LayoutError::Local(0)));
        assert_eq!(ExtranonceLayout::new(&[], 9, 4), Err(LayoutError::Local(9)));
        assert_eq!(
            ExtranonceLayout::new(&[], 4, 0),
            Err(LayoutError::Nonce2(0))
        );
        assert_eq!(
            ExtranonceLayout::new(&[], 4, 17),
            Err(LayoutError::Nonce2(17))
        );
        // The pool's own: the low nonce1_len bytes, as before sources existed.
        let own = ExtranonceLayout::own(&CoinbaseConfig {
            tag: Vec::new(),
            btcsig: Vec::new(),
            nonce1_len: 4,
            nonce2_len: 8,
            donation: None,
        });
        assert_eq!(
            own.enonce1(0x1122_3344_5566_7788).as_ref(),
            [0x55, 0x66, 0x77, 0x88]
        );
    }

    #[test]
    fn upstream_work_from_a_notify_rebuilds_the_same_job() {
        // Our own notify, read back as an upstream's: the same work, notify for notify.
        let mut t = Template::empty([9; 32], 0x207f_ffff);
        t.height = 321;
        let cfg = CoinbaseConfig {
            tag: b"up".to_vec(),
            btcsig: Vec::new(),
            nonce1_len: 4,
            nonce2_len: 8,
            donation: None,
        };
        let now = Instant::now();
        let own = Job::build(0x77, Arc::new(t), true, Some(&[0x51]), &cfg, now).unwrap();
        let line: serde_json::Value = serde_json::from_slice(&own.notify).unwrap();
        let params = line["params"].as_array().unwrap();
        let work = Work::from_notify(params).unwrap();
        assert!(matches!(&work.origin, Origin::Upstream { job_id } if job_id == &own.id_hex));
        assert_eq!(work.prev_hash, own.prev_hash);
        assert_eq!(work.height, 321, "from the coinbase's BIP34 push");
        let again = Job::from_work(0x77, SourceId(1), work, now);
        assert_eq!(again.notify, own.notify);
        assert_eq!((&again.coinb1, &again.coinb2), (&own.coinb1, &own.coinb2));
        assert!(!again.can_assemble() && again.transactions().is_empty());
        // Malformed: a short list, a bad hash, a non-boolean clean.
        assert!(Work::from_notify(&params[..8]).is_none());
        let mut bad = params.clone();
        bad[1] = "00".into();
        assert!(Work::from_notify(&bad).is_none());
        let mut bad = params.clone();
        bad[8] = "yes".into();
        assert!(Work::from_notify(&bad).is_none());
        assert_eq!(
            prevhash_from_stratum(&stratum_prevhash(&[3; 32])),
            Some([3; 32])
        );
        // The height push, every form Core writes.
        for h in [0u64, 1, 16, 17, 255, 256, 70_000, 900_000] {
            let mut cb = vec![0u8; 42];
            cb.extend(common::coinbase::bip34_height(h));
            cb.extend([0xff; 8]);
            assert_eq!(bip34_height(&cb), Some(h), "{h}");
        }
    }

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
