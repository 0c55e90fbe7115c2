//! Load scenarios: one command line drives many workers and merges their results.
//!
//! [`run`] plans the run ([`RunSpec::worker_specs`]: miners dealt round-robin to workers, each
//! worker bound to its own loopback source address), starts the workers — child processes
//! running `ckload worker` (spec as JSON on stdin, progress and the final report as JSON lines
//! on stdout) or threads of this process — and meanwhile:
//!
//! * prints a live progress line every second (stderr),
//! * samples the pool's CPU time and RSS from `/proc/<pid>` when given its pid,
//! * forces new blocks with `generate 1` over RPC on the scenario's schedule,
//!
//! then merges the workers' counters and histograms (exactly: V2-serialized hdrhistograms) into
//! one [`Report`].
//!
//! Every run is bounded: miners stop at `duration`, wait at most `drain` for replies, and
//! worker processes still alive well after that are killed. Every address is checked to be
//! loopback before anything is sent.

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use serde::Serialize;
use tracing::warn;

use crate::Error;
use crate::rpc::{RpcTarget, resolve};
use crate::stats::{Counters, ErrorCounts, Hist, KindStats, LatencySummary, ShareKind};
use crate::swarm::{
    HISTOGRAMS, JobSeen, MAX_SECOND_HISTS, MAX_SLOW_SUBMITS, MAX_TIMELINE_BUCKETS, Progress,
    SLOW_SUBMIT_MS, TIMELINE_BUCKET, WorkerMessage, WorkerReport, WorkerSpec,
};
use crate::sys::{
    MachineCpu, NetCounters, ProcSample, cpu_count, ephemeral_port_count, mono_ns, ms_per_tick,
    nofile_hard_limit, steal_per_cpu,
};

/// Longest run accepted.
pub const MAX_DURATION: Duration = Duration::from_secs(6 * 3600);
/// Most miners in one run.
pub const MAX_MINERS: u32 = 1_000_000;
/// Most workers in one run.
pub const MAX_WORKERS: u32 = 64;
/// File descriptors a worker keeps for itself besides its miners' sockets.
const FD_SLACK: u64 = 64;
/// Ephemeral ports left free per source address.
const PORT_SLACK: u64 = 512;
/// Time between planning and miner 0's connect, for the workers to start.
const START_DELAY: Duration = Duration::from_millis(1500);
/// Wait after the ramp before the first forced block.
const BLOCK_SETTLE: Duration = Duration::from_secs(2);
/// A worker still running this long after the drain ends is killed.
const KILL_GRACE: Duration = Duration::from_secs(20);
/// The pool's RSS "at the end" is read this long before the window ends: at the end every
/// miner closes (an idle miner at once), and the sessions the pool keeps for resuming would
/// count as memory of connected miners.
const RSS_LEAD: Duration = Duration::from_millis(250);

/// What a run is for; each sets its own defaults in the CLI and its own summary emphasis.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Scenario {
    /// Connect N miners within T seconds; measure connect/subscribe/authorize and failures.
    Storm,
    /// Hold N miners submitting R shares/s in total for D seconds.
    Steady,
    /// Force new blocks; measure the first-to-last `mining.notify` spread per job.
    Fanout,
    /// Disconnect and reconnect (with session resume) a fraction of the miners per second.
    Churn,
}

impl Scenario {
    /// The scenario's name.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Storm => "storm",
            Self::Steady => "steady",
            Self::Fanout => "fanout",
            Self::Churn => "churn",
        }
    }
}

/// Everything one run needs.
#[derive(Clone, Debug)]
pub struct RunSpec {
    /// Which scenario.
    pub scenario: Scenario,
    /// Pool address (loopback).
    pub target: SocketAddr,
    /// Miners in total.
    pub miners: u32,
    /// Worker processes (or threads).
    pub workers: u32,
    /// Source addresses, dealt to workers round-robin; empty: 127.0.0.2, 127.0.0.3, … one per
    /// worker (IPv4 targets), none for `::1`.
    pub sources: Vec<IpAddr>,
    /// Miners connect evenly over this time (the storm window).
    pub ramp: Duration,
    /// Total time until miners stop submitting; the measurement window is `ramp..duration`.
    pub duration: Duration,
    /// After `duration`, how long to wait for outstanding replies.
    pub drain: Duration,
    /// Submits per second over all miners (0: none).
    pub rate: f64,
    /// Fraction of submits sent as stale shares.
    pub stale_rate: f64,
    /// Fraction of submits sent as duplicates.
    pub duplicate_rate: f64,
    /// Fraction of submits sent as low-difficulty shares.
    pub low_difficulty_rate: f64,
    /// Fraction of the miners disconnected and reconnected (with resume) per second.
    pub churn_per_sec: f64,
    /// Pause between a churn disconnect and the reconnect. ckpool-rs parks a session for
    /// resume when its connector thread handles the close; a reconnect that reaches another
    /// thread first finds nothing to resume.
    pub churn_pause: Duration,
    /// Send `mining.configure` for version rolling with this mask.
    pub version_rolling: Option<u32>,
    /// Worker names are `<user_prefix>.<miner number>`.
    pub user_prefix: String,
    /// Password for `mining.authorize`.
    pub pass: String,
    /// User agent for `mining.subscribe`.
    pub user_agent: String,
    /// New blocks to force through RPC after the ramp.
    pub blocks: u32,
    /// Time between forced blocks.
    pub block_interval: Duration,
    /// The node to force blocks on.
    pub rpc: Option<RpcTarget>,
    /// The pool's pid, for CPU and RSS samples.
    pub pool_pid: Option<u32>,
    /// Runtime threads per worker.
    pub threads_per_worker: usize,
    /// Limit for a TCP connect.
    pub connect_timeout: Duration,
    /// Limit for each handshake reply.
    pub handshake_timeout: Duration,
    /// Most hashes ground for one share.
    pub grind_budget: u64,
    /// Submit hashes that solve a block.
    pub allow_blocks: bool,
    /// Print the live progress line to stderr.
    pub progress: bool,
    /// Seed for the schedule's randomness.
    pub seed: u64,
    /// After the run, every miner reconnects once with its session id and checks that its
    /// extranonce1 comes back (the `end_resume_*` counters).
    pub resume_at_end: bool,
}

impl RunSpec {
    /// A spec with defaults: one worker per 10,000 miners, no submits, 30 s, 2 s drain, ramp
    /// of 1 ms per miner (at most 10 s).
    pub fn new(scenario: Scenario, target: SocketAddr, miners: u32) -> Self {
        Self {
            scenario,
            target,
            miners,
            workers: miners.div_ceil(10_000).max(1),
            sources: Vec::new(),
            ramp: Duration::from_millis(u64::from(miners)).min(Duration::from_secs(10)),
            duration: Duration::from_secs(30),
            drain: Duration::from_secs(2),
            rate: 0.0,
            stale_rate: 0.0,
            duplicate_rate: 0.0,
            low_difficulty_rate: 0.0,
            churn_per_sec: 0.0,
            churn_pause: Duration::from_millis(250),
            version_rolling: None,
            user_prefix: "ckload".to_owned(),
            pass: "x".to_owned(),
            user_agent: "ckload/0.1".to_owned(),
            blocks: 0,
            block_interval: Duration::from_secs(2),
            rpc: None,
            pool_pid: None,
            threads_per_worker: 1,
            connect_timeout: Duration::from_secs(10),
            handshake_timeout: Duration::from_secs(30),
            grind_budget: 1 << 22,
            allow_blocks: false,
            progress: true,
            seed: 1,
            resume_at_end: false,
        }
    }

