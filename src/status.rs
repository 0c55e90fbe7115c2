//! The stats files operators watch, as ckpool writes them: `<logdir>/pool/pool.status` (three
//! JSON lines, also logged as `Pool:` lines) and `<logdir>/users/<username>` (indented JSON).
//!
//! A thread of its own samples the pool's moving averages every 2 s (`Pool::sample_rates`, off
//! the share path) and writes the files every `statsupdate`, and once more when it is stopped at
//! shutdown. Each file is written to `<file>.tmp` and renamed over the old one, so a reader never
//! sees half a file. An I/O error is logged (at most once a minute) and the pool carries on.
//!
//! At start-up, before the stratifier serves anyone, [`restore`] reads the files back (ours or
//! ckpool's: the same format) and seeds the stats registry with them, each moving average
//! decayed by the time since `lastupdate`, so a restart does not reset what miners and operators
//! see. Reading is tolerant and bounded: a missing, oversized, truncated or garbage file is
//! logged and skipped, never fatal; user files are capped in number, size and total bytes, and
//! users idle for longer than `statsidle` (which the pool would forget at once) are not read.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use serde::Serialize;
use serde_json::Value;
use stratifier::{
    Pool, SeedClock, SeedPool, SeedWorker, StatsRegistry, StatsSnapshot, UserStats, UserView,
    WorkerStats,
};
use tracing::{info, warn};

use crate::journal::Journal;

/// How long a stats write waits for every shard thread to move to a new journal generation
/// (each does within a round; a round ends at least every tick).
const JOURNAL_ROTATE_WAIT: Duration = Duration::from_secs(3);

/// How often the moving averages are sampled.
pub(crate) const SAMPLE_INTERVAL: Duration = Duration::from_secs(2);

/// A worker with no accepted share for this long is idle (ckpool's 10 minutes).
const IDLE_SECS: u64 = 600;

/// Workers idle this long are left out of user files (ckpool's limit).
const STALE_WORKER_SECS: u64 = 600_000;

/// At most one I/O error is logged per this period.
const ERROR_LOG_PERIOD: Duration = Duration::from_secs(60);

/// At most this many refused user names are remembered (each is warned about once).
const MAX_REFUSED_NAMES: usize = 1024;

/// The running writer; [`StatusWriter::stop`] writes the files a last time and ends it.
pub(crate) struct StatusWriter {
    stop: Sender<()>,
    thread: thread::JoinHandle<()>,
}

impl StatusWriter {
    /// Writes the files a last time, stops the thread and waits for it.
    pub(crate) fn stop(self) {
        drop(self.stop);
        if self.thread.join().is_err() {
            warn!("the stats writer thread panicked");
        }
    }
}

/// Starts the sampler and writer. `started` is the pool's start (for `runtime`); files are
/// written every `every`, the first time `every` after the start of this thread.
pub(crate) fn start(
    pool: Arc<Pool>,
    logdir: PathBuf,
    every: Duration,
    started: Instant,
    journal: Option<Arc<Journal>>,
) -> io::Result<StatusWriter> {
    let (stop, stopped) = crossbeam_channel::bounded::<()>(0);
    let thread = thread::Builder::new().name("stats".into()).spawn(move || {
        run(&pool, &logdir, every, started, journal.as_deref(), &stopped);
    })?;
    Ok(StatusWriter { stop, thread })
}

fn run(
    pool: &Pool,
    logdir: &Path,
    every: Duration,
    started: Instant,
    journal: Option<&Journal>,
    stopped: &Receiver<()>,
) {
    let mut writer = Writer {
        logdir: logdir.to_owned(),
        errors: ErrorLog::default(),
        refused: HashSet::new(),
    };
    let now = Instant::now();
    sample(pool, now);
    let mut next_sample = now + SAMPLE_INTERVAL;
    let mut next_write = now + every;
    loop {
        let deadline = next_sample.min(next_write);
        match stopped.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Err(RecvTimeoutError::Timeout) => {}
            Ok(()) | Err(RecvTimeoutError::Disconnected) => {
                // The files end with the pool's final figures.
                let now = Instant::now();
                sample(pool, now);
                writer.write_journaled(pool, now.saturating_duration_since(started), now, journal);
                break;
            }
        }
        let now = Instant::now();
        if now >= next_sample {
            sample(pool, now);
            next_sample = next_after(next_sample, SAMPLE_INTERVAL, now);
        }
        if now >= next_write {
            writer.write_journaled(pool, now.saturating_duration_since(started), now, journal);
            next_write = next_after(next_write, every, now);
        }
    }
}

/// The next tick of a period, skipping ticks already missed.
fn next_after(tick: Instant, period: Duration, now: Instant) -> Instant {
    let next = tick + period;
    if next > now { next } else { now + period }
}

fn sample(pool: &Pool, now: Instant) {
    pool.set_wall_clock(now, unix_now());
    if pool.sample_rates(now) {
        // A packing of duplicate sets freed the previous ones (tens to hundreds of KB,
        // several times a minute): given back now rather than at the next periodic trim.
        connector::release_free_heap();
    }
}

fn unix_now() -> Duration {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
}

struct Writer {
    logdir: PathBuf,
    errors: ErrorLog,
    /// User names already warned about as unusable file names.
    refused: HashSet<String>,
}

impl Writer {
    /// Writes the files; with a share journal, moves it to a new generation first and, once
    /// every file is written, deletes the segments the files now cover.
    fn write_journaled(
        &mut self,
        pool: &Pool,
        runtime: Duration,
        now: Instant,
        journal: Option<&Journal>,
    ) {
        let generation = journal.and_then(|j| j.rotate(Instant::now() + JOURNAL_ROTATE_WAIT));
        let complete = self.write_all(pool, runtime, now);
        if let (Some(j), Some(g), true) = (journal, generation, complete) {
            j.prune(g);
        }
        // What the writing freed (names, the file buffers, pool.status) is given back now
        // rather than at the connector's next periodic trim: well under a millisecond, once a
        // write.
        connector::release_free_heap();
    }

    /// Whether every file was written. The users are read one at a time
    /// ([`StatsRegistry::visit_users`]), so the writer never holds a copy of every worker.
    fn write_all(&mut self, pool: &Pool, runtime: Duration, now: Instant) -> bool {
        self.write_registry(pool.registry(), runtime, unix_now().as_secs(), now)
    }

