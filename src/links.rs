//! The pool side of ckpool's passthrough links (`mining.passthrough`, ckpool.md §5.1).
//!
//! A connection that came in on a `passthroughserver` address and whose first line is the
//! handshake `{"method":"mining.passthrough",…}` gets ckpool's bare `{"result":true}` and
//! becomes a link: its own session is closed, and every later line is a miner's line tagged
//! with `client_id` (plus `address` and `server`), given to the shard as the sub-client
//! [`ClientId::Sub`]`(conn, client_id)`. A sub-client's session is opened with its first line;
//! the `address` the passthrough gives is believed as that sub-client's address only (logged as
//! "address via peer"). `mining.term` from the link ends that sub-client; when the pool drops a
//! sub-client it writes the raw line `dropclient=N` on the link, as ckpool does; the link
//! closing ends its own sub-clients only (ids are per connection, so a passthrough can neither
//! name nor drop another's).
//!
//! Output for a sub-client is framed as ckpool frames it: `"node.method":"<type>","client_id":N`
//! appended to the line. The type of a reply comes from the request it answers (set while the
//! shard handles that request), that of a notification from its method. A job broadcast to a
//! link's sub-clients is written once per sub-client into one buffer per link (the notify's
//! bytes, spliced, no other allocation), sent in chunks of at most [`CHUNK`] bytes.
//!
//! A link whose handshake asked for it (`"multicast":true`, sent by ckpool-rs passthroughs, not by
//! ckpool's) gets a line that goes to many of its sub-clients alike (a job's notify) once, naming
//! them in `"client_ids":[…]` (at most [`passthrough::MAX_MULTICAST_IDS`] a line), instead of
//! once per sub-client: for 14,000 sub-clients about 90 KB instead of 10 MB a job. Consecutive
//! sends of one shared buffer to a link's sub-clients are gathered; any other line for the link
//! ends the gathering first, so the link's lines keep the order the shard wrote them in.
//!
//! A connection on a `nodeserver` address whose first line is `{"method":"mining.node",…}`
//! becomes a **node link** (ckpool.md §5.3): framed as a passthrough for its miners, and also
//! sent the pool's work as ckpool sends it to its nodes ([`common::stratum::node`]): at once the
//! transactions and the workinfo of the current job, then for each new job of the pool's own
//! source the transactions the link has not had yet followed by the job's `workinfo`, both
//! before the job's notify reaches the link's miners; and each block the pool finds as a
//! `block` message ([`LinkRegistry::broadcast_block`]), for the node to submit to its own
//! bitcoind. Node links are served in pool mode only (solo mode's coinbases are per user).
//!
//! Connections on other listeners never reach this code's branches: the shard refuses
//! `mining.passthrough` and `mining.node` there with a stratum error.

use std::collections::{HashMap, HashSet};
use std::mem;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use common::ConnId;
use common::stratum::node::{self, BlockSolve, WorkInfo};
use common::stratum::passthrough::{self, FromDownstream, Role};
use common::stratum::write::write_u64;
use connector::ConnectorHandle;
use stratifier::{ClientId, Event, Job, Origin, Out, Shard, SourceId};
use tracing::{debug, info, warn};

use crate::handoff::Msg;

/// A link's output is sent in pieces of about this many bytes (a job fanned out to 20,000
/// sub-clients is about 14 MB).
pub(crate) const CHUNK: usize = 256 * 1024;
/// Sub-clients one link may have at once; a line for a new one beyond it gets `dropclient`.
pub(crate) const MAX_SUBS_PER_LINK: usize = 262_144;

/// An [`Out`] that can also mark a connection as a link for the connector
/// ([`connector::Outbox::trunk`]: a larger cap on its queued bytes).
pub(crate) trait LinkOut: Out {
    /// Marks `conn` as a link.
    fn trunk(&mut self, conn: ConnId);
}

/// What every shard's [`Links`] share: which listeners take passthroughs, and the registry.
#[derive(Clone, Default)]
pub(crate) struct LinkConfig {
    /// Per listener index: whether it is a `passthroughserver` address.
    pub(crate) allowed: Arc<[bool]>,
    /// Per listener index: whether it is a `nodeserver` address (empty: none is).
    pub(crate) nodes: Arc<[bool]>,
    /// The open links of every shard, for the admin `stats`.
    pub(crate) registry: Arc<LinkRegistry>,
}

/// The passthrough links open on every shard (locked when a link opens or closes, and by the
/// admin `stats`).
#[derive(Default)]
pub(crate) struct LinkRegistry {
    links: Mutex<HashMap<ConnId, Arc<LinkInfo>>>,
    /// Node links open now.
    nodes: AtomicUsize,
    /// Where a `block` message for the node links goes (set once the connector runs).
    handle: OnceLock<ConnectorHandle<Msg>>,
}

/// One link as the registry shows it.
struct LinkInfo {
    peer: SocketAddr,
    agent: String,
    /// A node link (`mining.node`), not a passthrough.
    node: bool,
    /// It takes multicast lines.
    multicast: bool,
    /// Its sub-clients now (written by its shard only).
    subs: AtomicUsize,
}

impl LinkRegistry {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<ConnId, Arc<LinkInfo>>> {
        self.links
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// `(peer, sub-clients)` of every link open now, by peer.
    pub(crate) fn subclients(&self) -> Vec<(String, usize)> {
        let mut list: Vec<(String, usize)> = self
            .lock()
            .values()
            .map(|l| (l.peer.to_string(), l.subs.load(Ordering::Relaxed)))
            .collect();
        list.sort();
        list
    }

