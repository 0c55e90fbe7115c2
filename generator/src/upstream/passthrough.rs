//! A passthrough (`-P`) or node (`-N`) link: ckpool's framing over one TCP connection, with
//! failover along the server list.

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::stratum::passthrough::{self, FromUpstream, Role};
use crossbeam_channel::{Receiver, Sender};

use super::engine::{Handle, LinkHandover, LinkOwner, Outcome, Session};
use super::{SendError, Shared, UpstreamConfig, UpstreamError};

/// What the passthrough sends up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MinerLine {
    /// A miner's line (as it sent it, without its newline), sent up compacted with
    /// `"client_id":N,"address":"…","server":S` appended. A line that is not a JSON object is
    /// dropped (logged).
    Line {
        /// The miner's id on this passthrough.
        client_id: u64,
        /// The miner's IP address (ckpool's upstream trusts it).
        address: Arc<str>,
        /// Index of the listening server the miner came in on.
        server: u64,
        /// The line.
        line: Vec<u8>,
    },
    /// The miner left (`mining.term`).
    Term {
        /// The miner's id on this passthrough.
        client_id: u64,
        /// The miner's IP address.
        address: Arc<str>,
        /// Index of the listening server.
        server: u64,
    },
}

/// What a passthrough link reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PassthroughEvent {
    /// Server `index` accepted the handshake and is the active link. Its miners have no
    /// sessions there yet: replay each miner's configure/subscribe/authorize lines.
    Up {
        /// Index in `servers`.
        index: usize,
        /// Its URL as configured.
        url: String,
    },
    /// The active link went down. Miner lines sent while no link is active are dropped
    /// (logged at debug); the owner should answer its miners itself until the next `Up`.
    Down {
        /// Index in `servers`.
        index: usize,
        /// Why.
        reason: String,
    },
    /// A connection to server `index` failed before its handshake completed.
    Failed {
        /// Index in `servers`.
        index: usize,
        /// Why.
        reason: String,
    },
    /// A line for miner `client_id`: what the miner gets (without `client_id` and
    /// `node.method`), newline included.
    Client {
        /// The miner's id on this passthrough.
        client_id: u64,
        /// The line to write to the miner.
        line: Vec<u8>,
    },
    /// One line for several miners (a multicast line): what each miner in `client_ids` gets
    /// (without `client_ids` and `node.method`), newline included, shared.
    Clients {
        /// The miners' ids on this passthrough.
        client_ids: Vec<u64>,
        /// The line to write to each.
        line: Arc<[u8]>,
    },
    /// A JSON object for the link itself (no `client_id`: a node's `workinfo`, …), as it came
    /// (without newline).
    Link {
        /// The line.
        line: Vec<u8>,
    },
    /// A line that is not JSON, such as `dropclient=N` (see
    /// [`PassthroughEvent::dropclient`]): data for the owner to judge, never run as a command.
    Text {
        /// The line (without newline).
        line: Vec<u8>,
    },
}

impl PassthroughEvent {
    /// For a `Text` event `dropclient=N`: the client the upstream dropped.
    pub fn dropclient(&self) -> Option<u64> {
        match self {
            Self::Text { line } => FromUpstream::Text(line).dropclient(),
            _ => None,
        }
    }
}

/// A passthrough link (see the module docs). Dropping it stops its threads without waiting;
/// [`PassthroughLink::shutdown`] waits.
#[derive(Debug)]
pub struct PassthroughLink {
    handle: Handle<MinerLine>,
    /// How long [`PassthroughLink::release`] waits for the engine (a write may be under way).
    release_wait: Duration,
}

impl PassthroughLink {
    /// Starts the link: `role` picks `mining.passthrough` or `mining.node`; the handshake's
    /// parameter is `cfg.user_agent`. `auth`/`pass` of the servers are unused, and so are the
    /// stratum settings (version rolling, submit timeout). A bounded `events` channel slows
    /// reading from the upstream when the owner falls behind.
    ///
    /// `idle_timeout` applies here too, but a ckpool upstream sends nothing on a link with no
    /// miners behind it: set it to `None` unless the upstream is known to talk regularly (a
    /// node link gets a workinfo per template).
    ///
    /// The sockets ask for 1 MiB buffers each way, as ckpool's (capped by the kernel's
    /// `net.core.wmem_max`/`rmem_max`), and use TCP keep-alive.
    pub fn start(
        cfg: UpstreamConfig,
        role: Role,
        events: Sender<PassthroughEvent>,
    ) -> Result<Self, UpstreamError> {
        let name = match role {
            Role::Passthrough => "passthrough",
            Role::Node => "node-link",
        };
        let release_wait = cfg.write_timeout + Duration::from_secs(1);
        let handle = Handle::start::<PassthroughSession>(Arc::new(cfg), role, name, events)?;
        Ok(Self {
            handle,
            release_wait,
        })
    }

