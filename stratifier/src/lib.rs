//! Stratifier of ckpool-rs: the sans-IO stratum v1 state machine.
//!
//! It holds sessions, jobs, vardiff, share validation, user/worker statistics and block
//! candidates. It never touches sockets, threads or the clock: the caller passes `now` in and
//! receives its output through the [`Out`] trait, so tests drive it deterministically in memory.
//!
//! Shape: one [`Pool`] (shared by every core: configuration, the job table, extranonce
//! allocation, session resume and statistics) and one [`Shard`] per connector thread holding the
//! sessions of that thread's connections.
#![forbid(unsafe_code)]

mod compact;
mod job;
mod pool;
pub mod rates;
#[doc(hidden)]
pub mod seen;
mod shard;
pub mod share;
pub mod vardiff;

use std::sync::Arc;

pub use common::ConnId;
pub use job::{CoinbaseConfig, Job, JobError, stratum_prevhash};
pub use pool::{
    AgentDiff, BlockCandidate, Hashrates, ListenerDiff, Pool, PoolConfig, PoolRates, ShareRecord,
    StatsSnapshot, UserStats, WorkerStats,
};
pub use shard::Shard;

/// Where a shard's output goes: replies and notifications to connections, and closes.
pub trait Out {
    /// Queues bytes (one or more complete lines) for a connection.
    fn send(&mut self, conn: ConnId, bytes: Vec<u8>);
    /// Queues a shared line (a job notification built once for everybody).
    fn send_shared(&mut self, conn: ConnId, bytes: Arc<[u8]>);
    /// Closes a connection after its queued bytes.
    fn close(&mut self, conn: ConnId);
}

/// A recording [`Out`] for tests and simulations.
#[derive(Debug, Default)]
pub struct RecordingOut {
    /// Everything sent, in order, with the connection.
    pub sent: Vec<(ConnId, Vec<u8>)>,
    /// Connections closed.
    pub closed: Vec<ConnId>,
}

impl RecordingOut {
    /// Lines sent to `conn`, parsed as JSON, draining them.
    pub fn take_json(&mut self, conn: ConnId) -> Vec<serde_json::Value> {
        let mut out = Vec::new();
        let mut keep = Vec::new();
        for (c, bytes) in self.sent.drain(..) {
            if c == conn {
                for line in bytes.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
                    if let Ok(v) = serde_json::from_slice(line) {
                        out.push(v);
                    }
                }
            } else {
                keep.push((c, bytes));
            }
        }
        self.sent = keep;
        out
    }
}

impl Out for RecordingOut {
    fn send(&mut self, conn: ConnId, bytes: Vec<u8>) {
        self.sent.push((conn, bytes));
    }
    fn send_shared(&mut self, conn: ConnId, bytes: Arc<[u8]>) {
        self.sent.push((conn, bytes.to_vec()));
    }
    fn close(&mut self, conn: ConnId) {
        self.closed.push(conn);
    }
}
