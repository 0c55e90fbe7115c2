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
//! `cfg`): epoll today, io_uring later. See [`BackendKind`].
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

mod framing;
mod outbox;
mod sys;
mod worker;

use std::io;
use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::str::FromStr;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::Sender;
use tracing::{debug, error};

pub use common::ConnId;
pub use outbox::{Action, Outbox, SendBuf};

use crate::sys::{Backend, Waker};
use crate::worker::{Limits, Shared, Worker};

/// Connector settings.
#[derive(Clone, Debug)]
pub struct Config {
    /// Addresses to listen on (at least one); port 0 picks a free port, the same for every thread.
    pub listen: Vec<SocketAddr>,
    /// Number of connector threads (one per core by default; at most 65,536).
    pub threads: usize,
    /// Maximum line length in bytes, without the `"\n"` or `"\r\n"`; a longer line closes the
    /// connection ([`CloseReason::LineTooLong`]).
    pub max_line: usize,
    /// Cap on the bytes queued and not yet written to one connection; exceeding it closes the
    /// connection ([`CloseReason::Outbound`]).
    pub max_outbound: usize,
    /// Listen backlog (the kernel caps it at `net.core.somaxconn`).
    pub backlog: i32,
    /// How often [`Handler::on_tick`] runs.
    pub tick: Duration,
    /// Which I/O backend to use.
    pub backend: BackendKind,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: vec![SocketAddr::from(([0, 0, 0, 0], 3333))],
            threads: std::thread::available_parallelism().map_or(1, NonZeroUsize::get),
            max_line: 16 * 1024,
            max_outbound: 1024 * 1024,
            backlog: 4096,
            tick: Duration::from_secs(1),
            backend: BackendKind::Auto,
        }
    }
}

impl Config {
    fn validate(&self) -> io::Result<()> {
        let invalid =
            |what: &str| Err(io::Error::new(io::ErrorKind::InvalidInput, what.to_owned()));
        if self.listen.is_empty() {
            return invalid("connector: no listen address");
        }
        if self.threads == 0 || self.threads > usize::from(u16::MAX) + 1 {
            return invalid("connector: threads must be between 1 and 65536");
        }
        if self.max_line == 0 || self.max_outbound == 0 {
            return invalid("connector: max_line and max_outbound must be positive");
        }
        if self.tick.is_zero() {
            return invalid("connector: tick must be positive");
        }
        Ok(())
    }
}

/// The I/O backend.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum BackendKind {
    /// The best backend this kernel allows (epoll for now).
    #[default]
    Auto,
    /// Level-triggered epoll.
    Epoll,
}

impl BackendKind {
    /// The name used in configuration files (`"auto"`, `"epoll"`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::Epoll => "epoll",
        }
    }
}

impl FromStr for BackendKind {
    type Err = UnknownBackend;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(Self::Auto),
            "epoll" => Ok(Self::Epoll),
            _ => Err(UnknownBackend(s.to_owned())),
        }
    }
}

/// A backend name that [`BackendKind::from_str`] does not know.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown I/O backend {0:?} (expected \"auto\" or \"epoll\")")]
pub struct UnknownBackend(pub String);

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
}

/// Runs on the connector thread that owns the connections (one handler instance per thread).
///
/// Callbacks must not block: the whole thread waits for them. Requests put in the [`Outbox`] are
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

    /// The connection is closed; its id is stale from now on. Called once per connection.
    fn on_close(&mut self, now: Instant, conn: ConnId, reason: CloseReason);

    /// A message arrived for this thread.
    fn on_msg(&mut self, now: Instant, msg: Self::Msg, out: &mut Outbox);

    /// Called every [`Config::tick`].
    fn on_tick(&mut self, now: Instant, out: &mut Outbox);
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit; returns the new soft limit.
pub fn raise_nofile_limit() -> io::Result<u64> {
    sys::raise_nofile_limit()
}