    /// The source addresses workers use.
    pub fn effective_sources(&self) -> Vec<IpAddr> {
        if !self.sources.is_empty() {
            return self.sources.clone();
        }
        if self.target.is_ipv6() {
            return Vec::new();
        }
        (0..self.workers)
            .map(|w| IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2 + (w % 250) as u8)))
            .collect()
    }

    /// When forced block `i` (0-based) is generated, from the start.
    pub fn block_time(&self, i: u32) -> Duration {
        self.ramp + BLOCK_SETTLE + self.block_interval * i
    }

    /// Checks every setting, including that all addresses are loopback and that the plan fits
    /// this machine's file and port limits.
    pub fn validate(&self) -> Result<(), Error> {
        let bad = |m: String| Err(Error::Config(m));
        ensure_loopback(&self.target)?;
        if self.miners == 0 || self.miners > MAX_MINERS {
            return bad(format!("--miners must be 1..={MAX_MINERS}"));
        }
        if self.workers == 0 || self.workers > MAX_WORKERS || self.workers > self.miners {
            return bad(format!(
                "--workers must be 1..={MAX_WORKERS} and at most the number of miners"
            ));
        }
        if self.duration.is_zero() || self.duration > MAX_DURATION {
            return bad(format!(
                "--duration must be positive and at most {} s",
                MAX_DURATION.as_secs()
            ));
        }
        if self.ramp >= self.duration {
            return bad("the ramp (connect window) must end before --duration".to_owned());
        }
        if self.drain > Duration::from_secs(60) {
            return bad("--drain is at most 60 s".to_owned());
        }
        for (name, v) in [
            ("--stale-rate", self.stale_rate),
            ("--duplicate-rate", self.duplicate_rate),
            ("--low-difficulty-rate", self.low_difficulty_rate),
        ] {
            if !(0.0..=1.0).contains(&v) {
                return bad(format!("{name} must be a fraction in 0..=1"));
            }
        }
        if self.stale_rate + self.duplicate_rate + self.low_difficulty_rate > 1.0 {
            return bad(
                "the stale, duplicate and low-difficulty rates add up to more than 1".into(),
            );
        }
        if !(self.rate.is_finite() && self.rate >= 0.0) {
            return bad("--rate must be a non-negative number".to_owned());
        }
        if self.rate / f64::from(self.miners) > 1000.0 {
            return bad("--rate is more than 1000 shares/s per miner".to_owned());
        }
        if self.churn_pause > Duration::from_secs(60) {
            return bad("--churn-pause is at most 60 s".to_owned());
        }
        if !(0.0..=10.0).contains(&self.churn_per_sec) {
            return bad("--churn must be a fraction per second in 0..=10".to_owned());
        }
        if self.threads_per_worker == 0 || self.threads_per_worker > 64 {
            return bad("--threads must be 1..=64".to_owned());
        }
        if self.grind_budget == 0 {
            return bad("--grind-budget must be positive".to_owned());
        }
        let sources = self.effective_sources();
        for s in &sources {
            if !s.is_loopback() {
                return bad(format!(
                    "source address {s} is not loopback (ckload only uses 127.0.0.0/8 and ::1)"
                ));
            }
            if s.is_ipv4() != self.target.is_ipv4() {
                return bad(format!(
                    "source address {s} is not of the target's family ({})",
                    self.target
                ));
            }
        }
        let per_worker = u64::from(self.miners.div_ceil(self.workers));
        let fd_limit = nofile_hard_limit();
        if per_worker + FD_SLACK > fd_limit {
            return bad(format!(
                "{per_worker} miners per worker do not fit the hard open-files limit {fd_limit}: \
                 use more --workers (at least {})",
                u64::from(self.miners).div_ceil(fd_limit.saturating_sub(FD_SLACK).max(1))
            ));
        }
        if let Some(ports) = ephemeral_port_count() {
            let addrs = u64::try_from(sources.len().max(1)).unwrap_or(1);
            // Workers share source addresses round-robin; count the busiest address.
            let workers_per_addr = u64::from(self.workers).div_ceil(addrs);
            let per_addr = per_worker * workers_per_addr;
            if per_addr + PORT_SLACK > ports {
                return bad(format!(
                    "about {per_addr} connections per source address exceed the {ports} \
                     ephemeral ports (net.ipv4.ip_local_port_range): use more --workers or \
                     --source-addrs"
                ));
            }
        }
        if self.blocks > 0 {
            let Some(rpc) = &self.rpc else {
                return bad("forcing blocks needs --rpc-url".to_owned());
            };
            ensure_loopback(&rpc.addr)?;
            let last = self.block_time(self.blocks - 1);
            if last + Duration::from_secs(1) > self.duration {
                return bad(format!(
                    "{} blocks every {:.1} s after the ramp end at {:.1} s; raise --duration \
                     to at least {:.0} s",
                    self.blocks,
                    self.block_interval.as_secs_f64(),
                    last.as_secs_f64(),
                    (last + Duration::from_secs(2)).as_secs_f64().ceil()
                ));
            }
        }
        Ok(())
    }

    /// The workers' specs for a run whose miner 0 connects at `start_mono_ns`.
    pub fn worker_specs(&self, start_mono_ns: u64, in_process: bool) -> Vec<WorkerSpec> {
        let sources = self.effective_sources();
        let n_sources = u32::try_from(sources.len()).unwrap_or(u32::MAX).max(1);
        (0..self.workers)
            .map(|w| WorkerSpec {
                worker: w,
                workers: self.workers,
                total_miners: self.miners,
                target: self.target,
                source: sources.get(w as usize % sources.len().max(1)).copied(),
                user_prefix: self.user_prefix.clone(),
                pass: self.pass.clone(),
                user_agent: self.user_agent.clone(),
                version_rolling: self.version_rolling,
                start_mono_ns,
                ramp: self.ramp,
                duration: self.duration,
                drain: self.drain,
                rate_per_miner: self.rate / f64::from(self.miners.max(1)),
                stale_rate: self.stale_rate,
                duplicate_rate: self.duplicate_rate,
                low_difficulty_rate: self.low_difficulty_rate,
                churn_per_sec: self.churn_per_sec,
                churn_pause: self.churn_pause,
                connect_timeout: self.connect_timeout,
                handshake_timeout: self.handshake_timeout,
                grind_budget: self.grind_budget,
                allow_blocks: self.allow_blocks,
                threads: self.threads_per_worker,
                seed: self
                    .seed
                    .wrapping_mul(0x9e37_79b9)
                    .wrapping_add(u64::from(w)),
                in_process,
                resume_at_end: self.resume_at_end,
                port_slot: w / n_sources,
                port_slots: self.workers.div_ceil(n_sources),
            })
            .collect()
    }
}

/// Where workers run.
#[derive(Clone, Debug)]
pub enum Launcher {
    /// Child processes of this executable, started as `<exe> worker`.
    Processes {
        /// The ckload executable.
        exe: PathBuf,
    },
    /// Threads of this process (one tokio runtime each); for tests and small runs.
    InProcess,
}

/// Refuses anything but loopback (127.0.0.0/8, ::1, and IPv4-mapped loopback).
pub fn ensure_loopback(addr: &SocketAddr) -> Result<(), Error> {
    if addr.ip().to_canonical().is_loopback() {
        Ok(())
    } else {
        Err(Error::Config(format!(
            "{addr} is not a loopback address: ckload only sends load to 127.0.0.0/8 or ::1"
        )))
    }
}

/// Resolves `host:port` (optionally `stratum+tcp://host:port`); every address it resolves to
/// must be loopback.
pub fn resolve_loopback(hostport: &str) -> Result<SocketAddr, Error> {
    let hostport = hostport
        .strip_prefix("stratum+tcp://")
        .unwrap_or(hostport)
        .trim_end_matches('/');
    let addrs = resolve(hostport)?;
    let first = *addrs
        .first()
        .ok_or_else(|| Error::Config(format!("{hostport} resolved to no address")))?;
    for a in &addrs {
        ensure_loopback(a)?;
    }
    Ok(first)
}

/// A forced block.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct GeneratedBlock {
    /// `CLOCK_MONOTONIC` ns when the `generate` call started.
    pub at_ns: u64,
    /// Seconds from the start of the run.
    pub at_secs: f64,
    /// The block hash, when the call worked.
    pub hash: Option<String>,
    /// The error, when it did not.
    pub error: Option<String>,
}

/// One job's fan-out.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct FanoutJob {
    /// The pool's job id.
    pub job_id: String,
    /// Previous block hash (RPC hex).
    pub prevhash: String,
    /// The clean-jobs flag.
    pub clean: bool,
    /// Miners that received it.
    pub receivers: u64,
    /// First to last receipt, µs.
    pub spread_us: u64,
    /// From the start of the run to the first receipt, s.
    pub first_at_secs: f64,
}

/// Notify fan-out over the run.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Fanout {
    /// Jobs received after the ramp.
    pub jobs_seen: u64,
    /// Jobs received by (nearly) every miner: the ones in `spread`.
    pub jobs_measured: u64,
    /// First-to-last receipt spread over the measured jobs.
    pub spread: LatencySummary,
    /// From the `generate` call to the first miner receiving the new block's job.
    pub block_to_first: LatencySummary,
    /// From the `generate` call to the last miner receiving it.
    pub block_to_last: LatencySummary,
    /// Forced blocks.
    pub blocks: Vec<GeneratedBlock>,
    /// The jobs (at most 1000).
    pub jobs: Vec<FanoutJob>,
}

/// The pool process's CPU and memory.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct PoolUsage {
    /// Its pid.
    pub pid: u32,
    /// CPU seconds in the measurement window.
    pub cpu_secs: f64,
    /// Average CPU in the window, % of one core.
    pub cpu_pct: f64,
    /// CPU seconds over the whole run.
    pub cpu_secs_run: f64,
    /// RSS before any miner connected, KiB.
    pub rss_kib_start: u64,
    /// RSS at the end of the window, KiB: read [`RSS_LEAD`] before it ends, while every miner
    /// is still connected.
    pub rss_kib_end: u64,
    /// Largest RSS sampled, KiB.
    pub rss_kib_max: u64,
    /// (RSS at the end of the window − RSS at the start) / peak authorized miners, bytes.
    pub rss_bytes_per_miner: f64,
    /// CPU seconds per million shares accepted in the window.
    pub cpu_secs_per_million_shares: Option<f64>,
    /// Threads.
    pub threads: u64,
    /// Samples, one per second: (seconds from start, CPU seconds, RSS KiB).
    pub samples: Vec<(f64, f64, u64)>,
}

/// ckload's own cost.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct LoadUsage {
    /// CPU seconds of all workers over the run.
    pub cpu_secs: f64,
    /// CPU seconds of all workers in the measurement window (each worker samples its own
    /// process, or its own thread when in-process).
    pub cpu_secs_window: f64,
    /// Average CPU in the window, % of one core.
    pub cpu_pct_window: f64,
    /// Largest worker peak RSS, KiB.
    pub max_worker_rss_kib: u64,
}

/// The machine during the run.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Machine {
    /// Online CPUs.
    pub cpus: usize,
    /// All cores' busy % in the measurement window (steal included).
    pub busy_pct_window: f64,
    /// All cores' time stolen by the hypervisor in the window, %.
    pub steal_pct_window: f64,
    /// Packets the kernel dropped in the window because a CPU's input queue was full
    /// (`net.core.netdev_max_backlog`; loopback traffic goes through it too), machine-wide.
    /// Each one costs its connection a retransmission ~200 ms later.
    pub backlog_drops_window: u64,
    /// TCP segments retransmitted in the window, SYNs left out, machine-wide.
    pub tcp_retrans_window: u64,
    /// TCP tail-loss probes sent in the window, machine-wide.
    pub tcp_loss_probes_window: u64,
    /// The longest time the host kept one CPU from running in the window ([`StealBurst`]), ms.
    pub max_steal_burst_ms: u64,
    /// The longest steal bursts of the window (at least [`MIN_STEAL_BURST_MS`]), at most
    /// [`MAX_BURSTS`], in time order.
    pub steal_bursts: Vec<StealBurst>,
    /// Hard open-files limit.
    pub nofile_hard: u64,
    /// Ephemeral ports per source address.
    pub ephemeral_ports: Option<u64>,
}

/// Achieved rates in the measurement window.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Rates {
    /// Window length, s.
    pub window_secs: f64,
    /// Submits sent per second.
    pub submitted_per_sec: f64,
    /// Submits accepted per second.
    pub accepted_per_sec: f64,
}

/// Settings echoed in the report.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Settings {
    /// Connect window, s.
    pub ramp_secs: f64,
    /// Run length, s.
    pub duration_secs: f64,
    /// Drain, s.
    pub drain_secs: f64,
    /// Total submits/s asked for.
    pub rate: f64,
    /// Stale fraction.
    pub stale_rate: f64,
    /// Duplicate fraction.
    pub duplicate_rate: f64,
    /// Low-difficulty fraction.
    pub low_difficulty_rate: f64,
    /// Churn fraction per second.
    pub churn_per_sec: f64,
    /// Pause before a churn reconnect, s.
    pub churn_pause_secs: f64,
    /// Forced blocks.
    pub blocks: u32,
    /// Between forced blocks, s.
    pub block_interval_secs: f64,
    /// Version-rolling mask asked for (hex).
    pub version_rolling: Option<String>,
    /// Runtime threads per worker.
    pub threads_per_worker: usize,
    /// In-process workers instead of processes.
    pub in_process: bool,
}

