//! The per-thread event loop, generic over the backend: connection table, line framing, outbound
//! queues, messages and ticks.

use std::collections::VecDeque;
use std::mem;
use std::net::SocketAddr;
use std::ops::ControlFlow;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering, fence};
use std::time::{Duration, Instant};

use common::ConnId;
use crossbeam_channel::Receiver;
use tracing::{debug, error, info, warn};

use crate::framing::{self, LineTooLong};
use crate::sys::{Backend, Completion, KEEP_COMPLETIONS, ListenerId, SendOp, Waker};
use crate::{Action, CloseReason, Handler, Outbox, SendBuf};

/// How long a handler-requested close waits for the queued bytes to be written before the
/// connection is closed anyway (checked on ticks).
const CLOSE_LINGER: Duration = Duration::from_secs(5);
/// Messages handled per loop round, so a flood of messages cannot starve the sockets.
const MSG_BATCH: usize = 1024;
/// Queued buffers handed to the backend per send operation.
const OP_BUFS: usize = 1024;
/// Spare send-operation vectors kept for reuse.
const SPARE_OPS: usize = 64;
/// Minimum interval between two logs of accepts paused by an error (EMFILE).
const ACCEPT_WARN_EVERY: Duration = Duration::from_secs(60);
/// A loop round that keeps the thread busy this long delays every connection of the thread:
/// logged at `info` (a notify broadcast to many thousands of miners takes this long too), at
/// most once per [`SLOW_WARN_EVERY`].
const SLOW_ROUND: Duration = Duration::from_millis(20);
const SLOW_WARN_EVERY: Duration = Duration::from_secs(10);

/// State shared between a connector thread and the [`crate::Connector`] that controls it.
pub(crate) struct Shared {
    pub(crate) waker: Arc<Waker>,
    /// Set by the thread just before it may block in the backend.
    parked: AtomicBool,
    stop: AtomicBool,
}

