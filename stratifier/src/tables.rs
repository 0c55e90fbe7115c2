//! The session tables shared by every shard: extranonce1 and session id allocation, sessions
//! parked for resume, and the authorisation back-off.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::hash::{BuildHasher, RandomState};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bitcoin::hashes::siphash24;
use parking_lot::Mutex;
use tracing::warn;

use crate::handover::{HandoverError, Reader, Writer};

use crate::job::SourceId;

/// One username's authorisation back-off.
#[derive(Debug, Clone, Copy)]
pub(crate) struct AuthBackoff {
    /// Refused until then.
    until: Instant,
    /// The length of the last refusal.
    last: Duration,
}

/// The first refusal after a failed authorisation, and the longest (ckpool's values).
pub(crate) const AUTH_BACKOFF_START: Duration = Duration::from_secs(3);
pub(crate) const AUTH_BACKOFF_MAX: Duration = Duration::from_secs(600);
/// Usernames remembered at most (a flood of random names cannot grow the table beyond this).
pub(crate) const AUTH_BACKOFF_USERS: usize = 65_536;

/// A disconnected session kept for resume.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ParkedSession {
    source: SourceId,
    /// Its local extranonce1 number (still counted in use while parked).
    enonce1: u64,
    /// Bytes of the local extranonce1 part of its source's layout.
    width: u8,
    /// The address it connected from (without the port): only a client from there resumes it.
    ip: IpAddr,
    parked: Instant,
    /// Parked for the short window: its session never had an accepted share.
    short: bool,
}

/// How long a session that never had an accepted share stays parked for resume (at most the
/// resume window). Its miner had nothing accepted to keep working on, and a real miner comes
/// back within seconds; a flood of throw-away sessions (authorise and leave) is forgotten after
/// this, not after the whole window.
pub(crate) const SHORT_RESUME_WINDOW: Duration = Duration::from_secs(60);

/// [`SessionTables::save`]: the top bit of a parked session's width byte says it is short.
const SHORT_FLAG: u8 = 0x80;

/// Disconnected sessions kept for resume, by session id, and the same ids in the order parked:
/// expiry pops from the front, so forgetting expired sessions costs what expired, and a full
/// table forgets its oldest. At most `cap` are kept. A B-tree rather than a hash table: its
/// memory follows the number parked, where a hash table's doubles at each new peak and stays
/// (a flood of sessions authorised and left comes and goes in waves); a resume or a park is a
/// few hundred nanoseconds either way, once per connection.
#[derive(Debug, Default)]
pub(crate) struct Parked {
    pub(crate) map: BTreeMap<u32, ParkedSession>,
    /// (when parked, session id), oldest first. An id resumed or parked again leaves a stale
    /// entry here (its time no longer matches the map's), skipped when it reaches the front.
    order: VecDeque<(Instant, u32)>,
    /// The same for the sessions parked for the short window ([`ParkedSession::short`]).
    short_order: VecDeque<(Instant, u32)>,
    /// Sessions forgotten because the table was full.
    pub(crate) evicted: u64,
    /// Entries looked at by expiry and eviction so far (a test's measure of their cost).
    pub(crate) visited: u64,
}

/// Extranonce1 local parts in use (by live and parked sessions) for each work source whose
/// local part is at most 4 bytes: allocation skips them, so a counter that wrapped never hands
/// out a value in use. Wider local parts are not tracked: 2^40 subscriptions do not happen.
#[derive(Debug, Default)]
struct InUse {
    by_source: Vec<ValueSet>,
}

/// Values of one bit each in the range a page covers.
const PAGE_BITS: u32 = 1024;

/// One page of a [`ValueSet`]: [`PAGE_BITS`] consecutive values, and how many of them are set.
#[derive(Debug)]
struct Page {
    set: u32,
    bits: [u64; (PAGE_BITS / 64) as usize],
}

/// A set of `u32` values kept as a bitmap in pages of [`PAGE_BITS`] values, a page allocated
/// while one of its values is in the set. The extranonce1 counter hands out consecutive
/// values, so the sessions alive at once mostly share pages: about 1 bit each instead of a
/// hash set's 5 to 10 bytes (it measured 8 bytes more RSS per idle miner). At worst, when
/// every live value sits in a page of its own (a session kept while 1,023 others came and
/// went, for each), a value costs a page: 136 bytes, so memory stays bounded by the live and
/// parked sessions (`maxclients`, `maxparked`).
#[derive(Debug, Default)]
struct ValueSet {
    pages: HashMap<u32, Box<Page>>,
    len: u64,
}

impl ValueSet {
    /// Adds `v`; false when it was in already.
    fn insert(&mut self, v: u32) -> bool {
        let page = self.pages.entry(v / PAGE_BITS).or_insert_with(|| {
            Box::new(Page {
                set: 0,
                bits: [0; (PAGE_BITS / 64) as usize],
            })
        });
        let (word, bit) = (((v % PAGE_BITS) / 64) as usize, (v % 64));
        let Some(w) = page.bits.get_mut(word) else {
            return false;
        };
        if *w & (1 << bit) != 0 {
            return false;
        }
        *w |= 1 << bit;
        page.set += 1;
        self.len += 1;
        true
    }

