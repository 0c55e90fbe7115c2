//! `-H` in proxy and userproxy mode: the old instance's side ([`ProxyGive`]) and the state that
//! travels ([`ProxyState`]): the stratifier's pool state (with the upstream sources, their
//! layouts, jobs and difficulty limits), and each upstream connection as its socket plus the
//! stratum client state (`generator::upstream::Pool::pause` / `start_adopted`) and the proxy's
//! bookkeeping of it.

use std::cell::RefCell;
use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, anyhow, bail};
use connector::Connector;
use crossbeam_channel::Receiver;
use generator::upstream::{LinkHandover, UpstreamServer};
use serde::{Deserialize, Serialize};
use stratifier::{SourceId, UpstreamShare};
use tracing::info;

use super::{BACKLOG_RETRY, Proxy, Role, UserCounts};
use crate::handoff::{self, Msg};
use crate::handover;

/// One upstream connection as it travels.
#[derive(Debug, Serialize, Deserialize)]
pub(super) struct LinkState {
    pub(super) id: u64,
    /// `main`, `recruit` or `user`.
    pub(super) role: String,
    pub(super) user: Option<String>,
    /// The entries it may fail over to: (url, auth, pass).
    pub(super) servers: Vec<(String, String, String)>,
    pub(super) url: String,
    pub(super) current: Option<u16>,
    pub(super) pending: Option<u16>,
    pub(super) linked: Option<u16>,
    pub(super) active: Option<usize>,
    pub(super) difficulty: Option<f64>,
    pub(super) accepted: u64,
    pub(super) rejected: u64,
    pub(super) lost: u64,
    /// The connection's entry, partial line and client state (hex).
    pub(super) index: usize,
    pub(super) partial: String,
    pub(super) session: String,
}

/// The proxy's own state as it travels (the upstream sockets go beside it, one per link, in
/// order).
#[derive(Debug, Serialize, Deserialize)]
pub(super) struct ProxyState {
    /// `proxy` or `userproxy`: the new instance must run the same.
    pub(super) mode: String,
    pub(super) links: Vec<LinkState>,
    /// Submits in flight: (tag, connection id, entry, user).
    pub(super) inflight: Vec<(u64, u64, Option<usize>, String)>,
    pub(super) next_tag: u64,
    pub(super) next_link_id: u64,
    pub(super) miner_mask: u32,
    pub(super) asked_mask: u32,
    pub(super) open_source: u16,
    pub(super) users: HashMap<String, (u64, u64)>,
    /// Per `proxy` entry: (state, accepted, rejected, lost).
    pub(super) servers: Vec<(String, u64, u64, u64)>,
    pub(super) active: Option<usize>,
    pub(super) difficulty: Option<f64>,
    pub(super) version_mask: Option<String>,
    pub(super) dropped: u64,
    pub(super) failovers: u64,
}

/// The mode's name in the state.
pub(super) fn mode_name(userproxy: bool) -> &'static str {
    if userproxy { "userproxy" } else { "proxy" }
}

/// The pool state blob and the proxy's JSON in one: the pool blob's length (8 bytes, little
/// endian), the blob, the JSON.
pub(super) fn join(pool: &[u8], proxy: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 + pool.len() + proxy.len());
    out.extend_from_slice(&(pool.len() as u64).to_le_bytes());
    out.extend_from_slice(pool);
    out.extend_from_slice(proxy);
    out
}

/// [`join`] back: (pool blob, proxy state).
pub(super) fn split(blob: &[u8], userproxy: bool) -> anyhow::Result<(&[u8], ProxyState)> {
    let (len, rest) = blob
        .split_first_chunk::<8>()
        .ok_or_else(|| anyhow!("the running instance is not a proxy (state too short)"))?;
    let len = usize::try_from(u64::from_le_bytes(*len)).unwrap_or(usize::MAX);
    if len > rest.len() {
        bail!("the running instance is not a proxy (bad state length)");
    }
    let (pool, json) = rest.split_at(len);
    let st: ProxyState = serde_json::from_slice(json)
        .map_err(|e| anyhow!("the running instance is not a proxy ({e})"))?;
    let want = mode_name(userproxy);
    if st.mode != want {
        bail!(
            "the running instance is in {} mode, this one in {want} mode",
            st.mode
        );
    }
    Ok((pool, st))
}

/// A link's servers as they travel.
pub(super) fn servers_out(servers: &[UpstreamServer]) -> Vec<(String, String, String)> {
    servers
        .iter()
        .map(|s| (s.url.clone(), s.auth.clone(), s.pass.clone()))
        .collect()
}

/// [`servers_out`] back.
pub(super) fn servers_in(servers: &[(String, String, String)]) -> Vec<UpstreamServer> {
    servers
        .iter()
        .map(|(u, a, p)| UpstreamServer::new(u.clone(), a.clone(), p.clone()))
        .collect()
}

/// [`LinkHandover`] from a link's state and its socket.
pub(super) fn link_handover(l: &LinkState, fd: OwnedFd) -> anyhow::Result<LinkHandover> {
    Ok(LinkHandover {
        fd,
        index: l.index,
        partial: hex::decode(&l.partial).context("bad partial line")?,
        session: hex::decode(&l.session).context("bad client state")?,
    })
}