    /// `[{"peer","agent","subclients"[,"node":true][,"multicast":true]}…]`, by peer.
    pub(crate) fn snapshot(&self) -> serde_json::Value {
        let mut list: Vec<(String, String, usize, bool, bool)> = self
            .lock()
            .values()
            .map(|l| {
                (
                    l.peer.to_string(),
                    l.agent.clone(),
                    l.subs.load(Ordering::Relaxed),
                    l.node,
                    l.multicast,
                )
            })
            .collect();
        list.sort();
        list.into_iter()
            .map(|(peer, agent, subs, node, multicast)| {
                let mut v = serde_json::json!({"peer": peer, "agent": agent, "subclients": subs});
                if node {
                    v["node"] = true.into();
                }
                if multicast {
                    v["multicast"] = true.into();
                }
                v
            })
            .collect()
    }

    /// Where [`Self::broadcast_block`] sends: the running connector.
    pub(crate) fn set_handle(&self, handle: ConnectorHandle<Msg>) {
        let _ = self.handle.set(handle);
    }

    /// Sends a block the pool found to every node link, as ckpool's `block` message (before
    /// the pool's own submission is queued: a node may reach the network first).
    pub(crate) fn broadcast_block(&self, solve: &BlockSolve) {
        if self.nodes.load(Ordering::Relaxed) == 0 {
            return;
        }
        let Some(handle) = self.handle.get() else {
            return;
        };
        let mut line = Vec::with_capacity(512 + solve.coinbase.len() * 2);
        solve.write(&mut line);
        info!(
            jobid = solve.jobid,
            nodes = self.nodes.load(Ordering::Relaxed),
            "block sent to the node links"
        );
        handle.broadcast(Msg::NodeBlock(line.into()));
    }
}

/// One shard's passthrough links (one per connector thread, next to its shard).
pub(crate) struct Links {
    /// Per listener index: whether it is a `passthroughserver` address.
    allowed: Arc<[bool]>,
    /// Per listener index: whether it is a `nodeserver` address.
    nodes: Arc<[bool]>,
    registry: Arc<LinkRegistry>,
    /// Connections on a passthrough or node listener that have not sent a line yet.
    candidates: HashMap<ConnId, (usize, SocketAddr)>,
    links: HashMap<ConnId, Link>,
    scratch: Vec<u8>,
    pending: Pending,
}

struct Link {
    peer: SocketAddr,
    listener: usize,
    subs: usize,
    info: Arc<LinkInfo>,
    /// A node link: the transactions it has been sent (by wtxid), of the last job only.
    node: Option<HashSet<[u8; 32]>>,
}

impl Link {
    fn set_subs(&mut self, subs: usize) {
        self.subs = subs;
        self.info.subs.store(subs, Ordering::Relaxed);
    }
}

/// Framed output collected during one shard call, sent when it returns.
#[derive(Default)]
struct Pending {
    /// Per link, in order; a link may have several entries (chunks).
    bufs: Vec<(ConnId, Vec<u8>)>,
    /// Sub-clients the shard closed: their sessions end once the call returns.
    closed: Vec<ClientId>,
    /// `node.method` of a reply (a line without a method) in the current call.
    reply: &'static str,
    /// The last shared line framed and its `node.method`: a job's notify is one buffer for
    /// every session, so its type is found once per job, not once per sub-client.
    last_shared: Option<(Arc<[u8]>, &'static str)>,
    /// The links (of this shard) that take multicast lines.
    multicast: Vec<ConnId>,
    /// Per multicast link: the shared line being gathered, its type and its sub-clients.
    groups: Vec<(ConnId, Group)>,
}

/// A multicast line being gathered for one link.
struct Group {
    body: Arc<[u8]>,
    kind: &'static str,
    ids: Vec<u64>,
}

impl Pending {
    /// Frames each line of `bytes` (the shard may write a reply and a notification in one
    /// buffer) for sub-client `id` of link `conn`.
    fn frame_lines(&mut self, conn: ConnId, bytes: &[u8], id: u64) {
        for body in bytes.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
            let kind = method_of(body).map_or(self.reply, notify_type);
            frame(self.buf(conn), body, kind, id);
        }
    }

    /// Gathers shared line `bytes` (one line) for sub-client `id` of multicast link `conn`.
    fn gather(&mut self, conn: ConnId, bytes: Arc<[u8]>, id: u64) {
        if let Some((_, g)) = self.groups.iter_mut().find(|(c, _)| *c == conn)
            && Arc::ptr_eq(&g.body, &bytes)
            && g.ids.len() < passthrough::MAX_MULTICAST_IDS
        {
            g.ids.push(id);
            return;
        }
        self.flush_group(conn);
        let kind = match &self.last_shared {
            Some((last, kind)) if Arc::ptr_eq(last, &bytes) => kind,
            _ => {
                let body = bytes.strip_suffix(b"\n").unwrap_or(&bytes);
                let kind = method_of(body).map_or(self.reply, notify_type);
                self.last_shared = Some((Arc::clone(&bytes), kind));
                kind
            }
        };
        let mut ids = Vec::with_capacity(64);
        ids.push(id);
        self.groups.push((
            conn,
            Group {
                body: bytes,
                kind,
                ids,
            },
        ));
    }

