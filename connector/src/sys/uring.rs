//! The io_uring backend: one ring per connector thread, on the `io-uring` crate directly.
//!
//! * **The ring** is created `SINGLE_ISSUER | DEFER_TASKRUN | COOP_TASKRUN | SUBMIT_ALL` on the
//!   thread that uses it, with a completion queue four times the submission queue. Operations
//!   queued by the loop are submitted together by the next [`Backend::complete`], which also waits
//!   (with the loop's timeout passed to `io_uring_enter`, so the tick needs no timeout operation).
//!   Completed work runs only inside that call (deferred task work), never behind the loop's back.
//! * **Accept** is a multishot accept per listener into *direct descriptors*: the kernel puts each
//!   accepted socket in the ring's sparse fixed-file table (`IORING_FILE_INDEX_ALLOC`) and no
//!   regular file descriptor is ever created, so a process holds more connections than its
//!   `RLIMIT_NOFILE` (up to the table size per thread; the kernel caps each table at the soft
//!   `RLIMIT_NOFILE` when it is registered). When the table is full the multishot accept is
//!   cancelled and reported stopped (`more == false`) so the loop pauses accepting until a
//!   connection closes; connections arriving in the short moment between the table filling and
//!   the cancellation are refused by the kernel (accepted and closed at once).
//! * **Peer addresses.** A multishot accept cannot return addresses (one buffer would serve every
//!   connection it accepts) and `getpeername(2)` needs a regular descriptor. So each accepted
//!   socket gets one `IORING_OP_URING_CMD` `SOCKET_URING_OP_GETSOCKOPT(SOL_SOCKET, SO_PEERNAME)`
//!   (Linux 6.7), submitted with the next batch, into a boxed `sockaddr_storage`; the accept is
//!   reported to the loop when it completes, with the real address. The `io-uring` crate has no
//!   builder for that command, so [`getsockopt_entry`] rewrites the command code of its
//!   `SetSockOpt` entry, which has the same layout.
//! * **Receive** is a multishot receive per connection on the thread's provided-buffer ring
//!   ([`BufRing`]): the kernel picks a buffer only when data arrives, so an idle connection holds
//!   no buffer. A handle ([`UringBuf`]) goes to the loop, which gives it back with
//!   [`Backend::release`]; that puts the buffer back in the ring. The receive is re-armed when it
//!   stops while the connection is open (`-ENOBUFS` when the ring ran dry, or `IORING_CQE_F_MORE`
//!   cleared).
//! * **Send** is `IORING_OP_SEND` for one buffer and `IORING_OP_SENDMSG` (an iovec array, up to
//!   [`MAX_IOV`] buffers) otherwise, on the direct descriptor, with `MSG_NOSIGNAL | MSG_WAITALL`
//!   so the kernel itself finishes a send the socket could not take at once. The [`SendOp`] (its
//!   owned and shared `Arc<[u8]>` buffers) and, for `IORING_OP_SENDMSG` only, a boxed gather list
//!   (the iovecs and the `msghdr`) stay in the operation table until the completion, which gives
//!   the operation back; a short count is reported as such and the loop requeues the rest. A send
//!   of one buffer (a notify broadcast sends one shared buffer to every connection) allocates
//!   nothing: its entry points straight at the buffer's bytes.
//! * **Close** cancels the connection's operations (`IORING_OP_ASYNC_CANCEL` by fixed file, all
//!   of them) and then closes the table slot (`IORING_OP_CLOSE` on the fixed index); the socket is
//!   released once the cancelled operations are done. Completions that arrive later for the
//!   closed connection are recognised by the connection id (slot and generation) in their user
//!   data and dropped, their receive buffers going back to the ring.
//! * **Waking.** The thread's eventfd is watched by a multishot poll in the ring, so a message
//!   from another thread ends the wait.
//! * **Drop** cancels every operation (`IORING_ASYNC_CANCEL_ANY`) and waits for all of them to
//!   complete before the buffer ring, the receive buffers and the operation table are freed,
//!   since the kernel owns that memory while they are in flight. If they do not finish in
//!   [`DRAIN_TIMEOUT`] the memory is leaked rather than freed under the kernel.

use std::ffi::c_void;
use std::io;
use std::mem;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::ptr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use ids::ConnId;
use io_uring::{EnterFlags, IoUring, cqueue, opcode, squeue, types};
use socket2::{Domain, SockAddr, SockAddrStorage, Socket, Type};
use tracing::{debug, error, warn};

use self::buf_ring::BufRing;
use super::{
    Backend, Completion, ConnEntry, ConnTable, KEEP_COMPLETIONS, ListenSocket, ListenerId, SendOp,
    Waker,
};
use crate::UringConfig;
use crate::chunked::{CHUNK, Chunked};

mod buf_ring;

/// Buffer group of the receive buffer ring (each ring has its own groups, so any id works).
const BGID: u16 = 0;
/// Buffers gathered per `sendmsg` (the kernel's `UIO_MAXIOV`).
const MAX_IOV: usize = 1024;
/// Flags of every send: no `SIGPIPE`, and let the kernel finish partial sends.
const SEND_FLAGS: i32 = libc::MSG_NOSIGNAL | libc::MSG_WAITALL;
/// How long `Drop` waits for cancelled operations before leaking their memory.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest single wait while draining.
const DRAIN_STEP: Duration = Duration::from_millis(100);
/// Spare gather lists (iovecs + msghdr) kept for reuse.
const SPARE_GATHERS: usize = 64;
/// `SOCKET_URING_OP_GETSOCKOPT` of `enum io_uring_socket_op` (include/uapi/linux/io_uring.h).
const SOCKET_URING_OP_GETSOCKOPT: u32 = 2;
/// Byte offset of `cmd_op` in the 64-byte `struct io_uring_sqe` (kernel ABI).
const SQE_CMD_OP_OFFSET: usize = 8;

/// User data tags (top byte of the 64-bit user data).
const TAG_SHIFT: u32 = 56;
/// The eventfd poll.
const TAG_WAKER: u64 = 1;
/// A listener's multishot accept; the low bits are the listener index.
const TAG_ACCEPT: u64 = 2;
/// A connection's multishot receive; the low bits are the connection's generation and slot.
const TAG_RECV: u64 = 3;
/// An entry of the operation table (a send or a peer-address lookup); the low bits index it.
const TAG_OP: u64 = 4;
/// Cancellations and closes: submitted with `SKIP_SUCCESS`, hold no memory, not counted.
const TAG_UNTRACKED: u64 = 5;
/// An operation waited for on the spot (a handover's descriptor installs and table updates); the
/// low bits index its batch.
const TAG_SYNC: u64 = 6;
/// `IORING_FILE_INDEX_ALLOC` (`~0U`) as the `i32` offset of `IORING_OP_FILES_UPDATE`: the kernel
/// picks free table slots and writes them back into the descriptor array.
const FILE_INDEX_ALLOC: i32 = -1;
/// The longest wait for a handover's operations (they need no peer, so they finish at once).
const SYNC_TIMEOUT: Duration = Duration::from_secs(5);
const LOW_BITS: u64 = (1 << TAG_SHIFT) - 1;

/// An accepted connection: a slot of the ring's fixed-file table.
#[derive(Debug)]
pub(crate) struct UringSocket {
    file: u32,
}

/// Received bytes: `len` bytes of receive buffer `bid`, out of the buffer ring until released.
#[derive(Debug)]
pub(crate) struct UringBuf {
    bid: u16,
    len: u32,
}

/// One connector thread's ring, its listeners and connections.
///
/// Field order matters for drop (fields drop in declaration order after [`Drop::drop`]): the ring
/// is closed before the buffer memory is unmapped.
pub(crate) struct Uring {
    ring: IoUring,
    bufs: BufRing,
    ops: Slab<Op>,
    waker: Arc<Waker>,
    listeners: Vec<UListener>,
    /// Connections by slot of their [`ConnId`].
    conns: ConnTable<UConn>,
    /// Size of the fixed-file table.
    files: u32,
    /// Table slots in use: accepted sockets being looked up, handed out, or open.
    in_use: u32,
    /// Per table slot: whether an open connection owns it.
    owned: Vec<bool>,
    /// Slots reported in accept completions since the last `complete` (closed then unless opened).
    handed: Vec<u32>,
    /// Completions produced outside `complete` (refused arming, failed submission).
    ready: Vec<Completion<Self>>,
    /// Completion queue entries copied out of the ring, processed after.
    cqes: Vec<cqueue::Entry>,
    /// Counted operations whose final completion has not been reaped yet.
    inflight: usize,
    /// Gather lists of finished `sendmsg`s, kept for reuse (at most [`SPARE_GATHERS`]).
    #[expect(
        clippy::vec_box,
        reason = "the boxes move to and from `Op::Send`, which keeps them boxed to stay small"
    )]
    spare: Vec<Box<Gather>>,
    /// A failure that leaves the backend unusable, reported by the next `complete`.
    broken: Option<io::Error>,
    /// Receives are being stopped (a handover): one that ends is not re-armed.
    reads_stopped: bool,
    /// Sends in flight.
    sends: usize,
    /// Completions reaped while waiting for a handover's operations, handled by the next
    /// `complete`.
    deferred: Vec<cqueue::Entry>,
    /// Whether connections can be exported (see [`super::uring_handover`]), and why not.
    handover: Result<(), String>,
}