/// The old proxy's side of a handover ([`handover::GiveHooks`]).
pub(super) struct ProxyGive<'a> {
    pub(super) conns: &'a Connector<Msg>,
    pub(super) proxy: RefCell<&'a mut Proxy>,
    pub(super) shares: &'a Receiver<UpstreamShare>,
    pub(super) userproxy: bool,
    /// The links paused, by index in `links`, once settled.
    pub(super) paused: RefCell<Vec<(usize, LinkHandover)>>,
}

impl handover::GiveHooks for ProxyGive<'_> {
    fn settle(&self, deadline: Instant) -> anyhow::Result<()> {
        // Every share read is judged; those for the upstream are in `shares`.
        if !handoff::settle(self.conns, deadline) {
            bail!("the stratifier did not settle in time");
        }
        let mut p = self.proxy.borrow_mut();
        for share in self.shares.try_iter() {
            p.submit(&share);
        }
        while p.flush_backlogs() {
            if Instant::now() >= deadline {
                bail!("an upstream connection did not take its held-back shares in time");
            }
            std::thread::sleep(BACKLOG_RETRY);
        }
        // Each link writes its submits and hands on what it reads, then stops reading.
        let mut paused = self.paused.borrow_mut();
        for k in 0..p.links.len() {
            let l = &p.links[k];
            if l.closing {
                continue;
            }
            if l.active.is_none() || l.linked.is_none() {
                bail!(
                    "upstream connection {} is not up (state {}); try again",
                    l.id,
                    l.state
                );
            }
            let rx = l.rx.clone();
            let answer = l.link.pause(deadline);
            let r = loop {
                let left = deadline.saturating_duration_since(Instant::now());
                crossbeam_channel::select! {
                    recv(rx) -> ev => match ev {
                        Ok(ev) => p.event(k, ev, self.conns),
                        Err(_) => break Err(anyhow!("upstream connection stopped")),
                    },
                    recv(answer) -> r => break match r {
                        Ok(r) => r.map_err(|e| anyhow!(e)),
                        Err(_) => Err(anyhow!("upstream connection stopped")),
                    },
                    default(left) => break Err(anyhow!("an upstream connection did not pause in time")),
                }
            };
            while let Ok(ev) = rx.try_recv() {
                p.event(k, ev, self.conns);
            }
            match r {
                Ok(h) => paused.push((k, h)),
                Err(e) => return Err(e).context("pausing an upstream connection"),
            }
        }
        drop(paused);
        // Whatever the last events changed is in the shards before their sessions go.
        if handoff::settle(self.conns, deadline) {
            Ok(())
        } else {
            bail!("the stratifier did not settle in time")
        }
    }

    fn export_state(&self) -> anyhow::Result<(Vec<u8>, Vec<OwnedFd>)> {
        let p = self.proxy.borrow();
        let paused = self.paused.borrow();
        let mut links = Vec::with_capacity(paused.len());
        let mut fds = Vec::with_capacity(paused.len());
        for (k, h) in paused.iter() {
            let l = &p.links[*k];
            fds.push(
                h.fd.try_clone()
                    .context("duplicating an upstream connection's socket")?,
            );
            let (role, user) = match &l.role {
                Role::Main => ("main", None),
                Role::Recruit => ("recruit", None),
                Role::User(u) => ("user", Some(u.to_string())),
            };
            links.push(LinkState {
                id: l.id,
                role: role.to_owned(),
                user,
                servers: servers_out(&l.servers),
                url: l.url.clone(),
                current: l.current.map(|s| s.0),
                pending: l.pending.map(|s| s.0),
                linked: l.linked.map(|s| s.0),
                active: l.active,
                difficulty: l.difficulty,
                accepted: l.accepted,
                rejected: l.rejected,
                lost: l.lost,
                index: h.index,
                partial: hex::encode(&h.partial),
                session: hex::encode(&h.session),
            });
        }
        let st = p.stats().clone();
        let state = ProxyState {
            mode: mode_name(self.userproxy).to_owned(),
            links,
            inflight: p
                .inflight
                .iter()
                .map(|(tag, (id, index, user))| (*tag, *id, *index, user.to_string()))
                .collect(),
            next_tag: p.next_tag,
            next_link_id: p.next_link_id,
            miner_mask: p.miner_mask,
            asked_mask: p.asked_mask,
            open_source: p.open_source.load(std::sync::atomic::Ordering::Acquire),
            users: st
                .users
                .iter()
                .map(|(u, c)| (u.clone(), (c.accepted, c.rejected)))
                .collect(),
            servers: st
                .servers
                .iter()
                .map(|s| (s.state.clone(), s.accepted, s.rejected, s.lost))
                .collect(),
            active: st.active,
            difficulty: st.difficulty,
            version_mask: st.version_mask.clone(),
            dropped: st.dropped,
            failovers: st.failovers,
        };
        let json = serde_json::to_vec(&state).context("encoding the proxy's state")?;
        let pool = p.pool.export_state(Instant::now());
        info!(
            links = state.links.len(),
            inflight = state.inflight.len(),
            "handover: proxy state exported"
        );
        Ok((join(&pool, &json), fds))
    }

    fn release(&self) {}

    fn taken_back(&self) {
        let p = self.proxy.borrow();
        for (k, _) in self.paused.borrow_mut().drain(..) {
            if let Some(l) = p.links.get(k) {
                l.link.resume();
            }
        }
    }
}

