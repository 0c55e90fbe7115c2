//! How the connector threads hand their events to the stratifier: two variants, chosen at start
//! (`"handoff"` in the config, `--handoff`, `POOL_HANDOFF`), so that they can be measured side by
//! side.
//!
//! * **inline**: each connector thread runs its own [`Shard`] in its callbacks. No queue, no
//!   wake-up, no copy; share checking runs on the thread that does the I/O.
//! * **queue** (DESIGN.md's layout): each connector thread `t` has a stratifier thread
//!   `stratifier-t`, pinned to the same CPU, that owns the shard. See [`QueueHandler`] for the
//!   connector side and [`run_shard`] for the stratifier side.
//!
//! ## The queue variant
//!
//! During one round of its event loop the connector thread appends what happened (opens with
//! the peer and listener, lines, closes, ticks, jobs) to a [`Batch`]. A line's bytes are copied
//! into the batch's one byte arena and the event keeps a range into it, so a line costs no
//! allocation of its own. At the end of the round ([`connector::Handler::on_batch_end`]) a
//! non-empty batch goes to the stratifier thread, one message per round.
//!
//! The batches travel through a [`crate::relay`] queue: the stratifier thread blocks in it,
//! parked, and a send wakes it only when it is registered as parked, so a busy stratifier thread
//! costs the connector a queue push per round and no system call. Once awake it takes what is
//! queued (up to [`DRAIN_BATCHES`] batches), runs the shard on every event, and sends everything
//! the shard wrote (replies, shared notifies, closes, in order) back as one [`Msg::Output`]
//! through [`connector::ConnectorHandle::send`], which wakes the connector thread only if it is
//! parked too. The connector applies the output to its outbox in order, so per connection a reply
//! never overtakes an earlier one and a close comes after its replies. Once the shard has closed
//! a connection, the stratifier thread drops the rest of its input and output, as the connector
//! does inline.
//!
//! Emptied buffers travel back: the relay returns each batch (cleared, its capacity kept up to a
//! cap) to the connector thread, and the connector returns each output vector the same way
//! ([`relay::spares`]), so in steady state the handoff allocates nothing per line.
//!
//! Each connector thread starts its own stratifier thread when it builds its handler, and joins
//! it when it drops the handler: a start that `connector::start` abandons (io_uring set up on
//! some threads, then refused, then epoll) leaves no stratifier state behind for the next one.
//!
//! The [`connector::ConnectorHandle`] only exists once `connector::start` has returned, while
//! connections may be accepted before that: [`start`] broadcasts it as [`Msg::Start`], each
//! connector thread forwards it in its event stream, and a stratifier thread keeps what the shard
//! wrote until it has the handle. Nothing is lost and nothing races.
//!
//! Shutdown: a connector thread closes its connections (closes into its last batch, which it
//! sends), then drops its handler, which closes the queue and joins the stratifier thread; that
//! one runs what is queued and exits at the end of the queue. Output it sends after the connector
//! is gone is dropped, and a close for a connection the connector has already closed is ignored
//! (ids carry a generation, so it cannot reach a newer connection).

use std::collections::HashSet;
use std::io;
use std::mem;
use std::net::SocketAddr;
use std::ops::Range;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use common::ConnId;
use common::histogram::{Histogram, Snapshot};
use connector::{Action, CloseReason, Connector, ConnectorHandle, Outbox, SendBuf};
use generator::{BlockSubmission, BlockSubmitter};
use std::sync::atomic::{AtomicU16, Ordering};

use stratifier::{ClientId, Job, Pool, Shard, ShareRecord, SourceId, UpstreamShare};
use tracing::{debug, error, info, warn};

use crate::journal::JournalWriter;
use crate::links::{LinkConfig, Links};
use crate::relay::{self, Consumer, Producer, Recycle, SpareReturn, SpareTake};

/// Batches a stratifier thread handles before it sends what they produced back, so replies go
/// out even when the connector keeps it busy.
const DRAIN_BATCHES: usize = 64;
/// Emptied batches and output vectors kept for reuse, per direction and thread.
const SPARE: usize = 8;
/// Events a recycled batch keeps room for (a burst may leave far more capacity).
const KEEP_EVENTS: usize = 4096;
/// Arena bytes a recycled batch keeps.
const KEEP_ARENA: usize = 256 * 1024;
/// Actions a recycled output vector keeps (a job notify to every miner may leave more).
const KEEP_ACTIONS: usize = 4096;

/// Submit latency slots: connector thread `t` writes slot `t % SUBMIT_SLOTS`.
const SUBMIT_SLOTS: usize = 64;

/// One thread's submit latency, on cache lines of its own.
#[repr(align(128))]
struct SubmitSlot(Histogram);

/// The submit latency of every connector thread: the time from the start of the connector
/// round that read a `mining.submit` line to the end of the shard's handling of that round
/// (inline: the reply is in the outbox; queue: the stratifier thread has handled the batch).
/// A process-wide figure, read by the metrics endpoint through [`submit_latency`].
static SUBMIT_LATENCY: [SubmitSlot; SUBMIT_SLOTS] =
    [const { SubmitSlot(Histogram::new()) }; SUBMIT_SLOTS];

fn submit_latency_slot(thread: usize) -> &'static Histogram {
    // `thread % SUBMIT_SLOTS < SUBMIT_SLOTS`, the array's length.
    &SUBMIT_LATENCY[thread % SUBMIT_SLOTS].0
}

/// Every connector thread's submit latency together (see [`SUBMIT_LATENCY`]).
pub(crate) fn submit_latency() -> Snapshot {
    let mut total = Snapshot::default();
    for slot in &SUBMIT_LATENCY {
        total.merge(&slot.0.snapshot());
    }
    total
}

/// How connector threads hand events to the stratifier.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Handoff {
    /// The shard runs inside the connector thread's callbacks.
    Inline,
    /// Batches through a queue to a stratifier thread per connector thread.
    Queue,
}

impl Handoff {
    /// From its configuration name (`"inline"`, `"queue"`).
    pub(crate) fn from_name(name: &str) -> Option<Self> {
        match name {
            "inline" => Some(Self::Inline),
            "queue" => Some(Self::Queue),
            _ => None,
        }
    }