struct UListener {
    sock: Socket,
    /// Other threads accept on it too: one single-shot accept at a time (see [`ListenSocket`]).
    shared: bool,
    /// Length of the listener family's socket address (`SO_PEERNAME` wants exactly that).
    peer_len: u32,
    state: AcceptState,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum AcceptState {
    /// No accept in flight.
    Idle,
    /// A multishot accept is in flight.
    Armed,
    /// Cancelled because the table is full; reported stopped when its last completion arrives.
    Cancelling,
    /// Cancelled for a handover; idle, and not reported, when its last completion arrives.
    Stopping,
}

struct UConn {
    /// Generation of the connection's [`ConnId`] (see [`ConnTable`]).
    generation: u16,
    file: u32,
    /// [`RECV_ARMED`] and [`RECV_PAUSED`] (one byte with `sending`'s niche keeps
    /// `Option<UConn>` at 8 bytes).
    recv_flags: u8,
    /// A send is in flight.
    sending: bool,
}

/// [`UConn::recv_flags`]: a multishot receive is in flight.
const RECV_ARMED: u8 = 1;
/// [`UConn::recv_flags`]: reads paused for back-pressure ([`Backend::pause_recv`]): a receive
/// that ends is not re-armed.
const RECV_PAUSED: u8 = 2;

impl UConn {
    fn recv(&self) -> bool {
        self.recv_flags & RECV_ARMED != 0
    }

    fn paused(&self) -> bool {
        self.recv_flags & RECV_PAUSED != 0
    }

    fn set(&mut self, flag: u8, on: bool) {
        if on {
            self.recv_flags |= flag;
        } else {
            self.recv_flags &= !flag;
        }
    }
}

impl ConnEntry for UConn {
    fn generation(&self) -> u16 {
        self.generation
    }
}

/// An operation whose memory the kernel uses until its completion.
enum Op {
    Send {
        conn: ConnId,
        op: SendOp,
        /// The iovecs and `msghdr` of an `IORING_OP_SENDMSG`; `None` for an `IORING_OP_SEND` (one
        /// buffer), which points straight at the bytes.
        gather: Option<Box<Gather>>,
    },
    Peer {
        listener: usize,
        file: u32,
        addr: Box<SockAddrStorage>,
    },
}

/// The iovecs and `msghdr` of one `sendmsg`, boxed so that the `msghdr` does not move.
struct Gather {
    iov: Vec<libc::iovec>,
    msg: libc::msghdr,
}

impl Gather {
    fn new() -> Box<Self> {
        // SAFETY: `msghdr` is a plain C struct of integers and pointers, for which all-zero bytes
        // are a valid value (no name, no iovecs, no control data, no flags).
        let msg: libc::msghdr = unsafe { mem::zeroed() };
        Box::new(Self {
            iov: Vec::new(),
            msg,
        })
    }
}

impl Uring {
    /// Creates the ring and its resources on the calling thread (the only one that may use it),
    /// with `listeners` indexed by [`ListenerId`] and `waker` watched for cross-thread wake-ups.
    pub(crate) fn new(
        waker: Arc<Waker>,
        listeners: Vec<ListenSocket>,
        cfg: &UringConfig,
    ) -> io::Result<Self> {
        let listeners = listeners
            .into_iter()
            .map(|ListenSocket { sock, shared }| {
                let local = sock.local_addr()?;
                let peer_len = if local.is_ipv6() {
                    mem::size_of::<libc::sockaddr_in6>()
                } else {
                    mem::size_of::<libc::sockaddr_in>()
                };
                Ok(UListener {
                    sock,
                    peer_len: u32::try_from(peer_len).map_err(io::Error::other)?,
                    state: AcceptState::Idle,
                    shared,
                })
            })
            .collect::<io::Result<Vec<_>>>()?;
        let soft_limit = super::os::nofile_limit()?.rlim_cur;
        let files = cfg
            .files
            .min(u32::try_from(soft_limit).unwrap_or(u32::MAX))
            .max(1);
        let owned = vec![false; usize::try_from(files).map_err(io::Error::other)?];

        let ring = new_ring(cfg.sq_entries)?;
        ring.submitter().register_files_sparse(files)?;
        let handover = super::uring_handover();
        let bufs = BufRing::new(cfg.recv_buffers, cfg.recv_buffer_size)?;
        // From here on, dropping `this` unregisters the buffer ring before unmapping it.
        let mut this = Self {
            ring,
            bufs,
            ops: Slab::default(),
            waker,
            listeners,
            conns: ConnTable::default(),
            files,
            in_use: 0,
            owned,
            handed: Vec::new(),
            ready: Vec::new(),
            cqes: Vec::new(),
            inflight: 0,
            spare: Vec::new(),
            broken: None,
            reads_stopped: false,
            sends: 0,
            deferred: Vec::new(),
            handover,
        };
        this.bufs.register(&this.ring, BGID)?;
        this.arm_waker()?;
        debug!(
            files,
            recv_buffers = cfg.recv_buffers,
            recv_buffer_size = cfg.recv_buffer_size,
            sq_entries = cfg.sq_entries,
            "io_uring backend ready"
        );
        Ok(this)
    }

    /// Queues `entry`, submitting what is queued first if the submission queue is full. A
    /// `counted` entry ends with a final completion that `complete` (or `Drop`) must reap before
    /// the memory it uses is freed.
    ///
    /// # Safety
    ///
    /// Everything `entry` points to (bytes, iovecs, `msghdr`, socket address) must stay valid, and
    /// must not be written by Rust code if the kernel reads it or accessed at all if the kernel
    /// writes it, until the entry's final completion has been reaped by `complete` or `Drop`.
    unsafe fn push(&mut self, entry: &squeue::Entry, counted: bool) -> io::Result<()> {
        for _ in 0..2 {
            // SAFETY: the caller guarantees the memory `entry` refers to (see `# Safety`).
            let pushed = unsafe { self.ring.submission().push(entry) };
            if pushed.is_ok() {
                if counted {
                    self.inflight += 1;
                }
                return Ok(());
            }
            self.ring.submit()?;
        }
        Err(io::Error::other("io_uring submission queue stays full"))
    }

    fn arm_waker(&mut self) -> io::Result<()> {
        let fd = self.waker.as_fd().as_raw_fd();
        let entry = opcode::PollAdd::new(types::Fd(fd), libc::POLLIN as u32)
            .multi(true)
            .build()
            .user_data(TAG_WAKER << TAG_SHIFT);
        // SAFETY: a poll refers to no memory of ours; the eventfd is kept open by `self.waker`.
        unsafe { self.push(&entry, true) }
    }

    fn arm_recv(&mut self, id: ConnId) {
        let Some(c) = self.conns.get_mut(id) else {
            return;
        };
        if c.recv() {
            return;
        }
        let entry = opcode::RecvMulti::new(types::Fixed(c.file), BGID)
            .build()
            .user_data(recv_data(id));
        // SAFETY: the receive writes only into buffers of the provided-buffer ring, which `self`
        // keeps mapped and registered until `Drop` has drained every operation.
        match unsafe { self.push(&entry, true) } {
            Ok(()) => {
                if let Some(c) = self.conns.get_mut(id) {
                    c.set(RECV_ARMED, true);
                }
            }
            Err(e) => self.ready.push(Completion::RecvEnd {
                conn: id,
                error: Some(e),
            }),
        }
    }

    /// Starts looking up the peer address of the socket accepted into table slot `file`.
    fn lookup_peer(&mut self, listener: usize, file: u32, out: &mut Vec<Completion<Self>>) {
        let Some(peer_len) = self.listeners.get(listener).map(|l| l.peer_len) else {
            self.release_file(file, false);
            return;
        };
        let idx = self.ops.insert(Op::Peer {
            listener,
            file,
            addr: Box::new(SockAddrStorage::zeroed()),
        });
        let Some(Op::Peer { addr, .. }) = self.ops.get_mut(idx) else {
            return;
        };
        // SAFETY: `SockAddrStorage` is a transparent wrapper of `sockaddr_storage`, the type
        // viewed.
        let storage: &mut libc::sockaddr_storage = unsafe { addr.view_as() };
        let entry = getsockopt_entry(
            opcode::SetSockOpt::new(
                types::Fixed(file),
                libc::SOL_SOCKET as u32,
                libc::SO_PEERNAME as u32,
                ptr::from_mut(storage).cast::<c_void>().cast_const(),
                peer_len,
            )
            .build(),
        )
        .user_data(op_data(idx));
        // SAFETY: the kernel writes at most `peer_len` bytes (no more than a `sockaddr_storage`)
        // into the boxed storage, which stays in `self.ops`, untouched, until this entry's
        // completion is reaped (or `Drop` has drained).
        if let Err(e) = unsafe { self.push(&entry, true) } {
            self.ops.remove(idx);
            self.release_file(file, false);
            out.push(Completion::Accept {
                listener: ListenerId(listener),
                result: Err(e),
                more: true,
            });
        }
    }

