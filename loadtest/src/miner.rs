//! A small real CPU stratum v1 miner.
//!
//! [`Miner::start`] connects to a pool and runs two threads:
//!
//! * the **reader** drives the session through `common::stratum::client`: it sends
//!   `mining.configure` (when version rolling is asked for), `mining.subscribe` (retried once
//!   without params if refused) and `mining.authorize` one after the other, handles the pool's
//!   notifications and gets each submit's verdict matched to it by id;
//! * the **grinder** hashes the newest job (extranonce2 counter, then rolled version, then nonce),
//!   submitting every hash that meets the share target or the network target, under a rate limit.
//!   A job's shares must meet the harder of the difficulty in force when the job arrived and the
//!   current one, so a share is valid whether the pool applies a difficulty change to older jobs
//!   or only to later ones.
//!
//! Counting is exact: every submit is counted once in [`MinerReport::submitted`] and, once its
//! reply arrives, once in either `accepted` or `rejected`. Submits still unanswered when the miner
//! stops are counted in [`MinerReport::unanswered`] only.
//!
//! Events ([`MinerEvent`]) go to every receiver obtained from [`Miner::start_with_events`] (which
//! sees everything from the first byte) or [`Miner::events`] (which sees events from the call on).
//! Without receivers nothing is queued, so a long-running miner does not grow.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::hash::sha256d_header;
use common::{Difficulty, Target};
use serde::Serialize;
use serde_json::Value;
use tracing::{debug, info, trace, warn};

use common::stratum::client::{Client, ClientConfig, Event, RequestKind};
use common::stratum::{Parser, decode, write};

use crate::work::{self, Job, VersionRoller};

/// Longest line accepted from the pool before the connection is given up.
const MAX_LINE: usize = 1 << 20;
/// Hashes per grinding batch between checks for new work, stop and the current difficulty.
const BATCH: u32 = 2048;
/// How long the reader blocks on the socket before checking timers and the stop flag.
const READ_POLL: Duration = Duration::from_millis(50);

/// Settings for one miner.
#[derive(Clone, Debug)]
pub struct MinerConfig {
    /// Pool address.
    pub addr: SocketAddr,
    /// Worker name for `mining.authorize` and `mining.submit` (e.g. `"addr.worker1"` or `"alice"`).
    pub user: String,
    /// Password for `mining.authorize`.
    pub pass: String,
    /// User agent sent as the first `mining.subscribe` parameter.
    pub user_agent: String,
    /// `Some(mask)`: send `mining.configure` first and roll version bits inside the mask the
    /// pool grants (intersected with this one).
    pub version_rolling: Option<u32>,
    /// Most submits per second; grinding pauses while over the rate. Zero, negative or infinite
    /// means unlimited.
    pub max_shares_per_sec: f64,
    /// After submitting a hash that meets the network target, stop grinding until a job with
    /// another id arrives (the same job re-sent, e.g. after a difficulty change, stays paused).
    pub pause_after_block: bool,
    /// Stop after this many block solutions were accepted by the pool.
    pub stop_after_blocks: Option<u64>,
    /// Overall time limit, counted from [`Miner::start`].
    pub duration: Option<Duration>,
    /// Session id to resume, sent as the second `mining.subscribe` parameter.
    pub session_id: Option<String>,
    /// Limit for the TCP connect.
    pub connect_timeout: Duration,
    /// Limit for each handshake reply (configure, subscribe, authorize). A pool that does not
    /// answer `mining.configure` in time is used without version rolling; no answer to subscribe
    /// or authorize stops the miner with an error.
    pub handshake_timeout: Duration,
    /// When stopping, how long to keep reading for the replies to outstanding submits.
    pub drain_timeout: Duration,
    /// Send `mining.extranonce.subscribe` after subscribing (and so take
    /// `mining.set_extranonce` from the pool).
    pub extranonce_subscribe: bool,
}

impl MinerConfig {
    /// Defaults: password `"x"`, user agent `"ckload/0.1"`, no version rolling, 20 shares/s,
    /// pause after a block, no block or time limit, no session resume.
    pub fn new(addr: SocketAddr, user: impl Into<String>) -> Self {
        Self {
            addr,
            user: user.into(),
            pass: "x".to_owned(),
            user_agent: "ckload/0.1".to_owned(),
            version_rolling: None,
            max_shares_per_sec: 20.0,
            pause_after_block: true,
            stop_after_blocks: None,
            duration: None,
            session_id: None,
            connect_timeout: Duration::from_secs(10),
            handshake_timeout: Duration::from_secs(10),
            drain_timeout: Duration::from_secs(2),
            extranonce_subscribe: false,
        }
    }
}

