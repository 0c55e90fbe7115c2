//! Platform layer: the I/O backends and the few OS calls the connector needs.
//!
//! Everything platform-specific lives under this module: every `cfg` and every `unsafe` block of
//! the crate. The per-thread event loop in `worker.rs` is generic over [`Backend`] and never
//! touches a file descriptor.
//!
//! Two backends meet the contract below: `uring` (io_uring, behind the `io-uring` cargo feature,
//! on by default) and `epoll` (always built: the fallback and the reference). Which one runs is
//! decided once, at [`crate::start`], through [`with_backend`]; `Auto` asks [`probe_uring`].
//!
//! # The backend contract
//!
//! The interface is *completion-based* (io_uring's model). The loop asks for operations (arm an
//! accept, arm a receive, send these buffers, close) and later collects what finished with
//! [`Backend::complete`]. A readiness backend (epoll) performs the syscall when the socket is
//! ready and reports the result the same way, so the loop cannot tell the two apart.
//!
//! * **Accept** and **receive** are *multishot*: armed once, they keep producing completions until
//!   one says it has stopped (`more == false` for accept, [`Completion::RecvEnd`] for receive).
//! * **Received bytes live in backend-owned memory** (a per-thread scratch buffer for epoll, a
//!   provided-buffer ring for io_uring), so an idle connection holds no read buffer. A
//!   [`Completion::Recv`] carries a handle; the loop reads the bytes with [`Backend::recv_bytes`]
//!   and must hand the handle back with [`Backend::release`] before its next call to
//!   [`Backend::complete`].
//! * **An accepted socket** reported by [`Completion::Accept`] must be passed to [`Backend::open`]
//!   before the next call to [`Backend::complete`], or be dropped; the backend closes one that was
//!   not opened by then (io_uring direct descriptors cannot close themselves on drop).
//! * **A send owns its buffers while in flight**: [`Backend::send`] takes a [`SendOp`] by value and
//!   the matching [`Completion::Send`] gives it back, so no borrowed slice crosses a submit. At most
//!   one send is in flight per connection.
//! * **Errors of an operation are completions**, never return values of the submitting call:
//!   `accept`, `recv` and `send` cannot fail synchronously.
//! * After [`Backend::close`] no completion for that connection is reported any more, and the
//!   backend frees the socket and any buffers it still holds for it once the kernel is done with
//!   them.
//! * **Dropping a backend** closes its listeners and sockets; a backend whose kernel holds
//!   user memory (io_uring) cancels every operation and waits for their completions first.
//! * A backend is created on the thread that runs it and never leaves it (an io_uring ring is
//!   created `SINGLE_ISSUER`), so it need not be `Send`. Every [`ConnId`] given to one backend
//!   instance is of that thread (the same [`ConnId::thread`]), so a backend keeps the thread once
//!   and only a generation per connection ([`ConnTable`]); `open` fails for an id of another.

#[cfg(not(target_os = "linux"))]
compile_error!("ckpool-connector supports Linux only (io_uring and epoll)");

pub(crate) mod epoll;
mod os;
#[cfg(all(target_os = "linux", feature = "io-uring"))]
mod uring;

use std::io;
use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use ids::ConnId;

use crate::chunked::Chunked;
use crate::sendbufs::SendBufs;
use crate::{BackendKind, UringConfig};

pub(crate) use os::{
    Waker, enable_rx_timestamps, ensure_port_free, fix_mmap_threshold, inherited_listener,
    listener_socket, pin_current_thread, process_cpus, raise_nofile_limit, recv_stamped,
    release_free_heap,
};

/// Environment variable that, set to anything but `""` or `"0"`, makes [`probe_uring`] fail as if
/// the kernel refused io_uring (so tests and CI can exercise the epoll fallback).
pub(crate) const DISABLE_URING_ENV: &str = "CKPOOL_IO_URING_DISABLE";

/// Whether io_uring can run the connector here: checked once per process (later calls return the
/// first answer). See the `uring` module for what is checked.
pub(crate) fn probe_uring() -> Result<(), String> {
    static PROBE: OnceLock<Result<(), String>> = OnceLock::new();
    PROBE
        .get_or_init(|| {
            if std::env::var_os(DISABLE_URING_ENV).is_some_and(|v| !v.is_empty() && v != "0") {
                return Err(format!("disabled by {DISABLE_URING_ENV}"));
            }
            probe_kernel()
        })
        .clone()
}

#[cfg(all(target_os = "linux", feature = "io-uring"))]
fn probe_kernel() -> Result<(), String> {
    uring::probe()
}

