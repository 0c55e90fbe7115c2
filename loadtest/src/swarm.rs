//! One worker: many simulated stratum v1 miners on one tokio runtime, one small task each.
//!
//! A worker is what `ckload worker` runs in a child process (and what [`crate::run`] runs on a
//! thread when asked to stay in-process). Each miner connects (from the worker's source
//! address), optionally sends `mining.configure`, subscribes (resuming its session after a
//! disconnect), authorizes, follows `mining.notify`/`mining.set_difficulty`, and submits shares
//! on a fixed schedule. Every share is ground for real with sha256d against the difficulty the
//! pool set: valid shares meet the share target and (unless blocks are allowed) miss the network
//! target; knobs turn a fraction of submits into stale, duplicate or low-difficulty shares.
//!
//! Memory per idle miner is a few hundred bytes plus the kernel's socket: reads go through one
//! scratch buffer per runtime thread, and only an incomplete line is kept per miner. Parsed jobs
//! are shared between the miners of a worker when the pool sends everyone the same line.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use common::stratum::Parser;
use common::stratum::client::{self, Client, ClientConfig, Event, RequestKind, Verdict};
use common::{Difficulty, Target};
use connector::{enable_rx_timestamps, recv_stamped};
use serde::{Deserialize, Serialize};
use tokio::io::Interest;
use tokio::net::{TcpSocket, TcpStream};
use tokio::task::JoinSet;
use tokio::time::{Instant, sleep_until, timeout};
use tracing::{debug, warn};

use crate::stats::{Counters, ErrorCounts, Hist, KindStats, ShareKind};
use crate::sys::{ProcSample, mono_ns, raise_nofile_limit, real_ns};
use crate::work::{self, Job, SearchCursor, SearchMiss, VersionRoller, Want};

/// Longest line accepted from the pool.
const MAX_LINE: usize = 1 << 20;
/// Read scratch buffer per runtime thread.
const SCRATCH: usize = 64 * 1024;
/// Parsed notify lines kept for sharing between miners.
const NOTIFY_CACHE: usize = 8;
/// How long after a "Stale" reply a new-block notify still explains it as a race.
const RACE_WINDOW: Duration = Duration::from_secs(5);
/// Pause before reconnecting after a failed connect or a lost connection.
const RECONNECT_PAUSE: Duration = Duration::from_secs(1);
/// Longest extranonce2 built on the stack for a submit (longer ones are built on the heap).
const EN2_STACK: usize = 32;
/// Pause between a miner's close at the end of the run and its resume check
/// (`--resume-at-end`): the pool parks a session when it notices the close.
const RESUME_PAUSE: Duration = Duration::from_secs(1);
/// The resume checks of the run's miners connect at most this many per second.
const RESUME_PER_SEC: f64 = 5000.0;
/// Extra time a worker allows itself for the resume checks after the drain, besides their
/// spread ([`resume_budget`]).
const RESUME_SLACK: Duration = Duration::from_secs(15);

/// How long the resume checks of `miners` miners are spread over.
fn resume_spread(miners: u32) -> Duration {
    Duration::from_secs_f64((f64::from(miners) / RESUME_PER_SEC).max(0.5))
}

/// The time the resume checks of a run of `miners` miners may take after the drain.
pub fn resume_budget(miners: u32) -> Duration {
    RESUME_PAUSE + resume_spread(miners) + RESUME_SLACK
}

/// Width of the buckets accepted replies are counted in ([`WorkerReport::accepts`]).
pub const TIMELINE_BUCKET: Duration = Duration::from_millis(10);
/// Buckets kept from the start of the run (the first 600 s).
pub const MAX_TIMELINE_BUCKETS: usize = 60_000;

/// What one worker does: its share of the miners and the common schedule.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WorkerSpec {
    /// This worker's number (0-based).
    pub worker: u32,
    /// Number of workers; this one runs miners `worker, worker + workers, …`.
    pub workers: u32,
    /// Miners in the whole run.
    pub total_miners: u32,
    /// Pool address (loopback).
    pub target: SocketAddr,
    /// Local address to bind before connecting (loopback), if any.
    pub source: Option<IpAddr>,
    /// Worker names are `<user_prefix>.<miner number>`.
    pub user_prefix: String,
    /// Password for `mining.authorize`.
    pub pass: String,
    /// First `mining.subscribe` parameter.
    pub user_agent: String,
    /// Send `mining.configure` asking for version rolling with this mask.
    pub version_rolling: Option<u32>,
    /// `CLOCK_MONOTONIC` nanoseconds at which miner 0 connects.
    pub start_mono_ns: u64,
    /// Miners connect evenly spread over this time from the start.
    pub ramp: Duration,
    /// From the start to when miners stop submitting.
    pub duration: Duration,
    /// After `duration`, how long to wait for replies to outstanding submits.
    pub drain: Duration,
    /// Submits per second per miner (0: none).
    pub rate_per_miner: f64,
    /// Fraction of submits sent as stale shares.
    pub stale_rate: f64,
    /// Fraction of submits sent as duplicates.
    pub duplicate_rate: f64,
    /// Fraction of submits sent as low-difficulty shares.
    pub low_difficulty_rate: f64,
    /// Expected disconnect/reconnect steps per miner per second (0: none).
    pub churn_per_sec: f64,
    /// Pause between a churn disconnect and the reconnect.
    pub churn_pause: Duration,
    /// Limit for a TCP connect.
    pub connect_timeout: Duration,
    /// Limit for each handshake reply.
    pub handshake_timeout: Duration,
    /// Most hashes ground for one share before giving up on it.
    pub grind_budget: u64,
    /// Submit block solutions (hashes that meet the network target) as shares.
    pub allow_blocks: bool,
    /// Runtime threads (1: a current-thread runtime).
    pub threads: usize,
    /// Seed for the schedule's randomness.
    pub seed: u64,
    /// The worker is a thread of a bigger process: it measures its own CPU from its thread
    /// (`/proc/thread-self`) instead of the process.
    #[serde(default)]
    pub in_process: bool,
    /// After the run, every miner reconnects once passing its session id and checks that its
    /// extranonce1 comes back (counted in the `end_resume_*` counters).
    #[serde(default)]
    pub resume_at_end: bool,
    /// This worker's place among the workers sharing its source address, and their number:
    /// each takes its own part of the ephemeral port range. Workers on different addresses use
    /// the same port numbers, so the run takes no more port numbers than one address needs
    /// (a port bound on any address is one the kernel no longer picks for anyone's outgoing
    /// connections, the pool's own to its node included).
    #[serde(default)]
    pub port_slot: u32,
    /// See [`WorkerSpec::port_slot`] (0 is taken as 1).
    #[serde(default)]
    pub port_slots: u32,
}

impl WorkerSpec {
    /// The miner numbers this worker runs.
    pub fn miner_numbers(&self) -> impl Iterator<Item = u32> + '_ {
        (self.worker..self.total_miners).step_by(self.workers.max(1) as usize)
    }

    /// Number of miners this worker runs.
    pub fn miner_count(&self) -> u32 {
        u32::try_from(self.miner_numbers().count()).unwrap_or(u32::MAX)
    }
}

/// What a worker sends to the process that drives it, one JSON object per line.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum WorkerMessage {
    /// Sent every second.
    Progress(Box<Progress>),
    /// Sent once at the end.
    Report(Box<WorkerReport>),
}

