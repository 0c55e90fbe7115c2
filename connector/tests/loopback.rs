#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code"
)]
//! The connector over loopback with a small test handler, once per backend.
//!
//! Every wait is bounded: socket reads have a timeout and handler events are awaited with a
//! deadline.

use std::cell::RefCell;
use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ckpool_connector::{BackendKind, CloseReason, Config, ConnId, Connector, Handler, Outbox};
use crossbeam_channel::{Receiver, Sender};

/// Lines sent in reply to `bulk` (about 8 MB in all).
const BULK_LINES: usize = 100_000;
const BULK_PAD: &str = "pppppppppppppppppppppppppppppppppppppppppppppppppppppppppppppppp";

/// Upper bound for any single wait in these tests.
const WAIT: Duration = Duration::from_secs(20);

/// Expands each test function `name(BackendKind)` into `name::<backend>` tests, one per backend
/// (`name::epoll`, `name::uring`).
macro_rules! backend_tests {
    ($($name:ident),* $(,)?) => {
        $(
            mod $name {
                #[test]
                fn epoll() {
                    super::$name(ckpool_connector::BackendKind::Epoll);
                }

                #[test]
                fn uring() {
                    if super::uring_available() {
                        super::$name(ckpool_connector::BackendKind::Uring);
                    }
                }
            }
        )*
    };
}

/// Whether the io_uring variant of a test can run. Where it cannot, the test says "skipped";
/// in CI (`CI=true`) that is a failure unless io_uring was left out on purpose (the `io-uring`
/// feature off, or `CKPOOL_IO_URING_DISABLE` set).
fn uring_available() -> bool {
    let Err(reason) = ckpool_connector::probe_uring() else {
        return true;
    };
    let deliberate = !cfg!(feature = "io-uring")
        || std::env::var_os("CKPOOL_IO_URING_DISABLE").is_some_and(|v| !v.is_empty() && v != "0");
    assert!(
        deliberate || std::env::var("CI").map_or(true, |v| v != "true"),
        "io_uring is not available in CI: {reason}"
    );
    eprintln!("skipped: io_uring is not available: {reason}");
    false
}

backend_tests!(
    echo_lines,
    line_split_into_one_byte_writes,
    three_lines_in_one_write,
    oversized_line_closes_only_that_connection,
    non_reading_client_is_dropped,
    broadcast_shared_buffer_reaches_every_thread,
    thousand_connections_on_two_threads,
    handler_close_flushes_then_closes,
    bulk_output_arrives_complete_and_in_order,
    stale_ids_are_ignored,
    two_listeners_on_port_zero,
    ipv6_peer_addresses,
    shutdown_closes_and_joins,
    batch_end_sends_what_the_round_collected,
);

// ---------------------------------------------------------------------------------------------
// Test handler

#[derive(Clone)]
enum Msg {
    /// Send this shared buffer to every connection of the thread.
    Broadcast(Arc<[u8]>),
    /// Send bytes to one connection (possibly stale).
    SendTo(ConnId, Vec<u8>),
}

#[derive(Debug)]
enum Event {
    Opened {
        conn: ConnId,
        peer: SocketAddr,
        listener: usize,
        thread: usize,
    },
    Closed {
        conn: ConnId,
        reason: CloseReason,
        /// Bytes queued by the flood of this connection.
        flooded: usize,
    },
    Msg {
        thread: usize,
    },
}

/// Echoes lines, except: `close` (reply `bye`, then close), `flood` (from then on, queue 256 KiB
/// per tick), `thread` (reply with the thread index), `bulk` (reply with [`BULK_LINES`] lines).
struct TestHandler {
    thread: usize,
    events: Sender<Event>,
    conns: Vec<ConnId>,
    flood: Vec<(ConnId, usize)>,
    chunk: Arc<[u8]>,
    /// Replies to `later ...` lines, held until the end of the round.
    later: Vec<(ConnId, Vec<u8>)>,
}