/// Something that happened on a miner's connection.
#[derive(Clone, Debug, PartialEq)]
pub enum MinerEvent {
    /// The subscribe reply arrived.
    Subscribed {
        /// Extranonce1 as hex.
        extranonce1: String,
        /// Extranonce2 size in bytes.
        nonce2_len: usize,
        /// The session id the pool gave for `mining.notify`, if any.
        session: Option<String>,
    },
    /// The authorize reply arrived (true when accepted).
    Authorized(bool),
    /// A `mining.set_difficulty` arrived.
    Difficulty(f64),
    /// A `mining.notify` arrived and was decoded.
    Notify {
        /// When the line was read.
        at: Instant,
        /// The pool's job id.
        job_id: String,
        /// Previous block hash in RPC hex order.
        prevhash_rpc: String,
        /// The clean-jobs flag.
        clean: bool,
    },
    /// The reply to a submit arrived.
    ShareResult {
        /// Whether the pool accepted it.
        accepted: bool,
        /// The reject reason, when rejected.
        reason: Option<String>,
        /// Whether the share met the network target.
        block: bool,
    },
    /// The connection ended (closed by the pool, broken, or the miner stopped). Always the last
    /// event.
    Disconnected,
}

/// Counters and state of a miner; a snapshot while it runs, final after it stops.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct MinerReport {
    /// Submits the pool accepted.
    pub accepted: u64,
    /// Submits the pool rejected.
    pub rejected: u64,
    /// Rejects by reason text.
    pub reject_reasons: BTreeMap<String, u64>,
    /// Submits sent.
    pub submitted: u64,
    /// Submits still waiting for a reply (at the end: never answered).
    pub unanswered: u64,
    /// Submits that met the network target.
    pub blocks_submitted: u64,
    /// Of those, the ones the pool accepted.
    pub blocks_accepted: u64,
    /// Hashes (RPC hex order) of the block solutions the pool accepted.
    pub block_hashes: Vec<String>,
    /// Jobs received.
    pub notifies: u64,
    /// The last difficulty the pool set.
    pub last_difficulty: Option<f64>,
    /// Extranonce1 (hex) from the subscribe reply or the last `mining.set_extranonce`.
    pub extranonce1: Option<String>,
    /// Session id from the subscribe reply.
    pub session_id: Option<String>,
    /// Authorize result, once known.
    pub authorized: Option<bool>,
    /// The version-rolling mask in use, if negotiated (JSON: 8 hex digits).
    #[serde(serialize_with = "ser_hex_mask")]
    pub version_mask: Option<u32>,
    /// Hashes computed.
    pub hashes: u64,
    /// Seconds since the miner started.
    pub elapsed_secs: f64,
    /// Why the miner stopped early or what went wrong (first error only).
    pub error: Option<String>,
}

fn ser_hex_mask<S: serde::Serializer>(mask: &Option<u32>, s: S) -> Result<S::Ok, S::Error> {
    match mask {
        Some(m) => s.serialize_some(&format!("{m:08x}")),
        None => s.serialize_none(),
    }
}

/// A running miner. Dropping it stops it without waiting for outstanding replies.
pub struct Miner {
    shared: Arc<Shared>,
    stream: TcpStream,
    reader: Option<JoinHandle<()>>,
    grinder: Option<JoinHandle<()>>,
}

impl Miner {
    /// Connects and spawns the reader and grinder threads.
    pub fn start(cfg: MinerConfig) -> io::Result<Self> {
        Self::spawn(cfg, Vec::new())
    }

    /// Like [`Miner::start`], returning a receiver that sees every event from the start.
    pub fn start_with_events(cfg: MinerConfig) -> io::Result<(Self, Receiver<MinerEvent>)> {
        let (tx, rx) = mpsc::channel();
        Ok((Self::spawn(cfg, vec![tx])?, rx))
    }

    /// A new receiver for the events from now on (earlier events are not replayed).
    pub fn events(&self) -> Receiver<MinerEvent> {
        let (tx, rx) = mpsc::channel();
        lock(&self.shared.subscribers).push(tx);
        rx
    }

    /// A snapshot of the counters.
    pub fn report(&self) -> MinerReport {
        self.shared.snapshot()
    }

    /// Whether the miner has stopped by itself (limit reached, error or disconnect).
    pub fn is_finished(&self) -> bool {
        self.shared.done.load(Ordering::Acquire)
    }

