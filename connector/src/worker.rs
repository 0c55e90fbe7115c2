//! The per-thread event loop, generic over the backend: connection table, line framing, outbound
//! queues, messages and ticks.

use std::any::Any;
use std::collections::{HashMap, VecDeque};
use std::io;
use std::mem;
use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroU8;
use std::ops::ControlFlow;
use std::os::fd::OwnedFd;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering, fence};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use ids::{ConnId, Peer};
use tracing::{debug, error, info, warn};

use crate::chunked::Chunked;
use crate::framing::{self, LineTooLong};
use crate::sendbufs::SendBufs;
use crate::sys::{Backend, Completion, KEEP_COMPLETIONS, ListenerId, SendOp, Waker};
use crate::{
    Action, CloseReason, ClosedCounters, ConnState, ExportedConn, Handler, Outbox, QuiesceReport,
    SendBuf, ThreadCounters,
};

/// How long a handler-requested close waits for the queued bytes to be written before the
/// connection is closed anyway (checked on ticks).
const CLOSE_LINGER: Duration = Duration::from_secs(5);
/// Messages handled per loop round, so a flood of messages cannot starve the sockets.
const MSG_BATCH: usize = 1024;
/// Queued buffers handed to the backend per send operation.
const OP_BUFS: usize = 1024;
/// Emptied [`Pending`] boxes kept for reuse: enough for the connections that have something
/// pending in a usual round (replies to submits), few enough to be negligible (about 100 KiB).
const SPARE_PENDING: usize = 1024;
/// Emptied vectors for the buffers after the first of a queue (see [`SendBufs`]) kept for reuse,
/// and the largest capacity kept.
const SPARE_ROOMS: usize = 64;
const ROOM_KEPT: usize = 64;
/// The most bytes a connection can have queued and not yet written ([`Conn::queued`] is a `u32`);
/// a larger [`Limits::max_outbound`] counts as this.
const MAX_QUEUED: usize = u32::MAX as usize;
/// Minimum interval between two logs of accepts paused by an error (EMFILE).
const ACCEPT_WARN_EVERY: Duration = Duration::from_secs(60);
/// A loop round that keeps the thread busy this long delays every connection of the thread:
/// logged at `info` (a notify broadcast to many thousands of miners takes this long too), at
/// most once per [`SLOW_WARN_EVERY`].
const SLOW_ROUND: Duration = Duration::from_millis(20);
const SLOW_WARN_EVERY: Duration = Duration::from_secs(10);
/// A round with this many completions (a broadcast) leaves freed buffers behind: the heap's free
/// pages are given back [`TRIM_DELAY`] later (once its sends have completed), at most once per
/// [`TRIM_EVERY`] per thread.
const BIG_ROUND: usize = 512;
/// A connection closed with this many unsent bytes (a client that stopped reading, closed at its
/// queue limit) leaves a heap of freed send buffers behind: they are given back the same way.
const BIG_QUEUE: u32 = 64 * 1024;

/// The largest owned send buffer that queued replies are merged into (see
/// [`SendBufs::push_merged`]).
const MERGE_MAX: usize = 16 * 1024;

/// Completions handled between two flushes of the outbox within one round
/// ([`Worker::handle_round`]): ~1 ms of share checking.
const ROUND_FLUSH: usize = 64;
/// Room kept in the outbox and the dirty list once emptied.
const KEEP_LIST: usize = 4096;
const TRIM_DELAY: Duration = Duration::from_secs(1);
const TRIM_EVERY: Duration = Duration::from_secs(10);
/// Thread 0 also gives free heap pages back this often, whatever the rounds: churn (sessions,
/// usernames, replies of every size allocated and freed by several threads) leaves free pages
/// scattered in the heaps that glibc returns only from a heap's top. `malloc_trim(0)` walks the
/// free lists and `madvise`s whole free pages: well under a millisecond for a heap of tens of
/// MiB (logged at `debug` with target `ckpool_connector::heap`).
const TRIM_PERIOD: Duration = Duration::from_secs(60);

/// How long after a quiesce's deadline a thread waits for its cancelled sends to come back.
const CANCEL_GRACE: Duration = Duration::from_secs(1);
/// How often a quiescing thread checks whether it is done.
const QUIESCE_CHECK: Duration = Duration::from_millis(5);

/// A request from the [`crate::Connector`] to one thread (a handover's steps).
pub(crate) enum Control {
    /// Stop accepting and reading, write what is queued; reply when done or at the deadline.
    Quiesce {
        deadline: Instant,
        reply: Sender<QuiesceReport>,
    },
    /// Undo a quiesce.
    Resume,
    /// Take up to `max` connections out (after a quiesce).
    Export {
        max: usize,
        reply: Sender<io::Result<Vec<ExportedConn>>>,
    },
    /// Install connections exported elsewhere.
    Adopt {
        conns: Vec<(OwnedFd, ConnState)>,
        reply: Sender<Vec<io::Result<ConnId>>>,
    },
}

/// A quiesce in progress.
struct Quiescing {
    deadline: Instant,
    reply: Sender<QuiesceReport>,
    /// The deadline passed and the sends in flight were cancelled.
    cancelled: bool,
    /// When to check next.
    next_check: Instant,
}

/// The most listeners a connector serves (a connection keeps its listener's index in a byte).
pub(crate) const MAX_LISTENERS: usize = 254;

/// One thread's counters: written by that thread alone (a load and a store, no read-modify-write
/// and no lock), read by any thread ([`Counters::snapshot`]). Updated when a connection opens or
/// closes and once per slow round, never per line.
#[derive(Default)]
pub(crate) struct Counters {
    open: AtomicU64,
    accepted: AtomicU64,
    refused: AtomicU64,
    adopted: AtomicU64,
    exported: AtomicU64,
    slow_rounds: AtomicU64,
    handler_panics: AtomicU64,
    /// Bytes queued and not written, published once per round.
    queued: AtomicU64,
    /// Connections whose reads are paused for back-pressure now.
    paused: AtomicU64,
    /// Times reads were paused for back-pressure.
    pauses: AtomicU64,
    /// By [`close_index`].
    closed: [AtomicU64; 10],
}

/// Adds one to a counter that only the calling thread writes.
fn bump(c: &AtomicU64) {
    c.store(c.load(Ordering::Relaxed).wrapping_add(1), Ordering::Relaxed);
}

/// Takes one from a counter that only the calling thread writes.
fn drop_one(c: &AtomicU64) {
    c.store(
        c.load(Ordering::Relaxed).saturating_sub(1),
        Ordering::Relaxed,
    );
}

/// The index of `reason` in [`Counters::closed`] (`None`: not a close, see
/// [`CloseReason::Exported`]).
fn close_index(reason: CloseReason) -> Option<usize> {
    Some(match reason {
        CloseReason::Peer => 0,
        CloseReason::Error(_) => 1,
        CloseReason::LineTooLong => 2,
        CloseReason::Outbound => 3,
        CloseReason::Handler => 4,
        CloseReason::Shutdown => 5,
        CloseReason::OutboundBudget => 6,
        CloseReason::Idle => 7,
        CloseReason::HandlerPanic => 8,
        CloseReason::Stalled => 9,
        CloseReason::Exported => return None,
    })
}

impl Counters {
    /// The counters now (each read on its own: they are not one consistent cut).
    pub(crate) fn snapshot(&self) -> ThreadCounters {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let [
            peer,
            error,
            line_too_long,
            outbound,
            handler,
            shutdown,
            outbound_budget,
            idle,
            handler_panic,
            stalled,
        ] = &self.closed;
        ThreadCounters {
            open: get(&self.open),
            accepted: get(&self.accepted),
            refused: get(&self.refused),
            adopted: get(&self.adopted),
            exported: get(&self.exported),
            slow_rounds: get(&self.slow_rounds),
            handler_panics: get(&self.handler_panics),
            queued: get(&self.queued),
            paused: get(&self.paused),
            pauses: get(&self.pauses),
            closed: ClosedCounters {
                peer: get(peer),
                error: get(error),
                line_too_long: get(line_too_long),
                outbound: get(outbound),
                handler: get(handler),
                shutdown: get(shutdown),
                outbound_budget: get(outbound_budget),
                idle: get(idle),
                handler_panic: get(handler_panic),
                stalled: get(stalled),
            },
        }
    }

    /// A connection went away for `reason`.
    fn closed(&self, reason: CloseReason) {
        drop_one(&self.open);
        match close_index(reason).and_then(|i| self.closed.get(i)) {
            Some(c) => bump(c),
            None => bump(&self.exported),
        }
    }
}

/// State shared between a connector thread and the [`crate::Connector`] that controls it.
pub(crate) struct Shared {
    pub(crate) waker: Arc<Waker>,
    /// Set by the thread just before it may block in the backend.
    parked: AtomicBool,
    stop: AtomicBool,
    /// The operator's accept gate (admin `reject`): set, the thread stops accepting until it is
    /// cleared ([`crate::ConnectorHandle::set_accepting`]).
    pub(crate) reject: AtomicBool,
    /// The gate as the thread has applied it: set one loop round after it stopped accepting
    /// (so the backend has been told), cleared once it accepts again.
    pub(crate) rejecting: AtomicBool,
    /// The thread's counters.
    pub(crate) counters: Counters,
}

impl Shared {
    pub(crate) fn new(waker: Arc<Waker>) -> Self {
        Self {
            waker,
            parked: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            reject: AtomicBool::new(false),
            rejecting: AtomicBool::new(false),
            counters: Counters::default(),
        }
    }

    /// Called after publishing work for the thread (a message or the stop flag): wakes it only if
    /// it announced it may block, since a wake-up is a syscall on both sides.
    pub(crate) fn notify(&self) {
        // Pairs with the fence in `Worker::run`: either the thread sees the published work before
        // blocking, or this sees `parked` set and wakes it.
        fence(Ordering::SeqCst);
        if self.parked.swap(false, Ordering::SeqCst) {
            self.waker.wake();
        }
    }

    /// Asks the thread to close its connections and exit.
    pub(crate) fn request_stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        self.notify();
    }
}

/// Limits from the configuration.
#[derive(Clone)]
pub(crate) struct Limits {
    pub(crate) max_line: usize,
    pub(crate) max_outbound: usize,
    pub(crate) max_outbound_trunk: usize,
    pub(crate) tick: Duration,
    /// [`Config::max_conns`](crate::Config::max_conns).
    pub(crate) max_conns: Option<usize>,
    /// Connections open on all threads (counted whether or not there is a maximum).
    pub(crate) open: Arc<AtomicUsize>,
    /// Connections by IP address, when [`Config::max_conns_per_ip`](crate::Config) is set.
    pub(crate) per_ip: Option<Arc<IpCounts>>,
    /// This thread's share of [`Config::max_outbound_total`](crate::Config).
    pub(crate) outbound_share: usize,
    /// [`Config::idle_timeout`](crate::Config), `None` when off.
    pub(crate) idle_timeout: Option<Duration>,
    /// [`Config::pause_reads_at`](crate::Config): reads of a connection (not a trunk) stop
    /// above this many unsent bytes (`usize::MAX`: never), and start again at half of it.
    pub(crate) pause_at: usize,
    /// [`Config::stall_timeout`](crate::Config), `None` when off.
    pub(crate) stall_timeout: Option<Duration>,
}

/// Shards of [`IpCounts`] (a power of two).
const IP_SHARDS: usize = 16;

/// Open connections per IP address, shared by every thread: touched only when a connection
/// opens or closes, under the lock of one of [`IP_SHARDS`] shards.
pub(crate) struct IpCounts {
    max: usize,
    shards: [Mutex<HashMap<IpAddr, u32>>; IP_SHARDS],
}

