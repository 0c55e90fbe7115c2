//! ckload: a stratum v1 CPU test miner, growing into the ckpool-rs load generator.
//!
//! * [`miner`]: one real miner ([`miner::Miner`]) that connects to a pool, grinds its jobs and
//!   reports exact share counts;
//! * [`work`]: the pure stratum work maths it uses (notify decoding, prevhash word swap, coinbase,
//!   merkle root, header, extranonce2 and version rolling).
#![forbid(unsafe_code)]

pub mod miner;
pub mod work;

pub use miner::{Miner, MinerConfig, MinerEvent, MinerReport};
