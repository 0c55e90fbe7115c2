//! Pool and solo mode: bitcoind templates through the generator, the stratifier's shards on the
//! connector threads (see `crate::handoff`), the admin socket, the share log and the stats files.
//!
//! Shutdown (SIGTERM, SIGINT or admin `shutdown`), in this order: the connector stops accepting,
//! closes every connection and joins its threads (and, in queue mode, the stratifier threads,
//! which drain their queues first), so no share and hence no block comes after it; then
//! `Generator::shutdown` submits every block still queued; then the share log is written out,
//! the stats files are written a last time, and the admin thread is joined. At start-up the
//! stats files are read back (`status::restore`) before the stats writer and the connector start
//! (not after a handover: the statistics come with the pool state).
//!
//! Handover (`-H`, see `crate::handover`): a new instance asks for it on the admin socket once
//! its pool is ready, and the main loop hands the listeners and the connections over; after the
//! commit this instance stops as above (it has no connection left to close) and exits 0, leaving
//! the pid file and the admin socket to the new one. The new instance serves the listeners it
//! received instead of binding its own, and writes its pid file and binds the admin socket once
//! it has everything.

use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use common::template::Template;
use connector::Connector;
use crossbeam_channel::{Receiver, RecvTimeoutError};
use generator::{GenEvent, Generator};
use stratifier::Pool;
use tracing::{error, info, warn};

use crate::admin::{self, GenLink};
use crate::handoff::{self, Msg};
use crate::handover::{self, PoolHooks};
use crate::instance::Instance;
use crate::links::LinkConfig;
use crate::settings::Settings;
use crate::sharelog::ShareLog;
use crate::status::{self, StatusWriter};
use crate::web;

