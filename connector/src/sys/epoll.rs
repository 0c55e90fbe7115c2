//! The epoll backend: a readiness loop that performs each operation when its socket is ready and
//! reports it as a completion (the shape of monoio's legacy driver).
//!
//! * **Level-triggered.** A socket stays reported while it is readable or writable, so the backend
//!   may stop early (scratch buffer full, accept batch done) and pick the rest up on the next
//!   `epoll_wait` without tracking anything. Each readable connection gets one `recv` per wait,
//!   which keeps one busy peer from starving the others.
//! * **One scratch buffer per thread.** Every `recv` of a round goes into its own region of one
//!   buffer; the regions are handed to the loop as [`EpollBuf`] handles and the buffer is reused
//!   on the next round. An idle connection holds no read buffer.
//! * **Interest follows the armed operations**: `EPOLLIN` while a receive is armed, `EPOLLOUT`
//!   only while a send is waiting for room. A socket is added to the epoll set lazily, on its
//!   first armed operation, and `EPOLLOUT` is dropped lazily (before the next wait) so that a
//!   connection writing continuously does not flip its interest on every send.
//! * **Sends are tried at once** in [`Backend::send`]: usually the socket has room and the send
//!   completes without waiting for readiness; the completion is reported by the next
//!   [`Backend::complete`]. `sendmsg` with `MSG_NOSIGNAL` gathers up to [`MAX_IOV`] buffers, and a
//!   completion is reported only when the whole operation is written or has failed.

use std::io::{self, IoSlice, Read};
use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::time::Duration;

use ids::ConnId;
use socket2::{SockAddr, SockAddrStorage, Socket};

use super::{
    Backend, Completion, ConnEntry, ConnTable, KEEP_COMPLETIONS, ListenSocket, ListenerId, SendOp,
    Waker,
};

/// Size of the per-thread scratch buffer that all reads of one round share.
const SCRATCH: usize = 256 * 1024;
/// Largest single read.
const READ_CHUNK: usize = 32 * 1024;
/// Smallest free room worth a read; with less, remaining readers wait for the next round.
const MIN_READ: usize = 4 * 1024;
/// Events fetched per `epoll_wait`.
const MAX_EVENTS: usize = 256;
/// Connections accepted per listener per round.
const ACCEPT_BATCH: usize = 64;
/// Buffers gathered per `sendmsg`.
pub(crate) const MAX_IOV: usize = 64;

/// Token tags (top two bits of the epoll data word).
const TAG_SHIFT: u32 = 62;
const TAG_CONN: u64 = 0;
const TAG_LISTENER: u64 = 1;
const TAG_WAKER: u64 = 2;

const EV_IN: u32 = libc::EPOLLIN as u32;
const EV_OUT: u32 = libc::EPOLLOUT as u32;
const EV_ERR: u32 = (libc::EPOLLERR | libc::EPOLLHUP) as u32;

/// Received bytes: a region of the scratch buffer, valid until the next `complete`.
#[derive(Debug)]
pub(crate) struct EpollBuf {
    start: usize,
    len: usize,
}

/// One connector thread's epoll instance and the sockets registered in it.
pub(crate) struct Epoll {
    epfd: OwnedFd,
    waker: Arc<Waker>,
    events: Vec<libc::epoll_event>,
    scratch: Box<[u8]>,
    /// Bytes of `scratch` handed out this round.
    used: usize,
    /// Connections by slot of their [`ConnId`].
    conns: ConnTable<EConn>,
    listeners: Vec<EListener>,
    /// Completions produced outside `complete` (immediate sends, failed arming).
    ready: Vec<Completion<Self>>,
    /// Connections whose `EPOLLOUT` interest may be dropped before the next wait.
    lazy: Vec<ConnId>,
    /// Whether the previous `complete` returned early without waiting (see `complete`).
    skipped_wait: bool,
}

