//! The share journal: every accepted share on disk before its `true` reaches the miner, so that
//! a crash or SIGKILL loses no share from the users' totals.
//!
//! The stats files (`crate::status`) are rewritten every `statsupdate`; what was accepted
//! since the last write lived only in memory. Now each shard also keeps a line per accepted
//! share ([`stratifier::Shard::journal`]: the worker's count of accepted shares after it, the
//! difficulty credited, the share's difficulty, user and worker), and the thread that runs the
//! shard writes the round's lines to its segment file at the end of the round, before the
//! connector sends the round's replies ([`JournalWriter::flush`]: one `write` a round, to the
//! page cache: a process killed after it loses nothing; no `fsync`, so a power cut may). A line
//! `["t",<unix seconds>]` before each round's lines dates them.
//!
//! **Segments.** `<logdir>/pool/journal/<pid>-<generation>-<thread>.journal`. Each stats write
//! first starts a new generation ([`Journal::rotate`]) and waits until every shard thread has
//! moved to it (each looks at the generation once a round, and a round ends at least every
//! tick); every line of the older generations was then written before the snapshot was taken,
//! and the counters it read include those shares. Once the files are written, segments older
//! than the previous generation are deleted ([`Journal::prune`]; one generation more is kept
//! than needed), and so are those of processes no longer running (a process killed before us).
//!
//! **Replay** at start-up ([`replay`], called by `crate::status::restore`): each line whose
//! number is above the worker's count in its user file (the `accepted` key ckpool-rs writes
//! for each worker) is a share the files do not have: its difficulty is added to the worker's
//! (and the pool's) totals, its share to the best shares, and the worker's count set to the
//! highest number seen. Lines the files already have are skipped, so replaying the same
//! segments twice (a second crash before the next stats write) counts nothing twice.
//!
//! A write that fails is counted and warned about (at most once a minute per thread) and its
//! lines dropped: the shares are still in memory and reach the stats files at the next write;
//! only a crash during the failure loses them.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;
use serde_json::Value;
use tracing::{debug, info, warn};

/// How often a failing journal is warned about, per thread.
const WARN_EVERY: Duration = Duration::from_secs(60);
/// A journal line longer than this is not read back (a line is under 400 bytes: two names of at
/// most 127 characters each, escaped).
const MAX_LINE: usize = 4096;
/// The segment files' extension.
const EXT: &str = "journal";

/// What the shard threads and the stats writer share.
#[derive(Debug)]
pub(crate) struct Journal {
    dir: PathBuf,
    pid: u32,
    /// The current generation; shard threads move to it at the end of their next round.
    generation: AtomicU64,
    /// Per shard thread: the generation it writes.
    acks: Mutex<Vec<Arc<AtomicU64>>>,
    /// Lines written, write errors (each failed write counts once).
    lines: AtomicU64,
    errors: AtomicU64,
}

impl Journal {
    /// The journal under `<logdir>/pool/journal/` (created if missing).
    pub(crate) fn open(logdir: &Path) -> io::Result<Arc<Self>> {
        let dir = logdir.join("pool").join("journal");
        fs::create_dir_all(&dir)?;
        Ok(Arc::new(Self {
            dir,
            pid: std::process::id(),
            generation: AtomicU64::new(1),
            acks: Mutex::new(Vec::new()),
            lines: AtomicU64::new(0),
            errors: AtomicU64::new(0),
        }))
    }

    /// The writer of shard thread `thread`.
    pub(crate) fn writer(self: &Arc<Self>, thread: usize) -> JournalWriter {
        let generation = self.generation.load(Ordering::Acquire);
        let ack = Arc::new(AtomicU64::new(generation));
        self.acks.lock().push(Arc::clone(&ack));
        JournalWriter {
            journal: Arc::clone(self),
            thread,
            generation,
            ack,
            file: None,
            last_warn: None,
            dated: 0,
        }
    }

