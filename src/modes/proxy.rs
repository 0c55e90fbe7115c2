//! Proxy mode (`-p`, or the binary named `ckproxy`) and userproxy mode (`-u`): miners connect
//! here as to a pool, and the work comes from an upstream stratum pool (the `proxy` array, in priority order, with
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
//!   upstream's verdicts are counted per user and shown in the admin `stats` (`upstreams`),
//!   and with `webserver` set in `/api/upstreams` and the `ckpool_upstream_*` metrics.
//! - When the link fails over to another `proxy` entry (or the upstream changes its
//!   extranonce1), miners stay connected: with the new source's first job, every miner is moved
//!   to it ([`stratifier::Shard::move_source`]): `mining.set_extranonce` and a clean notify for
//!   those that sent `mining.extranonce.subscribe`, `client.reconnect` for the others.
//!
//! - More upstream connections: the main one (the `proxy` array with failover) is joined by
//!   recruited ones (the `proxy` entries and their credentials, with failover like the main one) when 7/8 of the local extranonce1
//!   values of every connection are taken; new connections open on the first with room. In
//!   userproxy mode (`-u`) each user other than the `proxy` entry's gets a connection of its own
//!   with its own credentials (on every `proxy` entry in turn, with failover), opened at its first `mining.authorize`; the stratifier holds the
//!   authorisation ([`stratifier::PoolConfig::external_auth`]) until that connection has work
//!   (the miner is then moved to it) or refused it. Every connection is a source of its own;
//!   a share goes to the connection whose work it is on. `maxupstreams` bounds them; user and
//!   recruited connections with no miner for [`IDLE_LINK`] are closed.
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
use generator::upstream::{self, SendError, Submit, UpstreamConfig, UpstreamEvent, UpstreamServer};
use serde::Serialize;
use stratifier::{
    AuthRequest, AuthVerdict, ClientId, ExtranonceLayout, Origin, Pool, SourceId, UpstreamShare,
    Work,
};
use tracing::{debug, error, info, warn};

mod ho;

use crate::admin::{self, GenLink};
use crate::handoff::{self, Msg, ShardCmd};
use crate::handover;
use crate::instance::Instance;
use crate::settings::Settings;
use crate::sharelog::ShareLog;
use crate::status;

/// How long the main loop waits for an event before it looks at the shutdown flag again.
const MAIN_LOOP_WAKE: Duration = Duration::from_millis(200);
/// Shares waiting for the main loop to submit them upstream; more are dropped (and counted).
const SHARE_QUEUE: usize = 65_536;
/// Userproxy authorisations waiting for the main loop.
const AUTH_QUEUE: usize = 4096;
/// Shares one upstream connection may hold back while its link's queue is full (the upstream
/// reads slower than the miners submit), in order, before the next ones are dropped: about
/// 20 MB. An accepted share is never dropped short of that.
const BACKLOG_MAX: usize = 131_072;
/// How soon the main loop tries again to queue shares held back.
const BACKLOG_RETRY: Duration = Duration::from_millis(2);

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
        reconnect_allow: f.reconnectallow.clone(),
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

/// One upstream connection, for the admin `stats`.
#[derive(Debug, Clone, Serialize)]
struct ConnStats {
    /// A number naming the connection while it lasts (the main one is 0).
    id: u64,
    /// `main` (the `proxy` entries', with failover), `recruit` (another connection with the
    /// same credentials, for more miners) or `user` (userproxy: a user's own).
    role: &'static str,
    /// The user it is authorised as, for `user` connections.
    user: Option<String>,
    url: String,
    /// `connecting`, `active`, `down`, `failed` or `refused`.
    state: &'static str,
    difficulty: Option<f64>,
    accepted: u64,
    rejected: u64,
    lost: u64,
    /// Miners on its work (live sessions and those parked for resume); `None` when the local
    /// extranonce1 part is wider than 4 bytes (not counted).
    miners: Option<u64>,
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
    /// Every upstream connection open, the main one first.
    connections: Vec<ConnStats>,
    /// Times the main connection came up on another `proxy` entry than the one it was last up
    /// on (failover or fail-back).
    failovers: u64,
    /// The entry the main connection was last up on.
    #[serde(skip)]
    last_up: Option<usize>,
}

/// What an upstream connection is for.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Role {
    /// The `proxy` entries' connection, with failover (always `links[0]`).
    Main,
    /// Another connection to the main one's server with its credentials, recruited when the
    /// local extranonce1 space of the others is nearly full.
    Recruit,
    /// Userproxy: a user's own connection, with the credentials of its first authorisation.
    User(Arc<str>),
}

impl Role {
    fn name(&self) -> &'static str {
        match self {
            Self::Main => "main",
            Self::Recruit => "recruit",
            Self::User(_) => "user",
        }
    }
}

/// One upstream connection and what the proxy knows of it.
struct UpLink {
    id: u64,
    role: Role,
    link: upstream::Pool,
    rx: Receiver<UpstreamEvent>,
    /// The entries it fails over along (with a user's own credentials for a user's).
    servers: Vec<UpstreamServer>,
    url: String,
    state: &'static str,
    /// The source with work now.
    current: Option<SourceId>,
    /// A source subscribed but without work yet; becomes current with its first job.
    pending: Option<SourceId>,
    /// The source of the live subscription: only its work is submitted on this connection
    /// (another connection's job ids mean nothing to it).
    linked: Option<SourceId>,
    /// Index of the server it is on (the `proxy` entry for the main connection).
    active: Option<usize>,
    difficulty: Option<f64>,
    accepted: u64,
    rejected: u64,
    lost: u64,
    /// Userproxy: miners whose authorisation waits for this connection's first work.
    waiting: Vec<ClientId>,
    started: Instant,
    /// Since when it has had no miner (user and recruited connections are closed after
    /// [`IDLE_LINK`]).
    idle_since: Option<Instant>,
    /// To be closed by the next housekeeping.
    closing: bool,
    /// Shares for it that its link's queue had no room for yet, in order, with the source they
    /// are on and their in-flight entry.
    backlog: std::collections::VecDeque<(Submit, SourceId, InFlight)>,
}

