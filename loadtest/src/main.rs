//! `ckload`: stratum v1 load generator and CPU test miner, for ckpool-rs and any stratum v1 pool
//! on this machine (loopback only).
#![forbid(unsafe_code)]

use std::io::{BufRead, Write};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use ckload::rpc::RpcTarget;
use ckload::run::{self, Launcher, RunSpec, Scenario};
use ckload::swarm::{WorkerMessage, WorkerSpec};
use ckload::{Miner, MinerConfig, MinerReport};
use clap::{Args, Parser, Subcommand};
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
#[command(
    name = "ckload",
    version,
    about = "Stratum v1 CPU test miner and load generator"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run one real CPU miner against a pool.
    Mine(MineArgs),
    /// Connect N miners within T seconds (`--within`); report connect, subscribe and authorize
    /// latencies and every failure.
    Storm(LoadArgs),
    /// Hold N miners submitting `--rate` shares/s in total for `--duration` seconds.
    Steady(LoadArgs),
    /// Force `--blocks` new blocks over RPC and measure, per job, the time from the first to the
    /// last miner receiving its `mining.notify`.
    Fanout(LoadArgs),
    /// Disconnect and reconnect `--churn` of the miners per second, resuming sessions, and check
    /// that the same extranonce1 comes back.
    Churn(LoadArgs),
    /// Hostile clients for a soak run beside another scenario: a username flood, subscribe
    /// churn, never-reading connections and oversize lines, each at its own rate.
    Hostile(HostileArgs),
    /// Internal: run one worker (spec as JSON on stdin, JSON lines on stdout).
    #[command(hide = true)]
    Worker,
}

/// Settings shared by the load scenarios. Unset values take the scenario's defaults.
#[derive(Args, Clone, Debug)]
struct LoadArgs {
    /// Pool address, host:port (optionally stratum+tcp://); must be loopback.
    #[arg(long, default_value = "127.0.0.1:3333")]
    url: String,
    /// Miners in total.
    #[arg(long, default_value_t = 1000)]
    miners: u32,
    /// Worker processes (default: one per 10,000 miners, at least 2 from 2 miners up).
    #[arg(long)]
    workers: Option<u32>,
    /// Source addresses to bind, comma separated (default 127.0.0.2, 127.0.0.3, … one per
    /// worker).
    #[arg(long, value_delimiter = ',')]
    source_addrs: Vec<IpAddr>,
    /// Seconds until miners stop submitting (the run then drains and ends).
    #[arg(long)]
    duration: Option<f64>,
    /// Seconds over which the miners connect (storm: the storm window).
    #[arg(long, alias = "within")]
    ramp: Option<f64>,
    /// Seconds to wait for outstanding replies after --duration.
    #[arg(long, default_value_t = 2.0)]
    drain: f64,
    /// Shares per second over all miners (storm, fanout and churn default to 0).
    #[arg(long)]
    rate: Option<f64>,
    /// Fraction of submits sent as stale shares (a job from before the current block).
    #[arg(long, default_value_t = 0.0)]
    stale_rate: f64,
    /// Fraction of submits sent as duplicates of an earlier share.
    #[arg(long, default_value_t = 0.0)]
    duplicate_rate: f64,
    /// Fraction of submits sent as low-difficulty shares.
    #[arg(long, default_value_t = 0.0)]
    low_difficulty_rate: f64,
    /// Fraction of the miners to disconnect and reconnect per second (churn default 0.01).
    #[arg(long)]
    churn: Option<f64>,
    /// Seconds between a churn disconnect and the reconnect.
    #[arg(long, default_value_t = 0.25)]
    churn_pause: f64,
    /// Send mining.configure asking for version rolling with this hex mask.
    #[arg(long, value_parser = parse_hex_u32)]
    version_rolling: Option<u32>,
    /// Worker names are <user>.<miner number>.
    #[arg(long, default_value = "ckload")]
    user: String,
    /// Password.
    #[arg(long, default_value = "x")]
    pass: String,
    /// User agent for mining.subscribe.
    #[arg(long, default_value = "ckload/0.1")]
    user_agent: String,
    /// New blocks to force with `generate 1` over RPC after the ramp (fanout default 20).
    #[arg(long)]
    blocks: Option<u32>,
    /// Seconds between forced blocks.
    #[arg(long, default_value_t = 2.0)]
    block_interval: f64,
    /// The node's RPC URL (loopback), e.g. http://127.0.0.1:18443.
    #[arg(long)]
    rpc_url: Option<String>,
    /// RPC user.
    #[arg(long, default_value = "")]
    rpc_user: String,
    /// RPC password.
    #[arg(long, default_value = "")]
    rpc_pass: String,
    /// The pool's pid: sample its CPU time and RSS from /proc.
    #[arg(long)]
    pool_pid: Option<u32>,
    /// Runtime threads per worker.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Seconds allowed for a TCP connect.
    #[arg(long, default_value_t = 10.0)]
    connect_timeout: f64,
    /// Seconds allowed for each handshake reply.
    #[arg(long, default_value_t = 30.0)]
    handshake_timeout: f64,
    /// Most hashes ground for one share before it is skipped.
    #[arg(long, default_value_t = 1 << 22)]
    grind_budget: u64,
    /// Also submit hashes that solve a block (off: they are skipped while grinding).
    #[arg(long)]
    allow_blocks: bool,
    /// Write the merged report as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// No live progress line.
    #[arg(long)]
    quiet: bool,
    /// Run workers as threads of this process instead of child processes.
    #[arg(long)]
    in_process: bool,
    /// Exit with status 1 if anything went wrong (errors, failed connects, unexpected replies).
    #[arg(long)]
    strict: bool,
    /// Seed for the schedule's randomness.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// After the run, every miner reconnects once with its session id and checks that its
    /// extranonce1 comes back.
    #[arg(long)]
    resume_at_end: bool,
}

