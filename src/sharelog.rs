//! The share log (`-L`): one JSON line per share, written by its own thread so the share path
//! never waits on the disk. Files are `<logdir>/<height %08x>/<job id %016x>.sharelog`, as ckpool's.

use std::fs::{self, File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::thread;

use crossbeam_channel::{Receiver, Sender, select};
use stratifier::ShareRecord;
use tracing::{error, warn};

/// Lines queued for the writer at most; beyond it a line is dropped (and a warning logged).
const QUEUE: usize = 65_536;

/// The running share-log writer; [`ShareLog::stop`] writes what is queued and ends it.
pub(crate) struct ShareLog {
    tx: Sender<ShareRecord>,
    stop: Sender<()>,
    thread: thread::JoinHandle<()>,
}

/// The stratifier's share sink.
pub(crate) type ShareSink = Box<dyn Fn(ShareRecord) + Send + Sync>;

impl ShareLog {
    /// Starts the writer thread.
    pub(crate) fn start(logdir: PathBuf) -> std::io::Result<Self> {
        let (tx, rx) = crossbeam_channel::bounded::<ShareRecord>(QUEUE);
        let (stop, stopped) = crossbeam_channel::bounded::<()>(0);
        let thread = thread::Builder::new()
            .name("sharelog".into())
            .spawn(move || run(&logdir, &rx, &stopped))?;
        Ok(Self { tx, stop, thread })
    }

    /// The sink for `stratifier::Pool::new`: queues a record, never blocks.
    pub(crate) fn sink(&self) -> ShareSink {
        let tx = self.tx.clone();
        Box::new(move |rec| {
            if tx.try_send(rec).is_err() {
                warn!("share log queue full; a share log line was dropped");
            }
        })
    }

    /// Writes every record queued so far, flushes, and waits for the thread. Records queued
    /// after this are dropped.
    pub(crate) fn stop(self) {
        drop(self.stop);
        if self.thread.join().is_err() {
            error!("the share log thread panicked");
        }
    }
}

fn run(logdir: &Path, rx: &Receiver<ShareRecord>, stopped: &Receiver<()>) {
    let mut file = LogFile {
        logdir,
        current: None,
    };
    loop {
        select! {
            recv(rx) -> rec => match rec {
                Ok(rec) => {
                    file.write(&rec);
                    if rx.is_empty() {
                        file.flush();
                    }
                }
                Err(_) => break,
            },
            recv(stopped) -> _ => {
                for rec in rx.try_iter() {
                    file.write(&rec);
                }
                break;
            }
        }
    }
    file.flush();
}

/// The share-log file being appended to.
struct LogFile<'a> {
    logdir: &'a Path,
    /// The job id whose file is open, and the file.
    current: Option<(u64, BufWriter<File>)>,
}

impl LogFile<'_> {
    fn write(&mut self, rec: &ShareRecord) {
        if self
            .current
            .as_ref()
            .is_none_or(|(id, _)| *id != rec.workinfoid)
        {
            self.flush();
            self.current = None;
            let dir = self.logdir.join(format!("{:08x}", rec.height));
            let path = dir.join(format!("{:016x}.sharelog", rec.workinfoid));
            match fs::create_dir_all(&dir)
                .and_then(|()| OpenOptions::new().create(true).append(true).open(&path))
            {
                Ok(f) => self.current = Some((rec.workinfoid, BufWriter::new(f))),
                Err(e) => {
                    error!(path = %path.display(), error = %e, "cannot open share log");
                    return;
                }
            }
        }
        if let Some((_, w)) = self.current.as_mut() {
            let ok = serde_json::to_writer(&mut *w, rec).is_ok() && w.write_all(b"\n").is_ok();
            if !ok {
                error!("share log write failed");
            }
        }
    }

    fn flush(&mut self) {
        if let Some((_, w)) = self.current.as_mut()
            && let Err(e) = w.flush()
        {
            error!(error = %e, "share log flush failed");
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
    fn stop_writes_every_queued_record_before_returning() {
        let dir = std::env::temp_dir().join(format!(
            "ckpool-rs-sharelog-{}-{:?}",
            std::process::id(),
            thread::current().id()
        ));
        let _ = fs::remove_dir_all(&dir);
        let log = ShareLog::start(dir.clone()).expect("start");
        let sink = log.sink();
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
        // After stop, the sink drops records (and does not block).
        sink(record(9, 0));
        assert!(!dir.join(format!("00000065/{:016x}.sharelog", 9)).exists());
        let _ = fs::remove_dir_all(&dir);
    }
}
