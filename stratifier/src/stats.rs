//! The stats registry: counters where they change (a stripe of pool totals per shard, a cell
//! per worker), moving averages the sampler folds in, and a snapshot that every view (admin
//! `stats`, the stats files) renders.
//!
//! Best shares are kept per round and ever. The round is the number of blocks found
//! ([`StatsRegistry::record_block`] bumps it); each counter remembers the round of its best
//! share, and one from an older round reads and counts as zero, so a block resets every best
//! share without walking any worker. The share that found the block is left out of the new
//! round's best (ckpool's rule) but not out of the best ever.
//!
//! At start-up the daemon may seed a fresh registry from the stats files
//! ([`StatsRegistry::seed_pool`], [`StatsRegistry::seed_worker`]): totals and best shares as
//! saved, moving averages decayed by the time since they were saved with the same formula the
//! sampler uses ([`Ema::idle`]), share times placed on this process's clock ([`SeedClock`]).
//! Seeded workers are ordinary cells held by no session: the usual pruning applies to them.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use serde::Serialize;

use crate::handover::{HandoverError, Reader, Writer};
use crate::job::Job;
use crate::pool::BlockCandidate;
use crate::rates::{Decay, Ema, HASHES_PER_DIFF, POOL_WINDOWS, SPS_WINDOWS, USER_WINDOWS};
use crate::reject::Reject;

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
    /// Best share difficulty of the current round (since the pool's last block; the share that
    /// found it counts in the round it ended, as in ckpool).
    pub bestshare: f64,
    /// Best share difficulty ever (kept across rounds and, through the stats files, restarts).
    pub bestever: f64,
    /// Time of the last accepted share, unix seconds; 0 if none (or if the daemon has not told
    /// the pool the wall-clock time, see [`crate::Pool::set_wall_clock`]).
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
    /// Best share difficulty of the current round.
    pub bestshare: f64,
    /// Best share difficulty ever.
    pub bestever: f64,
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
    /// Best of round `round`.
    bestshare: f64,
    round: u64,
    bestever: f64,
    reject_reasons: BTreeMap<&'static str, u64>,
}

impl Totals {
    fn accept(&mut self, diff: f64, sdiff: f64, round: u64, solved: bool) {
        self.accepted += 1;
        self.accepted_diff += diff;
        self.bestshare = best_of_round(self.bestshare, self.round, round);
        self.round = round;
        if !solved {
            self.bestshare = self.bestshare.max(sdiff);
        }
        self.bestever = self.bestever.max(sdiff);
    }

    fn reject(&mut self, reason: Option<Reject>) {
        self.rejected += 1;
        if let Some(r) = reason {
            *self.reject_reasons.entry(r.message()).or_default() += 1;
        }
    }
}

/// A best share kept for round `of`, as of round `now`: gone once a block has ended its round.
fn best_of_round(best: f64, of: u64, now: u64) -> f64 {
    if of == now { best } else { 0.0 }
}

/// The number of blocks found so far: the current round. Only a block writes it, every share
/// reads it, so it has a cache line of its own.
#[derive(Debug, Default)]
#[repr(align(128))]
struct Round(AtomicU64);

/// Stripes of pool totals (shards beyond this share them).
const STRIPES: usize = 64;

/// Share counters of one user or worker.
#[derive(Debug, Default, Clone, Copy)]
struct Counters {
    accepted: u64,
    rejected: u64,
    accepted_diff: f64,
    /// Best of round `round`.
    bestshare: f64,
    round: u64,
    bestever: f64,
    last_share: Option<Instant>,
}

impl Counters {
    /// Counts a share: accepted at difficulty `accepted` (`solved`: it found a block, which
    /// ended round `round - 1`: it stays out of the new round's best), or rejected.
    fn add(&mut self, accepted: Option<f64>, sdiff: f64, now: Instant, round: u64, solved: bool) {
        match accepted {
            Some(diff) => {
                self.accepted += 1;
                self.accepted_diff += diff;
                self.bestshare = best_of_round(self.bestshare, self.round, round);
                self.round = round;
                if !solved {
                    self.bestshare = self.bestshare.max(sdiff);
                }
                self.bestever = self.bestever.max(sdiff);
                self.last_share = Some(now);
            }
            None => self.rejected += 1,
        }
    }

