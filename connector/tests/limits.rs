#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code"
)]
//! Resource limits: running out of descriptors on accept (EMFILE), a full io_uring table of direct
//! descriptors, and the bounded wait of a handler-requested close. The scenarios that watch the
//! process's CPU time or exhaust its descriptors run in a child process (started with a low
//! `ulimit -n` where needed), so they cannot disturb other tests.

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::FileExt;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ckpool_connector::{BackendKind, CloseReason, Config, ConnId, Handler, Outbox};
use crossbeam_channel::{Receiver, Sender};

const WAIT: Duration = Duration::from_secs(20);
/// Set in the child processes that run the scenarios below.
const CHILD_ENV: &str = "CKPOOL_CONNECTOR_EMFILE_CHILD";

macro_rules! backend_tests {
    ($($name:ident),* $(,)?) => {
        $(
            mod $name {
                #[test]
                fn epoll() {
                    super::$name(ckpool_connector::BackendKind::Epoll, "epoll");
                }

                #[test]
                fn uring() {
                    if super::uring_available() {
                        super::$name(ckpool_connector::BackendKind::Uring, "uring");
                    }
                }
            }
        )*
    };
}

backend_tests!(
    emfile_pauses_accepts_without_spinning,
    handler_close_is_bounded_in_time,
    max_conns_closes_the_excess_and_serves_again_after_a_close
);

/// The child half of `emfile_pauses_accepts_without_spinning`; ignored unless run by it.
mod emfile_child {
    #[test]
    #[ignore = "run by emfile_pauses_accepts_without_spinning in a process with a low fd limit"]
    fn epoll() {
        super::emfile_scenario(ckpool_connector::BackendKind::Epoll);
    }

    #[test]
    #[ignore = "run by emfile_pauses_accepts_without_spinning in a process with a low fd limit"]
    fn uring() {
        super::emfile_scenario(ckpool_connector::BackendKind::Uring);
    }
}

/// The child half of `uring_full_table_pauses_accepts_without_spinning`.
mod table_full_child {
    #[test]
    #[ignore = "run by uring_full_table_pauses_accepts_without_spinning in its own process"]
    fn uring() {
        super::table_full_scenario();
    }
}

/// Whether the io_uring variant of a test can run (see `tests/loopback.rs`).
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

