//! Per-core socket event loops with newline framing.
//!
//! The connector owns the sockets: it accepts TCP connections on one or more addresses, splits
//! what they send into lines and hands each line to a [`Handler`], and writes what the handler
//! queues in an [`Outbox`]. One thread per core, each with its own I/O backend instance and its own
//! `SO_REUSEPORT` listener per address, so a connection belongs to one thread for its whole life
//! and the socket path takes no lock.
//!
//! It knows nothing of stratum or mining and must never learn: the daemon adapts the stratifier to
//! the [`Handler`] interface.
//!
//! Backends sit behind one completion-based interface in `sys/` (the only place with `unsafe` or
//! `cfg`): io_uring (multishot accept into direct descriptors, multishot receive into a
//! per-thread provided-buffer ring) and epoll, chosen once at [`start`]. See [`BackendKind`],
//! [`probe_uring`] and [`resolved_backend`].
//!
//! Each thread keeps counters (opens, accepts, refusals, closes by reason, slow rounds, handler
//! panics, queued bytes) that any thread can read ([`Connector::counters`]).
//!
//! # Hostile peers and broken handlers
//!
//! Besides the caps per connection ([`Config::max_line`], [`Config::max_outbound`]) and in all
//! ([`Config::max_conns`]), the connector bounds what many connections can do together: the
//! bytes queued for all of them ([`Config::max_outbound_total`]), the connections of one
//! address ([`Config::max_conns_per_ip`]), and how long a connection may send no complete line
//! ([`Config::idle_timeout`]). A [`Handler`] callback that panics closes only the connection it
//! was called for ([`CloseReason::HandlerPanic`]); the thread goes on serving the others.
//!
//! # Handover
//!
//! A zero-disconnect upgrade moves the listening sockets and the live connections to a new
//! process; the connector provides the socket side of it, the daemon carries the descriptors
//! (`SCM_RIGHTS`) and the rest of the state:
//!
//! 1. the old instance hands its listeners over ([`Connector::listeners`]); the new one serves
//!    them as they are ([`Config::inherited`]);
//! 2. the old instance quiesces ([`Connector::quiesce`]): no accepting, no reading, queued bytes
//!    written until a deadline, the rest kept;
//! 3. the old instance exports its connections in batches ([`Connector::export`]: socket, peer,
//!    listener, partial line, unsent bytes, and what [`Handler::on_export`] adds); the new one
//!    adopts each batch ([`Connector::adopt`], [`Handler::on_adopt`]) and the peers notice
//!    nothing. If the handover fails, [`Connector::resume`] takes the quiesce back for the
//!    connections not exported yet.
//!
//! # Upstream connections
//!
//! The connector only accepts: it has no `connect`. Upstream links (a passthrough or proxy
//! instance's link to its pool, links to nodes) live on threads of their own with plain
//! sockets, blocking with timeouts or non-blocking with `poll`. There are few of them (one to a
//! handful per process), so a ring or an epoll set per core buys them nothing; their
//! back-pressure is of another kind (a slow upstream should stall its one link, which a thread
//! of its own does naturally, while a connector thread serving thousands of miners must never
//! wait for one peer); they need what a server loop does not (connect timeouts, name
//! resolution, reconnecting with backoff); and keeping them out keeps client-side code and a
//! second kind of connection off the connector's hot path. Such a thread reaches the connector
//! threads by message ([`Connector::send`], [`ConnectorHandle`]).
//!
//! ```no_run
//! use std::time::Instant;
//!
//! use ckpool_connector::{CloseReason, ConnId, Config, Handler, Outbox};
//!
//! struct Echo;
//!
//! impl Handler for Echo {
//!     type Msg = ();
//!     fn on_open(&mut self, _: Instant, _: ConnId, _: std::net::SocketAddr, _: usize, _: &mut Outbox) {}
//!     fn on_line(&mut self, _: Instant, conn: ConnId, line: &[u8], out: &mut Outbox) {
//!         let mut reply = line.to_vec();
//!         reply.push(b'\n');
//!         out.send(conn, reply);
//!     }
//!     fn on_close(&mut self, _: Instant, _: ConnId, _: CloseReason) {}
//!     fn on_msg(&mut self, _: Instant, _: (), _: &mut Outbox) {}
//!     fn on_tick(&mut self, _: Instant, _: &mut Outbox) {}
//! }
//!
//! let cfg = Config { listen: vec!["127.0.0.1:3333".parse()?], ..Config::default() };
//! let connector = ckpool_connector::start(cfg, |_thread| Echo)?;
//! connector.shutdown();
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod chunked;
mod framing;
mod outbox;
mod sendbufs;
mod sys;
mod worker;

use std::io;
use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::str::FromStr;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::Sender;
use tracing::{debug, error, info, warn};

pub use ids::ConnId;
pub use outbox::{Action, Outbox, SendBuf};

use crate::sys::{Backend, ListenSocket, Waker, WithBackend};
use crate::worker::{Control, IpCounts, Limits, Shared, Worker};