    /// [`PassthroughLink::start`] for an owner that reads the active connection itself: once a
    /// connection has completed its handshake, its socket goes to `owner` ([`LinkOwner`],
    /// before the connection's `Up`), which reads its lines (classify them with
    /// [`PassthroughLink::classify`]) and reports its end with [`PassthroughLink::lost`]. No
    /// line of an owned connection comes as an event. Every write goes through the link
    /// ([`PassthroughLink::write`], [`PassthroughLink::send`]): the owner never writes to the
    /// socket, so one lock orders every byte sent. With `adopted` (`-H`), as
    /// [`PassthroughLink::start_adopted`]: the connection goes to the owner at
    /// [`PassthroughLink::resume`] (or the owner has it already: [`PassthroughLink::resume_owned`]).
    pub fn start_owned(
        cfg: UpstreamConfig,
        role: Role,
        events: Sender<PassthroughEvent>,
        owner: LinkOwner,
        adopted: Option<LinkHandover>,
    ) -> Result<Self, UpstreamError> {
        let name = match role {
            Role::Passthrough => "passthrough",
            Role::Node => "node-link",
        };
        let release_wait = cfg.write_timeout + Duration::from_secs(1);
        let handle = Handle::start_owned::<PassthroughSession>(
            Arc::new(cfg),
            role,
            name,
            events,
            owner,
            adopted,
        )?;
        Ok(Self {
            handle,
            release_wait,
        })
    }

    /// What a line read from an owned connection (without its newline) is: a line for miners
    /// ([`PassthroughEvent::Client`], [`PassthroughEvent::Clients`]), a
    /// [`PassthroughEvent::Text`] (such as `dropclient`) or a [`PassthroughEvent::Link`].
    pub fn classify(line: &[u8]) -> PassthroughEvent {
        miner_event(line).unwrap_or_else(|| {
            let mut scratch = Vec::new();
            match passthrough::decode_upstream(line, &mut scratch) {
                FromUpstream::Text(t) => PassthroughEvent::Text { line: t.to_vec() },
                _ => PassthroughEvent::Link {
                    line: line.to_vec(),
                },
            }
        })
    }

    /// The owner's connection `serial` ([`crate::upstream::OwnedLink::serial`]) ended: if it is the
    /// active one the link goes down (`Down`) and fails over.
    pub fn lost(&self, serial: u64, reason: String) {
        self.handle.lost(serial, reason);
    }

    /// [`PassthroughLink::resume`] on an owned link whose owner already reads the connection
    /// (it came with a handover, as connection `serial`).
    pub fn resume_owned(&self, serial: u64) {
        self.handle.resume_owned(serial);
    }

    /// Queues a line for the upstream, waiting at most `send_block` for room, then giving it
    /// back as [`SendError::Full`]: the upstream is not reading fast enough, so the caller
    /// should stop reading from its miners for a while. Memory stays bounded by `queue` lines.
    pub fn send(&self, line: MinerLine) -> Result<(), SendError<MinerLine>> {
        self.handle.send(line)
    }

    /// Writes `bytes`, whole lines already framed for the upstream
    /// (`common::stratum::passthrough::encode_miner_line`, `term`), to the active connection
    /// from the calling thread: no thread hop unless the socket is full (then the link's engine
    /// writes what it did not take). Waits at most `wait` while the engine has more than 1 MiB
    /// of such bytes left to write. Only on an owned link
    /// ([`PassthroughLink::start_owned`]); [`crate::upstream::WriteError::NoLink`] when no
    /// connection is active (the bytes are dropped, as queued lines are then). Lines sent with
    /// [`PassthroughLink::send`] are not ordered with these: use one or the other.
    pub fn write(&self, bytes: &[u8], wait: Duration) -> Result<(), super::WriteError> {
        self.handle.write(bytes, wait)
    }