/// After a commit: the upstream connections belong to the new instance; stop them here
/// without closing them.
pub(super) fn release_links(proxy: &Proxy) {
    for l in &proxy.links {
        l.link.release();
    }
}

/// The stats' users back from the state.
pub(super) fn users_in(users: &HashMap<String, (u64, u64)>) -> HashMap<String, UserCounts> {
    users
        .iter()
        .map(|(u, &(accepted, rejected))| (u.clone(), UserCounts { accepted, rejected }))
        .collect()
}

/// A source id back.
pub(super) fn source(s: Option<u16>) -> Option<SourceId> {
    s.map(SourceId)
}

/// A role back.
pub(super) fn role(l: &LinkState) -> Role {
    match (l.role.as_str(), &l.user) {
        ("user", Some(u)) => Role::User(Arc::from(u.as_str())),
        ("recruit", _) => Role::Recruit,
        _ => Role::Main,
    }
}

impl Proxy {
    /// The old instance's bookkeeping (after its links are adopted into `links`).
    pub(super) fn restore(&mut self, st: &ProxyState) {
        self.inflight = st
            .inflight
            .iter()
            .map(|(tag, id, index, user)| (*tag, (*id, *index, Arc::new(Box::from(user.as_str())))))
            .collect();
        // The books carry the sources' jobs and layouts; the upstream difficulty a share must
        // meet to go up is set again from each connection's.
        for l in &self.links {
            if let Some(d) = l.difficulty {
                for src in [l.current, l.pending].into_iter().flatten() {
                    if let Err(e) = self.pool.set_upstream_diff(src, d) {
                        tracing::warn!(error = %e, source = src.0, "cannot set the upstream difficulty");
                    }
                }
            }
        }
        self.next_tag = st.next_tag;
        self.next_link_id = st.next_link_id;
        self.open_source
            .store(st.open_source, std::sync::atomic::Ordering::Release);
        let mut stats = self.stats();
        stats.users = users_in(&st.users);
        for (s, (state, accepted, rejected, lost)) in stats.servers.iter_mut().zip(&st.servers) {
            s.state.clone_from(state);
            s.accepted = *accepted;
            s.rejected = *rejected;
            s.lost = *lost;
        }
        stats.active = st.active;
        stats.last_up = st.active;
        stats.difficulty = st.difficulty;
        stats.version_mask.clone_from(&st.version_mask);
        stats.dropped = st.dropped;
        stats.failovers = st.failovers;
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "test code")]

    use super::*;

    fn state(mode: &str) -> ProxyState {
        ProxyState {
            mode: mode.to_owned(),
            links: vec![LinkState {
                id: 0,
                role: "main".into(),
                user: None,
                servers: vec![("127.0.0.1:3333".into(), "u".into(), "p".into())],
                url: "127.0.0.1:3333".into(),
                current: Some(1),
                pending: None,
                linked: Some(1),
                active: Some(0),
                difficulty: Some(0.5),
                accepted: 7,
                rejected: 1,
                lost: 0,
                index: 0,
                partial: hex::encode(b"{\"id\":5,"),
                session: hex::encode(b"{}"),
            }],
            inflight: vec![(9, 0, Some(0), "alice".into())],
            next_tag: 9,
            next_link_id: 0,
            miner_mask: 0x1fff_e000,
            asked_mask: 0x1fff_e000,
            open_source: 1,
            users: HashMap::new(),
            servers: vec![("active".into(), 7, 1, 0)],
            active: Some(0),
            difficulty: Some(0.5),
            version_mask: None,
            dropped: 0,
            failovers: 0,
        }
    }

    #[test]
    fn the_state_travels_whole_and_only_to_the_same_mode() {
        let json = serde_json::to_vec(&state("userproxy")).unwrap();
        let blob = join(b"pool-state", &json);
        let (pool, st) = split(&blob, true).unwrap();
        assert_eq!(pool, b"pool-state");
        assert_eq!(st.links.len(), 1);
        assert_eq!(st.links[0].linked, Some(1));
        assert_eq!(st.inflight, vec![(9, 0, Some(0), "alice".to_owned())]);
        assert_eq!(st.miner_mask, 0x1fff_e000);
        // A userproxy's state is refused by a proxy, and the other way round.
        let e = split(&blob, false).unwrap_err().to_string();
        assert!(e.contains("userproxy mode"), "{e}");
        // A pool's or passthrough's state is not a proxy's.
        assert!(split(b"{\"mode\":\"passthrough\"}", false).is_err());
        assert!(split(&join(b"x", b"{\"mode\":\"passthrough\"}"), false).is_err());
        let mut short = blob.clone();
        short.truncate(12);
        assert!(split(&short, true).is_err());
    }
}
