//! The admin unix socket (`<sockdir>/listener`), framed as ckpool's (see `common::admin`).
//!
//! Commands: `ping` → `pong`; `stats` → JSON statistics; `update` → asks the generator for a new
//! template (what the notifier sends); `loglevel=N` → `success` (sets the log level as `-l N`
//! does and reopens the log file), `Invalid` or `Failed`, as ckpool's; `shutdown` → `exiting`;
//! `restart` → `restarting <pid>` (starts this binary again with `-H`, which takes this instance
//! over: see `crate::handover`) or `failed: <reason>`; `handover <version>` → a new instance's
//! request, answered `refused: <reason>` here or `ok` by the main loop, which then hands over on
//! the same connection; ckpool's client commands and the JSON queries (`accept`, `reject`,
//! `reconnect`, `dropclient`, `clients`, `users`...: see [`clients`]); anything else → `unknown`.
//!
//! Beside `listener`, the `stratifier`, `connector` and `generator` sockets answer the commands
//! ckpool's processes of those names do ([`Role::map`]); every socket gets mode 0770 and its
//! directory's group (`-g`).
//!
//! The admin thread never holds the generator: the daemon must own it alone to shut it down
//! (which submits the blocks still queued). It reaches it through a [`GenLink`] instead.

use std::collections::BTreeMap;
use std::io;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use connector::ConnectorHandle;

use crate::handoff::Msg;

mod clients;

use crossbeam_channel::{Receiver, Sender};
use tracing::{debug, warn};

/// How long one admin client may take to send its request.
const READ_TIMEOUT: Duration = Duration::from_secs(2);
/// How long one admin client may take to read its reply.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// How often the accept loop looks at the shutdown flag.
const ACCEPT_POLL: Duration = Duration::from_millis(50);

/// What the admin socket needs of the generator, without holding it: the active server as the
/// daemon's main loop last read it, and a request for a fresh template that the main loop passes
/// on ([`GenLink::updates`]).
#[derive(Debug)]
pub(crate) struct GenLink {
    /// Index of the active server, [`GenLink::NONE`] when none is up.
    active: AtomicUsize,
    /// Update requests; bounded to one, so a burst of requests coalesces.
    update_tx: Sender<()>,
}

impl GenLink {
    const NONE: usize = usize::MAX;

    /// A link and the receiver of its update requests (for the main loop).
    pub(crate) fn new() -> (Arc<Self>, Receiver<()>) {
        let (update_tx, update_rx) = crossbeam_channel::bounded(1);
        let link = Self {
            active: AtomicUsize::new(Self::NONE),
            update_tx,
        };
        (Arc::new(link), update_rx)
    }

    /// Records the generator's active server (the main loop calls this).
    pub(crate) fn set_active(&self, active: Option<usize>) {
        self.active
            .store(active.unwrap_or(Self::NONE), Ordering::Relaxed);
    }

    /// The active server, as last recorded.
    pub(crate) fn active(&self) -> Option<usize> {
        let a = self.active.load(Ordering::Relaxed);
        (a != Self::NONE).then_some(a)
    }

    /// Asks the main loop to ask the generator for a fresh template. Never blocks.
    pub(crate) fn request_update(&self) {
        // Full: a request is already pending, which is as good.
        let _ = self.update_tx.try_send(());
    }
}

/// What the admin socket can reach.
pub(crate) struct AdminCtx {
    pub(crate) io: String,
    /// How connector threads hand events to the stratifier (`inline` or `queue`).
    pub(crate) handoff: String,
    pub(crate) pool: Arc<stratifier::Pool>,
    pub(crate) generator: Arc<GenLink>,
    /// Set by `shutdown` (and by the signal handlers); the admin thread exits once it is set.
    pub(crate) shutdown: Arc<AtomicBool>,
    /// The share log's counters (`-L`), shown as `sharelog` in `stats`.
    pub(crate) share_log: Option<crate::sharelog::StatsHandle>,
    /// The share journal (pool and solo modes), shown as `journal` in `stats`.
    pub(crate) journal: Option<Arc<crate::journal::Journal>>,
    /// Where a `handover` request's connection goes (to the main loop; bounded to one);
    /// `None` in the modes that cannot hand over yet (`restart` and `handover` are refused).
    pub(crate) handover: Option<Sender<UnixStream>>,
    /// The passthrough links open now, shown as `passthroughs` in `stats`.
    pub(crate) links: Arc<crate::links::LinkRegistry>,
    /// Proxy modes: the upstream links' state, shown as `upstreams` in `stats`.
    pub(crate) upstreams: Option<Arc<dyn Fn() -> serde_json::Value + Send + Sync>>,
    /// The connector threads, for ckpool's client commands (`accept`, `reject`, `dropclient`,
    /// `reconnect`, `clients`...) and `connectorstats`; `None` where the mode has none of them
    /// (those commands answer `unknown`).
    pub(crate) conns: Option<ConnectorHandle<Msg>>,
}

