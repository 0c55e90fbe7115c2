//! Proxy mode (`-p`, or the binary named `ckproxy`): miners connect here as to a pool, and the
//! work comes from an upstream stratum pool (the `proxy` array, in priority order, with
//! failover: `generator::upstream::Pool`).
//!
//! - Each upstream subscription (and each upstream `mining.set_extranonce`) becomes a work
//!   source of the stratifier ([`Pool::add_source`]) laid out as the upstream's extranonce1,
//!   then a local part telling our miners apart, then the miners' extranonce2: the local part
//!   is the upstream's extranonce2 length less `nonce2length` when that key is given, else
//!   ckpool's automatic split (4 bytes when the upstream gives more than 7, 2 when more than 5,
//!   else 1).
//! - Each upstream `mining.notify` becomes a job of that source; `mining.set_difficulty`
//!   becomes the source's upstream difficulty (fractional kept): no miner's difficulty goes
//!   above it, and miners above are lowered at once.
//! - Shares are checked here against each miner's own difficulty; those meeting the upstream
//!   difficulty come out of the shards as [`stratifier::Event::Upstream`] and are submitted
//!   upstream with the upstream user, the upstream job id, local extranonce1 part ‖ extranonce2,
//!   ntime, nonce and (when version rolling was negotiated upstream) the version bits. The
//!   upstream's verdicts are counted per user and shown in the admin `stats` (`upstreams`).
//! - When the link fails over to another `proxy` entry (or the upstream changes its
//!   extranonce1), miners stay connected: with the new source's first job, every miner is moved
//!   to it ([`stratifier::Shard::move_source`]): `mining.set_extranonce` and a clean notify for
//!   those that sent `mining.extranonce.subscribe`, `client.reconnect` for the others.
//!
//! Version rolling: the upstream is asked for `version_mask` with `mining.configure`; the mask
//! miners are offered is the intersection of its answer and `version_mask`, fixed when the
//! first upstream comes up (a later upstream granting less is logged).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU16, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use common::Difficulty;
use common::address::Network;
use common::stratum::decode;
use connector::Connector;
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use generator::upstream::{self, Submit, UpstreamConfig, UpstreamEvent, UpstreamServer};
use serde::Serialize;
use stratifier::{ExtranonceLayout, Origin, Pool, SourceId, UpstreamShare, Work};
use tracing::{debug, error, info, warn};

use crate::admin::{self, GenLink};
use crate::handoff::{self, Msg, ShardCmd};
use crate::settings::Settings;
use crate::sharelog::ShareLog;
use crate::status;

/// How long the main loop waits for an event before it looks at the shutdown flag again.
const MAIN_LOOP_WAKE: Duration = Duration::from_millis(200);
/// Shares waiting for the main loop to submit them upstream; more are dropped (and counted).
const SHARE_QUEUE: usize = 65_536;

/// The upstream link's configuration from the settings.
pub(crate) fn upstream_config(settings: &Settings) -> UpstreamConfig {
    let f = &settings.file;
    UpstreamConfig {
        servers: f
            .proxy
            .iter()
            .map(|p| UpstreamServer::new(p.url.clone(), p.auth.clone(), p.pass.clone()))
            .collect(),
        version_rolling: (f.version_mask != 0).then_some(f.version_mask),
        extranonce_subscribe: true,
        ..UpstreamConfig::default()
    }
}

/// The local part of extranonce1 for an upstream giving `upstream_n2` bytes of extranonce2:
/// `upstream_n2 − nonce2length` when `nonce2length` is given (and leaves 1 to 8 bytes), else
/// ckpool's split. `None` when the upstream leaves no room for both.
pub(crate) fn local_len(upstream_n2: usize, nonce2length: Option<usize>) -> Option<usize> {
    if let Some(n2) = nonce2length {
        match upstream_n2.checked_sub(n2) {
            Some(l @ 1..=8) => return Some(l),
            _ => warn!(
                upstream_n2,
                nonce2length = n2,
                "nonce2length leaves no local extranonce1 part with this upstream; splitting automatically"
            ),
        }
    }
    let local = match upstream_n2 {
        8.. => 4,
        6..=7 => 2,
        2..=5 => 1,
        _ => return None,
    };
    Some(local)
}