    /// [`PassthroughLink::send`] without waiting.
    pub fn try_send(&self, line: MinerLine) -> Result<(), SendError<MinerLine>> {
        self.handle.try_send(line)
    }

    /// Bytes of [`PassthroughLink::write`]s the socket did not take and the link has not
    /// written yet (a slow upstream shows here; with direct writes the queue stays empty).
    pub fn unwritten(&self) -> usize {
        self.handle.unwritten()
    }

    /// Lines waiting in the queue.
    pub fn queued(&self) -> usize {
        self.handle.queued()
    }

    /// Closes the link and waits for its thread (at most `write_timeout` when a write is
    /// blocked).
    pub fn shutdown(self) {
        self.handle.shutdown();
    }

    /// Starts a link on a connection another process handed over (`-H`), whose handshake is
    /// done: active on entry `adopted.index`, with no `Up` event, and paused: nothing is read
    /// from it until [`PassthroughLink::resume`] (so lines for miners not yet taken over wait
    /// in the socket). Miner lines sent meanwhile go up at once.
    pub fn start_adopted(
        cfg: UpstreamConfig,
        role: Role,
        events: Sender<PassthroughEvent>,
        adopted: LinkHandover,
    ) -> Result<Self, UpstreamError> {
        let name = match role {
            Role::Passthrough => "passthrough",
            Role::Node => "node-link",
        };
        let release_wait = cfg.write_timeout + Duration::from_secs(1);
        let handle = Handle::start_adopted::<PassthroughSession>(
            Arc::new(cfg),
            role,
            name,
            events,
            adopted,
        )?;
        Ok(Self {
            handle,
            release_wait,
        })
    }

    /// The first step of handing the link over (`-H`): every queued line is written, reading
    /// stops once every line read has become an event (keep taking events meanwhile: the answer
    /// comes after them), probes of other entries are dropped, and the answer is the active
    /// connection (a duplicate of its socket, its entry, its unread partial line), or why not
    /// (no active link, a reader that did not stop by `deadline`). After a failed handover,
    /// [`PassthroughLink::resume`]; after a committed one, [`PassthroughLink::release`].
    pub fn pause(&self, deadline: Instant) -> Receiver<Result<LinkHandover, String>> {
        self.handle.pause(deadline)
    }

    /// Reads from the upstream again (after [`PassthroughLink::pause`], or on an adopted
    /// connection once its miners are there).
    pub fn resume(&self) {
        self.handle.resume();
    }

    /// The paused connection belongs to another process: stops the link without shutting the
    /// connection down (the upstream sees nothing); lines sent afterwards are refused
    /// ([`SendError::Closed`]), so nothing more goes to the connection from this process. Waits
    /// for the engine at most `write_timeout`.
    pub fn release(&self) {
        self.handle.release(self.release_wait);
    }
}

/// The event of a line for miners (or a `dropclient`), if `line` is one.
fn miner_event(line: &[u8]) -> Option<PassthroughEvent> {
    let mut for_miner = Vec::with_capacity(line.len() + 1);
    match passthrough::decode_upstream(line, &mut for_miner) {
        FromUpstream::Client { client_id, .. } => Some(PassthroughEvent::Client {
            client_id,
            line: for_miner,
        }),
        FromUpstream::Clients { ids, .. } => {
            let mut client_ids = Vec::new();
            if !passthrough::client_ids(ids, &mut client_ids) {
                tracing::debug!(
                    len = line.len(),
                    "multicast line with a bad client_ids list dropped"
                );
                client_ids.clear();
            }
            Some(PassthroughEvent::Clients {
                client_ids,
                line: for_miner.into(),
            })
        }
        t @ FromUpstream::Text(_) if t.dropclient().is_some() => Some(PassthroughEvent::Text {
            line: line.to_vec(),
        }),
        FromUpstream::HandshakeOk | FromUpstream::Link { .. } | FromUpstream::Text(_) => None,
    }
}

/// Node messages a node link takes before the handshake's answer (see `PassthroughSession::line`).
const MAX_EARLY_NODE_LINES: usize = 16;

