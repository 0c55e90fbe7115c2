//! An ordered list of [`SendBuf`]s that keeps its first buffer inline: a connection's send queue,
//! and the buffers of a send operation (the queue is handed to the backend as it is).
//!
//! A notify broadcast queues one shared buffer per connection, and most replies are one buffer
//! too: such a list allocates nothing. Pure code (no I/O), unit-tested on its own.

use std::mem;

use crate::SendBuf;

/// Buffers in order: `head` is the first, `tail` the rest. `head` is `None` only when the list is
/// empty, so `tail` allocates only from the second buffer on.
#[derive(Debug, Default)]
pub(crate) struct SendBufs {
    head: Option<SendBuf>,
    tail: Vec<SendBuf>,
}

impl SendBufs {
    /// Number of buffers.
    pub(crate) fn len(&self) -> usize {
        usize::from(self.head.is_some()) + self.tail.len()
    }

    /// Whether there are no buffers.
    pub(crate) fn is_empty(&self) -> bool {
        self.head.is_none()
    }

    /// The buffer at `index`.
    pub(crate) fn get(&self, index: usize) -> Option<&SendBuf> {
        match index.checked_sub(1) {
            None => self.head.as_ref(),
            Some(i) => self.tail.get(i),
        }
    }

    /// The buffers, in order.
    pub(crate) fn iter(&self) -> impl Iterator<Item = &SendBuf> {
        self.head.iter().chain(&self.tail)
    }

    /// Appends `buf`.
    pub(crate) fn push(&mut self, buf: SendBuf) {
        if self.head.is_none() {
            // Empty, so `tail` is empty too.
            self.head = Some(buf);
        } else {
            self.tail.push(buf);
        }
    }

    /// Appends `buf`, or copies it onto the end of the last buffer when both are owned and the
    /// result stays within `max` bytes: a backlog of small replies (to a peer that does not
    /// read) then costs about its bytes, not an allocation and an entry per reply.
    pub(crate) fn push_merged(&mut self, buf: SendBuf, max: usize) {
        if let SendBuf::Owned(new) = &buf {
            let last = match self.tail.last_mut() {
                Some(last) => Some(last),
                None => self.head.as_mut(),
            };
            if let Some(SendBuf::Owned(last)) = last
                && last.len().saturating_add(new.len()) <= max
            {
                last.extend_from_slice(new);
                return;
            }
        }
        self.push(buf);
    }

    /// Moves the buffers from `at` on into a new list; the first `at` stay.
    pub(crate) fn split_off(&mut self, at: usize) -> Self {
        match at.checked_sub(1) {
            None => mem::take(self),
            Some(i) if i >= self.tail.len() => Self::default(),
            Some(i) => {
                let mut rest = self.tail.drain(i..);
                let head = rest.next();
                Self {
                    head,
                    tail: rest.collect(),
                }
            }
        }
    }

    /// Moves the buffers of `other` to the end of this list.
    pub(crate) fn append(&mut self, other: &mut Self) {
        let Some(head) = other.head.take() else {
            return;
        };
        self.push(head);
        if self.tail.is_empty() {
            // Takes over `other`'s allocation rather than copying into a new one.
            mem::swap(&mut self.tail, &mut other.tail);
        } else {
            self.tail.append(&mut other.tail);
        }
    }

    /// Whether a push stores the buffer without allocating (the list is empty, or its tail has
    /// room).
    pub(crate) fn has_room(&self) -> bool {
        self.head.is_none() || self.tail.len() < self.tail.capacity()
    }

    /// Gives the list `room` (an empty vector, e.g. from [`SendBufs::into_room`]) to store
    /// buffers after the first without allocating; ignored if the list already has room.
    pub(crate) fn give_room(&mut self, room: Vec<SendBuf>) {
        if room.is_empty() && self.tail.is_empty() && self.tail.capacity() < room.capacity() {
            self.tail = room;
        }
    }