/// One `proxy` entry's state, for the admin `stats`.
#[derive(Debug, Clone, Serialize)]
struct ServerStats {
    url: String,
    /// `active`, `down`, `failed`, `refused` or `idle` (never tried).
    state: String,
    accepted: u64,
    rejected: u64,
    /// Shares that never got a verdict from it (link down or switched, no answer).
    lost: u64,
}

/// Upstream verdicts of one user's shares.
#[derive(Debug, Clone, Copy, Default, Serialize)]
struct UserCounts {
    accepted: u64,
    rejected: u64,
}

/// What the admin `stats` shows as `upstreams`.
#[derive(Debug, Clone, Serialize)]
struct UpstreamStats {
    /// Index of the active entry.
    active: Option<usize>,
    /// The upstream difficulty of the current source.
    difficulty: Option<f64>,
    /// The version mask granted by the active upstream.
    version_mask: Option<String>,
    servers: Vec<ServerStats>,
    users: HashMap<String, UserCounts>,
    /// Shares that could not be queued for the upstream (queue full, link gone, stale source).
    dropped: u64,
}

/// The proxy's view of its upstream, owned by the main loop.
struct Proxy {
    pool: Arc<Pool>,
    /// The source new connections mine on (shared with the connector threads).
    open_source: Arc<AtomicU16>,
    /// The source with work now.
    current: Option<SourceId>,
    /// A source subscribed but without work yet; becomes current with its first job.
    pending: Option<SourceId>,
    /// Index of the entry the link is on.
    active: Option<usize>,
    /// The source of the active upstream connection's subscription: only its work is
    /// submitted (another connection's job ids mean nothing to it).
    linked: Option<SourceId>,
    nonce2length: Option<usize>,
    /// Submits in flight: tag → (server index, user).
    inflight: HashMap<u64, (usize, Arc<Box<str>>)>,
    next_tag: u64,
    stats: Arc<Mutex<UpstreamStats>>,
    /// The mask miners were offered.
    miner_mask: u32,
    /// The mask asked of the upstream.
    asked_mask: u32,
}

impl Proxy {
    fn stats(&self) -> std::sync::MutexGuard<'_, UpstreamStats> {
        self.stats
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn server_state(&self, index: usize, state: &str) {
        if let Some(s) = self.stats().servers.get_mut(index) {
            state.clone_into(&mut s.state);
        }
    }

    /// A new subscription (or extranonce) from the upstream: a new work source.
    fn subscribed(&mut self, enonce1: &[u8], nonce2len: usize) {
        let Some(local) = local_len(nonce2len, self.nonce2length) else {
            error!(
                nonce2len,
                "upstream extranonce2 too short to share among miners; its work is not used"
            );
            return;
        };
        let layout = match ExtranonceLayout::new(enonce1, local, nonce2len - local) {
            Ok(l) => l,
            Err(e) => {
                error!(error = %e, "unusable upstream extranonce");
                return;
            }
        };
        match self.pool.add_source(layout) {
            Ok(source) => {
                info!(
                    source = source.0,
                    enonce1 = %hex::encode(enonce1),
                    upstream_nonce2len = nonce2len,
                    local,
                    miner_nonce2len = nonce2len - local,
                    "new upstream work source"
                );
                self.pending = Some(source);
                self.linked = Some(source);
            }
            Err(e) => error!(error = %e, "cannot add a work source"),
        }
    }

    /// The source an upstream message is about: the subscription being set up, else the
    /// current one.
    fn target(&self) -> Option<SourceId> {
        self.pending.or(self.current)
    }

