//! Node mode (`-N`, or the binary named `cknode`; ckpool.md §5.3): a passthrough
//! ([`super::passthrough`]) that connects upstream with `mining.node` and has a bitcoind of its
//! own (`btcd`).
//!
//! * Miners' lines go upstream exactly as in passthrough mode, and the pool's replies come back
//!   the same way: the pool judges every share and keeps the miners' difficulty.
//! * The pool's `transactions` and `workinfo` messages ([`common::stratum::node`]) rebuild its
//!   jobs here ([`Node::on_link`]): each job with its transactions, looked up by txid in what
//!   the pool has sent. New transactions go to our bitcoind with `sendrawtransaction` (on a
//!   thread of their own, so a slow node never holds the link up).
//! * Each miner's `mining.submit` is also checked here, on its connector thread, against the
//!   network target of its job ([`Node::on_submit`]): a block is assembled and handed at once
//!   to the generator's submitter, which writes it to disk (fsynced) before `submitblock` on
//!   our bitcoind, as in pool mode. The share still goes upstream.
//! * A `block` message from the pool (a block it found) is assembled the same way from its
//!   header and coinbase and submitted to our bitcoind too.
//! * Local statistics: shares seen, blocks found and submitted, and per worker the hashrate
//!   (1 and 5 minute moving averages) from the difficulty the pool set each miner, in the
//!   admin `stats` under `"node"`.
//! * Handover (`-H`, as a passthrough's): the jobs and transactions rebuilt, the miners'
//!   difficulties and the counters go with the link's state ([`Node::export_state`]); the
//!   bitcoind link does not (the new instance starts its own).

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::Context;
use common::Target;
use common::stratum::node::{self, BlockSolve, WorkInfo};
use common::template::TemplateTx;
use generator::rpc::{RpcAuth, RpcClient};
use generator::{BlockSubmission, BlockSubmitter, GenEvent, Generator};
use parking_lot::{Mutex, RwLock};
use serde_json::{Value, json};
use tracing::{debug, error, info, warn};

use crate::instance::Instance;
use crate::settings::{ConfigError, Settings};

/// Jobs kept (ckpool keeps about 10 minutes' worth).
const KEEP_JOBS: usize = 64;
/// Transactions kept that no kept job names any more, at most.
const KEEP_TXS: usize = 100_000;
/// Raw transactions waiting for `sendrawtransaction`, at most (more are dropped, logged).
const TX_QUEUE: usize = 4096;
/// Workers whose figures are kept, at most.
const MAX_WORKERS: usize = 10_000;
/// The witness commitment output's script prefix: a coinbase with it is serialised with its
/// witness in the block.
const WITNESS_PREFIX: [u8; 6] = [0x6a, 0x24, 0xaa, 0x21, 0xa9, 0xed];

/// One job of the pool, rebuilt.
struct Job {
    wi: WorkInfo,
    target: Target,
    /// Its transactions in block order; `None` when some were never sent (no block can be
    /// assembled from it).
    txs: Option<Vec<TemplateTx>>,
    witness: bool,
}

#[derive(Default)]
struct Jobs {
    by_id: HashMap<u64, Arc<Job>>,
    order: VecDeque<u64>,
    txs: HashMap<[u8; 32], TemplateTx>,
}

/// A moving average of difficulty per second over `window` seconds.
#[derive(Clone, Copy)]
struct Rate {
    per_sec: f64,
    at: Option<Instant>,
}

impl Rate {
    const NONE: Self = Self {
        per_sec: 0.0,
        at: None,
    };

    fn decayed(self, now: Instant, window: f64) -> f64 {
        let dt = self
            .at
            .map_or(0.0, |at| now.saturating_duration_since(at).as_secs_f64());
        self.per_sec * (-dt / window).exp()
    }

    fn add(&mut self, now: Instant, window: f64, diff: f64) {
        self.per_sec = self.decayed(now, window) + diff / window;
        self.at = Some(now);
    }
}

#[derive(Clone, Copy)]
struct WorkerStats {
    shares: u64,
    rate1m: Rate,
    rate5m: Rate,
    last: Instant,
}

