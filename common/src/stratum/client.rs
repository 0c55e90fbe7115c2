//! A sans-IO stratum v1 client: the protocol half of a miner or of a proxy's upstream link.
//!
//! [`Client`] does no I/O and reads no clock. The caller feeds it each line the pool sent (with
//! the time it was read) and calls [`Client::poll`] when [`Client::deadline`] passes; the client
//! appends the lines to send to the caller's buffer and answers with an [`Event`].
//!
//! The handshake is ckpool's (`generator.c`): optionally `mining.configure` for version rolling
//! first, then `mining.subscribe` with the user agent (and a session id to resume), retried
//! once with empty params when the pool refuses it; on its answer `mining.authorize` and,
//! optionally, `mining.extranonce.subscribe`. The client answers `mining.ping` and
//! `client.get_version` itself.
//!
//! [`Client::submit`] writes a `mining.submit` (with the version bits when rolling was
//! negotiated) and remembers it with a caller's tag; the pool's verdict comes back as
//! [`Event::Verdict`] with that tag, matched by id. Requests left unanswered age out.
//!
//! A submit allocates nothing: the line goes into the caller's buffer, the pending entry into a
//! queue whose capacity is kept, and an accepted verdict is read without building a JSON map.

use std::borrow::Cow;
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::decode::{self, Job, Reconnect};
use super::write;
use super::{Message, ParseError, Parser};

/// Settings shared by every client of a process (one `Arc` for thousands of miners).
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// User agent, the first `mining.subscribe` parameter (also the `client.get_version` answer).
    pub user_agent: String,
    /// Password for `mining.authorize`.
    pub pass: String,
    /// `Some(mask)`: send `mining.configure` first, asking to roll the version bits in `mask`.
    pub version_rolling: Option<u32>,
    /// Send `mining.extranonce.subscribe` after subscribing.
    pub extranonce_subscribe: bool,
    /// How long a handshake request may go unanswered.
    pub request_timeout: Duration,
    /// How long a submit may go unanswered before it is given up (`None`: never; ckpool's
    /// proxy gives up after 120 s).
    pub submit_timeout: Option<Duration>,
}

impl ClientConfig {
    /// Defaults: password `x`, no version rolling, no extranonce subscription, 10 s handshake
    /// timeout, submits given up after 120 s.
    pub fn new(user_agent: impl Into<String>) -> Self {
        Self {
            user_agent: user_agent.into(),
            pass: "x".to_owned(),
            version_rolling: None,
            extranonce_subscribe: false,
            request_timeout: Duration::from_secs(10),
            submit_timeout: Some(Duration::from_secs(120)),
        }
    }
}

/// Where the handshake is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Not started ([`Client::start`] not called yet).
    Idle,
    /// Waiting for the `mining.configure` answer.
    Configuring,
    /// Waiting for the `mining.subscribe` answer.
    Subscribing,
    /// Waiting for the `mining.authorize` answer.
    Authorizing,
    /// Authorised: submits may go.
    Ready,
    /// The pool refused the subscription or the authorisation, or did not answer it.
    Failed,
}

/// A request the client sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestKind {
    /// `mining.configure`.
    Configure,
    /// `mining.subscribe`.
    Subscribe,
    /// `mining.authorize`.
    Authorize,
    /// `mining.extranonce.subscribe`.
    ExtranonceSubscribe,
}

/// The pool's answer to a submit.
#[derive(Debug, Clone, PartialEq)]
pub struct Verdict<T> {
    /// The submit's id.
    pub id: u64,
    /// The caller's tag given to [`Client::submit`].
    pub tag: T,
    /// When it was sent.
    pub sent: Instant,
    /// Whether the pool accepted it.
    pub accepted: bool,
    /// Why not, when rejected.
    pub reason: Option<Cow<'static, str>>,
}