pub(crate) struct PassthroughSession {
    index: usize,
    role: Role,
    agent: String,
    multicast: bool,
    ready: bool,
    /// Node messages taken before the handshake's answer.
    early: usize,
}

impl Session for PassthroughSession {
    type Cmd = MinerLine;
    type Event = PassthroughEvent;
    type Params = Role;
    const LOSE_QUEUED_ON_SWITCH: bool = false;

    fn new(cfg: &Shared, role: &Role, index: usize) -> Self {
        Self {
            index,
            role: *role,
            agent: cfg.user_agent.clone(),
            multicast: cfg.multicast,
            ready: false,
            early: 0,
        }
    }

    fn start(&mut self, _now: Instant, out: &mut Vec<u8>) {
        passthrough::handshake_ext(out, self.role, &self.agent, self.multicast);
    }

    fn adopted(&mut self) {
        self.ready = true;
    }

    fn ready(&self) -> bool {
        self.ready
    }

    fn line(
        &mut self,
        line: &[u8],
        _now: Instant,
        _out: &mut Vec<u8>,
        events: &mut Vec<PassthroughEvent>,
    ) -> Outcome {
        if !self.ready {
            let mut for_miner = Vec::new();
            return match passthrough::decode_upstream(line, &mut for_miner) {
                FromUpstream::HandshakeOk => {
                    self.ready = true;
                    Outcome::Continue
                }
                // A ckpool pool's stratifier may send a node its transactions before its
                // connector's `{"result":true}` (seen with ckpool-lhr; 0.9.9's capture has
                // them after). Kept in order: the engine holds a candidate's events and
                // hands them on after its `Up`; bounded, the handshake has a deadline too.
                FromUpstream::Link { .. }
                    if self.role == Role::Node && self.early < MAX_EARLY_NODE_LINES =>
                {
                    self.early += 1;
                    events.push(PassthroughEvent::Link {
                        line: line.to_vec(),
                    });
                    Outcome::Continue
                }
                _ => Outcome::Close(format!(
                    "handshake answered with {:?}",
                    String::from_utf8_lossy(line.get(..80).unwrap_or(line))
                )),
            };
        }
        events.push(PassthroughLink::classify(line));
        Outcome::Continue
    }

    fn deadline(&self) -> Option<Instant> {
        None
    }

    fn poll(&mut self, _: Instant, _: &mut Vec<u8>, _: &mut Vec<PassthroughEvent>) -> Outcome {
        Outcome::Continue
    }

    fn command(
        &mut self,
        cmd: MinerLine,
        _now: Instant,
        out: &mut Vec<u8>,
        events: &mut Vec<PassthroughEvent>,
    ) {
        if !self.ready {
            return Self::lose(cmd, "upstream down", events);
        }
        match cmd {
            MinerLine::Line {
                client_id,
                address,
                server,
                line,
            } => {
                let mark = out.len();
                if passthrough::encode_miner_line(out, &line, client_id, &address, server).is_err()
                {
                    out.truncate(mark);
                    tracing::debug!(
                        index = self.index,
                        client_id,
                        "miner line is not a JSON object: not sent up"
                    );
                }
            }
            MinerLine::Term {
                client_id,
                address,
                server,
            } => passthrough::term(out, client_id, &address, server),
        }
    }

    fn lose(cmd: MinerLine, reason: &'static str, _events: &mut Vec<PassthroughEvent>) {
        let client_id = match cmd {
            MinerLine::Line { client_id, .. } | MinerLine::Term { client_id, .. } => client_id,
        };
        tracing::debug!(client_id, reason, "miner line dropped: no upstream link");
    }

    fn drain(&mut self, _reason: &'static str, _events: &mut Vec<PassthroughEvent>) {}

    fn up_event(index: usize, url: &str) -> PassthroughEvent {
        PassthroughEvent::Up {
            index,
            url: url.to_owned(),
        }
    }

    fn down_event(index: usize, reason: String) -> PassthroughEvent {
        PassthroughEvent::Down { index, reason }
    }

    fn failed_event(index: usize, reason: String) -> PassthroughEvent {
        PassthroughEvent::Failed { index, reason }
    }

    fn reconnect_event(_: Option<String>, _: Option<u16>, _: bool) -> Option<PassthroughEvent> {
        // Never asked: a passthrough session does not redirect (client.reconnect is a miner's).
        None
    }
}