/// Environment variable that, set to anything but `""` or `"0"`, makes [`uring_handover`] fail as
/// if the kernel lacked `IORING_OP_FIXED_FD_INSTALL` (so tests can exercise that refusal).
pub(crate) const NO_URING_HANDOVER_ENV: &str = "CKPOOL_IO_URING_NO_HANDOVER";

/// Whether the io_uring backend can export connections here (`IORING_OP_FIXED_FD_INSTALL`, Linux
/// 6.8, and `IORING_OP_FILES_UPDATE` to adopt them): checked once per process.
pub(crate) fn uring_handover() -> Result<(), String> {
    static PROBE: OnceLock<Result<(), String>> = OnceLock::new();
    PROBE
        .get_or_init(|| {
            if std::env::var_os(NO_URING_HANDOVER_ENV).is_some_and(|v| !v.is_empty() && v != "0") {
                return Err(format!("disabled by {NO_URING_HANDOVER_ENV}"));
            }
            probe_handover_kernel()
        })
        .clone()
}

#[cfg(all(target_os = "linux", feature = "io-uring"))]
fn probe_handover_kernel() -> Result<(), String> {
    uring::probe_handover()
}

#[cfg(not(all(target_os = "linux", feature = "io-uring")))]
fn probe_handover_kernel() -> Result<(), String> {
    Err("built without the io-uring feature".to_owned())
}

#[cfg(not(all(target_os = "linux", feature = "io-uring")))]
fn probe_kernel() -> Result<(), String> {
    Err("built without the io-uring feature".to_owned())
}

/// Something to run with a concrete backend type, such as starting the per-thread loops (which
/// are generic over the backend, so there is no dispatch per operation).
pub(crate) trait WithBackend {
    /// What [`WithBackend::run`] returns.
    type Output;

    /// Runs with `new_backend`, which creates one backend instance from a thread's waker and
    /// listeners (indexed by [`ListenerId`]); it is called on the thread that will use it.
    fn run<B, N>(self, new_backend: N) -> Self::Output
    where
        B: Backend + 'static,
        N: Fn(Arc<Waker>, Vec<ListenSocket>) -> io::Result<B> + Send + Sync + 'static;
}

/// Calls `w` with the constructor of the backend `kind` (`Auto` must be resolved before; it is
/// taken as epoll here). `None`: `kind` is not compiled in.
pub(crate) fn with_backend<W: WithBackend>(
    kind: BackendKind,
    uring: UringConfig,
    w: W,
) -> Option<W::Output> {
    match kind {
        BackendKind::Auto | BackendKind::Epoll => Some(w.run(epoll::Epoll::new)),
        BackendKind::Uring => run_uring(uring, w),
    }
}

#[cfg(all(target_os = "linux", feature = "io-uring"))]
fn run_uring<W: WithBackend>(cfg: UringConfig, w: W) -> Option<W::Output> {
    Some(w.run(move |waker, listeners| uring::Uring::new(waker, listeners, &cfg)))
}

#[cfg(not(all(target_os = "linux", feature = "io-uring")))]
fn run_uring<W: WithBackend>(_cfg: UringConfig, _w: W) -> Option<W::Output> {
    None
}

/// Capacity of completion lists kept between rounds (a broadcast to many connections produces one
/// completion each; that much memory is not kept for good). A completion is about 100 bytes;
/// each thread keeps two such lists, so a round longer than this grows them for that round
/// only, and their high-water mark is reached in the first seconds rather than at the longest
/// round of the day (at 1,024 the churn soak's rose by 0.2 MB between its second and fourth
/// minutes).
pub(crate) const KEEP_COMPLETIONS: usize = 256;

/// A thread's listening socket.
pub(crate) struct ListenSocket {
    pub(crate) sock: socket2::Socket,
    /// Whether other threads accept on the same socket (an inherited listener): io_uring then
    /// arms one accept at a time, so that the kernel, which wakes one waiting accept per
    /// connection (the first in line), spreads the connections over the threads in turn.
    #[cfg_attr(
        not(all(target_os = "linux", feature = "io-uring")),
        expect(dead_code, reason = "only io_uring reads it")
    )]
    pub(crate) shared: bool,
}

impl From<socket2::Socket> for ListenSocket {
    /// A socket of this thread alone.
    fn from(sock: socket2::Socket) -> Self {
        Self {
            sock,
            shared: false,
        }
    }
}

/// Index of a listener: its position in `Config::listen`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct ListenerId(pub(crate) usize);

/// Contract every backend in `sys/` meets (see the module documentation).
pub(crate) trait Backend: Sized {
    /// An accepted connection that is not yet registered with the backend.
    type Socket;
    /// Handle to received bytes held by the backend.
    type RecvBuf;

