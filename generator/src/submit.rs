//! The block submission thread, with its own RPC connections so that a found block never waits
//! behind a template fetch.
//!
//! A block is retried until a node has it: each attempt offers it to every server, the active
//! one first, with a back-off between attempts ([`FIRST_BACKOFF`] doubling to [`MAX_BACKOFF`]).
//! It is settled when a node takes it or already knows it, when a node refuses it outright, or
//! when the best chain has moved past its height without it (stale, given up). A hash already
//! pending or already taken by a node is not submitted again. On shutdown, what is queued or
//! pending is still tried until the shutdown deadline; what is then still unsettled stays pending
//! on disk (see [`crate::blockfile`]) for the next start.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, TryRecvError, after, never, select};
use serde_json::{Value, json};

use crate::blockfile::{Files, Settled};
use crate::rpc::{RpcClient, RpcError};
use crate::stats::BlockVerdict;
use crate::{BlockSubmission, Command, GenEvent, Shared};

/// Wait before the second attempt; doubled after each failed attempt up to [`MAX_BACKOFF`].
pub(crate) const FIRST_BACKOFF: Duration = Duration::from_millis(100);
/// Longest wait between two attempts.
pub(crate) const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// Longest wait for a look-up (`getblockheader`, `getblockcount`, `getblockhash`), instant calls
/// unless the node is hung.
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(5);
/// With more than one node, the longest wait for `submitblock` on each but the last offered: a
/// node that hangs holds a block this long, not its whole RPC timeout, before the next node has
/// it. `submitblock` takes well under a second on a working node; one slower than this still
/// processes the block, and the next node having it too does no harm.
const SUBMIT_HEDGE: Duration = Duration::from_secs(5);
/// bitcoind's `RPC_IN_WARMUP`: the node is starting (loading its block index); try again.
const RPC_IN_WARMUP: i64 = -28;

/// What the node said to `submitblock`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Accepted (`null`) or already known (`duplicate`).
    Accepted,
    /// Valid so far but not (yet) in the best chain (`inconclusive`): look it up.
    Inconclusive,
    /// Refused, with the node's reason.
    Rejected(String),
}

/// Reads a `submitblock` result.
pub(crate) fn verdict(reply: &Value) -> Verdict {
    match reply {
        Value::Null => Verdict::Accepted,
        Value::String(s) if s == "duplicate" => Verdict::Accepted,
        Value::String(s) if s == "inconclusive" => Verdict::Inconclusive,
        Value::String(s) => Verdict::Rejected(s.clone()),
        other => Verdict::Rejected(format!("unexpected submitblock reply {other}")),
    }
}

/// A block on the submission queue.
#[derive(Debug)]
pub(crate) struct Queued {
    /// The block.
    pub(crate) block: BlockSubmission,
    /// Its pending file already exists (read back at start-up): do not write it again.
    pub(crate) on_disk: bool,
}

/// A block not settled yet.
#[derive(Debug)]
struct Pending {
    block: BlockSubmission,
    /// When the next attempt is due.
    due: Instant,
    /// Wait after the next failed attempt.
    backoff: Duration,
    /// Failed attempts so far.
    attempts: u32,
}

/// How one attempt ended.
#[derive(Debug)]
enum Attempt {
    /// Node `server` has the block; `in_chain`: in its best chain.
    Landed { server: usize, in_chain: bool },
    /// Node `server` refused it.
    Refused { server: usize, reason: String },
    /// Node `server`'s best chain is at `best_height`, past the block's height, without it.
    Stale { server: usize, best_height: u64 },
    /// No node could be asked; the last error.
    Retry(String),
}

/// The submission thread's state.
pub(crate) struct Submitter {
    clients: Vec<RpcClient>,
    shared: Arc<Shared>,
    events: Sender<GenEvent>,
    commands: Sender<Command>,
    blocks: Receiver<Queued>,
    stop: Receiver<()>,
    files: Option<Files>,
    grace: Duration,
    pending: Vec<Pending>,
    /// The hash of the block being attempted (it is out of `pending` meanwhile).
    current: Option<String>,
    /// Hashes a node has taken, so a replayed block is not submitted again. One entry per block
    /// this process found: small.
    landed: HashSet<String>,
    /// Set once stopping: nothing is tried after it.
    deadline: Option<Instant>,
}

impl Submitter {
    #[allow(clippy::too_many_arguments, reason = "one constructor, called once")]
    pub(crate) fn new(
        clients: Vec<RpcClient>,
        shared: Arc<Shared>,
        events: Sender<GenEvent>,
        commands: Sender<Command>,
        blocks: Receiver<Queued>,
        stop: Receiver<()>,
        files: Option<Files>,
        grace: Duration,
    ) -> Self {
        Self {
            clients,
            shared,
            events,
            commands,
            blocks,
            stop,
            files,
            grace,
            pending: Vec::new(),
            current: None,
            landed: HashSet::new(),
            deadline: None,
        }
    }