/// A submit in flight: (connection id, `proxy` entry index for the main connection, user).
type InFlight = (u64, Option<usize>, Arc<Box<str>>);

/// The proxy's view of its upstream connections, owned by the main loop.
struct Proxy {
    pool: Arc<Pool>,
    /// The source new connections mine on (shared with the connector threads).
    open_source: Arc<AtomicU16>,
    nonce2length: Option<usize>,
    /// Submits in flight, by tag.
    inflight: HashMap<u64, InFlight>,
    next_tag: u64,
    stats: Arc<Mutex<UpstreamStats>>,
    /// The mask miners were offered.
    miner_mask: u32,
    /// The mask asked of the upstream.
    asked_mask: u32,
    /// Every connection; `links[0]` is the main one.
    links: Vec<UpLink>,
    next_link_id: u64,
    /// The configuration new connections are made from (their one server put in).
    base: UpstreamConfig,
    /// The `proxy` entries.
    servers: Vec<UpstreamServer>,
    /// `maxupstreams`.
    max_links: usize,
    /// Shares dropped because a connection's backlog was at [`BACKLOG_MAX`] (warned about by
    /// the main loop).
    dropped_backlog: u64,
}

/// A userproxy authorisation whose user's connection has not given work by then is refused.
const AUTH_WAIT: Duration = Duration::from_secs(10);
/// The shards' own bound on a waiting authorisation (after the daemon's).
const SHARD_AUTH_WAIT: Duration = Duration::from_secs(12);
/// A user's or recruited connection with no miner this long is closed.
const IDLE_LINK: Duration = Duration::from_secs(60);

/// Whether a source with `used` of `space` extranonce1 values taken is full enough to place
/// new miners elsewhere (7/8 of it: room is left for sessions that resume).
fn nearly_full(used: u64, space: u64) -> bool {
    used >= space - space / 8
}

/// Where new miners go, from the main and recruited connections in order (each `None` while it
/// is coming up or failing over between upstreams, else its work source and whether that is
/// [`nearly_full`]): the first source not nearly full; and whether to recruit another
/// connection: only when every one is nearly full and none is coming up (a connection failing
/// over has no source for a while, and is no reason for another to the same servers).
fn place(links: impl IntoIterator<Item = Option<(SourceId, bool)>>) -> (Option<SourceId>, bool) {
    let mut coming_up = false;
    for link in links {
        match link {
            None => coming_up = true,
            Some((source, false)) => return (Some(source), false),
            Some((_, true)) => {}
        }
    }
    (None, !coming_up)
}