/// Connector settings.
#[derive(Clone, Debug)]
pub struct Config {
    /// Addresses to listen on; port 0 picks a free port, the same for every thread. Each thread
    /// binds its own `SO_REUSEPORT` socket per address, after checking that no other socket
    /// listens there. There must be at least one listener here or in [`Config::inherited`].
    pub listen: Vec<SocketAddr>,
    /// Listening sockets already bound (handed over by an earlier instance, or by a service
    /// manager), served as they are: nothing is bound, and the check that the address is free is
    /// not made. Every thread serves each of them (on a duplicate descriptor of the same socket):
    /// with epoll every thread is woken and the first to accept wins; with io_uring, whose
    /// accepts wait exclusively, each thread arms one accept at a time (instead of a multishot
    /// accept) so the threads take the connections in turn. Their listener indices follow those
    /// of [`Config::listen`] (`listen.len() + i` for the `i`-th). At most 254 listeners in all.
    pub inherited: Vec<InheritedListener>,
    /// Number of connector threads (one per core by default; at most 65,536).
    pub threads: usize,
    /// Maximum line length in bytes, without the `"\n"` or `"\r\n"`; a longer line closes the
    /// connection ([`CloseReason::LineTooLong`]).
    pub max_line: usize,
    /// Cap on the bytes queued and not yet written to one connection; exceeding it closes the
    /// connection ([`CloseReason::Outbound`]). Values above 4 GiB count as 4 GiB.
    pub max_outbound: usize,
    /// The same cap for a connection the handler marked as a trunk ([`Outbox::trunk`]: a
    /// passthrough or node link, whose one connection carries a job for each of its peers, about
    /// 14 MB for 20,000 of them). Values above 4 GiB count as 4 GiB. Default
    /// [`DEFAULT_MAX_OUTBOUND_TRUNK`].
    pub max_outbound_trunk: usize,
    /// Listen backlog (the kernel caps it at `net.core.somaxconn`).
    pub backlog: i32,
    /// How often [`Handler::on_tick`] runs.
    pub tick: Duration,
    /// Which I/O backend to use.
    pub backend: BackendKind,
    /// Settings of the io_uring backend (ignored by epoll).
    pub uring: UringConfig,
    /// Pin connector thread `t` to one CPU: the `t`-th of the CPUs this process may run on
    /// (wrapping around when there are more threads than CPUs); see [`pin_current_thread`]. A
    /// failure to pin is logged once, at `warn`, and the thread runs unpinned. Only when there
    /// are at least as many threads as CPUs ([`pins`]): with fewer, every process would pin its
    /// threads to the same first CPUs.
    pub pin: bool,
    /// The most connections all threads hold at once (`maxclients`); `None`: only the tables
    /// and the open-files limit bound them. A connection accepted beyond it is closed at once
    /// (the handler never sees it), and a line is logged at most once a minute per thread.
    pub max_conns: Option<usize>,
    /// The most connections one IP address holds at once, on all threads together
    /// (`maxclientsperip`; IPv4-mapped IPv6 addresses count as their IPv4 address); `None`: no
    /// limit. Like [`Config::max_conns`], a connection accepted beyond it is closed at once (the
    /// handler never sees it; counted in [`ThreadCounters::refused`]) and a line is logged at
    /// most once a minute per thread. Adopted connections count but are never refused.
    pub max_conns_per_ip: Option<usize>,
    /// Cap on the bytes queued and not yet written across all connections (`maxoutbound`): each
    /// thread gets an equal share of it (`max_outbound_total / threads`). When a thread's
    /// connections together hold more than its share, the connections with the most unsent bytes
    /// are closed ([`CloseReason::OutboundBudget`], the close is immediate) until they hold at
    /// most three quarters of it. A peer that reads keeps next to nothing queued, so only peers
    /// that stopped reading are closed. Checked each time queued bytes are handed to the
    /// backend (no clock read, no lock, no shared counter per send).
    pub max_outbound_total: usize,
    /// A connection that has sent no complete line for this long is closed
    /// ([`CloseReason::Idle`]): a client that sends nothing, or a line a byte at a time
    /// (slowloris), holds its slot no longer. `None` (or zero): never. Checked on ticks by a
    /// sweep over the thread's connections every quarter of the timeout (or every tick, if
    /// that is longer), so a connection is closed between the timeout and a quarter of it (or
    /// a tick) later. Connections with a handler-requested close pending are left to it, and
    /// trunks ([`Outbox::trunk`]) are never closed as idle.
    pub idle_timeout: Option<Duration>,
    /// Back-pressure (`pausereads`): while more than this many bytes are queued and not yet
    /// written to a connection, it is not read (what the peer sends waits in the kernel, and
    /// TCP's flow control stops the peer); reading starts again once its unsent bytes fall to
    /// half of it. A peer that asks and never reads then holds about this much queued (plus
    /// the replies to one read's worth of lines) instead of [`Config::max_outbound`]. Bytes the
    /// handler queues without a request (a broadcast) still go up to that cap. Trunks
    /// ([`Outbox::trunk`]) are never paused: their reads carry many peers' shares. Checked
    /// when bytes are queued and when a send completes, never per read. `None` (or zero): off.
    /// Default [`DEFAULT_PAUSE_READS_AT`].
    pub pause_reads_at: Option<usize>,
    /// A connection whose reads are paused ([`Config::pause_reads_at`]) and to which no byte
    /// could be written for this long is closed ([`CloseReason::Stalled`], logged at `warn`):
    /// checked on ticks, so the close comes up to a tick late. `None` (or zero): never (the
    /// peer then stays until [`Config::idle_timeout`] or a broadcast fills its queue). Default
    /// [`DEFAULT_STALL_TIMEOUT`].
    pub stall_timeout: Option<Duration>,
}

/// Default of [`Config::pause_reads_at`]: 16 KiB, about 150 replies to shares, far more than a
/// miner that reads ever has queued, and several notifies. (It was 64 KiB: a peer that never
/// reads then held four times as much, for `stall_timeout`, for nothing.)
pub const DEFAULT_PAUSE_READS_AT: usize = 16 * 1024;

/// Default of [`Config::stall_timeout`]: 30 s, long enough for a slow link's hiccup, short
/// enough that peers that never read do not pile up.
pub const DEFAULT_STALL_TIMEOUT: Duration = Duration::from_secs(30);

/// Default of [`Config::max_outbound_total`]: 1 GiB. A pool that keeps up queues about one
/// `mining.notify` (a few KiB) per connection, so 100,000 miners need a few hundred MiB at the
/// peak of a broadcast; 1 GiB leaves room for that while 1,024 peers that stopped reading, each at
/// its own cap ([`Config::max_outbound`], 1 MiB), are enough to trigger closes. A fixed value
/// rather than a fraction of RAM: it is the same on every host, and operators of very large
/// pools raise it (`maxoutbound`).
pub const DEFAULT_MAX_OUTBOUND_TOTAL: usize = 1 << 30;

/// Default of [`Config::max_outbound_trunk`]: 256 MiB, room for a few jobs fanned out to
/// 100,000 sub-clients behind one link while it is slow to read (each about 70 MB).
pub const DEFAULT_MAX_OUTBOUND_TRUNK: usize = 256 << 20;

/// Default of [`Config::idle_timeout`]: one hour. A miner under vardiff submits shares every few
/// seconds to a minute; an hour without a complete line is a dead or hostile (slowloris) peer,
/// while a slow miner on a high fixed difficulty (ckpool has no idle drop at all) still has
/// room. Ten minutes was too close to what such a miner can take between shares.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(3600);

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: vec![SocketAddr::from(([0, 0, 0, 0], 3333))],
            inherited: Vec::new(),
            threads: std::thread::available_parallelism().map_or(1, NonZeroUsize::get),
            max_line: 16 * 1024,
            max_outbound: 1024 * 1024,
            max_outbound_trunk: DEFAULT_MAX_OUTBOUND_TRUNK,
            backlog: 4096,
            tick: Duration::from_secs(1),
            backend: BackendKind::Auto,
            uring: UringConfig::default(),
            pin: true,
            max_conns: None,
            max_conns_per_ip: None,
            max_outbound_total: DEFAULT_MAX_OUTBOUND_TOTAL,
            idle_timeout: Some(DEFAULT_IDLE_TIMEOUT),
            pause_reads_at: Some(DEFAULT_PAUSE_READS_AT),
            stall_timeout: Some(DEFAULT_STALL_TIMEOUT),
        }
    }
}

impl Config {
    fn validate(&self) -> io::Result<()> {
        let invalid =
            |what: &str| Err(io::Error::new(io::ErrorKind::InvalidInput, what.to_owned()));
        let listeners = self.listen.len() + self.inherited.len();
        if listeners == 0 {
            return invalid("connector: no listen address");
        }
        if listeners > worker::MAX_LISTENERS {
            return invalid("connector: at most 254 listeners");
        }
        if self.threads == 0 || self.threads > usize::from(u16::MAX) + 1 {
            return invalid("connector: threads must be between 1 and 65536");
        }
        if self.max_line == 0 || self.max_outbound == 0 || self.max_outbound_total == 0 {
            return invalid(
                "connector: max_line, max_outbound and max_outbound_total must be positive",
            );
        }
        if self.max_conns_per_ip == Some(0) {
            return invalid("connector: max_conns_per_ip must be positive");
        }
        if self.tick.is_zero() {
            return invalid("connector: tick must be positive");
        }
        self.uring.validate()
    }
}

/// A listening TCP socket that is already bound, for [`Config::inherited`]; cheap to clone (the
/// clones share the descriptor, closed when the last clone is dropped; a connector serves
/// duplicates of it, closed when it stops). [`start`] makes the socket non-blocking and sets
/// `TCP_NODELAY` on it (so on every descriptor of it, in any process).
#[derive(Clone, Debug)]
pub struct InheritedListener(Arc<OwnedFd>);

impl InheritedListener {
    /// The descriptor.
    pub fn as_fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }
}

