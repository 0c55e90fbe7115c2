//! The daemon's log: `tracing` events to stderr and, once the settings are known,
//! to `<logdir>/<name>.log` (with `-D`, to the file only), as ckpool's.
//!
//! - **Never blocks the caller.** Each formatted line goes through a bounded queue to one writer
//!   thread; when the queue is full the line is dropped and counted, and the writer logs how many
//!   it dropped once it catches up ([`dropped`]).
//! - **No forged lines.** Every field value and message is escaped as it is formatted
//!   ([`EscapingFields`]): a newline, carriage return, escape (a terminal control sequence), any
//!   other C0 or C1 control character, DEL and the Unicode line and paragraph separators come
//!   out as `\n`, `\r`, `\x1b`... so a peer's user agent or worker name cannot start a line of its
//!   own or drive the operator's terminal. No call site has to remember it.
//! - **Rotation.** SIGHUP (and the admin `loglevel` command) reopen the file by its name, so an
//!   external `logrotate` can move it away without `copytruncate`; it is also reopened every
//!   minute, as ckpool's is, which picks up a rotation nobody signalled (and retries a file
//!   that could not be opened). A `logrotate` stanza:
//!
//! ```text
//! /var/log/ckpool/ckpool.log {
//!     daily
//!     rotate 14
//!     compress
//!     delaycompress
//!     missingok
//!     notifempty
//!     postrotate
//!         kill -HUP "$(cat /tmp/ckpool/main.pid)" 2>/dev/null || true
//!     endscript
//! }
//! ```
//!
//! (`/tmp/ckpool/` is the socket directory, `-s`, where the pid file `main.pid` lives; the log
//! file is `<logdir>/<name>.log`.) Lines written between the rename and the signal still go to
//! the renamed file (hence `delaycompress`); none is lost. The file is reopened within 200 ms of
//! the signal.
//!
//! Failures of the file (open, write, flush) are counted ([`write_errors`], admin `stats` key
//! `log_write_errors`) and said on stderr at most once a minute; dropped lines are in admin
//! `stats` as `log_dropped`.

use std::fmt::{self, Write as _};
use std::fs::{File, OpenOptions};
use std::io::{self, Write as _};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TrySendError};
use tracing::field::{Field, Visit};
use tracing_subscriber::field::RecordFields;
use tracing_subscriber::fmt::FormatFields;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{EnvFilter, Registry, reload};

/// Lines queued for the writer thread at most; beyond it a line is dropped and counted.
const QUEUE: usize = 8192;
/// Lines kept from before the log file is opened, to be written to it once it is.
const EARLY_LINES: usize = 1024;
/// How often the writer thread looks at the reopen flag and the drop counter when idle.
const WAKE: Duration = Duration::from_millis(200);
/// The file is reopened by its name this often even without a signal, as ckpool's is.
const REOPEN_EVERY: Duration = Duration::from_secs(60);
/// How long [`LogGuard`]'s drop waits for the queued lines to be written.
const FINAL_FLUSH: Duration = Duration::from_secs(2);

/// Keeps the writer thread; dropping it writes out every queued line (waiting at most two
/// seconds) and stops the thread. Lines logged after that are dropped.
#[must_use = "dropping the guard stops the log writer"]
pub(crate) struct LogGuard {
    thread: Option<thread::JoinHandle<()>>,
}

impl Drop for LogGuard {
    fn drop(&mut self) {
        let Some(ctl) = CONTROL.get() else { return };
        let (ack, acked) = crossbeam_channel::bounded(1);
        if ctl.tx.send_timeout(Msg::Stop(ack), FINAL_FLUSH).is_ok() {
            let _ = acked.recv_timeout(FINAL_FLUSH);
        }
        if let Some(t) = self.thread.take()
            && t.is_finished()
        {
            let _ = t.join();
        }
    }
}

