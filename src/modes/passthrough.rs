//! Passthrough mode (`-P`, or the binary named `ckpassthrough`): miners connect here and every
//! line they send goes to the upstream pool over ONE connection, in ckpool's passthrough framing
//! (`common::stratum::passthrough`, ckpool.md §5.1); lines for them come back on it and are
//! routed by `client_id`.
//!
//! * The connector threads accept miners. Each miner gets a `client_id` (32 bits, as a ckpool
//!   upstream keeps only the low 32) and its lines go to the [`PassthroughLink`] with
//!   `client_id`/`address`/`server` added; when it leaves, the upstream gets `mining.term`.
//!   Passthrough and redirector modes: each connector thread frames its miners' lines itself
//!   and writes them to the upstream socket at the end of its round
//!   ([`PassthroughLink::write`], a non-blocking write under the link's writer lock; what the
//!   socket does not take is left to the link's engine thread). Node mode queues each line for
//!   the engine.
//! * The link (`generator::upstream`) holds the upstream connection, with failover along the
//!   `proxy` list: its threads connect and do the handshake. Passthrough and redirector modes
//!   (an owned link, [`PassthroughLink::start_owned`]): once a connection is ready, the link
//!   stops its reader thread at a line boundary and hands the socket over; the router adopts it
//!   on connector thread 0 as a connection of its own (marked as the link: [`MinerSide::links`],
//!   a trunk, whose lines may be up to 16 MiB). That thread reads the upstream's lines: those
//!   for its own miners are queued on their sockets at the end of the round that read them (no
//!   hop; counted in `stats` as `link_routed_in_place`), those for other threads' miners go one
//!   message per thread per round (`link_routed_by_message`); `dropclient` closes its miner
//!   after the lines before it. With one connector thread (`"threads": 1`) a share's whole path
//!   is on that thread: read the miner, write upstream, read the verdict, write the miner.
//!   Writes: the connector never writes to the link's connection; every byte up goes through
//!   the link's writer lock ([`PassthroughLink::write`]; what the socket does not take, the
//!   link's engine writes, with later writers queueing behind it under the same lock), so lines
//!   never interleave and each thread's lines keep their order. Link loss: the connection's
//!   close reaches [`PassthroughLink::lost`] and the link fails over (its `Down`, then `Up` and
//!   the replay, come as events); when the link itself drops a connection (a write error, a
//!   fail-back) it shuts the socket down and the connector sees it close. Lines of an old
//!   connection still in its socket after a fail-back's `Up` may reach miners after their
//!   replay (verdicts for shares sent there: forwarded as they come). The link's other events
//!   (up, down, failures, lines read during the handshake) come to the router (this mode's
//!   main thread) through a bounded channel, which routes them one message per thread per
//!   round. Node mode keeps the link's reader thread with every line on the router (a node's
//!   `workinfo` must be handled before the notifies after it reach miners).
//! * Fan-out: a connector thread queues at most [`FANOUT_ROUND`] notifications from the
//!   upstream (`"method"` lines: jobs, difficulties) on its miners' sockets a round of its loop
//!   ([`FanBudget`]); the rest wait in [`MinerSide::later`], in order, for the next rounds, so a
//!   job for 14,000 miners does
//!   not hold the thread (and the shares and verdicts behind it) for its whole length. Replies
//!   are never held: a verdict read meanwhile overtakes the notifications still waiting (a
//!   stratum miner takes a reply whatever came before it; notifications keep their order). A
//!   drop, a replay, a handover's settling and the handed-in lines' release queue everything
//!   waiting first; past [`MAX_LATER`] waiting, everything is queued at once.
//! * From the upstream, `dropclient=N` closes miner `N` if it is one of ours (ids are ours, so
//!   nobody else's miner can be named), and any other raw line is logged and ignored: no
//!   upstream line is ever run as a command (ckpool runs any connector command it gets).
//! * Back-pressure: the link's queue is bounded, and so are the bytes a connector thread's
//!   direct writes may leave to the link's engine (1 MiB beyond the socket's buffer); a
//!   connector thread whose send or write finds no room waits (so it stops reading from its
//!   miners) for at most [`UPSTREAM_BLOCK`], then drops that miner (with direct writes: the
//!   miners whose lines that round's write held). Towards miners, the thread reading the link
//!   (and the router) waits while another connector thread has more than [`MAX_INFLIGHT`]
//!   bytes from it not yet queued on its sockets, which stops reading from the upstream; lines
//!   queued in place are bounded by each miner's outbound cap. Memory stays bounded both
//!   ways.
//! * Upstream loss (ckpool drops every miner; we keep them, see [`Handshake`]): each miner's
//!   last `mining.configure`, `mining.subscribe`, `mining.authorize` (and whether it sent
//!   `mining.extranonce.subscribe`) are kept, at most [`MAX_KEPT_LINE`] bytes each, with the
//!   session id and extranonce its subscribe reply gave. When the link comes up on another
//!   `proxy` entry (failover, or fail-back to a better one) every live miner is replayed
//!   there: configure, subscribe with its session id as `params[1]` (to resume), authorize,
//!   extranonce.subscribe, with ids of our own whose replies the passthrough consumes. If the
//!   new subscribe reply gives another extranonce1 or extranonce2 size, the miner gets
//!   `mining.set_extranonce` when it subscribed to it, else `client.reconnect`. A miner that
//!   was mid-handshake (a subscribe or authorize unanswered) when the upstream went, or whose
//!   replayed subscribe/authorize is refused, is closed (it reconnects). The replay happens
//!   on the miner's connector thread when the router tells it the link is up, or earlier if
//!   the miner sends a line first, so its lines never reach the new upstream before its
//!   session does. While no upstream is up, a miner's request with an id is answered with
//!   the stratum error `[20,"Upstream down",null]` (submits with `"result":false`) and other
//!   lines are dropped: nothing is buffered. Miners that connect while no upstream is up are
//!   closed at once, as ckpool.
//! * Admin socket (`<sockdir>/listener`): `ping`, `stats` (upstream state, miners, queues,
//!   connector counters), `loglevel=N`, `shutdown`, `restart` and `handover <version>`
//!   (below).
//! * Handover (`-H`, also in node and redirector mode; `crate::handover` has the protocol): the old
//!   instance quiesces its connector, pauses the upstream link (every queued miner line
//!   written, every line read routed and queued to its miner, reading stopped at a line
//!   boundary), and sends, as its state, the link's socket (a duplicate, `SCM_RIGHTS`) with the
//!   `proxy` entry it is on, the bytes read of the next line and the `client_id` counter (an
//!   owned link's connection is quiesced and exported with the miners instead, the bytes read
//!   of its next line with it, marked as the link; the new instance adopts it as its link and
//!   holds what it reads until every miner is there, [`Msg::LinkGo`]);
//!   each miner goes with its `client_id`, address, server and kept handshake
//!   ([`MinerSide::on_export`]). The new instance starts the link on that socket, active and
//!   paused (no handshake, no `Up`, no replay), adopts the miners, and only then reads from
//!   the upstream: the upstream pool sees the same connection, no `mining.term` and no new
//!   handshake, and replies to lines sent before the switch reach their miners. If the
//!   handover fails half way the old instance takes back the miners not acked and reads from
//!   the link again.
//! * `webserver`: `/metrics` and `/api/upstreams` made of the same `stats` (see `crate::web`).

use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow};
use common::ConnId;
use common::stratum::passthrough::Role;
use connector::{CloseReason, ConnState, Connector, ConnectorHandle, Outbox, SendBuf};
use crossbeam_channel::{Receiver, Sender};
use generator::upstream::{
    LinkHandover, LinkOwner, MinerLine, OwnedLink, PassthroughEvent, PassthroughLink, SendError,
    UpstreamConfig, UpstreamServer, WriteError,
};
use serde_json::json;
use tracing::{debug, error, info, warn};

use super::node::Node;
use crate::handover;
use crate::instance::Instance;
use crate::settings::{ConfigError, Settings};

/// How long a connector thread waits for room in the upstream queue before it drops the miner
/// whose line does not fit.
pub(crate) const UPSTREAM_BLOCK: Duration = Duration::from_secs(2);
/// Bytes routed to one connector thread and not yet queued on its sockets, at most.
pub(crate) const MAX_INFLIGHT: usize = 8 << 20;
/// A kept handshake line longer than this is not kept (the miner cannot be replayed and is
/// closed on failover).
pub(crate) const MAX_KEPT_LINE: usize = 4096;
/// Notifications from the upstream queued on miners' sockets by one connector thread in one round,
/// at most (see [`MinerSide::later`]): a job's fan-out to many miners is written over several
/// rounds, so that the thread reads its miners' shares and the upstream's verdicts in between.
/// On a busy host, where the thread gets a tenth of a CPU, 1,024 a round held shares for
/// 60-70 ms, 64 a round left 10-18 ms between two polls of the miners' sockets; 16 did not
/// cost CPU per share that the fleet could see (BENCHMARKS G10).
const FANOUT_ROUND: usize = 16;
/// Notifications waiting for a later round ([`MinerSide::later`]), at most: past it they are all
/// queued at once (an upstream sending faster than they can be written is not held in memory).
const MAX_LATER: usize = 1 << 18;
/// Unanswered handshake requests tracked per miner, at most.
const MAX_AWAITING: usize = 4;
/// How long after a replay its replies are looked for.
const REPLAY_WINDOW: Duration = Duration::from_secs(60);
/// Ids of replayed requests start with this (a miner never sees them).
const REPLAY_ID: &str = "ckrs.replay.";
/// Upstream events waiting for the router, at most.
const EVENTS: usize = 4096;
/// Events the router handles before it sends what it has.
const ROUND: usize = 1024;
/// A connector thread writes its miners' lines to the upstream at the end of each round, or
/// once it has this many bytes of them.
const UP_FLUSH: usize = 64 << 10;

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
    /// Multicast lines from the upstream (each counted in `lines_down` once per miner).
    multicasts: AtomicU64,
    ignored_commands: AtomicU64,
    dropclients: AtomicU64,
    dropped_slow_upstream: AtomicU64,
    /// Miners re-established on a new upstream.
    replayed: AtomicU64,
    /// Miners closed because they could not be re-established.
    replay_closed: AtomicU64,
    /// Miner lines that came while no upstream was up (answered with an error or dropped).
    rejected_down: AtomicU64,
    /// Lines from the upstream queued on their miner's socket by the connector thread that read
    /// them (no hop), and lines handed to another connector thread in a message.
    routed_in_place: AtomicU64,
    routed_by_message: AtomicU64,
    /// Upstream link connections held by the connector (an owned link), not miners.
    link_conns: AtomicUsize,
    /// The owned link's connection came with a handover, as connection `N - 1` (0: it did
    /// not).
    link_adopted: AtomicU64,
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
type Batch = (Vec<(ConnId, SendBuf)>, usize);