impl From<OwnedFd> for InheritedListener {
    /// A listening socket's descriptor (e.g. received over `SCM_RIGHTS`); [`start`] checks that it
    /// is a listening TCP socket.
    fn from(fd: OwnedFd) -> Self {
        Self(Arc::new(fd))
    }
}

impl From<std::net::TcpListener> for InheritedListener {
    fn from(listener: std::net::TcpListener) -> Self {
        Self(Arc::new(OwnedFd::from(listener)))
    }
}

/// Settings of the io_uring backend, per connector thread.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UringConfig {
    /// Size of the thread's table of direct descriptors: the most connections the thread can hold
    /// at once. Accepted sockets live only in this table and take no regular file descriptor, so
    /// one process can hold more connections than `RLIMIT_NOFILE`. The kernel caps each table at
    /// the soft `RLIMIT_NOFILE` at the time the connector starts (call [`raise_nofile_limit`]
    /// first), so the size used is the smaller of the two. When the table is full the thread
    /// stops accepting until a connection closes.
    pub files: u32,
    /// Number of receive buffers in the thread's provided-buffer ring (a power of two, at most
    /// 32,768). Shared by all of the thread's connections: an idle connection holds none.
    pub recv_buffers: u16,
    /// Size of each receive buffer in bytes (at least 64).
    pub recv_buffer_size: u32,
    /// Submission queue entries (a power of two); the completion queue gets four times as many.
    pub sq_entries: u32,
}

impl Default for UringConfig {
    fn default() -> Self {
        Self {
            files: 65_536,
            recv_buffers: 1024,
            recv_buffer_size: 2048,
            sq_entries: 1024,
        }
    }
}

impl UringConfig {
    fn validate(&self) -> io::Result<()> {
        let invalid =
            |what: &str| Err(io::Error::new(io::ErrorKind::InvalidInput, what.to_owned()));
        if self.files == 0 {
            return invalid("connector: uring.files must be positive");
        }
        if !self.recv_buffers.is_power_of_two() || self.recv_buffers > 32_768 {
            return invalid("connector: uring.recv_buffers must be a power of two up to 32768");
        }
        if self.recv_buffer_size < 64 || u64::from(self.recv_buffer_size) > 1 << 24 {
            return invalid("connector: uring.recv_buffer_size must be between 64 and 16 MiB");
        }
        if !self.sq_entries.is_power_of_two() || self.sq_entries > 32_768 {
            return invalid("connector: uring.sq_entries must be a power of two up to 32768");
        }
        Ok(())
    }
}

/// The I/O backend.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum BackendKind {
    /// io_uring when [`probe_uring`] accepts this kernel, epoll otherwise (the reason is logged
    /// once, at `warn`).
    #[default]
    Auto,
    /// Level-triggered epoll.
    Epoll,
    /// io_uring; [`start`] fails when this kernel (or the build) does not allow it.
    Uring,
}

impl BackendKind {
    /// The name used in configuration files (`"auto"`, `"epoll"`, `"uring"`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::Epoll => "epoll",
            Self::Uring => "uring",
        }
    }
}

impl std::fmt::Display for BackendKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for BackendKind {
    type Err = UnknownBackend;

    /// Accepts `"auto"`, `"epoll"`, and `"uring"`, `"io-uring"` or `"io_uring"`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(Self::Auto),
            "epoll" => Ok(Self::Epoll),
            "uring" | "io-uring" | "io_uring" => Ok(Self::Uring),
            _ => Err(UnknownBackend(s.to_owned())),
        }
    }
}

/// A backend name that [`BackendKind::from_str`] does not know.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown I/O backend {0:?} (expected \"auto\", \"epoll\" or \"uring\")")]
pub struct UnknownBackend(pub String);

/// Whether the io_uring backend can run here; `Err` says why not.
///
/// Checked once per process (later calls return the first answer, so it is cheap): ring creation
/// with the flags the backend uses (`SINGLE_ISSUER | DEFER_TASKRUN`), `IORING_REGISTER_PROBE` for
/// every opcode it submits, a sparse fixed-file table, a provided-buffer ring, and the socket
/// `getsockopt` command it reads peer addresses with (Linux 6.7). Fails as if the kernel refused
/// when the environment variable `CKPOOL_IO_URING_DISABLE` is set to anything but `""` or `"0"`,
/// and always when the crate is built without its `io-uring` feature.
pub fn probe_uring() -> Result<(), String> {
    sys::probe_uring()
}

/// Whether connections of backend `kind` can be handed over here ([`Connector::export`]);
/// `Err` says why not. Epoll always can; io_uring needs `IORING_OP_FIXED_FD_INSTALL` (Linux 6.8)
/// to export and `IORING_OP_FILES_UPDATE` to adopt (checked once per process; the environment
/// variable `CKPOOL_IO_URING_NO_HANDOVER`, set to anything but `""` or `"0"`, makes it fail as if
/// the kernel lacked them). `Auto` is resolved first ([`resolved_backend`]). Where it fails,
/// [`Connector::export`] fails with `Unsupported` and leaves every connection in place.
pub fn probe_handover(kind: BackendKind) -> Result<(), String> {
    match resolved_backend(kind) {
        BackendKind::Epoll | BackendKind::Auto => Ok(()),
        BackendKind::Uring => probe_uring().and_then(|()| sys::uring_handover()),
    }
}

/// The backend [`start`] runs for `kind`: `Auto` becomes [`BackendKind::Uring`] or
/// [`BackendKind::Epoll`] according to [`probe_uring`] (logging why io_uring is not used, once,
/// at `warn`); the others are returned as they are (a forced `Uring` that is unavailable makes
/// [`start`] fail).
pub fn resolved_backend(kind: BackendKind) -> BackendKind {
    match kind {
        BackendKind::Auto => match probe_uring() {
            Ok(()) => BackendKind::Uring,
            Err(reason) => {
                static WARNED: std::sync::Once = std::sync::Once::new();
                WARNED.call_once(|| {
                    warn!(%reason, "io_uring is not available; the connector uses epoll");
                });
                BackendKind::Epoll
            }
        },
        other => other,
    }
}

/// Why a connection was closed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CloseReason {
    /// The peer closed the connection.
    Peer,
    /// Reading or writing failed.
    Error(io::ErrorKind),
    /// The peer sent a line longer than [`Config::max_line`]. The close is immediate: bytes
    /// still queued for the connection are dropped.
    LineTooLong,
    /// More than [`Config::max_outbound`] bytes were queued (the peer does not read). The close is
    /// immediate.
    Outbound,
    /// The handler asked for it ([`Outbox::close`]).
    Handler,
    /// The connector is shutting down.
    Shutdown,
    /// The connector's connections together held more than [`Config::max_outbound_total`]
    /// unsent bytes and this one held among the most. The close is immediate.
    OutboundBudget,
    /// No complete line arrived for [`Config::idle_timeout`].
    Idle,
    /// A [`Handler`] callback for this connection panicked. The panic was caught (the thread
    /// goes on serving its other connections), logged at `error` and counted
    /// ([`ThreadCounters::handler_panics`]); the close is immediate.
    HandlerPanic,
    /// Its reads were paused ([`Config::pause_reads_at`]) and no byte could be written to it
    /// for [`Config::stall_timeout`]: the peer does not read. The close is immediate.
    Stalled,
    /// The connection was handed over ([`Connector::export`]): its socket lives on elsewhere and
    /// the peer saw no close. Given to [`Handler::on_close`] by the default
    /// [`Handler::on_export`].
    Exported,
}