    /// Removes `v` (nothing when it is not in), freeing its page when it was the page's last.
    fn remove(&mut self, v: u32) {
        let key = v / PAGE_BITS;
        let Some(page) = self.pages.get_mut(&key) else {
            return;
        };
        let (word, bit) = (((v % PAGE_BITS) / 64) as usize, (v % 64));
        let Some(w) = page.bits.get_mut(word) else {
            return;
        };
        if *w & (1 << bit) == 0 {
            return;
        }
        *w &= !(1 << bit);
        page.set -= 1;
        self.len -= 1;
        if page.set == 0 {
            self.pages.remove(&key);
        }
    }

    fn len(&self) -> u64 {
        self.len
    }
}

/// The widest local extranonce1 part whose values in use are tracked.
const TRACKED_WIDTH: usize = 4;

impl InUse {
    fn set(&mut self, source: SourceId) -> Option<&mut ValueSet> {
        let i = source.index();
        if self.by_source.len() <= i {
            self.by_source.resize_with(i + 1, ValueSet::default);
        }
        self.by_source.get_mut(i)
    }

    fn release(&mut self, source: SourceId, width: usize, en1: u64) {
        if width <= TRACKED_WIDTH
            && let Some(set) = self.by_source.get_mut(source.index())
        {
            set.remove(masked(en1, width));
        }
    }
}

/// The low `width` (at most 4) bytes of `en1`: what the miner sees of it.
fn masked(en1: u64, width: usize) -> u32 {
    let bits = 8 * width.min(TRACKED_WIDTH);
    let m = if bits >= 32 {
        u64::from(u32::MAX)
    } else {
        (1u64 << bits) - 1
    };
    // Masked to at most 32 bits.
    u32::try_from(en1 & m).unwrap_or(u32::MAX)
}

impl Parked {
    /// Forgets the sessions parked `window` or longer before `now`, oldest first, stopping at
    /// the first still within the window: the cost is the number expired (plus stale entries).
    /// Sessions of the short window expire after `short` (at most `window`).
    fn expire(&mut self, now: Instant, (window, short): (Duration, Duration), in_use: &mut InUse) {
        for (order, window) in [(Order::Long, window), (Order::Short, short.min(window))] {
            while let Some(&(t, sid)) = self.queue(order).front() {
                if now.saturating_duration_since(t) < window {
                    break;
                }
                self.queue(order).pop_front();
                self.visited += 1;
                self.forget(t, sid, in_use);
            }
        }
    }

    fn queue(&mut self, order: Order) -> &mut VecDeque<(Instant, u32)> {
        match order {
            Order::Long => &mut self.order,
            Order::Short => &mut self.short_order,
        }
    }

    /// Removes `sid` if it is the session parked at `t` (not a later one under the same id).
    fn forget(&mut self, t: Instant, sid: u32, in_use: &mut InUse) -> bool {
        if self.map.get(&sid).is_some_and(|p| p.parked == t)
            && let Some(p) = self.map.remove(&sid)
        {
            in_use.release(p.source, usize::from(p.width), p.enonce1);
            return true;
        }
        false
    }

    /// Forgets the oldest sessions until fewer than `cap` are left.
    /// Those of the short window go first: they never had an accepted share.
    fn evict(&mut self, cap: usize, in_use: &mut InUse) {
        while self.map.len() >= cap.max(1) {
            let Some((t, sid)) = self
                .short_order
                .pop_front()
                .or_else(|| self.order.pop_front())
            else {
                break;
            };
            self.visited += 1;
            if self.forget(t, sid, in_use) {
                self.evicted += 1;
            }
        }
    }

    /// Drops the stale entries of the queues once they are half as many as the live ones
    /// (amortised: each pass drops at least a third of the queues, so an entry is looked at
    /// about three times), and gives back room beyond twice what is left. The queues then stay
    /// within 1.5 times the parked sessions (plus 256), where letting the stale entries reach
    /// the live ones' number doubled their buffers once more at each new peak of the churn.
    fn compact(&mut self) {
        let live = self.map.len();
        if self.order.len() + self.short_order.len() > live + live / 2 + 256 {
            let map = &self.map;
            for order in [&mut self.order, &mut self.short_order] {
                order.retain(|(t, sid)| map.get(sid).is_some_and(|p| p.parked == *t));
                order.shrink_to(2 * order.len().max(64));
            }
        }
    }

    /// Remembers `p` as parked under `sid`, at the back of its window's queue.
    fn push(&mut self, sid: u32, p: ParkedSession) -> Option<ParkedSession> {
        let old = self.map.insert(sid, p);
        let order = if p.short { Order::Short } else { Order::Long };
        self.queue(order).push_back((p.parked, sid));
        old
    }
}