    /// Arms a multishot accept on `listener`. Accepted sockets and errors arrive as
    /// [`Completion::Accept`]; one with `more == false` means the accept stopped and must be
    /// armed again with this call to resume.
    fn accept(&mut self, listener: ListenerId);

    /// Registers an accepted socket under `conn`. No operation runs on it until asked.
    fn open(&mut self, conn: ConnId, sock: Self::Socket) -> io::Result<()>;

    /// Arms a multishot receive on `conn`: data arrives as [`Completion::Recv`] until a
    /// [`Completion::RecvEnd`] (end of stream or error) after which the caller closes `conn`.
    fn recv(&mut self, conn: ConnId);

    /// The bytes behind a received-data handle.
    fn recv_bytes(&self, buf: &Self::RecvBuf) -> &[u8];

    /// Gives a received-data handle back to the backend.
    fn release(&mut self, buf: Self::RecvBuf);

    /// Starts writing `op` to `conn`; the outcome arrives as [`Completion::Send`] with `op`. At most
    /// one send may be in flight per connection.
    fn send(&mut self, conn: ConnId, op: SendOp);

    /// Closes `conn`: cancels its operations and closes the socket. Unknown ids are ignored.
    fn close(&mut self, conn: ConnId);

    /// Hands the operations started so far to the kernel now, without waiting for any, where the
    /// backend would otherwise hold them until the next [`Backend::complete`] (io_uring's queued
    /// submissions). The worker calls it in the middle of a long round, so that replies to the
    /// first lines of a big batch do not wait for the whole batch.
    fn submit_now(&mut self) {}

    /// Stops every listener's accept (a handover): no accept completion is reported for them
    /// once [`Backend::settled`] says so, until [`Backend::accept`] arms one again.
    fn stop_accepts(&mut self);

    /// Stops `conn`'s receive without ending the connection: no [`Completion::RecvEnd`] is
    /// reported for the stop, and bytes received meanwhile are reported as usual until
    /// [`Backend::settled`]. Received bytes not yet read stay in the socket.
    fn stop_recv(&mut self, conn: ConnId);

    /// A quiesce is taken back ([`Backend::stop_recv`] was called for every connection): the
    /// thread reads again. The caller arms each connection to be read with [`Backend::recv`];
    /// one paused for back-pressure meanwhile is armed by [`Backend::resume_recv`] when it
    /// unpauses, whether or not any connection was armed since.
    fn reads_resumed(&mut self) {}

    /// Pauses `conn`'s receive for back-pressure (its peer does not read what it asked for):
    /// like [`Backend::stop_recv`] for this one connection, without touching the others or a
    /// handover's state; bytes received before the pause took effect are still reported. The
    /// kernel's receive buffer then fills and the peer's sends block: TCP's own flow control.
    fn pause_recv(&mut self, conn: ConnId);

    /// Undoes [`Backend::pause_recv`]: `conn` is read again.
    fn resume_recv(&mut self, conn: ConnId);

    /// Ends `conn`'s send in flight early: its [`Completion::Send`] comes back with `Ok(n)`, `n`
    /// the bytes written so far (possibly 0), and the rest of the operation unwritten.
    fn cancel_send(&mut self, conn: ConnId);

    /// Whether no accept or receive is in flight or being stopped (sends may be).
    fn settled(&self) -> bool;

    /// Whether [`Backend::export`] can work here; `Err` says why not.
    fn can_export(&self) -> io::Result<()> {
        Ok(())
    }

    /// Takes `conns` (stopped, no send in flight) out of the backend and hands each socket back
    /// as a regular descriptor of this process, in order. A connection whose descriptor cannot
    /// be made (e.g. `EMFILE`) stays in the backend as it was, and its error is returned.
    fn export(&mut self, conns: &[ConnId]) -> Vec<io::Result<OwnedFd>>;

    /// Turns connected sockets of this process into sockets of the backend, in order, for
    /// [`Backend::open`] (the rules of accepted sockets apply: one not opened before the next
    /// [`Backend::complete`] is closed). The descriptors are consumed.
    fn adopt(&mut self, fds: Vec<OwnedFd>) -> Vec<io::Result<Self::Socket>>;

    /// Waits up to `timeout` (`None`: no limit) for operations to finish and appends them to `out`.
    /// May return early with nothing (a wake-up or an interrupted wait). An error means the backend
    /// itself is broken.
    fn complete(
        &mut self,
        timeout: Option<Duration>,
        out: &mut Vec<Completion<Self>>,
    ) -> io::Result<()>;
}

