//! A batching queue from one producer thread to one consumer thread, generic over the batch
//! type, that allocates nothing in steady state and makes no system call while both sides are
//! busy. The stratifier handoff's queue variant uses it (`crate::handoff`); a passthrough relay
//! needs the same pattern.
//!
//! * The producer fills a batch in place ([`Producer::batch`]) and hands it over once per round
//!   ([`Producer::flush`]: nothing happens when the batch is empty), taking an emptied batch
//!   back from the consumer in exchange, so a batch's buffers are reused rather than reallocated.
//! * The consumer blocks in [`Consumer::next_round`]. The channel (crossbeam) parks it after a
//!   short bounded backoff (about a hundred spin hints and a few `sched_yield`s, never an
//!   open-ended spin), and a send wakes it only when it is registered as parked: the sender checks
//!   an atomic flag before it takes a lock or makes a system call. A busy consumer thus costs the
//!   producer one queue push per round. Once awake, it takes up to `max` batches before it
//!   returns, so whatever it sends back in between goes out even when the producer keeps it busy.
//! * Emptied buffers go back over a small bounded channel ([`spares`]): when it is full the
//!   buffer is dropped, so neither side ever waits for the other to take one.
//! * [`Producer::close`] ends the queue: the consumer still gets everything queued before, then
//!   `next_round` returns `false`.

use std::mem;

use crossbeam_channel::{Receiver, Sender};

/// A reusable buffer: a batch, or an output vector.
pub(crate) trait Recycle: Default {
    /// Whether it holds nothing.
    fn is_empty(&self) -> bool;
    /// Empties it for reuse, keeping a bounded amount of its capacity.
    fn recycle(&mut self);
}

/// The consumer has gone (its [`Consumer`] was dropped) or the producer closed the queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Closed;

/// Where emptied buffers are given back (the end that emptied them).
#[derive(Debug)]
pub(crate) struct SpareReturn<T> {
    tx: Sender<T>,
}

/// Where emptied buffers are taken from (the end that fills them).
#[derive(Debug)]
pub(crate) struct SpareTake<T> {
    rx: Receiver<T>,
}

/// A bounded return path for emptied buffers: at most `keep` wait to be taken.
pub(crate) fn spares<T>(keep: usize) -> (SpareReturn<T>, SpareTake<T>) {
    let (tx, rx) = crossbeam_channel::bounded(keep);
    (SpareReturn { tx }, SpareTake { rx })
}

impl<T: Recycle> SpareReturn<T> {
    /// Empties `item` and offers it back; drops it when enough are waiting or the other end has
    /// gone. Never blocks.
    pub(crate) fn give(&self, mut item: T) {
        item.recycle();
        let _ = self.tx.try_send(item);
    }
}

impl<T: Recycle> SpareTake<T> {
    /// An emptied buffer given back, or a new one. Never blocks.
    pub(crate) fn take(&self) -> T {
        self.rx.try_recv().unwrap_or_default()
    }
}

/// The producer's end of a [`queue`].
#[derive(Debug)]
pub(crate) struct Producer<B> {
    batch: B,
    /// `None` once closed.
    tx: Option<Sender<B>>,
    spares: SpareTake<B>,
}

/// The consumer's end of a [`queue`].
#[derive(Debug)]
pub(crate) struct Consumer<B> {
    rx: Receiver<B>,
    spares: SpareReturn<B>,
}

/// A queue of batches from one producer to one consumer; up to `spare` emptied batches wait
/// on the way back.
pub(crate) fn queue<B: Recycle>(spare: usize) -> (Producer<B>, Consumer<B>) {
    let (tx, rx) = crossbeam_channel::unbounded();
    let (give, take) = spares(spare);
    (
        Producer {
            batch: B::default(),
            tx: Some(tx),
            spares: take,
        },
        Consumer { rx, spares: give },
    )
}

impl<B: Recycle> Producer<B> {
    /// The batch being filled.
    #[inline]
    pub(crate) fn batch(&mut self) -> &mut B {
        &mut self.batch
    }

    /// Hands the batch to the consumer, if it holds anything, and starts an emptied one. When the
    /// queue is closed or the consumer has gone, the batch is emptied (what it held is lost) and
    /// kept for reuse.
    pub(crate) fn flush(&mut self) -> Result<(), Closed> {
        if self.batch.is_empty() {
            return Ok(());
        }
        let Some(tx) = &self.tx else {
            self.batch.recycle();
            return Err(Closed);
        };
        let spare = self.spares.take();
        let batch = mem::replace(&mut self.batch, spare);
        if let Err(e) = tx.send(batch) {
            let mut batch = e.into_inner();
            batch.recycle();
            self.batch = batch;
            return Err(Closed);
        }
        Ok(())
    }

    /// Ends the queue (what is not flushed stays behind): the consumer gets what was flushed
    /// before, then [`Consumer::next_round`] returns `false`.
    pub(crate) fn close(&mut self) {
        self.tx = None;
    }
}

