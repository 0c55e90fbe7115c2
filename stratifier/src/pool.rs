//! State shared by every shard: configuration, the job table, extranonce1 allocation, session
//! resume and statistics. Block candidates and share records leave through [`crate::Out`].

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::Difficulty;
use common::address::Network;
use common::template::Template;
use parking_lot::{Mutex, RwLock};
use serde::Serialize;

use crate::job::{CoinbaseConfig, ExtranonceLayout, Job, JobError, SourceId, Work};
use crate::rates::{Decay, Ema, HASHES_PER_DIFF, POOL_WINDOWS, SPS_WINDOWS, USER_WINDOWS};
use crate::reject::Reject;

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
    /// Block height (0 when the work's source did not say).
    pub height: u64,
    /// Block hash in RPC (reversed hex) order.
    pub hash: String,
    /// The whole block, hex; `None` for upstream work, whose transactions only the upstream
    /// pool has (the share goes upstream, and the upstream submits the block).
    pub hex: Option<String>,
    /// The work source of its job.
    pub source: SourceId,
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
    pub reject_reason: Option<Reject>,
    /// Full worker name.
    pub workername: String,
    /// User name.
    pub username: String,
    /// Peer address.
    pub address: String,
    /// Client user agent.
    pub agent: String,
}

/// The job book of one work source: its live jobs, its current job, and the extranonce layout
/// of its miners.
#[derive(Debug)]
struct JobBook {
    layout: Arc<ExtranonceLayout>,
    jobs: BTreeMap<u64, Arc<Job>>,
    current: Option<Arc<Job>>,
    /// First job of the current block: older jobs are stale.
    block_start: u64,
}

impl JobBook {
    fn new(layout: ExtranonceLayout) -> Self {
        Self {
            layout: Arc::new(layout),
            jobs: BTreeMap::new(),
            current: None,
            block_start: 0,
        }
    }
}

/// Every source's job book, by [`SourceId`].
#[derive(Debug)]
struct JobTable {
    books: Vec<JobBook>,
}

/// Work sources at most (source ids are 16 bits).
const MAX_SOURCES: usize = 1 << 16;

/// A thread's copy of the live jobs ([`Pool::refresh`]): checking a share then takes no lock
/// and touches no reference count that the other threads write.
#[derive(Debug, Default)]
pub(crate) struct JobView {
    generation: u64,
    books: Vec<BookView>,
}

/// A thread's copy of one job book.
#[derive(Debug)]
pub(crate) struct BookView {
    /// Sorted by id (copied from the pool's ordered table).
    jobs: Vec<Arc<Job>>,
    current: Option<Arc<Job>>,
    block_start: u64,
    pub(crate) layout: Arc<ExtranonceLayout>,
}

impl JobView {
    /// A source's book, as of the last refresh.
    pub(crate) fn book(&self, source: SourceId) -> Option<&BookView> {
        self.books.get(source.index())
    }

    /// A live job of `source` by id, and whether it is stale (from before the current block),
    /// as of the last refresh.
    pub(crate) fn get(&self, source: SourceId, id: u64) -> Option<(&Arc<Job>, bool)> {
        let b = self.book(source)?;
        let i = b.jobs.binary_search_by_key(&id, |j| j.id).ok()?;
        b.jobs.get(i).map(|j| (j, id < b.block_start))
    }

    /// The current job of `source`, as of the last refresh.
    pub(crate) fn current(&self, source: SourceId) -> Option<&Arc<Job>> {
        self.book(source)?.current.as_ref()
    }

    /// Whether job `id` of any source is live, as of the last refresh.
    pub(crate) fn is_live(&self, id: u64) -> bool {
        self.books
            .iter()
            .any(|b| b.jobs.binary_search_by_key(&id, |j| j.id).is_ok())
    }
}

/// Hashrates of a user or worker in hashes per second: moving averages over 1 and 5 minutes,
/// 1 hour, 1 and 7 days (zero until the rates have been sampled).
#[derive(Debug, Default, Clone, Copy, PartialEq, Serialize)]
pub struct Hashrates {
    /// Over 1 minute.
    pub hashrate1m: f64,
    /// Over 5 minutes.
    pub hashrate5m: f64,
    /// Over 1 hour.
    pub hashrate1hr: f64,
    /// Over 1 day.
    pub hashrate1d: f64,
    /// Over 7 days.
    pub hashrate7d: f64,
}

impl Hashrates {
    fn from_ema(e: &Ema<5>) -> Self {
        let [m1, m5, h1, d1, d7] = e.rates().map(|r| r * HASHES_PER_DIFF);
        Self {
            hashrate1m: m1,
            hashrate5m: m5,
            hashrate1hr: h1,
            hashrate1d: d1,
            hashrate7d: d7,
        }
    }
}