    /// Writes link `conn`'s gathered line, if any, to its buffer.
    fn flush_group(&mut self, conn: ConnId) {
        if self.groups.is_empty() {
            return;
        }
        let Some(i) = self.groups.iter().position(|(c, _)| *c == conn) else {
            return;
        };
        let (_, g) = self.groups.swap_remove(i);
        let body = g.body.strip_suffix(b"\n").unwrap_or(&g.body);
        let buf = self.raw_buf(conn);
        match g.ids.as_slice() {
            [id] => frame(buf, body, g.kind, *id),
            ids => frame_multi(buf, body, g.kind, ids),
        }
    }

    /// Writes every gathered line.
    fn flush_groups(&mut self) {
        while let Some(&(conn, _)) = self.groups.last() {
            self.flush_group(conn);
        }
    }

    /// The buffer to append to for link `conn` (its gathered line written first).
    fn buf(&mut self, conn: ConnId) -> &mut Vec<u8> {
        self.flush_group(conn);
        self.raw_buf(conn)
    }

    /// The buffer to append to for link `conn`, as it is.
    fn raw_buf(&mut self, conn: ConnId) -> &mut Vec<u8> {
        let pos = self.bufs.iter().rposition(|(c, _)| *c == conn);
        let i = match pos {
            Some(i) if self.bufs.get(i).is_some_and(|(_, b)| b.len() < CHUNK) => i,
            _ => {
                self.bufs.push((conn, Vec::with_capacity(4096)));
                self.bufs.len() - 1
            }
        };
        // The index is in range: found or just pushed.
        &mut self.bufs[i].1
    }
}

impl Links {
    /// Links on the listeners `cfg.allowed` names, registered in `cfg.registry`.
    pub(crate) fn new(cfg: &LinkConfig) -> Self {
        Self {
            allowed: Arc::clone(&cfg.allowed),
            nodes: Arc::clone(&cfg.nodes),
            registry: Arc::clone(&cfg.registry),
            candidates: HashMap::new(),
            links: HashMap::new(),
            scratch: Vec::new(),
            pending: Pending {
                reply: "error",
                ..Pending::default()
            },
        }
    }

    /// A new connection, mining on the work of `source`.
    pub(crate) fn on_open(
        &mut self,
        shard: &mut Shard,
        now: Instant,
        conn: ConnId,
        peer: SocketAddr,
        listener: usize,
        source: stratifier::SourceId,
    ) {
        if self.allowed.get(listener).copied().unwrap_or(false)
            || self.nodes.get(listener).copied().unwrap_or(false)
        {
            self.candidates.insert(conn, (listener, peer));
        }
        shard.on_open_in(now, conn, peer, listener, source);
    }

    /// A line from connection `conn`.
    pub(crate) fn on_line(
        &mut self,
        shard: &mut Shard,
        now: Instant,
        conn: ConnId,
        line: &[u8],
        out: &mut impl LinkOut,
    ) {
        if !self.links.is_empty() && self.links.contains_key(&conn) {
            self.link_line(shard, now, conn, line, out);
            return;
        }
        if !self.candidates.is_empty()
            && let Some((listener, peer)) = self.candidates.remove(&conn)
            && (contains(line, b"\"mining.passthrough\"") || contains(line, b"\"mining.node\""))
        {
            self.scratch.clear();
            if let FromDownstream::Handshake {
                role,
                agent,
                multicast,
            } = passthrough::decode_downstream(line, &mut self.scratch)
            {
                let on = |list: &Arc<[bool]>| list.get(listener).copied().unwrap_or(false);
                let accepted = match role {
                    Role::Passthrough => on(&self.allowed),
                    Role::Node => on(&self.nodes),
                };
                if accepted {
                    let agent = agent.unwrap_or("").to_owned();
                    self.open_link(
                        shard,
                        now,
                        conn,
                        (peer, listener),
                        (role, &agent, multicast),
                        out,
                    );
                    return;
                }
            }
        }
        shard.on_line(now, conn, line, out);
    }

    /// Makes connection `conn` a link: answers the handshake, and a node link is sent the
    /// current job's transactions and workinfo.
    fn open_link(
        &mut self,
        shard: &mut Shard,
        now: Instant,
        conn: ConnId,
        (peer, listener): (SocketAddr, usize),
        (role, agent, multicast): (Role, &str, bool),
        out: &mut impl LinkOut,
    ) {
        shard.on_close(now, conn);
        let node = role == Role::Node;
        if node {
            info!(%conn, %peer, agent, "node connected");
        } else {
            info!(%conn, %peer, agent, multicast, "passthrough connected");
        }
        // As sent, JSON escapes undone (ckpool writes `ckpool\/0.9.9`).
        let agent = serde_json::from_str::<String>(&format!("\"{agent}\""))
            .unwrap_or_else(|_| agent.to_owned());
        let mut link = self.register(conn, peer, listener, &agent, node, multicast);
        let mut reply = passthrough::HANDSHAKE_OK.to_vec();
        if let Some(job) = shard.pool().current_job() {
            node_work(shard, &job, &mut link, &mut reply);
        }
        self.links.insert(conn, link);
        // A job for each of its sub-clients goes down this one connection (about 14 MB for
        // 20,000), and a node's first reply holds every transaction of the current job: it
        // gets the connector's trunk cap instead of a miner's 1 MiB, before anything is queued.
        out.trunk(conn);
        out.send(ClientId::Direct(conn), reply);
    }