/// A worker's state, every second.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Progress {
    /// The worker.
    pub worker: u32,
    /// Connections open now.
    pub open: u64,
    /// Miners authorized now.
    pub authorized: u64,
    /// Counts so far.
    pub counters: Counters,
    /// Errors so far.
    pub errors: u64,
    /// 99th percentile of the submit replies of the last second, µs.
    pub submit_p99_us: u64,
}

/// When the miners of a worker saw one job.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobSeen {
    /// The pool's job id.
    pub job_id: String,
    /// Previous block hash, RPC hex.
    pub prevhash: String,
    /// The clean-jobs flag.
    pub clean: bool,
    /// `CLOCK_MONOTONIC` ns of the first miner reading it.
    pub first_ns: u64,
    /// … of the last.
    pub last_ns: u64,
    /// Miners that read it.
    pub count: u64,
}

impl JobSeen {
    /// Adds another worker's sightings of the same job.
    pub fn merge(&mut self, other: &Self) {
        self.first_ns = self.first_ns.min(other.first_ns);
        self.last_ns = self.last_ns.max(other.last_ns);
        self.count += other.count;
    }
}

/// Everything a worker measured.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct WorkerReport {
    /// The worker.
    pub worker: u32,
    /// Miners it ran.
    pub miners: u32,
    /// Source address it bound.
    pub source: Option<IpAddr>,
    /// Event counts.
    pub counters: Counters,
    /// Submit results by [`ShareKind`] name.
    pub shares: BTreeMap<String, KindStats>,
    /// Latency histograms (µs) by name, hdrhistogram V2 in hex: `connect`, `subscribe`,
    /// `authorize`, `login` (connect start to authorize reply), `submit`, `submit_window`
    /// (submits sent after the ramp), `submit_socket` (those, to the reply's arrival in the
    /// socket: see [`HISTOGRAMS`]).
    pub histograms: BTreeMap<String, String>,
    /// Jobs seen after the ramp, with first and last arrival.
    pub jobs: Vec<JobSeen>,
    /// Errors by text.
    pub errors: ErrorCounts,
    /// The worker's own CPU seconds (user + system).
    pub cpu_secs: f64,
    /// Of those, the ones spent in the measurement window (ramp end to duration).
    pub cpu_secs_window: f64,
    /// The worker's peak RSS, KiB.
    pub max_rss_kib: u64,
    /// Its soft open-files limit after raising it.
    pub nofile_limit: u64,
    /// A failure that stopped the worker.
    pub fatal: Option<String>,
    /// The submits sent in the window whose reply took [`SLOW_SUBMIT_MS`] or more, as
    /// `[sent, latency]` in ms (sent counted from the end of the ramp), in reply order; at most
    /// [`MAX_SLOW_SUBMITS`]. When in the window a latency tail happened, and how many miners it
    /// hit at once.
    #[serde(default)]
    pub slow_submits: Vec<[u32; 2]>,
    /// The window's submits by the second (from the end of the ramp) they were sent in, one
    /// histogram each (hdrhistogram V2 in hex), for the first [`MAX_SECOND_HISTS`] seconds: a
    /// window's p99 can come from one bad second or from all of them.
    #[serde(default)]
    pub submit_seconds: Vec<String>,
    /// Accepted replies by when they were read, in [`TIMELINE_BUCKET`]s from the start of the
    /// run (miner 0's connect time, shared by every worker), for the first
    /// [`MAX_TIMELINE_BUCKETS`]; trailing empty buckets left out.
    #[serde(default)]
    pub accepts: Vec<u32>,
}

/// Seconds of the window with a latency histogram of their own.
pub const MAX_SECOND_HISTS: usize = 600;

/// A submit whose reply takes this long (ms) or longer is listed in [`WorkerReport::slow_submits`].
pub const SLOW_SUBMIT_MS: u32 = 20;
/// At most this many slow submits are listed per worker.
pub const MAX_SLOW_SUBMITS: usize = 20_000;

/// Names of the histograms a worker keeps: `submit_window` holds only the submits sent after
/// the ramp (the steady state), `submit` all of them; both run to when the worker read the
/// reply. `submit_socket` holds the window's submits again, to when the reply arrived in the
/// miner's socket (the kernel's receive timestamp, `SO_TIMESTAMPNS`): without the time the
/// reply waited for the worker itself, busy with its other miners' lines (a job's fan-out to
/// thousands of miners of one worker is read ahead of a reply that came after it). A real
/// miner reads its one connection at once; the difference between the two is ckload's.
pub const HISTOGRAMS: [&str; 7] = [
    "connect",
    "subscribe",
    "authorize",
    "login",
    "submit",
    "submit_window",
    "submit_socket",
];

/// Runs a worker to the end of its schedule, calling `sink` with progress every second and the
/// final report once; also returns the report.
pub fn run_worker(spec: &WorkerSpec, sink: &(dyn Fn(WorkerMessage) + Send + Sync)) -> WorkerReport {
    let nofile = raise_nofile_limit();
    let runtime = if spec.threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(spec.threads)
            .enable_all()
            .build()
    };
    let mut report = match runtime {
        Ok(rt) => rt.block_on(run_async(spec.clone(), sink)),
        Err(e) => WorkerReport {
            worker: spec.worker,
            fatal: Some(format!("cannot start a tokio runtime: {e}")),
            ..WorkerReport::default()
        },
    };
    report.nofile_limit = nofile;
    if let Some(me) = own_usage(spec) {
        report.cpu_secs = me.cpu_secs;
    }
    if let Some(me) = ProcSample::read_self() {
        report.max_rss_kib = me.hwm_kib;
    }
    sink(WorkerMessage::Report(Box::new(report.clone())));
    report
}

