//! `ckpool-rs`: the daemon. Wiring only: it loads the configuration, starts the generator
//! (bitcoind), the stratifier shards and the connector threads, and connects them.

mod admin;
mod cli;
mod handoff;
mod settings;
mod sharelog;
mod status;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use clap::Parser;
use generator::{BlockSubmission, GenEvent, Generator};
use stratifier::Pool;
use tracing::{error, info, warn};

use crate::admin::GenLink;
use crate::cli::Cli;
use crate::handoff::Msg;
use crate::settings::{ConfigError, Mode, Settings};
use crate::sharelog::ShareLog;

/// Exit code for configuration errors.
const EXIT_CONFIG: u8 = 2;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{e:#}");
            eprintln!("ckpool-rs: {e:#}");
            match e.downcast_ref::<ConfigError>() {
                Some(_) => ExitCode::from(EXIT_CONFIG),
                None => ExitCode::FAILURE,
            }
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let argv0 = std::env::args().next().unwrap_or_default();
    let mode = Mode::select(&cli, &argv0)?;
    if !matches!(mode, Mode::Pool | Mode::Solo) {
        return Err(ConfigError(format!("{mode} mode is not implemented yet")).into());
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
    let settings = Settings::load(&cli, mode, &settings::process_env)?;

    match connector::raise_nofile_limit() {
        Ok(n) => info!(nofile = n, "open files limit raised to the hard limit"),
        Err(e) => warn!(error = %e, "cannot raise the open files limit"),
    }
    let sockdir = &settings.sockdir;
    std::fs::create_dir_all(sockdir).with_context(|| format!("creating {}", sockdir.display()))?;
    let pidfile = settings.pidfile();
    manage_old_instance(&pidfile, settings.kill_old)?;
    std::fs::write(&pidfile, format!("{}\n", std::process::id())).context("writing pid file")?;
    // Removes the pid file and the admin socket on every way out from here.
    let _files = RunFiles(vec![pidfile, settings.admin_socket()]);

    let shutdown = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(sig, Arc::clone(&shutdown))
            .context("installing signal handlers")?;
    }
    run_pool(&settings, &shutdown)
}

/// Pool and solo mode: bitcoind templates through the generator, the stratifier's shards on
/// the connector threads, the admin socket, the share log and the stats files. Returns when
/// `shutdown` is set (SIGTERM, SIGINT, admin `shutdown`), having stopped all of it.
fn run_pool(settings: &Settings, shutdown: &Arc<AtomicBool>) -> anyhow::Result<()> {
    // The generator: bitcoind RPC, ZMQ and failover.
    let (gen_tx, gen_rx) = crossbeam_channel::unbounded();
    let generator =
        Generator::start(settings.generator(), gen_tx).context("starting the generator")?;

    // Wait for the first template: no miner is accepted before a bitcoind is alive.
    info!("waiting for a live bitcoind");
    let started = Instant::now();
    let first = loop {
        if shutdown.load(Ordering::Relaxed) {
            info!("shutdown before any bitcoind answered");
            generator.shutdown();
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
    let pcfg = settings.pool(network)?;
    let share_log = if settings.log_shares {
        Some(ShareLog::start(settings.logdir().to_owned()).context("starting the share log")?)
    } else {
        None
    };
    let seed = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let blocks = generator.block_submitter();
    let pool = Pool::new(
        pcfg,
        seed,
        move |b| {
            blocks.submit(BlockSubmission {
                hash: b.hash,
                height: b.height,
                hex: b.hex,
            });
        },
        share_log.as_ref().map(ShareLog::sink),
    );
    pool.new_template(first.0, Instant::now())
        .context("building the first job")?;
    // Hashrate sampling and the stats files (pool.status, users/<name>).
    let stats_writer = status::start(
        Arc::clone(&pool),
        settings.logdir().to_owned(),
        settings.statsupdate(),
        started,
    )
    .context("starting the stats writer")?;

    // The connector threads, each with its stratifier shard.
    let handoff = settings.handoff;
    let threads = settings.threads;
    info!(%handoff, threads, "stratifier handoff");
    let conns = handoff::start(handoff, settings.connector(), Arc::clone(&pool))
        .context("starting the connector")?;
    let io_backend = conns.backend().to_string();
    for a in conns.local_addrs() {
        info!(addr = %a, threads, io = %io_backend, %handoff, "listening for miners");
    }

    let admin_path = settings.admin_socket();
    let (gen_link, update_rx) = GenLink::new();
    gen_link.set_active(generator.active_server());
    let admin = admin::start(
        &admin_path,
        admin::AdminCtx {
            io: io_backend.clone(),
            handoff: handoff.to_string(),
            pool: Arc::clone(&pool),
            generator: Arc::clone(&gen_link),
            shutdown: Arc::clone(shutdown),
        },
    )
    .with_context(|| format!("binding admin socket {}", admin_path.display()))?;

    // Main loop: templates to jobs, block results, update requests, status.
    let mut last_status = Instant::now();
    while !shutdown.load(Ordering::Relaxed) {
        let event = crossbeam_channel::select! {
            recv(gen_rx) -> event => Some(event.map_err(|_| ())),
            recv(update_rx) -> _ => {
                generator.request_update();
                None
            },
            default(MAIN_LOOP_WAKE) => None,
        };
        gen_link.set_active(generator.active_server());
        match event {
            None => {}
            Some(Ok(GenEvent::Template {
                template,
                new_block,
                server,
            })) => match pool.new_template(template, Instant::now()) {
                Ok(job) => {
                    info!(job = %job.id_hex, height = job.height(), new_block, server, txs = job.template.transactions.len(), "new job");
                    conns.broadcast(Msg::Job(job));
                }
                Err(e) => error!(error = %e, "cannot build a job from the template"),
            },
            Some(Ok(GenEvent::ServerUp { index, url })) => info!(index, url, "bitcoind active"),
            Some(Ok(GenEvent::NoServers)) => error!("CRITICAL: no bitcoinds active"),
            Some(Ok(GenEvent::BlockResult {
                hash,
                height,
                accepted,
                reason,
            })) => {
                // The generator has logged the outcome (with the full hex on a refusal).
                tracing::debug!(
                    height,
                    hash,
                    accepted,
                    reason = reason.as_deref().unwrap_or(""),
                    "block result"
                );
            }
            Some(Err(())) => {
                error!("generator stopped");
                break;
            }
        }
        if !settings.quiet && last_status.elapsed() >= Duration::from_secs(5) {
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
    // Also tells the admin thread, when the loop ended for another reason.
    shutdown.store(true, Ordering::Relaxed);
    info!("shutting down");
    // No connection, no share, hence no block after this (in queue mode the stratifier threads
    // have drained their queues too).
    conns.shutdown();
    // Submits every block still queued.
    generator.shutdown();
    if let Some(log) = share_log {
        log.stop();
    }
    stats_writer.stop();
    if admin.join().is_err() {
        error!("the admin thread panicked");
    }
    info!("shutdown complete");
    Ok(())
}

/// How long the main loop waits for an event before it looks at the shutdown flag again.
const MAIN_LOOP_WAKE: Duration = Duration::from_millis(200);

/// Files that exist while the daemon runs (pid file, admin socket): removed when dropped.
struct RunFiles(Vec<PathBuf>);

impl Drop for RunFiles {
    fn drop(&mut self) {
        for path in &self.0 {
            if let Err(e) = std::fs::remove_file(path)
                && e.kind() != std::io::ErrorKind::NotFound
            {
                warn!(path = %path.display(), error = %e, "cannot remove");
            }
        }
    }
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