/// Which of [`Parked`]'s queues.
#[derive(Clone, Copy)]
enum Order {
    Long,
    Short,
}

/// A keyed permutation of `u32` (a four-round Feistel network on 16-bit halves with SipHash-2-4
/// under random keys as its round function): session ids from a counter that are all distinct
/// until the counter wraps, and that tell nothing of the ids before or after them. The keys are
/// explicit (and SipHash a fixed function), so a handover gives the next process the same
/// permutation: its ids stay distinct from the ones handed out before.
#[derive(Debug)]
struct IdPermutation {
    k0: AtomicU64,
    k1: AtomicU64,
}

impl IdPermutation {
    fn new() -> Self {
        // Two random words from the standard library's per-process random hasher keys.
        let r = RandomState::new();
        Self {
            k0: AtomicU64::new(r.hash_one(0x6b30u16)),
            k1: AtomicU64::new(r.hash_one(0x6b31u16)),
        }
    }

    fn keys(&self) -> (u64, u64) {
        (
            self.k0.load(Ordering::Relaxed),
            self.k1.load(Ordering::Relaxed),
        )
    }

    fn apply(&self, x: u32) -> u32 {
        let (k0, k1) = self.keys();
        let (mut l, mut r) = ((x >> 16) as u16, x as u16);
        for round in 0u8..4 {
            let [r0, r1] = r.to_le_bytes();
            // The low 16 bits of the round's hash.
            let f = siphash24::Hash::hash_to_u64_with_keys(k0, k1, &[round, r0, r1]) as u16;
            (l, r) = (r, l ^ f);
        }
        (u32::from(l) << 16) | u32::from(r)
    }
}

/// Session tables read from a handover blob, not yet installed.
#[derive(Debug)]
pub(crate) struct SavedTables {
    counters: (u64, u64),
    keys: (u64, u64),
    parked: Vec<(u32, ParkedSession)>,
    backoff: Vec<(Box<str>, AuthBackoff)>,
}

/// The pool's session tables.
#[derive(Debug)]
pub(crate) struct SessionTables {
    next_enonce1: AtomicU64,
    next_session: AtomicU64,
    session_ids: IdPermutation,
    pub(crate) resume: Mutex<Parked>,
    /// Extranonce1 values in use. Taken after `resume` when both are.
    in_use: Mutex<InUse>,
    /// How long a parked session can be resumed.
    resume_window: Duration,
    /// How long one that never had an accepted share can ([`SHORT_RESUME_WINDOW`]).
    short_window: Duration,
    /// The most sessions parked at once.
    max_parked: usize,
    /// Usernames whose authorisation failed, and until when they are refused (ckpool's back-off).
    pub(crate) auth_backoff: Mutex<HashMap<Box<str>, AuthBackoff>>,
    /// When a full back-off table was last pruned: at most once a second, so that a flood of
    /// distinct failing names costs a table scan per second, not one per name.
    pub(crate) auth_backoff_pruned: Mutex<Option<Instant>>,
}

impl SessionTables {
    /// Tables whose extranonce1 counter starts from `seed`, keeping a session parked for
    /// `resume_window`, at most `max_parked` at once. Session ids are random.
    pub(crate) fn new(seed: u64, resume_window: Duration, max_parked: usize) -> Self {
        Self {
            next_enonce1: AtomicU64::new(seed.wrapping_mul(0x9e37_79b9)),
            next_session: AtomicU64::new(seed.wrapping_mul(0x85eb_ca6b)),
            session_ids: IdPermutation::new(),
            resume: Mutex::new(Parked::default()),
            in_use: Mutex::new(InUse::default()),
            resume_window,
            short_window: SHORT_RESUME_WINDOW.min(resume_window),
            max_parked,
            auth_backoff: Mutex::new(HashMap::new()),
            auth_backoff_pruned: Mutex::new(None),
        }
    }

    /// A local extranonce1 number for a session of `source`, whose layout has `width` local
    /// bytes: one whose low `width` bytes no live or parked session of the source has. `None`
    /// when every value is in use (a 1- or 2-byte local part has only 256 or 65,536).
    pub(crate) fn alloc_enonce1(&self, source: SourceId, width: usize) -> Option<u64> {
        if width > TRACKED_WIDTH {
            return Some(self.next_enonce1.fetch_add(1, Ordering::Relaxed));
        }
        let space = 1u64 << (8 * width);
        let mut in_use = self.in_use.lock();
        let set = in_use.set(source)?;
        if set.len() >= space {
            return None;
        }
        loop {
            let en1 = self.next_enonce1.fetch_add(1, Ordering::Relaxed);
            if set.insert(masked(en1, width)) {
                return Some(en1);
            }
        }
    }

    /// A session's extranonce1 is no longer in use (closed without parking, or replaced).
    pub(crate) fn release_enonce1(&self, source: SourceId, width: usize, en1: u64) {
        self.in_use.lock().release(source, width, en1);
    }

