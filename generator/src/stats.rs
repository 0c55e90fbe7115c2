//! The generator's own figures for the metrics endpoint: RPC latency per method, template fetch
//! latency and age, failovers, ZMQ block announcements and the nodes' verdicts on found blocks.
//! Relaxed atomics written by the generator's threads and read by whoever holds
//! [`Generator::stats`](crate::Generator::stats): the generator knows nothing of its reader.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::histogram::Histogram;

/// The RPC methods timed one by one; every other method is counted as `other`.
pub const RPC_METHODS: [&str; 8] = [
    "getblocktemplate",
    "submitblock",
    "getbestblockhash",
    "getblockchaininfo",
    "getblockheader",
    "getblockcount",
    "preciousblock",
    "other",
];

/// The nodes' verdicts on a found block, as counted by [`GenStats::blocks`].
pub const BLOCK_VERDICTS: [&str; 4] = ["accepted", "refused", "stale", "inconclusive"];

/// A node's verdict on a found block, once settled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlockVerdict {
    /// A node has it in its best chain.
    Accepted = 0,
    /// A node refused it as invalid.
    Refused = 1,
    /// The chain passed its height without it.
    Stale = 2,
    /// A node has it, but not in its best chain.
    Inconclusive = 3,
}

/// The generator's figures (see the module's documentation).
#[derive(Debug)]
pub struct GenStats {
    /// Per [`RPC_METHODS`] entry: the time of each call, answered or failed.
    rpc: [Histogram; RPC_METHODS.len()],
    /// Template fetches of the template thread: `getblocktemplate` and decoding its reply.
    template_fetch: Histogram,
    /// When the first figure could be taken; the clock of `last_template`.
    base: Instant,
    /// Nanoseconds after `base` at which the current template was fetched, plus one; 0: none.
    last_template: AtomicU64,
    /// Templates fetched and handed on.
    templates: AtomicU64,
    /// Times the active server changed to another one.
    failovers: AtomicU64,
    /// The last server made active; `usize::MAX` before the first.
    last_server: AtomicUsize,
    /// `hashblock` announcements received over ZMQ.
    zmq_blocks: AtomicU64,
    /// Found blocks per [`BLOCK_VERDICTS`] entry.
    blocks: [AtomicU64; BLOCK_VERDICTS.len()],
}

impl Default for GenStats {
    fn default() -> Self {
        Self::new()
    }
}

impl GenStats {
    /// Empty figures; template age counts from now.
    pub fn new() -> Self {
        Self {
            rpc: [const { Histogram::new() }; RPC_METHODS.len()],
            template_fetch: Histogram::new(),
            base: Instant::now(),
            last_template: AtomicU64::new(0),
            templates: AtomicU64::new(0),
            failovers: AtomicU64::new(0),
            last_server: AtomicUsize::new(usize::MAX),
            zmq_blocks: AtomicU64::new(0),
            blocks: [const { AtomicU64::new(0) }; BLOCK_VERDICTS.len()],
        }
    }

    /// RPC call latency per method, in [`RPC_METHODS`] order.
    pub fn rpc(&self) -> impl Iterator<Item = (&'static str, &Histogram)> {
        RPC_METHODS.into_iter().zip(&self.rpc)
    }

    /// How long the template thread's template fetches took (`getblocktemplate` and decoding).
    pub fn template_fetch(&self) -> &Histogram {
        &self.template_fetch
    }

    /// Time since the current template was fetched; `None` before the first.
    pub fn template_age(&self) -> Option<Duration> {
        let at = self.last_template.load(Ordering::Relaxed).checked_sub(1)?;
        Some(self.base.elapsed().saturating_sub(Duration::from_nanos(at)))
    }

    /// Templates fetched and handed on to the pool.
    pub fn templates(&self) -> u64 {
        self.templates.load(Ordering::Relaxed)
    }

    /// Times the active bitcoind changed to another one (failover or fail-back; the first
    /// server to come up does not count).
    pub fn failovers(&self) -> u64 {
        self.failovers.load(Ordering::Relaxed)
    }

    /// `hashblock` announcements received over ZMQ.
    pub fn zmq_blocks(&self) -> u64 {
        self.zmq_blocks.load(Ordering::Relaxed)
    }

    /// Found blocks settled, per verdict, in [`BLOCK_VERDICTS`] order.
    pub fn blocks(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        BLOCK_VERDICTS
            .into_iter()
            .zip(self.blocks.iter().map(|n| n.load(Ordering::Relaxed)))
    }

    /// Records an RPC call to `method` that took `d`.
    pub(crate) fn rpc_call(&self, method: &str, d: Duration) {
        let i = RPC_METHODS
            .iter()
            .position(|m| *m == method)
            .unwrap_or(RPC_METHODS.len() - 1);
        if let Some(h) = self.rpc.get(i) {
            h.observe(d);
        }
    }

    /// Records a template fetched in `d`.
    pub(crate) fn template_fetched(&self, d: Duration) {
        self.template_fetch.observe(d);
    }

    /// Records that a template fetched just now was handed on: current from now.
    pub(crate) fn template_current(&self) {
        let at = u64::try_from(self.base.elapsed().as_nanos()).unwrap_or(u64::MAX - 1);
        self.last_template.store(at + 1, Ordering::Relaxed);
        self.templates.fetch_add(1, Ordering::Relaxed);
    }

    /// Records that server `index` became the active one.
    pub(crate) fn server_up(&self, index: usize) {
        let before = self.last_server.swap(index, Ordering::Relaxed);
        if before != usize::MAX && before != index {
            self.failovers.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Records a ZMQ `hashblock` announcement.
    pub(crate) fn zmq_block(&self) {
        self.zmq_blocks.fetch_add(1, Ordering::Relaxed);
    }

    /// Records a found block's final verdict.
    pub(crate) fn block(&self, verdict: BlockVerdict) {
        if let Some(n) = self.blocks.get(verdict as usize) {
            n.fetch_add(1, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn figures_are_counted_where_they_belong() {
        let s = GenStats::new();
        assert_eq!(s.template_age(), None);
        s.rpc_call("submitblock", Duration::from_millis(2));
        s.rpc_call("getnetworkinfo", Duration::from_millis(1));
        let counts: Vec<(&str, u64)> = s.rpc().map(|(m, h)| (m, h.snapshot().count)).collect();
        assert!(counts.contains(&("submitblock", 1)), "{counts:?}");
        assert!(counts.contains(&("other", 1)), "{counts:?}");
        assert!(counts.contains(&("getblocktemplate", 0)), "{counts:?}");

        s.template_fetched(Duration::from_millis(5));
        assert_eq!(s.template_age(), None);
        s.template_current();
        let age = s.template_age().expect("a template was fetched");
        assert!(age < Duration::from_secs(5), "{age:?}");
        assert_eq!(s.templates(), 1);
        assert_eq!(s.template_fetch().snapshot().count, 1);

        // The first server up is no failover; a change is; the same server again is not.
        s.server_up(0);
        s.server_up(0);
        assert_eq!(s.failovers(), 0);
        s.server_up(1);
        s.server_up(0);
        assert_eq!(s.failovers(), 2);

        s.zmq_block();
        assert_eq!(s.zmq_blocks(), 1);
        s.block(BlockVerdict::Accepted);
        s.block(BlockVerdict::Accepted);
        s.block(BlockVerdict::Stale);
        let blocks: Vec<(&str, u64)> = s.blocks().collect();
        assert_eq!(
            blocks,
            [
                ("accepted", 2),
                ("refused", 0),
                ("stale", 1),
                ("inconclusive", 0)
            ]
        );
    }
}