/// A finished operation, reported by [`Backend::complete`].
pub(crate) enum Completion<B: Backend> {
    /// A connection was accepted (or accepting failed). `more == false`: the accept is no longer
    /// armed.
    Accept {
        /// The listener it came from.
        listener: ListenerId,
        /// The socket and the peer's address, or why accepting failed.
        result: io::Result<(B::Socket, SocketAddr)>,
        /// Whether the multishot accept is still armed.
        more: bool,
    },
    /// Bytes were received on a connection.
    Recv {
        /// The connection.
        conn: ConnId,
        /// The bytes, held by the backend until released.
        buf: B::RecvBuf,
    },
    /// Receiving stopped: end of stream (`error == None`) or an error. The caller must close `conn`.
    RecvEnd {
        /// The connection.
        conn: ConnId,
        /// The error, if it was not a clean end of stream.
        error: Option<io::Error>,
    },
    /// A send finished: `Ok(n)` bytes of `op` were written (all of it unless the backend allows
    /// short sends; the caller requeues the rest), or it failed.
    Send {
        /// The connection.
        conn: ConnId,
        /// The operation, with its buffers, given back.
        op: SendOp,
        /// Bytes written, or the error.
        result: io::Result<usize>,
    },
}

/// Buffers to write to one connection, in order, starting `offset` bytes into the buffer at
/// `first`. Owned by the backend while in flight. An operation of one buffer allocates nothing
/// (see [`SendBufs`]).
#[derive(Default)]
pub(crate) struct SendOp {
    /// The buffers (those before `first` are already written).
    pub(crate) bufs: SendBufs,
    /// Index of the first buffer not completely written.
    pub(crate) first: usize,
    /// Bytes of `bufs[first]` already written.
    pub(crate) offset: usize,
    /// Bytes written by this operation so far.
    pub(crate) written: usize,
}

impl SendOp {
    /// Whether everything has been written.
    pub(crate) fn is_done(&self) -> bool {
        self.first >= self.bufs.len()
    }

    /// Records that `n` more bytes were written.
    pub(crate) fn advance(&mut self, mut n: usize) {
        self.written += n;
        while n > 0 {
            let Some(buf) = self.bufs.get(self.first) else {
                break;
            };
            let left = buf.len().saturating_sub(self.offset);
            if n >= left {
                n -= left;
                self.first += 1;
                self.offset = 0;
            } else {
                self.offset += n;
                n = 0;
            }
        }
        // Skip empty buffers so that `is_done` is exact.
        while self
            .bufs
            .get(self.first)
            .is_some_and(|b| b.len() <= self.offset)
        {
            self.first += 1;
            self.offset = 0;
        }
    }

    /// The unwritten part of each remaining buffer, in order.
    pub(crate) fn remaining(&self) -> impl Iterator<Item = &[u8]> {
        self.bufs.iter().skip(self.first).enumerate().map(|(i, b)| {
            let s = b.as_slice();
            if i == 0 {
                s.get(self.offset..).unwrap_or(&[])
            } else {
                s
            }
        })
    }
}

/// A backend's open connections by the slot of their [`ConnId`], for the backends to share.
///
/// An entry keeps only the generation of its id: the slot is its index, and the thread is the
/// same for every id given to one backend instance (they all come from the loop that runs it), so
/// it is kept once, learnt from the first [`ConnTable::insert`]. The table grows in chunks
/// ([`Chunked`]), never by copying, and never shrinks (slots are reused).
pub(crate) struct ConnTable<T> {
    entries: Chunked<Option<T>>,
    thread: Option<u16>,
}

/// An entry of a [`ConnTable`].
pub(crate) trait ConnEntry {
    /// The generation of the entry's [`ConnId`].
    fn generation(&self) -> u16;
}

impl<T> Default for ConnTable<T> {
    fn default() -> Self {
        Self {
            entries: Chunked::new(),
            thread: None,
        }
    }
}

impl<T: ConnEntry> ConnTable<T> {
    /// Stores `conn` (whose generation must be `id`'s) in `id`'s slot; returns what the slot held.
    /// Fails for an id of another thread than the ids stored before.
    pub(crate) fn insert(&mut self, id: ConnId, conn: T) -> io::Result<Option<T>> {
        debug_assert_eq!(conn.generation(), id.generation());
        match self.thread {
            None => self.thread = Some(id.thread()),
            Some(thread) if thread != id.thread() => {
                return Err(io::Error::other(format!(
                    "connection {id} is not of this backend's thread ({thread})"
                )));
            }
            Some(_) => {}
        }
        let slot = usize::try_from(id.slot()).map_err(io::Error::other)?;
        self.entries.grow_with(slot + 1, || None);
        let entry = self
            .entries
            .get_mut(slot)
            .ok_or_else(|| io::Error::other("connection table did not grow"))?;
        Ok(entry.replace(conn))
    }