    /// Closes table slot `file`, cancelling its operations first if it may have any.
    fn release_file(&mut self, file: u32, cancel: bool) {
        if let Some(owned) = usize::try_from(file)
            .ok()
            .and_then(|f| self.owned.get_mut(f))
        {
            *owned = false;
        }
        let untracked = TAG_UNTRACKED << TAG_SHIFT;
        if cancel {
            let entry =
                opcode::AsyncCancel2::new(types::CancelBuilder::fd(types::Fixed(file)).all())
                    .build()
                    .flags(squeue::Flags::SKIP_SUCCESS)
                    .user_data(untracked);
            // SAFETY: a cancellation refers to no memory of ours.
            if let Err(e) = unsafe { self.push(&entry, false) } {
                error!(file, error = %e, "could not cancel a connection's operations");
            }
        }
        let entry = opcode::Close::new(types::Fixed(file))
            .build()
            .flags(squeue::Flags::SKIP_SUCCESS)
            .user_data(untracked);
        // SAFETY: closing a table slot refers to no memory of ours.
        if let Err(e) = unsafe { self.push(&entry, false) } {
            error!(file, error = %e, "could not close a direct descriptor; its slot is lost");
            return;
        }
        self.in_use = self.in_use.saturating_sub(1);
    }

    /// Closes accepted sockets handed to the loop that it did not open.
    fn sweep_handed(&mut self) {
        let mut handed = mem::take(&mut self.handed);
        for file in handed.drain(..) {
            let owned = usize::try_from(file)
                .ok()
                .and_then(|f| self.owned.get(f))
                .copied()
                .unwrap_or(false);
            if !owned {
                debug!(file, "accepted connection not opened; closing it");
                self.release_file(file, false);
            }
        }
        self.handed = handed;
    }

    /// Submits what is queued and waits for completions up to `wait` (`None`: without limit).
    fn enter(&mut self, wait: Option<Duration>) -> io::Result<()> {
        let result = match wait {
            None => self.ring.submit_and_wait(1),
            Some(d) if d.is_zero() => {
                // `submit` alone would not run deferred task work, so nothing would complete.
                let queued = u32::try_from(self.ring.submission().len()).unwrap_or(u32::MAX);
                // SAFETY: no argument pointer is passed, the flag is a valid `io_uring_enter`
                // flag, and every queued entry was pushed under `push`'s contract.
                unsafe {
                    self.ring.submitter().enter::<libc::sigset_t>(
                        queued,
                        0,
                        EnterFlags::GETEVENTS.bits(),
                        None,
                    )
                }
            }
            Some(d) => {
                let ts = types::Timespec::from(d);
                let args = types::SubmitArgs::new().timespec(&ts);
                self.ring.submitter().submit_with_args(1, &args)
            }
        };
        match result {
            Ok(_) => Ok(()),
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::ETIME | libc::EINTR | libc::EBUSY | libc::EAGAIN)
                ) =>
            {
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    fn on_cqe(&mut self, cqe: &cqueue::Entry, out: &mut Vec<Completion<Self>>) {
        let data = cqe.user_data();
        let (res, flags) = (cqe.result(), cqe.flags());
        let low = data & LOW_BITS;
        match data >> TAG_SHIFT {
            TAG_WAKER => {
                self.waker.drain();
                if !cqueue::more(flags) {
                    self.inflight = self.inflight.saturating_sub(1);
                    if let Err(e) = self.arm_waker() {
                        self.broken = Some(e);
                    }
                }
            }
            TAG_ACCEPT => {
                let listener = usize::try_from(low).unwrap_or(usize::MAX);
                self.on_accept(listener, res, flags, out);
            }
            TAG_RECV => self.on_recv(low, res, flags, out),
            // Its wait gave up (see `wait_sync`); the memory it used was leaked.
            TAG_SYNC => self.inflight = self.inflight.saturating_sub(1),
            TAG_OP => {
                self.inflight = self.inflight.saturating_sub(1);
                if let Some(op) = u32::try_from(low).ok().and_then(|i| self.ops.remove(i)) {
                    self.on_op(op, res, out);
                }
            }
            _ => {
                if res < 0 {
                    debug!(error = %os_error(res), "cancel or close failed");
                }
            }
        }
    }

    fn on_accept(&mut self, index: usize, res: i32, flags: u32, out: &mut Vec<Completion<Self>>) {
        let more = cqueue::more(flags);
        if !more {
            self.inflight = self.inflight.saturating_sub(1);
        }
        let Some(l) = self.listeners.get_mut(index) else {
            return;
        };
        let was = l.state;
        if !more {
            l.state = AcceptState::Idle;
        }
        let listener = ListenerId(index);
        if let Ok(file) = u32::try_from(res) {
            self.in_use += 1;
            self.lookup_peer(index, file, out);
            if !more {
                match was {
                    // Stopped without an error (e.g. the completion queue overflowed): go on.
                    AcceptState::Armed => self.accept(listener),
                    AcceptState::Cancelling => self.cancelled_accept_ended(listener, out),
                    AcceptState::Idle | AcceptState::Stopping => {}
                }
            }
            return;
        }
        if was == AcceptState::Cancelling && !more {
            self.cancelled_accept_ended(listener, out);
            return;
        }
        if was == AcceptState::Stopping {
            // The cancellation's own completion, or a failure nobody waits for any more.
            return;
        }
        let transient = matches!(
            -res,
            libc::EINTR
                | libc::ECONNABORTED
                | libc::EPROTO
                | libc::EPERM
                | libc::ENETDOWN
                | libc::ENOPROTOOPT
                | libc::EHOSTDOWN
                | libc::ENONET
                | libc::EHOSTUNREACH
                | libc::EOPNOTSUPP
                | libc::ENETUNREACH
        );
        out.push(Completion::Accept {
            listener,
            result: Err(os_error(res)),
            more: more || transient,
        });
        if transient && !more {
            // This connection failed; others may still be accepted.
            self.accept(listener);
        }
    }

    /// The accept cancelled because the table was full has ended: report it stopped (the loop
    /// resumes it when a connection closes), or re-arm it if connections closed meanwhile (the
    /// loop's request to resume came while it was still being cancelled, and was ignored).
    fn cancelled_accept_ended(&mut self, listener: ListenerId, out: &mut Vec<Completion<Self>>) {
        if self.in_use < self.files {
            self.accept(listener);
        } else {
            out.push(Completion::Accept {
                listener,
                result: Err(self.table_full()),
                more: false,
            });
        }
    }

    fn on_recv(&mut self, low: u64, res: i32, flags: u32, out: &mut Vec<Completion<Self>>) {
        let more = cqueue::more(flags);
        if !more {
            self.inflight = self.inflight.saturating_sub(1);
        }
        let bid = cqueue::buffer_select(flags);
        let slot = (low & 0xFFFF_FFFF) as u32;
        let generation = ((low >> 32) & 0xFFFF) as u16;
        let Some((id, c)) = self.conns.by_slot(generation, slot) else {
            // A completion for a closed connection.
            if let Some(bid) = bid {
                self.bufs.give_back(bid);
            }
            return;
        };
        if !more {
            c.set(RECV_ARMED, false);
        }
        let rearm = !more && !self.reads_stopped && !c.paused();
        if let Ok(len @ 1..) = u32::try_from(res) {
            let Some(bid) = bid else {
                out.push(Completion::RecvEnd {
                    conn: id,
                    error: Some(io::Error::other("io_uring receive without a buffer")),
                });
                return;
            };
            out.push(Completion::Recv {
                conn: id,
                buf: UringBuf { bid, len },
            });
            if rearm {
                self.arm_recv(id);
            }
            return;
        }
        if let Some(bid) = bid {
            self.bufs.give_back(bid);
        }
        match -res {
            0 => out.push(Completion::RecvEnd {
                conn: id,
                error: None,
            }),
            // The buffer ring ran dry: the loop gives buffers back before the re-armed receive
            // is submitted (by the next `complete`).
            //
            // `ECANCELED`: stopped for a handover (`stop_recv`) or paused (`pause_recv`); the
            // connection stays open (a closed one has left the table), and reads again if it
            // was resumed meanwhile.
            libc::ENOBUFS | libc::ECANCELED if rearm => self.arm_recv(id),
            libc::ENOBUFS | libc::ECANCELED => {}
            _ => out.push(Completion::RecvEnd {
                conn: id,
                error: Some(os_error(res)),
            }),
        }
    }

    fn on_op(&mut self, op: Op, res: i32, out: &mut Vec<Completion<Self>>) {
        match op {
            Op::Send {
                conn,
                mut op,
                gather,
            } => {
                self.sends = self.sends.saturating_sub(1);
                if let Some(gather) = gather
                    && self.spare.len() < SPARE_GATHERS
                {
                    self.spare.push(gather);
                }
                let Some(c) = self.conns.get_mut(conn) else {
                    // Closed meanwhile: the kernel is done with the buffers, which drop here.
                    return;
                };
                c.sending = false;
                let result = match usize::try_from(res) {
                    // A send is submitted only with bytes to write (see `send`).
                    Ok(0) => Err(io::Error::from(io::ErrorKind::WriteZero)),
                    // A send cut short by `cancel_send` reports what it wrote before (the
                    // kernel's partial count), or this when it wrote nothing.
                    Err(_) if res == -libc::ECANCELED => Ok(0),
                    Ok(n) => {
                        op.advance(n);
                        Ok(n)
                    }
                    Err(_) => Err(os_error(res)),
                };
                out.push(Completion::Send { conn, op, result });
            }
            Op::Peer {
                listener,
                file,
                addr,
            } => {
                let listener_id = ListenerId(listener);
                if res == -libc::ENOTCONN {
                    // The peer is already gone.
                    self.release_file(file, false);
                    out.push(Completion::Accept {
                        listener: listener_id,
                        result: Err(os_error(res)),
                        more: true,
                    });
                    return;
                }
                let peer = match u32::try_from(res) {
                    Ok(len) => {
                        // SAFETY: the kernel wrote a socket address of `len` bytes (the length
                        // asked for, at most the size of the storage) into `addr`.
                        let sa = unsafe { SockAddr::new(*addr, len) };
                        sa.as_socket()
                    }
                    Err(_) => None,
                };
                let peer = peer.unwrap_or_else(|| {
                    static WARNED: AtomicBool = AtomicBool::new(false);
                    if !WARNED.swap(true, Ordering::Relaxed) {
                        warn!(
                            error = %os_error(res),
                            "could not read a peer address through io_uring; reporting 0.0.0.0:0"
                        );
                    }
                    SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0))
                });
                self.handed.push(file);
                out.push(Completion::Accept {
                    listener: listener_id,
                    result: Ok((UringSocket { file }, peer)),
                    more: true,
                });
            }
        }
    }

