//! Outbound stratum links to upstream pools, for proxy (`-p`) and passthrough (`-P`) modes.
//!
//! Each link runs on threads of its own with plain blocking sockets (the connector does no
//! outbound connections):
//! - an engine thread (`upstream` / `passthrough`) owns the protocol state, writes to the
//!   socket and takes commands from a bounded channel;
//! - a thread per TCP connection (`up-read-<index>`) resolves and connects (so a black-holed
//!   server never stalls the active link), then reads lines and hands them to the engine
//!   through a bounded channel (16 lines of at most 16 MiB), so a slow owner slows reading
//!   from the upstream (TCP back-pressure) instead of buffering without limit.
//!
//! Both kinds fail over along a list of servers in priority order: the first that connects and
//! completes its handshake becomes active; when it goes down (a TCP error, end of stream, or no
//! line for [`UpstreamConfig::idle_timeout`]) the next entries are tried, and every
//! [`UpstreamConfig::failback_interval`] one better-ranked entry is probed with a fresh
//! connection that must complete the whole handshake before the link switches to it.
//!
//! - [`Pool`] (and [`Link`], a pool of one server): a stratum client (`common::stratum::client`)
//!   whose events come as [`UpstreamEvent`] and which takes [`Submit`] commands.
//! - [`PassthroughLink`]: ckpool's passthrough (or node) framing; miners' lines go up, lines for
//!   miners come down as [`PassthroughEvent`].

mod engine;
mod passthrough;
mod stratum;

use std::sync::Arc;
use std::time::Duration;

pub use engine::{LinkHandover, LinkOwner, OwnedLink, WriteError};
pub use passthrough::{MinerLine, PassthroughEvent, PassthroughLink};
pub use stratum::{Link, MAX_EXTRANONCE2, Pool, Submit, UpstreamEvent};

/// One upstream pool, as in ckpool.conf's `proxy` array. Its `Debug` output leaves the
/// password out.
#[derive(Clone, PartialEq, Eq)]
pub struct UpstreamServer {
    /// `host:port`, optionally prefixed with `stratum+tcp://` or `tcp://`.
    pub url: String,
    /// The worker name to authorise as (unused by a passthrough).
    pub auth: String,
    /// Its password (unused by a passthrough).
    pub pass: String,
}

impl std::fmt::Debug for UpstreamServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamServer")
            .field("url", &self.url)
            .field("auth", &self.auth)
            .field("pass", &"<redacted>")
            .finish()
    }
}

impl UpstreamServer {
    /// A server entry.
    pub fn new(url: impl Into<String>, auth: impl Into<String>, pass: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            auth: auth.into(),
            pass: pass.into(),
        }
    }
}

/// How an upstream link behaves. [`Default`] gives production values.
#[derive(Clone, Debug, PartialEq)]
pub struct UpstreamConfig {
    /// The servers, best first (ckpool.conf's `proxy` array).
    pub servers: Vec<UpstreamServer>,
    /// The user agent sent in `mining.subscribe` and answered to `client.get_version` (and the
    /// passthrough handshake's parameter). Default `ckpool-rs/<version>`.
    pub user_agent: String,
    /// Ask for version rolling with this mask (`mining.configure` first).
    pub version_rolling: Option<u32>,
    /// Send `mining.extranonce.subscribe` after subscribing.
    pub extranonce_subscribe: bool,
    /// Bound on one TCP connect (per address the host resolves to). Default 5 s.
    pub connect_timeout: Duration,
    /// A new connection must complete its handshake (subscribe and authorise, or the
    /// passthrough's `{"result":true}`) within `connect_timeout` plus this long of starting;
    /// also the time each handshake request may go unanswered. Default 10 s.
    pub handshake_timeout: Duration,
    /// A submit unanswered this long is reported as a lost verdict (`None`: never). Default
    /// 120 s, as ckpool.
    pub submit_timeout: Option<Duration>,
    /// Dead-upstream detector: the active link is declared down when no line came for this long
    /// (`None`: never; a passthrough upstream with no miners may be silent). Pools send a
    /// notify at least every 30 to 60 s. Default 120 s.
    pub idle_timeout: Option<Duration>,
    /// How often one better-ranked server is probed for fail-back while a lesser one is
    /// active. Default 30 s.
    pub failback_interval: Duration,
    /// How long to wait after every server failed before trying them all again. Default 5 s.
    pub retry_interval: Duration,
    /// A write to the upstream that makes no progress for this long takes the link down.
    /// Default 30 s.
    pub write_timeout: Duration,
    /// Capacity of the command queue (submits or miner lines). Default 1024. (Each connection
    /// reads at most 16 lines ahead of the engine, each at most 16 MiB.)
    pub queue: usize,
    /// How long `submit`/`send` block on a full queue before returning
    /// [`SendError::Full`]. Default 50 ms.
    pub send_block: Duration,
    /// `client.reconnect` is honoured when its host is one of `servers`' hosts or is listed
    /// here (compared case-insensitively); any other is refused and logged. A reconnect without
    /// a host (reconnect to the same server) is always honoured.
    pub reconnect_allow: Vec<String>,
    /// Passthrough links: ask for multicast lines (`"multicast":true` in the handshake, see
    /// `common::stratum::passthrough`). Default true.
    pub multicast: bool,
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        Self {
            servers: Vec::new(),
            user_agent: concat!("ckpool-rs/", env!("CARGO_PKG_VERSION")).to_owned(),
            version_rolling: None,
            extranonce_subscribe: false,
            connect_timeout: Duration::from_secs(5),
            handshake_timeout: Duration::from_secs(10),
            submit_timeout: Some(Duration::from_secs(120)),
            idle_timeout: Some(Duration::from_secs(120)),
            failback_interval: Duration::from_secs(30),
            retry_interval: Duration::from_secs(5),
            write_timeout: Duration::from_secs(30),
            queue: 1024,
            send_block: Duration::from_millis(50),
            reconnect_allow: Vec::new(),
            multicast: true,
        }
    }
}