impl IpCounts {
    pub(crate) fn new(max: usize) -> Self {
        Self {
            max,
            shards: std::array::from_fn(|_| Mutex::new(HashMap::new())),
        }
    }

    fn shard(&self, ip: IpAddr) -> std::sync::MutexGuard<'_, HashMap<IpAddr, u32>> {
        let fold = match ip {
            IpAddr::V4(a) => a
                .octets()
                .iter()
                .fold(0usize, |h, &b| h.wrapping_mul(31) ^ usize::from(b)),
            IpAddr::V6(a) => a
                .octets()
                .iter()
                .fold(0usize, |h, &b| h.wrapping_mul(31) ^ usize::from(b)),
        };
        let shard = &self.shards[fold & (IP_SHARDS - 1)];
        // The map stays consistent whatever panicked while holding it (no code here panics).
        shard
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Counts one more connection from `ip` unless it has the maximum already (`force`: count
    /// it anyway, for adopted connections). Returns whether it was counted.
    fn add(&self, ip: IpAddr, force: bool) -> bool {
        let ip = ip.to_canonical();
        let mut map = self.shard(ip);
        let n = map.entry(ip).or_insert(0);
        if !force && usize::try_from(*n).unwrap_or(usize::MAX) >= self.max {
            return false;
        }
        *n = n.saturating_add(1);
        true
    }

    /// One connection from `ip` went away.
    fn remove(&self, ip: IpAddr) {
        let ip = ip.to_canonical();
        let mut map = self.shard(ip);
        if let Some(n) = map.get_mut(&ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                map.remove(&ip);
            }
        }
    }

    /// Connections counted for `ip` (for tests).
    #[cfg(test)]
    fn count(&self, ip: IpAddr) -> u32 {
        let ip = ip.to_canonical();
        self.shard(ip).get(&ip).copied().unwrap_or(0)
    }
}

/// Idle sweeps ([`Worker::sweep_idle`]) per [`Config::idle_timeout`](crate::Config): a connection
/// is closed between the timeout and a quarter of it later.
const IDLE_SWEEPS: u32 = 4;

/// When and how the idle sweeps run: one every `period`; a connection whose idle count (sweeps
/// since its last complete line) reaches `limit` is closed.
#[derive(Clone, Copy)]
struct IdleSweep {
    period: Duration,
    limit: u8,
    next: Instant,
}

impl IdleSweep {
    /// Sweeps for `timeout` on a thread ticking every `tick` (sweeps run on ticks).
    fn new(now: Instant, timeout: Duration, tick: Duration) -> Self {
        let period = (timeout / IDLE_SWEEPS)
            .max(tick)
            .max(Duration::from_millis(1));
        // The idle count goes up at each sweep and back to 0 at each line; it reaches `limit`
        // after at least `(limit - 1) * period >= timeout` without a line.
        let whole = timeout.as_nanos().div_ceil(period.as_nanos().max(1));
        let limit = u8::try_from(whole.saturating_add(1))
            .unwrap_or(u8::MAX)
            .clamp(2, IDLE_MAX);
        Self {
            period,
            limit,
            next: now + period,
        }
    }
}

/// Catches a panic of a handler callback.
fn guarded<R>(f: impl FnOnce() -> R) -> Result<R, Box<dyn Any + Send>> {
    catch_unwind(AssertUnwindSafe(f))
}

/// The message of a panic payload, if it has one.
fn panic_message(payload: &(dyn Any + Send)) -> &str {
    payload
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(no message)")
}

/// One connector thread.
pub(crate) struct Worker<B: Backend, H: Handler> {
    thread: u16,
    backend: B,
    handler: H,
    rx: Receiver<H::Msg>,
    ctl: Receiver<Control>,
    shared: Arc<Shared>,
    limits: Limits,
    conns: Slab,
    out: Outbox,
    completions: Vec<Completion<B>>,
    /// Connections with something to send or to close.
    dirty: Vec<ConnId>,
    /// Connections with a handler-requested close pending (deadlines checked on ticks).
    closing: Vec<ConnId>,
    /// Listeners whose accept stopped (e.g. EMFILE), to re-arm when a connection closes or on the
    /// next tick.
    paused: Vec<bool>,
    any_paused: bool,
    /// Accepting stopped by the operator ([`Shared::reject`]); separate from a quiesce.
    gated: bool,
    /// When a paused accept was last logged (logged at most once per [`ACCEPT_WARN_EVERY`]).
    accept_warned: Option<Instant>,
    /// Rounds that kept the thread busy for [`SLOW_ROUND`] or more.
    slow: SlowRounds,
    /// Connections closed at once because `max_conns` was reached, since the last line about it,
    /// and when that line was logged.
    refused: u64,
    refused_warned: Option<Instant>,
    /// The same for [`Limits::per_ip`].
    ip_refused: u64,
    ip_refused_warned: Option<Instant>,
    /// Bytes queued for this thread's connections and not written (the sum of [`Conn::queued`]).
    queued: usize,
    /// `queued` went over [`Limits::outbound_share`]: checked at the next flush.
    over_budget: bool,
    /// Connections closed for the outbound budget since the last line about it, and when that
    /// line was logged (at most once per [`ACCEPT_WARN_EVERY`]).
    budget_closed: u64,
    budget_warned: Option<Instant>,
    /// The idle sweeps, when [`Limits::idle_timeout`] is set.
    idle: Option<IdleSweep>,
    /// Connections whose reads were paused for back-pressure ([`PAUSED`]), each with when it
    /// last made progress (a byte written) as of the last tick: checked on ticks against
    /// [`Limits::stall_timeout`]. Entries of connections no longer paused leave at the next tick.
    stalled: Vec<(ConnId, Instant)>,
    spare_pending: SparePending,
    /// Emptied vectors from finished sends, to queue a second buffer without allocating (at
    /// most [`SPARE_ROOMS`]).
    spare_rooms: Vec<Vec<SendBuf>>,
    /// When to give free heap pages back after a big round, and when that was last done.
    trim_at: Option<Instant>,
    trimmed: Option<Instant>,
    /// The next periodic trim ([`TRIM_PERIOD`]; thread 0 only).
    periodic_trim: Instant,
    /// Accepting and reading are stopped (a quiesce).
    stopped: bool,
    /// Nothing is written: queued bytes are kept for an export (a quiesce past its deadline or
    /// finished).
    hold: bool,
    /// The quiesce in progress.
    quiescing: Option<Quiescing>,
}

impl<B: Backend, H: Handler> Worker<B, H> {
    pub(crate) fn new(
        thread: u16,
        backend: B,
        handler: H,
        (rx, ctl): (Receiver<H::Msg>, Receiver<Control>),
        shared: Arc<Shared>,
        limits: Limits,
        listeners: usize,
    ) -> Self {
        let idle = limits
            .idle_timeout
            .map(|t| IdleSweep::new(Instant::now(), t, limits.tick));
        Self {
            thread,
            backend,
            handler,
            rx,
            ctl,
            shared,
            limits,
            conns: Slab::default(),
            out: Outbox::new(),
            completions: Vec::new(),
            dirty: Vec::new(),
            closing: Vec::new(),
            paused: vec![false; listeners],
            any_paused: false,
            gated: false,
            accept_warned: None,
            slow: SlowRounds::default(),
            refused: 0,
            refused_warned: None,
            ip_refused: 0,
            ip_refused_warned: None,
            queued: 0,
            over_budget: false,
            budget_closed: 0,
            budget_warned: None,
            idle,
            stalled: Vec::new(),
            spare_pending: SparePending::default(),
            spare_rooms: Vec::new(),
            trim_at: None,
            trimmed: None,
            periodic_trim: Instant::now() + TRIM_PERIOD,
            stopped: false,
            hold: false,
            quiescing: None,
        }
    }

    /// Runs until asked to stop, then closes every connection (`CloseReason::Shutdown`).
    pub(crate) fn run(mut self) {
        for l in 0..self.paused.len() {
            self.backend.accept(ListenerId(l));
        }
        let tick = self.limits.tick;
        let mut next_tick = Instant::now() + tick;
        loop {
            let mut timeout = next_tick.saturating_duration_since(Instant::now());
            self.shared.parked.store(true, Ordering::SeqCst);
            // Pairs with the fence in `Shared::notify`.
            fence(Ordering::SeqCst);
            if self.shared.stop.load(Ordering::SeqCst) {
                break;
            }
            if !self.rx.is_empty() || !self.ctl.is_empty() {
                timeout = Duration::ZERO;
            }
            if let Some(q) = &self.quiescing {
                timeout = timeout.min(q.next_check.saturating_duration_since(Instant::now()));
            }
            let mut done = mem::take(&mut self.completions);
            let result = self.backend.complete(Some(timeout), &mut done);
            self.shared.parked.store(false, Ordering::SeqCst);
            let now = Instant::now();
            let events = done.len();
            if events >= BIG_ROUND {
                self.trim_at = Some(now + TRIM_DELAY);
            }
            self.handle_round(now, &mut done);
            // A broadcast to many connections produces one completion each: do not keep that
            // much memory for good.
            done.shrink_to(KEEP_COMPLETIONS);
            self.completions = done;
            if let Err(e) = result {
                error!(thread = self.thread, error = %e, "I/O backend failed; stopping this thread");
                self.close_all(now, CloseReason::Error(e.kind()));
                self.end_batch(now);
                return;
            }
            self.drain_messages(now);
            self.drain_control(now);
            if now >= next_tick {
                self.tick(now);
                next_tick += tick;
                if next_tick <= now {
                    next_tick = now + tick;
                }
            }
            self.end_batch(now);
            self.flush(now);
            self.shared
                .counters
                .queued
                .store(self.queued as u64, Ordering::Relaxed);
            if self.quiescing.is_some() {
                self.check_quiesce();
            }
            if self.slow.check(self.thread, now, events) {
                bump(&self.shared.counters.slow_rounds);
            }
        }
        self.shared.parked.store(false, Ordering::SeqCst);
        let now = Instant::now();
        self.close_all(now, CloseReason::Shutdown);
        self.end_batch(now);
    }

    /// Handles one round's completions. Every [`ROUND_FLUSH`] of them, what the handler asked
    /// for so far is applied and sent: after a stall (the host's, a burst of miners) a round can
    /// hold thousands of lines, and the replies to the first of them should not wait for the
    /// last to be handled.
    fn handle_round(&mut self, now: Instant, done: &mut Vec<Completion<B>>) {
        let n = done.len();
        for (i, c) in done.drain(..).enumerate() {
            self.on_completion(now, c);
            if (i + 1) % ROUND_FLUSH == 0 && i + 1 < n {
                self.end_batch(now);
                self.flush(now);
                self.backend.submit_now();
            }
        }
    }

    /// The end of a round of callbacks: [`Handler::on_batch_end`], then its requests.
    fn end_batch(&mut self, now: Instant) {
        let (handler, out) = (&mut self.handler, &mut self.out);
        if let Err(p) = guarded(|| handler.on_batch_end(now, out)) {
            self.handler_panicked(None, "on_batch_end", &*p);
        }
        self.apply_outbox(now);
    }

    /// Logs and counts a handler callback's panic (the caller closes `conn`, if any).
    fn handler_panicked(
        &mut self,
        conn: Option<ConnId>,
        callback: &str,
        payload: &(dyn Any + Send),
    ) {
        bump(&self.shared.counters.handler_panics);
        let message = panic_message(payload);
        match conn {
            Some(conn) => error!(
                thread = self.thread,
                conn = %conn,
                callback,
                panic = message,
                "handler panicked; closing the connection"
            ),
            None => error!(
                thread = self.thread,
                callback,
                panic = message,
                "handler panicked; going on"
            ),
        }
    }