    fn write_registry(
        &mut self,
        registry: &StatsRegistry,
        runtime: Duration,
        lastupdate: u64,
        now: Instant,
    ) -> bool {
        let snap = registry.snapshot_pool();
        self.write_files(
            &snap,
            |f| registry.visit_users(|name, user: &UserView<'_>| f(name, user)),
            runtime,
            lastupdate,
            now,
        )
    }

    /// [`Writer::write_all`] from a snapshot with its users.
    #[cfg(test)]
    fn write_snapshot(
        &mut self,
        snap: &StatsSnapshot,
        runtime: Duration,
        lastupdate: u64,
        now: Instant,
    ) -> bool {
        self.write_files(
            snap,
            |f| {
                for (name, user) in &snap.users {
                    f(name, user);
                }
            },
            runtime,
            lastupdate,
            now,
        )
    }

    /// Writes each user's file as `users` visits it (the users of `snap` are not read), then
    /// `pool.status` from `snap` and the worker counts of the visit.
    fn write_files(
        &mut self,
        snap: &StatsSnapshot,
        users: impl FnOnce(&mut dyn FnMut(&str, &dyn UserRecord)),
        runtime: Duration,
        lastupdate: u64,
        now: Instant,
    ) -> bool {
        let mut complete = true;
        let mut counts = WorkerCounts::default();
        let dir = self.logdir.join("users");
        users(&mut |name, user| {
            counts.add(user, lastupdate);
            let totals = user.totals();
            if totals.accepted == 0 && totals.accepted_diff <= 0.0 {
                return;
            }
            if !file_name_ok(name) {
                if self.refused.len() < MAX_REFUSED_NAMES && self.refused.insert(name.to_owned()) {
                    warn!(user = %name.escape_debug(), "user name cannot be a file name; no stats file for it");
                }
                return;
            }
            let file = user_file(user, lastupdate);
            // Streamed to the file, each worker's entry made as it is written: a user with
            // thousands of workers would otherwise take buffers of several hundred KiB once a
            // minute, which the allocator keeps until the next trim.
            let written = write_atomic_with(&dir, name, |f| {
                serde_json::to_writer_pretty(&mut *f, &file).map_err(io::Error::other)?;
                f.write_all(b"\n")
            });
            if let Err(e) = written {
                self.errors.log(now, &dir.join(name), &e);
                complete = false;
            }
        });
        let lines = pool_status_lines(snap, &counts, runtime.as_secs(), lastupdate);
        for line in &lines {
            info!("Pool:{line}");
        }
        let dir = self.logdir.join("pool");
        let mut text = lines.join("\n");
        text.push('\n');
        if let Err(e) = write_atomic(&dir, "pool.status", text.as_bytes()) {
            self.errors.log(now, &dir.join("pool.status"), &e);
            complete = false;
        }
        complete
    }
}

/// One user as the stats files need it: its figures and its workers, walked as often as
/// needed (a [`UserStats`] of a snapshot, or a [`UserView`] of the registry, which reads each
/// worker as it is reached).
trait UserRecord {
    /// Its figures (their `workers` not read).
    fn totals(&self) -> &UserStats;
    /// Its workers by full name, in name order.
    fn workers(&self) -> Box<dyn Iterator<Item = (&str, WorkerStats)> + '_>;
}

impl UserRecord for UserStats {
    fn totals(&self) -> &UserStats {
        self
    }

    fn workers(&self) -> Box<dyn Iterator<Item = (&str, WorkerStats)> + '_> {
        Box::new(self.workers.iter().map(|(n, w)| (n.as_str(), w.clone())))
    }
}

impl UserRecord for UserView<'_> {
    fn totals(&self) -> &UserStats {
        &self.stats
    }

    fn workers(&self) -> Box<dyn Iterator<Item = (&str, WorkerStats)> + '_> {
        Box::new(UserView::workers(self))
    }
}

/// `pool.status`'s counts of users and workers.
#[derive(Debug, Default)]
struct WorkerCounts {
    /// Users with an active worker.
    users: u64,
    /// Workers with a share in the last [`IDLE_SECS`].
    workers: u64,
    /// The other workers.
    idle: u64,
}

impl WorkerCounts {
    fn add(&mut self, user: &dyn UserRecord, lastupdate: u64) {
        let mut user_active = false;
        for (_, w) in user.workers() {
            if active(w.lastshare, lastupdate) {
                self.workers += 1;
                user_active = true;
            } else {
                self.idle += 1;
            }
        }
        self.users += u64::from(user_active);
    }
}

/// Whether a worker whose last share was at `lastshare` counts as active at `lastupdate`.
fn active(lastshare: u64, lastupdate: u64) -> bool {
    lastshare > 0 && lastupdate.saturating_sub(lastshare) <= IDLE_SECS
}

/// Rate-limited logging of write errors.
#[derive(Default)]
struct ErrorLog {
    last: Option<Instant>,
    suppressed: u64,
}

impl ErrorLog {
    fn log(&mut self, now: Instant, path: &Path, e: &io::Error) {
        if self
            .last
            .is_some_and(|t| now.saturating_duration_since(t) < ERROR_LOG_PERIOD)
        {
            self.suppressed += 1;
            return;
        }
        warn!(path = %path.display(), error = %e, suppressed = self.suppressed, "cannot write stats file");
        self.last = Some(now);
        self.suppressed = 0;
    }
}

/// Whether `name` (from the network) can safely name a file in the users directory.
fn file_name_ok(name: &str) -> bool {
    !name.is_empty() && !name.starts_with('.') && !name.contains(['/', '\\', '\0'])
}

/// Writes `dir/name` through `dir/name.tmp` and a rename, creating `dir` if needed.
fn write_atomic(dir: &Path, name: &str, bytes: &[u8]) -> io::Result<()> {
    write_atomic_with(dir, name, |f| f.write_all(bytes))
}

/// [`write_atomic`] with the contents written by `write`, through an 8 KiB buffer.
fn write_atomic_with(
    dir: &Path,
    name: &str,
    write: impl FnOnce(&mut io::BufWriter<fs::File>) -> io::Result<()>,
) -> io::Result<()> {
    fs::create_dir_all(dir)?;
    let path = dir.join(name);
    let tmp = dir.join(format!("{name}.tmp"));
    let mut f = io::BufWriter::new(fs::File::create(&tmp)?);
    write(&mut f)?;
    f.into_inner().map_err(io::IntoInnerError::into_error)?;
    fs::rename(&tmp, &path)
}

/// Most user files read back at start-up.
const MAX_USER_FILES: usize = 100_000;

/// The largest stats file read back (a user file of this size lists some 30,000 workers).
const MAX_FILE_BYTES: u64 = 8 << 20;

/// Most bytes of user files read back in all.
const MAX_TOTAL_BYTES: u64 = 256 << 20;

/// The longest user or worker name (the stratifier's own limit).
const MAX_NAME_LEN: usize = 127;

/// Files skipped at start-up are warned about one by one up to this many, then only counted.
const MAX_SKIP_WARNINGS: usize = 20;

/// What [`restore`] read back.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Restored {
    /// Whether `pool.status` was read.
    pub(crate) pool: bool,
    /// Users seeded.
    pub(crate) users: usize,
    /// Workers seeded.
    pub(crate) workers: usize,
    /// Files skipped: unreadable, too big, garbage, or badly named.
    pub(crate) skipped: usize,
    /// User files not read because the user was idle past `statsidle` or a cap was reached.
    pub(crate) left: usize,
}

/// Reads `<logdir>/pool/pool.status` and `<logdir>/users/*` back into `pool`'s registry, each
/// figure decayed from when it was saved to now. Called at start-up, after the first job and
/// before the stats writer and the stratifier start. Never fails: what cannot be read is
/// logged and skipped.
pub(crate) fn restore(pool: &Pool, logdir: &Path) -> Restored {
    let network_diff = pool.stats().job.map_or(0.0, |j| j.2);
    let r = restore_at(
        pool.registry(),
        logdir,
        pool.config().stats_idle,
        network_diff,
        Instant::now(),
        unix_now(),
    );
    if r.pool || r.users > 0 || r.skipped > 0 {
        info!(
            pool = r.pool,
            users = r.users,
            workers = r.workers,
            skipped = r.skipped,
            not_read = r.left,
            "stats read back from {}",
            logdir.display()
        );
    }
    r
}

/// A user's workers to seed, with when their file was saved (unix seconds).
type UserSeed = (String, Vec<(String, SeedWorker)>, u64);