impl Handler for TestHandler {
    type Msg = Msg;

    fn on_open(
        &mut self,
        _now: Instant,
        conn: ConnId,
        peer: SocketAddr,
        listener: usize,
        _out: &mut Outbox,
    ) {
        assert_eq!(usize::from(conn.thread()), self.thread);
        self.conns.push(conn);
        self.events
            .send(Event::Opened {
                conn,
                peer,
                listener,
                thread: self.thread,
            })
            .unwrap();
    }

    fn on_line(&mut self, _now: Instant, conn: ConnId, line: &[u8], out: &mut Outbox) {
        assert!(!line.is_empty());
        assert!(!line.contains(&b'\n'));
        match line {
            b"close" => {
                out.send(conn, b"bye\n".to_vec());
                out.close(conn);
                // Requests after the close are ignored.
                out.send(conn, b"after close\n".to_vec());
            }
            b"flood" => self.flood.push((conn, 0)),
            _ if line.starts_with(b"later ") => {
                let mut reply = line.to_vec();
                reply.push(b'\n');
                self.later.push((conn, reply));
            }
            b"thread" => out.send(conn, format!("thread {}\n", self.thread)),
            b"bulk" => {
                // Many small owned buffers with a shared one every 1000: more than the socket
                // buffers take at once, so most is written later, on EPOLLOUT.
                let marker: Arc<[u8]> = Arc::from(&b"shared marker\n"[..]);
                for i in 0..BULK_LINES {
                    out.send(conn, format!("line {i} {BULK_PAD}\n"));
                    if i % 1000 == 999 {
                        out.send(conn, Arc::clone(&marker));
                    }
                }
            }
            _ => {
                let mut reply = line.to_vec();
                reply.push(b'\n');
                out.send(conn, reply);
            }
        }
    }

    fn on_close(&mut self, _now: Instant, conn: ConnId, reason: CloseReason) {
        self.conns.retain(|&c| c != conn);
        let flooded = self
            .flood
            .iter()
            .find(|(c, _)| *c == conn)
            .map_or(0, |&(_, n)| n);
        self.flood.retain(|(c, _)| *c != conn);
        self.events
            .send(Event::Closed {
                conn,
                reason,
                flooded,
            })
            .unwrap();
    }

    fn on_msg(&mut self, _now: Instant, msg: Msg, out: &mut Outbox) {
        match msg {
            Msg::Broadcast(buf) => {
                for &c in &self.conns {
                    out.send(c, Arc::clone(&buf));
                }
            }
            Msg::SendTo(conn, bytes) => out.send(conn, bytes),
        }
        self.events
            .send(Event::Msg {
                thread: self.thread,
            })
            .unwrap();
    }

    fn on_tick(&mut self, _now: Instant, out: &mut Outbox) {
        for (conn, n) in &mut self.flood {
            for _ in 0..4 {
                out.send(*conn, Arc::clone(&self.chunk));
                *n += self.chunk.len();
            }
        }
    }