    /// Lines written so far, and failed writes.
    pub(crate) fn counts(&self) -> (u64, u64) {
        (
            self.lines.load(Ordering::Relaxed),
            self.errors.load(Ordering::Relaxed),
        )
    }

    /// Starts a new generation and waits (until `deadline`) for every shard thread to move to
    /// it. `Some(generation)` when all did: every line of an older generation is then on disk
    /// and counted in the registry, so a snapshot taken now has it.
    pub(crate) fn rotate(&self, deadline: Instant) -> Option<u64> {
        let next = self.generation.fetch_add(1, Ordering::AcqRel) + 1;
        loop {
            let behind = self
                .acks
                .lock()
                .iter()
                // A writer dropped (its thread gone) holds the last count; it writes no more.
                .filter(|a| Arc::strong_count(a) > 1)
                .any(|a| a.load(Ordering::Acquire) < next);
            if !behind {
                return Some(next);
            }
            if Instant::now() >= deadline {
                debug!(
                    generation = next,
                    "a shard thread did not move to the new journal generation in time; nothing pruned"
                );
                return None;
            }
            thread::sleep(Duration::from_millis(1));
        }
    }

    /// After the stats files of the snapshot taken at `generation` (from [`Journal::rotate`])
    /// are all written: deletes this process's segments older than the generation before it,
    /// and the segments of processes no longer running.
    pub(crate) fn prune(&self, generation: u64) {
        self.acks.lock().retain(|a| Arc::strong_count(a) > 1);
        let entries = match fs::read_dir(&self.dir) {
            Ok(e) => e,
            Err(e) => {
                warn!(dir = %self.dir.display(), error = %e, "cannot list the share journal");
                return;
            }
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let Some((pid, seg_gen, _)) = segment_name(&path) else {
                continue;
            };
            let old = if pid == self.pid {
                seg_gen + 1 < generation
            } else {
                !process_alive(pid)
            };
            if old && let Err(e) = fs::remove_file(&path) {
                warn!(path = %path.display(), error = %e, "cannot delete a share journal segment");
            }
        }
    }
}

/// `<pid>-<generation>-<thread>.journal`.
fn segment_name(path: &Path) -> Option<(u32, u64, usize)> {
    if path.extension()?.to_str()? != EXT {
        return None;
    }
    let stem = path.file_stem()?.to_str()?;
    let mut parts = stem.split('-');
    let pid = parts.next()?.parse().ok()?;
    let generation = parts.next()?.parse().ok()?;
    let thread = parts.next()?.parse().ok()?;
    parts.next().is_none().then_some((pid, generation, thread))
}

fn process_alive(pid: u32) -> bool {
    Path::new("/proc").join(pid.to_string()).exists()
}

/// One shard thread's writer.
#[derive(Debug)]
pub(crate) struct JournalWriter {
    journal: Arc<Journal>,
    thread: usize,
    generation: u64,
    ack: Arc<AtomicU64>,
    file: Option<Segment>,
    last_warn: Option<Instant>,
    /// The unix second of the last time line written to `file`.
    dated: u64,
}

/// Bytes of a segment mapped at a time. Small: the pages written count in the process's RSS
/// until the window is unmapped (at 64 KiB, a 100-KB sawtooth in the churn soak's RSS at 200
/// shares/s); moving the window is three system calls, about 100 a second in all at 20,000
/// shares/s.
const WINDOW: usize = 16 << 10;

/// An open segment file. Lines are copied into a window of the file mapped shared (no system
/// call a round: a `write` a round cost about 1.5 µs a share at 20,000 shares/s); the bytes
/// are in the page cache as soon as they are copied, so a killed process loses nothing that a
/// `write` would have kept. Each window's blocks are allocated (`fallocate`) before it is
/// mapped, so a full disk is an error here and never a `SIGBUS` at a page fault. Where the file
/// system cannot allocate or map, lines are written with `write` instead. A segment closed in
/// order is cut to its length; one left by a crash ends in zeros, which [`replay`] stops at.
struct Segment {
    file: File,
    map: Option<Window>,
    /// File offset of the mapped window, and bytes of it used.
    window_at: u64,
    used: usize,
}