    /// Its configuration name.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Inline => "inline",
            Self::Queue => "queue",
        }
    }
}

impl std::fmt::Display for Handoff {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Message from the daemon (or a stratifier thread) to a connector thread.
#[derive(Clone)]
pub(crate) enum Msg {
    /// A new job to notify.
    Job(Arc<Job>),
    /// Queue mode: what this thread's stratifier thread wrote, in order.
    Output(Vec<Action>),
    /// Queue mode: the handle the stratifier threads answer through (sent once, after start).
    Start(ConnectorHandle<Self>),
    /// Handover ([`settle`]): answer on the sender once every line read so far has been judged
    /// and its replies are in the connector's outbox; from then on a stratifier thread holds its
    /// output (for the exports) until [`Msg::Release`].
    Settle(crossbeam_channel::Sender<()>),
    /// Queue mode: a stratifier thread's answer to [`Msg::Settle`], after its output.
    Settled(crossbeam_channel::Sender<()>),
    /// Handover called off ([`release`]): stratifier threads send their output again.
    Release,
    /// A change to every shard's sessions (proxy modes).
    Cmd(ShardCmd),
    /// A `block` message for every node link ([`crate::links::LinkRegistry::broadcast_block`]).
    NodeBlock(Arc<[u8]>),
}

/// A handover's first step after the connector's quiesce: waits (until `deadline`) until every
/// line the connector threads read has been judged and what the shards wrote is in the
/// connector's outboxes (travelling with the exported connections), and makes the queue
/// variant's stratifier threads hold their output from then on. False at the deadline.
pub(crate) fn settle(conns: &Connector<Msg>, deadline: Instant) -> bool {
    let threads = conns.threads();
    let (tx, rx) = crossbeam_channel::bounded(threads);
    conns.broadcast(Msg::Settle(tx));
    (0..threads).all(|_| rx.recv_deadline(deadline).is_ok())
}

/// Undoes [`settle`] (the handover failed): the stratifier threads send their output again.
pub(crate) fn release(conns: &Connector<Msg>) {
    conns.broadcast(Msg::Release);
}

/// How long a queue-mode connector thread waits for its stratifier thread to export a session.
const EXPORT_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// What travels in a handed-over connection's [`connector::ConnState::user`]: a flags byte
/// ([`CLOSE_AFTER`]), the session's length (`u32`, little-endian, 0 for none) and bytes
/// ([`Shard::export_session`]), then the bytes the shard had written for it and the connector
/// had not yet taken (queue variant), to send first. Empty for a connection with no session.
fn wrap_session(state: &mut Vec<u8>, session: Option<&[u8]>, extra: &[u8], close: bool) {
    wrap_state(state, session, extra, if close { CLOSE_AFTER } else { 0 });
}

/// [`wrap_session`] for a passthrough link: `link` is [`Links::export_link`]'s bytes, in the
/// session's place, flagged [`LINK`].
fn wrap_link(state: &mut Vec<u8>, link: &[u8], extra: &[u8]) {
    wrap_state(state, Some(link), extra, LINK);
}

fn wrap_state(state: &mut Vec<u8>, session: Option<&[u8]>, extra: &[u8], flags: u8) {
    if session.is_none() && extra.is_empty() && flags == 0 {
        return;
    }
    let session = session.unwrap_or_default();
    state.push(flags);
    state.extend_from_slice(
        &u32::try_from(session.len())
            .unwrap_or(u32::MAX)
            .to_le_bytes(),
    );
    state.extend_from_slice(session);
    state.extend_from_slice(extra);
}

/// Flag of [`wrap_session`]: the shard had closed the connection (close it after the bytes).
const CLOSE_AFTER: u8 = 1;
/// Flag of [`wrap_link`]: the connection is a passthrough link; the session is its state.
const LINK: u8 = 2;

/// A handed-over connection's state read back: (session, or a link's state with [`LINK`];
/// bytes to send first; flags).
type Wrapped<'a> = (Option<&'a [u8]>, &'a [u8], u8);

/// Reads what [`wrap_session`] wrote (`None`: malformed).
fn unwrap_session(state: &[u8]) -> Option<Wrapped<'_>> {
    if state.is_empty() {
        return Some((None, &[], 0));
    }
    let (&flags, rest) = state.split_first()?;
    let (len, rest) = rest.split_first_chunk::<4>()?;
    let len = usize::try_from(u32::from_le_bytes(*len)).ok()?;
    if rest.len() < len {
        return None;
    }
    let (session, extra) = rest.split_at(len);
    Some(((len > 0).then_some(session), extra, flags))
}

/// Adopts a handed-over session into `shard` for connection `conn`; on failure (another
/// build's format, an extranonce1 in use...) the connection starts afresh and is closed, so
/// its miner reconnects cleanly rather than submit on a session this process does not know.
#[expect(clippy::too_many_arguments, reason = "the callback's own arguments")]
fn adopt_into(
    shard: &mut Shard,
    now: Instant,
    conn: ConnId,
    peer: SocketAddr,
    listener: usize,
    session: Option<&[u8]>,
    close: bool,
    out: &mut dyn stratifier::Out,
) {
    let adopted = match session {
        None => {
            shard.on_open(now, conn, peer, listener);
            true
        }
        Some(s) => match shard.adopt_session(now, conn, peer, listener, s) {
            Ok(()) => true,
            Err(e) => {
                warn!(%conn, %peer, error = %e, "handed-over session refused; closing the connection");
                shard.on_open(now, conn, peer, listener);
                false
            }
        },
    };
    if close || !adopted {
        out.close(ClientId::Direct(conn));
    }
}