    fn on_completion(&mut self, now: Instant, c: Completion<B>) {
        match c {
            Completion::Accept {
                listener,
                result,
                more,
            } => {
                let failed = result.is_err();
                match result {
                    Ok((sock, peer)) => self.open(now, listener, sock, peer),
                    Err(e) if more => {
                        debug!(listener = listener.0, error = %e, "accept failed");
                    }
                    Err(e) => {
                        if self
                            .accept_warned
                            .is_none_or(|t| now.duration_since(t) >= ACCEPT_WARN_EVERY)
                        {
                            warn!(
                                listener = listener.0,
                                error = %e,
                                "accept failed; pausing accepts until a connection closes or the next tick"
                            );
                            self.accept_warned = Some(now);
                        }
                    }
                }
                if !more {
                    if failed {
                        if let Some(p) = self.paused.get_mut(listener.0) {
                            *p = true;
                            self.any_paused = true;
                        }
                    } else if !self.stopped && !self.gated {
                        self.backend.accept(listener);
                    }
                }
            }
            Completion::Recv { conn, buf } => {
                self.on_recv(now, conn, &buf);
                self.backend.release(buf);
            }
            Completion::RecvEnd { conn, error } => {
                let reason = error.map_or(CloseReason::Peer, |e| CloseReason::Error(e.kind()));
                self.close(now, conn, reason);
            }
            Completion::Send { conn, op, result } => self.on_sent(now, conn, op, result),
        }
    }

    fn open(&mut self, now: Instant, listener: ListenerId, sock: B::Socket, peer: SocketAddr) {
        let Some(id) = self
            .conns
            .insert(self.thread, Conn::new(Peer::from(peer), listener.0))
        else {
            warn!(%peer, "connection table full; dropping connection");
            return;
        };
        if let Err(e) = self.backend.open(id, sock) {
            self.conns.remove(id);
            warn!(%peer, error = %e, "could not register connection");
            return;
        }
        bump(&self.shared.counters.accepted);
        let open = self.limits.open.fetch_add(1, Ordering::Relaxed);
        if let Some(max) = self.limits.max_conns
            && open >= max
        {
            // Accepted and closed at once: the miner sees the close and can go to its next pool
            // at once, instead of waiting in the listen backlog (and a pending connection left
            // there would keep a level-triggered listener ready for good).
            self.limits.open.fetch_sub(1, Ordering::Relaxed);
            self.conns.remove(id);
            self.backend.close(id);
            self.refused += 1;
            bump(&self.shared.counters.refused);
            if self
                .refused_warned
                .is_none_or(|t| now.duration_since(t) >= ACCEPT_WARN_EVERY)
            {
                warn!(
                    %peer,
                    max,
                    refused = self.refused,
                    "maxclients reached: connection closed at once (refused is this thread's \
                     count since the last such line)"
                );
                self.refused_warned = Some(now);
                self.refused = 0;
            }
            return;
        }
        if let Some(per_ip) = &self.limits.per_ip
            && !per_ip.add(peer.ip(), false)
        {
            let max = per_ip.max;
            self.limits.open.fetch_sub(1, Ordering::Relaxed);
            self.conns.remove(id);
            self.backend.close(id);
            self.ip_refused += 1;
            bump(&self.shared.counters.refused);
            if self
                .ip_refused_warned
                .is_none_or(|t| now.duration_since(t) >= ACCEPT_WARN_EVERY)
            {
                warn!(
                    %peer,
                    max,
                    refused = self.ip_refused,
                    "maxclientsperip reached: connection closed at once (refused is this \
                     thread's count since the last such line)"
                );
                self.ip_refused_warned = Some(now);
                self.ip_refused = 0;
            }
            return;
        }
        bump(&self.shared.counters.open);
        debug!(conn = %id, %peer, listener = listener.0, "connection opened");
        let (handler, out) = (&mut self.handler, &mut self.out);
        if let Err(p) = guarded(|| handler.on_open(now, id, peer, listener.0, out)) {
            self.handler_panicked(Some(id), "on_open", &*p);
            self.close(now, id, CloseReason::HandlerPanic);
        }
        self.apply_outbox(now);
        if !self.stopped && self.conns.get_mut(id).is_some() {
            self.backend.recv(id);
        }
    }