/// ckpool's sockets in `<sockdir>`: `listener` (every command) and the `stratifier`,
/// `connector` and `generator` ones, each answering the commands ckpool's process of that name
/// does ([`Role::map`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Role {
    Listener,
    Stratifier,
    Connector,
    Generator,
}

/// The sockets besides `listener`, by file name.
pub(crate) const OTHER_SOCKETS: [&str; 3] = ["stratifier", "connector", "generator"];

impl Role {
    /// What a request on this socket runs: the listener's command and whether a reply goes
    /// back (ckpool's stratifier, connector and generator answer few of their commands), or
    /// `None` for `unknown`.
    fn map(self, cmd: &str) -> Option<(&str, bool)> {
        let prefixed = |p: &[&str]| p.iter().any(|p| cmd.starts_with(p));
        match self {
            Self::Listener => Some((cmd, true)),
            _ if cmd == "ping" => Some((cmd, true)),
            _ if cmd.starts_with("loglevel=") => Some((cmd, false)),
            Self::Stratifier => match cmd {
                "stats" => Some(("stratifierstats", true)),
                "update" | "resetshares" | "dropall" => Some((cmd, false)),
                _ if cmd == "reconnect"
                    || prefixed(&["reconnect:", "dropclient=", "reconnclient="]) =>
                {
                    Some((cmd, false))
                }
                "clients" | "users" | "workers" | "poolstats" | "uptime" => Some((cmd, true)),
                _ if prefixed(&[
                    "getclient",
                    "getuser",
                    "getworker",
                    "userclients",
                    "workerclients",
                ]) =>
                {
                    Some((cmd, true))
                }
                _ => None,
            },
            Self::Connector => match cmd {
                "stats" => Some(("connectorstats", true)),
                "accept" | "reject" => Some((cmd, false)),
                _ if cmd.starts_with("dropclient=") => Some((cmd, false)),
                _ => None,
            },
            Self::Generator => None,
        }
    }
}

/// Binds the sockets and serves them on their own thread, which returns once `ctx.shutdown` is
/// set. `path` is the `listener` socket; the others go beside it (one that cannot be bound is
/// logged and left out).
pub(crate) fn start(path: &Path, ctx: AdminCtx) -> io::Result<thread::JoinHandle<()>> {
    let mut sockets = vec![(bind(path)?, Role::Listener)];
    let others = [Role::Stratifier, Role::Connector, Role::Generator];
    for (name, role) in OTHER_SOCKETS.into_iter().zip(others) {
        let p = path.with_file_name(name);
        match bind(&p) {
            Ok(l) => sockets.push((l, role)),
            Err(e) => warn!(path = %p.display(), error = %e, "cannot bind an admin socket"),
        }
    }
    let started = Instant::now();
    thread::Builder::new().name("admin".into()).spawn(move || {
        while !ctx.shutdown.load(Ordering::Relaxed) {
            let mut idle = true;
            for (listener, role) in &sockets {
                match listener.accept() {
                    Ok((stream, _)) => {
                        idle = false;
                        debug!(socket = ?role, "admin client connected");
                        if let Err(e) = serve(stream, &ctx, started, *role) {
                            debug!(error = %e, "admin request failed");
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => {
                        warn!(error = %e, "admin accept failed");
                        thread::sleep(Duration::from_millis(200));
                    }
                }
            }
            if idle {
                thread::sleep(ACCEPT_POLL);
            }
        }
        debug!("admin thread stopped");
    })
}

fn bind(path: &Path) -> io::Result<UnixListener> {
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path)?;
    listener.set_nonblocking(true)?;
    restrict(path);
    Ok(listener)
}

/// Gives the socket ckpool's mode (0770) and its directory's group (the `-g` group when given,
/// see `crate::instance`). Failing that is logged: the directory's own mode still guards it.
fn restrict(path: &Path) {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    if let Err(e) = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o770)) {
        warn!(path = %path.display(), error = %e, "cannot set the admin socket's mode");
    }
    let gid = path
        .parent()
        .and_then(|d| std::fs::metadata(d).ok())
        .map(|m| m.gid());
    if let Err(e) = std::os::unix::fs::chown(path, None, gid) {
        warn!(path = %path.display(), error = %e, "cannot set the admin socket's group");
    }
}

