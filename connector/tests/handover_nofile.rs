#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code"
)]
//! io_uring only: more connections than the process may open descriptors are handed from one
//! connector to another, in batches, without `EMFILE` (and a batch too big for the limit loses
//! nothing: what does not fit stays for the next batch). On io_uring a connection is a direct
//! descriptor (no regular descriptor) until it is exported; each batch of exports installs that
//! many regular descriptors, which the adopting connector turns back into direct descriptors and
//! closes before the next batch.
//!
//! This binary lowers its own soft `RLIMIT_NOFILE` (process-wide, hence a file of its own). The
//! clients run in a child process (this binary again, in the ignored `client_role` test),
//! started before the limit is lowered.
//!
//! Every wait is bounded: socket reads have a timeout, and the child and its output are awaited
//! with a deadline (a child still running then is killed).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ckpool_connector::{BackendKind, CloseReason, Config, ConnId, Connector, Handler, Outbox};
use crossbeam_channel::Receiver;

const WAIT: Duration = Duration::from_secs(30);
/// Tells the child process to play the clients.
const ROLE_ENV: &str = "CKPOOL_HANDOVER_TEST_ROLE";
const ADDR_ENV: &str = "CKPOOL_HANDOVER_TEST_ADDR";
/// Connections handed over, the soft descriptor limit meanwhile, and the batch size.
const CONNS: usize = 600;
const SOFT_NOFILE: u64 = 256;
const BATCH: usize = 100;

/// Replies `<name>:<line>`.
struct Tagged(&'static str);

impl Handler for Tagged {
    type Msg = ();

    fn on_open(&mut self, _: Instant, _: ConnId, _: SocketAddr, _: usize, _: &mut Outbox) {}

    fn on_line(&mut self, _: Instant, conn: ConnId, line: &[u8], out: &mut Outbox) {
        let mut reply = format!("{}:", self.0).into_bytes();
        reply.extend_from_slice(line);
        reply.push(b'\n');
        out.send(conn, reply);
    }

    fn on_close(&mut self, _: Instant, _: ConnId, _: CloseReason) {}

    fn on_msg(&mut self, _: Instant, (): (), _: &mut Outbox) {}

    fn on_tick(&mut self, _: Instant, _: &mut Outbox) {}
}

fn server(name: &'static str) -> Connector<()> {
    let cfg = Config {
        listen: vec!["127.0.0.1:0".parse().unwrap()],
        threads: 2,
        backend: BackendKind::Uring,
        tick: Duration::from_millis(50),
        pin: false,
        ..Config::default()
    };
    ckpool_connector::start(cfg, move |_| Tagged(name)).unwrap()
}

fn set_soft_nofile(soft: u64) {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is a valid, writable rlimit for the duration of the call.
    assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) }, 0);
    lim.rlim_cur = soft;
    // SAFETY: `lim` is a valid rlimit; setrlimit only reads it.
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) }, 0);
}

