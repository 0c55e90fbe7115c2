//! The session tables shared by every shard: extranonce1 and session id allocation, sessions
//! parked for resume, and the authorisation back-off.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

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

/// Disconnected sessions kept for resume: session id → (work source, local extranonce1 number,
/// when parked).
///
/// The rate sampler forgets expired ones every few seconds. Parking also prunes, for when no
/// sampler runs, but only once the table has doubled since the last pass: a pass at every park
/// above a fixed size made a mass disconnect quadratic (100,000 miners dropping at once scanned
/// the table 100,000 times, under a lock every connector thread takes on a disconnect).
#[derive(Debug)]
pub(crate) struct Parked {
    pub(crate) map: HashMap<u32, (SourceId, u64, Instant)>,
    /// Parking prunes first when the table holds this many.
    pub(crate) prune_at: usize,
    /// Pruning passes so far.
    pub(crate) passes: u64,
}

/// Parked sessions below which parking never prunes.
pub(crate) const PARKED_PRUNE_MIN: usize = 4096;

impl Default for Parked {
    fn default() -> Self {
        Self {
            map: HashMap::new(),
            prune_at: PARKED_PRUNE_MIN,
            passes: 0,
        }
    }
}

impl Parked {
    /// Forgets the sessions parked `window` or longer before `now`; the next pass at parking
    /// waits until the table has doubled.
    fn prune(&mut self, now: Instant, window: Duration) {
        self.map
            .retain(|_, (_, _, t)| now.saturating_duration_since(*t) < window);
        self.prune_at = (2 * self.map.len()).max(PARKED_PRUNE_MIN);
        self.passes += 1;
    }
}

/// The pool's session tables.
#[derive(Debug)]
pub(crate) struct SessionTables {
    next_enonce1: AtomicU64,
    next_session: AtomicU64,
    pub(crate) resume: Mutex<Parked>,
    /// How long a parked session can be resumed.
    resume_window: Duration,
    /// Usernames whose authorisation failed, and until when they are refused (ckpool's back-off).
    pub(crate) auth_backoff: Mutex<HashMap<Box<str>, AuthBackoff>>,
    /// When a full back-off table was last pruned: at most once a second, so that a flood of
    /// distinct failing names costs a table scan per second, not one per name.
    pub(crate) auth_backoff_pruned: Mutex<Option<Instant>>,
}

impl SessionTables {
    /// Tables whose ids start from `seed` (so they do not repeat across restarts).
    pub(crate) fn new(seed: u64, resume_window: Duration) -> Self {
        Self {
            next_enonce1: AtomicU64::new(seed.wrapping_mul(0x9e37_79b9)),
            next_session: AtomicU64::new(seed.wrapping_mul(0x85eb_ca6b)),
            resume: Mutex::new(Parked::default()),
            resume_window,
            auth_backoff: Mutex::new(HashMap::new()),
            auth_backoff_pruned: Mutex::new(None),
        }
    }

    pub(crate) fn alloc_enonce1(&self) -> u64 {
        self.next_enonce1.fetch_add(1, Ordering::Relaxed)
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

    pub(crate) fn alloc_session(&self) -> u32 {
        self.next_session.fetch_add(1, Ordering::Relaxed) as u32
    }

    /// Remembers a session for resume.
    pub(crate) fn park_session(&self, session: u32, source: SourceId, enonce1: u64, now: Instant) {
        let mut r = self.resume.lock();
        if r.map.len() >= r.prune_at {
            r.prune(now, self.resume_window);
        }
        r.map.insert(session, (source, enonce1, now));
    }

    /// Takes a parked session's extranonce1 number if it is still within the resume window and
    /// was on `source` (another source's extranonce1 means nothing here).
    pub(crate) fn resume_session(
        &self,
        session: u32,
        source: SourceId,
        now: Instant,
    ) -> Option<u64> {
        let (src, en1, t) = self.resume.lock().map.remove(&session)?;
        (src == source && now.saturating_duration_since(t) < self.resume_window).then_some(en1)
    }

    /// Forgets the parked sessions past the resume window; returns how many are left.
    pub(crate) fn prune_parked(&self, now: Instant) -> usize {
        let mut r = self.resume.lock();
        r.prune(now, self.resume_window);
        r.map.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tables() -> SessionTables {
        SessionTables::new(1, Duration::from_secs(600))
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
    fn a_mass_disconnect_prunes_parked_sessions_a_logarithmic_number_of_times() {
        let p = tables();
        let t0 = Instant::now();
        for i in 0..100_000u32 {
            p.park_session(i, SourceId::TEMPLATE, u64::from(i), t0);
        }
        {
            let r = p.resume.lock();
            assert_eq!(r.map.len(), 100_000);
            // 4096, 8192, ..., 65536: one pass at each doubling, none in between.
            assert_eq!(r.passes, 5, "{} passes", r.passes);
        }
        assert_eq!(
            p.resume_session(7, SourceId(1), t0),
            None,
            "another source's"
        );
        assert_eq!(p.resume_session(9, SourceId::TEMPLATE, t0), Some(9));
        // Past the window, the next pass (the sampler's, or parking's) forgets them all.
        let late = t0 + p.resume_window;
        assert_eq!(p.resume_session(8, SourceId::TEMPLATE, late), None);
        p.prune_parked(late);
        let r = p.resume.lock();
        assert!(r.map.is_empty());
        assert_eq!(r.prune_at, PARKED_PRUNE_MIN);
    }
}