/// A snapshot of one connector thread's counters ([`Connector::counters`]). Counts are since the
/// thread started; each field is read on its own, so a snapshot taken while connections come and
/// go need not add up exactly.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ThreadCounters {
    /// Connections open now (accepted or adopted, not yet closed or exported).
    pub open: u64,
    /// Connections accepted, including those refused at once (`accepted - refused` reached the
    /// handler).
    pub accepted: u64,
    /// Connections closed at once because [`Config::max_conns`] or [`Config::max_conns_per_ip`]
    /// was reached.
    pub refused: u64,
    /// Connections taken over from another instance ([`Connector::adopt`]).
    pub adopted: u64,
    /// Connections handed over to another instance ([`Connector::export`]).
    pub exported: u64,
    /// Loop rounds that kept the thread busy for 20 ms or more (each delays every connection of
    /// the thread; logged at `info`, at most once per 10 s).
    pub slow_rounds: u64,
    /// Handler callbacks that panicked (each caught: a connection's callback closes that
    /// connection with [`CloseReason::HandlerPanic`]; a panic in [`Handler::on_tick`],
    /// [`Handler::on_msg`] or another callback of no connection is only logged).
    pub handler_panics: u64,
    /// Bytes queued for the thread's connections and not yet written, as of the end of the
    /// thread's last loop round (at most its share of [`Config::max_outbound_total`] then).
    pub queued: u64,
    /// Connections whose reads are paused for back-pressure now ([`Config::pause_reads_at`]).
    pub paused: u64,
    /// Times a connection's reads were paused for back-pressure.
    pub pauses: u64,
    /// Connections closed, by reason (those refused at once are not counted here).
    pub closed: ClosedCounters,
}

/// Connections closed, by [`CloseReason`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ClosedCounters {
    /// [`CloseReason::Peer`].
    pub peer: u64,
    /// [`CloseReason::Error`].
    pub error: u64,
    /// [`CloseReason::LineTooLong`].
    pub line_too_long: u64,
    /// [`CloseReason::Outbound`].
    pub outbound: u64,
    /// [`CloseReason::Handler`].
    pub handler: u64,
    /// [`CloseReason::Shutdown`].
    pub shutdown: u64,
    /// [`CloseReason::OutboundBudget`].
    pub outbound_budget: u64,
    /// [`CloseReason::Idle`].
    pub idle: u64,
    /// [`CloseReason::HandlerPanic`].
    pub handler_panic: u64,
    /// [`CloseReason::Stalled`].
    pub stalled: u64,
}

impl ClosedCounters {
    /// All closes together.
    pub fn total(&self) -> u64 {
        self.peer
            + self.error
            + self.line_too_long
            + self.outbound
            + self.handler
            + self.shutdown
            + self.outbound_budget
            + self.idle
            + self.handler_panic
            + self.stalled
    }
}

/// Runs on the connector thread that owns the connections (one handler instance per thread).
///
/// Callbacks must not block: the whole thread waits for them. A callback that panics does not
/// stop the thread: the panic is caught, logged and counted, and the connection the callback was
/// for (if any) is closed with [`CloseReason::HandlerPanic`]. The handler must cope with whatever
/// state the panicking callback left behind (it is not unwind-safe in general); it still gets
/// [`Handler::on_close`] for that connection. This needs the default `panic = "unwind"`. Requests put in the [`Outbox`] are
/// carried out after each callback, in order; writes go out once the current batch of events is
/// handled.
pub trait Handler: Send + 'static {
    /// Messages sent to the handler through [`Connector::send`] and [`Connector::broadcast`].
    type Msg: Send + Clone + 'static;

    /// A connection was accepted on `listener` (an index into [`Config::listen`]).
    fn on_open(
        &mut self,
        now: Instant,
        conn: ConnId,
        peer: SocketAddr,
        listener: usize,
        out: &mut Outbox,
    );

    /// A line arrived: without the `'\n'` and without a trailing `'\r'`; never empty.
    fn on_line(&mut self, now: Instant, conn: ConnId, line: &[u8], out: &mut Outbox);

    /// The connection is closed; its id is stale from now on. Called once per connection
    /// (for one handed over to another instance, [`Handler::on_export`] is called instead).
    fn on_close(&mut self, now: Instant, conn: ConnId, reason: CloseReason);

    /// A message arrived for this thread.
    fn on_msg(&mut self, now: Instant, msg: Self::Msg, out: &mut Outbox);

    /// Called every [`Config::tick`].
    fn on_tick(&mut self, now: Instant, out: &mut Outbox);

    /// Called once per round of the thread's event loop, after that round's callbacks (the
    /// completions of one wait on the backend, then the queued messages, then the tick if one was
    /// due) and before the writes they queued go out. It runs on every round that handled
    /// anything and on rounds that handled nothing (a wake-up or a timeout), and once more after
    /// the [`Handler::on_close`] calls of a shutdown (whose outbox is then dropped).
    ///
    /// A handler that passes events on to another thread collects them in the other callbacks
    /// and hands them over here, as one batch per round. The default does nothing.
    fn on_batch_end(&mut self, now: Instant, out: &mut Outbox) {
        let _ = (now, out);
    }

    /// The connection is being handed over to another instance ([`Connector::export`]): its
    /// socket leaves this one, still open, and its id is stale from now on. Called instead of
    /// [`Handler::on_close`]; whatever the handler puts in `state` travels with the connection
    /// ([`ConnState::user`]) and is given to the adopting handler's [`Handler::on_adopt`].
    ///
    /// The default calls [`Handler::on_close`] with [`CloseReason::Exported`] and adds nothing.
    fn on_export(&mut self, now: Instant, conn: ConnId, state: &mut Vec<u8>) {
        let _ = state;
        self.on_close(now, conn, CloseReason::Exported);
    }

    /// A connection handed over by another instance was adopted ([`Connector::adopt`]): like
    /// [`Handler::on_open`], with `state` as the exporting handler left it
    /// ([`Handler::on_export`]). The bytes it had not yet sent are already queued (they go
    /// first), and its partial line is the start of its input.
    ///
    /// The default calls [`Handler::on_open`].
    fn on_adopt(
        &mut self,
        now: Instant,
        conn: ConnId,
        peer: SocketAddr,
        listener: usize,
        state: &[u8],
        out: &mut Outbox,
    ) {
        let _ = state;
        self.on_open(now, conn, peer, listener, out);
    }
}

/// What a thread found when it finished quiescing ([`Connector::quiesce`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QuiesceReport {
    /// Connections the thread holds.
    pub connections: usize,
    /// Bytes queued for them and not written (they travel with an export).
    pub unsent: u64,
    /// Whether every queued byte was written before the deadline (otherwise the sends still in
    /// flight were cancelled and the rest is `unsent`).
    pub flushed: bool,
}

/// The state of a connection that travels with its socket from one instance to another.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnState {
    /// The peer's address.
    pub peer: SocketAddr,
    /// The listener it was accepted on (an index into the exporting instance's listeners).
    pub listener: usize,
    /// The line read so far and not terminated: the start of the adopted connection's input.
    pub partial: Vec<u8>,
    /// Bytes queued and not written, in order: written first by the adopting instance.
    pub unsent: Vec<u8>,
    /// What the exporting handler added ([`Handler::on_export`]), for [`Handler::on_adopt`].
    pub user: Vec<u8>,
}

/// Version byte of [`ConnState::encode`]'s format.
const CONN_STATE_V1: u8 = 1;

