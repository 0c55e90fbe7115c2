//! The share log (`-L`): one JSON line per share in ckpool's fields, in
//! `<logdir>/<height %08x>/<job id %016x>.sharelog` as ckpool's, written by its own thread.
//!
//! - **An accepted share is never dropped.** The sink blocks its caller (a connector thread, or
//!   with the queue handoff a stratifier thread) while the queue is full (back-pressure: that
//!   thread reads no more from its miners until there is room);
//!   a rejected share is only tried, and when the queue is full it is counted by reason and
//!   summarised in `<logdir>/sharelog.summary` instead.
//! - **Buffered, files kept open.** Lines are written in batches to the files of the last few
//!   jobs, kept open, within [`FLUSH_SOON`] (50 ms) of the writer taking them, whenever a buffer
//!   fills, and at [`ShareLog::stop`]; a crash or SIGKILL loses only the lines not yet written.
//! - **A disk error is retried, counted and said.** What cannot be written stays in memory (up
//!   to [`PENDING_MAX`] bytes; beyond it the writer stops taking lines, which is back-pressure
//!   again) and is tried again every second; each failed attempt counts in
//!   [`ShareLogStats::write_errors`] (admin `stats`, key `sharelog`), and a warning is logged
//!   once a minute while it lasts. During shutdown the writer takes every line whatever the
//!   bound, so that no connector thread stays blocked, and tries for [`STOP_GRACE`] to write it.
//!
//! A line: `workinfoid, enonce1, nonce2, nonce, ntime, diff, sdiff, hash, result,
//! reject-reason` (rejected shares only), `error` (null), `errn` (ckpool's number for the reject
//! reason, 0 when accepted, left out for a reason ckpool does not have), `createdate` (`"secs,nsecs"`, when the writer took it), `createby`
//! (`"code"`), `createcode` (`"parse_submit"`), `createinet` (the pool's first `serverurl`),
//! `workername, username, address, agent`. ckpool's `clientid` is missing: share records do not
//! carry it yet.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crossbeam_channel::{Receiver, Sender, TrySendError, select};
use serde::Serialize;
use stratifier::{Reject, ShareRecord};
use tracing::{error, info, warn};

use crate::settings::Settings;

/// Records queued for the writer at most. When full, accepted shares wait (back-pressure) and
/// rejected ones are summarised.
const QUEUE: usize = 65_536;
/// Bytes of lines the writer keeps in memory while the disk fails, before it stops taking
/// records from the queue.
pub(crate) const PENDING_MAX: usize = 32 << 20;
/// A file's buffer is written out once it holds this much.
const BUF_FLUSH: usize = 64 << 10;
/// Everything buffered is written (or retried) at least this often.
const FLUSH_EVERY: Duration = Duration::from_secs(1);
/// While the disk takes what it is given, a line is written at most this long after the writer
/// took it: a crash or SIGKILL of the pool loses at most this much of the share log (the kernel
/// has every line written before). A failing disk is retried every [`FLUSH_EVERY`] only.
const FLUSH_SOON: Duration = Duration::from_millis(50);
/// Job files kept open at once; the oldest is closed beyond it.
const OPEN_FILES: usize = 8;
/// How long [`ShareLog::stop`] keeps retrying to write what is left.
pub(crate) const STOP_GRACE: Duration = Duration::from_secs(2);
/// How often a failing share log is warned about.
const WARN_EVERY: Duration = Duration::from_secs(60);

/// The running share-log writer; [`ShareLog::stop`] writes what is queued and ends it.
pub(crate) struct ShareLog {
    tx: Sender<ShareRecord>,
    stop: Sender<()>,
    counters: Arc<Counters>,
    thread: thread::JoinHandle<()>,
}

/// The stratifier's share sink.
pub(crate) type ShareSink = Box<dyn Fn(ShareRecord) + Send + Sync>;

/// A snapshot of the share log's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub(crate) struct ShareLogStats {
    /// Lines written to disk.
    pub(crate) written: u64,
    /// Failed attempts to create, open or write a share-log file (each retry counts).
    pub(crate) write_errors: u64,
    /// Lines not on disk yet: queued, or buffered (and, while the disk fails, kept for retry).
    pub(crate) pending: u64,
    /// Rejected shares counted in a summary instead of logged one by one (queue full).
    pub(crate) rejects_summarised: u64,
}

/// Reads [`ShareLogStats`] while the share log runs (for admin `stats`).
#[derive(Clone)]
pub(crate) struct StatsHandle {
    tx: Sender<ShareRecord>,
    counters: Arc<Counters>,
}

impl StatsHandle {
    /// The counters now.
    pub(crate) fn snapshot(&self) -> ShareLogStats {
        let c = &self.counters;
        ShareLogStats {
            written: c.written.load(Ordering::Relaxed),
            write_errors: c.write_errors.load(Ordering::Relaxed),
            pending: c.buffered.load(Ordering::Relaxed) + self.tx.len() as u64,
            rejects_summarised: c.rejects_summarised.load(Ordering::Relaxed),
        }
    }
}