struct EConn {
    sock: Socket,
    /// Generation of the connection's [`ConnId`] (see [`ConnTable`]).
    generation: u16,
    /// Events currently registered (meaningful when `registered`).
    interest: u32,
    registered: bool,
    recv_armed: bool,
    /// The send waiting for `EPOLLOUT`: boxed, since most sends complete at once and a
    /// connection is far more often without one (this keeps `Option<EConn>` at 24 bytes).
    op: Option<Box<SendOp>>,
}

impl ConnEntry for EConn {
    fn generation(&self) -> u16 {
        self.generation
    }
}

struct EListener {
    sock: Socket,
    armed: bool,
}

impl Epoll {
    /// Creates an epoll instance watching `waker`, with `listeners` (indexed by [`ListenerId`])
    /// registered lazily by [`Backend::accept`].
    pub(crate) fn new(waker: Arc<Waker>, listeners: Vec<ListenSocket>) -> io::Result<Self> {
        // SAFETY: epoll_create1 has no memory-safety preconditions; EPOLL_CLOEXEC is a valid flag.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just returned by epoll_create1, is open, and nothing else owns it.
        let epfd = unsafe { OwnedFd::from_raw_fd(fd) };
        ctl(
            &epfd,
            libc::EPOLL_CTL_ADD,
            waker.as_fd().as_raw_fd(),
            EV_IN,
            TAG_WAKER << TAG_SHIFT,
        )?;
        Ok(Self {
            epfd,
            waker,
            events: vec![libc::epoll_event { events: 0, u64: 0 }; MAX_EVENTS],
            scratch: vec![0; SCRATCH].into_boxed_slice(),
            used: 0,
            conns: ConnTable::default(),
            listeners: listeners
                .into_iter()
                // Level-triggered and not exclusive: every thread watching a shared listener is
                // woken and the first to accept wins, which spreads connections well enough.
                .map(|l| EListener {
                    sock: l.sock,
                    armed: false,
                })
                .collect(),
            ready: Vec::new(),
            lazy: Vec::new(),
            skipped_wait: false,
        })
    }

    /// Handles one readiness event of a connection.
    fn conn_event(&mut self, token: u64, events: u32, out: &mut Vec<Completion<Self>>) {
        let slot = token as u32;
        let generation = (token >> 32) as u16;
        let Some((id, c)) = self.conns.by_slot(generation, slot) else {
            return;
        };

        if events & (EV_OUT | EV_ERR) != 0
            && let Some(op) = c.op.as_mut()
        {
            match write_op(&c.sock, op) {
                Ok(false) => {}
                Ok(true) => {
                    if let Some(op) = c.op.take() {
                        let n = op.written;
                        out.push(Completion::Send {
                            conn: id,
                            op: *op,
                            result: Ok(n),
                        });
                    }
                    self.lazy.push(id);
                }
                Err(e) => {
                    if let Some(op) = c.op.take() {
                        out.push(Completion::Send {
                            conn: id,
                            op: *op,
                            result: Err(e),
                        });
                    }
                }
            }
        }

        if events & (EV_IN | EV_ERR) != 0 && c.recv_armed {
            let room = self.scratch.len().saturating_sub(self.used);
            if room < MIN_READ {
                // Still readable next round (level-triggered).
                return;
            }
            let end = self.used + room.min(READ_CHUNK);
            let Some(dst) = self.scratch.get_mut(self.used..end) else {
                return;
            };
            match (&c.sock).read(dst) {
                Ok(0) => {
                    c.recv_armed = false;
                    out.push(Completion::RecvEnd {
                        conn: id,
                        error: None,
                    });
                }
                Ok(n) => {
                    out.push(Completion::Recv {
                        conn: id,
                        buf: EpollBuf {
                            start: self.used,
                            len: n,
                        },
                    });
                    self.used += n;
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                    ) => {}
                Err(e) => {
                    c.recv_armed = false;
                    out.push(Completion::RecvEnd {
                        conn: id,
                        error: Some(e),
                    });
                }
            }
        }
    }