/// Node mode's own state, shared by the connector threads (shares) and the router (the pool's
/// messages).
pub(crate) struct Node {
    jobs: RwLock<Jobs>,
    /// The difficulty the pool last set each miner (by client id).
    diffs: Mutex<HashMap<u32, f64>>,
    workers: Mutex<HashMap<String, WorkerStats>>,
    total: Mutex<(Rate, Rate)>,
    /// The version bits miners may roll (`version_mask`).
    mask: u32,
    submitter: BlockSubmitter,
    txq: crossbeam_channel::Sender<Vec<u8>>,
    shares: AtomicU64,
    unknown_job: AtomicU64,
    blocks_found: AtomicU64,
    block_messages: AtomicU64,
    workinfos: AtomicU64,
    incomplete_jobs: AtomicU64,
    txs_dropped: AtomicU64,
}

/// What [`Node::start`] runs besides the [`Node`]: stopped by [`Runtime::stop`].
pub(crate) struct Runtime {
    generator: Generator,
    threads: Vec<JoinHandle<()>>,
    stop: Arc<AtomicBool>,
}

impl Runtime {
    /// Stops the generator (queued blocks are still tried until its deadline, what is left
    /// stays on disk) and the node's threads.
    pub(crate) fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        self.generator.shutdown();
        for t in self.threads {
            if t.join().is_err() {
                error!("a node thread panicked");
            }
        }
    }
}

impl Node {
    /// Starts the generator on `btcd` (for its block submitter, with the block files under
    /// `logdir/blocks`) and the `sendrawtransaction` thread.
    pub(crate) fn start(settings: &Settings) -> anyhow::Result<(Arc<Self>, Runtime)> {
        let gcfg = settings.generator();
        let first =
            gcfg.btcd.first().cloned().ok_or_else(|| {
                anyhow::anyhow!("node mode needs a \"btcd\" entry (its bitcoind)")
            })?;
        let auth = match &first.cookie {
            Some(path) => RpcAuth::Cookie(path.clone()),
            None => RpcAuth::UserPass {
                user: first.auth.clone(),
                pass: first.pass.clone(),
            },
        };
        let rpc = RpcClient::new(&first.url, auth, Duration::from_secs(30))
            .context("the btcd entry for sendrawtransaction")?;
        let (gen_tx, gen_rx) = crossbeam_channel::unbounded();
        let generator = Generator::start(gcfg, gen_tx).context("starting the generator")?;
        let stop = Arc::new(AtomicBool::new(false));
        let events = std::thread::Builder::new()
            .name("node-gen".into())
            .spawn(move || {
                // Ends when the generator is shut down (its sender goes).
                for ev in gen_rx {
                    match ev {
                        GenEvent::BlockResult {
                            hash,
                            height,
                            accepted,
                            reason,
                        } => {
                            if accepted {
                                info!(%hash, height, "our bitcoind has the block");
                            } else {
                                warn!(%hash, height, reason = reason.as_deref().unwrap_or(""), "our bitcoind did not take the block");
                            }
                        }
                        GenEvent::ServerUp { index, url } => info!(index, url, "bitcoind active"),
                        GenEvent::NoServers => error!("CRITICAL: no bitcoinds active"),
                        GenEvent::Template { .. } => {}
                    }
                }
            })
            .context("starting the node-gen thread")?;
        let (txq, tx_rx) = crossbeam_channel::bounded::<Vec<u8>>(TX_QUEUE);
        let stop2 = Arc::clone(&stop);
        let sender = std::thread::Builder::new()
            .name("node-txs".into())
            .spawn(move || {
                while !stop2.load(Ordering::Relaxed) {
                    let Ok(raw) = tx_rx.recv_timeout(Duration::from_millis(200)) else {
                        continue;
                    };
                    match rpc.call("sendrawtransaction", json!([hex::encode(&raw)])) {
                        Ok(txid) => debug!(%txid, "transaction sent to our bitcoind"),
                        // Usually: already in its mempool or chain.
                        Err(e) => debug!(error = %e, "sendrawtransaction refused"),
                    }
                }
            })
            .context("starting the node-txs thread")?;
        let node = Arc::new(Self {
            jobs: RwLock::new(Jobs::default()),
            diffs: Mutex::new(HashMap::new()),
            workers: Mutex::new(HashMap::new()),
            total: Mutex::new((Rate::NONE, Rate::NONE)),
            mask: settings.file.version_mask,
            submitter: generator.block_submitter(),
            txq,
            shares: AtomicU64::new(0),
            unknown_job: AtomicU64::new(0),
            blocks_found: AtomicU64::new(0),
            block_messages: AtomicU64::new(0),
            workinfos: AtomicU64::new(0),
            incomplete_jobs: AtomicU64::new(0),
            txs_dropped: AtomicU64::new(0),
        });
        Ok((
            node,
            Runtime {
                generator,
                threads: vec![events, sender],
                stop,
            },
        ))
    }