    fn on_recv(&mut self, now: Instant, conn: ConnId, buf: &B::RecvBuf) {
        let Some(c) = self.conns.get_mut(conn) else {
            return;
        };
        // A trunk (a passthrough or node link) carries lines for many peers at once.
        let max_line = if c.flags & TRUNK == 0 {
            self.limits.max_line
        } else {
            self.limits.max_line.max(TRUNK_MAX_LINE)
        };
        let mut partial = match c.pending.as_deref_mut() {
            // Closing: input is read (so the close does not reset the connection) and dropped.
            Some(p) if p.close_by.is_some() => return,
            Some(p) => mem::take(&mut p.partial),
            None => Vec::new(),
        };
        let data = self.backend.recv_bytes(buf);
        let handler = &mut self.handler;
        let out = &mut self.out;
        let mut lines = false;
        let mut panicked = None;
        let result = framing::feed(&mut partial, data, max_line, |line| {
            lines = true;
            let before = out.len();
            // Zero-cost unless it panics (no clock, no allocation, no lock).
            if let Err(p) = guarded(|| handler.on_line(now, conn, line, out)) {
                panicked = Some(p);
                return ControlFlow::Break(());
            }
            if out.closes_since(before, conn) {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        });
        if let Some(p) = panicked {
            self.handler_panicked(Some(conn), "on_line", &*p);
            self.close(now, conn, CloseReason::HandlerPanic);
            self.apply_outbox(now);
            return;
        }
        // The table is untouched until the outbox is applied, so `conn` is still there.
        if let Some(c) = self.conns.get_mut(conn) {
            if lines {
                c.set_idle(0);
            }
            if partial.is_empty() {
                // A completed line leaves `partial` unallocated (see `framing::feed`).
                c.release_if_idle(&mut self.spare_pending);
            } else {
                c.pending_mut(&mut self.spare_pending).partial = partial;
            }
        }
        self.apply_outbox(now);
        if result == Err(LineTooLong) {
            if let Some(c) = self.conns.get_mut(conn) {
                warn!(conn = %conn, peer = %c.peer, max_line = self.limits.max_line, "line too long");
            }
            self.close(now, conn, CloseReason::LineTooLong);
        }
    }

    fn on_sent(
        &mut self,
        now: Instant,
        conn: ConnId,
        mut op: SendOp,
        result: std::io::Result<usize>,
    ) {
        if let Some(c) = self.conns.get_mut(conn) {
            c.set_sending(false);
            match result {
                Ok(n) => {
                    let left = c
                        .queued
                        .saturating_sub(u32::try_from(n).unwrap_or(u32::MAX));
                    self.queued = self
                        .queued
                        .saturating_sub(usize::try_from(c.queued - left).unwrap_or(0));
                    c.queued = left;
                    if c.flags & PAUSED != 0 {
                        if n > 0 {
                            c.flags |= PROGRESS;
                        }
                        if left as usize <= self.limits.pause_at / 2 {
                            c.flags &= !PAUSED;
                            drop_one(&self.shared.counters.paused);
                            if !self.stopped {
                                self.backend.resume_recv(conn);
                            }
                        }
                    }
                    if !op.is_done() {
                        // A short send: put the rest back in front, in order, before what was
                        // queued meanwhile.
                        let p = c.pending_mut(&mut self.spare_pending);
                        let mut rest = op.bufs.split_off(op.first);
                        rest.append(&mut p.queue);
                        p.queue = rest;
                        p.offset = op.offset;
                    }
                    let more = c
                        .pending
                        .as_deref()
                        .is_some_and(|p| !p.queue.is_empty() || p.close_by.is_some());
                    if more && !c.dirty() {
                        c.set_dirty(true);
                        self.dirty.push(conn);
                    }
                    // Everything is written and nothing else is pending: an idle connection
                    // keeps no allocation (a hundred bytes each adds up over 100k connections).
                    c.release_if_idle(&mut self.spare_pending);
                }
                Err(e) => {
                    debug!(conn = %conn, error = %e, "send failed");
                    self.close(now, conn, CloseReason::Error(e.kind()));
                }
            }
        }
        let room = op.bufs.into_room();
        if room.capacity() > 0
            && room.capacity() <= ROOM_KEPT
            && self.spare_rooms.len() < SPARE_ROOMS
        {
            self.spare_rooms.push(room);
        }
    }

    fn drain_messages(&mut self, now: Instant) {
        for _ in 0..MSG_BATCH {
            let Ok(msg) = self.rx.try_recv() else {
                break;
            };
            let (handler, out) = (&mut self.handler, &mut self.out);
            if let Err(p) = guarded(|| handler.on_msg(now, msg, out)) {
                self.handler_panicked(None, "on_msg", &*p);
            }
            self.apply_outbox(now);
        }
    }

    fn drain_control(&mut self, now: Instant) {
        self.apply_gate();
        while let Ok(ctl) = self.ctl.try_recv() {
            match ctl {
                Control::Quiesce { deadline, reply } => self.start_quiesce(now, deadline, reply),
                Control::Resume => self.resume(),
                Control::Export { max, reply } => {
                    let exported = self.export(now, max);
                    let _ = reply.send(exported);
                }
                Control::Adopt { conns, reply } => {
                    let adopted = self.adopt(now, conns);
                    let _ = reply.send(adopted);
                }
            }
        }
    }

    /// Follows the operator's accept gate ([`Shared::reject`]): stops accepting when it is set
    /// (new connections wait in the listen backlog) and accepts again when it is cleared. A
    /// quiesce's own stop is left alone.
    fn apply_gate(&mut self) {
        let reject = self.shared.reject.load(Ordering::Relaxed);
        if reject == self.gated {
            // Told the backend in an earlier round: say so.
            self.shared.rejecting.store(reject, Ordering::Release);
            return;
        }
        self.gated = reject;
        if self.stopped {
            return;
        }
        if reject {
            self.backend.stop_accepts();
            debug!(thread = self.thread, "accepting stopped (reject)");
        } else {
            self.any_paused = false;
            for (l, paused) in self.paused.iter_mut().enumerate() {
                *paused = false;
                self.backend.accept(ListenerId(l));
            }
            debug!(thread = self.thread, "accepting again (accept)");
        }
    }

    /// Stops accepting and reading; [`Worker::check_quiesce`] finishes the quiesce.
    fn start_quiesce(&mut self, now: Instant, deadline: Instant, reply: Sender<QuiesceReport>) {
        if !self.stopped {
            self.stopped = true;
            self.backend.stop_accepts();
            for id in self.conns.ids(self.thread) {
                self.backend.stop_recv(id);
            }
        }
        // Bytes held by an earlier quiesce are written again until the deadline.
        self.hold = false;
        debug!(thread = self.thread, "quiescing");
        // A quiesce still in progress is replaced; its caller gets an empty report.
        self.quiescing = Some(Quiescing {
            deadline,
            reply,
            cancelled: false,
            next_check: now,
        });
    }

    /// Reports the quiesce done once everything queued is written and the backend has stopped
    /// accepting and receiving; at the deadline, cancels the sends still in flight and reports
    /// once they are back (or [`CANCEL_GRACE`] later).
    fn check_quiesce(&mut self) {
        let now = Instant::now();
        let Some(q) = &mut self.quiescing else {
            return;
        };
        if now < q.next_check {
            return;
        }
        q.next_check = now + QUIESCE_CHECK;
        let (mut connections, mut unsent, mut sending) = (0, 0u64, false);
        for c in self.conns.values() {
            connections += 1;
            unsent += u64::from(c.queued);
            sending |= c.sending();
        }
        let settled = self.backend.settled();
        let flushed = if !q.cancelled {
            if unsent == 0 && settled {
                Some(true)
            } else if now >= q.deadline {
                q.cancelled = true;
                self.hold = true;
                for id in self.conns.ids(self.thread) {
                    if self.conns.get_mut(id).is_some_and(|c| c.sending()) {
                        self.backend.cancel_send(id);
                    }
                }
                None
            } else {
                None
            }
        } else if (!sending && settled) || now >= q.deadline + CANCEL_GRACE {
            if sending || !settled {
                warn!(
                    thread = self.thread,
                    "quiesce: operations still in flight after cancellation; reporting anyway"
                );
            }
            Some(false)
        } else {
            None
        };
        if let Some(flushed) = flushed
            && let Some(q) = self.quiescing.take()
        {
            self.hold = true;
            debug!(
                thread = self.thread,
                connections, unsent, flushed, "quiesced"
            );
            let _ = q.reply.send(QuiesceReport {
                connections,
                unsent,
                flushed,
            });
        }
    }

    /// Undoes a quiesce: accepting, reading and writing again.
    fn resume(&mut self) {
        self.quiescing = None;
        self.hold = false;
        if !self.stopped {
            return;
        }
        self.stopped = false;
        self.backend.reads_resumed();
        self.any_paused = false;
        for (l, paused) in self.paused.iter_mut().enumerate() {
            *paused = false;
            if !self.gated {
                self.backend.accept(ListenerId(l));
            }
        }
        for id in self.conns.ids(self.thread) {
            if self
                .conns
                .get_mut(id)
                .is_some_and(|c| c.flags & PAUSED == 0)
            {
                self.backend.recv(id);
            }
        }
        debug!(thread = self.thread, "resumed");
    }

    /// Takes up to `max` connections out, with their sockets (see [`crate::Connector::export`]).
    fn export(&mut self, now: Instant, max: usize) -> io::Result<Vec<ExportedConn>> {
        if !self.hold || self.quiescing.is_some() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "connector: quiesce before exporting connections",
            ));
        }
        self.backend.can_export()?;
        let mut ids = Vec::new();
        for id in self.conns.ids(self.thread) {
            if ids.len() >= max {
                break;
            }
            let Some(c) = self.conns.get_mut(id) else {
                continue;
            };
            if c.sending() {
                // The kernel never gave this send back: the connection stays.
                continue;
            }
            if c.close_by().is_some() {
                self.close(now, id, CloseReason::Handler);
                continue;
            }
            ids.push(id);
        }
        let fds = self.backend.export(&ids);
        let mut exported = Vec::with_capacity(ids.len());
        let mut failed = None;
        for (id, fd) in ids.into_iter().zip(fds) {
            let fd = match fd {
                Ok(fd) => fd,
                Err(e) => {
                    // Still the backend's and still here: a later export may take it.
                    failed.get_or_insert(e);
                    continue;
                }
            };
            let Some(mut conn) = self.conns.remove(id) else {
                continue;
            };
            let (partial, unsent) = match conn.pending.take() {
                Some(mut p) => {
                    let partial = mem::take(&mut p.partial);
                    let mut unsent = Vec::with_capacity(usize::try_from(conn.queued).unwrap_or(0));
                    for (i, buf) in p.queue.iter().enumerate() {
                        let bytes = buf.as_slice();
                        let bytes = if i == 0 {
                            bytes.get(p.offset..).unwrap_or(&[])
                        } else {
                            bytes
                        };
                        unsent.extend_from_slice(bytes);
                    }
                    self.spare_pending.put(p);
                    (partial, unsent)
                }
                None => (Vec::new(), Vec::new()),
            };
            self.forget(&conn);
            self.shared.counters.closed(CloseReason::Exported);
            let mut state = ConnState {
                peer: conn.peer.addr(),
                listener: conn.listener(),
                partial,
                unsent,
                user: Vec::new(),
            };
            let (handler, user) = (&mut self.handler, &mut state.user);
            if let Err(p) = guarded(|| handler.on_export(now, id, user)) {
                // The connection goes anyway, with what the handler added before the panic.
                self.handler_panicked(Some(id), "on_export", &*p);
            }
            exported.push(ExportedConn {
                conn: id,
                fd,
                state,
            });
        }
        if let Some(e) = failed {
            warn!(
                thread = self.thread,
                exported = exported.len(),
                error = %e,
                "some connections could not be exported now; they stay"
            );
            if exported.is_empty() {
                return Err(e);
            }
        }
        debug!(
            thread = self.thread,
            exported = exported.len(),
            "connections exported"
        );
        Ok(exported)
    }

    /// Installs connections exported elsewhere (see [`crate::Connector::adopt`]).
    fn adopt(&mut self, now: Instant, conns: Vec<(OwnedFd, ConnState)>) -> Vec<io::Result<ConnId>> {
        let (fds, states): (Vec<OwnedFd>, Vec<ConnState>) = conns.into_iter().unzip();
        let count = states.len();
        let mut socks = self.backend.adopt(fds).into_iter();
        let mut results = Vec::with_capacity(count);
        for state in states {
            let result = match socks.next() {
                Some(sock) => sock.and_then(|sock| self.adopt_one(now, sock, state)),
                None => Err(io::Error::other("the backend did not take the socket")),
            };
            if let Err(e) = &result {
                warn!(error = %e, "could not adopt a connection; it is closed");
            }
            results.push(result);
        }
        self.apply_outbox(now);
        results
    }

    fn adopt_one(&mut self, now: Instant, sock: B::Socket, state: ConnState) -> io::Result<ConnId> {
        if state.listener >= MAX_LISTENERS {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "an adopted connection's listener index is out of range",
            ));
        }
        let ConnState {
            peer,
            listener,
            partial,
            unsent,
            user,
        } = state;
        let id = self
            .conns
            .insert(self.thread, Conn::new(Peer::from(peer), listener))
            .ok_or_else(|| io::Error::other("connection table full"))?;
        if let Err(e) = self.backend.open(id, sock) {
            self.conns.remove(id);
            return Err(e);
        }
        self.limits.open.fetch_add(1, Ordering::Relaxed);
        if let Some(per_ip) = &self.limits.per_ip {
            per_ip.add(peer.ip(), true);
        }
        bump(&self.shared.counters.open);
        bump(&self.shared.counters.adopted);
        if let Some(c) = self.conns.get_mut(id)
            && (!partial.is_empty() || !unsent.is_empty())
        {
            let queued = u32::try_from(unsent.len()).unwrap_or(u32::MAX);
            let p = c.pending_mut(&mut self.spare_pending);
            p.partial = partial;
            if !unsent.is_empty() {
                // First in the queue: before anything the handler sends.
                p.queue.push(SendBuf::from(unsent));
                c.queued = queued;
                self.queued = self.queued.saturating_add(queued as usize);
                if self.queued > self.limits.outbound_share {
                    self.over_budget = true;
                }
                c.set_dirty(true);
                self.dirty.push(id);
            }
        }
        debug!(conn = %id, %peer, listener, "connection adopted");
        let (handler, out) = (&mut self.handler, &mut self.out);
        if let Err(p) = guarded(|| handler.on_adopt(now, id, peer, listener, &user, out)) {
            self.handler_panicked(Some(id), "on_adopt", &*p);
            self.close(now, id, CloseReason::HandlerPanic);
        }
        self.apply_outbox(now);
        if !self.stopped && self.conns.get_mut(id).is_some() {
            self.backend.recv(id);
        }
        Ok(id)
    }

    fn tick(&mut self, now: Instant) {
        let (handler, out) = (&mut self.handler, &mut self.out);
        if let Err(p) = guarded(|| handler.on_tick(now, out)) {
            self.handler_panicked(None, "on_tick", &*p);
        }
        self.apply_outbox(now);
        if let Some(sweep) = &mut self.idle
            && now >= sweep.next
            && !self.stopped
        {
            sweep.next = now + sweep.period;
            let limit = sweep.limit;
            self.sweep_idle(now, limit);
        }
        if !self.stalled.is_empty() {
            self.check_stalled(now);
        }
        if self.trim_at.is_some_and(|t| now >= t)
            && self
                .trimmed
                .is_none_or(|t| now.duration_since(t) >= TRIM_EVERY)
        {
            self.trim_at = None;
            self.trimmed = Some(now);
            crate::sys::release_free_heap();
            debug!(thread = self.thread, took = ?now.elapsed(), "free heap given back after a big round");
        }
        if self.thread == 0 && now >= self.periodic_trim {
            self.periodic_trim = now + TRIM_PERIOD;
            self.trimmed = Some(now);
            let started = Instant::now();
            crate::sys::release_free_heap();
            debug!(
                target: "ckpool_connector::heap",
                took_us = started.elapsed().as_micros(),
                "periodic heap trim"
            );
        }
        let mut closing = mem::take(&mut self.closing);
        closing.retain(
            |&id| match self.conns.get_mut(id).and_then(|c| c.close_by()) {
                Some(deadline) if now >= deadline => {
                    debug!(conn = %id, "queued bytes not written in time; closing anyway");
                    self.close(now, id, CloseReason::Handler);
                    false
                }
                Some(_) => true,
                None => false,
            },
        );
        closing.append(&mut self.closing);
        self.closing = closing;
        self.resume_accepts();
    }

    /// Carries out the handler's requests, in order.
    fn apply_outbox(&mut self, now: Instant) {
        if self.out.is_empty() {
            return;
        }
        let mut out = mem::take(&mut self.out);
        for action in out.drain() {
            match action {
                Action::Send(id, buf) => self.enqueue(now, id, buf),
                Action::Close(id) => self.request_close(now, id),
                Action::Trunk(id) => {
                    if id.thread() == self.thread
                        && let Some(c) = self.conns.get_mut(id)
                    {
                        c.flags |= TRUNK;
                        if c.flags & PAUSED != 0 {
                            // A trunk is never paused (see `TRUNK`).
                            c.flags &= !PAUSED;
                            drop_one(&self.shared.counters.paused);
                            if !self.stopped {
                                self.backend.resume_recv(id);
                            }
                        }
                    }
                }
            }
        }
        // A broadcast records a send per connection: do not keep that much room for good.
        out.shrink_to(KEEP_LIST);
        self.out = out;
    }

    fn enqueue(&mut self, now: Instant, id: ConnId, buf: SendBuf) {
        if id.thread() != self.thread {
            debug!(conn = %id, "send to a connection of another thread ignored");
            return;
        }
        let Some(c) = self.conns.get_mut(id) else {
            return;
        };
        if c.close_by().is_some() || buf.is_empty() {
            return;
        }
        let len = buf.len();
        let limit = if c.flags & TRUNK == 0 {
            self.limits.max_outbound
        } else {
            self.limits.max_outbound_trunk
        }
        .min(MAX_QUEUED);
        let queued = usize::try_from(c.queued)
            .unwrap_or(MAX_QUEUED)
            .saturating_add(len);
        if queued > limit {
            warn!(
                conn = %id,
                peer = %c.peer,
                queued = c.queued,
                len,
                limit,
                "outbound queue over limit; closing"
            );
            self.close(now, id, CloseReason::Outbound);
            return;
        }
        // At most `limit`, which fits.
        c.queued = u32::try_from(queued).unwrap_or(u32::MAX);
        // Back-pressure: a peer that does not read what it asks for is not read either (a
        // compare per queued send, on a value just written; the read path has no check at all).
        let pause = queued > self.limits.pause_at && c.flags & (PAUSED | TRUNK) == 0;
        if pause {
            c.flags |= PAUSED;
        }
        self.queued = self.queued.saturating_add(len);
        if self.queued > self.limits.outbound_share {
            self.over_budget = true;
        }
        let backlog = c.flags & (SENDING | PAUSED) != 0;
        let p = c.pending_mut(&mut self.spare_pending);
        if !p.queue.has_room()
            && let Some(room) = self.spare_rooms.pop()
        {
            p.queue.give_room(room);
        }
        if !backlog {
            p.queue.push(buf);
        } else {
            // A backlog (a send in flight, or reads paused): small replies are merged, so the
            // queue of a peer that does not read costs about its bytes. A connection that keeps
            // up queues onto an idle connection and never comes here.
            p.queue.push_merged(buf, MERGE_MAX);
        }
        if !c.dirty() {
            c.set_dirty(true);
            self.dirty.push(id);
        }
        if pause {
            self.pause(now, id);
        }
    }

    fn request_close(&mut self, now: Instant, id: ConnId) {
        let Some(c) = self.conns.get_mut(id) else {
            return;
        };
        if c.close_by().is_some() {
            return;
        }
        let p = c.pending_mut(&mut self.spare_pending);
        p.close_by = Some(now + CLOSE_LINGER);
        p.partial = Vec::new();
        self.closing.push(id);
        if !c.dirty() {
            c.set_dirty(true);
            self.dirty.push(id);
        }
    }

    /// Starts writing queued bytes and finishes closes whose bytes are written.
    fn flush(&mut self, now: Instant) {
        if self.over_budget {
            self.enforce_budget(now);
        }
        if self.hold {
            // Quiesced: what is queued stays for an export (the list is kept for a resume).
            return;
        }
        let mut dirty = mem::take(&mut self.dirty);
        for id in dirty.drain(..) {
            let Some(c) = self.conns.get_mut(id) else {
                continue;
            };
            c.set_dirty(false);
            if c.sending() {
                continue;
            }
            let Some(p) = c.pending.as_deref_mut() else {
                continue;
            };
            if !p.queue.is_empty() {
                // The queue itself becomes the operation's list (no copy, no allocation), up
                // to `OP_BUFS` buffers.
                let rest = if p.queue.len() > OP_BUFS {
                    p.queue.split_off(OP_BUFS)
                } else {
                    SendBufs::default()
                };
                let op = SendOp {
                    bufs: mem::replace(&mut p.queue, rest),
                    first: 0,
                    offset: mem::take(&mut p.offset),
                    written: 0,
                };
                c.set_sending(true);
                // The common case (a notify, a reply) leaves nothing pending: the box goes back
                // to the spares for the next connection in this round.
                c.release_if_idle(&mut self.spare_pending);
                self.backend.send(id, op);
            } else if p.close_by.is_some() {
                self.close(now, id, CloseReason::Handler);
            }
        }
        // Nothing above marks connections dirty, so the list is empty: keep its allocation, up
        // to `KEEP_LIST` entries (a broadcast marks every connection).
        dirty.append(&mut self.dirty);
        dirty.shrink_to(KEEP_LIST);
        self.dirty = dirty;
    }

    fn close(&mut self, now: Instant, id: ConnId, reason: CloseReason) {
        let Some(mut conn) = self.conns.remove(id) else {
            return;
        };
        if let Some(p) = conn.pending.take() {
            self.spare_pending.put(p);
        }
        self.forget(&conn);
        if conn.queued >= BIG_QUEUE && self.trim_at.is_none() {
            self.trim_at = Some(now + TRIM_DELAY);
        }
        self.shared.counters.closed(reason);
        self.backend.close(id);
        debug!(conn = %id, peer = %conn.peer, listener = conn.listener(), ?reason, "connection closed");
        self.on_close(now, id, reason);
        self.resume_accepts();
    }

    /// [`Handler::on_close`], guarded.
    fn on_close(&mut self, now: Instant, id: ConnId, reason: CloseReason) {
        let handler = &mut self.handler;
        if let Err(p) = guarded(|| handler.on_close(now, id, reason)) {
            self.handler_panicked(Some(id), "on_close", &*p);
        }
    }

    /// Takes a connection that leaves the table out of the totals: open connections, queued
    /// bytes, connections per IP address.
    fn forget(&mut self, conn: &Conn) {
        self.limits.open.fetch_sub(1, Ordering::Relaxed);
        if conn.flags & PAUSED != 0 {
            drop_one(&self.shared.counters.paused);
        }
        self.queued = self
            .queued
            .saturating_sub(usize::try_from(conn.queued).unwrap_or(0));
        if let Some(per_ip) = &self.limits.per_ip {
            per_ip.remove(conn.peer.ip());
        }
    }

    /// The thread's connections hold more than its share of the outbound budget: closes those
    /// with the most unsent bytes until they hold three quarters of it at most. A scan of the
    /// thread's connections, run only when the share is exceeded.
    fn enforce_budget(&mut self, now: Instant) {
        self.over_budget = false;
        let share = self.limits.outbound_share;
        if self.queued <= share {
            return;
        }
        let target = share - share / 4;
        let before = self.queued;
        let mut by_size: Vec<(u32, ConnId)> = self
            .conns
            .ids(self.thread)
            .into_iter()
            .filter_map(|id| {
                let c = self.conns.get_mut(id)?;
                (c.queued > 0).then_some((c.queued, id))
            })
            .collect();
        by_size.sort_unstable_by_key(|&(queued, _)| std::cmp::Reverse(queued));
        for (_, id) in by_size {
            if self.queued <= target {
                break;
            }
            self.close(now, id, CloseReason::OutboundBudget);
            self.budget_closed += 1;
        }
        if self
            .budget_warned
            .is_none_or(|t| now.duration_since(t) >= ACCEPT_WARN_EVERY)
        {
            warn!(
                thread = self.thread,
                share,
                queued = before,
                closed = self.budget_closed,
                "outbound budget (maxoutbound) exceeded: closed the connections with the most \
                 unsent bytes (closed is this thread's count since the last such line)"
            );
            self.budget_warned = Some(now);
            self.budget_closed = 0;
        }
    }

    /// Stops reading `id` (its [`PAUSED`] flag is set): its unsent bytes went over
    /// [`Limits::pause_at`].
    fn pause(&mut self, now: Instant, id: ConnId) {
        bump(&self.shared.counters.paused);
        bump(&self.shared.counters.pauses);
        if !self.stopped {
            self.backend.pause_recv(id);
        }
        if self.limits.stall_timeout.is_some() && !self.stalled.iter().any(|&(c, _)| c == id) {
            self.stalled.push((id, now));
        }
    }

    /// On ticks: forgets the connections that are no longer paused, and closes those paused
    /// with no byte written for [`Limits::stall_timeout`].
    fn check_stalled(&mut self, now: Instant) {
        let Some(timeout) = self.limits.stall_timeout else {
            self.stalled.clear();
            return;
        };
        let mut stalled = Vec::new();
        let conns = &mut self.conns;
        self.stalled.retain_mut(|(id, since)| {
            let Some(c) = conns.get_mut(*id) else {
                return false;
            };
            if c.flags & PAUSED == 0 {
                c.flags &= !PROGRESS;
                return false;
            }
            if c.flags & PROGRESS != 0 {
                c.flags &= !PROGRESS;
                *since = now;
            } else if now.duration_since(*since) >= timeout {
                stalled.push((*id, c.queued, c.peer));
                return false;
            }
            true
        });
        if self.stalled.capacity() > KEEP_LIST && self.stalled.len() < KEEP_LIST / 2 {
            self.stalled.shrink_to(KEEP_LIST);
        }
        for (id, queued, peer) in stalled {
            warn!(
                conn = %id,
                %peer,
                queued,
                timeout_s = timeout.as_secs_f64(),
                "reads paused and nothing written for the stall timeout (the peer does not read); closing"
            );
            self.close(now, id, CloseReason::Stalled);
        }
    }

    /// One idle sweep: every connection's idle count goes up by one, and those reaching `limit`
    /// (no complete line for the idle timeout) are closed.
    fn sweep_idle(&mut self, now: Instant, limit: u8) {
        let mut idle = Vec::new();
        for id in self.conns.ids(self.thread) {
            let Some(c) = self.conns.get_mut(id) else {
                continue;
            };
            // A trunk (a passthrough or node link) with no peers behind it may be silent.
            if c.close_by().is_some() || c.flags & TRUNK != 0 {
                continue;
            }
            let n = c.idle().saturating_add(1).min(IDLE_MAX);
            c.set_idle(n);
            if n >= limit {
                idle.push(id);
            }
        }
        if !idle.is_empty() {
            debug!(
                thread = self.thread,
                closed = idle.len(),
                "idle connections closed"
            );
        }
        for id in idle {
            self.close(now, id, CloseReason::Idle);
        }
    }

    fn resume_accepts(&mut self) {
        if !self.any_paused || self.stopped || self.gated {
            return;
        }
        self.any_paused = false;
        for (l, paused) in self.paused.iter_mut().enumerate() {
            if mem::take(paused) {
                self.backend.accept(ListenerId(l));
            }
        }
    }

    fn close_all(&mut self, now: Instant, reason: CloseReason) {
        for id in self.conns.ids(self.thread) {
            if let Some(conn) = self.conns.remove(id) {
                self.forget(&conn);
                self.shared.counters.closed(reason);
                self.backend.close(id);
                self.on_close(now, id, reason);
            }
        }
    }
}