    /// Asks the miner to stop without waiting; [`Miner::stop`] or [`Miner::wait`] collect it.
    pub fn request_stop(&self) {
        self.shared.request_stop();
    }

    /// Stops grinding, waits up to [`MinerConfig::drain_timeout`] for outstanding replies, closes
    /// the connection and returns the final report.
    pub fn stop(mut self) -> MinerReport {
        self.shared.request_stop();
        self.join();
        self.shared.snapshot()
    }

    /// Waits until the miner stops by itself or `deadline` passes, then stops it.
    pub fn wait(self, deadline: Duration) -> MinerReport {
        let end = Instant::now() + deadline;
        while !self.is_finished() && Instant::now() < end {
            std::thread::sleep(Duration::from_millis(10));
        }
        self.stop()
    }

    fn spawn(cfg: MinerConfig, subscribers: Vec<Sender<MinerEvent>>) -> io::Result<Self> {
        let stream = TcpStream::connect_timeout(&cfg.addr, cfg.connect_timeout)?;
        stream.set_nodelay(true)?;
        stream.set_write_timeout(Some(Duration::from_secs(10)))?;
        let read_stream = stream.try_clone()?;
        read_stream.set_read_timeout(Some(READ_POLL))?;
        let writer = stream.try_clone()?;
        let shared = Arc::new(Shared {
            started: Instant::now(),
            stop: AtomicBool::new(false),
            done: AtomicBool::new(false),
            hashes: AtomicU64::new(0),
            work: Mutex::new(WorkState {
                job: None,
                generation: 0,
                share_target: Difficulty::ONE.target(),
                authorized: false,
                extranonce1: None,
                nonce2_len: 0,
                mask: None,
            }),
            work_cv: Condvar::new(),
            stats: Mutex::new(Stats::default()),
            proto: Mutex::new(Proto {
                client: Client::new(
                    Arc::new(client_config(&cfg)),
                    &cfg.user,
                    cfg.session_id.as_deref(),
                ),
                parser: Parser::new(),
                out: Vec::with_capacity(512),
            }),
            writer: Mutex::new(writer),
            subscribers: Mutex::new(subscribers),
            cfg,
        });
        let mut miner = Self {
            shared: Arc::clone(&shared),
            stream,
            reader: None,
            grinder: None,
        };
        let s = Arc::clone(&shared);
        miner.reader = Some(
            std::thread::Builder::new()
                .name("ckload-reader".into())
                .spawn(move || Reader::new(s, read_stream).run())?,
        );
        let s = Arc::clone(&shared);
        miner.grinder = Some(
            std::thread::Builder::new()
                .name("ckload-grinder".into())
                .spawn(move || grind(&s))?,
        );
        Ok(miner)
    }

    fn join(&mut self) {
        if let Some(g) = self.grinder.take()
            && g.join().is_err()
        {
            self.shared.set_error("grinder thread panicked".into());
        }
        if let Some(r) = self.reader.take()
            && r.join().is_err()
        {
            self.shared.set_error("reader thread panicked".into());
        }
        // Already closed by the peer in most cases; errors here change nothing.
        let _ = self.stream.shutdown(Shutdown::Both);
    }
}

impl Drop for Miner {
    fn drop(&mut self) {
        if self.reader.is_some() || self.grinder.is_some() {
            self.shared.request_stop();
            // Unblock the reader at once instead of draining.
            let _ = self.stream.shutdown(Shutdown::Both);
            self.join();
        }
    }
}

