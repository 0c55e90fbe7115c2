//! Stratum client links to upstream pools: [`Pool`] (failover along a list) and [`Link`].

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Instant;

use common::stratum::Parser;
use common::stratum::client::{Client, ClientConfig, ClientHandover, Event, Phase, RequestKind};
use common::stratum::decode::Job;
use common::stratum::write;
use crossbeam_channel::Sender;

use super::engine::{Handle, LinkHandover, Outcome, Session};
use super::{SendError, Shared, UpstreamConfig, UpstreamError, UpstreamServer};

/// Longest extranonce2 a [`Submit`] carries.
pub const MAX_EXTRANONCE2: usize = 16;

/// A share for the upstream. Building and queuing one allocates nothing (the job id is shared).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Submit {
    /// The upstream's job id, as its notify gave it.
    pub job_id: Arc<str>,
    en2: [u8; MAX_EXTRANONCE2],
    en2_len: u8,
    /// ntime.
    pub ntime: u32,
    /// nonce.
    pub nonce: u32,
    /// Version bits; sent only when version rolling was negotiated with the upstream.
    pub version_bits: u32,
    /// The caller's tag, given back with the verdict.
    pub tag: u64,
}

impl Submit {
    /// A submit; `None` when `extranonce2` is longer than [`MAX_EXTRANONCE2`].
    pub fn new(
        job_id: Arc<str>,
        extranonce2: &[u8],
        ntime: u32,
        nonce: u32,
        version_bits: u32,
        tag: u64,
    ) -> Option<Self> {
        let mut en2 = [0; MAX_EXTRANONCE2];
        en2.get_mut(..extranonce2.len())?
            .copy_from_slice(extranonce2);
        Some(Self {
            job_id,
            en2,
            en2_len: u8::try_from(extranonce2.len()).ok()?,
            ntime,
            nonce,
            version_bits,
            tag,
        })
    }

    /// The extranonce2 bytes.
    pub fn extranonce2(&self) -> &[u8] {
        self.en2.get(..usize::from(self.en2_len)).unwrap_or(&[])
    }
}

/// What a stratum upstream link reports. Events other than `Up`, `Down`, `Failed`, `Refused`
/// and `Verdict` are about the active link (the last `Up`); those a connection produced during its
/// handshake (`Subscribed`, the first `Difficulty` and `Job`, …) follow its `Up`.
#[derive(Debug, Clone, PartialEq)]
pub enum UpstreamEvent {
    /// Server `index` completed subscribe and authorise and is now the active link (also on
    /// fail-back; the previous link is closed).
    Up {
        /// Index in `servers`.
        index: usize,
        /// Its URL as configured.
        url: String,
    },
    /// The active link on server `index` went down (TCP error or end, no line for
    /// `idle_timeout`, an honoured `client.reconnect`); other servers are tried.
    Down {
        /// Index in `servers`.
        index: usize,
        /// Why.
        reason: String,
    },
    /// A connection to server `index` failed before it became active (unreachable, refused
    /// subscription (`subscribe refused: …`), unusable subscription, handshake timeout).
    Failed {
        /// Index in `servers`.
        index: usize,
        /// Why.
        reason: String,
    },
    /// Server `index` refused the authorisation (`auth`/`pass` are wrong for it); like
    /// `Failed`, the next server is tried, and this one again later.
    Refused {
        /// Index in `servers`.
        index: usize,
        /// The upstream's reason.
        reason: String,
    },
    /// The answer to `mining.configure`: the version-rolling mask granted, if any.
    VersionRolling(Option<u32>),
    /// Subscribed: the upstream's extranonce1 and extranonce2 size.
    Subscribed {
        /// extranonce1.
        enonce1: Vec<u8>,
        /// extranonce2 size in bytes.
        nonce2len: usize,
    },
    /// Authorised (after `Subscribed`; like it, delivered right after `Up`).
    Authorised,
    /// A new job (`mining.notify`).
    Job(Box<Job>),
    /// A new difficulty, fractional as sent (not clamped).
    Difficulty(f64),
    /// `mining.set_extranonce`.
    Extranonce {
        /// extranonce1.
        enonce1: Vec<u8>,
        /// extranonce2 size in bytes.
        nonce2len: usize,
    },
    /// `mining.set_version_mask`, limited to the mask asked for.
    VersionMask(u32),
    /// `client.reconnect`: honoured (the link reconnects there at once, with the same
    /// credentials, for that one connection; `Down` and `Up` follow; a wait parameter is not
    /// obeyed) or refused (the host is neither configured nor in `reconnect_allow`; logged).
    Reconnect {
        /// Host asked for (`None`: the same server).
        host: Option<String>,
        /// Port asked for.
        port: Option<u16>,
        /// Whether it was followed.
        honoured: bool,
    },
    /// What became of a [`Submit`]: the upstream's verdict, or `accepted: false` with reason
    /// `upstream down`, `upstream switched`, `no answer` (after `submit_timeout`) or
    /// `shutdown` when it was lost. Exactly one per queued submit.
    Verdict {
        /// The submit's tag.
        tag: u64,
        /// Accepted by the upstream.
        accepted: bool,
        /// Why not.
        reason: Option<Cow<'static, str>>,
    },
}