    fn on_batch_end(&mut self, _now: Instant, out: &mut Outbox) {
        for (conn, reply) in self.later.drain(..) {
            out.send(conn, reply);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Harness

struct Server {
    connector: Option<Connector<Msg>>,
    events: Receiver<Event>,
    /// Events received while waiting for others.
    backlog: RefCell<Vec<Event>>,
}

fn server(backend: BackendKind, threads: usize, tweak: impl FnOnce(&mut Config)) -> Server {
    let mut cfg = Config {
        listen: vec!["127.0.0.1:0".parse().unwrap()],
        threads,
        backend,
        tick: Duration::from_millis(50),
        ..Config::default()
    };
    tweak(&mut cfg);
    let (tx, rx) = crossbeam_channel::unbounded();
    let connector = ckpool_connector::start(cfg, move |thread| TestHandler {
        thread,
        events: tx.clone(),
        conns: Vec::new(),
        flood: Vec::new(),
        chunk: vec![b'f'; 64 * 1024].into(),
        later: Vec::new(),
    })
    .unwrap();
    assert_eq!(connector.threads(), threads);
    Server {
        connector: Some(connector),
        events: rx,
        backlog: RefCell::new(Vec::new()),
    }
}

impl Server {
    fn connector(&self) -> &Connector<Msg> {
        self.connector.as_ref().unwrap()
    }

    fn addr(&self) -> SocketAddr {
        self.connector().local_addrs()[0]
    }

    /// Waits for (and removes) the first event matching `pred`.
    fn wait_for(&self, what: &str, mut pred: impl FnMut(&Event) -> bool) -> Event {
        {
            let mut backlog = self.backlog.borrow_mut();
            if let Some(i) = backlog.iter().position(&mut pred) {
                return backlog.remove(i);
            }
        }
        let deadline = Instant::now() + WAIT;
        loop {
            match self.events.recv_deadline(deadline) {
                Ok(ev) if pred(&ev) => return ev,
                Ok(ev) => self.backlog.borrow_mut().push(ev),
                Err(_) => panic!("timed out waiting for {what}"),
            }
        }
    }

    /// Waits for the server side of `client` to open; returns its id and thread.
    fn opened(&self, client: &Client) -> (ConnId, usize) {
        let local = client.stream.local_addr().unwrap();
        match self.wait_for(
            "on_open",
            |ev| matches!(ev, Event::Opened { peer, .. } if *peer == local),
        ) {
            Event::Opened { conn, thread, .. } => (conn, thread),
            ev => unreachable!("{ev:?}"),
        }
    }

    /// Waits for `conn` to close; returns the reason and the bytes its flood queued.
    fn closed(&self, conn: ConnId) -> (CloseReason, usize) {
        match self.wait_for(
            "on_close",
            |ev| matches!(ev, Event::Closed { conn: c, .. } if *c == conn),
        ) {
            Event::Closed {
                reason, flooded, ..
            } => (reason, flooded),
            ev => unreachable!("{ev:?}"),
        }
    }
}

struct Client {
    stream: TcpStream,
    reader: BufReader<TcpStream>,
}

impl Client {
    fn connect(addr: SocketAddr) -> Self {
        Self::from_stream(TcpStream::connect_timeout(&addr, WAIT).unwrap())
    }

    /// A client with a tiny receive buffer, so that the server's writes block early.
    fn connect_slow(addr: SocketAddr) -> Self {
        let sock =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        sock.set_recv_buffer_size(4096).unwrap();
        sock.connect_timeout(&addr.into(), WAIT).unwrap();
        Self::from_stream(sock.into())
    }

    fn from_stream(stream: TcpStream) -> Self {
        stream.set_nodelay(true).unwrap();
        stream.set_read_timeout(Some(WAIT)).unwrap();
        stream.set_write_timeout(Some(WAIT)).unwrap();
        let reader = BufReader::new(stream.try_clone().unwrap());
        Self { stream, reader }
    }

    fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).unwrap();
    }

    /// Reads one line (without the newline); fails on timeout or end of stream.
    fn line(&mut self) -> String {
        let mut s = String::new();
        let n = self.reader.read_line(&mut s).unwrap();
        assert!(n > 0, "unexpected end of stream");
        assert!(s.ends_with('\n'), "partial line {s:?}");
        s.pop();
        s
    }

    /// Reads until the server closes the connection; returns what came before.
    fn until_closed(&mut self) -> Vec<u8> {
        let mut rest = Vec::new();
        match self.reader.read_to_end(&mut rest) {
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
            Err(e) => panic!("waiting for the server to close: {e}"),
        }
        rest
    }
}

// ---------------------------------------------------------------------------------------------
// Tests

fn echo_lines(backend: BackendKind) {
    let srv = server(backend, 1, |_| {});
    let mut c = Client::connect(srv.addr());
    c.send(b"hello\n");
    assert_eq!(c.line(), "hello");
    // "\r\n" endings are stripped and empty lines skipped.
    c.send(b"a\r\n\r\n\n\nb\n");
    assert_eq!(c.line(), "a");
    assert_eq!(c.line(), "b");
    // A peer close is reported.
    let (id, _) = srv.opened(&c);
    drop(c);
    assert_eq!(srv.closed(id).0, CloseReason::Peer);
}

fn line_split_into_one_byte_writes(backend: BackendKind) {
    let srv = server(backend, 1, |_| {});
    let mut c = Client::connect(srv.addr());
    let line = b"{\"id\":1,\"method\":\"mining.subscribe\",\"params\":[]}\r\n";
    for b in line {
        c.send(std::slice::from_ref(b));
    }
    assert_eq!(
        c.line(),
        "{\"id\":1,\"method\":\"mining.subscribe\",\"params\":[]}"
    );
    c.send(b"next\n");
    assert_eq!(c.line(), "next");
}

fn three_lines_in_one_write(backend: BackendKind) {
    let srv = server(backend, 1, |_| {});
    let mut c = Client::connect(srv.addr());
    c.send(b"one\ntwo\nthree\n");
    assert_eq!(c.line(), "one");
    assert_eq!(c.line(), "two");
    assert_eq!(c.line(), "three");
}

fn oversized_line_closes_only_that_connection(backend: BackendKind) {
    let srv = server(backend, 1, |cfg| cfg.max_line = 1024);
    let mut good = Client::connect(srv.addr());
    let mut bad = Client::connect(srv.addr());
    let (bad_id, _) = srv.opened(&bad);

    // Exactly the limit is fine.
    let max = "m".repeat(1024);
    good.send(format!("{max}\r\n").as_bytes());
    assert_eq!(good.line(), max);

    // No newline at all: closed once the pending line passes the limit.
    bad.send(&[b'x'; 2000]);
    assert_eq!(srv.closed(bad_id).0, CloseReason::LineTooLong);
    bad.until_closed();

    // A complete line one byte too long, after a good one that is still answered.
    let mut bad2 = Client::connect(srv.addr());
    let (bad2_id, _) = srv.opened(&bad2);
    bad2.send(format!("ok\n{max}x\nnever\n").as_bytes());
    assert_eq!(srv.closed(bad2_id).0, CloseReason::LineTooLong);
    // The close is abrupt: replies still queued may be dropped; nothing after the long line is
    // answered.
    let rest = bad2.until_closed();
    assert!(rest == b"" || rest == b"ok\n", "{rest:?}");

    good.send(b"still here\n");
    assert_eq!(good.line(), "still here");
}

fn non_reading_client_is_dropped(backend: BackendKind) {
    const LIMIT: usize = 256 * 1024;
    let srv = server(backend, 1, |cfg| {
        cfg.max_outbound = LIMIT;
        cfg.tick = Duration::from_millis(10);
    });
    let mut lazy = Client::connect(srv.addr());
    let (lazy_id, _) = srv.opened(&lazy);
    lazy.send(b"flood\n");
    // The handler queues 256 KiB per tick and the client never reads: once the kernel buffers
    // are full the queue grows to the limit and the connection is dropped.
    let (reason, flooded) = srv.closed(lazy_id);
    assert_eq!(reason, CloseReason::Outbound);
    // What was accepted is bounded by the limit plus what the kernel buffered.
    assert!(
        flooded < 64 * 1024 * 1024,
        "{flooded} bytes queued before the drop"
    );

    // The thread is not stalled.
    let mut other = Client::connect(srv.addr());
    other.send(b"ping\n");
    assert_eq!(other.line(), "ping");
}

fn broadcast_shared_buffer_reaches_every_thread(backend: BackendKind) {
    const CLIENTS: usize = 16;
    let srv = server(backend, 2, |_| {});
    let mut clients: Vec<Client> = (0..CLIENTS).map(|_| Client::connect(srv.addr())).collect();
    for c in &clients {
        srv.opened(c);
    }
    let notify: Arc<[u8]> =
        Arc::from(&b"{\"method\":\"mining.notify\",\"params\":[\"job1\"]}\n"[..]);
    srv.connector()
        .broadcast(Msg::Broadcast(Arc::clone(&notify)));
    let mut threads = [false; 2];
    for _ in 0..2 {
        match srv.wait_for("on_msg", |ev| matches!(ev, Event::Msg { .. })) {
            Event::Msg { thread } => threads[thread] = true,
            ev => unreachable!("{ev:?}"),
        }
    }
    assert_eq!(
        threads,
        [true, true],
        "every thread's handler got the message"
    );
    for c in &mut clients {
        assert_eq!(
            c.line(),
            "{\"method\":\"mining.notify\",\"params\":[\"job1\"]}"
        );
    }
    // Messages to one thread reach only that thread.
    srv.connector().send(1, Msg::Broadcast(notify));
    assert!(matches!(
        srv.wait_for("on_msg", |ev| matches!(ev, Event::Msg { .. })),
        Event::Msg { thread: 1 }
    ));
}

fn thousand_connections_on_two_threads(backend: BackendKind) {
    const CLIENTS: usize = 1000;
    // Each connection costs two descriptors here (client and server side).
    let limit = ckpool_connector::raise_nofile_limit().unwrap();
    assert!(
        limit >= 2 * CLIENTS as u64 + 100,
        "RLIMIT_NOFILE hard limit {limit} too low for this test"
    );
    let started = Instant::now();
    let srv = server(backend, 2, |_| {});
    let mut clients: Vec<Client> = (0..CLIENTS).map(|_| Client::connect(srv.addr())).collect();
    let mut per_thread = [0usize; 2];
    for c in &clients {
        per_thread[srv.opened(c).1] += 1;
    }
    assert!(
        per_thread.iter().all(|&n| n > 0),
        "SO_REUSEPORT spreads connections: {per_thread:?}"
    );
    for (i, c) in clients.iter_mut().enumerate() {
        c.send(format!("ping {i}\n").as_bytes());
    }
    for (i, c) in clients.iter_mut().enumerate() {
        assert_eq!(c.line(), format!("ping {i}"));
    }
    for c in clients.iter_mut().step_by(97) {
        c.send(b"thread\n");
        assert!(c.line().starts_with("thread "));
    }
    assert!(started.elapsed() < Duration::from_secs(60));
}

fn handler_close_flushes_then_closes(backend: BackendKind) {
    let srv = server(backend, 1, |_| {});
    let mut c = Client::connect(srv.addr());
    let (id, _) = srv.opened(&c);
    c.send(b"first\nclose\nignored after close\n");
    assert_eq!(c.line(), "first");
    assert_eq!(c.line(), "bye");
    assert_eq!(
        c.until_closed(),
        b"",
        "nothing is sent after the close request"
    );
    assert_eq!(srv.closed(id).0, CloseReason::Handler);
}

fn bulk_output_arrives_complete_and_in_order(backend: BackendKind) {
    let srv = server(backend, 1, |cfg| cfg.max_outbound = 64 * 1024 * 1024);
    let mut c = Client::connect_slow(srv.addr());
    c.send(b"bulk\n");
    for i in 0..BULK_LINES {
        assert_eq!(c.line(), format!("line {i} {BULK_PAD}"));
        if i % 1000 == 999 {
            assert_eq!(c.line(), "shared marker");
        }
    }
    // The connection is still usable afterwards.
    c.send(b"done\n");
    assert_eq!(c.line(), "done");
}

fn stale_ids_are_ignored(backend: BackendKind) {
    let srv = server(backend, 1, |_| {});
    let old = Client::connect(srv.addr());
    let (old_id, _) = srv.opened(&old);
    drop(old);
    assert_eq!(srv.closed(old_id).0, CloseReason::Peer);

    // The next connection reuses the slot with a new generation.
    let mut new = Client::connect(srv.addr());
    let (new_id, _) = srv.opened(&new);
    assert_eq!(new_id.slot(), old_id.slot());
    assert_ne!(new_id, old_id);
    srv.connector()
        .send(0, Msg::SendTo(old_id, b"stale\n".to_vec()));
    srv.connector().send(
        0,
        Msg::SendTo(ConnId::new(0, 0, 4242), b"nobody\n".to_vec()),
    );
    srv.connector()
        .send(0, Msg::SendTo(new_id, b"fresh\n".to_vec()));
    assert_eq!(new.line(), "fresh");
}

fn two_listeners_on_port_zero(backend: BackendKind) {
    let srv = server(backend, 2, |cfg| {
        cfg.listen = vec![
            "127.0.0.1:0".parse().unwrap(),
            "127.0.0.1:0".parse().unwrap(),
        ];
    });
    let addrs = srv.connector().local_addrs();
    assert_eq!(addrs.len(), 2);
    assert!(addrs.iter().all(|a| a.port() != 0));
    assert_ne!(addrs[0], addrs[1]);
    for (i, &addr) in addrs.iter().enumerate() {
        let mut c = Client::connect(addr);
        let local = c.stream.local_addr().unwrap();
        match srv.wait_for(
            "on_open",
            |ev| matches!(ev, Event::Opened { peer, .. } if *peer == local),
        ) {
            Event::Opened { listener, .. } => assert_eq!(listener, i),
            ev => unreachable!("{ev:?}"),
        }
        c.send(b"hi\n");
        assert_eq!(c.line(), "hi");
    }
}

fn ipv6_peer_addresses(backend: BackendKind) {
    if std::net::TcpListener::bind("[::1]:0").is_err() {
        eprintln!("skipped: no IPv6 loopback here");
        return;
    }
    let srv = server(backend, 1, |cfg| {
        cfg.listen = vec!["[::1]:0".parse().unwrap()]
    });
    assert!(srv.addr().is_ipv6());
    let mut c = Client::connect(srv.addr());
    // `opened` matches the address the server reports with the client's own.
    srv.opened(&c);
    c.send(b"six\n");
    assert_eq!(c.line(), "six");
}

fn shutdown_closes_and_joins(backend: BackendKind) {
    let mut srv = server(backend, 2, |_| {});
    let addr = srv.addr();
    let mut clients: Vec<Client> = (0..6).map(|_| Client::connect(addr)).collect();
    let ids: Vec<ConnId> = clients.iter().map(|c| srv.opened(c).0).collect();

    let connector = srv.connector.take().unwrap();
    let (done_tx, done_rx) = crossbeam_channel::bounded(1);
    let joiner = std::thread::spawn(move || {
        connector.shutdown();
        done_tx.send(()).unwrap();
    });
    done_rx
        .recv_timeout(WAIT)
        .expect("shutdown did not join in time");
    joiner.join().unwrap();

    for id in ids {
        assert_eq!(srv.closed(id).0, CloseReason::Shutdown);
    }
    for c in &mut clients {
        assert_eq!(c.until_closed(), b"");
    }
    // The listeners are closed too.
    let err = TcpStream::connect_timeout(&addr, WAIT).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::ConnectionRefused);
}

fn batch_end_sends_what_the_round_collected(backend: BackendKind) {
    let srv = server(backend, 1, |_| {});
    let mut c = Client::connect(srv.addr());
    // Held in `on_line`, sent from `on_batch_end`, in order.
    c.send(b"later one\nlater two\n");
    assert_eq!(c.line(), "later one");
    assert_eq!(c.line(), "later two");
    // One small write on loopback arrives in one read, so both lines are handled in one round;
    // `on_batch_end` runs after that round's `on_line` calls, so the echo is queued first.
    c.send(b"later three\nnow\n");
    assert_eq!(c.line(), "now");
    assert_eq!(c.line(), "later three");
}