fn restore_at(
    registry: &StatsRegistry,
    logdir: &Path,
    stats_idle: Duration,
    network_diff: f64,
    now: Instant,
    since_epoch: Duration,
) -> Restored {
    let mut out = Restored::default();
    let mut skips = SkipLog::default();
    let status_path = logdir.join("pool").join("pool.status");
    // When the files were written: pool.status's `lastupdate`, else each file's own time.
    let mut saved = None;
    let mut pool_seed = None;
    match read_bounded(&status_path) {
        Ok(None) => {}
        Ok(Some((text, _))) => match parse_pool_status(&text, network_diff) {
            Ok((lastupdate, seed)) => {
                saved = Some(lastupdate);
                pool_seed = Some(seed);
            }
            Err(why) => skips.skip(&mut out, &status_path, &why),
        },
        Err(why) => skips.skip(&mut out, &status_path, &why),
    }
    let clock_at = |saved: u64| SeedClock {
        now,
        since_epoch,
        saved,
    };

    // Each user's workers to seed, with when their file was saved.
    let mut users: Vec<UserSeed> = Vec::new();
    let dir = logdir.join("users");
    let entries = match fs::read_dir(&dir) {
        Ok(e) => Some(e),
        Err(e) if e.kind() == io::ErrorKind::NotFound => None,
        Err(e) => {
            warn!(path = %dir.display(), error = %e, "cannot list the user stats files; none read back");
            None
        }
    };
    let oldest = since_epoch.as_secs().saturating_sub(stats_idle.as_secs());
    let (mut files, mut total) = (0usize, 0u64);
    for entry in entries.into_iter().flatten() {
        let Ok(entry) = entry else { continue };
        let path = entry.path();
        let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
            skips.skip(&mut out, &path, "not a user name");
            continue;
        };
        if !user_name_ok(&name) {
            // Left-over `<name>.tmp` files end here too: a user name has no dot.
            skips.skip(&mut out, &path, "not a user name");
            continue;
        }
        if files >= MAX_USER_FILES || total >= MAX_TOTAL_BYTES {
            out.left += 1;
            continue;
        }
        files += 1;
        let (bytes, mtime) = match read_bounded(&path) {
            Ok(Some(x)) => x,
            Ok(None) => continue,
            Err(why) => {
                skips.skip(&mut out, &path, &why);
                continue;
            }
        };
        total += u64::try_from(bytes.len()).unwrap_or(u64::MAX);
        let mut workers = match parse_user_file(&name, &bytes) {
            Ok(w) => w,
            Err(why) => {
                skips.skip(&mut out, &path, &why);
                continue;
            }
        };
        // The pool would forget it at once.
        workers.retain(|(_, w)| w.lastshare >= oldest);
        if workers.is_empty() {
            out.left += 1;
            continue;
        }
        users.push((
            name,
            workers,
            saved.or(mtime).unwrap_or(since_epoch.as_secs()),
        ));
    }
    if out.left > 0 && (files >= MAX_USER_FILES || total >= MAX_TOTAL_BYTES) {
        warn!(
            read = files,
            bytes = total,
            "too many user stats files: {} not read back",
            out.left
        );
    }
    if skips.quiet > 0 {
        warn!("{} more stats files skipped", skips.quiet);
    }

    // Shares accepted after the files were written: the share journal has them.
    let counts: HashMap<(String, String), u64> = users
        .iter()
        .flat_map(|(u, ws, _)| ws.iter().map(|(w, s)| ((u.clone(), w.clone()), s.accepted)))
        .collect();
    let mut added = crate::journal::added_since(logdir, |u, w| {
        counts
            .get(&(u.to_owned(), w.to_owned()))
            .copied()
            .unwrap_or(0)
    });
    let (mut pool_diff, mut pool_best) = (0.0f64, 0.0f64);
    let mut add = |seed: &mut SeedWorker, a: &crate::journal::Added| {
        seed.accepted_diff += a.diff;
        seed.bestshare = seed.bestshare.max(a.best);
        seed.bestever = seed.bestever.max(a.best);
        seed.lastshare = seed.lastshare.max(a.last);
        seed.accepted = seed.accepted.max(a.n);
        pool_diff += a.diff;
        pool_best = pool_best.max(a.best);
    };
    for (user, workers, _) in &mut users {
        for (worker, seed) in workers.iter_mut() {
            if let Some(a) = added.remove(&(user.clone(), worker.clone())) {
                add(seed, &a);
            }
        }
    }
    // Workers whose first shares came after the files: seeded from the journal alone.
    let mut fresh: std::collections::BTreeMap<String, Vec<(String, SeedWorker)>> =
        std::collections::BTreeMap::new();
    for ((user, worker), a) in added {
        if !user_name_ok(&user) || !worker_name_ok(&user, &worker) {
            continue;
        }
        let mut seed = SeedWorker::default();
        add(&mut seed, &a);
        fresh.entry(user).or_default().push((worker, seed));
    }
    for (user, workers) in fresh {
        match users.iter_mut().find(|(u, _, _)| *u == user) {
            Some((_, ws, _)) => ws.extend(workers),
            None => users.push((user, workers, since_epoch.as_secs())),
        }
    }
    if pool_diff > 0.0 || pool_best > 0.0 {
        let seed = pool_seed.get_or_insert_with(SeedPool::default);
        seed.accepted_diff += pool_diff;
        seed.round_diff += pool_diff;
        seed.bestshare = seed.bestshare.max(pool_best);
    }

    if let Some(seed) = &pool_seed {
        registry.seed_pool(seed, &clock_at(saved.unwrap_or(since_epoch.as_secs())));
        out.pool = saved.is_some();
    }
    for (name, workers, saved) in &users {
        let clock = clock_at(*saved);
        let mut seeded = 0;
        for (wname, w) in workers {
            if registry.seed_worker(name, wname, w, &clock) {
                seeded += 1;
            }
        }
        if seeded > 0 {
            out.users += 1;
            out.workers += seeded;
        } else {
            out.left += 1;
        }
    }
    out
}

/// Warns about skipped files, the first few one by one.
#[derive(Default)]
struct SkipLog {
    warned: usize,
    quiet: usize,
}

impl SkipLog {
    fn skip(&mut self, out: &mut Restored, path: &Path, why: &str) {
        out.skipped += 1;
        if self.warned < MAX_SKIP_WARNINGS {
            self.warned += 1;
            warn!(path = %path.display().to_string().escape_debug(), why = %why.escape_debug(), "stats file not read back");
        } else {
            self.quiet += 1;
        }
    }
}

/// A file's bytes and its modification time in unix seconds (if known).
type FileRead = (Vec<u8>, Option<u64>);

/// A file's bytes (at most [`MAX_FILE_BYTES`]) and its modification time; `None` if there is
/// no such file.
fn read_bounded(path: &Path) -> Result<Option<FileRead>, String> {
    let f = match fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e.to_string()),
    };
    let meta = f.metadata().map_err(|e| e.to_string())?;
    if !meta.is_file() {
        return Err("not a regular file".into());
    }
    if meta.len() > MAX_FILE_BYTES {
        return Err(format!("{} bytes, more than {MAX_FILE_BYTES}", meta.len()));
    }
    let mtime = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map(|d| d.as_secs());
    let mut bytes = Vec::new();
    io::Read::read_to_end(&mut io::Read::take(f, MAX_FILE_BYTES + 1), &mut bytes)
        .map_err(|e| e.to_string())?;
    if u64::try_from(bytes.len()).unwrap_or(u64::MAX) > MAX_FILE_BYTES {
        return Err("grew past the size limit while read".into());
    }
    Ok(Some((bytes, mtime)))
}