    /// Whether it has accepted difficulty: shares counted here, or figures seeded from a stats
    /// file (which give the difficulty but not the number of shares).
    fn has_accepted(&self) -> bool {
        self.accepted > 0 || self.accepted_diff > 0.0
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
    /// The address of the client whose share created it (counted against that address's cap).
    creator: Option<IpAddr>,
}

/// The users, and how many of them each client address created.
#[derive(Debug, Default)]
struct Users {
    map: BTreeMap<String, Arc<UserCell>>,
    by_ip: HashMap<IpAddr, u32>,
}

impl Users {
    /// Removes `name` and gives its creator's count back.
    fn remove(&mut self, name: &str) {
        if let Some(u) = self.map.remove(name)
            && let Some(ip) = u.creator
            && let Some(n) = self.by_ip.get_mut(&ip)
        {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.by_ip.remove(&ip);
            }
        }
    }
}

/// Where a worker's shares are counted: looked up by name once (at its first share), then
/// held by its session, so counting a share compares no strings.
#[derive(Debug, Clone)]
pub(crate) struct WorkerStatsRef {
    worker: Arc<WorkerCell>,
}

/// One user as [`StatsRegistry::visit_users`] shows it.
pub struct UserView<'a> {
    registry: &'a StatsRegistry,
    round: u64,
    workers: Vec<(String, Arc<WorkerCell>)>,
    /// The user's figures, summed over its workers when the view was made (`workers` empty:
    /// see [`UserView::workers`]).
    pub stats: UserStats,
}

impl UserView<'_> {
    /// Its workers (by full name, in name order), each worker's figures read when the
    /// iterator reaches it: walking it twice reads them twice, and what was counted in
    /// between shows in the second walk (and not in [`UserView::stats`]).
    pub fn workers(&self) -> impl Iterator<Item = (&str, WorkerStats)> + '_ {
        self.workers.iter().map(|(name, cell)| {
            let mut w = *cell.counters.lock();
            w.bestshare = best_of_round(w.bestshare, w.round, self.round);
            let r = cell.rates.lock().ema;
            (
                name.as_str(),
                WorkerStats {
                    accepted: w.accepted,
                    rejected: w.rejected,
                    accepted_diff: w.accepted_diff,
                    bestshare: w.bestshare,
                    bestever: w.bestever,
                    lastshare: self.registry.unix_secs(w.last_share),
                    hashrate: Hashrates::from_ema(&r),
                },
            )
        })
    }
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
    /// Best share difficulty of the current round (since the pool's last block).
    pub bestshare: f64,
    /// Best share difficulty ever.
    pub bestever: f64,
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

/// Counters read from a handover blob, not yet installed.
#[derive(Debug)]
pub(crate) struct SavedStats {
    totals: Totals,
    blocks: Vec<String>,
    sampler: PoolSampler,
    dropped_invalid: u64,
    parked: u64,
    users: Users,
}

/// The pool's figures as a stats file saved them, to seed a fresh registry with
/// ([`StatsRegistry::seed_pool`]). Rates are as they were when saved; seeding decays them.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SeedPool {
    /// Hashrates in hashes per second over 1, 5 and 15 minutes, 1 and 6 hours, 1 and 7 days.
    pub hashrates: [f64; 7],
    /// Accepted shares per second over 1, 5 and 15 minutes and 1 hour.
    pub sps: [f64; 4],
    /// Sum of accepted difficulty.
    pub accepted_diff: f64,
    /// Rejected shares.
    pub rejected: u64,
    /// Best share of the current round.
    pub bestshare: f64,
    /// Difficulty accepted in the current round (since the pool's last block).
    pub round_diff: f64,
}

/// One worker's figures as a user's stats file saved them ([`StatsRegistry::seed_worker`]).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SeedWorker {
    /// Hashrates in hashes per second over 1 and 5 minutes, 1 hour, 1 and 7 days.
    pub hashrates: [f64; 5],
    /// Sum of accepted difficulty.
    pub accepted_diff: f64,
    /// Best share of the current round.
    pub bestshare: f64,
    /// Best share ever.
    pub bestever: f64,
    /// Time of its last accepted share, unix seconds (0: none).
    pub lastshare: u64,
    /// Its count of accepted shares as saved (0 when the file does not say: ckpool's do not).
    /// Shares the pool accepts after the seed are numbered from it.
    pub accepted: u64,
}

/// When seeded figures were saved and what time it is now, to decay them by the gap and place
/// their share times on this process's clock.
#[derive(Debug, Clone, Copy)]
pub struct SeedClock {
    /// This process's present...
    pub now: Instant,
    /// ...and the wall-clock time then, since the unix epoch.
    pub since_epoch: Duration,
    /// When the figures were saved, unix seconds (a file's `lastupdate`).
    pub saved: u64,
}

