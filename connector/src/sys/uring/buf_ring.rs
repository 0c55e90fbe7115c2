//! The receive buffers of an io_uring thread and the provided-buffer ring
//! (`IORING_REGISTER_PBUF_RING`) through which they are lent to the kernel.
//!
//! The kernel takes a buffer from the ring when data arrives on a multishot receive and hands it
//! out in the completion; the loop gives it back once it has read the bytes. The ring entries and
//! the buffers are anonymous mappings owned here: the owner must unregister the ring (or
//! [`BufRing::leak`] it) before this is dropped, and must not drop it while the kernel may still
//! write into a buffer.

use std::ffi::c_void;
use std::io;
use std::mem;
use std::ptr::{self, NonNull};
use std::sync::atomic::{AtomicU16, Ordering};

use io_uring::IoUring;
use tracing::error;

/// The thread's receive buffers and the ring that lends them to the kernel
/// (`IORING_REGISTER_PBUF_RING`): `count` buffers of `size` bytes, and a ring of `count` entries
/// through which the loop gives buffers back.
pub(super) struct BufRing {
    /// The ring entries (`struct io_uring_buf`); the tail is in the first entry.
    ring: Mapping,
    /// The buffers, back to back.
    data: Mapping,
    count: u16,
    size: u32,
    /// Tail as last published.
    tail: u16,
    /// Registered with a ring (and to be unregistered before it is unmapped).
    pub(super) registered: bool,
}

/// `struct io_uring_buf` (include/uapi/linux/io_uring.h).
#[repr(C)]
struct RawBufEntry {
    addr: u64,
    len: u32,
    bid: u16,
    /// In the first entry: the ring's tail.
    resv: u16,
}

