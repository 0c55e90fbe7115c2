//! ckload: a stratum v1 load generator and CPU test miner, for ckpool-rs and any other stratum
//! v1 pool on this machine.
//!
//! * [`run`]: the load scenarios (`storm`, `steady`, `fanout`, `churn`): plans a run, spreads the
//!   miners over worker processes (or threads) and loopback source addresses, samples the pool's
//!   CPU and memory, forces new blocks over RPC, and merges everything into one [`run::Report`];
//! * [`hostile`]: hostile clients for soak runs (username flood, subscribe churn, never-reading
//!   connections, oversize lines);
//! * [`swarm`]: one worker: thousands of simulated miners on one tokio runtime, each grinding
//!   real shares at the difficulty the pool set;
//! * [`stats`]: latency histograms (hdrhistogram, merged exactly) and counters;
//! * [`miner`]: one real blocking CPU miner ([`miner::Miner`]) that reports exact share counts;
//! * [`work`]: the pure stratum work maths (extranonce2 and version-rolling encodings, share
//!   search; the decoded notify with its coinbase, merkle root and header is
//!   `common::stratum::decode::Job`, re-exported);
//!
//! Both kinds of miner speak stratum through `common::stratum::client`, the sans-IO client the
//! proxy mode uses too.
//! * [`sys`] and [`rpc`]: `/proc` sampling, the shared monotonic clock, file limits, and a tiny
//!   bitcoind RPC client for `generate`.
//!
//! ckload only ever talks to loopback addresses (127.0.0.0/8 and ::1): every target, source
//! address and RPC URL is checked, and every run has a duration and stops by itself.
#![forbid(unsafe_code)]

pub mod hostile;
pub mod miner;
pub mod rpc;
pub mod run;
pub mod stats;
pub mod swarm;
pub mod sys;
pub mod work;

pub use miner::{Miner, MinerConfig, MinerEvent, MinerReport};

/// Errors of the load generator library.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A setting is unusable (the text says which and why).
    #[error("{0}")]
    Config(String),
    /// A bitcoind RPC call failed.
    #[error("RPC: {0}")]
    Rpc(String),
    /// A worker process or thread failed.
    #[error("worker: {0}")]
    Worker(String),
    /// Data from a worker or a peer could not be decoded.
    #[error("protocol: {0}")]
    Protocol(String),
    /// An I/O error.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
}