    /// Makes `conn` a link in the registry (and a multicast one, and a node), not yet in
    /// `self.links`: the caller inserts the returned link once it has sent what it must.
    fn register(
        &mut self,
        conn: ConnId,
        peer: SocketAddr,
        listener: usize,
        agent: &str,
        node: bool,
        multicast: bool,
    ) -> Link {
        if node {
            self.registry.nodes.fetch_add(1, Ordering::Relaxed);
        }
        if multicast {
            self.pending.multicast.push(conn);
        }
        let info = Arc::new(LinkInfo {
            peer,
            agent: agent.chars().take(64).collect(),
            node,
            multicast,
            subs: AtomicUsize::new(0),
        });
        self.registry.lock().insert(conn, Arc::clone(&info));
        Link {
            peer,
            listener,
            subs: 0,
            info,
            node: node.then(HashSet::new),
        }
    }

    /// Undoes [`Links::register`] and takes `conn` out of `self.links`; `None` if it is no link.
    fn unregister(&mut self, conn: ConnId) -> Option<Link> {
        let link = self.links.remove(&conn)?;
        self.registry.lock().remove(&conn);
        self.pending.multicast.retain(|c| *c != conn);
        if link.node.is_some() {
            self.registry.nodes.fetch_sub(1, Ordering::Relaxed);
        }
        Some(link)
    }

    /// Hands link `conn` over to another instance (`-H`): it stops being a link here, and its
    /// sub-clients' sessions leave `shard` and travel in the bytes returned, with what the link
    /// is ([`Links::adopt_link`] reads them). `None` if `conn` is no link.
    pub(crate) fn export_link(
        &mut self,
        shard: &mut Shard,
        now: Instant,
        conn: ConnId,
    ) -> Option<Vec<u8>> {
        if self.links.is_empty() {
            return None;
        }
        let link = self.unregister(conn)?;
        let subs = shard.export_subs(now, conn);
        let mut out = Vec::with_capacity(64 + subs.iter().map(|s| s.2.len() + 48).sum::<usize>());
        out.push(LINK_STATE_FORMAT);
        out.push(u8::from(link.node.is_some()) | (u8::from(link.info.multicast) << 1));
        put_bytes(&mut out, link.info.agent.as_bytes());
        out.extend_from_slice(&u32::try_from(subs.len()).unwrap_or(u32::MAX).to_le_bytes());
        for (remote, peer, session) in &subs {
            out.extend_from_slice(&remote.to_le_bytes());
            put_bytes(&mut out, peer.ip().to_string().as_bytes());
            put_bytes(&mut out, session);
        }
        info!(%conn, peer = %link.peer, subs = subs.len(), "handover: passthrough link exported with its sub-clients");
        Some(out)
    }

    /// Takes over a link another instance exported ([`Links::export_link`]) as connection
    /// `conn`: a link again, with its sub-clients' sessions in `shard`. A sub-client whose
    /// session cannot be adopted gets `dropclient` (its passthrough ends it; the miner
    /// reconnects); `false` (and nothing kept) if the bytes cannot be read.
    #[expect(clippy::too_many_arguments, reason = "the adoption's own facts")]
    pub(crate) fn adopt_link(
        &mut self,
        shard: &mut Shard,
        now: Instant,
        conn: ConnId,
        peer: SocketAddr,
        listener: usize,
        state: &[u8],
        out: &mut impl LinkOut,
    ) -> bool {
        let Some((flags, agent, subs)) = read_link_state(state) else {
            return false;
        };
        // What a node was sent is not carried: the next job sends it every transaction.
        let mut link = self.register(conn, peer, listener, &agent, flags & 1 != 0, flags & 2 != 0);
        out.trunk(conn);
        let mut dropped = Vec::new();
        let (mut adopted, mut refused) = (0, 0);
        for (remote, ip, session) in subs {
            let at = SocketAddr::new(ip.unwrap_or(peer.ip()), 0);
            match shard.adopt_session(now, ClientId::Sub(conn, remote), at, listener, session) {
                Ok(()) => adopted += 1,
                Err(e) => {
                    refused += 1;
                    warn!(%conn, client_id = remote, error = %e, "handover: a sub-client's session refused; dropped");
                    dropped.extend_from_slice(b"dropclient=");
                    write_u64(&mut dropped, remote);
                    dropped.push(b'\n');
                }
            }
        }
        link.set_subs(adopted);
        info!(%conn, %peer, subs = adopted, refused, "handover: passthrough link adopted with its sub-clients");
        self.links.insert(conn, link);
        if !dropped.is_empty() {
            out.send(ClientId::Direct(conn), dropped);
        }
        true
    }

    /// A connection closed: a link takes its sub-clients with it.
    pub(crate) fn on_close(&mut self, shard: &mut Shard, now: Instant, conn: ConnId) {
        if !self.candidates.is_empty() {
            self.candidates.remove(&conn);
        }
        if !self.links.is_empty()
            && let Some(link) = self.unregister(conn)
        {
            info!(%conn, peer = %link.peer, subs = link.subs, "passthrough disconnected; its sub-clients end");
        }
        shard.on_close(now, conn);
    }

    /// A new job for every session, sub-clients included.
    pub(crate) fn on_job(
        &mut self,
        shard: &mut Shard,
        now: Instant,
        job: &Arc<stratifier::Job>,
        out: &mut impl Out,
    ) {
        if self.links.is_empty() {
            shard.on_job(job, out);
            return;
        }
        self.pending.reply = "error";
        // A node gets the job's transactions and workinfo before its miners get the notify.
        let mut work = Vec::new();
        for (&conn, link) in &mut self.links {
            if link.node.is_some() {
                work.clear();
                node_work(shard, job, link, &mut work);
                if !work.is_empty() {
                    self.pending.buf(conn).extend_from_slice(&work);
                }
            }
        }
        shard.on_job(
            job,
            &mut Framer {
                inner: out,
                p: &mut self.pending,
            },
        );
        self.finish(shard, now, out);
    }

