//! Hostile clients for soak runs (`ckload hostile`): run beside a `churn` or `steady` run, they
//! do what a pool must survive without growing, each at its own rate, until the duration is up.
//!
//! * **username flood**: connect, subscribe, authorize a username never used before, close;
//! * **subscribe churn**: connect, subscribe, close without authorizing;
//! * **never-readers**: a fixed number of connections that subscribe, authorize and then keep
//!   sending requests that each get a reply, with a small receive buffer and without ever
//!   reading, so the pool's queue for them only grows; when the pool closes one, another takes
//!   its place a second later;
//! * **oversize lines**: connect, subscribe, send one line longer than the pool takes, and wait
//!   for the pool to close the connection.
//!
//! Every connection is bounded in time ([`HostileSpec::conn_timeout`]) and in number
//! ([`HostileSpec::max_in_flight`] per kind); a start that would go over the bound is counted
//! as skipped rather than queued. Loopback only, like the rest of ckload.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpSocket, TcpStream};

use crate::Error;
use crate::run::ensure_loopback;

/// What `ckload hostile` does, and for how long.
#[derive(Clone, Debug)]
pub struct HostileSpec {
    /// Pool address (loopback).
    pub target: SocketAddr,
    /// Local address to bind (loopback), if any.
    pub source: Option<IpAddr>,
    /// How long the hostile clients run.
    pub duration: Duration,
    /// Usernames are `<user_prefix>flood<N>.w`, N counting up from 0.
    pub user_prefix: String,
    /// Username-flood connections started per second (0: none).
    pub user_flood_per_sec: f64,
    /// Subscribe-churn connections started per second (0: none).
    pub subscribe_churn_per_sec: f64,
    /// Never-reading connections held at once (0: none).
    pub never_readers: u32,
    /// Requests each never-reader sends per second.
    pub never_reader_lines_per_sec: f64,
    /// Oversize-line connections started per second (0: none).
    pub oversize_per_sec: f64,
    /// Bytes in an oversize line (before its newline).
    pub oversize_bytes: usize,
    /// Limit for one flood, churn or oversize connection from connect to close.
    pub conn_timeout: Duration,
    /// Most connections of one kind in flight at once.
    pub max_in_flight: u64,
}

impl HostileSpec {
    /// A spec with nothing enabled against `target`, for `duration`.
    pub fn new(target: SocketAddr, duration: Duration) -> Self {
        Self {
            target,
            source: None,
            duration,
            user_prefix: "hostile".to_owned(),
            user_flood_per_sec: 0.0,
            subscribe_churn_per_sec: 0.0,
            never_readers: 0,
            never_reader_lines_per_sec: 200.0,
            oversize_per_sec: 0.0,
            oversize_bytes: 64 * 1024,
            conn_timeout: Duration::from_secs(5),
            max_in_flight: 256,
        }
    }

    /// Checks the addresses (loopback only), the rates and the duration.
    pub fn validate(&self) -> Result<(), Error> {
        ensure_loopback(&self.target)?;
        if let Some(ip) = self.source
            && !ip.to_canonical().is_loopback()
        {
            return Err(Error::Config(format!(
                "source {ip} is not a loopback address"
            )));
        }
        if self.duration.is_zero() || self.duration > crate::run::MAX_DURATION {
            return Err(Error::Config(format!(
                "the duration must be in (0, {}] s",
                crate::run::MAX_DURATION.as_secs()
            )));
        }
        for (what, r) in [
            ("username flood rate", self.user_flood_per_sec),
            ("subscribe churn rate", self.subscribe_churn_per_sec),
            ("never-reader line rate", self.never_reader_lines_per_sec),
            ("oversize rate", self.oversize_per_sec),
        ] {
            if !(r.is_finite() && (0.0..=10_000.0).contains(&r)) {
                return Err(Error::Config(format!(
                    "{what} must be in 0..=10000 per second"
                )));
            }
        }
        if self.never_readers > 10_000 || self.max_in_flight == 0 {
            return Err(Error::Config(
                "never-readers must be at most 10000 and max in flight at least 1".to_owned(),
            ));
        }
        if self.user_prefix.is_empty() || self.user_prefix.chars().any(char::is_control) {
            return Err(Error::Config(
                "the user prefix must be non-empty, without control characters".to_owned(),
            ));
        }
        Ok(())
    }
}

/// What happened to one kind of hostile connection.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct KindReport {
    /// Connections started.
    pub started: u64,
    /// Connections the pool accepted (TCP connect succeeded).
    pub connected: u64,
    /// Connections that did all their kind does (flood: authorize reply read; churn: subscribe
    /// reply read; never-reader: held until the end; oversize: closed by the pool).
    pub completed: u64,
    /// Connections the pool closed (EOF or reset seen).
    pub closed_by_pool: u64,
    /// Connect failures, timeouts and other errors.
    pub failed: u64,
    /// Starts skipped because `max_in_flight` connections of the kind were open.
    pub skipped: u64,
}