    /// Cancels the armed accepts when the fixed-file table is full (otherwise the kernel would
    /// accept connections and close them at once for want of a slot), and submits the
    /// cancellation at once, before the loop hears of the connection that filled the table.
    fn pause_accepts_if_full(&mut self) {
        if self.in_use < self.files {
            return;
        }
        let mut cancelled = false;
        for index in 0..self.listeners.len() {
            if self
                .listeners
                .get(index)
                .is_none_or(|l| l.state != AcceptState::Armed)
            {
                continue;
            }
            let entry =
                opcode::AsyncCancel2::new(types::CancelBuilder::user_data(accept_data(index)))
                    .build()
                    .flags(squeue::Flags::SKIP_SUCCESS)
                    .user_data(TAG_UNTRACKED << TAG_SHIFT);
            // SAFETY: a cancellation refers to no memory of ours.
            match unsafe { self.push(&entry, false) } {
                Ok(()) => {
                    if let Some(l) = self.listeners.get_mut(index) {
                        l.state = AcceptState::Cancelling;
                    }
                    cancelled = true;
                }
                Err(e) => error!(listener = index, error = %e, "could not pause accepting"),
            }
        }
        if cancelled && let Err(e) = self.ring.submit() {
            error!(error = %e, "io_uring submit failed");
        }
    }

    /// Takes back send `idx`, which was not submitted, and reports it with `result`.
    fn fail_send(&mut self, idx: u32, result: io::Result<usize>) {
        if let Some(Op::Send { conn, op, gather }) = self.ops.remove(idx) {
            if let Some(gather) = gather
                && self.spare.len() < SPARE_GATHERS
            {
                self.spare.push(gather);
            }
            self.ready.push(Completion::Send { conn, op, result });
        }
    }

    /// Submits what is queued and waits until every `results` entry that is `None` has its
    /// [`TAG_SYNC`] completion (indexed by the user data's low bits), for at most
    /// [`SYNC_TIMEOUT`]. Other completions reaped meanwhile are kept for the next `complete`.
    fn wait_sync(&mut self, results: &mut [Option<i32>]) -> io::Result<()> {
        let deadline = Instant::now() + SYNC_TIMEOUT;
        let mut reaped = Vec::new();
        while results.iter().any(Option::is_none) {
            let now = Instant::now();
            if now >= deadline {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "io_uring operations of a handover did not complete",
                ));
            }
            let ts = types::Timespec::from(deadline.duration_since(now).min(DRAIN_STEP));
            let args = types::SubmitArgs::new().timespec(&ts);
            if let Err(e) = self.ring.submitter().submit_with_args(1, &args)
                && !matches!(
                    e.raw_os_error(),
                    Some(libc::ETIME | libc::EINTR | libc::EBUSY | libc::EAGAIN)
                )
            {
                return Err(e);
            }
            reaped.extend(self.ring.completion());
            for cqe in reaped.drain(..) {
                if cqe.user_data() >> TAG_SHIFT == TAG_SYNC {
                    self.inflight = self.inflight.saturating_sub(1);
                    let index = usize::try_from(cqe.user_data() & LOW_BITS).unwrap_or(usize::MAX);
                    if let Some(slot) = results.get_mut(index) {
                        *slot = Some(cqe.result());
                    }
                } else {
                    self.deferred.push(cqe);
                }
            }
        }
        Ok(())
    }

    fn table_full(&self) -> io::Error {
        io::Error::other(format!(
            "the io_uring direct descriptor table of this thread is full ({} connections)",
            self.files
        ))
    }
}

impl Backend for Uring {
    type Socket = UringSocket;
    type RecvBuf = UringBuf;

    fn accept(&mut self, listener: ListenerId) {
        let Some(l) = self.listeners.get(listener.0) else {
            self.ready.push(Completion::Accept {
                listener,
                result: Err(io::Error::new(io::ErrorKind::NotFound, "no such listener")),
                more: false,
            });
            return;
        };
        match l.state {
            AcceptState::Idle => {}
            // Resumed while the stop is still being cancelled: it goes on once that ends (as
            // after a pause for a full table).
            AcceptState::Stopping => {
                if let Some(l) = self.listeners.get_mut(listener.0) {
                    l.state = AcceptState::Cancelling;
                }
                return;
            }
            AcceptState::Armed | AcceptState::Cancelling => return,
        }
        if self.in_use >= self.files {
            self.ready.push(Completion::Accept {
                listener,
                result: Err(self.table_full()),
                more: false,
            });
            return;
        }
        let fd = types::Fd(l.sock.as_raw_fd());
        let entry = if l.shared {
            // Re-armed by each completion, at the end of the kernel's queue of waiting accepts:
            // the threads take connections in turn.
            opcode::Accept::new(fd, ptr::null_mut(), ptr::null_mut())
                .file_index(Some(types::DestinationSlot::auto_target()))
                .build()
        } else {
            opcode::AcceptMulti::new(fd)
                .allocate_file_index(true)
                .build()
        }
        .user_data(accept_data(listener.0));
        // SAFETY: an accept into direct descriptors refers to no memory of ours (no address
        // buffer); the listener is kept open by `self.listeners`.
        match unsafe { self.push(&entry, true) } {
            Ok(()) => {
                if let Some(l) = self.listeners.get_mut(listener.0) {
                    l.state = AcceptState::Armed;
                }
            }
            Err(e) => self.ready.push(Completion::Accept {
                listener,
                result: Err(e),
                more: false,
            }),
        }
    }

    fn open(&mut self, conn: ConnId, sock: UringSocket) -> io::Result<()> {
        let file = usize::try_from(sock.file).map_err(io::Error::other)?;
        let previous = self.conns.insert(
            conn,
            UConn {
                generation: conn.generation(),
                file: sock.file,
                recv_flags: 0,
                sending: false,
            },
        )?;
        if let Some(old) = previous {
            // The loop closes a connection before reusing its slot; be safe anyway.
            self.release_file(old.file, true);
        }
        if let Some(owned) = self.owned.get_mut(file) {
            *owned = true;
        }
        Ok(())
    }

    fn recv(&mut self, conn: ConnId) {
        // Reading again (a handover taken back, or a connection opened after): receives that
        // end are re-armed again.
        self.reads_stopped = false;
        if let Some(c) = self.conns.get_mut(conn) {
            c.set(RECV_PAUSED, false);
        }
        self.arm_recv(conn);
    }

    fn recv_bytes(&self, buf: &UringBuf) -> &[u8] {
        self.bufs.bytes(buf.bid, buf.len)
    }

    fn release(&mut self, buf: UringBuf) {
        self.bufs.give_back(buf.bid);
    }