    /// A `block` message for the node links of this shard.
    pub(crate) fn on_node_block(&mut self, line: &Arc<[u8]>, out: &mut impl Out) {
        for (&conn, link) in &self.links {
            if link.node.is_some() {
                out.send(ClientId::Direct(conn), line.to_vec());
            }
        }
    }

    /// The shard's periodic work.
    pub(crate) fn on_tick(&mut self, shard: &mut Shard, now: Instant, out: &mut impl Out) {
        if self.links.is_empty() {
            shard.on_tick(now, out);
            return;
        }
        self.pending.reply = "error";
        shard.on_tick(
            now,
            &mut Framer {
                inner: out,
                p: &mut self.pending,
            },
        );
        self.finish(shard, now, out);
    }

    fn link_line(
        &mut self,
        shard: &mut Shard,
        now: Instant,
        conn: ConnId,
        line: &[u8],
        out: &mut impl Out,
    ) {
        let mut scratch = mem::take(&mut self.scratch);
        scratch.clear();
        match passthrough::decode_downstream(line, &mut scratch) {
            FromDownstream::Handshake { .. } => {
                debug!(%conn, "repeated handshake on a passthrough link ignored");
            }
            FromDownstream::Term { client_id } => {
                let client = ClientId::Sub(conn, client_id);
                if shard.has_client(client) {
                    shard.on_close(now, client);
                    if let Some(link) = self.links.get_mut(&conn) {
                        link.set_subs(link.subs.saturating_sub(1));
                    }
                }
            }
            FromDownstream::Miner {
                client_id, address, ..
            } => {
                let client = ClientId::Sub(conn, client_id);
                if self.open_sub(shard, now, client, address, out) {
                    let body = scratch.strip_suffix(b"\n").unwrap_or(&scratch);
                    self.pending.reply = reply_type(method_of(body));
                    shard.on_line(
                        now,
                        client,
                        body,
                        &mut Framer {
                            inner: out,
                            p: &mut self.pending,
                        },
                    );
                    self.finish(shard, now, out);
                }
            }
            FromDownstream::Invalid => {
                debug!(%conn, len = line.len(), "line from a passthrough without a usable client_id ignored");
            }
        }
        self.scratch = scratch;
    }

    /// Opens `client`'s session if it has none; `false` if the link is full.
    fn open_sub(
        &mut self,
        shard: &mut Shard,
        now: Instant,
        client: ClientId,
        address: Option<&str>,
        out: &mut impl Out,
    ) -> bool {
        if shard.has_client(client) {
            return true;
        }
        let conn = client.conn();
        let Some(link) = self.links.get_mut(&conn) else {
            return false;
        };
        if link.subs >= MAX_SUBS_PER_LINK {
            warn!(%client, peer = %link.peer, "passthrough has too many sub-clients; new one dropped");
            let mut line = b"dropclient=".to_vec();
            write_u64(&mut line, client.remote().unwrap_or(0));
            line.push(b'\n');
            out.send(ClientId::Direct(conn), line);
            return false;
        }
        let ip = address
            .and_then(|a| a.parse::<IpAddr>().ok())
            .unwrap_or(link.peer.ip());
        debug!(%client, %ip, via = %link.peer, "address via peer");
        link.set_subs(link.subs + 1);
        shard.on_open(now, client, SocketAddr::new(ip, 0), link.listener);
        true
    }

    /// Sends what the shard wrote for sub-clients and ends the sessions it closed.
    fn finish(&mut self, shard: &mut Shard, now: Instant, out: &mut impl Out) {
        self.pending.flush_groups();
        for (conn, buf) in self.pending.bufs.drain(..) {
            if !buf.is_empty() {
                out.send(ClientId::Direct(conn), buf);
            }
        }
        for client in self.pending.closed.drain(..) {
            if shard.has_client(client) {
                shard.on_close(now, client);
                if let Some(link) = self.links.get_mut(&client.conn()) {
                    link.set_subs(link.subs.saturating_sub(1));
                }
            }
        }
        self.pending.reply = "error";
        self.pending.last_shared = None;
    }
}

/// The shard's output with sub-clients' lines framed for their link.
struct Framer<'a, O> {
    inner: &'a mut O,
    p: &'a mut Pending,
}