    /// How long `user` is still refused after failed authorisations, if it is.
    pub(crate) fn auth_refused(&self, user: &str, now: Instant) -> Option<Duration> {
        let b = self.auth_backoff.lock();
        let until = b.get(user)?.until;
        (until > now).then(|| until - now)
    }

    /// A failed authorisation of `user`: it is refused for 3 s, and for twice as long after each
    /// further failure that follows a refusal's end within 10 minutes, up to 600 s (ckpool's
    /// back-off). Returns the refusal's length.
    pub(crate) fn auth_failed(&self, user: &str, now: Instant) -> Duration {
        let mut b = self.auth_backoff.lock();
        if b.len() >= AUTH_BACKOFF_USERS && !b.contains_key(user) {
            let mut pruned = self.auth_backoff_pruned.lock();
            if pruned.is_none_or(|t| now.saturating_duration_since(t) >= Duration::from_secs(1)) {
                b.retain(|_, e| now.saturating_duration_since(e.until) < AUTH_BACKOFF_MAX);
                *pruned = Some(now);
            }
            if b.len() >= AUTH_BACKOFF_USERS {
                // A flood of distinct names: refuse this one without remembering it.
                return AUTH_BACKOFF_START;
            }
        }
        let e = b.entry(user.into()).or_insert(AuthBackoff {
            until: now,
            last: Duration::ZERO,
        });
        let wait = if now.saturating_duration_since(e.until) < AUTH_BACKOFF_MAX {
            (e.last * 2).clamp(AUTH_BACKOFF_START, AUTH_BACKOFF_MAX)
        } else {
            AUTH_BACKOFF_START
        };
        *e = AuthBackoff {
            until: now + wait,
            last: wait,
        };
        wait
    }

    /// `user` authorised: its back-off ends.
    pub(crate) fn auth_succeeded(&self, user: &str) {
        let mut b = self.auth_backoff.lock();
        if !b.is_empty() {
            b.remove(user);
        }
    }

    /// A new session id: unpredictable, and distinct from the last 2^32 handed out.
    pub(crate) fn alloc_session(&self) -> u32 {
        // The counter's low 32 bits, permuted.
        let n = self.next_session.fetch_add(1, Ordering::Relaxed) as u32;
        self.session_ids.apply(n)
    }

    /// Remembers a session for resume from `ip` (its extranonce1 stays in use until it is
    /// resumed or forgotten) for the resume window, or for the short one
    /// ([`SHORT_RESUME_WINDOW`]) when `short` (a session that never had an accepted share).
    /// Expired sessions are forgotten first, then the oldest (short ones first) while the
    /// table is full.
    pub(crate) fn park_session(
        &self,
        session: u32,
        source: SourceId,
        (enonce1, width): (u64, usize),
        (ip, short): (IpAddr, bool),
        now: Instant,
    ) {
        let mut r = self.resume.lock();
        let mut in_use = self.in_use.lock();
        r.expire(now, self.windows(), &mut in_use);
        if self.max_parked == 0 {
            in_use.release(source, width, enonce1);
            return;
        }
        r.evict(self.max_parked, &mut in_use);
        let entry = ParkedSession {
            source,
            enonce1,
            width: u8::try_from(width).unwrap_or(u8::MAX),
            ip,
            parked: now,
            short,
        };
        if let Some(old) = r.push(session, entry) {
            // An id seen again only after the counter wrapped: the older session goes.
            in_use.release(old.source, usize::from(old.width), old.enonce1);
        }
        r.compact();
    }

    /// The resume window and the short one.
    fn windows(&self) -> (Duration, Duration) {
        (self.resume_window, self.short_window)
    }

    /// Takes a parked session's extranonce1 number if it is still within the resume window,
    /// was on `source` (another source's extranonce1 means nothing here) and was parked by a
    /// client from `ip`. A request from another address leaves the session parked: guessing
    /// ids neither takes nor evicts anybody's session.
    #[cfg(test)]
    pub(crate) fn resume_session(
        &self,
        session: u32,
        source: SourceId,
        ip: IpAddr,
        now: Instant,
    ) -> Option<u64> {
        self.resume_session_in(session, ip, now, |s| s == source)
            .map(|(_, en1)| en1)
    }

    /// [`SessionTables::resume_session`] for a session parked on any source `source_ok`
    /// accepts: returns that source and the extranonce1.
    pub(crate) fn resume_session_in(
        &self,
        session: u32,
        ip: IpAddr,
        now: Instant,
        source_ok: impl Fn(SourceId) -> bool,
    ) -> Option<(SourceId, u64)> {
        let mut r = self.resume.lock();
        let p = *r.map.get(&session)?;
        let window = if p.short {
            self.short_window
        } else {
            self.resume_window
        };
        if now.saturating_duration_since(p.parked) >= window {
            let mut in_use = self.in_use.lock();
            r.forget(p.parked, session, &mut in_use);
            return None;
        }
        if !source_ok(p.source) || p.ip != ip {
            return None;
        }
        r.map.remove(&session);
        Some((p.source, p.enonce1))
    }

