//! State shared by every shard: configuration, the job table, extranonce1 allocation, session
//! resume, statistics, and the sinks for block candidates and share records.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::Difficulty;
use common::address::Network;
use common::template::Template;
use parking_lot::{Mutex, RwLock};
use serde::Serialize;

use crate::job::{CoinbaseConfig, Job, JobError};

/// Pool-wide settings the stratifier needs (built by the daemon from the config file).
#[derive(Debug, Clone)]
pub struct PoolConfig {
    /// Solo mode: each user mines to the address in their username.
    pub solo: bool,
    /// Network of the node (for address checks in solo mode).
    pub network: Network,
    /// Script paid in pool mode.
    pub payout: Option<Vec<u8>>,
    /// Coinbase settings.
    pub coinbase: CoinbaseConfig,
    /// Version bits miners may roll.
    pub version_mask: u32,
    /// Vardiff floor.
    pub mindiff: Difficulty,
    /// Starting difficulty.
    pub startdiff: Difficulty,
    /// Vardiff ceiling.
    pub maxdiff: Option<Difficulty>,
    /// Per-listener difficulty rules, by listener index (ckpool's "highdiff port" made general).
    pub listener_diff: Vec<ListenerDiff>,
    /// Minimum difficulties by user agent (first match wins).
    pub agent_diff: Vec<AgentDiff>,
    /// Send only powers of two at or above 1 (for firmware that rounds difficulty down).
    pub diff_pow2: bool,
    /// Rate limit of `mining.get_txnhashes`.
    pub update_interval: Duration,
    /// Clients not authorised this long after connecting are dropped.
    pub auth_timeout: Duration,
    /// How long a disconnected session's extranonce1 is kept for resume.
    pub resume_window: Duration,
    /// Instance name used in messages to miners.
    pub name: String,
    /// Jobs are kept this long (at least the last few).
    pub job_lifetime: Duration,
}

impl PoolConfig {
    /// Defaults suitable for tests: pool mode paying `payout`.
    pub fn new(network: Network, payout: Option<Vec<u8>>) -> Self {
        Self {
            solo: payout.is_none(),
            network,
            payout,
            coinbase: CoinbaseConfig {
                tag: b"ckpool-rs".to_vec(),
                btcsig: Vec::new(),
                nonce1_len: 4,
                nonce2_len: 8,
                donation: None,
            },
            version_mask: 0x1fff_e000,
            mindiff: Difficulty::ONE,
            startdiff: Difficulty::from_units(42 << 32),
            maxdiff: None,
            listener_diff: Vec::new(),
            agent_diff: Vec::new(),
            diff_pow2: false,
            update_interval: Duration::from_secs(30),
            auth_timeout: Duration::from_secs(60),
            resume_window: Duration::from_secs(600),
            name: "ckpool-rs".into(),
            job_lifetime: Duration::from_secs(600),
        }
    }
}

/// Difficulty rules of one listen address.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ListenerDiff {
    /// Starting difficulty of its clients (instead of `startdiff`).
    pub start: Option<Difficulty>,
    /// Minimum difficulty of its clients (on top of `mindiff`).
    pub min: Option<Difficulty>,
}

/// A minimum difficulty for clients whose user agent contains `pattern` (case-insensitive).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentDiff {
    /// Lower-case substring to look for in the user agent.
    pub pattern: String,
    /// The minimum (and starting) difficulty for such clients.
    pub min: Difficulty,
}

/// A share that meets the network target, assembled into a block.
#[derive(Debug, Clone)]
pub struct BlockCandidate {
    /// Block height.
    pub height: u64,
    /// Block hash in RPC (reversed hex) order.
    pub hash: String,
    /// The whole block, hex.
    pub hex: String,
    /// Worker that found it.
    pub worker: String,
    /// Job id.
    pub job_id: u64,
}

/// One share for the share log.
#[derive(Debug, Clone, Serialize)]
pub struct ShareRecord {
    /// Job id.
    pub workinfoid: u64,
    /// Height of the job's block.
    pub height: u64,
    /// extranonce1 hex.
    pub enonce1: String,
    /// extranonce2 hex.
    pub nonce2: String,
    /// nonce hex.
    pub nonce: String,
    /// ntime hex.
    pub ntime: String,
    /// Difficulty the share was judged at.
    pub diff: f64,
    /// Difficulty the hash achieved.
    pub sdiff: f64,
    /// Share hash, RPC order.
    pub hash: String,
    /// Accepted or not.
    pub result: bool,
    /// Reject reason.
    #[serde(rename = "reject-reason", skip_serializing_if = "Option::is_none")]
    pub reject_reason: Option<&'static str>,
    /// Full worker name.
    pub workername: String,
    /// User name.
    pub username: String,
    /// Peer address.
    pub address: String,
    /// Client user agent.
    pub agent: String,
}

