//! The block submission thread, with its own RPC connections so that a found block never waits
//! behind a template fetch.

use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender, select};
use serde_json::{Value, json};

use crate::rpc::{RpcClient, RpcError};
use crate::{BlockSubmission, Command, GenEvent, Shared};

/// Wait before the first retry after a transport failure; doubled each time up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(50);
const MAX_BACKOFF: Duration = Duration::from_secs(1);

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

/// The submission thread's state.
pub(crate) struct Submitter {
    clients: Vec<RpcClient>,
    retries: u32,
    shared: Arc<Shared>,
    events: Sender<GenEvent>,
    commands: Sender<Command>,
    blocks: Receiver<BlockSubmission>,
    stop: Receiver<()>,
}

impl Submitter {
    pub(crate) fn new(
        clients: Vec<RpcClient>,
        retries: u32,
        shared: Arc<Shared>,
        events: Sender<GenEvent>,
        commands: Sender<Command>,
        blocks: Receiver<BlockSubmission>,
        stop: Receiver<()>,
    ) -> Self {
        Self {
            clients,
            retries,
            shared,
            events,
            commands,
            blocks,
            stop,
        }
    }

    /// Thread body. On stop, blocks already queued are still submitted.
    pub(crate) fn run(self) {
        loop {
            select! {
                recv(self.blocks) -> block => match block {
                    Ok(block) => self.submit(&block),
                    Err(_) => break,
                },
                recv(self.stop) -> _ => {
                    for block in self.blocks.try_iter() {
                        self.submit(&block);
                    }
                    break;
                }
            }
        }
        tracing::debug!("submission thread stopped");
    }

    /// Server order for one block: the active server first, then the rest by rank.
    fn order(&self) -> Vec<usize> {
        let active = self.shared.state.lock().active;
        active
            .into_iter()
            .chain((0..self.clients.len()).filter(|&i| Some(i) != active))
            .collect()
    }

    fn submit(&self, block: &BlockSubmission) {
        let hash = block.hash.as_str();
        let height = block.height;
        tracing::info!(hash, height, "submitting block");
        let order = self.order();
        let mut backoff = FIRST_BACKOFF;
        let mut outcome: Result<(usize, Verdict), String> = Err("no server".to_owned());
        let attempts = self.retries.saturating_add(1);
        for attempt in 0..attempts {
            let Some(&index) = order.get(attempt as usize % order.len().max(1)) else {
                break;
            };
            let Some(client) = self.clients.get(index) else {
                break;
            };
            match client.call("submitblock", json!([block.hex])) {
                Ok(reply) => {
                    outcome = Ok((index, verdict(&reply)));
                    break;
                }
                Err(RpcError::Rpc { code, message }) => {
                    // e.g. -22 "Block decode failed": a considered refusal.
                    outcome = Ok((index, Verdict::Rejected(format!("{message} ({code})"))));
                    break;
                }
                Err(error) => {
                    tracing::warn!(hash, height, server = index, attempt, %error, "submitblock failed; retrying");
                    outcome = Err(error.to_string());
                    if attempt + 1 < attempts {
                        std::thread::sleep(backoff);
                        backoff = (backoff * 2).min(MAX_BACKOFF);
                    }
                }
            }
        }

        let (accepted, reason, server) = match outcome {
            Ok((index, Verdict::Accepted)) => (true, None, Some(index)),
            Ok((index, Verdict::Inconclusive)) => {
                if self.in_chain(block, &order) {
                    (true, None, Some(index))
                } else {
                    (false, Some("inconclusive".to_owned()), Some(index))
                }
            }
            Ok((index, Verdict::Rejected(reason))) => {
                tracing::error!(hash, height, server = index, reason, block_hex = %block.hex, "block REJECTED by bitcoind");
                self.check_anyway(block, &order, reason, Some(index))
            }
            Err(last_error) => {
                tracing::error!(hash, height, error = %last_error, block_hex = %block.hex, "block submission FAILED on every try");
                self.check_anyway(block, &order, last_error, None)
            }
        };
        if accepted {
            tracing::info!(hash, height, "BLOCK ACCEPTED");
            if let Some(client) = server.and_then(|i| self.clients.get(i))
                && let Err(error) = client.call("preciousblock", json!([hash]))
            {
                tracing::warn!(hash, %error, "preciousblock failed");
            }
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
        let _ = self.commands.send(if accepted {
            Command::NewBlock(block.hash.clone())
        } else {
            Command::Update
        });
    }

    /// After a failure: did the block get in anyway?
    fn check_anyway(
        &self,
        block: &BlockSubmission,
        order: &[usize],
        reason: String,
        server: Option<usize>,
    ) -> (bool, Option<String>, Option<usize>) {
        if self.in_chain(block, order) {
            tracing::warn!(hash = %block.hash, height = block.height, reason, "block is in the chain after all");
            (true, None, server.or(order.first().copied()))
        } else {
            (false, Some(reason), server)
        }
    }

    /// Whether any server has `block` at its height in its best chain (`getblockhash`).
    fn in_chain(&self, block: &BlockSubmission, order: &[usize]) -> bool {
        order
            .iter()
            .filter_map(|&i| self.clients.get(i))
            .any(
                |client| match client.call("getblockhash", json!([block.height])) {
                    Ok(Value::String(h)) => h.eq_ignore_ascii_case(&block.hash),
                    Ok(_) => false,
                    Err(error) => {
                        tracing::debug!(%error, "getblockhash failed");
                        false
                    }
                },
            )
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
