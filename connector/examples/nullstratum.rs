//! The "null stratum" floor: the same connector reactor answering stratum with canned replies and
//! broadcasting a canned `mining.notify` at an interval. No share is checked, no state is kept
//! beyond who subscribed. The real pool is measured against this (`ckload` against both).
//!
//! ```text
//! cargo run --release -p ckpool-connector --example nullstratum -- \
//!     --listen 127.0.0.1:23335 --backend uring --notify-every 30 --duration 300
//! ```
//!
//! Replies: `mining.subscribe` → a subscribe result with a per-connection extranonce1 (8 bytes of
//! extranonce2), then `mining.set_difficulty` 2^-32 and the current notify; `mining.authorize`,
//! `mining.submit`, `mining.suggest_difficulty`, `mining.extranonce.subscribe` → `true`;
//! `mining.configure` → version rolling with mask 1fffe000; anything else → an error. The id is
//! echoed by copying the bytes of the `"id"` member, without a JSON parser (it is a floor).
//! Jobs use nBits 1d00ffff so no share looks like a block to a miner.
//!
//! Options: `--listen ADDR` (default 127.0.0.1:23335), `--threads N`, `--backend
//! auto|epoll|uring`, `--notify-every SECS` (default 30), `--duration SECS` (default 600).

use std::collections::HashSet;
use std::error::Error;
use std::io::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ckpool_connector::{BackendKind, CloseReason, Config, ConnId, Handler, Outbox};

struct NullStratum {
    subscribed: HashSet<ConnId>,
    notify: Arc<[u8]>,
}

/// A new job for everybody.
#[derive(Clone)]
struct Job(Arc<[u8]>);

const DIFF: &[u8] = b"{\"id\":null,\"method\":\"mining.set_difficulty\",\"params\":[0.00000000023283064365386963]}\n";

impl Handler for NullStratum {
    type Msg = Job;

    fn on_open(&mut self, _: Instant, _: ConnId, _: SocketAddr, _: usize, _: &mut Outbox) {}

    fn on_line(&mut self, _: Instant, conn: ConnId, line: &[u8], out: &mut Outbox) {
        let id = id_of(line);
        let has = |m: &[u8]| line.windows(m.len()).any(|w| w == m);
        let mut reply = Vec::with_capacity(160);
        reply.extend_from_slice(b"{\"id\":");
        reply.extend_from_slice(id);
        if has(b"\"mining.submit\"")
            || has(b"\"mining.authorize\"")
            || has(b"\"mining.suggest_difficulty\"")
            || has(b"\"mining.extranonce.subscribe\"")
        {
            reply.extend_from_slice(b",\"result\":true,\"error\":null}\n");
            out.send(conn, reply);
        } else if has(b"\"mining.subscribe\"") {
            let _ = writeln!(
                reply,
                ",\"result\":[[[\"mining.notify\",\"{:08x}\"]],\"{:08x}\",8],\"error\":null}}",
                conn.slot(),
                conn.0 as u32 ^ (u32::from(conn.thread()) << 28)
            );
            reply.extend_from_slice(DIFF);
            out.send(conn, reply);
            out.send(conn, Arc::clone(&self.notify));
            self.subscribed.insert(conn);
        } else if has(b"\"mining.configure\"") {
            reply.extend_from_slice(
                b",\"result\":{\"version-rolling\":true,\"version-rolling.mask\":\"1fffe000\"},\"error\":null}\n",
            );
            out.send(conn, reply);
        } else {
            reply
                .extend_from_slice(b",\"result\":null,\"error\":[20,\"Method not found\",null]}\n");
            out.send(conn, reply);
        }
    }

    fn on_close(&mut self, _: Instant, conn: ConnId, _: CloseReason) {
        self.subscribed.remove(&conn);
    }

    fn on_msg(&mut self, _: Instant, Job(line): Job, out: &mut Outbox) {
        for &conn in &self.subscribed {
            out.send(conn, Arc::clone(&line));
        }
        self.notify = line;
    }

