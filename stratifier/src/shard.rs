//! One shard of the stratifier: the sessions of one connector thread and every stratum method.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::io::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::stratum::write::{self, ConfigureAnswer};
use common::stratum::{self, Method, Parser, Request, Value, codes, value_as_f64};
use common::{ConnId, Difficulty, Peer, Target, address};
use simd_json::prelude::*;
use tracing::{debug, info, warn};

use crate::book::{BookView, JobView};
use crate::compact::{Name, PackedDiff, ShortStr, Stamp};
use crate::handover::{HandoverError, Reader, SESSION_FORMAT, Writer};
use crate::job::{ExtranonceLayout, Job, Origin, SourceId};
use crate::pool::Pool;
use crate::share::roll_version;
use crate::stats::{Stripe, WorkerStatsRef};
use crate::submit;
use crate::vardiff::{Bounds, VarDiff};
use crate::{AuthRequest, AuthVerdict, ClientId, Event, Out, Reject, UpstreamShare};

mod admin;
pub use admin::{ClientInfo, ReconnectTo};

/// The longest worker name kept (ckpool's limit).
const MAX_WORKER_LEN: usize = 127;
/// The longest user agent kept.
const MAX_AGENT_LEN: usize = 255;

/// The sessions of one connector thread.
pub struct Shard {
    parser: Parser,
    st: State,
}

struct State {
    pool: Arc<Pool>,
    sessions: Sessions,
    /// Shared copies of user names and user agents (most miners share both).
    names: Interner,
    /// This shard's stripe of the pool totals.
    stripe: Arc<Stripe>,
    /// When each connection must have authorised by (16 bytes an entry, gone once past, or
    /// at the next compaction once its connection authorised or left).
    auth_deadlines: VecDeque<(Stamp, ClientId)>,
    /// Length of `auth_deadlines` at which its next compaction runs.
    auth_compact_at: usize,
    scratch: Vec<u8>,
    solo_work: HashMap<(u64, Name), Arc<SoloWork>>,
    last_prune: Option<Instant>,
    /// This thread's copy of the live jobs, for checking shares.
    jobs: JobView,
    /// Shares judged (accepted or rejected) so far: a plain counter the daemon reads between
    /// rounds to time replies, at no cost to the share path beyond an add.
    submits: u64,
    /// Userproxy: authorisations waiting for the daemon's verdict (few at a time; not in the
    /// sessions, which stay as small as they are).
    pending_auth: HashMap<ClientId, PendingAuth>,
    /// The share journal's lines not yet taken ([`Shard::enable_journal`]): one per accepted
    /// share, `[number, diff, sdiff, "user", "rest of the worker name"]` (the number is the
    /// worker's count of accepted shares after it). The daemon writes them out before the
    /// round's replies go out.
    journal: Option<Vec<u8>>,
}

/// A `mining.authorize` waiting for [`Shard::finish_authorise`].
struct PendingAuth {
    /// The request's id, as JSON.
    id: Vec<u8>,
    worker: Arc<str>,
    pass: Arc<str>,
    /// Refused if no verdict came by then.
    by: Instant,
}

/// A solo user's coinbase tail and notify lines for one job.
struct SoloWork {
    coinb2: Vec<u8>,
    notify: Arc<[u8]>,
    notify_clean: Arc<[u8]>,
}

struct Auth {
    user: Name,
    /// The worker name after the user name (`.rig1`, `_a`, or empty): the worker is
    /// `user` + `rest`, and short rests (most) are kept inline, with no allocation.
    rest: ShortStr,
    /// Where its shares are counted; looked up at the first share (idle miners cost nothing).
    stats: Option<WorkerStatsRef>,
}

impl Auth {
    /// Where its shares are counted, looked up (or created, for a client from `ip`) at the
    /// first.
    fn stats(&mut self, pool: &Pool, ip: IpAddr) -> &WorkerStatsRef {
        let (user, rest) = (&self.user, &self.rest);
        self.stats.get_or_insert_with(|| {
            pool.registry
                .worker_stats_from(user, &format!("{user}{rest}"), Some(ip))
        })
    }

    /// Whether `name` is this worker's name.
    fn is_worker(&self, name: &str) -> bool {
        name.as_bytes().strip_prefix(self.user.as_bytes()) == Some(self.rest.as_bytes())
    }

    fn worker(&self) -> String {
        format!("{}{}", self.user, self.rest)
    }
}

/// One client's stratum state: 160 bytes for an idle miner, all inline in the shard's
/// table (a farm has hundreds of thousands). What few miners use is in [`Extras`].
struct Session {
    /// The local part of extranonce1 as a number: the miner sees its source's prefix, then the
    /// low bytes of this, big-endian, as many as the source's layout says.
    enonce1: u64,
    /// The sequence number ([`job_seq`]) of the last job sent; 0 before the first.
    last_job: u32,
    /// Shares on jobs before this one are judged at the easier of `old_diff` and `diff`.
    diff_change_job: u32,
    diff: PackedDiff,
    old_diff: PackedDiff,
    /// The operator's minimum for this client: pool, listener and user-agent rules.
    floor: PackedDiff,
    /// The miner's own minimum (suggest_difficulty, minimum-difficulty, `d=`).
    suggested: Option<PackedDiff>,
    agent: Name,
    auth: Option<Auth>,
    vardiff: VarDiff,
    extras: Option<Box<Extras>>,
    session_id: u32,
    mask: u32,
    peer: Peer,
    /// The generation of its connection's id (a stale id finds no session).
    generation: u16,
    /// Its work source: the job book it mines on and its extranonce layout.
    source: SourceId,
    subscribed: bool,
    /// The miner sent `mining.extranonce.subscribe`.
    extranonce_subscribed: bool,
}

/// Session state that few miners need, allocated on first use.
#[derive(Default)]
struct Extras {
    /// The extranonce1 before the last `mining.set_extranonce`, still valid for shares on jobs
    /// before `enonce1_change_job` (work already in flight when it changed).
    old_enonce1: u64,
    enonce1_change_job: u64,
    /// A fixed difficulty (`fd=` in the password): no vardiff.
    fixed: Option<PackedDiff>,
    last_txnhashes: Option<Instant>,
    /// Invalid shares in a row (stale ones not counted; an accepted share resets it). Here, not
    /// in the session: only a client that sent an invalid share pays for it.
    invalid_streak: u32,
}

impl Session {
    fn diff(&self) -> Difficulty {
        self.diff.get()
    }

    fn floor(&self) -> Difficulty {
        self.floor.get()
    }

    fn suggested(&self) -> Option<Difficulty> {
        self.suggested.map(PackedDiff::get)
    }

    fn fixed(&self) -> Option<Difficulty> {
        self.extras
            .as_ref()
            .and_then(|e| e.fixed)
            .map(PackedDiff::get)
    }

    fn extras(&mut self) -> &mut Extras {
        self.extras.get_or_insert_with(Box::default)
    }

    fn invalid_streak(&self) -> u32 {
        self.extras.as_ref().map_or(0, |e| e.invalid_streak)
    }
}

/// The sessions of one connector thread, in a slab of their own: a session gets the first free
/// index, so the table is as long as the most sessions the thread has had at once, whatever the
/// connector's slots or a passthrough's ids, with no per-session allocation. The slab grows in
/// chunks, so growing never copies the sessions (a copy of 100,000 would stall the thread) and
/// leaves no spare capacity beyond one chunk.
///
/// A direct client is found through a chunked array indexed by its connection's slot (4 bytes
/// per slot, no hashing on the share path; the session keeps the slot's generation, so a stale
/// id finds nothing); a sub-client through a map keyed by its connection and remote id.
#[derive(Default)]
struct Sessions {
    chunks: Vec<Box<[Option<Session>]>>,
    /// Slab indices below this have been handed out.
    next: u32,
    /// Handed-out indices free again.
    free: Vec<u32>,
    len: usize,
    /// Slab index + 1 of the direct session by connection slot (0: none).
    direct: Vec<Box<[u32]>>,
    /// Slab index of each sub-client.
    subs: HashMap<(ConnId, u64), u32>,
    /// The sub-clients of each connection, in the order they came.
    subs_of: BTreeMap<ConnId, Vec<u64>>,
    /// The connector thread of every id (taken from the first).
    thread: u16,
}

/// A connection id whose slot is beyond [`MAX_SLOT`], or a slab that is full.
#[derive(Debug)]
struct SlotOutOfRange;

/// The authorisation-deadline queue is compacted at this length at the least (4 KiB).
const AUTH_COMPACT_MIN: usize = 256;

/// Sessions per chunk of the slab (about 42 KiB).
const CHUNK: usize = 256;
/// Entries per chunk of the slot index (4 KiB).
const DIRECT_CHUNK: usize = 1024;
/// Slots beyond this are refused (the connector never gets near: 16M connections per thread),
/// and so are sessions beyond this many.
const MAX_SLOT: usize = 1 << 24;

impl Sessions {
    fn entry(&self, i: u32) -> Option<&Option<Session>> {
        let i = usize::try_from(i).ok()?;
        self.chunks.get(i / CHUNK)?.get(i % CHUNK)
    }

    fn entry_mut(&mut self, i: u32) -> Option<&mut Option<Session>> {
        let i = usize::try_from(i).ok()?;
        self.chunks.get_mut(i / CHUNK)?.get_mut(i % CHUNK)
    }

    fn direct_index(conn: ConnId) -> (usize, usize) {
        let slot = usize::try_from(conn.slot()).unwrap_or(usize::MAX);
        (slot / DIRECT_CHUNK, slot % DIRECT_CHUNK)
    }

    /// The slot index's entry for `conn` (slab index + 1, or 0).
    fn direct_slot(&self, conn: ConnId) -> u32 {
        let (chunk, i) = Self::direct_index(conn);
        self.direct
            .get(chunk)
            .and_then(|c| c.get(i))
            .copied()
            .unwrap_or(0)
    }

    /// The slab index of `client`'s session, whatever its generation.
    fn index(&self, client: ClientId) -> Option<u32> {
        match client {
            ClientId::Direct(conn) => self.direct_slot(conn).checked_sub(1),
            ClientId::Sub(conn, remote) => self.subs.get(&(conn, remote)).copied(),
        }
    }

    fn get(&self, client: ClientId) -> Option<&Session> {
        let s = self.entry(self.index(client)?)?.as_ref()?;
        (s.generation == client.conn().generation()).then_some(s)
    }

    fn get_mut(&mut self, client: ClientId) -> Option<&mut Session> {
        let i = self.index(client)?;
        self.entry_mut(i)?
            .as_mut()
            .filter(|s| s.generation == client.conn().generation())
    }

    fn contains(&self, client: ClientId) -> bool {
        self.get(client).is_some()
    }

    /// A free slab index, the chunk it is in allocated.
    fn alloc(&mut self) -> Result<u32, SlotOutOfRange> {
        if let Some(i) = self.free.pop() {
            return Ok(i);
        }
        let i = self.next;
        if usize::try_from(i).map_or(true, |i| i >= MAX_SLOT) {
            return Err(SlotOutOfRange);
        }
        if usize::try_from(i).unwrap_or(usize::MAX) / CHUNK >= self.chunks.len() {
            self.chunks.push(
                (0..CHUNK)
                    .map(|_| None)
                    .collect::<Vec<_>>()
                    .into_boxed_slice(),
            );
        }
        self.next += 1;
        Ok(i)
    }