impl Shared {
    pub(crate) fn new(waker: Arc<Waker>) -> Self {
        Self {
            waker,
            parked: AtomicBool::new(false),
            stop: AtomicBool::new(false),
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
    pub(crate) tick: Duration,
    /// [`Config::max_conns`](crate::Config::max_conns).
    pub(crate) max_conns: Option<usize>,
    /// Connections open on all threads (counted whether or not there is a maximum).
    pub(crate) open: Arc<AtomicUsize>,
}

/// One connector thread.
pub(crate) struct Worker<B: Backend, H: Handler> {
    thread: u16,
    backend: B,
    handler: H,
    rx: Receiver<H::Msg>,
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
    /// When a paused accept was last logged (logged at most once per [`ACCEPT_WARN_EVERY`]).
    accept_warned: Option<Instant>,
    /// Rounds that kept the thread busy for [`SLOW_ROUND`] or more.
    slow: SlowRounds,
    /// Connections closed at once because `max_conns` was reached, since the last line about it,
    /// and when that line was logged.
    refused: u64,
    refused_warned: Option<Instant>,
    spare_ops: Vec<Vec<SendBuf>>,
}

impl<B: Backend, H: Handler> Worker<B, H> {
    pub(crate) fn new(
        thread: u16,
        backend: B,
        handler: H,
        rx: Receiver<H::Msg>,
        shared: Arc<Shared>,
        limits: Limits,
        listeners: usize,
    ) -> Self {
        Self {
            thread,
            backend,
            handler,
            rx,
            shared,
            limits,
            conns: Slab::default(),
            out: Outbox::new(),
            completions: Vec::new(),
            dirty: Vec::new(),
            closing: Vec::new(),
            paused: vec![false; listeners],
            any_paused: false,
            accept_warned: None,
            slow: SlowRounds::default(),
            refused: 0,
            refused_warned: None,
            spare_ops: Vec::new(),
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
            if !self.rx.is_empty() {
                timeout = Duration::ZERO;
            }
            let mut done = mem::take(&mut self.completions);
            let result = self.backend.complete(Some(timeout), &mut done);
            self.shared.parked.store(false, Ordering::SeqCst);
            let now = Instant::now();
            let events = done.len();
            for c in done.drain(..) {
                self.on_completion(now, c);
            }
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
            if now >= next_tick {
                self.tick(now);
                next_tick += tick;
                if next_tick <= now {
                    next_tick = now + tick;
                }
            }
            self.end_batch(now);
            self.flush(now);
            self.slow.check(self.thread, now, events);
        }
        self.shared.parked.store(false, Ordering::SeqCst);
        let now = Instant::now();
        self.close_all(now, CloseReason::Shutdown);
        self.end_batch(now);
    }

    /// The end of a round of callbacks: [`Handler::on_batch_end`], then its requests.
    fn end_batch(&mut self, now: Instant) {
        self.handler.on_batch_end(now, &mut self.out);
        self.apply_outbox(now);
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
                    } else {
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
        let Some(id) = self.conns.insert(self.thread, Conn::new(peer)) else {
            warn!(%peer, "connection table full; dropping connection");
            return;
        };
        if let Err(e) = self.backend.open(id, sock) {
            self.conns.remove(id);
            warn!(%peer, error = %e, "could not register connection");
            return;
        }
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
        debug!(conn = %id, %peer, listener = listener.0, "connection opened");
        self.handler
            .on_open(now, id, peer, listener.0, &mut self.out);
        self.apply_outbox(now);
        if self.conns.get_mut(id).is_some() {
            self.backend.recv(id);
        }
    }

    fn on_recv(&mut self, now: Instant, conn: ConnId, buf: &B::RecvBuf) {
        let Some(c) = self.conns.get_mut(conn) else {
            return;
        };
        if c.close_by.is_some() {
            // Closing: input is read (so the close does not reset the connection) and dropped.
            return;
        }
        let mut partial = mem::take(&mut c.partial);
        let data = self.backend.recv_bytes(buf);
        let handler = &mut self.handler;
        let out = &mut self.out;
        let result = framing::feed(&mut partial, data, self.limits.max_line, |line| {
            let before = out.len();
            handler.on_line(now, conn, line, out);
            if out.closes_since(before, conn) {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        });
        // The table is untouched until the outbox is applied, so `conn` is still there.
        if let Some(c) = self.conns.get_mut(conn) {
            c.partial = partial;
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
            c.sending = false;
            match result {
                Ok(n) => {
                    c.queued = c.queued.saturating_sub(n);
                    if !op.is_done() {
                        // A short send: put the rest back in front, in order.
                        c.offset = op.offset;
                        for buf in op.bufs.drain(op.first..).rev() {
                            c.queue.push_front(buf);
                        }
                    }
                    if c.queue.is_empty() && c.queue.capacity() > 0 {
                        // Everything is written: an idle connection keeps no queue allocation
                        // (about 100 bytes each, which adds up over 100k connections).
                        c.queue = VecDeque::new();
                    }
                    if (!c.queue.is_empty() || c.close_by.is_some()) && !c.dirty {
                        c.dirty = true;
                        self.dirty.push(conn);
                    }
                }
                Err(e) => {
                    debug!(conn = %conn, error = %e, "send failed");
                    self.close(now, conn, CloseReason::Error(e.kind()));
                }
            }
        }
        if self.spare_ops.len() < SPARE_OPS {
            op.bufs.clear();
            self.spare_ops.push(op.bufs);
        }
    }

    fn drain_messages(&mut self, now: Instant) {
        for _ in 0..MSG_BATCH {
            let Ok(msg) = self.rx.try_recv() else {
                break;
            };
            self.handler.on_msg(now, msg, &mut self.out);
            self.apply_outbox(now);
        }
    }

    fn tick(&mut self, now: Instant) {
        self.handler.on_tick(now, &mut self.out);
        self.apply_outbox(now);
        let mut closing = mem::take(&mut self.closing);
        closing.retain(
            |&id| match self.conns.get_mut(id).and_then(|c| c.close_by) {
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
            }
        }
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
        if c.close_by.is_some() || buf.is_empty() {
            return;
        }
        let len = buf.len();
        if c.queued.saturating_add(len) > self.limits.max_outbound {
            warn!(
                conn = %id,
                peer = %c.peer,
                queued = c.queued,
                len,
                limit = self.limits.max_outbound,
                "outbound queue over limit; closing"
            );
            self.close(now, id, CloseReason::Outbound);
            return;
        }
        c.queue.push_back(buf);
        c.queued += len;
        if !c.dirty {
            c.dirty = true;
            self.dirty.push(id);
        }
    }

    fn request_close(&mut self, now: Instant, id: ConnId) {
        let Some(c) = self.conns.get_mut(id) else {
            return;
        };
        if c.close_by.is_some() {
            return;
        }
        c.close_by = Some(now + CLOSE_LINGER);
        c.partial = Vec::new();
        self.closing.push(id);
        if !c.dirty {
            c.dirty = true;
            self.dirty.push(id);
        }
    }

    /// Starts writing queued bytes and finishes closes whose bytes are written.
    fn flush(&mut self, now: Instant) {
        let mut dirty = mem::take(&mut self.dirty);
        for id in dirty.drain(..) {
            let Some(c) = self.conns.get_mut(id) else {
                continue;
            };
            c.dirty = false;
            if c.sending {
                continue;
            }
            if !c.queue.is_empty() {
                let mut bufs = self.spare_ops.pop().unwrap_or_default();
                let take = c.queue.len().min(OP_BUFS);
                bufs.extend(c.queue.drain(..take));
                let op = SendOp {
                    bufs,
                    first: 0,
                    offset: mem::take(&mut c.offset),
                    written: 0,
                };
                c.sending = true;
                self.backend.send(id, op);
            } else if c.close_by.is_some() {
                self.close(now, id, CloseReason::Handler);
            }
        }
        // Nothing above marks connections dirty, so the list is empty: keep its allocation.
        dirty.append(&mut self.dirty);
        self.dirty = dirty;
    }

    fn close(&mut self, now: Instant, id: ConnId, reason: CloseReason) {
        let Some(conn) = self.conns.remove(id) else {
            return;
        };
        self.limits.open.fetch_sub(1, Ordering::Relaxed);
        self.backend.close(id);
        debug!(conn = %id, peer = %conn.peer, ?reason, "connection closed");
        self.handler.on_close(now, id, reason);
        self.resume_accepts();
    }

    fn resume_accepts(&mut self) {
        if !self.any_paused {
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
            if self.conns.remove(id).is_some() {
                self.limits.open.fetch_sub(1, Ordering::Relaxed);
                self.backend.close(id);
                self.handler.on_close(now, id, reason);
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
    /// `started`: when the round's work began; `events`: completions it handled.
    fn check(&mut self, thread: u16, started: Instant, events: usize) {
        let took = started.elapsed();
        if took < SLOW_ROUND {
            return;
        }
        self.unlogged += 1;
        self.longest = self.longest.max(took);
        let now = Instant::now();
        if self
            .warned
            .is_some_and(|t| now.duration_since(t) < SLOW_WARN_EVERY)
        {
            return;
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
    }
}

/// A connection as the loop sees it (the socket itself belongs to the backend).
struct Conn {
    peer: SocketAddr,
    /// Incomplete line from earlier reads; unallocated when none is pending.
    partial: Vec<u8>,
    /// Buffers not yet handed to the backend.
    queue: VecDeque<SendBuf>,
    /// Bytes of `queue[0]` already written.
    offset: usize,
    /// Bytes not yet written, including those of the send in flight.
    queued: usize,
    /// Whether a send is in flight.
    sending: bool,
    /// Whether the connection is in the dirty list.
    dirty: bool,
    /// Set when the handler asked to close: the deadline for writing what is queued.
    close_by: Option<Instant>,
}

impl Conn {
    fn new(peer: SocketAddr) -> Self {
        Self {
            peer,
            partial: Vec::new(),
            queue: VecDeque::new(),
            offset: 0,
            queued: 0,
            sending: false,
            dirty: false,
            close_by: None,
        }
    }
}

/// Connection table: slots reused through a FIFO free list (so a slot rests as long as possible
/// before reuse), each with a generation bumped on every close so stale ids are recognised.
struct Slab<T = Conn> {
    slots: Vec<Slot<T>>,
    free: VecDeque<u32>,
}

struct Slot<T> {
    generation: u16,
    value: Option<T>,
}

impl<T> Default for Slab<T> {
    fn default() -> Self {
        Self {
            slots: Vec::new(),
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
        // DESIGN.md budget: a few hundred bytes of user memory per idle connection, no buffers.
        assert!(
            size_of::<Slot<Conn>>() <= 160,
            "{}",
            size_of::<Slot<Conn>>()
        );
    }
}