/// What a line (or the passing of time) meant.
#[derive(Debug, Clone, PartialEq)]
pub enum Event<T> {
    /// The `mining.configure` answer (or its timeout): the version-rolling mask in use, `None`
    /// when the pool refused or did not answer.
    VersionRolling(Option<u32>),
    /// Subscribed. `latency` is from the subscribe request to its answer.
    Subscribed {
        /// extranonce1.
        extranonce1: Vec<u8>,
        /// extranonce2 size in bytes.
        nonce2_len: usize,
        /// Session id to resume with next time.
        session: Option<String>,
        /// From request to answer.
        latency: Duration,
    },
    /// The pool refused the subscription twice (with and without params).
    SubscribeFailed {
        /// The pool's reason.
        reason: String,
    },
    /// Authorised: shares may be submitted.
    Authorized {
        /// From request to answer.
        latency: Duration,
    },
    /// The pool refused the authorisation.
    Refused {
        /// The pool's reason.
        reason: String,
    },
    /// The answer to `mining.extranonce.subscribe`.
    ExtranonceSubscribed(bool),
    /// A new job (`mining.notify`).
    Job(Box<Job>),
    /// A new difficulty (`mining.set_difficulty`).
    Difficulty(f64),
    /// A new extranonce1 and extranonce2 size (`mining.set_extranonce`), for the next job on.
    Extranonce {
        /// extranonce1.
        extranonce1: Vec<u8>,
        /// extranonce2 size in bytes.
        nonce2_len: usize,
    },
    /// A new version-rolling mask (`mining.set_version_mask`), already limited to the mask
    /// asked for.
    VersionMask(u32),
    /// `client.reconnect`: the pool asks the client to go (to another server, if given).
    Reconnect(Reconnect),
    /// `client.show_message`.
    Message(String),
    /// `mining.ping`, already answered (`"pong"`).
    Ping,
    /// `client.get_version`, already answered (with the user agent).
    GetVersion,
    /// A share verdict.
    Verdict(Verdict<T>),
    /// A submit that stayed unanswered past [`ClientConfig::submit_timeout`].
    SubmitTimedOut {
        /// The submit's id.
        id: u64,
        /// The caller's tag.
        tag: T,
    },
    /// A handshake request stayed unanswered past [`ClientConfig::request_timeout`]
    /// (`mining.configure` is then given up and the handshake goes on without rolling:
    /// [`Event::VersionRolling`] reports that instead).
    TimedOut(RequestKind),
    /// A reply whose id matches no request in flight.
    UnknownReply {
        /// Its id, if it had a usable one.
        id: Option<u64>,
    },
    /// A notification whose params could not be decoded.
    BadNotification {
        /// The method.
        method: String,
        /// What was wrong.
        what: &'static str,
    },
    /// A line that is not a JSON object.
    Unparseable(ParseError),
    /// A method this client does not handle.
    Unhandled(String),
}

#[derive(Debug, Clone, Copy)]
struct InFlight {
    id: u64,
    kind: RequestKind,
    sent: Instant,
}

#[derive(Debug, Clone, Copy)]
struct PendingSubmit<T> {
    id: u64,
    sent: Instant,
    tag: T,
}

/// A ready client's protocol state as it travels to another process (`-H`): the connection
/// stays open and its handshake done, so the adopting client sends no new subscribe or
/// authorize, and the answers to submits sent before the switch are still matched.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ClientHandover<T> {
    /// The next request id to use.
    pub next_id: u64,
    /// The version mask negotiated with `mining.configure`, if any.
    pub mask: Option<u32>,
    /// Submits waiting for their answer, oldest first: (request id, caller's tag).
    pub submits: Vec<(u64, T)>,
}

/// One client's protocol state. `T` is what the caller keeps with each submit.
#[derive(Debug)]
pub struct Client<T> {
    cfg: Arc<ClientConfig>,
    user: Box<str>,
    user_json: Box<str>,
    resume: Option<Box<str>>,
    phase: Phase,
    next_id: u64,
    requests: Vec<InFlight>,
    submits: VecDeque<PendingSubmit<T>>,
    mask: Option<u32>,
    subscribe_retried: bool,
}

impl<T: Copy> Client<T> {
    /// A client for worker `user`; `resume` is a session id from an earlier subscription.
    pub fn new(cfg: Arc<ClientConfig>, user: &str, resume: Option<&str>) -> Self {
        Self {
            cfg,
            user: user.into(),
            user_json: write::json_string(user).into(),
            resume: resume.map(Into::into),
            phase: Phase::Idle,
            next_id: 1,
            requests: Vec::with_capacity(2),
            submits: VecDeque::new(),
            mask: None,
            subscribe_retried: false,
        }
    }

    /// The state of a ready client for a handover ([`Client::adopt`]); `None` when the
    /// handshake is not complete (such a connection is not handed over).
    pub fn handover_state(&self) -> Option<ClientHandover<T>> {
        (self.phase == Phase::Ready).then(|| ClientHandover {
            next_id: self.next_id,
            mask: self.mask,
            submits: self.submits.iter().map(|s| (s.id, s.tag)).collect(),
        })
    }

    /// A ready client on a connection another process handed over with `state`
    /// ([`Client::handover_state`]): nothing is sent, the pending submits' timeouts start
    /// again at `now`.
    pub fn adopt(
        cfg: Arc<ClientConfig>,
        user: &str,
        state: ClientHandover<T>,
        now: Instant,
    ) -> Self {
        let mut c = Self::new(cfg, user, None);
        c.phase = Phase::Ready;
        c.next_id = state.next_id;
        c.mask = state.mask;
        c.submits = state
            .submits
            .into_iter()
            .map(|(id, tag)| PendingSubmit { id, sent: now, tag })
            .collect();
        c
    }

    /// Starts the handshake: `mining.configure` or `mining.subscribe`.
    pub fn start(&mut self, now: Instant, out: &mut Vec<u8>) {
        match self.cfg.version_rolling {
            Some(mask) => {
                let id = self.request(RequestKind::Configure, now);
                write::configure_request(out, id, mask);
                self.phase = Phase::Configuring;
            }
            None => self.subscribe(now, out),
        }
    }

    /// The handshake phase.
    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// The configuration it was made with.
    pub fn config(&self) -> &Arc<ClientConfig> {
        &self.cfg
    }

    /// The worker name.
    pub fn user(&self) -> &str {
        &self.user
    }

    /// The version-rolling mask negotiated, if any.
    pub fn version_mask(&self) -> Option<u32> {
        self.mask
    }