/// Loop rounds that took [`SLOW_ROUND`] or more, from the backend's return to the next wait:
/// handler work, sends and closes together. Each such round stalls all of the thread's
/// connections; they are logged so an operator sees the stalls behind latency tails.
#[derive(Debug, Default)]
struct SlowRounds {
    /// When the last one was logged.
    warned: Option<Instant>,
    /// Slow rounds since then, and the longest of them.
    unlogged: u64,
    longest: Duration,
}

impl SlowRounds {
    /// `started`: when the round's work began; `events`: completions it handled. Returns whether
    /// the round was slow.
    fn check(&mut self, thread: u16, started: Instant, events: usize) -> bool {
        let took = started.elapsed();
        if took < SLOW_ROUND {
            return false;
        }
        self.unlogged += 1;
        self.longest = self.longest.max(took);
        let now = Instant::now();
        if self
            .warned
            .is_some_and(|t| now.duration_since(t) < SLOW_WARN_EVERY)
        {
            return true;
        }
        info!(
            thread,
            took_ms = took.as_secs_f64() * 1e3,
            events,
            slow_rounds = self.unlogged,
            longest_ms = self.longest.as_secs_f64() * 1e3,
            "slow loop round: every connection of this thread waited (slow_rounds and longest \
             since the last such line)"
        );
        self.warned = Some(now);
        self.unlogged = 0;
        self.longest = Duration::ZERO;
        true
    }
}

/// A connection as the loop sees it (the socket itself belongs to the backend): 32 bytes, and no
/// heap memory while idle (nothing queued, no partial line, no close pending). A send in flight
/// needs none either: the backend owns its buffers.
struct Conn {
    /// What exists only while something is pending; `None` when idle.
    pending: Option<Box<Pending>>,
    peer: Peer,
    /// Bytes not yet written, including those of the send in flight (at most [`MAX_QUEUED`]).
    queued: u32,
    /// [`SENDING`], [`DIRTY`], the idle count ([`IDLE_MASK`]), [`TRUNK`], [`PAUSED`] and
    /// [`PROGRESS`].
    flags: u8,
    /// The listener it came from, plus one (at most [`MAX_LISTENERS`] listeners; the niche also
    /// keeps `Option<Conn>` at 32 bytes).
    listener: NonZeroU8,
}