/// Messages to a connector thread.
#[derive(Clone)]
enum Msg {
    /// Lines for miners of this thread, with their total size (a multicast line is one
    /// shared buffer for each of its miners).
    Lines(Vec<(ConnId, SendBuf)>, usize),
    /// Close this miner (the upstream sent `dropclient`).
    Drop(ConnId),
    /// The link is up on a (new) upstream since this epoch: replay every miner older than it.
    Replay(u64),
    /// A handover settles: answer once every message before this one is handled.
    Sync(Sender<()>),
    /// Every handed-over miner is here: the link's lines held meanwhile may be routed.
    LinkGo,
    /// Wakes the thread to go on with notifications left for later ([`MinerSide::later`]).
    More,
}

struct Miner {
    client_id: u32,
    /// The upstream epoch its session lives in (older than the current one: replay it).
    epoch: u64,
    address: Arc<str>,
    server: u64,
    /// What a replay needs; `None` until it sends a handshake line.
    hs: Option<Box<Handshake>>,
}

/// Which handshake request a line is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Configure,
    Subscribe,
    Authorize,
    ExtranonceSubscribe,
}

impl Kind {
    /// The kind of a miner's line, from a cheap look at its bytes (submits match none).
    fn of(line: &[u8]) -> Option<Self> {
        if find(line, b"\"mining.submit\"") {
            return None;
        }
        [
            (
                b"\"mining.extranonce.subscribe\"".as_slice(),
                Self::ExtranonceSubscribe,
            ),
            (b"\"mining.subscribe\"", Self::Subscribe),
            (b"\"mining.authorize\"", Self::Authorize),
            (b"\"mining.configure\"", Self::Configure),
        ]
        .into_iter()
        .find(|(pat, _)| find(line, pat))
        .map(|(_, k)| k)
    }

    fn tag(self) -> &'static str {
        match self {
            Self::Configure => "configure",
            Self::Subscribe => "subscribe",
            Self::Authorize => "authorize",
            Self::ExtranonceSubscribe => "xsubscribe",
        }
    }

    fn from_tag(tag: &str) -> Option<Self> {
        [
            Self::Configure,
            Self::Subscribe,
            Self::Authorize,
            Self::ExtranonceSubscribe,
        ]
        .into_iter()
        .find(|k| k.tag() == tag)
    }
}