impl SeedClock {
    /// How long ago the figures were saved (zero if the clock says they come from the future).
    pub fn gap(&self) -> Duration {
        self.since_epoch
            .saturating_sub(Duration::from_secs(self.saved))
    }

    /// `unix` seconds on this process's clock; `None` for 0 (never).
    fn instant(&self, unix: u64) -> Option<Instant> {
        if unix == 0 {
            return None;
        }
        // Half way through that second, so that turning it back into unix seconds (which
        // truncates) gives `unix` again despite any drift between the two clocks.
        let at = Duration::from_secs(unix) + Duration::from_millis(500);
        let age = self.since_epoch.saturating_sub(at);
        // An instant before the machine's boot may not be representable: the oldest one that
        // is stands in (it is forgotten as idle just the same).
        Some(self.now.checked_sub(age).unwrap_or(self.now))
    }
}

/// Every statistic of the pool.
pub struct StatsRegistry {
    stats: Mutex<Stats>,
    totals: Box<[Arc<Stripe>]>,
    next_stripe: AtomicU64,
    users: Mutex<Users>,
    /// Where the shares of workers refused a cell of their own are counted (in the pool
    /// totals only: it is in no user's table).
    overflow: Arc<WorkerCell>,
    /// Distinct users one client address may create (0: no limit).
    max_users_per_ip: AtomicU64,
    /// When idle users were last looked for.
    last_forget: Mutex<Option<Instant>>,
    sampler: Mutex<PoolSampler>,
    /// The current round (best shares are per round).
    round: Round,
    /// An instant and the wall-clock time then (since the unix epoch), to report share times.
    wall_clock: Mutex<Option<(Instant, Duration)>>,
    /// Parked sessions within the resume window, as of the last sample.
    parked: AtomicU64,
    /// Connected clients.
    pub(crate) clients: AtomicU64,
    /// Clients dropped for a run of invalid shares.
    pub(crate) dropped_invalid: AtomicU64,
    /// The current job of the pool's own source: id, height and network difficulty.
    job: Mutex<Option<(String, u64, f64)>>,
}

impl std::fmt::Debug for StatsRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StatsRegistry").finish_non_exhaustive()
    }
}

impl Default for StatsRegistry {
    fn default() -> Self {
        Self {
            stats: Mutex::new(Stats::default()),
            totals: (0..STRIPES).map(|_| Arc::new(Stripe::default())).collect(),
            next_stripe: AtomicU64::new(0),
            users: Mutex::new(Users::default()),
            overflow: Arc::new(WorkerCell::default()),
            max_users_per_ip: AtomicU64::new(0),
            last_forget: Mutex::new(None),
            sampler: Mutex::new(PoolSampler::default()),
            round: Round::default(),
            wall_clock: Mutex::new(None),
            parked: AtomicU64::new(0),
            clients: AtomicU64::new(0),
            dropped_invalid: AtomicU64::new(0),
            job: Mutex::new(None),
        }
    }
}

impl StatsRegistry {
    /// Records the current job of the pool's own source, for snapshots.
    pub(crate) fn set_job(&self, j: &Job) {
        *self.job.lock() = Some((j.id_hex.clone(), j.height(), j.network_diff.to_f64()));
    }

    /// Counts a block found (the candidate itself leaves as an [`crate::Event::Block`]).
    /// A new round starts: best shares of the pool, every user and every worker start again
    /// (each is reset when next counted or read, so nothing is walked here).
    pub(crate) fn record_block(&self, b: &BlockCandidate) {
        self.round.0.fetch_add(1, Ordering::Relaxed);
        self.stats.lock().blocks.push(b.hash.clone());
        let user = b.worker.split(['.', '_']).next().unwrap_or("");
        self.user_cell(user).blocks.fetch_add(1, Ordering::Relaxed);
    }

    /// ckpool's admin `resetshares`: the best shares of the round (the pool's, every user's
    /// and every worker's) start again from zero, as after a block, but no block is counted
    /// and the best ever stay. Nothing is walked: the round moves on.
    pub fn reset_best_shares(&self) {
        self.round.0.fetch_add(1, Ordering::Relaxed);
    }