    /// Extranonce1 values of `source` in use (live and parked sessions) and how many there
    /// are, for a local part of `width` bytes; `None` when values that wide are not tracked.
    pub(crate) fn enonce1_usage(&self, source: SourceId, width: usize) -> Option<(u64, u64)> {
        if width > TRACKED_WIDTH {
            return None;
        }
        let space = 1u64 << (8 * width);
        let mut in_use = self.in_use.lock();
        Some((in_use.set(source).map_or(0, |s| s.len()), space))
    }

    /// Forgets the parked sessions past the resume window; returns how many are left.
    pub(crate) fn prune_parked(&self, now: Instant) -> usize {
        let mut r = self.resume.lock();
        let mut in_use = self.in_use.lock();
        r.expire(now, self.windows(), &mut in_use);
        r.compact();
        r.map.len()
    }

    /// Counts `en1` in use for a session handed over from another process; false when a live
    /// or parked session of `source` here already has it.
    pub(crate) fn claim_enonce1(&self, source: SourceId, width: usize, en1: u64) -> bool {
        if width > TRACKED_WIDTH {
            return true;
        }
        let mut in_use = self.in_use.lock();
        in_use
            .set(source)
            .is_some_and(|set| set.insert(masked(en1, width)))
    }

    /// Writes the tables for a handover: the counters, the session id keys, the sessions
    /// parked within the resume window (oldest first, with their ages) and the authorisation
    /// back-offs. The extranonce1s of live sessions travel with the sessions.
    pub(crate) fn save(&self, w: &mut Writer, now: Instant) {
        w.u64(self.next_enonce1.load(Ordering::Relaxed));
        w.u64(self.next_session.load(Ordering::Relaxed));
        let (k0, k1) = self.session_ids.keys();
        w.u64(k0);
        w.u64(k1);
        {
            let r = self.resume.lock();
            let mut parked: Vec<(&u32, &ParkedSession)> = r
                .map
                .iter()
                .filter(|(_, p)| now.saturating_duration_since(p.parked) < self.resume_window)
                .collect();
            parked.sort_by_key(|(_, p)| p.parked);
            w.len(parked.len());
            for (&sid, p) in parked {
                w.u32(sid);
                w.u16(p.source.0);
                w.u64(p.enonce1);
                // The short window's flag in the width's top bit (widths are at most 8).
                w.u8(p.width | if p.short { SHORT_FLAG } else { 0 });
                w.ip(p.ip);
                w.age(p.parked, now);
            }
        }
        let b = self.auth_backoff.lock();
        w.len(b.len());
        for (user, e) in b.iter() {
            w.str(user);
            // Signed: a refusal that ended still doubles the next one for 10 minutes.
            let until = match e.until.checked_duration_since(now) {
                Some(left) => i64::try_from(left.as_nanos()).unwrap_or(i64::MAX),
                None => {
                    i64::try_from(now.duration_since(e.until).as_nanos()).map_or(i64::MIN, |d| -d)
                }
            };
            w.i64(until);
            w.duration(e.last);
        }
    }

    /// Reads what [`SessionTables::save`] wrote, to install with [`SessionTables::restore`].
    pub(crate) fn load(r: &mut Reader<'_>, now: Instant) -> Result<SavedTables, HandoverError> {
        let counters = (r.u64()?, r.u64()?);
        let keys = (r.u64()?, r.u64()?);
        let n = r.count(24)?;
        let mut parked = Vec::with_capacity(n);
        for _ in 0..n {
            let sid = r.u32()?;
            let source = SourceId(r.u16()?);
            let enonce1 = r.u64()?;
            let width = r.u8()?;
            let p = ParkedSession {
                source,
                enonce1,
                width: width & !SHORT_FLAG,
                ip: r.ip()?,
                parked: r.age(now)?,
                short: width & SHORT_FLAG != 0,
            };
            parked.push((sid, p));
        }
        let n = r.count(20)?;
        let mut backoff = Vec::with_capacity(n);
        for _ in 0..n {
            let user: Box<str> = r.str("user")?.into();
            let until = r.i64()?;
            let until = if until >= 0 {
                now + Duration::from_nanos(until.unsigned_abs()).min(AUTH_BACKOFF_MAX)
            } else {
                let ago = Duration::from_nanos(until.unsigned_abs()).min(2 * AUTH_BACKOFF_MAX);
                now.checked_sub(ago).unwrap_or(now)
            };
            let last = r.duration()?.min(AUTH_BACKOFF_MAX);
            backoff.push((user, AuthBackoff { until, last }));
        }
        Ok(SavedTables {
            counters,
            keys,
            parked,
            backoff,
        })
    }