fn find(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// A miner's handshake, kept to replay it on another upstream. Bounded: one line of each kind
/// (the last), each at most [`MAX_KEPT_LINE`] bytes, and at most [`MAX_AWAITING`] ids.
#[derive(Default)]
struct Handshake {
    configure: Option<serde_json::Value>,
    subscribe: Option<serde_json::Value>,
    authorize: Option<serde_json::Value>,
    /// It sent `mining.extranonce.subscribe`.
    xsub: bool,
    /// A kept line was too long or not JSON: it cannot be replayed.
    unreplayable: bool,
    /// Its subscribe/authorize requests not answered yet (their ids).
    awaiting: Vec<(serde_json::Value, Kind)>,
    /// Until when replies to a replay may come (lines are searched for [`REPLAY_ID`] only
    /// then, so a miner's notifies are not searched for long).
    replay_until: Option<Instant>,
    /// From the subscribe reply the miner got (or the last `set_extranonce` we sent it).
    session: Option<String>,
    extranonce1: Option<String>,
    nonce2_len: Option<u64>,
}

impl Handshake {
    /// Notes a handshake line the miner sent.
    fn keep(&mut self, kind: Kind, line: &[u8]) {
        let v = (line.len() <= MAX_KEPT_LINE)
            .then(|| serde_json::from_slice::<serde_json::Value>(line).ok())
            .flatten()
            .filter(serde_json::Value::is_object);
        let Some(v) = v else {
            if kind != Kind::ExtranonceSubscribe {
                self.unreplayable = true;
            }
            return;
        };
        // Only these make a replay impossible while unanswered (a ckpool upstream never
        // answers mining.extranonce.subscribe).
        let answered = matches!(kind, Kind::Subscribe | Kind::Authorize);
        if let Some(id) = v.get("id").filter(|id| answered && !id.is_null()) {
            if self.awaiting.len() >= MAX_AWAITING {
                self.awaiting.remove(0);
            }
            self.awaiting.push((id.clone(), kind));
        }
        match kind {
            Kind::Configure => self.configure = Some(v),
            Kind::Subscribe => self.subscribe = Some(v),
            Kind::Authorize => self.authorize = Some(v),
            Kind::ExtranonceSubscribe => self.xsub = true,
        }
    }

    /// Reads the subscribe reply `r`: session id, extranonce1, extranonce2 size.
    fn subscribed(&mut self, r: &serde_json::Value) -> Option<(String, u64)> {
        let res = r.get("result")?;
        let en1 = res.get(1)?.as_str()?.to_owned();
        let n2 = res.get(2)?.as_u64()?;
        let session = res
            .get(0)
            .and_then(serde_json::Value::as_array)
            .and_then(|subs| {
                subs.iter().find_map(|s| {
                    (s.get(0)?.as_str()? == "mining.notify")
                        .then(|| s.get(1)?.as_str().map(str::to_owned))
                        .flatten()
                })
            })
            .unwrap_or_else(|| en1.clone());
        self.session = Some(session);
        Some((en1, n2))
    }

    /// The lines to send up to re-establish the session, or `None` if that is impossible (a
    /// request still unanswered, a line not kept). Empty when it never subscribed.
    #[cfg(test)]
    fn replay(&mut self) -> Option<Vec<Vec<u8>>> {
        self.replay_at(Instant::now())
    }

    /// [`Handshake::replay`] at `now`.
    fn replay_at(&mut self, now: Instant) -> Option<Vec<Vec<u8>>> {
        if self.unreplayable || !self.awaiting.is_empty() {
            return None;
        }
        let Some(sub) = self.subscribe.as_ref() else {
            return Some(Vec::new());
        };
        self.replay_until = Some(now + REPLAY_WINDOW);
        let mut lines = Vec::with_capacity(4);
        let with_id = |v: &serde_json::Value, k: Kind| {
            let mut v = v.clone();
            v["id"] = json!(format!("{REPLAY_ID}{}", k.tag()));
            v
        };
        if let Some(c) = &self.configure {
            lines.push(with_id(c, Kind::Configure));
        }
        let mut s = with_id(sub, Kind::Subscribe);
        let agent = s
            .get("params")
            .and_then(|p| p.get(0))
            .cloned()
            .unwrap_or_else(|| json!(""));
        s["params"] = match &self.session {
            Some(sid) => json!([agent, sid]),
            None => json!([agent]),
        };
        lines.push(s);
        if let Some(a) = &self.authorize {
            lines.push(with_id(a, Kind::Authorize));
        }
        if self.xsub {
            lines.push(
                json!({"id": format!("{REPLAY_ID}{}", Kind::ExtranonceSubscribe.tag()),
                "method": "mining.extranonce.subscribe", "params": []}),
            );
        }
        Some(lines.iter().map(|v| v.to_string().into_bytes()).collect())
    }
}

impl Handshake {
    /// The handshake as it travels in a handover (JSON; `replay_until` as milliseconds left).
    fn export(&self, now: Instant) -> serde_json::Value {
        json!({
            "configure": self.configure,
            "subscribe": self.subscribe,
            "authorize": self.authorize,
            "xsub": self.xsub,
            "unreplayable": self.unreplayable,
            "awaiting": self.awaiting.iter().map(|(id, k)| json!([id, k.tag()])).collect::<Vec<_>>(),
            "replay_ms": self.replay_until.map(|t| {
                u64::try_from(t.saturating_duration_since(now).as_millis()).unwrap_or(u64::MAX)
            }),
            "session": self.session,
            "extranonce1": self.extranonce1,
            "nonce2_len": self.nonce2_len,
        })
    }

    /// [`Handshake::export`] back; `None` if `v` is not one.
    fn import(v: &serde_json::Value, now: Instant) -> Option<Self> {
        let obj = |k: &str| v.get(k).filter(|x| x.is_object()).cloned();
        let text = |k: &str| {
            v.get(k)
                .and_then(serde_json::Value::as_str)
                .map(str::to_owned)
        };
        let mut awaiting = Vec::new();
        for a in v.get("awaiting")?.as_array()?.iter().take(MAX_AWAITING) {
            let kind = Kind::from_tag(a.get(1)?.as_str()?)?;
            awaiting.push((a.get(0)?.clone(), kind));
        }
        let replay_ms = v.get("replay_ms").and_then(serde_json::Value::as_u64);
        Some(Self {
            configure: obj("configure"),
            subscribe: obj("subscribe"),
            authorize: obj("authorize"),
            xsub: v.get("xsub")?.as_bool()?,
            unreplayable: v.get("unreplayable")?.as_bool()?,
            awaiting,
            replay_until: replay_ms.map(|ms| now + Duration::from_millis(ms.min(REPLAY_WINDOW_MS))),
            session: text("session"),
            extranonce1: text("extranonce1"),
            nonce2_len: v.get("nonce2_len").and_then(serde_json::Value::as_u64),
        })
    }
}

/// [`REPLAY_WINDOW`] in milliseconds (an imported replay window is no longer).
const REPLAY_WINDOW_MS: u64 = 60_000;

impl Miner {
    /// The miner as it travels in a handover (in the connection's `ConnState::user`, with the
    /// redirector's `watch`).
    fn export(&self, now: Instant) -> serde_json::Value {
        json!({
            "client_id": self.client_id,
            "address": &*self.address,
            "server": self.server,
            "hs": self.hs.as_ref().map(|h| h.export(now)),
        })
    }

    /// [`Miner::export`] back, in upstream epoch `epoch`.
    fn import(v: &serde_json::Value, epoch: u64, now: Instant) -> Option<Self> {
        let client_id = u32::try_from(v.get("client_id")?.as_u64()?).ok()?;
        let hs = match v.get("hs")? {
            serde_json::Value::Null => None,
            h => Some(Box::new(Handshake::import(h, now)?)),
        };
        Some(Self {
            client_id,
            epoch,
            address: Arc::from(v.get("address")?.as_str()?),
            server: v.get("server")?.as_u64()?,
            hs,
        })
    }
}

/// What to do with a line from the upstream for a miner with a handshake.
enum Down {
    /// Pass it on.
    Forward,
    /// A reply to a replay: swallow it.
    Consume,
    /// Swallow it and send the miner this instead.
    Replace(Vec<u8>),
    /// The replayed session was refused: close the miner.
    Close,
}

/// A connector thread's side: its miners and the link.
struct MinerSide {
    thread: usize,
    link: Arc<PassthroughLink>,
    shared: Arc<Shared>,
    miners: HashMap<ConnId, Miner>,
    /// Redirector mode: the watch for accepted shares.
    redirect: Option<super::redirector::Watcher>,
    /// Node mode: the local checks and statistics.
    node: Option<Arc<Node>>,
    /// Lines for the upstream are written by this thread ([`PassthroughLink::write`]), once per
    /// round, rather than queued for the link's engine one by one (not in node mode: its
    /// link has no direct path).
    direct_up: bool,
    /// This round's lines for the upstream, framed.
    up: Vec<u8>,
    /// Their miners (closed if the upstream does not take them).
    up_conns: Vec<ConnId>,
    /// How many miner lines `up` holds (its `mining.term`s aside, as `lines_up` counts).
    up_lines: u64,
    /// An owned link (see the module docs): the upstream connections this thread reads, with
    /// their numbers ([`OwnedLink::serial`]).
    links: HashMap<ConnId, u64>,
    /// This round's lines from the upstream, per connector thread (this one's are queued on
    /// their sockets at the round's end, the others' sent in one message each).
    batches: Vec<Batch>,
    /// The connector's handle (set once it is started), for those messages.
    conns: Arc<OnceLock<ConnectorHandle<Msg>>>,
    shutdown: Arc<AtomicBool>,
    /// Handed in (`-H`): the link's lines read before every miner is here ([`Msg::LinkGo`]).
    hold: Option<Vec<Vec<u8>>>,
    /// Notifications from the upstream for this thread's miners (jobs, difficulty) not yet
    /// queued on their sockets: each round queues at most [`FANOUT_ROUND`] of them, in order,
    /// so a job's fan-out to thousands of miners does not hold the thread for its whole length.
    /// Replies (share verdicts and the other answers) are never held: they are queued at once,
    /// ahead of notifications still waiting (a reply answers a request, and a stratum miner
    /// takes it whatever notification came before it; notifications keep their order among
    /// themselves, since a difficulty applies to the jobs after it).
    later: VecDeque<(ConnId, SendBuf)>,
    /// Notifications this round may still queue.
    fan: FanBudget,
    /// A [`Msg::More`] is on its way to this thread.
    more_sent: bool,
    /// Cleared once a handover starts ([`Msg::Sync`]): from then on every line is queued at
    /// once, so that none is left behind when the miners go.
    defer: bool,
}

impl Handshake {
    /// What to do with `line` from the upstream for this miner.
    #[cfg(test)]
    fn downstream(&mut self, line: &[u8]) -> Down {
        self.downstream_at(line, Instant::now())
    }

    /// [`Handshake::downstream`] at `now`.
    fn downstream_at(&mut self, line: &[u8], now: Instant) -> Down {
        let replaying = match self.replay_until {
            Some(t) if now < t => true,
            Some(_) => {
                self.replay_until = None;
                false
            }
            None => false,
        };
        // Cheap filters first: most lines (notifies, share verdicts) are for neither.
        if self.awaiting.is_empty() && !(replaying && find(line, REPLAY_ID.as_bytes())) {
            return Down::Forward;
        }
        let Ok(v) = serde_json::from_slice::<serde_json::Value>(line) else {
            return Down::Forward;
        };
        let Some(id) = v.get("id").filter(|id| !id.is_null()) else {
            return Down::Forward;
        };
        if let Some(tag) = id.as_str().and_then(|i| i.strip_prefix(REPLAY_ID)) {
            let refused = v.get("error").is_some_and(|e| !e.is_null());
            return match tag {
                "subscribe" => {
                    let before = (self.extranonce1.clone(), self.nonce2_len);
                    let Some((en1, n2)) = (!refused).then(|| self.subscribed(&v)).flatten() else {
                        return Down::Close;
                    };
                    let same = before == (Some(en1.clone()), Some(n2));
                    self.extranonce1 = Some(en1.clone());
                    self.nonce2_len = Some(n2);
                    if same {
                        Down::Consume
                    } else if self.xsub {
                        let mut l = json!({"id": null, "method": "mining.set_extranonce",
                            "params": [en1, n2]})
                        .to_string()
                        .into_bytes();
                        l.push(b'\n');
                        Down::Replace(l)
                    } else {
                        Down::Replace(
                            b"{\"id\":null,\"method\":\"client.reconnect\",\"params\":[]}\n"
                                .to_vec(),
                        )
                    }
                }
                "authorize" if refused || v.get("result") != Some(&json!(true)) => Down::Close,
                _ => Down::Consume,
            };
        }
        if let Some(i) = self.awaiting.iter().position(|(a, _)| a == id) {
            let (_, kind) = self.awaiting.remove(i);
            if kind == Kind::Subscribe
                && let Some((en1, n2)) = self.subscribed(&v)
            {
                self.extranonce1 = Some(en1);
                self.nonce2_len = Some(n2);
            }
        }
        Down::Forward
    }
}

impl MinerSide {
    fn up(&self) -> bool {
        self.shared.state.load(Ordering::SeqCst) == UP
    }

    /// Queues `cmd` for the upstream, waiting up to [`UPSTREAM_BLOCK`]; closes the miner and
    /// returns false if it cannot.
    fn send_up(&self, mut cmd: MinerLine, conn: ConnId, out: &mut Outbox) -> bool {
        let until = Instant::now() + UPSTREAM_BLOCK;
        loop {
            match self.link.send(cmd) {
                Ok(()) => {
                    self.shared.lines_up.fetch_add(1, Ordering::Relaxed);
                    return true;
                }
                Err(SendError::Full(back)) if Instant::now() < until => cmd = back,
                Err(SendError::Full(_)) => {
                    self.shared
                        .dropped_slow_upstream
                        .fetch_add(1, Ordering::Relaxed);
                    warn!(%conn, "upstream not reading; miner dropped");
                    out.close(conn);
                    return false;
                }
                Err(SendError::Closed(_)) => {
                    out.close(conn);
                    return false;
                }
            }
        }
    }

    /// Sends a miner's line up: queued for the link's engine, or (`direct_up`) added to this
    /// round's bytes, written at its end ([`MinerSide::flush_up`]). False if the miner was
    /// closed.
    fn line_up(
        &mut self,
        conn: ConnId,
        client_id: u64,
        address: &Arc<str>,
        server: u64,
        line: &[u8],
        out: &mut Outbox,
    ) -> bool {
        if !self.direct_up {
            let cmd = MinerLine::Line {
                client_id,
                address: Arc::clone(address),
                server,
                line: line.to_vec(),
            };
            return self.send_up(cmd, conn, out);
        }
        let mark = self.up.len();
        if common::stratum::passthrough::encode_miner_line(
            &mut self.up,
            line,
            client_id,
            address,
            server,
        )
        .is_err()
        {
            self.up.truncate(mark);
            debug!(%conn, client_id, "miner line is not a JSON object: not sent up");
            return true;
        }
        self.up_conns.push(conn);
        self.up_lines += 1;
        if self.up.len() >= UP_FLUSH {
            self.flush_up(out);
        }
        true
    }

    /// Writes this round's lines to the upstream. If it does not take them within
    /// [`UPSTREAM_BLOCK`], their miners are closed; with no upstream link they are dropped.
    fn flush_up(&mut self, out: &mut Outbox) {
        if self.up.is_empty() {
            return;
        }
        match self.link.write(&self.up, UPSTREAM_BLOCK) {
            Ok(()) => {
                self.shared
                    .lines_up
                    .fetch_add(self.up_lines, Ordering::Relaxed);
            }
            Err(WriteError::Full) => {
                self.up_conns.sort_unstable();
                self.up_conns.dedup();
                self.shared
                    .dropped_slow_upstream
                    .fetch_add(self.up_conns.len() as u64, Ordering::Relaxed);
                warn!(
                    miners = self.up_conns.len(),
                    "upstream not reading; miners dropped"
                );
                for &conn in &self.up_conns {
                    out.close(conn);
                }
            }
            Err(WriteError::NoLink) => {
                debug!(
                    lines = self.up_lines,
                    "no upstream link: miner lines dropped"
                );
            }
        }
        self.up.clear();
        self.up_conns.clear();
        self.up_lines = 0;
    }

    /// Re-establishes the miner's session on the upstream of `epoch`; false if it was closed.
    fn replay(&mut self, conn: ConnId, epoch: u64, now: Instant, out: &mut Outbox) -> bool {
        let Some(m) = self.miners.get_mut(&conn) else {
            return false;
        };
        m.epoch = epoch;
        let lines = match m.hs.as_mut() {
            None => Some(Vec::new()),
            Some(hs) => hs.replay_at(now),
        };
        let Some(lines) = lines else {
            self.shared.replay_closed.fetch_add(1, Ordering::Relaxed);
            info!(%conn, "miner cannot be replayed on the new upstream (mid-handshake); closed");
            out.close(conn);
            return false;
        };
        if lines.is_empty() {
            return true;
        }
        let (client_id, address, server) =
            (u64::from(m.client_id), Arc::clone(&m.address), m.server);
        for line in lines {
            if !self.line_up(conn, client_id, &address, server, &line, out) {
                return false;
            }
        }
        self.shared.replayed.fetch_add(1, Ordering::Relaxed);
        true
    }
}

/// Answers a miner's request while no upstream is up: `[20,"Upstream down",null]`.
fn reject_down(line: &[u8], conn: ConnId, out: &mut Outbox) {
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(line) else {
        return;
    };
    let Some(id) = v.get("id").filter(|id| !id.is_null()) else {
        return;
    };
    let submit = v.get("method").and_then(serde_json::Value::as_str) == Some("mining.submit");
    let result = if submit { json!(false) } else { json!(null) };
    let mut r = json!({"id": id, "result": result, "error": [20, "Upstream down", null]})
        .to_string()
        .into_bytes();
    r.push(b'\n');
    out.send(conn, r);
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
        if !self.up() {
            debug!(%conn, %peer, "no upstream; miner closed");
            out.close(conn);
            return;
        }
        let client_id = self.shared.alloc(self.thread, conn);
        self.miners.insert(
            conn,
            Miner {
                client_id,
                epoch: self.shared.epoch.load(Ordering::SeqCst),
                address: Arc::from(peer.ip().to_string()),
                server: u64::try_from(listener).unwrap_or(0),
                hs: None,
            },
        );
        if let Some(r) = self.redirect.as_mut() {
            r.open(conn, peer.ip());
        }
    }

    fn on_line(&mut self, now: Instant, conn: ConnId, line: &[u8], out: &mut Outbox) {
        if !self.miners.contains_key(&conn) {
            if self.links.contains_key(&conn) {
                self.link_line(now, line, out);
            }
            return;
        }
        if !self.up() {
            self.shared.rejected_down.fetch_add(1, Ordering::Relaxed);
            reject_down(line, conn, out);
            return;
        }
        let epoch = self.shared.epoch.load(Ordering::SeqCst);
        if self.miners.get(&conn).is_some_and(|m| m.epoch < epoch)
            && !self.replay(conn, epoch, now, out)
        {
            return;
        }
        let Some(m) = self.miners.get_mut(&conn) else {
            return;
        };
        if let Some(kind) = Kind::of(line) {
            m.hs.get_or_insert_default().keep(kind, line);
        } else if let Some(node) = &self.node {
            // A block is submitted to our bitcoind before the share goes upstream.
            let en1 = m.hs.as_ref().and_then(|h| h.extranonce1.as_deref());
            node.on_submit(m.client_id, en1, line, now);
        }
        let (client_id, address, server) =
            (u64::from(m.client_id), Arc::clone(&m.address), m.server);
        if let Some(r) = self.redirect.as_mut() {
            r.up(conn, line, now);
        }
        self.line_up(conn, client_id, &address, server, line, out);
    }

    fn on_close(&mut self, _now: Instant, conn: ConnId, reason: CloseReason) {
        if let Some(serial) = self.links.remove(&conn) {
            self.shared.link_conns.fetch_sub(1, Ordering::Relaxed);
            self.link
                .lost(serial, format!("connection closed ({reason:?})"));
            return;
        }
        let Some(m) = self.miners.remove(&conn) else {
            return;
        };
        self.shared.lock().remove(&m.client_id);
        if let Some(r) = self.redirect.as_mut() {
            r.close(conn);
        }
        if let Some(node) = &self.node {
            node.forget(m.client_id);
        }
        // Best effort: a full queue or no upstream loses only the notice (the upstream drops the
        // session with the link, or on its own timeout).
        if self.direct_up {
            // After the miner's last lines, at the round's end.
            common::stratum::passthrough::term(
                &mut self.up,
                u64::from(m.client_id),
                &m.address,
                m.server,
            );
            return;
        }
        let _ = self.link.try_send(MinerLine::Term {
            client_id: u64::from(m.client_id),
            address: m.address,
            server: m.server,
        });
    }

    fn on_msg(&mut self, now: Instant, msg: Msg, out: &mut Outbox) {
        match msg {
            Msg::Lines(lines, bytes) => {
                self.deliver(now, lines, out);
                if let Some(f) = self.shared.inflight.get(self.thread) {
                    f.fetch_sub(bytes, Ordering::Relaxed);
                }
            }
            Msg::More => self.more_sent = false,
            Msg::LinkGo => {
                self.flush_later(now, out);
                for line in self.hold.take().unwrap_or_default() {
                    self.link_line(now, &line, out);
                }
            }
            Msg::Drop(conn) => {
                // The lines before it go first.
                self.flush_later(now, out);
                if self.miners.contains_key(&conn) {
                    out.close(conn);
                }
            }
            Msg::Sync(done) => {
                self.defer = false;
                self.flush_later(now, out);
                let _ = done.send(());
            }
            Msg::Replay(epoch) => {
                // The old upstream's lines go before the replay.
                self.flush_later(now, out);
                if !self.up() || self.shared.epoch.load(Ordering::SeqCst) != epoch {
                    // Down again, or a newer switch whose own message follows.
                    return;
                }
                let stale: Vec<ConnId> = self
                    .miners
                    .iter()
                    .filter(|(_, m)| m.epoch < epoch)
                    .map(|(c, _)| *c)
                    .collect();
                for conn in stale {
                    self.replay(conn, epoch, now, out);
                }
            }
        }
    }

    fn on_tick(&mut self, _now: Instant, _out: &mut Outbox) {}

    fn on_batch_end(&mut self, now: Instant, out: &mut Outbox) {
        self.route_link(now, out);
        self.fan_out(now, out);
        self.flush_up(out);
    }

    fn on_export(&mut self, now: Instant, conn: ConnId, state: &mut Vec<u8>) {
        if let Some(serial) = self.links.remove(&conn) {
            // The link's connection travels too (with the bytes read of its next line).
            self.shared.link_conns.fetch_sub(1, Ordering::Relaxed);
            state.extend_from_slice(json!({ "link": serial }).to_string().as_bytes());
            return;
        }
        self.export_miner(now, conn, state);
    }

    fn on_adopt(
        &mut self,
        now: Instant,
        conn: ConnId,
        peer: SocketAddr,
        listener: usize,
        state: &[u8],
        out: &mut Outbox,
    ) {
        let v = serde_json::from_slice::<serde_json::Value>(state).unwrap_or_default();
        if let Some(serial) = v.get("link").and_then(serde_json::Value::as_u64) {
            debug!(%conn, %peer, serial, "upstream link connection adopted");
            self.links.insert(conn, serial);
            self.shared.link_conns.fetch_add(1, Ordering::Relaxed);
            self.shared
                .link_adopted
                .store(serial.saturating_add(1), Ordering::SeqCst);
            out.trunk(conn);
            return;
        }
        self.adopt_miner(now, conn, peer, listener, &v, out);
    }
}