    /// Accepts up to [`ACCEPT_BATCH`] connections from a readable listener.
    fn listener_event(&mut self, index: usize, out: &mut Vec<Completion<Self>>) {
        let listener = ListenerId(index);
        let Some(l) = self.listeners.get_mut(index) else {
            return;
        };
        if !l.armed {
            return;
        }
        for _ in 0..ACCEPT_BATCH {
            match accept_one(&l.sock) {
                Ok(accepted) => out.push(Completion::Accept {
                    listener,
                    result: Ok(accepted),
                    more: true,
                }),
                Err(e) => match classify_accept_error(&e) {
                    AcceptError::Empty => break,
                    AcceptError::Transient => out.push(Completion::Accept {
                        listener,
                        result: Err(e),
                        more: true,
                    }),
                    AcceptError::Stop => {
                        // Stop watching the listener, or level-triggered epoll would report it
                        // again at once and the thread would spin (EMFILE).
                        l.armed = false;
                        if let Err(del) =
                            ctl(&self.epfd, libc::EPOLL_CTL_DEL, l.sock.as_raw_fd(), 0, 0)
                        {
                            tracing::error!(error = %del, "epoll_ctl(DEL) on a listener failed");
                        }
                        out.push(Completion::Accept {
                            listener,
                            result: Err(e),
                            more: false,
                        });
                        break;
                    }
                },
            }
        }
    }
}

impl Backend for Epoll {
    type Socket = Socket;
    type RecvBuf = EpollBuf;

    fn accept(&mut self, listener: ListenerId) {
        let Some(l) = self.listeners.get_mut(listener.0) else {
            self.ready.push(Completion::Accept {
                listener,
                result: Err(io::Error::new(io::ErrorKind::NotFound, "no such listener")),
                more: false,
            });
            return;
        };
        if l.armed {
            return;
        }
        let token = (TAG_LISTENER << TAG_SHIFT) | listener.0 as u64;
        match ctl(
            &self.epfd,
            libc::EPOLL_CTL_ADD,
            l.sock.as_raw_fd(),
            EV_IN,
            token,
        ) {
            Ok(()) => l.armed = true,
            Err(e) => self.ready.push(Completion::Accept {
                listener,
                result: Err(e),
                more: false,
            }),
        }
    }

    fn open(&mut self, conn: ConnId, sock: Socket) -> io::Result<()> {
        // A connection left in the slot (the loop closes one before reusing its slot) is closed
        // by dropping it.
        drop(self.conns.insert(
            conn,
            EConn {
                sock,
                generation: conn.generation(),
                interest: 0,
                registered: false,
                recv_armed: false,
                op: None,
            },
        )?);
        Ok(())
    }

    fn recv(&mut self, conn: ConnId) {
        let Some(c) = self.conns.get_mut(conn) else {
            return;
        };
        c.recv_armed = true;
        if let Err(e) = sync_interest(&self.epfd, conn, c) {
            c.recv_armed = false;
            self.ready.push(Completion::RecvEnd {
                conn,
                error: Some(e),
            });
        }
    }

    fn recv_bytes(&self, buf: &EpollBuf) -> &[u8] {
        self.scratch
            .get(buf.start..buf.start + buf.len)
            .unwrap_or(&[])
    }

    fn release(&mut self, _buf: EpollBuf) {
        // The scratch buffer is reused wholesale by the next `complete`.
    }

    fn send(&mut self, conn: ConnId, mut op: SendOp) {
        let Some(c) = self.conns.get_mut(conn) else {
            return;
        };
        if c.op.is_some() {
            self.ready.push(Completion::Send {
                conn,
                op,
                result: Err(io::Error::other("a send is already in flight")),
            });
            return;
        }
        match write_op(&c.sock, &mut op) {
            Ok(true) => {
                let n = op.written;
                self.ready.push(Completion::Send {
                    conn,
                    op,
                    result: Ok(n),
                });
            }
            Ok(false) => {
                c.op = Some(Box::new(op));
                if let Err(e) = sync_interest(&self.epfd, conn, c)
                    && let Some(op) = c.op.take()
                {
                    self.ready.push(Completion::Send {
                        conn,
                        op: *op,
                        result: Err(e),
                    });
                }
            }
            Err(e) => self.ready.push(Completion::Send {
                conn,
                op,
                result: Err(e),
            }),
        }
    }