    fn job(&mut self, job: &decode::Job, conns: &Connector<Msg>) {
        let Some(source) = self.target() else {
            warn!(job = %job.job_id, "upstream job with no subscription; ignored");
            return;
        };
        let work = Work {
            origin: Origin::Upstream {
                job_id: job.job_id.clone(),
            },
            prev_hash: job.prev_hash,
            coinb1: job.coinb1.clone(),
            coinb2: job.coinb2.clone(),
            branch: job.branch.clone(),
            version: job.version,
            bits: job.nbits,
            ntime: job.ntime,
            clean: job.clean,
            height: 0,
        };
        let job = match self.pool.new_work(source, work, Instant::now()) {
            Ok(j) => j,
            Err(e) => {
                error!(error = %e, "cannot build a job from the upstream's notify");
                return;
            }
        };
        info!(job = %job.id_hex, upstream_job = %match &job.origin { Origin::Upstream { job_id } => job_id.as_str(), _ => "" }, source = source.0, clean = job.clean, "new job");
        if self.pending == Some(source) {
            self.pending = None;
            let old = self.current.replace(source);
            self.open_source.store(source.0, Ordering::Release);
            if let Some(from) = old.filter(|&o| o != source) {
                info!(
                    from = from.0,
                    to = source.0,
                    "moving miners to the new upstream work source"
                );
                conns.broadcast(Msg::Cmd(ShardCmd::Move { from, to: source }));
            }
            if let Some(max) = self
                .pool
                .upstream_diff(source)
                .and_then(Difficulty::from_f64)
            {
                conns.broadcast(Msg::Cmd(ShardCmd::LimitDiff { source, max }));
            }
        }
        conns.broadcast(Msg::Job(job));
    }

    fn difficulty(&mut self, d: f64, conns: &Connector<Msg>) {
        let Some(source) = self.target() else {
            return;
        };
        info!(diff = d, source = source.0, "upstream difficulty");
        if let Err(e) = self.pool.set_upstream_diff(source, d) {
            warn!(error = %e, "cannot set the upstream difficulty");
            return;
        }
        if self.current == Some(source) {
            self.stats().difficulty = Some(d);
        }
        if let Some(max) = Difficulty::from_f64(d) {
            conns.broadcast(Msg::Cmd(ShardCmd::LimitDiff { source, max }));
        }
    }

    /// Handles one event of the upstream link.
    fn event(&mut self, ev: UpstreamEvent, conns: &Connector<Msg>) {
        match ev {
            UpstreamEvent::Up { index, url } => {
                info!(index, url, "upstream active");
                if let Some(old) = self.active.replace(index)
                    && old != index
                {
                    self.server_state(old, "down");
                }
                self.server_state(index, "active");
                self.stats().active = Some(index);
                // Its subscription follows; until then nothing is submitted.
                self.linked = None;
            }
            UpstreamEvent::Down { index, reason } => {
                warn!(index, reason, "upstream down; miners stay connected");
                self.server_state(index, "down");
                if self.active == Some(index) {
                    self.active = None;
                    self.linked = None;
                    self.stats().active = None;
                }
            }
            UpstreamEvent::Failed { index, reason } => {
                warn!(index, reason, "upstream connection failed");
                self.server_state(index, "failed");
            }
            UpstreamEvent::Refused { index, reason } => {
                warn!(index, reason, "upstream refused our credentials");
                self.server_state(index, "refused");
            }
            UpstreamEvent::VersionRolling(mask) => {
                let granted = mask.unwrap_or(0) & self.asked_mask;
                self.stats().version_mask = mask.map(|m| format!("{m:08x}"));
                if self.miner_mask & !granted != 0 {
                    warn!(
                        granted = format_args!("{granted:08x}"),
                        offered = format_args!("{:08x}", self.miner_mask),
                        "this upstream grants fewer version bits than miners were offered; their rolled shares may be refused upstream"
                    );
                }
            }
            UpstreamEvent::Subscribed { enonce1, nonce2len }
            | UpstreamEvent::Extranonce { enonce1, nonce2len } => {
                self.subscribed(&enonce1, nonce2len);
            }
            UpstreamEvent::Authorised => debug!("authorised upstream"),
            UpstreamEvent::Job(job) => self.job(&job, conns),
            UpstreamEvent::Difficulty(d) => self.difficulty(d, conns),
            UpstreamEvent::VersionMask(m) => {
                info!(
                    mask = format_args!("{m:08x}"),
                    "upstream changed the version mask"
                );
            }
            UpstreamEvent::Reconnect {
                host,
                port,
                honoured,
            } => info!(?host, ?port, honoured, "upstream client.reconnect"),
            UpstreamEvent::Verdict {
                tag,
                accepted,
                reason,
            } => self.verdict(tag, accepted, reason.as_deref()),
        }
    }