impl MinerSide {
    /// A line the upstream sent (an owned link): routed at the round's end
    /// ([`MinerSide::route_link`]), or held while handed-over miners are coming.
    fn link_line(&mut self, now: Instant, line: &[u8], out: &mut Outbox) {
        if let Some(held) = self.hold.as_mut() {
            held.push(line.to_vec());
            return;
        }
        let Some(conns) = self.conns.get() else {
            return;
        };
        let ev = PassthroughLink::classify(line);
        // `dropclient` for one of this thread's miners: the lines read before it are queued in
        // place first (as they would be at the round's end), then it is closed, so that every
        // line for this thread's miners keeps its order.
        if let Some(id) = ev.dropclient() {
            let target = u32::try_from(id)
                .ok()
                .and_then(|id| self.shared.lock().get(&id).copied());
            if let Some((t, conn)) = target
                && t == self.thread
            {
                self.route_link(now, out);
                self.flush_later(now, out);
                if self.miners.contains_key(&conn) {
                    self.shared.dropclients.fetch_add(1, Ordering::Relaxed);
                    info!(client_id = id, %conn, "upstream dropped a miner");
                    out.close(conn);
                }
                return;
            }
        }
        handle_event(
            ev,
            conns,
            &self.shared,
            &mut self.batches,
            None,
            &self.shutdown,
            Some(self.thread),
        );
    }

    /// Queues this round's lines from the upstream: this thread's miners' on their sockets now,
    /// the others' sent to their threads, one message each.
    fn route_link(&mut self, now: Instant, out: &mut Outbox) {
        let own = self
            .batches
            .get_mut(self.thread)
            .map(|(lines, _)| std::mem::take(lines))
            .unwrap_or_default();
        if let Some((_, bytes)) = self.batches.get_mut(self.thread) {
            *bytes = 0;
        }
        if !own.is_empty() {
            self.shared
                .routed_in_place
                .fetch_add(own.len() as u64, Ordering::Relaxed);
            self.deliver(now, own, out);
        }
        if let Some(conns) = self.conns.get() {
            send_batches(
                conns,
                &self.shared,
                &mut self.batches,
                &self.shutdown,
                Some(self.thread),
            );
        }
    }

    /// Queues lines from the upstream on their miners' sockets (after the replay's filters).
    fn deliver(&mut self, now: Instant, lines: Vec<(ConnId, SendBuf)>, out: &mut Outbox) {
        // A multicast line is one buffer for all its miners: looked at once.
        let mut last: (*const u8, usize, bool) = (std::ptr::null(), 0, false);
        for (conn, line) in lines {
            let b = line.as_slice();
            let note = if (b.as_ptr(), b.len()) == (last.0, last.1) {
                last.2
            } else {
                let n = is_notification(b);
                last = (b.as_ptr(), b.len(), n);
                n
            };
            if note && self.defer && (!self.later.is_empty() || !self.fan.take(now)) {
                self.later.push_back((conn, line));
                continue;
            }
            self.deliver_one(now, conn, line, out);
        }
        if self.later.len() > MAX_LATER {
            self.flush_later(now, out);
        }
    }

    /// The round's end: queues notifications left for later, up to [`FANOUT_ROUND`] a round,
    /// and asks for another round while some are left.
    fn fan_out(&mut self, now: Instant, out: &mut Outbox) {
        while !self.later.is_empty() && self.fan.take(now) {
            let Some((conn, line)) = self.later.pop_front() else {
                break;
            };
            self.deliver_one(now, conn, line, out);
        }
        if self.later.is_empty() {
            if self.later.capacity() > FANOUT_ROUND {
                self.later = VecDeque::new();
            }
        } else if !self.more_sent
            && let Some(conns) = self.conns.get()
        {
            self.more_sent = true;
            conns.send(self.thread, Msg::More);
        }
    }

    /// Queues every notification left for later now (before a control message, a drop, a
    /// handover: what came before them goes first).
    fn flush_later(&mut self, now: Instant, out: &mut Outbox) {
        while let Some((conn, line)) = self.later.pop_front() {
            self.deliver_one(now, conn, line, out);
        }
    }

    /// Queues one line from the upstream on its miner's socket (after the replay's filters).
    fn deliver_one(&mut self, now: Instant, conn: ConnId, line: SendBuf, out: &mut Outbox) {
        let Some(m) = self.miners.get_mut(&conn) else {
            return;
        };
        if let Some(node) = &self.node {
            node.on_miner_downline(m.client_id, line.as_slice());
        }
        match m
            .hs
            .as_mut()
            .map_or(Down::Forward, |hs| hs.downstream_at(line.as_slice(), now))
        {
            Down::Forward => {
                let redirect = self
                    .redirect
                    .as_mut()
                    .and_then(|r| r.down(conn, line.as_slice(), now));
                out.send(conn, line);
                if let Some(l) = redirect {
                    out.send(conn, l);
                }
            }
            Down::Consume => {}
            Down::Replace(l) => {
                info!(%conn, "miner's extranonce changed on the new upstream");
                out.send(conn, l);
            }
            Down::Close => {
                self.shared.replay_closed.fetch_add(1, Ordering::Relaxed);
                info!(%conn, "new upstream refused the miner's replayed session; closed");
                out.close(conn);
            }
        }
    }

