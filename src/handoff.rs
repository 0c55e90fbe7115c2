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
use connector::{Action, CloseReason, Connector, ConnectorHandle, Outbox, SendBuf};
use generator::{BlockSubmission, BlockSubmitter};
use std::sync::atomic::{AtomicU16, Ordering};

use stratifier::{ClientId, Job, Pool, Shard, ShareRecord, SourceId, UpstreamShare};
use tracing::{debug, error, info};

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
    /// A change to every shard's sessions (proxy modes).
    Cmd(ShardCmd),
}

/// A change the daemon makes to every shard's sessions (proxy modes).
#[derive(Clone, Copy, Debug)]
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
            stratifier::Event::Block(b) => match (&self.blocks, b.hex) {
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
            },
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
        }
    }
}

/// The connection of a direct client. Sub-clients (miners behind a passthrough) are not served
/// by this daemon yet: nothing makes one, and output for one is dropped with a debug line.
fn direct(client: ClientId) -> Option<ConnId> {
    match client {
        ClientId::Direct(conn) => Some(conn),
        ClientId::Sub(..) => {
            debug!(%client, "output for a sub-client dropped: passthrough framing is not supported");
            None
        }
    }
}

/// Starts the connector threads with the stratifier attached as `handoff` says.
pub(crate) fn start(
    handoff: Handoff,
    cfg: connector::Config,
    pool: Arc<Pool>,
    sinks: Sinks,
) -> io::Result<Connector<Msg>> {
    let pin = cfg.pin;
    let conns = connector::start(cfg, move |t| match handoff {
        Handoff::Inline => StratumHandler::Inline(InlineHandler {
            shard: Shard::new(Arc::clone(&pool)),
            sinks: sinks.clone(),
        }),
        Handoff::Queue => {
            match QueueHandler::new(t, Shard::new(Arc::clone(&pool)), sinks.clone(), pin) {
                Ok(h) => StratumHandler::Queue(h),
                Err(e) => {
                    // Only when the system is out of threads; this thread's miners are still served.
                    error!(thread = t, error = %e, "cannot start a stratifier thread; this connector thread runs its shard inline");
                    StratumHandler::Inline(InlineHandler {
                        shard: Shard::new(Arc::clone(&pool)),
                        sinks: sinks.clone(),
                    })
                }
            }
        }
    })?;
    if handoff == Handoff::Queue {
        conns.broadcast(Msg::Start(conns.handle()));
    }
    Ok(conns)
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
                h.shard.on_open_in(now, conn, peer, listener, source);
            }
            Self::Queue(h) => h.on_open(now, conn, peer, listener, out),
        }
    }

    fn on_line(&mut self, now: Instant, conn: ConnId, line: &[u8], out: &mut Outbox) {
        match self {
            Self::Inline(h) => {
                let InlineHandler { shard, sinks } = h;
                shard.on_line(now, conn, line, &mut OutboxOut { outbox: out, sinks });
            }
            Self::Queue(h) => h.on_line(now, conn, line, out),
        }
    }

    fn on_close(&mut self, now: Instant, conn: ConnId, _reason: CloseReason) {
        match self {
            Self::Inline(h) => h.shard.on_close(now, conn),
            Self::Queue(h) => h.push(Event::Close { now, conn }),
        }
    }

    fn on_msg(&mut self, now: Instant, msg: Msg, out: &mut Outbox) {
        match self {
            Self::Inline(h) => match msg {
                Msg::Job(job) => {
                    let InlineHandler { shard, sinks } = h;
                    shard.on_job(&job, &mut OutboxOut { outbox: out, sinks });
                }
                Msg::Cmd(cmd) => {
                    let InlineHandler { shard, sinks } = h;
                    cmd.run(now, shard, &mut OutboxOut { outbox: out, sinks });
                }
                Msg::Output(_) | Msg::Start(_) => debug!("queue-mode message ignored inline"),
            },
            Self::Queue(h) => h.on_msg(now, msg, out),
        }
    }

    fn on_tick(&mut self, now: Instant, out: &mut Outbox) {
        match self {
            Self::Inline(h) => {
                let InlineHandler { shard, sinks } = h;
                shard.on_tick(now, &mut OutboxOut { outbox: out, sinks });
            }
            Self::Queue(h) => h.push(Event::Tick { now }),
        }
    }

    fn on_batch_end(&mut self, _now: Instant, _out: &mut Outbox) {
        if let Self::Queue(h) = self {
            h.send_batch();
        }
    }
}

/// Inline: the shard runs in the connector's callbacks.
struct InlineHandler {
    shard: Shard,
    sinks: Sinks,
}

/// The shard's output written straight into the connector's outbox; events to the sinks.
struct OutboxOut<'a> {
    outbox: &'a mut Outbox,
    sinks: &'a Sinks,
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
    Job(Arc<Job>),
    Start(ConnectorHandle<Msg>),
    Cmd {
        now: Instant,
        cmd: ShardCmd,
    },
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
    fn new(thread: usize, shard: Shard, sinks: Sinks, pin: bool) -> io::Result<Self> {
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
                run_shard(thread, shard, sinks, &batches, &outputs);
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
                    }
                }
                self.spare_outputs.give(Actions(actions));
            }
            Msg::Job(job) => self.push(Event::Job(job)),
            Msg::Start(handle) => self.push(Event::Start(handle)),
            Msg::Cmd(cmd) => self.push(Event::Cmd { now, cmd }),
        }
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
    sinks: Sinks,
    batches: &Consumer<Batch>,
    spare_outputs: &SpareTake<Actions>,
) {
    let mut handle: Option<ConnectorHandle<Msg>> = None;
    let mut out = ShardOut::new(sinks);
    // Blocks (parked, not spinning) until the connector thread sends or goes away.
    while batches.next_round(DRAIN_BATCHES, |batch| {
        run_batch(&mut shard, batch, &mut out, &mut handle);
    }) {
        // One message per round; kept until the handle is known (connections can be accepted
        // before `connector::start` returns).
        if let Some(h) = &handle
            && !out.actions.is_empty()
        {
            let fresh = spare_outputs.take().0;
            h.send(thread, Msg::Output(mem::replace(&mut out.actions, fresh)));
        }
    }
}

/// Runs the shard on every event of `batch`.
fn run_batch(
    shard: &mut Shard,
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
                shard.on_open_in(*now, *conn, *peer, *listener, source);
            }
            Event::Line { now, conn, range } => {
                // After the shard closed a connection, the rest of its input is dropped, as the
                // connector does inline.
                if out.closing.contains(conn) {
                    continue;
                }
                if let Some(line) = batch.arena.get(range.clone()) {
                    shard.on_line(*now, *conn, line, out);
                }
            }
            Event::Close { now, conn } => {
                out.closing.remove(conn);
                shard.on_close(*now, *conn);
            }
            Event::Tick { now } => shard.on_tick(*now, out),
            Event::Job(job) => shard.on_job(job, out),
            Event::Start(h) => *handle = Some(h.clone()),
            Event::Cmd { now, cmd } => cmd.run(*now, shard, out),
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
}

impl ShardOut {
    fn new(sinks: Sinks) -> Self {
        Self {
            actions: Vec::new(),
            closing: HashSet::new(),
            sinks,
        }
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
            })
            .collect();
        assert_eq!(got, ["1:reply\n", "1:close", "2:notify\n"]);
    }
}