impl<O: Out> Out for Framer<'_, O> {
    fn send(&mut self, client: ClientId, bytes: Vec<u8>) {
        match client {
            ClientId::Direct(_) => self.inner.send(client, bytes),
            ClientId::Sub(conn, id) => self.p.frame_lines(conn, &bytes, id),
        }
    }

    fn send_shared(&mut self, client: ClientId, bytes: Arc<[u8]>) {
        match client {
            ClientId::Direct(_) => self.inner.send_shared(client, bytes),
            ClientId::Sub(conn, id) => {
                let body = bytes.strip_suffix(b"\n").unwrap_or(&bytes);
                if body.contains(&b'\n') {
                    self.p.frame_lines(conn, &bytes, id);
                    return;
                }
                if !self.p.multicast.is_empty() && self.p.multicast.contains(&conn) {
                    self.p.gather(conn, bytes, id);
                    return;
                }
                let kind = match &self.p.last_shared {
                    Some((last, kind)) if Arc::ptr_eq(last, &bytes) => kind,
                    _ => {
                        let kind = method_of(body).map_or(self.p.reply, notify_type);
                        self.p.last_shared = Some((Arc::clone(&bytes), kind));
                        kind
                    }
                };
                frame(self.p.buf(conn), body, kind, id);
            }
        }
    }

    fn close(&mut self, client: ClientId) {
        match client {
            ClientId::Direct(_) => self.inner.close(client),
            ClientId::Sub(conn, id) => {
                let buf = self.p.buf(conn);
                buf.extend_from_slice(b"dropclient=");
                write_u64(buf, id);
                buf.push(b'\n');
                if !self.p.closed.contains(&client) {
                    self.p.closed.push(client);
                }
            }
        }
    }

    fn event(&mut self, ev: Event) {
        self.inner.event(ev);
    }

    fn wants_shares(&self) -> bool {
        self.inner.wants_shares()
    }
}

/// Appends `body` (one compact JSON object, no newline) with `"node.method":"<kind>",
/// "client_id":<id>` added last. Our own writers end every object with `}`, so that is a
/// splice; anything else goes through the general framer.
fn frame(buf: &mut Vec<u8>, body: &[u8], kind: &str, id: u64) {
    match body.strip_suffix(b"}") {
        Some(open) if open.len() > 1 => {
            buf.extend_from_slice(open);
            buf.extend_from_slice(b",\"node.method\":\"");
            buf.extend_from_slice(kind.as_bytes());
            buf.extend_from_slice(b"\",\"client_id\":");
            write_u64(buf, id);
            buf.extend_from_slice(b"}\n");
        }
        _ => {
            if passthrough::encode_for_client(buf, body, kind, id).is_err() {
                debug!(client_id = id, "unframable line for a sub-client dropped");
            }
        }
    }
}

/// Format of a link's handover state ([`Links::export_link`]).
const LINK_STATE_FORMAT: u8 = 1;

/// Appends `b` with its length (`u32`, little-endian) first.
fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    out.extend_from_slice(&u32::try_from(b.len()).unwrap_or(u32::MAX).to_le_bytes());
    out.extend_from_slice(b);
}

/// One sub-client in a link's handover state: (remote id, address if readable, session).
type SubState<'a> = (u64, Option<IpAddr>, &'a [u8]);

/// Reads what [`Links::export_link`] wrote: (flags, agent, sub-clients); `None` if malformed.
fn read_link_state(state: &[u8]) -> Option<(u8, String, Vec<SubState<'_>>)> {
    fn take<'a>(r: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
        if r.len() < n {
            return None;
        }
        let (head, rest) = r.split_at(n);
        *r = rest;
        Some(head)
    }
    fn u32_le(r: &mut &[u8]) -> Option<usize> {
        let b = take(r, 4)?;
        usize::try_from(u32::from_le_bytes(b.try_into().ok()?)).ok()
    }
    fn bytes<'a>(r: &mut &'a [u8]) -> Option<&'a [u8]> {
        let n = u32_le(r)?;
        take(r, n)
    }
    let mut r = state;
    let head = take(&mut r, 2)?;
    if head.first() != Some(&LINK_STATE_FORMAT) {
        return None;
    }
    let flags = *head.get(1)?;
    let agent = String::from_utf8_lossy(bytes(&mut r)?).into_owned();
    let n = u32_le(&mut r)?;
    // Each sub-client takes at least 16 bytes: a count beyond that is a lie.
    if n > r.len() / 16 {
        return None;
    }
    let mut subs = Vec::with_capacity(n);
    for _ in 0..n {
        let remote = u64::from_le_bytes(take(&mut r, 8)?.try_into().ok()?);
        let ip = std::str::from_utf8(bytes(&mut r)?)
            .ok()
            .and_then(|s| s.parse().ok());
        subs.push((remote, ip, bytes(&mut r)?));
    }
    r.is_empty().then_some((flags, agent, subs))
}

/// Appends `body` (one compact JSON object, no newline) for every sub-client in `ids`, with
/// `"node.method":"<kind>","client_ids":[…]` added last (a multicast line).
fn frame_multi(buf: &mut Vec<u8>, body: &[u8], kind: &str, ids: &[u64]) {
    match body.strip_suffix(b"}") {
        Some(open) if open.len() > 1 => {
            buf.extend_from_slice(open);
            buf.extend_from_slice(b",\"node.method\":\"");
            buf.extend_from_slice(kind.as_bytes());
            buf.push(b'"');
            passthrough::write_client_ids(buf, ids);
            buf.extend_from_slice(b"}\n");
        }
        _ => {
            if passthrough::encode_for_clients(buf, body, kind, ids).is_err() {
                debug!(subs = ids.len(), "unframable multicast line dropped");
            }
        }
    }
}

/// For a node link, appends what it needs of `job` (a job of the pool's own source): the
/// transactions it has not been sent yet, then the job's workinfo. Nothing for other jobs.
fn node_work(shard: &Shard, job: &Job, link: &mut Link, buf: &mut Vec<u8>) {
    let Some(sent) = &mut link.node else {
        return;
    };
    let Some(wi) = workinfo(shard, job) else {
        return;
    };
    let txs = job.transactions();
    let fresh: Vec<_> = txs.iter().filter(|t| !sent.contains(&t.wtxid)).collect();
    if !fresh.is_empty() {
        node::write_transactions(buf, fresh);
    }
    // What the node keeps is its business; what it was sent is what the last job named.
    *sent = txs.iter().map(|t| t.wtxid).collect();
    wi.write(buf);
}

