//! `ckload`: stratum v1 CPU test miner and (later) load generator for ckpool-rs.
#![forbid(unsafe_code)]

use std::net::{SocketAddr, ToSocketAddrs};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
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

fn resolve(url: &str) -> Result<SocketAddr> {
    let hostport = url
        .strip_prefix("stratum+tcp://")
        .unwrap_or(url)
        .trim_end_matches('/');
    hostport
        .to_socket_addrs()
        .with_context(|| format!("resolving {hostport}"))?
        .next()
        .with_context(|| format!("{hostport} resolved to no address"))
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