    /// A miner goes to the new instance ([`connector::Handler::on_export`]).
    fn export_miner(&mut self, now: Instant, conn: ConnId, state: &mut Vec<u8>) {
        // The miner goes on at the new instance, under the same client id: no `mining.term`.
        let Some(m) = self.miners.remove(&conn) else {
            return;
        };
        self.shared.lock().remove(&m.client_id);
        let mut v = m.export(now);
        if let Some(r) = self.redirect.as_mut() {
            v["watch"] = r.export(conn, now);
        }
        state.extend_from_slice(v.to_string().as_bytes());
    }

    /// A miner came from the old instance ([`connector::Handler::on_adopt`]).
    fn adopt_miner(
        &mut self,
        now: Instant,
        conn: ConnId,
        peer: SocketAddr,
        _listener: usize,
        v: &serde_json::Value,
        out: &mut Outbox,
    ) {
        let epoch = self.shared.epoch.load(Ordering::SeqCst);
        let watched = match self.redirect.as_mut() {
            Some(r) => r.adopt(
                conn,
                v.get("watch").unwrap_or(&serde_json::Value::Null),
                now,
            ),
            None => true,
        };
        let Some(m) = Miner::import(v, epoch, now).filter(|_| watched) else {
            warn!(%conn, %peer, "a handed-over miner's state is unreadable; closed");
            if let Some(r) = self.redirect.as_mut() {
                r.close(conn);
            }
            out.close(conn);
            return;
        };
        let taken = {
            let mut table = self.shared.lock();
            let taken = table.contains_key(&m.client_id);
            if !taken {
                table.insert(m.client_id, (self.thread, conn));
            }
            taken
        };
        if taken {
            warn!(%conn, client_id = m.client_id, "a handed-over miner's client id is in use; closed");
            if let Some(r) = self.redirect.as_mut() {
                r.close(conn);
            }
            out.close(conn);
            return;
        }
        self.miners.insert(conn, m);
    }
}

/// Runs passthrough mode until `instance.shutdown` is set, or until it handed itself over to a
/// new instance (`-H`); with `-H`, takes the running instance over first.
pub(crate) fn run(settings: &Settings, instance: &Instance) -> anyhow::Result<()> {
    run_link(settings, &instance.shutdown, None, None, Some(instance))
}

/// What the old instance's passthrough (`mode`: `passthrough`, `redirector` or `node`) sends as
/// its state, besides the link's socket; a redirector's or a node's own state in `redirect`.
fn export_link_state(
    h: &LinkHandover,
    next_id: u32,
    mode: &str,
    redirect: Option<serde_json::Value>,
) -> Vec<u8> {
    json!({
        "mode": mode,
        "index": h.index,
        "partial": hex::encode(&h.partial),
        "next_id": next_id,
        "redirect": redirect,
    })
    .to_string()
    .into_bytes()
}

/// The link state of the old instance (that must run `mode` too).
type LinkState = (LinkHandover, u32, serde_json::Value);

/// [`export_link_state`] back: the link (with `fd`), the `client_id` counter and the
/// redirector's or node's state (`null` in passthrough mode).
fn import_link_state(blob: &[u8], fd: OwnedFd, mode: &str) -> anyhow::Result<LinkState> {
    let v: serde_json::Value = serde_json::from_slice(blob)
        .map_err(|_| anyhow!("the running instance is not a {mode} (its state is not one)"))?;
    let theirs = v.get("mode").and_then(serde_json::Value::as_str);
    if theirs != Some(mode) {
        return Err(anyhow!(
            "the running instance is not a {mode} (it says {})",
            theirs.unwrap_or("nothing")
        ));
    }
    let field = |k: &str| v.get(k).ok_or_else(|| anyhow!("the link state has no {k}"));
    let index = field("index")?
        .as_u64()
        .and_then(|i| usize::try_from(i).ok())
        .ok_or_else(|| anyhow!("bad link index"))?;
    let partial = field("partial")?
        .as_str()
        .and_then(|p| hex::decode(p).ok())
        .ok_or_else(|| anyhow!("bad partial line"))?;
    let next_id = field("next_id")?
        .as_u64()
        .and_then(|i| u32::try_from(i).ok())
        .ok_or_else(|| anyhow!("bad client id counter"))?;
    let redirect = v.get("redirect").cloned().unwrap_or_default();
    Ok((
        LinkHandover {
            fd,
            index,
            partial,
            session: Vec::new(),
        },
        next_id,
        redirect,
    ))
}

/// The old passthrough's side of a handover ([`handover::GiveHooks`]).
struct PtGive<'a> {
    conns: &'a Connector<Msg>,
    link: &'a PassthroughLink,
    events: &'a Receiver<PassthroughEvent>,
    shared: &'a Shared,
    shutdown: &'a AtomicBool,
    /// Redirector mode: its IP table and counters go too.
    redirect: Option<&'a super::redirector::Redirects>,
    /// Node mode: its jobs, transactions and figures go too.
    node: Option<&'a Node>,
    /// The paused link, once settled.
    paused: RefCell<Option<LinkHandover>>,
}

impl handover::GiveHooks for PtGive<'_> {
    fn settle(&self, deadline: Instant) -> anyhow::Result<()> {
        let handle = self.conns.handle();
        let threads = self.shared.inflight.len();
        let mut batches: Vec<Batch> = (0..threads).map(|_| (Vec::new(), 0)).collect();
        // The link writes what miners sent and hands on what it reads, then stops reading;
        // its events come before its answer.
        let answer = self.link.pause(deadline);
        let paused = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            crossbeam_channel::select! {
                recv(self.events) -> ev => match ev {
                    Ok(ev) => handle_event(ev, &handle, self.shared, &mut batches, self.node, self.shutdown, None),
                    Err(_) => break Err(anyhow!("the upstream link stopped")),
                },
                recv(answer) -> r => break match r {
                    Ok(r) => r.map_err(|e| anyhow!(e)),
                    Err(_) => Err(anyhow!("the upstream link stopped")),
                },
                default(left) => break Err(anyhow!("the upstream link did not pause in time")),
            }
        };
        while let Ok(ev) = self.events.try_recv() {
            handle_event(
                ev,
                &handle,
                self.shared,
                &mut batches,
                self.node,
                self.shutdown,
                None,
            );
        }
        send_batches(&handle, self.shared, &mut batches, self.shutdown, None);
        let paused = paused.context("pausing the upstream link")?;
        *self.paused.borrow_mut() = Some(paused);
        // Every line routed is queued on its miner's socket (it travels as unsent bytes).
        let (tx, rx) = crossbeam_channel::bounded(threads);
        self.conns.broadcast(Msg::Sync(tx));
        if (0..threads).all(|_| rx.recv_deadline(deadline).is_ok()) {
            Ok(())
        } else {
            Err(anyhow!("the connector threads did not settle in time"))
        }
    }

    fn export_state(&self) -> anyhow::Result<(Vec<u8>, Vec<OwnedFd>)> {
        let paused = self.paused.borrow();
        let h = paused
            .as_ref()
            .ok_or_else(|| anyhow!("the upstream link is not paused"))?;
        let fd =
            h.fd.try_clone()
                .context("duplicating the upstream link's socket")?;
        let next_id = self.shared.next_id.load(Ordering::Relaxed);
        let mode_state = match (self.redirect, self.node) {
            (Some(r), _) => Some(r.export_state()),
            (None, Some(n)) => Some(n.export_state()),
            (None, None) => None,
        };
        let blob = export_link_state(
            h,
            next_id,
            link_mode(self.redirect.is_some(), self.node.is_some()),
            mode_state,
        );
        Ok((blob, vec![fd]))
    }

    fn release(&self) {}

    fn taken_back(&self) {
        self.paused.borrow_mut().take();
        self.link.resume();
    }
}

/// The mode's name in a handover's link state.
fn link_mode(redirector: bool, node: bool) -> &'static str {
    match (redirector, node) {
        (true, _) => "redirector",
        (false, true) => "node",
        (false, false) => "passthrough",
    }
}

/// The notifications a connector thread may still queue in the current round of its loop
/// ([`FANOUT_ROUND`] a round). A round is told by the connector's `now`, the same for every
/// callback of one round of its loop, which may call `on_batch_end` several times (every 64
/// completions): counted per call, a round of many sends' completions would queue that many
/// more, and the rounds of a big fan-out would grow until they held the thread for most of it.
#[derive(Default)]
struct FanBudget {
    round: Option<Instant>,
    used: usize,
}

impl FanBudget {
    /// Takes one notification's place in the round `now`: `false` once the round has none left.
    fn take(&mut self, now: Instant) -> bool {
        if self.round != Some(now) {
            self.round = Some(now);
            self.used = 0;
        }
        if self.used >= FANOUT_ROUND {
            return false;
        }
        self.used += 1;
        true
    }
}

/// Whether a line from the upstream for a miner is a notification (`"method"`: a job, a
/// difficulty, a reconnect) rather than a reply. A reply naming `"method"` in its result is taken
/// for a notification, which only keeps it in order.
fn is_notification(line: &[u8]) -> bool {
    line.windows(8).any(|w| w == b"\"method\"")
}

/// Sends the routed lines to their connector threads (waiting while a thread has too much not
/// yet queued, unless `shutdown`).
fn send_batches(
    conns: &ConnectorHandle<Msg>,
    shared: &Shared,
    batches: &mut [Batch],
    shutdown: &AtomicBool,
    me: Option<usize>,
) {
    for (t, batch) in batches.iter_mut().enumerate() {
        send_batch(conns, shared, t, batch, shutdown, me);
    }
}

/// [`send_batches`] for thread `t` alone.
fn send_batch(
    conns: &ConnectorHandle<Msg>,
    shared: &Shared,
    t: usize,
    (lines, bytes): &mut Batch,
    shutdown: &AtomicBool,
    me: Option<usize>,
) {
    if lines.is_empty() {
        return;
    }
    // Back-pressure towards the upstream: wait while this thread has a lot unsent (unless it
    // is the calling connector thread itself, `me`: it would wait for itself).
    if let Some(f) = shared.inflight.get(t) {
        while me != Some(t)
            && f.load(Ordering::Relaxed) > MAX_INFLIGHT
            && !shutdown.load(Ordering::Relaxed)
        {
            thread::sleep(Duration::from_millis(1));
        }
        f.fetch_add(*bytes, Ordering::Relaxed);
    }
    shared
        .routed_by_message
        .fetch_add(lines.len() as u64, Ordering::Relaxed);
    conns.send(t, Msg::Lines(std::mem::take(lines), std::mem::take(bytes)));
}