    fn on_tick(&mut self, _: Instant, _: &mut Outbox) {}
}

/// The raw bytes of the `"id"` member's value, or `null`.
fn id_of(line: &[u8]) -> &[u8] {
    let key = b"\"id\":";
    let Some(start) = line
        .windows(key.len())
        .position(|w| w == key)
        .map(|p| p + key.len())
    else {
        return b"null";
    };
    let rest = line.get(start..).unwrap_or_default();
    let rest = rest.strip_prefix(b" ").unwrap_or(rest);
    let end = if rest.first() == Some(&b'"') {
        rest.iter()
            .skip(1)
            .position(|&b| b == b'"')
            .map_or(rest.len(), |p| p + 2)
    } else {
        rest.iter()
            .position(|&b| b == b',' || b == b'}')
            .unwrap_or(rest.len())
    };
    match rest.get(..end) {
        Some(v) if !v.is_empty() => v,
        _ => b"null",
    }
}

fn notify(job: u64) -> Arc<[u8]> {
    let ntime = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs()) as u32;
    // A plausible coinbase split around an 8+8-byte extranonce slot; any bytes do for a floor.
    let coinb1 = "01000000010000000000000000000000000000000000000000000000000000000000000000ffffffff2003a08601";
    let coinb2 = "0a636b706f6f6c2d7273ffffffff0100f2052a010000001976a914000000000000000000000000000000000000000088ac00000000";
    format!(
        "{{\"params\":[\"{job:016x}\",\"{:064x}\",\"{coinb1}\",\"{coinb2}\",[],\"20000000\",\"1d00ffff\",\"{ntime:08x}\",true],\"id\":null,\"method\":\"mining.notify\"}}\n",
        job
    )
    .into_bytes()
    .into()
}

struct Args {
    listen: SocketAddr,
    threads: Option<usize>,
    backend: BackendKind,
    every: Duration,
    duration: Duration,
}

fn parse_args() -> Result<Args, Box<dyn Error>> {
    let mut a = Args {
        listen: "127.0.0.1:23335".parse()?,
        threads: None,
        backend: BackendKind::Auto,
        every: Duration::from_secs(30),
        duration: Duration::from_secs(600),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--listen" => a.listen = value()?.parse()?,
            "--threads" => a.threads = Some(value()?.parse()?),
            "--backend" => {
                a.backend = value()?
                    .parse()
                    .map_err(|_| "backend: auto, epoll or uring")?
            }
            "--notify-every" => a.every = Duration::from_secs(value()?.parse::<u64>()?.max(1)),
            "--duration" => a.duration = Duration::from_secs(value()?.parse()?),
            other => return Err(format!("unknown option {other}").into()),
        }
    }
    Ok(a)
}

fn main() -> Result<(), Box<dyn Error>> {
    // The connector's own log lines (e.g. a slow loop round), as the pool prints them at its
    // default level; RUST_LOG overrides.
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .try_init();
    let args = parse_args()?;
    let nofile = ckpool_connector::raise_nofile_limit()?;
    let mut cfg = Config {
        listen: vec![args.listen],
        backend: args.backend,
        ..Config::default()
    };
    if let Some(t) = args.threads {
        cfg.threads = t;
    }
    let first = notify(1);
    let connector = ckpool_connector::start(cfg, move |_| NullStratum {
        subscribed: HashSet::new(),
        notify: Arc::clone(&first),
    })?;
    println!(
        "nullstratum pid={} backend={} threads={} nofile={nofile} listen={:?}",
        std::process::id(),
        connector.backend(),
        connector.threads(),
        connector.local_addrs()
    );
    let started = Instant::now();
    let mut job = 1u64;
    let mut next = started + args.every;
    let end = started + args.duration;
    while Instant::now() < end {
        std::thread::sleep(next.min(end).saturating_duration_since(Instant::now()));
        if Instant::now() >= next {
            job += 1;
            connector.broadcast(Job(notify(job)));
            next += args.every;
        }
    }
    connector.shutdown();
    Ok(())
}
