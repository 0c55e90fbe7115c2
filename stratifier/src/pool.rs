//! State shared by every shard: the configuration, and three parts each with its own locks: the
//! job books (one per work source, [`crate::book`]), the session tables (extranonce1 and session
//! ids, resume, authorisation back-off, [`crate::tables`]) and the stats registry
//! ([`StatsRegistry`]). Block candidates and share records leave through [`crate::Out`].

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::Difficulty;
use common::address::Network;
use common::template::Template;
use serde::Serialize;

use crate::book::JobBooks;
use crate::handover::{HandoverError, POOL_FORMAT, Reader, Writer};
use crate::job::{CoinbaseConfig, ExtranonceLayout, Job, JobError, SourceId, Work};
use crate::reject::Reject;
use crate::stats::{StatsRegistry, StatsSnapshot};
use crate::tables::SessionTables;

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
    /// The most disconnected sessions kept for resume at once (the oldest go first).
    pub max_parked: usize,
    /// A client is dropped after this many invalid shares in a row (stale ones do not count,
    /// an accepted share ends the run); from half as many on, one share in 8 is checked and the
    /// others are rejected unchecked. 0: never.
    pub max_invalid_shares: u32,
    /// Users and workers with no connection and no accepted share for this long are forgotten
    /// by the rate sampler.
    pub stats_idle: Duration,
    /// Distinct users the clients of one address may add to the stats (0: no limit); the
    /// shares of further users count in the pool totals only.
    pub max_users_per_ip: usize,
    /// Instance name used in messages to miners.
    pub name: String,
    /// Jobs are kept this long (at least the last few).
    pub job_lifetime: Duration,
    /// Userproxy: authorisations are decided outside the stratifier. A valid
    /// `mining.authorize` is not answered at once but leaves as [`crate::Event::Authorise`];
    /// the answer comes with [`crate::Shard::finish_authorise`], or is a refusal when none
    /// came within this long. `None` (the default): authorised here.
    pub external_auth: Option<Duration>,
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
            max_parked: 100_000,
            max_invalid_shares: 100,
            stats_idle: Duration::from_secs(3 * 86_400),
            max_users_per_ip: 256,
            name: "ckpool-rs".into(),
            job_lifetime: Duration::from_secs(600),
            external_auth: None,
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
    /// The solution in the pool's `block` message to its nodes (ckpool.md §5.3): the header,
    /// the coinbase and the share's fields. `None` for upstream work.
    pub solve: Option<Box<common::stratum::node::BlockSolve>>,
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