/// Runs passthrough mode; node mode with `node` (the link says `mining.node`); or redirector
/// mode with `redirect`, until `shutdown` is set. With `instance`, `-H` takes a running
/// instance over and a new instance may take this one over.
pub(crate) fn run_link(
    settings: &Settings,
    shutdown: &Arc<AtomicBool>,
    node: Option<Arc<Node>>,
    redirect: Option<Arc<super::redirector::Redirects>>,
    instance: Option<&Instance>,
) -> anyhow::Result<()> {
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
        multicast: settings.file.multicast,
        ..UpstreamConfig::default()
    };
    let role = if node.is_some() {
        Role::Node
    } else {
        Role::Passthrough
    };
    let admin_path = settings.admin_socket();
    // -H: the running instance's listeners, then its link (socket and state).
    let incoming = match instance {
        Some(i) if i.pending_handover() => {
            let incoming = handover::request(&admin_path)?.ok_or_else(|| {
                anyhow!(
                    "-H: the running instance does not answer on {}",
                    admin_path.display()
                )
            })?;
            info!(listeners = ?incoming.addrs, "handover: listeners received");
            let state = incoming.recv_state().and_then(|(blob, fds)| {
                let fd = fds
                    .into_iter()
                    .next()
                    .ok_or_else(|| anyhow!("the running instance sent no upstream link"))?;
                let (adopted, next_id, state) =
                    import_link_state(&blob, fd, link_mode(redirect.is_some(), node.is_some()))?;
                if let Some(r) = &redirect {
                    r.import_state(&state)
                        .map_err(|e| anyhow!("the redirector's state: {e}"))?;
                }
                if let Some(n) = &node {
                    n.import_state(&state)
                        .map_err(|e| anyhow!("the node's state: {e}"))?;
                }
                Ok((adopted, next_id))
            });
            match state {
                Ok(state) => Some((incoming, state)),
                Err(e) => {
                    incoming.abort(&format!("{e:#}"));
                    return Err(e).context("-H: the handover failed; the old instance serves on");
                }
            }
        }
        _ => None,
    };
    let (ev_tx, ev_rx) = crossbeam_channel::bounded(EVENTS);
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
        multicasts: AtomicU64::new(0),
        ignored_commands: AtomicU64::new(0),
        dropclients: AtomicU64::new(0),
        dropped_slow_upstream: AtomicU64::new(0),
        replayed: AtomicU64::new(0),
        replay_closed: AtomicU64::new(0),
        rejected_down: AtomicU64::new(0),
        routed_in_place: AtomicU64::new(0),
        routed_by_message: AtomicU64::new(0),
        link_conns: AtomicUsize::new(0),
        link_adopted: AtomicU64::new(0),
    });
    // Passthrough and redirector modes: the link's connection is read by a connector thread
    // (an owned link, see the module docs). Node mode keeps the link's reader thread and every
    // line on the router: a node's `workinfo` (a link line) must be handled before the
    // notifies after it reach miners.
    let owned = node.is_none();
    let (own_tx, own_rx) = crossbeam_channel::unbounded::<OwnedLink>();
    let owner: LinkOwner = Arc::new(move |l: OwnedLink| {
        let _ = own_tx.send(l);
    });
    let (link, incoming) = match incoming {
        None if owned => (
            PassthroughLink::start_owned(cfg, role, ev_tx, owner, None)
                .context("starting the upstream link")?,
            None,
        ),
        None => (
            PassthroughLink::start(cfg, role, ev_tx).context("starting the upstream link")?,
            None,
        ),
        Some((incoming, (adopted, next_id))) => {
            // Up on the old instance's entry from the start: its miners come in this epoch and
            // are not replayed; the link reads once they are all here.
            let index = adopted.index;
            shared.next_id.store(next_id, Ordering::Relaxed);
            shared.active.store(index, Ordering::Relaxed);
            shared.state.store(UP, Ordering::SeqCst);
            let started = if owned {
                PassthroughLink::start_owned(cfg, role, ev_tx, owner, Some(adopted))
            } else {
                PassthroughLink::start_adopted(cfg, role, ev_tx, adopted)
            };
            match started {
                Ok(link) => {
                    info!(index, next_id, "handover: upstream link taken over");
                    (link, Some(incoming))
                }
                Err(e) => {
                    incoming.abort(&format!("cannot start the upstream link: {e}"));
                    return Err(e).context("-H: the handover failed; the old instance serves on");
                }
            }
        }
    };
    let link = Arc::new(link);
    let direct_up = node.is_none();
    let conns_cell: Arc<OnceLock<ConnectorHandle<Msg>>> = Arc::new(OnceLock::new());
    let handed_in = incoming.is_some();
    let mut ccfg = settings.connector();
    if let Some(incoming) = &incoming {
        ccfg.listen.clear();
        ccfg.inherited.clone_from(&incoming.listeners);
    }
    let started = {
        let (link, shared, node, redirect, cell, shutdown) = (
            Arc::clone(&link),
            Arc::clone(&shared),
            node.clone(),
            redirect.clone(),
            Arc::clone(&conns_cell),
            Arc::clone(shutdown),
        );
        connector::start(ccfg, move |thread| MinerSide {
            thread,
            link: Arc::clone(&link),
            shared: Arc::clone(&shared),
            miners: HashMap::new(),
            redirect: redirect
                .as_ref()
                .map(|r| super::redirector::Watcher::new(Arc::clone(r))),
            node: node.clone(),
            direct_up,
            up: Vec::new(),
            up_conns: Vec::new(),
            up_lines: 0,
            links: HashMap::new(),
            batches: (0..threads).map(|_| (Vec::new(), 0)).collect(),
            conns: Arc::clone(&cell),
            shutdown: Arc::clone(&shutdown),
            hold: handed_in.then(Vec::new),
            later: VecDeque::new(),
            fan: FanBudget::default(),
            more_sent: false,
            defer: true,
        })
    };
    let conns = match started {
        Ok(c) => c,
        Err(e) => {
            if let Some(incoming) = &incoming {
                incoming.abort(&format!("the new instance cannot start its connector: {e}"));
                link.release();
            }
            return Err(e).context("starting the connector");
        }
    };
    // Before the adopted link is read (`resume` below) and before any miner connects.
    let _ = conns_cell.set(conns.handle());
    if let Some(incoming) = incoming {
        let adopted = incoming.adopt_all(&conns);
        let claimed = adopted.and_then(|n| {
            instance
                .map_or(Ok(()), |i| i.take_over(settings))
                .map(|()| n)
        });
        match claimed {
            Ok(n) => {
                // An owned link's connection came with the miners.
                let link = usize::from(shared.link_adopted.load(Ordering::SeqCst) > 0);
                info!(
                    miners = n.saturating_sub(link),
                    "handover: took the running instance over"
                );
            }
            Err(e) => {
                // The link is the old instance's again: leave it open, and send nothing more on
                // it (no `mining.term` for the miners closed here).
                link.release();
                conns.shutdown();
                return Err(e).context("-H: the handover failed; the old instance serves on");
            }
        }
        // The lines the link's connection brought (an owned link) go to the miners now here.
        conns.broadcast(Msg::LinkGo);
        match shared.link_adopted.load(Ordering::SeqCst) {
            // The old instance's connector read it: ours does now.
            n if n > 0 && owned => link.resume_owned(n - 1),
            // Its reader thread read it: ours (or the link's, in node mode) takes it over.
            _ => link.resume(),
        }
    }
    for a in conns.local_addrs() {
        info!(addr = %a, threads, upstreams = ?urls, "passthrough listening for miners");
    }
    let handle = conns.handle();
    let (handover_tx, handover_rx) = crossbeam_channel::bounded(1);
    let admin = {
        let (shared, link, handle, shutdown) = (
            Arc::clone(&shared),
            Arc::clone(&link),
            handle.clone(),
            Arc::clone(shutdown),
        );
        let urls = urls.clone();
        let node = node.clone();
        let redirect = redirect.clone();
        let stats: crate::web::JsonView = Arc::new(move || {
            let mut s = stats_json(&shared, &link, &handle, &urls);
            if let Some(r) = &redirect {
                s["mode"] = json!("redirector");
                s["redirect"] = r.stats();
            }
            if let Some(node) = &node {
                s["mode"] = json!("node");
                s["node"] = node.stats_json(Instant::now());
            }
            s
        });
        let handover = instance.is_some().then_some(handover_tx);
        (
            Arc::clone(&stats),
            start_admin(&admin_path, shutdown, handover, move || stats()),
        )
    };
    let (stats, admin) = admin;
    let admin = match admin {
        Ok(a) => a,
        Err(e) => {
            conns.shutdown();
            return Err(e).context("binding the admin socket");
        }
    };
    // The read-only HTTP listener (`webserver`), if configured: the admin `stats` and metrics
    // made of them.
    let web = match settings.webserver() {
        None => None,
        Some(addr) => {
            let counters = handle.clone();
            let ctx = crate::web::WebCtx::Link(crate::web::LinkCtx {
                stats,
                counters: Arc::new(move || counters.counters()),
                urls: urls.clone(),
                started: Instant::now(),
            });
            // After a handover the old instance frees the port moments after the commit.
            let wait = if handed_in {
                super::pool::WEB_HANDOVER_WAIT
            } else {
                Duration::ZERO
            };
            match crate::web::start(addr, ctx, wait) {
                Ok(w) => Some(w),
                Err(e) if handed_in => {
                    error!(addr, error = %e, "cannot bind the webserver after the handover; serving miners without it");
                    None
                }
                Err(e) => {
                    shutdown.store(true, Ordering::Relaxed);
                    conns.shutdown();
                    if admin.join().is_err() {
                        error!("the admin thread panicked");
                    }
                    return Err(e).with_context(|| format!("binding webserver {addr}"));
                }
            }
        }
    };

    let handed_over = route(
        &ev_rx,
        &own_rx,
        &conns,
        &shared,
        shutdown,
        settings.quiet,
        node.as_deref(),
        &handover_rx,
        &link,
        redirect.as_deref(),
    );

    shutdown.store(true, Ordering::Relaxed);
    if handed_over && let Some(i) = instance {
        // The pid file and the admin socket are the new instance's now.
        i.disown();
        info!("handed over to the new instance; exiting");
    }
    info!("shutting down");
    if let Some(web) = web {
        web.stop();
    }
    if handed_over {
        // Stopped before the connector, so that nothing more goes up from here.
        link.release();
    }
    conns.shutdown();
    if admin.join().is_err() {
        error!("the admin thread panicked");
    }
    match Arc::try_unwrap(link) {
        Ok(link) if !handed_over => link.shutdown(),
        Ok(_) => {}
        Err(_) => debug!("upstream link still shared at shutdown; dropped"),
    }
    info!("shutdown complete");
    Ok(())
}