impl ConnState {
    /// Appends the state to `out` in a compact binary form for the wire (what a handover sends
    /// next to the descriptors): a version byte; the peer (`4` or `6`, the address bytes, the
    /// port, big-endian; an IPv6 flow label and scope id are not kept); the listener index
    /// (`u32`); then `partial`, `unsent` and `user`, each as a `u64` length and its bytes (all
    /// big-endian). [`ConnState::decode`] reads it back.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.push(CONN_STATE_V1);
        match self.peer {
            SocketAddr::V4(a) => {
                out.push(4);
                out.extend_from_slice(&a.ip().octets());
            }
            SocketAddr::V6(a) => {
                out.push(6);
                out.extend_from_slice(&a.ip().octets());
            }
        }
        out.extend_from_slice(&self.peer.port().to_be_bytes());
        out.extend_from_slice(
            &u32::try_from(self.listener)
                .unwrap_or(u32::MAX)
                .to_be_bytes(),
        );
        for part in [&self.partial, &self.unsent, &self.user] {
            out.extend_from_slice(&(part.len() as u64).to_be_bytes());
            out.extend_from_slice(part);
        }
    }

    /// Reads a state written by [`ConnState::encode`] from the start of `bytes`; returns it and
    /// the number of bytes it took (so several can follow each other). Fails with `InvalidData`
    /// on an unknown version or truncated or malformed input.
    pub fn decode(bytes: &[u8]) -> io::Result<(Self, usize)> {
        let mut r = Reader { bytes, at: 0 };
        if r.take(1)? != [CONN_STATE_V1] {
            return Err(invalid_data("unknown connection state version"));
        }
        let ip = match r.take(1)? {
            [4] => std::net::IpAddr::from(<[u8; 4]>::try_from(r.take(4)?).map_err(invalid_data)?),
            [6] => std::net::IpAddr::from(<[u8; 16]>::try_from(r.take(16)?).map_err(invalid_data)?),
            _ => return Err(invalid_data("bad address family in a connection state")),
        };
        let port = u16::from_be_bytes(r.take(2)?.try_into().map_err(invalid_data)?);
        let listener = u32::from_be_bytes(r.take(4)?.try_into().map_err(invalid_data)?);
        let mut parts = [Vec::new(), Vec::new(), Vec::new()];
        for part in &mut parts {
            let len = u64::from_be_bytes(r.take(8)?.try_into().map_err(invalid_data)?);
            let len = usize::try_from(len).map_err(invalid_data)?;
            *part = r.take(len)?.to_vec();
        }
        let [partial, unsent, user] = parts;
        let state = Self {
            peer: SocketAddr::new(ip, port),
            listener: usize::try_from(listener).map_err(invalid_data)?,
            partial,
            unsent,
            user,
        };
        Ok((state, r.at))
    }
}

/// Reads a byte string front to back.
struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> io::Result<&'a [u8]> {
        let end = self
            .at
            .checked_add(n)
            .ok_or_else(|| invalid_data("connection state length overflows"))?;
        let part = self
            .bytes
            .get(self.at..end)
            .ok_or_else(|| invalid_data("truncated connection state"))?;
        self.at = end;
        Ok(part)
    }
}