/// Pool-wide shared state.
pub struct Pool {
    pub(crate) cfg: PoolConfig,
    pub(crate) cb_cfg: CoinbaseConfig,
    /// The job books.
    pub(crate) books: JobBooks,
    /// Session ids, resume and authorisation back-off.
    pub(crate) tables: SessionTables,
    /// Every statistic.
    pub(crate) registry: StatsRegistry,
    /// The reference instant of every stamp kept (given by the caller: no clock is read here).
    pub(crate) epoch: Instant,
    /// Sources whose parked sessions resume from a connection opened on another source.
    joinable: parking_lot::Mutex<Vec<SourceId>>,
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
        let registry = StatsRegistry::default();
        registry.set_max_users_per_ip(cfg.max_users_per_ip);
        Arc::new(Self {
            books: JobBooks::new(ExtranonceLayout::own(&cb_cfg), seed, cfg.job_lifetime),
            tables: SessionTables::new(seed, cfg.resume_window, cfg.max_parked),
            registry,
            cb_cfg,
            cfg,
            epoch,
            joinable: parking_lot::Mutex::new(Vec::new()),
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
        self.books.add_source(layout)
    }

    /// Sets the upstream pool's difficulty for `source` (proxy modes; fractional as sent, a
    /// non-positive value removes it). Shares of the source's miners that meet it leave as
    /// [`crate::Event::Upstream`], and their vardiff never goes above it; miners already above
    /// are lowered with [`crate::Shard::limit_source_diff`].
    pub fn set_upstream_diff(&self, source: SourceId, diff: f64) -> Result<(), JobError> {
        self.books.set_upstream_diff(source, diff)
    }

    /// The upstream difficulty of `source`, if set.
    pub fn upstream_diff(&self, source: SourceId) -> Option<f64> {
        self.books.upstream_diff(source)
    }

    /// Lets a session parked on `source` resume there from a connection that was opened on
    /// another source (`true`), or not (`false`, the default). A userproxy moves a miner that
    /// cannot take `mining.set_extranonce` to its user's upstream with `client.reconnect`; its
    /// new connection opens on the shared source and resumes onto the user's.
    pub fn set_source_joinable(&self, source: SourceId, joinable: bool) {
        let mut j = self.joinable.lock();
        j.retain(|&s| s != source);
        if joinable {
            j.push(source);
        }
    }

    /// Whether sessions parked on `source` resume from connections of other sources.
    pub(crate) fn source_joinable(&self, source: SourceId) -> bool {
        self.joinable.lock().contains(&source)
    }

    /// Extranonce1 values of `source` in use by live and parked sessions, and how many there
    /// are; `None` for an unknown source or a local part wider than 4 bytes (not tracked).
    pub fn enonce1_usage(&self, source: SourceId) -> Option<(u64, u64)> {
        let width = self.layout(source)?.local_len();
        self.tables.enonce1_usage(source, width)
    }

    /// The extranonce layout of `source`.
    pub fn layout(&self, source: SourceId) -> Option<Arc<ExtranonceLayout>> {
        self.books.layout(source)
    }

    /// Turns a new template into the current job of the pool's own source. A changed previous
    /// block makes it a clean job and every older job stale.
    pub fn new_template(
        &self,
        template: Arc<Template>,
        now: Instant,
    ) -> Result<Arc<Job>, JobError> {
        let id = self.books.next_id();
        let clean = self
            .books
            .new_block(SourceId::TEMPLATE, &template.prev_hash)?;
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
        let id = self.books.next_id();
        work.clean |= self.books.new_block(source, &work.prev_hash)?;
        self.install(Arc::new(Job::from_work(id, source, work, now)), now)
    }

    fn install(&self, job: Arc<Job>, now: Instant) -> Result<Arc<Job>, JobError> {
        let job = self.books.install(job, now)?;
        if job.source == SourceId::TEMPLATE {
            self.registry.set_job(&job);
        }
        Ok(job)
    }

    /// The current job of the pool's own source.
    pub fn current_job(&self) -> Option<Arc<Job>> {
        self.books.current(SourceId::TEMPLATE)
    }

    /// The current job of `source`.
    pub fn current_job_of(&self, source: SourceId) -> Option<Arc<Job>> {
        self.books.current(source)
    }

    /// The stats registry.
    pub fn registry(&self) -> &StatsRegistry {
        &self.registry
    }

    /// A statistics snapshot ([`StatsRegistry::snapshot`]).
    pub fn stats(&self) -> StatsSnapshot {
        self.registry.snapshot()
    }

    /// Tells the pool the wall-clock time (since the unix epoch) at `now`, so snapshots can give
    /// share times as unix seconds. The daemon calls it before each sample (the stratifier
    /// itself never reads a clock).
    pub fn set_wall_clock(&self, now: Instant, since_epoch: Duration) {
        self.registry.set_wall_clock(now, since_epoch);
    }

    /// The pool's state for a zero-disconnect upgrade, to hand to the next process's
    /// [`Pool::import_state`]: every source's job book (each live job with its work, origin,
    /// id and duplicate set), the extranonce1 and session id counters with the session id
    /// permutation's keys, the sessions parked for resume (with their remaining time and bound
    /// address), the authorisation back-offs, and the share totals, blocks, round and rates
    /// of the pool and of every user and worker. Times are kept as ages before `now`.
    ///
    /// The live sessions travel apart, one blob each ([`crate::Shard::export_session`]).
    /// Shares and new work should be held while the state is exported (a share counted after
    /// it would be lost to the next process). About 200 bytes, plus each job (its coinbase,
    /// branch and, for a template, its transactions), 9 bytes per share in the duplicate
    /// sets, 28 per parked session and about 100 per worker.
    pub fn export_state(&self, now: Instant) -> Vec<u8> {
        let mut w = Writer::default();
        w.u8(POOL_FORMAT);
        self.books.save(&mut w, now);
        self.tables.save(&mut w, now);
        self.registry.save(&mut w, now);
        w.buf
    }

    /// Takes over the state [`Pool::export_state`] wrote, on a fresh pool (built with the same
    /// configuration, with no source added, no work and no sessions yet); `now` is this
    /// process's present, against which the ages are rebuilt. Sources are added as they were
    /// (the pool's own must have the same extranonce layout). The blob is read whole before
    /// anything changes: a truncated, corrupt or other-version blob is refused with an error
    /// and leaves the pool as it was.
    pub fn import_state(&self, now: Instant, bytes: &[u8]) -> Result<(), HandoverError> {
        let mut r = Reader::new(bytes, POOL_FORMAT)?;
        let books = JobBooks::load(&mut r, now)?;
        let tables = SessionTables::load(&mut r, now)?;
        let stats = StatsRegistry::load(&mut r, now)?;
        r.finish()?;
        let current = self.books.restore(books)?;
        self.tables.restore(tables, self.books.sources());
        self.registry.restore(stats);
        if let Some(job) = current {
            self.registry.set_job(&job);
        }
        Ok(())
    }

    /// Folds the shares accepted since the previous call into the moving averages of the pool
    /// and every worker, forgets parked sessions past the resume window, and users and workers
    /// idle for [`PoolConfig::stats_idle`] (at most once a minute), and compacts the duplicate
    /// sets of the jobs a newer one superseded ([`crate::seen::Seen::seal`]) and packs the
    /// others' when due ([`crate::seen::Seen::pack_if_due`]). Called every few seconds from one
    /// thread (calls are serialised); the first call only records a baseline. Returns whether
    /// a duplicate set was packed (its old buffers freed: the caller may give them back to the
    /// kernel).
    pub fn sample_rates(&self, now: Instant) -> bool {
        let repacked = self.books.seal_superseded() > 0;
        let parked = self.tables.prune_parked(now);
        self.registry.sample(now, parked);
        self.registry.forget_idle(now, self.cfg.stats_idle);
        repacked
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::book::JobView;
    use crate::rates::HASHES_PER_DIFF;

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
        p.books.refresh(&mut view);
        assert!(view.current(SourceId::TEMPLATE).is_none());
        let now = Instant::now();
        let a = p.new_template(template(1), now).unwrap();
        // A view is a copy: it sees the new job only once refreshed.
        assert!(view.get(SourceId::TEMPLATE, a.id).is_none());
        p.books.refresh(&mut view);
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
        p.books.refresh(&mut view);
        assert_eq!(seen(&view, a.id), Some((a.id, false)));
        assert_eq!(view.current(SourceId::TEMPLATE).map(|j| j.id), Some(b.id));
        // A new block: every older job is stale.
        let c = p
            .new_template(template(2), now + Duration::from_secs(2))
            .unwrap();
        p.books.refresh(&mut view);
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
        p.books.refresh(&mut view);
        assert!(view.get(SourceId::TEMPLATE, a.id).is_none());
        assert_eq!(Arc::strong_count(&a), 1);
        assert_eq!(seen(&view, b.id), Some((b.id, true)));
        assert_eq!(seen(&view, d.id), Some((d.id, false)));
    }

    fn within(actual: f64, expected: f64) -> bool {
        (actual - expected).abs() <= 0.01 * expected.abs()
    }

    #[test]
    fn sampled_rates_reach_the_snapshot() {
        let pool = pool();
        let t0 = Instant::now();
        pool.set_wall_clock(t0, Duration::from_secs(1_700_000_000));
        let stripe = pool.registry.totals_stripe();
        let rig1 = pool.registry.worker_stats("alice", "alice.rig1");
        let rig2 = pool.registry.worker_stats("alice", "alice.rig2");
        pool.sample_rates(t0);
        // Five minutes: every 2 s rig1 has two shares of 1000 accepted and rig2 one of 500.
        let mut now = t0;
        for _ in 0..150 {
            now += Duration::from_secs(2);
            for _ in 0..2 {
                pool.registry
                    .record_share(&stripe, &rig1, Some(1000.0), 1500.0, false, None, now);
            }
            pool.registry
                .record_share(&stripe, &rig2, Some(500.0), 600.0, false, None, now);
            pool.registry
                .record_share(&stripe, &rig2, None, 0.0, false, Some(Reject::Stale), now);
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
        let stripe = pool.registry.totals_stripe();
        let w = pool.registry.worker_stats("bob", "bob");
        pool.sample_rates(t0);
        let mut now = t0;
        for _ in 0..150 {
            now += Duration::from_secs(2);
            pool.registry
                .record_share(&stripe, &w, Some(20.0), 20.0, false, None, now);
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
        let stripe = pool.registry.totals_stripe();
        pool.sample_rates(t0);
        let w = pool.registry.worker_stats("carol", "carol.a");
        pool.registry
            .record_share(&stripe, &w, Some(120.0), 120.0, false, None, t0);
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
    fn a_bounded_snapshot_keeps_the_biggest_users() {
        let pool = pool();
        let t0 = Instant::now();
        let stripe = pool.registry.totals_stripe();
        for (i, name) in ["a", "b", "c", "d", "e"].iter().enumerate() {
            let w = pool.registry.worker_stats(name, name);
            pool.registry.record_share(
                &stripe,
                &w,
                Some(10.0 * (i as f64 + 1.0)),
                1.0,
                false,
                None,
                t0,
            );
        }
        let top = pool.registry.snapshot_top(2);
        assert_eq!(top.users.keys().collect::<Vec<_>>(), ["d", "e"]);
        assert_eq!(pool.registry.users(), 5);
        assert_eq!(top.accepted, 5, "the totals are the whole pool's");
        assert_eq!(pool.registry.snapshot_top(10).users.len(), 5);
    }

    #[test]
    fn round_restarts_at_a_block_and_parked_sessions_expire() {
        let pool = pool();
        let t0 = Instant::now();
        let stripe = pool.registry.totals_stripe();
        let w = pool.registry.worker_stats("dave", "dave");
        pool.registry
            .record_share(&stripe, &w, Some(100.0), 100.0, false, None, t0);
        pool.sample_rates(t0);
        assert!(within(pool.stats().round_diff, 100.0));
        pool.registry.record_block(&BlockCandidate {
            height: 1,
            hash: "00".into(),
            hex: None,
            source: SourceId::TEMPLATE,
            worker: "dave".into(),
            job_id: 1,
            solve: None,
        });
        pool.registry
            .record_share(&stripe, &w, Some(7.0), 7.0, false, None, t0);
        pool.sample_rates(t0 + Duration::from_secs(2));
        assert_eq!(pool.stats().round_diff, 0.0);
        pool.registry
            .record_share(&stripe, &w, Some(7.0), 7.0, false, None, t0);
        pool.sample_rates(t0 + Duration::from_secs(4));
        assert!(within(pool.stats().round_diff, 7.0));

        let ip = std::net::IpAddr::from([127, 0, 0, 1]);
        pool.tables
            .park_session(1, SourceId::TEMPLATE, (11, 4), (ip, false), t0);
        pool.tables.park_session(
            2,
            SourceId::TEMPLATE,
            (12, 4),
            (ip, false),
            t0 + Duration::from_secs(300),
        );
        pool.sample_rates(t0 + Duration::from_secs(400));
        assert_eq!(pool.stats().disconnected, 2);
        pool.sample_rates(t0 + pool.cfg.resume_window + Duration::from_secs(1));
        assert_eq!(pool.stats().disconnected, 1);
    }

    #[test]
    fn best_shares_restart_each_round_and_the_best_ever_stays() {
        let pool = pool();
        let t0 = Instant::now();
        let stripe = pool.registry.totals_stripe();
        let w = pool.registry.worker_stats("erin", "erin.a");
        pool.registry
            .record_share(&stripe, &w, Some(1.0), 500.0, false, None, t0);
        let s = pool.stats();
        assert_eq!((s.bestshare, s.bestever), (500.0, 500.0));
        // A block ends the round at once; the share that found it counts in the best ever
        // only.
        pool.registry.record_block(&BlockCandidate {
            height: 1,
            hash: "00".into(),
            hex: None,
            source: SourceId::TEMPLATE,
            worker: "erin.a".into(),
            job_id: 1,
            solve: None,
        });
        pool.registry
            .record_share(&stripe, &w, Some(1.0), 9000.0, true, None, t0);
        let s = pool.stats();
        let erin = &s.users["erin"];
        let a = &erin.workers["erin.a"];
        assert_eq!((s.bestshare, s.bestever), (0.0, 9000.0));
        assert_eq!((erin.bestshare, erin.bestever), (0.0, 9000.0));
        assert_eq!((a.bestshare, a.bestever), (0.0, 9000.0));
        // A worker with no share since the block reads as a new round too.
        let other = pool.registry.worker_stats("erin", "erin.b");
        pool.registry.record_block(&BlockCandidate {
            height: 2,
            hash: "01".into(),
            hex: None,
            source: SourceId::TEMPLATE,
            worker: "erin.b".into(),
            job_id: 2,
            solve: None,
        });
        pool.registry
            .record_share(&stripe, &other, Some(1.0), 30.0, false, None, t0);
        let s = pool.stats();
        assert_eq!((s.bestshare, s.bestever), (30.0, 9000.0));
        let erin = &s.users["erin"];
        assert_eq!((erin.bestshare, erin.bestever), (30.0, 9000.0));
        assert_eq!(erin.workers["erin.a"].bestshare, 0.0);
        assert_eq!(erin.workers["erin.b"].bestshare, 30.0);
        // Rounds survive a handover: the best of the current round and ever travel.
        let blob = pool.export_state(t0);
        let next = Pool::new(PoolConfig::new(Network::Regtest, None), 2, t0);
        next.import_state(t0, &blob).unwrap();
        let s = next.stats();
        assert_eq!((s.bestshare, s.bestever), (30.0, 9000.0));
        let erin = &s.users["erin"];
        assert_eq!(
            (
                erin.workers["erin.a"].bestshare,
                erin.workers["erin.a"].bestever
            ),
            (0.0, 9000.0)
        );
        assert_eq!(erin.workers["erin.b"].bestshare, 30.0);
    }

    #[test]
    fn superseded_jobs_are_sealed_and_still_find_duplicates_also_after_a_handover() {
        let pool = pool();
        let t0 = Instant::now();
        let hash = |i: u64| common::hash::sha256d(&i.to_le_bytes());
        let a = pool.new_template(template(1), t0).unwrap();
        for i in 0..5_000 {
            assert!(a.first_sighting(&hash(i)));
        }
        // The newest job is never sealed.
        pool.sample_rates(t0);
        assert!(!a.seen_sealed());
        let b = pool.new_template(template(1), t0).unwrap();
        for i in 0..100 {
            assert!(b.first_sighting(&hash(i)));
        }
        pool.sample_rates(t0);
        assert!(a.seen_sealed());
        assert!(!b.seen_sealed());
        assert!((0..5_000).all(|i| !a.first_sighting(&hash(i))));
        assert!(a.first_sighting(&hash(5_000)));
        assert!(b.first_sighting(&hash(100)));
        // Both sets travel, each exact; the superseded one arrives sealed.
        let blob = pool.export_state(t0);
        let next = Pool::new(PoolConfig::new(Network::Regtest, None), 2, t0);
        next.import_state(t0, &blob).unwrap();
        let (a2, _) = next.books.job(SourceId::TEMPLATE, a.id).unwrap();
        let (b2, _) = next.books.job(SourceId::TEMPLATE, b.id).unwrap();
        assert!(a2.seen_sealed());
        assert!(!b2.seen_sealed());
        assert!((0..=5_000).all(|i| !a2.first_sighting(&hash(i))));
        assert!((0..=100).all(|i| !b2.first_sighting(&hash(i))));
        assert!(a2.first_sighting(&hash(5_001)));
        assert!(b2.first_sighting(&hash(101)));
    }

    #[test]
    fn seeded_figures_are_decayed_by_the_gap_and_carry_on() {
        let pool = pool();
        let t0 = Instant::now();
        let wall = Duration::from_secs(1_700_000_000);
        pool.set_wall_clock(t0, wall);
        // Saved 120 s ago.
        let clock = crate::SeedClock {
            now: t0,
            since_epoch: wall,
            saved: 1_700_000_000 - 120,
        };
        assert_eq!(clock.gap(), Duration::from_secs(120));
        let h = 1e12;
        pool.registry.seed_pool(
            &crate::SeedPool {
                hashrates: [h; 7],
                sps: [2.0; 4],
                accepted_diff: 5000.0,
                rejected: 3,
                bestshare: 900.0,
                round_diff: 1000.0,
            },
            &clock,
        );
        let rig = crate::SeedWorker {
            hashrates: [h; 5],
            accepted_diff: 2000.0,
            bestshare: 800.0,
            bestever: 4000.0,
            lastshare: 1_700_000_000 - 125,
            accepted: 0,
        };
        assert!(pool.registry.seed_worker("fred", "fred.1", &rig, &clock));
        assert!(pool.registry.seed_worker("fred", "fred.2", &rig, &clock));
        // A worker already there is left alone.
        assert!(!pool.registry.seed_worker("fred", "fred.2", &rig, &clock));

        let decayed = |w: u64| h * (-120.0 / w as f64).exp();
        let s = pool.stats();
        assert!(within(s.rates.hashrate1m, decayed(60)), "{:?}", s.rates);
        assert!(within(s.rates.hashrate15m, decayed(900)), "{:?}", s.rates);
        assert!(
            within(s.rates.hashrate7d, decayed(7 * 86_400)),
            "{:?}",
            s.rates
        );
        assert!(within(s.rates.sps1m, 2.0 * (-2.0f64).exp()));
        assert_eq!((s.accepted_diff, s.rejected), (5000.0, 3));
        assert_eq!((s.bestshare, s.bestever), (900.0, 4000.0));
        assert!(within(s.round_diff, 1000.0), "{}", s.round_diff);
        let fred = &s.users["fred"];
        let one = &fred.workers["fred.1"];
        assert!(within(one.hashrate.hashrate1m, decayed(60)));
        assert!(within(one.hashrate.hashrate1hr, decayed(3600)));
        assert!(within(fred.hashrate.hashrate1m, 2.0 * decayed(60)));
        assert_eq!(one.accepted_diff, 2000.0);
        assert_eq!((one.bestshare, one.bestever), (800.0, 4000.0));
        assert_eq!(one.lastshare, 1_700_000_000 - 125);
        assert_eq!(fred.accepted_diff, 4000.0);
        assert_eq!(fred.lastshare, 1_700_000_000 - 125);

        // The first sample goes on from the seed: 2 s more of decay, no spike from the
        // seeded totals.
        let t1 = t0 + Duration::from_secs(2);
        pool.sample_rates(t1);
        let s = pool.stats();
        let later = h * (-122.0f64 / 60.0).exp();
        assert!(within(s.rates.hashrate1m, later), "{:?}", s.rates);
        assert!(within(
            s.users["fred"].workers["fred.1"].hashrate.hashrate1m,
            later
        ));
        // New shares add to the seeded figures.
        let stripe = pool.registry.totals_stripe();
        let w = pool.registry.worker_stats("fred", "fred.1");
        pool.registry
            .record_share(&stripe, &w, Some(60.0), 5000.0, false, None, t1);
        pool.sample_rates(t1 + Duration::from_secs(2));
        let s = pool.stats();
        let one = &s.users["fred"].workers["fred.1"];
        assert_eq!((one.accepted, one.accepted_diff), (1, 2060.0));
        assert_eq!((one.bestshare, one.bestever), (5000.0, 5000.0));
        assert_eq!(s.accepted_diff, 5060.0);
        let want = later * (-2.0f64 / 60.0).exp()
            + 30.0 * HASHES_PER_DIFF * (1.0 - (-2.0f64 / 60.0).exp());
        assert!(
            within(one.hashrate.hashrate1m, want),
            "{} vs {want}",
            one.hashrate.hashrate1m
        );
    }

    #[test]
    fn seeded_users_follow_the_pruning_rules() {
        let mut cfg = PoolConfig::new(Network::Regtest, None);
        cfg.stats_idle = Duration::from_secs(3600);
        cfg.max_users_per_ip = 1;
        let pool = Pool::new(cfg, 1, Instant::now());
        let t0 = Instant::now();
        let wall = Duration::from_secs(1_700_000_000);
        let clock = crate::SeedClock {
            now: t0,
            since_epoch: wall,
            saved: 1_700_000_000 - 10,
        };
        let seed = |age: u64| crate::SeedWorker {
            accepted_diff: 10.0,
            lastshare: 1_700_000_000 - age,
            ..Default::default()
        };
        assert!(pool.registry.seed_worker("old", "old", &seed(3000), &clock));
        assert!(
            pool.registry
                .seed_worker("recent", "recent", &seed(60), &clock)
        );
        pool.sample_rates(t0);
        assert_eq!(pool.registry.users(), 2);
        // A seeded user counts against no address: one address may still add a user of its
        // own, and take up a seeded one, beyond its limit of one.
        let ip = std::net::IpAddr::from([10, 0, 0, 1]);
        let mine = pool.registry.worker_stats_from("mine", "mine", Some(ip));
        let stripe = pool.registry.totals_stripe();
        pool.registry
            .record_share(&stripe, &mine, Some(1.0), 1.0, false, None, t0);
        let again = pool
            .registry
            .worker_stats_from("recent", "recent", Some(ip));
        pool.registry
            .record_share(&stripe, &again, Some(1.0), 1.0, false, None, t0);
        assert_eq!(pool.stats().users["recent"].accepted_diff, 11.0);
        // A seeded worker whose session closes keeps its figures (it has accepted difficulty).
        pool.registry.release("recent", "recent", again);
        assert_eq!(pool.registry.users(), 3);
        // 601 s on: "old" (last share 3601 s ago) is forgotten; the others are not.
        pool.sample_rates(t0 + Duration::from_secs(601));
        let s = pool.stats();
        assert_eq!(
            s.users.keys().map(String::as_str).collect::<Vec<_>>(),
            ["mine", "recent"]
        );
        // An hour after its last share, "recent" goes too; "mine" is still connected.
        pool.sample_rates(t0 + Duration::from_secs(3600));
        assert_eq!(pool.stats().users.keys().collect::<Vec<_>>(), ["mine"]);
    }
}