#[derive(Args)]
struct HostileArgs {
    /// Pool address, host:port (optionally stratum+tcp://); must be loopback.
    #[arg(long, default_value = "127.0.0.1:3333")]
    url: String,
    /// Local address to bind (loopback).
    #[arg(long)]
    source_addr: Option<IpAddr>,
    /// Seconds the hostile clients run.
    #[arg(long, default_value_t = 60.0)]
    duration: f64,
    /// Usernames are <user>flood<N>.w and <user>reader<N>.w.
    #[arg(long, default_value = "hostile")]
    user: String,
    /// Connections per second that authorize a username never used before, then close.
    #[arg(long, default_value_t = 0.0)]
    user_flood: f64,
    /// Connections per second that subscribe and close without authorizing.
    #[arg(long, default_value_t = 0.0)]
    subscribe_churn: f64,
    /// Connections held that send requests and never read.
    #[arg(long, default_value_t = 0)]
    never_readers: u32,
    /// Requests per second each never-reader sends.
    #[arg(long, default_value_t = 200.0)]
    never_reader_rate: f64,
    /// Connections per second that send one line longer than the pool takes.
    #[arg(long, default_value_t = 0.0)]
    oversize: f64,
    /// Bytes of an oversize line.
    #[arg(long, default_value_t = 65536)]
    oversize_bytes: usize,
    /// Write the report as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
}