    fn send(&mut self, conn: ConnId, op: SendOp) {
        let Some(c) = self.conns.get_mut(conn) else {
            return;
        };
        if c.sending {
            self.ready.push(Completion::Send {
                conn,
                op,
                result: Err(io::Error::other("a send is already in flight")),
            });
            return;
        }
        let file = c.file;
        let (any, several) = {
            let mut parts = op.remaining().filter(|p| !p.is_empty());
            (parts.next().is_some(), parts.next().is_some())
        };
        if !any {
            // Nothing left to write.
            self.ready.push(Completion::Send {
                conn,
                op,
                result: Ok(0),
            });
            return;
        }
        // Only a send of several buffers needs a gather list.
        let gather = several.then(|| self.spare.pop().unwrap_or_else(Gather::new));
        // Stored first, so that nothing the entry points to moves afterwards.
        let idx = self.ops.insert(Op::Send { conn, op, gather });
        let Some(Op::Send { op, gather, .. }) = self.ops.get_mut(idx) else {
            return;
        };
        let entry = match gather {
            None => op.remaining().find(|p| !p.is_empty()).map(|part| {
                opcode::Send::new(
                    types::Fixed(file),
                    part.as_ptr(),
                    u32::try_from(part.len()).unwrap_or(u32::MAX),
                )
                .flags(SEND_FLAGS)
                .build()
            }),
            Some(gather) => {
                gather.iov.clear();
                for part in op.remaining().filter(|p| !p.is_empty()).take(MAX_IOV) {
                    gather.iov.push(libc::iovec {
                        iov_base: part.as_ptr().cast_mut().cast::<c_void>(),
                        iov_len: part.len(),
                    });
                }
                gather.msg.msg_iov = gather.iov.as_mut_ptr();
                gather.msg.msg_iovlen = gather.iov.len();
                Some(
                    opcode::SendMsg::new(types::Fixed(file), ptr::from_ref(&gather.msg))
                        .flags(SEND_FLAGS as u32)
                        .build(),
                )
            }
        };
        let Some(entry) = entry else {
            // Not reached: there are bytes to write (checked above).
            self.fail_send(idx, Ok(0));
            return;
        };
        let entry = entry.user_data(op_data(idx));
        // SAFETY: the entry points to the bytes of the `SendOp`'s owned and shared buffers (heap
        // memory, which does not move when the `SendOp` does) and, for `SENDMSG`, to the iovecs
        // and `msghdr` of the boxed gather list (heap memory too). All of them stay in `self.ops`,
        // unmodified, until this entry's completion is reaped (or `Drop` has drained).
        match unsafe { self.push(&entry, true) } {
            Ok(()) => {
                self.sends += 1;
                if let Some(c) = self.conns.get_mut(conn) {
                    c.sending = true;
                }
            }
            Err(e) => self.fail_send(idx, Err(e)),
        }
    }

    fn close(&mut self, conn: ConnId) {
        if let Some(c) = self.conns.remove(conn) {
            self.release_file(c.file, c.recv() || c.sending);
        }
    }

    fn stop_accepts(&mut self) {
        for index in 0..self.listeners.len() {
            let Some(l) = self.listeners.get_mut(index) else {
                continue;
            };
            match l.state {
                AcceptState::Idle | AcceptState::Stopping => continue,
                // Already being cancelled: its end is now not reported.
                AcceptState::Cancelling => {
                    l.state = AcceptState::Stopping;
                    continue;
                }
                AcceptState::Armed => l.state = AcceptState::Stopping,
            }
            let entry =
                opcode::AsyncCancel2::new(types::CancelBuilder::user_data(accept_data(index)))
                    .build()
                    .flags(squeue::Flags::SKIP_SUCCESS)
                    .user_data(TAG_UNTRACKED << TAG_SHIFT);
            // SAFETY: a cancellation refers to no memory of ours.
            if let Err(e) = unsafe { self.push(&entry, false) } {
                error!(listener = index, error = %e, "could not stop accepting");
            }
        }
    }

    fn stop_recv(&mut self, conn: ConnId) {
        self.reads_stopped = true;
        let Some(c) = self.conns.get_mut(conn) else {
            return;
        };
        if !c.recv() {
            return;
        }
        let entry = opcode::AsyncCancel2::new(types::CancelBuilder::user_data(recv_data(conn)))
            .build()
            .flags(squeue::Flags::SKIP_SUCCESS)
            .user_data(TAG_UNTRACKED << TAG_SHIFT);
        // SAFETY: a cancellation refers to no memory of ours.
        if let Err(e) = unsafe { self.push(&entry, false) } {
            error!(conn = %conn, error = %e, "could not stop a receive");
        }
    }

    fn reads_resumed(&mut self) {
        // Cleared here and not only by `recv`: a thread whose connections are all paused for
        // back-pressure arms none at the resume, and `resume_recv` would then never arm them.
        self.reads_stopped = false;
    }

    fn pause_recv(&mut self, conn: ConnId) {
        let Some(c) = self.conns.get_mut(conn) else {
            return;
        };
        c.set(RECV_PAUSED, true);
        if !c.recv() {
            return;
        }
        let entry = opcode::AsyncCancel2::new(types::CancelBuilder::user_data(recv_data(conn)))
            .build()
            .flags(squeue::Flags::SKIP_SUCCESS)
            .user_data(TAG_UNTRACKED << TAG_SHIFT);
        // SAFETY: a cancellation refers to no memory of ours.
        if let Err(e) = unsafe { self.push(&entry, false) } {
            // Still reading: the outbound cap bounds the connection's queue anyway.
            debug!(conn = %conn, error = %e, "could not pause a receive");
        }
    }

    fn resume_recv(&mut self, conn: ConnId) {
        let Some(c) = self.conns.get_mut(conn) else {
            return;
        };
        c.set(RECV_PAUSED, false);
        // A receive being cancelled re-arms itself when its end comes back (`on_recv`).
        if !self.reads_stopped {
            self.arm_recv(conn);
        }
    }

    fn cancel_send(&mut self, conn: ConnId) {
        let Some(c) = self.conns.get_mut(conn) else {
            return;
        };
        if !c.sending {
            return;
        }
        // Every operation on the socket: its receive is stopped already.
        let entry = opcode::AsyncCancel2::new(types::CancelBuilder::fd(types::Fixed(c.file)).all())
            .build()
            .flags(squeue::Flags::SKIP_SUCCESS)
            .user_data(TAG_UNTRACKED << TAG_SHIFT);
        // SAFETY: a cancellation refers to no memory of ours.
        if let Err(e) = unsafe { self.push(&entry, false) } {
            error!(conn = %conn, error = %e, "could not cancel a send");
        }
    }

    fn settled(&self) -> bool {
        // Only the waker's poll and the sends left in flight, nothing left to report.
        self.inflight <= 1 + self.sends && self.ready.is_empty() && self.deferred.is_empty()
    }

    fn can_export(&self) -> io::Result<()> {
        self.handover.clone().map_err(|reason| {
            io::Error::new(
                io::ErrorKind::Unsupported,
                format!(
                    "io_uring connections cannot be handed over here ({reason}); the epoll \
                     backend can hand them over"
                ),
            )
        })
    }

    fn export(&mut self, conns: &[ConnId]) -> Vec<io::Result<OwnedFd>> {
        let files: Vec<Option<u32>> = conns
            .iter()
            .map(|&id| self.conns.get_mut(id).map(|c| c.file))
            .collect();
        let mut results: Vec<Option<i32>> = vec![None; files.len()];
        for (i, (file, result)) in files.iter().zip(results.iter_mut()).enumerate() {
            let Some(file) = *file else {
                *result = Some(-libc::ENOENT);
                continue;
            };
            let entry = opcode::FixedFdInstall::new(types::Fixed(file), 0)
                .build()
                .user_data(sync_data(i));
            // SAFETY: installing a descriptor refers to no memory of ours.
            if let Err(e) = unsafe { self.push(&entry, true) } {
                *result = Some(-e.raw_os_error().unwrap_or(libc::EIO));
            }
        }
        if let Err(e) = self.wait_sync(&mut results) {
            // Every connection stays (an install may still be running on its slot).
            error!(error = %e, "io_uring descriptor installs did not finish");
            self.broken = Some(e);
            return results
                .iter()
                .map(|_| Err(io::Error::from(io::ErrorKind::TimedOut)))
                .collect();
        }
        conns
            .iter()
            .zip(files)
            .zip(results)
            .map(|((&id, file), res)| {
                let res = res.unwrap_or(-libc::EIO);
                if res < 0 {
                    // The connection stays as it is (e.g. `EMFILE`: a smaller batch may work).
                    return Err(os_error(res));
                }
                // SAFETY: the kernel has just installed this descriptor for us and nothing else
                // knows of it.
                let fd = unsafe { OwnedFd::from_raw_fd(res) };
                // The regular descriptor holds the socket from now on: the slot goes.
                self.conns.remove(id);
                if let Some(file) = file {
                    self.release_file(file, false);
                }
                Ok(fd)
            })
            .collect()
    }