type BlockSink = Box<dyn Fn(BlockCandidate) + Send + Sync>;
type ShareSink = Box<dyn Fn(ShareRecord) + Send + Sync>;

#[derive(Debug, Default)]
struct JobTable {
    jobs: BTreeMap<u64, Arc<Job>>,
    current: Option<Arc<Job>>,
    /// First job of the current block: older jobs are stale.
    block_start: u64,
}

/// Per-worker statistics.
#[derive(Debug, Default, Clone, Serialize)]
pub struct WorkerStats {
    /// Accepted shares.
    pub accepted: u64,
    /// Rejected shares.
    pub rejected: u64,
    /// Sum of accepted difficulty.
    pub accepted_diff: f64,
    /// Best share difficulty.
    pub bestshare: f64,
}

/// Per-user statistics.
#[derive(Debug, Default, Clone, Serialize)]
pub struct UserStats {
    /// Accepted shares.
    pub accepted: u64,
    /// Rejected shares.
    pub rejected: u64,
    /// Sum of accepted difficulty.
    pub accepted_diff: f64,
    /// Best share difficulty.
    pub bestshare: f64,
    /// Blocks found.
    pub blocks: u64,
    /// Workers by full name.
    pub workers: BTreeMap<String, WorkerStats>,
}

/// Pool totals: one small lock per share.
#[derive(Debug, Default)]
struct Stats {
    blocks: Vec<String>,
}

/// Pool share totals, kept in stripes: each shard counts into its own (cache-line aligned, so
/// shards on different cores do not bounce one line per share), and a snapshot adds them up.
#[derive(Debug, Default)]
#[repr(align(128))]
pub(crate) struct Stripe(Mutex<Totals>);

#[derive(Debug, Default)]
struct Totals {
    accepted: u64,
    rejected: u64,
    accepted_diff: f64,
    bestshare: f64,
    reject_reasons: BTreeMap<&'static str, u64>,
}

impl Totals {
    fn reject(&mut self, reason: Option<&'static str>) {
        self.rejected += 1;
        if let Some(r) = reason {
            *self.reject_reasons.entry(r).or_default() += 1;
        }
    }
}

/// Stripes of pool totals (shards beyond this share them).
const STRIPES: usize = 64;

/// Share counters of one user or worker.
#[derive(Debug, Default, Clone, Copy)]
struct Counters {
    accepted: u64,
    rejected: u64,
    accepted_diff: f64,
    bestshare: f64,
}

impl Counters {
    fn add(&mut self, accepted: Option<f64>, sdiff: f64) {
        match accepted {
            Some(diff) => {
                self.accepted += 1;
                self.accepted_diff += diff;
                self.bestshare = self.bestshare.max(sdiff);
            }
            None => self.rejected += 1,
        }
    }
}

/// A user's blocks and workers. Its share counters are the sums of its workers', added up when a
/// snapshot is taken: a farm mines under one user from every core, and a per-user lock taken
/// for each share would be shared by all connector threads.
#[derive(Debug, Default)]
struct UserCell {
    blocks: AtomicU64,
    workers: Mutex<BTreeMap<String, Arc<Mutex<Counters>>>>,
}

/// Where a worker's shares are counted: looked up by name once (at its first share), then
/// held by its session, so counting a share compares no strings.
#[derive(Debug, Clone)]
pub(crate) struct WorkerStatsRef {
    worker: Arc<Mutex<Counters>>,
}

/// A snapshot of the pool's statistics.
#[derive(Debug, Clone, Serialize)]
pub struct StatsSnapshot {
    /// Accepted shares.
    pub accepted: u64,
    /// Rejected shares.
    pub rejected: u64,
    /// Sum of accepted difficulty.
    pub accepted_diff: f64,
    /// Best share difficulty.
    pub bestshare: f64,
    /// Rejects by reason.
    pub reject_reasons: BTreeMap<&'static str, u64>,
    /// Hashes of blocks found (RPC order).
    pub blocks: Vec<String>,
    /// Connected clients.
    pub clients: u64,
    /// Current job id, height and network difficulty.
    pub job: Option<(String, u64, f64)>,
    /// Users.
    pub users: BTreeMap<String, UserStats>,
}