/// A mapped window of a segment file.
struct Window(std::ptr::NonNull<u8>);

// SAFETY: the mapping is owned by one `Segment`, used by the thread that owns it only, and
// unmapped once (in `Drop`); moving it between threads moves that ownership.
unsafe impl Send for Window {}

impl std::fmt::Debug for Segment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Segment")
            .field("mapped", &self.map.is_some())
            .field("at", &(self.window_at + self.used as u64))
            .finish()
    }
}

impl Drop for Window {
    fn drop(&mut self) {
        // SAFETY: `self.0` is the start of a live mapping of `WINDOW` bytes made in
        // `Segment::map_next` and not unmapped elsewhere.
        unsafe {
            libc::munmap(self.0.as_ptr().cast(), WINDOW);
        }
    }
}

impl Segment {
    fn open(path: &Path) -> io::Result<Self> {
        let file = OpenOptions::new()
            .create(true)
            .read(true)
            .write(true)
            .truncate(false)
            .open(path)?;
        let end = file.metadata()?.len();
        let mut seg = Self {
            file,
            map: None,
            window_at: end,
            used: 0,
        };
        // A file that is not mappable is written with `write`, at its end.
        if seg.map_next(end).is_err() {
            seg.file.seek(io::SeekFrom::End(0))?;
        }
        Ok(seg)
    }

    /// Allocates and maps the window at `at`, in place of the one mapped (which stays if this
    /// fails, so that the segment's length is still known).
    fn map_next(&mut self, at: u64) -> io::Result<()> {
        use std::os::fd::AsRawFd;
        let off = libc::off_t::try_from(at).map_err(|_| io::Error::other("segment too large"))?;
        let len = libc::off_t::try_from(WINDOW).unwrap_or(0);
        // SAFETY: a plain system call on a file descriptor this segment owns.
        let r = unsafe { libc::posix_fallocate(self.file.as_raw_fd(), off, len) };
        if r != 0 {
            return Err(io::Error::from_raw_os_error(r));
        }
        // SAFETY: maps `WINDOW` bytes of the file at `off`, just allocated; the result is
        // checked before use, and the mapping is owned by the `Window` made of it.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                WINDOW,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                self.file.as_raw_fd(),
                off,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr = std::ptr::NonNull::new(ptr.cast::<u8>())
            .ok_or_else(|| io::Error::other("mmap gave a null pointer"))?;
        // The window before (if any) is unmapped here; its bytes stay in the file.
        self.map = Some(Window(ptr));
        self.window_at = at;
        self.used = 0;
        Ok(())
    }

    /// Appends `a` then `b`.
    fn append(&mut self, a: &[u8], b: &[u8]) -> io::Result<()> {
        if self.map.is_none() {
            return write_both(&mut self.file, a, b);
        }
        for mut data in [a, b] {
            while !data.is_empty() {
                if self.used == WINDOW {
                    let next = self.window_at + WINDOW as u64;
                    self.map_next(next)?;
                }
                let Some(w) = &self.map else {
                    return Err(io::Error::other("segment not mapped"));
                };
                let n = data.len().min(WINDOW - self.used);
                // SAFETY: the window is `WINDOW` bytes, `used + n <= WINDOW`, so the offset
                // and the `n` bytes from it are inside the mapping.
                let to = unsafe { w.0.as_ptr().add(self.used) };
                // SAFETY: `to..to + n` is inside the mapping (above), which nothing else refers
                // to; `data` has at least `n` bytes and is not in the mapping.
                unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), to, n) };
                self.used += n;
                data = data.get(n..).unwrap_or_default();
            }
        }
        Ok(())
    }
}

