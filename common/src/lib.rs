//! Shared library of ckpool-rs (the libckpool of this project).
//!
//! Holds the stratum v1 codec, sha256d and difficulty/target maths, the bitcoin helpers (address to
//! script, coinbase and merkle building, block assembly, getblocktemplate parsing), the ckpool.conf
//! schema and the admin-socket framing. It is usable on its own as a library.
//!
//! It must never do I/O on sockets, spawn threads or read the clock: callers pass time in.
#![forbid(unsafe_code)]

pub mod address;
pub mod admin;
pub mod block;
pub mod coinbase;
pub mod config;
pub mod hash;
pub mod histogram;
pub mod merkle;
pub mod stratum;
pub mod target;
pub mod template;

pub use ids::{ConnId, Peer};
pub use target::{Difficulty, Target};