impl ShareLog {
    /// Starts the writer thread for `settings`' log directory. Once `shutdown` is set the
    /// writer takes every queued record whatever its memory bound, so no connector thread stays
    /// blocked on a failing disk while the daemon stops.
    pub(crate) fn start(settings: &Settings, shutdown: &Arc<AtomicBool>) -> io::Result<Self> {
        let inet = settings
            .listeners
            .first()
            .map(|l| l.url.clone())
            .unwrap_or_default();
        Self::start_in(
            settings.logdir().to_owned(),
            inet,
            Arc::clone(shutdown),
            (QUEUE, PENDING_MAX),
        )
    }

    /// [`ShareLog::start`] with the queue's length and the bytes kept while failing.
    fn start_in(
        logdir: PathBuf,
        inet: String,
        shutdown: Arc<AtomicBool>,
        (queue, pending_max): (usize, usize),
    ) -> io::Result<Self> {
        let (tx, rx) = crossbeam_channel::bounded::<ShareRecord>(queue);
        let (stop, stopped) = crossbeam_channel::bounded::<()>(0);
        let counters = Arc::new(Counters::default());
        let writer = Writer {
            logdir,
            inet,
            files: Vec::new(),
            counters: Arc::clone(&counters),
            pending_bytes: 0,
            pending_max,
            failing: None,
            last_warning: None,
        };
        let thread = thread::Builder::new()
            .name("sharelog".into())
            .spawn(move || run(writer, &rx, &stopped, &shutdown))?;
        Ok(Self {
            tx,
            stop,
            counters,
            thread,
        })
    }

    /// The sink for the stratifier, called on connector threads: an accepted share waits while
    /// the queue is full (back-pressure, never dropped); a rejected share is counted in the
    /// summary instead. After [`ShareLog::stop`] records are dropped without waiting.
    pub(crate) fn sink(&self) -> ShareSink {
        let tx = self.tx.clone();
        let counters = Arc::clone(&self.counters);
        Box::new(move |rec| {
            if rec.result {
                // Err only once the writer has stopped.
                let _ = tx.send(rec);
            } else if let Err(TrySendError::Full(rec)) = tx.try_send(rec) {
                counters.summarise(rec.reject_reason);
            }
        })
    }

    /// Reads the counters while the share log runs.
    pub(crate) fn stats_handle(&self) -> StatsHandle {
        StatsHandle {
            tx: self.tx.clone(),
            counters: Arc::clone(&self.counters),
        }
    }

    /// Writes every record queued so far and flushes (retrying a failing disk for at most
    /// [`STOP_GRACE`]), and waits for the thread. Records queued after this are dropped.
    pub(crate) fn stop(self) {
        drop(self.stop);
        if self.thread.join().is_err() {
            error!("the share log thread panicked");
        }
    }
}

/// The reject reason's text (ckpool's), `None` for an accepted share.
fn reject_reason(rec: &ShareRecord) -> Option<&'static str> {
    rec.reject_reason.map(Reject::message)
}

/// ckpool's reject reasons and their `errn` (its `share_err` numbers).
const REASONS: [(&str, i32); 15] = [
    ("Invalid JobID", 1),
    ("Stale", 2),
    ("Ntime out of range", 3),
    ("Duplicate", 4),
    ("Above target", 5),
    ("Invalid version mask", 6),
    ("Params not array", -1),
    ("Invalid array size", -2),
    ("No username", -3),
    ("No job_id", -4),
    ("No nonce2", -5),
    ("No ntime", -6),
    ("No nonce", -7),
    ("Worker mismatch", -8),
    ("Invalid nonce2 length", -9),
];

/// ckpool's `errn` for a reject reason (its text), `None` for a reason ckpool does not have.
fn errn(reason: &str) -> Option<i32> {
    REASONS
        .iter()
        .find(|(text, _)| *text == reason)
        .map(|r| r.1)
}

/// Index into `Reject::ALL`, or its length for an accepted share.
fn reason_slot(reason: Option<Reject>) -> usize {
    reason
        .and_then(|r| Reject::ALL.iter().position(|a| *a == r))
        .unwrap_or(Reject::ALL.len())
}

#[derive(Debug, Default)]
struct Counters {
    written: AtomicU64,
    write_errors: AtomicU64,
    /// Lines the writer holds (not yet on disk).
    buffered: AtomicU64,
    rejects_summarised: AtomicU64,
    /// Summarised rejects by reason, since the last summary line.
    by_reason: [AtomicU64; Reject::ALL.len() + 1],
}

impl Counters {
    fn summarise(&self, reason: Option<Reject>) {
        if let Some(c) = self.by_reason.get(reason_slot(reason)) {
            c.fetch_add(1, Ordering::Relaxed);
        }
        self.rejects_summarised.fetch_add(1, Ordering::Relaxed);
    }
}

