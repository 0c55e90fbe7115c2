//! Durable block candidates: one file per solved block in `GeneratorConfig::block_dir`.
//!
//! A block is written to `<block_dir>/<height>-<hash>.hex` (the block hex, nothing else) and
//! fsynced, file and directory, before its first `submitblock`. The file is *pending* while its
//! name ends in `.hex`; once the block is settled it is renamed, keeping the hex, by appending
//! one suffix that says how:
//!
//! - `.done`: a node has the block (`submitblock` said `null`, `duplicate` or `inconclusive`, or
//!   `getblockheader` knows the hash);
//! - `.stale`: given up because the best chain moved past its height without it;
//! - `.rejected`: a node refused it outright (`high-hash`, `bad-txnmrklroot`, a decode error…).
//!
//! Only pending files are submitted again at start-up. A file is first written as
//! `.<name>.tmp` and renamed into place, so a crash mid-write never leaves a truncated `.hex`.
//!
//! The file operations run on their own thread (`gen-blockfile`, [`FileThread`]) so that a disk
//! that hangs never holds a submission up for longer than [`WRITE_WAIT`].

use std::fs::{self, File};
use std::io::{self, Write as _};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TryRecvError, bounded};

use crate::BlockSubmission;

/// The suffix of a pending block file.
pub(crate) const PENDING_SUFFIX: &str = ".hex";

/// Longest the submitter waits for a block file to be on disk before it submits anyway.
pub(crate) const WRITE_WAIT: Duration = Duration::from_secs(2);

/// How a block file is settled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Settled {
    /// A node has the block.
    Done,
    /// The chain moved past its height without it.
    Stale,
    /// A node refused it.
    Rejected,
}

impl Settled {
    /// What is appended to the pending name.
    pub(crate) fn suffix(self) -> &'static str {
        match self {
            Self::Done => ".done",
            Self::Stale => ".stale",
            Self::Rejected => ".rejected",
        }
    }
}

/// Whether `hash` is 64 hex digits (so it is safe in a file name).
pub(crate) fn is_hash(hash: &str) -> bool {
    hash.len() == 64 && hash.bytes().all(|b| b.is_ascii_hexdigit())
}

/// `<height>-<hash>.hex`, or `None` when `hash` is not 64 hex digits.
pub(crate) fn pending_name(height: u64, hash: &str) -> Option<String> {
    is_hash(hash).then(|| format!("{height}-{}{PENDING_SUFFIX}", hash.to_ascii_lowercase()))
}

/// Reads a pending file name back into `(height, hash)`; `None` for any other name (settled,
/// temporary, or foreign files).
pub(crate) fn parse_pending_name(name: &str) -> Option<(u64, String)> {
    let stem = name.strip_suffix(PENDING_SUFFIX)?;
    let (height, hash) = stem.split_once('-')?;
    if height.is_empty() || !height.bytes().all(|b| b.is_ascii_digit()) || !is_hash(hash) {
        return None;
    }
    Some((height.parse().ok()?, hash.to_ascii_lowercase()))
}

/// Writes `block` as a pending file in `dir` (created if missing), fsyncs it and the directory,
/// and returns its path.
pub(crate) fn write_pending(dir: &Path, block: &BlockSubmission) -> io::Result<PathBuf> {
    let name = pending_name(block.height, &block.hash).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            "block hash is not 64 hex digits",
        )
    })?;
    fs::create_dir_all(dir)?;
    let path = dir.join(&name);
    let tmp = dir.join(format!(".{name}.tmp"));
    let written = (|| {
        let mut file = File::create(&tmp)?;
        file.write_all(block.hex.as_bytes())?;
        file.sync_all()?;
        fs::rename(&tmp, &path)?;
        sync_dir(dir)
    })();
    if written.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    written.map(|()| path)
}

/// Renames the pending file of `(height, hash)` in `dir` to its settled name and fsyncs the
/// directory; returns the new path.
pub(crate) fn settle(dir: &Path, height: u64, hash: &str, how: Settled) -> io::Result<PathBuf> {
    let name = pending_name(height, hash).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            "block hash is not 64 hex digits",
        )
    })?;
    let to = dir.join(format!("{name}{}", how.suffix()));
    fs::rename(dir.join(&name), &to)?;
    sync_dir(dir)?;
    Ok(to)
}