/// The user part of a worker name (before the first `.` or `_`).
fn user_part(worker: &str) -> &str {
    worker.split(['.', '_']).next().unwrap_or(worker)
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

    /// The `proxy` entries as a recruited or user connection uses them: every entry, in the
    /// same order (so such a connection fails over and back as the main one does, and its
    /// `active` index names the same entry), with the user's credentials for a user's own.
    fn link_servers(&self, role: &Role, pass: Option<&str>) -> Vec<UpstreamServer> {
        let mut servers = self.servers.clone();
        if let (Role::User(user), Some(pass)) = (role, pass) {
            for s in &mut servers {
                user.as_ref().clone_into(&mut s.auth);
                pass.clone_into(&mut s.pass);
            }
        }
        servers
    }

    /// Starts a connection for `role` over `servers` (best first, with failover); `None` when
    /// it cannot start.
    fn open_link(&mut self, role: Role, servers: Vec<UpstreamServer>) -> Option<usize> {
        let url = servers.first().map(|s| s.url.clone()).unwrap_or_default();
        let cfg = UpstreamConfig {
            servers: servers.clone(),
            ..self.base.clone()
        };
        let (tx, rx) = crossbeam_channel::bounded(1024);
        let link = match upstream::Pool::start(cfg, tx) {
            Ok(l) => l,
            Err(e) => {
                error!(error = %e, "cannot start an upstream connection");
                return None;
            }
        };
        self.next_link_id += 1;
        info!(
            id = self.next_link_id,
            role = role.name(),
            url,
            "opening an upstream connection"
        );
        self.links.push(UpLink {
            id: self.next_link_id,
            role,
            link,
            rx,
            servers,
            url,
            state: "connecting",
            current: None,
            pending: None,
            linked: None,
            active: None,
            difficulty: None,
            accepted: 0,
            rejected: 0,
            lost: 0,
            waiting: Vec::new(),
            backlog: std::collections::VecDeque::new(),
            started: Instant::now(),
            idle_since: None,
            closing: false,
        });
        Some(self.links.len() - 1)
    }

    /// The `proxy` entry the main connection is on (the first while none is).
    fn main_server(&self) -> Option<&UpstreamServer> {
        let active = self.links.first().and_then(|l| l.active);
        active
            .and_then(|i| self.servers.get(i))
            .or_else(|| self.servers.first())
    }

    /// A new subscription (or extranonce) from connection `k`'s upstream: a new work source.
    fn subscribed(&mut self, k: usize, enonce1: &[u8], nonce2len: usize) {
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
                    link = self.links.get(k).map(|l| l.id),
                    enonce1 = %hex::encode(enonce1),
                    upstream_nonce2len = nonce2len,
                    local,
                    miner_nonce2len = nonce2len - local,
                    "new upstream work source"
                );
                if let Some(l) = self.links.get_mut(k) {
                    l.pending = Some(source);
                    l.linked = Some(source);
                }
            }
            Err(e) => error!(error = %e, "cannot add a work source"),
        }
    }

    fn job(&mut self, k: usize, job: &decode::Job, conns: &Connector<Msg>) {
        let Some(l) = self.links.get(k) else {
            return;
        };
        let Some(source) = l.pending.or(l.current) else {
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
        if l.pending == Some(source) {
            self.became_current(k, source, conns);
        }
        conns.broadcast(Msg::Job(job));
    }

    /// Connection `k`'s new subscription has work: its miners move to it, waiting
    /// authorisations are answered, and new miners may be placed on it.
    fn became_current(&mut self, k: usize, source: SourceId, conns: &Connector<Msg>) {
        let Some(l) = self.links.get_mut(k) else {
            return;
        };
        l.pending = None;
        let old = l.current.replace(source);
        let waiting = std::mem::take(&mut l.waiting);
        let role = l.role.clone();
        if let Some(from) = old.filter(|&o| o != source) {
            info!(
                from = from.0,
                to = source.0,
                "moving miners to the new upstream work source"
            );
            self.pool.set_source_joinable(from, false);
            conns.broadcast(Msg::Cmd(ShardCmd::Move { from, to: source }));
        }
        if let Some(max) = self
            .pool
            .upstream_diff(source)
            .and_then(Difficulty::from_f64)
        {
            conns.broadcast(Msg::Cmd(ShardCmd::LimitDiff { source, max }));
        }
        match role {
            Role::User(user) => {
                // Miners reconnected onto it resume their sessions here.
                self.pool.set_source_joinable(source, true);
                if !waiting.is_empty() {
                    info!(user = %user, miners = waiting.len(), "user's upstream ready; authorising its miners");
                }
                for client in waiting {
                    verdict(conns, client, AuthVerdict::Accept(source));
                }
            }
            Role::Main | Role::Recruit => self.choose_open(),
        }
    }

    fn difficulty(&mut self, k: usize, d: f64, conns: &Connector<Msg>) {
        let Some(l) = self.links.get_mut(k) else {
            return;
        };
        let Some(source) = l.pending.or(l.current) else {
            return;
        };
        info!(
            diff = d,
            source = source.0,
            link = l.id,
            "upstream difficulty"
        );
        if let Err(e) = self.pool.set_upstream_diff(source, d) {
            warn!(error = %e, "cannot set the upstream difficulty");
            return;
        }
        l.difficulty = Some(d);
        if k == 0 {
            self.stats().difficulty = Some(d);
        }
        if let Some(max) = Difficulty::from_f64(d) {
            conns.broadcast(Msg::Cmd(ShardCmd::LimitDiff { source, max }));
        }
    }

    /// Handles one event of connection `k`.
    fn event(&mut self, k: usize, ev: UpstreamEvent, conns: &Connector<Msg>) {
        let Some(l) = self.links.get_mut(k) else {
            return;
        };
        let main = l.role == Role::Main;
        match ev {
            UpstreamEvent::Up { index, url } => {
                info!(index, url, link = l.id, "upstream active");
                let old = l.active.replace(index);
                l.state = "active";
                l.url = url;
                // Its subscription follows; until then nothing is submitted.
                l.linked = None;
                if main {
                    if let Some(old) = old
                        && old != index
                    {
                        self.server_state(old, "down");
                    }
                    self.server_state(index, "active");
                    let mut st = self.stats();
                    st.active = Some(index);
                    if st.last_up.replace(index).is_some_and(|last| last != index) {
                        st.failovers += 1;
                    }
                }
            }
            UpstreamEvent::Down { index, reason } => {
                warn!(
                    index,
                    reason,
                    link = l.id,
                    "upstream down; miners stay connected"
                );
                l.state = "down";
                if l.active == Some(index) {
                    l.active = None;
                    l.linked = None;
                    if main {
                        self.stats().active = None;
                    }
                }
                if main {
                    self.server_state(index, "down");
                }
            }
            UpstreamEvent::Failed { index, reason } => {
                warn!(index, reason, link = l.id, "upstream connection failed");
                if l.active.is_none() {
                    l.state = "failed";
                }
                if main {
                    self.server_state(index, "failed");
                }
            }
            UpstreamEvent::Refused { index, reason } => {
                warn!(
                    index,
                    reason,
                    link = l.id,
                    "upstream refused our credentials"
                );
                l.state = "refused";
                if main {
                    self.server_state(index, "refused");
                } else {
                    // A user's own credentials (or a recruit's): this connection is done.
                    l.closing = true;
                    let why: Arc<str> = Arc::from(if reason.is_empty() {
                        "Upstream refused the user".to_owned()
                    } else {
                        reason
                    });
                    for client in std::mem::take(&mut l.waiting) {
                        verdict(conns, client, AuthVerdict::Refuse(Arc::clone(&why)));
                    }
                }
            }
            UpstreamEvent::VersionRolling(mask) => {
                let granted = mask.unwrap_or(0) & self.asked_mask;
                if main {
                    self.stats().version_mask = mask.map(|m| format!("{m:08x}"));
                }
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
                self.subscribed(k, &enonce1, nonce2len);
            }
            UpstreamEvent::Authorised => debug!(link = l.id, "authorised upstream"),
            UpstreamEvent::Job(job) => self.job(k, &job, conns),
            UpstreamEvent::Difficulty(d) => self.difficulty(k, d, conns),
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
            } => info!(
                ?host,
                ?port,
                honoured,
                link = l.id,
                "upstream client.reconnect"
            ),
            UpstreamEvent::Verdict {
                tag,
                accepted,
                reason,
            } => self.verdict(tag, accepted, reason.as_deref()),
        }
    }

    fn verdict(&mut self, tag: u64, accepted: bool, reason: Option<&str>) {
        let Some((id, index, user)) = self.inflight.remove(&tag) else {
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
        let counts = self.links.iter_mut().find(|l| l.id == id).map(|l| {
            match (accepted, lost) {
                (true, _) => l.accepted += 1,
                (false, true) => l.lost += 1,
                (false, false) => l.rejected += 1,
            }
            (l.accepted, l.rejected, l.lost)
        });
        let mut st = self.stats();
        // The connection's figures change with the users' under one lock: a reader sees both.
        if let Some((a, r, l)) = counts
            && let Some(c) = st.connections.iter_mut().find(|c| c.id == id)
        {
            (c.accepted, c.rejected, c.lost) = (a, r, l);
        }
        if let Some(s) = index.and_then(|i| st.servers.get_mut(i)) {
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

    /// A share from the shards for the upstream connection whose work it was made on.
    fn submit(&mut self, share: &UpstreamShare) {
        let source = share.job.source;
        let Some(l) = self
            .links
            .iter()
            .find(|l| l.linked == Some(source) && l.active.is_some())
        else {
            // Work of an earlier subscription is not valid on any connection now.
            debug!(
                source = source.0,
                "share on work no upstream connection takes; not submitted"
            );
            self.stats().dropped += 1;
            return;
        };
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
        let entry = (
            l.id,
            (l.role == Role::Main).then_some(l.active).flatten(),
            Arc::clone(&share.user),
        );
        let id = l.id;
        let _ = tag;
        if let Some(l) = self.links.iter_mut().find(|l| l.id == id) {
            if l.backlog.len() >= BACKLOG_MAX {
                self.dropped_backlog += 1;
                self.stats().dropped += 1;
                return;
            }
            l.backlog.push_back((submit, source, entry));
        }
        self.flush_backlog(id);
    }

    /// Queues what connection `id` holds back, in order, until its link's queue is full. A
    /// share whose work is no longer that connection's (it failed over or its upstream changed
    /// the extranonce) cannot be judged there: dropped and counted, as a share in flight at
    /// the switch.
    fn flush_backlog(&mut self, id: u64) {
        let Some(l) = self.links.iter_mut().find(|l| l.id == id) else {
            return;
        };
        let mut stale = 0;
        while let Some((submit, source, entry)) = l.backlog.pop_front() {
            if l.linked != Some(source) || l.active.is_none() {
                stale += 1;
                continue;
            }
            let tag = submit.tag;
            match l.link.try_submit(submit) {
                Ok(()) => {
                    self.inflight.insert(tag, entry);
                }
                Err(SendError::Full(submit)) => {
                    l.backlog.push_front((submit, source, entry));
                    break;
                }
                Err(SendError::Closed(_)) => stale += 1,
            }
        }
        if stale > 0 {
            debug!(
                connection = id,
                stale, "shares held back for a connection whose work changed; dropped"
            );
            self.stats().dropped += stale;
        }
    }

    /// [`Proxy::flush_backlog`] for every connection holding shares back; whether any still
    /// does.
    fn flush_backlogs(&mut self) -> bool {
        let ids: Vec<u64> = self
            .links
            .iter()
            .filter(|l| !l.backlog.is_empty())
            .map(|l| l.id)
            .collect();
        for id in ids {
            self.flush_backlog(id);
        }
        self.links.iter().any(|l| !l.backlog.is_empty())
    }

    /// Userproxy: a miner's authorisation. The proxy entry's own credentials mine on the
    /// main connection; any other user gets a connection of its own (opened at its first
    /// authorisation, shared by its workers), and the answer waits for its first work.
    fn authorise(&mut self, req: &AuthRequest, conns: &Connector<Msg>) {
        let client = req.client;
        if let Some(e) = self.main_server()
            && user_part(&e.auth) == &*req.user
            && e.pass == *req.pass
        {
            return verdict(conns, client, AuthVerdict::Here);
        }
        let user = &req.user;
        if let Some(l) = self
            .links
            .iter_mut()
            .find(|l| !l.closing && matches!(&l.role, Role::User(u) if u == user))
        {
            match l.current {
                Some(source) if l.linked.is_some() => {
                    verdict(conns, client, AuthVerdict::Accept(source));
                }
                _ => l.waiting.push(client),
            }
            return;
        }
        if self.links.iter().filter(|l| !l.closing).count() >= self.max_links {
            warn!(user = %user, max = self.max_links, "maxupstreams reached: user not given an upstream connection");
            return verdict(
                conns,
                client,
                AuthVerdict::Refuse(Arc::from("Too many upstream connections")),
            );
        }
        if self.servers.is_empty() {
            return;
        }
        let role = Role::User(Arc::clone(user));
        let servers = self.link_servers(&role, Some(&req.pass));
        match self.open_link(role, servers) {
            Some(k) => {
                if let Some(l) = self.links.get_mut(k) {
                    l.waiting.push(client);
                }
            }
            None => verdict(
                conns,
                client,
                AuthVerdict::Refuse(Arc::from("Upstream unavailable")),
            ),
        }
    }

    /// Places new miners on the first main or recruited connection with room (in order), and
    /// recruits another connection when all are nearly full.
    fn choose_open(&mut self) {
        let pool = &self.pool;
        let (open, recruit) = place(
            self.links
                .iter()
                .filter(|l| matches!(l.role, Role::Main | Role::Recruit) && !l.closing)
                .map(|l| {
                    l.current.filter(|_| l.linked.is_some()).map(|source| {
                        let full = pool
                            .enonce1_usage(source)
                            .is_some_and(|(used, space)| nearly_full(used, space));
                        (source, full)
                    })
                }),
        );
        if let Some(source) = open
            && self.open_source.swap(source.0, Ordering::AcqRel) != source.0
        {
            info!(
                source = source.0,
                "new miners go to this upstream work source"
            );
        }
        if !recruit {
            return;
        }
        if self.links.iter().filter(|l| !l.closing).count() >= self.max_links {
            debug!(
                max = self.max_links,
                "every upstream connection is nearly full and maxupstreams is reached"
            );
            return;
        }
        let Some(url) = self
            .links
            .first()
            .and_then(|m| m.active)
            .and_then(|i| self.servers.get(i))
            .map(|s| s.url.clone())
        else {
            return;
        };
        info!(
            url,
            "local extranonce space nearly full: recruiting another upstream connection"
        );
        let servers = self.link_servers(&Role::Recruit, None);
        self.open_link(Role::Recruit, servers);
    }

    /// Periodic work: refuses authorisations whose connection gave no work in time, closes
    /// connections that were refused or have had no miner for [`IDLE_LINK`], places new
    /// miners, and refreshes the stats.
    fn housekeeping(&mut self, now: Instant, conns: &Connector<Msg>) {
        let open = SourceId(self.open_source.load(Ordering::Acquire));
        for l in self.links.iter_mut().skip(1) {
            if l.current.is_none() && now.saturating_duration_since(l.started) >= AUTH_WAIT {
                if !l.waiting.is_empty() {
                    let why: Arc<str> = Arc::from("Upstream did not answer");
                    for client in std::mem::take(&mut l.waiting) {
                        verdict(conns, client, AuthVerdict::Refuse(Arc::clone(&why)));
                    }
                }
                l.closing = true;
            }
            let idle = l.waiting.is_empty()
                && l.current.is_some_and(|s| {
                    s != open
                        && self
                            .pool
                            .enonce1_usage(s)
                            .is_some_and(|(used, _)| used == 0)
                });
            if idle {
                let since = *l.idle_since.get_or_insert(now);
                if now.saturating_duration_since(since) >= IDLE_LINK {
                    info!(
                        link = l.id,
                        role = l.role.name(),
                        "upstream connection has no miner; closing it"
                    );
                    l.closing = true;
                }
            } else {
                l.idle_since = None;
            }
        }
        let mut k = 1;
        while k < self.links.len() {
            if self.links.get(k).is_some_and(|l| l.closing) {
                let l = self.links.remove(k);
                if let Some(s) = l.current {
                    self.pool.set_source_joinable(s, false);
                }
                let id = l.id;
                let before = self.inflight.len();
                self.inflight.retain(|_, (lid, _, _)| *lid != id);
                if before != self.inflight.len() {
                    debug!(
                        link = id,
                        lost = before - self.inflight.len(),
                        "shares in flight on a closed connection"
                    );
                }
                // Dropping it stops its threads without waiting.
                drop(l);
            } else {
                k += 1;
            }
        }
        self.choose_open();
        self.refresh_connections();
    }

    /// Rewrites `connections` in the stats (each event but a verdict, and every
    /// [`MAIN_LOOP_WAKE`]: `miners` changes in the shards without an event here).
    fn refresh_connections(&self) {
        let connections = self
            .links
            .iter()
            .map(|l| ConnStats {
                id: l.id,
                role: l.role.name(),
                user: match &l.role {
                    Role::User(u) => Some(u.to_string()),
                    Role::Main | Role::Recruit => None,
                },
                url: l.url.clone(),
                state: l.state,
                difficulty: l.difficulty,
                accepted: l.accepted,
                rejected: l.rejected,
                lost: l.lost,
                miners: l
                    .current
                    .and_then(|s| self.pool.enonce1_usage(s))
                    .map(|(used, _)| used),
            })
            .collect();
        self.stats().connections = connections;
    }
}

/// Sends the verdict on `client`'s authorisation to the connector thread that owns it.
fn verdict(conns: &Connector<Msg>, client: ClientId, verdict: AuthVerdict) {
    conns.send(
        usize::from(client.conn().thread()),
        Msg::Cmd(ShardCmd::Authorised { client, verdict }),
    );
}

/// Proxy mode. Returns when `shutdown` is set, having stopped everything.
/// `userproxy`: `-u`, each user on an upstream connection of its own.
pub(crate) fn run(settings: &Settings, instance: &Instance, userproxy: bool) -> anyhow::Result<()> {
    let shutdown = &instance.shutdown;
    let cfg = upstream_config(settings);
    let base = cfg.clone();
    if cfg.servers.is_empty() {
        bail!("proxy mode needs a \"proxy\" array in the config (url, auth, pass)");
    }
    let admin_path = settings.admin_socket();
    // -H: the running instance's listeners, then its state: the pool's, and every upstream
    // connection (socket and client state) with the proxy's bookkeeping.
    let incoming = if instance.pending_handover() {
        let incoming = handover::request(&admin_path)?.ok_or_else(|| {
            anyhow::anyhow!(
                "-H: the running instance does not answer on {}",
                admin_path.display()
            )
        })?;
        info!(listeners = ?incoming.addrs, "handover: listeners received");
        let state = incoming.recv_state().and_then(|(blob, fds)| {
            let (pool, st) = ho::split(&blob, userproxy)?;
            if st.links.len() != fds.len() || st.links.first().is_none_or(|l| l.role != "main") {
                bail!("the running instance's upstream connections do not match its state");
            }
            Ok((pool.to_vec(), st, fds))
        });
        match state {
            Ok(state) => Some((incoming, state)),
            Err(e) => {
                incoming.abort(&format!("{e:#}"));
                return Err(e).context("-H: the handover failed; the old instance serves on");
            }
        }
    } else {
        None
    };
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
    let started = Instant::now();
    let (mut links, early, granted) = match &incoming {
        None => {
            let main_servers = cfg.servers.clone();
            let (up_tx, up_rx) = crossbeam_channel::bounded(4096);
            let link = upstream::Pool::start(cfg, up_tx).context("starting the upstream link")?;
            // No miner is accepted before the upstream has given work.
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
            let main = UpLink {
                id: 0,
                role: Role::Main,
                link,
                rx: up_rx,
                servers: main_servers,
                url: String::new(),
                state: "connecting",
                current: None,
                pending: None,
                linked: None,
                active: None,
                difficulty: None,
                accepted: 0,
                rejected: 0,
                lost: 0,
                waiting: Vec::new(),
                backlog: std::collections::VecDeque::new(),
                started,
                idle_since: None,
                closing: false,
            };
            (vec![main], early, granted)
        }
        Some((incoming, (_, st, fds))) => match adopt_links(st, fds, &base, started) {
            Ok(links) => (links, Vec::new(), st.miner_mask),
            Err(e) => {
                incoming.abort(&format!("{e:#}"));
                return Err(e).context("-H: the handover failed; the old instance serves on");
            }
        },
    };

    // The network only matters for address checks, which proxy mode does not make.
    let mut pcfg = settings.pool(Network::Bitcoin)?;
    pcfg.version_mask &= granted;
    if let Some((_, (_, st, _))) = &incoming {
        // The mask the miners were offered stays theirs.
        pcfg.version_mask = st.miner_mask;
    }
    pcfg.external_auth = userproxy.then_some(SHARD_AUTH_WAIT);
    info!(
        version_mask = format_args!("{:08x}", pcfg.version_mask),
        "version bits offered to miners"
    );
    let miner_mask = pcfg.version_mask;
    let seed = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let pool = Pool::new(pcfg, seed, Instant::now());
    if let Some((incoming, (blob, _, _))) = &incoming
        && let Err(e) = pool.import_state(Instant::now(), blob)
    {
        incoming.abort(&format!("the pool state: {e}"));
        for l in links.drain(..) {
            l.link.release();
        }
        return Err(anyhow::Error::from(e))
            .context("-H: the handover failed; the old instance serves on");
    }
    let stats = Arc::new(Mutex::new(UpstreamStats {
        active: None,
        difficulty: None,
        version_mask: None,
        servers,
        users: HashMap::new(),
        dropped: 0,
        connections: Vec::new(),
        failovers: 0,
        last_up: None,
    }));
    let mut proxy = Proxy {
        pool: Arc::clone(&pool),
        open_source: Arc::new(AtomicU16::new(0)),
        links: std::mem::take(&mut links),
        next_link_id: 0,
        servers: base.servers.clone(),
        base,
        max_links: settings.file.maxupstreams,
        dropped_backlog: 0,
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
    if let Some((_, (_, st, _))) = &incoming {
        proxy.restore(st);
    }

    let share_log = if settings.log_shares {
        Some(ShareLog::start(settings, shutdown).context("starting the share log")?)
    } else {
        None
    };
    let (share_tx, share_rx) = crossbeam_channel::bounded::<UpstreamShare>(SHARE_QUEUE);
    let overflow = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let (auth_tx, auth_rx) = crossbeam_channel::bounded::<AuthRequest>(AUTH_QUEUE);
    let sinks = handoff::Sinks {
        blocks: None,
        shares: share_log.as_ref().map(|l| Arc::from(l.sink())),
        upstream: Some(upstream_sink(share_tx, Arc::clone(&overflow))),
        source: Some(Arc::clone(&proxy.open_source)),
        // The loop's own sender keeps the queue open in proxy mode too (a closed queue would
        // wake the select at once, every time).
        auth: userproxy.then(|| auth_sink(auth_tx.clone())),
        nodes: None,
        // Proxy modes read no stats files back at start: nothing would replay a journal.
        journal: None,
    };
    let stats_writer = status::start(
        Arc::clone(&pool),
        settings.logdir().to_owned(),
        settings.statsupdate(),
        started,
        None,
    )
    .context("starting the stats writer")?;

    let handoff = settings.handoff;
    // Passthrough links are not accepted in proxy mode (no `passthroughserver` listener).
    let links = crate::links::LinkConfig {
        allowed: Arc::from(vec![false; settings.connector().listen.len()]),
        nodes: Arc::default(),
        registry: Arc::default(),
    };
    let mut ccfg = settings.connector();
    if let Some((incoming, _)) = &incoming {
        ccfg.listen.clear();
        ccfg.inherited.clone_from(&incoming.listeners);
    }
    let conns = match handoff::start(handoff, ccfg, Arc::clone(&pool), sinks, links) {
        Ok(c) => c,
        Err(e) => {
            if let Some((incoming, _)) = &incoming {
                incoming.abort(&format!("the new instance cannot start its connector: {e}"));
                ho::release_links(&proxy);
            }
            return Err(e).context("starting the connector");
        }
    };
    if let Some((incoming, _)) = incoming {
        let claimed = incoming
            .adopt_all(&conns)
            .and_then(|n| instance.take_over(settings).map(|()| n));
        match claimed {
            Ok(n) => info!(
                miners = n,
                upstreams = proxy.links.len(),
                "handover: took the running instance over"
            ),
            Err(e) => {
                // The upstream connections are the old instance's again: leave them open.
                ho::release_links(&proxy);
                conns.shutdown();
                return Err(e).context("-H: the handover failed; the old instance serves on");
            }
        }
        for l in &proxy.links {
            l.link.resume();
        }
        proxy.refresh_connections();
    }
    // The work that came before the pool existed; the first source becomes current now.
    for ev in early {
        proxy.event(0, ev, &conns);
    }
    let io_backend = conns.backend().to_string();
    for a in conns.local_addrs() {
        info!(addr = %a, threads = settings.threads, io = %io_backend, %handoff, "listening for miners");
    }
    let (gen_link, _updates) = GenLink::new();
    let (handover_tx, handover_rx) = crossbeam_channel::bounded(1);
    let stats_view = Arc::clone(&stats);
    // The admin `upstreams` view, shared by the admin socket and the web server.
    let upstreams_view: crate::web::JsonView = Arc::new(move || {
        let st = stats_view
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        serde_json::to_value(&*st).unwrap_or_default()
    });
    let admin = admin::start(
        &admin_path,
        admin::AdminCtx {
            io: io_backend.clone(),
            handoff: handoff.to_string(),
            pool: Arc::clone(&pool),
            generator: Arc::clone(&gen_link),
            shutdown: Arc::clone(shutdown),
            share_log: share_log.as_ref().map(ShareLog::stats_handle),
            journal: None,
            handover: Some(handover_tx),
            links: Arc::default(),
            upstreams: Some(Arc::clone(&upstreams_view)),
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
    // The read-only HTTP listener (`webserver`), if configured: the pool's views plus the
    // upstream connections.
    let mut web_error = None;
    let web = match settings.webserver() {
        None => None,
        Some(addr) => {
            let ctx = crate::web::WebCtx::Pool(crate::web::PoolCtx {
                pool: Arc::clone(&pool),
                conns: conns.handle(),
                generator: Arc::clone(&gen_link),
                servers: Vec::new(),
                share_log: share_log.as_ref().map(ShareLog::stats_handle),
                gen_stats: None,
                upstreams: Some(Arc::clone(&upstreams_view)),
                links: Arc::default(),
                io: io_backend,
                handoff: handoff.to_string(),
                started,
            });
            match crate::web::start(addr, ctx, Duration::ZERO) {
                Ok(w) => Some(w),
                Err(e) => {
                    error!(addr, error = %e, "cannot bind the webserver");
                    shutdown.store(true, Ordering::Relaxed);
                    web_error =
                        Some(anyhow::Error::from(e).context(format!("binding webserver {addr}")));
                    None
                }
            }
        }
    };

    let mut last_status = Instant::now();
    let mut last_housekeeping = Instant::now();
    let mut reported_overflow = 0;
    let mut reported_backlog_drops = 0;
    let mut last_backlog_warn = Instant::now()
        .checked_sub(Duration::from_secs(5))
        .unwrap_or_else(Instant::now);
    let mut backlogged = false;
    while !shutdown.load(Ordering::Relaxed) {
        let timeout = if backlogged {
            BACKLOG_RETRY
        } else {
            MAIN_LOOP_WAKE
        };
        match wait(&proxy.links, &share_rx, &auth_rx, &handover_rx, timeout) {
            Wake::Handover(stream) => {
                if hand_over(&conns, &mut proxy, &share_rx, userproxy, &stream) {
                    ho::release_links(&proxy);
                    proxy.links.clear();
                    // The pid file and the admin socket are the new instance's now.
                    instance.disown();
                    info!("handed over to the new instance; exiting");
                    break;
                }
            }
            Wake::Share(share) => {
                proxy.submit(&share);
                // Take what else is queued.
                for share in share_rx.try_iter().take(1024) {
                    proxy.submit(&share);
                }
            }
            Wake::Auth(req) => {
                proxy.authorise(&req, &conns);
                proxy.refresh_connections();
            }
            Wake::Event(k, ev) => {
                let verdict = matches!(ev, UpstreamEvent::Verdict { .. });
                proxy.event(k, ev, &conns);
                if !verdict {
                    proxy.refresh_connections();
                }
            }
            Wake::Stopped(0) => {
                error!("upstream link stopped");
                break;
            }
            Wake::Stopped(k) => {
                if let Some(l) = proxy.links.get_mut(k) {
                    l.closing = true;
                }
                // Gone from the select before it fires again.
                last_housekeeping = Instant::now();
                proxy.housekeeping(last_housekeeping, &conns);
            }
            Wake::Timeout => {}
        }
        if last_housekeeping.elapsed() >= MAIN_LOOP_WAKE {
            last_housekeeping = Instant::now();
            proxy.housekeeping(last_housekeeping, &conns);
        }
        backlogged = proxy.flush_backlogs();
        if proxy.dropped_backlog != reported_backlog_drops
            && last_backlog_warn.elapsed() >= Duration::from_secs(5)
        {
            last_backlog_warn = Instant::now();
            warn!(
                dropped = proxy.dropped_backlog - reported_backlog_drops,
                held = BACKLOG_MAX,
                "an upstream connection holds back as many shares as it may; shares dropped"
            );
            reported_backlog_drops = proxy.dropped_backlog;
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
                .connections
                .iter()
                .fold((0, 0), |(a, r), s| (a + s.accepted, r + s.rejected));
            info!(
                clients = s.clients,
                accepted = s.accepted,
                rejected = s.rejected,
                upstream = ?up.active,
                upstream_connections = up.connections.len(),
                upstream_accepted = acc,
                upstream_rejected = rej,
                "status"
            );
        }
    }
    drop(auth_tx);
    shutdown.store(true, Ordering::Relaxed);
    info!("shutting down");
    if let Some(web) = web {
        web.stop();
    }
    conns.shutdown();
    for l in proxy.links.drain(..) {
        l.link.shutdown();
    }
    if let Some(log) = share_log {
        log.stop();
    }
    stats_writer.stop();
    if let Some(a) = admin
        && a.join().is_err()
    {
        error!("the admin thread panicked");
    }
    if let Some(e) = web_error {
        return Err(e);
    }
    info!("shutdown complete");
    Ok(())
}

/// What the main loop woke for.
enum Wake {
    /// A new instance asks for a handover (`-H`).
    Handover(std::os::unix::net::UnixStream),
    Share(UpstreamShare),
    Auth(AuthRequest),
    /// An event of connection `.0`.
    Event(usize, UpstreamEvent),
    /// Connection `.0`'s link stopped.
    Stopped(usize),
    Timeout,
}

/// Waits up to `timeout` for a share, an authorisation or an event of any upstream
/// connection.
fn wait(
    links: &[UpLink],
    shares: &Receiver<UpstreamShare>,
    auths: &Receiver<AuthRequest>,
    handovers: &Receiver<std::os::unix::net::UnixStream>,
    timeout: Duration,
) -> Wake {
    let mut sel = crossbeam_channel::Select::new();
    let i_share = sel.recv(shares);
    let i_auth = sel.recv(auths);
    let i_handover = sel.recv(handovers);
    for l in links {
        sel.recv(&l.rx);
    }
    let Ok(op) = sel.select_timeout(timeout) else {
        return Wake::Timeout;
    };
    let i = op.index();
    if i == i_share {
        return op.recv(shares).map_or(Wake::Timeout, Wake::Share);
    }
    if i == i_auth {
        return op.recv(auths).map_or(Wake::Timeout, Wake::Auth);
    }
    if i == i_handover {
        return op.recv(handovers).map_or(Wake::Timeout, Wake::Handover);
    }
    let k = i - 3;
    match links.get(k) {
        Some(l) => match op.recv(&l.rx) {
            Ok(ev) => Wake::Event(k, ev),
            Err(_) => Wake::Stopped(k),
        },
        None => Wake::Timeout,
    }
}

/// Answers a handover request `ok` and hands over on it (miners, listeners, pool state and
/// every upstream connection); true once committed (false: this instance serves on, with
/// everything it had).
fn hand_over(
    conns: &Connector<Msg>,
    proxy: &mut Proxy,
    shares: &Receiver<UpstreamShare>,
    userproxy: bool,
    stream: &std::os::unix::net::UnixStream,
) -> bool {
    info!("handover requested by a new instance");
    let mut s = stream;
    if let Err(e) = common::admin::write_message(&mut s, b"ok") {
        warn!(error = %e, "handover: cannot answer the new instance");
        return false;
    }
    let give = ho::ProxyGive {
        conns,
        proxy: std::cell::RefCell::new(proxy),
        shares,
        userproxy,
        paused: std::cell::RefCell::new(Vec::new()),
    };
    match handover::give(conns, stream, &give) {
        handover::Outcome::Committed { connections } => {
            info!(
                connections,
                "handover: the new instance has every miner and upstream connection"
            );
            true
        }
        handover::Outcome::Failed(e) => {
            warn!(reason = %format!("{e:#}"), "handover failed; this instance serves on");
            false
        }
    }
}

/// Starts every upstream connection of the old instance's state on its socket (paused until
/// the miners are here), with the bookkeeping it had.
fn adopt_links(
    st: &ho::ProxyState,
    fds: &[std::os::fd::OwnedFd],
    base: &UpstreamConfig,
    now: Instant,
) -> anyhow::Result<Vec<UpLink>> {
    let mut links: Vec<UpLink> = Vec::with_capacity(st.links.len());
    for (l, fd) in st.links.iter().zip(fds) {
        let servers = ho::servers_in(&l.servers);
        let cfg = UpstreamConfig {
            servers: servers.clone(),
            ..base.clone()
        };
        let adopted = fd
            .try_clone()
            .context("duplicating an upstream socket")
            .and_then(|fd| ho::link_handover(l, fd));
        let started = adopted.and_then(|h| {
            let (tx, rx) = crossbeam_channel::bounded(4096);
            upstream::Pool::start_adopted(cfg, tx, h)
                .map(|link| (link, rx))
                .map_err(anyhow::Error::from)
        });
        let (link, rx) = match started {
            Ok(x) => x,
            Err(e) => {
                for l in &links {
                    l.link.release();
                }
                return Err(e).context("starting an upstream connection handed over");
            }
        };
        info!(id = l.id, role = %l.role, url = %l.url, "handover: upstream connection taken over");
        links.push(UpLink {
            id: l.id,
            role: ho::role(l),
            link,
            rx,
            servers,
            url: l.url.clone(),
            state: "active",
            current: ho::source(l.current),
            pending: ho::source(l.pending),
            linked: ho::source(l.linked),
            active: l.active,
            difficulty: l.difficulty,
            accepted: l.accepted,
            rejected: l.rejected,
            lost: l.lost,
            waiting: Vec::new(),
            backlog: std::collections::VecDeque::new(),
            started: now,
            idle_since: None,
            closing: false,
        });
    }
    Ok(links)
}

/// The shards' sink for userproxy authorisations: a bounded queue to the main loop (a full
/// queue leaves the authorisation to time out in its shard).
fn auth_sink(tx: Sender<AuthRequest>) -> Arc<dyn Fn(AuthRequest) + Send + Sync> {
    Arc::new(move |req| {
        if tx.try_send(req).is_err() {
            warn!("authorisation queue full; the miner's authorisation times out");
        }
    })
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
    use super::{SourceId, local_len, nearly_full, place, user_part};

    #[test]
    fn a_connection_is_recruited_only_when_every_one_is_full_and_none_is_coming_up() {
        let (a, b) = (SourceId(1), SourceId(2));
        // The first source with room takes new miners.
        assert_eq!(
            place([Some((a, false)), Some((b, false))]),
            (Some(a), false)
        );
        assert_eq!(place([Some((a, true)), Some((b, false))]), (Some(b), false));
        assert_eq!(place([None, Some((b, false))]), (Some(b), false));
        // All full: another connection.
        assert_eq!(place([Some((a, true)), Some((b, true))]), (None, true));
        // The main connection failing over (no source) beside a full recruit: none (CI once
        // saw a third connection opened here, in the userproxy failover test).
        assert_eq!(place([None, Some((b, true))]), (None, false));
        assert_eq!(place([Some((a, true)), None]), (None, false));
        // Nothing up yet: wait for it.
        assert_eq!(place([None]), (None, false));
        assert_eq!(place(std::iter::empty()), (None, true));
    }

    #[test]
    fn recruiting_threshold_and_user_names() {
        // A 1-byte local part: 256 miners, another connection at 224.
        assert!(!nearly_full(223, 256));
        assert!(nearly_full(224, 256));
        assert!(nearly_full(256, 256));
        // 4 bytes: 7/8 of 2^32.
        assert!(!nearly_full(1 << 20, 1 << 32));
        assert!(nearly_full((1 << 32) - (1 << 29), 1 << 32));
        // The user part of a worker name, as the stratifier takes it.
        assert_eq!(user_part("alice.rig1"), "alice");
        assert_eq!(user_part("bob_2"), "bob");
        assert_eq!(user_part("carol"), "carol");
        assert_eq!(user_part(""), "");
    }

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