    /// Stores `s` for `client`; returns the session it replaced (a close that never arrived).
    fn insert(&mut self, client: ClientId, s: Session) -> Result<Option<Session>, SlotOutOfRange> {
        if let Some(i) = self.index(client) {
            let old = self.entry_mut(i).ok_or(SlotOutOfRange)?.replace(s);
            if old.is_none() {
                self.len += 1;
            }
            return Ok(old);
        }
        match client {
            ClientId::Direct(conn) => {
                let (chunk, _) = Self::direct_index(conn);
                if chunk >= MAX_SLOT / DIRECT_CHUNK {
                    return Err(SlotOutOfRange);
                }
                while self.direct.len() <= chunk {
                    self.direct.push(vec![0; DIRECT_CHUNK].into_boxed_slice());
                }
                self.thread = conn.thread();
            }
            ClientId::Sub(..) => {}
        }
        let i = self.alloc()?;
        if let Some(e) = self.entry_mut(i) {
            *e = Some(s);
        }
        self.len += 1;
        match client {
            ClientId::Direct(conn) => {
                let (chunk, j) = Self::direct_index(conn);
                if let Some(e) = self.direct.get_mut(chunk).and_then(|c| c.get_mut(j)) {
                    *e = i + 1;
                }
            }
            ClientId::Sub(conn, remote) => {
                self.subs.insert((conn, remote), i);
                self.subs_of.entry(conn).or_default().push(remote);
            }
        }
        Ok(None)
    }

    /// Frees slab index `i`, returning its session.
    fn release(&mut self, i: u32) -> Option<Session> {
        let s = self.entry_mut(i)?.take()?;
        self.len -= 1;
        self.free.push(i);
        Some(s)
    }

    /// Removes `client`'s session (only `client`'s: a direct client's sub-clients stay).
    fn remove(&mut self, client: ClientId) -> Option<Session> {
        let i = self.index(client)?;
        if self.entry(i)?.as_ref()?.generation != client.conn().generation() {
            return None;
        }
        match client {
            ClientId::Direct(conn) => {
                let (chunk, j) = Self::direct_index(conn);
                if let Some(e) = self.direct.get_mut(chunk).and_then(|c| c.get_mut(j)) {
                    *e = 0;
                }
            }
            ClientId::Sub(conn, remote) => {
                self.subs.remove(&(conn, remote));
                if let Some(list) = self.subs_of.get_mut(&conn) {
                    list.retain(|&r| r != remote);
                    if list.is_empty() {
                        self.subs_of.remove(&conn);
                    }
                }
            }
        }
        self.release(i)
    }

    /// Removes the sub-clients of `conn`, calling `f` on each.
    fn remove_subs(&mut self, conn: ConnId, mut f: impl FnMut(ClientId, Session)) {
        let Some(remotes) = self.subs_of.remove(&conn) else {
            return;
        };
        for remote in remotes {
            if let Some(i) = self.subs.remove(&(conn, remote))
                && let Some(s) = self.release(i)
            {
                f(ClientId::Sub(conn, remote), s);
            }
        }
    }

    fn len(&self) -> usize {
        self.len
    }

    /// Calls `f` on every session with its id, in the order of [`Sessions::ids`], with no
    /// lookup per session and nothing collected (a job goes to 100,000 miners this way).
    fn for_each_mut(&mut self, mut f: impl FnMut(ClientId, &mut Session)) {
        let thread = self.thread;
        let chunks = &mut self.chunks;
        for (&i, slot) in self.direct.iter().flat_map(|c| c.iter()).zip(0u32..) {
            if let Some(s) = i.checked_sub(1).and_then(|i| slab_entry(chunks, i)) {
                f(ClientId::Direct(ConnId::new(thread, s.generation, slot)), s);
            }
        }
        for (&conn, remotes) in &self.subs_of {
            for &remote in remotes {
                if let Some(s) = self
                    .subs
                    .get(&(conn, remote))
                    .and_then(|&i| slab_entry(chunks, i))
                {
                    f(ClientId::Sub(conn, remote), s);
                }
            }
        }
    }

    /// The ids of the sessions: direct clients by slot, then sub-clients by connection.
    #[cfg(test)]
    fn ids(&self) -> impl Iterator<Item = ClientId> + '_ {
        let thread = self.thread;
        let direct = self
            .direct
            .iter()
            .flat_map(|c| c.iter())
            .zip(0u32..)
            .filter_map(move |(&i, slot)| {
                let s = self.entry(i.checked_sub(1)?)?.as_ref()?;
                Some(ClientId::Direct(ConnId::new(thread, s.generation, slot)))
            });
        let subs = self
            .subs_of
            .iter()
            .flat_map(|(&conn, remotes)| remotes.iter().map(move |&r| ClientId::Sub(conn, r)));
        direct.chain(subs)
    }
}

/// The session at slab index `i`, if there is one.
fn slab_entry(chunks: &mut [Box<[Option<Session>]>], i: u32) -> Option<&mut Session> {
    let i = usize::try_from(i).ok()?;
    chunks.get_mut(i / CHUNK)?.get_mut(i % CHUNK)?.as_mut()
}

/// Appends a share journal line (see [`Shard::journal`]).
fn journal_line(
    j: &mut Vec<u8>,
    n: u64,
    (diff, sdiff): (f64, f64),
    (user, rest): (&str, &str),
    logged: Option<&[u8]>,
) {
    use std::io::Write as _;
    let finite = |x: f64| if x.is_finite() { x } else { 0.0 };
    // Writing to a Vec cannot fail; the names are JSON strings (escaped).
    let _ = write!(j, "[{n},{:?},{:?},", finite(diff), finite(sdiff));
    let _ = serde_json::to_writer(&mut *j, user);
    j.push(b',');
    let _ = serde_json::to_writer(&mut *j, rest);
    if let Some(rec) = logged {
        j.push(b',');
        j.extend_from_slice(rec);
    }
    j.extend_from_slice(b"]\n");
}

impl Shard {
    /// A shard using the shared pool state.
    pub fn new(pool: Arc<Pool>) -> Self {
        Self {
            parser: Parser::new(),
            st: State {
                stripe: pool.registry.totals_stripe(),
                pool,
                sessions: Sessions::default(),
                names: Interner::default(),
                auth_deadlines: VecDeque::new(),
                auth_compact_at: AUTH_COMPACT_MIN,
                scratch: Vec::with_capacity(512),
                solo_work: HashMap::new(),
                last_prune: None,
                jobs: JobView::default(),
                submits: 0,
                pending_auth: HashMap::new(),
                journal: None,
            },
        }
    }

    /// The shared pool state this shard serves.
    pub fn pool(&self) -> &Arc<Pool> {
        &self.st.pool
    }

    /// Number of live sessions.
    pub fn sessions(&self) -> usize {
        self.st.sessions.len()
    }

    /// Keeps a line per accepted share for the share journal (see [`Shard::journal`]).
    pub fn enable_journal(&mut self) {
        self.st
            .journal
            .get_or_insert_with(|| Vec::with_capacity(4096));
    }

    /// The share journal's lines written since the caller last emptied this buffer (`None`
    /// unless [`Shard::enable_journal`] was called). Each is a JSON array: `[n, diff, sdiff,
    /// user, rest]`, where `n` is the worker's count of accepted shares after this one and the
    /// worker's full name is `user` followed by `rest`; when share records are wanted
    /// ([`Out::wants_shares`]) the share's [`crate::ShareRecord`] follows as a sixth element. The caller must write them out (and
    /// clear the buffer) before the replies of the same round reach the miners.
    pub fn journal(&mut self) -> Option<&mut Vec<u8>> {
        self.st.journal.as_mut()
    }

    /// Shares this shard has judged (accepted or rejected, each answered), since it was made.
    pub fn submits(&self) -> u64 {
        self.st.submits
    }

    /// Whether `client` has a session here.
    pub fn has_client(&self, client: impl Into<ClientId>) -> bool {
        self.st.sessions.contains(client.into())
    }

    /// A new client: a connection, or a sub-client of one (see [`ClientId`]), from `peer` on
    /// listener `listener`, mining on the pool's own work.
    pub fn on_open(
        &mut self,
        now: Instant,
        conn: impl Into<ClientId>,
        peer: SocketAddr,
        listener: usize,
    ) {
        self.on_open_in(now, conn, peer, listener, SourceId::TEMPLATE);
    }

    /// A new client mining on the work of `source` (see [`Pool::add_source`]).
    pub fn on_open_in(
        &mut self,
        now: Instant,
        conn: impl Into<ClientId>,
        peer: SocketAddr,
        listener: usize,
        source: SourceId,
    ) {
        let conn = conn.into();
        let cfg = &self.st.pool.cfg;
        let rule = cfg.listener_diff.get(listener).copied().unwrap_or_default();
        let floor = rule.min.map_or(cfg.mindiff, |m| m.max(cfg.mindiff));
        let diff = rule.start.unwrap_or(cfg.startdiff).max(floor);
        let diff = PackedDiff::new(diff);
        let auth_timeout = cfg.auth_timeout;
        let session = Session {
            enonce1: 0,
            last_job: 0,
            diff_change_job: 0,
            diff,
            old_diff: diff,
            floor: PackedDiff::new(floor),
            suggested: None,
            agent: self.st.names.get(""),
            auth: None,
            vardiff: VarDiff::new(self.st.pool.epoch, now),
            extras: None,
            session_id: 0,
            mask: cfg.version_mask,
            peer: Peer::from(peer),
            generation: conn.conn().generation(),
            source,
            subscribed: false,
            extranonce_subscribed: false,
        };
        match self.st.sessions.insert(conn, session) {
            Ok(None) => {}
            Ok(Some(mut old)) => {
                // The connector closes a connection before reusing its slot, so this is a
                // close that was lost: account for it.
                warn!(%conn, old_peer = %old.peer, "session replaced without a close");
                self.st
                    .pool
                    .registry
                    .clients
                    .fetch_sub(1, Ordering::Relaxed);
                forget_stats(&self.st.pool, &mut old);
                // The lost close also ended the old connection's sub-clients.
                if let ClientId::Direct(c) = conn {
                    let gone = ConnId::new(c.thread(), old.generation, c.slot());
                    let st = &mut self.st;
                    let (pool, sessions) = (&st.pool, &mut st.sessions);
                    sessions.remove_subs(gone, |sub, s| closed(pool, now, sub, s));
                }
            }
            Err(_) => {
                warn!(%conn, %peer, "connection slot out of range; ignoring the connection");
                return;
            }
        }
        self.st
            .pool
            .registry
            .clients
            .fetch_add(1, Ordering::Relaxed);
        let deadline = Stamp::of(now + auth_timeout, self.st.pool.epoch);
        self.st.push_auth_deadline(deadline, conn);
    }

    /// A client went away. A connection's close ends its direct session and every
    /// sub-client on it; a sub-client's, only that sub-client's.
    pub fn on_close(&mut self, now: Instant, conn: impl Into<ClientId>) {
        let conn = conn.into();
        if !self.st.pending_auth.is_empty() {
            self.st.pending_auth.remove(&conn);
        }
        if let Some(s) = self.st.sessions.remove(conn) {
            self.st.closed(now, conn, s);
        }
        if let ClientId::Direct(c) = conn {
            let st = &mut self.st;
            let (pool, sessions) = (&st.pool, &mut st.sessions);
            sessions.remove_subs(c, |sub, s| closed(pool, now, sub, s));
        }
    }