/// The stratum client settings for a miner: submits are never given up (those unanswered when it
/// stops are counted as such).
fn client_config(cfg: &MinerConfig) -> ClientConfig {
    let mut c = ClientConfig::new(cfg.user_agent.clone());
    c.pass.clone_from(&cfg.pass);
    c.version_rolling = cfg.version_rolling;
    c.extranonce_subscribe = cfg.extranonce_subscribe;
    c.request_timeout = cfg.handshake_timeout;
    c.submit_timeout = None;
    c
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A job as the grinder works it: the decoded notify plus what applied when it arrived.
#[derive(Debug)]
struct ActiveJob {
    job: Job,
    /// The job id as a JSON string literal, for submits.
    id_json: String,
    generation: u64,
    extranonce1: Vec<u8>,
    nonce2_len: usize,
    share_target: Target,
    net_target: Target,
    roller: VersionRoller,
}

struct WorkState {
    job: Option<Arc<ActiveJob>>,
    generation: u64,
    share_target: Target,
    authorized: bool,
    extranonce1: Option<Vec<u8>>,
    nonce2_len: usize,
    mask: Option<u32>,
}

#[derive(Clone, Copy, Debug)]
struct PendingSubmit {
    block: bool,
    hash: [u8; 32],
}

#[derive(Default)]
struct Stats {
    report: MinerReport,
}

/// The stratum client with its buffers: the reader feeds it lines, the grinder submits through
/// it (lock order: `proto` before `stats` and `work`).
struct Proto {
    client: Client<PendingSubmit>,
    parser: Parser,
    out: Vec<u8>,
}

struct Shared {
    cfg: MinerConfig,
    started: Instant,
    stop: AtomicBool,
    done: AtomicBool,
    hashes: AtomicU64,
    work: Mutex<WorkState>,
    work_cv: Condvar,
    stats: Mutex<Stats>,
    proto: Mutex<Proto>,
    writer: Mutex<TcpStream>,
    subscribers: Mutex<Vec<Sender<MinerEvent>>>,
}

impl Shared {
    fn stopping(&self) -> bool {
        self.stop.load(Ordering::Acquire)
    }

    fn request_stop(&self) {
        self.stop.store(true, Ordering::Release);
        let _guard = lock(&self.work);
        self.work_cv.notify_all();
    }

    fn set_error(&self, msg: String) {
        let mut st = lock(&self.stats);
        if st.report.error.is_none() {
            st.report.error = Some(msg);
        }
    }

    fn fail(&self, msg: String) {
        warn!("{msg}");
        self.set_error(msg);
        self.request_stop();
    }

    fn emit(&self, ev: MinerEvent) {
        let mut subs = lock(&self.subscribers);
        if !subs.is_empty() {
            subs.retain(|s| s.send(ev.clone()).is_ok());
        }
    }

    fn snapshot(&self) -> MinerReport {
        let mut r = lock(&self.stats).report.clone();
        r.unanswered = lock(&self.proto).client.pending_submits() as u64;
        r.hashes = self.hashes.load(Ordering::Relaxed);
        r.elapsed_secs = self.started.elapsed().as_secs_f64();
        r
    }

    /// Writes what the client queued in `out` (if anything) and empties it.
    fn flush(&self, out: &mut Vec<u8>) -> io::Result<()> {
        if out.is_empty() {
            return Ok(());
        }
        if tracing::enabled!(tracing::Level::TRACE) {
            trace!(">> {}", String::from_utf8_lossy(out).trim_end());
        }
        let r = lock(&self.writer).write_all(out);
        out.clear();
        r
    }

    fn submit(&self, job: &ActiveJob, found: &Found) {
        let written = {
            let mut p = lock(&self.proto);
            let Proto { client, out, .. } = &mut *p;
            out.clear();
            client.submit(
                Instant::now(),
                out,
                &job.id_json,
                &found.extranonce2,
                job.job.ntime,
                found.nonce,
                found.version_bits,
                PendingSubmit {
                    block: found.block,
                    hash: found.hash,
                },
            );
            {
                let mut st = lock(&self.stats);
                st.report.submitted += 1;
                if found.block {
                    st.report.blocks_submitted += 1;
                }
            }
            self.flush(out)
        };
        if found.block {
            info!(
                "block solution {} for job {}, submitting",
                work::hash_to_rpc_hex(&found.hash),
                job.job.job_id
            );
        }
        if let Err(e) = written {
            // It stays pending and ends up as unanswered.
            self.fail(format!("writing mining.submit: {e}"));
        }
    }
}

/// Extracts a reject reason from a reply: `error` as `[code, msg, …]`, a string or an object with
/// `message`, else ckpool's `reject-reason`, else `"unknown"`.
pub fn reject_reason(reply: &Value) -> String {
    decode::reject_reason(
        reply.get("error"),
        reply.get("reject-reason").and_then(Value::as_str),
    )
    .into_owned()
}

struct Reader {
    shared: Arc<Shared>,
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Reader {
    fn new(shared: Arc<Shared>, stream: TcpStream) -> Self {
        Self {
            shared,
            stream,
            buf: Vec::new(),
        }
    }

    fn run(mut self) {
        self.begin();
        self.read_loop();
        self.shared.request_stop();
        let _ = self.stream.shutdown(Shutdown::Both);
        self.shared.done.store(true, Ordering::Release);
        debug!("reader finished");
        self.shared.emit(MinerEvent::Disconnected);
    }

    fn begin(&mut self) {
        let written = {
            let mut p = lock(&self.shared.proto);
            let Proto { client, out, .. } = &mut *p;
            client.start(Instant::now(), out);
            self.shared.flush(out)
        };
        if let Err(e) = written {
            self.shared.fail(format!("writing the handshake: {e}"));
        }
    }

    fn read_loop(&mut self) {
        let mut chunk = vec![0u8; 16 * 1024];
        let mut drain_until: Option<Instant> = None;
        loop {
            let now = Instant::now();
            if let Some(d) = self.shared.cfg.duration
                && now >= self.shared.started + d
                && !self.shared.stopping()
            {
                info!("time limit reached");
                self.shared.request_stop();
            }
            self.check_handshake_timeout(now);
            if self.shared.stopping() {
                let until = *drain_until.get_or_insert(now + self.shared.cfg.drain_timeout);
                if lock(&self.shared.proto).client.pending_submits() == 0 || now >= until {
                    return;
                }
            }
            match self.stream.read(&mut chunk) {
                Ok(0) => {
                    if !self.shared.stopping() {
                        self.shared.fail("connection closed by the pool".into());
                    }
                    return;
                }
                Ok(n) => {
                    self.buf.extend_from_slice(&chunk[..n]);
                    let mut start = 0;
                    while let Some(pos) = self.buf[start..].iter().position(|&b| b == b'\n') {
                        let end = start + pos;
                        let line = std::mem::take(&mut self.buf);
                        self.handle_line(&line[start..end]);
                        self.buf = line;
                        start = end + 1;
                    }
                    self.buf.drain(..start);
                    if self.buf.len() > MAX_LINE {
                        self.shared
                            .fail(format!("line from the pool longer than {MAX_LINE} bytes"));
                        return;
                    }
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock
                            | io::ErrorKind::TimedOut
                            | io::ErrorKind::Interrupted
                    ) => {}
                Err(e) => {
                    if !self.shared.stopping() {
                        self.shared.fail(format!("reading from the pool: {e}"));
                    }
                    return;
                }
            }
        }
    }

    fn check_handshake_timeout(&mut self, now: Instant) {
        if self.shared.stopping() {
            return;
        }
        let mut events = Vec::new();
        let written = {
            let mut p = lock(&self.shared.proto);
            if p.client.deadline().is_none_or(|d| d > now) {
                return;
            }
            let Proto { client, out, .. } = &mut *p;
            while let Some(ev) = client.poll(now, out) {
                events.push(ev);
            }
            self.shared.flush(out)
        };
        if let Err(e) = written {
            self.shared.fail(format!("writing to the pool: {e}"));
        }
        for ev in events {
            match ev {
                Event::VersionRolling(None) => {
                    warn!("no reply to mining.configure, continuing without version rolling");
                }
                Event::TimedOut(RequestKind::Subscribe) => {
                    self.shared.fail("no reply to mining.subscribe".into());
                }
                Event::TimedOut(RequestKind::Authorize) => {
                    self.shared.fail("no reply to mining.authorize".into());
                }
                other => self.on_event(other),
            }
        }
    }

    fn handle_line(&mut self, raw: &[u8]) {
        if tracing::enabled!(tracing::Level::TRACE) {
            trace!("<< {}", String::from_utf8_lossy(raw).trim());
        }
        let (event, written) = {
            let mut p = lock(&self.shared.proto);
            let Proto {
                client,
                parser,
                out,
            } = &mut *p;
            let ev = client.feed(parser, raw, Instant::now(), out);
            (ev, self.shared.flush(out))
        };
        if let Err(e) = written {
            self.shared.fail(format!("writing to the pool: {e}"));
        }
        if let Some(ev) = event {
            self.on_event(ev);
        }
    }

    fn on_event(&mut self, ev: Event<PendingSubmit>) {
        match ev {
            Event::VersionRolling(mask) => self.on_version_rolling(mask),
            Event::Subscribed {
                extranonce1,
                nonce2_len,
                session,
                ..
            } => self.on_subscribed(extranonce1, nonce2_len, session),
            Event::SubscribeFailed { reason } => {
                self.shared.fail(format!("subscribe failed: {reason}"));
            }
            Event::Authorized { .. } => {
                lock(&self.shared.stats).report.authorized = Some(true);
                self.shared.emit(MinerEvent::Authorized(true));
                info!("authorized as {}", self.shared.cfg.user);
                let mut ws = lock(&self.shared.work);
                ws.authorized = true;
                self.shared.work_cv.notify_all();
            }
            Event::Refused { reason } => {
                lock(&self.shared.stats).report.authorized = Some(false);
                self.shared.emit(MinerEvent::Authorized(false));
                self.shared.fail(format!("authorize failed: {reason}"));
            }
            Event::Job(job) => self.on_notify(*job),
            Event::Difficulty(diff) => self.on_set_difficulty(diff),
            Event::Extranonce {
                extranonce1,
                nonce2_len,
            } => {
                info!(
                    "new extranonce1 {} with {nonce2_len} byte extranonce2 (from the next job)",
                    hex::encode(&extranonce1)
                );
                lock(&self.shared.stats).report.extranonce1 = Some(hex::encode(&extranonce1));
                let mut ws = lock(&self.shared.work);
                ws.extranonce1 = Some(extranonce1);
                ws.nonce2_len = nonce2_len;
            }
            Event::VersionMask(mask) => {
                if self.shared.cfg.version_rolling.is_none() {
                    debug!("ignoring mining.set_version_mask: version rolling not asked for");
                    return;
                }
                info!("version mask now {mask:08x} (from the next job)");
                lock(&self.shared.work).mask = Some(mask);
                lock(&self.shared.stats).report.version_mask = Some(mask);
            }
            Event::Reconnect(to) => {
                info!("pool sent client.reconnect {to:?}; stopping");
                self.shared
                    .set_error(format!("pool sent client.reconnect {to:?}"));
                self.shared.request_stop();
            }
            Event::Message(text) => info!("pool message: {text}"),
            Event::Ping => debug!("answered mining.ping"),
            Event::GetVersion => debug!("answered client.get_version"),
            Event::Verdict(v) => {
                self.on_submit_reply(v.accepted, v.reason.map(Cow::into_owned), v.tag);
            }
            Event::UnknownReply { id } => debug!("ignoring a reply to unknown id {id:?}"),
            Event::BadNotification { method, what } => {
                warn!("skipping a bad {method}: {what}");
            }
            Event::Unparseable(e) => warn!("skipping a bad line from the pool: {e}"),
            Event::Unhandled(method) => debug!("ignoring method {method:?} from the pool"),
            Event::TimedOut(kind) => debug!("no reply to {kind:?}"),
            Event::SubmitTimedOut { id, .. } => debug!("submit {id} given up"),
            Event::ExtranonceSubscribed(ok) => debug!("extranonce subscription: {ok}"),
        }
    }

    fn on_version_rolling(&mut self, mask: Option<u32>) {
        match mask {
            Some(mask) => {
                info!("version rolling with mask {mask:08x}");
                lock(&self.shared.work).mask = Some(mask);
                lock(&self.shared.stats).report.version_mask = Some(mask);
            }
            None => info!("pool refused version rolling (or did not answer)"),
        }
    }

    fn on_subscribed(&mut self, en1: Vec<u8>, n2: usize, session: Option<String>) {
        let en1_hex = hex::encode(&en1);
        info!("subscribed: extranonce1 {en1_hex}, extranonce2 {n2} bytes, session {session:?}");
        {
            let mut ws = lock(&self.shared.work);
            ws.extranonce1 = Some(en1);
            ws.nonce2_len = n2;
        }
        {
            let mut st = lock(&self.shared.stats);
            st.report.extranonce1 = Some(en1_hex.clone());
            st.report.session_id.clone_from(&session);
        }
        self.shared.emit(MinerEvent::Subscribed {
            extranonce1: en1_hex,
            nonce2_len: n2,
            session,
        });
    }

    fn on_notify(&mut self, job: Job) {
        let at = Instant::now();
        let event = MinerEvent::Notify {
            at,
            job_id: job.job_id.clone(),
            prevhash_rpc: job.prevhash_rpc(),
            clean: job.clean,
        };
        {
            let mut ws = lock(&self.shared.work);
            let Some(extranonce1) = ws.extranonce1.clone() else {
                warn!("skipping a mining.notify before the subscribe reply");
                return;
            };
            ws.generation += 1;
            let mask = ws.mask.unwrap_or(0);
            let active = ActiveJob {
                id_json: write::json_string(&job.job_id),
                generation: ws.generation,
                extranonce1,
                nonce2_len: ws.nonce2_len,
                share_target: ws.share_target,
                net_target: Target::from_compact(job.nbits),
                roller: VersionRoller::new(job.version, mask),
                job,
            };
            debug!(
                "new job {} (generation {})",
                active.job.job_id, active.generation
            );
            ws.job = Some(Arc::new(active));
            self.shared.work_cv.notify_all();
        }
        lock(&self.shared.stats).report.notifies += 1;
        self.shared.emit(event);
    }

    fn on_set_difficulty(&mut self, diff: f64) {
        let Some(d) = Difficulty::from_f64(diff) else {
            warn!("skipping mining.set_difficulty with unusable value {diff}");
            return;
        };
        debug!("difficulty {diff}");
        lock(&self.shared.work).share_target = d.target();
        lock(&self.shared.stats).report.last_difficulty = Some(diff);
        self.shared.emit(MinerEvent::Difficulty(diff));
    }

    fn on_submit_reply(&mut self, accepted: bool, reason: Option<String>, p: PendingSubmit) {
        let mut stop = false;
        {
            let mut st = lock(&self.shared.stats);
            let r = &mut st.report;
            if accepted {
                r.accepted += 1;
                if p.block {
                    r.blocks_accepted += 1;
                    r.block_hashes.push(work::hash_to_rpc_hex(&p.hash));
                    stop = self
                        .shared
                        .cfg
                        .stop_after_blocks
                        .is_some_and(|n| r.blocks_accepted >= n);
                }
            } else {
                r.rejected += 1;
                *r.reject_reasons
                    .entry(reason.clone().unwrap_or_default())
                    .or_default() += 1;
            }
        }
        match (&reason, p.block) {
            (None, true) => info!("block {} accepted", work::hash_to_rpc_hex(&p.hash)),
            (None, false) => debug!("share accepted"),
            (Some(r), block) => debug!("share rejected ({r}), block {block}"),
        }
        self.shared.emit(MinerEvent::ShareResult {
            accepted,
            reason,
            block: p.block,
        });
        if stop {
            info!("block limit reached");
            self.shared.request_stop();
        }
    }
}

/// Token bucket for submits: up to one second's worth of burst.
struct RateLimiter {
    rate: f64,
    tokens: f64,
    last: Instant,
}

impl RateLimiter {
    fn new(rate: f64) -> Self {
        Self {
            rate,
            tokens: rate.max(1.0),
            last: Instant::now(),
        }
    }

    fn unlimited(&self) -> bool {
        !self.rate.is_finite() || self.rate <= 0.0
    }

    /// `None` when a submit may go out now, else how long until one may.
    fn delay(&mut self, now: Instant) -> Option<Duration> {
        if self.unlimited() {
            return None;
        }
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + dt * self.rate).min(self.rate.max(1.0));
        if self.tokens >= 1.0 {
            None
        } else {
            Some(Duration::from_secs_f64((1.0 - self.tokens) / self.rate))
        }
    }

    fn take(&mut self) {
        if !self.unlimited() {
            self.tokens -= 1.0;
        }
    }
}

/// A hash worth submitting.
struct Found {
    extranonce2: Vec<u8>,
    version_bits: u32,
    nonce: u32,
    hash: [u8; 32],
    block: bool,
}

enum Grind {
    Nothing,
    Exhausted,
    Found(Found),
}

/// Position in a job's search space: extranonce2, then rolled version, then nonce.
struct Cursor {
    job: Arc<ActiveJob>,
    en2: u64,
    en2_bytes: Vec<u8>,
    root: [u8; 32],
    roll: u64,
    version_bits: u32,
    header: [u8; 80],
    nonce: u64,
    exhausted: bool,
}

impl Cursor {
    fn new(job: Arc<ActiveJob>) -> Self {
        let en2_bytes = work::extranonce2_bytes(0, job.nonce2_len);
        let root = job.job.merkle_root(&job.extranonce1, &en2_bytes);
        let mut c = Self {
            job,
            en2: 0,
            en2_bytes,
            root,
            roll: 0,
            version_bits: 0,
            header: [0; 80],
            nonce: 0,
            exhausted: false,
        };
        c.rebuild_header();
        c
    }

    fn rebuild_header(&mut self) {
        // Roll a non-zero pattern first so rolled submits are exercised early.
        let n = (self.roll + 1) % self.job.roller.count();
        let (version, bits) = self.job.roller.rolled(n);
        self.version_bits = bits;
        self.header = self.job.job.header(&self.root, version, 0);
    }

    fn advance(&mut self) {
        self.nonce += 1;
        if self.nonce <= u64::from(u32::MAX) {
            return;
        }
        self.nonce = 0;
        self.roll += 1;
        if self.roll >= self.job.roller.count() {
            self.roll = 0;
            self.en2 += 1;
            if self.en2 >= work::extranonce2_space(self.job.nonce2_len) {
                self.exhausted = true;
                return;
            }
            self.en2_bytes = work::extranonce2_bytes(self.en2, self.job.nonce2_len);
            self.root = self
                .job
                .job
                .merkle_root(&self.job.extranonce1, &self.en2_bytes);
        }
        self.rebuild_header();
    }

    fn grind(&mut self, share_target: &Target, hashes: &AtomicU64) -> Grind {
        let mut done = 0u64;
        let mut out = Grind::Nothing;
        for _ in 0..BATCH {
            if self.exhausted {
                out = Grind::Exhausted;
                break;
            }
            let nonce = u32::try_from(self.nonce).unwrap_or(u32::MAX);
            self.header[76..80].copy_from_slice(&nonce.to_le_bytes());
            let hash = sha256d_header(&self.header);
            done += 1;
            let block = self.job.net_target.is_met_by(&hash);
            if block || share_target.is_met_by(&hash) {
                out = Grind::Found(Found {
                    extranonce2: self.en2_bytes.clone(),
                    version_bits: self.version_bits,
                    nonce,
                    hash,
                    block,
                });
                self.advance();
                break;
            }
            self.advance();
        }
        hashes.fetch_add(done, Ordering::Relaxed);
        out
    }
}

/// The grinder thread.
fn grind(shared: &Shared) {
    let mut limiter = RateLimiter::new(shared.cfg.max_shares_per_sec);
    let mut cursor: Option<Cursor> = None;
    // Generation of a job that is finished (block submitted or space exhausted).
    let mut parked: Option<u64> = None;
    // After a block solution, the job id it was found on: pools re-send the same job (e.g. with a
    // new difficulty), and grinding it again would only solve the same height twice. A different
    // job, even on the same previous block (a lagging node after failover), is new work.
    let mut solved_job: Option<String> = None;
    loop {
        let (job, current_target) = {
            let mut ws = lock(&shared.work);
            loop {
                if shared.stopping() {
                    return;
                }
                let wait = match &ws.job {
                    Some(job)
                        if ws.authorized
                            && Some(job.generation) != parked
                            && solved_job.as_deref() != Some(job.job.job_id.as_str()) =>
                    {
                        match limiter.delay(Instant::now()) {
                            None => break (Arc::clone(job), ws.share_target),
                            Some(d) => d.min(Duration::from_millis(100)),
                        }
                    }
                    _ => Duration::from_millis(100),
                };
                ws = shared
                    .work_cv
                    .wait_timeout(ws, wait)
                    .unwrap_or_else(PoisonError::into_inner)
                    .0;
            }
        };
        let c = match &mut cursor {
            Some(c) if c.job.generation == job.generation => c,
            _ => cursor.insert(Cursor::new(job)),
        };
        // Shares for a job must meet the harder of the difficulty when it arrived and now.
        let target = c.job.share_target.min(current_target);
        match c.grind(&target, &shared.hashes) {
            Grind::Nothing => {}
            Grind::Exhausted => {
                warn!(
                    "search space of job {} exhausted; waiting for a new job",
                    c.job.job.job_id
                );
                parked = Some(c.job.generation);
            }
            Grind::Found(found) => {
                limiter.take();
                shared.submit(&c.job, &found);
                if found.block && shared.cfg.pause_after_block {
                    parked = Some(c.job.generation);
                    solved_job = Some(c.job.job.job_id.clone());
                }
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "test code")]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn reject_reasons_in_all_shapes() {
        assert_eq!(
            reject_reason(&json!({"result": false, "error": [23, "Above target", null]})),
            "Above target"
        );
        assert_eq!(
            reject_reason(&json!({"result": false, "error": null, "reject-reason": "Stale"})),
            "Stale"
        );
        assert_eq!(
            reject_reason(&json!({"error": "-3:method not found"})),
            "-3:method not found"
        );
        assert_eq!(
            reject_reason(
                &json!({"result": null, "error": {"code": 21, "message": "Job not found"}})
            ),
            "Job not found"
        );
        assert_eq!(
            reject_reason(&json!({"result": false, "error": null})),
            "unknown"
        );
    }

    #[test]
    fn rate_limiter_paces() {
        let mut rl = RateLimiter::new(2.0);
        let t0 = Instant::now();
        assert!(rl.delay(t0).is_none());
        rl.take();
        assert!(rl.delay(t0).is_none());
        rl.take();
        let d = rl.delay(t0).unwrap();
        assert!(
            d > Duration::from_millis(400) && d <= Duration::from_millis(500),
            "{d:?}"
        );
        assert!(rl.delay(t0 + Duration::from_millis(500)).is_none());
        let mut free = RateLimiter::new(0.0);
        for _ in 0..1000 {
            assert!(free.delay(t0).is_none());
            free.take();
        }
    }
}