fn run(mut w: Writer, rx: &Receiver<ShareRecord>, stopped: &Receiver<()>, shutdown: &AtomicBool) {
    let mut next_flush = Instant::now() + FLUSH_EVERY;
    loop {
        let wait = next_flush.saturating_duration_since(Instant::now());
        // While the disk fails and memory is at its bound, leave records in the queue:
        // accepted shares then wait in the sink (back-pressure). Not during shutdown.
        let room = w.pending_bytes < w.pending_max || shutdown.load(Ordering::Relaxed);
        if room {
            select! {
                recv(rx) -> rec => match rec {
                    Ok(rec) => {
                        let now = CreateDate::now();
                        w.push(&rec, &now);
                        for rec in rx.try_iter().take(4096) {
                            w.push(&rec, &now);
                        }
                        if w.failing.is_none() {
                            next_flush = next_flush.min(Instant::now() + FLUSH_SOON);
                        }
                    }
                    Err(_) => break,
                },
                recv(stopped) -> _ => break,
                default(wait) => {}
            }
        } else {
            select! {
                recv(stopped) -> _ => break,
                default(wait) => {}
            }
        }
        if Instant::now() >= next_flush {
            w.flush_all();
            w.write_summary();
            next_flush = Instant::now() + FLUSH_EVERY;
        }
    }
    let now = CreateDate::now();
    for rec in rx.try_iter() {
        w.push(&rec, &now);
    }
    w.finish();
}

/// After a crash (start-up, before the writer starts): appends to their job files the accepted
/// shares the share journal has and the share log does not (`crate::journal`: each accepted
/// share's record is journaled before its reply leaves, while the writer's last lines die with
/// the process). A share is known by its hash; lines already in a file are left alone, so a
/// second recovery writes nothing. `createdate` is the journal's time for the share's round.
/// Returns (lines written, lines already there).
pub(crate) fn recover(settings: &Settings) -> (u64, u64) {
    let inet = settings
        .listeners
        .first()
        .map(|l| l.url.clone())
        .unwrap_or_default();
    let (written, present) = recover_in(settings.logdir(), &inet);
    if written > 0 {
        info!(
            written,
            present, "share log: {written} accepted shares written back from the share journal"
        );
    }
    (written, present)
}

fn recover_in(logdir: &std::path::Path, inet: &str) -> (u64, u64) {
    use std::collections::{BTreeMap, HashSet};
    let mut by_job: BTreeMap<(u64, u64), Vec<(u64, serde_json::Value)>> = BTreeMap::new();
    for (time, rec) in crate::journal::share_records(logdir) {
        let (Some(height), Some(job)) = (rec["height"].as_u64(), rec["workinfoid"].as_u64()) else {
            continue;
        };
        by_job.entry((height, job)).or_default().push((time, rec));
    }
    let (mut written, mut present) = (0u64, 0u64);
    for ((height, job), recs) in by_job {
        let dir = logdir.join(format!("{height:08x}"));
        let path = dir.join(format!("{job:016x}.sharelog"));
        let mut have: HashSet<String> = HashSet::new();
        if let Ok(text) = fs::read(&path) {
            for line in text.split(|&b| b == b'\n') {
                if let Ok(v) = serde_json::from_slice::<serde_json::Value>(line)
                    && let Some(h) = v["hash"].as_str()
                {
                    have.insert(h.to_owned());
                }
            }
        }
        let mut buf = Vec::new();
        for (time, rec) in &recs {
            let str_of = |k: &str| rec[k].as_str().unwrap_or("");
            let hash = str_of("hash");
            if hash.is_empty() || !have.insert(hash.to_owned()) {
                present += 1;
                continue;
            }
            let createdate = format!("{time},0");
            let line = Line {
                workinfoid: job,
                enonce1: str_of("enonce1"),
                nonce2: str_of("nonce2"),
                nonce: str_of("nonce"),
                ntime: str_of("ntime"),
                diff: rec["diff"].as_f64().unwrap_or(0.0),
                sdiff: rec["sdiff"].as_f64().unwrap_or(0.0),
                hash,
                result: true,
                reject_reason: None,
                error: None,
                errn: Some(0),
                createdate: &createdate,
                createby: "code",
                createcode: "parse_submit",
                createinet: inet,
                workername: str_of("workername"),
                username: str_of("username"),
                address: str_of("address"),
                agent: str_of("agent"),
            };
            if serde_json::to_writer(&mut buf, &line).is_ok() {
                buf.push(b'\n');
                written += 1;
            }
        }
        if buf.is_empty() {
            continue;
        }
        let result = fs::create_dir_all(&dir)
            .and_then(|()| OpenOptions::new().create(true).append(true).open(&path))
            .and_then(|mut f| f.write_all(&buf));
        if let Err(e) = result {
            warn!(path = %path.display(), error = %e, "cannot write recovered share-log lines");
        }
    }
    (written, present)
}

/// `createdate` as ckpool writes it: `"secs,nsecs"`.
struct CreateDate(String);

impl CreateDate {
    fn now() -> Self {
        let t = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        Self(format!("{},{}", t.as_secs(), t.subsec_nanos()))
    }
}

/// One share-log line, in ckpool's order.
#[derive(Serialize)]
struct Line<'a> {
    workinfoid: u64,
    enonce1: &'a str,
    nonce2: &'a str,
    nonce: &'a str,
    ntime: &'a str,
    diff: f64,
    sdiff: f64,
    hash: &'a str,
    result: bool,
    #[serde(rename = "reject-reason", skip_serializing_if = "Option::is_none")]
    reject_reason: Option<&'a str>,
    error: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    errn: Option<i32>,
    createdate: &'a str,
    createby: &'a str,
    createcode: &'a str,
    createinet: &'a str,
    workername: &'a str,
    username: &'a str,
    address: &'a str,
    agent: &'a str,
}

