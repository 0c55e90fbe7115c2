#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code"
)]
//! io_uring on a kernel without `IORING_OP_FIXED_FD_INSTALL` (simulated with
//! `CKPOOL_IO_URING_NO_HANDOVER=1` in a child process: the check runs once per process): the
//! handover is refused up front ([`ckpool_connector::probe_handover`]) and by the export itself,
//! clearly, and nothing is lost: after a resume the connection goes on, its partial line kept.
//!
//! Every wait is bounded: socket reads have a timeout, and the child is awaited with a deadline
//! (killed after it).

use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ckpool_connector::{BackendKind, CloseReason, Config, ConnId, Handler, Outbox};

const WAIT: Duration = Duration::from_secs(20);
const NO_HANDOVER_ENV: &str = "CKPOOL_IO_URING_NO_HANDOVER";
const TEST: &str = "without_fd_install_the_export_is_refused_and_nothing_is_lost";
const DONE: &str = "refused-and-resumed";

struct Echo;

impl Handler for Echo {
    type Msg = ();

    fn on_open(&mut self, _: Instant, _: ConnId, _: SocketAddr, _: usize, _: &mut Outbox) {}

    fn on_line(&mut self, _: Instant, conn: ConnId, line: &[u8], out: &mut Outbox) {
        let mut reply = line.to_vec();
        reply.push(b'\n');
        out.send(conn, reply);
    }

    fn on_close(&mut self, _: Instant, _: ConnId, _: CloseReason) {}

    fn on_msg(&mut self, _: Instant, (): (), _: &mut Outbox) {}

    fn on_tick(&mut self, _: Instant, _: &mut Outbox) {}
}

#[test]
fn without_fd_install_the_export_is_refused_and_nothing_is_lost() {
    if let Err(reason) = ckpool_connector::probe_uring() {
        eprintln!("skipped: io_uring is not available: {reason}");
        return;
    }
    if std::env::var_os(NO_HANDOVER_ENV).is_none() {
        run_in_child();
        return;
    }

    assert_eq!(ckpool_connector::probe_handover(BackendKind::Epoll), Ok(()));
    let reason = ckpool_connector::probe_handover(BackendKind::Uring).unwrap_err();
    assert!(reason.contains(NO_HANDOVER_ENV), "{reason}");

    let cfg = Config {
        listen: vec!["127.0.0.1:0".parse().unwrap()],
        threads: 1,
        backend: BackendKind::Uring,
        tick: Duration::from_millis(50),
        pin: false,
        ..Config::default()
    };
    let connector = ckpool_connector::start(cfg, |_| Echo).unwrap();
    let mut stream = TcpStream::connect_timeout(&connector.local_addrs()[0], WAIT).unwrap();
    stream.set_read_timeout(Some(WAIT)).unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    stream.write_all(b"one\npar").unwrap();
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    assert_eq!(line, "one\n");

    let reports = connector.quiesce(Instant::now() + WAIT);
    assert!(
        reports[0].flushed && reports[0].connections == 1,
        "{reports:?}"
    );
    let err = connector.export(10).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unsupported, "{err}");
    assert!(err.to_string().contains("cannot be handed over"), "{err}");
    let c = connector.counters();
    assert_eq!((c[0].open, c[0].exported), (1, 0), "{c:?}");

    // Taken back: the connection goes on where it was.
    connector.resume();
    stream.write_all(b"tial\n").unwrap();
    line.clear();
    reader.read_line(&mut line).unwrap();
    assert_eq!(line, "partial\n");
    println!("{DONE}");
}

/// Runs this test again in a child process with the kernel's support hidden.
fn run_in_child() {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", TEST, "--test-threads=1", "--nocapture"])
        .env(NO_HANDOVER_ENV, "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut pipes = Vec::new();
    for mut pipe in [
        Box::new(child.stdout.take().unwrap()) as Box<dyn Read + Send>,
        Box::new(child.stderr.take().unwrap()),
    ] {
        pipes.push(std::thread::spawn(move || {
            let mut text = String::new();
            let _ = pipe.read_to_string(&mut text);
            text
        }));
    }
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
    let output: Vec<String> = pipes.into_iter().map(|p| p.join().unwrap()).collect();
    let output = output.join("\n");
    assert!(
        status.is_some_and(|s| s.success()) && output.contains(DONE),
        "the child failed ({status:?}):\n{output}"
    );
}
