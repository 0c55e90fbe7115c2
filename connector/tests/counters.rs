#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code"
)]
//! Per-thread counters ([`Connector::counters`]), once per backend: opens, accepts, refusals
//! (`max_conns`), closes by reason and slow rounds, read from the test thread while the
//! connector runs and after it shut down.
//!
//! Every wait is bounded: socket reads have a timeout and counters are polled until a deadline.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use ckpool_connector::{BackendKind, CloseReason, Config, ConnId, Handler, Outbox, ThreadCounters};

const WAIT: Duration = Duration::from_secs(20);

#[test]
fn epoll() {
    counters_follow_connections(BackendKind::Epoll);
}

#[test]
fn uring() {
    if let Err(reason) = ckpool_connector::probe_uring() {
        eprintln!("skipped: io_uring is not available: {reason}");
        return;
    }
    counters_follow_connections(BackendKind::Uring);
}

/// Echoes lines; `close` closes, `slow` keeps the thread busy for 30 ms (one slow round).
struct Echo;

impl Handler for Echo {
    type Msg = ();

    fn on_open(&mut self, _: Instant, _: ConnId, _: SocketAddr, _: usize, _: &mut Outbox) {}

    fn on_line(&mut self, _: Instant, conn: ConnId, line: &[u8], out: &mut Outbox) {
        match line {
            b"close" => out.close(conn),
            b"slow" => {
                // A deliberately slow callback: the round must take 20 ms or more.
                let start = Instant::now();
                while start.elapsed() < Duration::from_millis(30) {
                    std::hint::spin_loop();
                }
                out.send(conn, b"slow\n".to_vec());
            }
            _ => {
                let mut reply = line.to_vec();
                reply.push(b'\n');
                out.send(conn, reply);
            }
        }
    }

    fn on_close(&mut self, _: Instant, _: ConnId, _: CloseReason) {}

    fn on_msg(&mut self, _: Instant, (): (), _: &mut Outbox) {}

    fn on_tick(&mut self, _: Instant, _: &mut Outbox) {}
}

fn sum(per_thread: &[ThreadCounters]) -> ThreadCounters {
    let mut t = ThreadCounters::default();
    for c in per_thread {
        t.open += c.open;
        t.accepted += c.accepted;
        t.refused += c.refused;
        t.adopted += c.adopted;
        t.exported += c.exported;
        t.slow_rounds += c.slow_rounds;
        t.closed.peer += c.closed.peer;
        t.closed.error += c.closed.error;
        t.closed.line_too_long += c.closed.line_too_long;
        t.closed.outbound += c.closed.outbound;
        t.closed.handler += c.closed.handler;
        t.closed.shutdown += c.closed.shutdown;
    }
    t
}

/// Polls `read` until `pred` holds; panics with the last value at the deadline.
fn wait_counters(
    what: &str,
    read: impl Fn() -> Vec<ThreadCounters>,
    pred: impl Fn(&ThreadCounters) -> bool,
) -> ThreadCounters {
    let deadline = Instant::now() + WAIT;
    loop {
        let now = sum(&read());
        if pred(&now) {
            return now;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}: {now:?}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn connect(addr: SocketAddr) -> (TcpStream, BufReader<TcpStream>) {
    let stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(WAIT)).unwrap();
    let reader = BufReader::new(stream.try_clone().unwrap());
    (stream, reader)
}

fn echo(stream: &mut TcpStream, reader: &mut BufReader<TcpStream>, line: &str) {
    stream.write_all(format!("{line}\n").as_bytes()).unwrap();
    let mut got = String::new();
    reader.read_line(&mut got).unwrap();
    assert_eq!(got, format!("{line}\n"));
}

/// Reads until the server closes; fails on a timeout.
fn expect_eof(reader: &mut BufReader<TcpStream>) {
    let mut rest = Vec::new();
    match reader.read_to_end(&mut rest) {
        Ok(_) => {}
        Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}"),
    }
}

fn counters_follow_connections(backend: BackendKind) {
    let cfg = Config {
        listen: vec!["127.0.0.1:0".parse().unwrap()],
        threads: 2,
        backend,
        max_line: 64,
        max_conns: Some(3),
        tick: Duration::from_millis(50),
        pin: false,
        ..Config::default()
    };
    let connector = ckpool_connector::start(cfg, |_| Echo).unwrap();
    let handle = connector.handle();
    let addr = connector.local_addrs()[0];
    assert_eq!(connector.counters().len(), 2, "one entry per thread");
    assert_eq!(sum(&connector.counters()), ThreadCounters::default());

    // Three connections, each answered: open and accepted.
    let mut clients: Vec<_> = (0..3).map(|_| connect(addr)).collect();
    for (i, (s, r)) in clients.iter_mut().enumerate() {
        echo(s, r, &format!("hello {i}"));
    }
    let c = sum(&connector.counters());
    assert_eq!((c.open, c.accepted, c.refused), (3, 3, 0), "{c:?}");
    assert_eq!(c.closed.total(), 0);

    // A fourth is over `max_conns`: accepted, refused, never open.
    let (_s4, mut r4) = connect(addr);
    expect_eof(&mut r4);
    let c = wait_counters("the refusal", || connector.counters(), |c| c.refused == 1);
    assert_eq!((c.open, c.accepted), (3, 4), "{c:?}");

    // Closed by the peer, by the handler, and for a line too long.
    let (s0, _) = clients.remove(0);
    drop(s0);
    let c = wait_counters(
        "the peer's close",
        || connector.counters(),
        |c| c.closed.peer == 1,
    );
    assert_eq!(c.open, 2, "{c:?}");
    let (mut s1, mut r1) = clients.remove(0);
    s1.write_all(b"close\n").unwrap();
    expect_eof(&mut r1);
    let c = wait_counters(
        "the handler's close",
        || connector.counters(),
        |c| c.closed.handler == 1,
    );
    assert_eq!(c.open, 1, "{c:?}");
    let (mut s2, mut r2) = connect(addr);
    s2.write_all(&[b'x'; 100]).unwrap();
    expect_eof(&mut r2);
    let c = wait_counters(
        "the long line's close",
        || connector.counters(),
        |c| c.closed.line_too_long == 1,
    );
    assert_eq!((c.open, c.accepted, c.refused), (1, 5, 1), "{c:?}");

    // A slow round.
    let (s, r) = &mut clients[0];
    s.write_all(b"slow\n").unwrap();
    let mut got = String::new();
    r.read_line(&mut got).unwrap();
    assert_eq!(got, "slow\n");
    let c = wait_counters(
        "the slow round",
        || connector.counters(),
        |c| c.slow_rounds >= 1,
    );
    assert_eq!(
        c.closed.error + c.closed.outbound + c.closed.shutdown,
        0,
        "{c:?}"
    );

    // The last one is closed by the shutdown; the handle still reads the counters.
    connector.shutdown();
    let c = sum(&handle.counters());
    assert_eq!(c.closed.shutdown, 1, "{c:?}");
    assert_eq!(c.open, 0, "{c:?}");
    assert_eq!(c.closed.total(), 4, "{c:?}");
    assert_eq!((c.adopted, c.exported), (0, 0));
}