/// Starts logging at ckpool's `-l` level (0-7 as syslog; `RUST_LOG` overrides it) to stderr
/// when `stderr` is set; [`open_file`] adds the log file. Returns `None` if a logger was
/// already installed (then this call changes nothing).
pub(crate) fn init(level: u8, stderr: bool) -> Option<LogGuard> {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| level_filter(level));
    let (filter, handle) = reload::Layer::new(filter);
    let (tx, rx) = crossbeam_channel::bounded(QUEUE);
    let dropped = Arc::new(AtomicU64::new(0));
    let reopen = Arc::new(AtomicBool::new(false));
    let errors = Arc::new(AtomicU64::new(0));
    let layer = tracing_subscriber::fmt::layer()
        .with_ansi(false)
        .fmt_fields(EscapingFields)
        .with_writer(QueueWriter {
            tx: tx.clone(),
            dropped: Arc::clone(&dropped),
        });
    tracing_subscriber::registry()
        .with(filter)
        .with(layer)
        .try_init()
        .ok()?;
    let control = Control {
        tx,
        dropped: Arc::clone(&dropped),
        reopen: Arc::clone(&reopen),
        errors: Arc::clone(&errors),
        filter: handle,
    };
    CONTROL.set(control).ok()?;
    let out = Outputs {
        stderr,
        file: None,
        opened: Instant::now(),
        reopen_every: REOPEN_EVERY,
        early: Some(Vec::new()),
        errors,
        last_said: None,
    };
    let thread = thread::Builder::new()
        .name("logger".into())
        .spawn(move || run(&rx, out, &dropped, &reopen))
        .ok();
    if thread.is_none() {
        eprintln!("ckpool-rs: cannot start the log writer thread; logging is off");
    }
    Some(LogGuard { thread })
}

/// Starts writing to the log file `path` too (creating its directory), with the lines logged
/// so far (up to a thousand). The file is opened for appending; if it cannot be, that is
/// counted and said on stderr, and the next reopen (within a minute) tries again.
pub(crate) fn open_file(path: PathBuf) {
    if let Some(ctl) = CONTROL.get() {
        // Blocks only while the writer thread catches up: this is not a connector thread.
        let _ = ctl.tx.send(Msg::OpenFile(path));
    }
}

/// The flag SIGHUP sets to have the log file reopened by its name (see the module's
/// documentation); a flag that nothing reads if logging is not initialised.
pub(crate) fn reopen_flag() -> Arc<AtomicBool> {
    CONTROL.get().map_or_else(
        || Arc::new(AtomicBool::new(false)),
        |c| Arc::clone(&c.reopen),
    )
}

/// Has the log file reopened by its name, as SIGHUP does.
pub(crate) fn reopen() {
    if let Some(ctl) = CONTROL.get() {
        ctl.reopen.store(true, Ordering::Relaxed);
    }
}

/// Sets the level as `-l` does (0-7), overriding `RUST_LOG`. False if it is out of range or
/// logging is not initialised.
pub(crate) fn set_level(level: u8) -> bool {
    level <= 7
        && CONTROL
            .get()
            .is_some_and(|c| c.filter.reload(level_filter(level)).is_ok())
}

/// How many lines were dropped so far because the queue to the writer thread was full.
pub(crate) fn dropped() -> u64 {
    CONTROL
        .get()
        .map_or(0, |c| c.dropped.load(Ordering::Relaxed))
}

/// How many times opening, writing or flushing the log file failed so far.
pub(crate) fn write_errors() -> u64 {
    CONTROL
        .get()
        .map_or(0, |c| c.errors.load(Ordering::Relaxed))
}

/// ckpool's syslog-like `-l` level as a filter.
fn level_filter(level: u8) -> EnvFilter {
    EnvFilter::new(match level {
        0..=3 => "error",
        4 => "warn",
        5 | 6 => "info",
        _ => "debug",
    })
}

/// What the rest of the daemon reaches the writer thread through.
struct Control {
    tx: Sender<Msg>,
    dropped: Arc<AtomicU64>,
    reopen: Arc<AtomicBool>,
    errors: Arc<AtomicU64>,
    filter: reload::Handle<EnvFilter, Registry>,
}

static CONTROL: OnceLock<Control> = OnceLock::new();

enum Msg {
    /// One formatted line, newline included.
    Line(Vec<u8>),
    /// Start writing to this file.
    OpenFile(PathBuf),
    /// Write out everything, acknowledge, and end.
    Stop(Sender<()>),
}