/// A change the daemon makes to every shard's sessions (proxy modes), or an admin command
/// (`crate::admin`) run on the shards.
#[derive(Clone, Debug)]
pub(crate) enum ShardCmd {
    /// [`Shard::limit_source_diff`].
    LimitDiff {
        /// The work source.
        source: SourceId,
        /// The upstream's difficulty.
        max: common::Difficulty,
    },
    /// [`Shard::move_source`].
    Move {
        /// The old source.
        from: SourceId,
        /// The new one.
        to: SourceId,
    },
    /// Userproxy: the verdict on a miner's authorisation ([`Shard::finish_authorise`]), sent
    /// to the thread that owns the miner.
    Authorised {
        /// The miner.
        client: stratifier::ClientId,
        /// The verdict.
        verdict: stratifier::AuthVerdict,
    },
    /// Admin `dropclient=ID` / `reconnclient=ID` ([`Shard::drop_client`]): sent to the thread
    /// that owns `conn`.
    Drop {
        /// The client's connection.
        conn: ConnId,
        /// `reconnclient`: `client.reconnect` first.
        reconnect: Option<Arc<stratifier::ReconnectTo>>,
    },
    /// Admin `dropall` / `reconnect[:url,port]` ([`Shard::drop_all`]).
    DropAll {
        /// `reconnect`: `client.reconnect` with these params first.
        reconnect: Option<Arc<stratifier::ReconnectTo>>,
    },
    /// Admin `clients` / `getclient` ([`Shard::client_infos`]): the answer goes on `reply`.
    Clients {
        /// At most this many clients listed.
        max: usize,
        /// Only this client.
        only: Option<ConnId>,
        /// (clients of the shard, the listed ones).
        reply: crossbeam_channel::Sender<(usize, Vec<stratifier::ClientInfo>)>,
    },
}

impl ShardCmd {
    fn run(self, now: Instant, shard: &mut Shard, out: &mut impl stratifier::Out) {
        match self {
            Self::LimitDiff { source, max } => {
                let n = shard.limit_source_diff(now, source, max, out);
                if n > 0 {
                    debug!(
                        source = source.0,
                        lowered = n,
                        "miners lowered to the upstream difficulty"
                    );
                }
            }
            Self::Move { from, to } => {
                let (told, reconnected) = shard.move_source(now, from, to, out);
                debug!(
                    from = from.0,
                    to = to.0,
                    told,
                    reconnected,
                    "miners moved to a new work source"
                );
            }
            Self::Authorised { client, verdict } => {
                if !shard.finish_authorise(now, client, &verdict, out) {
                    debug!(%client, "verdict for an authorisation no longer waiting");
                }
            }
            Self::Drop { conn, reconnect } => {
                if !shard.drop_client(conn, reconnect.as_deref(), out) {
                    debug!(%conn, "admin: no such client to drop");
                }
            }
            Self::DropAll { reconnect } => {
                let n = shard.drop_all(reconnect.as_deref(), out);
                debug!(
                    clients = n,
                    reconnect = reconnect.is_some(),
                    "admin: clients dropped"
                );
            }
            Self::Clients { max, only, reply } => {
                // The admin thread may have given up waiting: nothing to do then.
                let _ = reply.send(shard.client_infos(max, only));
            }
        }
    }
}

/// Where the stratifier's events go: block candidates to the generator's submitter, share
/// records to the share log's writer (when `-L` is on). Each shard has its own copy.
#[derive(Clone)]
pub(crate) struct Sinks {
    /// Solved blocks (`None` only in unit tests, where a block is logged as not submitted).
    pub(crate) blocks: Option<BlockSubmitter>,
    /// The share log's sink, if the share log is on.
    pub(crate) shares: Option<Arc<dyn Fn(ShareRecord) + Send + Sync>>,
    /// Proxy modes: shares for the upstream.
    pub(crate) upstream: Option<Arc<dyn Fn(UpstreamShare) + Send + Sync>>,
    /// Proxy modes: the work source new connections mine on (the pool's own when `None`).
    pub(crate) source: Option<Arc<AtomicU16>>,
    /// Userproxy: authorisations for the daemon to decide.
    pub(crate) auth: Option<Arc<dyn Fn(stratifier::AuthRequest) + Send + Sync>>,
    /// Pool mode: the links, whose node links are sent each block found.
    pub(crate) nodes: Option<Arc<crate::links::LinkRegistry>>,
    /// The share journal (pool and solo modes): each shard's thread writes its accepted shares
    /// there at the end of each round, before the round's replies go out.
    pub(crate) journal: Option<Arc<crate::journal::Journal>>,
}

impl std::fmt::Debug for Sinks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sinks")
            .field("blocks", &self.blocks)
            .field("shares", &self.shares.is_some())
            .field("upstream", &self.upstream.is_some())
            .finish_non_exhaustive()
    }
}

impl Sinks {
    fn wants_shares(&self) -> bool {
        self.shares.is_some()
    }

    /// The work source a new connection mines on.
    fn open_source(&self) -> SourceId {
        self.source
            .as_ref()
            .map_or(SourceId::TEMPLATE, |s| SourceId(s.load(Ordering::Acquire)))
    }

    fn event(&self, ev: stratifier::Event) {
        match ev {
            stratifier::Event::Block(b) => {
                // Nodes first, as ckpool: one of them may reach the network sooner.
                if let (Some(nodes), Some(solve)) = (&self.nodes, &b.solve) {
                    nodes.broadcast_block(solve);
                }
                match (&self.blocks, b.hex) {
                    (Some(blocks), Some(hex)) => blocks.submit(BlockSubmission {
                        hash: b.hash,
                        height: b.height,
                        hex,
                    }),
                    // Upstream work (proxy mode): the share goes upstream, which has the
                    // transactions and submits the block.
                    (_, None) => {
                        info!(hash = %b.hash, source = b.source.0, "block solved on upstream work; the share goes upstream");
                    }
                    (None, Some(hex)) => {
                        error!(hash = %b.hash, height = b.height, block_hex = %hex, "no block submitter; block NOT submitted");
                    }
                }
            }
            stratifier::Event::Share(rec) => {
                if let Some(sink) = &self.shares {
                    sink(rec);
                }
            }
            stratifier::Event::Upstream(share) => match &self.upstream {
                Some(sink) => sink(share),
                None => {
                    debug!(client = %share.client, "share for an upstream with no upstream link; dropped")
                }
            },
            stratifier::Event::Authorise(req) => match &self.auth {
                Some(sink) => sink(req),
                None => {
                    warn!(client = %req.client, "authorisation for nobody to decide; it times out");
                }
            },
        }
    }
}