/// Why a link could not start.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// `servers` is empty.
    #[error("no upstream server configured")]
    NoServers,
    /// A server's URL has no `host:port`.
    #[error("upstream {index}: bad url {url:?}")]
    BadUrl {
        /// Index in `servers`.
        index: usize,
        /// The URL as given.
        url: String,
    },
    /// `queue` is zero or a period is zero.
    #[error("{0} must be greater than zero")]
    Zero(&'static str),
    /// A thread could not be started.
    #[error("cannot start an upstream thread: {0}")]
    Spawn(#[source] std::io::Error),
    /// A connection handed over by another process cannot be taken (`-H`).
    #[error("handover: {0}")]
    Handover(&'static str),
}

/// Why a command was not queued; the command comes back.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SendError<C> {
    /// The queue stayed full: the upstream is slow (or not reading). Slow down and retry.
    #[error("upstream queue full")]
    Full(C),
    /// The link is shut down.
    #[error("upstream link shut down")]
    Closed(C),
}

/// `host` and `port` of a server URL (`stratum+tcp://host:port`, `host:port`, `[v6]:port`).
pub(crate) fn host_port(url: &str) -> Option<(String, u16)> {
    let rest = url
        .strip_prefix("stratum+tcp://")
        .or_else(|| url.strip_prefix("tcp://"))
        .unwrap_or(url);
    let rest = rest.trim_end_matches('/');
    let (host, port) = rest.rsplit_once(':')?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let port = port.parse().ok()?;
    (!host.is_empty()).then(|| (host.to_owned(), port))
}

/// What the engine needs from a configuration, shared with its threads.
pub(crate) type Shared = Arc<UpstreamConfig>;

/// Checks a configuration: servers present, URLs usable, periods and queue non-zero.
fn check(cfg: &UpstreamConfig) -> Result<(), UpstreamError> {
    if cfg.servers.is_empty() {
        return Err(UpstreamError::NoServers);
    }
    for (index, s) in cfg.servers.iter().enumerate() {
        if host_port(&s.url).is_none() {
            return Err(UpstreamError::BadUrl {
                index,
                url: s.url.clone(),
            });
        }
    }
    for (name, d) in [
        ("connect_timeout", cfg.connect_timeout),
        ("handshake_timeout", cfg.handshake_timeout),
        ("failback_interval", cfg.failback_interval),
        ("retry_interval", cfg.retry_interval),
        ("write_timeout", cfg.write_timeout),
    ] {
        if d.is_zero() {
            return Err(UpstreamError::Zero(name));
        }
    }
    if cfg.queue == 0 {
        return Err(UpstreamError::Zero("queue"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::host_port;

    #[test]
    fn urls() {
        assert_eq!(
            host_port("stratum+tcp://pool.example:3333"),
            Some(("pool.example".to_owned(), 3333))
        );
        assert_eq!(
            host_port("127.0.0.1:3334"),
            Some(("127.0.0.1".to_owned(), 3334))
        );
        assert_eq!(host_port("[::1]:3334"), Some(("::1".to_owned(), 3334)));
        assert_eq!(host_port("pool.example"), None);
        assert_eq!(host_port(":3333"), None);
        assert_eq!(host_port("h:99999"), None);
    }
}