/// The worker's own CPU: its process, or its thread when it runs in-process.
fn own_usage(spec: &WorkerSpec) -> Option<ProcSample> {
    if spec.in_process {
        ProcSample::read_thread_self()
    } else {
        ProcSample::read_self()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The tokio instant for a `CLOCK_MONOTONIC` timestamp.
fn instant_at(mono: u64) -> Instant {
    let now_ns = mono_ns();
    let now = Instant::now();
    if mono >= now_ns {
        now + Duration::from_nanos(mono - now_ns)
    } else {
        now.checked_sub(Duration::from_nanos(now_ns - mono))
            .unwrap_or(now)
    }
}

#[derive(Default)]
struct Agg {
    counters: Counters,
    kinds: [KindStats; 4],
    hists: [Hist; 7],
    interval_submit: Hist,
    /// Submits of the window by the second they were sent in.
    seconds: Vec<Hist>,
    errors: ErrorCounts,
    slow: Vec<[u32; 2]>,
    jobs: HashMap<String, JobSeen>,
    /// Accepted replies per [`TIMELINE_BUCKET`] from the start.
    accepts: Vec<u32>,
}

#[derive(Clone, Copy)]
enum H {
    Connect = 0,
    Subscribe = 1,
    Authorize = 2,
    Login = 3,
    Submit = 4,
    SubmitWindow = 5,
    SubmitSocket = 6,
}

/// A job as the pool sent it, shared by the miners of a worker.
struct SharedJob {
    job: Job,
    id_json: String,
    prevhash_rpc: String,
}

/// Recent notify lines (raw bytes) and their parsed jobs.
type NotifyCache = VecDeque<(Box<[u8]>, Arc<SharedJob>)>;

struct Ctx {
    spec: WorkerSpec,
    /// The stratum client settings every miner shares.
    client: Arc<ClientConfig>,
    /// Miner 0's connect time: the timeline's zero.
    start: Instant,
    hold: Instant,
    hold_ns: u64,
    end: Instant,
    drain_end: Instant,
    agg: Mutex<Agg>,
    open: AtomicU64,
    authorized: AtomicU64,
    cache: Mutex<NotifyCache>,
    warned_skip: std::sync::atomic::AtomicBool,
    ports: PortCursor,
    /// Submits sent and not yet answered (or given up), all of this worker's miners.
    in_flight: AtomicU64,
    /// Set once `in_flight` reaches 0 after the end: the drained miners then close. (They used
    /// to look every 2 ms: thousands of wake-ups per ms at the end of a big run, which delayed
    /// reading the last replies and counted as their latency.)
    all_answered: tokio::sync::watch::Sender<bool>,
}

impl Ctx {
    fn agg(&self) -> MutexGuard<'_, Agg> {
        lock(&self.agg)
    }

    fn count(&self, f: impl FnOnce(&mut Counters)) {
        f(&mut self.agg().counters);
    }

    fn error(&self, what: &str) {
        self.agg().errors.add(what);
    }

    fn record(&self, h: H, d: Duration) {
        self.agg().hists[h as usize].record(d);
    }

    /// `n` submits in flight were answered or given up, at `now`.
    fn answered(&self, n: u64, now: Instant) {
        if self.in_flight.fetch_sub(n, Ordering::Relaxed) == n && now >= self.end {
            self.all_answered.send_replace(true);
        }
    }
}

async fn run_async(spec: WorkerSpec, sink: &(dyn Fn(WorkerMessage) + Send + Sync)) -> WorkerReport {
    let start = instant_at(spec.start_mono_ns);
    let ctx = Arc::new(Ctx {
        start,
        hold: start + spec.ramp,
        hold_ns: spec.start_mono_ns + u64::try_from(spec.ramp.as_nanos()).unwrap_or(u64::MAX),
        end: start + spec.duration,
        drain_end: start + spec.duration + spec.drain,
        agg: Mutex::new(Agg::default()),
        open: AtomicU64::new(0),
        authorized: AtomicU64::new(0),
        cache: Mutex::new(VecDeque::new()),
        warned_skip: std::sync::atomic::AtomicBool::new(false),
        ports: PortCursor::new(spec.port_slot, spec.port_slots),
        in_flight: AtomicU64::new(0),
        all_answered: tokio::sync::watch::Sender::new(false),
        client: Arc::new(client_config(&spec)),
        spec,
    });
    let mut set = JoinSet::new();
    let total = f64::from(ctx.spec.total_miners.max(1));
    for g in ctx.spec.miner_numbers() {
        let at = start + ctx.spec.ramp.mul_f64(f64::from(g) / total);
        set.spawn(miner_task(Arc::clone(&ctx), g, at));
    }
    let window_cpu = tokio::spawn({
        let (spec, hold, end) = (ctx.spec.clone(), ctx.hold, ctx.end);
        async move {
            sleep_until(hold).await;
            let a = own_usage(&spec).map_or(0.0, |s| s.cpu_secs);
            sleep_until(end).await;
            let b = own_usage(&spec).map_or(a, |s| s.cpu_secs);
            (b - a).max(0.0)
        }
    });
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<WorkerMessage>();
    let progress = tokio::spawn(progress_task(Arc::clone(&ctx), start, tx));
    let mut hard_end = ctx.drain_end + Duration::from_secs(5);
    if ctx.spec.resume_at_end {
        hard_end += resume_budget(ctx.spec.total_miners);
    }
    let deadline = sleep_until(hard_end);
    tokio::pin!(deadline);
    let mut overran = false;
    loop {
        tokio::select! {
            r = set.join_next() => if r.is_none() { break },
            Some(msg) = rx.recv() => sink(msg),
            () = &mut deadline => {
                overran = true;
                break;
            }
        }
    }
    if overran {
        warn!(
            worker = ctx.spec.worker,
            "miners still running at the hard deadline; aborting them"
        );
        set.abort_all();
    }
    progress.abort();
    let _ = progress.await;
    let mut report = build_report(&ctx);
    if window_cpu.is_finished() {
        report.cpu_secs_window = window_cpu.await.unwrap_or(0.0);
    } else {
        window_cpu.abort();
    }
    report
}

thread_local! {
    static SCRATCH_BUF: RefCell<Vec<u8>> = RefCell::new(vec![0; SCRATCH]);
    static PARSER: RefCell<Parser> = RefCell::new(Parser::new());
}

/// The stratum client settings of a worker's miners: submits are never given up (what a
/// closing connection leaves unanswered is counted as such).
fn client_config(spec: &WorkerSpec) -> ClientConfig {
    let mut c = ClientConfig::new(spec.user_agent.clone());
    c.pass.clone_from(&spec.pass);
    c.version_rolling = spec.version_rolling;
    c.request_timeout = spec.handshake_timeout;
    c.submit_timeout = None;
    c
}

async fn progress_task(
    ctx: Arc<Ctx>,
    start: Instant,
    tx: tokio::sync::mpsc::UnboundedSender<WorkerMessage>,
) {
    let mut tick = start + Duration::from_secs(1);
    while tick <= ctx.drain_end + Duration::from_secs(1) {
        sleep_until(tick).await;
        tick += Duration::from_secs(1);
        let p = {
            let mut a = ctx.agg();
            let p99 = a.interval_submit.quantile_us(0.99);
            a.interval_submit.reset();
            Progress {
                worker: ctx.spec.worker,
                open: ctx.open.load(Ordering::Relaxed),
                authorized: ctx.authorized.load(Ordering::Relaxed),
                counters: a.counters.clone(),
                errors: a.errors.total(),
                submit_p99_us: p99,
            }
        };
        if tx.send(WorkerMessage::Progress(Box::new(p))).is_err() {
            return;
        }
    }
}

fn build_report(ctx: &Ctx) -> WorkerReport {
    let a = ctx.agg();
    let mut shares = BTreeMap::new();
    for k in ShareKind::ALL {
        if let Some(s) = a.kinds.get(k.index()) {
            shares.insert(k.as_str().to_owned(), s.clone());
        }
    }
    let histograms = HISTOGRAMS
        .iter()
        .zip(a.hists.iter())
        .map(|(name, h)| ((*name).to_owned(), h.to_v2_hex()))
        .collect();
    let mut jobs: Vec<JobSeen> = a.jobs.values().cloned().collect();
    jobs.sort_by_key(|j| j.first_ns);
    WorkerReport {
        worker: ctx.spec.worker,
        miners: ctx.spec.miner_count(),
        source: ctx.spec.source,
        counters: a.counters.clone(),
        shares,
        histograms,
        jobs,
        errors: a.errors.clone(),
        slow_submits: a.slow.clone(),
        submit_seconds: a.seconds.iter().map(Hist::to_v2_hex).collect(),
        accepts: {
            let used = a.accepts.iter().rposition(|&n| n > 0).map_or(0, |i| i + 1);
            a.accepts.get(..used).unwrap_or_default().to_vec()
        },
        ..WorkerReport::default()
    }
}

/// How a session ended.
enum SessionEnd {
    /// The run is over.
    Done,
    /// A churn step: reconnect at once, resuming the session.
    Churn,
    /// The pool closed or broke the connection, or the handshake failed.
    Lost,
    /// The TCP connect failed.
    ConnectFailed,
}

/// What a miner keeps with each submit in flight (the client keeps its id and send time).
#[derive(Clone, Copy, Debug)]
struct Pending {
    kind: ShareKind,
    epoch: u32,
    hold: bool,
}

struct LastShare {
    job: Arc<SharedJob>,
    cursor: SearchCursor,
    version_bits: Option<u32>,
    epoch: u32,
}

/// One miner's state; kept across reconnects (session id, extranonce1 for the resume check).
struct MinerState {
    user: Box<str>,
    rng: u64,
    client: Client<Pending>,
    login_start: Instant,
    en1: Vec<u8>,
    nonce2_len: usize,
    session: Option<Box<str>>,
    resume_en1: Option<Vec<u8>>,
    share_target: Target,
    job: Option<Arc<SharedJob>>,
    prev_block_job: Option<Arc<SharedJob>>,
    epoch: u32,
    cursor: SearchCursor,
    last_valid: Option<LastShare>,
    unconfirmed_stale: Vec<(ShareKind, Instant)>,
    next_submit: Option<Instant>,
    churn_at: Option<Instant>,
    partial: Vec<u8>,
}

impl MinerState {
    fn new(ctx: &Ctx, g: u32) -> Self {
        let user = format!("{}.{g}", ctx.spec.user_prefix);
        let now = Instant::now();
        Self {
            client: Client::new(Arc::clone(&ctx.client), &user, None),
            user: user.into(),
            rng: ctx.spec.seed ^ (u64::from(g) << 20) ^ 0x5eed,
            login_start: now,
            en1: Vec::new(),
            nonce2_len: 0,
            session: None,
            resume_en1: None,
            share_target: Difficulty::ONE.target(),
            job: None,
            prev_block_job: None,
            epoch: 0,
            cursor: SearchCursor::default(),
            last_valid: None,
            unconfirmed_stale: Vec::new(),
            next_submit: None,
            churn_at: None,
            partial: Vec::new(),
        }
    }

    /// splitmix64 step.
    fn next_u64(&mut self) -> u64 {
        self.rng = self.rng.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Starts a session on a fresh connection: forgets the old connection's jobs and requests
    /// (a new stratum client, resuming the session id of the last one).
    fn reset_session(&mut self, ctx: &Ctx, now: Instant) {
        self.client = Client::new(Arc::clone(&ctx.client), &self.user, self.session.as_deref());
        self.login_start = now;
        self.en1.clear();
        self.share_target = Difficulty::ONE.target();
        self.job = None;
        self.prev_block_job = None;
        self.last_valid = None;
        self.unconfirmed_stale.clear();
        self.next_submit = None;
        self.churn_at = None;
        self.partial = Vec::new();
    }

    /// When a handshake request in flight times out.
    fn handshake_deadline(&self) -> Option<Instant> {
        if self.ready() {
            return None;
        }
        self.client.deadline().map(Instant::from_std)
    }

    fn ready(&self) -> bool {
        self.client.phase() == client::Phase::Ready
    }
}

async fn miner_task(ctx: Arc<Ctx>, g: u32, connect_at: Instant) {
    sleep_until(connect_at).await;
    let mut m = MinerState::new(&ctx, g);
    let mut first = true;
    while Instant::now() < ctx.end {
        if !first {
            ctx.count(|c| c.reconnects += 1);
        }
        first = false;
        let end = session(&ctx, &mut m).await;
        let pause = match end {
            SessionEnd::Done => break,
            SessionEnd::Churn => Some(ctx.spec.churn_pause),
            SessionEnd::Lost | SessionEnd::ConnectFailed => Some(RECONNECT_PAUSE),
        };
        if let Some(p) = pause {
            let until = (Instant::now() + p).min(ctx.end);
            sleep_until(until).await;
        }
    }
    if ctx.spec.resume_at_end && m.session.is_some() && !m.en1.is_empty() {
        let total = f64::from(ctx.spec.total_miners.max(1));
        let spread = resume_spread(ctx.spec.total_miners);
        let at = Instant::now() + RESUME_PAUSE + spread.mul_f64(f64::from(g) / total);
        sleep_until(at).await;
        resume_check(&ctx, &m).await;
    }
}

/// The end-of-run resume check: a new connection subscribing with the miner's session id must
/// get its extranonce1 back. It closes after the subscribe reply (no authorize).
async fn resume_check(ctx: &Ctx, m: &MinerState) {
    ctx.count(|c| c.end_resume_attempts += 1);
    let limit = ctx.spec.connect_timeout + ctx.spec.handshake_timeout;
    let outcome = match timeout(limit, resume_probe(ctx, m)).await {
        Ok(r) => r,
        Err(_) => Err("timed out".to_owned()),
    };
    match outcome {
        Ok(true) => ctx.count(|c| c.end_resume_ok += 1),
        Ok(false) => ctx.count(|c| c.end_resume_mismatch += 1),
        Err(e) => {
            ctx.count(|c| c.end_resume_failures += 1);
            ctx.error(&format!("resume check: {e}"));
        }
    }
}

/// Subscribes with the miner's session id; whether the extranonce1 that comes back is its own.
async fn resume_probe(ctx: &Ctx, m: &MinerState) -> Result<bool, String> {
    use tokio::io::AsyncWriteExt as _;

    let mut stream = connect(ctx).await.map_err(|e| format!("connect: {e}"))?;
    let mut client: Client<Pending> =
        Client::new(Arc::clone(&ctx.client), &m.user, m.session.as_deref());
    let mut out = Vec::with_capacity(256);
    client.start(Instant::now().into_std(), &mut out);
    let mut partial: Vec<u8> = Vec::new();
    let mut buf = vec![0u8; 4096];
    loop {
        if !out.is_empty() {
            stream
                .write_all(&out)
                .await
                .map_err(|e| format!("write: {e}"))?;
            out.clear();
        }
        stream.readable().await.map_err(|e| format!("read: {e}"))?;
        let n = match stream.try_read(&mut buf) {
            Ok(0) => return Err("closed by the pool".to_owned()),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(format!("read: {e}")),
        };
        partial.extend_from_slice(buf.get(..n).unwrap_or_default());
        if partial.len() > MAX_LINE {
            return Err("line too long".to_owned());
        }
        while let Some(pos) = partial.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = partial.drain(..=pos).collect();
            let line = line.trim_ascii();
            if line.is_empty() {
                continue;
            }
            let now = Instant::now().into_std();
            let event = PARSER.with_borrow_mut(|p| client.feed(p, line, now, &mut out));
            match event {
                Some(Event::Subscribed { extranonce1, .. }) => return Ok(extranonce1 == m.en1),
                Some(Event::SubscribeFailed { reason }) => {
                    return Err(format!("subscribe failed: {reason}"));
                }
                _ => {}
            }
        }
    }
}

/// Ports tried for one connect before giving up.
const PORT_TRIES: u32 = 64;

/// Local ports for a worker's source address, handed out in turn.
///
/// `bind(ip, 0)` makes the kernel search for a free port, which costs more the more ports the
/// address already uses (hundreds of µs per connect at 10k sockets, measured here). The worker
/// owns its source address, so it picks ports itself from the ephemeral range, starting at its
/// own offset, and skips any that are taken.
struct PortCursor {
    first: u32,
    span: u32,
    next: AtomicU64,
}

impl PortCursor {
    fn new(worker: u32, workers: u32) -> Self {
        let (lo, hi) = crate::sys::ephemeral_port_range().unwrap_or((32768, 60999));
        let span = u32::from(hi - lo) + 1;
        Self {
            first: u32::from(lo),
            span,
            next: AtomicU64::new(u64::from(span / workers.max(1) * worker)),
        }
    }

    fn take(&self) -> u16 {
        let n = self.next.fetch_add(1, Ordering::Relaxed) % u64::from(self.span);
        u16::try_from(u64::from(self.first) + n).unwrap_or(u16::MAX)
    }
}

async fn connect(ctx: &Ctx) -> io::Result<TcpStream> {
    let target = ctx.spec.target;
    let new_socket = || {
        if target.is_ipv4() {
            TcpSocket::new_v4()
        } else {
            TcpSocket::new_v6()
        }
    };
    let stream = match ctx.spec.source {
        None => new_socket()?.connect(target).await?,
        Some(ip) => {
            let mut last = None;
            let mut found = None;
            for _ in 0..PORT_TRIES {
                let sock = new_socket()?;
                sock.set_reuseaddr(true)?;
                if let Err(e) = sock.bind(SocketAddr::new(ip, ctx.ports.take())) {
                    if e.kind() == io::ErrorKind::AddrInUse {
                        last = Some(e);
                        continue;
                    }
                    return Err(e);
                }
                match sock.connect(target).await {
                    Ok(s) => {
                        found = Some(s);
                        break;
                    }
                    Err(e)
                        if matches!(
                            e.kind(),
                            io::ErrorKind::AddrInUse | io::ErrorKind::AddrNotAvailable
                        ) =>
                    {
                        last = Some(e);
                    }
                    Err(e) => return Err(e),
                }
            }
            match found {
                Some(s) => s,
                None => {
                    return Err(last.unwrap_or_else(|| {
                        io::Error::new(io::ErrorKind::AddrNotAvailable, "no free local port")
                    }));
                }
            }
        }
    };
    stream.set_nodelay(true)?;
    // Without the stamps, a reply's arrival is taken to be when it was read.
    if let Err(e) = enable_rx_timestamps(stream.as_fd()) {
        debug!("no receive timestamps: {e}");
    }
    Ok(stream)
}

/// Decrements a gauge when dropped.
struct Gauge<'a>(&'a AtomicU64);