    /// One line from a client.
    pub fn on_line(
        &mut self,
        now: Instant,
        conn: impl Into<ClientId>,
        line: &[u8],
        out: &mut impl Out,
    ) {
        let conn = conn.into();
        if !self.st.sessions.contains(conn) {
            return;
        }
        match self.parser.parse(line) {
            Ok(req) => self.st.dispatch(now, conn, &req, out),
            Err(e) => {
                let peer = self.st.sessions.get(conn).map(|s| s.peer);
                warn!(%conn, ?peer, error = %e, "unparseable line from client, disconnecting");
                let mut buf = Vec::new();
                write::reply_error(
                    &mut buf,
                    &Value::null(),
                    codes::OTHER,
                    "Invalid JSON, disconnecting",
                );
                out.send(conn, buf);
                out.close(conn);
            }
        }
    }

    /// A new job: notify every session that should have it.
    pub fn on_job(&mut self, job: &Arc<Job>, out: &mut impl Out) {
        let st = &mut self.st;
        let (pool, solo_work) = (&st.pool, &mut st.solo_work);
        let solo = pool.cfg.solo;
        st.sessions.for_each_mut(|client, s| {
            if !s.subscribed
                || s.source != job.source
                || s.last_job >= job_seq(job.id)
                || (solo && s.auth.is_none())
            {
                return;
            }
            deliver_job(pool, solo_work, client, s, job, false, out);
        });
    }

    /// Gives a subscribed session a new extranonce1, as a proxy must when its upstream changes.
    ///
    /// A miner that sent `mining.extranonce.subscribe` gets `mining.set_extranonce` and at once
    /// a clean `mining.notify`; its shares on jobs sent before still count with the old
    /// extranonce1. Any other miner cannot learn the new value on this connection: it gets
    /// `client.reconnect` and is disconnected, and resuming its session on the new connection
    /// gives it the new extranonce1. Returns the new extranonce1, or `None` for an unknown or
    /// unsubscribed connection, or when every extranonce1 of its source is in use. The old one
    /// is free for others again (its shares on earlier jobs still count for this session).
    pub fn renew_extranonce1(
        &mut self,
        now: Instant,
        conn: impl Into<ClientId>,
        out: &mut impl Out,
    ) -> Option<u64> {
        let conn = conn.into();
        let source = self.st.sessions.get(conn)?.source;
        let width = self.st.pool.layout(source)?.local_len();
        let en1 = self.st.pool.tables.alloc_enonce1(source, width)?;
        match self.st.change_extranonce1(now, conn, en1, out) {
            Some(old) => {
                self.st.pool.tables.release_enonce1(source, width, old);
                Some(en1)
            }
            None => {
                self.st.pool.tables.release_enonce1(source, width, en1);
                None
            }
        }
    }

    /// The daemon's verdict on an authorisation that left as [`Event::Authorise`]
    /// ([`crate::PoolConfig::external_auth`]). Accepted: the miner mines on `source` from now
    /// on; when that is not the source it subscribed on, it is moved there first: a miner that
    /// sent `mining.extranonce.subscribe` gets `mining.set_extranonce`, the authorisation's
    /// `true` and the new source's current job (clean); any other gets the `true`, then
    /// `client.reconnect` and is disconnected, its session parked on `source` (resumed there
    /// when it comes back with its session id, if the source is joinable:
    /// [`Pool::set_source_joinable`]). Refused: the authorisation fails with the reason, and
    /// the user name is refused for a while as after any failed authorisation. False when the
    /// client has no authorisation waiting (gone, answered already, timed out).
    pub fn finish_authorise(
        &mut self,
        now: Instant,
        client: impl Into<ClientId>,
        verdict: &AuthVerdict,
        out: &mut impl Out,
    ) -> bool {
        let client = client.into();
        let Some(p) = self.st.pending_auth.remove(&client) else {
            return false;
        };
        if !self.st.sessions.contains(client) {
            return false;
        }
        match verdict {
            AuthVerdict::Refuse(reason) => self.st.refuse_pending(now, client, &p, reason, out),
            AuthVerdict::Accept(source) => self.st.accept_pending(now, client, *source, &p, out),
            AuthVerdict::Here => {
                let source = self.st.sessions.get(client).map(|s| s.source);
                if let Some(source) = source {
                    self.st.accept_pending(now, client, source, &p, out);
                }
            }
        }
        true
    }

    /// Authorisations waiting for the daemon's verdict on this shard.
    pub fn pending_authorisations(&self) -> usize {
        self.st.pending_auth.len()
    }

    /// Lowers every session of `source` whose difficulty is above `max` to `max` at once
    /// (`mining.set_difficulty` and the current job again, clean): a proxy's miners never mine
    /// above the upstream's difficulty. Returns how many were lowered.
    pub fn limit_source_diff(
        &mut self,
        now: Instant,
        source: SourceId,
        max: Difficulty,
        out: &mut impl Out,
    ) -> usize {
        let mut above = Vec::new();
        self.st.sessions.for_each_mut(|client, s| {
            if s.source == source && s.diff() > max {
                above.push(client);
            }
        });
        for &client in &above {
            self.st.set_diff(now, client, max, out);
        }
        above.len()
    }

    /// Moves every session of source `from` to source `to` (a proxy whose upstream failed
    /// over, or changed its extranonce1): each gets an extranonce1 of `to` and, when it sent
    /// `mining.extranonce.subscribe`, `mining.set_extranonce` and `to`'s current job, clean;
    /// any other subscribed miner gets `client.reconnect` and is disconnected (it comes back on
    /// `to`). Sessions not yet subscribed just move. Work of `from` in flight is lost. Returns
    /// (told with `mining.set_extranonce`, reconnected).
    pub fn move_source(
        &mut self,
        _now: Instant,
        from: SourceId,
        to: SourceId,
        out: &mut impl Out,
    ) -> (usize, usize) {
        let (Some(old_layout), Some(layout)) = (self.st.pool.layout(from), self.st.pool.layout(to))
        else {
            return (0, 0);
        };
        let current = self.st.pool.current_job_of(to);
        let mut moving = Vec::new();
        self.st.sessions.for_each_mut(|client, s| {
            if s.source == from {
                moving.push(client);
            }
        });
        let (mut told, mut reconnected) = (0, 0);
        for client in moving {
            let st = &mut self.st;
            let Some(s) = st.sessions.get_mut(client) else {
                continue;
            };
            s.source = to;
            if !s.subscribed {
                continue;
            }
            st.pool
                .tables
                .release_enonce1(from, old_layout.local_len(), s.enonce1);
            let Some(en1) = st.pool.tables.alloc_enonce1(to, layout.local_len()) else {
                warn!(%client, source = to.0, "every extranonce1 is in use; reconnecting the client");
                s.subscribed = false;
                let mut buf = Vec::with_capacity(64);
                write::reconnect(&mut buf);
                out.send(client, buf);
                out.close(client);
                reconnected += 1;
                continue;
            };
            s.enonce1 = en1;
            // Nothing of the old source's work is valid any more.
            s.extras = s.extras.take().map(|mut e| {
                e.enonce1_change_job = 0;
                e
            });
            let mut buf = Vec::with_capacity(128);
            if !s.extranonce_subscribed {
                debug!(%client, peer = %s.peer, "work source changed; client cannot be told, reconnecting it");
                write::reconnect(&mut buf);
                out.send(client, buf);
                out.close(client);
                reconnected += 1;
                continue;
            }
            write::set_extranonce(&mut buf, layout.enonce1(en1).as_ref(), layout.nonce2_len());
            out.send(client, buf);
            told += 1;
            if let Some(job) = &current {
                deliver_job(&st.pool, &mut st.solo_work, client, s, job, true, out);
            }
        }
        (told, reconnected)
    }

    /// Takes `client`'s session out of this shard for a zero-disconnect upgrade and returns it
    /// serialised, for the next process's [`Shard::adopt_session`]; `None` for an unknown
    /// client. The session is not parked and no disconnect is counted (the miner stays
    /// connected, in the other process); its extranonce1 is given back to this pool's tables
    /// (the next process claims it). Only this client's session: a passthrough's sub-clients
    /// are exported one by one.
    ///
    /// The blob holds the session's extranonce1 (and the one before a `set_extranonce`),
    /// difficulties (current, previous with the job it changed at, floor, suggested, fixed),
    /// vardiff state, authorised user and worker, version mask, user agent, session id,
    /// subscription flags, last job sent and invalid-share run: about 130 bytes, most of them
    /// fixed fields, the rest the user agent and worker name.
    pub fn export_session(&mut self, now: Instant, client: impl Into<ClientId>) -> Option<Vec<u8>> {
        let client = client.into();
        let mut s = self.st.sessions.remove(client)?;
        let pool = &self.st.pool;
        pool.registry.clients.fetch_sub(1, Ordering::Relaxed);
        if s.subscribed {
            let width = pool.layout(s.source).map_or(8, |l| l.local_len());
            pool.tables.release_enonce1(s.source, width, s.enonce1);
        }
        // Where its shares were counted is looked up again in the next process: the worker's
        // counters travel in the pool's state.
        if let Some(a) = s.auth.as_mut() {
            a.stats = None;
        }
        let mut w = Writer::default();
        save_session(&mut w, &s, pool.epoch, now);
        debug!(%client, peer = %s.peer, "session exported");
        Some(w.buf)
    }

    /// [`Shard::export_session`] for every sub-client of connection `conn` (a passthrough link
    /// handed over whole): `(remote id, peer, session)` each, in one pass.
    pub fn export_subs(&mut self, now: Instant, conn: ConnId) -> Vec<(u64, SocketAddr, Vec<u8>)> {
        let st = &mut self.st;
        let pool = &st.pool;
        let mut out = Vec::new();
        st.sessions.remove_subs(conn, |client, mut s| {
            pool.registry.clients.fetch_sub(1, Ordering::Relaxed);
            if s.subscribed {
                let width = pool.layout(s.source).map_or(8, |l| l.local_len());
                pool.tables.release_enonce1(s.source, width, s.enonce1);
            }
            if let Some(a) = s.auth.as_mut() {
                a.stats = None;
            }
            let mut w = Writer::default();
            save_session(&mut w, &s, pool.epoch, now);
            if let ClientId::Sub(_, remote) = client {
                out.push((remote, s.peer.addr(), w.buf));
            }
        });
        debug!(%conn, subs = out.len(), "sub-client sessions exported");
        out
    }