/// The router: upstream events to the connector threads, until `shutdown`, or until a handover
/// committed (then true).
#[allow(
    clippy::too_many_arguments,
    reason = "the router's context, passed once"
)]
fn route(
    events: &Receiver<PassthroughEvent>,
    owned: &Receiver<OwnedLink>,
    connector: &Connector<Msg>,
    shared: &Shared,
    shutdown: &AtomicBool,
    quiet: bool,
    node: Option<&Node>,
    handovers: &Receiver<UnixStream>,
    link: &PassthroughLink,
    redirect: Option<&super::redirector::Redirects>,
) -> bool {
    let conns = &connector.handle();
    let threads = shared.inflight.len();
    let mut batches: Vec<Batch> = (0..threads).map(|_| (Vec::new(), 0)).collect();
    let mut last_status = Instant::now();
    while !shutdown.load(Ordering::Relaxed) {
        let first = crossbeam_channel::select! {
            recv(events) -> ev => match ev {
                Ok(ev) => Some(ev),
                Err(_) => {
                    error!("upstream link stopped");
                    return false;
                }
            },
            recv(owned) -> l => {
                if let Ok(l) = l {
                    adopt_link(connector, link, l);
                }
                None
            },
            recv(handovers) -> stream => {
                if let Ok(stream) = stream
                    && hand_over(
                        &stream,
                        PtGive {
                            conns: connector,
                            link,
                            events,
                            shared,
                            shutdown,
                            redirect,
                            node,
                            paused: RefCell::new(None),
                        },
                    )
                {
                    return true;
                }
                None
            },
            default(Duration::from_millis(200)) => None,
        };
        if let Some(ev) = first {
            let mut n = 0;
            let mut next = Some(ev);
            while let Some(ev) = next.take() {
                handle_event(ev, conns, shared, &mut batches, node, shutdown, None);
                n += 1;
                if n < ROUND {
                    next = events.try_recv().ok();
                }
            }
            send_batches(conns, shared, &mut batches, shutdown, None);
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
    false
}

/// Hands the link's new connection to connector thread 0, which reads it from now on (an owned
/// link); if it cannot, the link goes down (and fails over).
fn adopt_link(connector: &Connector<Msg>, link: &PassthroughLink, l: OwnedLink) {
    let stream = std::net::TcpStream::from(l.fd);
    let peer = stream
        .peer_addr()
        .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
    let state = ConnState {
        peer,
        listener: 0,
        partial: l.partial,
        unsent: Vec::new(),
        user: json!({ "link": l.serial }).to_string().into_bytes(),
    };
    let adopted = connector.adopt(0, vec![(OwnedFd::from(stream), state)]);
    match adopted.into_iter().next() {
        Some(Ok(conn)) => {
            debug!(%conn, index = l.index, serial = l.serial, "upstream link read by connector thread 0");
        }
        Some(Err(e)) => {
            warn!(error = %e, "the connector cannot take the upstream link's connection");
            link.lost(l.serial, format!("connector: {e}"));
        }
        None => link.lost(l.serial, "connector: no answer".to_owned()),
    }
}

/// Answers a handover request `ok` and hands over on it; true once committed (false: this
/// instance serves on, with every miner and its upstream link).
fn hand_over(stream: &UnixStream, give: PtGive<'_>) -> bool {
    info!("handover requested by a new instance");
    let mut s = stream;
    if let Err(e) = common::admin::write_message(&mut s, b"ok") {
        warn!(error = %e, "handover: cannot answer the new instance");
        return false;
    }
    match handover::give(give.conns, stream, &give) {
        handover::Outcome::Committed { connections } => {
            info!(
                connections,
                "handover: the new instance has every miner and the upstream link"
            );
            true
        }
        handover::Outcome::Failed(e) => {
            warn!(reason = %format!("{e:#}"), "handover failed; this instance serves on");
            false
        }
    }
}

fn handle_event(
    ev: PassthroughEvent,
    conns: &ConnectorHandle<Msg>,
    shared: &Shared,
    batches: &mut [Batch],
    node: Option<&Node>,
    shutdown: &AtomicBool,
    me: Option<usize>,
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
                    lines.push((conn, SendBuf::Owned(line)));
                }
                None => debug!(client_id, "line for an unknown miner dropped"),
            }
        }
        PassthroughEvent::Clients { client_ids, line } => {
            // One lookup of the table for the whole list.
            let table = shared.lock();
            let client_ids_len = client_ids.len();
            let mut unknown = 0usize;
            for id in client_ids {
                let target = u32::try_from(id)
                    .ok()
                    .and_then(|id| table.get(&id).copied());
                match target.and_then(|(t, conn)| Some((batches.get_mut(t)?, conn))) {
                    Some(((lines, bytes), conn)) => {
                        *bytes += line.len();
                        lines.push((conn, SendBuf::Shared(Arc::clone(&line))));
                    }
                    None => unknown += 1,
                }
            }
            drop(table);
            shared
                .lines_down
                .fetch_add((client_ids_len - unknown) as u64, Ordering::Relaxed);
            shared.multicasts.fetch_add(1, Ordering::Relaxed);
            if unknown > 0 {
                debug!(
                    unknown,
                    "multicast line for miners no longer here: those dropped"
                );
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
                        // The lines read before it go first.
                        if let Some(batch) = batches.get_mut(t) {
                            send_batch(conns, shared, t, batch, shutdown, me);
                        }
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
            // The epoch is bumped before the state says up, so a miner opened once it reads
            // "up" gets the new epoch.
            let switched = shared.state.load(Ordering::SeqCst) == UP;
            let epoch = shared.epoch.fetch_add(1, Ordering::SeqCst) + 1;
            shared.active.store(index, Ordering::Relaxed);
            shared.state.store(UP, Ordering::SeqCst);
            if switched {
                warn!(
                    index,
                    url, "upstream switched; replaying every miner's session there"
                );
            } else {
                info!(
                    index,
                    url, "upstream up; replaying live miners' sessions there"
                );
            }
            conns.broadcast(Msg::Replay(epoch));
        }
        PassthroughEvent::Down { index, reason } => {
            shared.state.store(DOWN, Ordering::SeqCst);
            shared.epoch.fetch_add(1, Ordering::SeqCst);
            warn!(
                index,
                reason,
                "upstream down; miners kept, their requests answered with an error until it is back"
            );
        }
        PassthroughEvent::Failed { index, reason } => {
            warn!(index, reason, "upstream connection failed");
        }
        PassthroughEvent::Link { line } => match node {
            Some(node) => node.on_link(&line),
            None => debug!(len = line.len(), "link message from the upstream ignored"),
        },
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
            "unwritten": link.unwritten(),
        },
        "miners": shared.lock().len(),
        "connections": counters
            .iter()
            .map(|c| c.open)
            .sum::<u64>()
            .saturating_sub(shared.link_conns.load(Ordering::Relaxed) as u64),
        "link_routed_in_place": shared.routed_in_place.load(Ordering::Relaxed),
        "link_routed_by_message": shared.routed_by_message.load(Ordering::Relaxed),
        "accepted": counters.iter().map(|c| c.accepted).sum::<u64>(),
        "lines_up": shared.lines_up.load(Ordering::Relaxed),
        "lines_down": shared.lines_down.load(Ordering::Relaxed),
        "multicasts": shared.multicasts.load(Ordering::Relaxed),
        "dropclients": shared.dropclients.load(Ordering::Relaxed),
        "ignored_commands": shared.ignored_commands.load(Ordering::Relaxed),
        "dropped_slow_upstream": shared.dropped_slow_upstream.load(Ordering::Relaxed),
        "replayed": shared.replayed.load(Ordering::Relaxed),
        "replay_closed": shared.replay_closed.load(Ordering::Relaxed),
        "rejected_down": shared.rejected_down.load(Ordering::Relaxed),
        "log_dropped": crate::logging::dropped(),
    })
}

