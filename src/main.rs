//! `ckpool-rs`: the daemon. Wiring only: it loads the configuration, starts the generator
//! (bitcoind), the stratifier shards and the connector threads, and connects them.

mod admin;
mod handoff;
mod sharelog;
mod status;

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use clap::Parser;
use generator::{BtcdConfig, GenEvent, Generator, GeneratorConfig};
use stratifier::{Pool, PoolConfig};
use tracing::{error, info, warn};

use crate::handoff::{Handoff, Msg};

/// Command line, compatible with ckpool's flags for the modes implemented so far.
#[derive(Debug, Parser)]
#[command(
    name = "ckpool-rs",
    version,
    about = "A bitcoin mining pool server in the spirit of ckpool"
)]
struct Cli {
    /// Solo mode: each user mines to the address given as their username.
    #[arg(short = 'B', long = "btcsolo")]
    btcsolo: bool,
    /// Config file (default: <name>.conf in the current directory).
    #[arg(short = 'c', long = "config")]
    config: Option<PathBuf>,
    /// Daemonise: detach and run in the background.
    #[arg(short = 'D', long = "daemonise")]
    daemonise: bool,
    /// Group for the unix sockets (accepted for compatibility).
    #[arg(short = 'g', long = "group")]
    group: Option<String>,
    /// Take over a running instance (not implemented yet: behaves as -k).
    #[arg(short = 'H', long = "handover")]
    handover: bool,
    /// Kill a running instance with the same name.
    #[arg(short = 'k', long = "killold")]
    killold: bool,
    /// Log every share to <logdir>/<height>/<job>.sharelog.
    #[arg(short = 'L', long = "log-shares")]
    log_shares: bool,
    /// Log level 0-7 as syslog (default 5, notice). RUST_LOG overrides it.
    #[arg(short = 'l', long = "loglevel", default_value_t = 5)]
    loglevel: u8,
    /// Instance name (process name, default config, socket directory).
    #[arg(short = 'n', long = "name", default_value = "ckpool")]
    name: String,
    /// Node mode (not implemented yet).
    #[arg(short = 'N', long = "node")]
    node: bool,
    /// Passthrough mode (not implemented yet).
    #[arg(short = 'P', long = "passthrough")]
    passthrough: bool,
    /// Proxy mode (not implemented yet).
    #[arg(short = 'p', long = "proxy")]
    proxy: bool,
    /// Quiet: no periodic status line.
    #[arg(short = 'q', long = "quiet")]
    quiet: bool,
    /// Redirector mode (not implemented yet).
    #[arg(short = 'R', long = "redirector")]
    redirector: bool,
    /// Socket directory (default /tmp/<name>/).
    #[arg(short = 's', long = "sockdir")]
    sockdir: Option<PathBuf>,
    /// User proxy mode (not implemented yet).
    #[arg(short = 'u', long = "userproxy")]
    userproxy: bool,
    /// I/O backend: auto (io_uring where the kernel allows it, else epoll), uring or epoll.
    /// Overrides the config's "io" and the POOL_BACKEND environment variable.
    #[arg(long = "io")]
    io: Option<String>,
    /// How connector threads hand events to the stratifier: inline (the stratifier runs on the
    /// connector thread) or queue (batches through a queue to a stratifier thread per connector
    /// thread, on the same CPU). Overrides the config's "handoff" and the POOL_HANDOFF
    /// environment variable.
    #[arg(long = "handoff")]
    handoff: Option<String>,
}

/// Exit code for configuration errors.
const EXIT_CONFIG: u8 = 2;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{e:#}");
            eprintln!("ckpool-rs: {e:#}");
            match e.downcast_ref::<ConfigFailure>() {
                Some(_) => ExitCode::from(EXIT_CONFIG),
                None => ExitCode::FAILURE,
            }
        }
    }
}

/// Marks errors that are the configuration's fault (exit code 2).
#[derive(Debug)]
struct ConfigFailure(String);

impl std::error::Error for ConfigFailure {}

impl std::fmt::Display for ConfigFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

fn config_err(msg: String) -> anyhow::Error {
    anyhow::Error::new(ConfigFailure(msg))
}