/// One job's file: open (or not yet, or not since an error) and its unwritten lines.
struct JobFile {
    height: u64,
    workinfoid: u64,
    file: Option<File>,
    buf: Vec<u8>,
    lines: u64,
}

/// The writer thread's state.
struct Writer {
    logdir: PathBuf,
    /// `createinet`.
    inet: String,
    /// The most recently used last.
    files: Vec<JobFile>,
    counters: Arc<Counters>,
    /// Bytes in all the buffers.
    pending_bytes: usize,
    /// Beyond this many, no more records are taken from the queue ([`PENDING_MAX`]).
    pending_max: usize,
    /// Since when writing fails (`None` while it works).
    failing: Option<Instant>,
    last_warning: Option<Instant>,
}

impl Writer {
    /// Appends `rec`'s line to its job's buffer, writing the buffer out if it is full.
    fn push(&mut self, rec: &ShareRecord, now: &CreateDate) {
        let i = match self
            .files
            .iter()
            .rposition(|f| f.workinfoid == rec.workinfoid)
        {
            Some(i) => i,
            None => {
                self.files.push(JobFile {
                    height: rec.height,
                    workinfoid: rec.workinfoid,
                    file: None,
                    buf: Vec::new(),
                    lines: 0,
                });
                self.close_old_files();
                self.files.len() - 1
            }
        };
        let reason = reject_reason(rec);
        let line = Line {
            workinfoid: rec.workinfoid,
            enonce1: &rec.enonce1,
            nonce2: &rec.nonce2,
            nonce: &rec.nonce,
            ntime: &rec.ntime,
            diff: rec.diff,
            sdiff: rec.sdiff,
            hash: &rec.hash,
            result: rec.result,
            reject_reason: reason,
            error: None,
            errn: if rec.result {
                Some(0)
            } else {
                reason.and_then(errn)
            },
            createdate: &now.0,
            createby: "code",
            createcode: "parse_submit",
            createinet: &self.inet,
            workername: &rec.workername,
            username: &rec.username,
            address: &rec.address,
            agent: &rec.agent,
        };
        let Some(f) = self.files.get_mut(i) else {
            return;
        };
        let before = f.buf.len();
        if serde_json::to_writer(&mut f.buf, &line).is_err() {
            // Only a non-finite float can fail; keep the file's lines whole.
            f.buf.truncate(before);
            error!(
                workinfoid = rec.workinfoid,
                "share log line not serialisable"
            );
            return;
        }
        f.buf.push(b'\n');
        f.lines += 1;
        self.pending_bytes += f.buf.len() - before;
        self.counters.buffered.fetch_add(1, Ordering::Relaxed);
        if f.buf.len() >= BUF_FLUSH {
            self.flush_one(i);
        }
        if let Some(last) = self.files.len().checked_sub(1)
            && i != last
        {
            // Most recently used last.
            let f = self.files.remove(i);
            self.files.push(f);
        }
    }

    /// Closes the least recently used files beyond [`OPEN_FILES`] once they are written out.
    fn close_old_files(&mut self) {
        let mut i = 0;
        while self.files.len() > OPEN_FILES && i + OPEN_FILES < self.files.len() {
            self.flush_one(i);
            if self.files.get(i).is_some_and(|f| f.buf.is_empty()) {
                self.files.remove(i);
            } else {
                i += 1;
            }
        }
    }

    fn flush_all(&mut self) {
        for i in 0..self.files.len() {
            self.flush_one(i);
        }
        self.close_old_files();
    }

    /// Writes out file `i`'s buffer as far as the disk lets it; what is left stays for the
    /// next try.
    fn flush_one(&mut self, i: usize) {
        let Some(f) = self.files.get_mut(i) else {
            return;
        };
        if f.buf.is_empty() {
            return;
        }
        let dir = self.logdir.join(format!("{:08x}", f.height));
        let path = dir.join(format!("{:016x}.sharelog", f.workinfoid));
        if f.file.is_none() {
            match fs::create_dir_all(&dir)
                .and_then(|()| OpenOptions::new().create(true).append(true).open(&path))
            {
                Ok(file) => f.file = Some(file),
                Err(e) => {
                    self.failed(&path, &e);
                    return;
                }
            }
        }
        let mut done = 0;
        let mut result = Ok(());
        if let Some(file) = f.file.as_mut() {
            while let Some(rest) = f.buf.get(done..).filter(|r| !r.is_empty()) {
                match file.write(rest) {
                    Ok(0) => {
                        result = Err(io::Error::from(io::ErrorKind::WriteZero));
                        break;
                    }
                    Ok(n) => {
                        let lines = rest
                            .get(..n)
                            .map_or(0, |w| w.iter().filter(|&&b| b == b'\n').count() as u64);
                        f.lines -= lines;
                        self.counters.written.fetch_add(lines, Ordering::Relaxed);
                        self.counters.buffered.fetch_sub(lines, Ordering::Relaxed);
                        done += n;
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        result = Err(e);
                        break;
                    }
                }
            }
        }
        f.buf.drain(..done);
        self.pending_bytes -= done;
        match result {
            Ok(()) => self.recovered(),
            Err(e) => {
                // Opened again on the next try (the directory may have been replaced).
                f.file = None;
                self.failed(&path, &e);
            }
        }
    }