/// A user name as the stratifier makes them (the part of a worker name before the first `.`
/// or `_`) that [`file_name_ok`] would have written.
fn user_name_ok(name: &str) -> bool {
    file_name_ok(name) && name.len() <= MAX_NAME_LEN && !name.contains(['.', '_'])
}

/// A worker name that belongs to `user`: the user itself, or `user.x` / `user_x`.
fn worker_name_ok(user: &str, worker: &str) -> bool {
    worker.len() <= MAX_NAME_LEN
        && worker
            .strip_prefix(user)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with(['.', '_']))
}

/// A figure of a stats file: a JSON number, or a string with an SI suffix as ckpool writes
/// hashrates (`"1.23T"`, `"512k"`, `"0"`). Negative, non-finite or malformed: `None`.
fn figure(v: &Value) -> Option<f64> {
    let x = match v {
        Value::Number(n) => n.as_f64()?,
        Value::String(s) => parse_suffixed(s)?,
        _ => return None,
    };
    (x.is_finite() && x >= 0.0).then_some(x)
}

/// The inverse of [`suffix_string`] (either case of `k`; also ckpool's `Z` and `Y`).
fn parse_suffixed(s: &str) -> Option<f64> {
    let s = s.trim();
    let (num, scale) = match s.chars().last()? {
        'k' | 'K' => (&s[..s.len() - 1], 1e3),
        'M' => (&s[..s.len() - 1], 1e6),
        'G' => (&s[..s.len() - 1], 1e9),
        'T' => (&s[..s.len() - 1], 1e12),
        'P' => (&s[..s.len() - 1], 1e15),
        'E' => (&s[..s.len() - 1], 1e18),
        'Z' => (&s[..s.len() - 1], 1e21),
        'Y' => (&s[..s.len() - 1], 1e24),
        _ => (s, 1.0),
    };
    let x: f64 = num.trim().parse().ok()?;
    Some(x * scale)
}

/// `obj[key]` as a figure; 0 if absent or unreadable.
fn get(obj: &Value, key: &str) -> f64 {
    obj.get(key).and_then(figure).unwrap_or(0.0)
}

/// `obj[key]` as whole seconds; 0 if absent or unreadable.
fn get_secs(obj: &Value, key: &str) -> u64 {
    // `as` saturates; a time in a stats file is far below 2^53.
    get(obj, key).round() as u64
}

/// The three JSON lines of `pool.status`: its `lastupdate` and the figures to seed. The
/// round (`diff`, a percentage of the network difficulty) is rebuilt against `network_diff`.
fn parse_pool_status(bytes: &[u8], network_diff: f64) -> Result<(u64, SeedPool), String> {
    let text = std::str::from_utf8(bytes).map_err(|_| "not UTF-8".to_owned())?;
    let mut lines = text.lines().filter(|l| !l.trim().is_empty());
    let mut next = |what: &str| -> Result<Value, String> {
        let line = lines
            .next()
            .ok_or_else(|| format!("truncated: no {what} line"))?;
        let v: Value = serde_json::from_str(line).map_err(|e| format!("{what} line: {e}"))?;
        if v.is_object() {
            Ok(v)
        } else {
            Err(format!("{what} line is not an object"))
        }
    };
    let l1 = next("first")?;
    let l2 = next("hashrate")?;
    let l3 = next("shares")?;
    let lastupdate = l1
        .get("lastupdate")
        .and_then(figure)
        .ok_or_else(|| "no lastupdate".to_owned())?
        .round() as u64;
    let hashrates = [
        "hashrate1m",
        "hashrate5m",
        "hashrate15m",
        "hashrate1hr",
        "hashrate6hr",
        "hashrate1d",
        "hashrate7d",
    ]
    .map(|k| get(&l2, k));
    let sps = ["SPS1m", "SPS5m", "SPS15m", "SPS1h"].map(|k| get(&l3, k));
    let accepted_diff = get(&l3, "accepted");
    let round_diff = (get(&l3, "diff") / 100.0 * network_diff).min(accepted_diff);
    Ok((
        lastupdate,
        SeedPool {
            hashrates,
            sps,
            accepted_diff,
            // Ours counts rejected shares; ckpool's sums their difficulty (taken as it is).
            rejected: get(&l3, "rejected").round() as u64,
            bestshare: get(&l3, "bestshare"),
            round_diff,
        },
    ))
}

/// The workers of `<logdir>/users/<user>`, each with the figures to seed. A file with no
/// worker array (or none of its workers valid) but with shares seeds one worker named after
/// the user (the worker of a miner that authorised with the bare user name).
fn parse_user_file(user: &str, bytes: &[u8]) -> Result<Vec<(String, SeedWorker)>, String> {
    let v: Value = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
    if !v.is_object() {
        return Err("not a JSON object".into());
    }
    let seed = |o: &Value| SeedWorker {
        hashrates: [
            "hashrate1m",
            "hashrate5m",
            "hashrate1hr",
            "hashrate1d",
            "hashrate7d",
        ]
        .map(|k| get(o, k)),
        accepted_diff: get(o, "shares"),
        bestshare: get(o, "bestshare"),
        bestever: get(o, "bestever"),
        lastshare: get_secs(o, "lastshare"),
        accepted: o.get("accepted").and_then(Value::as_u64).unwrap_or(0),
    };
    let mut out = Vec::new();
    if let Some(list) = v.get("worker").and_then(Value::as_array) {
        for w in list {
            match w.get("workername").and_then(Value::as_str) {
                Some(name) if worker_name_ok(user, name) => out.push((name.to_owned(), seed(w))),
                _ => {
                    warn!(user = %user.escape_debug(), "a worker in a user stats file has no usable name; skipped")
                }
            }
        }
    }
    if out.is_empty() {
        let s = seed(&v);
        if s.accepted_diff > 0.0 {
            out.push((user.to_owned(), s));
        }
    }
    Ok(out)
}

/// First line of `pool.status`.
#[derive(Serialize)]
struct PoolLine1 {
    runtime: u64,
    lastupdate: u64,
    /// Users with at least one worker active (an accepted share in the last 10 minutes).
    #[serde(rename = "Users")]
    users: u64,
    /// Workers (by name) with an accepted share in the last 10 minutes. ckpool counts
    /// connected clients; ckpool-rs counts worker names by their last share.
    #[serde(rename = "Workers")]
    workers: u64,
    /// Workers that have submitted shares but had none accepted in the last 10 minutes.
    #[serde(rename = "Idle")]
    idle: u64,
    /// Disconnected sessions kept for resume.
    #[serde(rename = "Disconnected")]
    disconnected: u64,
}

/// Second line: hashrates as ckpool's suffixed strings.
#[derive(Serialize)]
struct PoolLine2 {
    hashrate1m: String,
    hashrate5m: String,
    hashrate15m: String,
    hashrate1hr: String,
    hashrate6hr: String,
    hashrate1d: String,
    hashrate7d: String,
}