/// The merged result of a run (what `--json` writes).
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Report {
    /// Scenario name.
    pub scenario: String,
    /// Pool address.
    pub target: String,
    /// Miners asked for.
    pub miners: u32,
    /// Workers.
    pub workers: u32,
    /// Source addresses used.
    pub sources: Vec<String>,
    /// The settings.
    pub settings: Settings,
    /// From planning to the last report, s.
    pub elapsed_secs: f64,
    /// Most connections open at once (sum over workers at a progress tick).
    pub peak_open: u64,
    /// Most miners authorized at once.
    pub peak_authorized: u64,
    /// Merged counters.
    pub counters: Counters,
    /// Submit results by kind (`valid`, `stale`, `duplicate`, `low_difficulty`).
    pub shares: BTreeMap<String, KindStats>,
    /// Replies that were not what their kind should get (see [`KindStats::unexpected`]).
    pub unexpected_replies: u64,
    /// Rejections by reason, all kinds.
    pub rejected_by_reason: BTreeMap<String, u64>,
    /// Achieved rates.
    pub rates: Rates,
    /// Latencies (µs): `connect`, `subscribe`, `authorize`, `login` (connect start to authorize
    /// reply), `submit` (all submits), `submit_window` (submits sent after the ramp),
    /// `submit_socket` (the window's submits to their reply's arrival in the socket; see
    /// [`crate::swarm::HISTOGRAMS`]).
    pub latency: BTreeMap<String, LatencySummary>,
    /// Notify fan-out.
    pub fanout: Fanout,
    /// The pool's CPU and memory, with `--pool-pid`.
    pub pool: Option<PoolUsage>,
    /// ckload's own cost.
    pub ckload: LoadUsage,
    /// The machine.
    pub machine: Machine,
    /// Errors by text.
    pub errors: ErrorCounts,
    /// Workers that failed or never reported.
    pub worker_failures: Vec<String>,
    /// The merged histograms, hdrhistogram V2 in hex.
    pub histograms_v2: BTreeMap<String, String>,
    /// When in the window the slow submits were sent.
    pub slow_submits: SlowSubmits,
    /// Submit p99 of each second of the window.
    pub submit_seconds: SubmitSeconds,
    /// Accepted replies over time, pool-wide: the longest stretch without one, and dips.
    pub accepts: AcceptTimeline,
}

/// Accepted replies over the run, all miners together, by when ckload read them: how long the
/// pool went without accepting anything (a stall, an upgrade), and how long its rate sagged.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct AcceptTimeline {
    /// Width of the buckets of `per_100ms`, ms.
    pub bucket_ms: u64,
    /// Accepted replies per 100 ms from the start of the run (miner 0's connect time), for the
    /// first 600 s.
    pub per_100ms: Vec<u32>,
    /// Accepted replies per second from the start of the run.
    pub per_second: Vec<u32>,
    /// The longest stretch of the window with no accepted reply at all, ms: consecutive empty
    /// 10-ms buckets, so exact to 10 ms (the true gap between two replies is at most 20 ms
    /// longer).
    pub longest_gap_ms: u64,
    /// When it began, s from the start of the run.
    pub longest_gap_at_secs: f64,
    /// The window's median of `per_100ms`.
    pub median_per_100ms: u32,
    /// The longest stretch of the window in which every 100 ms had fewer than half the median
    /// accepted replies, ms (0: none).
    pub longest_dip_ms: u64,
    /// When it began, s from the start of the run.
    pub longest_dip_at_secs: f64,
}

impl AcceptTimeline {
    /// From the merged [`TIMELINE_BUCKET`] counts (index 0 at the start of the run) and the
    /// window's edges.
    pub fn of(buckets: &[u32], window: (Duration, Duration)) -> Self {
        let fine = u64::try_from(TIMELINE_BUCKET.as_millis())
            .unwrap_or(10)
            .max(1);
        let per = |ms: u64| usize::try_from((ms / fine).max(1)).unwrap_or(1);
        let coarse = |width: usize| -> Vec<u32> {
            buckets
                .chunks(width)
                .map(|c| c.iter().fold(0u32, |a, n| a.saturating_add(*n)))
                .collect()
        };
        let per_100ms = coarse(per(100));
        let per_second = coarse(per(1000));
        // The window's whole buckets only; the window may end past the recorded counts.
        let edges = |w: u64| {
            let (from, to) = (window.0.as_millis(), window.1.as_millis());
            let w = u128::from(w);
            (
                usize::try_from(from.div_ceil(w)).unwrap_or(usize::MAX),
                usize::try_from(to / w).unwrap_or(0),
            )
        };
        let (lo, hi) = edges(fine);
        let (gap, gap_at) = longest_run(buckets, lo, hi, |n| n == 0);
        let (lo100, hi100) = edges(100);
        let mut in_window: Vec<u32> = (lo100..hi100)
            .map(|i| per_100ms.get(i).copied().unwrap_or(0))
            .collect();
        in_window.sort_unstable();
        let median = in_window.get(in_window.len() / 2).copied().unwrap_or(0);
        let (dip, dip_at) = if median == 0 {
            (0, 0)
        } else {
            longest_run(&per_100ms, lo100, hi100, |n| {
                u64::from(n) * 2 < u64::from(median)
            })
        };
        Self {
            bucket_ms: 100,
            per_100ms,
            per_second,
            longest_gap_ms: gap as u64 * fine,
            longest_gap_at_secs: (gap_at as u64 * fine) as f64 / 1000.0,
            median_per_100ms: median,
            longest_dip_ms: dip as u64 * 100,
            longest_dip_at_secs: (dip_at as u64 * 100) as f64 / 1000.0,
        }
    }
}

/// The longest run of indices in `lo..hi` whose count (0 past the end of `v`) meets `f`: its
/// length and first index.
fn longest_run(v: &[u32], lo: usize, hi: usize, f: impl Fn(u32) -> bool) -> (usize, usize) {
    let (mut best, mut best_at, mut run, mut at) = (0, 0, 0, 0);
    for i in lo..hi {
        if f(v.get(i).copied().unwrap_or(0)) {
            if run == 0 {
                at = i;
            }
            run += 1;
            if run > best {
                (best, best_at) = (run, at);
            }
        } else {
            run = 0;
        }
    }
    (best, best_at)
}

/// The window's submit latency second by second (by when each submit was sent): whether a
/// window's p99 comes from a few bad seconds (a stall of the host, the server or ckload) or from
/// all of them (a server at its limit).
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct SubmitSeconds {
    /// p99 of each second, µs, in order (the last one may be partial).
    pub p99_us: Vec<u64>,
    /// Median of those p99s, over the full seconds (those with at least half the submits of
    /// the busiest second).
    pub median_p99_us: u64,
    /// The largest of them.
    pub worst_p99_us: u64,
}

impl SubmitSeconds {
    fn of(seconds: &[Hist]) -> Self {
        let p99_us: Vec<u64> = seconds.iter().map(|h| h.quantile_us(0.99)).collect();
        let busiest = seconds.iter().map(Hist::len).max().unwrap_or(0);
        let mut full: Vec<u64> = seconds
            .iter()
            .zip(&p99_us)
            .filter(|(h, _)| !h.is_empty() && h.len() * 2 >= busiest)
            .map(|(_, p)| *p)
            .collect();
        full.sort_unstable();
        Self {
            median_p99_us: full.get(full.len() / 2).copied().unwrap_or(0),
            worst_p99_us: full.last().copied().unwrap_or(0),
            p99_us,
        }
    }
}

/// The submits of the window that took [`SLOW_SUBMIT_MS`] or longer, grouped into bursts: a
/// stall of the server, the host or the network shows as many miners' submits sent within a few
/// ms of each other, all slow; a single slow connection as bursts of one.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct SlowSubmits {
    /// The threshold, ms.
    pub threshold_ms: u32,
    /// Slow submits listed (each worker lists at most [`MAX_SLOW_SUBMITS`]).
    pub count: u64,
    /// Bursts found: slow submits sent at most [`BURST_GAP_MS`] apart belong to one.
    pub bursts: u64,
    /// The largest bursts (at most [`MAX_BURSTS`]), in time order.
    pub largest: Vec<SlowBurst>,
}

/// One burst of slow submits.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct SlowBurst {
    /// When its first submit was sent, s after the ramp.
    pub at_secs: f64,
    /// From its first submit sent to its last, ms.
    pub span_ms: u32,
    /// Slow submits in it.
    pub count: u64,
    /// The slowest reply, ms.
    pub max_ms: u32,
    /// Workers (ckload processes) whose miners it hit.
    pub workers: u32,
    /// Time the host stole from this VM's CPUs ([`StealBurst`]s) between its first submit and
    /// its last reply, ms.
    pub stolen_ms: u64,
}

/// Fills in each slow burst's [`SlowBurst::stolen_ms`] from the steal bursts that overlap it.
fn add_steal(slow: &mut SlowSubmits, steal: &[StealBurst]) {
    for b in &mut slow.largest {
        let from = b.at_secs;
        let to = b.at_secs + f64::from(b.span_ms.saturating_add(b.max_ms)) / 1000.0;
        b.stolen_ms = steal
            .iter()
            .filter(|s| s.at_secs <= to && s.at_secs + s.span_ms as f64 / 1000.0 >= from)
            .map(|s| s.ms)
            .sum();
    }
}

/// A stretch of the window in which the hypervisor ran something else on one of this VM's CPUs:
/// `/proc/stat` sampled every [`STEAL_SAMPLE`], consecutive samples with stolen time (gaps of up
/// to [`STEAL_GAP_SAMPLES`] samples bridged). The steal percentage of a whole run hides these; a
/// 150 ms one delays every miner served on that CPU, enough on its own to move a run's p99.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct StealBurst {
    /// When it began, s after the ramp.
    pub at_secs: f64,
    /// The CPU.
    pub cpu: u32,
    /// Time stolen in it, ms (`/proc/stat` counts in clock ticks, 10 ms here).
    pub ms: u64,
    /// From the reading before its first with steal to its last, ms.
    pub span_ms: u64,
}

/// How often the steal sampler reads `/proc/stat`.
pub const STEAL_SAMPLE: Duration = Duration::from_millis(10);
/// Samples without steal bridged inside one burst.
pub const STEAL_GAP_SAMPLES: u32 = 2;
/// Bursts shorter than this are not listed.
pub const MIN_STEAL_BURST_MS: u64 = 20;

/// Per-CPU state of the steal sampler.
#[derive(Clone, Copy, Default)]
struct OpenBurst {
    start: Option<Instant>,
    last: Option<Instant>,
    ticks: u64,
    quiet: u32,
}

/// Turns successive per-CPU steal readings into [`StealBurst`]s.
struct StealTracker {
    /// Burst times are counted from here.
    from: Instant,
    tick_ms: u64,
    prev: Vec<u64>,
    open: Vec<OpenBurst>,
    out: Vec<StealBurst>,
}

impl StealTracker {
    fn new(from: Instant, first: Vec<u64>, tick_ms: u64) -> Self {
        Self {
            from,
            tick_ms,
            open: vec![OpenBurst::default(); first.len()],
            prev: first,
            out: Vec::new(),
        }
    }