/// Pool and solo mode: bitcoind templates through the generator, the stratifier's shards on
/// the connector threads, the admin socket, the share log and the stats files. Returns when
/// `shutdown` is set (SIGTERM, SIGINT, admin `shutdown`), having stopped all of it.
pub(crate) fn run(settings: &Settings, instance: &Instance) -> anyhow::Result<()> {
    let shutdown = &instance.shutdown;
    // The generator: bitcoind RPC, ZMQ and failover.
    let (gen_tx, gen_rx) = crossbeam_channel::unbounded();
    let generator =
        Generator::start(settings.generator(), gen_tx).context("starting the generator")?;

    // No miner is accepted before a bitcoind is alive.
    let started = Instant::now();
    let Some(first) = first_template(&gen_rx, shutdown, started)? else {
        info!("shutdown before any bitcoind answered");
        generator.shutdown();
        return Ok(());
    };
    let network = generator
        .network()
        .ok_or_else(|| anyhow::anyhow!("the node did not say which chain it is on"))?;
    info!(?network, height = first.height, "first block template");

    // The stratifier's shared state.
    let pcfg = settings.pool(network)?;
    let share_log = if settings.log_shares {
        Some(ShareLog::start(settings, shutdown).context("starting the share log")?)
    } else {
        None
    };
    let seed = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let link_registry: Arc<crate::links::LinkRegistry> = Arc::default();
    // Accepted shares on disk before their replies go out (replayed over the stats files at
    // the next start after a crash).
    let journal = match crate::journal::Journal::open(settings.logdir()) {
        Ok(j) => Some(j),
        Err(e) => {
            warn!(error = %e, "cannot open the share journal under {}: a crash loses the shares accepted since the last stats write", settings.logdir().display());
            None
        }
    };
    let sinks = handoff::Sinks {
        blocks: Some(generator.block_submitter()),
        shares: share_log.as_ref().map(|l| Arc::from(l.sink())),
        upstream: None,
        source: None,
        auth: None,
        nodes: Some(Arc::clone(&link_registry)),
        journal: journal.clone(),
    };
    let pool = Pool::new(pcfg, seed, Instant::now());
    let hooks = PoolHooks(Arc::clone(&pool));
    let admin_path = settings.admin_socket();
    // -H: the running instance's listeners and pool state come first (the pool must be fresh
    // to take its state); its connections once the connector runs. Its own first template
    // then becomes a job, as a template update would.
    let incoming = if instance.pending_handover() {
        let incoming = handover::request(&admin_path)?.ok_or_else(|| {
            anyhow::anyhow!(
                "-H: the running instance does not answer on {}",
                admin_path.display()
            )
        })?;
        info!(listeners = ?incoming.addrs, "handover: listeners received");
        incoming
            .import_pool_state(&hooks)
            .context("-H: the handover failed; the old instance serves on")?;
        Some(incoming)
    } else {
        pool.new_template(Arc::clone(&first), Instant::now())
            .context("building the first job")?;
        // The figures the stats files saved (decayed since), before anyone is served; the
        // share journal adds what was accepted after them (a crash), and gives the share log
        // the lines its writer had not written.
        status::restore(&pool, settings.logdir());
        if settings.log_shares {
            crate::sharelog::recover(settings);
        }
        None
    };
    // Hashrate sampling and the stats files (pool.status, users/<name>).
    let stats_writer = status::start(
        Arc::clone(&pool),
        settings.logdir().to_owned(),
        settings.statsupdate(),
        started,
        journal.clone(),
    )
    .context("starting the stats writer")?;

    // The connector threads, each with its stratifier shard.
    let handoff = settings.handoff;
    let threads = settings.threads;
    // Node links need one coinbase for all (solo mode builds one per user).
    let nodes = if settings.mode == crate::settings::Mode::Solo {
        let nodes = settings.node_listeners();
        if nodes.iter().any(|&n| n) {
            warn!("nodeserver: nodes are not served in solo mode; mining.node is refused");
        }
        Arc::from(vec![false; nodes.len()])
    } else {
        settings.node_listeners()
    };
    let links = LinkConfig {
        allowed: settings.passthrough_listeners(),
        nodes,
        registry: link_registry,
    };
    info!(%handoff, threads, "stratifier handoff");
    let mut ccfg = settings.connector();
    if let Some(incoming) = &incoming {
        ccfg.listen.clear();
        ccfg.inherited.clone_from(&incoming.listeners);
    }
    let conns = match handoff::start(handoff, ccfg, Arc::clone(&pool), sinks, links.clone()) {
        Ok(conns) => conns,
        Err(e) => {
            if let Some(incoming) = &incoming {
                incoming.abort(&format!("the new instance cannot start its connector: {e}"));
            }
            return Err(e).context("starting the connector");
        }
    };
    links.registry.set_handle(conns.handle());
    let io_backend = conns.backend().to_string();
    for a in conns.local_addrs() {
        info!(addr = %a, threads, io = %io_backend, %handoff, "listening for miners");
    }

    let running = Running {
        conns,
        generator,
        share_log,
        stats_writer,
    };

    let handed_in = incoming.is_some();
    if let Some(incoming) = incoming {
        match incoming.adopt_all(&running.conns) {
            Ok(n) => info!(connections = n, "handover: took the running instance over"),
            Err(e) => {
                running.stop();
                return Err(e).context("-H: the handover failed; the old instance serves on");
            }
        }
        if let Err(e) = instance.take_over(settings) {
            running.stop();
            return Err(e);
        }
        match pool.new_template(first, Instant::now()) {
            Ok(job) => running.conns.broadcast(Msg::Job(job)),
            Err(e) => error!(error = %e, "cannot build a job from the first template"),
        }
    }

    let (gen_link, update_rx) = GenLink::new();
    let (handover_tx, handover_rx) = crossbeam_channel::bounded(1);
    gen_link.set_active(running.generator.active_server());
    let admin = admin::start(
        &admin_path,
        admin::AdminCtx {
            io: io_backend.clone(),
            handoff: handoff.to_string(),
            pool: Arc::clone(&pool),
            generator: Arc::clone(&gen_link),
            shutdown: Arc::clone(shutdown),
            share_log: running.share_log.as_ref().map(ShareLog::stats_handle),
            journal: journal.clone(),
            handover: Some(handover_tx),
            links: Arc::clone(&links.registry),
            upstreams: None,
            conns: Some(running.conns.handle()),
        },
    );
    let admin = match admin {
        Ok(admin) => admin,
        Err(e) => {
            // Miners may have found a block already: stop in order all the same.
            running.stop();
            return Err(e)
                .with_context(|| format!("binding admin socket {}", admin_path.display()));
        }
    };

    // The read-only HTTP listener (`webserver`), if configured.
    let web = match settings.webserver() {
        None => None,
        Some(addr) => {
            let ctx = web::WebCtx::Pool(web::PoolCtx {
                pool: Arc::clone(&pool),
                conns: running.conns.handle(),
                generator: Arc::clone(&gen_link),
                servers: settings
                    .generator()
                    .btcd
                    .iter()
                    .map(|b| b.url.clone())
                    .collect(),
                share_log: running.share_log.as_ref().map(ShareLog::stats_handle),
                gen_stats: Some(running.generator.stats()),
                upstreams: None,
                links: Arc::clone(&links.registry),
                io: io_backend,
                handoff: handoff.to_string(),
                started,
            });
            // After a handover the old instance frees the port moments after the commit; the
            // miners are ours by then, so a port still taken is no reason to drop them.
            let wait = if handed_in {
                WEB_HANDOVER_WAIT
            } else {
                Duration::ZERO
            };
            match web::start(addr, ctx, wait) {
                Ok(w) => Some(w),
                Err(e) if handed_in => {
                    error!(addr, error = %e, "cannot bind the webserver after the handover; serving miners without it");
                    None
                }
                Err(e) => {
                    shutdown.store(true, Ordering::Relaxed);
                    running.stop();
                    if admin.join().is_err() {
                        error!("the admin thread panicked");
                    }
                    return Err(e).with_context(|| format!("binding webserver {addr}"));
                }
            }
        }
    };

    let links = Links {
        gen_rx: &gen_rx,
        update_rx: &update_rx,
        gen_link: &gen_link,
        handover_rx: &handover_rx,
        hooks: &hooks,
    };
    let handed_over = running.serve(settings, shutdown, &pool, &links);
    // Also tells the admin thread, when the loop ended for another reason.
    shutdown.store(true, Ordering::Relaxed);
    if handed_over {
        // The pid file and the admin socket are the new instance's now.
        instance.disown();
        info!("handed over to the new instance; exiting");
    }
    info!("shutting down");
    if let Some(web) = web {
        web.stop();
    }
    running.stop();
    if admin.join().is_err() {
        error!("the admin thread panicked");
    }
    info!("shutdown complete");
    Ok(())
}