    fn close(&mut self, conn: ConnId) {
        // Dropping the socket closes it, which also removes it from the epoll set (the descriptor
        // is never duplicated). A pending send's buffers are dropped with it.
        drop(self.conns.remove(conn));
    }

    fn stop_accepts(&mut self) {
        for l in &mut self.listeners {
            if l.armed {
                l.armed = false;
                if let Err(e) = ctl(&self.epfd, libc::EPOLL_CTL_DEL, l.sock.as_raw_fd(), 0, 0) {
                    tracing::error!(error = %e, "epoll_ctl(DEL) on a listener failed");
                }
            }
        }
    }

    fn stop_recv(&mut self, conn: ConnId) {
        let Some(c) = self.conns.get_mut(conn) else {
            return;
        };
        c.recv_armed = false;
        if let Err(e) = sync_interest(&self.epfd, conn, c) {
            // Still watched for input, which is ignored (`recv_armed` is off): harmless.
            tracing::debug!(conn = %conn, error = %e, "epoll_ctl(MOD) failed while stopping reads");
        }
    }

    fn pause_recv(&mut self, conn: ConnId) {
        // Receives are per connection here: the same as a handover's stop.
        self.stop_recv(conn);
    }

    fn resume_recv(&mut self, conn: ConnId) {
        self.recv(conn);
    }

    fn cancel_send(&mut self, conn: ConnId) {
        let Some(c) = self.conns.get_mut(conn) else {
            return;
        };
        let Some(op) = c.op.take() else {
            return;
        };
        let n = op.written;
        self.ready.push(Completion::Send {
            conn,
            op: *op,
            result: Ok(n),
        });
        self.lazy.push(conn);
    }

    fn settled(&self) -> bool {
        // Accepts and receives stop at once; only reported completions may be left.
        self.ready.is_empty()
    }

    fn export(&mut self, conns: &[ConnId]) -> Vec<io::Result<OwnedFd>> {
        conns
            .iter()
            .map(|&id| {
                let c = self
                    .conns
                    .get_mut(id)
                    .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no such connection"))?;
                if c.registered {
                    // The descriptor stays open (it is handed over), so it must leave the set.
                    ctl(&self.epfd, libc::EPOLL_CTL_DEL, c.sock.as_raw_fd(), 0, 0)?;
                }
                let c = self
                    .conns
                    .remove(id)
                    .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no such connection"))?;
                Ok(OwnedFd::from(c.sock))
            })
            .collect()
    }

    fn adopt(&mut self, fds: Vec<OwnedFd>) -> Vec<io::Result<Socket>> {
        fds.into_iter()
            .map(|fd| {
                let sock = Socket::from(fd);
                sock.set_nonblocking(true)?;
                Ok(sock)
            })
            .collect()
    }