/// The `MakeWriter`: hands each formatted event to the queue, never waiting.
struct QueueWriter {
    tx: Sender<Msg>,
    dropped: Arc<AtomicU64>,
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for QueueWriter {
    type Writer = &'a Self;

    fn make_writer(&'a self) -> Self::Writer {
        self
    }
}

impl io::Write for &QueueWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        // The formatter writes each event whole, in one call.
        match self.tx.try_send(Msg::Line(buf.to_vec())) {
            Ok(()) | Err(TrySendError::Disconnected(_)) => {}
            Err(TrySendError::Full(_)) => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Where lines go: stderr, the file, and lines kept until the file is opened.
struct Outputs {
    stderr: bool,
    file: Option<(PathBuf, Option<io::BufWriter<File>>)>,
    /// When the file was last (re)opened.
    opened: Instant,
    /// [`REOPEN_EVERY`].
    reopen_every: Duration,
    /// Lines from before the file was named (`None` once it has been).
    early: Option<Vec<Vec<u8>>>,
    /// Failed opens, writes and flushes of the file ([`write_errors`]).
    errors: Arc<AtomicU64>,
    /// When a file error was last said on stderr.
    last_said: Option<Instant>,
}

impl Outputs {
    fn write(&mut self, line: &[u8]) {
        if self.stderr {
            let _ = io::stderr().lock().write_all(line);
        }
        if let Some((path, Some(f))) = &mut self.file
            && let Err(e) = f.write_all(line)
        {
            let path = path.clone();
            self.file_error(&path, &e);
        }
        if let Some(early) = &mut self.early
            && early.len() < EARLY_LINES
        {
            early.push(line.to_vec());
        }
    }

    fn flush(&mut self) {
        if let Some((path, Some(f))) = &mut self.file
            && let Err(e) = f.flush()
        {
            let path = path.clone();
            self.file_error(&path, &e);
        }
    }

    /// Counts a failure of the log file, and says it on stderr at most once a minute (it
    /// cannot go to the file).
    fn file_error(&mut self, path: &std::path::Path, e: &io::Error) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        let now = Instant::now();
        if self
            .last_said
            .is_none_or(|t| now.duration_since(t) >= Duration::from_secs(60))
        {
            self.last_said = Some(now);
            eprintln!("ckpool-rs: log file {}: {e}", path.display());
        }
    }

    /// (Re)opens the file by its name; the old handle is flushed and closed.
    fn open(&mut self, path: PathBuf) {
        self.flush();
        let file = path
            .parent()
            .map_or(Ok(()), std::fs::create_dir_all)
            .and_then(|()| OpenOptions::new().create(true).append(true).open(&path));
        self.opened = Instant::now();
        let file = match file {
            Ok(f) => Some(io::BufWriter::new(f)),
            Err(e) => {
                // The next reopen, at the latest a minute on, tries again.
                self.file_error(&path, &e);
                None
            }
        };
        self.file = Some((path, file));
        // Kept while the file cannot be opened, for the next try.
        if let Some((_, Some(f))) = &mut self.file
            && let Some(early) = self.early.take()
        {
            for line in early {
                if f.write_all(&line).is_err() {
                    break;
                }
            }
        }
        self.flush();
    }

    /// Reopens the file by its name: `say` logs it (on a signal or command, not every minute).
    fn reopen(&mut self, say: bool) {
        if let Some((path, _)) = &self.file {
            let path = path.clone();
            self.open(path.clone());
            if say {
                tracing::info!(path = %path.display(), "log file reopened");
            }
        }
    }
}

fn run(rx: &Receiver<Msg>, mut out: Outputs, dropped: &AtomicU64, reopen: &AtomicBool) {
    let mut reported = 0;
    let mut last_report = Instant::now();
    loop {
        match rx.recv_timeout(WAKE) {
            Ok(Msg::Line(line)) => {
                out.write(&line);
                // Write what else is queued, then flush once.
                for msg in rx.try_iter().take(QUEUE) {
                    match msg {
                        Msg::Line(line) => out.write(&line),
                        Msg::OpenFile(path) => out.open(path),
                        Msg::Stop(ack) => return stop(rx, &mut out, &ack),
                    }
                }
                out.flush();
            }
            Ok(Msg::OpenFile(path)) => out.open(path),
            Ok(Msg::Stop(ack)) => return stop(rx, &mut out, &ack),
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => break,
        }
        if reopen.swap(false, Ordering::Relaxed) {
            out.reopen(true);
        } else if out.opened.elapsed() >= out.reopen_every {
            // As ckpool: a rotation without a signal is picked up within a minute.
            out.reopen(false);
        }
        let d = dropped.load(Ordering::Relaxed);
        if d > reported && last_report.elapsed() >= Duration::from_secs(1) {
            tracing::warn!(
                dropped = d - reported,
                total = d,
                "log lines dropped: the log queue was full"
            );
            reported = d;
            last_report = Instant::now();
        }
    }
    out.flush();
}

fn stop(rx: &Receiver<Msg>, out: &mut Outputs, ack: &Sender<()>) {
    for msg in rx.try_iter() {
        match msg {
            Msg::Line(line) => out.write(&line),
            Msg::OpenFile(path) => out.open(path),
            Msg::Stop(_) => {}
        }
    }
    out.flush();
    let _ = ack.send(());
}

/// Formats an event's or span's fields as tracing's default formatter does (`message`, then
/// `name=value`), with every control character escaped (see the module's documentation).
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct EscapingFields;

impl<'w> FormatFields<'w> for EscapingFields {
    fn format_fields<R: RecordFields>(&self, writer: Writer<'w>, fields: R) -> fmt::Result {
        let mut v = EscapingVisitor {
            out: Escaper(writer),
            first: true,
            result: Ok(()),
        };
        fields.record(&mut v);
        v.result
    }