/// The connection of a direct client. Output for a sub-client (a miner behind a passthrough)
/// is framed for its link by [`crate::links`] and reaches here addressed to the link's
/// connection; one that was not is dropped with a debug line.
fn direct(client: ClientId) -> Option<ConnId> {
    match client {
        ClientId::Direct(conn) => Some(conn),
        ClientId::Sub(..) => {
            debug!(%client, "unframed output for a sub-client dropped");
            None
        }
    }
}

/// Starts the connector threads with the stratifier attached as `handoff` says.
/// `links` says on which listeners clients may become passthroughs ([`crate::links`]).
pub(crate) fn start(
    handoff: Handoff,
    cfg: connector::Config,
    pool: Arc<Pool>,
    sinks: Sinks,
    links: LinkConfig,
) -> io::Result<Connector<Msg>> {
    let pin = connector::pins(cfg.pin, cfg.threads);
    let inline = move |t: usize, pool: &Arc<Pool>, sinks: &Sinks, links: &LinkConfig| {
        let mut shard = Shard::new(Arc::clone(pool));
        let journal = journal_for(&mut shard, sinks, t);
        StratumHandler::Inline(InlineHandler {
            shard,
            links: Links::new(links),
            sinks: sinks.clone(),
            thread: t,
            timed: 0,
            journal,
        })
    };
    let conns = connector::start(cfg, move |t| match handoff {
        Handoff::Inline => inline(t, &pool, &sinks, &links),
        Handoff::Queue => {
            let shard_links = Links::new(&links);
            match QueueHandler::new(
                t,
                Shard::new(Arc::clone(&pool)),
                shard_links,
                sinks.clone(),
                pin,
            ) {
                Ok(h) => StratumHandler::Queue(h),
                Err(e) => {
                    // Only when the system is out of threads; this thread's miners are still served.
                    error!(thread = t, error = %e, "cannot start a stratifier thread; this connector thread runs its shard inline");
                    inline(t, &pool, &sinks, &links)
                }
            }
        }
    })?;
    if handoff == Handoff::Queue {
        conns.broadcast(Msg::Start(conns.handle()));
    }
    Ok(conns)
}

/// Turns on `shard`'s journal lines and gives thread `t` its journal writer, if the pool keeps
/// a journal.
fn journal_for(shard: &mut Shard, sinks: &Sinks, t: usize) -> Option<JournalWriter> {
    sinks.journal.as_ref().map(|j| {
        shard.enable_journal();
        j.writer(t)
    })
}

/// Writes what `shard` journaled this round (before the round's replies go out).
fn flush_journal(shard: &mut Shard, journal: &mut Option<JournalWriter>) {
    if let (Some(w), Some(lines)) = (journal.as_mut(), shard.journal()) {
        w.flush(lines);
    }
}

/// The connector thread's handler: one of the two variants (a predictable branch per callback).
#[expect(
    clippy::large_enum_variant,
    reason = "one per connector thread, built once; boxing would add a pointer chase per event inline"
)]
enum StratumHandler {
    Inline(InlineHandler),
    Queue(QueueHandler),
}

impl connector::Handler for StratumHandler {
    type Msg = Msg;

    fn on_open(
        &mut self,
        now: Instant,
        conn: ConnId,
        peer: SocketAddr,
        listener: usize,
        out: &mut Outbox,
    ) {
        match self {
            Self::Inline(h) => {
                let source = h.sinks.open_source();
                h.links
                    .on_open(&mut h.shard, now, conn, peer, listener, source);
            }
            Self::Queue(h) => h.on_open(now, conn, peer, listener, out),
        }
    }

    fn on_line(&mut self, now: Instant, conn: ConnId, line: &[u8], out: &mut Outbox) {
        match self {
            Self::Inline(h) => {
                let InlineHandler {
                    shard,
                    links,
                    sinks,
                    ..
                } = h;
                links.on_line(
                    shard,
                    now,
                    conn,
                    line,
                    &mut OutboxOut { outbox: out, sinks },
                );
            }
            Self::Queue(h) => h.on_line(now, conn, line, out),
        }
    }

    fn on_close(&mut self, now: Instant, conn: ConnId, _reason: CloseReason) {
        match self {
            Self::Inline(h) => h.links.on_close(&mut h.shard, now, conn),
            Self::Queue(h) => h.push(Event::Close { now, conn }),
        }
    }

    fn on_msg(&mut self, now: Instant, msg: Msg, out: &mut Outbox) {
        match self {
            Self::Inline(h) => match msg {
                Msg::Job(job) => {
                    let InlineHandler {
                        shard,
                        links,
                        sinks,
                        ..
                    } = h;
                    let out = &mut OutboxOut { outbox: out, sinks };
                    links.on_job(shard, now, &job, out);
                }
                // Inline, what the shard wrote is in the outbox already.
                Msg::Settle(tx) => {
                    let _ = tx.send(());
                }
                Msg::Release => {}
                Msg::Output(_) | Msg::Start(_) | Msg::Settled(_) => {
                    debug!("queue-mode message ignored inline");
                }
                Msg::Cmd(cmd) => {
                    let InlineHandler { shard, sinks, .. } = h;
                    cmd.run(now, shard, &mut OutboxOut { outbox: out, sinks });
                }
                Msg::NodeBlock(line) => {
                    let InlineHandler { links, sinks, .. } = h;
                    links.on_node_block(&line, &mut OutboxOut { outbox: out, sinks });
                }
            },
            Self::Queue(h) => h.on_msg(now, msg, out),
        }
    }

    fn on_tick(&mut self, now: Instant, out: &mut Outbox) {
        match self {
            Self::Inline(h) => {
                let InlineHandler {
                    shard,
                    links,
                    sinks,
                    ..
                } = h;
                links.on_tick(shard, now, &mut OutboxOut { outbox: out, sinks });
            }
            Self::Queue(h) => h.push(Event::Tick { now }),
        }
    }