    fn complete(
        &mut self,
        timeout: Option<Duration>,
        out: &mut Vec<Completion<Self>>,
    ) -> io::Result<()> {
        let had_ready = !self.ready.is_empty();
        out.append(&mut self.ready);
        self.ready.shrink_to(KEEP_COMPLETIONS);

        for id in std::mem::take(&mut self.lazy) {
            if let Some(c) = self.conns.get_mut(id)
                && let Err(e) = sync_interest(&self.epfd, id, c)
            {
                // Left with EPOLLOUT armed, the socket would be reported without end.
                c.recv_armed = false;
                out.push(Completion::RecvEnd {
                    conn: id,
                    error: Some(e),
                });
            }
        }

        // Completions produced by the previous round's sends are returned without a syscall,
        // but never twice in a row, so that sockets are always polled regularly.
        if had_ready && !self.skipped_wait {
            self.skipped_wait = true;
            return Ok(());
        }
        self.skipped_wait = false;
        let timeout_ms = if had_ready { 0 } else { timeout_ms(timeout) };

        let max = i32::try_from(self.events.len()).unwrap_or(i32::MAX);
        // SAFETY: `events` is an initialised buffer of `max` epoll_event entries that the kernel
        // may overwrite; `epfd` is open for the life of `self`.
        let n = unsafe {
            libc::epoll_wait(
                self.epfd.as_raw_fd(),
                self.events.as_mut_ptr(),
                max,
                timeout_ms,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            return if e.kind() == io::ErrorKind::Interrupted {
                Ok(())
            } else {
                Err(e)
            };
        }
        let n = usize::try_from(n).unwrap_or(0);

        self.used = 0;
        let events = std::mem::take(&mut self.events);
        for ev in events.iter().take(n) {
            // Copy out of the (packed) struct before use.
            let (bits, token) = (ev.events, ev.u64);
            match token >> TAG_SHIFT {
                TAG_CONN => self.conn_event(token, bits, out),
                TAG_LISTENER => {
                    let index = (token & ((1 << TAG_SHIFT) - 1)) as usize;
                    self.listener_event(index, out);
                }
                TAG_WAKER => self.waker.drain(),
                _ => {}
            }
        }
        self.events = events;
        Ok(())
    }
}

/// Token of a connection: its generation and slot.
fn conn_token(id: ConnId) -> u64 {
    (TAG_CONN << TAG_SHIFT) | (u64::from(id.generation()) << 32) | u64::from(id.slot())
}

/// Brings the registered events of connection `id` in line with its armed operations.
fn sync_interest(epfd: &OwnedFd, id: ConnId, c: &mut EConn) -> io::Result<()> {
    let mut want = 0;
    if c.recv_armed {
        want |= EV_IN;
    }
    if c.op.is_some() {
        want |= EV_OUT;
    }
    if c.registered && want == 0 {
        // Out of the set rather than watched for nothing: epoll reports hang-ups and errors
        // whatever the interest, and level-triggered, a reset connection that nobody reads
        // (reads stopped for a handover) would be reported on every wait.
        ctl(epfd, libc::EPOLL_CTL_DEL, c.sock.as_raw_fd(), 0, 0)?;
        c.registered = false;
        c.interest = 0;
    } else if c.registered {
        if want != c.interest {
            ctl(
                epfd,
                libc::EPOLL_CTL_MOD,
                c.sock.as_raw_fd(),
                want,
                conn_token(id),
            )?;
            c.interest = want;
        }
    } else if want != 0 {
        ctl(
            epfd,
            libc::EPOLL_CTL_ADD,
            c.sock.as_raw_fd(),
            want,
            conn_token(id),
        )?;
        c.registered = true;
        c.interest = want;
    }
    Ok(())
}

/// `epoll_ctl` on `fd` (the event is ignored by `EPOLL_CTL_DEL`).
fn ctl(epfd: &OwnedFd, op: i32, fd: RawFd, events: u32, token: u64) -> io::Result<()> {
    let mut ev = libc::epoll_event { events, u64: token };
    // SAFETY: `epfd` is an open epoll descriptor, `fd` is an open descriptor owned by the caller,
    // and `ev` is a valid epoll_event that outlives the call.
    let rc = unsafe { libc::epoll_ctl(epfd.as_raw_fd(), op, fd, &mut ev) };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Writes as much of `op` as the socket takes. `Ok(true)`: all written; `Ok(false)`: the socket is
/// full (wait for `EPOLLOUT`).
fn write_op(sock: &Socket, op: &mut SendOp) -> io::Result<bool> {
    loop {
        let mut iov = [IoSlice::new(&[]); MAX_IOV];
        let mut count = 0;
        let mut total = 0;
        for (slot, part) in iov.iter_mut().zip(op.remaining()) {
            *slot = IoSlice::new(part);
            count += 1;
            total += part.len();
        }
        if count == 0 {
            return Ok(true);
        }
        let result =
            sock.send_vectored_with_flags(iov.get(..count).unwrap_or(&[]), libc::MSG_NOSIGNAL);
        match result {
            Ok(n) => {
                op.advance(n);
                if op.is_done() {
                    return Ok(true);
                }
                if n < total {
                    // Short write: the socket buffer is full.
                    return Ok(false);
                }
                // More buffers than one sendmsg gathers: go on.
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

enum AcceptError {
    /// Nothing left to accept.
    Empty,
    /// This connection failed; others may still be accepted.
    Transient,
    /// Accepting cannot go on now (descriptor or memory exhaustion, or a broken listener).
    Stop,
}

fn classify_accept_error(e: &io::Error) -> AcceptError {
    match e.raw_os_error() {
        Some(libc::EAGAIN) => AcceptError::Empty,
        // accept(2): pending network errors of the new socket are reported by accept.
        Some(
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
            | libc::ENETUNREACH,
        ) => AcceptError::Transient,
        _ => AcceptError::Stop,
    }
}

/// Accepts one connection: non-blocking, close-on-exec, `TCP_NODELAY`.
fn accept_one(listener: &Socket) -> io::Result<(Socket, SocketAddr)> {
    let mut storage = SockAddrStorage::zeroed();
    let mut len = storage.size_of();
    // SAFETY: `SockAddrStorage` is a transparent wrapper of `sockaddr_storage`, the type viewed.
    let addr: *mut libc::sockaddr_storage = unsafe { storage.view_as::<libc::sockaddr_storage>() };
    // SAFETY: `listener` is an open socket; `addr` points to a live, writable sockaddr_storage of
    // `len` bytes and `len` is a live socklen_t, both only used for the duration of the call.
    let fd = unsafe {
        libc::accept4(
            listener.as_raw_fd(),
            addr.cast::<libc::sockaddr>(),
            &mut len,
            libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by accept4, is open, and nothing else owns it.
    let sock = unsafe { Socket::from_raw_fd(fd) };
    // SAFETY: accept4 succeeded, so it wrote the peer's address (of `len` bytes, at most the size
    // of the storage) into `storage`.
    let peer = unsafe { SockAddr::new(storage, len) };
    let peer = peer
        .as_socket()
        .unwrap_or(SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)));
    if let Err(e) = sock.set_tcp_nodelay(true) {
        tracing::debug!(%peer, error = %e, "TCP_NODELAY failed");
    }
    Ok((sock, peer))
}

/// An `epoll_wait` timeout in milliseconds, rounded up so a short wait does not become a spin.
fn timeout_ms(timeout: Option<Duration>) -> i32 {
    match timeout {
        None => -1,
        Some(d) => {
            let ms = d.as_nanos().div_ceil(1_000_000);
            i32::try_from(ms).unwrap_or(i32::MAX)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeouts_round_up() {
        assert_eq!(timeout_ms(None), -1);
        assert_eq!(timeout_ms(Some(Duration::ZERO)), 0);
        assert_eq!(timeout_ms(Some(Duration::from_micros(1))), 1);
        assert_eq!(timeout_ms(Some(Duration::from_millis(1500))), 1500);
        assert_eq!(timeout_ms(Some(Duration::from_secs(u64::MAX))), i32::MAX);
    }

    #[test]
    fn conn_tokens_keep_slot_and_generation() {
        let id = ConnId::new(7, 0xBEEF, 0x1234_5678);
        let t = conn_token(id);
        assert_eq!(t >> TAG_SHIFT, TAG_CONN);
        assert_eq!(t as u32, 0x1234_5678);
        assert_eq!((t >> 32) as u16, 0xBEEF);
    }

    #[test]
    fn connection_state_stays_small() {
        assert!(
            size_of::<Option<EConn>>() <= 24,
            "{}",
            size_of::<Option<EConn>>()
        );
    }
}