impl<'a> Gauge<'a> {
    fn up(g: &'a AtomicU64) -> Self {
        g.fetch_add(1, Ordering::Relaxed);
        Self(g)
    }
}

impl Drop for Gauge<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

enum Step {
    Continue,
    Eof,
    Lost(String),
}

async fn session(ctx: &Ctx, m: &mut MinerState) -> SessionEnd {
    use tokio::io::AsyncWriteExt as _;

    let t0 = Instant::now();
    ctx.count(|c| c.connect_attempts += 1);
    let mut stream = match timeout(ctx.spec.connect_timeout, connect(ctx)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            ctx.count(|c| c.connect_failures += 1);
            ctx.error(&format!("connect: {e}"));
            return SessionEnd::ConnectFailed;
        }
        Err(_) => {
            ctx.count(|c| c.connect_failures += 1);
            ctx.error("connect: timed out");
            return SessionEnd::ConnectFailed;
        }
    };
    let connected = Instant::now();
    ctx.record(H::Connect, connected - t0);
    ctx.count(|c| c.connected += 1);
    let _open = Gauge::up(&ctx.open);
    let mut authorized_gauge: Option<Gauge<'_>> = None;

    m.resume_en1 = m.session.is_some().then(|| m.en1.clone());
    m.reset_session(ctx, t0);
    let mut out = Vec::with_capacity(256);
    begin(ctx, m, connected, &mut out);
    let mut end = None;
    if let Err(e) = stream.write_all(&out).await {
        end = Some(Step::Lost(format!("write: {e}")));
    }
    let mut all_answered = ctx.all_answered.subscribe();
    while end.is_none() {
        out.clear();
        let now = Instant::now();
        let draining = now >= ctx.end;
        // At the end, a miner whose submits are answered keeps its connection until every
        // miner's are (or the drain time is up): closing thousands of sockets at once would
        // delay reading the last replies, and count ckload's own teardown as their latency.
        let drained = m.client.pending_submits() == 0 && ctx.in_flight.load(Ordering::Relaxed) == 0;
        if draining && (drained || now >= ctx.drain_end || !m.ready()) {
            break;
        }
        let submit_at = if draining { None } else { m.next_submit };
        let churn_at = if draining { None } else { m.churn_at };
        let mut wake = if draining { ctx.drain_end } else { ctx.end };
        for t in [submit_at, churn_at, m.handshake_deadline()]
            .into_iter()
            .flatten()
        {
            wake = wake.min(t);
        }
        let waits_for_others = draining && m.client.pending_submits() == 0;
        tokio::select! {
            biased;
            r = all_answered.changed(), if waits_for_others => {
                // The sender lives in `ctx`, so this never fails; if it did, leave.
                if r.is_err() {
                    break;
                }
            }
            r = stream.readable() => {
                let step = match r {
                    Ok(()) => read_lines(ctx, m, &stream, &mut out),
                    Err(e) => Step::Lost(format!("read: {e}")),
                };
                match step {
                    Step::Continue => {}
                    other => end = Some(other),
                }
                if m.ready() && authorized_gauge.is_none() {
                    authorized_gauge = Some(Gauge::up(&ctx.authorized));
                }
            }
            () = sleep_until(wake) => {
                let now = Instant::now();
                if m.handshake_deadline().is_some_and(|d| d <= now) && now < ctx.end {
                    end = handshake_timeout(ctx, m, now, &mut out);
                } else if churn_at.is_some_and(|t| t <= now) {
                    if m.client.pending_submits() == 0 {
                        ctx.count(|c| c.churn_disconnects += 1);
                        finish_session(ctx, m);
                        return SessionEnd::Churn;
                    }
                    // Leave once the submits in flight are answered.
                    m.churn_at = Some(now + Duration::from_millis(20));
                } else if submit_at.is_some_and(|t| t <= now) {
                    submit(ctx, m, now, &mut out).await;
                }
            }
        }
        if !out.is_empty()
            && end.is_none()
            && let Err(e) = stream.write_all(&out).await
        {
            end = Some(Step::Lost(format!("write: {e}")));
        }
    }
    finish_session(ctx, m);
    let now = Instant::now();
    match end {
        None => SessionEnd::Done,
        Some(_) if now >= ctx.end => SessionEnd::Done,
        Some(Step::Eof) => {
            ctx.count(|c| c.disconnects += 1);
            ctx.error("connection closed by the pool");
            SessionEnd::Lost
        }
        Some(Step::Lost(why)) => {
            ctx.count(|c| c.disconnects += 1);
            ctx.error(&why);
            SessionEnd::Lost
        }
        Some(Step::Continue) => SessionEnd::Lost,
    }
}

