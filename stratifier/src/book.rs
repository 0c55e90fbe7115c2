//! Job books: the live jobs of each work source, and the per-thread copies shards check shares
//! against.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::RwLock;

use crate::handover::{HandoverError, Reader, Writer};
use crate::job::{ExtranonceLayout, Job, JobError, SourceId};

/// The job book of one work source: its live jobs, its current job, and the extranonce layout
/// of its miners.
#[derive(Debug)]
struct JobBook {
    layout: Arc<ExtranonceLayout>,
    jobs: BTreeMap<u64, Arc<Job>>,
    current: Option<Arc<Job>>,
    /// First job of the current block: older jobs are stale.
    block_start: u64,
    /// The upstream's difficulty for this source (proxy modes), as `f64` bits; 0: none.
    cap: Arc<AtomicU64>,
}

impl JobBook {
    fn new(layout: ExtranonceLayout) -> Self {
        Self {
            layout: Arc::new(layout),
            jobs: BTreeMap::new(),
            current: None,
            block_start: 0,
            cap: Arc::new(AtomicU64::new(0)),
        }
    }
}

/// Every source's job book, by [`SourceId`].
#[derive(Debug)]
struct JobTable {
    books: Vec<JobBook>,
}

/// Work sources at most (source ids are 16 bits).
const MAX_SOURCES: usize = 1 << 16;

/// A thread's copy of the live jobs ([`Pool::refresh`]): checking a share then takes no lock
/// and touches no reference count that the other threads write.
#[derive(Debug, Default)]
pub(crate) struct JobView {
    generation: u64,
    books: Vec<BookView>,
}

/// A thread's copy of one job book.
#[derive(Debug)]
pub(crate) struct BookView {
    /// Sorted by id (copied from the pool's ordered table).
    jobs: Vec<Arc<Job>>,
    current: Option<Arc<Job>>,
    block_start: u64,
    pub(crate) layout: Arc<ExtranonceLayout>,
    /// The source's upstream difficulty (shared with the pool's book).
    cap: Arc<AtomicU64>,
}

impl BookView {
    /// The upstream's difficulty for this source (proxy modes): shares meeting it go
    /// upstream, and no miner of the source is given a higher one. `None` for other sources.
    pub(crate) fn upstream_diff(&self) -> Option<f64> {
        let d = f64::from_bits(self.cap.load(Ordering::Relaxed));
        (d > 0.0).then_some(d)
    }
}

impl JobView {
    /// A source's book, as of the last refresh.
    pub(crate) fn book(&self, source: SourceId) -> Option<&BookView> {
        self.books.get(source.index())
    }

    /// A live job of `source` by id, and whether it is stale (from before the current block),
    /// as of the last refresh.
    pub(crate) fn get(&self, source: SourceId, id: u64) -> Option<(&Arc<Job>, bool)> {
        let b = self.book(source)?;
        let i = b.jobs.binary_search_by_key(&id, |j| j.id).ok()?;
        b.jobs.get(i).map(|j| (j, id < b.block_start))
    }

    /// The current job of `source`, as of the last refresh.
    pub(crate) fn current(&self, source: SourceId) -> Option<&Arc<Job>> {
        self.book(source)?.current.as_ref()
    }

    /// Whether job `id` of any source is live, as of the last refresh.
    pub(crate) fn is_live(&self, id: u64) -> bool {
        self.books
            .iter()
            .any(|b| b.jobs.binary_search_by_key(&id, |j| j.id).is_ok())
    }
}

/// Every source's job book, shared by the shards.
#[derive(Debug)]
pub(crate) struct JobBooks {
    table: RwLock<JobTable>,
    /// Bumped (under the write lock) at every change of `table`, so a [`JobView`] knows when
    /// to copy the table again without taking its lock.
    generation: AtomicU64,
    next_job_id: AtomicU64,
    /// Jobs are kept this long (at least the last three of each source).
    lifetime: Duration,
}

impl JobBooks {
    /// The books, with the pool's own source (0) laid out as `own`; job ids from `seed`.
    pub(crate) fn new(own: ExtranonceLayout, seed: u64, lifetime: Duration) -> Self {
        Self {
            table: RwLock::new(JobTable {
                books: vec![JobBook::new(own)],
            }),
            generation: AtomicU64::new(0),
            next_job_id: AtomicU64::new(seed << 32),
            lifetime,
        }
    }