    /// Thread body. On stop, blocks queued or pending are still tried until the deadline.
    pub(crate) fn run(mut self) {
        let mut blocks = self.blocks.clone();
        loop {
            self.check_stop();
            let now = Instant::now();
            if let Some(deadline) = self.deadline
                && (self.pending.is_empty() || now >= deadline)
            {
                break;
            }
            let next = self.pending.iter().map(|p| p.due).min();
            let wake = match (next, self.deadline) {
                (Some(n), Some(d)) => Some(n.min(d)),
                (n, d) => n.or(d),
            };
            let timer = wake.map_or_else(never, |at| after(at.saturating_duration_since(now)));
            let stop = match self.deadline {
                None => self.stop.clone(),
                Some(_) => never(),
            };
            select! {
                recv(blocks) -> queued => match queued {
                    Ok(queued) => self.take(queued),
                    // Every handle is gone: nothing more can come.
                    Err(_) => {
                        blocks = never();
                        self.begin_stop();
                    }
                },
                recv(stop) -> _ => self.begin_stop(),
                recv(timer) -> _ => {}
            }
            self.attempt_due();
        }
        // A block queued at the last moment gets on disk at least.
        self.take_queued();
        for p in &self.pending {
            let block = &p.block;
            if self.files.is_some() {
                tracing::warn!(hash = %block.hash, height = block.height, attempts = p.attempts,
                    "shutdown: block not confirmed by any node; its file stays pending for the next start");
            } else {
                tracing::error!(hash = %block.hash, height = block.height, attempts = p.attempts,
                    block_hex = %block.hex, "shutdown: block not confirmed by any node and no block_dir; NOT submitted");
            }
        }
        tracing::debug!("submission thread stopped");
    }

    /// Notices a closed stop channel (also in the middle of an attempt).
    fn check_stop(&mut self) {
        if self.deadline.is_none()
            && matches!(self.stop.try_recv(), Err(TryRecvError::Disconnected))
        {
            self.begin_stop();
        }
    }

    fn begin_stop(&mut self) {
        if self.deadline.is_some() {
            return;
        }
        let deadline = *self
            .shared
            .stop_deadline
            .get_or_init(|| Instant::now() + self.grace);
        self.deadline = Some(deadline);
        self.take_queued();
        if !self.pending.is_empty() || self.current.is_some() {
            tracing::info!(
                pending = self.pending.len() + usize::from(self.current.is_some()),
                "stopping: submitting pending blocks until the shutdown deadline"
            );
        }
    }

    /// Takes everything queued now.
    fn take_queued(&mut self) {
        while let Ok(queued) = self.blocks.try_recv() {
            self.take(queued);
        }
    }

    /// Takes a new block: dropped if already pending or taken, else written to disk (before any
    /// `submitblock`) and due at once.
    fn take(&mut self, queued: Queued) {
        let mut block = queued.block;
        block.hash.make_ascii_lowercase();
        let hash = block.hash.as_str();
        let height = block.height;
        if self.landed.contains(hash)
            || self.current.as_deref() == Some(hash)
            || self.pending.iter().any(|p| p.block.hash == hash)
        {
            tracing::debug!(hash, height, "block already submitted; duplicate dropped");
            return;
        }
        tracing::info!(hash, height, "block queued for submission");
        if !queued.on_disk
            && let Some(files) = &mut self.files
        {
            files.write(&block);
        }
        self.pending.push(Pending {
            block,
            due: Instant::now(),
            backoff: FIRST_BACKOFF,
            attempts: 0,
        });
    }

    /// Runs the attempts that are due, the highest block first.
    fn attempt_due(&mut self) {
        loop {
            self.take_queued();
            let now = Instant::now();
            if self.deadline.is_some_and(|d| now >= d) {
                return;
            }
            let Some(index) = self
                .pending
                .iter()
                .enumerate()
                .filter(|(_, p)| p.due <= now)
                .max_by_key(|(_, p)| p.block.height)
                .map(|(i, _)| i)
            else {
                return;
            };
            let mut pending = self.pending.swap_remove(index);
            self.current = Some(pending.block.hash.clone());
            let outcome = self.attempt(&pending.block);
            self.current = None;
            match outcome {
                Attempt::Retry(error) => {
                    pending.attempts += 1;
                    let block = &pending.block;
                    tracing::warn!(hash = %block.hash, height = block.height, attempts = pending.attempts,
                        %error, retry_in = ?pending.backoff, "no node took the block; retrying");
                    pending.due = Instant::now() + pending.backoff;
                    pending.backoff = (pending.backoff * 2).min(MAX_BACKOFF);
                    self.pending.push(pending);
                }
                settled => self.settle(&pending.block, settled),
            }
        }
    }