/// A stratum link with failover along [`UpstreamConfig::servers`], in priority order (see the
/// module docs). Dropping it stops its threads without waiting; [`Pool::shutdown`] waits.
#[derive(Debug)]
pub struct Pool {
    handle: Handle<Submit>,
    /// How long [`Pool::release`] waits for the engine.
    release_wait: std::time::Duration,
}

impl Pool {
    /// Checks `cfg` and starts the link's thread; returns at once. Events follow on `events`
    /// (an `Up` once a server completes its handshake, or `Failed`/`Refused` for each that
    /// does not).
    /// A bounded `events` channel slows the link (and so reading from the upstream) when the
    /// owner falls behind.
    pub fn start(
        cfg: UpstreamConfig,
        events: Sender<UpstreamEvent>,
    ) -> Result<Self, UpstreamError> {
        let release_wait = cfg.write_timeout + std::time::Duration::from_secs(1);
        let handle = Handle::start::<StratumSession>(Arc::new(cfg), (), "upstream", events)?;
        Ok(Self {
            handle,
            release_wait,
        })
    }

    /// Queues a submit for the active link. Waits at most `send_block` for room in the queue
    /// (`queue` long), then gives it back as [`SendError::Full`]: the upstream is not keeping
    /// up. Every queued submit gets exactly one [`UpstreamEvent::Verdict`].
    pub fn submit(&self, submit: Submit) -> Result<(), SendError<Submit>> {
        self.handle.send(submit)
    }

    /// [`Pool::submit`] without waiting.
    pub fn try_submit(&self, submit: Submit) -> Result<(), SendError<Submit>> {
        self.handle.try_send(submit)
    }

    /// Submits waiting in the queue (not yet written).
    pub fn queued(&self) -> usize {
        self.handle.queued()
    }

    /// Closes the link and waits for its thread; submits in flight or queued get a verdict
    /// with reason `shutdown`.
    pub fn shutdown(self) {
        self.handle.shutdown();
    }

    /// Starts a link on a connection another process handed over (`-H`,
    /// [`Pool::pause`] there): active on entry `adopted.index` with the client state it had
    /// (negotiated version mask, request ids, submits waiting for their verdict, which still
    /// come here), with no `Up` event and no new subscribe or authorize, so the upstream sees
    /// the same connection and session. Paused: nothing is read until [`Pool::resume`]. A
    /// session state that does not parse is refused.
    pub fn start_adopted(
        cfg: UpstreamConfig,
        events: Sender<UpstreamEvent>,
        adopted: LinkHandover,
    ) -> Result<Self, UpstreamError> {
        if serde_json::from_slice::<ClientHandover<u64>>(&adopted.session).is_err() {
            return Err(UpstreamError::Handover(
                "the upstream connection's client state is unusable",
            ));
        }
        let release_wait = cfg.write_timeout + std::time::Duration::from_secs(1);
        let handle = Handle::start_adopted::<StratumSession>(
            Arc::new(cfg),
            (),
            "upstream",
            events,
            adopted,
        )?;
        Ok(Self {
            handle,
            release_wait,
        })
    }

    /// The first step of handing the link over (`-H`): every queued submit is written,
    /// reading stops once every line read has become an event (keep taking events meanwhile:
    /// the answer comes after them), probes of other entries are dropped, and the answer is
    /// the active connection (a duplicate of its socket, its entry, its unread partial line,
    /// its client state), or why not (no active link, a handshake not complete, a reader that
    /// did not stop by `deadline`). After a failed handover, [`Pool::resume`]; after a
    /// committed one, [`Pool::release`].
    pub fn pause(
        &self,
        deadline: Instant,
    ) -> crossbeam_channel::Receiver<Result<LinkHandover, String>> {
        self.handle.pause(deadline)
    }

    /// Reads from the upstream again (after [`Pool::pause`], or on an adopted connection).
    pub fn resume(&self) {
        self.handle.resume();
    }

    /// The paused connection belongs to another process: stops the link without shutting the
    /// connection down (the upstream sees nothing); submits afterwards are refused
    /// ([`SendError::Closed`]). Waits for the engine at most `write_timeout` and a second.
    pub fn release(&self) {
        self.handle.release(self.release_wait);
    }
}