/// [`Conn::flags`]: a send is in flight.
const SENDING: u8 = 1;
/// [`Conn::flags`]: the connection is in the dirty list.
const DIRTY: u8 = 2;
/// [`Conn::flags`]: the idle count (idle sweeps since the last complete line), three bits.
const IDLE_SHIFT: u8 = 2;
const IDLE_MASK: u8 = 0b111 << IDLE_SHIFT;
/// The largest idle count.
const IDLE_MAX: u8 = IDLE_MASK >> IDLE_SHIFT;
/// [`Conn::flags`]: a trunk ([`Action::Trunk`]), capped at [`Limits::max_outbound_trunk`].
/// Never paused: its reads carry many peers' shares. Never closed as idle, and its lines may be
/// [`TRUNK_MAX_LINE`] long.
const TRUNK: u8 = 1 << 5;
/// A trunk's lines may be this long (or [`Limits::max_line`] if longer): an upstream's multicast
/// line names every miner it is for, a node's link lines carry whole blocks.
const TRUNK_MAX_LINE: usize = 16 << 20;
/// [`Conn::flags`]: reads paused for back-pressure (see [`Limits::pause_at`]).
const PAUSED: u8 = 1 << 6;
/// [`Conn::flags`]: while paused, bytes were written since the last stall check.
const PROGRESS: u8 = 1 << 7;

impl Conn {
    fn new(peer: Peer, listener: usize) -> Self {
        Self {
            pending: None,
            peer,
            queued: 0,
            flags: 0,
            listener: u8::try_from(listener.saturating_add(1))
                .ok()
                .and_then(NonZeroU8::new)
                .unwrap_or(NonZeroU8::MAX),
        }
    }

    /// The index of the listener it came from.
    fn listener(&self) -> usize {
        usize::from(self.listener.get() - 1)
    }

    /// Whether a send is in flight.
    fn sending(&self) -> bool {
        self.flags & SENDING != 0
    }

    fn set_sending(&mut self, on: bool) {
        self.set_flag(SENDING, on);
    }

    /// Whether the connection is in the dirty list.
    fn dirty(&self) -> bool {
        self.flags & DIRTY != 0
    }

    fn set_dirty(&mut self, on: bool) {
        self.set_flag(DIRTY, on);
    }

    /// Idle sweeps since the last complete line.
    fn idle(&self) -> u8 {
        (self.flags & IDLE_MASK) >> IDLE_SHIFT
    }

    fn set_idle(&mut self, n: u8) {
        self.flags = (self.flags & !IDLE_MASK) | ((n.min(IDLE_MAX) << IDLE_SHIFT) & IDLE_MASK);
    }

    fn set_flag(&mut self, flag: u8, on: bool) {
        if on {
            self.flags |= flag;
        } else {
            self.flags &= !flag;
        }
    }

    /// The deadline of a handler-requested close, if one is pending.
    fn close_by(&self) -> Option<Instant> {
        self.pending.as_deref().and_then(|p| p.close_by)
    }

    /// The pending state, taken from `spares` (or allocated) if there is none.
    fn pending_mut(&mut self, spares: &mut SparePending) -> &mut Pending {
        self.pending.get_or_insert_with(|| spares.take())
    }

    /// Gives the pending state back to `spares` if nothing is pending any more.
    fn release_if_idle(&mut self, spares: &mut SparePending) {
        if self.pending.as_deref().is_some_and(Pending::is_idle)
            && let Some(p) = self.pending.take()
        {
            spares.put(p);
        }
    }
}

/// What a connection holds only while something is pending: a partial line, buffers not yet
/// handed to the backend, or a close. Allocated (or taken from the worker's spares) when the
/// first of these appears, and given back as soon as none is left.
#[derive(Default)]
struct Pending {
    /// Incomplete line from earlier reads.
    partial: Vec<u8>,
    /// Buffers not yet handed to the backend (the first inline, so one buffer needs no other
    /// allocation).
    queue: SendBufs,
    /// Bytes of the first queued buffer already written (the rest of a short send).
    offset: usize,
    /// Set when the handler asked to close: the deadline for writing what is queued.
    close_by: Option<Instant>,
}

impl Pending {
    fn is_idle(&self) -> bool {
        self.partial.is_empty() && self.queue.is_empty() && self.close_by.is_none()
    }
}

/// Emptied [`Pending`] boxes kept for reuse (at most [`SPARE_PENDING`]), so that queueing a send
/// to an idle connection usually allocates nothing.
#[derive(Default)]
struct SparePending {
    #[expect(
        clippy::vec_box,
        reason = "the boxes themselves are reused: a connection holds one, not a `Pending`"
    )]
    boxes: Vec<Box<Pending>>,
}

impl SparePending {
    /// An empty box: a spare one, or a new one.
    fn take(&mut self) -> Box<Pending> {
        self.boxes.pop().unwrap_or_default()
    }

    /// Empties `p` (dropping what it held) and keeps it if there is room.
    fn put(&mut self, mut p: Box<Pending>) {
        if self.boxes.len() < SPARE_PENDING {
            *p = Pending::default();
            self.boxes.push(p);
        }
    }
}

/// Connection table: slots reused through a FIFO free list (so a slot rests as long as possible
/// before reuse), each with a generation bumped on every close so stale ids are recognised. The
/// slots grow in chunks (see [`Chunked`]), never by copying the table.
struct Slab<T = Conn> {
    slots: Chunked<Slot<T>>,
    free: VecDeque<u32>,
}

struct Slot<T> {
    generation: u16,
    value: Option<T>,
}

impl<T> Default for Slab<T> {
    fn default() -> Self {
        Self {
            slots: Chunked::new(),
            free: VecDeque::new(),
        }
    }
}

impl<T> Slab<T> {
    /// Stores `value`; `None` if the table has no slot index left.
    fn insert(&mut self, thread: u16, value: T) -> Option<ConnId> {
        let slot = match self.free.pop_front() {
            Some(slot) => slot,
            None => {
                let slot = u32::try_from(self.slots.len()).ok()?;
                self.slots.push(Slot {
                    generation: 0,
                    value: None,
                });
                slot
            }
        };
        let entry = self.slots.get_mut(usize::try_from(slot).ok()?)?;
        entry.value = Some(value);
        Some(ConnId::new(thread, entry.generation, slot))
    }

    fn entry(&mut self, id: ConnId) -> Option<&mut Slot<T>> {
        let slot = usize::try_from(id.slot()).ok()?;
        self.slots
            .get_mut(slot)
            .filter(|s| s.generation == id.generation() && s.value.is_some())
    }

    fn get_mut(&mut self, id: ConnId) -> Option<&mut T> {
        self.entry(id).and_then(|s| s.value.as_mut())
    }

    fn remove(&mut self, id: ConnId) -> Option<T> {
        let entry = self.entry(id)?;
        let value = entry.value.take();
        entry.generation = entry.generation.wrapping_add(1);
        self.free.push_back(id.slot());
        value
    }

    /// All live entries.
    fn values(&self) -> impl Iterator<Item = &T> {
        self.slots.iter().filter_map(|s| s.value.as_ref())
    }