/// Users listed in an admin `stats` reply (the busiest, by 1-minute hashrate); `users_total`
/// counts them all.
const STATS_MAX_USERS: usize = 1_000;
/// Workers listed for each user in an admin `stats` reply (the busiest); the user's
/// `workers_total` counts them all. A farm user with 100,000 workers made a 30 MB reply that
/// did not come back in time under load.
const STATS_MAX_WORKERS: usize = 1_000;

/// Keeps each user's `max` busiest workers (by 1-minute hashrate, then accepted difficulty,
/// then name); returns every user's worker count before.
fn busiest_workers(
    users: &mut BTreeMap<String, stratifier::UserStats>,
    max: usize,
) -> Vec<(String, usize)> {
    users
        .iter_mut()
        .map(|(name, u)| {
            let total = u.workers.len();
            if total > max {
                let mut ranked: Vec<_> = std::mem::take(&mut u.workers).into_iter().collect();
                ranked.sort_by(|(an, a), (bn, b)| {
                    b.hashrate
                        .hashrate1m
                        .total_cmp(&a.hashrate.hashrate1m)
                        .then(b.accepted_diff.total_cmp(&a.accepted_diff))
                        .then(an.cmp(bn))
                });
                ranked.truncate(max);
                u.workers = ranked.into_iter().collect();
            }
            (name.clone(), total)
        })
        .collect()
}