/// What the main loop listens to besides the pool.
struct Links<'a> {
    gen_rx: &'a Receiver<GenEvent>,
    update_rx: &'a Receiver<()>,
    gen_link: &'a GenLink,
    /// Admin connections that asked for a handover (and have had no answer yet).
    handover_rx: &'a Receiver<UnixStream>,
    hooks: &'a PoolHooks,
}

/// The parts of a running pool that must be stopped in order.
struct Running {
    conns: Connector<Msg>,
    generator: Generator,
    share_log: Option<ShareLog>,
    stats_writer: StatusWriter,
}

impl Running {
    /// The main loop: templates to jobs, block results, update requests, handover requests,
    /// status lines. Returns once `shutdown` is set (or the generator is gone): false, or true
    /// once a handover committed.
    fn serve(
        &self,
        settings: &Settings,
        shutdown: &AtomicBool,
        pool: &Pool,
        links: &Links<'_>,
    ) -> bool {
        let Links {
            gen_rx,
            update_rx,
            gen_link,
            handover_rx,
            hooks,
        } = *links;
        let mut last_status = Instant::now();
        while !shutdown.load(Ordering::Relaxed) {
            let event = crossbeam_channel::select! {
                recv(gen_rx) -> event => Some(event.map_err(|_| ())),
                recv(update_rx) -> _ => {
                    self.generator.request_update();
                    None
                },
                recv(handover_rx) -> stream => {
                    if let Ok(stream) = stream
                        && self.hand_over(&stream, hooks)
                    {
                        return true;
                    }
                    None
                },
                default(MAIN_LOOP_WAKE) => None,
            };
            gen_link.set_active(self.generator.active_server());
            match event {
                None => {}
                Some(Ok(GenEvent::Template {
                    template,
                    new_block,
                    server,
                })) => match pool.new_template(template, Instant::now()) {
                    Ok(job) => {
                        info!(job = %job.id_hex, height = job.height(), new_block, server, txs = job.transactions().len(), "new job");
                        self.conns.broadcast(Msg::Job(job));
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
                    return false;
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
        false
    }

    /// Answers a handover request `ok` and hands over on it; true once committed (false: this
    /// instance serves on, with every connection it had).
    fn hand_over(&self, stream: &UnixStream, hooks: &PoolHooks) -> bool {
        info!("handover requested by a new instance");
        let mut s = stream;
        if let Err(e) = common::admin::write_message(&mut s, b"ok") {
            warn!(error = %e, "handover: cannot answer the new instance");
            return false;
        }
        let give = handover::PoolGive {
            conns: &self.conns,
            hooks,
        };
        match handover::give(&self.conns, stream, &give) {
            handover::Outcome::Committed { connections } => {
                info!(connections, "handover: the new instance has everything");
                true
            }
            handover::Outcome::Failed(e) => {
                warn!(reason = %format!("{e:#}"), "handover failed; this instance serves on");
                false
            }
        }
    }

    /// Stops everything in the order that loses nothing (see the module's documentation).
    fn stop(self) {
        // No connection, no share, hence no block after this (in queue mode the stratifier
        // threads have drained their queues too).
        self.conns.shutdown();
        // Submits every block still queued.
        self.generator.shutdown();
        if let Some(log) = self.share_log {
            log.stop();
        }
        self.stats_writer.stop();
    }
}

/// How long a new instance keeps trying to bind the webserver's port after a handover.
pub(crate) const WEB_HANDOVER_WAIT: Duration = Duration::from_secs(10);

/// How long the main loop waits for an event before it looks at the shutdown flag again.
const MAIN_LOOP_WAKE: Duration = Duration::from_millis(200);

/// Waits for the generator's first template; `None` if `shutdown` is set first.
fn first_template(
    gen_rx: &Receiver<GenEvent>,
    shutdown: &AtomicBool,
    started: Instant,
) -> anyhow::Result<Option<Arc<Template>>> {
    info!("waiting for a live bitcoind");
    let mut next_warning = started + Duration::from_secs(5);
    while !shutdown.load(Ordering::Relaxed) {
        match gen_rx.recv_timeout(MAIN_LOOP_WAKE) {
            Ok(GenEvent::Template { template, .. }) => return Ok(Some(template)),
            Ok(GenEvent::ServerUp { index, url }) => info!(index, url, "bitcoind up"),
            Ok(GenEvent::NoServers) => warn!("CRITICAL: no bitcoinds active"),
            Ok(GenEvent::BlockResult { .. }) | Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => bail!("generator stopped"),
        }
        if Instant::now() >= next_warning {
            warn!("still waiting for a bitcoind to give a block template");
            next_warning += Duration::from_secs(5);
        }
    }
    Ok(None)
}