    /// A reading taken at `now`, [`STEAL_SAMPLE`] after the previous one.
    fn observe(&mut self, now: Instant, cur: Vec<u64>) {
        for (cpu, (b, (c, p))) in self
            .open
            .iter_mut()
            .zip(cur.iter().zip(&self.prev))
            .enumerate()
        {
            let d = c.saturating_sub(*p);
            if d > 0 {
                if b.start.is_none() {
                    b.start = Some(now.checked_sub(STEAL_SAMPLE).unwrap_or(now));
                }
                b.last = Some(now);
                b.ticks += d;
                b.quiet = 0;
            } else if b.start.is_some() {
                b.quiet += 1;
                if b.quiet > STEAL_GAP_SAMPLES {
                    Self::close(self.from, self.tick_ms, b, cpu, &mut self.out);
                }
            }
        }
        self.prev = cur;
    }

    fn close(
        from: Instant,
        tick_ms: u64,
        b: &mut OpenBurst,
        cpu: usize,
        out: &mut Vec<StealBurst>,
    ) {
        if let (Some(start), Some(last)) = (b.start, b.last) {
            let ms = b.ticks * tick_ms;
            if ms >= MIN_STEAL_BURST_MS {
                out.push(StealBurst {
                    at_secs: start.saturating_duration_since(from).as_secs_f64(),
                    cpu: u32::try_from(cpu).unwrap_or(u32::MAX),
                    ms,
                    span_ms: u64::try_from(last.saturating_duration_since(start).as_millis())
                        .unwrap_or(u64::MAX),
                });
            }
        }
        *b = OpenBurst::default();
    }

    /// Closes what is still open; the bursts in the order they ended.
    fn finish(mut self) -> Vec<StealBurst> {
        for (cpu, b) in self.open.iter_mut().enumerate() {
            Self::close(self.from, self.tick_ms, b, cpu, &mut self.out);
        }
        self.out
    }
}

/// Samples every CPU's stolen time from `from` to `until` (see [`StealBurst`]), times relative
/// to `from`.
fn sample_steal(from: Instant, until: Instant, stop: &AtomicBool) -> Vec<StealBurst> {
    while Instant::now() < from {
        if stop.load(Ordering::Relaxed) {
            return Vec::new();
        }
        std::thread::sleep(
            from.saturating_duration_since(Instant::now())
                .min(STEAL_SAMPLE),
        );
    }
    let Some(first) = steal_per_cpu() else {
        return Vec::new();
    };
    let mut tracker = StealTracker::new(from, first, ms_per_tick());
    let mut next = Instant::now() + STEAL_SAMPLE;
    while next <= until && !stop.load(Ordering::Relaxed) {
        std::thread::sleep(next.saturating_duration_since(Instant::now()));
        next += STEAL_SAMPLE;
        let Some(cur) = steal_per_cpu() else {
            break;
        };
        tracker.observe(Instant::now(), cur);
    }
    tracker.finish()
}

/// The [`MAX_BURSTS`] longest, in time order.
fn largest_steal_bursts(all: &[StealBurst]) -> Vec<StealBurst> {
    largest_in_time_order(all.to_vec(), |a, b| b.ms.cmp(&a.ms), |b| b.at_secs)
}

/// The [`MAX_BURSTS`] first of `v` in `order`, then sorted by `at`.
fn largest_in_time_order<T>(
    mut v: Vec<T>,
    order: impl FnMut(&T, &T) -> std::cmp::Ordering,
    at: impl Fn(&T) -> f64,
) -> Vec<T> {
    v.sort_by(order);
    v.truncate(MAX_BURSTS);
    v.sort_by(|a, b| at(a).total_cmp(&at(b)));
    v
}

/// Slow submits sent this close (ms) belong to one burst.
pub const BURST_GAP_MS: u32 = 50;
/// Bursts a report lists.
pub const MAX_BURSTS: usize = 8;

/// Groups `(sent ms, latency ms, worker)` into bursts.
fn slow_bursts(mut slow: Vec<(u32, u32, u32)>) -> SlowSubmits {
    slow.sort_unstable();
    // Each burst with the ms its first submit was sent and the workers it hit.
    let mut bursts: Vec<(SlowBurst, u32, Vec<u32>)> = Vec::new();
    let mut last_sent: Option<u32> = None;
    for (sent, ms, worker) in &slow {
        let joins = last_sent.is_some_and(|l| sent.saturating_sub(l) <= BURST_GAP_MS);
        match bursts.last_mut() {
            Some((b, first, workers)) if joins => {
                b.span_ms = sent.saturating_sub(*first);
                b.count += 1;
                b.max_ms = b.max_ms.max(*ms);
                if !workers.contains(worker) {
                    workers.push(*worker);
                }
            }
            _ => bursts.push((
                SlowBurst {
                    at_secs: f64::from(*sent) / 1000.0,
                    span_ms: 0,
                    count: 1,
                    max_ms: *ms,
                    workers: 1,
                    stolen_ms: 0,
                },
                *sent,
                vec![*worker],
            )),
        }
        last_sent = Some(*sent);
    }
    let total = bursts.len() as u64;
    let all: Vec<SlowBurst> = bursts
        .into_iter()
        .map(|(mut b, _, w)| {
            b.workers = u32::try_from(w.len()).unwrap_or(u32::MAX);
            b
        })
        .collect();
    let largest = largest_in_time_order(
        all,
        |a, b| b.count.cmp(&a.count).then(b.max_ms.cmp(&a.max_ms)),
        |b| b.at_secs,
    );
    SlowSubmits {
        threshold_ms: SLOW_SUBMIT_MS,
        count: slow.len() as u64,
        bursts: total,
        largest,
    }
}

impl Report {
    /// Errors that mean the run did not go as planned: failed connects, refused handshakes,
    /// timeouts, disconnects, protocol errors, unanswered submits and failed workers.
    pub fn error_count(&self) -> u64 {
        let c = &self.counters;
        c.connect_failures
            + c.subscribe_failures
            + c.authorize_failures
            + c.handshake_timeouts
            + c.disconnects
            + c.protocol_errors
            + c.unanswered
            + c.end_resume_mismatch
            + c.end_resume_failures
            + self.worker_failures.len() as u64
    }