    /// Recreates a session [`Shard::export_session`] wrote in another process, for `client` (a
    /// connection of this process, handed over) from `peer` on `listener`, as it was: the next
    /// share on a job it had is judged as the old process would have. Its extranonce1 is
    /// counted in use again; its session id needs nothing (ids come from the counter and keys
    /// the pool took over with [`Pool::import_state`], which should come first, so that its
    /// jobs are live). A client that is not yet authorised gets a fresh authorisation
    /// deadline. The session keeps the difficulty floor it had (the rules of its listener and
    /// user agent were applied in the old process); `listener` is only logged. Refused with
    /// an error, with nothing changed, for a blob that cannot be read,
    /// an unknown source, a client that already has a session, or an extranonce1 in use.
    pub fn adopt_session(
        &mut self,
        now: Instant,
        client: impl Into<ClientId>,
        peer: SocketAddr,
        listener: usize,
        bytes: &[u8],
    ) -> Result<(), HandoverError> {
        let client = client.into();
        let st = &mut self.st;
        let epoch = st.pool.epoch;
        let mut r = Reader::new(bytes, SESSION_FORMAT)?;
        let s = load_session(&mut r, &mut st.names, epoch, now, client, peer)?;
        r.finish()?;
        let layout = st
            .pool
            .layout(s.source)
            .ok_or(HandoverError::Mismatch("unknown work source"))?;
        if st.sessions.contains(client) {
            return Err(HandoverError::InUse("client id"));
        }
        let width = layout.local_len();
        if s.subscribed && !st.pool.tables.claim_enonce1(s.source, width, s.enonce1) {
            return Err(HandoverError::InUse("extranonce1"));
        }
        let authorised = s.auth.is_some();
        let (source, en1, subscribed) = (s.source, s.enonce1, s.subscribed);
        if st.sessions.insert(client, s).is_err() {
            if subscribed {
                st.pool.tables.release_enonce1(source, width, en1);
            }
            return Err(HandoverError::Mismatch("connection slot out of range"));
        }
        st.pool.registry.clients.fetch_add(1, Ordering::Relaxed);
        if !authorised {
            let deadline = Stamp::of(now + st.pool.cfg.auth_timeout, epoch);
            st.push_auth_deadline(deadline, client);
        }
        debug!(%client, %peer, listener, "session adopted");
        Ok(())
    }

    /// Periodic work: drop clients that did not authorise in time, prune caches.
    pub fn on_tick(&mut self, now: Instant, out: &mut impl Out) {
        if !self.st.pending_auth.is_empty() {
            let overdue: Vec<ClientId> = self
                .st
                .pending_auth
                .iter()
                .filter(|(_, p)| p.by <= now)
                .map(|(&c, _)| c)
                .collect();
            let reason = AuthVerdict::Refuse(Arc::from("Upstream did not answer"));
            for c in overdue {
                self.finish_authorise(now, c, &reason, out);
            }
        }
        let now_stamp = Stamp::of(now, self.st.pool.epoch);
        while let Some(&(deadline, conn)) = self.st.auth_deadlines.front() {
            if deadline > now_stamp {
                break;
            }
            self.st.auth_deadlines.pop_front();
            if let Some(s) = self.st.sessions.get(conn)
                && s.auth.is_none()
            {
                info!(%conn, peer = %s.peer, "client did not authorise in time, dropping");
                out.close(conn);
            }
        }
        // A connection storm leaves a long queue behind: do not keep its memory for good.
        let deadlines = &mut self.st.auth_deadlines;
        if deadlines.capacity() > 1024 && deadlines.len() < deadlines.capacity() / 8 {
            deadlines.shrink_to(deadlines.len() * 2);
        }
        let prune = self
            .st
            .last_prune
            .is_none_or(|t| now.saturating_duration_since(t) > Duration::from_secs(30));
        // Let go of jobs the pool dropped, even when no share came to look them up.
        self.st.pool.books.refresh(&mut self.st.jobs);
        if prune {
            let jobs = &self.st.jobs;
            self.st.solo_work.retain(|(id, _), _| jobs.is_live(*id));
            self.st.names.prune();
            self.st.last_prune = Some(now);
        }
    }
}

/// Writes a session for a handover (format [`SESSION_FORMAT`]).
fn save_session(w: &mut Writer, s: &Session, epoch: Instant, now: Instant) {
    w.u8(SESSION_FORMAT);
    w.u16(s.source.0);
    w.u64(s.enonce1);
    w.u32(s.last_job);
    w.u32(s.diff_change_job);
    w.u64(s.diff.raw());
    w.u64(s.old_diff.raw());
    w.u64(s.floor.raw());
    w.u64(s.suggested.map_or(0, PackedDiff::raw));
    w.str(&s.agent);
    match &s.auth {
        None => w.u8(0),
        Some(a) => {
            w.u8(1);
            w.str(&a.user);
            w.str(a.rest.as_str());
        }
    }
    s.vardiff.save(w, epoch, now);
    match s.extras.as_deref() {
        None => w.u8(0),
        Some(e) => {
            w.u8(1);
            w.u64(e.old_enonce1);
            w.u64(e.enonce1_change_job);
            w.u64(e.fixed.map_or(0, PackedDiff::raw));
            w.opt_age(e.last_txnhashes, now);
            w.u32(e.invalid_streak);
        }
    }
    w.u32(s.session_id);
    w.u32(s.mask);
    w.u8(u8::from(s.subscribed) | (u8::from(s.extranonce_subscribed) << 1));
}

/// A difficulty of a handover blob: `None` for 0 when `optional`, an error otherwise.
fn read_diff(
    r: &mut Reader<'_>,
    optional: bool,
    what: &'static str,
) -> Result<Option<PackedDiff>, HandoverError> {
    match PackedDiff::from_raw(r.u64()?) {
        None if !optional => Err(HandoverError::Malformed(what)),
        d => Ok(d),
    }
}

/// Reads a session [`save_session`] wrote (after its version byte), for `client` from `peer`.
fn load_session(
    r: &mut Reader<'_>,
    names: &mut Interner,
    epoch: Instant,
    now: Instant,
    client: ClientId,
    peer: SocketAddr,
) -> Result<Session, HandoverError> {
    let source = SourceId(r.u16()?);
    let enonce1 = r.u64()?;
    let last_job = r.u32()?;
    let diff_change_job = r.u32()?;
    let required =
        |r: &mut Reader<'_>, what| read_diff(r, false, what)?.ok_or(HandoverError::Malformed(what));
    let diff = required(r, "difficulty")?;
    let old_diff = required(r, "previous difficulty")?;
    let floor = required(r, "minimum difficulty")?;
    let suggested = read_diff(r, true, "suggested difficulty")?;
    let agent = r.str("user agent")?;
    if agent.len() > MAX_AGENT_LEN {
        return Err(HandoverError::Malformed("user agent"));
    }
    let agent = names.get(agent);
    let auth = if r.bool("authorised")? {
        let user = r.str("user")?;
        let rest = r.str("worker")?;
        if user.is_empty() || user.len() + rest.len() > MAX_WORKER_LEN {
            return Err(HandoverError::Malformed("worker"));
        }
        Some(Auth {
            user: names.get(user),
            rest: ShortStr::new(rest),
            stats: None,
        })
    } else {
        None
    };
    let vardiff = VarDiff::load(r, epoch, now)?;
    let extras = if r.bool("extras")? {
        Some(Box::new(Extras {
            old_enonce1: r.u64()?,
            enonce1_change_job: r.u64()?,
            fixed: read_diff(r, true, "fixed difficulty")?,
            last_txnhashes: r.opt_age(now)?,
            invalid_streak: r.u32()?,
        }))
    } else {
        None
    };
    let session_id = r.u32()?;
    let mask = r.u32()?;
    let flags = r.u8()?;
    if flags > 3 {
        return Err(HandoverError::Malformed("session flags"));
    }
    Ok(Session {
        enonce1,
        last_job,
        diff_change_job,
        diff,
        old_diff,
        floor,
        suggested,
        agent,
        auth,
        vardiff,
        extras,
        session_id,
        mask,
        peer: Peer::from(peer),
        generation: client.conn().generation(),
        source,
        subscribed: flags & 1 != 0,
        extranonce_subscribed: flags & 2 != 0,
    })
}

/// Accounts for a closed session.
fn closed(pool: &Pool, now: Instant, client: ClientId, mut s: Session) {
    pool.registry.clients.fetch_sub(1, Ordering::Relaxed);
    forget_stats(pool, &mut s);
    if s.subscribed {
        let width = pool.layout(s.source).map_or(8, |l| l.local_len());
        if s.auth.is_some() {
            // As ckpool: only an authorised client's session is kept for resume; one that
            // never had an accepted share only for the short window.
            let short = !s.vardiff.had_share();
            pool.tables.park_session(
                s.session_id,
                s.source,
                (s.enonce1, width),
                (s.peer.ip(), short),
                now,
            );
        } else {
            pool.tables.release_enonce1(s.source, width, s.enonce1);
        }
    }
    debug!(%client, peer = %s.peer, "session closed");
}

/// Lets go of where a session's shares were counted: a worker no session counts into any more
/// and with no accepted share is forgotten ([`crate::StatsRegistry`]).
fn forget_stats(pool: &Pool, s: &mut Session) {
    if let Some(a) = s.auth.as_mut()
        && let Some(w) = a.stats.take()
    {
        pool.registry.release(&a.user, &a.worker(), w);
    }
}

impl State {
    /// Queues `client`'s authorisation deadline (its session already in the table). An entry
    /// stays until its deadline whatever becomes of its connection, so a churn of connections
    /// that authorise or leave at once (tens a second, each queued for `auth_timeout`) would
    /// keep thousands, and the queue's capacity would double at each new peak. Instead, each
    /// time the queue has doubled since the last pass, the entries of connections that
    /// authorised or left are dropped: the queue stays about twice the connections still
    /// unauthorised, and each entry is looked at about twice (amortised O(1) a connection).
    fn push_auth_deadline(&mut self, deadline: Stamp, client: ClientId) {
        self.auth_deadlines.push_back((deadline, client));
        if self.auth_deadlines.len() < self.auth_compact_at {
            return;
        }
        let sessions = &self.sessions;
        self.auth_deadlines
            .retain(|&(_, c)| sessions.get(c).is_some_and(|s| s.auth.is_none()));
        self.auth_compact_at = (2 * self.auth_deadlines.len()).max(AUTH_COMPACT_MIN);
        if self.auth_deadlines.capacity() > 2 * self.auth_compact_at {
            self.auth_deadlines.shrink_to(self.auth_compact_at);
        }
    }

    fn closed(&self, now: Instant, client: ClientId, s: Session) {
        closed(&self.pool, now, client, s);
    }

