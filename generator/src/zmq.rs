//! The ZMQ `hashblock` subscriber: its own thread with a current-thread tokio runtime.
//!
//! It forwards each announced block hash to the template thread and never talks RPC itself.
//! If the socket breaks (the node restarts) it builds a new one, with a backoff capped at
//! [`MAX_BACKOFF`], and asks for a template refresh once it is back, since a block may have been
//! missed meanwhile.

use std::time::Duration;

use crossbeam_channel::{Receiver, Sender, TryRecvError};
use zeromq::{Socket, SocketEvent, SocketOptions, SocketRecv, SubSocket, ZmqMessage};

use crate::Command;
use crate::stats::GenStats;

/// How often the loop looks at the stop signal and the socket monitor while idle.
const TICK: Duration = Duration::from_millis(100);
/// Longest wait between two connection attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(2);
/// First wait after a failed attempt.
const MIN_BACKOFF: Duration = Duration::from_millis(100);
/// Longest a connection attempt may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// The topic bitcoind publishes new tip hashes under.
const TOPIC: &str = "hashblock";

/// Checks that `endpoint` looks like `tcp://host:port`, as the `zeromq` crate needs.
pub(crate) fn validate_endpoint(endpoint: &str) -> Result<(), &'static str> {
    let Some(rest) = endpoint.strip_prefix("tcp://") else {
        return Err("must start with tcp://");
    };
    let Some((host, port)) = rest.rsplit_once(':') else {
        return Err("no port");
    };
    if host.is_empty() {
        return Err("no host");
    }
    if port.parse::<u16>().is_err() {
        return Err("bad port");
    }
    Ok(())
}

/// Thread body: runs until `stop` is signalled (its sender dropped) or the template thread is
/// gone.
pub(crate) fn run(
    endpoint: String,
    commands: Sender<Command>,
    stop: Receiver<()>,
    stats: &GenStats,
) {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(error) => {
            tracing::error!(%error, "cannot build the tokio runtime for ZMQ; block notifications off");
            return;
        }
    };
    runtime.block_on(subscribe_loop(&endpoint, &commands, &stop, stats));
}

async fn subscribe_loop(
    endpoint: &str,
    commands: &Sender<Command>,
    stop: &Receiver<()>,
    stats: &GenStats,
) {
    let mut backoff = MIN_BACKOFF;
    let mut connected_before = false;
    let mut failures = 0u32;
    loop {
        if stopped(stop) {
            return;
        }
        let mut options = SocketOptions::default();
        options.connect_timeout(CONNECT_TIMEOUT);
        let mut socket = SubSocket::with_options(options);
        let mut monitor = socket.monitor();
        let connect = async {
            socket.connect(endpoint).await?;
            socket.subscribe(TOPIC).await
        };
        match tokio::time::timeout(CONNECT_TIMEOUT + TICK, connect).await {
            Ok(Ok(())) => {}
            result => {
                let error = match result {
                    Ok(Err(e)) => e.to_string(),
                    _ => "timed out".to_owned(),
                };
                // Say it once per outage; the retries go on quietly.
                if failures == 0 {
                    tracing::warn!(endpoint, error, "ZMQ connect failed; retrying");
                } else {
                    tracing::debug!(endpoint, error, failures, "ZMQ connect failed again");
                }
                failures = failures.saturating_add(1);
                if !pause(backoff, stop).await {
                    return;
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
                continue;
            }
        }
        backoff = MIN_BACKOFF;
        failures = 0;
        tracing::info!(endpoint, "ZMQ hashblock subscribed");
        if connected_before && commands.send(Command::Update).is_err() {
            return;
        }
        connected_before = true;
        loop {
            if stopped(stop) {
                return;
            }
            match tokio::time::timeout(TICK, socket.recv()).await {
                Ok(Ok(message)) => match block_hash(&message) {
                    Some(hash) => {
                        tracing::debug!(hash, "ZMQ hashblock");
                        stats.zmq_block();
                        if commands.send(Command::NewBlock(hash)).is_err() {
                            return;
                        }
                    }
                    None => tracing::warn!(frames = message.len(), "odd ZMQ message ignored"),
                },
                Ok(Err(error)) => {
                    tracing::warn!(endpoint, %error, "ZMQ receive failed; reconnecting");
                    break;
                }
                Err(_) => {
                    // Idle: see whether the monitor reported a lost peer since the last look.
                    let mut gone = false;
                    while let Ok(event) = monitor.try_recv() {
                        gone |= matches!(event, SocketEvent::Disconnected(_));
                    }
                    if gone {
                        tracing::warn!(endpoint, "ZMQ publisher went away; reconnecting");
                        break;
                    }
                }
            }
        }
        if !pause(MIN_BACKOFF, stop).await {
            return;
        }
    }
}

/// The hash of a `hashblock` message (topic, 32 bytes in RPC order, 4-byte sequence) as RPC hex.
fn block_hash(message: &ZmqMessage) -> Option<String> {
    let topic = message.get(0)?;
    if topic.as_ref() != TOPIC.as_bytes() {
        return None;
    }
    let hash = message.get(1)?;
    if hash.len() != 32 {
        return None;
    }
    Some(hex::encode(hash))
}

fn stopped(stop: &Receiver<()>) -> bool {
    matches!(stop.try_recv(), Ok(()) | Err(TryRecvError::Disconnected))
}

/// Sleeps for `total` in ticks; false if asked to stop meanwhile.
async fn pause(total: Duration, stop: &Receiver<()>) -> bool {
    let mut left = total;
    while !left.is_zero() {
        if stopped(stop) {
            return false;
        }
        let step = left.min(TICK);
        tokio::time::sleep(step).await;
        left -= step;
    }
    !stopped(stop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_are_checked() {
        assert!(validate_endpoint("tcp://127.0.0.1:28332").is_ok());
        assert!(validate_endpoint("127.0.0.1:28332").is_err());
        assert!(validate_endpoint("tcp://127.0.0.1").is_err());
        assert!(validate_endpoint("tcp://:1").is_err());
        assert!(validate_endpoint("tcp://h:99999").is_err());
    }

    #[test]
    fn hashblock_messages_are_parsed() {
        let mut m = ZmqMessage::from("hashblock");
        let hash = [0xabu8; 32];
        m.push_back(hash.to_vec().into());
        m.push_back(vec![1, 0, 0, 0].into());
        assert_eq!(block_hash(&m).unwrap(), "ab".repeat(32));

        let mut other = ZmqMessage::from("rawtx");
        other.push_back(hash.to_vec().into());
        assert_eq!(block_hash(&other), None);

        let mut short = ZmqMessage::from("hashblock");
        short.push_back(vec![1, 2, 3].into());
        assert_eq!(block_hash(&short), None);
        assert_eq!(block_hash(&ZmqMessage::from("hashblock")), None);
    }
}