/// One upstream server: a [`Pool`] of one entry (it reconnects to the same server when down).
#[derive(Debug)]
pub struct Link {
    pool: Pool,
}

impl Link {
    /// Starts a link to `server`; `cfg.servers` is replaced by it.
    pub fn start(
        server: UpstreamServer,
        cfg: UpstreamConfig,
        events: Sender<UpstreamEvent>,
    ) -> Result<Self, UpstreamError> {
        let cfg = UpstreamConfig {
            servers: vec![server],
            ..cfg
        };
        Ok(Self {
            pool: Pool::start(cfg, events)?,
        })
    }

    /// See [`Pool::submit`].
    pub fn submit(&self, submit: Submit) -> Result<(), SendError<Submit>> {
        self.pool.submit(submit)
    }

    /// See [`Pool::try_submit`].
    pub fn try_submit(&self, submit: Submit) -> Result<(), SendError<Submit>> {
        self.pool.try_submit(submit)
    }

    /// See [`Pool::shutdown`].
    pub fn shutdown(self) {
        self.pool.shutdown();
    }
}

/// The ckpool limits on an upstream's subscription (`generator.c`).
const MAX_ENONCE1: usize = 15;

pub(crate) struct StratumSession {
    index: usize,
    client: Client<u64>,
    parser: Parser,
    job_json: Vec<u8>,
}

impl StratumSession {
    fn event(&mut self, ev: Event<u64>, events: &mut Vec<UpstreamEvent>) -> Outcome {
        let index = self.index;
        match ev {
            Event::VersionRolling(mask) => events.push(UpstreamEvent::VersionRolling(mask)),
            Event::Subscribed {
                extranonce1,
                nonce2_len,
                ..
            } => {
                if extranonce1.len() > MAX_ENONCE1 || !(1..=8).contains(&nonce2_len) {
                    return Outcome::Close(format!(
                        "unusable subscription: enonce1 of {} bytes, nonce2len {nonce2_len}",
                        extranonce1.len()
                    ));
                }
                events.push(UpstreamEvent::Subscribed {
                    enonce1: extranonce1,
                    nonce2len: nonce2_len,
                });
            }
            Event::SubscribeFailed { reason } => {
                return Outcome::Close(format!("subscribe refused: {reason}"));
            }
            Event::Authorized { .. } => events.push(UpstreamEvent::Authorised),
            Event::Refused { reason } => {
                return Outcome::Refused(reason);
            }
            Event::ExtranonceSubscribed(ok) => {
                tracing::debug!(index, ok, "mining.extranonce.subscribe answered");
            }
            Event::Job(job) => events.push(UpstreamEvent::Job(job)),
            Event::Difficulty(d) => events.push(UpstreamEvent::Difficulty(d)),
            Event::Extranonce {
                extranonce1,
                nonce2_len,
            } => events.push(UpstreamEvent::Extranonce {
                enonce1: extranonce1,
                nonce2len: nonce2_len,
            }),
            Event::VersionMask(m) => events.push(UpstreamEvent::VersionMask(m)),
            Event::Reconnect(r) => {
                return Outcome::Redirect {
                    host: r.host,
                    port: r.port,
                };
            }
            Event::Message(text) => tracing::info!(index, %text, "upstream message"),
            Event::Ping | Event::GetVersion => {}
            Event::Verdict(v) => events.push(UpstreamEvent::Verdict {
                tag: v.tag,
                accepted: v.accepted,
                reason: v.reason,
            }),
            Event::SubmitTimedOut { tag, .. } => events.push(UpstreamEvent::Verdict {
                tag,
                accepted: false,
                reason: Some(Cow::Borrowed("no answer")),
            }),
            Event::TimedOut(kind @ (RequestKind::Subscribe | RequestKind::Authorize)) => {
                return Outcome::Close(format!("{kind:?} unanswered"));
            }
            Event::TimedOut(kind) => tracing::debug!(index, ?kind, "request unanswered"),
            Event::UnknownReply { id } => tracing::debug!(index, ?id, "reply to no request"),
            Event::BadNotification { method, what } => {
                tracing::warn!(index, %method, what, "bad notification from upstream");
            }
            Event::Unparseable(e) => tracing::warn!(index, %e, "unparseable line from upstream"),
            Event::Unhandled(method) => tracing::debug!(index, %method, "unhandled method"),
        }
        if self.client.phase() == Phase::Failed {
            return Outcome::Close("handshake failed".to_owned());
        }
        Outcome::Continue
    }
}

impl Session for StratumSession {
    type Cmd = Submit;
    type Event = UpstreamEvent;
    type Params = ();
    const LOSE_QUEUED_ON_SWITCH: bool = true;