    fn dispatch(&mut self, now: Instant, conn: ClientId, req: &Request<'_>, out: &mut impl Out) {
        let method = match &req.method {
            Method::Name(m) => m.as_ref(),
            Method::Missing => {
                if !req.is_response {
                    reply_err(out, conn, req, codes::METHOD_NOT_FOUND, "Method not found");
                }
                // Otherwise a reply from the miner (e.g. to mining.ping): nothing to do.
                return;
            }
            Method::NotString => {
                reply_err(out, conn, req, codes::OTHER, "Method is not a string");
                return;
            }
        };
        match method {
            "mining.submit" => self.submit(now, conn, req, out),
            "mining.subscribe" => self.subscribe(now, conn, req, out),
            "mining.authorize" | "mining.authorise" => self.authorize(now, conn, req, out),
            "mining.configure" => self.configure(now, conn, req, out),
            "mining.suggest_difficulty" => {
                let d = req
                    .param(0)
                    .and_then(value_as_f64)
                    .and_then(Difficulty::from_f64);
                self.suggest(now, conn, req, d, out);
            }
            "mining.suggest_target" => {
                let d = req
                    .param_str(0)
                    .and_then(stratum::hex_exact::<32>)
                    .map(|be| Target(ruint_from_be(&be)).difficulty());
                self.suggest(now, conn, req, d, out);
            }
            "mining.extranonce.subscribe" => {
                if let Some(s) = self.sessions.get_mut(conn) {
                    s.extranonce_subscribed = true;
                }
                reply_true(out, conn, req);
            }
            "mining.get_transactions" => self.get_transactions(conn, req, false, now, out),
            "mining.get_txnhashes" => self.get_transactions(conn, req, true, now, out),
            "mining.ping" => {
                let mut buf = Vec::with_capacity(64);
                write::reply_pong(&mut buf, &req.id);
                out.send(conn, buf);
            }
            "mining.term" => out.close(conn),
            // The daemon turns a connection on a `passthroughserver` address into a passthrough
            // before its lines reach a shard; anywhere else (and for a sub-client) it is refused.
            "mining.passthrough" | "mining.node" => {
                info!(%conn, method, "link handshake refused on this listener");
                reply_err(out, conn, req, codes::OTHER, "Not allowed on this port");
            }
            other => {
                debug!(%conn, method = other, "unknown method");
                reply_err(out, conn, req, codes::METHOD_NOT_FOUND, "Method not found");
            }
        }
    }

    fn subscribe(&mut self, now: Instant, conn: ClientId, req: &Request<'_>, out: &mut impl Out) {
        if req.has_params && !matches!(req.params, Value::Array(_) | Value::Static(_)) {
            reply_err(out, conn, req, codes::OTHER, "params not an array");
            return;
        }
        let Some(source) = self.sessions.get(conn).map(|s| s.source) else {
            return;
        };
        let (Some(job), Some(layout)) =
            (self.pool.current_job_of(source), self.pool.layout(source))
        else {
            reply_err(out, conn, req, codes::OTHER, "Initialising");
            return;
        };
        let (mut job, mut layout) = (job, layout);
        let Some(s) = self.sessions.get_mut(conn) else {
            return;
        };
        if !s.subscribed {
            s.agent = self
                .names
                .get(truncate(req.param_str(0).unwrap_or(""), MAX_AGENT_LEN));
            // Resume is bound to the address the session came from (ckpool's is not). A
            // session parked on a joinable source (a userproxy's user upstream) resumes there.
            let ip = s.peer.ip();
            let pool = &self.pool;
            let resumed = req
                .param_str(1)
                .filter(|h| (1..=8).contains(&h.len()))
                .and_then(|h| u32::from_str_radix(h, 16).ok())
                .and_then(|sid| {
                    pool.tables
                        .resume_session_in(sid, ip, now, |src| {
                            src == source
                                || (pool.source_joinable(src)
                                    && pool.current_job_of(src).is_some()
                                    && pool.layout(src).is_some())
                        })
                        .map(|(src, en1)| (sid, src, en1))
                });
            let (sid, en1) = match resumed {
                Some((sid, src, en1)) => {
                    if src != source
                        && let (Some(j), Some(l)) = (pool.current_job_of(src), pool.layout(src))
                    {
                        debug!(%conn, session = sid, source = src.0, "session resumed on its own work source");
                        s.source = src;
                        job = j;
                        layout = l;
                    }
                    debug!(%conn, session = sid, "session resumed");
                    (sid, en1)
                }
                None => {
                    let Some(en1) = self.pool.tables.alloc_enonce1(source, layout.local_len())
                    else {
                        warn!(%conn, source = source.0, "every extranonce1 is in use");
                        reply_err(out, conn, req, codes::OTHER, "Server full");
                        out.close(conn);
                        return;
                    };
                    (self.pool.tables.alloc_session(), en1)
                }
            };
            s.session_id = sid;
            s.enonce1 = en1;
            s.subscribed = true;
            let agent = s.agent.to_ascii_lowercase();
            if let Some(rule) = self
                .pool
                .cfg
                .agent_diff
                .iter()
                .find(|r| agent.contains(&r.pattern))
            {
                s.floor = PackedDiff::new(s.floor().max(rule.min));
            }
            let floor = s.floor();
            let mut diff = s.diff().max(floor);
            if s.suggested.is_none() {
                // A share never needs to be harder than a block (regtest, signet, testnet).
                diff = diff.min(job.network_diff).max(floor);
            }
            let mut diff = presentable(&self.pool.cfg, diff, floor);
            // Never above the upstream's difficulty (proxy modes).
            if let Some(cap) = cap_diff(None, self.pool.upstream_diff(s.source)) {
                diff = diff.min(cap);
            }
            s.diff = PackedDiff::new(diff);
            s.old_diff = s.diff;
        }
        let mut buf = Vec::with_capacity(256);
        write::subscribe_result(
            &mut buf,
            &req.id,
            s.session_id,
            layout.enonce1(s.enonce1).as_ref(),
            layout.nonce2_len(),
        );
        write::set_difficulty(&mut buf, s.diff());
        out.send(conn, buf);
        if !self.pool.cfg.solo {
            self.send_job(conn, &job, out);
        }
    }

    fn authorize(&mut self, now: Instant, conn: ClientId, req: &Request<'_>, out: &mut impl Out) {
        let Some(s) = self.sessions.get_mut(conn) else {
            return;
        };
        if !s.subscribed {
            reply_auth_fail(out, conn, req, codes::NOT_SUBSCRIBED, "Not subscribed");
            return;
        }
        if s.auth.is_some() {
            reply_true(out, conn, req);
            return;
        }
        let worker = match req.params_array() {
            None => return reply_auth_fail(out, conn, req, codes::OTHER, "params not an array"),
            Some([]) => {
                return reply_auth_fail(
                    out,
                    conn,
                    req,
                    codes::OTHER,
                    "params missing array entries",
                );
            }
            Some([first, ..]) => match first.as_str() {
                None => {
                    return reply_auth_fail(
                        out,
                        conn,
                        req,
                        codes::OTHER,
                        "Invalid workername parameter",
                    );
                }
                Some("") => {
                    return reply_auth_fail(
                        out,
                        conn,
                        req,
                        codes::OTHER,
                        "Empty workername parameter",
                    );
                }
                Some(w) => truncate(w, MAX_WORKER_LEN),
            },
        };
        if worker.starts_with(['.', '_']) {
            return reply_auth_fail(out, conn, req, codes::OTHER, "Empty username parameter");
        }
        if worker.contains('/') {
            return reply_auth_fail(
                out,
                conn,
                req,
                codes::OTHER,
                "Invalid character in username",
            );
        }
        let user = worker.split(['.', '_']).next().unwrap_or(worker);
        if let Some(left) = self.pool.tables.auth_refused(user, now) {
            // ckpool's throttle: a name that just failed is refused and its client dropped, so
            // a misconfigured rig reconnecting in a loop costs one line per back-off, not per try.
            debug!(%conn, peer = %s.peer, user, left_s = left.as_secs_f64(), "authorisation throttled");
            reply_auth_fail(
                out,
                conn,
                req,
                codes::UNAUTHORIZED,
                "Failed authorisation, retry later",
            );
            out.close(conn);
            return;
        }
        if self.pool.cfg.solo
            && let Err(e) = address::script_for_address(user, self.pool.cfg.network)
        {
            let wait = self.pool.tables.auth_failed(user, now);
            info!(%conn, peer = %s.peer, user, error = %e, refused_for_s = wait.as_secs(), "solo authorisation refused");
            return reply_auth_fail(out, conn, req, codes::UNAUTHORIZED, "Invalid address");
        }
        if let Some(wait) = self.pool.cfg.external_auth {
            // Userproxy: the daemon decides (the user's own upstream must take it first).
            if self.pending_auth.contains_key(&conn) {
                return reply_auth_fail(out, conn, req, codes::OTHER, "Authorisation in progress");
            }
            let mut id = Vec::with_capacity(16);
            write::write_value(&mut id, &req.id);
            let worker: Arc<str> = Arc::from(worker);
            let pass: Arc<str> = Arc::from(req.param_str(1).unwrap_or(""));
            debug!(%conn, peer = %s.peer, worker = %worker, "authorisation waits for the upstream");
            self.pending_auth.insert(
                conn,
                PendingAuth {
                    id,
                    worker: Arc::clone(&worker),
                    pass: Arc::clone(&pass),
                    by: now + wait,
                },
            );
            out.event(Event::Authorise(AuthRequest {
                client: conn,
                user: Arc::from(user),
                worker,
                pass,
            }));
            return;
        }
        let mut buf = Vec::with_capacity(128);
        write::reply_true(&mut buf, &req.id);
        let pass = req.param_str(1).unwrap_or("");
        self.grant(now, conn, worker, pass, buf, out);
    }

    /// Authorises `conn` as `worker` (checked already): `reply` (the request's `true`) goes
    /// out, then whatever the password's options bring.
    fn grant(
        &mut self,
        now: Instant,
        conn: ClientId,
        worker: &str,
        pass: &str,
        mut buf: Vec<u8>,
        out: &mut impl Out,
    ) {
        let Some(s) = self.sessions.get_mut(conn) else {
            return;
        };
        let source = s.source;
        let user = worker.split(['.', '_']).next().unwrap_or(worker);
        self.pool.tables.auth_succeeded(user);
        info!(%conn, peer = %s.peer, worker, agent = %s.agent, "authorised");
        s.auth = Some(Auth {
            user: self.names.get(user),
            rest: ShortStr::new(worker.get(user.len()..).unwrap_or("")),
            stats: None,
        });
        if s.agent.contains("gminer") {
            let msg = format!("Authorised, welcome to {} {user}!", self.pool.cfg.name);
            write::show_message(&mut buf, &msg);
        }
        out.send(conn, buf);
        // Password options, as public-pool, BTCPool and p2poolv2 take them: `d=N` a minimum,
        // `fd=N` a fixed difficulty (rentals often can set nothing but the password).
        let opts = PasswordOptions::parse(pass);
        if let Some(fd) = opts.fixed {
            let fd = fd.max(s.floor());
            s.extras().fixed = Some(PackedDiff::new(fd));
            self.set_diff(now, conn, fd, out);
        } else if let Some(d) = opts.min {
            self.apply_suggestion(now, conn, d, out);
        }
        if self.pool.cfg.solo
            && let Some(job) = self.pool.current_job_of(source)
        {
            self.send_job(conn, &job, out);
        }
    }

    /// A waiting authorisation refused ([`Shard::finish_authorise`]).
    fn refuse_pending(
        &mut self,
        now: Instant,
        conn: ClientId,
        p: &PendingAuth,
        reason: &str,
        out: &mut impl Out,
    ) {
        let user = p.worker.split(['.', '_']).next().unwrap_or(&p.worker);
        let wait = self.pool.tables.auth_failed(user, now);
        info!(%conn, user, %reason, refused_for_s = wait.as_secs(), "authorisation refused upstream");
        let mut buf = Vec::with_capacity(96 + reason.len());
        buf.extend_from_slice(b"{\"id\":");
        buf.extend_from_slice(&p.id);
        let _ = write!(buf, ",\"result\":false,\"error\":[{},", codes::UNAUTHORIZED);
        write::write_str(&mut buf, reason);
        buf.extend_from_slice(b",null]}\n");
        out.send(conn, buf);
    }