    fn on_batch_end(&mut self, now: Instant, _out: &mut Outbox) {
        match self {
            Self::Inline(h) => {
                flush_journal(&mut h.shard, &mut h.journal);
                h.time_replies(now);
            }
            Self::Queue(h) => h.send_batch(),
        }
    }

    fn on_export(&mut self, now: Instant, conn: ConnId, state: &mut Vec<u8>) {
        match self {
            Self::Inline(h) => {
                if let Some(link) = h.links.export_link(&mut h.shard, now, conn) {
                    wrap_link(state, &link, &[]);
                } else {
                    let session = h.shard.export_session(now, conn);
                    wrap_session(state, session.as_deref(), &[], false);
                }
            }
            Self::Queue(h) => h.on_export(now, conn, state),
        }
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
        let Some((session, extra, flags)) = unwrap_session(state) else {
            warn!(%conn, %peer, "malformed handed-over connection state; closing the connection");
            self.on_open(now, conn, peer, listener, out);
            out.close(conn);
            return;
        };
        if !extra.is_empty() {
            out.send(conn, extra.to_vec());
        }
        let (close, link) = (flags & CLOSE_AFTER != 0, flags & LINK != 0);
        match self {
            Self::Inline(h) => {
                let InlineHandler {
                    shard,
                    sinks,
                    links,
                    ..
                } = h;
                let mut o = OutboxOut { outbox: out, sinks };
                if link {
                    let state = session.unwrap_or_default();
                    if !links.adopt_link(shard, now, conn, peer, listener, state, &mut o) {
                        warn!(%conn, %peer, "malformed handed-over passthrough link; closing it");
                        shard.on_open(now, conn, peer, listener);
                        stratifier::Out::close(&mut o, ClientId::Direct(conn));
                    }
                } else {
                    adopt_into(shard, now, conn, peer, listener, session, close, &mut o);
                }
            }
            Self::Queue(h) => h.on_adopt(now, conn, peer, listener, session, flags, out),
        }
    }
}

/// Inline: the shard runs in the connector's callbacks.
struct InlineHandler {
    shard: Shard,
    links: Links,
    sinks: Sinks,
    /// The connector thread's index (its submit latency slot).
    thread: usize,
    /// The shard's [`Shard::submits`] as of the last round timed.
    timed: u64,
    /// This thread's share journal writer, if the pool keeps one.
    journal: Option<JournalWriter>,
}

impl InlineHandler {
    /// The end of a connector round that started at `round`: the submits judged since the last
    /// round have had their replies queued, so each took (at most) the round's time so far.
    /// One clock read, and only in rounds with submits.
    fn time_replies(&mut self, round: Instant) {
        let n = self.shard.submits();
        if n != self.timed {
            submit_latency_slot(self.thread).observe_n(round.elapsed(), n - self.timed);
            self.timed = n;
        }
    }
}

/// The shard's output written straight into the connector's outbox; events to the sinks.
struct OutboxOut<'a> {
    outbox: &'a mut Outbox,
    sinks: &'a Sinks,
}

impl crate::links::LinkOut for OutboxOut<'_> {
    fn trunk(&mut self, conn: ConnId) {
        self.outbox.trunk(conn);
    }
}

impl stratifier::Out for OutboxOut<'_> {
    fn send(&mut self, client: ClientId, bytes: Vec<u8>) {
        if let Some(conn) = direct(client) {
            self.outbox.send(conn, bytes);
        }
    }
    fn send_shared(&mut self, client: ClientId, bytes: Arc<[u8]>) {
        if let Some(conn) = direct(client) {
            self.outbox.send(conn, bytes);
        }
    }
    fn close(&mut self, client: ClientId) {
        if let Some(conn) = direct(client) {
            self.outbox.close(conn);
        }
    }
    fn event(&mut self, ev: stratifier::Event) {
        self.sinks.event(ev);
    }
    fn wants_shares(&self) -> bool {
        self.sinks.wants_shares()
    }
}

/// One connector thread's events of one loop round, for its stratifier thread.
#[derive(Default)]
struct Batch {
    events: Vec<Event>,
    /// The bytes of every line in `events`, back to back.
    arena: Vec<u8>,
}

impl Recycle for Batch {
    fn is_empty(&self) -> bool {
        self.events.is_empty()
    }

    fn recycle(&mut self) {
        self.events.clear();
        self.events.shrink_to(KEEP_EVENTS);
        self.arena.clear();
        self.arena.shrink_to(KEEP_ARENA);
    }
}

/// What a stratifier thread wrote for its connector thread, in order.
#[derive(Default)]
struct Actions(Vec<Action>);

impl Recycle for Actions {
    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn recycle(&mut self) {
        self.0.clear();
        self.0.shrink_to(KEEP_ACTIONS);
    }
}

/// Something that happened on a connector thread, in the order it happened.
enum Event {
    Open {
        now: Instant,
        conn: ConnId,
        peer: SocketAddr,
        listener: usize,
    },
    /// A line: its bytes are `arena[range]` of the batch.
    Line {
        now: Instant,
        conn: ConnId,
        range: Range<usize>,
    },
    Close {
        now: Instant,
        conn: ConnId,
    },
    Tick {
        now: Instant,
    },
    /// Forwarded through the connector thread rather than sent to the stratifier threads
    /// directly: each queue then has a single producer, the job is ordered with the connection
    /// events of the same thread, and shutdown needs no other sender to be dropped. It costs one
    /// more hop on a message that comes a few times a minute.
    Job {
        now: Instant,
        job: Arc<Job>,
    },
    Start(ConnectorHandle<Msg>),
    /// A handed-over connection: its session is `arena[range]` (empty range: none).
    Adopt {
        now: Instant,
        conn: ConnId,
        peer: SocketAddr,
        listener: usize,
        range: Option<Range<usize>>,
        /// [`CLOSE_AFTER`], [`LINK`].
        flags: u8,
    },
    /// Export the connection's session (and take its held output) and answer on the sender.
    Export {
        now: Instant,
        conn: ConnId,
        reply: crossbeam_channel::Sender<Vec<u8>>,
    },
    /// See [`Msg::Settle`].
    Settle(crossbeam_channel::Sender<()>),
    /// See [`Msg::Release`].
    Release,
    Cmd {
        now: Instant,
        cmd: ShardCmd,
    },
    /// See [`Msg::NodeBlock`].
    NodeBlock(Arc<[u8]>),
}