    /// Submits neither answered nor counted unanswered: 0 when every submit got its reply or
    /// was counted as lost (a worker killed at the deadline leaves some).
    pub fn outstanding(&self) -> u64 {
        let c = &self.counters;
        c.submitted
            .saturating_sub(c.accepted + c.rejected + c.unanswered)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

enum Event {
    Message(u32, WorkerMessage),
    Closed(u32, Option<String>),
}

/// Runs a scenario to its end and returns the merged report.
pub fn run(spec: &RunSpec, launcher: &Launcher) -> Result<Report, Error> {
    spec.validate()?;
    let t0 = Instant::now();
    let start_ns = mono_ns() + u64::try_from(START_DELAY.as_nanos()).unwrap_or(0);
    let start = t0 + START_DELAY;
    let specs = spec.worker_specs(start_ns, matches!(launcher, Launcher::InProcess));
    let pool_start = spec.pool_pid.and_then(ProcSample::read);
    if spec.pool_pid.is_some() && pool_start.is_none() {
        return Err(Error::Config(format!(
            "no process with pid {} to sample (--pool-pid)",
            spec.pool_pid.unwrap_or(0)
        )));
    }

    let (tx, rx) = mpsc::channel::<Event>();
    let mut children: Vec<(u32, Child)> = Vec::new();
    let mut threads = Vec::new();
    for ws in &specs {
        match launcher {
            Launcher::Processes { exe } => {
                let child = spawn_worker_process(exe, ws, tx.clone())?;
                children.push((ws.worker, child));
            }
            Launcher::InProcess => {
                let tx = tx.clone();
                let ws = ws.clone();
                let worker = ws.worker;
                let handle = std::thread::Builder::new()
                    .name(format!("ckload-worker-{worker}"))
                    .spawn(move || {
                        let sink_tx = Mutex::new(tx.clone());
                        let sink = move |m: WorkerMessage| {
                            let _ = lock(&sink_tx).send(Event::Message(worker, m));
                        };
                        let _ = crate::swarm::run_worker(&ws, &sink);
                        let _ = tx.send(Event::Closed(worker, None));
                    })
                    .map_err(|source| Error::Io {
                        what: "starting a worker thread".into(),
                        source,
                    })?;
                threads.push(handle);
            }
        }
    }
    drop(tx);

    let blocks: Arc<Mutex<Vec<GeneratedBlock>>> = Arc::default();
    let block_thread = match (&spec.rpc, spec.blocks) {
        (Some(rpc), n) if n > 0 => {
            let rpc = rpc.clone();
            let blocks = Arc::clone(&blocks);
            let times: Vec<Duration> = (0..n).map(|i| spec.block_time(i)).collect();
            Some(std::thread::spawn(move || {
                for at in times {
                    let when = start + at;
                    std::thread::sleep(when.saturating_duration_since(Instant::now()));
                    let at_ns = mono_ns();
                    let r = rpc.generate_one();
                    let at_secs = start.elapsed().as_secs_f64();
                    if let Err(e) = &r {
                        warn!("forcing a block failed: {e}");
                    }
                    lock(&blocks).push(GeneratedBlock {
                        at_ns,
                        at_secs,
                        hash: r.as_ref().ok().cloned(),
                        error: r.err().map(|e| e.to_string()),
                    });
                }
            }))
        }
        _ => None,
    };

    let steal_stop = Arc::new(AtomicBool::new(false));
    let steal_thread = {
        let (from, until) = (start + spec.ramp, start + spec.duration);
        let stop = Arc::clone(&steal_stop);
        std::thread::Builder::new()
            .name("ckload-steal".into())
            .spawn(move || sample_steal(from, until, &stop))
            .ok()
    };
    let mut mon = Monitor::new(spec, start, pool_start);
    let mut reports: HashMap<u32, WorkerReport> = HashMap::new();
    let mut failures = Vec::new();
    let mut open = specs.len();
    let mut hard_end = start + spec.duration + spec.drain + KILL_GRACE;
    if spec.resume_at_end {
        hard_end += crate::swarm::resume_budget(spec.miners);
    }
    let mut next_tick = start.min(Instant::now() + Duration::from_secs(1));
    while open > 0 {
        let now = Instant::now();
        if now >= hard_end {
            failures.push(format!(
                "{open} worker(s) still running {} s after the drain; killed",
                KILL_GRACE.as_secs()
            ));
            break;
        }
        let wait = next_tick
            .min(hard_end)
            .min(mon.next_edge().unwrap_or(hard_end))
            .saturating_duration_since(now);
        match rx.recv_timeout(wait) {
            Ok(Event::Message(w, WorkerMessage::Progress(p))) => mon.progress(w, *p),
            Ok(Event::Message(w, WorkerMessage::Report(r))) => {
                if let Some(f) = &r.fatal {
                    failures.push(format!("worker {w}: {f}"));
                }
                reports.insert(w, *r);
            }
            Ok(Event::Closed(w, err)) => {
                open -= 1;
                if let Some(e) = err {
                    failures.push(format!("worker {w}: {e}"));
                }
                if !reports.contains_key(&w) {
                    failures.push(format!("worker {w} ended without a report"));
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
        let now = Instant::now();
        mon.edges(now);
        if now >= next_tick {
            mon.tick(now);
            while next_tick <= now {
                next_tick += Duration::from_secs(1);
            }
        }
    }
    for (w, mut child) in children {
        // A worker that closed its output is exiting; give it until the hard deadline.
        while matches!(child.try_wait(), Ok(None)) && Instant::now() < hard_end {
            std::thread::sleep(Duration::from_millis(10));
        }
        if matches!(child.try_wait(), Ok(None)) {
            let _ = child.kill();
            failures.push(format!("worker {w} killed after the deadline"));
        }
        let _ = child.wait();
    }
    for t in threads {
        if Instant::now() < hard_end {
            let _ = t.join();
        }
    }
    if let Some(t) = block_thread {
        let _ = t.join();
    }
    steal_stop.store(true, Ordering::Relaxed);
    if let Some(t) = steal_thread {
        mon.steal_bursts = t.join().unwrap_or_default();
    }
    mon.finish(Instant::now());
    let generated = std::mem::take(&mut *lock(&blocks));
    Ok(merge(
        spec,
        launcher,
        &specs,
        reports,
        failures,
        &mon,
        generated,
        start_ns,
        t0.elapsed(),
    ))
}

fn spawn_worker_process(
    exe: &PathBuf,
    ws: &WorkerSpec,
    tx: mpsc::Sender<Event>,
) -> Result<Child, Error> {
    let io = |what: &str| {
        let what = format!("{what} (worker {}, {})", ws.worker, exe.display());
        move |source| Error::Io { what, source }
    };
    let mut child = Command::new(exe)
        .arg("worker")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(io("starting a worker process"))?;
    let spec_line = serde_json::to_string(ws).map_err(|e| Error::Protocol(e.to_string()))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(format!("{spec_line}\n").as_bytes())
            .map_err(io("writing the worker spec"))?;
    }
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| Error::Worker("no stdout pipe".into()))?;
    let worker = ws.worker;
    std::thread::spawn(move || {
        let mut err = None;
        for line in BufReader::new(stdout).lines() {
            let line = match line {
                Ok(l) => l,
                Err(e) => {
                    err = Some(format!("reading its output: {e}"));
                    break;
                }
            };
            if line.trim().is_empty() {
                continue;
            }
            match serde_json::from_str::<WorkerMessage>(&line) {
                Ok(m) => {
                    if tx.send(Event::Message(worker, m)).is_err() {
                        return;
                    }
                }
                Err(e) => {
                    err = Some(format!("unreadable output line ({e}): {line:.200}"));
                }
            }
        }
        let _ = tx.send(Event::Closed(worker, err));
    });
    Ok(child)
}

/// Live state: latest progress per worker, pool and machine samples.
struct Monitor {
    progress_line: bool,
    start: Instant,
    hold_at: Instant,
    end_at: Instant,
    pool_pid: Option<u32>,
    pool_start: Option<ProcSample>,
    pool_last: Option<(Instant, ProcSample)>,
    pool_hold: Option<ProcSample>,
    pool_end: Option<ProcSample>,
    /// When the pool's RSS at the end is read ([`RSS_LEAD`] before `end_at`, not before
    /// `hold_at`), and what it was.
    rss_at: Instant,
    pool_rss_end: Option<u64>,
    /// Which of the samples at `hold_at`, `rss_at` and `end_at` were taken.
    held: bool,
    rss_read: bool,
    ended: bool,
    pool_rss_max: u64,
    pool_samples: Vec<(f64, f64, u64)>,
    machine_hold: Option<MachineCpu>,
    machine_end: Option<MachineCpu>,
    net_hold: Option<NetCounters>,
    net_end: Option<NetCounters>,
    steal_bursts: Vec<StealBurst>,
    latest: BTreeMap<u32, Progress>,
    prev_sum: Counters,
    prev_at: Instant,
    peak_open: u64,
    peak_authorized: u64,
}

impl Monitor {
    fn new(spec: &RunSpec, start: Instant, pool_start: Option<ProcSample>) -> Self {
        Self {
            progress_line: spec.progress,
            start,
            hold_at: start + spec.ramp,
            end_at: start + spec.duration,
            pool_pid: spec.pool_pid,
            pool_start,
            pool_last: pool_start.map(|s| (Instant::now(), s)),
            pool_hold: None,
            pool_end: None,
            rss_at: (start + spec.duration)
                .checked_sub(RSS_LEAD)
                .map_or(start + spec.ramp, |at| at.max(start + spec.ramp)),
            pool_rss_end: None,
            held: false,
            rss_read: false,
            ended: false,
            pool_rss_max: pool_start.map_or(0, |s| s.rss_kib),
            pool_samples: Vec::new(),
            machine_hold: None,
            machine_end: None,
            net_hold: None,
            net_end: None,
            steal_bursts: Vec::new(),
            latest: BTreeMap::new(),
            prev_sum: Counters::default(),
            prev_at: Instant::now(),
            peak_open: 0,
            peak_authorized: 0,
        }
    }

    fn progress(&mut self, w: u32, p: Progress) {
        self.latest.insert(w, p);
    }

    /// The next window edge whose sample is not taken yet.
    fn next_edge(&self) -> Option<Instant> {
        [
            (!self.held).then_some(self.hold_at),
            (!self.rss_read).then_some(self.rss_at),
            (!self.ended).then_some(self.end_at),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// Takes the samples of the window edges that are due: the run loop wakes up for each, so
    /// they are taken when the window starts and ends, not at the next once-a-second tick (by
    /// then the miners may be gone).
    fn edges(&mut self, now: Instant) {
        if now >= self.hold_at && !self.held {
            self.held = true;
            self.pool_hold = self.pool_pid.and_then(ProcSample::read);
            self.machine_hold = MachineCpu::read();
            self.net_hold = NetCounters::read();
        }
        if now >= self.rss_at && !self.rss_read {
            self.rss_read = true;
            self.pool_rss_end = self.pool_pid.and_then(ProcSample::read).map(|s| s.rss_kib);
        }
        if now >= self.end_at && !self.ended {
            self.ended = true;
            self.pool_end = self.pool_pid.and_then(ProcSample::read);
            self.machine_end = MachineCpu::read();
            self.net_end = NetCounters::read();
        }
    }

    /// Samples once a second; prints the progress line.
    fn tick(&mut self, now: Instant) {
        self.edges(now);
        let pool = self.pool_pid.and_then(ProcSample::read);
        if let Some(s) = pool {
            self.pool_rss_max = self.pool_rss_max.max(s.rss_kib);
            self.pool_samples.push((
                now.saturating_duration_since(self.start).as_secs_f64(),
                s.cpu_secs,
                s.rss_kib,
            ));
        }
        let mut sum = Counters::default();
        let (mut open, mut authed, mut errors, mut p99) = (0, 0, 0, 0);
        for p in self.latest.values() {
            sum.merge(&p.counters);
            open += p.open;
            authed += p.authorized;
            errors += p.errors;
            p99 = p99.max(p.submit_p99_us);
        }
        self.peak_open = self.peak_open.max(open);
        self.peak_authorized = self.peak_authorized.max(authed);
        let dt = now.saturating_duration_since(self.prev_at).as_secs_f64();
        let per_sec = |a: u64, b: u64| {
            if dt > 0.0 {
                a.saturating_sub(b) as f64 / dt
            } else {
                0.0
            }
        };
        if self.progress_line && now >= self.start {
            let mut line = format!(
                "[{:>6.1}s] open {open} auth {authed} | submit/s {:.0} acc/s {:.0} rej {} | \
                 submit p99 {:.2} ms | err {errors} disc {}",
                now.saturating_duration_since(self.start).as_secs_f64(),
                per_sec(sum.submitted, self.prev_sum.submitted),
                per_sec(sum.accepted, self.prev_sum.accepted),
                sum.rejected,
                p99 as f64 / 1000.0,
                sum.disconnects,
            );
            if let (Some(s), Some((at, last))) = (pool, self.pool_last) {
                let pdt = now.saturating_duration_since(at).as_secs_f64();
                let pct = if pdt > 0.0 {
                    100.0 * (s.cpu_secs - last.cpu_secs) / pdt
                } else {
                    0.0
                };
                line.push_str(&format!(
                    " | pool cpu {pct:.0}% rss {:.1} MiB",
                    s.rss_kib as f64 / 1024.0
                ));
            }
            eprintln!("{line}");
        }
        if let Some(s) = pool {
            self.pool_last = Some((now, s));
        }
        self.prev_sum = sum;
        self.prev_at = now;
    }

    /// The run ended (possibly early: every worker gone): the edges not sampled yet are
    /// sampled now.
    fn finish(&mut self, now: Instant) {
        if !self.ended {
            self.tick(now);
            self.hold_at = self.hold_at.min(now);
            self.rss_at = self.rss_at.min(now);
            self.end_at = self.end_at.min(now);
            self.edges(now);
        }
    }
}

#[expect(clippy::too_many_arguments, reason = "everything a report is made of")]
fn merge(
    spec: &RunSpec,
    launcher: &Launcher,
    specs: &[WorkerSpec],
    reports: HashMap<u32, WorkerReport>,
    failures: Vec<String>,
    mon: &Monitor,
    blocks: Vec<GeneratedBlock>,
    start_ns: u64,
    elapsed: Duration,
) -> Report {
    let mut counters = Counters::default();
    let mut kinds: BTreeMap<String, KindStats> = BTreeMap::new();
    let mut hists: BTreeMap<&str, Hist> = HISTOGRAMS.iter().map(|n| (*n, Hist::new())).collect();
    let mut errors = ErrorCounts::default();
    let mut jobs: HashMap<String, JobSeen> = HashMap::new();
    let mut slow = Vec::new();
    let mut seconds: Vec<Hist> = Vec::new();
    let mut accepts: Vec<u32> = Vec::new();
    let mut failures = failures;
    let mut ckload_cpu = 0.0;
    let mut ckload_window = 0.0;
    let mut max_rss = 0;
    for w in specs {
        let Some(r) = reports.get(&w.worker) else {
            continue;
        };
        counters.merge(&r.counters);
        for (k, s) in &r.shares {
            kinds.entry(k.clone()).or_default().merge(s);
        }
        for (name, text) in &r.histograms {
            match crate::stats::Hist::from_v2_hex(text) {
                Ok(h) => {
                    if let Some(into) = hists.get_mut(name.as_str()) {
                        into.merge(&h);
                    }
                }
                Err(e) => failures.push(format!("worker {}: histogram {name}: {e}", w.worker)),
            }
        }
        errors.merge(&r.errors);
        for j in &r.jobs {
            jobs.entry(j.job_id.clone())
                .and_modify(|m| m.merge(j))
                .or_insert_with(|| j.clone());
        }
        slow.extend(
            r.slow_submits
                .iter()
                .take(MAX_SLOW_SUBMITS)
                .map(|[sent, ms]| (*sent, *ms, w.worker)),
        );
        for (i, text) in r.submit_seconds.iter().take(MAX_SECOND_HISTS).enumerate() {
            match Hist::from_v2_hex(text) {
                Ok(h) => {
                    if seconds.len() <= i {
                        seconds.resize_with(i + 1, Hist::coarse);
                    }
                    if let Some(into) = seconds.get_mut(i) {
                        into.merge(&h);
                    }
                }
                Err(e) => failures.push(format!("worker {}: second {i}: {e}", w.worker)),
            }
        }
        if accepts.len() < r.accepts.len() {
            accepts.resize(r.accepts.len().min(MAX_TIMELINE_BUCKETS), 0);
        }
        for (into, n) in accepts.iter_mut().zip(&r.accepts) {
            *into = into.saturating_add(*n);
        }
        ckload_cpu += r.cpu_secs;
        ckload_window += r.cpu_secs_window;
        max_rss = max_rss.max(r.max_rss_kib);
    }
    let unexpected_replies = ShareKind::ALL
        .iter()
        .map(|k| kinds.get(k.as_str()).map_or(0, |s| s.unexpected(*k)))
        .sum();
    let mut rejected_by_reason = BTreeMap::new();
    for s in kinds.values() {
        for (r, n) in &s.rejected {
            *rejected_by_reason.entry(r.clone()).or_default() += n;
        }
    }
    let window = spec.duration.saturating_sub(spec.ramp).as_secs_f64();
    let rates = Rates {
        window_secs: window,
        submitted_per_sec: counters.hold_submitted as f64 / window.max(1e-9),
        accepted_per_sec: counters.hold_accepted as f64 / window.max(1e-9),
    };
    let fanout = fanout(jobs, blocks, start_ns);
    let pool = spec.pool_pid.map(|pid| {
        let start = mon.pool_start.unwrap_or_default();
        let hold = mon.pool_hold.unwrap_or(start);
        let end = mon.pool_end.unwrap_or(hold);
        let rss_end = mon.pool_rss_end.unwrap_or(end.rss_kib);
        let cpu = (end.cpu_secs - hold.cpu_secs).max(0.0);
        let per_miner = if mon.peak_authorized > 0 {
            (rss_end.saturating_sub(start.rss_kib) as f64 * 1024.0) / mon.peak_authorized as f64
        } else {
            0.0
        };
        PoolUsage {
            pid,
            cpu_secs: cpu,
            cpu_pct: 100.0 * cpu / window.max(1e-9),
            cpu_secs_run: (end.cpu_secs - start.cpu_secs).max(0.0),
            rss_kib_start: start.rss_kib,
            rss_kib_end: rss_end,
            rss_kib_max: mon.pool_rss_max,
            rss_bytes_per_miner: per_miner,
            cpu_secs_per_million_shares: (counters.hold_accepted > 0)
                .then(|| cpu * 1e6 / counters.hold_accepted as f64),
            threads: end.threads,
            samples: mon.pool_samples.clone(),
        }
    });
    let net = match (mon.net_hold, mon.net_end) {
        (Some(a), Some(b)) => b.since(&a),
        _ => NetCounters::default(),
    };
    let machine = Machine {
        cpus: cpu_count(),
        busy_pct_window: match (mon.machine_hold, mon.machine_end) {
            (Some(a), Some(b)) => b.busy_pct_since(&a),
            _ => 0.0,
        },
        steal_pct_window: match (mon.machine_hold, mon.machine_end) {
            (Some(a), Some(b)) => b.steal_pct_since(&a),
            _ => 0.0,
        },
        backlog_drops_window: net.backlog_drops,
        tcp_retrans_window: net.retrans_segs.saturating_sub(net.syn_retrans),
        tcp_loss_probes_window: net.loss_probes,
        max_steal_burst_ms: mon.steal_bursts.iter().map(|b| b.ms).max().unwrap_or(0),
        steal_bursts: largest_steal_bursts(&mon.steal_bursts),
        nofile_hard: nofile_hard_limit(),
        ephemeral_ports: ephemeral_port_count(),
    };
    let latency = hists
        .iter()
        .map(|(n, h)| ((*n).to_owned(), h.summary()))
        .collect();
    let histograms_v2 = hists
        .iter()
        .map(|(n, h)| ((*n).to_owned(), h.to_v2_hex()))
        .collect();
    Report {
        scenario: spec.scenario.as_str().to_owned(),
        target: spec.target.to_string(),
        miners: spec.miners,
        workers: spec.workers,
        sources: spec
            .effective_sources()
            .iter()
            .map(ToString::to_string)
            .collect(),
        settings: Settings {
            ramp_secs: spec.ramp.as_secs_f64(),
            duration_secs: spec.duration.as_secs_f64(),
            drain_secs: spec.drain.as_secs_f64(),
            rate: spec.rate,
            stale_rate: spec.stale_rate,
            duplicate_rate: spec.duplicate_rate,
            low_difficulty_rate: spec.low_difficulty_rate,
            churn_per_sec: spec.churn_per_sec,
            churn_pause_secs: spec.churn_pause.as_secs_f64(),
            blocks: spec.blocks,
            block_interval_secs: spec.block_interval.as_secs_f64(),
            version_rolling: spec.version_rolling.map(|m| format!("{m:08x}")),
            threads_per_worker: spec.threads_per_worker,
            in_process: matches!(launcher, Launcher::InProcess),
        },
        elapsed_secs: elapsed.as_secs_f64(),
        peak_open: mon.peak_open,
        peak_authorized: mon.peak_authorized.max(if counters.disconnects == 0 {
            counters.authorized.min(u64::from(spec.miners))
        } else {
            0
        }),
        counters,
        shares: kinds,
        unexpected_replies,
        rejected_by_reason,
        rates,
        latency,
        fanout,
        pool,
        ckload: LoadUsage {
            cpu_secs: ckload_cpu,
            cpu_secs_window: ckload_window,
            cpu_pct_window: 100.0 * ckload_window / window.max(1e-9),
            max_worker_rss_kib: max_rss,
        },
        machine,
        errors,
        worker_failures: failures,
        histograms_v2,
        submit_seconds: SubmitSeconds::of(&seconds),
        accepts: AcceptTimeline::of(&accepts, (spec.ramp, spec.duration)),
        slow_submits: {
            let mut s = slow_bursts(slow);
            add_steal(&mut s, &mon.steal_bursts);
            s
        },
    }
}

fn fanout(jobs: HashMap<String, JobSeen>, blocks: Vec<GeneratedBlock>, start_ns: u64) -> Fanout {
    let mut jobs: Vec<JobSeen> = jobs.into_values().collect();
    jobs.sort_by_key(|j| j.first_ns);
    let max_count = jobs.iter().map(|j| j.count).max().unwrap_or(0);
    // "Nearly every miner": at least 99% of the best-received job's count.
    let threshold = max_count - max_count / 100;
    let mut spread = Hist::new();
    let mut measured = 0;
    for j in &jobs {
        if j.count >= threshold && j.count > 0 {
            spread.record_us((j.last_ns - j.first_ns) / 1000);
            measured += 1;
        }
    }
    let mut to_first = Hist::new();
    let mut to_last = Hist::new();
    for b in &blocks {
        let Some(hash) = &b.hash else {
            continue;
        };
        if let Some(j) = jobs
            .iter()
            .filter(|j| &j.prevhash == hash && j.first_ns >= b.at_ns)
            .min_by_key(|j| j.first_ns)
        {
            to_first.record_us((j.first_ns - b.at_ns) / 1000);
            to_last.record_us((j.last_ns - b.at_ns) / 1000);
        }
    }
    let list = jobs
        .iter()
        .take(1000)
        .map(|j| FanoutJob {
            job_id: j.job_id.clone(),
            prevhash: j.prevhash.clone(),
            clean: j.clean,
            receivers: j.count,
            spread_us: (j.last_ns - j.first_ns) / 1000,
            first_at_secs: j.first_ns.saturating_sub(start_ns) as f64 / 1e9,
        })
        .collect();
    Fanout {
        jobs_seen: jobs.len() as u64,
        jobs_measured: measured,
        spread: spread.summary(),
        block_to_first: to_first.summary(),
        block_to_last: to_last.summary(),
        blocks,
        jobs: list,
    }
}

/// The human summary printed at the end of a run.
pub fn summary(r: &Report) -> String {
    let mut s = String::new();
    let c = &r.counters;
    let ms = |us: u64| us as f64 / 1000.0;
    s.push_str(&format!(
        "ckload {}: {} miners on {} worker(s) from {} -> {}; {:.0} s (ramp {:.1} s, window {:.1} s)\n",
        r.scenario,
        r.miners,
        r.workers,
        if r.sources.is_empty() {
            "the default address".to_owned()
        } else {
            r.sources.join(", ")
        },
        r.target,
        r.settings.duration_secs,
        r.settings.ramp_secs,
        r.rates.window_secs,
    ));
    s.push_str(&format!(
        "connections: {} attempts, {} failed, {} connected, peak open {}, peak authorized {}, \
         disconnects {}, handshake timeouts {}, reconnects {}\n",
        c.connect_attempts,
        c.connect_failures,
        c.connected,
        r.peak_open,
        r.peak_authorized,
        c.disconnects,
        c.handshake_timeouts,
        c.reconnects,
    ));
    if c.resume_attempts > 0 || c.churn_disconnects > 0 {
        s.push_str(&format!(
            "churn: {} disconnects on purpose, {} resumes: {} same extranonce1, {} different\n",
            c.churn_disconnects, c.resume_attempts, c.resume_ok, c.resume_mismatch
        ));
    }
    s.push_str(&format!(
        "shares: {} submitted, {} accepted, {} rejected, {} unanswered, {} skipped; \
         in the window {:.1} submitted/s, {:.1} accepted/s\n",
        c.submitted,
        c.accepted,
        c.rejected,
        c.unanswered,
        c.shares_skipped,
        r.rates.submitted_per_sec,
        r.rates.accepted_per_sec
    ));
    s.push_str(&format!(
        "replies: {} submitted, {} answered ({} accepted, {} rejected), {} unanswered, {} \
         outstanding, {} replies to no request in flight, {} rejected as Duplicate\n",
        c.submitted,
        c.accepted + c.rejected,
        c.accepted,
        c.rejected,
        c.unanswered,
        r.outstanding(),
        c.unknown_replies,
        r.rejected_by_reason.get("Duplicate").copied().unwrap_or(0),
    ));
    let a = &r.accepts;
    if a.median_per_100ms > 0 || a.longest_gap_ms > 0 {
        s.push_str(&format!(
            "accepted replies pool-wide: longest gap {} ms at {:.2} s; median {} per 100 ms, \
             longest dip below half of it {} ms at {:.2} s\n",
            a.longest_gap_ms,
            a.longest_gap_at_secs,
            a.median_per_100ms,
            a.longest_dip_ms,
            a.longest_dip_at_secs
        ));
    }
    if c.end_resume_attempts > 0 {
        s.push_str(&format!(
            "resume check at the end: {} miners reconnected with their session id: {} got \
             their extranonce1 back, {} a different one, {} failed\n",
            c.end_resume_attempts, c.end_resume_ok, c.end_resume_mismatch, c.end_resume_failures
        ));
    }
    for k in ShareKind::ALL {
        if let Some(st) = r.shares.get(k.as_str())
            && st.submitted > 0
        {
            s.push_str(&format!(
                "  {:<15} submitted {:>9}  accepted {:>9}  rejected {:?}{}\n",
                k.as_str(),
                st.submitted,
                st.accepted,
                st.rejected,
                if st.raced_block > 0 {
                    format!(" ({} raced a new block)", st.raced_block)
                } else {
                    String::new()
                }
            ));
        }
    }
    if r.unexpected_replies > 0 {
        s.push_str(&format!(
            "  UNEXPECTED replies (a kind got a reply it should not): {}\n",
            r.unexpected_replies
        ));
    }
    s.push_str("latency (ms)        count       p50       p90       p99     p99.9       max\n");
    for name in HISTOGRAMS {
        if let Some(l) = r.latency.get(name)
            && l.count > 0
        {
            s.push_str(&format!(
                "  {name:<12} {:>10} {:>9.3} {:>9.3} {:>9.3} {:>9.3} {:>9.3}\n",
                l.count,
                ms(l.p50_us),
                ms(l.p90_us),
                ms(l.p99_us),
                ms(l.p999_us),
                ms(l.max_us)
            ));
        }
    }
    let f = &r.fanout;
    if f.jobs_seen > 0 {
        s.push_str(&format!(
            "fan-out: {} jobs seen, {} measured; first->last spread p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms\n",
            f.jobs_seen,
            f.jobs_measured,
            ms(f.spread.p50_us),
            ms(f.spread.p99_us),
            ms(f.spread.max_us)
        ));
    }
    if !f.blocks.is_empty() {
        let failed = f.blocks.iter().filter(|b| b.hash.is_none()).count();
        s.push_str(&format!(
            "forced blocks: {} ({} failed); generate->first notify p50 {:.1} ms p99 {:.1} ms, \
             generate->last notify p50 {:.1} ms p99 {:.1} ms\n",
            f.blocks.len(),
            failed,
            ms(f.block_to_first.p50_us),
            ms(f.block_to_first.p99_us),
            ms(f.block_to_last.p50_us),
            ms(f.block_to_last.p99_us)
        ));
    }
    if let Some(p) = &r.pool {
        s.push_str(&format!(
            "pool (pid {}): {:.2} CPU s in the window ({:.1}% of one core), RSS {:.1} -> {:.1} MiB \
             (max {:.1}), {:.0} B per miner, {} threads",
            p.pid,
            p.cpu_secs,
            p.cpu_pct,
            p.rss_kib_start as f64 / 1024.0,
            p.rss_kib_end as f64 / 1024.0,
            p.rss_kib_max as f64 / 1024.0,
            p.rss_bytes_per_miner,
            p.threads
        ));
        if let Some(m) = p.cpu_secs_per_million_shares {
            s.push_str(&format!(", {m:.1} CPU s per 1M accepted shares"));
        }
        s.push('\n');
    }
    s.push_str(&format!(
        "ckload: {:.2} CPU s in the window ({:.1}% of one core), {:.2} CPU s in all, worker peak RSS {:.1} MiB; \
         machine ({} CPUs) {:.1}% busy in the window ({:.1}% stolen); in the window the kernel dropped {} \
         packets on full input queues and resent {} TCP segments ({} loss probes)\n",
        r.ckload.cpu_secs_window,
        r.ckload.cpu_pct_window,
        r.ckload.cpu_secs,
        r.ckload.max_worker_rss_kib as f64 / 1024.0,
        r.machine.cpus,
        r.machine.busy_pct_window,
        r.machine.steal_pct_window,
        r.machine.backlog_drops_window,
        r.machine.tcp_retrans_window,
        r.machine.tcp_loss_probes_window
    ));
    let secs = &r.submit_seconds;
    if !secs.p99_us.is_empty() {
        s.push_str(&format!(
            "submit p99 second by second: median {:.3} ms, worst {:.3} ms (ms:",
            ms(secs.median_p99_us),
            ms(secs.worst_p99_us)
        ));
        for p in &secs.p99_us {
            s.push_str(&format!(" {:.1}", ms(*p)));
        }
        s.push_str(")\n");
    }
    let slow = &r.slow_submits;
    if slow.count > 0 {
        s.push_str(&format!(
            "submits of the window answered in {} ms or more: {} in {} burst(s); the largest:",
            slow.threshold_ms, slow.count, slow.bursts
        ));
        for b in &slow.largest {
            s.push_str(&format!(
                " {} at {:.2} s over {} ms (max {} ms, {} worker(s), {} ms stolen meanwhile);",
                b.count, b.at_secs, b.span_ms, b.max_ms, b.workers, b.stolen_ms
            ));
        }
        s.push('\n');
    }
    if !r.machine.steal_bursts.is_empty() {
        s.push_str(&format!(
            "the host stole a CPU for {} ms or more at a stretch in the window: longest {} ms;",
            MIN_STEAL_BURST_MS, r.machine.max_steal_burst_ms
        ));
        for b in &r.machine.steal_bursts {
            s.push_str(&format!(
                " {} ms of CPU {} at {:.2} s (over {} ms);",
                b.ms, b.cpu, b.at_secs, b.span_ms
            ));
        }
        s.push('\n');
    }
    if r.errors.total() > 0 {
        s.push_str("errors:\n");
        for (e, n) in &r.errors.0 {
            s.push_str(&format!("  {n:>8}  {e}\n"));
        }
    }
    for f in &r.worker_failures {
        s.push_str(&format!("worker failure: {f}\n"));
    }
    s
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "test code")]
mod tests {
    use super::*;

    fn spec(miners: u32) -> RunSpec {
        RunSpec::new(Scenario::Steady, "127.0.0.1:3333".parse().unwrap(), miners)
    }

    /// The window's edges are sampled when they come, not at the next once-a-second tick, and
    /// the pool's RSS at the end is read before the window ends: idle miners close at the end,
    /// and what a pool keeps of closed sessions is not memory of connected miners. (Before,
    /// the end was sampled after the closes: 1.6 MiB more for 15,000 miners of ckpool-rs.)
    #[test]
    fn window_edges_are_sampled_on_time_and_the_rss_before_the_end() {
        let mut s = spec(10);
        s.ramp = Duration::from_secs(1);
        s.duration = Duration::from_secs(3);
        s.pool_pid = Some(std::process::id());
        let start = Instant::now();
        let mut mon = Monitor::new(&s, start, ProcSample::read(std::process::id()));
        // The run loop wakes up for each edge in turn.
        assert_eq!(mon.next_edge(), Some(start + s.ramp));
        mon.edges(start + s.ramp);
        assert!(mon.pool_hold.is_some() && mon.machine_hold.is_some());
        let rss_at = start + s.duration - RSS_LEAD;
        assert_eq!(mon.next_edge(), Some(rss_at));
        mon.edges(rss_at - Duration::from_millis(1));
        assert!(mon.pool_rss_end.is_none(), "read before it was due");
        mon.edges(rss_at);
        let rss = mon.pool_rss_end.expect("the RSS at the end");
        assert_eq!(mon.next_edge(), Some(start + s.duration));
        assert!(mon.pool_end.is_none());
        // Memory taken after that (the closes) shows in the next tick's sample, not in the end.
        let ballast = vec![1u8; 64 << 20];
        mon.tick(start + s.duration + Duration::from_millis(500));
        std::hint::black_box(&ballast);
        assert!(mon.pool_end.is_some() && mon.machine_end.is_some());
        assert_eq!(mon.next_edge(), None);
        assert_eq!(mon.pool_rss_end, Some(rss));
        let last = mon.pool_samples.last().expect("a sample").2;
        assert!(last >= rss + (32 << 10), "{last} KiB against {rss} KiB");
        drop(ballast);

        // A run that ends early (every worker gone) samples every edge then.
        let mut mon = Monitor::new(&s, start, None);
        mon.finish(start + Duration::from_millis(200));
        assert_eq!(mon.next_edge(), None);
        assert!(mon.pool_rss_end.is_some() && mon.pool_end.is_some());
    }

    #[test]
    fn only_loopback_targets_and_sources() {
        assert!(resolve_loopback("127.0.0.1:3333").is_ok());
        assert!(resolve_loopback("stratum+tcp://127.0.0.5:3333/").is_ok());
        assert!(resolve_loopback("[::1]:3333").is_ok());
        assert!(resolve_loopback("localhost:3333").is_ok());
        for bad in [
            "10.0.0.1:3333",
            "192.168.0.1:3333",
            "8.8.8.8:53",
            "[2001:db8::1]:3333",
        ] {
            assert!(resolve_loopback(bad).is_err(), "{bad}");
        }
        assert!(ensure_loopback(&"[::ffff:127.0.0.1]:1".parse().unwrap()).is_ok());
        let mut s = spec(10);
        s.target = "10.1.1.1:3333".parse().unwrap();
        assert!(s.validate().is_err());
        let mut s = spec(10);
        s.sources = vec!["10.0.0.2".parse().unwrap()];
        assert!(s.validate().is_err());
    }

    #[test]
    fn plans_workers_and_sources() {
        let mut s = spec(30_000);
        assert_eq!(s.workers, 3);
        s.validate().unwrap();
        let ws = s.worker_specs(5, false);
        assert_eq!(ws.len(), 3);
        assert_eq!(ws.iter().map(WorkerSpec::miner_count).sum::<u32>(), 30_000);
        assert_eq!(ws[1].source, Some("127.0.0.3".parse().unwrap()));
        // One worker per address: all take the same port numbers.
        assert!(ws.iter().all(|w| (w.port_slot, w.port_slots) == (0, 1)));
        // Two addresses for three workers: the two on 127.0.0.2 split the range.
        s.sources = vec!["127.0.0.2".parse().unwrap(), "127.0.0.3".parse().unwrap()];
        let ws = s.worker_specs(5, false);
        let slots: Vec<_> = ws.iter().map(|w| (w.port_slot, w.port_slots)).collect();
        assert_eq!(slots, vec![(0, 2), (0, 2), (1, 2)]);
        s.sources.clear();
        s.workers = 1;
        let err = s.validate().unwrap_err().to_string();
        assert!(
            err.contains("open-files") || err.contains("ephemeral"),
            "{err}"
        );
    }

    #[test]
    fn rejects_bad_settings() {
        let mut s = spec(10);
        s.stale_rate = 0.6;
        s.duplicate_rate = 0.6;
        assert!(s.validate().is_err());
        let mut s = spec(10);
        s.blocks = 3;
        assert!(s.validate().unwrap_err().to_string().contains("rpc"));
        s.rpc = Some(RpcTarget::new("127.0.0.1:18443", "u", "p").unwrap());
        s.duration = Duration::from_secs(5);
        assert!(s.validate().unwrap_err().to_string().contains("duration"));
        s.duration = Duration::from_secs(30);
        s.validate().unwrap();
        let mut s = spec(10);
        s.ramp = s.duration;
        assert!(s.validate().is_err());
    }

    #[test]
    fn samples_a_child_process() {
        let mut child = Command::new("sh")
            .args([
                "-c",
                "i=0; while [ $i -lt 200000 ]; do i=$((i+1)); done; sleep 1",
            ])
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(300));
        let s = ProcSample::read(child.id()).unwrap();
        assert!(s.rss_kib > 0, "{s:?}");
        let _ = child.kill();
        let _ = child.wait();
    }

    #[test]
    fn fanout_spread_and_block_latency() {
        let mut jobs = HashMap::new();
        jobs.insert(
            "a".to_owned(),
            JobSeen {
                job_id: "a".into(),
                prevhash: "h1".into(),
                clean: true,
                first_ns: 2_000_000,
                last_ns: 7_000_000,
                count: 100,
            },
        );
        jobs.insert(
            "b".to_owned(),
            JobSeen {
                job_id: "b".into(),
                prevhash: "h1".into(),
                clean: false,
                first_ns: 9_000_000,
                last_ns: 9_500_000,
                count: 50,
            },
        );
        let blocks = vec![GeneratedBlock {
            at_ns: 1_000_000,
            at_secs: 1.0,
            hash: Some("h1".into()),
            error: None,
        }];
        let f = fanout(jobs, blocks, 0);
        assert_eq!((f.jobs_seen, f.jobs_measured), (2, 1));
        // hdrhistogram keeps 3 significant figures.
        let near = |a: u64, b: u64| a.abs_diff(b) * 500 <= b;
        assert!(near(f.spread.p50_us, 5000), "{:?}", f.spread);
        assert!(
            near(f.block_to_first.p50_us, 1000),
            "{:?}",
            f.block_to_first
        );
        assert!(near(f.block_to_last.p50_us, 6000), "{:?}", f.block_to_last);
        assert_eq!(f.jobs[0].job_id, "a");
    }

    #[test]
    fn accept_timeline_finds_the_gap_and_the_dip() {
        // 10 ms buckets: 20 accepts each for 10 s, then none for 350 ms at 5.0 s, then 5 per
        // bucket (a quarter of the rate) for 600 ms, then 20 again. The window is 1 s..9 s.
        let mut b = vec![20u32; 1000];
        for (i, n) in b.iter_mut().enumerate() {
            if (500..535).contains(&i) {
                *n = 0;
            } else if (535..595).contains(&i) {
                *n = 5;
            }
        }
        // A longer gap outside the window does not count.
        for n in b.iter_mut().take(80) {
            *n = 0;
        }
        let t = AcceptTimeline::of(&b, (Duration::from_secs(1), Duration::from_secs(9)));
        assert_eq!(t.longest_gap_ms, 350);
        assert!((t.longest_gap_at_secs - 5.0).abs() < 1e-9, "{t:?}");
        assert_eq!(t.median_per_100ms, 200);
        // 100 ms buckets from 5.0 s: empty, then 5 empty and 5 of 5, then 10 of 5, and at
        // 5.9 s five of 5 and five of 20: 125, not below half the median (100).
        assert_eq!(
            t.per_100ms[50..61],
            [0, 0, 0, 25, 50, 50, 50, 50, 50, 125, 200]
        );
        assert_eq!(t.longest_dip_ms, 900);
        assert!((t.longest_dip_at_secs - 5.0).abs() < 1e-9, "{t:?}");
        assert_eq!(t.per_second.len(), 10);
        assert_eq!(t.per_second[0], 20 * 20);
        assert_eq!(t.per_second[5], 60 * 5 + 5 * 20);
        // A window past the end of the counts: the missing buckets are empty.
        let t = AcceptTimeline::of(&[3; 100], (Duration::ZERO, Duration::from_secs(2)));
        assert_eq!(t.longest_gap_ms, 1000);
        assert!((t.longest_gap_at_secs - 1.0).abs() < 1e-9, "{t:?}");
        assert_eq!(
            AcceptTimeline::of(&[], (Duration::ZERO, Duration::ZERO)).longest_gap_ms,
            0
        );
    }

    #[test]
    fn steal_readings_become_bursts() {
        let t0 = Instant::now();
        let mut t = StealTracker::new(t0, vec![100, 500], 10);
        // CPU 0: 2 ticks, a quiet sample, 1 tick, then quiet: one burst of 30 ms (the gap of one
        // sample is bridged). CPU 1: a single tick (10 ms, too short to list), later 3 ticks
        // still open at the end.
        let steal0 = [0, 2, 0, 1, 0, 0, 0, 0, 0, 0];
        let steal1 = [1, 0, 0, 0, 0, 0, 0, 0, 0, 3];
        let (mut c0, mut c1) = (100, 500);
        for (i, (d0, d1)) in steal0.iter().zip(&steal1).enumerate() {
            c0 += d0;
            c1 += d1;
            let now = t0 + STEAL_SAMPLE * u32::try_from(i + 1).unwrap();
            t.observe(now, vec![c0, c1]);
        }
        let bursts = t.finish();
        assert_eq!(bursts.len(), 2, "{bursts:?}");
        let b0 = &bursts[0];
        assert_eq!((b0.cpu, b0.ms, b0.span_ms), (0, 30, 30));
        assert!((b0.at_secs - 0.010).abs() < 1e-6, "{b0:?}");
        let b1 = &bursts[1];
        assert_eq!((b1.cpu, b1.ms, b1.span_ms), (1, 30, 10));
        assert!((b1.at_secs - 0.090).abs() < 1e-6, "{b1:?}");
    }

    #[test]
    fn one_bad_second_moves_the_worst_second_not_the_median() {
        let mut seconds: Vec<Hist> = (0..10).map(|_| Hist::coarse()).collect();
        for (i, h) in seconds.iter_mut().enumerate() {
            for _ in 0..1000 {
                h.record_us(if i == 3 { 40_000 } else { 1_000 });
            }
        }
        // A partial last second, with its own slow tail: left out of median and worst.
        let mut last = Hist::coarse();
        for _ in 0..100 {
            last.record_us(90_000);
        }
        seconds.push(last);
        let s = SubmitSeconds::of(&seconds);
        assert_eq!(s.p99_us.len(), 11);
        // 2 significant figures: within 1 %.
        assert!(s.median_p99_us.abs_diff(1_000) <= 10, "{s:?}");
        assert!(s.worst_p99_us.abs_diff(40_000) <= 400, "{s:?}");
        assert!(s.p99_us[10] >= 89_000, "{s:?}");
        assert_eq!(SubmitSeconds::of(&[]), SubmitSeconds::default());
    }

    #[test]
    fn slow_submits_group_into_bursts() {
        // A stall at 1 s hitting both workers' miners, a lone slow reply at 5 s, a second
        // stall at 9 s on one worker.
        let mut slow = Vec::new();
        for i in 0..30 {
            slow.push((1000 + i * 3, 150 - i, i % 2));
        }
        slow.push((5000, 25, 0));
        for i in 0..10 {
            slow.push((9000 + i * 40, 60, 1));
        }
        let s = slow_bursts(slow);
        assert_eq!((s.threshold_ms, s.count, s.bursts), (SLOW_SUBMIT_MS, 41, 3));
        assert_eq!(s.largest.len(), 3);
        let first = &s.largest[0];
        assert!((first.at_secs - 1.0).abs() < 1e-9);
        assert_eq!(
            (first.span_ms, first.count, first.max_ms, first.workers),
            (87, 30, 150, 2)
        );
        assert_eq!((s.largest[1].count, s.largest[1].workers), (1, 1));
        assert_eq!((s.largest[2].span_ms, s.largest[2].count), (360, 10));
        // Only the largest are kept, in time order.
        let many: Vec<_> = (0..20u32).map(|i| (i * 1000, 30 + i, 0)).collect();
        let s = slow_bursts(many);
        assert_eq!((s.bursts, s.largest.len()), (20, MAX_BURSTS));
        assert!(s.largest.windows(2).all(|w| w[0].at_secs < w[1].at_secs));
        assert_eq!(s.largest[0].max_ms, 30 + 20 - MAX_BURSTS as u32);
        assert_eq!(
            slow_bursts(Vec::new()),
            SlowSubmits {
                threshold_ms: SLOW_SUBMIT_MS,
                ..SlowSubmits::default()
            }
        );
        // Steal that overlaps a burst (from its first send to its last reply) is added to it.
        let mut s = slow_bursts(vec![(1000, 100, 0), (1010, 90, 1), (5000, 30, 0)]);
        let steal = [
            StealBurst {
                at_secs: 0.95,
                cpu: 0,
                ms: 80,
                span_ms: 90,
            },
            StealBurst {
                at_secs: 1.10,
                cpu: 1,
                ms: 30,
                span_ms: 30,
            },
            StealBurst {
                at_secs: 3.0,
                cpu: 0,
                ms: 200,
                span_ms: 200,
            },
        ];
        add_steal(&mut s, &steal);
        assert_eq!(
            s.largest.iter().map(|b| b.stolen_ms).collect::<Vec<_>>(),
            vec![110, 0]
        );
        assert_eq!(
            largest_steal_bursts(&steal)
                .iter()
                .map(|b| b.ms)
                .collect::<Vec<_>>(),
            vec![80, 30, 200]
        );
    }
}