fn invalid_data(e: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

/// A connection taken out of a connector by [`Connector::export`]: its socket, open (a regular
/// descriptor of this process, close-on-exec), and its state.
#[derive(Debug)]
pub struct ExportedConn {
    /// Its id in the exporting connector (stale there from now on).
    pub conn: ConnId,
    /// The socket.
    pub fd: OwnedFd,
    /// Its state.
    pub state: ConnState,
}

/// Gives the allocator's free heap pages back to the kernel (`malloc_trim(0)` with glibc, a
/// no-op with other C libraries): for a thread that has just freed a burst of transient
/// buffers, which glibc would otherwise keep resident until the connector's next periodic trim.
pub fn release_free_heap() {
    sys::release_free_heap();
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit; returns the new soft limit.
pub fn raise_nofile_limit() -> io::Result<u64> {
    sys::raise_nofile_limit()
}

/// Asks the kernel to stamp what a socket receives with its arrival time (`SO_TIMESTAMPNS`),
/// which [`recv_stamped`] then returns. (For ckload, which measures a reply from when it arrived
/// in the socket as well as from when it read it.)
pub fn enable_rx_timestamps(fd: BorrowedFd<'_>) -> io::Result<()> {
    sys::enable_rx_timestamps(fd)
}

/// Reads what a socket has into `buf` without blocking (`recvmsg` with `MSG_DONTWAIT`): the byte
/// count (0 at the end of the stream), and when the socket stamps what it receives
/// ([`enable_rx_timestamps`]) the kernel's arrival time of the last segment read, in
/// nanoseconds on `CLOCK_REALTIME`.
pub fn recv_stamped(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<(usize, Option<u64>)> {
    sys::recv_stamped(fd, buf)
}

/// Pins the calling thread to one CPU: the `index`-th (counting from 0, wrapping around) of the
/// CPUs this process may run on (its main thread's `sched_getaffinity` set, so `taskset` and
/// cpusets are respected). Returns the CPU chosen.
///
/// Connector thread `t` calls this with `t` when [`Config::pin`] is set, so another thread that
/// calls it with the same index (say, the consumer of that connector thread's events) runs on
/// the same CPU. Fails when the allowed set cannot be read or the kernel refuses the new mask;
/// machines with more than 1,024 CPUs are not supported.
pub fn pin_current_thread(index: usize) -> io::Result<usize> {
    sys::pin_current_thread(index)
}

/// Whether [`Config::pin`] pins a process's `threads` connector threads (and the threads that
/// follow them): only when there are at least as many of them as CPUs the process may run on.
/// With fewer, each process would put its threads on the same first CPUs (thread 0 on the first
/// CPU in every process), so several processes on one machine (passthroughs sharing a host, say)
/// would crowd one CPU while another idles; those threads run unpinned and the scheduler spreads
/// them. A mask of the process's own (`taskset`) counts: one thread in a one-CPU mask is pinned.
/// `false` when the mask cannot be read.
pub fn pins(pin: bool, threads: usize) -> bool {
    pin && sys::process_cpus().is_ok_and(|cpus| pins_for(threads, cpus))
}

/// [`pins`] for a process with `cpus` CPUs.
fn pins_for(threads: usize, cpus: usize) -> bool {
    cpus > 0 && threads >= cpus
}

/// [`pin_current_thread`] for a thread playing `role` (e.g. `"connector"`), logging the CPU at
/// `debug`; a failure is a warning, once per process, and the thread runs unpinned.
pub fn pin_current_thread_or_warn(index: usize, role: &str) {
    match sys::pin_current_thread(index) {
        Ok(cpu) => debug!(cpu, role, "thread pinned"),
        Err(e) => {
            static WARNED: std::sync::Once = std::sync::Once::new();
            WARNED.call_once(|| {
                warn!(error = %e, role, "cannot pin threads to CPUs; they run unpinned");
            });
        }
    }
}

/// Starts the connector threads. `make(thread_index)` builds each thread's handler (on that
/// thread).
///
/// Listeners are bound and every thread's backend is set up before this returns, so errors
/// (address in use, bad configuration, a forced io_uring backend that this kernel refuses) are
/// reported here. With [`BackendKind::Auto`], a failure to set up io_uring that the probe did not
/// foresee (e.g. out of memory for a ring) falls back to epoll with a warning.
pub fn start<H, F>(cfg: Config, make: F) -> io::Result<Connector<H::Msg>>
where
    H: Handler,
    F: Fn(usize) -> H + Send + Sync + 'static,
{
    cfg.validate()?;
    // Transient buffers of a broadcast are given back to the kernel, not kept resident.
    sys::fix_mmap_threshold();
    let make = Arc::new(make);
    let kind = match cfg.backend {
        BackendKind::Uring => {
            if let Err(reason) = probe_uring() {
                return Err(io::Error::new(
                    io::ErrorKind::Unsupported,
                    format!("connector: the io_uring backend is not available: {reason}"),
                ));
            }
            BackendKind::Uring
        }
        kind => resolved_backend(kind),
    };
    match start_on(&cfg, kind, Arc::clone(&make)) {
        Ok(connector) => {
            info!(backend = %kind, threads = cfg.threads, "connector started");
            Ok(connector)
        }
        Err(StartError::Backend(e))
            if cfg.backend == BackendKind::Auto && kind != BackendKind::Epoll =>
        {
            warn!(error = %e, "io_uring backend could not be set up; the connector uses epoll");
            start_on(&cfg, BackendKind::Epoll, make).map_err(StartError::into_io)
        }
        Err(e) => Err(e.into_io()),
    }
}

/// Why starting failed: setting up a backend (which `Auto` may retry with epoll) or anything else.
enum StartError {
    Backend(io::Error),
    Other(io::Error),
}

impl StartError {
    fn into_io(self) -> io::Error {
        match self {
            Self::Backend(e) | Self::Other(e) => e,
        }
    }
}

impl From<io::Error> for StartError {
    fn from(e: io::Error) -> Self {
        Self::Other(e)
    }
}

fn start_on<H, F>(
    cfg: &Config,
    kind: BackendKind,
    make: Arc<F>,
) -> Result<Connector<H::Msg>, StartError>
where
    H: Handler,
    F: Fn(usize) -> H + Send + Sync + 'static,
{
    sys::with_backend(kind, cfg.uring, Starter { cfg, kind, make }).unwrap_or_else(|| {
        Err(StartError::Other(io::Error::new(
            io::ErrorKind::Unsupported,
            format!("connector: the {kind} backend is not compiled in"),
        )))
    })
}

/// Starts the threads once the backend type is known.
struct Starter<'a, F> {
    cfg: &'a Config,
    kind: BackendKind,
    make: Arc<F>,
}

impl<H, F> WithBackend for Starter<'_, F>
where
    H: Handler,
    F: Fn(usize) -> H + Send + Sync + 'static,
{
    type Output = Result<Connector<H::Msg>, StartError>;

    fn run<B, N>(self, new_backend: N) -> Self::Output
    where
        B: Backend + 'static,
        N: Fn(Arc<Waker>, Vec<ListenSocket>) -> io::Result<B> + Send + Sync + 'static,
    {
        start_with(self.cfg, self.kind, self.make, Arc::new(new_backend))
    }
}

fn start_with<B, H, F, N>(
    cfg: &Config,
    kind: BackendKind,
    make: Arc<F>,
    new_backend: Arc<N>,
) -> Result<Connector<H::Msg>, StartError>
where
    B: Backend + 'static,
    H: Handler,
    F: Fn(usize) -> H + Send + Sync + 'static,
    N: Fn(Arc<Waker>, Vec<ListenSocket>) -> io::Result<B> + Send + Sync + 'static,
{
    // One listener per thread and address; the first thread's fixes the port when it is 0.
    let mut listeners: Vec<Vec<ListenSocket>> = (0..cfg.threads).map(|_| Vec::new()).collect();
    let mut addrs = Vec::with_capacity(cfg.listen.len());
    for &addr in &cfg.listen {
        sys::ensure_port_free(addr)?;
        let mut local = addr;
        for (t, per_thread) in listeners.iter_mut().enumerate() {
            let (sock, bound) = sys::listener_socket(local, cfg.backlog)?;
            if t == 0 {
                local = bound;
                addrs.push(bound);
            }
            per_thread.push(sock.into());
        }
    }
    // Inherited listeners: every thread gets its own descriptor of the one socket (epoll sets
    // and rings watch descriptors; a duplicate is closed with its thread's backend).
    for inherited in &cfg.inherited {
        let (sock, local) = sys::inherited_listener(&inherited.0)?;
        addrs.push(local);
        let shared = cfg.threads > 1;
        for per_thread in listeners.iter_mut().skip(1) {
            per_thread.push(ListenSocket {
                sock: sock.try_clone()?,
                shared,
            });
        }
        if let Some(first) = listeners.first_mut() {
            first.push(ListenSocket { sock, shared });
        }
    }

    let limits = Limits {
        max_line: cfg.max_line,
        max_outbound: cfg.max_outbound,
        max_outbound_trunk: cfg.max_outbound_trunk,
        tick: cfg.tick,
        max_conns: cfg.max_conns,
        open: Arc::new(std::sync::atomic::AtomicUsize::new(0)),
        per_ip: cfg.max_conns_per_ip.map(|max| Arc::new(IpCounts::new(max))),
        outbound_share: (cfg.max_outbound_total / cfg.threads).max(1),
        idle_timeout: cfg.idle_timeout.filter(|t| !t.is_zero()),
        pause_at: cfg.pause_reads_at.filter(|&n| n > 0).unwrap_or(usize::MAX),
        stall_timeout: cfg.stall_timeout.filter(|t| !t.is_zero()),
    };
    let listen_count = cfg.listen.len() + cfg.inherited.len();
    // A descriptor of each listener kept here, to hand over ([`Connector::listeners`]).
    let kept = listeners
        .first()
        .map(|socks| socks.iter().map(|l| l.sock.try_clone()).collect())
        .unwrap_or_else(|| Ok(Vec::new()))?;
    let pin = pins(cfg.pin, cfg.threads);
    if cfg.pin && !pin {
        info!(
            threads = cfg.threads,
            "fewer connector threads than CPUs: not pinned (every process would pin to the same first CPUs)"
        );
    }
    let mut connector = Connector {
        threads: Vec::with_capacity(cfg.threads),
        addrs,
        kept,
        backend: kind,
    };
    for (t, socks) in listeners.into_iter().enumerate() {
        let thread = u16::try_from(t).map_err(io::Error::other)?;
        let waker = Arc::new(Waker::new()?);
        let shared = Arc::new(Shared::new(Arc::clone(&waker)));
        let (tx, rx) = crossbeam_channel::unbounded();
        let (ctl_tx, ctl_rx) = crossbeam_channel::unbounded();
        // The backend is created on its own thread (an io_uring ring belongs to the thread that
        // submits to it), which reports how that went before this goes on.
        let (ready_tx, ready_rx) = crossbeam_channel::bounded::<io::Result<()>>(1);
        let make = Arc::clone(&make);
        let new_backend = Arc::clone(&new_backend);
        let worker_shared = Arc::clone(&shared);
        let limits = limits.clone();
        let join = std::thread::Builder::new()
            .name(format!("connector-{t}"))
            .spawn(move || {
                let span = tracing::info_span!("connector", thread = t);
                let _entered = span.enter();
                if pin {
                    pin_current_thread_or_warn(t, "connector");
                }
                let backend = match new_backend(waker, socks) {
                    Ok(backend) => backend,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                let _ = ready_tx.send(Ok(()));
                let handler = make(t);
                Worker::new(
                    thread,
                    backend,
                    handler,
                    (rx, ctl_rx),
                    worker_shared,
                    limits,
                    listen_count,
                )
                .run();
            })?;
        // On an error from here on, dropping `connector` stops and joins the threads started.
        connector.threads.push(ThreadHandle {
            tx,
            ctl: ctl_tx,
            shared,
            join: Some(join),
        });
        match ready_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(StartError::Backend(e)),
            Err(_) => {
                return Err(StartError::Backend(io::Error::other(
                    "connector thread exited while setting up its backend",
                )));
            }
        }
    }
    Ok(connector)
}

/// The running connector threads. Dropping it shuts them down, like [`Connector::shutdown`].
pub struct Connector<M> {
    threads: Vec<ThreadHandle<M>>,
    addrs: Vec<SocketAddr>,
    /// A descriptor of each listening socket (of the first thread's, for `listen` addresses).
    kept: Vec<socket2::Socket>,
    backend: BackendKind,
}

struct ThreadHandle<M> {
    tx: Sender<M>,
    ctl: Sender<Control>,
    shared: Arc<Shared>,
    join: Option<JoinHandle<()>>,
}

impl<M: Send + Clone + 'static> Connector<M> {
    /// Number of connector threads.
    pub fn threads(&self) -> usize {
        self.threads.len()
    }

    /// The listeners' addresses, by listener index: one per [`Config::listen`] entry (with the
    /// real port when it was 0), then one per [`Config::inherited`] socket.
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.addrs.clone()
    }

    /// A new descriptor of each listening socket, by listener index, to hand to another instance
    /// (which serves them with [`Config::inherited`]). For a [`Config::listen`] address this is
    /// the first thread's `SO_REUSEPORT` socket: the kernel keeps spreading new connections over
    /// every socket of that group, so this instance should stop accepting
    /// ([`Connector::quiesce`]) and be gone soon after; connections waiting in the accept queue
    /// of one of its other sockets when it exits are reset.
    pub fn listeners(&self) -> io::Result<Vec<OwnedFd>> {
        self.kept
            .iter()
            .map(|s| s.try_clone().map(OwnedFd::from))
            .collect()
    }

    /// The backend the threads run: [`BackendKind::Epoll`] or [`BackendKind::Uring`], never
    /// `Auto`.
    pub fn backend(&self) -> BackendKind {
        self.backend
    }

    /// Sends `msg` to thread `thread`'s handler ([`Handler::on_msg`]) and wakes the thread.
    /// Ignored if there is no such thread.
    pub fn send(&self, thread: usize, msg: M) {
        send_to(&self.threads, thread, msg, |t| (&t.tx, &*t.shared));
    }

    /// Each thread's counters, by thread index: a few atomic loads per thread, from any thread.
    pub fn counters(&self) -> Vec<ThreadCounters> {
        self.threads
            .iter()
            .map(|t| t.shared.counters.snapshot())
            .collect()
    }

    /// Sends a clone of `msg` to every thread's handler.
    pub fn broadcast(&self, msg: M) {
        broadcast_to(&self.threads, msg, |t| (&t.tx, &*t.shared));
    }

    /// A cloneable handle that sends messages to the threads, for use from other threads.
    pub fn handle(&self) -> ConnectorHandle<M> {
        ConnectorHandle {
            threads: self
                .threads
                .iter()
                .map(|t| (t.tx.clone(), Arc::clone(&t.shared)))
                .collect(),
        }
    }

    /// The first step of a handover: every thread stops accepting and reading, and writes what
    /// is queued. Returns once every thread has written everything, or at `deadline`, when the
    /// sends still in flight are cancelled (what they did not write stays queued: it travels
    /// with [`Connector::export`]); a thread whose cancellations do not finish within a second
    /// after that reports anyway, with `flushed` false. One report per thread.
    ///
    /// From then on the threads write nothing and read nothing: handlers still get messages
    /// and ticks, and what they queue is kept for the export. [`Connector::resume`] undoes it.
    /// Must not be called from a connector thread (it waits for them all).
    pub fn quiesce(&self, deadline: Instant) -> Vec<QuiesceReport> {
        let replies: Vec<_> = self
            .threads
            .iter()
            .map(|t| {
                let (reply, rx) = crossbeam_channel::bounded(1);
                self.control(t, Control::Quiesce { deadline, reply });
                rx
            })
            .collect();
        replies
            .into_iter()
            .map(|rx| rx.recv().unwrap_or_default())
            .collect()
    }

    /// Takes a quiesce back (a handover that failed before its commit point): the threads
    /// accept, read and write again. Returns at once.
    pub fn resume(&self) {
        for t in &self.threads {
            self.control(t, Control::Resume);
        }
    }

    /// Takes up to `max` connections out of a quiesced connector (thread 0's first), each with
    /// its socket and state, calling [`Handler::on_export`] for each. Call it again for the next
    /// batch; an empty result means none is left. Batches keep the descriptors this process
    /// holds at once under `RLIMIT_NOFILE` (on io_uring a connection has no regular descriptor
    /// until it is exported: one is installed with `IORING_OP_FIXED_FD_INSTALL` and its table
    /// slot freed): hand a batch over and close it before asking for the next. (One
    /// `SCM_RIGHTS` message carries at most 253 descriptors, a natural batch size.)
    ///
    /// Fails with `InvalidInput` unless [`Connector::quiesce`] returned before, and with
    /// `Unsupported` when io_uring cannot install descriptors on this kernel (Linux 6.8 is
    /// needed), leaving every connection in place. A connection whose socket cannot be exported
    /// now (`EMFILE`: the batch was too big for the descriptors left) stays in place for a later
    /// call; when nothing at all could be exported, that error is returned. Connections whose
    /// handler asked for a close are closed, not exported; one whose send was still in flight
    /// when a quiesce gave up waiting (`flushed` false) stays and is closed at shutdown. Must not
    /// be called from a connector thread.
    pub fn export(&self, max: usize) -> io::Result<Vec<ExportedConn>> {
        let mut all = Vec::new();
        for t in &self.threads {
            let want = max.saturating_sub(all.len());
            if want == 0 {
                break;
            }
            let (reply, rx) = crossbeam_channel::bounded(1);
            self.control(t, Control::Export { max: want, reply });
            let batch = rx
                .recv()
                .map_err(|_| io::Error::other("a connector thread has stopped"))
                .and_then(|batch| batch);
            match batch {
                Ok(batch) => all.extend(batch),
                // What was exported already must reach the caller; the error comes back on the
                // next call.
                Err(_) if !all.is_empty() => break,
                Err(e) => return Err(e),
            }
        }
        Ok(all)
    }

    /// Installs connections exported by another instance on thread `thread` (one of the
    /// adopting connector's threads, wrapping around): each socket joins the thread's backend
    /// (on io_uring as a direct descriptor; the descriptor given here is closed), its unsent
    /// bytes are queued first, its partial line starts its input, [`Handler::on_adopt`] runs,
    /// and reading resumes (unless this connector is quiesced). Returns each connection's new id
    /// or why it could not be adopted (its socket is then closed), in order.
    ///
    /// Adopted connections count towards [`Config::max_conns`] but are never refused. Must not
    /// be called from a connector thread.
    pub fn adopt(
        &self,
        thread: usize,
        conns: Vec<(OwnedFd, ConnState)>,
    ) -> Vec<io::Result<ConnId>> {
        let count = conns.len();
        let gone = || {
            (0..count)
                .map(|_| Err(io::Error::other("the connector thread has stopped")))
                .collect()
        };
        let Some(t) = self.threads.get(thread % self.threads.len().max(1)) else {
            return gone();
        };
        let (reply, rx) = crossbeam_channel::bounded(1);
        self.control(t, Control::Adopt { conns, reply });
        rx.recv().unwrap_or_else(|_| gone())
    }

    fn control(&self, t: &ThreadHandle<M>, ctl: Control) {
        if t.ctl.send(ctl).is_ok() {
            t.shared.notify();
        }
    }

    /// Stops every thread: each closes its connections (calling [`Handler::on_close`] with
    /// [`CloseReason::Shutdown`]) and its listeners, then this joins them.
    pub fn shutdown(self) {
        drop(self);
    }
}