fn run(cli: Cli) -> anyhow::Result<()> {
    if cli.proxy || cli.passthrough || cli.node || cli.redirector || cli.userproxy {
        return Err(config_err(
            "proxy, passthrough, node, redirector and userproxy modes are not implemented yet"
                .into(),
        ));
    }
    if cli.daemonise && std::env::var_os("CKPOOL_RS_DAEMONISED").is_none() {
        return daemonise();
    }
    init_logging(cli.loglevel);
    if cli.handover {
        warn!("-H handover is not implemented yet; killing the old instance instead (-k)");
    }
    if cli.group.is_some() {
        warn!("-g is accepted for compatibility; socket group ownership is not changed");
    }

    let config_path = cli
        .config
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("{}.conf", cli.name)));
    let text = std::fs::read_to_string(&config_path)
        .map_err(|e| config_err(format!("cannot read config {}: {e}", config_path.display())))?;
    let loaded = common::config::parse(&text)
        .map_err(|e| config_err(format!("{}: {e}", config_path.display())))?;
    for w in &loaded.warnings {
        warn!("{}: {w}", config_path.display());
    }
    let cfg = loaded.config;
    let handoff_name = cli
        .handoff
        .clone()
        .or_else(|| std::env::var("POOL_HANDOFF").ok())
        .unwrap_or(cfg.handoff.clone());
    let handoff = Handoff::from_name(&handoff_name).ok_or_else(|| {
        config_err(format!(
            "handoff {handoff_name} is not one of inline, queue"
        ))
    })?;
    if !cli.btcsolo && cfg.btcaddress.is_none() {
        return Err(config_err(
            "pool mode needs a btcaddress in the config".into(),
        ));
    }
    let mut urls = cfg.serverurl.clone();
    for rule in &cfg.listendiff {
        if !urls.contains(&rule.url) {
            urls.push(rule.url.clone());
        }
    }
    let listen = resolve_listen(&urls)?;

    match connector::raise_nofile_limit() {
        Ok(n) => info!(nofile = n, "open files limit raised to the hard limit"),
        Err(e) => warn!(error = %e, "cannot raise the open files limit"),
    }

    let sockdir = cli
        .sockdir
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("/tmp/{}", cli.name)));
    std::fs::create_dir_all(&sockdir).with_context(|| format!("creating {}", sockdir.display()))?;
    let pidfile = sockdir.join("main.pid");
    manage_old_instance(&pidfile, cli.killold || cli.handover)?;
    std::fs::write(&pidfile, format!("{}\n", std::process::id())).context("writing pid file")?;

    let shutdown = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(sig, Arc::clone(&shutdown))
            .context("installing signal handlers")?;
    }

    // The generator: bitcoind RPC, ZMQ and failover.
    let (gen_tx, gen_rx) = crossbeam_channel::unbounded();
    let gen_cfg = GeneratorConfig {
        btcd: cfg
            .btcd
            .iter()
            .map(|b| BtcdConfig {
                url: b.url.clone(),
                auth: b.auth.clone(),
                pass: b.pass.clone(),
                cookie: b.cookie.clone(),
                notify: b.notify,
            })
            .collect(),
        blockpoll: cfg.blockpoll,
        update_interval: cfg.update_interval,
        zmqblock: cfg.zmqblock.clone(),
        ..GeneratorConfig::default()
    };
    let generator = Arc::new(Generator::start(gen_cfg, gen_tx).context("starting the generator")?);

    // Wait for the first template: no miner is accepted before a bitcoind is alive.
    info!("waiting for a live bitcoind");
    let started = Instant::now();
    let first = loop {
        if shutdown.load(Ordering::Relaxed) {
            info!("shutdown before any bitcoind answered");
            return Ok(());
        }
        match gen_rx.recv_timeout(Duration::from_millis(200)) {
            Ok(GenEvent::Template {
                template, server, ..
            }) => break (template, server),
            Ok(GenEvent::ServerUp { index, url }) => info!(index, url, "bitcoind up"),
            Ok(GenEvent::NoServers) => warn!("CRITICAL: no bitcoinds active"),
            Ok(GenEvent::BlockResult { .. })
            | Err(crossbeam_channel::RecvTimeoutError::Timeout) => {}
            Err(crossbeam_channel::RecvTimeoutError::Disconnected) => bail!("generator stopped"),
        }
        if started.elapsed() > Duration::from_secs(5) && started.elapsed().as_millis() % 5000 < 200
        {
            warn!("still waiting for a bitcoind to give a block template");
        }
    };
    let network = generator
        .network()
        .ok_or_else(|| anyhow::anyhow!("the node did not say which chain it is on"))?;
    info!(?network, height = first.0.height, "first block template");

    // The stratifier's shared state.
    let payout = match (&cfg.btcaddress, cli.btcsolo) {
        (Some(a), false) => Some(
            common::address::script_for_address(a, network)
                .map_err(|e| config_err(format!("btcaddress {a}: {e} for {network:?}")))?,
        ),
        _ => None,
    };
    let donation = match (cfg.donation > 0.0, &cfg.donaddress) {
        (true, Some(a)) => Some((
            cfg.donation,
            common::address::script_for_address(a, network)
                .map_err(|e| config_err(format!("donaddress {a}: {e}")))?,
        )),
        (true, None) => {
            warn!("donation is set but donaddress is not: no donation output");
            None
        }
        _ => None,
    };
    let mut pcfg = PoolConfig::new(network, payout);
    pcfg.solo = cli.btcsolo;
    pcfg.coinbase.btcsig = cfg.btcsig.as_bytes().to_vec();
    pcfg.coinbase.nonce1_len = cfg.nonce1length;
    pcfg.coinbase.nonce2_len = cfg.nonce2length;
    pcfg.coinbase.donation = donation;
    pcfg.version_mask = cfg.version_mask;
    pcfg.mindiff = cfg.mindiff;
    pcfg.startdiff = cfg.startdiff;
    pcfg.maxdiff = cfg.maxdiff;
    pcfg.listener_diff = urls
        .iter()
        .zip(&listen)
        .map(
            |(url, addr)| match cfg.listendiff.iter().find(|r| &r.url == url) {
                Some(r) => stratifier::ListenerDiff {
                    start: r.startdiff,
                    min: r.mindiff,
                },
                // ckpool's rule: ports above 4000 start at and never go below `highdiff` (opt-in here).
                None if cfg.highdiff_ports && addr.port() > 4000 => stratifier::ListenerDiff {
                    start: Some(cfg.startdiff.max(cfg.highdiff)),
                    min: Some(cfg.highdiff),
                },
                None => stratifier::ListenerDiff::default(),
            },
        )
        .collect();
    pcfg.agent_diff = cfg
        .useragentdiff
        .iter()
        .map(|r| stratifier::AgentDiff {
            pattern: r.pattern.clone(),
            min: r.mindiff,
        })
        .collect();
    pcfg.diff_pow2 = cfg.diffpow2;
    pcfg.update_interval = cfg.update_interval;
    pcfg.auth_timeout = cfg.authtimeout;
    pcfg.name = cli.name.clone();

    let share_log = if cli.log_shares {
        let (tx, _handle) =
            sharelog::start(cfg.logdir.clone()).context("starting the share log")?;
        Some(tx)
    } else {
        None
    };
    let seed = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let sinks = handoff::Sinks {
        blocks: Some(generator.block_submitter()),
        shares: share_log,
    };
    let pool = Pool::new(pcfg, seed, Instant::now());
    pool.new_template(first.0, Instant::now())
        .context("building the first job")?;
    // Hashrate sampling and the stats files (pool.status, users/<name>).
    let stats_writer = status::start(
        Arc::clone(&pool),
        cfg.logdir.clone(),
        cfg.statsupdate,
        started,
    )
    .context("starting the stats writer")?;

    // The connector threads, each with its stratifier shard.
    let io = cli
        .io
        .clone()
        .or_else(|| std::env::var("POOL_BACKEND").ok())
        .unwrap_or(cfg.io.clone());
    let backend: connector::BackendKind = io
        .parse()
        .map_err(|_| config_err(format!("io backend {io} is not one of auto, uring, epoll")))?;
    let threads = cfg
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let conn_cfg = connector::Config {
        listen: listen.clone(),
        threads,
        max_line: cfg.maxlinelength,
        backend,
        pin: cfg.pin,
        max_conns: cfg.maxclients,
        ..connector::Config::default()
    };
    info!(%handoff, threads, "stratifier handoff");
    let conns = handoff::start(handoff, conn_cfg, Arc::clone(&pool), sinks)
        .context("starting the connector")?;
    let io_backend = conns.backend().to_string();
    for a in conns.local_addrs() {
        info!(addr = %a, threads, io = %io_backend, %handoff, "listening for miners");
    }

    let admin_path = sockdir.join("listener");
    let _admin = admin::start(
        &admin_path,
        admin::AdminCtx {
            io: io_backend.clone(),
            handoff: handoff.to_string(),
            pool: Arc::clone(&pool),
            generator: Arc::clone(&generator),
            shutdown: Arc::clone(&shutdown),
        },
    )
    .with_context(|| format!("binding admin socket {}", admin_path.display()))?;

    // Main loop: templates to jobs, block results, status.
    let mut last_status = Instant::now();
    while !shutdown.load(Ordering::Relaxed) {
        match gen_rx.recv_timeout(Duration::from_millis(200)) {
            Ok(GenEvent::Template {
                template,
                new_block,
                server,
            }) => match pool.new_template(template, Instant::now()) {
                Ok(job) => {
                    info!(job = %job.id_hex, height = job.height(), new_block, server, txs = job.transactions().len(), "new job");
                    conns.broadcast(Msg::Job(job));
                }
                Err(e) => error!(error = %e, "cannot build a job from the template"),
            },
            Ok(GenEvent::ServerUp { index, url }) => info!(index, url, "bitcoind active"),
            Ok(GenEvent::NoServers) => error!("CRITICAL: no bitcoinds active"),
            Ok(GenEvent::BlockResult {
                hash,
                height,
                accepted,
                reason,
            }) => {
                // The generator has logged the outcome (with the full hex on a refusal).
                tracing::debug!(
                    height,
                    hash,
                    accepted,
                    reason = reason.as_deref().unwrap_or(""),
                    "block result"
                );
            }
            Err(crossbeam_channel::RecvTimeoutError::Timeout) => {}
            Err(crossbeam_channel::RecvTimeoutError::Disconnected) => {
                error!("generator stopped");
                break;
            }
        }
        if !cli.quiet && last_status.elapsed() >= Duration::from_secs(5) {
            last_status = Instant::now();
            let s = pool.stats();
            info!(
                clients = s.clients,
                accepted = s.accepted,
                rejected = s.rejected,
                blocks = s.blocks.len(),
                height = s.job.as_ref().map_or(0, |j| j.1),
                "status"
            );
        }
    }
    info!("shutting down");
    conns.shutdown();
    stats_writer.stop();
    if let Ok(g) = Arc::try_unwrap(generator) {
        g.shutdown();
    }
    let _ = std::fs::remove_file(&admin_path);
    let _ = std::fs::remove_file(&pidfile);
    Ok(())
}