    fn failed(&mut self, path: &std::path::Path, e: &io::Error) {
        self.counters.write_errors.fetch_add(1, Ordering::Relaxed);
        let now = Instant::now();
        self.failing.get_or_insert(now);
        if self
            .last_warning
            .is_none_or(|t| now.duration_since(t) >= WARN_EVERY)
        {
            self.last_warning = Some(now);
            warn!(
                path = %path.display(),
                error = %e,
                pending = self.counters.buffered.load(Ordering::Relaxed),
                write_errors = self.counters.write_errors.load(Ordering::Relaxed),
                "cannot write the share log; keeping the lines and retrying every second"
            );
        }
    }

    fn recovered(&mut self) {
        if self.pending_bytes == 0
            && let Some(since) = self.failing.take()
        {
            self.last_warning = None;
            info!(
                failed_for_s = since.elapsed().as_secs(),
                "share log written again"
            );
        }
    }

    /// Writes a summary line for the rejects counted instead of logged, if any.
    fn write_summary(&mut self) {
        let mut rejected = serde_json::Map::new();
        for (i, c) in self.counters.by_reason.iter().enumerate() {
            let n = c.swap(0, Ordering::Relaxed);
            if n > 0 {
                let reason = Reject::ALL.get(i).map_or("other", |r| r.message());
                rejected.insert(reason.to_owned(), n.into());
            }
        }
        if rejected.is_empty() {
            return;
        }
        let line = serde_json::json!({
            "createdate": CreateDate::now().0,
            "createinet": self.inet,
            "summary": "rejected shares not logged one by one: the share log queue was full",
            "rejected": rejected,
        });
        let path = self.logdir.join("sharelog.summary");
        let written = fs::create_dir_all(&self.logdir)
            .and_then(|()| OpenOptions::new().create(true).append(true).open(&path))
            .and_then(|mut f| writeln!(f, "{line}"));
        if let Err(e) = written {
            // The counts stay in the admin stats (rejects_summarised).
            self.failed(&path, &e);
        }
    }

    /// At stop: writes everything, retrying a failing disk for [`STOP_GRACE`].
    fn finish(&mut self) {
        let deadline = Instant::now() + STOP_GRACE;
        loop {
            self.flush_all();
            if self.pending_bytes == 0 || Instant::now() >= deadline {
                break;
            }
            thread::sleep(Duration::from_millis(100));
        }
        self.write_summary();
        let lost: u64 = self.files.iter().map(|f| f.lines).sum();
        if lost > 0 {
            error!(
                lines = lost,
                "share log lines could not be written before shutdown"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(workinfoid: u64, nonce: u32) -> ShareRecord {
        ShareRecord {
            workinfoid,
            height: 0x65,
            enonce1: "00000001".into(),
            nonce2: "0000000000000000".into(),
            nonce: format!("{nonce:08x}"),
            ntime: "65000000".into(),
            diff: 1.0,
            sdiff: 2.0,
            hash: "00".repeat(32),
            result: true,
            reject_reason: None,
            workername: "u.w".into(),
            username: "u".into(),
            address: "127.0.0.1".into(),
            agent: "test".into(),
        }
    }

    #[test]
    fn recovery_writes_the_journaled_shares_the_log_lacks_once() {
        let dir = temp_dir("recover");
        let rec = |nonce: u32| {
            let mut r = record(7, nonce);
            r.hash = format!("{nonce:064x}");
            r
        };
        // The share log has shares 1 and 2; the journal has 1, 2 and 3 (3 was lost).
        let log = start(&dir);
        let sink = log.sink();
        sink(rec(1));
        sink(rec(2));
        log.stop();
        let journal = crate::journal::Journal::open(&dir).expect("journal");
        let mut w = journal.writer(0);
        let mut lines = Vec::new();
        for (n, nonce) in [(1u64, 1u32), (2, 2), (3, 3)] {
            let share = serde_json::to_string(&rec(nonce)).expect("json");
            lines.extend(format!("[{n},1.0,2.0,\"u\",\".w\",{share}]\n").into_bytes());
        }
        w.flush(&mut lines);
        assert_eq!(recover_in(&dir, "inet"), (1, 2));
        let file = dir.join("00000065").join(format!("{:016x}.sharelog", 7));
        let text = fs::read_to_string(&file).expect("file");
        let got: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).expect("whole line"))
            .collect();
        assert_eq!(got.len(), 3);
        assert_eq!(got[2]["hash"], format!("{:064x}", 3));
        assert_eq!(got[2]["nonce"], "00000003");
        assert_eq!(got[2]["workername"], "u.w");
        assert_eq!(got[2]["result"], true);
        assert_eq!(got[2]["createinet"], "inet");
        // Again: nothing more.
        assert_eq!(recover_in(&dir, "inet"), (0, 3));
        assert_eq!(fs::read_to_string(&file).expect("file").lines().count(), 3);
        let _ = fs::remove_dir_all(&dir);
    }

    fn temp_dir(tag: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("ckpool-rs-sharelog-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        dir
    }

    fn start(dir: &std::path::Path) -> ShareLog {
        ShareLog::start_in(
            dir.to_owned(),
            "127.0.0.1:3333".into(),
            Arc::new(AtomicBool::new(false)),
            (QUEUE, PENDING_MAX),
        )
        .expect("start")
    }

    fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !cond() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            thread::sleep(Duration::from_millis(10));
        }
    }

