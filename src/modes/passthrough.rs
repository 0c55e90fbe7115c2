//! Passthrough mode (`-P`, or the binary named `ckpassthrough`): miners connect here and every
//! line they send goes to the upstream pool over ONE connection, in ckpool's passthrough framing
//! (`common::stratum::passthrough`, ckpool.md §5.1); lines for them come back on it and are
//! routed by `client_id`.
//!
//! * The connector threads accept miners. Each miner gets a `client_id` (32 bits, as a ckpool
//!   upstream keeps only the low 32) and its lines go to the [`PassthroughLink`] with
//!   `client_id`/`address`/`server` added; when it leaves, the upstream gets `mining.term`.
//! * The link (`generator::upstream`) holds the upstream connection, with failover along the
//!   `proxy` list. Its events come to the router (this mode's main thread) through a bounded
//!   channel; the router looks each `client_id` up in the shared table and sends the line to
//!   the miner's connector thread, one message per thread per round.
//! * From the upstream, `dropclient=N` closes miner `N` if it is one of ours (ids are ours, so
//!   nobody else's miner can be named), and any other raw line is logged and ignored: no
//!   upstream line is ever run as a command (ckpool runs any connector command it gets).
//! * Back-pressure: the link's queue is bounded; a connector thread whose send finds it full
//!   waits (so it stops reading from its miners) for at most [`UPSTREAM_BLOCK`], then drops
//!   that miner. Towards miners, the router stops taking upstream events while a connector
//!   thread has more than [`MAX_INFLIGHT`] bytes from it not yet queued on its sockets, which
//!   in turn stops the link reading from the upstream. Memory stays bounded both ways.
//! * Upstream loss: as ckpool, every miner is dropped (their sessions lived on that upstream),
//!   and miners that connect while no upstream is up are closed at once; the link connects to
//!   the next `proxy` entry by itself and fails back to better ones (a switch drops the
//!   miners of the old upstream too). Replaying miners' sessions onto the new upstream is not
//!   done.
//! * Admin socket (`<sockdir>/listener`): `ping`, `stats` (upstream state, miners, queues,
//!   connector counters), `loglevel=N`, `shutdown`.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use anyhow::Context;
use common::ConnId;
use common::stratum::passthrough::Role;
use connector::{CloseReason, ConnectorHandle, Outbox};
use crossbeam_channel::{Receiver, RecvTimeoutError};
use generator::upstream::{
    MinerLine, PassthroughEvent, PassthroughLink, SendError, UpstreamConfig, UpstreamServer,
};
use serde_json::json;
use tracing::{debug, error, info, warn};

use crate::settings::{ConfigError, Settings};

/// How long a connector thread waits for room in the upstream queue before it drops the miner
/// whose line does not fit.
pub(crate) const UPSTREAM_BLOCK: Duration = Duration::from_secs(2);
/// Bytes routed to one connector thread and not yet queued on its sockets, at most.
pub(crate) const MAX_INFLIGHT: usize = 8 << 20;
/// Upstream events waiting for the router, at most.
const EVENTS: usize = 4096;
/// Events the router handles before it sends what it has.
const ROUND: usize = 1024;

/// Upstream state as the admin socket shows it.
const DOWN: usize = 0;
const UP: usize = 1;

