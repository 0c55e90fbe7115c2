//! The template thread (fetching, tip polling, failover) and the prober thread (fail-back).

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::template::{Template, rpc_hash_hex};
use crossbeam_channel::{Receiver, Sender, select};
use serde_json::{Value, json};

use crate::rpc::{RpcClient, RpcError};
use crate::{BtcdConfig, Command, GenEvent, GeneratorConfig, Shared};

/// Longest wait for `getbestblockhash`, an instant call unless the node is hung or busy
/// validating a block.
const POLL_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest wait for `getblocktemplate` when another server could give one instead: a hung node
/// holds the pool's work this long, not the whole RPC timeout (30 s by default). Bitcoin Core
/// answers in well under a second, a few seconds with a very large mempool.
const GBT_HEDGE: Duration = Duration::from_secs(10);

/// Why a server could not give a template.
#[derive(Debug, thiserror::Error)]
pub(crate) enum FetchError {
    /// An RPC call failed.
    #[error(transparent)]
    Rpc(#[from] RpcError),
    /// A reply had the wrong shape.
    #[error("unusable {method} reply: {reason}")]
    Reply {
        /// The RPC method.
        method: &'static str,
        /// What was wrong.
        reason: String,
    },
}

/// Asks `client` for its chain name (`getblockchaininfo`).
pub(crate) fn fetch_chain(client: &RpcClient) -> Result<String, FetchError> {
    let info = client.call("getblockchaininfo", json!([]))?;
    info.get("chain")
        .and_then(Value::as_str)
        .map(str::to_owned)
        .ok_or_else(|| FetchError::Reply {
            method: "getblockchaininfo",
            reason: "no chain".to_owned(),
        })
}

/// Fetches and parses a template from a server on `chain`.
pub(crate) fn fetch_template(client: &RpcClient, chain: &str) -> Result<Template, FetchError> {
    fetch_template_within(client, chain, client.timeout())
}

/// [`fetch_template`], waiting at most `timeout`.
fn fetch_template_within(
    client: &RpcClient,
    chain: &str,
    timeout: Duration,
) -> Result<Template, FetchError> {
    let mut rules = vec!["segwit"];
    if chain == "signet" {
        // bitcoind refuses signet templates unless the client says it knows the rule.
        rules.push("signet");
    }
    let gbt = client.call_with_timeout("getblocktemplate", json!([{ "rules": rules }]), timeout)?;
    Template::from_gbt(&gbt).map_err(|e| FetchError::Reply {
        method: "getblocktemplate",
        reason: e.to_string(),
    })
}

/// [`fetch_template`] for the template thread: its latency goes into the template fetch
/// histogram. With `others` (another server could answer instead) it waits at most
/// [`GBT_HEDGE`].
fn fetch_template_timed(
    client: &RpcClient,
    chain: &str,
    shared: &Shared,
    others: bool,
) -> Result<Template, FetchError> {
    let started = Instant::now();
    let timeout = if others {
        client.timeout().min(GBT_HEDGE)
    } else {
        client.timeout()
    };
    let fetched = fetch_template_within(client, chain, timeout);
    if fetched.is_ok() {
        shared.stats.template_fetched(started.elapsed());
    }
    fetched
}

/// Asks `client` for its best block hash, checked to be 64 hex digits. This is the liveness
/// check of the active server too, so it waits at most [`POLL_TIMEOUT`] for a hung node.
fn fetch_best_hash(client: &RpcClient) -> Result<String, FetchError> {
    let timeout = client.timeout().min(POLL_TIMEOUT);
    let reply = client.call_with_timeout("getbestblockhash", json!([]), timeout)?;
    match reply.as_str() {
        Some(h) if h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()) => {
            Ok(h.to_ascii_lowercase())
        }
        _ => Err(FetchError::Reply {
            method: "getbestblockhash",
            reason: format!("not a block hash: {reply}"),
        }),
    }
}

/// Remembers the tip the last template built on, to tell new blocks from refreshes.
#[derive(Debug, Default)]
pub(crate) struct Tip {
    /// `previousblockhash` of the last template emitted, RPC hex.
    prev: Option<String>,
}

impl Tip {
    /// Records a template built on `prev` (RPC hex); true if that is a different block than the
    /// last template's (so never twice for one tip).
    pub(crate) fn advance(&mut self, prev: &str) -> bool {
        if self.prev.as_deref() == Some(prev) {
            return false;
        }
        self.prev = Some(prev.to_owned());
        true
    }

    /// Whether `best` (RPC hex) is the block the last template built on.
    pub(crate) fn is_current(&self, best: &str) -> bool {
        self.prev.as_deref() == Some(best)
    }
}

/// The template thread's state.
pub(crate) struct TemplateWorker {
    btcd: Vec<BtcdConfig>,
    clients: Vec<RpcClient>,
    blockpoll: Duration,
    update_interval: Duration,
    failover_check: Duration,
    shared: Arc<Shared>,
    events: Sender<GenEvent>,
    commands: Receiver<Command>,
    stop: Receiver<()>,
    active: Option<Active>,
    tip: Tip,
    /// Whether `NoServers` was reported since the last server was up.
    reported_none: bool,
}