impl<M> Connector<M> {
    fn stop(&mut self) {
        for t in &self.threads {
            t.shared.request_stop();
        }
        for (i, t) in self.threads.iter_mut().enumerate() {
            if let Some(join) = t.join.take() {
                if join.join().is_err() {
                    error!(thread = i, "connector thread panicked");
                } else {
                    debug!(thread = i, "connector thread stopped");
                }
            }
        }
    }
}

impl<M> Drop for Connector<M> {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Sends messages to the connector threads; cheap to clone. Messages sent after the connector
/// shut down are dropped.
pub struct ConnectorHandle<M> {
    threads: Vec<(Sender<M>, Arc<Shared>)>,
}

impl<M> Clone for ConnectorHandle<M> {
    fn clone(&self) -> Self {
        Self {
            threads: self.threads.clone(),
        }
    }
}

impl<M: Send + Clone + 'static> ConnectorHandle<M> {
    /// Number of connector threads.
    pub fn threads(&self) -> usize {
        self.threads.len()
    }

    /// Like [`Connector::counters`] (still readable after the connector shut down).
    pub fn counters(&self) -> Vec<ThreadCounters> {
        self.threads
            .iter()
            .map(|(_, shared)| shared.counters.snapshot())
            .collect()
    }

    /// The operator's accept gate (ckpool's admin `accept` / `reject`): with `false` every
    /// thread stops accepting new connections (they wait in the listen backlog, and are reset
    /// by the kernel once it is full); with `true` they are accepted again. Connections already
    /// open are not touched, and a handover's quiesce is independent of it. Returns once every
    /// thread has applied it (and a round of its loop has passed, so the backend has been
    /// told), or after a second; false then.
    pub fn set_accepting(&self, accepting: bool) -> bool {
        use std::sync::atomic::Ordering;
        for (_, shared) in &self.threads {
            shared.reject.store(!accepting, Ordering::Relaxed);
            shared.notify();
        }
        let deadline = Instant::now() + Duration::from_secs(1);
        loop {
            let mut done = true;
            for (_, shared) in &self.threads {
                if shared.rejecting.load(Ordering::Acquire) == accepting {
                    done = false;
                    // Another round of its loop.
                    shared.notify();
                }
            }
            if done {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Whether the threads accept new connections (see [`ConnectorHandle::set_accepting`]).
    pub fn accepting(&self) -> bool {
        self.threads
            .iter()
            .all(|(_, s)| !s.reject.load(std::sync::atomic::Ordering::Relaxed))
    }

    /// Like [`Connector::send`].
    pub fn send(&self, thread: usize, msg: M) {
        send_to(&self.threads, thread, msg, |(tx, shared)| (tx, &**shared));
    }

    /// Like [`Connector::broadcast`].
    pub fn broadcast(&self, msg: M) {
        broadcast_to(&self.threads, msg, |(tx, shared)| (tx, &**shared));
    }
}

fn send_to<T, M>(
    threads: &[T],
    thread: usize,
    msg: M,
    parts: impl Fn(&T) -> (&Sender<M>, &Shared),
) {
    let Some(t) = threads.get(thread) else {
        debug!(thread, "message for an unknown connector thread dropped");
        return;
    };
    let (tx, shared) = parts(t);
    if tx.send(msg).is_ok() {
        shared.notify();
    }
}

fn broadcast_to<T, M: Clone>(threads: &[T], msg: M, parts: impl Fn(&T) -> (&Sender<M>, &Shared)) {
    let Some((last, rest)) = threads.split_last() else {
        return;
    };
    for t in rest {
        let (tx, shared) = parts(t);
        if tx.send(msg.clone()).is_ok() {
            shared.notify();
        }
    }
    let (tx, shared) = parts(last);
    if tx.send(msg).is_ok() {
        shared.notify();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn threads_fewer_than_cpus_are_not_pinned() {
        assert!(pins_for(2, 2) && pins_for(3, 2) && pins_for(1, 1));
        assert!(!pins_for(1, 2) && !pins_for(7, 8) && !pins_for(1, 0));
    }

    #[test]
    fn backend_names_round_trip() {
        for kind in [BackendKind::Auto, BackendKind::Epoll, BackendKind::Uring] {
            assert_eq!(kind.as_str().parse::<BackendKind>(), Ok(kind));
            assert_eq!(kind.to_string(), kind.as_str());
        }
        assert_eq!("io-uring".parse::<BackendKind>(), Ok(BackendKind::Uring));
        assert_eq!("io_uring".parse::<BackendKind>(), Ok(BackendKind::Uring));
        assert!("uring2".parse::<BackendKind>().is_err());
    }

    #[test]
    fn explicit_backends_resolve_to_themselves() {
        assert_eq!(resolved_backend(BackendKind::Epoll), BackendKind::Epoll);
        assert_eq!(resolved_backend(BackendKind::Uring), BackendKind::Uring);
        let auto = resolved_backend(BackendKind::Auto);
        assert_eq!(auto == BackendKind::Uring, probe_uring().is_ok());
    }

    #[test]
    fn conn_states_round_trip_through_their_encoding() {
        let states = [
            ConnState {
                peer: "192.0.2.7:4000".parse().unwrap(),
                listener: 3,
                partial: b"{\"id\":1,".to_vec(),
                unsent: b"notify\n".repeat(3),
                user: vec![0, 1, 2, 255],
            },
            ConnState {
                peer: "[2001:db8::1]:3333".parse().unwrap(),
                listener: 0,
                partial: Vec::new(),
                unsent: Vec::new(),
                user: Vec::new(),
            },
        ];
        let mut wire = Vec::new();
        for st in &states {
            st.encode(&mut wire);
        }
        let (first, used) = ConnState::decode(&wire).unwrap();
        assert_eq!(first, states[0]);
        let (second, rest) = ConnState::decode(&wire[used..]).unwrap();
        assert_eq!(second, states[1]);
        assert_eq!(used + rest, wire.len());
        // Every truncation is refused, as are an unknown version and family.
        for end in 0..used {
            let err = ConnState::decode(&wire[..end]).unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        }
        let mut bad = wire.clone();
        bad[0] = 9;
        assert!(ConnState::decode(&bad).is_err());
        let mut bad = wire;
        bad[1] = 5;
        assert!(ConnState::decode(&bad).is_err());
    }

    #[test]
    fn invalid_configs_are_refused() {
        let ok = Config {
            listen: vec![SocketAddr::from(([127, 0, 0, 1], 0))],
            ..Config::default()
        };
        assert!(ok.validate().is_ok());
        for bad in [
            Config {
                listen: Vec::new(),
                ..ok.clone()
            },
            Config {
                threads: 0,
                ..ok.clone()
            },
            Config {
                max_line: 0,
                ..ok.clone()
            },
            Config {
                tick: Duration::ZERO,
                ..ok.clone()
            },
            Config {
                uring: UringConfig {
                    recv_buffers: 1000,
                    ..UringConfig::default()
                },
                ..ok.clone()
            },
            Config {
                uring: UringConfig {
                    files: 0,
                    ..UringConfig::default()
                },
                ..ok.clone()
            },
            Config {
                uring: UringConfig {
                    sq_entries: 100,
                    ..UringConfig::default()
                },
                ..ok.clone()
            },
        ] {
            assert_eq!(
                bad.validate().map_err(|e| e.kind()),
                Err(io::ErrorKind::InvalidInput)
            );
        }
    }
}