    /// The open connection `id` (same thread, slot and generation).
    pub(crate) fn get_mut(&mut self, id: ConnId) -> Option<&mut T> {
        self.entry(id)?.as_mut()
    }

    /// Removes the open connection `id`; any other id is ignored.
    pub(crate) fn remove(&mut self, id: ConnId) -> Option<T> {
        self.entry(id)?.take()
    }

    /// The open connection in `slot` if its generation is `generation`, with its id (for user data
    /// that carries only the generation and slot).
    pub(crate) fn by_slot(&mut self, generation: u16, slot: u32) -> Option<(ConnId, &mut T)> {
        let id = ConnId::new(self.thread?, generation, slot);
        Some((id, self.get_mut(id)?))
    }

    /// The entry of `id`'s slot if it holds `id`.
    fn entry(&mut self, id: ConnId) -> Option<&mut Option<T>> {
        if self.thread != Some(id.thread()) {
            return None;
        }
        let slot = usize::try_from(id.slot()).ok()?;
        self.entries.get_mut(slot).filter(|e| {
            e.as_ref()
                .is_some_and(|c| c.generation() == id.generation())
        })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::SendBuf;

    fn op(parts: &[&[u8]]) -> SendOp {
        SendOp {
            bufs: parts.iter().map(|p| SendBuf::from(p.to_vec())).collect(),
            ..SendOp::default()
        }
    }

    impl ConnEntry for (u16, &'static str) {
        fn generation(&self) -> u16 {
            self.0
        }
    }

    #[test]
    fn conn_table_rebuilds_ids_and_rejects_stale_ones() {
        let mut t = ConnTable::default();
        let a = ConnId::new(3, 7, 1000);
        assert_eq!(t.by_slot(7, 1000).map(|(id, _)| id), None, "empty");
        assert!(t.insert(a, (7, "a")).unwrap().is_none());
        assert_eq!(t.get_mut(a).map(|c| c.1), Some("a"));
        assert_eq!(t.by_slot(7, 1000).map(|(id, c)| (id, c.1)), Some((a, "a")));
        // Another generation, slot or thread does not reach it.
        assert!(t.get_mut(ConnId::new(3, 8, 1000)).is_none());
        assert!(t.get_mut(ConnId::new(3, 7, 999)).is_none());
        assert!(t.get_mut(ConnId::new(4, 7, 1000)).is_none());
        assert!(t.by_slot(8, 1000).is_none());
        assert!(t.remove(ConnId::new(3, 8, 1000)).is_none());
        // Ids of another thread are refused.
        assert!(t.insert(ConnId::new(4, 0, 0), (0, "x")).is_err());
        assert_eq!(t.remove(a).map(|c| c.1), Some("a"));
        assert!(t.remove(a).is_none(), "double close is a no-op");
        // The slot reused with the next generation; a leftover entry is handed back.
        let b = ConnId::new(3, 8, 1000);
        assert!(t.insert(b, (8, "b")).unwrap().is_none());
        assert!(t.get_mut(a).is_none());
        assert_eq!(t.insert(b, (8, "c")).unwrap().map(|c| c.1), Some("b"));
    }

    fn rest(op: &SendOp) -> Vec<u8> {
        op.remaining().flatten().copied().collect()
    }

    #[test]
    fn advance_across_buffers() {
        let mut o = op(&[b"abc", b"", b"defg", b"h"]);
        assert_eq!(rest(&o), b"abcdefgh");
        o.advance(2);
        assert_eq!(rest(&o), b"cdefgh");
        o.advance(1);
        // The empty buffer is skipped.
        assert_eq!(o.first, 2);
        o.advance(3);
        assert_eq!(rest(&o), b"gh");
        assert!(!o.is_done());
        o.advance(2);
        assert!(o.is_done());
        assert_eq!(o.written, 8);
        assert_eq!(rest(&o), b"");
    }

    #[test]
    fn shared_buffers_are_not_copied() {
        let shared: Arc<[u8]> = Arc::from(&b"notify\n"[..]);
        let mut o = SendOp::default();
        o.bufs.push(SendBuf::from(Arc::clone(&shared)));
        o.bufs.push(SendBuf::from(Arc::clone(&shared)));
        assert_eq!(Arc::strong_count(&shared), 3);
        assert_eq!(
            o.remaining().next().map(<[u8]>::as_ptr),
            Some(shared.as_ptr())
        );
    }
}