    fn adopt(&mut self, fds: Vec<OwnedFd>) -> Vec<io::Result<UringSocket>> {
        let room = usize::try_from(self.files.saturating_sub(self.in_use)).unwrap_or(0);
        let take = fds.len().min(room);
        let mut raw: Box<[i32]> = fds.iter().take(take).map(AsRawFd::as_raw_fd).collect();
        let mut installed = 0;
        if take > 0 {
            for fd in fds.iter().take(take) {
                // Epoll sockets are non-blocking: the same everywhere keeps handovers simple.
                let _ = socket2::SockRef::from(fd).set_nonblocking(true);
            }
            let entry = opcode::FilesUpdate::new(raw.as_ptr(), u32::try_from(take).unwrap_or(0))
                .offset(FILE_INDEX_ALLOC)
                .build()
                .user_data(sync_data(0));
            let mut result = [None];
            let failed = |fds: &[OwnedFd], e: &io::Error| -> Vec<io::Result<UringSocket>> {
                fds.iter()
                    .map(|_| Err(io::Error::new(e.kind(), e.to_string())))
                    .collect()
            };
            // SAFETY: the kernel reads the descriptors from `raw` and writes the table slots
            // back into it; `raw` (and the descriptors, in `fds`) stay alive and untouched until
            // the completion is reaped by `wait_sync`, or are leaked if it never comes.
            if let Err(e) = unsafe { self.push(&entry, true) } {
                return failed(&fds, &e);
            }
            if let Err(e) = self.wait_sync(&mut result) {
                error!(error = %e, "io_uring table update did not finish; leaking its memory");
                let errors = failed(&fds, &e);
                mem::forget(mem::take(&mut raw));
                mem::forget(fds);
                self.broken = Some(e);
                return errors;
            }
            match result {
                [Some(n)] if n >= 0 => installed = usize::try_from(n).unwrap_or(0).min(take),
                [Some(n)] => return failed(&fds, &os_error(n)),
                [None] => {}
            }
        }
        // The table holds its own reference to each socket installed: the descriptors go.
        let count = fds.len();
        drop(fds);
        (0..count)
            .map(|i| {
                if i >= installed {
                    return Err(self.table_full());
                }
                let file = raw
                    .get(i)
                    .and_then(|&f| u32::try_from(f).ok())
                    .ok_or_else(|| io::Error::other("io_uring gave no table slot"))?;
                self.in_use += 1;
                // Closed by the next `complete` unless opened.
                self.handed.push(file);
                Ok(UringSocket { file })
            })
            .collect()
    }

    fn submit_now(&mut self) {
        if self.ring.submission().is_empty() {
            return;
        }
        // Without GETEVENTS: the sends run now, their completions wait for the next `complete`.
        // A failure leaves the entries queued for `complete`, which reports a lasting one.
        if let Err(e) = self.ring.submit() {
            tracing::debug!(error = %e, "io_uring submit in the middle of a round failed");
        }
    }

    fn complete(
        &mut self,
        timeout: Option<Duration>,
        out: &mut Vec<Completion<Self>>,
    ) -> io::Result<()> {
        if let Some(e) = self.broken.take() {
            return Err(e);
        }
        self.sweep_handed();
        let had_ready = !self.ready.is_empty() || !self.deferred.is_empty();
        out.append(&mut self.ready);
        self.ready.shrink_to(KEEP_COMPLETIONS);

        self.enter(if had_ready {
            Some(Duration::ZERO)
        } else {
            timeout
        })?;

        let mut cqes = mem::take(&mut self.cqes);
        cqes.append(&mut self.deferred);
        cqes.extend(self.ring.completion());
        for cqe in &cqes {
            self.on_cqe(cqe, out);
        }
        cqes.clear();
        cqes.shrink_to(KEEP_COMPLETIONS);
        self.cqes = cqes;

        self.pause_accepts_if_full();
        Ok(())
    }
}

impl Drop for Uring {
    fn drop(&mut self) {
        // Completions reaped by a handover's wait and not handled yet: count the final ones.
        for cqe in mem::take(&mut self.deferred) {
            let last = match cqe.user_data() >> TAG_SHIFT {
                TAG_WAKER | TAG_ACCEPT | TAG_RECV => !cqueue::more(cqe.flags()),
                TAG_OP | TAG_SYNC => true,
                _ => false,
            };
            if last {
                self.inflight = self.inflight.saturating_sub(1);
            }
            if let Some(bid) = cqueue::buffer_select(cqe.flags()) {
                self.bufs.give_back(bid);
            }
        }
        // Queued closes are submitted with the cancellation, which ends everything else.
        let entry = opcode::AsyncCancel2::new(types::CancelBuilder::any())
            .build()
            .flags(squeue::Flags::SKIP_SUCCESS)
            .user_data(TAG_UNTRACKED << TAG_SHIFT);
        // SAFETY: a cancellation refers to no memory of ours.
        if let Err(e) = unsafe { self.push(&entry, false) } {
            error!(error = %e, "could not cancel io_uring operations");
        }
        if let Err(e) = self.ring.submit() {
            error!(error = %e, "io_uring submit failed");
        }
        let deadline = Instant::now() + DRAIN_TIMEOUT;
        while self.inflight > 0 {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            let ts = types::Timespec::from(deadline.duration_since(now).min(DRAIN_STEP));
            let args = types::SubmitArgs::new().timespec(&ts);
            if let Err(e) = self.ring.submitter().submit_with_args(1, &args)
                && !matches!(
                    e.raw_os_error(),
                    Some(libc::ETIME | libc::EINTR | libc::EBUSY | libc::EAGAIN)
                )
            {
                error!(error = %e, "io_uring wait failed while draining");
                break;
            }
            for cqe in self.ring.completion() {
                let tag = cqe.user_data() >> TAG_SHIFT;
                let last = match tag {
                    TAG_WAKER | TAG_ACCEPT | TAG_RECV => !cqueue::more(cqe.flags()),
                    TAG_OP | TAG_SYNC => true,
                    _ => false,
                };
                if last {
                    self.inflight = self.inflight.saturating_sub(1);
                }
            }
        }
        if self.inflight > 0 {
            error!(
                inflight = self.inflight,
                "io_uring operations still in flight after cancellation; leaking their memory"
            );
            self.bufs.leak();
            mem::forget(mem::take(&mut self.ops));
        } else if self.bufs.registered
            && let Err(e) = self.ring.submitter().unregister_buf_ring(BGID)
        {
            debug!(error = %e, "could not unregister the buffer ring; leaking it");
            self.bufs.leak();
        }
    }
}

/// Creates a ring with the flags the backend uses and a completion queue four times `sq`.
fn new_ring(sq: u32) -> io::Result<IoUring> {
    IoUring::builder()
        .setup_single_issuer()
        .setup_defer_taskrun()
        .setup_coop_taskrun()
        .setup_submit_all()
        .setup_cqsize(sq.saturating_mul(4))
        .build(sq)
}

/// Turns a built `SetSockOpt` entry into the matching `getsockopt` command.
///
/// Both are `IORING_OP_URING_CMD` with `level`, `optname`, `optval` and `optlen` in the same SQE
/// fields; only `cmd_op` differs. The `io-uring` crate builds the former but not the latter.
fn getsockopt_entry(setsockopt: squeue::Entry) -> squeue::Entry {
    // SAFETY: `squeue::Entry` is a `repr(C)` wrapper of the kernel's 64-byte `io_uring_sqe`, made
    // of integers and unions of integers without padding, so all 64 bytes are initialised
    // (`transmute` checks the sizes at compile time).
    let mut bytes = unsafe { mem::transmute::<squeue::Entry, [u8; 64]>(setsockopt) };
    if let Some(cmd_op) = bytes.get_mut(SQE_CMD_OP_OFFSET..SQE_CMD_OP_OFFSET + 4) {
        cmd_op.copy_from_slice(&SOCKET_URING_OP_GETSOCKOPT.to_ne_bytes());
    }
    // SAFETY: every bit pattern is a valid `io_uring_sqe` (integers only); these are the bytes of
    // a valid entry with its `cmd_op` changed.
    unsafe { mem::transmute::<[u8; 64], squeue::Entry>(bytes) }
}

/// Checks that this kernel can hand io_uring connections over: `IORING_OP_FIXED_FD_INSTALL`
/// (Linux 6.8) to export them, `IORING_OP_FILES_UPDATE` to adopt them.
pub(super) fn probe_handover() -> Result<(), String> {
    let ring = new_ring(8).map_err(|e| describe_setup_error(&e))?;
    let mut probe = io_uring::Probe::new();
    ring.submitter()
        .register_probe(&mut probe)
        .map_err(|e| format!("IORING_REGISTER_PROBE failed: {e}"))?;
    for (code, name) in [
        (opcode::FixedFdInstall::CODE, "FIXED_FD_INSTALL (Linux 6.8)"),
        (opcode::FilesUpdate::CODE, "FILES_UPDATE"),
    ] {
        if !probe.is_supported(code) {
            return Err(format!(
                "this kernel does not support io_uring opcode IORING_OP_{name}"
            ));
        }
    }
    Ok(())
}

/// Checks that io_uring can run the backend (see [`crate::probe_uring`]).
pub(super) fn probe() -> Result<(), String> {
    let mut ring = new_ring(8).map_err(|e| describe_setup_error(&e))?;
    let mut probe = io_uring::Probe::new();
    ring.submitter()
        .register_probe(&mut probe)
        .map_err(|e| format!("IORING_REGISTER_PROBE failed: {e}"))?;
    let needed = [
        (opcode::AcceptMulti::CODE, "ACCEPT"),
        (opcode::RecvMulti::CODE, "RECV"),
        (opcode::Send::CODE, "SEND"),
        (opcode::SendMsg::CODE, "SENDMSG"),
        (opcode::Close::CODE, "CLOSE"),
        (opcode::AsyncCancel2::CODE, "ASYNC_CANCEL"),
        (opcode::PollAdd::CODE, "POLL_ADD"),
        (opcode::SetSockOpt::CODE, "URING_CMD"),
    ];
    for (code, name) in needed {
        if !probe.is_supported(code) {
            return Err(format!(
                "this kernel does not support io_uring opcode IORING_OP_{name}"
            ));
        }
    }
    ring.submitter()
        .register_files_sparse(4)
        .map_err(|e| format!("registering a sparse fixed-file table failed: {e}"))?;
    let mut bufs = BufRing::new(2, 64).map_err(|e| format!("mapping buffers failed: {e}"))?;
    bufs.register(&ring, BGID)
        .map_err(|e| format!("registering a provided-buffer ring failed: {e}"))?;
    if ring.submitter().unregister_buf_ring(BGID).is_err() {
        bufs.leak();
    }
    probe_peer_name(&mut ring)
}