impl<B: Recycle> Consumer<B> {
    /// Blocks (parked, not spinning) until a batch comes or the queue ends. Calls `each` on
    /// that batch and on up to `max - 1` more already queued, in order, and gives each back
    /// emptied. Returns `false`, without calling `each`, once the queue has ended and everything
    /// in it has been consumed.
    pub(crate) fn next_round(&self, max: usize, mut each: impl FnMut(&B)) -> bool {
        let Ok(first) = self.rx.recv() else {
            return false;
        };
        let mut next = Some(first);
        let mut taken = 0;
        while let Some(batch) = next.take() {
            each(&batch);
            self.spares.give(batch);
            taken += 1;
            if taken < max {
                next = self.rx.try_recv().ok();
            }
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::*;

    /// A batch of numbers; `recycle` keeps up to 64 slots of capacity.
    #[derive(Debug, Default)]
    struct Nums(Vec<u32>);

    impl Recycle for Nums {
        fn is_empty(&self) -> bool {
            self.0.is_empty()
        }
        fn recycle(&mut self) {
            self.0.clear();
            self.0.shrink_to(64);
        }
    }

    fn drain(consumer: &Consumer<Nums>, max: usize) -> Vec<Vec<u32>> {
        let mut seen = Vec::new();
        consumer.next_round(max, |b| seen.push(b.0.clone()));
        seen
    }

    #[test]
    fn batches_arrive_in_order_and_empty_rounds_send_nothing() {
        let (mut p, c) = queue::<Nums>(4);
        p.batch().0.extend([1, 2]);
        assert_eq!(p.flush(), Ok(()));
        assert_eq!(p.flush(), Ok(()), "an empty batch is not sent");
        p.batch().0.push(3);
        assert_eq!(p.flush(), Ok(()));
        assert_eq!(drain(&c, 64), [vec![1, 2], vec![3]]);
        assert!(p.batch().0.is_empty());
    }

    #[test]
    fn a_round_takes_at_most_max_batches() {
        let (mut p, c) = queue::<Nums>(4);
        for n in 0..5 {
            p.batch().0.push(n);
            p.flush().expect("consumer alive");
        }
        assert_eq!(drain(&c, 2), [vec![0], vec![1]]);
        assert_eq!(drain(&c, 2), [vec![2], vec![3]]);
        assert_eq!(drain(&c, 2), [vec![4]]);
    }

    #[test]
    fn emptied_batches_come_back_with_their_capacity() {
        let (mut p, c) = queue::<Nums>(4);
        p.batch().0.extend(0..40);
        let ptr = p.batch().0.as_ptr();
        p.flush().expect("consumer alive");
        drain(&c, 64);
        // The next flush swaps in the batch the consumer gave back: the same allocation.
        p.batch().0.push(1);
        p.flush().expect("consumer alive");
        assert_eq!(p.batch().0.as_ptr(), ptr);
        assert!(p.batch().0.capacity() >= 40);
        assert!(p.batch().0.is_empty());
        // A burst leaves at most the recycled capacity behind.
        p.batch().0.extend(0..10_000);
        p.flush().expect("consumer alive");
        drain(&c, 64);
        p.batch().0.push(2);
        p.flush().expect("consumer alive");
        assert!(p.batch().0.capacity() <= 64, "{}", p.batch().0.capacity());
    }

    #[test]
    fn spares_are_bounded_and_never_block() {
        let (give, take) = spares::<Nums>(2);
        for _ in 0..5 {
            give.give(Nums(Vec::with_capacity(8)));
        }
        assert!(take.take().0.capacity() >= 8);
        assert!(take.take().0.capacity() >= 8);
        assert_eq!(take.take().0.capacity(), 0, "only two were kept");
        drop(take);
        give.give(Nums::default());
    }

    #[test]
    fn close_delivers_what_was_flushed_then_ends() {
        let (mut p, c) = queue::<Nums>(4);
        p.batch().0.push(7);
        p.flush().expect("consumer alive");
        p.batch().0.push(8);
        p.close();
        assert_eq!(p.flush(), Err(Closed));
        assert!(p.batch().0.is_empty(), "the unsent batch is emptied");
        assert_eq!(drain(&c, 64), [vec![7]]);
        let mut called = false;
        assert!(!c.next_round(64, |_| called = true));
        assert!(!called);
    }

    #[test]
    fn flush_after_the_consumer_is_gone_fails_and_keeps_the_buffer() {
        let (mut p, c) = queue::<Nums>(4);
        drop(c);
        p.batch().0.extend(0..32);
        let cap = p.batch().0.capacity();
        assert_eq!(p.flush(), Err(Closed));
        assert!(p.batch().0.is_empty());
        assert_eq!(p.batch().0.capacity(), cap);
    }

    #[test]
    fn a_parked_consumer_thread_wakes_for_each_flush_and_exits_on_close() {
        let (mut p, c) = queue::<Nums>(4);
        let (seen_tx, seen_rx) = crossbeam_channel::unbounded();
        let consumer = std::thread::spawn(move || {
            let mut rounds = 0;
            while c.next_round(64, |b| {
                for n in &b.0 {
                    let _ = seen_tx.send(*n);
                }
            }) {
                rounds += 1;
            }
            rounds
        });
        let deadline = Instant::now() + Duration::from_secs(10);
        for n in 0..3 {
            p.batch().0.push(n);
            p.flush().expect("consumer alive");
            // Each value arrives although the consumer blocked (and likely parked) in between.
            let got = seen_rx
                .recv_deadline(deadline)
                .expect("the consumer woke up");
            assert_eq!(got, n);
        }
        p.close();
        let rounds = consumer.join().expect("consumer thread");
        assert!((1..=3).contains(&rounds), "{rounds}");
    }
}