/// The server templates come from.
struct Active {
    index: usize,
    chain: String,
    next_refresh: Instant,
    next_poll: Instant,
}

impl TemplateWorker {
    pub(crate) fn new(
        cfg: &GeneratorConfig,
        clients: Vec<RpcClient>,
        shared: Arc<Shared>,
        events: Sender<GenEvent>,
        commands: Receiver<Command>,
        stop: Receiver<()>,
    ) -> Self {
        Self {
            btcd: cfg.btcd.clone(),
            clients,
            blockpoll: cfg.blockpoll,
            update_interval: cfg.update_interval,
            failover_check: cfg.failover_check,
            shared,
            events,
            commands,
            stop,
            active: None,
            tip: Tip::default(),
            reported_none: false,
        }
    }

    /// Thread body.
    pub(crate) fn run(mut self) {
        self.fail_over(None, Instant::now());
        loop {
            let now = Instant::now();
            let wait = self.next_deadline().map_or(Duration::from_secs(3600), |d| {
                d.saturating_duration_since(now)
            });
            select! {
                recv(self.stop) -> _ => break,
                recv(self.commands) -> cmd => match cmd {
                    Ok(cmd) => self.on_commands(cmd),
                    Err(_) => break,
                },
                default(wait) => {}
            }
            self.on_timers(Instant::now());
        }
        tracing::debug!("template thread stopped");
    }

    /// How often the active server is asked for its best block.
    fn poll_interval(&self, index: usize) -> Duration {
        let notify = self.btcd.get(index).is_some_and(|b| b.notify);
        if notify {
            self.failover_check
        } else {
            self.blockpoll.min(self.failover_check)
        }
    }

    fn next_deadline(&self) -> Option<Instant> {
        self.active
            .as_ref()
            .map(|a| a.next_refresh.min(a.next_poll))
    }

    /// Handles `first` and whatever else is queued, fetching at most one template for all the
    /// update requests and block announcements among them.
    fn on_commands(&mut self, first: Command) {
        let mut update = false;
        let mut alive: Option<usize> = None;
        for cmd in std::iter::once(first).chain(self.commands.try_iter()) {
            match cmd {
                Command::Update => update = true,
                Command::NewBlock(hash) => {
                    if !self.tip.is_current(&hash) {
                        tracing::debug!(hash, "new block announced");
                        update = true;
                    }
                }
                Command::ServerAlive(i) => alive = Some(alive.map_or(i, |a| a.min(i))),
            }
        }
        let now = Instant::now();
        // Failing back, the better server must have caught up; with none active, any will do.
        let min_height = match self.active {
            Some(_) => self.shared.state.lock().height,
            None => None,
        };
        if let Some(i) = alive
            && self.active.as_ref().is_none_or(|a| i < a.index)
            && self.switch_to(i, min_height, now)
        {
            // A fresh template came with the switch.
            return;
        }
        if update {
            match self.active.as_ref().map(|a| a.index) {
                Some(i) => self.refresh(i, now),
                None => self.fail_over(None, now),
            }
        }
    }

    fn on_timers(&mut self, now: Instant) {
        let Some(active) = &self.active else {
            return;
        };
        let index = active.index;
        if now >= active.next_refresh {
            self.refresh(index, now);
        } else if now >= active.next_poll {
            self.poll(index, now);
        }
    }

    /// Asks the active server for its tip; fetches a template if it moved.
    fn poll(&mut self, index: usize, now: Instant) {
        let interval = self.poll_interval(index);
        if let Some(a) = self.active.as_mut() {
            a.next_poll = now + interval;
        }
        let Some(client) = self.clients.get(index) else {
            return;
        };
        match fetch_best_hash(client) {
            Ok(best) if self.tip.is_current(&best) => {}
            Ok(best) => {
                tracing::debug!(best, server = index, "new best block seen by polling");
                self.refresh(index, now);
            }
            Err(error) => self.server_failed(index, &error, now),
        }
    }

    /// Fetches a template from the active server and emits it.
    fn refresh(&mut self, index: usize, now: Instant) {
        let Some(active) = &self.active else {
            return;
        };
        let chain = active.chain.clone();
        let Some(client) = self.clients.get(index) else {
            return;
        };
        let others = self.clients.len() > 1;
        match fetch_template_timed(client, &chain, &self.shared, others) {
            Ok(template) => self.emit(template, index, now),
            Err(error) => self.server_failed(index, &error, now),
        }
    }

    fn emit(&mut self, template: Template, index: usize, now: Instant) {
        let prev = rpc_hash_hex(&template.prev_hash);
        let new_block = self.tip.advance(&prev);
        tracing::info!(
            server = index,
            height = template.height,
            prev = %prev,
            txs = template.transactions.len(),
            new_block,
            "template"
        );
        self.shared.state.lock().height = Some(template.height);
        self.shared.stats.template_current();
        let refresh = self.update_interval;
        let poll = self.poll_interval(index);
        if let Some(a) = self.active.as_mut() {
            a.next_refresh = now + refresh;
            a.next_poll = now + poll;
        }
        // Fails only if the pool dropped its receiver, i.e. it is shutting down.
        let _ = self.events.send(GenEvent::Template {
            template: Arc::new(template),
            new_block,
            server: index,
        });
    }