    fn verdict(&mut self, tag: u64, accepted: bool, reason: Option<&str>) {
        let Some((index, user)) = self.inflight.remove(&tag) else {
            debug!(tag, "verdict for no submit");
            return;
        };
        let lost = matches!(
            reason,
            Some("upstream down" | "upstream switched" | "no answer" | "shutdown" | "bad job id")
        );
        if !accepted {
            warn!(user = %user, reason = reason.unwrap_or(""), "share rejected upstream");
        }
        let mut st = self.stats();
        if let Some(s) = st.servers.get_mut(index) {
            match (accepted, lost) {
                (true, _) => s.accepted += 1,
                (false, true) => s.lost += 1,
                (false, false) => s.rejected += 1,
            }
        }
        let u = st.users.entry(user.to_string()).or_default();
        if accepted {
            u.accepted += 1;
        } else {
            u.rejected += 1;
        }
    }

    /// A share from the shards for the upstream.
    fn submit(&mut self, share: &UpstreamShare, link: &upstream::Pool) {
        let (Some(index), Some(linked)) = (self.active, self.linked) else {
            self.stats().dropped += 1;
            return;
        };
        // Work of an earlier upstream connection is not valid on this one.
        if share.job.source != linked {
            debug!(
                source = share.job.source.0,
                "share on a previous upstream's work; not submitted"
            );
            self.stats().dropped += 1;
            return;
        }
        let Origin::Upstream { job_id } = &share.job.origin else {
            return;
        };
        self.next_tag += 1;
        let tag = self.next_tag;
        let Some(submit) = Submit::new(
            Arc::from(job_id.as_str()),
            share.extranonce2(),
            share.ntime,
            share.nonce,
            share.version_bits.unwrap_or(0),
            tag,
        ) else {
            return;
        };
        match link.try_submit(submit) {
            Ok(()) => {
                self.inflight.insert(tag, (index, Arc::clone(&share.user)));
            }
            Err(e) => {
                warn!(error = %e, "share not queued for the upstream");
                self.stats().dropped += 1;
            }
        }
    }
}