/// Third line: the round and shares.
#[derive(Serialize)]
struct PoolLine3 {
    /// Difficulty accepted this round as a percentage of the network difficulty.
    diff: f64,
    /// Sum of accepted difficulty.
    accepted: Amount,
    /// ckpool gives the sum of rejected difficulty; ckpool-rs counts rejected shares, not their
    /// difficulty, so this is the number of rejected shares.
    rejected: u64,
    bestshare: Amount,
    #[serde(rename = "SPS1m")]
    sps1m: f64,
    #[serde(rename = "SPS5m")]
    sps5m: f64,
    #[serde(rename = "SPS15m")]
    sps15m: f64,
    #[serde(rename = "SPS1h")]
    sps1h: f64,
}

/// The three lines of `pool.status`, without newlines.
fn pool_status_lines(
    s: &StatsSnapshot,
    counts: &WorkerCounts,
    runtime: u64,
    lastupdate: u64,
) -> Vec<String> {
    let network_diff = s.job.as_ref().map_or(0.0, |j| j.2);
    let diff = if network_diff > 0.0 {
        round_to(s.round_diff / network_diff * 100.0, 1)
    } else {
        0.0
    };
    let r = &s.rates;
    let line1 = PoolLine1 {
        runtime,
        lastupdate,
        users: counts.users,
        workers: counts.workers,
        idle: counts.idle,
        disconnected: s.disconnected,
    };
    let line2 = PoolLine2 {
        hashrate1m: suffix_string(r.hashrate1m),
        hashrate5m: suffix_string(r.hashrate5m),
        hashrate15m: suffix_string(r.hashrate15m),
        hashrate1hr: suffix_string(r.hashrate1hr),
        hashrate6hr: suffix_string(r.hashrate6hr),
        hashrate1d: suffix_string(r.hashrate1d),
        hashrate7d: suffix_string(r.hashrate7d),
    };
    let line3 = PoolLine3 {
        diff,
        accepted: Amount::of(s.accepted_diff),
        rejected: s.rejected,
        bestshare: Amount::of(s.bestshare),
        sps1m: round_to(r.sps1m, 3),
        sps5m: round_to(r.sps5m, 3),
        sps15m: round_to(r.sps15m, 3),
        sps1h: round_to(r.sps1h, 3),
    };
    [
        serde_json::to_string(&line1),
        serde_json::to_string(&line2),
        serde_json::to_string(&line3),
    ]
    .into_iter()
    .map(|l| l.unwrap_or_default())
    .collect()
}

/// `<logdir>/users/<name>`.
#[derive(Serialize)]
struct UserFile<'a> {
    hashrate1m: String,
    hashrate5m: String,
    hashrate1hr: String,
    hashrate1d: String,
    hashrate7d: String,
    lastshare: u64,
    /// Workers with an accepted share in the last 10 minutes.
    workers: u64,
    /// Sum of accepted difficulty.
    shares: Amount,
    /// Best share of the current round (reset when the pool finds a block, as ckpool does).
    bestshare: f64,
    /// Best share ever (kept across rounds and restarts).
    bestever: Amount,
    /// Time of the user's first authorisation in ckpool; not tracked here, so 0.
    authorised: u64,
    worker: WorkerEntries<'a>,
}

/// A user file's workers, each entry made as the encoder reaches it.
struct WorkerEntries<'a> {
    user: &'a dyn UserRecord,
    lastupdate: u64,
}

impl Serialize for WorkerEntries<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeSeq;
        let mut seq = serializer.serialize_seq(None)?;
        for (name, w) in self.user.workers() {
            if (w.accepted > 0 || w.accepted_diff > 0.0)
                && self.lastupdate.saturating_sub(w.lastshare) <= STALE_WORKER_SECS
            {
                seq.serialize_element(&WorkerEntry {
                    workername: name,
                    hashrate1m: suffix_string(w.hashrate.hashrate1m),
                    hashrate5m: suffix_string(w.hashrate.hashrate5m),
                    hashrate1hr: suffix_string(w.hashrate.hashrate1hr),
                    hashrate1d: suffix_string(w.hashrate.hashrate1d),
                    hashrate7d: suffix_string(w.hashrate.hashrate7d),
                    lastshare: w.lastshare,
                    shares: Amount::of(w.accepted_diff),
                    bestshare: w.bestshare,
                    bestever: Amount::of(w.bestever),
                    accepted: w.accepted,
                })?;
            }
        }
        seq.end()
    }
}

#[derive(Serialize)]
struct WorkerEntry<'a> {
    workername: &'a str,
    hashrate1m: String,
    hashrate5m: String,
    hashrate1hr: String,
    hashrate1d: String,
    hashrate7d: String,
    lastshare: u64,
    shares: Amount,
    bestshare: f64,
    bestever: Amount,
    /// Its count of accepted shares (not in ckpool's files): the share journal's lines above
    /// it are shares this file does not have yet (`crate::journal`).
    accepted: u64,
}

fn user_file(user: &dyn UserRecord, lastupdate: u64) -> UserFile<'_> {
    let active = user
        .workers()
        .filter(|(_, w)| active(w.lastshare, lastupdate))
        .count();
    let u = user.totals();
    UserFile {
        hashrate1m: suffix_string(u.hashrate.hashrate1m),
        hashrate5m: suffix_string(u.hashrate.hashrate5m),
        hashrate1hr: suffix_string(u.hashrate.hashrate1hr),
        hashrate1d: suffix_string(u.hashrate.hashrate1d),
        hashrate7d: suffix_string(u.hashrate.hashrate7d),
        lastshare: u.lastshare,
        workers: u64::try_from(active).unwrap_or(u64::MAX),
        shares: Amount::of(u.accepted_diff),
        bestshare: u.bestshare,
        bestever: Amount::of(u.bestever),
        authorised: 0,
        worker: WorkerEntries { user, lastupdate },
    }
}

/// A sum of difficulty as ckpool writes it: a whole number. Difficulties below 1 are allowed
/// here (ckpool's minimum is 1), so a sum below 1 is written as the exact fraction rather than
/// as a misleading 0.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(untagged)]
enum Amount {
    Whole(u64),
    Fraction(f64),
}

impl Amount {
    fn of(x: f64) -> Self {
        if x >= 1.0 {
            // `as` saturates, which is what a figure in a stats file wants.
            Self::Whole(x.round() as u64)
        } else if x > 0.0 {
            Self::Fraction(x)
        } else {
            Self::Whole(0)
        }
    }
}

fn round_to(x: f64, decimals: i32) -> f64 {
    let scale = 10f64.powi(decimals);
    (x * scale).round() / scale
}