    /// Drops the buffers and returns the (empty) vector that held those after the first, for
    /// reuse with [`SendBufs::give_room`].
    pub(crate) fn into_room(self) -> Vec<SendBuf> {
        let mut tail = self.tail;
        tail.clear();
        tail
    }
}

impl FromIterator<SendBuf> for SendBufs {
    fn from_iter<I: IntoIterator<Item = SendBuf>>(iter: I) -> Self {
        let mut iter = iter.into_iter();
        Self {
            head: iter.next(),
            tail: iter.collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    fn list(parts: &[&str]) -> SendBufs {
        parts
            .iter()
            .map(|p| SendBuf::from(p.as_bytes().to_vec()))
            .collect()
    }

    fn contents(l: &SendBufs) -> Vec<&[u8]> {
        l.iter().map(SendBuf::as_slice).collect()
    }

    #[test]
    fn one_buffer_needs_no_allocation() {
        let mut l = SendBufs::default();
        assert!(l.is_empty() && l.has_room());
        l.push(SendBuf::from(Arc::<[u8]>::from(&b"notify\n"[..])));
        assert_eq!((l.len(), l.tail.capacity()), (1, 0));
        assert!(!l.has_room(), "a second buffer would allocate");
        assert_eq!(l.get(0).map(SendBuf::as_slice), Some(&b"notify\n"[..]));
        assert!(l.get(1).is_none());
    }

    #[test]
    fn order_is_kept() {
        let mut l = list(&["a", "b"]);
        l.push(SendBuf::from(b"c".to_vec()));
        assert_eq!(contents(&l), [b"a", b"b", b"c"]);
        assert_eq!(l.len(), 3);
        assert_eq!(l.get(2).map(SendBuf::as_slice), Some(&b"c"[..]));
    }

    #[test]
    fn split_off_and_append() {
        for at in 0..5 {
            let mut l = list(&["a", "b", "c", "d"]);
            let mut rest = l.split_off(at);
            let at = at.min(4);
            assert_eq!(l.len(), at);
            assert_eq!(rest.len(), 4 - at);
            l.append(&mut rest);
            assert!(rest.is_empty());
            let whole = l;
            assert_eq!(contents(&whole), [b"a", b"b", b"c", b"d"]);
        }
        // Appending to an empty list, and appending nothing.
        let mut l = SendBufs::default();
        l.append(&mut list(&["x", "y"]));
        l.append(&mut SendBufs::default());
        assert_eq!(contents(&l), [b"x", b"y"]);
    }

    #[test]
    fn owned_buffers_merge_up_to_the_limit_shared_ones_never() {
        let mut l = SendBufs::default();
        l.push_merged(SendBuf::from(b"ab".to_vec()), 4);
        l.push_merged(SendBuf::from(b"cd".to_vec()), 4);
        assert_eq!(contents(&l), [b"abcd"]);
        // Over the limit: a new buffer, into which the next merges.
        l.push_merged(SendBuf::from(b"e".to_vec()), 4);
        l.push_merged(SendBuf::from(b"f".to_vec()), 4);
        assert_eq!(contents(&l), [&b"abcd"[..], b"ef"]);
        // A shared buffer is never copied, nor copied into.
        l.push_merged(SendBuf::from(Arc::<[u8]>::from(&b"n"[..])), 4);
        l.push_merged(SendBuf::from(b"g".to_vec()), 4);
        assert_eq!(contents(&l), [&b"abcd"[..], b"ef", b"n", b"g"]);
        assert!(matches!(l.get(2), Some(SendBuf::Shared(_))));
    }

    #[test]
    fn room_is_reused() {
        let l = list(&["a", "b", "c"]);
        let room = l.into_room();
        assert!(room.is_empty() && room.capacity() >= 2);
        let mut l = list(&["x"]);
        l.give_room(room);
        assert!(l.has_room());
        let before = l.tail.as_ptr();
        l.push(SendBuf::from(b"y".to_vec()));
        assert_eq!(l.tail.as_ptr(), before, "no new allocation");
        assert_eq!(contents(&l), [b"x", b"y"]);
    }
}