    /// A new job id.
    pub(crate) fn next_id(&self) -> u64 {
        self.next_job_id.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Adds a source's book.
    pub(crate) fn add_source(&self, layout: ExtranonceLayout) -> Result<SourceId, JobError> {
        let mut t = self.table.write();
        let n = t.books.len();
        let id = u16::try_from(n)
            .ok()
            .filter(|_| n < MAX_SOURCES)
            .ok_or(JobError::TooManySources)?;
        t.books.push(JobBook::new(layout));
        self.generation.fetch_add(1, Ordering::Release);
        Ok(SourceId(id))
    }

    /// Sets the upstream difficulty of `source` (see [`BookView::upstream_diff`]).
    pub(crate) fn set_upstream_diff(&self, source: SourceId, diff: f64) -> Result<(), JobError> {
        let t = self.table.read();
        let book = t
            .books
            .get(source.index())
            .ok_or(JobError::NoSource(source.0))?;
        let bits = if diff.is_finite() && diff > 0.0 {
            diff.to_bits()
        } else {
            0
        };
        book.cap.store(bits, Ordering::Relaxed);
        Ok(())
    }

    /// The upstream difficulty of `source`, if it has one.
    pub(crate) fn upstream_diff(&self, source: SourceId) -> Option<f64> {
        let t = self.table.read();
        let d = f64::from_bits(t.books.get(source.index())?.cap.load(Ordering::Relaxed));
        (d > 0.0).then_some(d)
    }

    /// The number of work sources.
    pub(crate) fn sources(&self) -> usize {
        self.table.read().books.len()
    }

    /// The extranonce layout of `source`.
    pub(crate) fn layout(&self, source: SourceId) -> Option<Arc<ExtranonceLayout>> {
        self.table
            .read()
            .books
            .get(source.index())
            .map(|b| Arc::clone(&b.layout))
    }

    /// The current job of `source`.
    pub(crate) fn current(&self, source: SourceId) -> Option<Arc<Job>> {
        self.table.read().books.get(source.index())?.current.clone()
    }

    /// Whether work on `prev_hash` starts a new block for `source` (its first work, or a
    /// changed previous block).
    pub(crate) fn new_block(
        &self,
        source: SourceId,
        prev_hash: &[u8; 32],
    ) -> Result<bool, JobError> {
        let t = self.table.read();
        let book = t
            .books
            .get(source.index())
            .ok_or(JobError::NoSource(source.0))?;
        Ok(book
            .current
            .as_ref()
            .is_none_or(|c| &c.prev_hash != prev_hash))
    }

    /// Makes `job` the current job of its source's book; a clean job makes the older ones
    /// stale. Jobs older than the lifetime go, but always the last three stay.
    pub(crate) fn install(&self, job: Arc<Job>, now: Instant) -> Result<Arc<Job>, JobError> {
        let mut t = self.table.write();
        let t = t
            .books
            .get_mut(job.source.index())
            .ok_or(JobError::NoSource(job.source.0))?;
        if job.clean {
            t.block_start = job.id;
        }
        t.jobs.insert(job.id, Arc::clone(&job));
        t.current = Some(Arc::clone(&job));
        let keep_from = t.jobs.len().saturating_sub(3);
        let lifetime = self.lifetime;
        let old: Vec<u64> = t
            .jobs
            .iter()
            .enumerate()
            .filter(|(i, (_, j))| {
                *i < keep_from && now.saturating_duration_since(j.created) > lifetime
            })
            .map(|(_, (id, _))| *id)
            .collect();
        for id in old {
            t.jobs.remove(&id);
        }
        self.generation.fetch_add(1, Ordering::Release);
        Ok(job)
    }

    /// Seals the duplicate sets of the jobs no longer the newest of their source
    /// ([`Job::seal_seen`]), and packs the keys waiting in the others' hash sets when they are
    /// many ([`Job::pack_seen_if_due`]). The table's lock is held only to list the jobs: the
    /// packing takes each of a job's 64 sets' locks in turn, briefly. Returns the number of
    /// jobs sealed or packed. Called by the housekeeping thread.
    pub(crate) fn seal_superseded(&self) -> usize {
        let (old, live): (Vec<Arc<Job>>, Vec<Arc<Job>>) = {
            let t = self.table.read();
            t.books
                .iter()
                .flat_map(|b| {
                    let current = b.current.as_ref().map(|c| c.id);
                    b.jobs
                        .values()
                        .map(move |j| (Some(j.id) != current && !j.seen_sealed(), j))
                })
                .fold(
                    (Vec::new(), Vec::new()),
                    |(mut old, mut live), (seal, j)| {
                        if seal { &mut old } else { &mut live }.push(Arc::clone(j));
                        (old, live)
                    },
                )
        };
        for j in &old {
            j.seal_seen();
        }
        let packed = live.iter().filter(|j| j.pack_seen_if_due()).count();
        old.len() + packed
    }

    /// Brings `view` up to date with the live jobs: a load of one atomic when nothing changed.
    pub(crate) fn refresh(&self, view: &mut JobView) {
        if self.generation.load(Ordering::Acquire) == view.generation {
            return;
        }
        let t = self.table.read();
        // Read under the lock, which every change holds: the copy and its number agree.
        view.generation = self.generation.load(Ordering::Relaxed);
        view.books.truncate(t.books.len());
        for (i, book) in t.books.iter().enumerate() {
            if view.books.len() <= i {
                view.books.push(BookView {
                    jobs: Vec::new(),
                    current: None,
                    block_start: 0,
                    layout: Arc::clone(&book.layout),
                    cap: Arc::clone(&book.cap),
                });
            }
            if let Some(v) = view.books.get_mut(i) {
                v.jobs.clear();
                v.jobs.extend(book.jobs.values().cloned());
                v.current.clone_from(&book.current);
                v.block_start = book.block_start;
            }
        }
    }

    /// A live job of `source` by id, and whether it is stale (from before the current block).
    pub(crate) fn job(&self, source: SourceId, id: u64) -> Option<(Arc<Job>, bool)> {
        let t = self.table.read();
        let b = t.books.get(source.index())?;
        b.jobs.get(&id).map(|j| (Arc::clone(j), id < b.block_start))
    }

    /// Writes every book for a handover: the job id counter, each source's layout, block
    /// start, current job and live jobs (with their duplicate sets).
    pub(crate) fn save(&self, w: &mut Writer, now: Instant) {
        let t = self.table.read();
        w.u64(self.next_job_id.load(Ordering::Relaxed));
        w.len(t.books.len());
        for b in &t.books {
            w.bytes(b.layout.prefix());
            w.len(b.layout.local_len());
            w.len(b.layout.nonce2_len());
            w.u64(b.block_start);
            w.u64(b.current.as_ref().map_or(0, |j| j.id));
            w.len(b.jobs.len());
            for j in b.jobs.values() {
                j.save(w, now);
            }
        }
    }

    /// Reads what [`JobBooks::save`] wrote into books to install with [`JobBooks::restore`].
    pub(crate) fn load(r: &mut Reader<'_>, now: Instant) -> Result<SavedBooks, HandoverError> {
        let next_job_id = r.u64()?;
        let n = r.count(24)?;
        if n == 0 || n > MAX_SOURCES {
            return Err(HandoverError::Malformed("source count"));
        }
        let mut books = Vec::with_capacity(n);
        for i in 0..n {
            let prefix = r.bytes()?.to_vec();
            let local = usize::try_from(r.u32()?).unwrap_or(usize::MAX);
            let nonce2 = usize::try_from(r.u32()?).unwrap_or(usize::MAX);
            let block_start = r.u64()?;
            let current = r.u64()?;
            let count = r.count(100)?;
            let mut jobs = BTreeMap::new();
            for _ in 0..count {
                let j = Job::load(r, now)?;
                if j.source.index() != i {
                    return Err(HandoverError::Malformed("job source"));
                }
                // Sealed here, before the pool serves any share: the new process's
                // housekeeping would do it anyway.
                if j.id != current {
                    j.seal_seen();
                }
                jobs.insert(j.id, Arc::new(j));
            }
            let current = if current == 0 {
                None
            } else {
                Some(Arc::clone(
                    jobs.get(&current)
                        .ok_or(HandoverError::Malformed("current job"))?,
                ))
            };
            books.push(SavedBook {
                prefix,
                local,
                nonce2,
                jobs,
                current,
                block_start,
            });
        }
        Ok(SavedBooks { next_job_id, books })
    }

    /// Installs books [`JobBooks::load`] read, in a pool with only its own source so far
    /// whose layout must match. Returns the current job of the pool's own source.
    pub(crate) fn restore(&self, saved: SavedBooks) -> Result<Option<Arc<Job>>, HandoverError> {
        let mut t = self.table.write();
        if t.books.len() != 1 || t.books.first().is_some_and(|b| b.current.is_some()) {
            return Err(HandoverError::Mismatch("the pool is not fresh"));
        }
        let mut books = Vec::with_capacity(saved.books.len());
        for (i, b) in saved.books.into_iter().enumerate() {
            let own = t.books.first().map(|o| Arc::clone(&o.layout));
            let layout = match own {
                Some(own) if i == 0 => {
                    if own.prefix() != b.prefix.as_slice()
                        || own.local_len() != b.local
                        || own.nonce2_len() != b.nonce2
                    {
                        return Err(HandoverError::Mismatch("extranonce layout"));
                    }
                    own
                }
                _ => Arc::new(
                    ExtranonceLayout::new(&b.prefix, b.local, b.nonce2)
                        .map_err(|_| HandoverError::Malformed("extranonce layout"))?,
                ),
            };
            books.push(JobBook {
                layout,
                jobs: b.jobs,
                current: b.current,
                block_start: b.block_start,
                cap: Arc::new(AtomicU64::new(0)),
            });
        }
        let own_current = books.first().and_then(|b| b.current.clone());
        t.books = books;
        self.next_job_id.store(saved.next_job_id, Ordering::Relaxed);
        self.generation.fetch_add(1, Ordering::Release);
        Ok(own_current)
    }
}

/// Job books read from a handover blob, not yet installed.
#[derive(Debug)]
pub(crate) struct SavedBooks {
    next_job_id: u64,
    books: Vec<SavedBook>,
}

/// One book read from a handover blob, with its layout's parts as read.
#[derive(Debug)]
struct SavedBook {
    prefix: Vec<u8>,
    local: usize,
    nonce2: usize,
    jobs: BTreeMap<u64, Arc<Job>>,
    current: Option<Arc<Job>>,
    block_start: u64,
}
