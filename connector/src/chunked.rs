//! A growable table that allocates in fixed chunks: the per-connection tables of the loop and of
//! the backends.
//!
//! A `Vec` that doubles copies every entry when it grows and frees the old buffer, and with tens
//! of thousands of connections that is megabytes copied on the I/O thread and a freed buffer whose
//! touched pages stay resident in the allocator's heap. [`Chunked`] adds one chunk of [`CHUNK`]
//! entries at a time instead: entries never move and no buffer is ever freed while it lives.
//! Pure code (no I/O, no `unsafe`), unit-tested on its own.

/// Entries per chunk.
pub(crate) const CHUNK: usize = 512;

/// Entries indexed by `usize` from 0, stored in boxed chunks of [`CHUNK`] entries. It only grows.
pub(crate) struct Chunked<T> {
    /// Every chunk but the last holds exactly [`CHUNK`] entries; the last holds 1 to [`CHUNK`].
    /// Each is allocated with room for [`CHUNK`] entries, so pushing never reallocates one.
    chunks: Vec<Vec<T>>,
}

impl<T> Chunked<T> {
    /// An empty table; allocates nothing.
    pub(crate) const fn new() -> Self {
        Self { chunks: Vec::new() }
    }

    /// Number of entries.
    pub(crate) fn len(&self) -> usize {
        match self.chunks.last() {
            None => 0,
            Some(last) => (self.chunks.len() - 1) * CHUNK + last.len(),
        }
    }

    /// The entry at `index`, mutably.
    pub(crate) fn get_mut(&mut self, index: usize) -> Option<&mut T> {
        self.chunks.get_mut(index / CHUNK)?.get_mut(index % CHUNK)
    }

    /// Appends `value` at index [`Chunked::len`].
    pub(crate) fn push(&mut self, value: T) {
        match self.chunks.last_mut() {
            Some(last) if last.len() < CHUNK => last.push(value),
            _ => {
                let mut chunk = Vec::with_capacity(CHUNK);
                chunk.push(value);
                self.chunks.push(chunk);
            }
        }
    }

    /// Appends values made by `fill` until there are at least `len` entries (never shrinks).
    pub(crate) fn grow_with(&mut self, len: usize, mut fill: impl FnMut() -> T) {
        for _ in self.len()..len {
            self.push(fill());
        }
    }

    /// The entries in index order.
    pub(crate) fn iter(&self) -> impl Iterator<Item = &T> {
        self.chunks.iter().flatten()
    }
}

impl<T> Default for Chunked<T> {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at<T: Copy>(t: &mut Chunked<T>, index: usize) -> Option<T> {
        t.get_mut(index).map(|v| *v)
    }

    #[test]
    fn indexes_across_chunks() {
        let mut t = Chunked::new();
        assert_eq!(t.len(), 0);
        assert_eq!(at(&mut t, 0), None);
        for i in 0..CHUNK * 2 + 3 {
            assert_eq!(t.len(), i);
            t.push(i);
        }
        assert_eq!(t.len(), CHUNK * 2 + 3);
        for i in [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 2 * CHUNK, 2 * CHUNK + 2] {
            assert_eq!(at(&mut t, i), Some(i));
        }
        assert_eq!(at(&mut t, 2 * CHUNK + 3), None);
        assert_eq!(at(&mut t, 3 * CHUNK), None);
        assert_eq!(at(&mut t, usize::MAX), None);
        if let Some(v) = t.get_mut(CHUNK) {
            *v = 7;
        }
        assert_eq!(at(&mut t, CHUNK), Some(7));
        assert!(
            t.iter()
                .zip(0..)
                .all(|(&v, i)| v == if i == CHUNK { 7 } else { i })
        );
        assert_eq!(t.iter().count(), t.len());
    }

    #[test]
    fn entries_never_move() {
        let mut t = Chunked::new();
        t.push(0u64);
        let first = t.get_mut(0).map(std::ptr::from_mut);
        t.grow_with(CHUNK, || 1);
        let last_of_chunk = t.get_mut(CHUNK - 1).map(std::ptr::from_mut);
        t.grow_with(10 * CHUNK, || 2);
        assert_eq!(t.len(), 10 * CHUNK);
        assert_eq!(t.get_mut(0).map(std::ptr::from_mut), first);
        assert_eq!(t.get_mut(CHUNK - 1).map(std::ptr::from_mut), last_of_chunk);
        // Each chunk was allocated once, at its full size.
        assert!(t.chunks.iter().all(|c| c.capacity() == CHUNK));
    }

    #[test]
    fn grows_to_a_length_and_never_shrinks() {
        let mut t: Chunked<Option<u8>> = Chunked::default();
        t.grow_with(CHUNK + 5, || None);
        assert_eq!(t.len(), CHUNK + 5);
        assert_eq!(at(&mut t, CHUNK + 4), Some(None));
        t.grow_with(3, || Some(1));
        assert_eq!(t.len(), CHUNK + 5);
        assert!(t.iter().all(Option::is_none));
    }
}