    /// Ids of all live entries.
    fn ids(&self, thread: u16) -> Vec<ConnId> {
        self.slots
            .iter()
            .zip(0u32..)
            .filter(|(s, _)| s.value.is_some())
            .map(|(s, slot)| ConnId::new(thread, s.generation, slot))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slow_rounds_are_counted_and_logged_at_most_every_ten_seconds() {
        let mut slow = SlowRounds::default();
        let now = Instant::now();
        // A quick round: nothing.
        slow.check(0, now, 5);
        assert_eq!((slow.warned, slow.unlogged), (None, 0));
        let Some(long_ago) = now.checked_sub(Duration::from_millis(30)) else {
            return; // the clock started less than 30 ms ago: nothing to test with
        };
        // A slow one is logged at once and the tally starts again.
        slow.check(0, long_ago, 5);
        assert!(slow.warned.is_some());
        assert_eq!(slow.unlogged, 0);
        // The next within 10 s is only counted, with the longest kept.
        slow.check(0, long_ago, 7);
        assert_eq!(slow.unlogged, 1);
        assert!(slow.longest >= Duration::from_millis(30));
    }

    #[test]
    fn slab_generations_reject_stale_ids() {
        let mut slab: Slab<&str> = Slab::default();
        let a = slab.insert(3, "a").unwrap();
        let b = slab.insert(3, "b").unwrap();
        assert_eq!((a.thread(), a.slot(), a.generation()), (3, 0, 0));
        assert_eq!(b.slot(), 1);
        assert_eq!(slab.remove(a), Some("a"));
        assert_eq!(slab.remove(a), None, "double close is a no-op");
        assert_eq!(slab.get_mut(a), None);
        let c = slab.insert(3, "c").unwrap();
        assert_eq!(
            (c.slot(), c.generation()),
            (0, 1),
            "slot reused with a new generation"
        );
        assert_eq!(
            slab.get_mut(a),
            None,
            "the stale id does not reach the new entry"
        );
        assert_eq!(slab.get_mut(c).copied(), Some("c"));
        let mut ids = slab.ids(3);
        ids.sort();
        assert_eq!(ids, vec![b, c]);
    }

    #[test]
    fn slab_reuses_slots_in_fifo_order() {
        let mut slab: Slab<u32> = Slab::default();
        let ids: Vec<_> = (0..4).map(|i| slab.insert(0, i).unwrap()).collect();
        slab.remove(ids[2]);
        slab.remove(ids[0]);
        assert_eq!(slab.insert(0, 9).unwrap().slot(), 2);
        assert_eq!(slab.insert(0, 9).unwrap().slot(), 0);
        assert_eq!(slab.insert(0, 9).unwrap().slot(), 4);
    }

    #[test]
    fn connection_state_stays_small() {
        // Budget: at most 256 bytes of user memory per idle authorised miner for the whole pool,
        // connector and stratifier together; the connector's share is this slot (an idle
        // connection has no `Pending`) and the backend's entry.
        assert!(size_of::<Slot<Conn>>() <= 40, "{}", size_of::<Slot<Conn>>());
    }

    /// A backend that does nothing: it records sends and closes, and the test plays the kernel
    /// by handing completions to the worker.
    #[derive(Default)]
    struct Fake {
        received: Vec<Vec<u8>>,
        sent: VecDeque<(ConnId, SendOp)>,
        closed: Vec<ConnId>,
        /// Sends started before each `submit_now`.
        submits: Vec<usize>,
        /// `pause_recv` and `resume_recv` calls.
        paused: Vec<ConnId>,
        resumed: Vec<ConnId>,
    }

    impl Backend for Fake {
        type Socket = ();
        type RecvBuf = usize;

        fn accept(&mut self, _: ListenerId) {}

        fn open(&mut self, _: ConnId, (): ()) -> std::io::Result<()> {
            Ok(())
        }

        fn recv(&mut self, _: ConnId) {}

        fn recv_bytes(&self, buf: &usize) -> &[u8] {
            self.received.get(*buf).map_or(&[], Vec::as_slice)
        }

        fn release(&mut self, _: usize) {}

        fn send(&mut self, conn: ConnId, op: SendOp) {
            self.sent.push_back((conn, op));
        }

        fn close(&mut self, conn: ConnId) {
            self.closed.push(conn);
        }

        fn submit_now(&mut self) {
            self.submits.push(self.sent.len());
        }

        fn stop_accepts(&mut self) {}

        fn stop_recv(&mut self, _: ConnId) {}

        fn pause_recv(&mut self, conn: ConnId) {
            self.paused.push(conn);
        }

        fn resume_recv(&mut self, conn: ConnId) {
            self.resumed.push(conn);
        }

        fn cancel_send(&mut self, _: ConnId) {}

        fn settled(&self) -> bool {
            true
        }

        fn export(&mut self, conns: &[ConnId]) -> Vec<std::io::Result<OwnedFd>> {
            conns
                .iter()
                .map(|_| std::fs::File::open("/dev/null").map(OwnedFd::from))
                .collect()
        }

        fn adopt(&mut self, fds: Vec<OwnedFd>) -> Vec<std::io::Result<()>> {
            fds.into_iter().map(|_| Ok(())).collect()
        }

        fn complete(
            &mut self,
            _: Option<Duration>,
            _: &mut Vec<Completion<Self>>,
        ) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// Records lines and closes.
    #[derive(Default)]
    struct Recorder {
        lines: Vec<Vec<u8>>,
        closed: Vec<(ConnId, CloseReason)>,
        /// Answer every line with itself.
        echo: bool,
    }

    impl Handler for Recorder {
        type Msg = ();

        fn on_open(&mut self, _: Instant, _: ConnId, _: SocketAddr, _: usize, _: &mut Outbox) {}

        fn on_line(&mut self, _: Instant, conn: ConnId, line: &[u8], out: &mut Outbox) {
            if line == b"boom" {
                out.send(conn, b"half done\n".to_vec());
                panic!("boom");
            }
            self.lines.push(line.to_vec());
            if self.echo {
                out.send(conn, line.to_vec());
            }
        }

        fn on_close(&mut self, _: Instant, conn: ConnId, reason: CloseReason) {
            self.closed.push((conn, reason));
        }

        fn on_msg(&mut self, _: Instant, (): (), _: &mut Outbox) {}

        fn on_tick(&mut self, _: Instant, _: &mut Outbox) {}
    }

    type TestWorker = Worker<Fake, Recorder>;

    fn worker(max_outbound: usize) -> TestWorker {
        let (_tx, rx) = crossbeam_channel::unbounded();
        let (_ctl_tx, ctl) = crossbeam_channel::unbounded();
        let shared = Arc::new(Shared::new(Arc::new(Waker::new().unwrap())));
        let limits = Limits {
            max_line: 64,
            max_outbound,
            max_outbound_trunk: max_outbound * 4,
            tick: Duration::from_secs(1),
            max_conns: None,
            open: Arc::new(AtomicUsize::new(0)),
            per_ip: None,
            outbound_share: usize::MAX,
            idle_timeout: None,
            pause_at: usize::MAX,
            stall_timeout: None,
        };
        Worker::new(
            0,
            Fake::default(),
            Recorder::default(),
            (rx, ctl),
            shared,
            limits,
            1,
        )
    }

    impl TestWorker {
        /// Accepts a connection; returns its id.
        fn accept(&mut self, now: Instant) -> ConnId {
            let before = self.conns.ids(0);
            let peer: SocketAddr = "192.0.2.7:4000".parse().unwrap();
            self.on_completion(
                now,
                Completion::Accept {
                    listener: ListenerId(0),
                    result: Ok(((), peer)),
                    more: true,
                },
            );
            let id = self
                .conns
                .ids(0)
                .into_iter()
                .find(|id| !before.contains(id))
                .unwrap();
            assert_eq!(self.conn(id).peer.addr(), peer);
            id
        }

        fn receive(&mut self, now: Instant, conn: ConnId, data: &[u8]) {
            self.backend.received.push(data.to_vec());
            let buf = self.backend.received.len() - 1;
            self.on_completion(now, Completion::Recv { conn, buf });
        }

        /// What a handler callback would do: queue `data` for `conn`.
        fn queue(&mut self, now: Instant, conn: ConnId, data: &[u8]) {
            self.out.send(conn, data.to_vec());
            self.apply_outbox(now);
        }

        /// Finishes the oldest send in flight with `n` bytes written (`None`: all of them);
        /// returns the bytes.
        fn finish_send(&mut self, now: Instant, n: Option<usize>) -> Vec<u8> {
            let (conn, mut op) = self.backend.sent.pop_front().unwrap();
            let all: Vec<u8> = op.remaining().flatten().copied().collect();
            let n = n.unwrap_or(all.len());
            op.advance(n);
            self.on_completion(
                now,
                Completion::Send {
                    conn,
                    op,
                    result: Ok(n),
                },
            );
            all[..n].to_vec()
        }

        fn conn(&mut self, id: ConnId) -> &mut Conn {
            self.conns.get_mut(id).unwrap()
        }

        fn pending(&mut self, id: ConnId) -> Option<&Pending> {
            self.conn(id).pending.as_deref()
        }
    }

    #[test]
    fn a_long_round_sends_replies_before_its_end() {
        let now = Instant::now();
        let mut w = worker(1024);
        w.handler.echo = true;
        let ids: Vec<ConnId> = (0..200).map(|_| w.accept(now)).collect();
        let mut round = Vec::new();
        for id in &ids {
            w.backend.received.push(b"hi\n".to_vec());
            let buf = w.backend.received.len() - 1;
            round.push(Completion::Recv { conn: *id, buf });
        }
        w.handle_round(now, &mut round);
        assert!(round.is_empty());
        assert_eq!(w.handler.lines.len(), 200);
        // Flushed after 64, 128 and 192 lines, each time with the replies so far.
        assert_eq!(w.backend.submits, [64, 128, 192]);
        assert_eq!(w.backend.sent.len(), 192);
        // The rest go at the end of the round, as before.
        w.end_batch(now);
        w.flush(now);
        assert_eq!(w.backend.sent.len(), 200);
        // A short round is not split.
        let id = ids[0];
        w.finish_send(now, None);
        w.backend.received.push(b"again\n".to_vec());
        let buf = w.backend.received.len() - 1;
        w.handle_round(now, &mut vec![Completion::Recv { conn: id, buf }]);
        assert_eq!(w.backend.submits.len(), 3);
    }

    #[test]
    fn an_idle_connection_holds_no_pending_state_after_a_send() {
        let now = Instant::now();
        let mut w = worker(1024);
        let id = w.accept(now);
        assert!(w.pending(id).is_none());

        w.queue(now, id, b"notify\n");
        let first = w.pending(id).map(std::ptr::from_ref).unwrap();
        w.flush(now);
        // The queue went to the backend as it was: nothing is left pending, and the box is kept
        // for the next connection that queues something.
        assert!(w.pending(id).is_none());
        assert_eq!(w.spare_pending.boxes.len(), 1);
        assert_eq!((w.conn(id).queued, w.conn(id).sending()), (7, true));
        assert_eq!(w.backend.sent.front().map(|(_, op)| op.bufs.len()), Some(1));
        assert_eq!(w.finish_send(now, None), b"notify\n");
        assert!(w.pending(id).is_none());
        assert_eq!((w.conn(id).queued, w.conn(id).sending()), (0, false));
        assert!(w.dirty.is_empty());

        // The next send reuses the spare box rather than allocating one.
        w.queue(now, id, b"again\n");
        assert_eq!(w.pending(id).map(std::ptr::from_ref), Some(first));
        assert!(w.spare_pending.boxes.is_empty());
        w.flush(now);
        assert_eq!(w.finish_send(now, None), b"again\n");
        assert!(w.pending(id).is_none());
    }

    #[test]
    fn an_idle_connection_holds_no_pending_state_after_a_partial_line() {
        let now = Instant::now();
        let mut w = worker(1024);
        let id = w.accept(now);
        // Complete lines alone never create one.
        w.receive(now, id, b"one\n");
        assert!(w.pending(id).is_none());
        w.receive(now, id, b"ab");
        assert_eq!(
            w.pending(id).map(|p| p.partial.as_slice()),
            Some(&b"ab"[..])
        );
        w.receive(now, id, b"c\nde");
        assert_eq!(
            w.pending(id).map(|p| p.partial.as_slice()),
            Some(&b"de"[..])
        );
        w.receive(now, id, b"f\r\n");
        assert!(w.pending(id).is_none());
        assert_eq!(w.handler.lines, [&b"one"[..], b"abc", b"def"]);
        // A partial line keeps the state while a send completes.
        w.queue(now, id, b"x\n");
        w.receive(now, id, b"g");
        w.flush(now);
        w.finish_send(now, None);
        assert_eq!(w.pending(id).map(|p| p.partial.as_slice()), Some(&b"g"[..]));
        w.receive(now, id, b"\n");
        assert!(w.pending(id).is_none());
    }

    #[test]
    fn short_sends_put_the_rest_back_in_order() {
        let now = Instant::now();
        let mut w = worker(1024);
        let id = w.accept(now);
        w.queue(now, id, b"abc");
        w.queue(now, id, b"def");
        w.flush(now);
        // Queued while the send is in flight.
        w.queue(now, id, b"gh");
        assert_eq!(w.conn(id).queued, 8);
        w.flush(now);
        assert_eq!(w.backend.sent.len(), 1, "one send in flight at a time");
        assert_eq!(w.finish_send(now, Some(4)), b"abcd");
        assert_eq!(w.conn(id).queued, 4);
        assert_eq!(w.pending(id).map(|p| p.offset), Some(1));
        w.flush(now);
        assert_eq!(w.finish_send(now, Some(1)), b"e");
        w.flush(now);
        assert_eq!(w.finish_send(now, None), b"fgh");
        assert!(w.pending(id).is_none());
        assert_eq!(w.conn(id).queued, 0);
        assert!(w.backend.sent.is_empty() && w.handler.closed.is_empty());
    }

    #[test]
    fn the_outbound_cap_counts_bytes_in_flight() {
        let now = Instant::now();
        let mut w = worker(10);
        let id = w.accept(now);
        w.queue(now, id, b"123456");
        w.flush(now);
        assert!(w.pending(id).is_none());
        w.queue(now, id, b"7890");
        assert!(w.handler.closed.is_empty(), "exactly the cap is fine");
        w.queue(now, id, b"x");
        assert_eq!(w.handler.closed, [(id, CloseReason::Outbound)]);
        assert_eq!(w.backend.closed, [id]);
        assert!(w.conns.get_mut(id).is_none());
        // The box of the closed connection is kept for reuse.
        assert_eq!(w.spare_pending.boxes.len(), 1);
    }

    #[test]
    fn a_trunk_may_queue_up_to_its_own_cap() {
        let now = Instant::now();
        let mut w = worker(10);
        let (trunk, other) = (w.accept(now), w.accept(now));
        w.out.trunk(trunk);
        w.apply_outbox(now);
        w.queue(now, trunk, b"123456");
        w.flush(now);
        // 40 bytes for a trunk (four times the cap here), 10 for the others.
        w.queue(now, trunk, b"78901234567890123456789012345678");
        w.queue(now, trunk, b"12");
        assert!(
            w.handler.closed.is_empty(),
            "exactly the trunk's cap is fine"
        );
        w.queue(now, other, b"12345678901");
        assert_eq!(w.handler.closed, [(other, CloseReason::Outbound)]);
        w.queue(now, trunk, b"x");
        assert_eq!(
            w.handler.closed,
            [
                (other, CloseReason::Outbound),
                (trunk, CloseReason::Outbound)
            ]
        );
    }

    #[test]
    fn reads_pause_above_the_threshold_resume_at_half_and_a_stall_closes() {
        let start = Instant::now();
        let mut w = worker(1000);
        w.limits.pause_at = 100;
        w.limits.stall_timeout = Some(Duration::from_secs(30));
        w.handler.echo = true;
        let (slow, trunk) = (w.accept(start), w.accept(start));
        w.out.trunk(trunk);
        w.apply_outbox(start);
        // 60 bytes, then 120: over the threshold, reads stop (the trunk's never do).
        w.receive(start, slow, &[b'a'; 60]);
        w.receive(start, slow, b"\n");
        w.flush(start);
        w.receive(start, slow, &[b'b'; 60]);
        w.receive(start, slow, b"\n");
        let mut two = [b'c'; 122];
        two[60] = b'\n';
        two[121] = b'\n';
        w.receive(start, trunk, &two);
        assert_eq!(w.backend.paused, [slow]);
        assert_eq!(w.shared.counters.snapshot().paused, 1);
        // Writing the first 60 leaves 60, over half of it: still paused.
        w.flush(start);
        assert_eq!(w.finish_send(start, None), [b'a'; 60]);
        assert!(w.backend.resumed.is_empty());
        // Down to 40: reads again.
        w.flush(start);
        let _trunk_bytes = w.finish_send(start, None);
        w.finish_send(start, Some(20));
        assert_eq!(w.backend.resumed, [slow]);
        assert_eq!(w.shared.counters.snapshot().paused, 0);
        // Paused again; a byte written within the timeout keeps it, none for 30 s closes it.
        w.flush(start);
        w.receive(start, slow, &[b'd'; 62]);
        w.receive(start, slow, b"\n");
        assert_eq!(w.backend.paused, [slow, slow]);
        w.tick(start + Duration::from_secs(1));
        w.finish_send(start, Some(1));
        w.tick(start + Duration::from_secs(29));
        w.tick(start + Duration::from_secs(31));
        assert!(
            w.handler.closed.is_empty(),
            "progress at 29 s restarts the clock"
        );
        w.tick(start + Duration::from_secs(59));
        assert_eq!(w.handler.closed, [(slow, CloseReason::Stalled)]);
        let c = w.shared.counters.snapshot();
        assert_eq!((c.paused, c.pauses, c.closed.stalled), (0, 2, 1));
        assert!(w.stalled.is_empty());
    }

    #[test]
    fn export_carries_the_partial_line_and_the_unwritten_bytes_to_the_adopter() {
        let now = Instant::now();
        let mut a = worker(1024);
        let id = a.accept(now);
        a.receive(now, id, b"abc\nde");
        a.queue(now, id, b"0123456789");
        a.flush(now);
        // A short send: four bytes written, the rest put back with an offset.
        assert_eq!(a.finish_send(now, Some(4)), b"0123");
        a.queue(now, id, b"xyz");
        // Not quiesced: refused, nothing taken.
        let err = a.export(now, 10).err().unwrap();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        assert!(a.conns.get_mut(id).is_some());
        // Quiesced and held (what `check_quiesce` leaves): nothing more is written.
        a.stopped = true;
        a.hold = true;
        a.flush(now);
        assert!(a.backend.sent.is_empty(), "held: no send");
        let mut out = a.export(now, 10).unwrap();
        assert_eq!(out.len(), 1);
        let e = out.remove(0);
        assert_eq!(e.conn, id);
        assert_eq!(e.state.partial, b"de");
        assert_eq!(e.state.unsent, b"456789xyz");
        assert_eq!(e.state.peer, "192.0.2.7:4000".parse().unwrap());
        assert_eq!(e.state.listener, 0);
        assert!(a.conns.get_mut(id).is_none());
        assert_eq!(a.handler.closed, [(id, CloseReason::Exported)]);
        let c = a.shared.counters.snapshot();
        assert_eq!((c.open, c.exported, c.closed.total()), (0, 1, 0));
        assert!(a.export(now, 10).unwrap().is_empty(), "none left");

        // Adopted: the unsent bytes go first, the partial line starts the input.
        let mut b = worker(1024);
        b.handler.echo = true;
        let ids = b.adopt(now, vec![(e.fd, e.state)]);
        let nid = ids.into_iter().next().unwrap().unwrap();
        b.receive(now, nid, b"f\n");
        assert_eq!(b.handler.lines, [&b"def"[..]]);
        b.flush(now);
        assert_eq!(b.finish_send(now, None), b"456789xyzdef");
        let c = b.shared.counters.snapshot();
        assert_eq!((c.open, c.adopted), (1, 1));
    }

    #[test]
    fn a_handler_close_waits_for_queued_bytes_then_lingers_at_most_its_limit() {
        let now = Instant::now();
        let mut w = worker(1024);
        let a = w.accept(now);
        w.receive(now, a, b"partial");
        w.queue(now, a, b"bye\n");
        w.out.close(a);
        w.out.send(a, b"ignored\n".to_vec());
        w.apply_outbox(now);
        assert_eq!(w.conn(a).queued, 4);
        assert!(w.pending(a).is_some_and(|p| p.partial.is_empty()));
        // Input is dropped while closing.
        w.receive(now, a, b"more\n");
        assert!(w.handler.lines.is_empty());
        w.flush(now);
        assert!(w.handler.closed.is_empty(), "waits for the send");
        assert_eq!(w.finish_send(now, None), b"bye\n");
        w.flush(now);
        assert_eq!(w.handler.closed, [(a, CloseReason::Handler)]);

        // A peer that does not read: closed on the first tick after the linger.
        let b = w.accept(now);
        w.queue(now, b, b"stuck\n");
        w.out.close(b);
        w.apply_outbox(now);
        w.flush(now);
        w.tick(now + CLOSE_LINGER / 2);
        assert_eq!(w.handler.closed.len(), 1);
        w.tick(now + CLOSE_LINGER);
        assert_eq!(w.handler.closed.last(), Some(&(b, CloseReason::Handler)));
    }

    #[test]
    fn ip_counts_limit_each_address_and_forget_closed_ones() {
        let counts = IpCounts::new(2);
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let mapped: IpAddr = "::ffff:192.0.2.1".parse().unwrap();
        let b: IpAddr = "2001:db8::1".parse().unwrap();
        assert!(counts.add(a, false));
        assert!(
            counts.add(mapped, false),
            "a mapped address is the IPv4 one"
        );
        assert!(!counts.add(a, false), "the third is refused");
        assert!(counts.add(b, false), "another address is not");
        assert!(counts.add(a, true), "adopted ones are counted anyway");
        assert_eq!(counts.count(a), 3);
        counts.remove(a);
        assert!(!counts.add(a, false), "still two");
        counts.remove(mapped);
        assert!(counts.add(a, false), "one left: room for another");
        counts.remove(a);
        counts.remove(a);
        counts.remove(b);
        assert_eq!((counts.count(a), counts.count(b)), (0, 0));
        assert!(counts.shards.iter().all(|s| s.lock().unwrap().is_empty()));
    }

    #[test]
    fn idle_sweeps_close_connections_without_a_complete_line_after_the_timeout() {
        let start = Instant::now();
        let mut w = worker(1024);
        // 4 s: a sweep a second; closed at the fifth sweep without a line (4 to 5 s idle).
        let sweep = IdleSweep::new(start, Duration::from_secs(4), Duration::from_secs(1));
        assert_eq!((sweep.period, sweep.limit), (Duration::from_secs(1), 5));
        w.idle = Some(sweep);
        let silent = w.accept(start);
        let trickle = w.accept(start);
        let talker = w.accept(start);
        for s in 1..=4 {
            let now = start + Duration::from_secs(s);
            w.receive(now, trickle, b"x");
            w.receive(now, talker, b"line\n");
            w.tick(now);
            assert!(w.handler.closed.is_empty(), "closed after {s} s");
        }
        let now = start + Duration::from_secs(5);
        w.receive(now, trickle, b"x");
        w.tick(now);
        assert_eq!(
            w.handler.closed,
            [(silent, CloseReason::Idle), (trickle, CloseReason::Idle)]
        );
        assert!(w.conns.get_mut(talker).is_some());
        assert_eq!(w.shared.counters.snapshot().closed.idle, 2);
        // Ticks between sweeps do nothing; the talker's count restarts at each line.
        w.tick(now + Duration::from_millis(500));
        for s in 6..=12 {
            w.tick(start + Duration::from_secs(s));
        }
        assert_eq!(w.handler.closed.last(), Some(&(talker, CloseReason::Idle)));
        // Sweeps take a tick at least, and the limit keeps the timeout.
        let coarse = IdleSweep::new(start, Duration::from_secs(2), Duration::from_secs(1));
        assert_eq!((coarse.period, coarse.limit), (Duration::from_secs(1), 3));
    }

    #[test]
    fn a_trunk_takes_long_lines_and_is_never_closed_as_idle() {
        let start = Instant::now();
        let mut w = worker(1024);
        w.idle = Some(IdleSweep::new(
            start,
            Duration::from_secs(4),
            Duration::from_secs(1),
        ));
        let (trunk, other) = (w.accept(start), w.accept(start));
        w.out.trunk(trunk);
        w.apply_outbox(start);
        // Longer than `max_line` (64 here): a trunk's line, another's close.
        let long = [vec![b'a'; 200], b"\n".to_vec()].concat();
        w.receive(start, trunk, &long);
        w.receive(start, other, &long);
        assert_eq!(w.handler.lines, [vec![b'a'; 200]]);
        assert_eq!(w.handler.closed, [(other, CloseReason::LineTooLong)]);
        // Silent for three idle timeouts: still open.
        for s in 1..=12 {
            w.tick(start + Duration::from_secs(s));
        }
        assert_eq!(w.handler.closed, [(other, CloseReason::LineTooLong)]);
        assert!(w.conns.get_mut(trunk).is_some());
    }

    #[test]
    fn the_outbound_budget_closes_the_biggest_queues_first() {
        let now = Instant::now();
        let mut w = worker(1024);
        w.limits.outbound_share = 100;
        let a = w.accept(now);
        let b = w.accept(now);
        let c = w.accept(now);
        w.queue(now, a, &[b'a'; 60]);
        w.queue(now, b, &[b'b'; 30]);
        w.queue(now, c, &[b'c'; 5]);
        w.flush(now);
        assert_eq!(w.queued, 95);
        assert!(w.handler.closed.is_empty(), "within the budget");
        // In flight counts: 20 more for `b` go over 100; the biggest queue goes until 75 at most.
        w.queue(now, b, &[b'b'; 20]);
        w.flush(now);
        assert_eq!(w.handler.closed, [(a, CloseReason::OutboundBudget)]);
        assert_eq!(w.queued, 55);
        assert_eq!(w.shared.counters.snapshot().closed.outbound_budget, 1);
        // Written bytes leave the total.
        while let Some((conn, _)) = w.backend.sent.front() {
            if *conn == a {
                w.backend.sent.pop_front();
            } else {
                w.finish_send(now, None);
            }
        }
        assert_eq!(w.queued, 20);
        w.flush(now);
        w.finish_send(now, None);
        assert_eq!(w.queued, 0);
    }

    #[test]
    fn a_panicking_handler_closes_only_its_connection() {
        let now = Instant::now();
        let mut w = worker(1024);
        w.handler.echo = true;
        let bad = w.accept(now);
        let good = w.accept(now);
        w.receive(now, bad, b"one\nboom\nnever\n");
        assert_eq!(w.handler.lines, [&b"one"[..]], "nothing after the panic");
        assert_eq!(w.handler.closed, [(bad, CloseReason::HandlerPanic)]);
        assert!(w.conns.get_mut(bad).is_none());
        w.receive(now, good, b"still\n");
        assert_eq!(w.handler.lines, [&b"one"[..], b"still"]);
        let c = w.shared.counters.snapshot();
        assert_eq!(
            (c.handler_panics, c.closed.handler_panic, c.open),
            (1, 1, 1)
        );
    }
}