impl Drop for Segment {
    fn drop(&mut self) {
        if self.map.take().is_some() {
            // The zeros of the window's unused end go.
            let _ = self.file.set_len(self.window_at + self.used as u64);
        }
    }
}

/// Writes `a` then `b` with one `writev` in the usual case.
fn write_both(f: &mut File, a: &[u8], b: &[u8]) -> io::Result<()> {
    if a.is_empty() {
        return f.write_all(b);
    }
    let total = a.len() + b.len();
    let mut done = f.write_vectored(&[io::IoSlice::new(a), io::IoSlice::new(b)])?;
    if done == total {
        return Ok(());
    }
    if done < a.len() {
        f.write_all(a.get(done..).unwrap_or_default())?;
        done = a.len();
    }
    f.write_all(b.get(done - a.len()..).unwrap_or_default())
}

impl JournalWriter {
    /// Writes `lines` (complete journal lines, maybe none) and empties it; moves to a new
    /// generation first if one was started. Called by the thread that runs the shard at the end
    /// of each round, before the round's replies go out.
    pub(crate) fn flush(&mut self, lines: &mut Vec<u8>) {
        let generation = self.journal.generation.load(Ordering::Acquire);
        if generation != self.generation {
            self.generation = generation;
            self.file = None;
            self.ack.store(generation, Ordering::Release);
        }
        if lines.is_empty() {
            return;
        }
        let n = lines.iter().filter(|&&b| b == b'\n').count();
        let secs = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        // The time line only when the second changed (or a new file starts): one `write` a
        // round either way.
        let mut head = [0u8; 32];
        let head_len = if self.file.is_none() || self.dated != secs {
            let mut cur = io::Cursor::new(&mut head[..]);
            let _ = writeln!(cur, "[\"t\",{secs}]");
            usize::try_from(cur.position()).unwrap_or(0)
        } else {
            0
        };
        let head = head.get(..head_len).unwrap_or_default();
        let result = self.file().and_then(|f| f.append(head, lines));
        if result.is_ok() {
            self.dated = secs;
        }
        match result {
            Ok(()) => {
                self.journal
                    .lines
                    .fetch_add(u64::try_from(n).unwrap_or(u64::MAX), Ordering::Relaxed);
            }
            Err(e) => {
                self.journal.errors.fetch_add(1, Ordering::Relaxed);
                // Reopened at the next write (the disk may come back).
                self.file = None;
                let now = Instant::now();
                if self
                    .last_warn
                    .is_none_or(|t| now.saturating_duration_since(t) >= WARN_EVERY)
                {
                    self.last_warn = Some(now);
                    warn!(thread = self.thread, error = %e, lines = n, "cannot write the share journal; these shares reach the stats files at their next write, but a crash before it loses them");
                }
            }
        }
        lines.clear();
    }

    fn file(&mut self) -> io::Result<&mut Segment> {
        if self.file.is_none() {
            // A new file starts with its time line.
            self.dated = 0;
        }
        if self.file.is_none() {
            let name = format!(
                "{}-{}-{}.{EXT}",
                self.journal.pid, self.generation, self.thread
            );
            self.file = Some(Segment::open(&self.journal.dir.join(name))?);
        }
        // Set just above.
        self.file
            .as_mut()
            .ok_or_else(|| io::Error::other("journal file not open"))
    }
}

/// One accepted share read back.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Entry {
    /// The worker's count of accepted shares after this one.
    pub(crate) n: u64,
    pub(crate) diff: f64,
    pub(crate) sdiff: f64,
    pub(crate) user: String,
    pub(crate) worker: String,
    /// Unix seconds (of the round's write).
    pub(crate) time: u64,
    /// The share-log record, when the share log was on (`-L`).
    pub(crate) share: Option<Value>,
}

