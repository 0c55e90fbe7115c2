//! Stratifier of ckpool-rs: the sans-IO stratum v1 state machine.
//!
//! It holds sessions, jobs, vardiff, share validation, user/worker statistics and block
//! candidates. It never touches sockets, threads or the clock: the caller passes `now` in (and
//! the pool's epoch once, at [`Pool::new`]) and receives all its output as values through the
//! [`Out`] trait (lines, closes, and [`Event`]s: block candidates and shares), so tests drive it
//! deterministically in memory.
//!
//! Shape: one [`Pool`] (shared by every core: configuration, a job book per work source, the
//! session tables for extranonce allocation, resume and authorisation back-off, and the
//! [`StatsRegistry`]) and one [`Shard`] per connector thread holding the sessions of that
//! thread's clients ([`ClientId`]: its connections, and the miners behind a passthrough on one).
//! Every line it writes is built by the stratum codec's writers (`common::stratum::write`).
//!
//! Upgrades without disconnecting: [`Pool::export_state`] and [`Shard::export_session`] write
//! the pool's state and each live session as versioned binary blobs, which a fresh pool of the
//! next process takes over with [`Pool::import_state`] and [`Shard::adopt_session`]; shares in
//! flight are then judged as the old process would have ([`HandoverError`] for a blob refused).
//!
//! Against hostile clients (where it differs from ckpool):
//! - Session ids are a keyed permutation of a counter (random keys per pool, taken over by the
//!   next process at an upgrade), not sequential, and a session is resumed only by a client
//!   from the address it was parked from (the peer address without its port; for a
//!   passthrough's sub-client, the address given at [`Shard::on_open`]). ckpool resumes by
//!   session id alone.
//! - At most [`PoolConfig::max_parked`] sessions are parked; the oldest go first, and expiry
//!   costs what expires.
//! - Extranonce1 allocation skips values a live or parked session of the same source holds
//!   (local parts up to 4 bytes), so a wrapped counter never hands out one in use.
//! - A user or worker with no accepted share is forgotten when its last session closes; others
//!   after [`PoolConfig::stats_idle`] with no session; one address adds at most
//!   [`PoolConfig::max_users_per_ip`] users.
//! - A run of invalid shares is slowed (past half of [`PoolConfig::max_invalid_shares`], one
//!   share in 8 is checked, the others refused unchecked) and at the limit the client is dropped
//!   and counted ([`StatsRegistry::dropped_invalid`]).
#![forbid(unsafe_code)]

mod book;
mod client;
mod compact;
mod handover;
mod job;
mod pool;
pub mod rates;
mod reject;
#[doc(hidden)]
pub mod seen;
mod shard;
pub mod share;
mod stats;
mod submit;
mod tables;
pub mod vardiff;

use std::sync::Arc;

pub use client::ClientId;
pub use common::ConnId;
pub use handover::HandoverError;
pub use job::{
    CoinbaseConfig, ExtranonceLayout, Job, JobError, LayoutError, Origin, SourceId, Work,
    prevhash_from_stratum, stratum_prevhash,
};
pub use pool::{AgentDiff, BlockCandidate, ListenerDiff, Pool, PoolConfig, ShareRecord};
pub use reject::Reject;
pub use shard::{ClientInfo, ReconnectTo, Shard};
pub use stats::{
    Hashrates, PoolRates, SeedClock, SeedPool, SeedWorker, StatsRegistry, StatsSnapshot, UserStats,
    UserView, WorkerStats,
};

/// Something the stratifier produced for the rest of the daemon (not for a miner).
#[derive(Debug, Clone)]
pub enum Event {
    /// A share met the network target: a block to write down and submit. A block-solving share
    /// sent again is a duplicate and makes no second candidate.
    Block(BlockCandidate),
    /// A share that was hashed, accepted or rejected (the share log's line). Only produced when
    /// [`Out::wants_shares`] says so.
    Share(ShareRecord),
    /// A share on upstream work (proxy modes) that meets the upstream's difficulty (or the
    /// network target), accepted here or stale: to submit upstream. Always produced; no
    /// allocation (the job is shared, the worker name an interned string).
    Upstream(UpstreamShare),
    /// Userproxy ([`PoolConfig::external_auth`]): a valid `mining.authorize` waiting for the
    /// daemon's verdict ([`Shard::finish_authorise`]).
    Authorise(AuthRequest),
}

/// A miner's authorisation for the daemon to decide ([`Event::Authorise`]). Its `Debug` leaves
/// the password out.
#[derive(Clone)]
pub struct AuthRequest {
    /// The miner.
    pub client: ClientId,
    /// The user name (the worker name before its first `.` or `_`).
    pub user: Arc<str>,
    /// The whole worker name.
    pub worker: Arc<str>,
    /// The password it gave.
    pub pass: Arc<str>,
}

impl std::fmt::Debug for AuthRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthRequest")
            .field("client", &self.client)
            .field("user", &self.user)
            .field("worker", &self.worker)
            .finish_non_exhaustive()
    }
}

/// The daemon's answer to an [`AuthRequest`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthVerdict {
    /// Authorised, mining on this work source (moved there if it is not its own).
    Accept(SourceId),
    /// Authorised on the work source it mines on now.
    Here,
    /// Refused, with the reason the miner is told.
    Refuse(Arc<str>),
}