/// A number as ckpool shows hashrates: three significant digits and an SI suffix (k, M, G, T,
/// P, E), e.g. `1.23T`; trailing zeros dropped (`1k`, `4.5P`); below 1000 no suffix; zero,
/// negative or not-a-number values as `0`.
pub(crate) fn suffix_string(value: f64) -> String {
    const SUFFIXES: [&str; 7] = ["", "k", "M", "G", "T", "P", "E"];
    if value.is_nan() || value <= 0.0 {
        return "0".into();
    }
    let mut idx = 0;
    let mut scaled = value;
    while scaled >= 1000.0 && idx + 1 < SUFFIXES.len() {
        scaled /= 1000.0;
        idx += 1;
    }
    // 999.5 and up rounds to 1000 at three significant digits: that is 1 of the next unit.
    if scaled >= 999.5 && idx + 1 < SUFFIXES.len() {
        scaled = 1.0;
        idx += 1;
    }
    let decimals = if scaled >= 100.0 {
        0
    } else if scaled >= 10.0 {
        1
    } else if scaled >= 1.0 {
        2
    } else {
        3
    };
    let mut s = format!("{scaled:.decimals$}");
    if s.contains('.') {
        let trimmed = s.trim_end_matches('0').trim_end_matches('.').len();
        s.truncate(trimmed);
    }
    if s == "0" {
        return s;
    }
    s.push_str(SUFFIXES.get(idx).copied().unwrap_or(""));
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suffix_strings_as_ckpool() {
        let cases: &[(f64, &str)] = &[
            (0.0, "0"),
            (-5.0, "0"),
            (f64::NAN, "0"),
            (0.0001, "0"),
            (0.5, "0.5"),
            (1.0, "1"),
            (12.34, "12.3"),
            (999.0, "999"),
            (999.7, "1k"),
            (1000.0, "1k"),
            (1234.0, "1.23k"),
            (12_345.0, "12.3k"),
            (123_456.0, "123k"),
            (2.5e6, "2.5M"),
            (9.999e8, "1G"),
            (1.23e12, "1.23T"),
            (4.5e15, "4.5P"),
            (1e18, "1E"),
            (1.5e21, "1500E"),
        ];
        for (v, want) in cases {
            assert_eq!(suffix_string(*v), *want, "{v}");
        }
    }

    #[test]
    fn amounts_are_whole_unless_below_one() {
        let json = |x: f64| serde_json::to_string(&Amount::of(x)).unwrap();
        assert_eq!(json(1500.4), "1500");
        assert_eq!(json(1.0), "1");
        assert_eq!(json(0.0), "0");
        assert_eq!(json(f64::NAN), "0");
        assert_eq!(json(0.25), "0.25");
    }

    #[test]
    fn unsafe_file_names_are_refused() {
        assert!(file_name_ok("bc1qexample"));
        assert!(file_name_ok("user-1"));
        for bad in ["", ".", "..", ".hidden", "a/b", "a\\b", "a\0b"] {
            assert!(!file_name_ok(bad), "{bad:?}");
        }
    }

    #[test]
    fn pool_status_has_ckpools_three_lines() {
        let mut s = snapshot();
        s.round_diff = 50.0;
        s.job = Some(("00".into(), 100, 200.0));
        let mut counts = WorkerCounts::default();
        for u in s.users.values() {
            counts.add(u, 1_700_000_100);
        }
        let lines = pool_status_lines(&s, &counts, 42, 1_700_000_100);
        assert_eq!(lines.len(), 3);
        let keys = |l: &str| -> Vec<String> {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            // serde_json's map sorts keys; check the raw order in the text instead.
            let obj = v.as_object().unwrap();
            let mut ks: Vec<(usize, String)> = obj
                .keys()
                .map(|k| (l.find(&format!("\"{k}\"")).unwrap(), k.clone()))
                .collect();
            ks.sort();
            ks.into_iter().map(|(_, k)| k).collect()
        };
        assert_eq!(
            keys(&lines[0]),
            [
                "runtime",
                "lastupdate",
                "Users",
                "Workers",
                "Idle",
                "Disconnected"
            ]
        );
        assert_eq!(
            keys(&lines[1]),
            [
                "hashrate1m",
                "hashrate5m",
                "hashrate15m",
                "hashrate1hr",
                "hashrate6hr",
                "hashrate1d",
                "hashrate7d"
            ]
        );
        assert_eq!(
            keys(&lines[2]),
            [
                "diff",
                "accepted",
                "rejected",
                "bestshare",
                "SPS1m",
                "SPS5m",
                "SPS15m",
                "SPS1h"
            ]
        );
        let l1: serde_json::Value = serde_json::from_str(&lines[0]).unwrap();
        assert_eq!(l1["runtime"], 42);
        assert_eq!(l1["Users"], 1);
        assert_eq!(l1["Workers"], 1);
        // rig2's last share is 1100 s old; rig3 never had one accepted.
        assert_eq!(l1["Idle"], 2);
        assert_eq!(l1["Disconnected"], 3);
        let l2: serde_json::Value = serde_json::from_str(&lines[1]).unwrap();
        assert_eq!(l2["hashrate1m"], "1.23T");
        let l3: serde_json::Value = serde_json::from_str(&lines[2]).unwrap();
        assert_eq!(l3["diff"], 25.0);
        assert_eq!(l3["accepted"], 1500);
        assert_eq!(l3["rejected"], 2);
        assert_eq!(l3["bestshare"], 900);
        assert_eq!(l3["SPS1m"], 0.5);
    }

    #[test]
    fn user_file_lists_workers_with_accepted_shares() {
        let s = snapshot();
        let f = user_file(&s.users["alice"], 1_700_000_100);
        let v = serde_json::to_value(&f).unwrap();
        assert_eq!(v["hashrate1m"], "1.23T");
        assert_eq!(v["lastshare"], 1_700_000_090);
        assert_eq!(v["workers"], 1);
        assert_eq!(v["shares"], 1500);
        assert_eq!(v["authorised"], 0);
        let workers = v["worker"].as_array().unwrap();
        // rig3 has only rejects and is left out.
        assert_eq!(workers.len(), 2);
        assert_eq!(workers[0]["workername"], "alice.rig1");
        assert_eq!(workers[0]["hashrate1m"], "1.23T");
        assert_eq!(workers[1]["workername"], "alice.rig2");
        assert_eq!(workers[1]["lastshare"], 1_699_999_000);
    }

    #[test]
    fn files_are_written_atomically_and_bad_names_skipped() {
        let dir = std::env::temp_dir().join(format!("ckpool-rs-status-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        write_atomic(&dir.join("users"), "alice", b"one").unwrap();
        write_atomic(&dir.join("users"), "alice", b"two").unwrap();
        assert_eq!(fs::read(dir.join("users/alice")).unwrap(), b"two");
        assert!(!dir.join("users/alice.tmp").exists());
        fs::remove_dir_all(&dir).unwrap();

        let mut snap = snapshot();
        let alice = snap.users["alice"].clone();
        for bad in [".hidden", "back\\slash", "nul\0"] {
            snap.users.insert(bad.into(), alice.clone());
        }
        // A user with no accepted share gets no file.
        snap.users.insert("idle".into(), UserStats::default());
        let mut w = Writer {
            logdir: dir.clone(),
            errors: ErrorLog::default(),
            refused: HashSet::new(),
        };
        let now = Instant::now();
        w.write_snapshot(&snap, Duration::from_secs(5), 1_700_000_100, now);
        w.write_snapshot(&snap, Duration::from_secs(6), 1_700_000_101, now);
        let status = fs::read_to_string(dir.join("pool/pool.status")).unwrap();
        assert_eq!(status.lines().count(), 3);
        assert!(
            status.starts_with(r#"{"runtime":6,"lastupdate":1700000101,"#),
            "{status}"
        );
        let mut users: Vec<String> = fs::read_dir(dir.join("users"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        users.sort();
        assert_eq!(users, ["alice"]);
        assert_eq!(w.refused.len(), 3);
        let file: serde_json::Value =
            serde_json::from_slice(&fs::read(dir.join("users/alice")).unwrap()).unwrap();
        assert_eq!(file["worker"][0]["workername"], "alice.rig1");
        // Streamed to the file, byte for byte what the encoder gives in one buffer.
        let mut whole =
            serde_json::to_vec_pretty(&user_file(&snap.users["alice"], 1_700_000_101)).unwrap();
        whole.push(b'\n');
        assert_eq!(fs::read(dir.join("users/alice")).unwrap(), whole);

        // A directory in the way of the status file is an error, logged, not a panic.
        fs::remove_file(dir.join("pool/pool.status")).unwrap();
        fs::create_dir_all(dir.join("pool/pool.status")).unwrap();
        assert!(write_atomic(&dir.join("pool"), "pool.status", b"x").is_err());
        w.write_snapshot(&snap, Duration::from_secs(7), 1_700_000_102, now);
        w.write_snapshot(&snap, Duration::from_secs(8), 1_700_000_103, now);
        assert_eq!(w.errors.suppressed, 1);
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn suffixed_figures_read_back() {
        for (text, want) in [
            ("0", 0.0),
            ("0.5", 0.5),
            ("999", 999.0),
            ("1.23k", 1230.0),
            ("1.23K", 1230.0),
            ("2.5M", 2.5e6),
            ("1G", 1e9),
            ("1.23T", 1.23e12),
            ("4.5P", 4.5e15),
            ("1500E", 1.5e21),
            (" 7Z ", 7e21),
        ] {
            let got = parse_suffixed(text).unwrap();
            assert!((got - want).abs() <= want * 1e-12, "{text}: {got}");
        }
        for bad in ["", "T", "abc", "1.2.3k", "1x"] {
            assert_eq!(parse_suffixed(bad), None, "{bad:?}");
        }
        // Negative and non-finite figures are refused; numbers are taken as they are.
        assert_eq!(figure(&serde_json::json!("-5k")), None);
        assert_eq!(figure(&serde_json::json!("inf")), None);
        assert_eq!(figure(&serde_json::json!(12.5)), Some(12.5));
        assert_eq!(figure(&serde_json::json!(null)), None);
        // What we write reads back within the three significant digits kept.
        for x in [0.75, 12.34, 999.0, 1234.0, 123_456.0, 9.87e15] {
            let back = parse_suffixed(&suffix_string(x)).unwrap();
            assert!((back - x).abs() <= x * 0.005, "{x} -> {back}");
        }
    }

    #[test]
    fn ckpools_pool_status_reads_back() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/testdata/ckpool-0.9.9-pool.status"
        );
        let bytes = fs::read(path).unwrap();
        let (lastupdate, seed) = parse_pool_status(&bytes, 1.0).unwrap();
        assert_eq!(lastupdate, 1_796_360_026);
        assert_eq!(seed, SeedPool::default());
        // And a ckpool file with figures: suffixed hashrates, sums of difficulty, the round.
        let text = concat!(
            r#"{"runtime": 60, "lastupdate": 1700000000, "Users": 1, "Workers": 1, "Idle": 0, "Disconnected": 0}"#,
            "\n",
            r#"{"hashrate1m": "1.23T", "hashrate5m": "2P", "hashrate15m": "3", "hashrate1hr": "4k", "hashrate6hr": "5M", "hashrate1d": "6G", "hashrate7d": "7E"}"#,
            "\n",
            r#"{"diff": 12.5, "accepted": 5000, "rejected": 40, "bestshare": 77, "SPS1m": 1.5, "SPS5m": 2.5, "SPS15m": 3.5, "SPS1h": 4.5}"#,
            "\n"
        );
        let (lastupdate, seed) = parse_pool_status(text.as_bytes(), 1000.0).unwrap();
        assert_eq!(lastupdate, 1_700_000_000);
        let want = [1.23e12, 2e15, 3.0, 4e3, 5e6, 6e9, 7e18];
        for (got, want) in seed.hashrates.iter().zip(want) {
            assert!((got - want).abs() <= want * 1e-12, "{got} vs {want}");
        }
        assert_eq!(seed.sps, [1.5, 2.5, 3.5, 4.5]);
        assert_eq!(
            (seed.accepted_diff, seed.rejected, seed.bestshare),
            (5000.0, 40, 77.0)
        );
        assert_eq!(seed.round_diff, 125.0);
        // Truncated or garbage: refused.
        let cut = &text.as_bytes()[..text.len() - 30];
        assert!(parse_pool_status(cut, 1.0).is_err());
        assert!(parse_pool_status(b"garbage", 1.0).is_err());
        assert!(parse_pool_status(b"", 1.0).is_err());
        assert!(parse_pool_status(b"[1]\n[2]\n[3]\n", 1.0).is_err());
    }

    #[test]
    fn user_files_read_back_with_their_workers() {
        let s = snapshot();
        let file = user_file(&s.users["alice"], 1_700_000_100);
        let bytes = serde_json::to_vec_pretty(&file).unwrap();
        let workers = parse_user_file("alice", &bytes).unwrap();
        let names: Vec<&str> = workers.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["alice.rig1", "alice.rig2"]);
        let rig1 = &workers[0].1;
        assert!((rig1.hashrates[0] - 1.23e12).abs() < 1.0);
        assert_eq!(rig1.accepted_diff, 1000.0);
        assert_eq!(rig1.bestshare, 650.0);
        assert_eq!(rig1.bestever, 700.0);
        assert_eq!(rig1.lastshare, 1_700_000_090);
        // A worker not of this user, or with no name, is skipped; a file with no usable
        // worker but with shares is the user's own worker.
        let other = br#"{"shares": 50, "bestever": 9, "lastshare": 5, "hashrate1m": "1k",
            "worker": [{"workername": "bob.rig", "shares": 1}, {"shares": 2}]}"#;
        let w = parse_user_file("alice", other).unwrap();
        assert_eq!(w.len(), 1);
        assert_eq!(w[0].0, "alice");
        assert_eq!(
            (w[0].1.accepted_diff, w[0].1.bestever, w[0].1.hashrates[0]),
            (50.0, 9.0, 1000.0)
        );
        assert!(parse_user_file("alice", b"{\"shares\": 1").is_err());
        assert!(parse_user_file("alice", b"[]").is_err());
        assert!(worker_name_ok("alice", "alice_2"));
        assert!(!worker_name_ok("alice", "alicex"));
        assert!(!user_name_ok("alice.rig1"));
        assert!(!user_name_ok("alice.tmp"));
        assert!(user_name_ok("bc1qexample"));
    }

    #[test]
    fn journaled_shares_beyond_the_files_are_added_once() {
        let dir = std::env::temp_dir().join(format!("ckpool-rs-restore-j-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let saved = 1_700_000_100u64;
        fs::create_dir_all(dir.join("users")).unwrap();
        // fred.rig: 3 shares of difficulty 2 in its file.
        fs::write(
            dir.join("users/fred"),
            format!(
                r#"{{"shares": 6, "worker": [{{"workername": "fred.rig", "shares": 6, "lastshare": {}, "bestshare": 5.0, "bestever": 5.0, "accepted": 3}}]}}"#,
                saved - 5
            ),
        )
        .unwrap();
        let journal = crate::journal::Journal::open(&dir).unwrap();
        let mut w = journal.writer(0);
        // Shares 1-5 of fred.rig (1-3 are in the file), 1-2 of fred.new (not in any file).
        let mut lines = Vec::new();
        for n in 1..=5u64 {
            lines.extend(format!("[{n},2.0,{}.0,\"fred\",\".rig\"]\n", n * 3).into_bytes());
        }
        for n in 1..=2u64 {
            lines.extend(format!("[{n},0.5,1.0,\"fred\",\".new\"]\n").into_bytes());
        }
        w.flush(&mut lines);
        let restore = || {
            let registry = StatsRegistry::default();
            let now = Instant::now();
            let since_epoch = Duration::from_secs(saved + 60);
            restore_at(
                &registry,
                &dir,
                Duration::from_secs(86_400),
                0.0,
                now,
                since_epoch,
            );
            registry.set_wall_clock(now, since_epoch);
            registry.snapshot()
        };
        let back = restore();
        let fred = &back.users["fred"];
        assert_eq!(fred.workers["fred.rig"].accepted_diff, 10.0);
        assert_eq!(fred.workers["fred.rig"].accepted, 5);
        assert_eq!(fred.workers["fred.rig"].bestever, 15.0);
        assert_eq!(fred.workers["fred.new"].accepted_diff, 1.0);
        assert_eq!(fred.workers["fred.new"].accepted, 2);
        assert_eq!(fred.accepted_diff, 11.0);
        assert_eq!(
            back.accepted_diff, 5.0,
            "the pool gets the journaled shares"
        );
        // Read again (a second crash before any write): the same.
        let again = restore();
        assert_eq!(again.users["fred"].accepted_diff, 11.0);
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn files_written_read_back_into_a_registry_decayed_and_garbage_skipped() {
        let dir = std::env::temp_dir().join(format!("ckpool-rs-restore-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let mut w = Writer {
            logdir: dir.clone(),
            errors: ErrorLog::default(),
            refused: HashSet::new(),
        };
        let snap = snapshot();
        let saved = 1_700_000_100;
        w.write_snapshot(&snap, Duration::from_secs(5), saved, Instant::now());
        let users = dir.join("users");
        fs::write(users.join("garbage"), b"\x00\xffnot json").unwrap();
        fs::write(users.join("truncated"), b"{\"hashrate1m\": \"1k\", \"shar").unwrap();
        fs::write(users.join("alice.tmp"), b"{}").unwrap();
        fs::write(
            users.join("big"),
            vec![b' '; usize::try_from(MAX_FILE_BYTES).unwrap() + 1],
        )
        .unwrap();
        fs::create_dir_all(users.join("adir")).unwrap();

        let registry = StatsRegistry::default();
        let now = Instant::now();
        // Five minutes after the save.
        let since_epoch = Duration::from_secs(saved + 300);
        let r = restore_at(
            &registry,
            &dir,
            Duration::from_secs(86_400),
            0.0,
            now,
            since_epoch,
        );
        assert!(r.pool);
        assert_eq!((r.users, r.workers), (1, 2));
        assert_eq!(r.skipped, 5, "{r:?}");
        registry.set_wall_clock(now, since_epoch);
        let back = registry.snapshot();
        let decay = (-300.0f64 / 60.0).exp();
        // Saved as "1.23T": three significant digits.
        let want = 1.23e12 * decay;
        assert!(
            (back.rates.hashrate1m - want).abs() <= want * 1e-9,
            "{:?}",
            back.rates
        );
        assert_eq!(back.accepted_diff, 1500.0);
        assert_eq!(back.rejected, 2);
        assert_eq!(back.bestshare, 900.0);
        let alice = &back.users["alice"];
        assert_eq!(alice.accepted_diff, 1500.0);
        assert_eq!(alice.lastshare, saved - 10);
        assert_eq!(alice.bestever, 700.0);
        let rig1 = &alice.workers["alice.rig1"];
        assert!((rig1.hashrate.hashrate1m - want).abs() <= want * 1e-9);
        assert_eq!(alice.workers["alice.rig2"].lastshare, saved - 1100);
        // The pool's best ever is at least its users'.
        assert_eq!(back.bestever, 900.0);

        // Written again, the files say the same (hashrates decayed).
        let mut w2 = Writer {
            logdir: dir.join("again"),
            errors: ErrorLog::default(),
            refused: HashSet::new(),
        };
        w2.write_snapshot(&back, Duration::from_secs(1), saved + 300, now);
        let old: Value = serde_json::from_slice(&fs::read(users.join("alice")).unwrap()).unwrap();
        let new: Value =
            serde_json::from_slice(&fs::read(dir.join("again/users/alice")).unwrap()).unwrap();
        for k in ["shares", "bestshare", "bestever", "lastshare"] {
            assert_eq!(old[k], new[k], "{k}");
        }
        assert_eq!(new["hashrate1m"], suffix_string(want));
        // Written from the registry user by user (as the stats thread does), the same bytes.
        let mut w3 = Writer {
            logdir: dir.join("visited"),
            errors: ErrorLog::default(),
            refused: HashSet::new(),
        };
        assert!(w3.write_registry(&registry, Duration::from_secs(1), saved + 300, now));
        for f in ["users/alice", "pool/pool.status"] {
            assert_eq!(
                fs::read(dir.join("visited").join(f)).unwrap(),
                fs::read(dir.join("again").join(f)).unwrap(),
                "{f}"
            );
        }

        // Users idle past statsidle are not read at all.
        let registry = StatsRegistry::default();
        let r = restore_at(
            &registry,
            &dir,
            Duration::from_secs(60),
            0.0,
            now,
            since_epoch,
        );
        assert_eq!((r.users, r.left), (0, 1), "{r:?}");
        assert_eq!(registry.users(), 0);
        // No files at all: nothing, quietly.
        let r = restore_at(
            &StatsRegistry::default(),
            &dir.join("nowhere"),
            Duration::from_secs(60),
            0.0,
            now,
            since_epoch,
        );
        assert_eq!(r, Restored::default());
        let _ = fs::remove_dir_all(&dir);
    }

    fn snapshot() -> StatsSnapshot {
        let now = 1_700_000_100u64;
        let worker = |accepted: u64, diff: f64, lastshare: u64, hr: f64| stratifier::WorkerStats {
            accepted,
            rejected: 1,
            accepted_diff: diff,
            bestshare: diff / 2.0 + 150.0,
            bestever: diff / 2.0 + 200.0,
            lastshare,
            hashrate: stratifier::Hashrates {
                hashrate1m: hr,
                ..Default::default()
            },
        };
        let mut user = UserStats {
            accepted: 3,
            rejected: 2,
            accepted_diff: 1500.0,
            // The best of its workers'.
            bestshare: 650.0,
            bestever: 700.0,
            lastshare: now - 10,
            hashrate: stratifier::Hashrates {
                hashrate1m: 1.23e12,
                ..Default::default()
            },
            ..Default::default()
        };
        user.workers
            .insert("alice.rig1".into(), worker(2, 1000.0, now - 10, 1.23e12));
        user.workers
            .insert("alice.rig2".into(), worker(1, 500.0, now - 1100, 0.0));
        user.workers
            .insert("alice.rig3".into(), worker(0, 0.0, 0, 0.0));
        let mut users = std::collections::BTreeMap::new();
        users.insert("alice".to_string(), user);
        StatsSnapshot {
            accepted: 3,
            rejected: 2,
            accepted_diff: 1500.0,
            bestshare: 900.0,
            bestever: 900.0,
            reject_reasons: Default::default(),
            blocks: Vec::new(),
            clients: 2,
            job: None,
            round_diff: 0.0,
            disconnected: 3,
            rates: stratifier::PoolRates {
                hashrate1m: 1.23e12,
                sps1m: 0.5,
                ..Default::default()
            },
            users,
        }
    }
}