/// Counts what a closing connection leaves unanswered.
fn finish_session(ctx: &Ctx, m: &mut MinerState) {
    let n = m.client.pending_submits();
    if n == 0 {
        return;
    }
    ctx.answered(n as u64, Instant::now());
    let mut a = ctx.agg();
    for (_, p) in m.client.drain_submits() {
        a.counters.unanswered += 1;
        if let Some(k) = a.kinds.get_mut(p.kind.index()) {
            k.unanswered += 1;
        }
    }
}

fn begin(ctx: &Ctx, m: &mut MinerState, now: Instant, out: &mut Vec<u8>) {
    if m.session.is_some() {
        ctx.count(|c| c.resume_attempts += 1);
    }
    m.client.start(now.into_std(), out);
}

/// A handshake request went unanswered: without `mining.configure`'s answer the handshake goes
/// on without version rolling; without the others the session is lost.
fn handshake_timeout(
    ctx: &Ctx,
    m: &mut MinerState,
    now: Instant,
    out: &mut Vec<u8>,
) -> Option<Step> {
    while let Some(ev) = m.client.poll(now.into_std(), out) {
        if let Event::TimedOut(kind @ (RequestKind::Subscribe | RequestKind::Authorize)) = ev {
            ctx.count(|c| c.handshake_timeouts += 1);
            return Some(Step::Lost(format!("no reply to {kind:?}")));
        }
    }
    None
}