/// Reads every segment under `<logdir>/pool/journal/` and calls `f` with each share, in each
/// segment's order. Unreadable segments and malformed lines (a line cut by the crash) are
/// skipped and counted. Returns (segments, lines read, lines skipped).
pub(crate) fn replay(logdir: &Path, mut f: impl FnMut(Entry)) -> (usize, u64, u64) {
    let dir = logdir.join("pool").join("journal");
    let Ok(entries) = fs::read_dir(&dir) else {
        return (0, 0, 0);
    };
    let mut paths: Vec<(u32, u64, usize, PathBuf)> = entries
        .flatten()
        .filter_map(|e| {
            let p = e.path();
            segment_name(&p).map(|(pid, g, t)| (pid, g, t, p))
        })
        .collect();
    paths.sort();
    let (mut read, mut skipped) = (0u64, 0u64);
    for (_, _, _, path) in &paths {
        let file = match File::open(path) {
            Ok(f) => f,
            Err(e) => {
                warn!(path = %path.display(), error = %e, "cannot read a share journal segment; skipped");
                continue;
            }
        };
        let mut reader = BufReader::new(file);
        let mut time = 0u64;
        let mut line = Vec::new();
        loop {
            line.clear();
            match reader
                .by_ref()
                .take(MAX_LINE as u64 + 1)
                .read_until(b'\n', &mut line)
            {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) => {
                    warn!(path = %path.display(), error = %e, "error reading a share journal segment; the rest skipped");
                    break;
                }
            }
            if line.first() == Some(&0) {
                // The zeros after the last line of a segment a crash left mapped.
                break;
            }
            if line.last() != Some(&b'\n') {
                // Too long (skip to its end) or cut short by the crash.
                skipped += 1;
                if line.len() > MAX_LINE {
                    let mut rest = Vec::new();
                    if reader.read_until(b'\n', &mut rest).is_err() {
                        break;
                    }
                }
                continue;
            }
            match parse_line(&line) {
                Some(Line::Time(t)) => time = t,
                Some(Line::Share(mut e)) => {
                    e.time = time;
                    read += 1;
                    f(e);
                }
                None => skipped += 1,
            }
        }
    }
    (paths.len(), read, skipped)
}

enum Line {
    Time(u64),
    Share(Entry),
}

fn parse_line(line: &[u8]) -> Option<Line> {
    let v: Value = serde_json::from_slice(line).ok()?;
    let a = v.as_array()?;
    if a.first()?.as_str() == Some("t") {
        return Some(Line::Time(a.get(1)?.as_u64()?));
    }
    let (n, diff, sdiff, user, rest, share) = match a.as_slice() {
        [n, diff, sdiff, user, rest] => (n, diff, sdiff, user, rest, None),
        [n, diff, sdiff, user, rest, share] => (n, diff, sdiff, user, rest, Some(share)),
        _ => return None,
    };
    let diff = diff.as_f64().filter(|d| d.is_finite() && *d >= 0.0)?;
    let user = user.as_str()?;
    let rest = rest.as_str()?;
    Some(Line::Share(Entry {
        n: n.as_u64()?,
        diff,
        sdiff: sdiff.as_f64().filter(|d| d.is_finite()).unwrap_or(0.0),
        user: user.to_owned(),
        worker: format!("{user}{rest}"),
        time: 0,
        share: share.filter(|v| v.is_object()).cloned(),
    }))
}

/// The share-log records in the journal, each with the time of its round (unix seconds), in
/// each segment's order (`-L`: see `crate::sharelog::recover`).
pub(crate) fn share_records(logdir: &Path) -> Vec<(u64, Value)> {
    let mut out = Vec::new();
    replay(logdir, |e| {
        if let Some(share) = e.share {
            out.push((e.time, share));
        }
    });
    out
}

/// What a replay adds to one worker.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub(crate) struct Added {
    pub(crate) shares: u64,
    pub(crate) diff: f64,
    pub(crate) best: f64,
    pub(crate) last: u64,
    /// The highest share number seen.
    pub(crate) n: u64,
}