/// The workinfo of a template job of the pool's own source (`None` for any other, and in solo
/// mode, whose jobs carry no common coinb2).
fn workinfo(shard: &Shard, job: &Job) -> Option<WorkInfo> {
    let Origin::Template(t) = &job.origin else {
        return None;
    };
    if job.source != SourceId::TEMPLATE || job.coinb2.is_empty() {
        return None;
    }
    let layout = shard.pool().layout(SourceId::TEMPLATE)?;
    Some(WorkInfo {
        jobid: job.id,
        target: job.network_target.0.to_be_bytes::<32>(),
        diff: job.network_target.difficulty_f64(),
        version: job.version,
        curtime: t.curtime,
        prev_hash: job.prev_hash,
        ntime: job.ntime,
        bits: job.bits,
        coinbase_value: t.coinbase_value,
        height: job.height(),
        flags: t.coinbase_flags.clone(),
        txids: t.transactions.iter().map(|x| x.txid).collect(),
        branch: job.branch.clone(),
        coinb1: job.coinb1.clone(),
        coinb2: job.coinb2.clone(),
        enonce1varlen: layout.nonce1_len(),
        enonce2varlen: layout.nonce2_len(),
    })
}

/// The value of a compact line's `"method":"…"` member, if it has one.
fn method_of(line: &[u8]) -> Option<&[u8]> {
    const KEY: &[u8] = b"\"method\":\"";
    let at = line.windows(KEY.len()).position(|w| w == KEY)? + KEY.len();
    let rest = line.get(at..)?;
    let end = rest.iter().position(|&b| b == b'"')?;
    rest.get(..end)
}

/// ckpool's `node.method` of a notification, by its method.
fn notify_type(method: &[u8]) -> &'static str {
    match method {
        b"mining.notify" => "update",
        b"mining.set_difficulty" => "diff",
        b"client.reconnect" => "reconnect",
        b"client.show_message" => "message",
        b"mining.ping" => "ping",
        b"mining.set_extranonce" => "mining.set_extranonce",
        _ => "message",
    }
}

