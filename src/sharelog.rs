//! The share log (`-L`): one JSON line per share, written by its own thread so the share path
//! never waits on the disk. Files are `<logdir>/<height %08x>/<job id %016x>.sharelog`, as ckpool's.

use std::fs::{self, File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::PathBuf;
use std::thread;

use crossbeam_channel::{Receiver, Sender};
use stratifier::ShareRecord;
use tracing::error;

/// Starts the writer; returns the sender the stratifier's share sink feeds.
pub(crate) fn start(
    logdir: PathBuf,
) -> std::io::Result<(Sender<ShareRecord>, thread::JoinHandle<()>)> {
    let (tx, rx) = crossbeam_channel::bounded::<ShareRecord>(65_536);
    let handle = thread::Builder::new()
        .name("sharelog".into())
        .spawn(move || run(&logdir, &rx))?;
    Ok((tx, handle))
}

fn run(logdir: &std::path::Path, rx: &Receiver<ShareRecord>) {
    let mut current: Option<(u64, BufWriter<File>)> = None;
    while let Ok(rec) = rx.recv() {
        if current.as_ref().is_none_or(|(id, _)| *id != rec.workinfoid) {
            if let Some((_, mut w)) = current.take() {
                let _ = w.flush();
            }
            let dir = logdir.join(format!("{:08x}", rec.height));
            let path = dir.join(format!("{:016x}.sharelog", rec.workinfoid));
            match fs::create_dir_all(&dir)
                .and_then(|()| OpenOptions::new().create(true).append(true).open(&path))
            {
                Ok(f) => current = Some((rec.workinfoid, BufWriter::new(f))),
                Err(e) => {
                    error!(path = %path.display(), error = %e, "cannot open share log");
                    continue;
                }
            }
        }
        if let Some((_, w)) = current.as_mut() {
            let ok = serde_json::to_writer(&mut *w, &rec).is_ok() && w.write_all(b"\n").is_ok();
            if !ok {
                error!("share log write failed");
            }
            if rx.is_empty() {
                let _ = w.flush();
            }
        }
    }
    if let Some((_, mut w)) = current {
        let _ = w.flush();
    }
}