/// Starts the connector threads. `make(thread_index)` builds each thread's handler (on that
/// thread).
///
/// Listeners are bound before this returns, so errors (address in use, bad configuration, no
/// epoll) are reported here.
pub fn start<H, F>(cfg: Config, make: F) -> io::Result<Connector<H::Msg>>
where
    H: Handler,
    F: Fn(usize) -> H + Send + Sync + 'static,
{
    cfg.validate()?;
    match cfg.backend {
        BackendKind::Auto | BackendKind::Epoll => start_with(&cfg, make, sys::epoll::Epoll::new),
    }
}

fn start_with<B, H, F, N>(cfg: &Config, make: F, new_backend: N) -> io::Result<Connector<H::Msg>>
where
    B: Backend + Send + 'static,
    H: Handler,
    F: Fn(usize) -> H + Send + Sync + 'static,
    N: Fn(Arc<Waker>, Vec<socket2::Socket>) -> io::Result<B>,
{
    // One listener per thread and address; the first thread's fixes the port when it is 0.
    let mut listeners: Vec<Vec<socket2::Socket>> = (0..cfg.threads).map(|_| Vec::new()).collect();
    let mut addrs = Vec::with_capacity(cfg.listen.len());
    for &addr in &cfg.listen {
        let mut local = addr;
        for (t, per_thread) in listeners.iter_mut().enumerate() {
            let (sock, bound) = sys::listener_socket(local, cfg.backlog)?;
            if t == 0 {
                local = bound;
                addrs.push(bound);
            }
            per_thread.push(sock);
        }
    }

    let limits = Limits {
        max_line: cfg.max_line,
        max_outbound: cfg.max_outbound,
        tick: cfg.tick,
    };
    let listen_count = cfg.listen.len();
    let make = Arc::new(make);
    let mut connector = Connector {
        threads: Vec::with_capacity(cfg.threads),
        addrs,
    };
    for (t, socks) in listeners.into_iter().enumerate() {
        let thread = u16::try_from(t).map_err(io::Error::other)?;
        let waker = Arc::new(Waker::new()?);
        let backend = new_backend(Arc::clone(&waker), socks)?;
        let shared = Arc::new(Shared::new(waker));
        let (tx, rx) = crossbeam_channel::unbounded();
        let make = Arc::clone(&make);
        let worker_shared = Arc::clone(&shared);
        let join = std::thread::Builder::new()
            .name(format!("connector-{t}"))
            .spawn(move || {
                let span = tracing::info_span!("connector", thread = t);
                let _entered = span.enter();
                let handler = make(t);
                Worker::new(
                    thread,
                    backend,
                    handler,
                    rx,
                    worker_shared,
                    limits,
                    listen_count,
                )
                .run();
            })?;
        // On an error later in this loop, dropping `connector` stops and joins this thread.
        connector.threads.push(ThreadHandle {
            tx,
            shared,
            join: Some(join),
        });
    }
    Ok(connector)
}

/// The running connector threads. Dropping it shuts them down, like [`Connector::shutdown`].
pub struct Connector<M> {
    threads: Vec<ThreadHandle<M>>,
    addrs: Vec<SocketAddr>,
}

struct ThreadHandle<M> {
    tx: Sender<M>,
    shared: Arc<Shared>,
    join: Option<JoinHandle<()>>,
}

impl<M: Send + Clone + 'static> Connector<M> {
    /// Number of connector threads.
    pub fn threads(&self) -> usize {
        self.threads.len()
    }

    /// The bound addresses, one per [`Config::listen`] entry (with the real port when it was 0).
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.addrs.clone()
    }

    /// Sends `msg` to thread `thread`'s handler ([`Handler::on_msg`]) and wakes the thread.
    /// Ignored if there is no such thread.
    pub fn send(&self, thread: usize, msg: M) {
        send_to(&self.threads, thread, msg, |t| (&t.tx, &*t.shared));
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
    fn backend_names_round_trip() {
        for kind in [BackendKind::Auto, BackendKind::Epoll] {
            assert_eq!(kind.as_str().parse::<BackendKind>(), Ok(kind));
        }
        assert!("uring2".parse::<BackendKind>().is_err());
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
        ] {
            assert_eq!(
                bad.validate().map_err(|e| e.kind()),
                Err(io::ErrorKind::InvalidInput)
            );
        }
    }
}