    fn add_fields(
        &self,
        current: &'w mut tracing_subscriber::fmt::FormattedFields<Self>,
        fields: &tracing::span::Record<'_>,
    ) -> fmt::Result {
        let empty = current.fields.is_empty();
        let mut v = EscapingVisitor {
            out: Escaper(current.as_writer()),
            first: empty,
            result: Ok(()),
        };
        fields.record(&mut v);
        v.result
    }
}

struct EscapingVisitor<'w> {
    out: Escaper<Writer<'w>>,
    first: bool,
    result: fmt::Result,
}

impl EscapingVisitor<'_> {
    fn put(&mut self, field: &Field, value: fmt::Arguments<'_>) {
        if self.result.is_err() || field.name().starts_with("log.") {
            // `log.*`: where a `log` crate record came from, as the default formatter hides.
            return;
        }
        let sep = if self.first { "" } else { " " };
        self.first = false;
        let name = field.name();
        self.result = if name == "message" {
            self.out
                .0
                .write_str(sep)
                .and_then(|()| self.out.write_fmt(value))
        } else {
            let name = name.strip_prefix("r#").unwrap_or(name);
            write!(self.out.0, "{sep}{name}=").and_then(|()| self.out.write_fmt(value))
        };
    }
}

impl Visit for EscapingVisitor<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.put(field, format_args!("{value}"));
        } else {
            self.put(field, format_args!("{value:?}"));
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.put(field, format_args!("{value:?}"));
    }
}

/// Writes through to `W`, escaping what could break a line or drive a terminal.
struct Escaper<W>(W);

impl<W: fmt::Write> fmt::Write for Escaper<W> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let mut rest = s;
        while let Some((i, c)) = rest.char_indices().find(|&(_, c)| needs_escape(c)) {
            self.0.write_str(rest.get(..i).unwrap_or_default())?;
            match c {
                '\n' => self.0.write_str("\\n")?,
                '\r' => self.0.write_str("\\r")?,
                '\t' => self.0.write_str("\\t")?,
                c if u32::from(c) < 0x100 => write!(self.0, "\\x{:02x}", u32::from(c))?,
                c => write!(self.0, "\\u{{{:x}}}", u32::from(c))?,
            }
            rest = rest.get(i + c.len_utf8()..).unwrap_or_default();
        }
        self.0.write_str(rest)
    }
}