/// Queue mode, connector side: collects events into a batch and applies the stratifier thread's
/// output.
struct QueueHandler {
    thread: usize,
    /// The queue to the stratifier thread, and the batch being filled.
    to_shard: Producer<Batch>,
    /// Emptied output vectors, back to the stratifier thread.
    spare_outputs: SpareReturn<Actions>,
    /// `None` once joined (see `Drop`).
    join: Option<JoinHandle<()>>,
    /// The stratifier thread is gone (it panicked): this thread's connections are closed.
    shard_gone: bool,
}

impl QueueHandler {
    /// Starts the stratifier thread of connector thread `thread`, owning `shard`.
    fn new(thread: usize, shard: Shard, links: Links, sinks: Sinks, pin: bool) -> io::Result<Self> {
        let (to_shard, batches) = relay::queue(SPARE);
        let (spare_outputs, outputs) = relay::spares(SPARE);
        let join = std::thread::Builder::new()
            .name(format!("stratifier-{thread}"))
            .spawn(move || {
                let span = tracing::info_span!("stratifier", thread);
                let _entered = span.enter();
                if pin {
                    // The same CPU as its connector thread.
                    connector::pin_current_thread_or_warn(thread, "stratifier");
                }
                run_shard(thread, shard, links, sinks, &batches, &outputs);
                debug!("stratifier thread stopped");
            })?;
        Ok(Self {
            thread,
            to_shard,
            spare_outputs,
            join: Some(join),
            shard_gone: false,
        })
    }

    fn push(&mut self, event: Event) {
        self.to_shard.batch().events.push(event);
    }

    fn on_open(
        &mut self,
        now: Instant,
        conn: ConnId,
        peer: SocketAddr,
        listener: usize,
        out: &mut Outbox,
    ) {
        if self.shard_gone {
            out.close(conn);
            return;
        }
        self.push(Event::Open {
            now,
            conn,
            peer,
            listener,
        });
    }

    fn on_line(&mut self, now: Instant, conn: ConnId, line: &[u8], out: &mut Outbox) {
        if self.shard_gone {
            out.close(conn);
            return;
        }
        let batch = self.to_shard.batch();
        let start = batch.arena.len();
        batch.arena.extend_from_slice(line);
        let range = start..batch.arena.len();
        batch.events.push(Event::Line { now, conn, range });
    }

    fn on_msg(&mut self, now: Instant, msg: Msg, out: &mut Outbox) {
        match msg {
            Msg::Output(mut actions) => {
                for action in actions.drain(..) {
                    match action {
                        Action::Send(conn, buf) => out.send(conn, buf),
                        Action::Close(conn) => out.close(conn),
                        Action::Trunk(conn) => out.trunk(conn),
                    }
                }
                self.spare_outputs.give(Actions(actions));
            }
            Msg::Job(job) => self.push(Event::Job { now, job }),
            Msg::Start(handle) => self.push(Event::Start(handle)),
            Msg::Settle(tx) => {
                if self.shard_gone {
                    let _ = tx.send(());
                } else {
                    self.push(Event::Settle(tx));
                    self.send_batch();
                }
            }
            Msg::Settled(tx) => {
                let _ = tx.send(());
            }
            Msg::Release => {
                self.push(Event::Release);
                self.send_batch();
            }
            Msg::Cmd(cmd) => self.push(Event::Cmd { now, cmd }),
            Msg::NodeBlock(line) => self.push(Event::NodeBlock(line)),
        }
    }

    /// Handover: the stratifier thread exports the session (a round trip, the connector being
    /// quiesced); what it held for the connection travels too.
    fn on_export(&mut self, now: Instant, conn: ConnId, state: &mut Vec<u8>) {
        if self.shard_gone {
            return;
        }
        let (reply, rx) = crossbeam_channel::bounded(1);
        self.push(Event::Export { now, conn, reply });
        self.send_batch();
        match rx.recv_timeout(EXPORT_WAIT) {
            Ok(wrapped) => state.extend_from_slice(&wrapped),
            Err(_) => {
                warn!(thread = self.thread, %conn, "the stratifier thread did not export the session; it is lost");
            }
        }
    }

    #[expect(clippy::too_many_arguments, reason = "the callback's own arguments")]
    fn on_adopt(
        &mut self,
        now: Instant,
        conn: ConnId,
        peer: SocketAddr,
        listener: usize,
        session: Option<&[u8]>,
        flags: u8,
        out: &mut Outbox,
    ) {
        if self.shard_gone {
            out.close(conn);
            return;
        }
        let batch = self.to_shard.batch();
        let range = session.map(|s| {
            let start = batch.arena.len();
            batch.arena.extend_from_slice(s);
            start..batch.arena.len()
        });
        batch.events.push(Event::Adopt {
            now,
            conn,
            peer,
            listener,
            range,
            flags,
        });
    }

    /// Hands the round's events to the stratifier thread, if there are any.
    fn send_batch(&mut self) {
        if self.to_shard.flush().is_err() && !self.shard_gone {
            // The stratifier thread has exited, which it only does on a panic while the
            // connector runs: stop taking miners on this thread rather than leave them unanswered.
            error!(
                thread = self.thread,
                "the stratifier thread is gone; closing this thread's connections"
            );
            self.shard_gone = true;
        }
    }
}

impl Drop for QueueHandler {
    fn drop(&mut self) {
        // The connector calls `on_batch_end` after its last callbacks; this is for the case where
        // it could not.
        self.send_batch();
        // The stratifier thread sees the end once it has drained the queue, and exits.
        self.to_shard.close();
        if let Some(join) = self.join.take()
            && join.join().is_err()
        {
            error!(thread = self.thread, "stratifier thread panicked");
        }
    }
}