    /// A message of the pool for the link itself: `transactions`, `workinfo` or `block`.
    pub(crate) fn on_link(&self, line: &[u8]) {
        let method = serde_json::from_slice::<Value>(line)
            .ok()
            .and_then(|v| v.get("node.method")?.as_str().map(str::to_owned));
        match method.as_deref() {
            Some(node::TRANSACTIONS) => match node::parse_transactions(line) {
                Ok(txs) => self.add_transactions(txs),
                Err(e) => warn!(error = %e, "unreadable transactions from the pool"),
            },
            Some(node::WORKINFO) => match WorkInfo::parse(line) {
                Ok(wi) => self.add_job(wi),
                Err(e) => warn!(error = %e, "unreadable workinfo from the pool"),
            },
            Some(node::BLOCK) => match BlockSolve::parse(line) {
                Ok(b) => {
                    self.block_messages.fetch_add(1, Ordering::Relaxed);
                    info!(jobid = b.jobid, worker = %b.name, "the pool found a block; submitting it to our bitcoind too");
                    self.submit(b.jobid, &b.header, &b.coinbase);
                }
                Err(e) => warn!(error = %e, "unreadable block message from the pool"),
            },
            other => debug!(
                method = other.unwrap_or(""),
                "link message from the pool ignored"
            ),
        }
    }

    fn add_transactions(&self, txs: Vec<TemplateTx>) {
        let mut jobs = self.jobs.write();
        for t in txs {
            if jobs.txs.contains_key(&t.txid) {
                continue;
            }
            if self.txq.try_send(t.data.clone()).is_err() {
                self.txs_dropped.fetch_add(1, Ordering::Relaxed);
            }
            jobs.txs.insert(t.txid, t);
        }
    }

    fn add_job(&self, wi: WorkInfo) {
        self.workinfos.fetch_add(1, Ordering::Relaxed);
        let mut jobs = self.jobs.write();
        let job = rebuild(wi, &jobs.txs);
        if job.txs.is_none() {
            self.incomplete_jobs.fetch_add(1, Ordering::Relaxed);
            warn!(
                jobid = job.wi.jobid,
                "the pool never sent some transactions of this job; a block on it cannot be built here"
            );
        }
        debug!(
            jobid = job.wi.jobid,
            height = job.wi.height,
            txs = job.wi.txids.len(),
            "job from the pool"
        );
        let id = job.wi.jobid;
        if jobs.by_id.insert(id, Arc::new(job)).is_none() {
            jobs.order.push_back(id);
        }
        while jobs.order.len() > KEEP_JOBS {
            if let Some(old) = jobs.order.pop_front() {
                jobs.by_id.remove(&old);
            }
        }
        // Forget transactions no kept job names once there are many.
        if jobs.txs.len() > KEEP_TXS {
            let named: std::collections::HashSet<[u8; 32]> = jobs
                .by_id
                .values()
                .flat_map(|j| j.wi.txids.iter().copied())
                .collect();
            jobs.txs.retain(|id, _| named.contains(id));
        }
    }

    /// What a handover carries of the node (`-H`, with the passthrough's state): every
    /// transaction the pool sent and is still kept, the kept jobs as the pool's `workinfo`
    /// lines (oldest first), each miner's difficulty and the counters. The per-worker hashrates
    /// are not carried (they start again).
    pub(crate) fn export_state(&self) -> Value {
        let jobs = self.jobs.read();
        let mut txs = Vec::new();
        node::write_transactions(&mut txs, jobs.txs.values());
        let workinfos: Vec<String> = jobs
            .order
            .iter()
            .filter_map(|id| jobs.by_id.get(id))
            .map(|j| {
                let mut o = Vec::new();
                j.wi.write(&mut o);
                String::from_utf8_lossy(&o).into_owned()
            })
            .collect();
        let diffs: Vec<Value> = self
            .diffs
            .lock()
            .iter()
            .map(|(c, d)| json!([c, d]))
            .collect();
        let n = |c: &AtomicU64| c.load(Ordering::Relaxed);
        json!({
            "transactions": String::from_utf8_lossy(&txs),
            "workinfos": workinfos,
            "diffs": diffs,
            "counters": [n(&self.shares), n(&self.unknown_job), n(&self.blocks_found),
                n(&self.block_messages), n(&self.workinfos), n(&self.incomplete_jobs),
                n(&self.txs_dropped)],
        })
    }