impl BufRing {
    /// Maps `count` (a power of two) buffers of `size` bytes and the ring; all buffers are in it.
    pub(super) fn new(count: u16, size: u32) -> io::Result<Self> {
        if !count.is_power_of_two() || count > 32_768 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "buffer count must be a power of two up to 32768",
            ));
        }
        let ring = Mapping::new(usize::from(count) * mem::size_of::<RawBufEntry>())?;
        let data_len = usize::from(count)
            .checked_mul(usize::try_from(size).map_err(io::Error::other)?)
            .ok_or_else(|| io::Error::other("receive buffers too large"))?;
        let data = Mapping::new(data_len)?;
        let mut this = Self {
            ring,
            data,
            count,
            size,
            tail: 0,
            registered: false,
        };
        for bid in 0..count {
            this.add(bid);
        }
        this.publish();
        Ok(this)
    }

    /// Registers the ring with `ring` as buffer group `bgid`.
    pub(super) fn register(&mut self, ring: &IoUring, bgid: u16) -> io::Result<()> {
        let addr = self.ring.ptr.as_ptr() as u64;
        // SAFETY: the entries are a page-aligned mapping of `count` `io_uring_buf`s that stays
        // mapped until the group is unregistered or the ring is gone: `Uring::drop` and `probe`
        // unregister it (or leak the mapping) before it is unmapped.
        unsafe {
            ring.submitter()
                .register_buf_ring_with_flags(addr, self.count, bgid, 0)
        }?;
        self.registered = true;
        Ok(())
    }

    /// Puts buffer `bid` back in the ring and publishes it.
    pub(super) fn give_back(&mut self, bid: u16) {
        if bid < self.count {
            self.add(bid);
            self.publish();
        }
    }

    /// Writes buffer `bid` in the entry at the (unpublished) tail.
    fn add(&mut self, bid: u16) {
        let index = usize::from(self.tail & (self.count - 1));
        let entry = self
            .ring
            .ptr
            .as_ptr()
            .cast::<RawBufEntry>()
            .wrapping_add(index);
        let addr = self.data.ptr.as_ptr() as u64 + u64::from(bid) * u64::from(self.size);
        // The fields are written one by one: `resv` of the first entry is the published tail,
        // which the kernel may be reading.
        let base = entry.cast::<u8>();
        // SAFETY: `index < count`, so the entry lies in the ring mapping and its `addr` field is
        // aligned; the kernel reads only entries before the published tail, and this one is at
        // the tail, so nothing else accesses it now.
        unsafe {
            base.wrapping_add(mem::offset_of!(RawBufEntry, addr))
                .cast::<u64>()
                .write(addr);
        }
        // SAFETY: as above, for the `len` field.
        unsafe {
            base.wrapping_add(mem::offset_of!(RawBufEntry, len))
                .cast::<u32>()
                .write(self.size);
        }
        // SAFETY: as above, for the `bid` field.
        unsafe {
            base.wrapping_add(mem::offset_of!(RawBufEntry, bid))
                .cast::<u16>()
                .write(bid);
        }
        self.tail = self.tail.wrapping_add(1);
    }

    /// Makes the entries written so far visible to the kernel.
    fn publish(&self) {
        let tail = self
            .ring
            .ptr
            .as_ptr()
            .wrapping_add(mem::offset_of!(RawBufEntry, resv))
            .cast::<u16>();
        // SAFETY: the tail is the `resv` field of the first entry: inside the mapping, aligned for
        // `u16`, valid for the life of `self`, and only ever accessed atomically (the kernel reads
        // it with an acquire load).
        let tail = unsafe { AtomicU16::from_ptr(tail) };
        tail.store(self.tail, Ordering::Release);
    }

    /// The first `len` bytes of buffer `bid`, which the kernel filled and handed out (empty if
    /// out of range).
    pub(super) fn bytes(&self, bid: u16, len: u32) -> &[u8] {
        if bid >= self.count || len > self.size {
            return &[];
        }
        let Ok(len) = usize::try_from(len) else {
            return &[];
        };
        let offset = usize::from(bid) * usize::try_from(self.size).unwrap_or(0);
        let start = self.data.ptr.as_ptr().wrapping_add(offset);
        // SAFETY: `[start, start + len)` lies in the data mapping (`bid < count`, `len <= size`).
        // The kernel wrote it before handing buffer `bid` out, and does not write it again until
        // the buffer is back in the ring, which takes `give_back(&mut self)`: not while this
        // shared borrow of `self` lives (the caller passes only buffers the kernel handed out).
        unsafe { std::slice::from_raw_parts(start, len) }
    }

    /// Keeps the memory mapped for good (the kernel may still use it).
    pub(super) fn leak(&mut self) {
        self.ring.leaked = true;
        self.data.leaked = true;
    }
}

/// An anonymous private memory mapping (page-aligned, zero-filled, untouched pages cost nothing).
struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
    /// Never unmapped when set.
    leaked: bool,
}

impl Mapping {
    fn new(len: usize) -> io::Result<Self> {
        let len = len.max(1);
        // SAFETY: an anonymous private mapping with no address hint: the kernel picks a range that
        // overlaps nothing else.
        let p = unsafe {
            libc::mmap(
                ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr = NonNull::new(p.cast::<u8>()).ok_or_else(|| io::Error::other("mmap gave null"))?;
        Ok(Self {
            ptr,
            len,
            leaked: false,
        })
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        if self.leaked {
            return;
        }
        // SAFETY: `ptr` and `len` are exactly the mapping made by `Mapping::new`, unmapped only
        // here; no borrow into it outlives `self`, and the owner has made sure the kernel is done
        // with it (or set `leaked`).
        let rc = unsafe { libc::munmap(self.ptr.as_ptr().cast::<c_void>(), self.len) };
        if rc != 0 {
            error!(error = %io::Error::last_os_error(), "munmap failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffer_ring_hands_out_every_buffer_region() {
        let mut ring = BufRing::new(4, 64).unwrap();
        assert_eq!(ring.tail, 4);
        assert_eq!(ring.bytes(3, 10), &[0u8; 10]);
        assert!(ring.bytes(4, 1).is_empty());
        assert!(ring.bytes(0, 65).is_empty());
        ring.give_back(3);
        assert_eq!(ring.tail, 5);
        assert!(BufRing::new(3, 64).is_err());
    }
}