/// Runs test `name` of this binary in a child process (with `ulimit -Sn` set to `nofile` if
/// given) and checks that it passed.
fn run_child(name: &str, nofile: Option<u32>) {
    let exe = std::env::current_exe().unwrap();
    let ulimit = nofile.map_or(String::new(), |n| format!("ulimit -Sn {n} && "));
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(format!("{ulimit}exec \"$0\" \"$@\""))
        .arg(&exe)
        .args([
            "--exact",
            name,
            "--ignored",
            "--test-threads=1",
            "--nocapture",
        ])
        .env(CHILD_ENV, "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Drain the pipes on their own threads so the child never blocks on a full pipe.
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + 3 * WAIT;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let stdout = out.join().unwrap();
    let stderr = err.join().unwrap();
    assert!(
        status.is_some_and(|s| s.success()) && stdout.contains("1 passed"),
        "child {name} failed ({status:?}):\n{stdout}\n{stderr}"
    );
}

#[derive(Debug)]
enum Event {
    Opened(ConnId, SocketAddr),
    Closed(ConnId, CloseReason),
}

/// Echoes lines; `big` queues 8 MiB and then asks for a close.
struct TestHandler {
    events: Sender<Event>,
}

impl Handler for TestHandler {
    type Msg = ();

    fn on_open(&mut self, _: Instant, conn: ConnId, peer: SocketAddr, _: usize, _: &mut Outbox) {
        self.events.send(Event::Opened(conn, peer)).unwrap();
    }

    fn on_line(&mut self, _: Instant, conn: ConnId, line: &[u8], out: &mut Outbox) {
        if line == b"big" {
            let chunk: Arc<[u8]> = vec![b'b'; 1024 * 1024].into();
            for _ in 0..8 {
                out.send(conn, Arc::clone(&chunk));
            }
            out.close(conn);
        } else {
            let mut reply = line.to_vec();
            reply.push(b'\n');
            out.send(conn, reply);
        }
    }

    fn on_close(&mut self, _: Instant, conn: ConnId, reason: CloseReason) {
        self.events.send(Event::Closed(conn, reason)).unwrap();
    }

    fn on_msg(&mut self, _: Instant, (): (), _: &mut Outbox) {}

    fn on_tick(&mut self, _: Instant, _: &mut Outbox) {}
}

fn start(
    backend: BackendKind,
    tweak: impl FnOnce(&mut Config),
) -> (ckpool_connector::Connector<()>, Receiver<Event>, SocketAddr) {
    let mut cfg = Config {
        listen: vec!["127.0.0.1:0".parse().unwrap()],
        threads: 1,
        backend,
        ..Config::default()
    };
    tweak(&mut cfg);
    let (tx, rx) = crossbeam_channel::unbounded();
    let connector =
        ckpool_connector::start(cfg, move |_| TestHandler { events: tx.clone() }).unwrap();
    let addr = connector.local_addrs()[0];
    (connector, rx, addr)
}

fn opened(events: &Receiver<Event>, client: &TcpStream) -> ConnId {
    let local = client.local_addr().unwrap();
    let deadline = Instant::now() + WAIT;
    loop {
        match events.recv_deadline(deadline) {
            Ok(Event::Opened(conn, peer)) if peer == local => return conn,
            Ok(_) => {}
            Err(_) => panic!("timed out waiting for on_open of {local}"),
        }
    }
}

fn closed(events: &Receiver<Event>, conn: ConnId) -> CloseReason {
    let deadline = Instant::now() + WAIT;
    loop {
        match events.recv_deadline(deadline) {
            Ok(Event::Closed(c, reason)) if c == conn => return reason,
            Ok(_) => {}
            Err(_) => panic!("timed out waiting for on_close of {conn}"),
        }
    }
}

/// CPU time used by this process so far (user + system), from `/proc/self/stat` (opened
/// beforehand: there may be no descriptor left to open it).
fn cpu_time(proc_stat: &File) -> Duration {
    let mut buf = vec![0u8; 4096];
    let n = proc_stat.read_at(&mut buf, 0).unwrap();
    let stat = String::from_utf8_lossy(&buf[..n]);
    let after_name = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    // Fields 14 and 15 of stat(5) (utime, stime), counted from field 3 here, in 1/100 s.
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    Duration::from_millis(ticks * 10)
}

/// Epoll: when no descriptor is left, accepting pauses (without spinning) until a connection
/// closes. io_uring: accepted connections take no descriptor, so accepting goes on.
fn emfile_pauses_accepts_without_spinning(_backend: BackendKind, name: &str) {
    run_child(&format!("emfile_child::{name}"), Some(64));
}

/// io_uring: when the table of direct descriptors is full, accepting pauses (the connection waits
/// in the listen backlog instead of being refused) until a connection closes.
#[test]
fn uring_full_table_pauses_accepts_without_spinning() {
    if uring_available() {
        run_child("table_full_child::uring", None);
    }
}

fn emfile_scenario(backend: BackendKind) {
    if std::env::var_os(CHILD_ENV).is_none() {
        eprintln!("skipped: only meaningful in the child process with a low fd limit");
        return;
    }
    // No tick during the test: only a closing connection can resume accepting.
    let (connector, events, addr) = start(backend, |cfg| cfg.tick = Duration::from_secs(3600));

    let proc_stat = File::open("/proc/self/stat").unwrap();
    // Use up every descriptor, then free two: one for a client, one for the server side.
    let mut filler = Vec::new();
    loop {
        match File::open("/dev/null") {
            Ok(f) => filler.push(f),
            Err(e) if e.raw_os_error() == Some(libc::EMFILE) => break,
            Err(e) => panic!("{e}"),
        }
    }
    filler.truncate(filler.len() - 2);
    if backend == BackendKind::Uring {
        return direct_descriptors_scenario(connector, &events, addr, filler);
    }
    let mut first = TcpStream::connect_timeout(&addr, WAIT).unwrap();
    let first_id = opened(&events, &first);

    // Free one more: the client gets it, the server's accept fails with EMFILE.
    filler.pop();
    let mut second = TcpStream::connect_timeout(&addr, WAIT).unwrap();
    second.set_read_timeout(Some(WAIT)).unwrap();

    // The connector thread must not spin on the listener while it cannot accept.
    let window = Duration::from_millis(500);
    let cpu_before = cpu_time(&proc_stat);
    let started = Instant::now();
    while started.elapsed() < window {
        std::thread::sleep(window / 5);
    }
    let used = cpu_time(&proc_stat) - cpu_before;
    assert!(
        used < window / 2,
        "{used:?} of CPU in {window:?} while accepts are paused"
    );

    // Closing a connection frees a descriptor and resumes accepting. The echo is read before the
    // close, or the unread echo would make the close a reset (`CloseReason::Error`).
    first.write_all(b"ping\n").unwrap();
    first.set_read_timeout(Some(WAIT)).unwrap();
    let mut echo = String::new();
    BufReader::new(&first).read_line(&mut echo).unwrap();
    assert_eq!(echo, "ping\n");
    drop(first);
    assert_eq!(closed(&events, first_id), CloseReason::Peer);
    let second_id = opened(&events, &second);
    second.write_all(b"pong\n").unwrap();
    let mut line = String::new();
    BufReader::new(&second).read_line(&mut line).unwrap();
    assert_eq!(line, "pong\n");
    drop(filler);
    connector.shutdown();
    assert_eq!(closed(&events, second_id), CloseReason::Shutdown);
}

/// Uring half of `emfile_scenario`: with no descriptor left in the process but two for the
/// clients, both are accepted, since the server side takes none.
fn direct_descriptors_scenario(
    connector: ckpool_connector::Connector<()>,
    events: &Receiver<Event>,
    addr: SocketAddr,
    filler: Vec<File>,
) {
    let mut clients = Vec::new();
    let mut ids = Vec::new();
    for _ in 0..2 {
        let client = TcpStream::connect_timeout(&addr, WAIT).unwrap();
        ids.push(opened(events, &client));
        clients.push(client);
    }
    assert_eq!(
        File::open("/dev/null").unwrap_err().raw_os_error(),
        Some(libc::EMFILE),
        "every descriptor of the process is in use"
    );
    for (i, client) in clients.iter_mut().enumerate() {
        client.set_read_timeout(Some(WAIT)).unwrap();
        client.write_all(format!("hello {i}\n").as_bytes()).unwrap();
        let mut line = String::new();
        BufReader::new(&*client).read_line(&mut line).unwrap();
        assert_eq!(line, format!("hello {i}\n"));
    }
    drop(filler);
    connector.shutdown();
    for id in ids {
        assert_eq!(closed(events, id), CloseReason::Shutdown);
    }
}

fn table_full_scenario() {
    if std::env::var_os(CHILD_ENV).is_none() {
        eprintln!("skipped: only meaningful in its own child process");
        return;
    }
    // Two direct descriptors; no tick, so only a closing connection can resume accepting.
    let (connector, events, addr) = start(BackendKind::Uring, |cfg| {
        cfg.tick = Duration::from_secs(3600);
        cfg.uring.files = 2;
    });
    let proc_stat = File::open("/proc/self/stat").unwrap();
    let first = TcpStream::connect_timeout(&addr, WAIT).unwrap();
    let first_id = opened(&events, &first);
    let second = TcpStream::connect_timeout(&addr, WAIT).unwrap();
    let second_id = opened(&events, &second);

    // The table is full: the third connection completes its handshake in the listen backlog
    // and waits there.
    let mut third = TcpStream::connect_timeout(&addr, WAIT).unwrap();
    third.set_read_timeout(Some(WAIT)).unwrap();
    let window = Duration::from_millis(500);
    let cpu_before = cpu_time(&proc_stat);
    let started = Instant::now();
    while started.elapsed() < window {
        std::thread::sleep(window / 5);
    }
    let used = cpu_time(&proc_stat) - cpu_before;
    assert!(
        used < window / 2,
        "{used:?} of CPU in {window:?} while accepts are paused"
    );
    assert!(
        events.try_recv().is_err(),
        "nothing is accepted while the table is full"
    );

    // Closing a connection frees a slot and resumes accepting; the waiting connection was kept.
    drop(first);
    assert_eq!(closed(&events, first_id), CloseReason::Peer);
    let third_id = opened(&events, &third);
    third.write_all(b"still here\n").unwrap();
    let mut line = String::new();
    BufReader::new(&third).read_line(&mut line).unwrap();
    assert_eq!(line, "still here\n");
    connector.shutdown();
    let mut shut = [second_id, third_id].map(|id| (id, false));
    let deadline = Instant::now() + WAIT;
    while shut.iter().any(|(_, done)| !done) {
        match events.recv_deadline(deadline) {
            Ok(Event::Closed(c, CloseReason::Shutdown)) => {
                for (id, done) in &mut shut {
                    *done |= *id == c;
                }
            }
            Ok(_) => {}
            Err(_) => panic!("timed out waiting for the shutdown closes"),
        }
    }
}

fn handler_close_is_bounded_in_time(backend: BackendKind, _name: &str) {
    let (connector, events, addr) = start(backend, |cfg| {
        cfg.max_outbound = 16 * 1024 * 1024;
        cfg.tick = Duration::from_millis(50);
    });
    let mut client = TcpStream::connect_timeout(&addr, WAIT).unwrap();
    let id = opened(&events, &client);
    // 8 MiB queued then a close requested, and the client never reads: the bytes cannot all be
    // written, so the close happens when the wait runs out (5 s).
    let started = Instant::now();
    client.write_all(b"big\n").unwrap();
    assert_eq!(closed(&events, id), CloseReason::Handler);
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_secs(4) && waited < Duration::from_secs(10),
        "closed after {waited:?}"
    );
    connector.shutdown();
}