fn hostile(a: &HostileArgs) -> Result<()> {
    let target = run::resolve_loopback(&a.url)?;
    let mut spec = ckload::hostile::HostileSpec::new(target, secs("--duration", a.duration)?);
    spec.source = a.source_addr;
    spec.user_prefix.clone_from(&a.user);
    spec.user_flood_per_sec = a.user_flood;
    spec.subscribe_churn_per_sec = a.subscribe_churn;
    spec.never_readers = a.never_readers;
    spec.never_reader_lines_per_sec = a.never_reader_rate;
    spec.oversize_per_sec = a.oversize;
    spec.oversize_bytes = a.oversize_bytes;
    let report = ckload::hostile::run(&spec)?;
    let text = serde_json::to_string_pretty(&report)?;
    println!("{text}");
    if let Some(path) = &a.json {
        std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

#[derive(Args)]
struct MineArgs {
    /// Pool address: host:port, optionally prefixed with stratum+tcp://.
    #[arg(long, default_value = "127.0.0.1:3333")]
    url: String,
    /// Worker name.
    #[arg(long)]
    user: String,
    /// Password.
    #[arg(long, default_value = "x")]
    pass: String,
    /// Stop after this many seconds.
    #[arg(long)]
    duration: Option<f64>,
    /// Stop after this many accepted block solutions.
    #[arg(long)]
    blocks: Option<u64>,
    /// Most submits per second (0 = unlimited).
    #[arg(long, default_value_t = 20.0)]
    rate: f64,
    /// Ask for version rolling with this hex mask (e.g. 1fffe000).
    #[arg(long, value_parser = parse_hex_u32)]
    version_rolling: Option<u32>,
    /// Keep grinding a job after submitting a block solution for it.
    #[arg(long)]
    no_pause_after_block: bool,
    /// Session id to resume.
    #[arg(long)]
    session: Option<String>,
    /// User agent for mining.subscribe.
    #[arg(long, default_value = "ckload/0.1")]
    user_agent: String,
    /// Print the final summary as JSON.
    #[arg(long)]
    json: bool,
}

fn parse_hex_u32(s: &str) -> Result<u32, String> {
    let s = s.trim_start_matches("0x");
    u32::from_str_radix(s, 16).map_err(|e| format!("{s:?} is not a hex mask: {e}"))
}

fn secs(what: &str, v: f64) -> Result<Duration> {
    if !(v.is_finite() && v >= 0.0 && v <= run::MAX_DURATION.as_secs_f64()) {
        bail!(
            "{what} must be a number of seconds in 0..={}",
            run::MAX_DURATION.as_secs()
        );
    }
    Ok(Duration::from_secs_f64(v))
}

/// Turns the command line into a run, with the scenario's defaults.
fn plan(scenario: Scenario, a: &LoadArgs) -> Result<RunSpec> {
    let target = run::resolve_loopback(&a.url)?;
    let mut spec = RunSpec::new(scenario, target, a.miners);
    spec.workers = a
        .workers
        .unwrap_or_else(|| a.miners.div_ceil(10_000).max(2).min(a.miners.max(1)));
    spec.sources.clone_from(&a.source_addrs);
    let ramp = match (a.ramp, scenario) {
        (Some(r), _) => secs("--ramp", r)?,
        (None, Scenario::Storm) => Duration::from_secs(10),
        (None, _) => spec.ramp,
    };
    spec.ramp = ramp;
    spec.blocks = a
        .blocks
        .unwrap_or(if scenario == Scenario::Fanout { 20 } else { 0 });
    spec.block_interval = secs("--block-interval", a.block_interval)?;
    spec.duration = match a.duration {
        Some(d) => secs("--duration", d)?,
        None => match scenario {
            Scenario::Storm => ramp + Duration::from_secs(10),
            Scenario::Fanout if spec.blocks > 0 => {
                spec.block_time(spec.blocks - 1) + Duration::from_secs(3)
            }
            _ => ramp + Duration::from_secs(60),
        },
    };
    spec.drain = secs("--drain", a.drain)?;
    spec.rate = a.rate.unwrap_or(match scenario {
        Scenario::Steady => f64::from(a.miners) * 0.2,
        _ => 0.0,
    });
    spec.stale_rate = a.stale_rate;
    spec.duplicate_rate = a.duplicate_rate;
    spec.low_difficulty_rate = a.low_difficulty_rate;
    spec.churn_per_sec = a.churn.unwrap_or(if scenario == Scenario::Churn {
        0.01
    } else {
        0.0
    });
    spec.churn_pause = secs("--churn-pause", a.churn_pause)?;
    spec.version_rolling = a.version_rolling;
    if a.user.is_empty() || a.user.chars().any(char::is_control) {
        bail!("--user must be a non-empty name without control characters");
    }
    spec.user_prefix.clone_from(&a.user);
    spec.pass.clone_from(&a.pass);
    spec.user_agent.clone_from(&a.user_agent);
    spec.rpc = match &a.rpc_url {
        Some(url) => Some(RpcTarget::new(url, &a.rpc_user, &a.rpc_pass)?),
        None => None,
    };
    spec.pool_pid = a.pool_pid;
    spec.threads_per_worker = a.threads;
    spec.connect_timeout = secs("--connect-timeout", a.connect_timeout)?;
    spec.handshake_timeout = secs("--handshake-timeout", a.handshake_timeout)?;
    spec.grind_budget = a.grind_budget;
    spec.allow_blocks = a.allow_blocks;
    spec.progress = !a.quiet;
    spec.seed = a.seed;
    spec.resume_at_end = a.resume_at_end;
    spec.validate()?;
    Ok(spec)
}

fn load(scenario: Scenario, a: &LoadArgs) -> Result<()> {
    let spec = plan(scenario, a)?;
    let launcher = if a.in_process {
        Launcher::InProcess
    } else {
        Launcher::Processes {
            exe: std::env::current_exe().context("finding the ckload executable")?,
        }
    };
    eprintln!(
        "ckload {}: {} miners, {} worker(s), sources {:?}, target {}, ramp {:.1} s, duration {:.1} s, rate {}/s",
        scenario.as_str(),
        spec.miners,
        spec.workers,
        spec.effective_sources(),
        spec.target,
        spec.ramp.as_secs_f64(),
        spec.duration.as_secs_f64(),
        spec.rate
    );
    let report = run::run(&spec, &launcher)?;
    print!("{}", run::summary(&report));
    if let Some(path) = &a.json {
        let text = serde_json::to_string_pretty(&report)?;
        std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
    }
    if a.strict && (report.error_count() > 0 || report.unexpected_replies > 0) {
        bail!(
            "{} errors and {} unexpected replies",
            report.error_count(),
            report.unexpected_replies
        );
    }
    Ok(())
}

/// The hidden `worker` subcommand: one JSON spec line in, JSON lines out.
fn worker() -> Result<()> {
    let mut line = String::new();
    std::io::stdin()
        .lock()
        .read_line(&mut line)
        .context("reading the worker spec")?;
    let spec: WorkerSpec = serde_json::from_str(&line).context("parsing the worker spec")?;
    run::ensure_loopback(&spec.target)?;
    let sink = |m: WorkerMessage| {
        if let Ok(text) = serde_json::to_string(&m) {
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "{text}");
            let _ = out.flush();
        }
    };
    ckload::swarm::run_worker(&spec, &sink);
    Ok(())
}

/// The pool address for `mine`: loopback only, like every ckload target.
fn resolve(url: &str) -> Result<SocketAddr> {
    Ok(run::resolve_loopback(url)?)
}

fn live_line(r: &MinerReport, prev_hashes: u64, dt: f64) -> String {
    let rate = if dt > 0.0 {
        (r.hashes.saturating_sub(prev_hashes)) as f64 / dt
    } else {
        0.0
    };
    format!(
        "[{:>6.1}s] {:>9.3} kH/s  submitted {} accepted {} rejected {} unanswered {}  blocks {}/{}  jobs {}  diff {}",
        r.elapsed_secs,
        rate / 1e3,
        r.submitted,
        r.accepted,
        r.rejected,
        r.unanswered,
        r.blocks_accepted,
        r.blocks_submitted,
        r.notifies,
        r.last_difficulty
            .map_or_else(|| "-".to_owned(), |d| format!("{d}")),
    )
}

fn summary(r: &MinerReport) -> String {
    let mut s = format!(
        "ckload: {:.1}s, {} hashes, submitted {}, accepted {}, rejected {}, unanswered {}, blocks accepted {}/{} submitted",
        r.elapsed_secs,
        r.hashes,
        r.submitted,
        r.accepted,
        r.rejected,
        r.unanswered,
        r.blocks_accepted,
        r.blocks_submitted
    );
    for (reason, n) in &r.reject_reasons {
        s.push_str(&format!("\n  rejected {n}: {reason}"));
    }
    for h in &r.block_hashes {
        s.push_str(&format!("\n  block {h}"));
    }
    if let Some(e) = &r.error {
        s.push_str(&format!("\n  stopped: {e}"));
    }
    s
}

fn mine(args: MineArgs) -> Result<MinerReport> {
    let addr = resolve(&args.url)?;
    let mut cfg = MinerConfig::new(addr, args.user);
    cfg.pass = args.pass;
    cfg.user_agent = args.user_agent;
    cfg.version_rolling = args.version_rolling;
    cfg.max_shares_per_sec = args.rate;
    cfg.pause_after_block = !args.no_pause_after_block;
    cfg.stop_after_blocks = args.blocks;
    cfg.session_id = args.session;
    if let Some(d) = args.duration {
        if !(d.is_finite() && d > 0.0) {
            bail!("--duration must be a positive number of seconds");
        }
        cfg.duration = Some(Duration::from_secs_f64(d));
    }
    let miner = Miner::start(cfg).with_context(|| format!("connecting to {addr}"))?;
    let mut last = Instant::now();
    let mut prev_hashes = 0;
    while !miner.is_finished() {
        std::thread::sleep(Duration::from_millis(50));
        let dt = last.elapsed().as_secs_f64();
        if dt >= 1.0 {
            let r = miner.report();
            eprintln!("{}", live_line(&r, prev_hashes, dt));
            prev_hashes = r.hashes;
            last = Instant::now();
        }
    }
    Ok(miner.stop())
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::Storm(a) => load(Scenario::Storm, &a)?,
        Command::Steady(a) => load(Scenario::Steady, &a)?,
        Command::Fanout(a) => load(Scenario::Fanout, &a)?,
        Command::Churn(a) => load(Scenario::Churn, &a)?,
        Command::Hostile(a) => hostile(&a)?,
        Command::Worker => worker()?,
        Command::Mine(args) => {
            let json = args.json;
            let report = mine(args)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                println!("{}", summary(&report));
            }
            if let Some(e) = report.error
                && report.accepted == 0
            {
                bail!("miner failed: {e}");
            }
        }
    }
    Ok(())
}