    /// Submits waiting for their verdict.
    pub fn pending_submits(&self) -> usize {
        self.submits.len()
    }

    /// Forgets the submits in flight (the connection is gone), handing back their ids and tags.
    pub fn drain_submits(&mut self) -> impl Iterator<Item = (u64, T)> + '_ {
        self.submits.drain(..).map(|p| (p.id, p.tag))
    }

    /// When [`Client::poll`] has something to do: the earliest time a request ages out.
    pub fn deadline(&self) -> Option<Instant> {
        let handshake = self
            .requests
            .iter()
            .map(|r| r.sent + self.cfg.request_timeout)
            .min();
        let submit = self
            .cfg
            .submit_timeout
            .and_then(|t| self.submits.front().map(|p| p.sent + t));
        match (handshake, submit) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Ages out what is overdue at `now`: one event per call (call again until `None`).
    pub fn poll(&mut self, now: Instant, out: &mut Vec<u8>) -> Option<Event<T>> {
        let timeout = self.cfg.request_timeout;
        if let Some(pos) = self.requests.iter().position(|r| r.sent + timeout <= now) {
            let r = self.requests.swap_remove(pos);
            return Some(match r.kind {
                RequestKind::Configure => {
                    self.mask = None;
                    self.subscribe(now, out);
                    Event::VersionRolling(None)
                }
                RequestKind::Subscribe | RequestKind::Authorize => {
                    self.phase = Phase::Failed;
                    Event::TimedOut(r.kind)
                }
                RequestKind::ExtranonceSubscribe => Event::TimedOut(r.kind),
            });
        }
        let limit = self.cfg.submit_timeout?;
        if self.submits.front().is_some_and(|p| p.sent + limit <= now) {
            return self.submits.pop_front().map(|p| Event::SubmitTimedOut {
                id: p.id,
                tag: p.tag,
            });
        }
        None
    }

    /// Writes a `mining.submit` for `job_id_json` (the job id as a JSON string literal, quotes
    /// included) and remembers `tag` for its verdict. The version bits go in only when version
    /// rolling was negotiated. Returns the submit's id.
    #[allow(
        clippy::too_many_arguments,
        reason = "a submit's fields, flat so the hot path builds no struct"
    )]
    pub fn submit(
        &mut self,
        now: Instant,
        out: &mut Vec<u8>,
        job_id_json: &str,
        extranonce2: &[u8],
        ntime: u32,
        nonce: u32,
        version_bits: u32,
        tag: T,
    ) -> u64 {
        let id = self.take_id();
        write::submit(
            out,
            id,
            &write::Submit {
                worker_json: &self.user_json,
                job_id_json,
                extranonce2,
                ntime,
                nonce,
                version_bits: self.mask.map(|_| version_bits),
            },
        );
        self.submits.push_back(PendingSubmit { id, sent: now, tag });
        id
    }

    /// Parses and handles one line from the pool (without its newline).
    pub fn feed(
        &mut self,
        parser: &mut Parser,
        line: &[u8],
        now: Instant,
        out: &mut Vec<u8>,
    ) -> Option<Event<T>> {
        let line = line.trim_ascii();
        if line.is_empty() {
            return None;
        }
        match parser.parse_message(line) {
            Ok(msg) => self.handle(&msg, now, out),
            Err(e) => Some(Event::Unparseable(e)),
        }
    }

    /// Handles one parsed message from the pool.
    pub fn handle(
        &mut self,
        msg: &Message<'_>,
        now: Instant,
        out: &mut Vec<u8>,
    ) -> Option<Event<T>> {
        match msg.method_name() {
            Some(method) => Some(self.notification(method, msg, out)),
            None => self.reply(msg, now, out),
        }
    }

    fn notification(&mut self, method: &str, msg: &Message<'_>, out: &mut Vec<u8>) -> Event<T> {
        let params = &msg.params;
        let bad = |what| Event::BadNotification {
            method: method.to_owned(),
            what,
        };
        match method {
            "mining.notify" => match Job::from_notify_params(params) {
                Ok(job) => Event::Job(Box::new(job)),
                Err(e) => bad(e.0),
            },
            "mining.set_difficulty" => match decode::set_difficulty(params) {
                Ok(d) => Event::Difficulty(d),
                Err(e) => bad(e.0),
            },
            "mining.set_extranonce" => match decode::set_extranonce(params) {
                Ok((extranonce1, nonce2_len)) => Event::Extranonce {
                    extranonce1,
                    nonce2_len,
                },
                Err(e) => bad(e.0),
            },
            "mining.set_version_mask" => match decode::set_version_mask(params) {
                Ok(mask) => {
                    let asked = self.cfg.version_rolling.unwrap_or(0);
                    let mask = mask & asked;
                    if self.mask.is_some() {
                        self.mask = Some(mask);
                    }
                    Event::VersionMask(mask)
                }
                Err(e) => bad(e.0),
            },
            "client.reconnect" => Event::Reconnect(decode::reconnect(params)),
            "client.show_message" => {
                use super::decode::Json as _;
                Event::Message(
                    params
                        .at(0)
                        .and_then(|m| m.as_text())
                        .unwrap_or_default()
                        .to_owned(),
                )
            }
            "mining.ping" => {
                write::reply_pong(out, &msg.id);
                Event::Ping
            }
            "client.get_version" => {
                let mut raw = Vec::with_capacity(self.cfg.user_agent.len() + 2);
                write::write_str(&mut raw, &self.cfg.user_agent);
                write::reply_result(out, &msg.id, &raw);
                Event::GetVersion
            }
            other => Event::Unhandled(other.to_owned()),
        }
    }

    fn reply(&mut self, msg: &Message<'_>, now: Instant, out: &mut Vec<u8>) -> Option<Event<T>> {
        let Some(id) = msg.id_u64() else {
            return Some(Event::UnknownReply { id: None });
        };
        // A verdict is the usual reply, and the oldest submit the usual one answered.
        if let Some(pos) = self.submits.iter().position(|p| p.id == id) {
            let p = self.submits.remove(pos)?;
            let accepted = msg.accepted();
            return Some(Event::Verdict(Verdict {
                id,
                tag: p.tag,
                sent: p.sent,
                accepted,
                reason: (!accepted).then(|| msg.reason()),
            }));
        }
        let Some(pos) = self.requests.iter().position(|r| r.id == id) else {
            return Some(Event::UnknownReply { id: Some(id) });
        };
        let r = self.requests.swap_remove(pos);
        let latency = now.saturating_duration_since(r.sent);
        Some(match r.kind {
            RequestKind::Configure => {
                self.mask = self
                    .cfg
                    .version_rolling
                    .and_then(|asked| decode::configure_result(&msg.result, asked));
                self.subscribe(now, out);
                Event::VersionRolling(self.mask)
            }
            RequestKind::Subscribe => match decode::subscribe_result(&msg.result) {
                Ok(s) => {
                    let id = self.request(RequestKind::Authorize, now);
                    write::authorize_request(out, id, &self.user, &self.cfg.pass);
                    if self.cfg.extranonce_subscribe {
                        let id = self.request(RequestKind::ExtranonceSubscribe, now);
                        write::extranonce_subscribe_request(out, id);
                    }
                    self.phase = Phase::Authorizing;
                    Event::Subscribed {
                        extranonce1: s.extranonce1,
                        nonce2_len: s.nonce2_len,
                        session: s.session,
                        latency,
                    }
                }
                Err(e) => {
                    let reason = refusal(msg, e.0);
                    if self.subscribe_retried {
                        self.phase = Phase::Failed;
                        return Some(Event::SubscribeFailed { reason });
                    }
                    // ckpool's retry: some pools refuse the user agent parameter.
                    self.subscribe_retried = true;
                    let id = self.request(RequestKind::Subscribe, now);
                    write::subscribe_request(out, id, None, None);
                    return None;
                }
            },
            RequestKind::Authorize => {
                if msg.accepted() {
                    self.phase = Phase::Ready;
                    Event::Authorized { latency }
                } else {
                    self.phase = Phase::Failed;
                    Event::Refused {
                        reason: msg.reason().into_owned(),
                    }
                }
            }
            RequestKind::ExtranonceSubscribe => Event::ExtranonceSubscribed(msg.accepted()),
        })
    }

    fn subscribe(&mut self, now: Instant, out: &mut Vec<u8>) {
        let id = self.request(RequestKind::Subscribe, now);
        write::subscribe_request(out, id, Some(&self.cfg.user_agent), self.resume.as_deref());
        self.phase = Phase::Subscribing;
    }

    fn take_id(&mut self) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    fn request(&mut self, kind: RequestKind, now: Instant) -> u64 {
        let id = self.take_id();
        self.requests.push(InFlight {
            id,
            kind,
            sent: now,
        });
        id
    }
}