    fn user_cell(&self, user: &str) -> Arc<UserCell> {
        let mut users = self.users.lock();
        if let Some(u) = users.map.get(user) {
            return Arc::clone(u);
        }
        let u = Arc::new(UserCell::default());
        users.map.insert(user.to_owned(), Arc::clone(&u));
        u
    }

    /// Limits the distinct users one client address may create (0: no limit).
    pub(crate) fn set_max_users_per_ip(&self, n: usize) {
        self.max_users_per_ip
            .store(u64::try_from(n).unwrap_or(u64::MAX), Ordering::Relaxed);
    }

    /// The counters of `worker` (of `user`), created on first use, with no limit per address.
    #[cfg(test)]
    pub(crate) fn worker_stats(&self, user: &str, worker: &str) -> WorkerStatsRef {
        self.worker_stats_from(user, worker, None)
    }

    /// The counters of `worker` (of `user`), created on first use by a client from `ip`. A new
    /// user beyond the address's limit gets no entry: its shares count in the pool totals only.
    pub(crate) fn worker_stats_from(
        &self,
        user: &str,
        worker: &str,
        ip: Option<IpAddr>,
    ) -> WorkerStatsRef {
        let mut users = self.users.lock();
        let cell = match users.map.get(user) {
            Some(u) => Arc::clone(u),
            None => {
                let max = self.max_users_per_ip.load(Ordering::Relaxed);
                if let Some(ip) = ip {
                    let n = users.by_ip.entry(ip).or_default();
                    if max != 0 && u64::from(*n) >= max {
                        if *n == 0 {
                            users.by_ip.remove(&ip);
                        }
                        return WorkerStatsRef {
                            worker: Arc::clone(&self.overflow),
                        };
                    }
                    *n += 1;
                }
                let u = Arc::new(UserCell {
                    creator: ip,
                    ..UserCell::default()
                });
                users.map.insert(user.to_owned(), Arc::clone(&u));
                u
            }
        };
        let mut workers = cell.workers.lock();
        let worker = match workers.get(worker) {
            Some(w) => Arc::clone(w),
            None => {
                let w = Arc::new(WorkerCell::default());
                workers.insert(worker.to_owned(), Arc::clone(&w));
                w
            }
        };
        WorkerStatsRef { worker }
    }

    /// A session counting into `w` (for `worker` of `user`) closed: a worker no session counts
    /// into any more and with no accepted share is forgotten, and so is its user once it has no
    /// worker and no block.
    pub(crate) fn release(&self, user: &str, worker: &str, w: WorkerStatsRef) {
        let cell = w.worker;
        if Arc::ptr_eq(&cell, &self.overflow) {
            return;
        }
        let mut users = self.users.lock();
        let Some(u) = users.map.get(user).map(Arc::clone) else {
            return;
        };
        let mut workers = u.workers.lock();
        let held = workers.get(worker).is_some_and(|c| Arc::ptr_eq(c, &cell));
        drop(cell);
        if held
            && let Some(c) = workers.get(worker)
            // The table's reference only: no session counts into it.
            && Arc::strong_count(c) == 1
            && !c.counters.lock().has_accepted()
        {
            workers.remove(worker);
        }
        let empty = workers.is_empty();
        drop(workers);
        if empty && u.blocks.load(Ordering::Relaxed) == 0 {
            drop(u);
            users.remove(user);
        }
    }

    /// Forgets the workers no session counts into whose last accepted share is older than
    /// `idle` (or that have none), and the users left with no worker and no block. The sampler
    /// calls it; it walks every worker under the users' lock, so at most once a minute.
    pub(crate) fn forget_idle(&self, now: Instant, idle: Duration) {
        {
            let mut last = self.last_forget.lock();
            if last.is_some_and(|t| now.saturating_duration_since(t) < Duration::from_secs(60)) {
                return;
            }
            *last = Some(now);
        }
        let mut users = self.users.lock();
        let mut gone = Vec::new();
        for (name, u) in &users.map {
            let mut workers = u.workers.lock();
            workers.retain(|_, c| {
                Arc::strong_count(c) > 1
                    || c.counters
                        .lock()
                        .last_share
                        .is_some_and(|t| now.saturating_duration_since(t) < idle)
            });
            if workers.is_empty() && u.blocks.load(Ordering::Relaxed) == 0 {
                gone.push(name.clone());
            }
        }
        for name in gone {
            users.remove(&name);
        }
    }

    /// Clients dropped so far for a run of invalid shares
    /// ([`crate::PoolConfig::max_invalid_shares`]).
    pub fn dropped_invalid(&self) -> u64 {
        self.dropped_invalid.load(Ordering::Relaxed)
    }