fn resolve_listen(urls: &[String]) -> anyhow::Result<Vec<SocketAddr>> {
    urls.iter()
        .map(|u| {
            u.to_socket_addrs()
                .ok()
                .and_then(|mut a| a.next())
                .ok_or_else(|| config_err(format!("serverurl {u} does not resolve to an address")))
        })
        .collect()
}

/// ckpool's `-k` handling: refuse to start beside a live instance unless asked to kill it.
fn manage_old_instance(pidfile: &Path, kill: bool) -> anyhow::Result<()> {
    let Ok(text) = std::fs::read_to_string(pidfile) else {
        return Ok(());
    };
    let Some(pid) = text
        .trim()
        .parse::<i32>()
        .ok()
        .and_then(rustix::process::Pid::from_raw)
    else {
        return Ok(());
    };
    if pid == rustix::process::getpid() || rustix::process::test_kill_process(pid).is_err() {
        return Ok(());
    }
    if !kill {
        bail!(
            "an instance is already running (pid {}): start with -k to kill it",
            pid.as_raw_nonzero()
        );
    }
    warn!(pid = pid.as_raw_nonzero().get(), "killing the old instance");
    let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if rustix::process::test_kill_process(pid).is_err() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
    Ok(())
}

/// `-D`: runs this program again detached (its own process group, no terminal, stdio to
/// /dev/null) and returns, so the parent exits.
fn daemonise() -> anyhow::Result<()> {
    use std::os::unix::process::CommandExt;
    let exe = std::env::current_exe().context("locating own executable")?;
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "-D" && a != "--daemonise")
        .collect();
    let child = std::process::Command::new(exe)
        .args(args)
        .env("CKPOOL_RS_DAEMONISED", "1")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .process_group(0)
        .spawn()
        .context("starting the daemon")?;
    println!("ckpool-rs daemonised, pid {}", child.id());
    Ok(())
}

fn init_logging(level: u8) {
    let default = match level {
        0..=3 => "error",
        4 => "warn",
        5 | 6 => "info",
        _ => "debug",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr)
        .try_init();
}