fn max_conns_closes_the_excess_and_serves_again_after_a_close(backend: BackendKind, _name: &str) {
    // Two threads: the limit counts the connections of both.
    let (connector, events, addr) = start(backend, |cfg| {
        cfg.threads = 2;
        cfg.max_conns = Some(2);
    });
    let a = TcpStream::connect_timeout(&addr, WAIT).unwrap();
    let a_id = opened(&events, &a);
    let mut b = TcpStream::connect_timeout(&addr, WAIT).unwrap();
    opened(&events, &b);
    // A third is accepted and closed at once: the client reads end of file (or a reset).
    let mut c = TcpStream::connect_timeout(&addr, WAIT).unwrap();
    c.set_read_timeout(Some(WAIT)).unwrap();
    let refused_at = Instant::now();
    let mut buf = [0u8; 16];
    let n = c.read(&mut buf);
    assert!(
        matches!(n, Ok(0))
            || n.as_ref()
                .is_err_and(|e| e.kind() != std::io::ErrorKind::WouldBlock),
        "the connection over the limit was not closed: {n:?}"
    );
    assert!(refused_at.elapsed() < WAIT);
    // The two served ones still work.
    b.set_read_timeout(Some(WAIT)).unwrap();
    b.write_all(b"still here\n").unwrap();
    let mut line = String::new();
    BufReader::new(&b).read_line(&mut line).unwrap();
    assert_eq!(line, "still here\n");
    // One closes; then a new connection is served. The handler never heard of the refused one.
    drop(a);
    assert_eq!(closed(&events, a_id), CloseReason::Peer);
    let d = TcpStream::connect_timeout(&addr, WAIT).unwrap();
    let refused = c.local_addr().unwrap();
    let wanted = d.local_addr().unwrap();
    let deadline = Instant::now() + WAIT;
    loop {
        match events.recv_deadline(deadline) {
            Ok(Event::Opened(_, peer)) if peer == wanted => break,
            Ok(Event::Opened(_, peer)) => {
                assert_ne!(peer, refused, "the refused connection was opened")
            }
            Ok(_) => {}
            Err(_) => panic!("the connection after a close was not served"),
        }
    }
    connector.shutdown();
}