    fn new(cfg: &Shared, (): &(), index: usize) -> Self {
        let server = cfg.servers.get(index);
        let client_cfg = ClientConfig {
            pass: server.map(|s| s.pass.clone()).unwrap_or_default(),
            version_rolling: cfg.version_rolling,
            extranonce_subscribe: cfg.extranonce_subscribe,
            request_timeout: cfg.handshake_timeout,
            submit_timeout: cfg.submit_timeout,
            ..ClientConfig::new(cfg.user_agent.clone())
        };
        let user = server.map(|s| s.auth.as_str()).unwrap_or_default();
        Self {
            index,
            client: Client::new(Arc::new(client_cfg), user, None),
            parser: Parser::new(),
            job_json: Vec::with_capacity(64),
        }
    }

    fn start(&mut self, now: Instant, out: &mut Vec<u8>) {
        self.client.start(now, out);
    }

    fn export(&self) -> Vec<u8> {
        // A link is paused only once active, so ready; an unready one carries nothing and
        // is refused by the adopting side.
        self.client
            .handover_state()
            .and_then(|st| serde_json::to_vec(&st).ok())
            .unwrap_or_default()
    }

    fn import(&mut self, state: &[u8], now: Instant) -> Result<(), String> {
        let st: ClientHandover<u64> =
            serde_json::from_slice(state).map_err(|e| format!("client state: {e}"))?;
        let cfg = Arc::clone(self.client.config());
        let user = self.client.user().to_owned();
        self.client = Client::adopt(cfg, &user, st, now);
        Ok(())
    }

    fn ready(&self) -> bool {
        self.client.phase() == Phase::Ready
    }

    fn line(
        &mut self,
        line: &[u8],
        now: Instant,
        out: &mut Vec<u8>,
        events: &mut Vec<UpstreamEvent>,
    ) -> Outcome {
        match self.client.feed(&mut self.parser, line, now, out) {
            Some(ev) => self.event(ev, events),
            None => Outcome::Continue,
        }
    }

    fn deadline(&self) -> Option<Instant> {
        self.client.deadline()
    }

    fn poll(
        &mut self,
        now: Instant,
        out: &mut Vec<u8>,
        events: &mut Vec<UpstreamEvent>,
    ) -> Outcome {
        while let Some(ev) = self.client.poll(now, out) {
            if let o @ (Outcome::Close(_) | Outcome::Refused(_) | Outcome::Redirect { .. }) =
                self.event(ev, events)
            {
                return o;
            }
        }
        Outcome::Continue
    }

    fn command(
        &mut self,
        cmd: Submit,
        now: Instant,
        out: &mut Vec<u8>,
        events: &mut Vec<UpstreamEvent>,
    ) {
        if self.client.phase() != Phase::Ready {
            return Self::lose(cmd, "upstream down", events);
        }
        self.job_json.clear();
        write::write_str(&mut self.job_json, &cmd.job_id);
        let Ok(job_json) = std::str::from_utf8(&self.job_json) else {
            return Self::lose(cmd, "bad job id", events);
        };
        self.client.submit(
            now,
            out,
            job_json,
            cmd.extranonce2(),
            cmd.ntime,
            cmd.nonce,
            cmd.version_bits,
            cmd.tag,
        );
    }

    fn lose(cmd: Submit, reason: &'static str, events: &mut Vec<UpstreamEvent>) {
        events.push(UpstreamEvent::Verdict {
            tag: cmd.tag,
            accepted: false,
            reason: Some(Cow::Borrowed(reason)),
        });
    }

    fn drain(&mut self, reason: &'static str, events: &mut Vec<UpstreamEvent>) {
        for (_, tag) in self.client.drain_submits() {
            events.push(UpstreamEvent::Verdict {
                tag,
                accepted: false,
                reason: Some(Cow::Borrowed(reason)),
            });
        }
    }

    fn up_event(index: usize, url: &str) -> UpstreamEvent {
        UpstreamEvent::Up {
            index,
            url: url.to_owned(),
        }
    }

    fn down_event(index: usize, reason: String) -> UpstreamEvent {
        UpstreamEvent::Down { index, reason }
    }

    fn failed_event(index: usize, reason: String) -> UpstreamEvent {
        UpstreamEvent::Failed { index, reason }
    }

    fn refused_event(index: usize, reason: String) -> UpstreamEvent {
        UpstreamEvent::Refused { index, reason }
    }

    fn reconnect_event(
        host: Option<String>,
        port: Option<u16>,
        honoured: bool,
    ) -> Option<UpstreamEvent> {
        Some(UpstreamEvent::Reconnect {
            host,
            port,
            honoured,
        })
    }
}