    /// Installs tables [`SessionTables::load`] read (into fresh tables: what they held before
    /// is replaced). A parked session of a source beyond the pool's `sources`, or whose
    /// extranonce1 another already holds (only in a corrupt blob), is left out.
    pub(crate) fn restore(&self, saved: SavedTables, sources: usize) {
        self.next_enonce1.store(saved.counters.0, Ordering::Relaxed);
        self.next_session.store(saved.counters.1, Ordering::Relaxed);
        self.session_ids.k0.store(saved.keys.0, Ordering::Relaxed);
        self.session_ids.k1.store(saved.keys.1, Ordering::Relaxed);
        let mut r = self.resume.lock();
        let mut in_use = self.in_use.lock();
        // Over the cap (a smaller one here), the newest are kept.
        let skip = saved.parked.len().saturating_sub(self.max_parked);
        for (sid, p) in saved.parked.into_iter().skip(skip) {
            if p.source.index() >= sources {
                warn!(
                    session = sid,
                    "handed-over parked session of an unknown source, dropped"
                );
                continue;
            }
            let width = usize::from(p.width);
            if width <= TRACKED_WIDTH
                && !in_use
                    .set(p.source)
                    .is_some_and(|set| set.insert(masked(p.enonce1, width)))
            {
                warn!(
                    session = sid,
                    "handed-over parked session's extranonce1 in use, dropped"
                );
                continue;
            }
            if let Some(old) = r.push(sid, p) {
                in_use.release(old.source, usize::from(old.width), old.enonce1);
            }
        }
        drop((r, in_use));
        let mut b = self.auth_backoff.lock();
        b.extend(saved.backoff.into_iter().take(AUTH_BACKOFF_USERS));
    }