    /// A waiting authorisation accepted on `source` ([`Shard::finish_authorise`]).
    fn accept_pending(
        &mut self,
        now: Instant,
        conn: ClientId,
        source: SourceId,
        p: &PendingAuth,
        out: &mut impl Out,
    ) {
        let Some(from) = self.sessions.get(conn).map(|s| s.source) else {
            return;
        };
        let mut moved = false;
        let mut reconnect = false;
        if from != source {
            let (Some(old_layout), Some(layout), Some(_)) = (
                self.pool.layout(from),
                self.pool.layout(source),
                self.pool.current_job_of(source),
            ) else {
                return self.refuse_pending(now, conn, p, "Upstream has no work", out);
            };
            let Some(s) = self.sessions.get_mut(conn) else {
                return;
            };
            if s.subscribed {
                let Some(en1) = self.pool.tables.alloc_enonce1(source, layout.local_len()) else {
                    return self.refuse_pending(now, conn, p, "Upstream full", out);
                };
                self.pool
                    .tables
                    .release_enonce1(from, old_layout.local_len(), s.enonce1);
                s.enonce1 = en1;
                if let Some(e) = s.extras.as_mut() {
                    e.enonce1_change_job = 0;
                }
                if s.extranonce_subscribed {
                    let mut buf = Vec::with_capacity(96);
                    write::set_extranonce(
                        &mut buf,
                        layout.enonce1(en1).as_ref(),
                        layout.nonce2_len(),
                    );
                    out.send(conn, buf);
                    moved = true;
                } else {
                    reconnect = true;
                }
            }
            s.source = source;
            debug!(%conn, from = from.0, to = source.0, reconnect, "miner moved to its user's upstream");
        }
        let mut buf = Vec::with_capacity(128);
        buf.extend_from_slice(b"{\"id\":");
        buf.extend_from_slice(&p.id);
        buf.extend_from_slice(b",\"result\":true,\"error\":null}\n");
        self.grant(now, conn, &p.worker, &p.pass, buf, out);
        if reconnect {
            let mut buf = Vec::with_capacity(64);
            write::reconnect(&mut buf);
            out.send(conn, buf);
            out.close(conn);
            return;
        }
        if moved {
            // Never above the new upstream's difficulty; then its work, clean.
            if let Some(cap) = cap_diff(None, self.pool.upstream_diff(source))
                && self.sessions.get(conn).is_some_and(|s| s.diff() > cap)
            {
                self.set_diff(now, conn, cap, out);
            }
            if let Some(job) = self.pool.current_job_of(source) {
                self.send_job_with(conn, &job, true, out);
            }
        }
    }

    fn configure(&mut self, now: Instant, conn: ClientId, req: &Request<'_>, out: &mut impl Out) {
        let exts: Vec<&str> = req
            .param(0)
            .and_then(ValueAsArray::as_array)
            .map(|a| a.iter().filter_map(ValueAsScalar::as_str).collect())
            .unwrap_or_default();
        let opts = req.param(1);
        let opt = |k: &str| opts.and_then(|o| o.get(k));
        let mut answers = Vec::with_capacity(exts.len());
        let mut min_diff = None;
        for ext in exts {
            match ext {
                "version-rolling" => {
                    let requested = opt("version-rolling.mask")
                        .and_then(ValueAsScalar::as_str)
                        .and_then(stratum::hex_u32)
                        .unwrap_or(u32::MAX);
                    let mask = requested & self.pool.cfg.version_mask;
                    if let Some(s) = self.sessions.get_mut(conn) {
                        s.mask = mask;
                    }
                    answers.push(ConfigureAnswer::VersionRolling { mask });
                }
                "minimum-difficulty" => {
                    min_diff = opt("minimum-difficulty.value")
                        .and_then(value_as_f64)
                        .and_then(Difficulty::from_f64);
                    answers.push(ConfigureAnswer::MinimumDifficulty(min_diff.is_some()));
                }
                "subscribe-extranonce" => {
                    answers.push(ConfigureAnswer::SubscribeExtranonce);
                }
                other => {
                    answers.push(ConfigureAnswer::Unknown(other));
                }
            }
        }
        let mut buf = Vec::with_capacity(128);
        write::configure_result(&mut buf, &req.id, &answers);
        out.send(conn, buf);
        if let Some(d) = min_diff {
            self.apply_suggestion(now, conn, d, out);
        }
    }

    fn suggest(
        &mut self,
        now: Instant,
        conn: ClientId,
        req: &Request<'_>,
        d: Option<Difficulty>,
        out: &mut impl Out,
    ) {
        let Some(d) = d else {
            reply_err(out, conn, req, codes::OTHER, "Invalid difficulty");
            return;
        };
        reply_true(out, conn, req);
        self.apply_suggestion(now, conn, d, out);
    }

    /// A miner asked for a difficulty: it becomes its own minimum and, unless its difficulty is
    /// fixed, its difficulty now.
    fn apply_suggestion(
        &mut self,
        now: Instant,
        conn: ClientId,
        d: Difficulty,
        out: &mut impl Out,
    ) {
        let Some(s) = self.sessions.get_mut(conn) else {
            return;
        };
        let d = d.max(s.floor());
        s.suggested = Some(PackedDiff::new(d));
        if s.fixed().is_none() {
            self.set_diff(now, conn, d, out);
        }
    }

    /// Gives a subscribed session extranonce1 `en1` and tells the miner (see
    /// [`Shard::renew_extranonce1`]); returns the one it replaced, `None` for an unknown or
    /// unsubscribed client.
    fn change_extranonce1(
        &mut self,
        _now: Instant,
        conn: ClientId,
        en1: u64,
        out: &mut impl Out,
    ) -> Option<u64> {
        let source = self.sessions.get(conn)?.source;
        let current = self.pool.current_job_of(source);
        let layout = self.pool.layout(source)?;
        let s = self.sessions.get_mut(conn)?;
        if !s.subscribed {
            return None;
        }
        let old = s.enonce1;
        s.enonce1 = en1;
        let extras = s.extras();
        extras.old_enonce1 = old;
        extras.enonce1_change_job = current.as_ref().map_or(0, |j| j.id).saturating_add(1);
        let mut buf = Vec::with_capacity(96);
        if !s.extranonce_subscribed {
            info!(%conn, peer = %s.peer, "extranonce1 changed; client cannot be told, reconnecting it");
            write::reconnect(&mut buf);
            out.send(conn, buf);
            out.close(conn);
            return Some(old);
        }
        debug!(%conn, old = old, new = en1, "extranonce1 changed; sending mining.set_extranonce");
        write::set_extranonce(&mut buf, layout.enonce1(en1).as_ref(), layout.nonce2_len());
        out.send(conn, buf);
        if s.last_job != 0
            && let Some(job) = current
        {
            self.send_job_with(conn, &job, true, out);
        }
        Some(old)
    }

    /// Changes a session's difficulty and tells the miner: `mining.set_difficulty`, then at once
    /// the current job again with clean=true, since some firmware applies a new difficulty only
    /// with the next notify. Work already sent stays valid (see [`change_diff`]).
    fn set_diff(&mut self, now: Instant, conn: ClientId, d: Difficulty, out: &mut impl Out) {
        let Some(source) = self.sessions.get(conn).map(|s| s.source) else {
            return;
        };
        let current = self.pool.current_job_of(source);
        let Some(s) = self.sessions.get_mut(conn) else {
            return;
        };
        let d = PackedDiff::round(presentable(&self.pool.cfg, d, s.floor()));
        if d == s.diff() {
            return;
        }
        change_diff(
            s,
            d,
            current.as_ref().map_or(0, |j| j.id),
            self.pool.epoch,
            now,
        );
        if !s.subscribed {
            return;
        }
        let mut buf = Vec::with_capacity(80);
        write::set_difficulty(&mut buf, d);
        out.send(conn, buf);
        if s.last_job != 0
            && let Some(job) = current
        {
            self.send_job_with(conn, &job, true, out);
        }
    }

    fn get_transactions(
        &mut self,
        conn: ClientId,
        req: &Request<'_>,
        hashes: bool,
        now: Instant,
        out: &mut impl Out,
    ) {
        let Some(s) = self.sessions.get_mut(conn) else {
            return;
        };
        if s.auth.is_none() {
            reply_err(out, conn, req, codes::UNAUTHORIZED, "Unauthorized worker");
            return;
        }
        let job = match req.param_str(0) {
            Some(h) => u64::from_str_radix(h, 16)
                .ok()
                .and_then(|id| self.pool.books.job(s.source, id))
                .map(|(j, _)| j),
            None => self.pool.current_job_of(s.source),
        };
        let Some(job) = job else {
            reply_err(out, conn, req, codes::JOB_NOT_FOUND, "Invalid job_id");
            return;
        };
        if !hashes {
            let mut n = Vec::with_capacity(20);
            write::write_u64(&mut n, job.transactions().len() as u64);
            reply_raw(out, conn, req, &n);
            return;
        }
        if s.extras
            .as_ref()
            .and_then(|e| e.last_txnhashes)
            .is_some_and(|t| now.saturating_duration_since(t) < self.pool.cfg.update_interval)
        {
            reply_err(out, conn, req, codes::OTHER, "Ratelimit");
            return;
        }
        s.extras().last_txnhashes = Some(now);
        let mut list = String::with_capacity(job.transactions().len() * 65);
        for (i, tx) in job.transactions().iter().enumerate() {
            if i > 0 {
                list.push(' ');
            }
            list.push_str(&common::template::rpc_hash_hex(&tx.txid));
        }
        let mut raw = Vec::with_capacity(list.len() + 2);
        write::write_str(&mut raw, &list);
        reply_raw(out, conn, req, &raw);
    }

    /// Sends a job to one session (its own coinbase in solo mode).
    fn send_job(&mut self, conn: ClientId, job: &Arc<Job>, out: &mut impl Out) {
        self.send_job_with(conn, job, false, out);
    }

    /// Sends a job; `clean` forces clean=true (a miner's first job always has it).
    fn send_job_with(&mut self, conn: ClientId, job: &Arc<Job>, clean: bool, out: &mut impl Out) {
        if let Some(s) = self.sessions.get_mut(conn) {
            deliver_job(&self.pool, &mut self.solo_work, conn, s, job, clean, out);
        }
    }