/// Reads what the socket has and handles every complete line.
fn read_lines(ctx: &Ctx, m: &mut MinerState, stream: &TcpStream, out: &mut Vec<u8>) -> Step {
    SCRATCH_BUF.with_borrow_mut(|scratch| {
        loop {
            let read = stream.try_io(Interest::READABLE, || {
                recv_stamped(stream.as_fd(), scratch.as_mut_slice())
            });
            match read {
                Ok((0, _)) => return Step::Eof,
                Ok((n, stamp)) => {
                    let ts = mono_ns();
                    let now = Instant::now();
                    let at = Arrival {
                        now,
                        socket: stamp.map_or(now, |at| arrived_at(now, at)),
                    };
                    let Some(chunk) = scratch.get(..n) else {
                        return Step::Continue;
                    };
                    if let Some(step) = split_lines(ctx, m, chunk, ts, at, out) {
                        return step;
                    }
                    if n < scratch.len() {
                        return Step::Continue;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Step::Continue,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Step::Lost(format!("read: {e}")),
            }
        }
    })
}

/// When a read's bytes were read (`now`) and when they arrived in the socket (`socket`: the
/// kernel's stamp of the last segment read, else `now`).
#[derive(Clone, Copy)]
struct Arrival {
    now: Instant,
    socket: Instant,
}

/// The instant a segment stamped `stamp` (`CLOCK_REALTIME` ns) arrived, read at `now`: never
/// after `now`.
fn arrived_at(now: Instant, stamp: u64) -> Instant {
    let age = Duration::from_nanos(real_ns().saturating_sub(stamp));
    now.checked_sub(age).unwrap_or(now)
}

fn split_lines(
    ctx: &Ctx,
    m: &mut MinerState,
    mut chunk: &[u8],
    ts: u64,
    at: Arrival,
    out: &mut Vec<u8>,
) -> Option<Step> {
    while let Some(pos) = chunk.iter().position(|&b| b == b'\n') {
        let (line, rest) = chunk.split_at(pos);
        chunk = rest.get(1..).unwrap_or_default();
        let step = if m.partial.is_empty() {
            handle_line(ctx, m, line, ts, at, out)
        } else {
            let mut whole = std::mem::take(&mut m.partial);
            whole.extend_from_slice(line);
            handle_line(ctx, m, &whole, ts, at, out)
        };
        if let Some(s) = step {
            return Some(s);
        }
    }
    if m.partial.len() + chunk.len() > MAX_LINE {
        return Some(Step::Lost(format!(
            "line from the pool longer than {MAX_LINE} bytes"
        )));
    }
    m.partial.extend_from_slice(chunk);
    None
}

fn handle_line(
    ctx: &Ctx,
    m: &mut MinerState,
    line: &[u8],
    ts: u64,
    at: Arrival,
    out: &mut Vec<u8>,
) -> Option<Step> {
    let now = at.now;
    let line = line.trim_ascii();
    if line.is_empty() {
        return None;
    }
    let cached = lock(&ctx.cache)
        .iter()
        .find(|(raw, _)| **raw == *line)
        .map(|(_, j)| Arc::clone(j));
    if let Some(job) = cached {
        on_notify(ctx, m, job, ts, now);
        return None;
    }
    let event =
        PARSER.with_borrow_mut(|parser| m.client.feed(parser, line, now.into_std(), out))?;
    on_event(ctx, m, event, line, ts, at)
}

/// What the stratum client made of a line.
fn on_event(
    ctx: &Ctx,
    m: &mut MinerState,
    event: Event<Pending>,
    raw: &[u8],
    ts: u64,
    at: Arrival,
) -> Option<Step> {
    let now = at.now;
    match event {
        Event::Job(job) => {
            let job = *job;
            let shared = Arc::new(SharedJob {
                id_json: serde_json::to_string(&job.job_id).unwrap_or_default(),
                prevhash_rpc: job.prevhash_rpc(),
                job,
            });
            {
                let mut cache = lock(&ctx.cache);
                if cache.len() >= NOTIFY_CACHE {
                    cache.pop_front();
                }
                cache.push_back((raw.into(), Arc::clone(&shared)));
            }
            on_notify(ctx, m, shared, ts, now);
        }
        Event::Difficulty(d) => match Difficulty::from_f64(d) {
            Some(d) => {
                m.share_target = d.target();
                ctx.count(|c| c.difficulty_changes += 1);
            }
            None => {
                ctx.count(|c| c.protocol_errors += 1);
                ctx.error("bad mining.set_difficulty");
            }
        },
        Event::BadNotification { method, what } => match method.as_str() {
            "mining.notify" => {
                ctx.count(|c| c.protocol_errors += 1);
                ctx.error(&format!("bad mining.notify: {what}"));
            }
            "mining.set_difficulty" => {
                ctx.count(|c| c.protocol_errors += 1);
                ctx.error("bad mining.set_difficulty");
            }
            _ => debug!(method, what, "ignoring a bad notification"),
        },
        Event::Extranonce {
            extranonce1,
            nonce2_len,
        } => {
            m.en1 = extranonce1;
            m.nonce2_len = nonce2_len;
        }
        Event::Ping => ctx.count(|c| c.pings += 1),
        Event::Reconnect(_) => {
            ctx.count(|c| c.reconnect_requests += 1);
            return Some(Step::Lost("pool sent client.reconnect".to_owned()));
        }
        Event::Unparseable(_) => {
            ctx.count(|c| c.protocol_errors += 1);
            ctx.error("unparseable line from the pool");
        }
        Event::UnknownReply { id } => {
            ctx.count(|c| {
                c.protocol_errors += 1;
                c.unknown_replies += 1;
            });
            ctx.error("reply to an unknown request id");
            debug!(?id, "reply to an unknown request id");
        }
        Event::Subscribed {
            extranonce1,
            nonce2_len,
            session,
            latency,
        } => {
            ctx.record(H::Subscribe, latency);
            {
                let mut a = ctx.agg();
                a.counters.subscribed += 1;
                if let Some(old) = m.resume_en1.take() {
                    if old == extranonce1 {
                        a.counters.resume_ok += 1;
                    } else {
                        a.counters.resume_mismatch += 1;
                    }
                }
            }
            m.en1 = extranonce1;
            m.nonce2_len = nonce2_len;
            m.session = session.map(Into::into);
        }
        Event::SubscribeFailed { reason } => {
            ctx.count(|c| c.subscribe_failures += 1);
            return Some(Step::Lost(format!("subscribe failed: {reason}")));
        }
        Event::Authorized { latency } => {
            {
                let mut a = ctx.agg();
                a.counters.authorized += 1;
                a.hists[H::Authorize as usize].record(latency);
                a.hists[H::Login as usize].record(now - m.login_start);
            }
            let rate = ctx.spec.rate_per_miner;
            if rate > 0.0 && rate.is_finite() {
                let phase = Duration::from_secs_f64(m.unit() / rate);
                m.next_submit = Some(now.max(ctx.hold.min(now + phase)) + phase);
            }
            m.churn_at = churn_delay(m, ctx.spec.churn_per_sec).map(|d| now + d);
        }
        Event::Refused { reason } => {
            ctx.count(|c| c.authorize_failures += 1);
            return Some(Step::Lost(format!("authorize refused: {reason}")));
        }
        Event::Verdict(v) => on_verdict(ctx, m, &v, at),
        Event::TimedOut(kind @ (RequestKind::Subscribe | RequestKind::Authorize)) => {
            ctx.count(|c| c.handshake_timeouts += 1);
            return Some(Step::Lost(format!("no reply to {kind:?}")));
        }
        Event::TimedOut(_)
        | Event::GetVersion
        | Event::VersionRolling(_)
        | Event::VersionMask(_)
        | Event::ExtranonceSubscribed(_)
        | Event::SubmitTimedOut { .. } => {}
        Event::Message(text) => debug!(%text, "message from the pool"),
        Event::Unhandled(method) => debug!(method, "ignoring a method from the pool"),
    }
    None
}

fn on_notify(ctx: &Ctx, m: &mut MinerState, job: Arc<SharedJob>, ts: u64, now: Instant) {
    let new_block = m
        .job
        .as_ref()
        .is_some_and(|cur| cur.job.prev_hash != job.job.prev_hash);
    let broadcast = m.ready() && m.job.is_some();
    let mut a = ctx.agg();
    a.counters.notifies += 1;
    if new_block {
        m.prev_block_job = m.job.take();
        m.epoch = m.epoch.wrapping_add(1);
        for (kind, at) in m.unconfirmed_stale.drain(..) {
            if now.saturating_duration_since(at) <= RACE_WINDOW
                && let Some(k) = a.kinds.get_mut(kind.index())
            {
                k.raced_block += 1;
            }
        }
    }
    // Fan-out counts broadcasts only: a miner that already had a job when this one came (the
    // job sent right after authorize is part of the login, not of a broadcast).
    // Looked up before inserting: the job id is cloned once a job, not once a notify.
    if ts >= ctx.hold_ns && broadcast {
        if let Some(seen) = a.jobs.get_mut(job.job.job_id.as_str()) {
            seen.first_ns = seen.first_ns.min(ts);
            seen.last_ns = seen.last_ns.max(ts);
            seen.count += 1;
        } else {
            a.jobs.insert(
                job.job.job_id.clone(),
                JobSeen {
                    job_id: job.job.job_id.clone(),
                    prevhash: job.prevhash_rpc.clone(),
                    clean: job.job.clean,
                    first_ns: ts,
                    last_ns: ts,
                    count: 1,
                },
            );
        }
    }
    m.job = Some(job);
}

/// The pool's answer to one of this miner's submits.
fn on_verdict(ctx: &Ctx, m: &mut MinerState, v: &Verdict<Pending>, at: Arrival) {
    let now = at.now;
    let p = v.tag;
    ctx.answered(1, now);
    let accepted = v.accepted;
    let latency = now.into_std().saturating_duration_since(v.sent);
    let mut a = ctx.agg();
    if accepted {
        count_accept(&mut a.accepts, now.saturating_duration_since(ctx.start));
    }
    a.hists[H::Submit as usize].record(latency);
    if p.hold {
        a.hists[H::SubmitWindow as usize].record(latency);
        let in_socket = at.socket.into_std().saturating_duration_since(v.sent);
        a.hists[H::SubmitSocket as usize].record(in_socket.min(latency));
        let ms = u32::try_from(latency.as_millis()).unwrap_or(u32::MAX);
        let sent = v.sent.saturating_duration_since(ctx.hold.into_std());
        if ms >= SLOW_SUBMIT_MS && a.slow.len() < MAX_SLOW_SUBMITS {
            a.slow
                .push([u32::try_from(sent.as_millis()).unwrap_or(u32::MAX), ms]);
        }
        let second = usize::try_from(sent.as_secs()).unwrap_or(usize::MAX);
        if second < MAX_SECOND_HISTS {
            if a.seconds.len() <= second {
                a.seconds.resize_with(second + 1, Hist::coarse);
            }
            if let Some(h) = a.seconds.get_mut(second) {
                h.record(latency);
            }
        }
    }
    a.interval_submit.record(latency);
    if accepted {
        a.counters.accepted += 1;
        if p.hold {
            a.counters.hold_accepted += 1;
        }
        if let Some(k) = a.kinds.get_mut(p.kind.index()) {
            k.accepted += 1;
        }
    } else {
        let reason = v.reason.as_deref().unwrap_or("unknown").to_owned();
        a.counters.rejected += 1;
        if reason == "Stale" && p.kind != ShareKind::Stale {
            if p.epoch != m.epoch {
                if let Some(k) = a.kinds.get_mut(p.kind.index()) {
                    k.raced_block += 1;
                }
            } else {
                m.unconfirmed_stale
                    .retain(|(_, t)| now.saturating_duration_since(*t) <= RACE_WINDOW);
                m.unconfirmed_stale.push((p.kind, now));
            }
        }
        if let Some(k) = a.kinds.get_mut(p.kind.index()) {
            *k.rejected.entry(reason).or_default() += 1;
        }
    }
}

/// Counts an accepted reply read `since` the start of the run in its [`TIMELINE_BUCKET`].
fn count_accept(accepts: &mut Vec<u32>, since: Duration) {
    let bucket = since.as_nanos() / TIMELINE_BUCKET.as_nanos();
    let Ok(i) = usize::try_from(bucket) else {
        return;
    };
    if i >= MAX_TIMELINE_BUCKETS {
        return;
    }
    if accepts.len() <= i {
        accepts.resize(i + 1, 0);
    }
    if let Some(n) = accepts.get_mut(i) {
        *n = n.saturating_add(1);
    }
}

fn churn_delay(m: &mut MinerState, per_sec: f64) -> Option<Duration> {
    if !(per_sec > 0.0 && per_sec.is_finite()) {
        return None;
    }
    // Exponential waiting time: on average `per_sec` steps per miner per second.
    let u = 1.0 - m.unit();
    Some(Duration::from_secs_f64((-u.ln() / per_sec).min(1e6)))
}

/// Sends one submit (of a kind picked by the knobs) and schedules the next.
async fn submit(ctx: &Ctx, m: &mut MinerState, now: Instant, out: &mut Vec<u8>) {
    let spec = &ctx.spec;
    if let Some(next) = m.next_submit {
        let interval = Duration::from_secs_f64(1.0 / spec.rate_per_miner);
        let mut t = next + interval;
        if t + Duration::from_secs(1) < now {
            // Far behind (the machine is saturated): do not burst to catch up.
            t = now + interval;
        }
        m.next_submit = Some(t);
    }
    let Some(job) = m.job.clone() else {
        return;
    };
    if m.en1.is_empty() && m.nonce2_len == 0 {
        return;
    }
    let u = m.unit();
    let mut kind = if u < spec.stale_rate {
        ShareKind::Stale
    } else if u < spec.stale_rate + spec.duplicate_rate {
        ShareKind::Duplicate
    } else if u < spec.stale_rate + spec.duplicate_rate + spec.low_difficulty_rate {
        ShareKind::LowDifficulty
    } else {
        ShareKind::Valid
    };
    let mut fallback = false;
    // The share to send: job, cursor position, version bits.
    let mut chosen: Option<(Arc<SharedJob>, SearchCursor, Option<u32>, bool)> = None;
    if kind == ShareKind::Duplicate {
        match &m.last_valid {
            Some(last) if last.epoch == m.epoch => {
                chosen = Some((Arc::clone(&last.job), last.cursor, last.version_bits, false));
            }
            _ => {
                kind = ShareKind::Valid;
                fallback = true;
            }
        }
    }
    let grind_job = match kind {
        ShareKind::Stale => match &m.prev_block_job {
            Some(old) => Arc::clone(old),
            None => {
                kind = ShareKind::Valid;
                fallback = true;
                Arc::clone(&job)
            }
        },
        _ => Arc::clone(&job),
    };
    let mut hashes = 0;
    if chosen.is_none() {
        let (version, bits) = match m.client.version_mask() {
            Some(mask) => {
                let (v, b) = VersionRoller::new(grind_job.job.version, mask).rolled(1);
                (v, Some(b))
            }
            None => (grind_job.job.version, None),
        };
        let want = if kind == ShareKind::LowDifficulty {
            Want::LowDifficulty
        } else {
            Want::Valid {
                allow_block: spec.allow_blocks,
            }
        };
        let mut found = if want == Want::LowDifficulty {
            // At the lowest difficulty a low-difficulty hash is 1 in 65,536: grind it on the
            // blocking pool so the other miners of this runtime are not held up.
            let (job, en1, n2, target, mut cursor, budget) = (
                Arc::clone(&grind_job),
                m.en1.clone(),
                m.nonce2_len,
                m.share_target,
                m.cursor,
                spec.grind_budget,
            );
            let ground = tokio::task::spawn_blocking(move || {
                let mut h = 0;
                let r = work::search_share(
                    &job.job,
                    &en1,
                    n2,
                    version,
                    &target,
                    Want::LowDifficulty,
                    &mut cursor,
                    budget,
                    &mut h,
                );
                (r, cursor, h)
            })
            .await;
            match ground {
                Ok((r, c, h)) => {
                    m.cursor = c;
                    hashes += h;
                    r
                }
                Err(_) => Err(SearchMiss::Budget),
            }
        } else {
            work::search_share(
                &grind_job.job,
                &m.en1,
                m.nonce2_len,
                version,
                &m.share_target,
                want,
                &mut m.cursor,
                spec.grind_budget,
                &mut hashes,
            )
        };
        if found == Err(SearchMiss::Exhausted) {
            m.cursor = SearchCursor::default();
        }
        if kind == ShareKind::LowDifficulty && found.is_err() {
            // No low-difficulty share exists (or none within the budget): send a valid one.
            kind = ShareKind::Valid;
            fallback = true;
            found = work::search_share(
                &grind_job.job,
                &m.en1,
                m.nonce2_len,
                version,
                &m.share_target,
                Want::Valid {
                    allow_block: spec.allow_blocks,
                },
                &mut m.cursor,
                spec.grind_budget,
                &mut hashes,
            );
        }
        match found {
            Ok(f) => {
                let at = SearchCursor {
                    extranonce2: f.extranonce2,
                    nonce: f.nonce,
                };
                chosen = Some((grind_job, at, bits, f.block));
            }
            Err(miss) => {
                let mut a = ctx.agg();
                a.counters.hashes += hashes;
                a.counters.shares_skipped += 1;
                a.errors.add(match miss {
                    SearchMiss::Impossible => {
                        "no valid non-block share exists at the pool's difficulty"
                    }
                    SearchMiss::Budget => "grind budget exhausted",
                    SearchMiss::Exhausted => "extranonce2 space exhausted",
                });
                drop(a);
                if !ctx.warned_skip.swap(true, Ordering::Relaxed) {
                    warn!(
                        ?miss,
                        "cannot produce a share; skipping (counted in shares_skipped)"
                    );
                }
                return;
            }
        }
    }
    let Some((sjob, at, bits, block)) = chosen else {
        return;
    };
    let now = Instant::now();
    if now >= ctx.end {
        // A grind on the blocking pool can outlast the run on a loaded machine: a share sent
        // now could not be answered before the drain ends, so it is not sent at all.
        return;
    }
    let hold = now >= ctx.hold;
    let tag = Pending {
        kind,
        epoch: m.epoch,
        hold,
    };
    let mut stack = [0u8; EN2_STACK];
    let heap;
    let en2: &[u8] = match stack.get_mut(..m.nonce2_len) {
        Some(buf) => {
            work::extranonce2_into(at.extranonce2, buf);
            buf
        }
        None => {
            heap = work::extranonce2_bytes(at.extranonce2, m.nonce2_len);
            &heap
        }
    };
    m.client.submit(
        now.into_std(),
        out,
        &sjob.id_json,
        en2,
        sjob.job.ntime,
        at.nonce,
        bits.unwrap_or(0),
        tag,
    );
    ctx.in_flight.fetch_add(1, Ordering::Relaxed);
    if kind == ShareKind::Valid {
        m.last_valid = Some(LastShare {
            job: sjob,
            cursor: at,
            version_bits: bits,
            epoch: m.epoch,
        });
    }
    let mut a = ctx.agg();
    a.counters.hashes += hashes;
    a.counters.submitted += 1;
    if hold {
        a.counters.hold_submitted += 1;
    }
    if block {
        a.counters.blocks_submitted += 1;
    }
    if fallback {
        a.counters.knob_fallbacks += 1;
    }
    if let Some(k) = a.kinds.get_mut(kind.index()) {
        k.submitted += 1;
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "test code")]
mod tests {
    use super::*;

    #[test]
    fn workers_split_miners_round_robin() {
        let mut spec = test_spec();
        spec.total_miners = 10;
        spec.workers = 3;
        spec.worker = 1;
        assert_eq!(spec.miner_numbers().collect::<Vec<_>>(), vec![1, 4, 7]);
        assert_eq!(spec.miner_count(), 3);
        spec.worker = 0;
        assert_eq!(spec.miner_count(), 4);
    }

    #[test]
    fn spec_round_trips_through_json() {
        let spec = test_spec();
        let text = serde_json::to_string(&spec).unwrap();
        assert_eq!(serde_json::from_str::<WorkerSpec>(&text).unwrap(), spec);
        let msg = WorkerMessage::Progress(Box::default());
        let text = serde_json::to_string(&msg).unwrap();
        assert!(text.starts_with(r#"{"type":"progress""#), "{text}");
        assert_eq!(serde_json::from_str::<WorkerMessage>(&text).unwrap(), msg);
    }

    pub(crate) fn test_spec() -> WorkerSpec {
        WorkerSpec {
            worker: 0,
            workers: 1,
            total_miners: 1,
            target: "127.0.0.1:3333".parse().unwrap(),
            source: None,
            user_prefix: "ckload".into(),
            pass: "x".into(),
            user_agent: "ckload/test".into(),
            version_rolling: None,
            start_mono_ns: 0,
            ramp: Duration::ZERO,
            duration: Duration::from_secs(1),
            drain: Duration::from_secs(1),
            rate_per_miner: 1.0,
            stale_rate: 0.0,
            duplicate_rate: 0.0,
            low_difficulty_rate: 0.0,
            churn_per_sec: 0.0,
            churn_pause: Duration::ZERO,
            connect_timeout: Duration::from_secs(1),
            handshake_timeout: Duration::from_secs(1),
            grind_budget: 1000,
            allow_blocks: false,
            threads: 1,
            seed: 1,
            in_process: false,
            resume_at_end: false,
            port_slot: 0,
            port_slots: 1,
        }
    }

    #[test]
    fn accepts_are_counted_in_their_bucket() {
        let mut v = Vec::new();
        count_accept(&mut v, Duration::from_millis(5));
        count_accept(&mut v, Duration::from_millis(9));
        count_accept(&mut v, Duration::from_millis(35));
        assert_eq!(v, vec![2, 0, 0, 1]);
        // Beyond the kept buckets: not counted, and nothing grows.
        count_accept(
            &mut v,
            TIMELINE_BUCKET * u32::try_from(MAX_TIMELINE_BUCKETS).unwrap(),
        );
        assert_eq!(v.len(), 4);
    }
}