/// Pool hashrates in hashes per second and accepted shares per second, as moving averages (zero
/// until the rates have been sampled). Field names as in ckpool's `pool.status`.
#[derive(Debug, Default, Clone, Copy, PartialEq, Serialize)]
pub struct PoolRates {
    /// Hashrate over 1 minute.
    pub hashrate1m: f64,
    /// Over 5 minutes.
    pub hashrate5m: f64,
    /// Over 15 minutes.
    pub hashrate15m: f64,
    /// Over 1 hour.
    pub hashrate1hr: f64,
    /// Over 6 hours.
    pub hashrate6hr: f64,
    /// Over 1 day.
    pub hashrate1d: f64,
    /// Over 7 days.
    pub hashrate7d: f64,
    /// Accepted shares per second over 1 minute.
    #[serde(rename = "SPS1m")]
    pub sps1m: f64,
    /// Over 5 minutes.
    #[serde(rename = "SPS5m")]
    pub sps5m: f64,
    /// Over 15 minutes.
    #[serde(rename = "SPS15m")]
    pub sps15m: f64,
    /// Over 1 hour.
    #[serde(rename = "SPS1h")]
    pub sps1h: f64,
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
    /// Time of the last accepted share, unix seconds; 0 if none (or if the daemon has not told
    /// the pool the wall-clock time, see [`Pool::set_wall_clock`]).
    pub lastshare: u64,
    /// Hashrates.
    #[serde(flatten)]
    pub hashrate: Hashrates,
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
    /// Time of the last accepted share of any of its workers, unix seconds; 0 if none.
    pub lastshare: u64,
    /// Hashrates: the sums of its workers'.
    #[serde(flatten)]
    pub hashrate: Hashrates,
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
    fn reject(&mut self, reason: Option<Reject>) {
        self.rejected += 1;
        if let Some(r) = reason {
            *self.reject_reasons.entry(r.message()).or_default() += 1;
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
    last_share: Option<Instant>,
}

impl Counters {
    fn add(&mut self, accepted: Option<f64>, sdiff: f64, now: Instant) {
        match accepted {
            Some(diff) => {
                self.accepted += 1;
                self.accepted_diff += diff;
                self.bestshare = self.bestshare.max(sdiff);
                self.last_share = Some(now);
            }
            None => self.rejected += 1,
        }
    }
}

/// One worker: its share counters, written by the share path, and its moving averages, written
/// by the rate sampler. Each has its own lock, so a share never waits for the sampler.
#[derive(Debug, Default)]
struct WorkerCell {
    counters: Mutex<Counters>,
    rates: Mutex<WorkerRates>,
}

/// The sampler's state for one worker.
#[derive(Debug, Default, Clone, Copy)]
struct WorkerRates {
    /// Its cumulative accepted difficulty at the previous sample (0 for a worker the sampler
    /// has not seen yet: all its shares are new).
    sampled_diff: f64,
    /// Accepted difficulty per second.
    ema: Ema<5>,
}

/// The sampler's state for the pool.
#[derive(Debug, Default)]
struct PoolSampler {
    /// Time of the previous sample; `None` before the first, which only records a baseline.
    last: Option<Instant>,
    sampled_diff: f64,
    sampled_shares: u64,
    /// Accepted difficulty per second.
    diff: Ema<7>,
    /// Accepted shares per second.
    shares: Ema<4>,
    /// Blocks found as of the previous sample, and the pool's cumulative accepted difficulty
    /// when that number last changed: the start of the current round.
    blocks_seen: usize,
    round_start_diff: f64,
}

/// A user's blocks and workers. Its share counters are the sums of its workers', added up when a
/// snapshot is taken: a farm mines under one user from every core, and a per-user lock taken
/// for each share would be shared by all connector threads.
#[derive(Debug, Default)]
struct UserCell {
    blocks: AtomicU64,
    workers: Mutex<BTreeMap<String, Arc<WorkerCell>>>,
}

/// Where a worker's shares are counted: looked up by name once (at its first share), then
/// held by its session, so counting a share compares no strings.
#[derive(Debug, Clone)]
pub(crate) struct WorkerStatsRef {
    worker: Arc<WorkerCell>,
}

/// One username's authorisation back-off.
#[derive(Debug, Clone, Copy)]
struct AuthBackoff {
    /// Refused until then.
    until: Instant,
    /// The length of the last refusal.
    last: Duration,
}

/// The first refusal after a failed authorisation, and the longest (ckpool's values).
const AUTH_BACKOFF_START: Duration = Duration::from_secs(3);
const AUTH_BACKOFF_MAX: Duration = Duration::from_secs(600);
/// Usernames remembered at most (a flood of random names cannot grow the table beyond this).
const AUTH_BACKOFF_USERS: usize = 65_536;

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
    /// Difficulty accepted since the pool's last block (from start-up until it finds one), as
    /// of the last rate sample.
    pub round_diff: f64,
    /// Disconnected sessions kept for resume, as of the last rate sample.
    pub disconnected: u64,
    /// Hashrates and shares per second.
    #[serde(flatten)]
    pub rates: PoolRates,
    /// Users.
    pub users: BTreeMap<String, UserStats>,
}

/// Disconnected sessions kept for resume: session id → (work source, local extranonce1 number,
/// when parked).
///
/// The rate sampler forgets expired ones every few seconds. Parking also prunes, for when no
/// sampler runs, but only once the table has doubled since the last pass: a pass at every park
/// above a fixed size made a mass disconnect quadratic (100,000 miners dropping at once scanned
/// the table 100,000 times, under a lock every connector thread takes on a disconnect).
#[derive(Debug)]
struct Parked {
    map: HashMap<u32, (SourceId, u64, Instant)>,
    /// Parking prunes first when the table holds this many.
    prune_at: usize,
    /// Pruning passes so far.
    passes: u64,
}

/// Parked sessions below which parking never prunes.
const PARKED_PRUNE_MIN: usize = 4096;

impl Default for Parked {
    fn default() -> Self {
        Self {
            map: HashMap::new(),
            prune_at: PARKED_PRUNE_MIN,
            passes: 0,
        }
    }
}

impl Parked {
    /// Forgets the sessions parked `window` or longer before `now`; the next pass at parking
    /// waits until the table has doubled.
    fn prune(&mut self, now: Instant, window: Duration) {
        self.map
            .retain(|_, (_, _, t)| now.saturating_duration_since(*t) < window);
        self.prune_at = (2 * self.map.len()).max(PARKED_PRUNE_MIN);
        self.passes += 1;
    }
}

/// Pool-wide shared state.
pub struct Pool {
    pub(crate) cfg: PoolConfig,
    pub(crate) cb_cfg: CoinbaseConfig,
    jobs: RwLock<JobTable>,
    /// Bumped (under the write lock) at every change of `jobs`, so a [`JobView`] knows when to
    /// copy the table again without taking its lock.
    jobs_gen: AtomicU64,
    next_job_id: AtomicU64,
    next_enonce1: AtomicU64,
    next_session: AtomicU64,
    resume: Mutex<Parked>,
    /// Usernames whose authorisation failed, and until when they are refused (ckpool's back-off).
    auth_backoff: Mutex<HashMap<Box<str>, AuthBackoff>>,
    /// When a full back-off table was last pruned: at most once a second, so that a flood of
    /// distinct failing names costs a table scan per second, not one per name.
    auth_backoff_pruned: Mutex<Option<Instant>>,
    stats: Mutex<Stats>,
    totals: Box<[Arc<Stripe>]>,
    next_stripe: AtomicU64,
    users: Mutex<BTreeMap<String, Arc<UserCell>>>,
    sampler: Mutex<PoolSampler>,
    /// An instant and the wall-clock time then (since the unix epoch), to report share times.
    wall_clock: Mutex<Option<(Instant, Duration)>>,
    /// Parked sessions within the resume window, counted by the sampler.
    parked: AtomicU64,
    pub(crate) clients: AtomicU64,
    /// The reference instant of every stamp kept (given by the caller: no clock is read here).
    pub(crate) epoch: Instant,
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
    /// from repeating across restarts. `epoch` is the reference instant the pool and its shards
    /// keep times against (any instant near the start; the stratifier itself reads no clock).
    /// Block candidates and share records leave through each shard's [`crate::Out`].
    pub fn new(cfg: PoolConfig, seed: u64, epoch: Instant) -> Arc<Self> {
        let cb_cfg = cfg.coinbase.clone();
        let own = JobBook::new(ExtranonceLayout::own(&cb_cfg));
        Arc::new(Self {
            cb_cfg,
            cfg,
            jobs: RwLock::new(JobTable { books: vec![own] }),
            jobs_gen: AtomicU64::new(0),
            next_job_id: AtomicU64::new(seed << 32),
            next_enonce1: AtomicU64::new(seed.wrapping_mul(0x9e37_79b9)),
            next_session: AtomicU64::new(seed.wrapping_mul(0x85eb_ca6b)),
            resume: Mutex::new(Parked::default()),
            auth_backoff: Mutex::new(HashMap::new()),
            auth_backoff_pruned: Mutex::new(None),
            stats: Mutex::new(Stats::default()),
            totals: (0..STRIPES).map(|_| Arc::new(Stripe::default())).collect(),
            next_stripe: AtomicU64::new(0),
            users: Mutex::new(BTreeMap::new()),
            sampler: Mutex::new(PoolSampler::default()),
            wall_clock: Mutex::new(None),
            parked: AtomicU64::new(0),
            clients: AtomicU64::new(0),
            epoch,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &PoolConfig {
        &self.cfg
    }

    /// Adds a work source with its own job book and extranonce layout (proxy modes: one per
    /// upstream connection; node mode: the parent pool). Its miners are opened with
    /// [`crate::Shard::on_open_in`] and get work from [`Pool::new_work`].
    pub fn add_source(&self, layout: ExtranonceLayout) -> Result<SourceId, JobError> {
        let mut t = self.jobs.write();
        let n = t.books.len();
        let id = u16::try_from(n)
            .ok()
            .filter(|_| n < MAX_SOURCES)
            .ok_or(JobError::NoSource(u16::MAX))?;
        t.books.push(JobBook::new(layout));
        self.jobs_gen.fetch_add(1, Ordering::Release);
        Ok(SourceId(id))
    }

    /// The extranonce layout of `source`.
    pub fn layout(&self, source: SourceId) -> Option<Arc<ExtranonceLayout>> {
        self.jobs
            .read()
            .books
            .get(source.index())
            .map(|b| Arc::clone(&b.layout))
    }

    /// Turns a new template into the current job of the pool's own source. A changed previous
    /// block makes it a clean job and every older job stale.
    pub fn new_template(
        &self,
        template: Arc<Template>,
        now: Instant,
    ) -> Result<Arc<Job>, JobError> {
        let id = self.next_job_id.fetch_add(1, Ordering::Relaxed) + 1;
        let clean = self
            .current_job()
            .is_none_or(|c| c.prev_hash != template.prev_hash);
        let job = Arc::new(Job::build(
            id,
            template,
            clean,
            self.cfg.payout.as_deref(),
            &self.cb_cfg,
            now,
        )?);
        self.install(job, now)
    }

    /// Turns `work` into the current job of `source`. Clean work, or a changed previous block,
    /// makes every older job of the source stale.
    pub fn new_work(
        &self,
        source: SourceId,
        mut work: Work,
        now: Instant,
    ) -> Result<Arc<Job>, JobError> {
        let id = self.next_job_id.fetch_add(1, Ordering::Relaxed) + 1;
        {
            let t = self.jobs.read();
            let book = t
                .books
                .get(source.index())
                .ok_or(JobError::NoSource(source.0))?;
            work.clean |= book
                .current
                .as_ref()
                .is_none_or(|c| c.prev_hash != work.prev_hash);
        }
        self.install(Arc::new(Job::from_work(id, source, work, now)), now)
    }

    /// Makes `job` the current job of its source's book.
    fn install(&self, job: Arc<Job>, now: Instant) -> Result<Arc<Job>, JobError> {
        let mut t = self.jobs.write();
        let t = t
            .books
            .get_mut(job.source.index())
            .ok_or(JobError::NoSource(job.source.0))?;
        if job.clean {
            t.block_start = job.id;
        }
        t.jobs.insert(job.id, Arc::clone(&job));
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
        self.jobs_gen.fetch_add(1, Ordering::Release);
        Ok(job)
    }

    /// The current job of the pool's own source.
    pub fn current_job(&self) -> Option<Arc<Job>> {
        self.current_job_of(SourceId::TEMPLATE)
    }

    /// The current job of `source`.
    pub fn current_job_of(&self, source: SourceId) -> Option<Arc<Job>> {
        self.jobs.read().books.get(source.index())?.current.clone()
    }

    /// Brings `view` up to date with the live jobs: a load of one atomic when nothing changed.
    pub(crate) fn refresh(&self, view: &mut JobView) {
        if self.jobs_gen.load(Ordering::Acquire) == view.generation {
            return;
        }
        let t = self.jobs.read();
        // Read under the lock, which every change holds: the copy and its number agree.
        view.generation = self.jobs_gen.load(Ordering::Relaxed);
        view.books.truncate(t.books.len());
        for (i, book) in t.books.iter().enumerate() {
            if view.books.len() <= i {
                view.books.push(BookView {
                    jobs: Vec::new(),
                    current: None,
                    block_start: 0,
                    layout: Arc::clone(&book.layout),
                });
            }
            if let Some(v) = view.books.get_mut(i) {
                v.jobs.clear();
                v.jobs.extend(book.jobs.values().cloned());
                v.current.clone_from(&book.current);
                v.block_start = book.block_start;
            }
        }
    }

    /// A live job of `source` by id, and whether it is stale (from before the current block).
    pub(crate) fn job(&self, source: SourceId, id: u64) -> Option<(Arc<Job>, bool)> {
        let t = self.jobs.read();
        let b = t.books.get(source.index())?;
        b.jobs.get(&id).map(|j| (Arc::clone(j), id < b.block_start))
    }

    pub(crate) fn alloc_enonce1(&self) -> u64 {
        self.next_enonce1.fetch_add(1, Ordering::Relaxed)
    }

    /// How long `user` is still refused after failed authorisations, if it is.
    pub(crate) fn auth_refused(&self, user: &str, now: Instant) -> Option<Duration> {
        let b = self.auth_backoff.lock();
        let until = b.get(user)?.until;
        (until > now).then(|| until - now)
    }

    /// A failed authorisation of `user`: it is refused for 3 s, and for twice as long after each
    /// further failure that follows a refusal's end within 10 minutes, up to 600 s (ckpool's
    /// back-off). Returns the refusal's length.
    pub(crate) fn auth_failed(&self, user: &str, now: Instant) -> Duration {
        let mut b = self.auth_backoff.lock();
        if b.len() >= AUTH_BACKOFF_USERS && !b.contains_key(user) {
            let mut pruned = self.auth_backoff_pruned.lock();
            if pruned.is_none_or(|t| now.saturating_duration_since(t) >= Duration::from_secs(1)) {
                b.retain(|_, e| now.saturating_duration_since(e.until) < AUTH_BACKOFF_MAX);
                *pruned = Some(now);
            }
            if b.len() >= AUTH_BACKOFF_USERS {
                // A flood of distinct names: refuse this one without remembering it.
                return AUTH_BACKOFF_START;
            }
        }
        let e = b.entry(user.into()).or_insert(AuthBackoff {
            until: now,
            last: Duration::ZERO,
        });
        let wait = if now.saturating_duration_since(e.until) < AUTH_BACKOFF_MAX {
            (e.last * 2).clamp(AUTH_BACKOFF_START, AUTH_BACKOFF_MAX)
        } else {
            AUTH_BACKOFF_START
        };
        *e = AuthBackoff {
            until: now + wait,
            last: wait,
        };
        wait
    }

    /// `user` authorised: its back-off ends.
    pub(crate) fn auth_succeeded(&self, user: &str) {
        let mut b = self.auth_backoff.lock();
        if !b.is_empty() {
            b.remove(user);
        }
    }

    pub(crate) fn alloc_session(&self) -> u32 {
        self.next_session.fetch_add(1, Ordering::Relaxed) as u32
    }

    /// Remembers a session for resume.
    pub(crate) fn park_session(&self, session: u32, source: SourceId, enonce1: u64, now: Instant) {
        let mut r = self.resume.lock();
        if r.map.len() >= r.prune_at {
            r.prune(now, self.cfg.resume_window);
        }
        r.map.insert(session, (source, enonce1, now));
    }

    /// Takes a parked session's extranonce1 number if it is still within the resume window and
    /// was on `source` (another source's extranonce1 means nothing here).
    pub(crate) fn resume_session(
        &self,
        session: u32,
        source: SourceId,
        now: Instant,
    ) -> Option<u64> {
        let (src, en1, t) = self.resume.lock().map.remove(&session)?;
        (src == source && now.saturating_duration_since(t) < self.cfg.resume_window).then_some(en1)
    }

    /// Counts a block found (the candidate itself leaves as an [`crate::Event::Block`]).
    pub(crate) fn record_block(&self, b: &BlockCandidate) {
        self.stats.lock().blocks.push(b.hash.clone());
        let user = b.worker.split(['.', '_']).next().unwrap_or("");
        self.user_cell(user).blocks.fetch_add(1, Ordering::Relaxed);
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
                    let w = Arc::new(WorkerCell::default());
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
        reason: Option<Reject>,
        now: Instant,
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
        w.worker.counters.lock().add(accepted, sdiff, now);
    }

    /// Counts a rejected submission from a client that is not authorised (no user to charge).
    pub(crate) fn record_anonymous_reject(&self, stripe: &Stripe, reason: Reject) {
        stripe.0.lock().reject(Some(reason));
    }

    /// Tells the pool the wall-clock time (since the unix epoch) at `now`, so snapshots can give
    /// share times as unix seconds. The daemon calls it before each sample (the stratifier
    /// itself never reads a clock).
    pub fn set_wall_clock(&self, now: Instant, since_epoch: Duration) {
        *self.wall_clock.lock() = Some((now, since_epoch));
    }

    /// Folds the shares accepted since the previous call into the moving averages of the pool
    /// and every worker, and forgets parked sessions past the resume window. Called every few
    /// seconds from one thread (calls are serialised); the first call only records a baseline.
    ///
    /// The share path only adds to cumulative counters; this reads them and takes differences,
    /// so a share never computes an average or waits for this.
    pub fn sample_rates(&self, now: Instant) {
        let window = self.cfg.resume_window;
        let parked = {
            let mut r = self.resume.lock();
            r.prune(now, window);
            r.map.len()
        };
        self.parked
            .store(u64::try_from(parked).unwrap_or(u64::MAX), Ordering::Relaxed);

        let mut p = self.sampler.lock();
        let (diff, shares) = self.totals.iter().fold((0.0, 0u64), |(d, n), stripe| {
            let t = stripe.0.lock();
            (d + t.accepted_diff, n + t.accepted)
        });
        let blocks = self.stats.lock().blocks.len();
        if blocks != p.blocks_seen {
            p.blocks_seen = blocks;
            p.round_start_diff = diff;
        }
        let workers = self.worker_cells();
        let Some(last) = p.last else {
            p.last = Some(now);
            p.sampled_diff = diff;
            p.sampled_shares = shares;
            for w in workers {
                let d = w.counters.lock().accepted_diff;
                w.rates.lock().sampled_diff = d;
            }
            return;
        };
        let dt = now.saturating_duration_since(last);
        let (Some(pool_decay), Some(sps_decay), Some(user_decay)) = (
            Decay::new(dt, &POOL_WINDOWS),
            Decay::new(dt, &SPS_WINDOWS),
            Decay::new(dt, &USER_WINDOWS),
        ) else {
            // No time has passed: keep the previous sample as the baseline.
            return;
        };
        p.last = Some(now);
        let new_diff = (diff - p.sampled_diff).max(0.0);
        let new_shares = shares.saturating_sub(p.sampled_shares);
        p.diff.update(new_diff, &pool_decay);
        // Share counts are far below 2^53: exact as f64.
        p.shares.update(new_shares as f64, &sps_decay);
        p.sampled_diff = diff;
        p.sampled_shares = shares;
        drop(p);
        for w in workers {
            let d = w.counters.lock().accepted_diff;
            let mut r = w.rates.lock();
            let new = (d - r.sampled_diff).max(0.0);
            r.ema.update(new, &user_decay);
            r.sampled_diff = d;
        }
    }

    /// Every worker, without holding the user table's lock while the caller works on them.
    fn worker_cells(&self) -> Vec<Arc<WorkerCell>> {
        let users: Vec<Arc<UserCell>> = self.users.lock().values().cloned().collect();
        let mut out = Vec::new();
        for u in users {
            out.extend(u.workers.lock().values().cloned());
        }
        out
    }

    /// `t` as unix seconds, if the wall clock is known.
    fn unix_secs(&self, t: Option<Instant>) -> u64 {
        let (Some(t), Some((at, wall))) = (t, *self.wall_clock.lock()) else {
            return 0;
        };
        let secs = if t >= at {
            wall.saturating_add(t.duration_since(at))
        } else {
            wall.saturating_sub(at.duration_since(t))
        };
        secs.as_secs()
    }

    /// A statistics snapshot.
    pub fn stats(&self) -> StatsSnapshot {
        let job = self
            .current_job()
            .map(|j| (j.id_hex.clone(), j.height(), j.network_diff.to_f64()));
        let user_cells: Vec<(String, Arc<UserCell>)> = self
            .users
            .lock()
            .iter()
            .map(|(name, u)| (name.clone(), Arc::clone(u)))
            .collect();
        let users = user_cells
            .into_iter()
            .map(|(name, u)| {
                let mut c = Counters::default();
                let mut ema = Ema::<5>::default();
                let workers = u
                    .workers
                    .lock()
                    .iter()
                    .map(|(name, cell)| {
                        let w = *cell.counters.lock();
                        let r = cell.rates.lock().ema;
                        c.accepted += w.accepted;
                        c.rejected += w.rejected;
                        c.accepted_diff += w.accepted_diff;
                        c.bestshare = c.bestshare.max(w.bestshare);
                        c.last_share = c.last_share.max(w.last_share);
                        ema.add(&r);
                        (
                            name.clone(),
                            WorkerStats {
                                accepted: w.accepted,
                                rejected: w.rejected,
                                accepted_diff: w.accepted_diff,
                                bestshare: w.bestshare,
                                lastshare: self.unix_secs(w.last_share),
                                hashrate: Hashrates::from_ema(&r),
                            },
                        )
                    })
                    .collect();
                let stats = UserStats {
                    accepted: c.accepted,
                    rejected: c.rejected,
                    accepted_diff: c.accepted_diff,
                    bestshare: c.bestshare,
                    lastshare: self.unix_secs(c.last_share),
                    hashrate: Hashrates::from_ema(&ema),
                    blocks: u.blocks.load(Ordering::Relaxed),
                    workers,
                };
                (name, stats)
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
        let (rates, round_diff) = {
            let p = self.sampler.lock();
            let [m1, m5, m15, h1, h6, d1, d7] = p.diff.rates().map(|r| r * HASHES_PER_DIFF);
            let [s1, s5, s15, sh1] = p.shares.rates();
            let rates = PoolRates {
                hashrate1m: m1,
                hashrate5m: m5,
                hashrate15m: m15,
                hashrate1hr: h1,
                hashrate6hr: h6,
                hashrate1d: d1,
                hashrate7d: d7,
                sps1m: s1,
                sps5m: s5,
                sps15m: s15,
                sps1h: sh1,
            };
            (rates, (p.sampled_diff - p.round_start_diff).max(0.0))
        };
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
            round_diff,
            disconnected: self.parked.load(Ordering::Relaxed),
            rates,
            users,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool() -> Arc<Pool> {
        Pool::new(PoolConfig::new(Network::Regtest, None), 1, Instant::now())
    }

    fn template(prev: u8) -> Arc<Template> {
        Arc::new(Template::empty([prev; 32], 0x207f_ffff))
    }

    #[test]
    fn a_job_view_follows_the_pools_jobs_and_lets_dropped_ones_go() {
        let payout = common::address::script_for_address(
            "mnNghRjeAKbTqkvMYaE6kzkpsfWVdt3TRZ",
            Network::Regtest,
        )
        .unwrap();
        let mut cfg = PoolConfig::new(Network::Regtest, Some(payout));
        cfg.job_lifetime = Duration::from_secs(30);
        let p = Pool::new(cfg, 1, Instant::now());
        let mut view = JobView::default();
        p.refresh(&mut view);
        assert!(view.current(SourceId::TEMPLATE).is_none());
        let now = Instant::now();
        let a = p.new_template(template(1), now).unwrap();
        // A view is a copy: it sees the new job only once refreshed.
        assert!(view.get(SourceId::TEMPLATE, a.id).is_none());
        p.refresh(&mut view);
        let seen = |view: &JobView, id: u64| {
            view.get(SourceId::TEMPLATE, id)
                .map(|(j, stale)| (j.id, stale))
        };
        assert_eq!(seen(&view, a.id), Some((a.id, false)));
        assert_eq!(view.current(SourceId::TEMPLATE).map(|j| j.id), Some(a.id));
        // Same previous block: the older job stays fresh.
        let b = p
            .new_template(template(1), now + Duration::from_secs(1))
            .unwrap();
        p.refresh(&mut view);
        assert_eq!(seen(&view, a.id), Some((a.id, false)));
        assert_eq!(view.current(SourceId::TEMPLATE).map(|j| j.id), Some(b.id));
        // A new block: every older job is stale.
        let c = p
            .new_template(template(2), now + Duration::from_secs(2))
            .unwrap();
        p.refresh(&mut view);
        assert_eq!(seen(&view, a.id), Some((a.id, true)));
        assert_eq!(seen(&view, b.id), Some((b.id, true)));
        assert_eq!(seen(&view, c.id), Some((c.id, false)));
        assert!(view.get(SourceId::TEMPLATE, c.id + 1).is_none());
        // Past its lifetime, with three younger jobs, `a` leaves the pool and then the view,
        // which holds no reference to it any more.
        let d = p
            .new_template(template(2), now + Duration::from_secs(100))
            .unwrap();
        assert_eq!(Arc::strong_count(&a), 2, "the test's and the view's");
        p.refresh(&mut view);
        assert!(view.get(SourceId::TEMPLATE, a.id).is_none());
        assert_eq!(Arc::strong_count(&a), 1);
        assert_eq!(seen(&view, b.id), Some((b.id, true)));
        assert_eq!(seen(&view, d.id), Some((d.id, false)));
    }

    #[test]
    fn auth_backoff_doubles_up_to_ten_minutes_then_starts_again() {
        let p = pool();
        let mut now = Instant::now();
        let mut waits = Vec::new();
        for _ in 0..10 {
            let w = p.auth_failed("bob", now);
            assert_eq!(p.auth_refused("bob", now), Some(w));
            assert_eq!(p.auth_refused("bob", now + w), None);
            waits.push(w.as_secs());
            now += w;
        }
        assert_eq!(waits, [3, 6, 12, 24, 48, 96, 192, 384, 600, 600]);
        // Ten quiet minutes after the last refusal: from 3 s again.
        assert_eq!(p.auth_failed("bob", now + AUTH_BACKOFF_MAX).as_secs(), 3);
        p.auth_succeeded("bob");
        assert_eq!(p.auth_refused("bob", now), None);
        // A flood of names is bounded: the table never holds more than its cap.
        for i in 0..AUTH_BACKOFF_USERS + 10 {
            p.auth_failed(&format!("u{i}"), now);
        }
        assert!(p.auth_backoff.lock().len() <= AUTH_BACKOFF_USERS);
        // The full table was scanned once for that flood, not once per name; a second later,
        // with every entry expired, one scan empties it.
        let first_scan = p.auth_backoff_pruned.lock().expect("pruned when full");
        assert_eq!(first_scan, now);
        let later = now + AUTH_BACKOFF_MAX + Duration::from_secs(700);
        p.auth_failed("late", later);
        assert_eq!(*p.auth_backoff_pruned.lock(), Some(later));
        assert_eq!(p.auth_backoff.lock().len(), 1);
    }

    #[test]
    fn a_mass_disconnect_prunes_parked_sessions_a_logarithmic_number_of_times() {
        let p = pool();
        let t0 = Instant::now();
        for i in 0..100_000u32 {
            p.park_session(i, SourceId::TEMPLATE, u64::from(i), t0);
        }
        {
            let r = p.resume.lock();
            assert_eq!(r.map.len(), 100_000);
            // 4096, 8192, ..., 65536: one pass at each doubling, none in between.
            assert_eq!(r.passes, 5, "{} passes", r.passes);
        }
        assert_eq!(
            p.resume_session(7, SourceId(1), t0),
            None,
            "another source's"
        );
        assert_eq!(p.resume_session(9, SourceId::TEMPLATE, t0), Some(9));
        // Past the window, the next pass (the sampler's, or parking's) forgets them all.
        let late = t0 + p.cfg.resume_window;
        assert_eq!(p.resume_session(8, SourceId::TEMPLATE, late), None);
        p.sample_rates(late);
        let r = p.resume.lock();
        assert!(r.map.is_empty());
        assert_eq!(r.prune_at, PARKED_PRUNE_MIN);
    }

    fn within(actual: f64, expected: f64) -> bool {
        (actual - expected).abs() <= 0.01 * expected.abs()
    }

    #[test]
    fn sampled_rates_reach_the_snapshot() {
        let pool = pool();
        let t0 = Instant::now();
        pool.set_wall_clock(t0, Duration::from_secs(1_700_000_000));
        let stripe = pool.totals_stripe();
        let rig1 = pool.worker_stats("alice", "alice.rig1");
        let rig2 = pool.worker_stats("alice", "alice.rig2");
        pool.sample_rates(t0);
        // Five minutes: every 2 s rig1 has two shares of 1000 accepted and rig2 one of 500.
        let mut now = t0;
        for _ in 0..150 {
            now += Duration::from_secs(2);
            for _ in 0..2 {
                pool.record_share(&stripe, &rig1, Some(1000.0), 1500.0, None, now);
            }
            pool.record_share(&stripe, &rig2, Some(500.0), 600.0, None, now);
            pool.record_share(&stripe, &rig2, None, 0.0, Some(Reject::Stale), now);
            pool.sample_rates(now);
        }
        let s = pool.stats();
        let h = HASHES_PER_DIFF;
        assert!(within(s.rates.hashrate1m, 1250.0 * h), "{:?}", s.rates);
        assert!(within(s.rates.sps1m, 1.5), "{:?}", s.rates);
        assert!(s.rates.hashrate1d > 0.0 && s.rates.hashrate1d < s.rates.hashrate1m);
        let alice = &s.users["alice"];
        let w1 = &alice.workers["alice.rig1"];
        let w2 = &alice.workers["alice.rig2"];
        assert!(within(w1.hashrate.hashrate1m, 1000.0 * h));
        assert!(within(w2.hashrate.hashrate1m, 250.0 * h));
        assert!(within(
            alice.hashrate.hashrate1m,
            w1.hashrate.hashrate1m + w2.hashrate.hashrate1m
        ));
        assert_eq!(w1.lastshare, 1_700_000_300);
        assert_eq!(alice.lastshare, 1_700_000_300);
        assert_eq!(w2.rejected, 150);
        assert!(within(s.round_diff, 150.0 * 2500.0));
    }

    #[test]
    fn shares_before_a_zero_interval_sample_are_not_lost() {
        let pool = pool();
        let t0 = Instant::now();
        let stripe = pool.totals_stripe();
        let w = pool.worker_stats("bob", "bob");
        pool.sample_rates(t0);
        let mut now = t0;
        for _ in 0..150 {
            now += Duration::from_secs(2);
            pool.record_share(&stripe, &w, Some(20.0), 20.0, None, now);
            // A second sample at the same instant folds nothing in and drops nothing.
            pool.sample_rates(now);
            pool.sample_rates(now);
        }
        let s = pool.stats();
        assert!(within(s.rates.hashrate1m, 10.0 * HASHES_PER_DIFF));
        assert!(within(
            s.users["bob"].workers["bob"].hashrate.hashrate1m,
            10.0 * HASHES_PER_DIFF
        ));
        // Without a wall clock, share times are unknown.
        assert_eq!(s.users["bob"].lastshare, 0);
    }

    #[test]
    fn a_worker_first_seen_after_the_baseline_counts_from_zero() {
        let pool = pool();
        let t0 = Instant::now();
        let stripe = pool.totals_stripe();
        pool.sample_rates(t0);
        let w = pool.worker_stats("carol", "carol.a");
        pool.record_share(&stripe, &w, Some(120.0), 120.0, None, t0);
        pool.sample_rates(t0 + Duration::from_secs(2));
        let s = pool.stats();
        let expected = 60.0 * HASHES_PER_DIFF * (1.0 - (-2.0f64 / 60.0).exp());
        assert!(within(
            s.users["carol"].workers["carol.a"].hashrate.hashrate1m,
            expected
        ));
        assert!(within(s.rates.hashrate1m, expected));
    }

    #[test]
    fn round_restarts_at_a_block_and_parked_sessions_expire() {
        let pool = pool();
        let t0 = Instant::now();
        let stripe = pool.totals_stripe();
        let w = pool.worker_stats("dave", "dave");
        pool.record_share(&stripe, &w, Some(100.0), 100.0, None, t0);
        pool.sample_rates(t0);
        assert!(within(pool.stats().round_diff, 100.0));
        pool.record_block(&BlockCandidate {
            height: 1,
            hash: "00".into(),
            hex: None,
            source: SourceId::TEMPLATE,
            worker: "dave".into(),
            job_id: 1,
        });
        pool.record_share(&stripe, &w, Some(7.0), 7.0, None, t0);
        pool.sample_rates(t0 + Duration::from_secs(2));
        assert_eq!(pool.stats().round_diff, 0.0);
        pool.record_share(&stripe, &w, Some(7.0), 7.0, None, t0);
        pool.sample_rates(t0 + Duration::from_secs(4));
        assert!(within(pool.stats().round_diff, 7.0));

        pool.park_session(1, SourceId::TEMPLATE, 11, t0);
        pool.park_session(2, SourceId::TEMPLATE, 12, t0 + Duration::from_secs(300));
        pool.sample_rates(t0 + Duration::from_secs(400));
        assert_eq!(pool.stats().disconnected, 2);
        pool.sample_rates(t0 + pool.cfg.resume_window + Duration::from_secs(1));
        assert_eq!(pool.stats().disconnected, 1);
    }
}