/// What the connector threads and the router share.
struct Shared {
    /// `client_id` → (connector thread, connection).
    table: Mutex<HashMap<u32, (usize, ConnId)>>,
    next_id: AtomicU32,
    /// Per connector thread: bytes routed to it and not yet handed to its outbox.
    inflight: Vec<AtomicUsize>,
    state: AtomicUsize,
    /// Bumped whenever the upstream goes down or is switched: miners opened before that had
    /// their sessions at the old upstream.
    epoch: AtomicU64,
    /// Index of the active upstream (meaningful when up).
    active: AtomicUsize,
    lines_up: AtomicU64,
    lines_down: AtomicU64,
    ignored_commands: AtomicU64,
    dropclients: AtomicU64,
    dropped_slow_upstream: AtomicU64,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u32, (usize, ConnId)>> {
        self.table
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A fresh client id (never 0, never one in use).
    fn alloc(&self, thread: usize, conn: ConnId) -> u32 {
        let mut table = self.lock();
        loop {
            let id = self.next_id.fetch_add(1, Ordering::Relaxed);
            if id != 0 && !table.contains_key(&id) {
                table.insert(id, (thread, conn));
                return id;
            }
        }
    }
}

/// Lines for one connector thread's miners, with their total size.
type Batch = (Vec<(ConnId, Vec<u8>)>, usize);

/// Messages to a connector thread.
#[derive(Clone)]
enum Msg {
    /// Lines for miners of this thread, with their total size.
    Lines(Vec<(ConnId, Vec<u8>)>, usize),
    /// Close this miner (the upstream sent `dropclient`).
    Drop(ConnId),
    /// The upstream went down or was switched: close every miner opened before this epoch.
    DropAll(u64),
}

struct Miner {
    client_id: u32,
    epoch: u64,
    address: Arc<str>,
    server: u64,
}

/// A connector thread's side: its miners and the link.
struct MinerSide {
    thread: usize,
    link: Arc<PassthroughLink>,
    shared: Arc<Shared>,
    miners: HashMap<ConnId, Miner>,
}

impl connector::Handler for MinerSide {
    type Msg = Msg;

    fn on_open(
        &mut self,
        _now: Instant,
        conn: ConnId,
        peer: SocketAddr,
        listener: usize,
        out: &mut Outbox,
    ) {
        if self.shared.state.load(Ordering::Relaxed) != UP {
            debug!(%conn, %peer, "no upstream; miner closed");
            out.close(conn);
            return;
        }
        let client_id = self.shared.alloc(self.thread, conn);
        self.miners.insert(
            conn,
            Miner {
                client_id,
                epoch: self.shared.epoch.load(Ordering::Relaxed),
                address: Arc::from(peer.ip().to_string()),
                server: u64::try_from(listener).unwrap_or(0),
            },
        );
    }