fn serve(mut stream: UnixStream, ctx: &AdminCtx, started: Instant, role: Role) -> io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(READ_TIMEOUT))?;
    stream.set_write_timeout(Some(WRITE_TIMEOUT))?;
    let Some(msg) = common::admin::read_message(&mut stream)? else {
        return Ok(());
    };
    let cmd = String::from_utf8_lossy(&msg);
    let Some((cmd, answer)) = role.map(cmd.trim()) else {
        return common::admin::write_message(&mut stream, b"unknown");
    };
    let reply: Vec<u8> = match cmd {
        "ping" => b"pong".to_vec(),
        "stats" | "stratifierstats" => {
            // Bounded: the busiest users only, with the total count, so a pool with a million
            // throw-away names still answers in a small reply.
            let registry = ctx.pool.registry();
            let mut snap = registry.snapshot_top(STATS_MAX_USERS);
            let totals = busiest_workers(&mut snap.users, STATS_MAX_WORKERS);
            let mut stats = serde_json::to_value(snap).unwrap_or_default();
            if let Some(users) = stats.get_mut("users").and_then(|u| u.as_object_mut()) {
                for (name, total) in totals {
                    if let Some(u) = users.get_mut(&name).and_then(|u| u.as_object_mut()) {
                        u.insert("workers_total".into(), total.into());
                    }
                }
            }
            if let Some(obj) = stats.as_object_mut() {
                obj.insert("users_total".into(), registry.users().into());
                obj.insert("server".into(), ctx.generator.active().into());
                obj.insert("io".into(), ctx.io.clone().into());
                obj.insert("handoff".into(), ctx.handoff.clone().into());
                obj.insert("passthroughs".into(), ctx.links.snapshot());
                obj.insert("log_dropped".into(), crate::logging::dropped().into());
                obj.insert(
                    "log_write_errors".into(),
                    crate::logging::write_errors().into(),
                );
                if let Some(up) = &ctx.upstreams {
                    obj.insert("upstreams".into(), up());
                }
                if let Some(log) = &ctx.share_log {
                    obj.insert(
                        "sharelog".into(),
                        serde_json::to_value(log.snapshot()).unwrap_or_default(),
                    );
                }
                if let Some(j) = &ctx.journal {
                    let (lines, errors) = j.counts();
                    obj.insert(
                        "journal".into(),
                        serde_json::json!({"lines": lines, "write_errors": errors}),
                    );
                }
            }
            stats.to_string().into_bytes()
        }
        "update" => {
            ctx.generator.request_update();
            b"updating".to_vec()
        }
        _ if cmd.starts_with("loglevel=") => loglevel(cmd.trim_start_matches("loglevel=")),
        "shutdown" => {
            ctx.shutdown.store(true, Ordering::Relaxed);
            b"exiting".to_vec()
        }
        "restart" | "handover" if ctx.handover.is_none() => {
            b"refused: this mode cannot hand over yet".to_vec()
        }
        _ if cmd.starts_with("handover ") && ctx.handover.is_none() => {
            warn!("handover request refused: this mode cannot hand over yet");
            b"refused: this mode cannot hand over yet".to_vec()
        }
        "restart" => match crate::handover::restart() {
            Ok(pid) => format!("restarting {pid}").into_bytes(),
            Err(e) => format!("failed: {e}").into_bytes(),
        },
        _ if cmd.starts_with("handover ") => {
            let refusal = crate::handover::version_refusal(cmd.trim_start_matches("handover "));
            let Some(refusal) = refusal else {
                let busy = "refused: a handover is already under way";
                return match ctx.handover.as_ref().map(|h| h.try_send(stream)) {
                    Some(Ok(())) => Ok(()),
                    Some(Err(e)) => {
                        common::admin::write_message(&mut e.into_inner(), busy.as_bytes())
                    }
                    None => Ok(()),
                };
            };
            warn!(%refusal, "handover request refused");
            refusal.into_bytes()
        }
        _ => match clients::command(cmd, ctx, started) {
            clients::Reply::Text(text) => text,
            // ckpool's stratifier commands that close with no reply.
            clients::Reply::None => return Ok(()),
            clients::Reply::Unknown => b"unknown".to_vec(),
        },
    };
    if !answer {
        return Ok(());
    }
    common::admin::write_message(&mut stream, &reply)
}

/// `loglevel=N`: ckpool's replies.
pub(crate) fn loglevel(arg: &str) -> Vec<u8> {
    match arg.trim().parse::<u8>() {
        Ok(level) if level <= 7 => {
            if crate::logging::set_level(level) {
                crate::logging::reopen();
                b"success".to_vec()
            } else {
                b"Failed".to_vec()
            }
        }
        _ => b"Invalid".to_vec(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_lists_each_users_busiest_workers_and_counts_them_all() {
        let mut users = BTreeMap::new();
        let mut u = stratifier::UserStats::default();
        for (i, rate) in [3.0, 9.0, 1.0, 7.0, 5.0].into_iter().enumerate() {
            let mut w = stratifier::WorkerStats::default();
            w.hashrate.hashrate1m = rate;
            u.workers.insert(format!("u.{i}"), w);
        }
        users.insert("u".to_owned(), u);
        users.insert("small".to_owned(), stratifier::UserStats::default());
        let totals = busiest_workers(&mut users, 2);
        assert_eq!(totals, [("small".to_owned(), 0), ("u".to_owned(), 5)]);
        let kept: Vec<&String> = users["u"].workers.keys().collect();
        assert_eq!(kept, ["u.1", "u.3"]);
    }

    #[test]
    fn gen_link_records_the_active_server_and_coalesces_updates() {
        let (link, updates) = GenLink::new();
        assert_eq!(link.active(), None);
        link.set_active(Some(1));
        assert_eq!(link.active(), Some(1));
        link.set_active(None);
        assert_eq!(link.active(), None);
        link.request_update();
        link.request_update();
        assert_eq!(updates.try_iter().count(), 1);
        link.request_update();
        assert!(updates.try_recv().is_ok());
    }
}