/// The pending blocks in `dir`, lowest height first; none when `dir` does not exist. A pending
/// file that cannot be read or does not hold hex is logged and left alone.
pub(crate) fn scan(dir: &Path) -> io::Result<Vec<BlockSubmission>> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(error) => return Err(error),
    };
    let mut blocks = Vec::new();
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name();
        let Some((height, hash)) = name.to_str().and_then(parse_pending_name) else {
            continue;
        };
        let path = entry.path();
        match fs::read_to_string(&path) {
            Ok(text) => {
                let hex = text.trim();
                if hex.is_empty()
                    || hex.len() % 2 != 0
                    || !hex.bytes().all(|b| b.is_ascii_hexdigit())
                {
                    tracing::error!(path = %path.display(), "pending block file does not hold block hex; left alone");
                    continue;
                }
                blocks.push(BlockSubmission {
                    hash,
                    height,
                    hex: hex.to_owned(),
                });
            }
            Err(error) => {
                tracing::error!(path = %path.display(), %error, "cannot read pending block file; left alone");
            }
        }
    }
    blocks.sort_by(|a, b| (a.height, &a.hash).cmp(&(b.height, &b.hash)));
    Ok(blocks)
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// A job for the file thread.
#[derive(Debug)]
enum Job {
    /// Write a pending file; say on `done` whether it worked.
    Write {
        block: BlockSubmission,
        done: Sender<bool>,
    },
    /// Settle a pending file.
    Settle {
        height: u64,
        hash: String,
        how: Settled,
    },
}

/// The submitter's handle on the file thread.
#[derive(Debug)]
pub(crate) struct Files {
    jobs: Sender<Job>,
    /// The acknowledgement of a write that did not come within [`WRITE_WAIT`]: while it has not
    /// come, the disk is taken to be hung and nothing waits for it.
    stuck: Option<Receiver<bool>>,
}

/// The file thread's body, see [`Files::start`].
#[derive(Debug)]
pub(crate) struct FileThread {
    dir: PathBuf,
    jobs: Receiver<Job>,
}

impl Files {
    /// A handle and the thread body that serves it; the thread ends when the handle is dropped,
    /// after the jobs already sent.
    pub(crate) fn new(dir: PathBuf) -> (Self, FileThread) {
        let (jobs, rx) = crossbeam_channel::unbounded();
        (Self { jobs, stuck: None }, FileThread { dir, jobs: rx })
    }

    /// Writes `block`'s pending file and waits until it is on disk, at most [`WRITE_WAIT`], and
    /// not at all while an earlier write is hanging. Returns whether it is on disk; every
    /// failure is logged loudly (with the hex) and the caller submits anyway.
    pub(crate) fn write(&mut self, block: &BlockSubmission) -> bool {
        let (done, ack) = bounded(1);
        let job = Job::Write {
            block: block.clone(),
            done,
        };
        if self.jobs.send(job).is_err() {
            tracing::error!(hash = %block.hash, height = block.height, block_hex = %block.hex,
                "block file thread is gone; block NOT written to disk");
            return false;
        }
        if let Some(stuck) = &self.stuck {
            match stuck.try_recv() {
                Err(TryRecvError::Empty) => {
                    tracing::error!(hash = %block.hash, height = block.height, block_hex = %block.hex,
                        "an earlier block file write is still hanging; submitting without waiting for the disk");
                    return false;
                }
                Ok(_) | Err(TryRecvError::Disconnected) => self.stuck = None,
            }
        }
        match ack.recv_timeout(WRITE_WAIT) {
            Ok(written) => written,
            Err(RecvTimeoutError::Timeout) => {
                tracing::error!(hash = %block.hash, height = block.height, block_hex = %block.hex,
                    wait = ?WRITE_WAIT, "block file write is hanging; submitting without waiting for the disk");
                self.stuck = Some(ack);
                false
            }
            Err(RecvTimeoutError::Disconnected) => false,
        }
    }

    /// Settles a pending file (does not wait).
    pub(crate) fn settle(&self, block: &BlockSubmission, how: Settled) {
        let _ = self.jobs.send(Job::Settle {
            height: block.height,
            hash: block.hash.clone(),
            how,
        });
    }
}

