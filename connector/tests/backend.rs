#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code"
)]
//! Backend selection and what only io_uring can do.
//!
//! * `Auto` takes io_uring when the probe accepts the kernel, and falls back to epoll (and still
//!   serves) when io_uring is refused, simulated with `CKPOOL_IO_URING_DISABLE=1` in a child
//!   process (the probe runs once per process).
//! * One io_uring connector holds more connections than its process may open descriptors: the
//!   server runs in a child process under `ulimit -n 256` and serves 1000 connections opened by
//!   this process.
//!
//! Every wait is bounded: socket reads have a timeout, and child processes and their output are
//! awaited with a deadline (a child still running then is killed).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use ckpool_connector::{BackendKind, CloseReason, Config, ConnId, Connector, Handler, Outbox};
use crossbeam_channel::{Receiver, Sender};

const WAIT: Duration = Duration::from_secs(20);
/// Tells a child process which role to play.
const ROLE_ENV: &str = "CKPOOL_CONNECTOR_TEST_ROLE";
/// Connections held by the direct-descriptor test, and the server's descriptor limit there.
const HELD: usize = 1000;
const SERVER_NOFILE: u64 = 256;

/// Echoes lines; reports each open as its peer address; counts open connections.
struct Echo {
    open: Arc<AtomicUsize>,
    peers: Sender<SocketAddr>,
}

impl Handler for Echo {
    type Msg = ();

    fn on_open(&mut self, _: Instant, _: ConnId, peer: SocketAddr, _: usize, _: &mut Outbox) {
        self.open.fetch_add(1, Ordering::SeqCst);
        let _ = self.peers.send(peer);
    }

    fn on_line(&mut self, _: Instant, conn: ConnId, line: &[u8], out: &mut Outbox) {
        let mut reply = line.to_vec();
        reply.push(b'\n');
        out.send(conn, reply);
    }

    fn on_close(&mut self, _: Instant, _: ConnId, _: CloseReason) {
        self.open.fetch_sub(1, Ordering::SeqCst);
    }

    fn on_msg(&mut self, _: Instant, (): (), _: &mut Outbox) {}

    fn on_tick(&mut self, _: Instant, _: &mut Outbox) {}
}

struct Server {
    connector: Connector<()>,
    open: Arc<AtomicUsize>,
    peers: Receiver<SocketAddr>,
}

fn echo_server(backend: BackendKind, threads: usize) -> std::io::Result<Server> {
    let cfg = Config {
        listen: vec!["127.0.0.1:0".parse().unwrap()],
        threads,
        backend,
        tick: Duration::from_millis(100),
        ..Config::default()
    };
    let open = Arc::new(AtomicUsize::new(0));
    let (tx, peers) = crossbeam_channel::unbounded();
    let counter = Arc::clone(&open);
    let connector = ckpool_connector::start(cfg, move |_| Echo {
        open: Arc::clone(&counter),
        peers: tx.clone(),
    })?;
    Ok(Server {
        connector,
        open,
        peers,
    })
}

fn connect(addr: SocketAddr) -> (TcpStream, BufReader<TcpStream>) {
    let stream = TcpStream::connect_timeout(&addr, WAIT).unwrap();
    stream.set_read_timeout(Some(WAIT)).unwrap();
    stream.set_write_timeout(Some(WAIT)).unwrap();
    let reader = BufReader::new(stream.try_clone().unwrap());
    (stream, reader)
}

fn echo_once(stream: &mut TcpStream, reader: &mut BufReader<TcpStream>, text: &str) {
    stream.write_all(format!("{text}\n").as_bytes()).unwrap();
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    assert_eq!(line, format!("{text}\n"));
}

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