    /// Server order: the active server first, then the rest by rank.
    fn order(&self) -> Vec<usize> {
        let active = self.shared.state.lock().active;
        active
            .into_iter()
            .chain((0..self.clients.len()).filter(|&i| Some(i) != active))
            .collect()
    }

    /// The timeout for the next call on `server`: its RPC timeout (at most `cap`), cut to the
    /// shutdown deadline; `None` when that has passed.
    fn call_timeout(&mut self, server: usize, cap: Option<Duration>) -> Option<Duration> {
        self.check_stop();
        let mut timeout = self.clients.get(server)?.timeout();
        if let Some(cap) = cap {
            timeout = timeout.min(cap);
        }
        match self.deadline {
            None => Some(timeout),
            Some(deadline) => {
                let left = deadline.saturating_duration_since(Instant::now());
                (!left.is_zero()).then(|| timeout.min(left))
            }
        }
    }

    fn call(
        &mut self,
        server: usize,
        method: &str,
        params: Value,
        cap: Option<Duration>,
    ) -> Result<Value, RpcError> {
        let Some(timeout) = self.call_timeout(server, cap) else {
            return Err(RpcError::Malformed("shutdown deadline passed"));
        };
        match self.clients.get(server) {
            Some(client) => client.call_with_timeout(method, params, timeout),
            None => Err(RpcError::Malformed("no such server")),
        }
    }

    /// One attempt: offers the block to every server; when none takes it, asks whether one has
    /// it anyway or the chain moved past it.
    fn attempt(&mut self, block: &BlockSubmission) -> Attempt {
        let hash = block.hash.as_str();
        let height = block.height;
        tracing::info!(hash, height, "submitting block");
        let order = self.order();
        let mut last_error = "no server".to_owned();
        for (i, &server) in order.iter().enumerate() {
            // Blocks found meanwhile get on disk without waiting for this attempt.
            self.take_queued();
            if self.deadline.is_some_and(|d| Instant::now() >= d) {
                return Attempt::Retry("shutdown deadline passed".to_owned());
            }
            let cap = (i + 1 < order.len()).then_some(SUBMIT_HEDGE);
            match self.call(server, "submitblock", json!([block.hex]), cap) {
                Ok(reply) => {
                    return match verdict(&reply) {
                        Verdict::Accepted => Attempt::Landed {
                            server,
                            in_chain: true,
                        },
                        Verdict::Inconclusive => Attempt::Landed {
                            server,
                            in_chain: self.in_chain(block, &order),
                        },
                        Verdict::Rejected(reason) => Attempt::Refused { server, reason },
                    };
                }
                // e.g. -22 "Block decode failed": a considered refusal.
                Err(RpcError::Rpc { code, message }) if code != RPC_IN_WARMUP => {
                    return Attempt::Refused {
                        server,
                        reason: format!("{message} ({code})"),
                    };
                }
                Err(error) => {
                    tracing::warn!(hash, height, server, %error, "submitblock failed");
                    last_error = format!("server {server}: {error}");
                }
            }
        }
        self.look_up(block, &order)
            .unwrap_or(Attempt::Retry(last_error))
    }

    /// After no node took the block: does one know it (`getblockheader`), or has its best chain
    /// moved past the block's height without it?
    fn look_up(&mut self, block: &BlockSubmission, order: &[usize]) -> Option<Attempt> {
        for &server in order {
            self.take_queued();
            match self.call(
                server,
                "getblockheader",
                json!([block.hash]),
                Some(LOOKUP_TIMEOUT),
            ) {
                Ok(header)
                    if header
                        .get("hash")
                        .and_then(Value::as_str)
                        .is_some_and(|h| h.eq_ignore_ascii_case(&block.hash)) =>
                {
                    let confirmations = header.get("confirmations").and_then(Value::as_i64);
                    return Some(Attempt::Landed {
                        server,
                        in_chain: confirmations.is_some_and(|c| c > 0),
                    });
                }
                // "Block not found": the node does not know it. Anything else: ask the next one.
                Err(RpcError::Rpc { .. }) => {}
                Ok(_) | Err(_) => continue,
            }
            let best = self
                .call(server, "getblockcount", json!([]), Some(LOOKUP_TIMEOUT))
                .ok()
                .and_then(|v| v.as_u64());
            if let Some(best_height) = best.filter(|&b| b > block.height) {
                let at_height = self.call(
                    server,
                    "getblockhash",
                    json!([block.height]),
                    Some(LOOKUP_TIMEOUT),
                );
                if let Ok(Value::String(h)) = at_height
                    && !h.eq_ignore_ascii_case(&block.hash)
                {
                    return Some(Attempt::Stale {
                        server,
                        best_height,
                    });
                }
            }
        }
        None
    }

