#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code"
)]
//! What a zero-disconnect upgrade needs from the connector, once per backend: inherited
//! listeners, quiesce (and resume), and connections exported from one connector and adopted by
//! another in the same process, with their partial lines and unsent bytes.
//!
//! Every wait is bounded: socket reads have a timeout and handler events are awaited with a
//! deadline.

use std::io::{BufRead, BufReader, ErrorKind, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use ckpool_connector::{
    BackendKind, CloseReason, Config, ConnId, ConnState, Connector, Handler, InheritedListener,
    Outbox,
};
use crossbeam_channel::{Receiver, Sender};

/// Upper bound for any single wait in these tests.
const WAIT: Duration = Duration::from_secs(20);
/// Lines queued in reply to `flood` (about 10 MB: more than the socket buffers take).
const FLOOD_LINES: usize = 100_000;

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

backend_tests!(
    inherited_listener_is_served_by_every_thread,
    quiesce_stops_reading_and_accepting_until_resumed,
    a_paused_connection_is_read_again_after_a_resume,
    exported_connections_live_on_in_another_connector,
);

/// Whether io_uring tests can run (see `tests/loopback.rs`).
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

// ---------------------------------------------------------------------------------------------
// Test handler

#[derive(Debug)]
enum Event {
    Opened {
        conn: ConnId,
        peer: SocketAddr,
        listener: usize,
        thread: usize,
    },
    Line {
        line: Vec<u8>,
    },
    Closed {
        conn: ConnId,
    },
    Exported {
        conn: ConnId,
    },
    Adopted {
        conn: ConnId,
        peer: SocketAddr,
        listener: usize,
        state: Vec<u8>,
    },
}

/// Replies `<name>:<line>` to each line; `flood` queues [`FLOOD_LINES`] numbered lines. Exports
/// carry `session <peer port>` as the handler's state.
struct Tagged {
    name: &'static str,
    thread: usize,
    events: Sender<Event>,
    /// Event loop rounds of all the connector's threads.
    rounds: Arc<AtomicU64>,
}

impl Handler for Tagged {
    type Msg = ();

    fn on_open(
        &mut self,
        _: Instant,
        conn: ConnId,
        peer: SocketAddr,
        listener: usize,
        _: &mut Outbox,
    ) {
        let _ = self.events.send(Event::Opened {
            conn,
            peer,
            listener,
            thread: self.thread,
        });
    }

    fn on_line(&mut self, _: Instant, conn: ConnId, line: &[u8], out: &mut Outbox) {
        if line == b"flood" {
            for i in 0..FLOOD_LINES {
                out.send(conn, flood_line(self.name, i));
            }
        } else {
            let mut reply = format!("{}:", self.name).into_bytes();
            reply.extend_from_slice(line);
            reply.push(b'\n');
            out.send(conn, reply);
        }
        let _ = self.events.send(Event::Line {
            line: line.to_vec(),
        });
    }

    fn on_close(&mut self, _: Instant, conn: ConnId, _: CloseReason) {
        let _ = self.events.send(Event::Closed { conn });
    }

    fn on_msg(&mut self, _: Instant, (): (), _: &mut Outbox) {}

    fn on_tick(&mut self, _: Instant, _: &mut Outbox) {}

    fn on_batch_end(&mut self, _: Instant, _: &mut Outbox) {
        self.rounds.fetch_add(1, Ordering::Relaxed);
    }

    fn on_export(&mut self, _: Instant, conn: ConnId, state: &mut Vec<u8>) {
        state.extend_from_slice(format!("session of {conn}").as_bytes());
        let _ = self.events.send(Event::Exported { conn });
    }

    fn on_adopt(
        &mut self,
        _: Instant,
        conn: ConnId,
        peer: SocketAddr,
        listener: usize,
        state: &[u8],
        out: &mut Outbox,
    ) {
        out.send(conn, format!("{}:welcome\n", self.name));
        let _ = self.events.send(Event::Adopted {
            conn,
            peer,
            listener,
            state: state.to_vec(),
        });
    }
}

struct Server {
    connector: Connector<()>,
    events: Receiver<Event>,
    backlog: Vec<Event>,
    rounds: Arc<AtomicU64>,
}

fn server(
    name: &'static str,
    backend: BackendKind,
    threads: usize,
    tweak: impl FnOnce(&mut Config),
) -> Server {
    let mut cfg = Config {
        listen: vec!["127.0.0.1:0".parse().unwrap()],
        threads,
        backend,
        tick: Duration::from_millis(50),
        max_outbound: 64 << 20,
        pin: false,
        ..Config::default()
    };
    tweak(&mut cfg);
    let (tx, events) = crossbeam_channel::unbounded();
    let rounds = Arc::new(AtomicU64::new(0));
    let counted = Arc::clone(&rounds);
    let connector = ckpool_connector::start(cfg, move |thread| Tagged {
        name,
        thread,
        events: tx.clone(),
        rounds: Arc::clone(&counted),
    })
    .unwrap();
    assert_eq!(connector.backend(), backend);
    Server {
        connector,
        events,
        backlog: Vec::new(),
        rounds,
    }
}

impl Server {
    /// Waits for (and removes) the first event matching `pred`.
    fn wait_for(&mut self, what: &str, mut pred: impl FnMut(&Event) -> bool) -> Event {
        if let Some(i) = self.backlog.iter().position(&mut pred) {
            return self.backlog.remove(i);
        }
        let deadline = Instant::now() + WAIT;
        loop {
            match self.events.recv_deadline(deadline) {
                Ok(ev) if pred(&ev) => return ev,
                Ok(ev) => self.backlog.push(ev),
                Err(_) => panic!("timed out waiting for {what}; seen {:?}", self.backlog),
            }
        }
    }

    /// Waits for the server side of `client` to open; returns its id, listener and thread.
    fn opened(&mut self, client: &TcpStream) -> (ConnId, usize, usize) {
        let local = client.local_addr().unwrap();
        match self.wait_for(
            "on_open",
            |ev| matches!(ev, Event::Opened { peer, .. } if *peer == local),
        ) {
            Event::Opened {
                conn,
                listener,
                thread,
                ..
            } => (conn, listener, thread),
            ev => unreachable!("{ev:?}"),
        }
    }

    /// Whether any event matching `pred` was received (without waiting).
    fn saw(&mut self, mut pred: impl FnMut(&Event) -> bool) -> bool {
        self.backlog.extend(self.events.try_iter());
        self.backlog.iter().any(&mut pred)
    }
}

fn connect(addr: SocketAddr) -> (TcpStream, BufReader<TcpStream>) {
    let stream = TcpStream::connect_timeout(&addr, WAIT).unwrap();
    stream.set_read_timeout(Some(WAIT)).unwrap();
    stream.set_write_timeout(Some(WAIT)).unwrap();
    let reader = BufReader::new(stream.try_clone().unwrap());
    (stream, reader)
}

fn read_line(reader: &mut BufReader<TcpStream>) -> String {
    let mut line = String::new();
    let n = reader.read_line(&mut line).unwrap();
    assert!(n > 0, "the connection was closed");
    line
}

fn ask(stream: &mut TcpStream, reader: &mut BufReader<TcpStream>, line: &str) -> String {
    stream.write_all(format!("{line}\n").as_bytes()).unwrap();
    read_line(reader)
}

// ---------------------------------------------------------------------------------------------
// Tests

fn inherited_listener_is_served_by_every_thread(backend: BackendKind) {
    // A listener bound here, without SO_REUSEPORT: binding its address again would fail, and the
    // connector must not try.
    let inherited = TcpListener::bind("127.0.0.1:0").unwrap();
    let inherited_addr = inherited.local_addr().unwrap();
    let mut s = server("A", backend, 2, |cfg| {
        cfg.inherited = vec![InheritedListener::from(inherited)];
    });
    let addrs = s.connector.local_addrs();
    assert_eq!(addrs.len(), 2);
    assert_eq!(
        addrs[1], inherited_addr,
        "inherited listeners follow `listen`"
    );

    // Connections to the inherited socket are served (listener index 1), by both threads
    // (epoll wakes every thread and the first to accept wins; io_uring's accepts wait
    // exclusively, so each thread arms one accept at a time and they take turns).
    // On an idle machine one epoll thread can win every race for a while: connect in bursts
    // (the other thread wakes while the first is busy) until both have accepted, within bounds.
    let mut threads = [0; 2];
    let mut clients = Vec::new();
    let mut i = 0;
    let end = Instant::now() + WAIT;
    while (i < 20 || threads.contains(&0)) && i < 400 && Instant::now() < end {
        let burst: Vec<_> = (0..8).map(|_| connect(inherited_addr)).collect();
        for (mut stream, mut reader) in burst {
            assert_eq!(
                ask(&mut stream, &mut reader, &format!("hi {i}")),
                format!("A:hi {i}\n")
            );
            let (_, listener, thread) = s.opened(&stream);
            assert_eq!(listener, 1);
            threads[thread] += 1;
            clients.push((stream, reader));
            i += 1;
        }
    }
    assert!(
        threads.iter().all(|&n| n > 0),
        "every thread accepts on the inherited socket: {threads:?} of {i} connections"
    );
    // The bound listener still works alongside.
    let (mut stream, mut reader) = connect(addrs[0]);
    assert_eq!(ask(&mut stream, &mut reader, "bound"), "A:bound\n");
    assert_eq!(s.opened(&stream).1, 0);

    // The listeners can be handed on: a second connector serves a descriptor of them too.
    let fds = s.connector.listeners().unwrap();
    assert_eq!(fds.len(), 2);
    let mut b = server("B", backend, 1, |cfg| {
        cfg.listen = Vec::new();
        cfg.inherited = fds.into_iter().map(InheritedListener::from).collect();
    });
    assert_eq!(b.connector.local_addrs(), addrs);
    // A stops accepting, so B takes the next connections (both listen on the same sockets).
    s.connector.quiesce(Instant::now() + WAIT);
    let (mut stream, mut reader) = connect(inherited_addr);
    assert_eq!(ask(&mut stream, &mut reader, "to b"), "B:to b\n");
    assert_eq!(b.opened(&stream).1, 1);

    // Something that is not a listening TCP socket is refused.
    let connected = {
        let (stream, _) = connect(addrs[0]);
        OwnedFd::from(stream)
    };
    let udp = OwnedFd::from(std::net::UdpSocket::bind("127.0.0.1:0").unwrap());
    for bad in [connected, udp] {
        let cfg = Config {
            listen: Vec::new(),
            inherited: vec![InheritedListener::from(bad)],
            backend,
            threads: 1,
            pin: false,
            ..Config::default()
        };
        let err = ckpool_connector::start(cfg, |_| Tagged {
            name: "X",
            thread: 0,
            events: crossbeam_channel::unbounded().0,
            rounds: Arc::default(),
        })
        .err()
        .expect("not a listener");
        assert_eq!(err.kind(), ErrorKind::InvalidInput, "{err}");
    }
}

/// Line `i` of a `flood` from `name`.
fn flood_line(name: &str, i: usize) -> String {
    format!("{name} flood {i:08} {}\n", ".".repeat(64))
}

/// Bytes of a whole `flood` from `name`.
fn flood_bytes(name: &str) -> u64 {
    (FLOOD_LINES * flood_line(name, 0).len()) as u64
}

/// Reads the [`FLOOD_LINES`] lines of a `flood` from `name`, checking their order.
fn read_flood(reader: &mut BufReader<TcpStream>, name: &str) {
    for i in 0..FLOOD_LINES {
        assert_eq!(read_line(reader), flood_line(name, i), "line {i}");
    }
}

/// A client with a small receive buffer, so that a flood mostly stays queued in the server.
fn connect_small(addr: SocketAddr) -> (TcpStream, BufReader<TcpStream>) {
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    sock.connect_timeout(&addr.into(), WAIT).unwrap();
    let stream = TcpStream::from(sock);
    stream.set_read_timeout(Some(WAIT)).unwrap();
    stream.set_write_timeout(Some(WAIT)).unwrap();
    let reader = BufReader::new(stream.try_clone().unwrap());
    (stream, reader)
}

/// Asserts that no event matching `pred` arrives for `quiet` (the check of something that must
/// not happen).
fn assert_quiet(s: &mut Server, quiet: Duration, what: &str, mut pred: impl FnMut(&Event) -> bool) {
    let until = Instant::now() + quiet;
    while Instant::now() < until {
        assert!(!s.saw(&mut pred), "{what}");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(!s.saw(&mut pred), "{what}");
}

fn quiesce_stops_reading_and_accepting_until_resumed(backend: BackendKind) {
    let mut s = server("A", backend, 2, |_| {});
    let addr = s.connector.local_addrs()[0];
    let (mut reader_stream, mut reader) = connect(addr);
    assert_eq!(ask(&mut reader_stream, &mut reader, "one"), "A:one\n");
    let (reset, _) = connect(addr);
    let (reset_id, _, _) = s.opened(&reset);
    // A client that does not read: its flood cannot be written by the deadline.
    let (mut stuck, mut stuck_reader) = connect_small(addr);
    stuck.write_all(b"flood\n").unwrap();
    s.wait_for(
        "the flood",
        |ev| matches!(ev, Event::Line { line, .. } if line == b"flood"),
    );
    let (stuck_id, _, stuck_thread) = s.opened(&stuck);

    let started = Instant::now();
    let reports = s.connector.quiesce(started + Duration::from_millis(300));
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "waited for the deadline"
    );
    assert!(started.elapsed() < WAIT);
    assert_eq!(reports.len(), 2, "one report per thread");
    assert_eq!(reports.iter().map(|r| r.connections).sum::<usize>(), 3);
    for (t, r) in reports.iter().enumerate() {
        if t != stuck_thread {
            assert!(r.flushed && r.unsent == 0, "{reports:?}");
        }
    }
    let stuck_report = reports[stuck_thread];
    assert!(!stuck_report.flushed, "{reports:?}");
    assert!(stuck_report.unsent > 0, "{reports:?}");
    assert!(
        stuck_report.unsent < flood_bytes("A"),
        "part of it was written: {reports:?}"
    );

    // A peer that resets its connection while nobody reads it costs nothing (epoll reports a
    // reset whatever the interest: a connection left in the set would be reported on every
    // wait, and the thread would spin).
    let rounds_before = s.rounds.load(Ordering::Relaxed);
    socket2::SockRef::from(&reset)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop(reset);
    let idle_from = Instant::now();
    while idle_from.elapsed() < Duration::from_millis(400) {
        std::thread::sleep(Duration::from_millis(50));
    }
    // Two threads ticking every 50 ms: about 16 rounds (a spinning thread makes thousands).
    let rounds = s.rounds.load(Ordering::Relaxed) - rounds_before;
    assert!(
        rounds < 100,
        "quiesced threads busy: {rounds} loop rounds in 400 ms"
    );

    // Reading and accepting have stopped: a line and a new connection wait.
    reader_stream.write_all(b"during\n").unwrap();
    let (mut late, mut late_reader) = connect(addr);
    late.write_all(b"late\n").unwrap();
    let late_addr = late.local_addr().unwrap();
    assert_quiet(
        &mut s,
        Duration::from_millis(300),
        "nothing is read or accepted while quiesced",
        |ev| match ev {
            Event::Line { line, .. } => line == b"during",
            Event::Opened { peer, .. } => *peer == late_addr,
            _ => false,
        },
    );
    // A second quiesce writes again until its deadline, and stops at it.
    let again = s
        .connector
        .quiesce(Instant::now() + Duration::from_millis(100));
    assert!(!again[stuck_thread].flushed);
    assert!(again[stuck_thread].unsent > 0);
    assert!(again[stuck_thread].unsent <= stuck_report.unsent);

    // Resumed: everything goes on where it stopped, nobody was disconnected.
    s.connector.resume();
    assert_eq!(read_line(&mut reader), "A:during\n");
    assert_eq!(read_line(&mut late_reader), "A:late\n");
    read_flood(&mut stuck_reader, "A");
    assert_eq!(ask(&mut stuck, &mut stuck_reader, "done"), "A:done\n");
    assert!(!s.saw(|ev| matches!(ev, Event::Closed { conn, .. } if *conn == stuck_id)));
    // The reset connection is closed once read again.
    s.wait_for(
        "the reset's close",
        |ev| matches!(ev, Event::Closed { conn } if *conn == reset_id),
    );
    let c = s.connector.counters();
    assert_eq!(c.iter().map(|c| c.open).sum::<u64>(), 3);
    assert_eq!(c.iter().map(|c| c.closed.total()).sum::<u64>(), 1);
}

/// A connection whose reads were paused for back-pressure (its peer reads nothing) when a
/// quiesce came is read again once it drains after the resume, also when it is its thread's only
/// connection. io_uring kept a thread's reads stopped after a resume until some connection was
/// armed anew, so such a connection was never read again (CI saw the quiesce test's flooded
/// client go unanswered when it had a thread to itself).
fn a_paused_connection_is_read_again_after_a_resume(backend: BackendKind) {
    let mut s = server("A", backend, 1, |_| {});
    let addr = s.connector.local_addrs()[0];
    let (mut stuck, mut stuck_reader) = connect_small(addr);
    stuck.write_all(b"flood\n").unwrap();
    s.wait_for(
        "the flood",
        |ev| matches!(ev, Event::Line { line, .. } if line == b"flood"),
    );
    let paused = || s.connector.counters().iter().map(|c| c.paused).sum::<u64>();
    let deadline = Instant::now() + WAIT;
    while paused() != 1 {
        assert!(
            Instant::now() < deadline,
            "the flooded connection was not paused"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let reports = s
        .connector
        .quiesce(Instant::now() + Duration::from_millis(200));
    assert!(!reports[0].flushed, "{reports:?}");
    s.connector.resume();
    read_flood(&mut stuck_reader, "A");
    assert_eq!(ask(&mut stuck, &mut stuck_reader, "done"), "A:done\n");
}

fn exported_connections_live_on_in_another_connector(backend: BackendKind) {
    hand_over(backend, backend);
}

/// From one backend to the other (an upgrade may switch), both ways.
#[test]
fn connections_move_between_backends() {
    if uring_available() {
        hand_over(BackendKind::Epoll, BackendKind::Uring);
        hand_over(BackendKind::Uring, BackendKind::Epoll);
    }
}

/// Connections with a partial line, unsent bytes or nothing pending move from a connector on
/// `from` to one on `to`.
fn hand_over(from: BackendKind, to: BackendKind) {
    let mut a = server("A", from, 2, |_| {});
    let mut b = server("B", to, 2, |_| {});
    let addr = a.connector.local_addrs()[0];

    // A line answered, then the start of another one.
    let (mut partial, mut partial_reader) = connect(addr);
    partial.write_all(b"first\nhel").unwrap();
    assert_eq!(read_line(&mut partial_reader), "A:first\n");
    let (partial_id, _, _) = a.opened(&partial);
    // A client that does not read: most of its flood is still queued when A stops.
    let (mut stuck, mut stuck_reader) = connect_small(addr);
    stuck.write_all(b"flood\n").unwrap();
    a.wait_for(
        "the flood",
        |ev| matches!(ev, Event::Line { line, .. } if line == b"flood"),
    );
    let (stuck_id, _, _) = a.opened(&stuck);
    // An idle one.
    let (mut idle, mut idle_reader) = connect(addr);
    assert_eq!(ask(&mut idle, &mut idle_reader, "x"), "A:x\n");
    let (idle_id, _, _) = a.opened(&idle);

    // Export requires a quiesce.
    let err = a.connector.export(10).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidInput, "{err}");
    let reports = a
        .connector
        .quiesce(Instant::now() + Duration::from_millis(300));
    let unsent: u64 = reports.iter().map(|r| r.unsent).sum();
    assert!(unsent > 0, "{reports:?}");

    // In batches of two, each adopted by B before the next is asked for.
    let mut states = Vec::new();
    let mut adopted = Vec::new();
    for round in 0.. {
        let batch = a.connector.export(2).unwrap();
        assert!(batch.len() <= 2);
        if batch.is_empty() {
            break;
        }
        let conns: Vec<(OwnedFd, ConnState)> = batch
            .into_iter()
            .map(|e| {
                states.push((e.conn, e.state.clone()));
                // Through the wire format, as a handover between processes sends it.
                let mut wire = Vec::new();
                e.state.encode(&mut wire);
                let (state, used) = ConnState::decode(&wire).unwrap();
                assert_eq!((&state, used), (&e.state, wire.len()));
                (e.fd, state)
            })
            .collect();
        for id in b.connector.adopt(round, conns) {
            adopted.push(id.unwrap());
        }
    }
    assert_eq!(states.len(), 3);
    assert_eq!(adopted.len(), 3);
    let state_of = |id: ConnId| {
        states
            .iter()
            .find(|(c, _)| *c == id)
            .map(|(_, s)| s)
            .unwrap()
    };
    let st = state_of(partial_id);
    assert_eq!(st.partial, b"hel", "the unterminated line travels");
    assert!(st.unsent.is_empty());
    assert_eq!(st.peer, partial.local_addr().unwrap());
    assert_eq!(st.listener, 0);
    assert_eq!(st.user, format!("session of {partial_id}").into_bytes());
    let st = state_of(stuck_id);
    assert_eq!(
        st.unsent.len() as u64,
        unsent,
        "the bytes not written travel"
    );
    assert!(st.unsent.len() as u64 <= flood_bytes("A"));
    assert!(
        st.unsent
            .ends_with(flood_line("A", FLOOD_LINES - 1).as_bytes())
    );
    assert!(state_of(idle_id).partial.is_empty() && state_of(idle_id).unsent.is_empty());

    // A let go of them without closing anything.
    for id in [partial_id, stuck_id, idle_id] {
        a.wait_for(
            "on_export",
            |ev| matches!(ev, Event::Exported { conn } if *conn == id),
        );
    }
    assert!(!a.saw(|ev| matches!(ev, Event::Closed { .. })));
    let c = a.connector.counters();
    assert_eq!(c.iter().map(|c| c.exported).sum::<u64>(), 3);
    assert_eq!(c.iter().map(|c| c.open).sum::<u64>(), 0);
    drop(a);

    // B adopted them with the state A's handler left.
    for (old, st) in &states {
        let want = format!("session of {old}").into_bytes();
        a_adopted(&mut b, st.peer, &want);
    }
    let c = b.connector.counters();
    assert_eq!(c.iter().map(|c| c.adopted).sum::<u64>(), 3);
    assert_eq!(c.iter().map(|c| c.open).sum::<u64>(), 3);

    // The partial line is completed and answered by B (after B's welcome).
    partial.write_all(b"lo\n").unwrap();
    assert_eq!(read_line(&mut partial_reader), "B:welcome\n");
    assert_eq!(read_line(&mut partial_reader), "B:hello\n");
    // The flood arrives whole and in order, then what B sent.
    read_flood(&mut stuck_reader, "A");
    assert_eq!(read_line(&mut stuck_reader), "B:welcome\n");
    assert_eq!(ask(&mut stuck, &mut stuck_reader, "after"), "B:after\n");
    assert_eq!(read_line(&mut idle_reader), "B:welcome\n");
    assert_eq!(ask(&mut idle, &mut idle_reader, "y"), "B:y\n");
    assert!(!b.saw(|ev| matches!(ev, Event::Closed { .. })));
    let c = b.connector.counters();
    assert_eq!(c.iter().map(|c| c.closed.total()).sum::<u64>(), 0);
}

/// Waits for `b` to report an adopted connection from `peer` with `state`.
fn a_adopted(b: &mut Server, peer: SocketAddr, state: &[u8]) {
    match b.wait_for(
        "on_adopt",
        |ev| matches!(ev, Event::Adopted { peer: p, .. } if *p == peer),
    ) {
        Event::Adopted {
            conn,
            listener,
            state: got,
            ..
        } => {
            assert_eq!(got, state);
            assert_eq!(listener, 0);
            assert!(usize::from(conn.thread()) < 2);
        }
        ev => unreachable!("{ev:?}"),
    }
}
