//! The generator: everything ckpool-rs says to bitcoind.
//!
//! In pool mode a [`Generator`] keeps block templates coming from a prioritised list of bitcoind
//! servers, notices new blocks (ZMQ `hashblock`, `getbestblockhash` polling, or an explicit
//! [`Generator::request_update`]), fails over between servers and back, and submits found blocks.
//! Results come back as [`GenEvent`] messages on a channel; no method ever blocks its caller on
//! the network.
//!
//! Threads (all joined by [`Generator::shutdown`]):
//! - `gen-template`: owns one RPC connection per server; fetches templates, polls the tip,
//!   switches servers on failure;
//! - `gen-probe`: every `failover_check`, probes the servers ranked above the active one (or all
//!   of them when none is up) so that a slow or black-holed server never stalls templates;
//! - `gen-submit`: block submission on its own connections, so a found block never waits behind
//!   a template fetch;
//! - `gen-zmq` (when `zmqblock` is set): the ZMQ subscriber on a current-thread tokio runtime.
//!
//! This crate never touches miners or shares; it knows templates (types from `common`) and
//! bitcoind only.
#![forbid(unsafe_code)]

#[cfg(test)]
mod fake_node;
pub mod rpc;
mod submit;
mod template;
mod zmq;

use std::path::PathBuf;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use common::template::Template;
use crossbeam_channel::{Sender, unbounded};
use parking_lot::Mutex;

use crate::rpc::{RpcAuth, RpcClient, RpcError};

/// One bitcoind, as in ckpool.conf's `btcd` array. Its `Debug` output leaves the password out.
#[derive(Clone, PartialEq, Eq)]
pub struct BtcdConfig {
    /// `host:port` or `http://host:port`.
    pub url: String,
    /// RPC user name (ignored when `cookie` is set).
    pub auth: String,
    /// RPC password (ignored when `cookie` is set).
    pub pass: String,
    /// The node's `.cookie` file, used instead of `auth`/`pass` when set.
    pub cookie: Option<PathBuf>,
    /// The node announces new blocks itself (ZMQ or `-blocknotify` calling the notifier), so
    /// the generator does not poll `getbestblockhash` every `blockpoll` while this server is
    /// active; it still checks the server is alive every `failover_check`.
    pub notify: bool,
}

impl std::fmt::Debug for BtcdConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BtcdConfig")
            .field("url", &self.url)
            .field("auth", &self.auth)
            .field("pass", &"<redacted>")
            .field("cookie", &self.cookie)
            .field("notify", &self.notify)
            .finish()
    }
}

/// What the pool-mode generator needs to know.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GeneratorConfig {
    /// The servers, best first.
    pub btcd: Vec<BtcdConfig>,
    /// How often the active server's best block hash is polled (when it is not `notify`).
    pub blockpoll: Duration,
    /// How often a fresh template is fetched when no block arrives.
    pub update_interval: Duration,
    /// The ZMQ `hashblock` publisher to subscribe to (`tcp://host:port`), if any.
    pub zmqblock: Option<String>,
    /// How often better-ranked servers are probed for fail-back, and how often the active server
    /// is checked at least (so a dead server is left within about this long even when it is
    /// `notify` and not polled).
    pub failover_check: Duration,
    /// How many times a block submission is retried after a transport failure.
    pub submit_retries: u32,
    /// Timeout of one RPC call (connecting alone is bounded by [`rpc::CONNECT_TIMEOUT`]).
    pub rpc_timeout: Duration,
}

impl Default for GeneratorConfig {
    fn default() -> Self {
        Self {
            btcd: Vec::new(),
            blockpoll: Duration::from_millis(100),
            update_interval: Duration::from_secs(30),
            zmqblock: None,
            failover_check: Duration::from_secs(1),
            submit_retries: 5,
            rpc_timeout: Duration::from_secs(30),
        }
    }
}