/// The report of a hostile run.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct HostileReport {
    /// Seconds from start to the last connection's end.
    pub elapsed_secs: u64,
    /// Username flood.
    pub user_flood: KindReport,
    /// Subscribe churn.
    pub subscribe_churn: KindReport,
    /// Never-readers (`started` counts each connection, reconnections included).
    pub never_reader: KindReport,
    /// Oversize lines.
    pub oversize: KindReport,
    /// Requests the never-readers wrote.
    pub never_reader_lines: u64,
}

#[derive(Default)]
struct Counters {
    started: AtomicU64,
    connected: AtomicU64,
    completed: AtomicU64,
    closed_by_pool: AtomicU64,
    failed: AtomicU64,
    skipped: AtomicU64,
    in_flight: AtomicU64,
}

impl Counters {
    fn report(&self) -> KindReport {
        KindReport {
            started: self.started.load(Ordering::Relaxed),
            connected: self.connected.load(Ordering::Relaxed),
            completed: self.completed.load(Ordering::Relaxed),
            closed_by_pool: self.closed_by_pool.load(Ordering::Relaxed),
            failed: self.failed.load(Ordering::Relaxed),
            skipped: self.skipped.load(Ordering::Relaxed),
        }
    }
    fn bump(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }
}

#[derive(Clone, Copy)]
enum Kind {
    UserFlood,
    SubscribeChurn,
    Oversize,
}

/// How one connection ended.
enum End {
    Completed,
    ClosedByPool,
    Failed,
}

/// Runs the hostile clients of `spec` until its duration is up (plus at most one connection
/// timeout), on a runtime of its own.
pub fn run(spec: &HostileSpec) -> Result<HostileReport, Error> {
    spec.validate()?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|source| Error::Io {
            what: "starting the hostile runtime".to_owned(),
            source,
        })?;
    Ok(rt.block_on(run_async(Arc::new(spec.clone()))))
}

async fn run_async(spec: Arc<HostileSpec>) -> HostileReport {
    let start = Instant::now();
    let deadline = tokio::time::Instant::now() + spec.duration;
    let flood = Arc::new(Counters::default());
    let churn = Arc::new(Counters::default());
    let oversize = Arc::new(Counters::default());
    let never = Arc::new(Counters::default());
    let lines = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for (kind, rate, counters) in [
        (Kind::UserFlood, spec.user_flood_per_sec, &flood),
        (Kind::SubscribeChurn, spec.subscribe_churn_per_sec, &churn),
        (Kind::Oversize, spec.oversize_per_sec, &oversize),
    ] {
        if rate > 0.0 {
            tasks.push(tokio::spawn(spawner(
                Arc::clone(&spec),
                kind,
                rate,
                Arc::clone(counters),
                deadline,
            )));
        }
    }
    for i in 0..spec.never_readers {
        tasks.push(tokio::spawn(never_reader(
            Arc::clone(&spec),
            i,
            Arc::clone(&never),
            Arc::clone(&lines),
            deadline,
        )));
    }
    for t in tasks {
        let _ = t.await;
    }
    HostileReport {
        elapsed_secs: start.elapsed().as_secs(),
        user_flood: flood.report(),
        subscribe_churn: churn.report(),
        never_reader: never.report(),
        oversize: oversize.report(),
        never_reader_lines: lines.load(Ordering::Relaxed),
    }
}

/// Starts connections of `kind` at `rate` per second until `deadline`, then waits for those in
/// flight.
async fn spawner(
    spec: Arc<HostileSpec>,
    kind: Kind,
    rate: f64,
    c: Arc<Counters>,
    deadline: tokio::time::Instant,
) {
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut n: u64 = 0;
    let mut running = Vec::new();
    loop {
        tick.tick().await;
        if tokio::time::Instant::now() >= deadline {
            break;
        }
        if c.in_flight.load(Ordering::Relaxed) >= spec.max_in_flight {
            Counters::bump(&c.skipped);
            continue;
        }
        Counters::bump(&c.started);
        c.in_flight.fetch_add(1, Ordering::Relaxed);
        let (spec, c2) = (Arc::clone(&spec), Arc::clone(&c));
        let id = n;
        n += 1;
        running.push(tokio::spawn(async move {
            let end = tokio::time::timeout(spec.conn_timeout, one(&spec, kind, id, &c2))
                .await
                .unwrap_or(End::Failed);
            Counters::bump(match end {
                End::Completed => &c2.completed,
                End::ClosedByPool => &c2.closed_by_pool,
                End::Failed => &c2.failed,
            });
            c2.in_flight.fetch_sub(1, Ordering::Relaxed);
        }));
        running.retain(|t: &tokio::task::JoinHandle<()>| !t.is_finished());
    }
    for t in running {
        let _ = t.await;
    }
}