/// Proxy mode. Returns when `shutdown` is set, having stopped everything.
pub(crate) fn run(settings: &Settings, shutdown: &Arc<AtomicBool>) -> anyhow::Result<()> {
    let cfg = upstream_config(settings);
    if cfg.servers.is_empty() {
        bail!("proxy mode needs a \"proxy\" array in the config (url, auth, pass)");
    }
    let servers: Vec<ServerStats> = cfg
        .servers
        .iter()
        .map(|s| ServerStats {
            url: s.url.clone(),
            state: "idle".into(),
            accepted: 0,
            rejected: 0,
            lost: 0,
        })
        .collect();
    let asked_mask = cfg.version_rolling.unwrap_or(0);
    let (up_tx, up_rx) = crossbeam_channel::bounded(4096);
    let link = upstream::Pool::start(cfg, up_tx).context("starting the upstream link")?;

    // No miner is accepted before the upstream has given work.
    let started = Instant::now();
    let Some(early) = first_job(&up_rx, shutdown, started)? else {
        info!("shutdown before any upstream gave work");
        link.shutdown();
        return Ok(());
    };
    let granted = early
        .iter()
        .rev()
        .find_map(|e| match e {
            UpstreamEvent::VersionRolling(m) => Some(m.unwrap_or(0)),
            _ => None,
        })
        .unwrap_or(0);

    // The network only matters for address checks, which proxy mode does not make.
    let mut pcfg = settings.pool(Network::Bitcoin)?;
    pcfg.version_mask &= granted;
    info!(
        version_mask = format_args!("{:08x}", pcfg.version_mask),
        "version bits offered to miners"
    );
    let miner_mask = pcfg.version_mask;
    let seed = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let pool = Pool::new(pcfg, seed, Instant::now());
    let stats = Arc::new(Mutex::new(UpstreamStats {
        active: None,
        difficulty: None,
        version_mask: None,
        servers,
        users: HashMap::new(),
        dropped: 0,
    }));
    let mut proxy = Proxy {
        pool: Arc::clone(&pool),
        open_source: Arc::new(AtomicU16::new(0)),
        current: None,
        pending: None,
        active: None,
        linked: None,
        nonce2length: settings
            .file
            .nonce2length_given
            .then_some(settings.file.nonce2length),
        inflight: HashMap::new(),
        next_tag: 0,
        stats: Arc::clone(&stats),
        miner_mask,
        asked_mask,
    };

    let share_log = if settings.log_shares {
        Some(ShareLog::start(settings, shutdown).context("starting the share log")?)
    } else {
        None
    };
    let (share_tx, share_rx) = crossbeam_channel::bounded::<UpstreamShare>(SHARE_QUEUE);
    let overflow = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let sinks = handoff::Sinks {
        blocks: None,
        shares: share_log.as_ref().map(|l| Arc::from(l.sink())),
        upstream: Some(upstream_sink(share_tx, Arc::clone(&overflow))),
        source: Some(Arc::clone(&proxy.open_source)),
        nodes: None,
    };
    let stats_writer = status::start(
        Arc::clone(&pool),
        settings.logdir().to_owned(),
        settings.statsupdate(),
        started,
    )
    .context("starting the stats writer")?;

    let handoff = settings.handoff;
    // Passthrough links are not accepted in proxy mode (no `passthroughserver` listener).
    let links = crate::links::LinkConfig {
        allowed: Arc::from(vec![false; settings.connector().listen.len()]),
        nodes: Arc::default(),
        registry: Arc::default(),
    };
    let conns = handoff::start(
        handoff,
        settings.connector(),
        Arc::clone(&pool),
        sinks,
        links,
    )
    .context("starting the connector")?;
    // The work that came before the pool existed; the first source becomes current now.
    for ev in early {
        proxy.event(ev, &conns);
    }
    let io_backend = conns.backend().to_string();
    for a in conns.local_addrs() {
        info!(addr = %a, threads = settings.threads, io = %io_backend, %handoff, "listening for miners");
    }
    if settings.webserver().is_some() {
        warn!("webserver is not served in proxy mode yet");
    }

    let admin_path = settings.admin_socket();
    let (gen_link, _updates) = GenLink::new();
    let stats_view = Arc::clone(&stats);
    let admin = admin::start(
        &admin_path,
        admin::AdminCtx {
            io: io_backend,
            handoff: handoff.to_string(),
            pool: Arc::clone(&pool),
            generator: gen_link,
            shutdown: Arc::clone(shutdown),
            share_log: share_log.as_ref().map(ShareLog::stats_handle),
            handover: None,
            links: Arc::default(),
            upstreams: Some(Arc::new(move || {
                let st = stats_view
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                serde_json::to_value(&*st).unwrap_or_default()
            })),
            conns: Some(conns.handle()),
        },
    );
    let admin = match admin {
        Ok(a) => Some(a),
        Err(e) => {
            error!(error = %e, path = %admin_path.display(), "cannot bind the admin socket");
            shutdown.store(true, Ordering::Relaxed);
            None
        }
    };

    let mut last_status = Instant::now();
    let mut reported_overflow = 0;
    while !shutdown.load(Ordering::Relaxed) {
        crossbeam_channel::select! {
            recv(up_rx) -> ev => match ev {
                Ok(ev) => proxy.event(ev, &conns),
                Err(_) => {
                    error!("upstream link stopped");
                    break;
                }
            },
            recv(share_rx) -> share => {
                if let Ok(share) = share {
                    proxy.submit(&share, &link);
                    // Take what else is queued.
                    for share in share_rx.try_iter().take(1024) {
                        proxy.submit(&share, &link);
                    }
                }
            },
            default(MAIN_LOOP_WAKE) => {},
        }
        let over = overflow.load(Ordering::Relaxed);
        if over != reported_overflow {
            warn!(
                dropped = over - reported_overflow,
                "upstream share queue full; shares dropped"
            );
            proxy.stats().dropped += over - reported_overflow;
            reported_overflow = over;
        }
        if !settings.quiet && last_status.elapsed() >= Duration::from_secs(5) {
            last_status = Instant::now();
            let s = pool.stats();
            let up = proxy.stats().clone();
            let (acc, rej) = up
                .servers
                .iter()
                .fold((0, 0), |(a, r), s| (a + s.accepted, r + s.rejected));
            info!(
                clients = s.clients,
                accepted = s.accepted,
                rejected = s.rejected,
                upstream = ?up.active,
                upstream_accepted = acc,
                upstream_rejected = rej,
                "status"
            );
        }
    }
    shutdown.store(true, Ordering::Relaxed);
    info!("shutting down");
    conns.shutdown();
    link.shutdown();
    if let Some(log) = share_log {
        log.stop();
    }
    stats_writer.stop();
    if let Some(a) = admin
        && a.join().is_err()
    {
        error!("the admin thread panicked");
    }
    info!("shutdown complete");
    Ok(())
}