    /// Takes [`Node::export_state`] of the old instance, before any miner is served (the
    /// transactions are not sent to our bitcoind again).
    pub(crate) fn import_state(&self, v: &Value) -> Result<(), String> {
        let txs = v
            .get("transactions")
            .and_then(Value::as_str)
            .ok_or("no transactions")?;
        let txs = node::parse_transactions(txs.as_bytes()).map_err(|e| e.to_string())?;
        {
            let mut jobs = self.jobs.write();
            for t in txs {
                jobs.txs.entry(t.txid).or_insert(t);
            }
        }
        let workinfos = v
            .get("workinfos")
            .and_then(Value::as_array)
            .ok_or("no workinfos")?;
        for w in workinfos.iter().rev().take(KEEP_JOBS).rev() {
            let line = w.as_str().ok_or("bad workinfo")?;
            let wi = WorkInfo::parse(line.as_bytes()).map_err(|e| e.to_string())?;
            self.add_job(wi);
        }
        let diffs = v.get("diffs").and_then(Value::as_array).ok_or("no diffs")?;
        {
            let mut d = self.diffs.lock();
            for e in diffs {
                let c = e
                    .get(0)
                    .and_then(Value::as_u64)
                    .and_then(|c| u32::try_from(c).ok())
                    .ok_or("bad client id")?;
                let diff = e.get(1).and_then(Value::as_f64).ok_or("bad difficulty")?;
                d.insert(c, diff);
            }
        }
        let counters = v
            .get("counters")
            .and_then(Value::as_array)
            .ok_or("no counters")?;
        for (c, x) in [
            &self.shares,
            &self.unknown_job,
            &self.blocks_found,
            &self.block_messages,
            &self.workinfos,
            &self.incomplete_jobs,
            &self.txs_dropped,
        ]
        .into_iter()
        .zip(counters)
        {
            c.store(x.as_u64().ok_or("bad counter")?, Ordering::Relaxed);
        }
        Ok(())
    }

    /// A line the pool sent miner `client_id`: its difficulty is noted for the statistics.
    pub(crate) fn on_miner_downline(&self, client_id: u32, line: &[u8]) {
        if !contains(line, b"\"mining.set_difficulty\"") {
            return;
        }
        let diff = serde_json::from_slice::<Value>(line)
            .ok()
            .and_then(|v| v.get("params")?.get(0)?.as_f64());
        if let Some(d) = diff.filter(|d| d.is_finite() && *d > 0.0) {
            self.diffs.lock().insert(client_id, d);
        }
    }

    /// Miner `client_id` left.
    pub(crate) fn forget(&self, client_id: u32) {
        self.diffs.lock().remove(&client_id);
    }

    /// A line miner `client_id` sent (its extranonce1 as its subscribe reply gave it, hex): a
    /// submit is checked against its job's network target, and a block is submitted to our
    /// bitcoind at once.
    pub(crate) fn on_submit(
        &self,
        client_id: u32,
        enonce1: Option<&str>,
        line: &[u8],
        now: Instant,
    ) {
        if !contains(line, b"\"mining.submit\"") {
            return;
        }
        let Some(sub) = Submit::parse(line) else {
            return;
        };
        self.shares.fetch_add(1, Ordering::Relaxed);
        let diff = self.diffs.lock().get(&client_id).copied().unwrap_or(0.0);
        self.count(&sub.worker, diff, now);
        let Some(en1) = enonce1.and_then(|e| hex::decode(e).ok()) else {
            return;
        };
        let Some(job) = self.jobs.read().by_id.get(&sub.jobid).cloned() else {
            self.unknown_job.fetch_add(1, Ordering::Relaxed);
            return;
        };
        let wi = &job.wi;
        let coinbase = [&wi.coinb1[..], &en1, &sub.nonce2, &wi.coinb2].concat();
        let root =
            common::merkle::merkle_root_from_branch(&common::hash::sha256d(&coinbase), &wi.branch);
        let version = (wi.version & !self.mask) | (sub.version_bits & self.mask);
        let header =
            common::block::header(version, &wi.prev_hash, &root, sub.ntime, wi.bits, sub.nonce);
        let hash = common::hash::sha256d_header(&header);
        if job.target.is_met_by(&hash) {
            self.blocks_found.fetch_add(1, Ordering::Relaxed);
            info!(client_id, worker = %sub.worker, height = wi.height, hash = %common::template::rpc_hash_hex(&hash),
                "BLOCK SOLVED by a miner of this node; submitting to our bitcoind (the share goes upstream too)");
            self.submit_job(&job, &header, &coinbase);
        }
    }