    /// Extranonce1 values of `source` counted in use (tests).
    #[cfg(test)]
    pub(crate) fn enonce1s_in_use(&self, source: SourceId) -> usize {
        self.in_use
            .lock()
            .by_source
            .get(source.index())
            .map_or(0, |set| usize::try_from(set.len()).unwrap_or(usize::MAX))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    fn tables() -> SessionTables {
        SessionTables::new(1, Duration::from_secs(600), 1_000_000)
    }

    const IP: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 1));
    const OTHER: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 2));

    proptest::proptest! {
        /// The paged bitmap answers as a hash set would, and holds a page only while one of
        /// its values is in.
        #[test]
        fn value_set_behaves_as_a_set(ops in proptest::collection::vec(
            (proptest::bool::ANY, proptest::sample::select(vec![0u32, 1, 63, 64, 1023, 1024, 5000, u32::MAX - 1, u32::MAX])),
            0..200,
        )) {
            let mut set = ValueSet::default();
            let mut model = HashSet::new();
            for (add, v) in ops {
                if add {
                    proptest::prop_assert_eq!(set.insert(v), model.insert(v));
                } else {
                    set.remove(v);
                    model.remove(&v);
                }
                proptest::prop_assert_eq!(set.len(), model.len() as u64);
                let pages: HashSet<u32> = model.iter().map(|v| v / PAGE_BITS).collect();
                proptest::prop_assert_eq!(set.pages.len(), pages.len());
            }
        }
    }
    #[test]
    fn auth_backoff_doubles_up_to_ten_minutes_then_starts_again() {
        let p = tables();
        let mut now = Instant::now();
        let mut waits = Vec::new();
        for _ in 0..10 {
            let w = p.auth_failed("bob", now);
            assert_eq!(p.auth_refused("bob", now), Some(w));
            assert_eq!(p.auth_refused("bob", now + w), None);
            waits.push(w.as_secs());
            now += w;
        }
        assert_eq!(waits, [3, 6, 12, 24, 48, 96, 192, 384, 600, 600]);
        // Ten quiet minutes after the last refusal: from 3 s again.
        assert_eq!(p.auth_failed("bob", now + AUTH_BACKOFF_MAX).as_secs(), 3);
        p.auth_succeeded("bob");
        assert_eq!(p.auth_refused("bob", now), None);
        // A flood of names is bounded: the table never holds more than its cap.
        for i in 0..AUTH_BACKOFF_USERS + 10 {
            p.auth_failed(&format!("u{i}"), now);
        }
        assert!(p.auth_backoff.lock().len() <= AUTH_BACKOFF_USERS);
        // The full table was scanned once for that flood, not once per name; a second later,
        // with every entry expired, one scan empties it.
        let first_scan = p.auth_backoff_pruned.lock().expect("pruned when full");
        assert_eq!(first_scan, now);
        let later = now + AUTH_BACKOFF_MAX + Duration::from_secs(700);
        p.auth_failed("late", later);
        assert_eq!(*p.auth_backoff_pruned.lock(), Some(later));
        assert_eq!(p.auth_backoff.lock().len(), 1);
    }

    #[test]
    fn a_mass_disconnect_then_expiry_costs_what_expires() {
        let p = tables();
        let t0 = Instant::now();
        for i in 0..100_000u32 {
            let t = t0 + Duration::from_millis(u64::from(i));
            p.park_session(i, SourceId::TEMPLATE, (u64::from(i), 8), (IP, false), t);
        }
        {
            let r = p.resume.lock();
            assert_eq!(r.map.len(), 100_000);
            // Parking 100,000 looked at no entry: nothing had expired and the cap was not met.
            assert_eq!(r.visited, 0);
        }
        assert_eq!(
            p.resume_session(7, SourceId(1), IP, t0),
            None,
            "another source's"
        );
        assert_eq!(p.resume_session(9, SourceId::TEMPLATE, IP, t0), Some(9));
        // Just under 10 s past the window of the first: the first 10,000 (less the one resumed)
        // expire, and expiry looked at those 10,000 entries, not at the 100,000.
        let late = t0 + p.resume_window + Duration::from_millis(9_999);
        assert_eq!(p.prune_parked(late), 90_000);
        assert_eq!(p.resume.lock().visited, 10_000);
        assert_eq!(p.prune_parked(late), 90_000);
        assert_eq!(p.resume.lock().visited, 10_000, "nothing more to look at");
        // Past every window, all go.
        assert_eq!(p.prune_parked(late + p.resume_window), 0);
        assert_eq!(p.resume_session(50_000, SourceId::TEMPLATE, IP, late), None);
    }

    #[test]
    fn the_parked_table_holds_its_cap_forgetting_the_oldest() {
        let p = SessionTables::new(1, Duration::from_secs(600), 1000);
        let t0 = Instant::now();
        for i in 0..5000u32 {
            let t = t0 + Duration::from_millis(u64::from(i));
            let en1 = p.alloc_enonce1(SourceId::TEMPLATE, 2).unwrap();
            p.park_session(i, SourceId::TEMPLATE, (en1, 2), (IP, false), t);
            assert!(p.resume.lock().map.len() <= 1000);
        }
        let r = p.resume.lock();
        assert_eq!(r.map.len(), 1000);
        assert_eq!(r.evicted, 4000);
        // Each park evicted one, looking at one entry.
        assert_eq!(r.visited, 4000);
        assert!(r.map.contains_key(&4999) && !r.map.contains_key(&3999));
        drop(r);
        // The forgotten sessions' extranonce1s were given back.
        assert_eq!(p.enonce1s_in_use(SourceId::TEMPLATE), 1000);
    }

    #[test]
    fn resume_is_bound_to_the_parking_address() {
        let p = tables();
        let t0 = Instant::now();
        p.park_session(42, SourceId::TEMPLATE, (4242, 4), (IP, false), t0);
        // From elsewhere: nothing, and the session stays parked for its owner.
        for _ in 0..3 {
            assert_eq!(p.resume_session(42, SourceId::TEMPLATE, OTHER, t0), None);
        }
        assert_eq!(p.resume_session(42, SourceId::TEMPLATE, IP, t0), Some(4242));
        assert_eq!(
            p.resume_session(42, SourceId::TEMPLATE, IP, t0),
            None,
            "taken"
        );
    }

    #[test]
    fn shareless_sessions_expire_after_the_short_window_and_are_evicted_first() {
        let p = tables();
        let t0 = Instant::now();
        let short = p.alloc_enonce1(SourceId::TEMPLATE, 2).unwrap();
        let long = p.alloc_enonce1(SourceId::TEMPLATE, 2).unwrap();
        p.park_session(1, SourceId::TEMPLATE, (short, 2), (IP, true), t0);
        p.park_session(2, SourceId::TEMPLATE, (long, 2), (IP, false), t0);
        let late = t0 + SHORT_RESUME_WINDOW;
        assert_eq!(p.prune_parked(late), 1);
        assert_eq!(p.resume_session(1, SourceId::TEMPLATE, IP, late), None);
        // Its extranonce1 is free again; the other's is still held.
        assert!(p.claim_enonce1(SourceId::TEMPLATE, 2, short));
        assert!(!p.claim_enonce1(SourceId::TEMPLATE, 2, long));
        assert_eq!(
            p.resume_session(2, SourceId::TEMPLATE, IP, late),
            Some(long)
        );

        // A full table forgets a short session before an older long one.
        let p = SessionTables::new(1, Duration::from_secs(600), 2);
        p.park_session(3, SourceId::TEMPLATE, (3, 8), (IP, false), t0);
        p.park_session(4, SourceId::TEMPLATE, (4, 8), (IP, true), t0);
        p.park_session(5, SourceId::TEMPLATE, (5, 8), (IP, false), t0);
        assert_eq!(p.resume_session(4, SourceId::TEMPLATE, IP, t0), None);
        assert_eq!(p.resume_session(3, SourceId::TEMPLATE, IP, t0), Some(3));

        // The short window survives a handover.
        let old = tables();
        old.park_session(6, SourceId::TEMPLATE, (6, 8), (IP, true), t0);
        old.park_session(7, SourceId::TEMPLATE, (7, 8), (IP, false), t0);
        let mut w = Writer::default();
        w.u8(9);
        old.save(&mut w, t0);
        let new = tables();
        let mut r = Reader::new(&w.buf, 9).unwrap();
        new.restore(SessionTables::load(&mut r, t0).unwrap(), 1);
        let late = t0 + SHORT_RESUME_WINDOW + Duration::from_secs(1);
        assert_eq!(new.resume_session(6, SourceId::TEMPLATE, IP, late), None);
        assert_eq!(new.resume_session(7, SourceId::TEMPLATE, IP, late), Some(7));
    }

    #[test]
    fn handed_over_tables_continue_the_ids_parked_sessions_and_back_offs() {
        let old = tables();
        let t0 = Instant::now();
        for _ in 0..10 {
            old.alloc_session();
        }
        let en1 = old.alloc_enonce1(SourceId::TEMPLATE, 2).unwrap();
        old.park_session(77, SourceId::TEMPLATE, (en1, 2), (IP, false), t0);
        old.auth_failed("bob", t0);
        let mut w = Writer::default();
        w.u8(9);
        old.save(&mut w, t0 + Duration::from_secs(5));
        let new = SessionTables::new(2, Duration::from_secs(600), 1_000_000);
        let t1 = Instant::now() + Duration::from_secs(5);
        let mut r = Reader::new(&w.buf, 9).unwrap();
        let saved = SessionTables::load(&mut r, t1).unwrap();
        r.finish().unwrap();
        new.restore(saved, 1);
        // The same ids, in the same order, as the old tables would have given.
        let theirs: Vec<u32> = (0..100).map(|_| old.alloc_session()).collect();
        let ours: Vec<u32> = (0..100).map(|_| new.alloc_session()).collect();
        assert_eq!(ours, theirs);
        assert_eq!(
            new.alloc_enonce1(SourceId::TEMPLATE, 2),
            old.alloc_enonce1(SourceId::TEMPLATE, 2)
        );
        // The parked session's extranonce1 is still in use, and it resumes from its address.
        assert!(!new.claim_enonce1(SourceId::TEMPLATE, 2, en1));
        assert_eq!(new.resume_session(77, SourceId::TEMPLATE, OTHER, t1), None);
        assert_eq!(
            new.resume_session(77, SourceId::TEMPLATE, IP, t1),
            Some(en1)
        );
        // bob's refusal ended 2 s before the handover: a failure 599 s after it is 601 s past
        // that end, so the back-off starts again at 3 s, in the old process as in the new.
        let later = Duration::from_secs(599);
        assert_eq!(
            old.auth_failed("bob", t0 + Duration::from_secs(5) + later),
            AUTH_BACKOFF_START
        );
        assert_eq!(new.auth_failed("bob", t1 + later), AUTH_BACKOFF_START);
        // The new refusal is in force.
        assert_eq!(
            new.auth_refused("bob", t1 + later),
            Some(AUTH_BACKOFF_START)
        );
    }

    #[test]
    fn session_ids_are_distinct_and_not_sequential() {
        let p = tables();
        let ids: Vec<u32> = (0..100_000).map(|_| p.alloc_session()).collect();
        let distinct: HashSet<u32> = ids.iter().copied().collect();
        assert_eq!(distinct.len(), ids.len());
        // Neighbours are far apart: fewer than 1% within 1,000 of the previous id.
        let close = ids
            .windows(2)
            .filter(|w| w[0].abs_diff(w[1]) < 1000)
            .count();
        assert!(close < 1000, "{close} consecutive ids within 1,000");
        // Another pool (another process) with the same seed has other ids.
        let q = tables();
        let theirs: Vec<u32> = (0..16).map(|_| q.alloc_session()).collect();
        assert_ne!(theirs[..], ids[..16]);
    }

    #[test]
    fn a_wrapped_two_byte_counter_never_hands_out_an_extranonce1_in_use() {
        let p = tables();
        let src = SourceId::TEMPLATE;
        // 40,000 sessions stay (live or parked); 200,000 more come and go, wrapping the
        // 65,536 values three times.
        let mut held = HashSet::new();
        for _ in 0..40_000 {
            let en1 = p.alloc_enonce1(src, 2).unwrap();
            assert!(held.insert(en1 & 0xffff));
        }
        for _ in 0..200_000 {
            let en1 = p.alloc_enonce1(src, 2).unwrap();
            assert!(!held.contains(&(en1 & 0xffff)), "{en1:x} is in use");
            p.release_enonce1(src, 2, en1);
        }
        // Full: every value in use, none handed out.
        for _ in 40_000..65_536 {
            assert!(p.alloc_enonce1(src, 2).is_some());
        }
        assert_eq!(p.alloc_enonce1(src, 2), None);
        // Another source has its own values; wide local parts are not tracked.
        assert!(p.alloc_enonce1(SourceId(1), 2).is_some());
        assert!(p.alloc_enonce1(src, 8).is_some());
    }
}