async fn connect(spec: &HostileSpec, recv_buffer: Option<u32>) -> std::io::Result<TcpStream> {
    let sock = if spec.target.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    if let Some(ip) = spec.source {
        sock.bind(SocketAddr::new(ip, 0))?;
    }
    if let Some(size) = recv_buffer {
        sock.set_recv_buffer_size(size)?;
    }
    sock.connect(spec.target).await
}

fn subscribe_line(id: u64) -> String {
    format!("{{\"id\":{id},\"method\":\"mining.subscribe\",\"params\":[\"ckload-hostile/0.1\"]}}\n")
}

fn authorize_line(id: u64, user: &str) -> String {
    let user = serde_json::Value::from(user);
    format!("{{\"id\":{id},\"method\":\"mining.authorize\",\"params\":[{user},\"x\"]}}\n")
}

/// Reads lines until one answers `id` (completed), the pool closes (closed by pool) or an error.
async fn await_reply(r: &mut BufReader<tokio::net::tcp::ReadHalf<'_>>, id: u64) -> End {
    let mut line = String::new();
    loop {
        line.clear();
        match r.read_line(&mut line).await {
            Ok(0) => return End::ClosedByPool,
            Ok(_) => {
                let answers = serde_json::from_str::<serde_json::Value>(&line)
                    .ok()
                    .and_then(|v| v.get("id").and_then(serde_json::Value::as_u64))
                    == Some(id);
                if answers {
                    return End::Completed;
                }
            }
            Err(e) if is_reset(&e) => return End::ClosedByPool,
            Err(_) => return End::Failed,
        }
    }
}

fn is_reset(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::{BrokenPipe, ConnectionAborted, ConnectionReset};
    matches!(e.kind(), ConnectionReset | BrokenPipe | ConnectionAborted)
}

async fn one(spec: &HostileSpec, kind: Kind, n: u64, c: &Counters) -> End {
    let Ok(mut stream) = connect(spec, None).await else {
        return End::Failed;
    };
    Counters::bump(&c.connected);
    let (r, mut w) = stream.split();
    let mut r = BufReader::new(r);
    let mut out = subscribe_line(1);
    match kind {
        Kind::UserFlood => {
            out.push_str(&authorize_line(
                2,
                &format!("{}flood{n}.w", spec.user_prefix),
            ));
        }
        Kind::SubscribeChurn => {}
        Kind::Oversize => {
            out.push_str("{\"id\":2,\"method\":\"mining.authorize\",\"params\":[\"");
            out.extend(std::iter::repeat_n('x', spec.oversize_bytes));
            out.push_str("\",\"x\"]}\n");
        }
    }
    match w.write_all(out.as_bytes()).await {
        Ok(()) => {}
        Err(e) if is_reset(&e) => return End::ClosedByPool,
        Err(_) => return End::Failed,
    }
    match kind {
        Kind::UserFlood => await_reply(&mut r, 2).await,
        Kind::SubscribeChurn => await_reply(&mut r, 1).await,
        Kind::Oversize => {
            // Completed once the pool closes: read (and drop) whatever comes until then.
            let mut buf = [0u8; 4096];
            loop {
                match r.read(&mut buf).await {
                    Ok(0) => return End::Completed,
                    Ok(_) => {}
                    Err(e) if is_reset(&e) => return End::Completed,
                    Err(_) => return End::Failed,
                }
            }
        }
    }
}

/// One never-reader slot: holds a connection that never reads until `deadline`, reconnecting a
/// second after the pool closes it.
async fn never_reader(
    spec: Arc<HostileSpec>,
    slot: u32,
    c: Arc<Counters>,
    lines: Arc<AtomicU64>,
    deadline: tokio::time::Instant,
) {
    let period = Duration::from_secs_f64(1.0 / spec.never_reader_lines_per_sec.max(0.01));
    let mut id: u64 = 10;
    while tokio::time::Instant::now() < deadline {
        Counters::bump(&c.started);
        let stream = tokio::time::timeout(spec.conn_timeout, connect(&spec, Some(4096))).await;
        let Ok(Ok(mut stream)) = stream else {
            Counters::bump(&c.failed);
            tokio::time::sleep_until(deadline.min(tokio::time::Instant::now() + ONE_SEC)).await;
            continue;
        };
        Counters::bump(&c.connected);
        let mut out = subscribe_line(1);
        out.push_str(&authorize_line(
            2,
            &format!("{}reader{slot}.w", spec.user_prefix),
        ));
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let end = loop {
            let write = tokio::time::timeout_at(deadline, stream.write_all(out.as_bytes())).await;
            match write {
                // Still open at the end: held for the whole run.
                Err(_) => break End::Completed,
                Ok(Ok(())) => lines.fetch_add(1, Ordering::Relaxed),
                Ok(Err(e)) if is_reset(&e) => break End::ClosedByPool,
                Ok(Err(_)) => break End::Failed,
            };
            // A request every tick that the pool answers (an unknown method gets an error).
            id += 1;
            out = format!("{{\"id\":{id},\"method\":\"mining.ckload_noop\",\"params\":[]}}\n");
            if tokio::time::timeout_at(deadline, tick.tick())
                .await
                .is_err()
            {
                break End::Completed;
            }
        };
        Counters::bump(match end {
            End::Completed => &c.completed,
            End::ClosedByPool => &c.closed_by_pool,
            End::Failed => &c.failed,
        });
        drop(stream);
        tokio::time::sleep_until(deadline.min(tokio::time::Instant::now() + ONE_SEC)).await;
    }
}