/// Runs the `getsockopt(SO_PEERNAME)` command on an unconnected socket: a kernel that supports it
/// answers `ENOTCONN` (Linux 6.7 and later; older ones refuse the command).
fn probe_peer_name(ring: &mut IoUring) -> Result<(), String> {
    let sock = Socket::new(Domain::IPV4, Type::STREAM, None)
        .map_err(|e| format!("creating a probe socket failed: {e}"))?;
    let mut addr = Box::new(SockAddrStorage::zeroed());
    // SAFETY: `SockAddrStorage` is a transparent wrapper of `sockaddr_storage`, the type viewed.
    let storage: &mut libc::sockaddr_storage = unsafe { addr.view_as() };
    let entry = getsockopt_entry(
        opcode::SetSockOpt::new(
            types::Fd(sock.as_raw_fd()),
            libc::SOL_SOCKET as u32,
            libc::SO_PEERNAME as u32,
            ptr::from_mut(storage).cast::<c_void>().cast_const(),
            16,
        )
        .build(),
    )
    .user_data(1);
    // SAFETY: the kernel writes at most 16 bytes into the boxed storage, which is leaked below
    // unless the completion has been reaped.
    let pushed = unsafe { ring.submission().push(&entry) };
    if pushed.is_err() {
        return Err("the probe ring's submission queue is full".to_owned());
    }
    let waited = ring.submit_and_wait(1);
    let Some(cqe) = ring.completion().next() else {
        Box::leak(addr);
        return Err(format!("the probe command did not complete: {waited:?}"));
    };
    match -cqe.result() {
        libc::ENOTCONN => Ok(()),
        _ => Err(format!(
            "getsockopt(SO_PEERNAME) through IORING_OP_URING_CMD is not supported \
             (Linux 6.7 or later is needed): {}",
            os_error(cqe.result())
        )),
    }
}

fn describe_setup_error(e: &io::Error) -> String {
    let why = match e.raw_os_error() {
        Some(libc::ENOSYS) => "this kernel has no io_uring",
        Some(libc::EPERM) => "refused: kernel.io_uring_disabled or a seccomp filter",
        Some(libc::ENOMEM) => "out of memory (locked-memory limit or memory cgroup)",
        Some(libc::EINVAL) => "SINGLE_ISSUER | DEFER_TASKRUN not supported (Linux 6.1 or later)",
        _ => "failed",
    };
    format!("io_uring_setup: {why}: {e}")
}

/// The error of a negative completion result.
fn os_error(res: i32) -> io::Error {
    io::Error::from_raw_os_error(res.saturating_neg())
}

fn accept_data(listener: usize) -> u64 {
    (TAG_ACCEPT << TAG_SHIFT) | (listener as u64 & LOW_BITS)
}

fn recv_data(id: ConnId) -> u64 {
    (TAG_RECV << TAG_SHIFT) | (u64::from(id.generation()) << 32) | u64::from(id.slot())
}

fn op_data(index: u32) -> u64 {
    (TAG_OP << TAG_SHIFT) | u64::from(index)
}

fn sync_data(index: usize) -> u64 {
    (TAG_SYNC << TAG_SHIFT) | (index as u64 & LOW_BITS)
}

/// A table of values indexed by `u32`, reusing free entries. It grows in chunks ([`Chunked`]):
/// a broadcast puts a send in flight on every connection at once.
struct Slab<T> {
    entries: Chunked<Option<T>>,
    free: Vec<u32>,
    /// Entries in use.
    live: usize,
}

impl<T> Default for Slab<T> {
    fn default() -> Self {
        Self {
            entries: Chunked::new(),
            free: Vec::new(),
            live: 0,
        }
    }
}

impl<T> Slab<T> {
    fn insert(&mut self, value: T) -> u32 {
        if let Some(index) = self.free.pop()
            && let Some(entry) = usize::try_from(index)
                .ok()
                .and_then(|i| self.entries.get_mut(i))
        {
            *entry = Some(value);
            self.live += 1;
            return index;
        }
        let index = u32::try_from(self.entries.len()).unwrap_or(u32::MAX);
        self.entries.push(Some(value));
        self.live += 1;
        index
    }

    fn get_mut(&mut self, index: u32) -> Option<&mut T> {
        self.entries
            .get_mut(usize::try_from(index).ok()?)
            .and_then(Option::as_mut)
    }

