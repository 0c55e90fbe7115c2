//! A null server for connection-holding experiments: accepts connections, answers every line with
//! one canned reply (a shared buffer, never copied), and prints its own figures at an interval:
//! open connections, lines answered, RSS, threads, open descriptors and CPU time, all read from
//! `/proc/self`. It stops by itself after `--duration`.
//!
//! ```text
//! cargo run --release -p ckpool-connector --example hold -- \
//!     --listen 127.0.0.1:23334 --threads 2 --backend uring --duration 300
//! ```
//!
//! The connector binds with `SO_REUSEPORT`, which would silently share a port with another
//! process of the same user (and steal its connections), so this first checks with a plain bind
//! that each address is free, and refuses to start otherwise.
//!
//! Options: `--listen ADDR` (repeatable; default 127.0.0.1:23334), `--threads N` (default: one
//! per core), `--backend auto|epoll|uring` (default auto), `--reply TEXT` (default
//! `{"id":null,"result":true,"error":null}`), `--every SECS` (default 5), `--duration SECS`
//! (default 600), `--files N` (io_uring direct descriptors per thread; the kernel caps it at the
//! soft `RLIMIT_NOFILE`, which this raises to the hard limit first).

use std::error::Error;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use ckpool_connector::{BackendKind, CloseReason, Config, ConnId, Handler, Outbox};

/// Counters shared by the connector threads and the reporting loop.
#[derive(Default)]
struct Counters {
    open: AtomicU64,
    accepted: AtomicU64,
    lines: AtomicU64,
}

struct Null {
    reply: Arc<[u8]>,
    counters: Arc<Counters>,
}

impl Handler for Null {
    type Msg = ();

    fn on_open(&mut self, _: Instant, _: ConnId, _: SocketAddr, _: usize, _: &mut Outbox) {
        self.counters.open.fetch_add(1, Ordering::Relaxed);
        self.counters.accepted.fetch_add(1, Ordering::Relaxed);
    }

    fn on_line(&mut self, _: Instant, conn: ConnId, _: &[u8], out: &mut Outbox) {
        self.counters.lines.fetch_add(1, Ordering::Relaxed);
        out.send(conn, Arc::clone(&self.reply));
    }

    fn on_close(&mut self, _: Instant, _: ConnId, _: CloseReason) {
        self.counters.open.fetch_sub(1, Ordering::Relaxed);
    }

    fn on_msg(&mut self, _: Instant, (): (), _: &mut Outbox) {}

    fn on_tick(&mut self, _: Instant, _: &mut Outbox) {}
}

struct Args {
    listen: Vec<SocketAddr>,
    threads: Option<usize>,
    backend: BackendKind,
    reply: String,
    every: Duration,
    duration: Duration,
    files: Option<u32>,
}

fn parse_args() -> Result<Args, Box<dyn Error>> {
    let mut args = Args {
        listen: Vec::new(),
        threads: None,
        backend: BackendKind::Auto,
        reply: r#"{"id":null,"result":true,"error":null}"#.to_owned(),
        every: Duration::from_secs(5),
        duration: Duration::from_secs(600),
        files: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--listen" => args.listen.push(value()?.parse()?),
            "--threads" => args.threads = Some(value()?.parse()?),
            "--backend" => args.backend = value()?.parse()?,
            "--reply" => args.reply = value()?,
            "--every" => args.every = Duration::from_secs(value()?.parse()?),
            "--duration" => args.duration = Duration::from_secs(value()?.parse()?),
            "--files" => args.files = Some(value()?.parse()?),
            _ => return Err(format!("unknown option {flag}").into()),
        }
    }
    if args.listen.is_empty() {
        args.listen.push("127.0.0.1:23334".parse()?);
    }
    if args.every.is_zero() {
        args.every = Duration::from_secs(1);
    }
    Ok(args)
}

fn main() -> Result<(), Box<dyn Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let args = parse_args()?;
    let nofile = ckpool_connector::raise_nofile_limit()?;
    for addr in &args.listen {
        if addr.port() != 0 {
            // A plain bind (no SO_REUSEPORT) fails if anything else holds the port.
            std::net::TcpListener::bind(addr)
                .map_err(|e| format!("{addr} is not free ({e}); pick another --listen"))?;
        }
    }

    let mut cfg = Config {
        listen: args.listen.clone(),
        backend: args.backend,
        ..Config::default()
    };
    if let Some(threads) = args.threads {
        cfg.threads = threads;
    }
    if let Some(files) = args.files {
        cfg.uring.files = files;
    }
    let mut reply = args.reply.into_bytes();
    reply.push(b'\n');
    let reply: Arc<[u8]> = reply.into();
    let counters = Arc::new(Counters::default());
    let shared = Arc::clone(&counters);
    let connector = ckpool_connector::start(cfg, move |_| Null {
        reply: Arc::clone(&reply),
        counters: Arc::clone(&shared),
    })?;
    println!(
        "hold pid={} backend={} threads={} nofile={nofile} listen={:?}",
        std::process::id(),
        connector.backend(),
        connector.threads(),
        connector.local_addrs()
    );

    let started = Instant::now();
    let mut next = started + args.every;
    let end = started + args.duration;
    loop {
        let now = Instant::now();
        if now >= end {
            break;
        }
        std::thread::sleep(next.min(end).saturating_duration_since(now));
        next += args.every;
        report(started, &counters);
    }
    connector.shutdown();
    report(started, &counters);
    Ok(())
}

fn report(started: Instant, counters: &Counters) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map_or_else(String::new, |v| {
                v.trim().trim_end_matches(" kB").trim().to_owned()
            })
    };
    let fds = std::fs::read_dir("/proc/self/fd").map_or(0, Iterator::count);
    println!(
        "t={:.0}s open={} accepted={} lines={} rss_kib={} hwm_kib={} threads={} fds={fds} cpu_s={:.2}",
        started.elapsed().as_secs_f64(),
        counters.open.load(Ordering::Relaxed),
        counters.accepted.load(Ordering::Relaxed),
        counters.lines.load(Ordering::Relaxed),
        field("VmRSS:"),
        field("VmHWM:"),
        field("Threads:"),
        cpu_seconds().unwrap_or(f64::NAN),
    );
}

/// User + system CPU time of this process, from `/proc/self/stat` (fields 14 and 15, in clock
/// ticks of 1/100 s: `USER_HZ` is 100 on Linux).
fn cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let after_name = stat.get(stat.rfind(')')? + 2..)?;
    let mut fields = after_name.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some((utime + stime) as f64 / 100.0)
}