/// C0 and C1 control characters, DEL, and the Unicode line and paragraph separators.
fn needs_escape(c: char) -> bool {
    c.is_control() || c == '\u{2028}' || c == '\u{2029}'
}

#[cfg(test)]
mod tests {
    use super::*;

    fn escaped(s: &str) -> String {
        let mut out = Escaper(String::new());
        out.write_str(s).expect("a String never fails");
        out.0
    }

    #[test]
    fn control_characters_are_escaped_and_the_rest_kept() {
        assert_eq!(escaped("cgminer/4.9"), "cgminer/4.9");
        assert_eq!(
            escaped("a\nb\rc\td\u{1b}[31me\u{7f}\u{0}"),
            "a\\nb\\rc\\td\\x1b[31me\\x7f\\x00"
        );
        // C1 (NEL, CSI), the Unicode separators; other non-ASCII text stays.
        assert_eq!(
            escaped("\u{85}\u{9b}x\u{2028}\u{2029}é€"),
            "\\x85\\x9bx\\u{2028}\\u{2029}é€"
        );
        assert!(!escaped("\n\u{1b}\u{9b}").chars().any(char::is_control));
    }

    #[test]
    fn every_field_and_the_message_are_escaped_by_the_formatter() {
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
            .fmt_fields(EscapingFields)
            .with_writer(move || out.clone())
            .finish();
        let agent = "evil\n[2026-01-01] ERROR forged\u{1b}[31m";
        let worker = "u.w\r\nfake";
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!("conn", peer = %"1.2.3.4\n");
            let _e = span.enter();
            tracing::info!(agent = %agent, worker, "authorised {}", "x\ny");
        });
        let text = String::from_utf8(buf.0.lock().expect("not poisoned").clone()).expect("utf8");
        assert_eq!(text.lines().count(), 1, "{text:?}");
        assert!(!text.contains('\u{1b}') && !text.contains('\r'), "{text:?}");
        assert!(
            text.contains(r"agent=evil\n[2026-01-01] ERROR forged\x1b[31m"),
            "{text:?}"
        );
        assert!(text.contains(r#"worker="u.w\r\nfake""#), "{text:?}");
        assert!(text.contains(r"authorised x\ny"), "{text:?}");
        assert!(text.contains(r"peer=1.2.3.4\n"), "{text:?}");
    }

    #[test]
    fn a_full_queue_drops_and_counts_instead_of_blocking() {
        let (tx, rx) = crossbeam_channel::bounded(2);
        let dropped = Arc::new(AtomicU64::new(0));
        let w = QueueWriter {
            tx,
            dropped: Arc::clone(&dropped),
        };
        for n in 0..5 {
            assert_eq!(
                (&w).write(format!("line {n}\n").as_bytes())
                    .expect("never fails"),
                7
            );
        }
        assert_eq!(dropped.load(Ordering::Relaxed), 3);
        let kept: Vec<Vec<u8>> = rx
            .try_iter()
            .filter_map(|m| match m {
                Msg::Line(l) => Some(l),
                _ => None,
            })
            .collect();
        assert_eq!(kept, [b"line 0\n".to_vec(), b"line 1\n".to_vec()]);
    }

    #[test]
    fn the_file_gets_the_early_lines_and_is_reopened_by_name() {
        let dir = std::env::temp_dir().join(format!("ckpool-rs-logging-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let path = dir.join("logs/pool.log");
        let (tx, rx) = crossbeam_channel::bounded(16);
        let dropped = Arc::new(AtomicU64::new(0));
        let reopen = Arc::new(AtomicBool::new(false));
        let out = Outputs {
            stderr: false,
            file: None,
            opened: Instant::now(),
            reopen_every: REOPEN_EVERY,
            early: Some(Vec::new()),
            errors: Arc::new(AtomicU64::new(0)),
            last_said: None,
        };
        let thread = {
            let (dropped, reopen) = (Arc::clone(&dropped), Arc::clone(&reopen));
            thread::spawn(move || run(&rx, out, &dropped, &reopen))
        };
        let send = |m| tx.send(m).expect("writer alive");
        send(Msg::Line(b"early\n".to_vec()));
        send(Msg::OpenFile(path.clone()));
        send(Msg::Line(b"first\n".to_vec()));
        let read = |p: &std::path::Path| std::fs::read_to_string(p).unwrap_or_default();
        let deadline = Instant::now() + Duration::from_secs(10);
        while read(&path) != "early\nfirst\n" {
            assert!(Instant::now() < deadline, "{:?}", read(&path));
            thread::sleep(Duration::from_millis(5));
        }
        // logrotate: move the file away, then signal.
        let rotated = dir.join("logs/pool.log.1");
        std::fs::rename(&path, &rotated).expect("rename");
        send(Msg::Line(b"to the old file\n".to_vec()));
        while !read(&rotated).ends_with("old file\n") {
            assert!(Instant::now() < deadline, "{:?}", read(&rotated));
            thread::sleep(Duration::from_millis(5));
        }
        reopen.store(true, Ordering::Relaxed);
        while !path.exists() {
            assert!(Instant::now() < deadline, "not reopened");
            thread::sleep(Duration::from_millis(5));
        }
        send(Msg::Line(b"second\n".to_vec()));
        let (ack, acked) = crossbeam_channel::bounded(1);
        send(Msg::Stop(ack));
        acked
            .recv_timeout(Duration::from_secs(10))
            .expect("stopped");
        thread.join().expect("writer thread");
        assert_eq!(read(&rotated), "early\nfirst\nto the old file\n");
        assert!(read(&path).ends_with("second\n"), "{:?}", read(&path));
        assert!(!read(&path).contains("first"));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_file_is_reopened_every_interval_unasked_and_its_failures_counted() {
        let dir = std::env::temp_dir().join(format!("ckpool-rs-logging-r-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        // A file where the log's directory should be: the first open fails.
        std::fs::write(dir.join("logs"), b"in the way").expect("blocker");
        let path = dir.join("logs/pool.log");
        let (tx, rx) = crossbeam_channel::bounded(16);
        let errors = Arc::new(AtomicU64::new(0));
        let out = Outputs {
            stderr: false,
            file: None,
            opened: Instant::now(),
            reopen_every: Duration::from_millis(100),
            early: Some(Vec::new()),
            errors: Arc::clone(&errors),
            last_said: None,
        };
        let thread = thread::spawn(move || {
            run(&rx, out, &AtomicU64::new(0), &AtomicBool::new(false));
        });
        let send = |m| tx.send(m).expect("writer alive");
        send(Msg::Line(b"kept\n".to_vec()));
        send(Msg::OpenFile(path.clone()));
        let read = |p: &std::path::Path| std::fs::read_to_string(p).unwrap_or_default();
        let deadline = Instant::now() + Duration::from_secs(10);
        while errors.load(Ordering::Relaxed) == 0 {
            assert!(Instant::now() < deadline, "the failed open not counted");
            thread::sleep(Duration::from_millis(5));
        }
        // Fixed: a later periodic reopen gets the file, with no signal.
        std::fs::remove_file(dir.join("logs")).expect("unblock");
        while !path.exists() {
            assert!(Instant::now() < deadline, "not retried");
            thread::sleep(Duration::from_millis(5));
        }
        send(Msg::Line(b"first\n".to_vec()));
        while !read(&path).contains("first") {
            assert!(Instant::now() < deadline, "{:?}", read(&path));
            thread::sleep(Duration::from_millis(5));
        }
        // Rotated without a signal: the next periodic reopen makes a new file.
        let rotated = dir.join("logs/pool.log.1");
        std::fs::rename(&path, &rotated).expect("rename");
        while !path.exists() {
            assert!(Instant::now() < deadline, "not reopened");
            thread::sleep(Duration::from_millis(5));
        }
        send(Msg::Line(b"second\n".to_vec()));
        let (ack, acked) = crossbeam_channel::bounded(1);
        send(Msg::Stop(ack));
        acked
            .recv_timeout(Duration::from_secs(10))
            .expect("stopped");
        thread.join().expect("writer thread");
        assert_eq!(
            read(&rotated),
            "kept\nfirst\n",
            "early lines wait for the file"
        );
        assert_eq!(read(&path), "second\n");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