/// The shards' sink for upstream shares: a bounded queue to the main loop (never blocks a
/// connector thread; a full queue drops the share and counts it).
fn upstream_sink(
    tx: Sender<UpstreamShare>,
    overflow: Arc<std::sync::atomic::AtomicU64>,
) -> Arc<dyn Fn(UpstreamShare) + Send + Sync> {
    Arc::new(move |share| {
        if tx.try_send(share).is_err() {
            overflow.fetch_add(1, Ordering::Relaxed);
        }
    })
}

/// Waits until the upstream link gives its first job, returning every event up to it (the
/// job included); `None` if `shutdown` is set first.
fn first_job(
    rx: &Receiver<UpstreamEvent>,
    shutdown: &AtomicBool,
    started: Instant,
) -> anyhow::Result<Option<Vec<UpstreamEvent>>> {
    info!("waiting for an upstream pool");
    let mut early = Vec::new();
    let mut next_warning = started + Duration::from_secs(5);
    while !shutdown.load(Ordering::Relaxed) {
        match rx.recv_timeout(MAIN_LOOP_WAKE) {
            Ok(ev) => {
                let is_job = matches!(ev, UpstreamEvent::Job(_));
                match &ev {
                    UpstreamEvent::Failed { index, reason }
                    | UpstreamEvent::Refused { index, reason }
                    | UpstreamEvent::Down { index, reason } => {
                        warn!(index, reason, "upstream not usable");
                    }
                    _ => {}
                }
                early.push(ev);
                if is_job {
                    return Ok(Some(early));
                }
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => bail!("upstream link stopped"),
        }
        if Instant::now() >= next_warning {
            warn!("still waiting for an upstream pool to give work");
            next_warning += Duration::from_secs(5);
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::local_len;

    #[test]
    fn nonce_split_follows_nonce2length_or_ckpools_rule() {
        // ckpool's automatic split.
        assert_eq!(local_len(8, None), Some(4));
        assert_eq!(local_len(7, None), Some(2));
        assert_eq!(local_len(6, None), Some(2));
        assert_eq!(local_len(5, None), Some(1));
        assert_eq!(local_len(4, None), Some(1));
        assert_eq!(local_len(1, None), None);
        // nonce2length: what is left for the local part.
        assert_eq!(local_len(8, Some(6)), Some(2));
        assert_eq!(local_len(8, Some(4)), Some(4));
        // Leaves nothing: the automatic split instead.
        assert_eq!(local_len(4, Some(4)), Some(1));
    }
}