/// Queue mode, stratifier side: the loop of thread `stratifier-<thread>`. Returns when the
/// connector side closes the queue, once it has run everything queued.
fn run_shard(
    thread: usize,
    mut shard: Shard,
    mut links: Links,
    sinks: Sinks,
    batches: &Consumer<Batch>,
    spare_outputs: &SpareTake<Actions>,
) {
    let mut handle: Option<ConnectorHandle<Msg>> = None;
    let mut journal = journal_for(&mut shard, &sinks, thread);
    let mut out = ShardOut::new(sinks);
    // Blocks (parked, not spinning) until the connector thread sends or goes away.
    while batches.next_round(DRAIN_BATCHES, |batch| {
        let before = shard.submits();
        run_batch(thread, &mut shard, &mut links, batch, &mut out, &mut handle);
        // The batch's lines were read in one connector round, at its first line's `now`; one
        // clock read per batch with submits times their replies.
        let judged = shard.submits() - before;
        if judged > 0
            && let Some(read) = batch.events.iter().find_map(|e| match e {
                Event::Line { now, .. } => Some(*now),
                _ => None,
            })
        {
            submit_latency_slot(thread).observe_n(read.elapsed(), judged);
        }
    }) {
        // Accepted shares on disk before their replies leave.
        flush_journal(&mut shard, &mut journal);
        // One message per round; kept until the handle is known (connections can be accepted
        // before `connector::start` returns), and while a handover holds it.
        if let Some(h) = &handle
            && !out.hold
            && !out.actions.is_empty()
        {
            let fresh = spare_outputs.take().0;
            h.send(thread, Msg::Output(mem::replace(&mut out.actions, fresh)));
        }
    }
}

/// Runs the shard on every event of `batch`.
fn run_batch(
    thread: usize,
    shard: &mut Shard,
    links: &mut Links,
    batch: &Batch,
    out: &mut ShardOut,
    handle: &mut Option<ConnectorHandle<Msg>>,
) {
    for event in &batch.events {
        match event {
            Event::Open {
                now,
                conn,
                peer,
                listener,
            } => {
                let source = out.sinks.open_source();
                links.on_open(shard, *now, *conn, *peer, *listener, source);
            }
            Event::Line { now, conn, range } => {
                // After the shard closed a connection, the rest of its input is dropped, as the
                // connector does inline.
                if out.closing.contains(conn) {
                    continue;
                }
                if let Some(line) = batch.arena.get(range.clone()) {
                    links.on_line(shard, *now, *conn, line, out);
                }
            }
            Event::Close { now, conn } => {
                out.closing.remove(conn);
                links.on_close(shard, *now, *conn);
            }
            Event::Tick { now } => links.on_tick(shard, *now, out),
            Event::Job { now, job } => links.on_job(shard, *now, job, out),
            Event::Start(h) => *handle = Some(h.clone()),
            Event::Adopt {
                now,
                conn,
                peer,
                listener,
                range,
                flags,
            } => {
                let session = range.as_ref().and_then(|r| batch.arena.get(r.clone()));
                if flags & LINK != 0 {
                    let state = session.unwrap_or_default();
                    if !links.adopt_link(shard, *now, *conn, *peer, *listener, state, out) {
                        warn!(%conn, %peer, "malformed handed-over passthrough link; closing it");
                        shard.on_open(*now, *conn, *peer, *listener);
                        stratifier::Out::close(out, ClientId::Direct(*conn));
                    }
                } else {
                    adopt_into(
                        shard,
                        *now,
                        *conn,
                        *peer,
                        *listener,
                        session,
                        flags & CLOSE_AFTER != 0,
                        out,
                    );
                }
            }
            Event::Export { now, conn, reply } => {
                let (extra, close) = out.take_held(*conn);
                let mut state = Vec::new();
                match links.export_link(shard, *now, *conn) {
                    Some(link) if !close => wrap_link(&mut state, &link, &extra),
                    _ => {
                        let session = shard.export_session(*now, *conn);
                        wrap_session(&mut state, session.as_deref(), &extra, close);
                    }
                }
                let _ = reply.send(state);
            }
            Event::Settle(tx) => {
                out.hold = true;
                match handle {
                    // The output first: the answer follows it through the same queue.
                    Some(h) => {
                        if !out.actions.is_empty() {
                            h.send(thread, Msg::Output(mem::take(&mut out.actions)));
                        }
                        h.send(thread, Msg::Settled(tx.clone()));
                    }
                    None => {
                        let _ = tx.send(());
                    }
                }
            }
            Event::Release => out.hold = false,
            Event::Cmd { now, cmd } => cmd.clone().run(*now, shard, out),
            Event::NodeBlock(line) => links.on_node_block(line, out),
        }
    }
}

/// The shard's output on a stratifier thread: actions for the connector thread, in order;
/// events straight to the sinks.
struct ShardOut {
    actions: Vec<Action>,
    /// Connections the shard closed whose close the connector has not reported back yet.
    closing: HashSet<ConnId>,
    sinks: Sinks,
    /// A handover is under way ([`Msg::Settle`]): the actions stay here for the exports.
    hold: bool,
}

impl ShardOut {
    fn new(sinks: Sinks) -> Self {
        Self {
            actions: Vec::new(),
            closing: HashSet::new(),
            sinks,
            hold: false,
        }
    }

    /// Takes the actions held for `conn`: the bytes to send, in order, and whether it was
    /// closed.
    fn take_held(&mut self, conn: ConnId) -> (Vec<u8>, bool) {
        let mut bytes = Vec::new();
        let mut close = false;
        self.actions.retain(|a| match a {
            Action::Send(c, buf) if *c == conn => {
                bytes.extend_from_slice(buf.as_slice());
                false
            }
            Action::Close(c) if *c == conn => {
                close = true;
                false
            }
            Action::Trunk(c) if *c == conn => false,
            _ => true,
        });
        self.closing.remove(&conn);
        (bytes, close)
    }
}

impl crate::links::LinkOut for ShardOut {
    fn trunk(&mut self, conn: ConnId) {
        self.actions.push(Action::Trunk(conn));
    }
}