    fn submit(&self, jobid: u64, header: &[u8; 80], coinbase: &[u8]) {
        let job = self.jobs.read().by_id.get(&jobid).cloned();
        match job {
            Some(job) => self.submit_job(&job, header, coinbase),
            None => warn!(
                jobid,
                "block on a job this node does not have; not submitted here"
            ),
        }
    }

    fn submit_job(&self, job: &Job, header: &[u8; 80], coinbase: &[u8]) {
        let Some(txs) = &job.txs else {
            warn!(
                jobid = job.wi.jobid,
                "block on a job with transactions missing here; not submitted here"
            );
            return;
        };
        let hash = common::hash::sha256d_header(header);
        let block = common::block::assemble(header, coinbase, job.witness, txs);
        self.submitter.submit(BlockSubmission {
            hash: common::template::rpc_hash_hex(&hash),
            height: job.wi.height,
            hex: hex::encode(block),
        });
    }

    fn count(&self, worker: &str, diff: f64, now: Instant) {
        {
            let mut t = self.total.lock();
            t.0.add(now, 60.0, diff);
            t.1.add(now, 300.0, diff);
        }
        let mut workers = self.workers.lock();
        if !workers.contains_key(worker) && workers.len() >= MAX_WORKERS {
            return;
        }
        let w = workers.entry(worker.to_owned()).or_insert(WorkerStats {
            shares: 0,
            rate1m: Rate::NONE,
            rate5m: Rate::NONE,
            last: now,
        });
        w.shares += 1;
        w.rate1m.add(now, 60.0, diff);
        w.rate5m.add(now, 300.0, diff);
        w.last = now;
    }

    /// The `"node"` member of the admin `stats`.
    pub(crate) fn stats_json(&self, now: Instant) -> Value {
        const H: f64 = 4_294_967_296.0;
        let (jobs, txs) = {
            let j = self.jobs.read();
            (j.by_id.len(), j.txs.len())
        };
        let (r1, r5) = *self.total.lock();
        let workers: serde_json::Map<String, Value> = self
            .workers
            .lock()
            .iter()
            .map(|(name, w)| {
                (
                    name.clone(),
                    json!({
                        "shares": w.shares,
                        "hashrate1m": w.rate1m.decayed(now, 60.0) * H,
                        "hashrate5m": w.rate5m.decayed(now, 300.0) * H,
                        "idle_secs": now.saturating_duration_since(w.last).as_secs(),
                    }),
                )
            })
            .collect();
        json!({
            "jobs": jobs,
            "transactions": txs,
            "workinfos": self.workinfos.load(Ordering::Relaxed),
            "incomplete_jobs": self.incomplete_jobs.load(Ordering::Relaxed),
            "shares": self.shares.load(Ordering::Relaxed),
            "unknown_job": self.unknown_job.load(Ordering::Relaxed),
            "blocks_found": self.blocks_found.load(Ordering::Relaxed),
            "block_messages": self.block_messages.load(Ordering::Relaxed),
            "txs_dropped": self.txs_dropped.load(Ordering::Relaxed),
            "hashrate1m": r1.decayed(now, 60.0) * H,
            "hashrate5m": r5.decayed(now, 300.0) * H,
            "workers": workers,
        })
    }
}

/// A job of the pool from its workinfo and the transactions sent so far (by txid).
fn rebuild(wi: WorkInfo, known: &HashMap<[u8; 32], TemplateTx>) -> Job {
    let txs: Option<Vec<TemplateTx>> = wi.txids.iter().map(|id| known.get(id).cloned()).collect();
    Job {
        target: Target::from_compact(wi.bits),
        witness: wi
            .coinb2
            .windows(WITNESS_PREFIX.len())
            .any(|w| w == WITNESS_PREFIX),
        txs,
        wi,
    }
}

/// The parts of a `mining.submit` a node checks.
struct Submit {
    worker: String,
    jobid: u64,
    nonce2: Vec<u8>,
    ntime: u32,
    nonce: u32,
    version_bits: u32,
}