/// ckpool's `node.method` of the reply to a request, by the request's method.
fn reply_type(method: Option<&[u8]>) -> &'static str {
    match method {
        Some(b"mining.subscribe") => "subscribe.result",
        Some(b"mining.authorize" | b"mining.authorise") => "auth.result",
        Some(b"mining.submit") => "share.result",
        Some(b"mining.configure") => "mining.configure",
        Some(b"mining.ping") => "pong",
        _ => "error",
    }
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn framing_splices_node_method_and_client_id() {
        let mut buf = Vec::new();
        frame(
            &mut buf,
            br#"{"params":[0.001],"id":null,"method":"mining.set_difficulty"}"#,
            notify_type(b"mining.set_difficulty"),
            7,
        );
        frame(&mut buf, b"{}", "error", 1);
        assert_eq!(
            String::from_utf8_lossy(&buf),
            "{\"params\":[0.001],\"id\":null,\"method\":\"mining.set_difficulty\",\"node.method\":\"diff\",\"client_id\":7}\n{\"node.method\":\"error\",\"client_id\":1}\n"
        );
        assert_eq!(
            method_of(br#"{"id":1,"method":"mining.submit","params":[]}"#),
            Some(&b"mining.submit"[..])
        );
        assert_eq!(method_of(br#"{"id":1,"result":true}"#), None);
        assert_eq!(reply_type(Some(b"mining.subscribe")), "subscribe.result");
        assert_eq!(reply_type(None), "error");
    }

    #[test]
    fn pending_chunks_large_output_per_link() {
        let a = ConnId::new(0, 0, 1);
        let b = ConnId::new(0, 0, 2);
        let mut p = Pending::default();
        p.buf(a).extend_from_slice(&[b'x'; CHUNK]);
        p.buf(b).push(b'y');
        p.buf(a).push(b'z');
        let shape: Vec<(u32, usize)> = p.bufs.iter().map(|(c, v)| (c.slot(), v.len())).collect();
        assert_eq!(shape, [(1, CHUNK), (2, 1), (1, 1)]);
    }

    /// An `Out` that keeps nothing (the framer's direct sends are not looked at here).
    struct Nowhere;

    impl Out for Nowhere {
        fn send(&mut self, _: ClientId, _: Vec<u8>) {}
        fn send_shared(&mut self, _: ClientId, _: Arc<[u8]>) {}
        fn close(&mut self, _: ClientId) {}
        fn event(&mut self, _: Event) {}
    }

    fn lines(p: &mut Pending, conn: ConnId) -> Vec<serde_json::Value> {
        p.flush_groups();
        p.bufs
            .iter()
            .filter(|(c, _)| *c == conn)
            .flat_map(|(_, b)| b.split(|&x| x == b'\n').filter(|l| !l.is_empty()))
            .map(|l| serde_json::from_slice(l).unwrap_or_default())
            .collect()
    }

    #[test]
    fn a_multicast_link_gets_one_line_per_run_of_a_shared_line_in_order() {
        let (mc, plain) = (ConnId::new(0, 0, 1), ConnId::new(0, 0, 2));
        let mut p = Pending {
            multicast: vec![mc],
            ..Pending::default()
        };
        let notify: Arc<[u8]> =
            Arc::from(&br#"{"params":["j1"],"id":null,"method":"mining.notify"}"#[..]);
        let later: Arc<[u8]> =
            Arc::from(&br#"{"params":["j2"],"id":null,"method":"mining.notify"}"#[..]);
        let diff = br#"{"params":[2],"id":null,"method":"mining.set_difficulty"}"#.to_vec();
        {
            let mut out = Nowhere;
            let mut f = Framer {
                inner: &mut out,
                p: &mut p,
            };
            for id in [1, 2, 3] {
                f.send_shared(ClientId::Sub(mc, id), Arc::clone(&notify));
                f.send_shared(ClientId::Sub(plain, id), Arc::clone(&notify));
            }
            // A line for one sub-client ends the run: what comes after is another line.
            f.send(ClientId::Sub(mc, 4), diff.clone());
            f.send_shared(ClientId::Sub(mc, 4), Arc::clone(&notify));
            f.send_shared(ClientId::Sub(mc, 5), Arc::clone(&notify));
            // Another shared line is another run; a run of one is framed per client.
            f.send_shared(ClientId::Sub(mc, 6), Arc::clone(&later));
            f.close(ClientId::Sub(mc, 9));
        }
        let got = lines(&mut p, mc);
        let want = [
            serde_json::json!({"params":["j1"],"id":null,"method":"mining.notify","node.method":"update","client_ids":[1,2,3]}),
            serde_json::json!({"params":[2],"id":null,"method":"mining.set_difficulty","node.method":"diff","client_id":4}),
            serde_json::json!({"params":["j1"],"id":null,"method":"mining.notify","node.method":"update","client_ids":[4,5]}),
            serde_json::json!({"params":["j2"],"id":null,"method":"mining.notify","node.method":"update","client_id":6}),
        ];
        assert_eq!(got.get(..4), Some(&want[..]), "{got:?}");
        // `dropclient=9` is raw text, after the rest.
        let raw: Vec<u8> = p
            .bufs
            .iter()
            .filter(|(c, _)| *c == mc)
            .flat_map(|(_, b)| b.clone())
            .collect();
        assert!(
            raw.ends_with(b"dropclient=9\n"),
            "{}",
            String::from_utf8_lossy(&raw)
        );
        // The other link keeps ckpool's framing: one line per sub-client.
        let got = lines(&mut p, plain);
        assert_eq!(got.len(), 3);
        for (v, id) in got.iter().zip([1, 2, 3]) {
            assert_eq!(v["client_id"], id, "{v}");
            assert!(v.get("client_ids").is_none(), "{v}");
        }
    }

    #[test]
    fn a_long_run_is_split_at_the_multicast_cap() {
        let mc = ConnId::new(0, 0, 1);
        let mut p = Pending {
            multicast: vec![mc],
            ..Pending::default()
        };
        let notify: Arc<[u8]> = Arc::from(&br#"{"id":null,"method":"mining.notify"}"#[..]);
        let n = passthrough::MAX_MULTICAST_IDS as u64 + 10;
        {
            let mut out = Nowhere;
            let mut f = Framer {
                inner: &mut out,
                p: &mut p,
            };
            for id in 0..n {
                f.send_shared(ClientId::Sub(mc, id), Arc::clone(&notify));
            }
        }
        let got = lines(&mut p, mc);
        let sizes: Vec<usize> = got
            .iter()
            .map(|v| v["client_ids"].as_array().map_or(0, Vec::len))
            .collect();
        assert_eq!(sizes, [passthrough::MAX_MULTICAST_IDS, 10]);
        let all: Vec<u64> = got
            .iter()
            .flat_map(|v| v["client_ids"].as_array().cloned().unwrap_or_default())
            .filter_map(|x| x.as_u64())
            .collect();
        assert_eq!(all, (0..n).collect::<Vec<_>>());
    }

    #[test]
    fn a_links_handover_state_reads_back_and_bad_state_is_refused() {
        let mut b = vec![LINK_STATE_FORMAT, 3];
        put_bytes(&mut b, b"ckpool-rs/1");
        b.extend_from_slice(&2u32.to_le_bytes());
        for (id, ip, session) in [
            (7u64, "10.0.0.1", &b"s7-session-bytes"[..]),
            (9, "::1", b"s9"),
        ] {
            b.extend_from_slice(&id.to_le_bytes());
            put_bytes(&mut b, ip.as_bytes());
            put_bytes(&mut b, session);
        }
        let (flags, agent, subs) = read_link_state(&b).expect("reads");
        assert_eq!((flags, agent.as_str()), (3, "ckpool-rs/1"));
        assert_eq!(subs.len(), 2);
        assert_eq!(
            subs[0],
            (7, "10.0.0.1".parse().ok(), &b"s7-session-bytes"[..])
        );
        assert_eq!(subs[1], (9, "::1".parse().ok(), &b"s9"[..]));
        // Truncated anywhere, with bytes left over, another format, or a count it cannot hold:
        // refused, never a panic.
        for n in 0..b.len() {
            assert!(read_link_state(&b[..n]).is_none(), "{n} bytes");
        }
        let mut longer = b.clone();
        longer.push(0);
        assert!(read_link_state(&longer).is_none());
        let mut other = b.clone();
        other[0] = LINK_STATE_FORMAT + 1;
        assert!(read_link_state(&other).is_none());
        let mut lying = vec![LINK_STATE_FORMAT, 0];
        put_bytes(&mut lying, b"");
        lying.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(read_link_state(&lying).is_none());
    }
}