/// Starts test `name` of this binary in a child process playing `role`, through `sh -c` so
/// that `shell_prefix` (e.g. a `ulimit`) applies to it.
fn spawn_child(name: &str, role: &str, shell_prefix: &str, envs: &[(&str, &str)]) -> Child {
    let exe = std::env::current_exe().unwrap();
    Command::new("sh")
        .arg("-c")
        .arg(format!("{shell_prefix}exec \"$0\" \"$@\""))
        .arg(&exe)
        .args([
            "--exact",
            name,
            "--ignored",
            "--test-threads=1",
            "--nocapture",
        ])
        .env(ROLE_ENV, role)
        .envs(envs.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// A child's output lines, read on other threads so the child never blocks on a full pipe.
fn output_lines(child: &mut Child) -> Receiver<String> {
    let (tx, rx) = crossbeam_channel::unbounded();
    let stdout = child.stdout.take().unwrap();
    let stderr = child.stderr.take().unwrap();
    for pipe in [Box::new(stdout) as Box<dyn Read + Send>, Box::new(stderr)] {
        let tx = tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
    }
    rx
}

/// Waits for the first line containing `prefix` (libtest may have printed the test's name just
/// before it on the same line); returns what follows it. The lines seen are kept in `seen` for
/// error messages.
fn expect_line(lines: &Receiver<String>, prefix: &str, seen: &mut Vec<String>) -> String {
    let deadline = Instant::now() + WAIT;
    loop {
        match lines.recv_deadline(deadline) {
            Ok(line) => {
                if let Some(at) = line.find(prefix) {
                    return line[at + prefix.len()..].to_owned();
                }
                seen.push(line);
            }
            Err(_) => panic!(
                "no {prefix:?} line from the child; it said:\n{}",
                seen.join("\n")
            ),
        }
    }
}

/// Waits for the child to exit (killing it after the deadline) and checks that its test passed.
fn finish_child(mut child: Child, lines: &Receiver<String>, mut seen: Vec<String>) {
    let deadline = Instant::now() + WAIT;
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
    // The pipes close when the child is gone.
    let drain_until = Instant::now() + WAIT;
    while let Ok(line) = lines.recv_deadline(drain_until) {
        seen.push(line);
    }
    let out = seen.join("\n");
    assert!(
        status.is_some_and(|s| s.success()) && out.contains("1 passed"),
        "child failed ({status:?}):\n{out}"
    );
}

// ---------------------------------------------------------------------------------------------

#[test]
fn auto_uses_io_uring_when_available() {
    if !uring_available() {
        return;
    }
    assert_eq!(
        ckpool_connector::resolved_backend(BackendKind::Auto),
        BackendKind::Uring
    );
    let srv = echo_server(BackendKind::Auto, 1).unwrap();
    assert_eq!(srv.connector.backend(), BackendKind::Uring);
    let (mut stream, mut reader) = connect(srv.connector.local_addrs()[0]);
    echo_once(&mut stream, &mut reader, "hello");
    // The real peer address is reported, although direct descriptors have no getpeername.
    assert_eq!(
        srv.peers.recv_timeout(WAIT).unwrap(),
        stream.local_addr().unwrap()
    );
}

#[test]
fn auto_falls_back_to_epoll_when_io_uring_is_disabled() {
    let mut child = spawn_child(
        "fallback_child",
        "fallback",
        "",
        &[("CKPOOL_IO_URING_DISABLE", "1")],
    );
    drop(child.stdin.take());
    let lines = output_lines(&mut child);
    finish_child(child, &lines, Vec::new());
}

/// The child half of `auto_falls_back_to_epoll_when_io_uring_is_disabled`.
#[test]
#[ignore = "run by auto_falls_back_to_epoll_when_io_uring_is_disabled with io_uring disabled"]
fn fallback_child() {
    if std::env::var(ROLE_ENV).as_deref() != Ok("fallback") {
        eprintln!("skipped: only meaningful in the child process");
        return;
    }
    let reason = ckpool_connector::probe_uring().unwrap_err();
    assert!(reason.contains("CKPOOL_IO_URING_DISABLE"), "{reason}");
    assert_eq!(
        ckpool_connector::resolved_backend(BackendKind::Auto),
        BackendKind::Epoll
    );
    let srv = echo_server(BackendKind::Auto, 2).unwrap();
    assert_eq!(srv.connector.backend(), BackendKind::Epoll);
    let (mut stream, mut reader) = connect(srv.connector.local_addrs()[0]);
    echo_once(&mut stream, &mut reader, "served by epoll");

    // Forcing io_uring fails instead of falling back.
    let err = echo_server(BackendKind::Uring, 1).err().unwrap();
    assert_eq!(err.kind(), std::io::ErrorKind::Unsupported, "{err}");
    assert!(err.to_string().contains("CKPOOL_IO_URING_DISABLE"), "{err}");
}

#[test]
fn direct_descriptors_hold_more_connections_than_the_fd_limit() {
    if !uring_available() {
        return;
    }
    // The clients live here; this process needs a descriptor for each.
    let limit = ckpool_connector::raise_nofile_limit().unwrap();
    assert!(
        limit >= HELD as u64 + 100,
        "RLIMIT_NOFILE {limit} too low for the clients"
    );
    let mut child = spawn_child(
        "direct_descriptor_server",
        "server",
        &format!("ulimit -n {SERVER_NOFILE} && "),
        &[],
    );
    let mut stdin = child.stdin.take().unwrap();
    let lines = output_lines(&mut child);
    let mut seen = Vec::new();
    let addr: SocketAddr = expect_line(&lines, "LISTEN ", &mut seen).parse().unwrap();

    let started = Instant::now();
    let mut clients: Vec<_> = (0..HELD).map(|_| connect(addr)).collect();
    for (i, (stream, _)) in clients.iter_mut().enumerate() {
        stream.write_all(format!("ping {i}\n").as_bytes()).unwrap();
    }
    for (i, (_, reader)) in clients.iter_mut().enumerate() {
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        assert_eq!(line, format!("ping {i}\n"));
    }

    let status = status(&mut stdin, &lines, &mut seen);
    eprintln!("server holding {HELD} connections: {status:?}");
    assert_eq!(status.open, HELD, "{status:?}");
    assert!(status.limit <= SERVER_NOFILE, "{status:?}");
    assert!(
        status.fds < SERVER_NOFILE / 2,
        "the connections take no descriptor of the server: {status:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(60));

    drop(clients);
    drop(stdin);
    finish_child(child, &lines, seen);
}

#[derive(Debug)]
struct Status {
    open: usize,
    fds: u64,
    limit: u64,
}

/// Asks the server child for its figures.
fn status(stdin: &mut ChildStdin, lines: &Receiver<String>, seen: &mut Vec<String>) -> Status {
    stdin.write_all(b"STATUS\n").unwrap();
    stdin.flush().unwrap();
    let rest = expect_line(lines, "STATUS ", seen);
    let field = |name: &str| -> u64 {
        rest.split_whitespace()
            .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
            .unwrap_or_else(|| panic!("no {name} in {rest:?}"))
            .parse()
            .unwrap()
    };
    Status {
        open: usize::try_from(field("open")).unwrap(),
        fds: field("fds"),
        limit: field("limit"),
    }
}

/// The server half of `direct_descriptors_hold_more_connections_than_the_fd_limit`: an io_uring
/// echo server in a process that may open only [`SERVER_NOFILE`] descriptors. Prints
/// `LISTEN <addr>`, answers `STATUS` on stdin with `STATUS open=<n> fds=<n> limit=<n>`, and
/// stops at the end of stdin.
#[test]
#[ignore = "run by direct_descriptors_hold_more_connections_than_the_fd_limit"]
fn direct_descriptor_server() {
    if std::env::var(ROLE_ENV).as_deref() != Ok("server") {
        eprintln!("skipped: only meaningful in the child process");
        return;
    }
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is a valid, writable rlimit for the duration of the call.
    assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) }, 0);
    assert!(lim.rlim_max <= SERVER_NOFILE, "{}", lim.rlim_max);
    // Each thread's table of direct descriptors is capped at the descriptor limit (256), so
    // eight threads hold up to 2048 connections, whichever way SO_REUSEPORT spreads them.
    let srv = echo_server(BackendKind::Uring, 8).unwrap();
    println!("LISTEN {}", srv.connector.local_addrs()[0]);
    for line in std::io::stdin().lock().lines() {
        let line = line.unwrap();
        if line == "STATUS" {
            let fds = std::fs::read_dir("/proc/self/fd").unwrap().count();
            println!(
                "STATUS open={} fds={fds} limit={}",
                srv.open.load(Ordering::SeqCst),
                lim.rlim_cur
            );
        }
    }
    srv.connector.shutdown();
}