impl stratifier::Out for ShardOut {
    fn send(&mut self, client: ClientId, bytes: Vec<u8>) {
        if let Some(conn) = direct(client)
            && !self.closing.contains(&conn)
        {
            self.actions.push(Action::Send(conn, SendBuf::Owned(bytes)));
        }
    }
    fn send_shared(&mut self, client: ClientId, bytes: Arc<[u8]>) {
        if let Some(conn) = direct(client)
            && !self.closing.contains(&conn)
        {
            self.actions
                .push(Action::Send(conn, SendBuf::Shared(bytes)));
        }
    }
    fn close(&mut self, client: ClientId) {
        if let Some(conn) = direct(client)
            && self.closing.insert(conn)
        {
            self.actions.push(Action::Close(conn));
        }
    }
    fn event(&mut self, ev: stratifier::Event) {
        self.sinks.event(ev);
    }
    fn wants_shares(&self) -> bool {
        self.sinks.wants_shares()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handed_over_state_round_trips_and_bad_state_is_refused() {
        let mut state = Vec::new();
        wrap_session(&mut state, None, &[], false);
        assert!(state.is_empty(), "nothing to carry: nothing written");
        assert_eq!(unwrap_session(&state), Some((None, &[][..], 0)));
        wrap_session(&mut state, Some(b"session"), b"{\"id\":1}\n", true);
        assert_eq!(
            unwrap_session(&state),
            Some((Some(&b"session"[..]), &b"{\"id\":1}\n"[..], CLOSE_AFTER))
        );
        // Truncated inside the session, or inside its length: refused, never a panic.
        for n in 1..8 {
            assert_eq!(unwrap_session(&state[..n]), None, "{n} bytes");
        }
        let mut only_extra = Vec::new();
        wrap_session(&mut only_extra, None, b"x\n", false);
        assert_eq!(unwrap_session(&only_extra), Some((None, &b"x\n"[..], 0)));
        let mut link = Vec::new();
        wrap_link(&mut link, b"link-state", b"y\n");
        assert_eq!(
            unwrap_session(&link),
            Some((Some(&b"link-state"[..]), &b"y\n"[..], LINK))
        );
    }

    #[test]
    fn held_output_is_taken_per_connection_in_order() {
        let (a, b) = (ConnId::new(0, 0, 1), ConnId::new(0, 0, 2));
        let mut out = ShardOut::new(Sinks {
            blocks: None,
            shares: None,
            upstream: None,
            source: None,
            auth: None,
            nodes: None,
            journal: None,
        });
        out.hold = true;
        {
            use stratifier::Out;
            out.send(ClientId::Direct(a), b"one\n".to_vec());
            out.send(ClientId::Direct(b), b"other\n".to_vec());
            out.send_shared(ClientId::Direct(a), Arc::from(&b"two\n"[..]));
        }
        assert_eq!(out.take_held(a), (b"one\ntwo\n".to_vec(), false));
        assert_eq!(out.actions.len(), 1, "b's output stays");
        {
            use stratifier::Out;
            out.close(ClientId::Direct(b));
        }
        assert_eq!(out.take_held(b), (b"other\n".to_vec(), true));
        assert!(out.actions.is_empty() && out.closing.is_empty());
    }

    #[test]
    fn handoff_names_round_trip() {
        for h in [Handoff::Inline, Handoff::Queue] {
            assert_eq!(Handoff::from_name(h.as_str()), Some(h));
            assert_eq!(h.to_string(), h.as_str());
        }
        assert_eq!(Handoff::from_name("spin"), None);
    }

    #[test]
    fn share_events_reach_the_share_log_only_when_it_is_on() {
        use stratifier::Out;
        let rec = stratifier::ShareRecord {
            workinfoid: 1,
            height: 2,
            enonce1: String::new(),
            nonce2: String::new(),
            nonce: String::new(),
            ntime: String::new(),
            diff: 1.0,
            sdiff: 1.0,
            hash: String::new(),
            result: true,
            reject_reason: None,
            workername: "w".into(),
            username: "u".into(),
            address: String::new(),
            agent: String::new(),
        };
        let off = ShardOut::new(Sinks {
            blocks: None,
            shares: None,
            upstream: None,
            source: None,
            auth: None,
            nodes: None,
            journal: None,
        });
        assert!(!off.wants_shares());
        let (tx, rx) = crossbeam_channel::unbounded();
        let mut on = ShardOut::new(Sinks {
            blocks: None,
            shares: Some(Arc::new(move |r: ShareRecord| {
                let _ = tx.send(r);
            })),
            upstream: None,
            source: None,
            auth: None,
            nodes: None,
            journal: None,
        });
        assert!(on.wants_shares());
        on.event(stratifier::Event::Share(rec.clone()));
        on.event(stratifier::Event::Share(rec));
        assert_eq!(rx.try_recv().map(|r| r.workinfoid).ok(), Some(1));
        assert_eq!(rx.try_recv().map(|r| r.workinfoid).ok(), Some(1));
        assert!(rx.try_recv().is_err());
    }

    #[test]
    fn shard_output_drops_sends_after_a_close() {
        use stratifier::Out;
        let a = ConnId::new(0, 0, 1);
        let b = ConnId::new(0, 0, 2);
        let mut out = ShardOut::new(Sinks {
            blocks: None,
            shares: None,
            upstream: None,
            source: None,
            auth: None,
            nodes: None,
            journal: None,
        });
        let (a, b) = (ClientId::Direct(a), ClientId::Direct(b));
        out.send(a, b"reply\n".to_vec());
        out.close(a);
        out.close(a);
        out.send(a, b"late\n".to_vec());
        out.send(ClientId::Sub(a.conn(), 1), b"sub\n".to_vec());
        out.send_shared(b, Arc::from(&b"notify\n"[..]));
        let got: Vec<String> = out
            .actions
            .iter()
            .map(|a| match a {
                Action::Send(c, buf) => {
                    format!("{}:{}", c.slot(), String::from_utf8_lossy(buf.as_slice()))
                }
                Action::Close(c) => format!("{}:close", c.slot()),
                Action::Trunk(c) => format!("{}:trunk", c.slot()),
            })
            .collect();
        assert_eq!(got, ["1:reply\n", "1:close", "2:notify\n"]);
    }
}