impl FileThread {
    /// Thread body: serves jobs in order until the handle is dropped.
    pub(crate) fn run(self) {
        for job in self.jobs {
            match job {
                Job::Write { block, done } => {
                    let written = match write_pending(&self.dir, &block) {
                        Ok(path) => {
                            tracing::info!(path = %path.display(), "block written to disk");
                            true
                        }
                        Err(error) => {
                            tracing::error!(dir = %self.dir.display(), hash = %block.hash, height = block.height,
                                %error, block_hex = %block.hex, "CANNOT WRITE BLOCK FILE; submitting anyway");
                            false
                        }
                    };
                    let _ = done.send(written);
                }
                Job::Settle { height, hash, how } => match settle(&self.dir, height, &hash, how) {
                    Ok(path) => tracing::info!(path = %path.display(), "block file settled"),
                    Err(error) => tracing::warn!(dir = %self.dir.display(), %hash, height,
                            %error, "cannot mark block file {}", how.suffix()),
                },
            }
        }
        tracing::debug!("block file thread stopped");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HASH: &str = "00000000000000000000000000000000000000000000000000000000000000aB";

    fn temp_dir(test: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("ckpool-rs-blockfile-{test}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        dir
    }

    fn block(height: u64, hash: &str) -> BlockSubmission {
        BlockSubmission {
            hash: hash.to_owned(),
            height,
            hex: format!("beef{height:02x}"),
        }
    }

    #[test]
    fn names_round_trip_and_nothing_else_parses() {
        let name = pending_name(812_345, HASH).unwrap();
        assert_eq!(name, format!("812345-{}.hex", HASH.to_ascii_lowercase()));
        assert_eq!(
            parse_pending_name(&name),
            Some((812_345, HASH.to_ascii_lowercase()))
        );
        assert_eq!(pending_name(1, "../etc"), None);
        assert_eq!(pending_name(1, &HASH[1..]), None);
        for other in [
            format!("{name}.done"),
            format!("{name}.stale"),
            format!("{name}.rejected"),
            format!(".{name}.tmp"),
            format!("x-{HASH}.hex"),
            format!("-{HASH}.hex"),
            format!("1-{}.hex", &HASH[1..]),
            format!("1-{}g.hex", &HASH[1..]),
            "1.hex".to_owned(),
        ] {
            assert_eq!(parse_pending_name(&other), None, "{other}");
        }
    }

    #[test]
    fn files_are_written_settled_and_scanned() {
        let dir = temp_dir("cycle");
        assert!(
            scan(&dir).unwrap().is_empty(),
            "a missing dir has no blocks"
        );
        let other = "11".repeat(32);
        let third = "22".repeat(32);
        let path = write_pending(&dir, &block(7, HASH)).unwrap();
        assert_eq!(path, dir.join(pending_name(7, HASH).unwrap()));
        assert_eq!(fs::read_to_string(&path).unwrap(), "beef07");
        write_pending(&dir, &block(5, &other)).unwrap();
        write_pending(&dir, &block(6, &third)).unwrap();
        // Foreign and broken files are left out.
        fs::write(dir.join("notes.txt"), "x").unwrap();
        fs::write(dir.join(format!(".8-{other}.hex.tmp")), "beef").unwrap();
        fs::write(dir.join(format!("9-{other}.hex")), "not hex").unwrap();
        let names: Vec<_> = fs::read_dir(&dir).unwrap().map(|e| e.unwrap()).collect();
        assert_eq!(names.len(), 6);

        let found = scan(&dir).unwrap();
        let expect = vec![
            block(5, &other),
            block(6, &third),
            BlockSubmission {
                hash: HASH.to_ascii_lowercase(),
                ..block(7, HASH)
            },
        ];
        assert_eq!(found, expect);

        // Settling renames and keeps the hex; settled files are no longer pending.
        let done = settle(&dir, 7, HASH, Settled::Done).unwrap();
        assert!(done.to_str().unwrap().ends_with(".hex.done"));
        assert_eq!(fs::read_to_string(&done).unwrap(), "beef07");
        assert!(!path.exists());
        let stale = settle(&dir, 5, &other, Settled::Stale).unwrap();
        assert!(stale.to_str().unwrap().ends_with(".hex.stale"));
        let rejected = settle(&dir, 6, &third, Settled::Rejected).unwrap();
        assert!(rejected.to_str().unwrap().ends_with(".hex.rejected"));
        assert!(scan(&dir).unwrap().is_empty());
        // Nothing pending to settle: an error, not a panic.
        assert!(settle(&dir, 7, HASH, Settled::Done).is_err());
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_hung_disk_holds_a_block_up_once_and_briefly() {
        let dir = temp_dir("hung");
        // The file thread is not running: as if it were stuck in a write.
        let (mut files, thread) = Files::new(dir.clone());
        let started = std::time::Instant::now();
        assert!(!files.write(&block(1, HASH)));
        let first = started.elapsed();
        assert!(first >= WRITE_WAIT && first < WRITE_WAIT * 2, "{first:?}");
        // While that write hangs, later blocks do not wait at all.
        let started = std::time::Instant::now();
        assert!(!files.write(&block(2, HASH)));
        assert!(
            started.elapsed() < WRITE_WAIT / 4,
            "{:?}",
            started.elapsed()
        );
        // Once the disk is back, both writes land, in order.
        let handle = std::thread::spawn(move || thread.run());
        drop(files);
        handle.join().unwrap();
        let found = scan(&dir).unwrap();
        assert_eq!(found.len(), 2);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn write_failures_are_reported_not_fatal() {
        let dir = temp_dir("broken");
        fs::create_dir_all(&dir).unwrap();
        // A regular file where the block directory should be.
        let file = dir.join("blocks");
        fs::write(&file, "").unwrap();
        assert!(write_pending(&file, &block(1, HASH)).is_err());
        assert!(write_pending(&dir, &block(1, "xyz")).is_err());

        let (mut files, thread) = Files::new(file.clone());
        let handle = std::thread::spawn(move || thread.run());
        assert!(!files.write(&block(1, HASH)), "the write cannot succeed");
        let (mut good, thread) = Files::new(dir.clone());
        let good_handle = std::thread::spawn(move || thread.run());
        assert!(good.write(&block(2, HASH)));
        good.settle(&block(2, HASH), Settled::Done);
        drop((files, good));
        handle.join().unwrap();
        good_handle.join().unwrap();
        let settled = dir.join(format!("{}.done", pending_name(2, HASH).unwrap()));
        assert_eq!(fs::read_to_string(settled).unwrap(), "beef02");
        fs::remove_dir_all(&dir).unwrap();
    }
}