const ONE_SEC: Duration = Duration::from_secs(1);

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, reason = "test code")]
mod tests {
    use std::collections::HashSet;
    use std::sync::Mutex;

    use super::*;
    use tokio::net::TcpListener;

    /// A fake pool: answers subscribe and authorize, records usernames, closes a connection on a
    /// line over 1,000 bytes, and closes a connection after its 20th line (like an outbound
    /// limit would close a peer that never reads).
    async fn fake_pool(listener: TcpListener, users: Arc<Mutex<HashSet<String>>>) {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            let users = Arc::clone(&users);
            tokio::spawn(async move {
                let (r, mut w) = s.split();
                let mut r = BufReader::new(r);
                let mut line = String::new();
                for _ in 0..20 {
                    line.clear();
                    match r.read_line(&mut line).await {
                        Ok(0) | Err(_) => return,
                        Ok(_) => {}
                    }
                    if line.len() > 1000 {
                        return;
                    }
                    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
                    if v["method"] == "mining.authorize" {
                        let user = v["params"][0].as_str().unwrap().to_owned();
                        users.lock().unwrap().insert(user);
                    }
                    let reply = format!("{{\"id\":{},\"result\":true,\"error\":null}}\n", v["id"]);
                    if w.write_all(reply.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    }

    #[test]
    fn each_hostile_kind_does_what_it_counts() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let users = Arc::new(Mutex::new(HashSet::new()));
        let listener = rt
            .block_on(TcpListener::bind("127.0.0.1:0"))
            .expect("loopback listener");
        let addr = listener.local_addr().unwrap();
        let pool = rt.spawn(fake_pool(listener, Arc::clone(&users)));
        let mut spec = HostileSpec::new(addr, Duration::from_secs(2));
        spec.user_prefix = "t".to_owned();
        spec.user_flood_per_sec = 20.0;
        spec.subscribe_churn_per_sec = 20.0;
        spec.oversize_per_sec = 5.0;
        spec.oversize_bytes = 5000;
        spec.never_readers = 2;
        spec.never_reader_lines_per_sec = 50.0;
        let report = rt.block_on(run_async(Arc::new(spec)));
        pool.abort();

        let f = &report.user_flood;
        assert!(f.started >= 10, "{report:?}");
        assert_eq!(f.completed, f.started, "{report:?}");
        // Every flood connection used a username of its own.
        let users = users.lock().unwrap();
        let flood = users.iter().filter(|u| u.starts_with("tflood")).count();
        assert_eq!(flood as u64, f.started, "{users:?}");
        let c = &report.subscribe_churn;
        assert!(c.started >= 10 && c.completed == c.started, "{report:?}");
        let o = &report.oversize;
        assert!(o.started >= 2 && o.completed == o.started, "{report:?}");
        // Each never-reader was closed after 20 lines and came back.
        let n = &report.never_reader;
        assert!(n.closed_by_pool >= 2 && n.started > 2, "{report:?}");
        assert!(users.contains("treader0.w") && users.contains("treader1.w"));
        assert!(report.never_reader_lines >= 40, "{report:?}");
    }

    #[test]
    fn only_loopback_and_sane_rates_are_accepted() {
        let lo = SocketAddr::from(([127, 0, 0, 1], 3333));
        let ok = HostileSpec::new(lo, Duration::from_secs(1));
        assert!(ok.validate().is_ok());
        let far = HostileSpec::new(SocketAddr::from(([10, 0, 0, 1], 3333)), ONE_SEC);
        assert!(far.validate().is_err());
        let mut src = ok.clone();
        src.source = Some(IpAddr::from([192, 168, 1, 2]));
        assert!(src.validate().is_err());
        let mut rate = ok.clone();
        rate.user_flood_per_sec = f64::NAN;
        assert!(rate.validate().is_err());
        let mut forever = ok;
        forever.duration = Duration::ZERO;
        assert!(forever.validate().is_err());
    }
}