/// Pool-wide shared state.
pub struct Pool {
    pub(crate) cfg: PoolConfig,
    pub(crate) cb_cfg: CoinbaseConfig,
    jobs: RwLock<JobTable>,
    next_job_id: AtomicU64,
    next_enonce1: AtomicU64,
    next_session: AtomicU64,
    resume: Mutex<HashMap<u32, (u64, Instant)>>,
    stats: Mutex<Stats>,
    totals: Box<[Arc<Stripe>]>,
    next_stripe: AtomicU64,
    users: Mutex<BTreeMap<String, Arc<UserCell>>>,
    pub(crate) clients: AtomicU64,
    block_sink: BlockSink,
    share_sink: Option<ShareSink>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("cfg", &self.cfg)
            .finish_non_exhaustive()
    }
}

impl Pool {
    /// A pool. `seed` (e.g. the start time in seconds) keeps job, session and extranonce ids
    /// from repeating across restarts; `block_sink` receives block candidates.
    pub fn new(
        cfg: PoolConfig,
        seed: u64,
        block_sink: impl Fn(BlockCandidate) + Send + Sync + 'static,
        share_sink: Option<Box<dyn Fn(ShareRecord) + Send + Sync>>,
    ) -> Arc<Self> {
        let cb_cfg = cfg.coinbase.clone();
        Arc::new(Self {
            cb_cfg,
            cfg,
            jobs: RwLock::new(JobTable::default()),
            next_job_id: AtomicU64::new(seed << 32),
            next_enonce1: AtomicU64::new(seed.wrapping_mul(0x9e37_79b9)),
            next_session: AtomicU64::new(seed.wrapping_mul(0x85eb_ca6b)),
            resume: Mutex::new(HashMap::new()),
            stats: Mutex::new(Stats::default()),
            totals: (0..STRIPES).map(|_| Arc::new(Stripe::default())).collect(),
            next_stripe: AtomicU64::new(0),
            users: Mutex::new(BTreeMap::new()),
            clients: AtomicU64::new(0),
            block_sink: Box::new(block_sink),
            share_sink,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &PoolConfig {
        &self.cfg
    }

    /// Turns a new template into the current job. A changed previous block makes it a clean
    /// job and every older job stale.
    pub fn new_template(
        &self,
        template: Arc<Template>,
        now: Instant,
    ) -> Result<Arc<Job>, JobError> {
        let id = self.next_job_id.fetch_add(1, Ordering::Relaxed) + 1;
        let clean = {
            let t = self.jobs.read();
            t.current
                .as_ref()
                .is_none_or(|c| c.template.prev_hash != template.prev_hash)
        };
        let job = Arc::new(Job::build(
            id,
            template,
            clean,
            self.cfg.payout.as_deref(),
            &self.cb_cfg,
            now,
        )?);
        let mut t = self.jobs.write();
        if clean {
            t.block_start = id;
        }
        t.jobs.insert(id, Arc::clone(&job));
        t.current = Some(Arc::clone(&job));
        // Keep jobs younger than the lifetime, and always the last three.
        let keep_from = t.jobs.len().saturating_sub(3);
        let lifetime = self.cfg.job_lifetime;
        let old: Vec<u64> = t
            .jobs
            .iter()
            .enumerate()
            .filter(|(i, (_, j))| {
                *i < keep_from && now.saturating_duration_since(j.created) > lifetime
            })
            .map(|(_, (id, _))| *id)
            .collect();
        for id in old {
            t.jobs.remove(&id);
        }
        Ok(job)
    }

    /// The current job.
    pub fn current_job(&self) -> Option<Arc<Job>> {
        self.jobs.read().current.clone()
    }

    /// A live job by id, and whether it is stale (from before the current block).
    pub(crate) fn job(&self, id: u64) -> Option<(Arc<Job>, bool)> {
        let t = self.jobs.read();
        t.jobs.get(&id).map(|j| (Arc::clone(j), id < t.block_start))
    }

    pub(crate) fn alloc_enonce1(&self) -> u64 {
        self.next_enonce1.fetch_add(1, Ordering::Relaxed)
    }

    pub(crate) fn alloc_session(&self) -> u32 {
        self.next_session.fetch_add(1, Ordering::Relaxed) as u32
    }

    /// Remembers a session for resume.
    pub(crate) fn park_session(&self, session: u32, enonce1: u64, now: Instant) {
        let mut r = self.resume.lock();
        if r.len() > 4096 {
            let window = self.cfg.resume_window;
            r.retain(|_, (_, t)| now.saturating_duration_since(*t) < window);
        }
        r.insert(session, (enonce1, now));
    }

    /// Takes a parked session's extranonce1 if it is still within the resume window.
    pub(crate) fn resume_session(&self, session: u32, now: Instant) -> Option<u64> {
        let (en1, t) = self.resume.lock().remove(&session)?;
        (now.saturating_duration_since(t) < self.cfg.resume_window).then_some(en1)
    }

    pub(crate) fn submit_block(&self, b: BlockCandidate) {
        self.stats.lock().blocks.push(b.hash.clone());
        let user = b.worker.split(['.', '_']).next().unwrap_or("");
        self.user_cell(user).blocks.fetch_add(1, Ordering::Relaxed);
        (self.block_sink)(b);
    }

    pub(crate) fn log_share(&self, rec: impl FnOnce() -> ShareRecord) {
        if let Some(sink) = &self.share_sink {
            sink(rec());
        }
    }

    fn user_cell(&self, user: &str) -> Arc<UserCell> {
        let mut users = self.users.lock();
        if let Some(u) = users.get(user) {
            return Arc::clone(u);
        }
        let u = Arc::new(UserCell::default());
        users.insert(user.to_owned(), Arc::clone(&u));
        u
    }

    /// The counters of `worker` (of `user`), created on first use.
    pub(crate) fn worker_stats(&self, user: &str, worker: &str) -> WorkerStatsRef {
        let user = self.user_cell(user);
        let worker = {
            let mut workers = user.workers.lock();
            match workers.get(worker) {
                Some(w) => Arc::clone(w),
                None => {
                    let w = Arc::new(Mutex::new(Counters::default()));
                    workers.insert(worker.to_owned(), Arc::clone(&w));
                    w
                }
            }
        };
        WorkerStatsRef { worker }
    }

    /// A stripe of the pool totals for a new shard to count into.
    pub(crate) fn totals_stripe(&self) -> Arc<Stripe> {
        let n = self.next_stripe.fetch_add(1, Ordering::Relaxed) % STRIPES as u64;
        // `n < STRIPES`, the length of `totals`.
        Arc::clone(&self.totals[usize::try_from(n).unwrap_or(0)])
    }

    /// Counts a share in `stripe`: accepted at difficulty `accepted`, or rejected for `reason`.
    pub(crate) fn record_share(
        &self,
        stripe: &Stripe,
        w: &WorkerStatsRef,
        accepted: Option<f64>,
        sdiff: f64,
        reason: Option<&'static str>,
    ) {
        {
            let mut t = stripe.0.lock();
            match accepted {
                Some(diff) => {
                    t.accepted += 1;
                    t.accepted_diff += diff;
                    t.bestshare = t.bestshare.max(sdiff);
                }
                None => t.reject(reason),
            }
        }
        w.worker.lock().add(accepted, sdiff);
    }

    /// Counts a rejected submission from a client that is not authorised (no user to charge).
    pub(crate) fn record_anonymous_reject(&self, stripe: &Stripe, reason: &'static str) {
        stripe.0.lock().reject(Some(reason));
    }

    /// A statistics snapshot.
    pub fn stats(&self) -> StatsSnapshot {
        let job = self
            .current_job()
            .map(|j| (j.id_hex.clone(), j.height(), j.network_diff.to_f64()));
        let users = self
            .users
            .lock()
            .iter()
            .map(|(name, u)| {
                let mut c = Counters::default();
                let workers = u
                    .workers
                    .lock()
                    .iter()
                    .map(|(name, w)| {
                        let w = *w.lock();
                        c.accepted += w.accepted;
                        c.rejected += w.rejected;
                        c.accepted_diff += w.accepted_diff;
                        c.bestshare = c.bestshare.max(w.bestshare);
                        let c = w;
                        (
                            name.clone(),
                            WorkerStats {
                                accepted: c.accepted,
                                rejected: c.rejected,
                                accepted_diff: c.accepted_diff,
                                bestshare: c.bestshare,
                            },
                        )
                    })
                    .collect();
                let stats = UserStats {
                    accepted: c.accepted,
                    rejected: c.rejected,
                    accepted_diff: c.accepted_diff,
                    bestshare: c.bestshare,
                    blocks: u.blocks.load(Ordering::Relaxed),
                    workers,
                };
                (name.clone(), stats)
            })
            .collect();
        let mut sum = Totals::default();
        for stripe in &self.totals {
            let t = stripe.0.lock();
            sum.accepted += t.accepted;
            sum.rejected += t.rejected;
            sum.accepted_diff += t.accepted_diff;
            sum.bestshare = sum.bestshare.max(t.bestshare);
            for (r, n) in &t.reject_reasons {
                *sum.reject_reasons.entry(r).or_default() += n;
            }
        }
        let s = self.stats.lock();
        StatsSnapshot {
            accepted: sum.accepted,
            rejected: sum.rejected,
            accepted_diff: sum.accepted_diff,
            bestshare: sum.bestshare,
            reject_reasons: sum.reject_reasons,
            blocks: s.blocks.clone(),
            clients: self.clients.load(Ordering::Relaxed),
            job,
            users,
        }
    }
}