    /// Users in the table.
    pub fn users(&self) -> usize {
        self.users.lock().map.len()
    }

    /// A stripe of the pool totals for a new shard to count into.
    pub(crate) fn totals_stripe(&self) -> Arc<Stripe> {
        let n = self.next_stripe.fetch_add(1, Ordering::Relaxed) % STRIPES as u64;
        // `n < STRIPES`, the length of `totals`.
        Arc::clone(&self.totals[usize::try_from(n).unwrap_or(0)])
    }

    /// Counts a share in `stripe`: accepted at difficulty `accepted`, or rejected for `reason`.
    /// `solved`: it found a block (recorded first with [`StatsRegistry::record_block`]); it
    /// counts in the best ever but not in the best of the round it started. Returns the
    /// worker's count of accepted shares after it: an accepted share's number, which the share
    /// journal records so that a replay after a crash counts each share once.
    #[expect(
        clippy::too_many_arguments,
        reason = "the share path: no struct to build"
    )]
    pub(crate) fn record_share(
        &self,
        stripe: &Stripe,
        w: &WorkerStatsRef,
        accepted: Option<f64>,
        sdiff: f64,
        solved: bool,
        reason: Option<Reject>,
        now: Instant,
    ) -> u64 {
        let round = self.round.0.load(Ordering::Relaxed);
        {
            let mut t = stripe.0.lock();
            match accepted {
                Some(diff) => t.accept(diff, sdiff, round, solved),
                None => t.reject(reason),
            }
        }
        let mut c = w.worker.counters.lock();
        c.add(accepted, sdiff, now, round, solved);
        c.accepted
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
    /// and every worker, and records `parked`, the sessions kept for resume. Called every few
    /// seconds from one thread (calls are serialised); the first call only records a baseline.
    ///
    /// The share path only adds to cumulative counters; this reads them and takes differences,
    /// so a share never computes an average or waits for this.
    pub(crate) fn sample(&self, now: Instant, parked: usize) {
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

    /// Writes every counter for a handover: the pool totals (the stripes added up), the
    /// blocks found, the sampler's state (rates and round), and each user's and worker's
    /// counters and rates. Times as ages before `now`.
    pub(crate) fn save(&self, w: &mut Writer, now: Instant) {
        let round = self.round.0.load(Ordering::Relaxed);
        let mut t = Totals::default();
        for stripe in &*self.totals {
            let s = stripe.0.lock();
            t.accepted += s.accepted;
            t.rejected += s.rejected;
            t.accepted_diff += s.accepted_diff;
            t.bestshare = t.bestshare.max(best_of_round(s.bestshare, s.round, round));
            t.bestever = t.bestever.max(s.bestever);
            for (k, v) in &s.reject_reasons {
                *t.reject_reasons.entry(k).or_default() += v;
            }
        }
        w.u64(t.accepted);
        w.u64(t.rejected);
        w.f64(t.accepted_diff);
        w.f64(t.bestshare);
        w.f64(t.bestever);
        w.len(t.reject_reasons.len());
        for (k, v) in &t.reject_reasons {
            w.str(k);
            w.u64(*v);
        }
        {
            let stats = self.stats.lock();
            w.len(stats.blocks.len());
            for b in &stats.blocks {
                w.str(b);
            }
        }
        {
            let p = self.sampler.lock();
            w.opt_age(p.last, now);
            w.f64(p.sampled_diff);
            w.u64(p.sampled_shares);
            for r in p.diff.rates() {
                w.f64(r);
            }
            for r in p.shares.rates() {
                w.f64(r);
            }
            w.u64(u64::try_from(p.blocks_seen).unwrap_or(u64::MAX));
            w.f64(p.round_start_diff);
        }
        w.u64(self.dropped_invalid.load(Ordering::Relaxed));
        w.u64(self.parked.load(Ordering::Relaxed));
        let users: Vec<(String, Arc<UserCell>)> = self
            .users
            .lock()
            .map
            .iter()
            .map(|(k, v)| (k.clone(), Arc::clone(v)))
            .collect();
        w.len(users.len());
        for (name, u) in users {
            w.str(&name);
            w.u64(u.blocks.load(Ordering::Relaxed));
            match u.creator {
                None => w.u8(0),
                Some(ip) => {
                    w.u8(1);
                    w.ip(ip);
                }
            }
            let workers = u.workers.lock();
            w.len(workers.len());
            for (wname, cell) in workers.iter() {
                w.str(wname);
                let c = *cell.counters.lock();
                w.u64(c.accepted);
                w.u64(c.rejected);
                w.f64(c.accepted_diff);
                w.f64(best_of_round(c.bestshare, c.round, round));
                w.f64(c.bestever);
                w.opt_age(c.last_share, now);
                let r = *cell.rates.lock();
                w.f64(r.sampled_diff);
                for x in r.ema.rates() {
                    w.f64(x);
                }
            }
        }
    }

    /// Reads what [`StatsRegistry::save`] wrote, to install with [`StatsRegistry::restore`].
    pub(crate) fn load(r: &mut Reader<'_>, now: Instant) -> Result<SavedStats, HandoverError> {
        let mut totals = Totals {
            accepted: r.u64()?,
            rejected: r.u64()?,
            accepted_diff: r.f64()?,
            bestshare: r.f64()?,
            // The round counts from zero again in the registry restored into.
            round: 0,
            bestever: r.f64()?,
            reject_reasons: BTreeMap::new(),
        };
        let n = r.count(12)?;
        for _ in 0..n {
            let msg = r.str("reject reason")?;
            let count = r.u64()?;
            let reason = Reject::ALL
                .iter()
                .find(|x| x.message() == msg)
                .ok_or(HandoverError::Malformed("reject reason"))?;
            *totals.reject_reasons.entry(reason.message()).or_default() += count;
        }
        let n = r.count(4)?;
        let mut blocks = Vec::with_capacity(n);
        for _ in 0..n {
            blocks.push(r.str("block hash")?.to_owned());
        }
        let last = r.opt_age(now)?;
        let sampled_diff = r.f64()?;
        let sampled_shares = r.u64()?;
        let mut diff = [0.0; 7];
        for x in &mut diff {
            *x = r.f64()?;
        }
        let mut shares = [0.0; 4];
        for x in &mut shares {
            *x = r.f64()?;
        }
        let sampler = PoolSampler {
            last,
            sampled_diff,
            sampled_shares,
            diff: Ema::from_rates(diff),
            shares: Ema::from_rates(shares),
            blocks_seen: usize::try_from(r.u64()?).unwrap_or(usize::MAX),
            round_start_diff: r.f64()?,
        };
        let dropped_invalid = r.u64()?;
        let parked = r.u64()?;
        let n = r.count(17)?;
        let mut users = Users::default();
        for _ in 0..n {
            let name = r.str("user")?.to_owned();
            let blocks = r.u64()?;
            let creator = if r.bool("creator")? {
                Some(r.ip()?)
            } else {
                None
            };
            let count = r.count(85)?;
            let mut workers = BTreeMap::new();
            for _ in 0..count {
                let wname = r.str("worker")?.to_owned();
                let counters = Counters {
                    accepted: r.u64()?,
                    rejected: r.u64()?,
                    accepted_diff: r.f64()?,
                    bestshare: r.f64()?,
                    round: 0,
                    bestever: r.f64()?,
                    last_share: r.opt_age(now)?,
                };
                let sampled_diff = r.f64()?;
                let mut ema = [0.0; 5];
                for x in &mut ema {
                    *x = r.f64()?;
                }
                let cell = WorkerCell {
                    counters: Mutex::new(counters),
                    rates: Mutex::new(WorkerRates {
                        sampled_diff,
                        ema: Ema::from_rates(ema),
                    }),
                };
                workers.insert(wname, Arc::new(cell));
            }
            if let Some(ip) = creator {
                *users.by_ip.entry(ip).or_default() += 1;
            }
            let cell = UserCell {
                blocks: AtomicU64::new(blocks),
                workers: Mutex::new(workers),
                creator,
            };
            users.map.insert(name, Arc::new(cell));
        }
        Ok(SavedStats {
            totals,
            blocks,
            sampler,
            dropped_invalid,
            parked,
            users,
        })
    }

    /// Installs counters [`StatsRegistry::load`] read, in place of this registry's (a fresh
    /// pool's). The totals go into the first stripe.
    pub(crate) fn restore(&self, saved: SavedStats) {
        for stripe in &*self.totals {
            *stripe.0.lock() = Totals::default();
        }
        if let Some(first) = self.totals.first() {
            *first.0.lock() = saved.totals;
        }
        self.stats.lock().blocks = saved.blocks;
        self.round.0.store(0, Ordering::Relaxed);
        *self.sampler.lock() = saved.sampler;
        self.dropped_invalid
            .store(saved.dropped_invalid, Ordering::Relaxed);
        self.parked.store(saved.parked, Ordering::Relaxed);
        *self.users.lock() = saved.users;
    }

    /// Seeds a fresh registry's pool figures from a stats file (start-up, before the first
    /// share and the first [`crate::Pool::sample_rates`]): the totals, best share and round
    /// are added to what is counted, and the moving averages take the saved rates decayed by
    /// the time since they were saved, as a share-less interval of that length would decay
    /// them ([`Ema::idle`]). The next sample then goes on from `clock.now`.
    pub fn seed_pool(&self, seed: &SeedPool, clock: &SeedClock) {
        let finite = |x: f64| if x.is_finite() && x > 0.0 { x } else { 0.0 };
        let round = self.round.0.load(Ordering::Relaxed);
        if let Some(first) = self.totals.first() {
            let mut t = first.0.lock();
            t.accepted_diff += finite(seed.accepted_diff);
            t.rejected = t.rejected.saturating_add(seed.rejected);
            t.bestshare = best_of_round(t.bestshare, t.round, round).max(finite(seed.bestshare));
            t.round = round;
            t.bestever = t.bestever.max(finite(seed.bestshare));
        }
        let gap = clock.gap();
        let mut diff = Ema::from_rates(seed.hashrates.map(|h| finite(h) / HASHES_PER_DIFF));
        diff.idle(gap, &POOL_WINDOWS);
        let mut shares = Ema::from_rates(seed.sps.map(finite));
        shares.idle(gap, &SPS_WINDOWS);
        let (total_diff, total_shares) = self.totals.iter().fold((0.0, 0u64), |(d, n), s| {
            let t = s.0.lock();
            (d + t.accepted_diff, n + t.accepted)
        });
        let blocks = self.stats.lock().blocks.len();
        let mut p = self.sampler.lock();
        p.diff = diff;
        p.shares = shares;
        p.last = Some(clock.now);
        p.sampled_diff = total_diff;
        p.sampled_shares = total_shares;
        p.blocks_seen = blocks;
        p.round_start_diff = total_diff - finite(seed.round_diff).min(total_diff);
    }

    /// Seeds worker `worker` of user `user` from a user's stats file (start-up, see
    /// [`StatsRegistry::seed_pool`]): its accepted difficulty, best shares, last share and
    /// hashrates decayed by the time since they were saved. The user's own figures are the
    /// sums of its workers', as for any user. A seeded user is created by no address (it
    /// counts against no `maxusersperip`), and a seeded worker is held by no session, so the
    /// usual pruning forgets it once its last share is older than `statsidle`. A worker the
    /// registry already has is left as it is; returns whether this one was added.
    pub fn seed_worker(
        &self,
        user: &str,
        worker: &str,
        seed: &SeedWorker,
        clock: &SeedClock,
    ) -> bool {
        let finite = |x: f64| if x.is_finite() && x > 0.0 { x } else { 0.0 };
        let cell = self.user_cell(user);
        let mut workers = cell.workers.lock();
        if workers.contains_key(worker) {
            return false;
        }
        let mut ema = Ema::from_rates(seed.hashrates.map(|h| finite(h) / HASHES_PER_DIFF));
        ema.idle(clock.gap(), &USER_WINDOWS);
        let accepted_diff = finite(seed.accepted_diff);
        let bestshare = finite(seed.bestshare);
        let bestever = finite(seed.bestever).max(bestshare);
        let w = WorkerCell {
            counters: Mutex::new(Counters {
                accepted: seed.accepted,
                rejected: 0,
                accepted_diff,
                bestshare,
                round: self.round.0.load(Ordering::Relaxed),
                bestever,
                last_share: clock.instant(seed.lastshare),
            }),
            rates: Mutex::new(WorkerRates {
                // Already counted: the next sample folds in only what comes after it.
                sampled_diff: accepted_diff,
                ema,
            }),
        };
        workers.insert(worker.to_owned(), Arc::new(w));
        drop(workers);
        // The pool's best ever is at least its users' (`pool.status` does not save it).
        if let Some(first) = self.totals.first() {
            let mut t = first.0.lock();
            t.bestever = t.bestever.max(bestever);
        }
        true
    }

    /// Every worker, without holding the user table's lock while the caller works on them.
    fn worker_cells(&self) -> Vec<Arc<WorkerCell>> {
        let users: Vec<Arc<UserCell>> = self.users.lock().map.values().cloned().collect();
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

    /// A [`StatsRegistry::snapshot`] with at most `max_users` users: those with the highest
    /// 1-minute hashrate (then accepted difficulty, then name), for replies that must stay
    /// bounded whatever the number of users ([`StatsRegistry::users`] gives the total).
    pub fn snapshot_top(&self, max_users: usize) -> StatsSnapshot {
        let mut snap = self.snapshot();
        if snap.users.len() > max_users {
            let mut ranked: Vec<(String, UserStats)> =
                std::mem::take(&mut snap.users).into_iter().collect();
            ranked.sort_by(|(an, a), (bn, b)| {
                b.hashrate
                    .hashrate1m
                    .total_cmp(&a.hashrate.hashrate1m)
                    .then(b.accepted_diff.total_cmp(&a.accepted_diff))
                    .then(an.cmp(bn))
            });
            ranked.truncate(max_users);
            snap.users = ranked.into_iter().collect();
        }
        snap
    }

    /// A snapshot of every counter: pool totals, rates, users and workers. It takes each
    /// counter's own small lock in turn, never one that the share path waits on for long.
    pub fn snapshot(&self) -> StatsSnapshot {
        let mut snap = self.snapshot_pool();
        self.visit_users(|name, user| {
            let mut stats = user.stats.clone();
            stats.workers = user.workers().map(|(n, w)| (n.to_owned(), w)).collect();
            snap.users.insert(name.to_owned(), stats);
        });
        snap
    }

    /// Visits the users one at a time, without a copy of them all: `f` gets each user's name and
    /// a [`UserView`] (its figures, and its workers' figures read one by one as
    /// [`UserView::workers`] is walked). A stats file writer holds one user's list of worker
    /// handles at a time instead of a [`StatsSnapshot`] of every worker (for a user of 1,000
    /// workers, about 30 KB instead of 0.5 MB).
    pub fn visit_users(&self, mut f: impl FnMut(&str, &UserView<'_>)) {
        let round = self.round.0.load(Ordering::Relaxed);
        let user_cells: Vec<(String, Arc<UserCell>)> = self
            .users
            .lock()
            .map
            .iter()
            .map(|(name, u)| (name.clone(), Arc::clone(u)))
            .collect();
        for (name, u) in user_cells {
            let workers: Vec<(String, Arc<WorkerCell>)> = u
                .workers
                .lock()
                .iter()
                .map(|(n, cell)| (n.clone(), Arc::clone(cell)))
                .collect();
            let mut view = UserView {
                registry: self,
                round,
                workers,
                stats: UserStats::default(),
            };
            let mut c = Counters::default();
            let mut ema = Ema::<5>::default();
            for (_, cell) in &view.workers {
                let mut w = *cell.counters.lock();
                w.bestshare = best_of_round(w.bestshare, w.round, round);
                c.accepted += w.accepted;
                c.rejected += w.rejected;
                c.accepted_diff += w.accepted_diff;
                c.bestshare = c.bestshare.max(w.bestshare);
                c.bestever = c.bestever.max(w.bestever);
                c.last_share = c.last_share.max(w.last_share);
                ema.add(&cell.rates.lock().ema);
            }
            view.stats = UserStats {
                accepted: c.accepted,
                rejected: c.rejected,
                accepted_diff: c.accepted_diff,
                bestshare: c.bestshare,
                bestever: c.bestever,
                lastshare: self.unix_secs(c.last_share),
                hashrate: Hashrates::from_ema(&ema),
                blocks: u.blocks.load(Ordering::Relaxed),
                workers: BTreeMap::new(),
            };
            f(&name, &view);
        }
    }

    /// [`StatsRegistry::snapshot`] without the users: pool totals, rates, blocks, job.
    pub fn snapshot_pool(&self) -> StatsSnapshot {
        let round = self.round.0.load(Ordering::Relaxed);
        let job = self.job.lock().clone();
        let users = BTreeMap::new();
        let mut sum = Totals::default();
        for stripe in &self.totals {
            let t = stripe.0.lock();
            sum.accepted += t.accepted;
            sum.rejected += t.rejected;
            sum.accepted_diff += t.accepted_diff;
            sum.bestshare = sum
                .bestshare
                .max(best_of_round(t.bestshare, t.round, round));
            sum.bestever = sum.bestever.max(t.bestever);
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
            bestever: sum.bestever,
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