impl Submit {
    fn parse(line: &[u8]) -> Option<Self> {
        let v: Value = serde_json::from_slice(line).ok()?;
        let p = v.get("params")?.as_array()?;
        let word = |i: usize| -> Option<u32> {
            let s = p.get(i)?.as_str()?;
            u32::from_str_radix(s.get(..8.min(s.len()))?, 16).ok()
        };
        Some(Self {
            worker: p.first()?.as_str()?.chars().take(128).collect(),
            jobid: u64::from_str_radix(p.get(1)?.as_str()?, 16).ok()?,
            nonce2: hex::decode(p.get(2)?.as_str()?).ok()?,
            ntime: word(3)?,
            nonce: word(4)?,
            version_bits: if p.len() > 5 { word(5).unwrap_or(0) } else { 0 },
        })
    }
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// Runs node mode until `shutdown` is set: the generator on our bitcoind, then the passthrough
/// link with the node's checks.
pub(crate) fn run(settings: &Settings, instance: &Instance) -> anyhow::Result<()> {
    if settings.file.proxy.is_empty() {
        return Err(ConfigError(
            "node mode needs at least one \"proxy\" entry (the pool's nodeserver address)".into(),
        )
        .into());
    }
    let (node, runtime) = Node::start(settings)?;
    let result = super::passthrough::run_link(
        settings,
        &instance.shutdown,
        Some(node),
        None,
        Some(instance),
    );
    runtime.stop();
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a real ckpool 0.9.9 pool sent its node (`common/tests/data`), rebuilt here: every
    /// transaction a workinfo names is found by its txid (ckpool sends wtxids as `hash`), the
    /// branch is theirs, and a block built on the job carries them after a witness coinbase.
    #[test]
    fn a_ckpool_pools_messages_rebuild_complete_jobs() {
        let capture = include_str!("../../common/tests/data/ckpool-0.9.9-node-link.jsonl");
        let lines: Vec<String> = capture
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|v| v["dir"] == "to_passthrough")
            .filter_map(|v| v["line"].as_str().map(str::to_owned))
            .collect();
        let mut known = HashMap::new();
        let mut jobs = 0;
        for line in &lines {
            if line.contains("\"node.method\":\"transactions\"") {
                for t in node::parse_transactions(line.as_bytes()).unwrap() {
                    known.insert(t.txid, t);
                }
            } else if line.contains("\"node.method\":\"workinfo\"") {
                let job = rebuild(WorkInfo::parse(line.as_bytes()).unwrap(), &known);
                let txs = job.txs.as_ref().expect("every transaction was sent");
                assert_eq!(txs.len(), 8);
                assert!(job.witness, "segwit transactions: a witness commitment");
                let ids: Vec<[u8; 32]> = txs.iter().map(|t| t.txid).collect();
                assert_eq!(common::merkle::merkle_branch(&ids), job.wi.branch);
                let coinbase = [&job.wi.coinb1[..], &[0; 12], &job.wi.coinb2].concat();
                let block = common::block::assemble(&[0; 80], &coinbase, job.witness, txs);
                assert!(block.ends_with(&txs[7].data));
                jobs += 1;
            }
        }
        assert_eq!(jobs, 3);
        // A workinfo naming a transaction never sent gives a job no block is built from.
        let wi = WorkInfo::parse(lines.last().unwrap().as_bytes()).unwrap();
        assert!(rebuild(wi, &HashMap::new()).txs.is_none());
    }

    #[test]
    fn submits_are_read_and_rates_decay() {
        let s = Submit::parse(
            br#"{"method":"mining.submit","params":["u.w","6b1242ec00000001","0000000000000001","6b1242ff","de29bc00","00002000"],"id":4}"#,
        )
        .unwrap();
        assert_eq!((s.worker.as_str(), s.jobid), ("u.w", 0x6b12_42ec_0000_0001));
        assert_eq!(
            (s.ntime, s.nonce, s.version_bits),
            (0x6b12_42ff, 0xde29_bc00, 0x2000)
        );
        assert_eq!(s.nonce2, [0, 0, 0, 0, 0, 0, 0, 1]);
        assert!(
            Submit::parse(br#"{"method":"mining.submit","params":["u","zz","00","00","00"]}"#)
                .is_none()
        );
        let t0 = Instant::now();
        let mut r = Rate::NONE;
        r.add(t0, 60.0, 60.0);
        assert!((r.decayed(t0, 60.0) - 1.0).abs() < 1e-9);
        let later = r.decayed(t0 + Duration::from_secs(60), 60.0);
        assert!((later - (-1.0f64).exp()).abs() < 1e-9, "{later}");
    }
}