/// Polls the connector's counters until `pred` holds on their sums (open, adopted, exported).
fn wait_counters(c: &Connector<()>, what: &str, pred: impl Fn(u64, u64, u64) -> bool) {
    let deadline = Instant::now() + WAIT;
    loop {
        let all = c.counters();
        let open = all.iter().map(|t| t.open).sum();
        let adopted = all.iter().map(|t| t.adopted).sum();
        let exported = all.iter().map(|t| t.exported).sum();
        if pred(open, adopted, exported) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}: {all:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn more_connections_than_the_descriptor_limit_are_handed_over_in_batches() {
    if let Err(reason) = ckpool_connector::probe_uring() {
        eprintln!("skipped: io_uring is not available: {reason}");
        return;
    }
    // The fixed-file tables are sized by the soft limit when the rings start.
    let soft = ckpool_connector::raise_nofile_limit().unwrap();
    assert!(
        soft >= 2 * CONNS as u64,
        "the hard limit is too low: {soft}"
    );
    let a = server("A");
    let b = server("B");
    let addr = a.local_addrs()[0];

    // The clients, in a child process that keeps the raised limit.
    let mut child = spawn_client(addr);
    let lines = output_lines(&mut child);
    let mut seen = Vec::new();
    expect_line(&lines, "ready", &mut seen);
    wait_counters(&a, "every connection", |open, _, _| open == CONNS as u64);

    set_soft_nofile(SOFT_NOFILE);
    // The limit bites: this process cannot hold CONNS regular descriptors.
    let probe = std::fs::File::open("/dev/null").unwrap();
    let mut dups = Vec::new();
    let err = loop {
        match probe.try_clone() {
            Ok(f) => dups.push(f),
            Err(e) => break e,
        }
        assert!(dups.len() < CONNS, "the lowered limit is not in force");
    };
    assert_eq!(err.raw_os_error(), Some(libc::EMFILE), "{err}");
    drop(dups);

    let reports = a.quiesce(Instant::now() + WAIT);
    assert_eq!(reports.iter().map(|r| r.connections).sum::<usize>(), CONNS);
    // A batch too big for the descriptors left: what fits is exported, the rest stays; while
    // those are held, nothing more fits and the export says why, losing nothing.
    let first = a.export(CONNS).unwrap();
    assert!(!first.is_empty() && first.len() < CONNS, "{}", first.len());
    let err = a.export(CONNS).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EMFILE), "{err}");
    let mut handed = first.len();
    let conns = first.into_iter().map(|e| (e.fd, e.state)).collect();
    for id in b.adopt(1, conns) {
        id.unwrap();
    }
    // Then in batches that fit.
    for round in 0.. {
        let batch = a.export(BATCH).unwrap();
        assert!(batch.len() <= BATCH);
        if batch.is_empty() {
            break;
        }
        handed += batch.len();
        let conns = batch.into_iter().map(|e| (e.fd, e.state)).collect();
        // Adopting closes the batch's descriptors before the next batch is installed.
        for id in b.adopt(round, conns) {
            id.unwrap();
        }
    }
    assert_eq!(handed, CONNS, "none lost");
    wait_counters(&a, "A's exports", |open, _, exported| {
        open == 0 && exported == CONNS as u64
    });
    wait_counters(&b, "B's adoptions", |open, adopted, _| {
        open == CONNS as u64 && adopted == CONNS as u64
    });
    drop(a);
    let counters = b.counters();
    assert_eq!(
        counters.iter().map(|t| t.closed.total()).sum::<u64>(),
        0,
        "{counters:?}"
    );

    // Every client completes its line and is answered by B.
    writeln!(child.stdin.as_mut().unwrap(), "go").unwrap();
    expect_line(&lines, "ok", &mut seen);
    finish_child(child, &lines, seen);
}

/// The child's part: `CONNS` connections, each with a partial line; on `go`, completes each
/// line and checks B's answer.
#[test]
#[ignore = "run as a child process by the test above"]
fn client_role() {
    if std::env::var_os(ROLE_ENV).is_none() {
        return;
    }
    let addr: SocketAddr = std::env::var(ADDR_ENV).unwrap().parse().unwrap();
    let streams: Vec<TcpStream> = (0..CONNS)
        .map(|i| {
            let mut s = TcpStream::connect_timeout(&addr, WAIT).unwrap();
            s.set_read_timeout(Some(WAIT)).unwrap();
            s.write_all(format!("conn {i} ").as_bytes()).unwrap();
            s
        })
        .collect();
    println!("ready");
    let mut go = String::new();
    std::io::stdin().read_line(&mut go).unwrap();
    assert_eq!(go.trim(), "go");
    for mut s in &streams {
        s.write_all(b"part\n").unwrap();
    }
    for (i, s) in streams.iter().enumerate() {
        let mut reply = String::new();
        BufReader::new(s).read_line(&mut reply).unwrap();
        assert_eq!(reply, format!("B:conn {i} part\n"));
    }
    println!("ok");
}

fn spawn_client(addr: SocketAddr) -> Child {
    Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "client_role",
            "--ignored",
            "--test-threads=1",
            "--nocapture",
        ])
        .env(ROLE_ENV, "client")
        .env(ADDR_ENV, addr.to_string())
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

/// Waits for a line containing `word` (libtest may print the test's name on the same line).
fn expect_line(lines: &Receiver<String>, word: &str, seen: &mut Vec<String>) {
    let deadline = Instant::now() + WAIT;
    loop {
        match lines.recv_deadline(deadline) {
            Ok(line) => {
                let found = line.split_whitespace().any(|w| w == word);
                seen.push(line);
                if found {
                    return;
                }
            }
            Err(_) => panic!("no {word:?} from the child; it said:\n{}", seen.join("\n")),
        }
    }
}

/// Waits for the child to exit (killing it after the deadline) and checks that it passed.
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
    seen.extend(lines.try_iter());
    assert!(
        status.is_some_and(|s| s.success()),
        "the client process failed ({status:?}):\n{}",
        seen.join("\n")
    );
}