    /// Reports a settled block: event, file, next template.
    fn settle(&mut self, block: &BlockSubmission, outcome: Attempt) {
        let hash = block.hash.as_str();
        let height = block.height;
        let (accepted, reason, file, command) = match outcome {
            Attempt::Landed {
                server,
                in_chain: true,
            } => {
                self.accepted(block, server);
                (
                    true,
                    None,
                    Settled::Done,
                    Some(Command::NewBlock(block.hash.clone())),
                )
            }
            Attempt::Landed {
                server,
                in_chain: false,
            } => {
                tracing::warn!(
                    hash,
                    height,
                    server,
                    "the node has the block but it is not in its best chain"
                );
                self.landed.insert(block.hash.clone());
                (
                    false,
                    Some("inconclusive".to_owned()),
                    Settled::Done,
                    Some(Command::Update),
                )
            }
            Attempt::Refused { server, reason } => {
                tracing::error!(hash, height, server, reason, block_hex = %block.hex, "block REJECTED by bitcoind");
                let order = self.order();
                if self.in_chain(block, &order) {
                    tracing::warn!(hash, height, "block is in the chain after all");
                    self.accepted(block, server);
                    (
                        true,
                        None,
                        Settled::Done,
                        Some(Command::NewBlock(block.hash.clone())),
                    )
                } else {
                    (
                        false,
                        Some(reason),
                        Settled::Rejected,
                        Some(Command::Update),
                    )
                }
            }
            Attempt::Stale {
                server,
                best_height,
            } => {
                tracing::warn!(hash, height, server, best_height, block_hex = %block.hex,
                    "the chain moved past the block's height without it: stale, given up");
                (
                    false,
                    Some(format!(
                        "stale: the best chain is at height {best_height} without it"
                    )),
                    Settled::Stale,
                    None,
                )
            }
            // Never passed here (a retry is not settled); kept pending on disk if it were.
            Attempt::Retry(error) => {
                let _ = self.events.send(GenEvent::BlockResult {
                    hash: block.hash.clone(),
                    height,
                    accepted: false,
                    reason: Some(error),
                });
                return;
            }
        };
        self.shared.stats.block(match (accepted, &file) {
            (true, _) => BlockVerdict::Accepted,
            (false, Settled::Rejected) => BlockVerdict::Refused,
            (false, Settled::Stale) => BlockVerdict::Stale,
            (false, _) => BlockVerdict::Inconclusive,
        });
        if let Some(files) = &self.files {
            files.settle(block, file);
        }
        let _ = self.events.send(GenEvent::BlockResult {
            hash: block.hash.clone(),
            height,
            accepted,
            reason,
        });
        // Accepted: new work is due unless the template thread already has this tip (ZMQ is
        // often faster than the submitblock reply; a second template for the same tip would be
        // a needless broadcast to every miner). Refused: fetch anyway, the tip may have moved.
        if let Some(command) = command {
            let _ = self.commands.send(command);
        }
    }

    fn accepted(&mut self, block: &BlockSubmission, server: usize) {
        let hash = block.hash.as_str();
        tracing::info!(hash, height = block.height, server, "BLOCK ACCEPTED");
        self.landed.insert(block.hash.clone());
        if let Err(error) = self.call(server, "preciousblock", json!([hash]), Some(LOOKUP_TIMEOUT))
        {
            tracing::warn!(hash, %error, "preciousblock failed");
        }
    }

    /// Whether any server has `block` at its height in its best chain (`getblockhash`).
    fn in_chain(&mut self, block: &BlockSubmission, order: &[usize]) -> bool {
        order.iter().any(|&server| {
            match self.call(
                server,
                "getblockhash",
                json!([block.height]),
                Some(LOOKUP_TIMEOUT),
            ) {
                Ok(Value::String(h)) => h.eq_ignore_ascii_case(&block.hash),
                Ok(_) => false,
                Err(error) => {
                    tracing::debug!(%error, "getblockhash failed");
                    false
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn submitblock_replies_are_read() {
        assert_eq!(verdict(&Value::Null), Verdict::Accepted);
        assert_eq!(verdict(&json!("duplicate")), Verdict::Accepted);
        assert_eq!(verdict(&json!("inconclusive")), Verdict::Inconclusive);
        assert_eq!(
            verdict(&json!("high-hash")),
            Verdict::Rejected("high-hash".into())
        );
        assert!(matches!(verdict(&json!(5)), Verdict::Rejected(_)));
    }
}