    fn submit(&mut self, now: Instant, conn: ClientId, req: &Request<'_>, out: &mut impl Out) {
        self.submits += 1;
        let max = self.pool.cfg.max_invalid_shares;
        // A client past half its run of invalid shares has one share in 8 checked; the others
        // are refused unchecked (no parse, no hash), until a checked one is accepted.
        let unchecked = max != 0
            && self.sessions.get(conn).is_some_and(|s| {
                let streak = s.invalid_streak();
                streak >= (max / 2).max(1) && streak % 8 != 0
            });
        let verdict = if unchecked {
            Err(Reject::TooManyInvalid)
        } else {
            self.check_submit(now, conn, req, out)
        };
        let mut drop_client = false;
        if max != 0
            && let Some(s) = self.sessions.get_mut(conn)
        {
            match verdict {
                // No allocation for an accepted share: only a run already started is reset.
                Ok(_) => {
                    if let Some(e) = s.extras.as_mut() {
                        e.invalid_streak = 0;
                    }
                }
                Err(Reject::Stale) => {}
                Err(_) => {
                    let e = s.extras();
                    e.invalid_streak = e.invalid_streak.saturating_add(1);
                }
            }
            let streak = s.invalid_streak();
            // Once, at the share that reaches the limit (what comes before the close is
            // refused as before).
            if streak == max {
                info!(%conn, peer = %s.peer, streak, "too many invalid shares in a row, dropping the client");
                self.pool
                    .registry
                    .dropped_invalid
                    .fetch_add(1, Ordering::Relaxed);
                drop_client = true;
            }
        }
        match verdict {
            Ok(None) => {}
            Ok(Some(new)) => self.set_diff(now, conn, new, out),
            Err(reason) => {
                let mut buf = Vec::with_capacity(128);
                write::reply_reject(&mut buf, &req.id, reason.code(), reason.message());
                out.send(conn, buf);
                let session = self.sessions.get_mut(conn);
                let ip = session.as_ref().map(|s| s.peer.ip());
                match session.and_then(|s| s.auth.as_mut()).zip(ip) {
                    Some((a, ip)) => {
                        self.pool.registry.record_share(
                            &self.stripe,
                            a.stats(&self.pool, ip),
                            None,
                            0.0,
                            false,
                            Some(reason),
                            now,
                        );
                    }
                    None => self
                        .pool
                        .registry
                        .record_anonymous_reject(&self.stripe, reason),
                }
                debug!(%conn, %reason, "share rejected");
            }
        }
        if drop_client {
            out.close(conn);
        }
    }

    /// Every check of a submission, in ckpool's order plus a real nonce2 length check: the
    /// steps of [`crate::submit`] with the session's bookkeeping around them. A share that
    /// solves a block is submitted before the stale, ntime and target checks (a stale block may
    /// still win a race), but never twice: a duplicate makes no candidate.
    fn check_submit(
        &mut self,
        now: Instant,
        conn: ClientId,
        req: &Request<'_>,
        out: &mut impl Out,
    ) -> Result<Option<Difficulty>, Reject> {
        self.pool.books.refresh(&mut self.jobs);
        let pool: &Pool = &self.pool;
        let cfg = &pool.cfg;
        let Some(s) = self.sessions.get_mut(conn) else {
            return Ok(None);
        };
        if !s.subscribed {
            return Err(Reject::NotSubscribed);
        }
        let Some(auth) = s.auth.as_ref() else {
            return Err(Reject::Unauthorized);
        };
        let sub = submit::parse(req.params_array(), s.mask)?;
        // A name longer than kept was truncated at authorisation: compare the same prefix.
        if !auth.is_worker(truncate(sub.worker, MAX_WORKER_LEN)) {
            return Err(Reject::WorkerMismatch);
        }
        let (job, stale) = u64::from_str_radix(sub.job_id, 16)
            .ok()
            .and_then(|id| self.jobs.get(s.source, id))
            .ok_or(Reject::InvalidJobId)?;
        let layout = self
            .jobs
            .book(s.source)
            .map(|b| &*b.layout)
            .ok_or(Reject::InvalidJobId)?;
        let mut en2 = [0u8; ExtranonceLayout::MAX_NONCE2];
        let en2 = submit::nonce2(sub.nonce2, layout, &mut en2)?;
        let user = &auth.user;
        let solo;
        let coinb2: &[u8] = if cfg.solo {
            solo =
                solo_work(&mut self.solo_work, pool, job, user).ok_or(Reject::NoCoinbaseForUser)?;
            &solo.coinb2
        } else {
            &job.coinb2
        };
        let judged = if job_seq(job.id) < s.diff_change_job {
            s.old_diff.get().min(s.diff())
        } else {
            s.diff()
        };
        let input = submit::HashInput {
            layout,
            enonce1: s.enonce1,
            old_enonce1: s
                .extras
                .as_ref()
                .filter(|e| job.id < e.enonce1_change_job)
                .map(|e| e.old_enonce1),
            coinb2,
            enonce2: en2,
            version: roll_version(job.version, sub.version_bits.unwrap_or(0), s.mask),
            ntime: sub.ntime,
            nonce: sub.nonce,
            judged,
        };
        let hashed = submit::hash(job, &input, &mut self.scratch);
        // A block-solving share is looked up in the duplicate set before its block is built:
        // the same solution sent again makes no second candidate. (Recording it here, whatever
        // the verdict, changes no verdict: a resent share meets the same stale, ntime and target
        // checks, which come before the duplicate check.)
        let first_sighting = job
            .network_target
            .is_met_by(&hashed.share.hash)
            .then(|| job.first_sighting(&hashed.share.hash));
        if first_sighting == Some(true) {
            let mut candidate =
                submit::block_candidate(job, &hashed.share, &self.scratch, auth.worker());
            if job.can_assemble() {
                candidate.solve = Some(Box::new(submit::block_solve(
                    job,
                    &hashed,
                    &sub,
                    &self.scratch,
                    &candidate.worker,
                )));
            }
            info!(height = candidate.height, hash = %candidate.hash, worker = %candidate.worker, source = job.source.0, "BLOCK SOLVED, submitting");
            pool.registry.record_block(&candidate);
            out.event(Event::Block(candidate));
        }
        let verdict = submit::decide(
            stale,
            sub.ntime,
            job.ntime,
            judged.target().is_met_by(&hashed.share.hash),
            || first_sighting.unwrap_or_else(|| job.first_sighting(&hashed.share.hash)),
        );
        let upstream_diff = self.jobs.book(s.source).and_then(BookView::upstream_diff);
        if matches!(job.origin, Origin::Upstream { .. })
            && matches!(verdict, Ok(()) | Err(Reject::Stale))
            && (hashed.sdiff >= upstream_diff.unwrap_or(1.0)
                || job.network_target.is_met_by(&hashed.share.hash))
        {
            let local = hashed
                .enonce1
                .as_ref()
                .get(layout.prefix().len()..)
                .unwrap_or(&[]);
            out.event(Event::Upstream(UpstreamShare::new(
                Arc::clone(job),
                conn,
                auth.user.shared(),
                local,
                en2,
                (
                    sub.ntime,
                    sub.nonce,
                    sub.version_bits.map(|_| input.version & s.mask),
                ),
                hashed.sdiff,
                stale,
            )));
        }
        // With the share log on, an accepted share's journal line carries its share-log
        // record, so that a restart after a crash can write the lines the share log's thread
        // had not written yet.
        let mut logged = None;
        if out.wants_shares() {
            let from = submit::Submitter {
                worker: auth.worker(),
                user,
                address: s.peer.ip().to_string(),
                agent: &s.agent,
            };
            let rec = submit::share_record(job, &sub, &hashed, judged, verdict, from);
            if self.journal.is_some() && verdict.is_ok() {
                logged = serde_json::to_vec(&rec).ok();
            }
            out.event(Event::Share(rec));
        }
        verdict?;
        let mut buf = Vec::with_capacity(96);
        write::reply_true(&mut buf, &req.id);
        let ip = s.peer.ip();
        if let Some(a) = s.auth.as_mut() {
            let n = pool.registry.record_share(
                &self.stripe,
                a.stats(pool, ip),
                Some(judged.to_f64()),
                hashed.sdiff,
                first_sighting == Some(true),
                None,
                now,
            );
            if let Some(j) = self.journal.as_mut() {
                journal_line(
                    j,
                    n,
                    (judged.to_f64(), hashed.sdiff),
                    (&a.user, a.rest.as_str()),
                    logged.as_deref(),
                );
            }
        }
        let network = self
            .jobs
            .current(s.source)
            .map_or(job.network_diff, |c| c.network_diff);
        let bounds = Bounds {
            min: s.floor(),
            suggested: s.suggested(),
            max: cap_diff(cfg.maxdiff, upstream_diff),
            network,
        };
        out.send(conn, buf);
        if s.fixed().is_none()
            && let Some(new) = s
                .vardiff
                .on_share(pool.epoch, now, judged, s.diff(), bounds)
        {
            debug!(%conn, old = %s.diff(), new = %new, "vardiff");
            return Ok(Some(new));
        }
        Ok(None)
    }
}

/// Sends `job` to session `s` of `client` (its own coinbase in solo mode); `clean` forces
/// clean=true (a miner's first job always has it).
fn deliver_job(
    pool: &Pool,
    solo_cache: &mut HashMap<(u64, Name), Arc<SoloWork>>,
    client: ClientId,
    s: &mut Session,
    job: &Arc<Job>,
    clean: bool,
    out: &mut impl Out,
) {
    let first = s.last_job == 0 || clean;
    s.last_job = job_seq(job.id);
    if !pool.cfg.solo {
        let line = if first {
            &job.notify_clean
        } else {
            &job.notify
        };
        out.send_shared(client, Arc::clone(line));
        return;
    }
    let Some(user) = s.auth.as_ref().map(|a| &a.user) else {
        return;
    };
    match solo_work(solo_cache, pool, job, user) {
        Some(w) => out.send_shared(
            client,
            Arc::clone(if first { &w.notify_clean } else { &w.notify }),
        ),
        None => warn!(%client, user = %user, "cannot build a coinbase for this user"),
    }
}

/// Changes a session's difficulty; work from jobs up to `current_job` is judged at the easier of
/// the old and new difficulty, so nothing in flight is rejected by the change.
fn change_diff(s: &mut Session, new: Difficulty, current_job: u64, epoch: Instant, now: Instant) {
    s.old_diff = s.diff;
    s.diff = PackedDiff::new(new);
    s.diff_change_job = job_seq(current_job).saturating_add(1);
    s.vardiff.changed(epoch, now);
}

/// A job's sequence number within this pool: the low 32 bits of its id, which count up from 1
/// (the high bits are the pool's random seed, the same for all its jobs). Sessions keep these
/// 4-byte numbers rather than 8-byte ids; at a job per second they last 136 years.
fn job_seq(id: u64) -> u32 {
    #[allow(
        clippy::cast_possible_truncation,
        reason = "the low 32 bits are the sequence"
    )]
    let seq = id as u32;
    seq
}

/// Rounds a difficulty to what is sent: with `diff_pow2`, whole difficulties become the power of
/// two at or below them (firmware that rounds down then loses nothing), but never below `floor`.
fn presentable(cfg: &crate::PoolConfig, d: Difficulty, floor: Difficulty) -> Difficulty {
    if !cfg.diff_pow2 || d < Difficulty::ONE {
        return d;
    }
    let pow2_at_or_below = |units: u128| 1u128 << (127 - units.leading_zeros());
    let down = Difficulty::from_units(pow2_at_or_below(d.units()));
    if down >= floor {
        return down;
    }
    let f = floor.units();
    let up = if f.is_power_of_two() {
        f
    } else {
        pow2_at_or_below(f).saturating_mul(2)
    };
    Difficulty::from_units(up)
}