    fn server_failed(&mut self, index: usize, error: &FetchError, now: Instant) {
        let url = self.btcd.get(index).map_or("", |b| b.url.as_str());
        tracing::warn!(server = index, url, %error, "bitcoind failed; failing over");
        self.active = None;
        self.shared.state.lock().active = None;
        self.fail_over(Some(index), now);
    }

    /// Makes the best server that gives a template active; the one that just failed (if any) is
    /// tried last.
    fn fail_over(&mut self, failed: Option<usize>, now: Instant) {
        let order: Vec<usize> = (0..self.clients.len())
            .filter(|&i| Some(i) != failed)
            .chain(failed)
            .collect();
        for i in order {
            if self.switch_to(i, None, now) {
                return;
            }
        }
        if !self.reported_none {
            self.reported_none = true;
            tracing::error!(
                servers = self.clients.len(),
                "CRITICAL: No bitcoinds active! Retrying every failover_check"
            );
            let _ = self.events.send(GenEvent::NoServers);
        }
    }

    /// Tries to make server `index` active: chain name, then a template, which must be for at
    /// least `min_height` (a server coming back must have caught up before it takes over).
    /// Emits `ServerUp` and the template on success.
    fn switch_to(&mut self, index: usize, min_height: Option<u64>, now: Instant) -> bool {
        let Some(client) = self.clients.get(index) else {
            return false;
        };
        let shared = &self.shared;
        let others = self.clients.len() > 1;
        let fetched = fetch_chain(client).and_then(|chain| {
            fetch_template_timed(client, &chain, shared, others).map(|t| (chain, t))
        });
        let (chain, template) = match fetched {
            Ok(x) => x,
            Err(error) => {
                tracing::debug!(server = index, %error, "server not usable");
                return false;
            }
        };
        if min_height.is_some_and(|h| template.height < h) {
            tracing::info!(
                server = index,
                height = template.height,
                "better-ranked bitcoind is behind; staying"
            );
            return false;
        }
        let url = self
            .btcd
            .get(index)
            .map_or_else(String::new, |b| b.url.clone());
        tracing::info!(server = index, url, chain, "bitcoind active");
        {
            let mut state = self.shared.state.lock();
            state.active = Some(index);
            state.chain = Some(chain.clone());
        }
        self.active = Some(Active {
            index,
            chain,
            next_refresh: now,
            next_poll: now,
        });
        self.reported_none = false;
        self.shared.stats.server_up(index);
        let _ = self.events.send(GenEvent::ServerUp { index, url });
        self.emit(template, index, now);
        true
    }
}

/// The prober thread: every `failover_check`, tries the servers ranked above the active one (all
/// of them when none is active) and tells the template thread about the best one that answers.
pub(crate) struct Prober {
    clients: Vec<RpcClient>,
    every: Duration,
    shared: Arc<Shared>,
    commands: Sender<Command>,
    stop: Receiver<()>,
}

impl Prober {
    pub(crate) fn new(
        cfg: &GeneratorConfig,
        clients: Vec<RpcClient>,
        shared: Arc<Shared>,
        commands: Sender<Command>,
        stop: Receiver<()>,
    ) -> Self {
        Self {
            clients,
            every: cfg.failover_check,
            shared,
            commands,
            stop,
        }
    }

    /// Thread body.
    pub(crate) fn run(self) {
        loop {
            select! {
                recv(self.stop) -> _ => break,
                default(self.every) => {}
            }
            let (active, height) = {
                let state = self.shared.state.lock();
                (state.active, state.height)
            };
            let better = active.unwrap_or(self.clients.len());
            for (i, client) in self.clients.iter().enumerate().take(better) {
                let probe = fetch_chain(client).and_then(|chain| fetch_template(client, &chain));
                match probe {
                    // Still catching up after a restart: not yet.
                    Ok(t) if active.is_some() && height.is_some_and(|h| t.height < h) => {
                        tracing::debug!(server = i, height = t.height, "probe: behind");
                    }
                    Ok(_) => {
                        tracing::info!(server = i, "better-ranked bitcoind answers again");
                        if self.commands.send(Command::ServerAlive(i)).is_err() {
                            return;
                        }
                        break;
                    }
                    Err(error) => tracing::trace!(server = i, %error, "probe failed"),
                }
            }
        }
        tracing::debug!("prober thread stopped");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tip_is_new_once() {
        let mut tip = Tip::default();
        assert!(!tip.is_current("aa"));
        assert!(tip.advance("aa"));
        assert!(!tip.advance("aa"));
        assert!(tip.is_current("aa"));
        assert!(tip.advance("bb"));
        assert!(!tip.is_current("aa"));
        // Going back (a reorg to the old tip) is a new block again.
        assert!(tip.advance("aa"));
    }
}