/// What the generator reports.
#[derive(Clone, Debug)]
pub enum GenEvent {
    /// A new template.
    Template {
        /// The template.
        template: Arc<Template>,
        /// It builds on a different block than the previous template did: old work is stale.
        new_block: bool,
        /// Index (in `btcd`) of the server it came from.
        server: usize,
    },
    /// The active server changed (also sent for the first one). A template from it follows.
    ServerUp {
        /// Index in `btcd`.
        index: usize,
        /// Its URL as configured.
        url: String,
    },
    /// No server answers; the generator keeps trying every `failover_check`.
    NoServers,
    /// What became of a [`Generator::submit_block`].
    BlockResult {
        /// Block hash, RPC (reversed hex) order.
        hash: String,
        /// Block height.
        height: u64,
        /// The block is in the node's best chain (or the node already had it).
        accepted: bool,
        /// Why it was refused (the node's reject string or the last error), if it was.
        reason: Option<String>,
    },
}

/// A solved block to submit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockSubmission {
    /// Block hash, RPC (reversed hex) order.
    pub hash: String,
    /// Block height.
    pub height: u64,
    /// The whole serialised block, hex.
    pub hex: String,
}

/// Why the generator could not start.
#[derive(Debug, thiserror::Error)]
pub enum GenError {
    /// `btcd` is empty.
    #[error("no btcd configured")]
    NoServers,
    /// A `btcd` entry is unusable.
    #[error("btcd {index}: {source}")]
    Server {
        /// Index in `btcd`.
        index: usize,
        /// What is wrong with it.
        #[source]
        source: RpcError,
    },
    /// `zmqblock` is not a `tcp://host:port` endpoint.
    #[error("zmqblock {endpoint}: {reason}")]
    Zmq {
        /// The endpoint as given.
        endpoint: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A period is zero.
    #[error("{0} must be greater than zero")]
    ZeroDuration(&'static str),
    /// A thread could not be started.
    #[error("cannot start a generator thread: {0}")]
    Spawn(#[source] std::io::Error),
}

/// Queues solved blocks for the generator's submitter thread ([`Generator::block_submitter`]).
#[derive(Debug, Clone)]
pub struct BlockSubmitter {
    submissions: Sender<BlockSubmission>,
}

impl BlockSubmitter {
    /// Queues a solved block for submission; the outcome comes back as
    /// [`GenEvent::BlockResult`]. Never blocks.
    pub fn submit(&self, block: BlockSubmission) {
        if let Err(err) = self.submissions.send(block) {
            let block = err.into_inner();
            tracing::error!(
                hash = %block.hash,
                height = block.height,
                block_hex = %block.hex,
                "generator is shut down; block NOT submitted"
            );
        }
    }
}

/// The running pool-mode generator. Dropping it stops its threads without waiting for them;
/// [`shutdown`](Self::shutdown) also waits.
#[derive(Debug)]
pub struct Generator {
    commands: Sender<Command>,
    submissions: Sender<BlockSubmission>,
    shared: Arc<Shared>,
    /// Dropping this sender tells every thread to stop.
    stop: Option<Sender<()>>,
    threads: Vec<JoinHandle<()>>,
}

impl Generator {
    /// Checks `cfg` and starts the generator's threads; returns at once. Events (the first
    /// [`GenEvent::ServerUp`] and template, or [`GenEvent::NoServers`]) follow on `events`.
    pub fn start(cfg: GeneratorConfig, events: Sender<GenEvent>) -> Result<Self, GenError> {
        if cfg.btcd.is_empty() {
            return Err(GenError::NoServers);
        }
        for (value, name) in [
            (cfg.blockpoll, "blockpoll"),
            (cfg.update_interval, "update_interval"),
            (cfg.failover_check, "failover_check"),
            (cfg.rpc_timeout, "rpc_timeout"),
        ] {
            if value.is_zero() {
                return Err(GenError::ZeroDuration(name));
            }
        }
        if let Some(endpoint) = &cfg.zmqblock {
            zmq::validate_endpoint(endpoint).map_err(|reason| GenError::Zmq {
                endpoint: endpoint.clone(),
                reason,
            })?;
        }
        // Each thread gets its own clients, hence its own connections.
        let clients = || -> Result<Vec<RpcClient>, GenError> {
            cfg.btcd
                .iter()
                .enumerate()
                .map(|(index, b)| {
                    RpcClient::new(&b.url, auth_of(b), cfg.rpc_timeout)
                        .map_err(|source| GenError::Server { index, source })
                })
                .collect()
        };
        let template_clients = clients()?;
        let probe_clients = clients()?;
        let submit_clients = clients()?;

        let shared = Arc::new(Shared {
            state: Mutex::new(SharedState {
                active: None,
                chain: None,
                height: None,
            }),
        });
        let (commands, command_rx) = unbounded();
        let (submissions, submission_rx) = unbounded();
        let (stop, stop_rx) = crossbeam_channel::bounded::<()>(0);
        let mut generator = Self {
            commands: commands.clone(),
            submissions,
            shared: Arc::clone(&shared),
            stop: Some(stop),
            threads: Vec::new(),
        };

        let worker = template::TemplateWorker::new(
            &cfg,
            template_clients,
            Arc::clone(&shared),
            events.clone(),
            command_rx,
            stop_rx.clone(),
        );
        generator.spawn("gen-template", move || worker.run())?;

        let prober = template::Prober::new(
            &cfg,
            probe_clients,
            Arc::clone(&shared),
            commands.clone(),
            stop_rx.clone(),
        );
        generator.spawn("gen-probe", move || prober.run())?;

        let submitter = submit::Submitter::new(
            submit_clients,
            cfg.submit_retries,
            Arc::clone(&shared),
            events,
            commands.clone(),
            submission_rx,
            stop_rx.clone(),
        );
        generator.spawn("gen-submit", move || submitter.run())?;

        if let Some(endpoint) = cfg.zmqblock.clone() {
            let stop_rx = stop_rx.clone();
            generator.spawn("gen-zmq", move || zmq::run(endpoint, commands, stop_rx))?;
        }
        Ok(generator)
    }

    /// Asks for a fresh template at once (the notifier's or admin `update`, or the pool after it
    /// found a block). Never blocks.
    pub fn request_update(&self) {
        // Fails only when the template thread is gone (shutting down): nothing to do then.
        let _ = self.commands.send(Command::Update);
    }

    /// Queues a solved block for submission; the outcome comes back as
    /// [`GenEvent::BlockResult`]. Never blocks.
    pub fn submit_block(&self, block: BlockSubmission) {
        if let Err(err) = self.submissions.send(block) {
            let block = err.into_inner();
            tracing::error!(
                hash = %block.hash,
                height = block.height,
                block_hex = %block.hex,
                "generator is shutting down; block NOT submitted"
            );
        }
    }

    /// A handle that queues blocks for submission, for the stratifier's side of the daemon. It
    /// holds only the queue, not the generator, so the daemon can still [`shutdown`](Self::shutdown)
    /// the generator (which submits what is queued) while handles are alive.
    pub fn block_submitter(&self) -> BlockSubmitter {
        BlockSubmitter {
            submissions: self.submissions.clone(),
        }
    }

    /// The active server's chain name from `getblockchaininfo` (`main`, `test`, `signet`,
    /// `regtest`, …), once a server is up.
    pub fn chain(&self) -> Option<String> {
        self.shared.state.lock().chain.clone()
    }

    /// The network of the active server's chain, once a server is up and if the chain is known.
    pub fn network(&self) -> Option<bitcoin::Network> {
        common::address::network_from_chain(&self.chain()?)
    }

    /// Index (in `btcd`) of the server templates currently come from.
    pub fn active_server(&self) -> Option<usize> {
        self.shared.state.lock().active
    }

    /// Stops every thread and waits for them. A block already queued is still submitted first.
    pub fn shutdown(mut self) {
        self.stop.take();
        for handle in self.threads.drain(..) {
            if handle.join().is_err() {
                tracing::error!("a generator thread panicked");
            }
        }
    }

    fn spawn(&mut self, name: &str, body: impl FnOnce() + Send + 'static) -> Result<(), GenError> {
        let handle = std::thread::Builder::new()
            .name(name.to_owned())
            .spawn(body)
            .map_err(GenError::Spawn)?;
        self.threads.push(handle);
        Ok(())
    }
}

impl Drop for Generator {
    fn drop(&mut self) {
        // Threads see the stop channel close and end by themselves.
        self.stop.take();
    }
}

fn auth_of(b: &BtcdConfig) -> RpcAuth {
    match &b.cookie {
        Some(path) => RpcAuth::Cookie(path.clone()),
        None => RpcAuth::UserPass {
            user: b.auth.clone(),
            pass: b.pass.clone(),
        },
    }
}

/// Messages to the template thread.
#[derive(Debug)]
enum Command {
    /// Fetch a template now.
    Update,
    /// A block with this hash (RPC order) is new: announced over ZMQ, or ours and accepted.
    /// Fetch a template unless the tip already is that block.
    NewBlock(String),
    /// The prober found this better-ranked server alive.
    ServerAlive(usize),
}

/// State the template thread publishes for the other threads and the API.
#[derive(Debug)]
struct Shared {
    state: Mutex<SharedState>,
}

#[derive(Debug)]
struct SharedState {
    /// The server templates come from.
    active: Option<usize>,
    /// Its chain name.
    chain: Option<String>,
    /// Height of the last template emitted.
    height: Option<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_is_checked_before_anything_starts() {
        let (tx, _rx) = unbounded();
        assert!(matches!(
            Generator::start(GeneratorConfig::default(), tx.clone()),
            Err(GenError::NoServers)
        ));
        let btcd = vec![BtcdConfig {
            url: "127.0.0.1:1".into(),
            auth: "u".into(),
            pass: "p".into(),
            cookie: None,
            notify: false,
        }];
        let cfg = GeneratorConfig {
            btcd: btcd.clone(),
            blockpoll: Duration::ZERO,
            ..GeneratorConfig::default()
        };
        assert!(matches!(
            Generator::start(cfg, tx.clone()),
            Err(GenError::ZeroDuration("blockpoll"))
        ));
        let cfg = GeneratorConfig {
            btcd: btcd.clone(),
            zmqblock: Some("127.0.0.1:28332".into()),
            ..GeneratorConfig::default()
        };
        assert!(matches!(
            Generator::start(cfg, tx.clone()),
            Err(GenError::Zmq { .. })
        ));
        let mut bad = btcd;
        bad[0].url = "https://127.0.0.1:1".into();
        let cfg = GeneratorConfig {
            btcd: bad,
            ..GeneratorConfig::default()
        };
        assert!(matches!(
            Generator::start(cfg, tx),
            Err(GenError::Server { index: 0, .. })
        ));
    }

    #[test]
    fn unreachable_servers_report_no_servers_and_shut_down() {
        // Port 1 on loopback refuses at once.
        let (tx, rx) = unbounded();
        let cfg = GeneratorConfig {
            btcd: vec![BtcdConfig {
                url: "127.0.0.1:1".into(),
                auth: "u".into(),
                pass: "p".into(),
                cookie: None,
                notify: false,
            }],
            ..GeneratorConfig::default()
        };
        let generator = Generator::start(cfg, tx).unwrap();
        let event = rx.recv_timeout(Duration::from_secs(10)).unwrap();
        assert!(matches!(event, GenEvent::NoServers), "{event:?}");
        assert_eq!(generator.active_server(), None);
        assert_eq!(generator.chain(), None);
        generator.shutdown();
    }

    fn fake_btcd(addr: &str) -> BtcdConfig {
        BtcdConfig {
            url: addr.to_owned(),
            auth: "u".into(),
            pass: "p".into(),
            cookie: None,
            notify: false,
        }
    }

    fn fast(btcd: Vec<BtcdConfig>) -> GeneratorConfig {
        GeneratorConfig {
            btcd,
            blockpoll: Duration::from_millis(20),
            failover_check: Duration::from_millis(100),
            rpc_timeout: Duration::from_secs(5),
            ..GeneratorConfig::default()
        }
    }

    fn next_event(rx: &crossbeam_channel::Receiver<GenEvent>) -> GenEvent {
        rx.recv_timeout(Duration::from_secs(10)).unwrap()
    }

    const PREV_A: &str = "00000000000000000000000000000000000000000000000000000000000000aa";
    const PREV_B: &str = "00000000000000000000000000000000000000000000000000000000000000bb";

    #[test]
    fn odd_replies_mean_no_server_not_a_panic() {
        use fake_node::{ok, start};
        use serde_json::json;
        let no_chain = start(|m| match m {
            "getblockchaininfo" => ok(json!(5)),
            _ => ok(json!({"version": 1})),
        });
        let bad_template = start(|m| match m {
            "getblockchaininfo" => ok(json!({"chain": "regtest"})),
            "getblocktemplate" => ok(json!({"version": "one", "height": -1})),
            _ => (200, "not json".to_owned()),
        });
        let garbage = start(|_| (200, "{\"result\": ".to_owned()));
        let (tx, rx) = unbounded();
        let cfg = fast(vec![
            fake_btcd(&no_chain),
            fake_btcd(&bad_template),
            fake_btcd(&garbage),
        ]);
        let generator = Generator::start(cfg, tx).unwrap();
        assert!(matches!(next_event(&rx), GenEvent::NoServers));
        // Still probing, still alive, and no second NoServers for the same outage.
        assert!(rx.recv_timeout(Duration::from_millis(400)).is_err());
        generator.request_update();
        assert!(rx.recv_timeout(Duration::from_millis(200)).is_err());
        generator.shutdown();
    }

    #[test]
    fn fails_over_in_rank_order_and_back_once_caught_up() {
        use fake_node::{ok, rpc_error, start, template};
        use serde_json::json;
        use std::sync::atomic::{AtomicU64, Ordering};
        // Server 0's height; 0 = still loading.
        let height0 = Arc::new(AtomicU64::new(0));
        let h0 = Arc::clone(&height0);
        let first = start(move |m| match (m, h0.load(Ordering::SeqCst)) {
            (_, 0) => rpc_error(-28, "Loading block index..."),
            ("getblockchaininfo", _) => ok(json!({"chain": "regtest"})),
            ("getbestblockhash", _) => ok(json!(PREV_A)),
            ("getblocktemplate", h) => ok(template(h, PREV_A)),
            _ => rpc_error(-32601, "Method not found"),
        });
        let second = start(|m| match m {
            "getblockchaininfo" => ok(json!({"chain": "regtest"})),
            "getbestblockhash" => ok(json!(PREV_B)),
            "getblocktemplate" => ok(template(10, PREV_B)),
            _ => rpc_error(-32601, "Method not found"),
        });
        let (tx, rx) = unbounded();
        let generator =
            Generator::start(fast(vec![fake_btcd(&first), fake_btcd(&second)]), tx).unwrap();
        assert!(matches!(
            next_event(&rx),
            GenEvent::ServerUp { index: 1, .. }
        ));
        match next_event(&rx) {
            GenEvent::Template {
                template,
                new_block,
                server,
            } => {
                assert_eq!((template.height, new_block, server), (10, true, 1));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(generator.active_server(), Some(1));
        assert_eq!(generator.network(), Some(bitcoin::Network::Regtest));

        // Server 0 answers but is behind: no fail-back.
        height0.store(5, Ordering::SeqCst);
        assert!(rx.recv_timeout(Duration::from_millis(500)).is_err());
        // Caught up: fail-back within a few probe periods.
        height0.store(10, Ordering::SeqCst);
        assert!(matches!(
            next_event(&rx),
            GenEvent::ServerUp { index: 0, .. }
        ));
        match next_event(&rx) {
            GenEvent::Template {
                new_block, server, ..
            } => assert_eq!((new_block, server), (true, 0)),
            other => panic!("{other:?}"),
        }
        // Server 0 fails again: straight back to server 1.
        height0.store(0, Ordering::SeqCst);
        assert!(matches!(
            next_event(&rx),
            GenEvent::ServerUp { index: 1, .. }
        ));
        generator.shutdown();
    }

    #[test]
    fn polling_emits_one_new_block_per_tip() {
        use fake_node::{ok, start};
        use parking_lot::Mutex;
        use serde_json::json;
        let tip = Arc::new(Mutex::new(PREV_A.to_owned()));
        let t = Arc::clone(&tip);
        let node = start(move |m| match m {
            "getblockchaininfo" => ok(json!({"chain": "main"})),
            "getbestblockhash" => ok(json!(t.lock().clone())),
            _ => ok(fake_node::template(7, &t.lock())),
        });
        let (tx, rx) = unbounded();
        let generator = Generator::start(fast(vec![fake_btcd(&node)]), tx).unwrap();
        assert!(matches!(
            next_event(&rx),
            GenEvent::ServerUp { index: 0, .. }
        ));
        assert!(matches!(
            next_event(&rx),
            GenEvent::Template {
                new_block: true,
                ..
            }
        ));
        assert_eq!(generator.network(), Some(bitcoin::Network::Bitcoin));
        // Polling an unchanged tip emits nothing.
        assert!(rx.recv_timeout(Duration::from_millis(300)).is_err());
        *tip.lock() = PREV_B.to_owned();
        match next_event(&rx) {
            GenEvent::Template {
                template,
                new_block,
                ..
            } => {
                assert!(new_block);
                assert_eq!(common::template::rpc_hash_hex(&template.prev_hash), PREV_B);
            }
            other => panic!("{other:?}"),
        }
        assert!(rx.recv_timeout(Duration::from_millis(300)).is_err());
        generator.request_update();
        assert!(matches!(
            next_event(&rx),
            GenEvent::Template {
                new_block: false,
                ..
            }
        ));
        generator.shutdown();
    }

    #[test]
    fn submissions_retry_elsewhere_and_read_verdicts() {
        use fake_node::{ok, start};
        use parking_lot::Mutex;
        use serde_json::json;
        const OURS: &str = "00000000000000000000000000000000000000000000000000000000000000cc";
        let common = |m: &str| match m {
            "getblockchaininfo" => Some(ok(json!({"chain": "regtest"}))),
            "getbestblockhash" => Some(ok(json!(PREV_A))),
            "getblocktemplate" => Some(ok(fake_node::template(3, PREV_A))),
            _ => None,
        };
        // Server 0 (active) hangs up on submitblock; server 1 answers as scripted.
        let first = start(move |m| match (common(m), m) {
            (Some(reply), _) => reply,
            (None, "submitblock") => (0, String::new()),
            (None, _) => ok(json!(PREV_A)),
        });
        // (submitblock reply, getblockhash reply)
        let script = Arc::new(Mutex::new((json!(null), json!(PREV_A))));
        let s = Arc::clone(&script);
        let second = start(move |m| match (common(m), m) {
            (Some(reply), _) => reply,
            (None, "submitblock") => ok(s.lock().0.clone()),
            (None, "getblockhash") => ok(s.lock().1.clone()),
            (None, _) => ok(json!(null)),
        });
        let (tx, rx) = unbounded();
        let cfg = GeneratorConfig {
            submit_retries: 2,
            ..fast(vec![fake_btcd(&first), fake_btcd(&second)])
        };
        let generator = Generator::start(cfg, tx).unwrap();
        assert!(matches!(
            next_event(&rx),
            GenEvent::ServerUp { index: 0, .. }
        ));
        let submit = |reply: serde_json::Value, in_chain: &str| {
            *script.lock() = (reply, json!(in_chain));
            generator.submit_block(BlockSubmission {
                hash: OURS.to_owned(),
                height: 3,
                hex: "00".to_owned(),
            });
            loop {
                if let GenEvent::BlockResult {
                    accepted, reason, ..
                } = next_event(&rx)
                {
                    return (accepted, reason);
                }
            }
        };
        // Server 0 hangs up; server 1 takes it.
        assert_eq!(submit(json!(null), PREV_A), (true, None));
        assert_eq!(submit(json!("duplicate"), PREV_A), (true, None));
        // "inconclusive": accepted only if it is at its height in the chain.
        assert_eq!(submit(json!("inconclusive"), OURS), (true, None));
        assert_eq!(
            submit(json!("inconclusive"), PREV_A),
            (false, Some("inconclusive".to_owned()))
        );
        // Refused, unless it got in anyway.
        assert_eq!(
            submit(json!("high-hash"), PREV_A),
            (false, Some("high-hash".to_owned()))
        );
        assert_eq!(submit(json!("high-hash"), OURS), (true, None));
        generator.shutdown();
    }
}