    #[test]
    fn stop_writes_every_queued_record_before_returning() {
        let dir = temp_dir("stop");
        let log = start(&dir);
        let sink = log.sink();
        let stats = log.stats_handle();
        for n in 0..1000 {
            sink(record(7 + u64::from(n >= 500), n));
        }
        log.stop();
        let read = |job: u64| {
            fs::read_to_string(dir.join(format!("00000065/{job:016x}.sharelog")))
                .expect("share log file")
        };
        let (a, b) = (read(7), read(8));
        assert_eq!(a.lines().count(), 500);
        assert_eq!(b.lines().count(), 500);
        let last: serde_json::Value =
            serde_json::from_str(b.lines().last().expect("a line")).expect("json");
        assert_eq!(last["nonce"], format!("{:08x}", 999));
        let s = stats.snapshot();
        assert_eq!((s.written, s.pending, s.write_errors), (1000, 0, 0));
        // After stop, the sink drops records (and does not block).
        sink(record(9, 0));
        assert!(!dir.join(format!("00000065/{:016x}.sharelog", 9)).exists());
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn lines_have_ckpools_fields_in_its_order() {
        let dir = temp_dir("fields");
        let log = start(&dir);
        let sink = log.sink();
        sink(record(7, 1));
        let mut rejected = record(7, 2);
        rejected.result = false;
        rejected.reject_reason = Some(Reject::AboveTarget);
        sink(rejected);
        log.stop();
        let text = fs::read_to_string(dir.join(format!("00000065/{:016x}.sharelog", 7)))
            .expect("share log file");
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2);
        let keys = |l: &str| -> Vec<String> {
            let v: serde_json::Map<String, serde_json::Value> =
                serde_json::from_str(l).expect("json");
            v.keys().cloned().collect()
        };
        let order = |l: &str| -> Vec<usize> {
            // Where each key starts in the line, to check the order.
            keys(l)
                .iter()
                .map(|k| l.find(&format!("\"{k}\":")).expect("key"))
                .collect()
        };
        let accepted_keys = [
            "workinfoid",
            "enonce1",
            "nonce2",
            "nonce",
            "ntime",
            "diff",
            "sdiff",
            "hash",
            "result",
            "error",
            "errn",
            "createdate",
            "createby",
            "createcode",
            "createinet",
            "workername",
            "username",
            "address",
            "agent",
        ];
        let mut got = keys(lines[0]);
        got.sort();
        let mut want: Vec<String> = accepted_keys.iter().map(|k| (*k).to_owned()).collect();
        want.sort();
        assert_eq!(got, want);
        let pos = order(lines[0]);
        let mut sorted = pos.clone();
        sorted.sort_unstable();
        let by_pos: Vec<&str> = sorted
            .iter()
            .map(|p| {
                let rest = &lines[0][p + 1..];
                &rest[..rest.find('"').expect("key end")]
            })
            .collect();
        assert_eq!(by_pos, accepted_keys, "ckpool's order");

        let a: serde_json::Value = serde_json::from_str(lines[0]).expect("json");
        assert_eq!(a["result"], true);
        assert_eq!(a["errn"], 0);
        assert_eq!(a["error"], serde_json::Value::Null);
        assert_eq!(a["createby"], "code");
        assert_eq!(a["createcode"], "parse_submit");
        assert_eq!(a["createinet"], "127.0.0.1:3333");
        let date = a["createdate"].as_str().expect("createdate");
        let (secs, nsecs) = date.split_once(',').expect("secs,nsecs");
        assert!(secs.parse::<u64>().expect("secs") > 1_700_000_000);
        assert!(nsecs.parse::<u32>().expect("nsecs") < 1_000_000_000);
        let r: serde_json::Value = serde_json::from_str(lines[1]).expect("json");
        assert_eq!(r["result"], false);
        assert_eq!(r["reject-reason"], "Above target");
        assert_eq!(r["errn"], 5);
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn each_line_reaches_the_disk_within_moments_without_stop() {
        let dir = temp_dir("flush");
        let log = start(&dir);
        let sink = log.sink();
        let path = dir.join(format!("00000065/{:016x}.sharelog", 7));
        // Each of a few lines is on disk well within the writer's 1 s cadence: 50 ms after it
        // is taken (the bound asserted leaves room for a loaded machine).
        for n in 1..=3 {
            sink(record(7, 1));
            let t = Instant::now();
            wait_for("the line on disk", || {
                fs::read_to_string(&path).is_ok_and(|t| t.lines().count() == n)
            });
            assert!(
                t.elapsed() < Duration::from_millis(700),
                "{:?}",
                t.elapsed()
            );
        }
        log.stop();
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_directory_that_cannot_be_made_is_retried_and_counted_and_nothing_is_lost() {
        let dir = temp_dir("fail");
        fs::create_dir_all(&dir).expect("dir");
        // A file where the height's directory should go: creating it fails, even as root.
        let blocker = dir.join("00000065");
        fs::write(&blocker, b"in the way").expect("blocker");
        let log = start(&dir);
        let sink = log.sink();
        let stats = log.stats_handle();
        for n in 0..100 {
            sink(record(7, n));
        }
        wait_for("a failed write", || stats.snapshot().write_errors >= 1);
        // A record moving from the queue to the writer's buffer is briefly in neither count.
        wait_for("the first hundred pending", || {
            stats.snapshot().pending == 100
        });
        assert_eq!(stats.snapshot().written, 0);
        // Still taking lines while failing.
        for n in 100..200 {
            sink(record(7, n));
        }
        wait_for("the second hundred buffered", || {
            stats.snapshot().pending == 200
        });
        fs::remove_file(&blocker).expect("unblock");
        wait_for("the retry to write everything", || {
            stats.snapshot().written == 200
        });
        let s = stats.snapshot();
        assert_eq!(s.pending, 0);
        assert!(s.write_errors >= 1);
        log.stop();
        let text = fs::read_to_string(dir.join(format!("00000065/{:016x}.sharelog", 7)))
            .expect("share log file");
        let nonces: Vec<String> = text
            .lines()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).expect("whole json lines");
                v["nonce"].as_str().expect("nonce").to_owned()
            })
            .collect();
        let want: Vec<String> = (0..200).map(|n| format!("{n:08x}")).collect();
        assert_eq!(nonces, want, "every line once, in order");
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_full_queue_blocks_accepted_shares_and_summarises_rejected_ones() {
        let dir = temp_dir("full");
        fs::create_dir_all(&dir).expect("dir");
        // A test double for the queue: a writer that is not reading.
        let (tx, rx) = crossbeam_channel::bounded::<ShareRecord>(2);
        let counters = Arc::new(Counters::default());
        let (stop, _stopped) = crossbeam_channel::bounded::<()>(0);
        let log = ShareLog {
            tx,
            stop,
            counters: Arc::clone(&counters),
            thread: thread::spawn(|| {}),
        };
        let sink: Arc<ShareSink> = Arc::new(log.sink());
        sink(record(7, 0));
        sink(record(7, 1));
        let mut stale = record(7, 2);
        stale.result = false;
        stale.reject_reason = Some(Reject::Stale);
        sink(stale.clone());
        sink(stale);
        assert_eq!(counters.rejects_summarised.load(Ordering::Relaxed), 2);
        assert_eq!(
            counters.by_reason[reason_slot(Some(Reject::Stale))].load(Ordering::Relaxed),
            2
        );
        // An accepted share waits for room.
        let (done_tx, done) = crossbeam_channel::bounded(1);
        let s = Arc::clone(&sink);
        let blocked = thread::spawn(move || {
            s(record(7, 3));
            let _ = done_tx.send(());
        });
        assert!(
            done.recv_timeout(Duration::from_millis(300)).is_err(),
            "an accepted share was not held back"
        );
        assert_eq!(rx.recv().expect("queued").nonce, "00000000");
        done.recv_timeout(Duration::from_secs(10))
            .expect("the accepted share went in once there was room");
        blocked.join().expect("sink thread");
        let nonces: Vec<String> = rx.try_iter().map(|r| r.nonce).collect();
        assert_eq!(nonces, ["00000001", "00000003"]);

        // The writer's summary line.
        let mut w = Writer {
            logdir: dir.clone(),
            inet: "127.0.0.1:3333".into(),
            files: Vec::new(),
            counters: Arc::clone(&counters),
            pending_bytes: 0,
            pending_max: PENDING_MAX,
            failing: None,
            last_warning: None,
        };
        w.write_summary();
        let text = fs::read_to_string(dir.join("sharelog.summary")).expect("summary");
        let v: serde_json::Value = serde_json::from_str(text.trim()).expect("json");
        assert_eq!(v["rejected"]["Stale"], 2);
        // Counted once: a second summary has nothing to say.
        w.write_summary();
        assert_eq!(
            fs::read_to_string(dir.join("sharelog.summary"))
                .expect("summary")
                .lines()
                .count(),
            1
        );
        let _ = fs::remove_dir_all(&dir);
    }