/// The admin socket of this mode, in the pool's framing: `ping`, `stats`, `loglevel=N`,
/// `shutdown`; with `handover` (passthrough mode) also `restart` and `handover <version>`,
/// whose connection goes to the router. Anything else is `unknown`.
fn start_admin(
    path: &Path,
    shutdown: Arc<AtomicBool>,
    handover: Option<Sender<UnixStream>>,
    stats: impl Fn() -> serde_json::Value + Send + 'static,
) -> io::Result<JoinHandle<()>> {
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path)?;
    listener.set_nonblocking(true)?;
    thread::Builder::new().name("admin".into()).spawn(move || {
        while !shutdown.load(Ordering::Relaxed) {
            match listener.accept() {
                Ok((stream, _)) => {
                    if let Err(e) = serve_admin(stream, &shutdown, handover.as_ref(), &stats) {
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
    handover: Option<&Sender<UnixStream>>,
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
        "restart" | "handover" if handover.is_none() => {
            b"refused: this mode cannot hand over yet".to_vec()
        }
        _ if cmd.starts_with("handover ") && handover.is_none() => {
            warn!("handover request refused: this mode cannot hand over yet");
            b"refused: this mode cannot hand over yet".to_vec()
        }
        "restart" => match handover::restart() {
            Ok(pid) => format!("restarting {pid}").into_bytes(),
            Err(e) => format!("failed: {e}").into_bytes(),
        },
        _ if cmd.starts_with("handover ") => {
            match handover::version_refusal(cmd.trim_start_matches("handover ")) {
                Some(refusal) => {
                    warn!(%refusal, "handover request refused");
                    refusal.into_bytes()
                }
                None => {
                    // The router answers on this connection and hands over on it.
                    stream.set_read_timeout(None)?;
                    stream.set_write_timeout(None)?;
                    return match handover.map(|h| h.try_send(stream)) {
                        Some(Ok(())) => Ok(()),
                        Some(Err(e)) => {
                            let mut stream = e.into_inner();
                            common::admin::write_message(
                                &mut stream,
                                b"refused: a handover is already under way",
                            )
                        }
                        None => Ok(()),
                    };
                }
            }
        }
        _ => b"unknown".to_vec(),
    };
    common::admin::write_message(&mut stream, &reply)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing, reason = "test code")]

    use super::*;

    /// However often a round asks (the connector calls `on_batch_end` every 64 completions, and
    /// a thread's lines may come in several batches), it queues [`FANOUT_ROUND`] notifications;
    /// the next round, told by a new `now`, as many again.
    #[test]
    fn a_round_queues_at_most_its_share_of_a_fan_out() {
        let mut fan = FanBudget::default();
        let round = Instant::now();
        let taken = (0..10 * FANOUT_ROUND).filter(|_| fan.take(round)).count();
        assert_eq!(taken, FANOUT_ROUND);
        assert!(!fan.take(round));
        let next = round + Duration::from_micros(1);
        let taken = (0..10 * FANOUT_ROUND).filter(|_| fan.take(next)).count();
        assert_eq!(taken, FANOUT_ROUND);
    }

    fn sub_reply(id: &serde_json::Value, sid: &str, en1: &str, n2: u64) -> Vec<u8> {
        json!({"id": id, "result": [[["mining.notify", sid]], en1, n2], "error": null})
            .to_string()
            .into_bytes()
    }

    /// A miner that configured, subscribed, authorised and subscribed to extranonce changes.
    fn handshaken(xsub: bool) -> Handshake {
        let mut hs = Handshake::default();
        for (kind, line) in [
            (
                Kind::Configure,
                r#"{"id":1,"method":"mining.configure","params":[["version-rolling"],{}]}"#,
            ),
            (
                Kind::Subscribe,
                r#"{"id":2,"method":"mining.subscribe","params":["cgminer/4"]}"#,
            ),
            (
                Kind::Authorize,
                r#"{"id":3,"method":"mining.authorize","params":["u.w","x"]}"#,
            ),
        ] {
            assert_eq!(Kind::of(line.as_bytes()), Some(kind));
            hs.keep(kind, line.as_bytes());
        }
        if xsub {
            let l = br#"{"id":4,"method":"mining.extranonce.subscribe","params":[]}"#;
            assert_eq!(Kind::of(l), Some(Kind::ExtranonceSubscribe));
            hs.keep(Kind::ExtranonceSubscribe, l);
        }
        // Mid-handshake: no replay possible.
        assert!(hs.replay().is_none());
        assert!(matches!(
            hs.downstream(&sub_reply(&json!(2), "aa01", "0a0b0c0d", 8)),
            Down::Forward
        ));
        assert!(hs.replay().is_none());
        let auth = br#"{"id":3,"result":true,"error":null}"#;
        assert!(matches!(hs.downstream(auth), Down::Forward));
        hs
    }

    #[test]
    fn submits_are_not_handshake_lines() {
        let l = br#"{"id":9,"method":"mining.submit","params":["mining.subscribe","1","00","00","00"]}"#;
        assert_eq!(Kind::of(l), None);
        assert_eq!(
            Kind::of(br#"{"id":9,"method":"mining.suggest_difficulty","params":[8]}"#),
            None
        );
    }

    #[test]
    fn replay_resumes_and_swallows_its_replies() {
        let mut hs = handshaken(true);
        let lines = hs.replay().unwrap();
        let vs: Vec<serde_json::Value> = lines
            .iter()
            .map(|l| serde_json::from_slice(l).unwrap())
            .collect();
        let methods: Vec<&str> = vs.iter().map(|v| v["method"].as_str().unwrap()).collect();
        assert_eq!(
            methods,
            [
                "mining.configure",
                "mining.subscribe",
                "mining.authorize",
                "mining.extranonce.subscribe"
            ]
        );
        assert_eq!(vs[1]["params"], json!(["cgminer/4", "aa01"]));
        assert_eq!(vs[2]["params"], json!(["u.w", "x"]));
        for v in &vs {
            assert!(v["id"].as_str().unwrap().starts_with(REPLAY_ID), "{v}");
        }
        // Same extranonce: every reply swallowed.
        let conf = json!({"id": vs[0]["id"], "result": {"version-rolling": true}, "error": null});
        assert!(matches!(
            hs.downstream(conf.to_string().as_bytes()),
            Down::Consume
        ));
        assert!(matches!(
            hs.downstream(&sub_reply(&vs[1]["id"], "bb02", "0a0b0c0d", 8)),
            Down::Consume
        ));
        let auth = json!({"id": vs[2]["id"], "result": true, "error": null});
        assert!(matches!(
            hs.downstream(auth.to_string().as_bytes()),
            Down::Consume
        ));
        // Notifies and ordinary replies pass.
        assert!(matches!(
            hs.downstream(br#"{"id":null,"method":"mining.notify","params":[]}"#),
            Down::Forward
        ));
        // The next replay resumes the new session.
        let again = hs.replay().unwrap();
        let v: serde_json::Value = serde_json::from_slice(&again[1]).unwrap();
        assert_eq!(v["params"], json!(["cgminer/4", "bb02"]));
        // Another extranonce: set_extranonce to a subscribed miner.
        match hs.downstream(&sub_reply(&v["id"], "cc03", "01020304", 4)) {
            Down::Replace(l) => {
                let l: serde_json::Value = serde_json::from_slice(&l).unwrap();
                assert_eq!(l["method"], "mining.set_extranonce");
                assert_eq!(l["params"], json!(["01020304", 4]));
            }
            _ => panic!("expected set_extranonce"),
        }
    }

    #[test]
    fn changed_extranonce_without_subscription_reconnects_and_refusals_close() {
        let mut hs = handshaken(false);
        let lines = hs.replay().unwrap();
        assert_eq!(lines.len(), 3);
        let id = json!(format!("{REPLAY_ID}subscribe"));
        match hs.downstream(&sub_reply(&id, "dd04", "ffffffff", 8)) {
            Down::Replace(l) => assert!(find(&l, b"client.reconnect")),
            _ => panic!("expected client.reconnect"),
        }
        let auth = json!({"id": format!("{REPLAY_ID}authorize"), "result": false, "error": null});
        assert!(matches!(
            hs.downstream(auth.to_string().as_bytes()),
            Down::Close
        ));
        let refused = json!({"id": id, "result": null, "error": [20, "no", null]});
        assert!(matches!(
            hs.downstream(refused.to_string().as_bytes()),
            Down::Close
        ));
    }

    #[test]
    fn replay_ids_are_looked_for_only_for_a_while() {
        let mut hs = handshaken(false);
        let t = Instant::now();
        assert_eq!(hs.replay_at(t).unwrap().len(), 3);
        let conf = json!({"id": format!("{REPLAY_ID}configure"), "result": true, "error": null});
        let conf = conf.to_string().into_bytes();
        assert!(matches!(hs.downstream_at(&conf, t), Down::Consume));
        assert!(matches!(
            hs.downstream_at(&conf, t + REPLAY_WINDOW),
            Down::Forward
        ));
        assert_eq!(hs.replay_until, None);
    }

    #[test]
    fn a_miner_travels_whole_in_a_handover() {
        let now = Instant::now();
        let mut hs = handshaken(true);
        hs.replay_at(now).unwrap();
        hs.keep(
            Kind::Authorize,
            br#"{"id":9,"method":"mining.authorize","params":["u.x","x"]}"#,
        );
        let m = Miner {
            client_id: 77,
            epoch: 3,
            address: Arc::from("10.0.0.9"),
            server: 1,
            hs: Some(Box::new(hs)),
        };
        let back = Miner::import(&m.export(now), 5, now).unwrap();
        assert_eq!((back.client_id, back.epoch, back.server), (77, 5, 1));
        assert_eq!(&*back.address, "10.0.0.9");
        let (a, b) = (m.hs.unwrap(), back.hs.unwrap());
        assert_eq!(a.configure, b.configure);
        assert_eq!(a.subscribe, b.subscribe);
        assert_eq!(a.authorize, b.authorize);
        assert_eq!((a.xsub, a.unreplayable), (b.xsub, b.unreplayable));
        assert_eq!(a.awaiting, b.awaiting);
        assert_eq!(b.awaiting, vec![(json!(9), Kind::Authorize)]);
        assert_eq!(a.session, b.session);
        assert_eq!(a.extranonce1, b.extranonce1);
        assert_eq!(a.nonce2_len, b.nonce2_len);
        assert!(b.replay_until.is_some_and(|t| t > now));
        // A miner with no handshake yet, and garbage.
        let bare = Miner {
            client_id: 1,
            epoch: 0,
            address: Arc::from("::1"),
            server: 0,
            hs: None,
        };
        assert!(
            Miner::import(&bare.export(now), 0, now)
                .unwrap()
                .hs
                .is_none()
        );
        assert!(Miner::import(&json!({}), 0, now).is_none());
        assert!(
            Miner::import(
                &json!({"client_id": 4_294_967_296_u64, "address": "a", "server": 0, "hs": null}),
                0,
                now
            )
            .is_none()
        );
    }

    #[test]
    fn the_link_state_travels_and_only_to_a_passthrough() {
        let (a, _b) = UnixStream::pair().unwrap();
        let h = LinkHandover {
            fd: OwnedFd::from(a.try_clone().unwrap()),
            index: 2,
            partial: b"{\"client_id\":7,".to_vec(),
            session: Vec::new(),
        };
        let blob = export_link_state(&h, 1234, "redirector", Some(json!({"next": 1})));
        let (back, next_id, redirect) =
            import_link_state(&blob, OwnedFd::from(a.try_clone().unwrap()), "redirector").unwrap();
        assert_eq!((back.index, next_id), (2, 1234));
        assert_eq!(back.partial, h.partial);
        assert_eq!(redirect, json!({"next": 1}));
        // Only to the same mode.
        let err = import_link_state(&blob, OwnedFd::from(a), "passthrough").unwrap_err();
        assert!(format!("{err}").contains("redirector"), "{err}");
        let (c, _d) = UnixStream::pair().unwrap();
        let pool_state = [1u8, 2, 3];
        assert!(import_link_state(&pool_state, OwnedFd::from(c), "passthrough").is_err());
    }

    #[test]
    fn too_long_or_bad_lines_make_a_miner_unreplayable() {
        let mut hs = Handshake::default();
        let long = format!(
            r#"{{"id":2,"method":"mining.subscribe","params":["{}"]}}"#,
            "a".repeat(MAX_KEPT_LINE)
        );
        hs.keep(Kind::Subscribe, long.as_bytes());
        assert!(hs.replay().is_none());
        let mut hs = Handshake::default();
        hs.keep(Kind::Authorize, b"not json \"mining.authorize\"");
        assert!(hs.replay().is_none());
        // Never subscribed: nothing to replay.
        assert_eq!(Handshake::default().replay(), Some(Vec::new()));
        // Awaiting ids stay bounded.
        let mut hs = Handshake::default();
        for i in 0..100 {
            let l = format!(r#"{{"id":{i},"method":"mining.authorize","params":["u","x"]}}"#);
            hs.keep(Kind::Authorize, l.as_bytes());
        }
        assert_eq!(hs.awaiting.len(), MAX_AWAITING);
    }
}