    fn on_line(&mut self, _now: Instant, conn: ConnId, line: &[u8], out: &mut Outbox) {
        let Some(m) = self.miners.get(&conn) else {
            return;
        };
        let mut cmd = MinerLine::Line {
            client_id: u64::from(m.client_id),
            address: Arc::clone(&m.address),
            server: m.server,
            line: line.to_vec(),
        };
        let until = Instant::now() + UPSTREAM_BLOCK;
        loop {
            match self.link.send(cmd) {
                Ok(()) => {
                    self.shared.lines_up.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                Err(SendError::Full(back)) if Instant::now() < until => cmd = back,
                Err(SendError::Full(_)) => {
                    self.shared
                        .dropped_slow_upstream
                        .fetch_add(1, Ordering::Relaxed);
                    warn!(%conn, "upstream not reading; miner dropped");
                    out.close(conn);
                    return;
                }
                Err(SendError::Closed(_)) => {
                    out.close(conn);
                    return;
                }
            }
        }
    }

    fn on_close(&mut self, _now: Instant, conn: ConnId, _reason: CloseReason) {
        let Some(m) = self.miners.remove(&conn) else {
            return;
        };
        self.shared.lock().remove(&m.client_id);
        // Best effort: a full queue or no upstream loses only the notice (the upstream drops the
        // session with the link, or on its own timeout).
        let _ = self.link.try_send(MinerLine::Term {
            client_id: u64::from(m.client_id),
            address: m.address,
            server: m.server,
        });
    }

    fn on_msg(&mut self, _now: Instant, msg: Msg, out: &mut Outbox) {
        match msg {
            Msg::Lines(lines, bytes) => {
                for (conn, line) in lines {
                    if self.miners.contains_key(&conn) {
                        out.send(conn, line);
                    }
                }
                if let Some(f) = self.shared.inflight.get(self.thread) {
                    f.fetch_sub(bytes, Ordering::Relaxed);
                }
            }
            Msg::Drop(conn) => {
                if self.miners.contains_key(&conn) {
                    out.close(conn);
                }
            }
            Msg::DropAll(epoch) => {
                for (conn, m) in &self.miners {
                    if m.epoch < epoch {
                        out.close(*conn);
                    }
                }
            }
        }
    }

    fn on_tick(&mut self, _now: Instant, _out: &mut Outbox) {}
}

/// Runs passthrough mode until `shutdown` is set.
pub(crate) fn run(settings: &Settings, shutdown: &Arc<AtomicBool>) -> anyhow::Result<()> {
    let servers: Vec<UpstreamServer> = settings
        .file
        .proxy
        .iter()
        .map(|p| UpstreamServer::new(p.url.clone(), p.auth.clone(), p.pass.clone()))
        .collect();
    if servers.is_empty() {
        return Err(ConfigError(
            "passthrough mode needs at least one \"proxy\" entry (the upstream pool)".into(),
        )
        .into());
    }
    let urls: Vec<String> = servers.iter().map(|s| s.url.clone()).collect();
    let cfg = UpstreamConfig {
        servers,
        // A ckpool upstream is silent on a link with no miners.
        idle_timeout: None,
        ..UpstreamConfig::default()
    };
    let (ev_tx, ev_rx) = crossbeam_channel::bounded(EVENTS);
    let link = Arc::new(
        PassthroughLink::start(cfg, Role::Passthrough, ev_tx)
            .context("starting the upstream link")?,
    );
    let threads = settings.threads;
    let shared = Arc::new(Shared {
        table: Mutex::new(HashMap::new()),
        next_id: AtomicU32::new(1),
        inflight: (0..threads).map(|_| AtomicUsize::new(0)).collect(),
        state: AtomicUsize::new(DOWN),
        epoch: AtomicU64::new(0),
        active: AtomicUsize::new(0),
        lines_up: AtomicU64::new(0),
        lines_down: AtomicU64::new(0),
        ignored_commands: AtomicU64::new(0),
        dropclients: AtomicU64::new(0),
        dropped_slow_upstream: AtomicU64::new(0),
    });
    let conns = {
        let (link, shared) = (Arc::clone(&link), Arc::clone(&shared));
        connector::start(settings.connector(), move |thread| MinerSide {
            thread,
            link: Arc::clone(&link),
            shared: Arc::clone(&shared),
            miners: HashMap::new(),
        })
        .context("starting the connector")?
    };
    for a in conns.local_addrs() {
        info!(addr = %a, threads, upstreams = ?urls, "passthrough listening for miners");
    }
    let handle = conns.handle();
    let admin = {
        let (shared, link, handle, shutdown) = (
            Arc::clone(&shared),
            Arc::clone(&link),
            handle.clone(),
            Arc::clone(shutdown),
        );
        let urls = urls.clone();
        let stats = move || stats_json(&shared, &link, &handle, &urls);
        start_admin(&settings.admin_socket(), shutdown, stats)
    };
    let admin = match admin {
        Ok(a) => a,
        Err(e) => {
            conns.shutdown();
            return Err(e).context("binding the admin socket");
        }
    };

    route(&ev_rx, &handle, &shared, shutdown, settings.quiet);

    shutdown.store(true, Ordering::Relaxed);
    info!("shutting down");
    conns.shutdown();
    match Arc::try_unwrap(link) {
        Ok(link) => link.shutdown(),
        Err(_) => debug!("upstream link still shared at shutdown; dropped"),
    }
    if admin.join().is_err() {
        error!("the admin thread panicked");
    }
    info!("shutdown complete");
    Ok(())
}

/// The router: upstream events to the connector threads, until `shutdown`.
fn route(
    events: &Receiver<PassthroughEvent>,
    conns: &ConnectorHandle<Msg>,
    shared: &Shared,
    shutdown: &AtomicBool,
    quiet: bool,
) {
    let threads = shared.inflight.len();
    let mut batches: Vec<Batch> = (0..threads).map(|_| (Vec::new(), 0)).collect();
    let mut last_status = Instant::now();
    while !shutdown.load(Ordering::Relaxed) {
        let first = match events.recv_timeout(Duration::from_millis(200)) {
            Ok(ev) => Some(ev),
            Err(RecvTimeoutError::Timeout) => None,
            Err(RecvTimeoutError::Disconnected) => {
                error!("upstream link stopped");
                return;
            }
        };
        if let Some(ev) = first {
            let mut n = 0;
            let mut next = Some(ev);
            while let Some(ev) = next.take() {
                handle_event(ev, conns, shared, &mut batches);
                n += 1;
                if n < ROUND {
                    next = events.try_recv().ok();
                }
            }
            for (t, (lines, bytes)) in batches.iter_mut().enumerate() {
                if lines.is_empty() {
                    continue;
                }
                // Back-pressure towards the upstream: wait while this thread has a lot unsent.
                if let Some(f) = shared.inflight.get(t) {
                    while f.load(Ordering::Relaxed) > MAX_INFLIGHT
                        && !shutdown.load(Ordering::Relaxed)
                    {
                        thread::sleep(Duration::from_millis(1));
                    }
                    f.fetch_add(*bytes, Ordering::Relaxed);
                }
                conns.send(t, Msg::Lines(std::mem::take(lines), std::mem::take(bytes)));
            }
        }
        if !quiet && last_status.elapsed() >= Duration::from_secs(5) {
            last_status = Instant::now();
            info!(
                miners = shared.lock().len(),
                upstream = if shared.state.load(Ordering::Relaxed) == UP {
                    "up"
                } else {
                    "down"
                },
                "status"
            );
        }
    }
}

fn handle_event(
    ev: PassthroughEvent,
    conns: &ConnectorHandle<Msg>,
    shared: &Shared,
    batches: &mut [Batch],
) {
    match ev {
        PassthroughEvent::Client { client_id, line } => {
            let target = u32::try_from(client_id)
                .ok()
                .and_then(|id| shared.lock().get(&id).copied());
            match target.and_then(|(t, conn)| Some((batches.get_mut(t)?, conn))) {
                Some(((lines, bytes), conn)) => {
                    shared.lines_down.fetch_add(1, Ordering::Relaxed);
                    *bytes += line.len();
                    lines.push((conn, line));
                }
                None => debug!(client_id, "line for an unknown miner dropped"),
            }
        }
        PassthroughEvent::Text { ref line } => match ev.dropclient() {
            Some(id) => {
                let target = u32::try_from(id)
                    .ok()
                    .and_then(|id| shared.lock().get(&id).copied());
                match target {
                    Some((t, conn)) => {
                        shared.dropclients.fetch_add(1, Ordering::Relaxed);
                        info!(client_id = id, %conn, "upstream dropped a miner");
                        conns.send(t, Msg::Drop(conn));
                    }
                    None => debug!(
                        client_id = id,
                        "dropclient for a client that is not ours ignored"
                    ),
                }
            }
            None => {
                shared.ignored_commands.fetch_add(1, Ordering::Relaxed);
                let shown =
                    String::from_utf8_lossy(line.get(..line.len().min(80)).unwrap_or_default())
                        .into_owned();
                warn!(line = %shown, "raw line from the upstream ignored (never run as a command)");
            }
        },
        PassthroughEvent::Up { index, url } => {
            // A switch to a better upstream (fail-back) comes without a `Down` for the old one.
            let switched = shared.state.load(Ordering::Relaxed) == UP;
            let epoch = shared.epoch.fetch_add(1, Ordering::Relaxed) + 1;
            shared.active.store(index, Ordering::Relaxed);
            shared.state.store(UP, Ordering::Relaxed);
            if switched {
                warn!(
                    index,
                    url,
                    "upstream switched; dropping the old one's miners (their sessions were there)"
                );
                conns.broadcast(Msg::DropAll(epoch));
            } else {
                info!(index, url, "upstream up");
            }
        }
        PassthroughEvent::Down { index, reason } => {
            shared.state.store(DOWN, Ordering::Relaxed);
            let epoch = shared.epoch.fetch_add(1, Ordering::Relaxed) + 1;
            warn!(
                index,
                reason, "upstream down; dropping every miner (their sessions were there)"
            );
            conns.broadcast(Msg::DropAll(epoch));
        }
        PassthroughEvent::Failed { index, reason } => {
            warn!(index, reason, "upstream connection failed");
        }
        PassthroughEvent::Link { line } => {
            debug!(len = line.len(), "link message from the upstream ignored");
        }
    }
}

fn stats_json(
    shared: &Shared,
    link: &PassthroughLink,
    conns: &ConnectorHandle<Msg>,
    urls: &[String],
) -> serde_json::Value {
    let up = shared.state.load(Ordering::Relaxed) == UP;
    let active = shared.active.load(Ordering::Relaxed);
    let counters = conns.counters();
    json!({
        "mode": "passthrough",
        "upstream": {
            "state": if up { "up" } else { "down" },
            "index": up.then_some(active),
            "url": if up { urls.get(active).cloned() } else { None },
            "queued": link.queued(),
        },
        "miners": shared.lock().len(),
        "connections": counters.iter().map(|c| c.open).sum::<u64>(),
        "accepted": counters.iter().map(|c| c.accepted).sum::<u64>(),
        "lines_up": shared.lines_up.load(Ordering::Relaxed),
        "lines_down": shared.lines_down.load(Ordering::Relaxed),
        "dropclients": shared.dropclients.load(Ordering::Relaxed),
        "ignored_commands": shared.ignored_commands.load(Ordering::Relaxed),
        "dropped_slow_upstream": shared.dropped_slow_upstream.load(Ordering::Relaxed),
        "log_dropped": crate::logging::dropped(),
    })
}

/// The admin socket of this mode, in the pool's framing: `ping`, `stats`, `loglevel=N`,
/// `shutdown`; anything else is `unknown`.
fn start_admin(
    path: &Path,
    shutdown: Arc<AtomicBool>,
    stats: impl Fn() -> serde_json::Value + Send + 'static,
) -> io::Result<JoinHandle<()>> {
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path)?;
    listener.set_nonblocking(true)?;
    thread::Builder::new().name("admin".into()).spawn(move || {
        while !shutdown.load(Ordering::Relaxed) {
            match listener.accept() {
                Ok((stream, _)) => {
                    if let Err(e) = serve_admin(stream, &shutdown, &stats) {
                        debug!(error = %e, "admin request failed");
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    thread::sleep(Duration::from_millis(50));
                }
                Err(e) => {
                    warn!(error = %e, "admin accept failed");
                    thread::sleep(Duration::from_millis(200));
                }
            }
        }
    })
}

fn serve_admin(
    mut stream: UnixStream,
    shutdown: &AtomicBool,
    stats: &impl Fn() -> serde_json::Value,
) -> io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.set_write_timeout(Some(Duration::from_secs(5)))?;
    let Some(msg) = common::admin::read_message(&mut stream)? else {
        return Ok(());
    };
    let cmd = String::from_utf8_lossy(&msg);
    let cmd = cmd.trim();
    let reply = match cmd {
        "ping" => b"pong".to_vec(),
        "stats" | "connectorstats" => stats().to_string().into_bytes(),
        _ if cmd.starts_with("loglevel=") => {
            crate::admin::loglevel(cmd.trim_start_matches("loglevel="))
        }
        "shutdown" => {
            shutdown.store(true, Ordering::Relaxed);
            b"exiting".to_vec()
        }
        _ => b"unknown".to_vec(),
    };
    common::admin::write_message(&mut stream, &reply)
}