/// The lower of a configured maximum and an upstream's difficulty.
fn cap_diff(max: Option<Difficulty>, upstream: Option<f64>) -> Option<Difficulty> {
    let up = upstream.and_then(Difficulty::from_f64);
    match (max, up) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// Difficulty options in a miner's password (`x,d=1024`, `fd=65536;x`, …).
#[derive(Debug, Default, PartialEq)]
struct PasswordOptions {
    min: Option<Difficulty>,
    fixed: Option<Difficulty>,
}

impl PasswordOptions {
    fn parse(pass: &str) -> Self {
        let mut o = Self::default();
        for part in pass.split([',', ';', ' ', '&']) {
            let Some((k, v)) = part.split_once('=') else {
                continue;
            };
            let d = v.trim().parse::<f64>().ok().and_then(Difficulty::from_f64);
            match k.trim().to_ascii_lowercase().as_str() {
                "d" | "diff" | "md" => o.min = d.or(o.min),
                "fd" => o.fixed = d.or(o.fixed),
                _ => {}
            }
        }
        o
    }
}

/// The solo work of `user` for `job`, built on first use.
fn solo_work(
    cache: &mut HashMap<(u64, Name), Arc<SoloWork>>,
    pool: &Pool,
    job: &Job,
    user: &Name,
) -> Option<Arc<SoloWork>> {
    if let Some(w) = cache.get(&(job.id, user.clone())) {
        return Some(Arc::clone(w));
    }
    let script = address::script_for_address(user, pool.cfg.network).ok()?;
    let coinb2 = job.coinb2_for(&script, &pool.cb_cfg).ok()?;
    let w = Arc::new(SoloWork {
        notify: job.notify_with(&coinb2, job.clean),
        notify_clean: job.notify_with(&coinb2, true),
        coinb2,
    });
    cache.insert((job.id, user.clone()), Arc::clone(&w));
    Some(w)
}

/// `result` true (an authorisation again, a suggestion, `mining.extranonce.subscribe`).
fn reply_true(out: &mut impl Out, conn: ClientId, req: &Request<'_>) {
    let mut buf = Vec::with_capacity(64);
    write::reply_true(&mut buf, &req.id);
    out.send(conn, buf);
}

fn reply_raw(out: &mut impl Out, conn: ClientId, req: &Request<'_>, raw: &[u8]) {
    let mut buf = Vec::with_capacity(64 + raw.len());
    write::reply_result(&mut buf, &req.id, raw);
    out.send(conn, buf);
}

fn reply_err(out: &mut impl Out, conn: ClientId, req: &Request<'_>, code: i32, msg: &str) {
    let mut buf = Vec::with_capacity(96);
    write::reply_error(&mut buf, &req.id, code, msg);
    out.send(conn, buf);
}

/// A failed authorisation: `result` false and an error, as both client conventions expect.
fn reply_auth_fail(out: &mut impl Out, conn: ClientId, req: &Request<'_>, code: i32, msg: &str) {
    let mut buf = Vec::with_capacity(96);
    write::reply_refused(&mut buf, &req.id, code, msg);
    out.send(conn, buf);
}

fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s.get(..end).unwrap_or("")
}

/// A big-endian 32-byte target as a 256-bit integer.
fn ruint_from_be(be: &[u8; 32]) -> ruint::aliases::U256 {
    ruint::aliases::U256::from_be_bytes(*be)
}

/// Shared copies of strings that many sessions repeat (user names, user agents), so that 10,000
/// rigs of one farm hold one copy. Entries no session uses any more go at the next [`prune`].
///
/// [`prune`]: Interner::prune
#[derive(Default)]
struct Interner {
    set: std::collections::HashSet<Name>,
}

impl Interner {
    fn get(&mut self, s: &str) -> Name {
        if let Some(shared) = self.set.get(s) {
            return shared.clone();
        }
        let shared = Name::new(s);
        self.set.insert(shared.clone());
        shared
    }

    /// Forgets the strings only the interner still holds.
    fn prune(&mut self) {
        self.set.retain(|s| s.holders() > 1);
        if self.set.capacity() > 4 * self.set.len().max(64) {
            self.set.shrink_to_fit();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session(generation: u16) -> Session {
        let now = Instant::now();
        let mut names = Interner::default();
        let d = PackedDiff::new(Difficulty::ONE);
        Session {
            enonce1: 0,
            last_job: 0,
            diff_change_job: 0,
            diff: d,
            old_diff: d,
            floor: d,
            suggested: None,
            agent: names.get(""),
            auth: None,
            vardiff: VarDiff::new(now, now),
            extras: None,
            session_id: 0,
            mask: 0,
            peer: Peer::from(SocketAddr::from(([127, 0, 0, 1], 1))),
            generation,
            source: SourceId::TEMPLATE,
            subscribed: false,
            extranonce_subscribed: false,
        }
    }

    #[test]
    fn session_table_checks_generations_and_lists_its_ids() {
        let mut t = Sessions::default();
        let a = ClientId::Direct(ConnId::new(2, 7, 3));
        let b = ClientId::Direct(ConnId::new(2, 0, (DIRECT_CHUNK + 5) as u32));
        assert!(matches!(t.insert(a, session(7)), Ok(None)));
        assert!(matches!(t.insert(b, session(0)), Ok(None)));
        assert_eq!(t.len(), 2);
        assert_eq!(t.ids().collect::<Vec<_>>(), vec![a, b]);
        let stale = ClientId::Direct(ConnId::new(2, 6, 3));
        assert!(t.get(stale).is_none() && t.remove(stale).is_none());
        assert_eq!(t.len(), 2);
        assert!(t.remove(a).is_some());
        assert!(t.get(a).is_none() && t.remove(a).is_none());
        // A slot reused without the close: the old session comes back, counted once.
        let c = ClientId::Direct(ConnId::new(2, 1, (DIRECT_CHUNK + 5) as u32));
        assert!(matches!(t.insert(c, session(1)), Ok(Some(_))));
        assert_eq!(t.len(), 1);
        assert!(t.get(b).is_none() && t.contains(c));
        assert!(
            t.insert(
                ClientId::Direct(ConnId::new(2, 0, MAX_SLOT as u32)),
                session(0)
            )
            .is_err()
        );
    }

    #[test]
    fn the_slab_reuses_indices_and_keeps_sub_clients_apart() {
        let mut t = Sessions::default();
        let (p, q) = (ConnId::new(0, 3, 10_000), ConnId::new(0, 0, 11));
        // The slab is dense whatever the slots: a high slot takes index 0.
        t.insert(ClientId::Direct(p), session(3)).unwrap();
        assert_eq!(t.index(ClientId::Direct(p)), Some(0));
        for r in [1, 2] {
            t.insert(ClientId::Sub(p, r), session(3)).unwrap();
            t.insert(ClientId::Sub(q, r), session(0)).unwrap();
        }
        assert_eq!(t.len(), 5);
        assert_eq!(t.next, 5);
        assert!(t.contains(ClientId::Sub(q, 2)) && !t.contains(ClientId::Sub(q, 3)));
        assert!(!t.contains(ClientId::Direct(q)), "no direct session on q");
        // One sub-client leaves; its index is the next one handed out.
        let gone = t.index(ClientId::Sub(p, 1)).unwrap();
        assert!(t.remove(ClientId::Sub(p, 1)).is_some());
        t.insert(ClientId::Sub(p, 9), session(3)).unwrap();
        assert_eq!(t.index(ClientId::Sub(p, 9)), Some(gone));
        assert_eq!(t.next, 5, "no growth");
        let mut dropped = Vec::new();
        t.remove_subs(q, |c, _| dropped.push(c));
        assert_eq!(dropped, [ClientId::Sub(q, 1), ClientId::Sub(q, 2)]);
        assert_eq!(
            t.ids().collect::<Vec<_>>(),
            [
                ClientId::Direct(p),
                ClientId::Sub(p, 2),
                ClientId::Sub(p, 9)
            ]
        );
        assert_eq!(t.len(), 3);
        assert_eq!(t.free.len(), 2);
        // The fan-out walk visits the same sessions in the same order.
        let mut walked = Vec::new();
        t.for_each_mut(|c, _| walked.push(c));
        assert_eq!(walked, t.ids().collect::<Vec<_>>());
    }

    #[test]
    fn worker_names_are_kept_as_user_and_rest() {
        let mut names = Interner::default();
        for (worker, user) in [
            ("alice.rig1", "alice"),
            ("bob_x", "bob"),
            ("carol", "carol"),
        ] {
            let a = Auth {
                user: names.get(user),
                rest: ShortStr::new(&worker[user.len()..]),
                stats: None,
            };
            assert_eq!(a.worker(), worker);
            assert!(a.is_worker(worker));
            assert!(!a.is_worker(user) || user == worker);
            assert!(!a.is_worker(&format!("{worker}2")));
            assert!(!a.is_worker(""));
        }
    }

    #[test]
    fn the_auth_deadline_queue_keeps_only_connections_still_unauthorised() {
        let payout = address::script_for_address(
            "mnNghRjeAKbTqkvMYaE6kzkpsfWVdt3TRZ",
            common::address::Network::Regtest,
        )
        .unwrap();
        let cfg = crate::PoolConfig::new(common::address::Network::Regtest, Some(payout));
        let now = Instant::now();
        let pool = Pool::new(cfg, 1, now);
        pool.new_template(
            Arc::new(common::template::Template::empty([1; 32], 0x207f_ffff)),
            now,
        )
        .unwrap();
        let mut shard = Shard::new(Arc::clone(&pool));
        let peer: SocketAddr = "127.0.0.1:5000".parse().unwrap();
        let mut out = crate::RecordingOut::default();
        // One connection that never authorises, then a churn of 10,000 that authorise (even
        // ones) or subscribe and leave (odd ones), all within the timeout.
        let idle = ConnId::new(0, 0, 0);
        shard.on_open(now, idle, peer, 0);
        let sub = br#"{"id":1,"method":"mining.subscribe","params":[]}"#;
        let mut longest = 0;
        for i in 1..=10_000u32 {
            let c = ConnId::new(0, 0, i);
            shard.on_open(now, c, peer, 0);
            shard.on_line(now, c, sub, &mut out);
            if i % 2 == 0 {
                let auth = format!(
                    r#"{{"id":2,"method":"mining.authorize","params":["mnNghRjeAKbTqkvMYaE6kzkpsfWVdt3TRZ.w{i}","x"]}}"#
                );
                shard.on_line(now, c, auth.as_bytes(), &mut out);
            } else {
                shard.on_close(now, c);
            }
            longest = longest.max(shard.st.auth_deadlines.len());
        }
        // Without the compaction: 10,001 entries (160 KB, in a 256 KiB buffer).
        assert!(longest <= 2 * AUTH_COMPACT_MIN, "{longest} entries queued");
        assert!(shard.st.auth_deadlines.capacity() <= 4 * AUTH_COMPACT_MIN);
        assert!(out.closed.is_empty());
        // The one that never authorised is still dropped at its deadline, and only it.
        shard.on_tick(
            now + pool.cfg.auth_timeout + Duration::from_secs(1),
            &mut out,
        );
        assert_eq!(out.closed, [ClientId::Direct(idle)]);
    }

    #[test]
    fn session_stays_small() {
        // What an idle miner costs the stratifier: 160 bytes (320 before packing; 168 before
        // the worker suffix took 16 bytes instead of 24, which paid for the work source and
        // the slab's slot index), stored inline in the slab; the `memory` test counts the whole
        // heap. The goal for the whole process is 256 B per idle connection
        // (reference/perf.md G4).
        let size = std::mem::size_of::<Option<Session>>();
        println!("Session is {size} bytes");
        assert!(size <= 160, "Session is {size} bytes");
    }
}