    fn remove(&mut self, index: u32) -> Option<T> {
        let value = self.entries.get_mut(usize::try_from(index).ok()?)?.take()?;
        self.free.push(index);
        self.live -= 1;
        if self.live == 0 && self.entries.len() > CHUNK {
            // A broadcast had a send in flight on every connection at once; with none left, the
            // table's memory goes rather than staying resident until the next one (no index is
            // held anywhere, as nothing is in flight).
            *self = Self::default();
        }
        Some(value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::SendBuf;

    #[test]
    fn connection_state_stays_small() {
        // Per connection, next to the worker's slot: the send in flight lives in `ops`.
        assert!(
            size_of::<Option<UConn>>() <= 8,
            "{}",
            size_of::<Option<UConn>>()
        );
        // An entry of `ops` per send in flight: a broadcast has one per connection at once, and
        // the table keeps its size after.
        assert!(size_of::<Option<Op>>() <= 88, "{}", size_of::<Option<Op>>());
    }

    #[test]
    fn getsockopt_entry_changes_only_the_command() {
        let mut storage = SockAddrStorage::zeroed();
        let set = opcode::SetSockOpt::new(
            types::Fixed(7),
            libc::SOL_SOCKET as u32,
            libc::SO_PEERNAME as u32,
            ptr::from_mut(&mut storage).cast::<c_void>().cast_const(),
            16,
        )
        .build()
        .user_data(42);
        // SAFETY: as in `getsockopt_entry`.
        let before = unsafe { mem::transmute::<squeue::Entry, [u8; 64]>(set.clone()) };
        let get = getsockopt_entry(set);
        assert_eq!(get.get_user_data(), 42);
        // SAFETY: as in `getsockopt_entry`.
        let after = unsafe { mem::transmute::<squeue::Entry, [u8; 64]>(get) };
        assert_eq!(after[0], opcode::SetSockOpt::CODE);
        assert_eq!(after[8..12], SOCKET_URING_OP_GETSOCKOPT.to_ne_bytes());
        assert_eq!(
            before[8..12],
            3u32.to_ne_bytes(),
            "SOCKET_URING_OP_SETSOCKOPT"
        );
        assert_eq!(before[..8], after[..8]);
        assert_eq!(before[12..], after[12..]);
    }

    #[test]
    fn user_data_keeps_tags_and_ids() {
        let id = ConnId::new(3, 0xBEEF, 0x1234_5678);
        let d = recv_data(id);
        assert_eq!(d >> TAG_SHIFT, TAG_RECV);
        assert_eq!(d & 0xFFFF_FFFF, 0x1234_5678);
        assert_eq!((d >> 32) & 0xFFFF, 0xBEEF);
        assert_eq!(accept_data(5) >> TAG_SHIFT, TAG_ACCEPT);
        assert_eq!(accept_data(5) & LOW_BITS, 5);
        assert_eq!(op_data(u32::MAX) & LOW_BITS, u64::from(u32::MAX));
    }

    #[test]
    fn slab_reuses_entries() {
        let mut slab = Slab::default();
        let a = slab.insert("a");
        let b = slab.insert("b");
        assert_eq!(slab.remove(a), Some("a"));
        assert_eq!(slab.remove(a), None);
        assert_eq!(slab.insert("c"), a);
        assert_eq!(slab.get_mut(b).copied(), Some("b"));
    }

    #[test]
    fn slab_gives_its_memory_back_once_empty_after_a_burst() {
        let mut slab = Slab::default();
        let ids: Vec<u32> = (0..3 * CHUNK).map(|i| slab.insert(i)).collect();
        assert_eq!(slab.entries.len(), 3 * CHUNK);
        for &id in &ids[1..] {
            assert!(slab.remove(id).is_some());
        }
        assert_eq!(slab.entries.len(), 3 * CHUNK, "one still in use: kept");
        assert_eq!(slab.get_mut(ids[0]).copied(), Some(0));
        assert_eq!(slab.remove(ids[0]), Some(0));
        assert_eq!((slab.entries.len(), slab.free.len(), slab.live), (0, 0, 0));
        assert_eq!(slab.remove(ids[0]), None);
        assert_eq!(slab.insert(7), 0);
    }

    /// Completes until `pick` takes a completion out of the list; bounded in time.
    fn wait_for<T>(
        ring: &mut Uring,
        out: &mut Vec<Completion<Uring>>,
        mut pick: impl FnMut(&mut Vec<Completion<Uring>>) -> Option<T>,
    ) -> T {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(found) = pick(out) {
                return found;
            }
            assert!(Instant::now() < deadline, "timed out");
            ring.complete(Some(Duration::from_millis(50)), out).unwrap();
        }
    }

    /// Completes until a connection is accepted; returns its socket.
    fn accepted(ring: &mut Uring, out: &mut Vec<Completion<Uring>>) -> UringSocket {
        wait_for(ring, out, |out| {
            let i = out
                .iter()
                .position(|c| matches!(c, Completion::Accept { result: Ok(_), .. }))?;
            match out.remove(i) {
                Completion::Accept {
                    result: Ok((sock, _)),
                    ..
                } => Some(sock),
                _ => None,
            }
        })
    }

    /// A ring with one loopback listener, accepting; `None` (the test is skipped) where io_uring
    /// is not available.
    fn listening_ring() -> Option<(Uring, std::net::SocketAddr)> {
        if let Err(reason) = super::super::probe_uring() {
            eprintln!("skipped: io_uring is not available: {reason}");
            return None;
        }
        let (listener, addr) =
            super::super::listener_socket("127.0.0.1:0".parse().unwrap(), 16).unwrap();
        let waker = Arc::new(Waker::new().unwrap());
        let mut ring = Uring::new(waker, vec![listener.into()], &UringConfig::default()).unwrap();
        ring.accept(ListenerId(0));
        Some((ring, addr))
    }

    #[test]
    fn drop_cancels_and_drains_a_send_in_flight() {
        let Some((mut ring, addr)) = listening_ring() else {
            return;
        };
        // A client that never reads, with a small receive buffer.
        let client = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
        client.set_recv_buffer_size(4096).unwrap();
        client
            .connect_timeout(&addr.into(), Duration::from_secs(10))
            .unwrap();
        let local = client.local_addr().unwrap().as_socket().unwrap();

        let mut out = Vec::new();
        let (sock, peer) = wait_for(&mut ring, &mut out, |out| {
            let i = out
                .iter()
                .position(|c| matches!(c, Completion::Accept { result: Ok(_), .. }))?;
            match out.remove(i) {
                Completion::Accept {
                    result: Ok(accepted),
                    ..
                } => Some(accepted),
                _ => None,
            }
        });
        assert_eq!(peer, local, "the real peer address");
        let id = ConnId::new(0, 0, 0);
        ring.open(id, sock).unwrap();
        ring.recv(id);

        let big: Arc<[u8]> = vec![7u8; 8 << 20].into();
        ring.send(
            id,
            SendOp {
                bufs: [
                    SendBuf::from(Arc::clone(&big)),
                    SendBuf::from(vec![1u8; 10]),
                ]
                .into_iter()
                .collect(),
                ..SendOp::default()
            },
        );
        for _ in 0..5 {
            ring.complete(Some(Duration::from_millis(20)), &mut out)
                .unwrap();
        }
        assert!(
            out.iter().all(|c| !matches!(c, Completion::Send { .. })),
            "the peer does not read, so the send cannot finish"
        );
        assert_eq!(
            Arc::strong_count(&big),
            2,
            "the backend holds the buffer while the kernel uses it"
        );
        assert_eq!(ring.inflight, 4, "waker poll, accept, receive, send");

        let started = Instant::now();
        drop(ring);
        assert!(started.elapsed() < DRAIN_TIMEOUT, "drained, not timed out");
        assert_eq!(
            Arc::strong_count(&big),
            1,
            "freed once the kernel was done, not leaked"
        );
    }

    #[test]
    fn sends_of_one_and_several_buffers_resume_where_they_stopped() {
        let Some((mut ring, addr)) = listening_ring() else {
            return;
        };
        let mut client = std::net::TcpStream::connect(addr).unwrap();
        client
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut out = Vec::new();
        let sock = accepted(&mut ring, &mut out);
        let id = ConnId::new(2, 5, 0);
        ring.open(id, sock).unwrap();

        let shared: Arc<[u8]> = Arc::from(&b"shared\n"[..]);
        // (buffers, bytes already written as by an earlier short send, gather list used)
        let cases: [(Vec<SendBuf>, usize, bool); 5] = [
            (vec![SendBuf::from(Arc::clone(&shared))], 0, false),
            (vec![SendBuf::from(b"0123456789".to_vec())], 4, false),
            (
                vec![
                    SendBuf::from(b"abc".to_vec()),
                    SendBuf::from(b"defg".to_vec()),
                ],
                1,
                true,
            ),
            // The first buffer was written: one left, sent without a gather list.
            (
                vec![
                    SendBuf::from(b"xyz".to_vec()),
                    SendBuf::from(b"tail".to_vec()),
                ],
                4,
                false,
            ),
            (
                vec![
                    SendBuf::from(Vec::new()),
                    SendBuf::from(b"one".to_vec()),
                    SendBuf::from(Vec::new()),
                ],
                0,
                false,
            ),
        ];
        for (bufs, written, gathered) in cases {
            let mut op = SendOp {
                bufs: bufs.into_iter().collect(),
                ..SendOp::default()
            };
            op.advance(written);
            let expected: Vec<u8> = op.remaining().flatten().copied().collect();
            let spare = ring.spare.len();
            ring.send(id, op);
            assert_eq!(
                ring.spare.len(),
                spare.saturating_sub(usize::from(gathered)),
                "a gather list only for several buffers"
            );
            let (op, result) = wait_for(&mut ring, &mut out, |out| {
                let i = out
                    .iter()
                    .position(|c| matches!(c, Completion::Send { .. }))?;
                match out.remove(i) {
                    Completion::Send { conn, op, result } => {
                        assert_eq!(conn, id);
                        Some((op, result))
                    }
                    _ => None,
                }
            });
            assert_eq!(result.unwrap(), expected.len());
            assert!(op.is_done());
            assert_eq!(op.written, written + expected.len());
            let mut got = vec![0; expected.len()];
            std::io::Read::read_exact(&mut client, &mut got).unwrap();
            assert_eq!(got, expected);
            assert_eq!(ring.spare.len(), spare.max(usize::from(gathered)));
        }

        // Nothing left to write: reported at once, nothing submitted.
        let mut op = SendOp {
            bufs: std::iter::once(SendBuf::from(b"done".to_vec())).collect(),
            ..SendOp::default()
        };
        op.advance(4);
        let inflight = ring.inflight;
        ring.send(id, op);
        assert_eq!(ring.inflight, inflight);
        ring.complete(Some(Duration::ZERO), &mut out).unwrap();
        assert!(matches!(
            out.as_slice(),
            [Completion::Send { result: Ok(0), .. }]
        ));
        assert_eq!(Arc::strong_count(&shared), 1, "buffers given back");
    }

    #[test]
    fn closed_connections_report_nothing_more() {
        if let Err(reason) = super::super::probe_uring() {
            eprintln!("skipped: io_uring is not available: {reason}");
            return;
        }
        let (listener, addr) =
            super::super::listener_socket("127.0.0.1:0".parse().unwrap(), 16).unwrap();
        let waker = Arc::new(Waker::new().unwrap());
        let cfg = UringConfig {
            files: 1,
            ..UringConfig::default()
        };
        let mut ring = Uring::new(waker, vec![listener.into()], &cfg).unwrap();
        ring.accept(ListenerId(0));
        let mut out = Vec::new();
        let mut ids = Vec::new();
        // Twice through the one table slot: close frees it for the next connection.
        for generation in 0..2u16 {
            let mut client = std::net::TcpStream::connect(addr).unwrap();
            let sock = accepted(&mut ring, &mut out);
            let id = ConnId::new(0, generation, 0);
            ids.push(id);
            ring.open(id, sock).unwrap();
            ring.recv(id);
            std::io::Write::write_all(&mut client, b"data").unwrap();
            let buf = wait_for(&mut ring, &mut out, |out| {
                let i = out
                    .iter()
                    .position(|c| matches!(c, Completion::Recv { .. }))?;
                match out.remove(i) {
                    Completion::Recv { buf, .. } => Some(buf),
                    _ => None,
                }
            });
            assert_eq!(ring.recv_bytes(&buf), b"data");
            ring.release(buf);
            ring.close(id);
            // More data for the closed connection is never reported.
            let _ = std::io::Write::write_all(&mut client, b"late");
            for _ in 0..3 {
                ring.complete(Some(Duration::from_millis(20)), &mut out)
                    .unwrap();
            }
            let reported: Vec<ConnId> = out
                .iter()
                .filter_map(|c| match c {
                    Completion::Recv { conn, .. } | Completion::RecvEnd { conn, .. } => Some(*conn),
                    _ => None,
                })
                .collect();
            assert!(!reported.contains(&id), "{reported:?}");
            // The accept paused when the table filled is reported stopped; arm it again.
            out.retain(|c| !matches!(c, Completion::Accept { .. }));
            ring.accept(ListenerId(0));
        }
        assert_eq!(ring.in_use, 0);
        assert_eq!(ids.len(), 2);
    }
}