    /// Runs `f` on a thread; whether it returned within `wait`, and a receiver that says when
    /// it does.
    fn call_on_thread(
        f: impl FnOnce() + Send + 'static,
        wait: Duration,
    ) -> (bool, crossbeam_channel::Receiver<()>) {
        let (done_tx, done) = crossbeam_channel::bounded(1);
        thread::spawn(move || {
            f();
            let _ = done_tx.send(());
        });
        (done.recv_timeout(wait).is_ok(), done)
    }

    #[test]
    fn a_failing_disk_at_the_memory_bound_holds_accepted_shares_back_until_it_is_fixed() {
        let dir = temp_dir("bound");
        fs::create_dir_all(&dir).expect("dir");
        let blocker = dir.join("00000065");
        fs::write(&blocker, b"in the way").expect("blocker");
        let shutdown = Arc::new(AtomicBool::new(false));
        // A queue of 2, and one line in memory is the bound.
        let log = ShareLog::start_in(dir.clone(), String::new(), Arc::clone(&shutdown), (2, 1))
            .expect("start");
        let sink = Arc::new(log.sink());
        let stats = log.stats_handle();
        sink(record(7, 0));
        wait_for("the first line kept after a failed write", || {
            let s = stats.snapshot();
            s.write_errors >= 1 && s.pending == 1
        });
        // The writer takes no more: two fill the queue, the next accepted share waits.
        sink(record(7, 1));
        sink(record(7, 2));
        let s = Arc::clone(&sink);
        let (returned, done) = call_on_thread(move || s(record(7, 3)), Duration::from_millis(500));
        assert!(!returned, "an accepted share was not held back");
        assert_eq!(stats.snapshot().pending, 3);
        // A rejected one is summarised instead of waiting.
        let mut stale = record(7, 4);
        stale.result = false;
        stale.reject_reason = Some(Reject::Stale);
        let s = Arc::clone(&sink);
        let (returned, _) = call_on_thread(move || s(stale), Duration::from_secs(10));
        assert!(returned, "a rejected share waited");
        assert_eq!(stats.snapshot().rejects_summarised, 1);

        fs::remove_file(&blocker).expect("unblock");
        done.recv_timeout(Duration::from_secs(20))
            .expect("the held share went in once the disk was fixed");
        wait_for("everything written", || stats.snapshot().written == 4);
        log.stop();
        let text = fs::read_to_string(dir.join(format!("00000065/{:016x}.sharelog", 7)))
            .expect("share log file");
        assert_eq!(text.lines().count(), 4);
        let summary = fs::read_to_string(dir.join("sharelog.summary")).expect("summary");
        assert!(summary.contains(r#""Stale":1"#), "{summary}");
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn at_shutdown_held_shares_are_taken_whatever_the_bound() {
        let dir = temp_dir("shutdown");
        fs::create_dir_all(&dir).expect("dir");
        let blocker = dir.join("00000065");
        fs::write(&blocker, b"in the way").expect("blocker");
        let shutdown = Arc::new(AtomicBool::new(false));
        let log = ShareLog::start_in(dir.clone(), String::new(), Arc::clone(&shutdown), (1, 1))
            .expect("start");
        let sink = Arc::new(log.sink());
        let stats = log.stats_handle();
        sink(record(7, 0));
        wait_for("a failed write", || stats.snapshot().write_errors >= 1);
        sink(record(7, 1));
        let s = Arc::clone(&sink);
        let (returned, done) = call_on_thread(move || s(record(7, 2)), Duration::from_millis(500));
        assert!(!returned, "an accepted share was not held back");
        // The daemon stops: the connector threads must not stay blocked.
        shutdown.store(true, Ordering::Relaxed);
        done.recv_timeout(Duration::from_secs(10))
            .expect("the sink returned once shutdown began");
        // The writer counts the last record pending once it has taken it from the queue.
        wait_for("three records pending", || stats.snapshot().pending == 3);
        // Fixed in time: stop writes all of it.
        fs::remove_file(&blocker).expect("unblock");
        log.stop();
        let text = fs::read_to_string(dir.join(format!("00000065/{:016x}.sharelog", 7)))
            .expect("share log file");
        assert_eq!(text.lines().count(), 3);
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_failing_disk_is_warned_about_once_a_minute_and_its_end_said() {
        use std::sync::Mutex;

        #[derive(Clone, Default)]
        struct Buf(Arc<Mutex<Vec<u8>>>);
        impl io::Write for Buf {
            fn write(&mut self, b: &[u8]) -> io::Result<usize> {
                self.0.lock().expect("not poisoned").extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let buf = Buf::default();
        let out = buf.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_writer(move || out.clone())
            .finish();
        let mut w = Writer {
            logdir: PathBuf::from("/nonexistent"),
            inet: String::new(),
            files: Vec::new(),
            counters: Arc::new(Counters::default()),
            pending_bytes: 1,
            pending_max: PENDING_MAX,
            failing: None,
            last_warning: None,
        };
        let e = io::Error::from(io::ErrorKind::StorageFull);
        tracing::subscriber::with_default(subscriber, || {
            for _ in 0..5 {
                w.failed(std::path::Path::new("/x"), &e);
            }
            // A minute on, it is said again.
            w.last_warning = w.last_warning.and_then(|t| t.checked_sub(WARN_EVERY));
            w.failed(std::path::Path::new("/x"), &e);
            w.pending_bytes = 0;
            w.recovered();
        });
        let text = String::from_utf8(buf.0.lock().expect("not poisoned").clone()).expect("utf8");
        assert_eq!(
            text.matches("cannot write the share log").count(),
            2,
            "{text}"
        );
        assert_eq!(text.matches("share log written again").count(), 1, "{text}");
        assert_eq!(w.counters.write_errors.load(Ordering::Relaxed), 6);
        assert!(w.failing.is_none());
    }
}