/// Reads the journal and sums, per (user, worker), the shares numbered above `base(user,
/// worker)` (the worker's count in its stats file, 0 when it has none).
pub(crate) fn added_since(
    logdir: &Path,
    mut base: impl FnMut(&str, &str) -> u64,
) -> HashMap<(String, String), Added> {
    let mut out: HashMap<(String, String), Added> = HashMap::new();
    let mut bases: HashMap<(String, String), u64> = HashMap::new();
    let (segments, read, skipped) = replay(logdir, |e| {
        let key = (e.user, e.worker);
        let b = *bases
            .entry(key.clone())
            .or_insert_with(|| base(&key.0, &key.1));
        if e.n <= b {
            return;
        }
        let a = out.entry(key).or_default();
        a.shares += 1;
        a.diff += e.diff;
        a.best = a.best.max(e.sdiff);
        a.last = a.last.max(e.time);
        a.n = a.n.max(e.n);
    });
    if segments > 0 {
        let shares: u64 = out.values().map(|a| a.shares).sum();
        info!(
            segments,
            lines = read,
            skipped,
            replayed = shares,
            workers = out.len(),
            "share journal read back: {shares} accepted shares the stats files did not have"
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str) -> PathBuf {
        let d =
            std::env::temp_dir().join(format!("ckpool-rs-journal-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        d
    }

    fn line(n: u64, diff: f64, user: &str, rest: &str) -> Vec<u8> {
        format!(
            "[{n},{diff:?},{:?},{},{}]\n",
            diff * 2.0,
            serde_json::to_string(user).unwrap_or_default(),
            serde_json::to_string(rest).unwrap_or_default()
        )
        .into_bytes()
    }

    #[test]
    fn lines_written_read_back_and_only_those_above_the_files_count() {
        let dir = tmp("rw");
        let j = Journal::open(&dir).expect("open");
        let mut w0 = j.writer(0);
        let mut w1 = j.writer(1);
        let mut buf = Vec::new();
        for n in 1..=5 {
            buf.extend(line(n, 1.5, "fred", ".rig"));
        }
        buf.extend(line(1, 0.25, "o\"dd", ""));
        w0.flush(&mut buf);
        assert!(buf.is_empty());
        buf.extend(line(6, 1.5, "fred", ".rig"));
        w1.flush(&mut buf);
        assert_eq!(j.counts(), (7, 0));
        // The file says fred.rig had 3 shares: 4, 5 and 6 are new; the other worker has no file.
        let added = added_since(
            &dir,
            |u, w| if (u, w) == ("fred", "fred.rig") { 3 } else { 0 },
        );
        let fred = added[&("fred".to_owned(), "fred.rig".to_owned())];
        assert_eq!(
            (fred.shares, fred.diff, fred.n, fred.best),
            (3, 4.5, 6, 3.0)
        );
        assert!(fred.last > 1_700_000_000);
        let odd = added[&("o\"dd".to_owned(), "o\"dd".to_owned())];
        assert_eq!((odd.shares, odd.diff), (1, 0.25));
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn lines_across_mapped_windows_read_back_after_a_crash_and_after_a_close() {
        let dir = tmp("windows");
        let j = Journal::open(&dir).expect("open");
        let mut w = j.writer(0);
        // About 10 windows, in rounds of 100 lines.
        let mut n = 0u64;
        while n < 12_000 {
            let mut buf = Vec::new();
            for _ in 0..100 {
                n += 1;
                buf.extend(line(n, 1.0, "someone", ".with-a-longer-worker-name"));
            }
            w.flush(&mut buf);
        }
        let size = |d: &Path| -> u64 {
            fs::read_dir(d.join("pool/journal"))
                .expect("dir")
                .flatten()
                .map(|e| e.metadata().map_or(0, |m| m.len()))
                .sum()
        };
        assert!(size(&dir) > 2 * WINDOW as u64, "{}", size(&dir));
        // As a SIGKILL leaves it: mapped, never cut (the writer forgotten, not dropped).
        let mut seen = 0u64;
        let (_, read, skipped) = replay(&dir, |e| {
            seen += 1;
            assert_eq!(e.n, seen);
        });
        assert_eq!((read, skipped), (n, 0));
        let zeros = size(&dir);
        std::mem::forget(w);
        // Closed in order, the zeros go.
        let mut w2 = j.writer(1);
        w2.flush(&mut line(1, 1.0, "x", ""));
        drop(w2);
        let lines_bytes: u64 = fs::read_dir(dir.join("pool/journal"))
            .expect("dir")
            .flatten()
            .filter(|e| e.path().to_string_lossy().ends_with("-1.journal"))
            .map(|e| e.metadata().map_or(0, |m| m.len()))
            .sum();
        assert!(lines_bytes < 100, "{lines_bytes}");
        assert!(
            zeros % WINDOW as u64 == 0,
            "a mapped segment is whole windows long"
        );
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_line_cut_by_a_crash_and_garbage_are_skipped() {
        let dir = tmp("cut");
        let j = Journal::open(&dir).expect("open");
        let mut w = j.writer(0);
        let mut buf = line(1, 2.0, "a", "");
        buf.extend(b"not json\n[1,2]\n");
        buf.extend(vec![b'x'; MAX_LINE * 2]);
        buf.push(b'\n');
        buf.extend(line(2, 2.0, "a", ""));
        buf.extend(b"[3,2.0,4.0,\"a\"");
        w.flush(&mut buf);
        let mut seen = Vec::new();
        let (segments, read, skipped) = replay(&dir, |e| seen.push(e.n));
        assert_eq!((segments, read, skipped), (1, 2, 4));
        assert_eq!(seen, vec![1, 2]);
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn rotation_waits_for_every_writer_and_pruning_keeps_one_generation_more() {
        let dir = tmp("rot");
        let j = Journal::open(&dir).expect("open");
        let mut w0 = j.writer(0);
        let mut w1 = j.writer(1);
        let mut buf = line(1, 1.0, "u", "");
        w0.flush(&mut buf);
        // Nobody ends a round: the rotation times out.
        assert_eq!(j.rotate(Instant::now() + Duration::from_millis(20)), None);
        // Writers that end their rounds while rotate waits let it finish.
        let jj = Arc::clone(&j);
        let waiter = thread::spawn(move || jj.rotate(Instant::now() + Duration::from_secs(10)));
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut done = None;
        let mut n = 2;
        while Instant::now() < deadline {
            let mut b = line(n, 1.0, "u", "");
            n += 1;
            w0.flush(&mut b);
            w1.flush(&mut Vec::new());
            if waiter.is_finished() {
                done = waiter.join().ok().flatten();
                break;
            }
            thread::sleep(Duration::from_millis(1));
        }
        let g = done.expect("rotation finished with every writer moved");
        assert_eq!(g, 3);
        // Segments of generation 1 (the first line) and of later ones exist; prune keeps g-1.
        let gens = || {
            let mut v: Vec<u64> = fs::read_dir(j.dir.clone())
                .expect("dir")
                .flatten()
                .filter_map(|e| segment_name(&e.path()).map(|s| s.1))
                .collect();
            v.sort_unstable();
            v.dedup();
            v
        };
        assert!(gens().contains(&1));
        j.prune(g);
        assert!(gens().iter().all(|&x| x + 1 >= g), "{:?} at {g}", gens());
        // A dead process's segment goes too; a live one's stays.
        fs::write(j.dir.join(format!("{}-1-0.journal", u32::MAX - 1)), b"").expect("write");
        fs::write(j.dir.join("1-1-0.journal"), b"").expect("write");
        j.prune(g);
        assert!(!j.dir.join(format!("{}-1-0.journal", u32::MAX - 1)).exists());
        assert!(j.dir.join("1-1-0.journal").exists(), "pid 1 is alive");
        let _ = fs::remove_dir_all(&dir);
    }
}