/// The text of a failed subscribe: the pool's error, else its result (ckpool answers a string
/// such as `"Initialising"`), else what was wrong with it.
fn refusal(msg: &Message<'_>, what: &str) -> String {
    use super::decode::Json as _;
    use simd_json::prelude::*;
    if !msg.error.is_null() {
        return msg.reason().into_owned();
    }
    match msg.result.as_text() {
        Some(s) => s.to_owned(),
        None => format!("{what}: {}", msg.result.to_json()),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::panic, reason = "test code")]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const SUB_REPLY: &[u8] =
        br#"{"result":[[["mining.notify","6b1242ef"]],"ed42126b",8],"id":1,"error":null}"#;

    fn cfg(rolling: Option<u32>) -> Arc<ClientConfig> {
        let mut c = ClientConfig::new("ckload/test");
        c.version_rolling = rolling;
        c.request_timeout = Duration::from_secs(5);
        c.submit_timeout = Some(Duration::from_secs(30));
        Arc::new(c)
    }

    fn text(out: &mut Vec<u8>) -> String {
        let s = String::from_utf8(out.clone()).unwrap();
        out.clear();
        s
    }

    /// A client through subscribe and authorize, its buffer empty.
    fn ready(rolling: Option<u32>) -> (Client<u32>, Parser, Instant, Vec<u8>) {
        let t0 = Instant::now();
        let mut c = Client::new(cfg(rolling), "bench.w0", None);
        let mut p = Parser::new();
        let mut out = Vec::new();
        c.start(t0, &mut out);
        if rolling.is_some() {
            let reply = br#"{"result":{"version-rolling":true,"version-rolling.mask":"1fffe000"},"id":1,"error":null}"#;
            c.feed(&mut p, reply, t0, &mut out);
            let sub = br#"{"result":[[["mining.notify","1"]],"00000001",8],"id":2,"error":null}"#;
            c.feed(&mut p, sub, t0, &mut out);
            c.feed(
                &mut p,
                br#"{"result":true,"error":null,"id":3}"#,
                t0,
                &mut out,
            );
        } else {
            c.feed(&mut p, SUB_REPLY, t0, &mut out);
            c.feed(
                &mut p,
                br#"{"result":true,"error":null,"id":2}"#,
                t0,
                &mut out,
            );
        }
        assert_eq!(c.phase(), Phase::Ready);
        out.clear();
        (c, p, t0, out)
    }

    #[test]
    fn handshake_without_rolling() {
        let t0 = Instant::now();
        let mut c: Client<u32> = Client::new(cfg(None), "bench.w0", Some("6b1242ef"));
        let mut p = Parser::new();
        let mut out = Vec::new();
        assert_eq!(c.phase(), Phase::Idle);
        c.start(t0, &mut out);
        assert_eq!(
            text(&mut out),
            "{\"id\":1,\"method\":\"mining.subscribe\",\"params\":[\"ckload/test\",\"6b1242ef\"]}\n"
        );
        assert_eq!(c.phase(), Phase::Subscribing);
        assert_eq!(c.deadline(), Some(t0 + Duration::from_secs(5)));
        let t1 = t0 + Duration::from_millis(3);
        assert_eq!(
            c.feed(&mut p, SUB_REPLY, t1, &mut out),
            Some(Event::Subscribed {
                extranonce1: vec![0xed, 0x42, 0x12, 0x6b],
                nonce2_len: 8,
                session: Some("6b1242ef".into()),
                latency: Duration::from_millis(3),
            })
        );
        assert_eq!(
            text(&mut out),
            "{\"id\":2,\"method\":\"mining.authorize\",\"params\":[\"bench.w0\",\"x\"]}\n"
        );
        assert_eq!(c.phase(), Phase::Authorizing);
        let t2 = t1 + Duration::from_millis(2);
        assert_eq!(
            c.feed(
                &mut p,
                br#"{"result":true,"error":null,"id":2}"#,
                t2,
                &mut out
            ),
            Some(Event::Authorized {
                latency: Duration::from_millis(2)
            })
        );
        assert_eq!(c.phase(), Phase::Ready);
        assert_eq!(c.deadline(), None);
        assert!(out.is_empty());
    }

    #[test]
    fn handshake_with_rolling_and_extranonce_subscribe() {
        let t0 = Instant::now();
        let mut conf = (*cfg(Some(0x1fff_ffff))).clone();
        conf.extranonce_subscribe = true;
        let mut c: Client<u32> = Client::new(Arc::new(conf), "u", None);
        let mut p = Parser::new();
        let mut out = Vec::new();
        c.start(t0, &mut out);
        assert_eq!(
            text(&mut out),
            "{\"id\":1,\"method\":\"mining.configure\",\"params\":[[\"version-rolling\"],{\"version-rolling.mask\":\"1fffffff\",\"version-rolling.min-bit-count\":2}]}\n"
        );
        assert_eq!(c.phase(), Phase::Configuring);
        let reply = br#"{"result":{"version-rolling":true,"version-rolling.mask":"1fffe000"},"id":1,"error":null}"#;
        assert_eq!(
            c.feed(&mut p, reply, t0, &mut out),
            Some(Event::VersionRolling(Some(0x1fff_e000)))
        );
        assert_eq!(c.version_mask(), Some(0x1fff_e000));
        assert_eq!(
            text(&mut out),
            "{\"id\":2,\"method\":\"mining.subscribe\",\"params\":[\"ckload/test\"]}\n"
        );
        let sub = br#"{"result":[[["mining.notify","1"]],"00000001",8],"id":2,"error":null}"#;
        assert!(matches!(
            c.feed(&mut p, sub, t0, &mut out),
            Some(Event::Subscribed { .. })
        ));
        assert_eq!(
            text(&mut out),
            concat!(
                "{\"id\":3,\"method\":\"mining.authorize\",\"params\":[\"u\",\"x\"]}\n",
                "{\"id\":4,\"method\":\"mining.extranonce.subscribe\",\"params\":[]}\n"
            )
        );
        // The answers may come in any order.
        assert_eq!(
            c.feed(
                &mut p,
                br#"{"id":4,"result":null,"error":[-3,"Method not found",null]}"#,
                t0,
                &mut out
            ),
            Some(Event::ExtranonceSubscribed(false))
        );
        assert!(matches!(
            c.feed(
                &mut p,
                br#"{"id":3,"result":true,"error":null}"#,
                t0,
                &mut out
            ),
            Some(Event::Authorized { .. })
        ));
        // Rolled submits carry the bits.
        c.submit(t0, &mut out, "\"j1\"", &[0, 1], 0x6b12_42ff, 7, 0x2000, 0);
        assert_eq!(
            text(&mut out),
            "{\"id\":5,\"method\":\"mining.submit\",\"params\":[\"u\",\"j1\",\"0001\",\"6b1242ff\",\"00000007\",\"00002000\"]}\n"
        );
        // A new mask from the pool is limited to the one asked for.
        let m = br#"{"id":null,"method":"mining.set_version_mask","params":["ffffffff"]}"#;
        assert_eq!(
            c.feed(&mut p, m, t0, &mut out),
            Some(Event::VersionMask(0x1fff_ffff))
        );
        assert_eq!(c.version_mask(), Some(0x1fff_ffff));
    }

    #[test]
    fn refused_rolling_means_plain_submits() {
        let t0 = Instant::now();
        let mut c: Client<u32> = Client::new(cfg(Some(0x1fff_e000)), "u", None);
        let mut p = Parser::new();
        let mut out = Vec::new();
        c.start(t0, &mut out);
        out.clear();
        let no = br#"{"id":1,"result":{"version-rolling":false},"error":null}"#;
        assert_eq!(
            c.feed(&mut p, no, t0, &mut out),
            Some(Event::VersionRolling(None))
        );
        assert_eq!(c.version_mask(), None);
        assert_eq!(c.phase(), Phase::Subscribing);
    }

    #[test]
    fn subscribe_is_retried_without_params_once() {
        let t0 = Instant::now();
        let mut c: Client<u32> = Client::new(cfg(None), "u", None);
        let mut p = Parser::new();
        let mut out = Vec::new();
        c.start(t0, &mut out);
        out.clear();
        let busy = br#"{"id":1,"result":"Initialising","error":null}"#;
        assert_eq!(c.feed(&mut p, busy, t0, &mut out), None);
        assert_eq!(
            text(&mut out),
            "{\"id\":2,\"method\":\"mining.subscribe\",\"params\":[]}\n"
        );
        assert_eq!(c.phase(), Phase::Subscribing);
        let busy = br#"{"id":2,"result":"Initialising","error":null}"#;
        assert_eq!(
            c.feed(&mut p, busy, t0, &mut out),
            Some(Event::SubscribeFailed {
                reason: "Initialising".into()
            })
        );
        assert_eq!(c.phase(), Phase::Failed);
        assert!(out.is_empty());
    }

    #[test]
    fn refused_authorisation() {
        let t0 = Instant::now();
        let mut c: Client<u32> = Client::new(cfg(None), "u", None);
        let mut p = Parser::new();
        let mut out = Vec::new();
        c.start(t0, &mut out);
        c.feed(&mut p, SUB_REPLY, t0, &mut out);
        let no = br#"{"id":2,"result":false,"error":[24,"Invalid address",null]}"#;
        assert_eq!(
            c.feed(&mut p, no, t0, &mut out),
            Some(Event::Refused {
                reason: "Invalid address".into()
            })
        );
        assert_eq!(c.phase(), Phase::Failed);
    }

    #[test]
    fn requests_age_out() {
        let t0 = Instant::now();
        let mut c: Client<u32> = Client::new(cfg(Some(0xffff_ffff)), "u", None);
        let mut p = Parser::new();
        let mut out = Vec::new();
        c.start(t0, &mut out);
        out.clear();
        assert_eq!(c.poll(t0 + Duration::from_millis(4999), &mut out), None);
        let t1 = t0 + Duration::from_secs(5);
        assert_eq!(c.poll(t1, &mut out), Some(Event::VersionRolling(None)));
        assert_eq!(
            text(&mut out),
            "{\"id\":2,\"method\":\"mining.subscribe\",\"params\":[\"ckload/test\"]}\n"
        );
        // The late answer to configure matches nothing any more.
        let late = br#"{"id":1,"result":{"version-rolling":true},"error":null}"#;
        assert_eq!(
            c.feed(&mut p, late, t1, &mut out),
            Some(Event::UnknownReply { id: Some(1) })
        );
        assert_eq!(c.version_mask(), None);
        assert_eq!(c.deadline(), Some(t1 + Duration::from_secs(5)));
        let t2 = t1 + Duration::from_secs(5);
        assert_eq!(
            c.poll(t2, &mut out),
            Some(Event::TimedOut(RequestKind::Subscribe))
        );
        assert_eq!(c.phase(), Phase::Failed);
        assert_eq!(c.poll(t2, &mut out), None);

        let (mut c, mut p, t0, mut out) = ready(None);
        c.submit(t0, &mut out, "\"j\"", &[0; 8], 1, 1, 0, 10);
        c.submit(
            t0 + Duration::from_secs(1),
            &mut out,
            "\"j\"",
            &[0; 8],
            1,
            2,
            0,
            11,
        );
        assert_eq!(c.deadline(), Some(t0 + Duration::from_secs(30)));
        let late = t0 + Duration::from_secs(31);
        assert_eq!(
            c.poll(late, &mut out),
            Some(Event::SubmitTimedOut { id: 3, tag: 10 })
        );
        assert_eq!(
            c.poll(late, &mut out),
            Some(Event::SubmitTimedOut { id: 4, tag: 11 })
        );
        assert_eq!(c.poll(late, &mut out), None);
        assert_eq!(
            c.feed(
                &mut p,
                br#"{"id":3,"result":true,"error":null}"#,
                late,
                &mut out
            ),
            Some(Event::UnknownReply { id: Some(3) })
        );
    }

    #[test]
    fn verdicts_are_matched_to_their_submits() {
        let (mut c, mut p, t0, mut out) = ready(None);
        let a = c.submit(
            t0,
            &mut out,
            "\"6b1242ec00000001\"",
            &[0; 8],
            0x6b12_42ff,
            0xc0ee_2000,
            0x2000,
            100,
        );
        assert_eq!(
            text(&mut out),
            "{\"id\":3,\"method\":\"mining.submit\",\"params\":[\"bench.w0\",\"6b1242ec00000001\",\"0000000000000000\",\"6b1242ff\",\"c0ee2000\"]}\n"
        );
        let t1 = t0 + Duration::from_millis(1);
        let b = c.submit(t1, &mut out, "\"j\"", &[1; 8], 1, 2, 0, 200);
        out.clear();
        assert_eq!(c.pending_submits(), 2);
        let reject =
            format!("{{\"result\":false,\"error\":null,\"id\":{b},\"reject-reason\":\"Stale\"}}");
        assert_eq!(
            c.feed(&mut p, reject.as_bytes(), t1, &mut out),
            Some(Event::Verdict(Verdict {
                id: b,
                tag: 200,
                sent: t1,
                accepted: false,
                reason: Some("Stale".into())
            }))
        );
        let accept = format!("{{\"result\":true,\"error\":null,\"id\":{a}}}");
        assert_eq!(
            c.feed(&mut p, accept.as_bytes(), t1, &mut out),
            Some(Event::Verdict(Verdict {
                id: a,
                tag: 100,
                sent: t0,
                accepted: true,
                reason: None
            }))
        );
        assert_eq!(c.pending_submits(), 0);
        assert!(out.is_empty());
    }

    #[test]
    fn notifications_become_events() {
        let (mut c, mut p, t0, mut out) = ready(None);
        let capture = include_str!("../../tests/data/ckpool-0.9.9-proxy-upstream.jsonl");
        let mut jobs = 0;
        for rec in capture.lines() {
            let rec: serde_json::Value = serde_json::from_str(rec).unwrap();
            let line = rec["line"].as_str().unwrap();
            if line.contains("\"method\":\"mining.notify\"") {
                let Some(Event::Job(job)) = c.feed(&mut p, line.as_bytes(), t0, &mut out) else {
                    panic!("no job from {line}");
                };
                assert_eq!(job.prevhash_rpc().len(), 64);
                jobs += 1;
            }
        }
        assert_eq!(jobs, 3);
        let cases: [(&[u8], Event<u32>); 8] = [
            (
                br#"{"params":[0.001],"id":null,"method":"mining.set_difficulty"}"#,
                Event::Difficulty(0.001),
            ),
            (
                br#"{"id":null,"method":"mining.set_extranonce","params":["00ab",4]}"#,
                Event::Extranonce {
                    extranonce1: vec![0, 0xab],
                    nonce2_len: 4,
                },
            ),
            (
                br#"{"id":null,"method":"client.reconnect","params":["h",3333,0]}"#,
                Event::Reconnect(Reconnect {
                    host: Some("h".into()),
                    port: Some(3333),
                    wait_secs: Some(0),
                }),
            ),
            (
                br#"{"id":null,"method":"client.show_message","params":["hi"]}"#,
                Event::Message("hi".into()),
            ),
            (
                br#"{"id":null,"method":"mining.set_difficulty","params":["x"]}"#,
                Event::BadNotification {
                    method: "mining.set_difficulty".into(),
                    what: "difficulty is not a positive number",
                },
            ),
            (
                br#"{"id":null,"method":"mining.foo","params":[]}"#,
                Event::Unhandled("mining.foo".into()),
            ),
            (b"dropclient=3", Event::Unparseable(ParseError::Json)),
            (
                br#"{"id":77,"result":true,"error":null}"#,
                Event::UnknownReply { id: Some(77) },
            ),
        ];
        for (line, want) in cases {
            assert_eq!(c.feed(&mut p, line, t0, &mut out), Some(want));
        }
        assert!(out.is_empty());
        assert_eq!(
            c.feed(
                &mut p,
                br#"{"params":[],"id":42,"method":"mining.ping"}"#,
                t0,
                &mut out
            ),
            Some(Event::Ping)
        );
        assert_eq!(
            text(&mut out),
            "{\"id\":42,\"result\":\"pong\",\"error\":null}\n"
        );
        assert_eq!(
            c.feed(
                &mut p,
                br#"{"params":[],"id":"v","method":"client.get_version"}"#,
                t0,
                &mut out,
            ),
            Some(Event::GetVersion)
        );
        assert_eq!(
            text(&mut out),
            "{\"id\":\"v\",\"result\":\"ckload/test\",\"error\":null}\n"
        );
        assert_eq!(c.feed(&mut p, b"  \r", t0, &mut out), None);
    }

    /// What ckpool's proxy does upstream, replayed: the client's lines are the proxy's (but for
    /// the ids and spacing) and the pool's answers give the events the proxy acted on.
    #[test]
    fn replays_a_ckpool_proxy_upstream_link() {
        let capture = include_str!("../../tests/data/ckpool-0.9.9-proxy-upstream.jsonl");
        let t0 = Instant::now();
        let mut c: Client<u32> = Client::new(cfg(None), "capture.proxy", None);
        let mut p = Parser::new();
        let mut out = Vec::new();
        c.start(t0, &mut out);
        let mut sent = vec![text(&mut out)];
        let mut events = Vec::new();
        let mut upstream_ids = Vec::new();
        let mut replies = 0u64;
        for rec in capture.lines() {
            let rec: serde_json::Value = serde_json::from_str(rec).unwrap();
            let line = rec["line"].as_str().unwrap();
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            if rec["dir"] == "to_pool" {
                upstream_ids.push(v["method"].as_str().unwrap().to_owned());
                continue;
            }
            // Our ids differ from the proxy's (0 and 42): answer ours.
            let mut v = v;
            if v.get("result").is_some() {
                replies += 1;
                v["id"] = serde_json::json!(replies);
            }
            if let Some(e) = c.feed(&mut p, v.to_string().as_bytes(), t0, &mut out) {
                events.push(e);
            }
            if !out.is_empty() {
                sent.push(text(&mut out));
            }
        }
        assert_eq!(upstream_ids, ["mining.subscribe", "mining.authorize"]);
        assert_eq!(sent.len(), 2, "{sent:?}");
        assert!(sent[0].contains("\"mining.subscribe\""));
        assert!(sent[1].contains("\"mining.authorize\",\"params\":[\"capture.proxy\",\"x\"]"));
        assert!(
            matches!(&events[0], Event::Subscribed { nonce2_len: 8, session: Some(s), .. } if s == "6b12471f")
        );
        assert!(events.iter().any(|e| matches!(e, Event::Authorized { .. })));
        assert!(events.contains(&Event::Difficulty(0.001)));
        assert_eq!(
            events.iter().filter(|e| matches!(e, Event::Job(_))).count(),
            3
        );
        assert_eq!(c.phase(), Phase::Ready);
    }

    proptest! {
        /// Submits answered in any order, some twice, some never: every verdict reaches its own
        /// submit's tag exactly once, repeats and strangers are unknown, and what is left is
        /// what was never answered.
        #[test]
        fn verdicts_in_any_order(
            n in 1usize..40,
            order in prop::collection::vec(any::<prop::sample::Index>(), 0..60),
            accept in prop::collection::vec(any::<bool>(), 60),
        ) {
            let (mut c, mut p, t0, mut out) = ready(Some(0x1fff_e000));
            let mut ids = Vec::new();
            for i in 0..n {
                let tag = u32::try_from(i).unwrap() * 10;
                ids.push((c.submit(t0, &mut out, "\"j\"", &[0; 4], 0, 0, 0, tag), tag));
            }
            let lines = String::from_utf8(std::mem::take(&mut out)).unwrap();
            prop_assert_eq!(lines.lines().count(), n);
            for l in lines.lines() {
                prop_assert!(l.ends_with(",\"00000000\"]}"), "{}", l);
            }
            let mut answered = std::collections::HashSet::new();
            for (k, pick) in order.iter().enumerate() {
                // Ids up to n + 5 past the first: some are strangers.
                let (id, tag) = ids.get(pick.index(n + 5)).copied().unwrap_or((9999, 0));
                let ok = accept[k];
                let reply = if ok {
                    format!("{{\"id\":{id},\"result\":true,\"error\":null}}")
                } else {
                    format!("{{\"id\":{id},\"result\":false,\"error\":[23,\"Above target\",null]}}")
                };
                let ev = c.feed(&mut p, reply.as_bytes(), t0, &mut out);
                if id != 9999 && answered.insert(id) {
                    prop_assert_eq!(ev, Some(Event::Verdict(Verdict {
                        id,
                        tag,
                        sent: t0,
                        accepted: ok,
                        reason: (!ok).then(|| "Above target".into()),
                    })));
                } else {
                    prop_assert_eq!(ev, Some(Event::UnknownReply { id: Some(id) }));
                }
            }
            prop_assert_eq!(c.pending_submits(), n - answered.len());
            let left: Vec<u64> = c.drain_submits().map(|(id, _)| id).collect();
            prop_assert!(left.iter().all(|id| !answered.contains(id)));
            prop_assert_eq!(left.len(), n - answered.len());
            prop_assert!(out.is_empty());
        }

        /// Whatever the pool sends, the client does not panic and only ever writes whole lines.
        #[test]
        fn any_line_is_survivable(lines in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..120), 0..20)) {
            let (mut c, mut p, t0, mut out) = ready(None);
            for l in &lines {
                let _ = c.feed(&mut p, l, t0, &mut out);
                prop_assert!(out.is_empty() || out.ends_with(b"\n"));
            }
        }
    }
}