/// A share for the upstream pool ([`Event::Upstream`]): what its `mining.submit` carries.
#[derive(Debug, Clone)]
pub struct UpstreamShare {
    /// The job it was made on (its [`Origin::Upstream`] job id is the upstream's).
    pub job: Arc<Job>,
    /// The miner who sent it.
    pub client: ClientId,
    /// The miner's user name.
    pub user: Arc<Box<str>>,
    en2: [u8; 24],
    en2_len: u8,
    /// ntime.
    pub ntime: u32,
    /// nonce.
    pub nonce: u32,
    /// The rolled version bits (the header's version bits within the miner's mask), when the
    /// miner rolled any.
    pub version_bits: Option<u32>,
    /// The difficulty the hash achieved.
    pub sdiff: f64,
    /// Judged stale here (the upstream may still take it).
    pub stale: bool,
}

impl UpstreamShare {
    /// The upstream's extranonce2: the miner's local extranonce1 part, then its extranonce2.
    pub fn extranonce2(&self) -> &[u8] {
        self.en2.get(..usize::from(self.en2_len)).unwrap_or(&[])
    }

    #[expect(
        clippy::too_many_arguments,
        reason = "one share's fields, built in one place"
    )]
    pub(crate) fn new(
        job: Arc<Job>,
        client: ClientId,
        user: Arc<Box<str>>,
        local: &[u8],
        en2: &[u8],
        (ntime, nonce, version_bits): (u32, u32, Option<u32>),
        sdiff: f64,
        stale: bool,
    ) -> Self {
        let mut buf = [0u8; 24];
        let n = (local.len() + en2.len()).min(24);
        if let Some(dst) = buf.get_mut(..n) {
            for (d, s) in dst.iter_mut().zip(local.iter().chain(en2)) {
                *d = *s;
            }
        }
        Self {
            job,
            client,
            user,
            en2: buf,
            en2_len: u8::try_from(n).unwrap_or(0),
            ntime,
            nonce,
            version_bits,
            sdiff,
            stale,
        }
    }
}

/// Where a shard's output goes: replies and notifications to clients, closes, and [`Event`]s.
///
/// Clients are addressed by [`ClientId`]: a direct client's lines go to its connection; a
/// sub-client's go to its passthrough's connection, framed for it.
pub trait Out {
    /// Queues bytes (one or more complete lines) for a client.
    fn send(&mut self, client: ClientId, bytes: Vec<u8>);
    /// Queues a shared line (a job notification built once for everybody).
    fn send_shared(&mut self, client: ClientId, bytes: Arc<[u8]>);
    /// Closes a client after its queued bytes (a direct client's connection; a sub-client
    /// alone, its passthrough's connection staying up).
    fn close(&mut self, client: ClientId);
    /// An event for the daemon. Block candidates always come this way; share events only
    /// when [`Out::wants_shares`] is true.
    fn event(&mut self, ev: Event);
    /// Whether [`Event::Share`]s are wanted. When false (the default) the share path builds
    /// none: no allocation or formatting per share for a consumer that does not exist.
    fn wants_shares(&self) -> bool {
        false
    }
}

/// A recording [`Out`] for tests and simulations.
#[derive(Debug, Default)]
pub struct RecordingOut {
    /// Everything sent, in order, with the client.
    pub sent: Vec<(ClientId, Vec<u8>)>,
    /// Clients closed.
    pub closed: Vec<ClientId>,
    /// Events, in order.
    pub events: Vec<Event>,
    /// What [`Out::wants_shares`] answers.
    pub shares: bool,
}

impl RecordingOut {
    /// The block candidates among the events, draining them (other events stay).
    pub fn take_blocks(&mut self) -> Vec<BlockCandidate> {
        let mut blocks = Vec::new();
        self.events.retain(|e| match e {
            Event::Block(b) => {
                blocks.push(b.clone());
                false
            }
            Event::Share(_) | Event::Upstream(_) | Event::Authorise(_) => true,
        });
        blocks
    }

    /// The share records among the events, draining them (other events stay).
    pub fn take_shares(&mut self) -> Vec<ShareRecord> {
        let mut shares = Vec::new();
        self.events.retain(|e| match e {
            Event::Share(s) => {
                shares.push(s.clone());
                false
            }
            Event::Block(_) | Event::Upstream(_) | Event::Authorise(_) => true,
        });
        shares
    }

    /// The shares for the upstream among the events, draining them (other events stay).
    pub fn take_upstream(&mut self) -> Vec<UpstreamShare> {
        let mut shares = Vec::new();
        self.events.retain(|e| match e {
            Event::Upstream(s) => {
                shares.push(s.clone());
                false
            }
            Event::Block(_) | Event::Share(_) | Event::Authorise(_) => true,
        });
        shares
    }

    /// The authorisations waiting for a verdict among the events, draining them.
    pub fn take_authorise(&mut self) -> Vec<AuthRequest> {
        let mut reqs = Vec::new();
        self.events.retain(|e| match e {
            Event::Authorise(r) => {
                reqs.push(r.clone());
                false
            }
            Event::Block(_) | Event::Share(_) | Event::Upstream(_) => true,
        });
        reqs
    }

    /// Lines sent to `conn`, parsed as JSON, draining them.
    pub fn take_json(&mut self, conn: impl Into<ClientId>) -> Vec<serde_json::Value> {
        let conn = conn.into();
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
    fn send(&mut self, conn: ClientId, bytes: Vec<u8>) {
        self.sent.push((conn, bytes));
    }
    fn send_shared(&mut self, conn: ClientId, bytes: Arc<[u8]>) {
        self.sent.push((conn, bytes.to_vec()));
    }
    fn close(&mut self, conn: ClientId) {
        self.closed.push(conn);
    }
    fn event(&mut self, ev: Event) {
        self.events.push(ev);
    }
    fn wants_shares(&self) -> bool {
        self.shares
    }
}
