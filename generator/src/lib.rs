//! The generator: everything ckpool-rs says to bitcoind.
//!
//! In pool mode a [`Generator`] keeps block templates coming from a prioritised list of bitcoind
//! servers, notices new blocks (ZMQ `hashblock`, `getbestblockhash` polling, or an explicit
//! [`Generator::request_update`]), fails over between servers and back, and submits found blocks.
//! Results come back as [`GenEvent`] messages on a channel; no method ever blocks its caller on
//! the network.
//!
//! Found blocks are the pool's income: each is written to `block_dir` before it is submitted and
//! retried until a node has it (see [`GeneratorConfig::block_dir`]).
//!
//! Threads (joined by [`Generator::shutdown`], which waits at most `shutdown_grace` and a
//! little for them):
//! - `gen-template`: owns one RPC connection per server; fetches templates, polls the tip,
//!   switches servers on failure;
//! - `gen-probe`: every `failover_check`, probes the servers ranked above the active one (or all
//!   of them when none is up) so that a slow or black-holed server never stalls templates;
//! - `gen-submit`: block submission on its own connections, so a found block never waits behind
//!   a template fetch; it retries every block until a node has it;
//! - `gen-blockfile` (when `block_dir` is set): writes and settles block files, so a hung disk
//!   never holds a submission up for long;
//! - `gen-zmq` (when `zmqblock` is set): the ZMQ subscriber on a current-thread tokio runtime.
//!
//! In the proxy and passthrough modes it also holds the links to upstream pools ([`upstream`]):
//! a stratum client per link with failover and fail-back, and ckpool's passthrough/node link,
//! each on threads of its own with plain sockets. It never touches miners' sockets or shares'
//! validation.
#![forbid(unsafe_code)]

mod blockfile;
#[cfg(test)]
mod fake_node;
pub mod rpc;
pub mod stats;
mod submit;
mod template;
pub mod upstream;
mod zmq;

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::template::Template;
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, unbounded};
use parking_lot::Mutex;

use crate::rpc::{RpcAuth, RpcClient, RpcError};
use crate::stats::GenStats;

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
    /// Where solved blocks are kept (the daemon uses `<logdir>/blocks`); `None` keeps them in
    /// memory only.
    ///
    /// Each block is written to `<block_dir>/<height>-<hash>.hex` (the block hex) and fsynced,
    /// file and directory, before its first `submitblock`; a failed write is logged (with the
    /// hex) and the block is submitted anyway. The file stays *pending* until the block is
    /// settled, then is renamed, keeping the hex, with a suffix saying how: `.hex.done` (a node
    /// has it), `.hex.stale` (the best chain moved past its height without it; given up) or
    /// `.hex.rejected` (a node refused it). Pending files are submitted again by
    /// [`Generator::start`].
    pub block_dir: Option<PathBuf>,
    /// How long [`Generator::shutdown`] keeps trying to submit queued and pending blocks before
    /// it leaves them pending on disk for the next start.
    pub shutdown_grace: Duration,
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
            block_dir: None,
            shutdown_grace: Duration::from_secs(3),
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
    /// What became of a [`Generator::submit_block`], once settled: a node has it, refused it,
    /// or the chain moved past its height without it. One per block; none for a duplicate, and
    /// none for a block still unsettled at shutdown.
    BlockResult {
        /// Block hash, RPC (reversed hex) order, lower case.
        hash: String,
        /// Block height.
        height: u64,
        /// The block is in a node's best chain (or the node already had it there).
        accepted: bool,
        /// Why not: the node's reject string, `inconclusive` (a node has it outside its best
        /// chain) or `stale: …` (given up).
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
    submissions: Sender<submit::Queued>,
    block_dir: Option<Arc<PathBuf>>,
}

impl BlockSubmitter {
    /// Queues a solved block for submission; the outcome comes back as
    /// [`GenEvent::BlockResult`]. A block whose hash is already pending or already taken by a
    /// node is dropped. Never blocks, except once the generator is shut down: then the block is
    /// written to `block_dir` as pending (for the next start) before this returns.
    pub fn submit(&self, block: BlockSubmission) {
        let queued = submit::Queued {
            block,
            on_disk: false,
        };
        let Err(err) = self.submissions.send(queued) else {
            return;
        };
        let block = err.into_inner().block;
        let (hash, height) = (&block.hash, block.height);
        match self
            .block_dir
            .as_deref()
            .map(|dir| blockfile::write_pending(dir, &block))
        {
            Some(Ok(path)) => tracing::error!(%hash, height, path = %path.display(),
                "generator is shut down; block NOT submitted, left pending on disk for the next start"),
            Some(Err(error)) => tracing::error!(%hash, height, %error, block_hex = %block.hex,
                "generator is shut down and the block file cannot be written; block NOT submitted"),
            None => tracing::error!(%hash, height, block_hex = %block.hex,
                "generator is shut down; block NOT submitted"),
        }
    }
}

/// How long [`Generator::shutdown`] waits for its threads beyond `shutdown_grace`.
const JOIN_MARGIN: Duration = Duration::from_secs(1);

/// The running pool-mode generator. Dropping it stops its threads without waiting for them;
/// [`shutdown`](Self::shutdown) also waits.
#[derive(Debug)]
pub struct Generator {
    commands: Sender<Command>,
    submitter: BlockSubmitter,
    shared: Arc<Shared>,
    /// Dropping this sender tells every thread to stop.
    stop: Option<Sender<()>>,
    grace: Duration,
    /// Each thread holds a clone; the channel disconnects when every thread has ended.
    alive: Option<Sender<()>>,
    ended: Receiver<()>,
    threads: Vec<JoinHandle<()>>,
}

impl Generator {
    /// Checks `cfg` and starts the generator's threads; returns at once (after reading the
    /// pending files in `block_dir`, which are queued for submission again). Events (the first
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
        let stats = Arc::new(GenStats::new());
        // Each thread gets its own clients, hence its own connections.
        let clients = || -> Result<Vec<RpcClient>, GenError> {
            cfg.btcd
                .iter()
                .enumerate()
                .map(|(index, b)| {
                    RpcClient::new(&b.url, auth_of(b), cfg.rpc_timeout)
                        .map(|c| c.with_stats(Arc::clone(&stats)))
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
            stop_deadline: OnceLock::new(),
            stats,
        });
        let (commands, command_rx) = unbounded();
        let (submissions, submission_rx) = unbounded();
        let (stop, stop_rx) = crossbeam_channel::bounded::<()>(0);
        let (alive, ended) = crossbeam_channel::bounded::<()>(0);
        if let Some(dir) = &cfg.block_dir {
            if let Err(error) = std::fs::create_dir_all(dir) {
                tracing::error!(dir = %dir.display(), %error, "CANNOT CREATE THE BLOCK DIRECTORY; found blocks will not be kept on disk");
            }
            match blockfile::scan(dir) {
                Ok(blocks) => {
                    for block in blocks {
                        tracing::warn!(hash = %block.hash, height = block.height,
                            "a block from an earlier run is still pending; submitting it again");
                        let _ = submissions.send(submit::Queued {
                            block,
                            on_disk: true,
                        });
                    }
                }
                Err(error) => tracing::error!(dir = %dir.display(), %error,
                    "CANNOT READ THE BLOCK DIRECTORY; blocks pending from an earlier run are NOT submitted"),
            }
        }
        let mut generator = Self {
            commands: commands.clone(),
            submitter: BlockSubmitter {
                submissions,
                block_dir: cfg.block_dir.clone().map(Arc::new),
            },
            shared: Arc::clone(&shared),
            stop: Some(stop),
            grace: cfg.shutdown_grace,
            alive: Some(alive),
            ended,
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

        let files = match &cfg.block_dir {
            Some(dir) => {
                let (files, thread) = blockfile::Files::new(dir.clone());
                generator.spawn("gen-blockfile", move || thread.run())?;
                Some(files)
            }
            None => None,
        };
        let submitter = submit::Submitter::new(
            submit_clients,
            Arc::clone(&shared),
            events,
            commands.clone(),
            submission_rx,
            stop_rx.clone(),
            files,
            cfg.shutdown_grace,
        );
        generator.spawn("gen-submit", move || submitter.run())?;

        if let Some(endpoint) = cfg.zmqblock.clone() {
            let stop_rx = stop_rx.clone();
            let stats = Arc::clone(&shared.stats);
            generator.spawn("gen-zmq", move || {
                zmq::run(endpoint, commands, stop_rx, &stats);
            })?;
        }
        Ok(generator)
    }

    /// Asks for a fresh template at once (the notifier's or admin `update`, or the pool after it
    /// found a block). Never blocks.
    pub fn request_update(&self) {
        // Fails only when the template thread is gone (shutting down): nothing to do then.
        let _ = self.commands.send(Command::Update);
    }

    /// Queues a solved block for submission, as [`BlockSubmitter::submit`]; the outcome comes
    /// back as [`GenEvent::BlockResult`]. Never blocks.
    pub fn submit_block(&self, block: BlockSubmission) {
        self.submitter.submit(block);
    }

    /// A handle that queues blocks for submission, for the stratifier's side of the daemon. It
    /// holds only the queue, not the generator, so the daemon can still [`shutdown`](Self::shutdown)
    /// the generator (which submits what is queued) while handles are alive.
    pub fn block_submitter(&self) -> BlockSubmitter {
        self.submitter.clone()
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

    /// The generator's figures (RPC and template latency, template age, failovers, ZMQ
    /// announcements, block verdicts), updated as it runs.
    pub fn stats(&self) -> Arc<GenStats> {
        Arc::clone(&self.shared.stats)
    }

    /// Stops every thread and waits for them, at most `shutdown_grace` plus a second. Blocks
    /// queued or pending are still submitted until `shutdown_grace` has passed; those no node
    /// has confirmed by then stay pending in `block_dir` for the next start. A thread still
    /// stuck after that (in an RPC call to a hung node) is left to end by itself.
    pub fn shutdown(mut self) {
        let deadline = self.begin_stop();
        self.alive.take();
        let all_ended = matches!(
            self.ended.recv_deadline(deadline + JOIN_MARGIN),
            Err(RecvTimeoutError::Disconnected)
        );
        for handle in self.threads.drain(..) {
            let name = handle.thread().name().unwrap_or("generator").to_owned();
            if all_ended || handle.is_finished() {
                if handle.join().is_err() {
                    tracing::error!(thread = name, "a generator thread panicked");
                }
            } else {
                tracing::warn!(
                    thread = name,
                    "generator thread still busy after the shutdown grace (a hung bitcoind?); not waiting for it"
                );
            }
        }
    }

    /// Sets the shutdown deadline (now plus the grace) and closes the stop channel; returns the
    /// deadline.
    fn begin_stop(&mut self) -> Instant {
        let grace = self.grace;
        let deadline = *self
            .shared
            .stop_deadline
            .get_or_init(|| Instant::now() + grace);
        self.stop.take();
        deadline
    }

    fn spawn(&mut self, name: &str, body: impl FnOnce() + Send + 'static) -> Result<(), GenError> {
        let alive = self.alive.clone();
        let handle = std::thread::Builder::new()
            .name(name.to_owned())
            .spawn(move || {
                let _alive = alive;
                body();
            })
            .map_err(GenError::Spawn)?;
        self.threads.push(handle);
        Ok(())
    }
}

impl Drop for Generator {
    fn drop(&mut self) {
        // Threads see the stop channel close and end by themselves (the submitter after the
        // shutdown grace at most).
        self.begin_stop();
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
    /// When stopping threads must give up (set once, just before the stop channel closes).
    stop_deadline: OnceLock<Instant>,
    /// The figures for the metrics endpoint.
    stats: Arc<GenStats>,
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
    use std::sync::atomic::Ordering;

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
        // The first server up is no failover; its template is current and was timed.
        let stats = generator.stats();
        assert_eq!(stats.failovers(), 0);
        assert!(stats.template_age().is_some());
        assert!(stats.template_fetch().snapshot().count >= 1);

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
        // Fail-back to 0, then over to 1 again.
        assert_eq!(stats.failovers(), 2);
        let gbt = stats
            .rpc()
            .find(|(m, _)| *m == "getblocktemplate")
            .map(|(_, h)| h.snapshot().count);
        assert!(gbt.is_some_and(|n| n >= 2), "{gbt:?}");
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
        let generator =
            Generator::start(fast(vec![fake_btcd(&first), fake_btcd(&second)]), tx).unwrap();
        assert!(matches!(
            next_event(&rx),
            GenEvent::ServerUp { index: 0, .. }
        ));
        let mut n = 0u8;
        let mut submit = |reply: serde_json::Value, in_chain: bool| {
            // A new hash each time: a hash already taken is not submitted again.
            n += 1;
            let ours = format!("{:064x}", 0xc0 + u32::from(n));
            let at_height = if in_chain {
                ours.clone()
            } else {
                PREV_A.to_owned()
            };
            *script.lock() = (reply, json!(at_height));
            generator.submit_block(BlockSubmission {
                hash: ours.clone(),
                height: 3,
                hex: "00".to_owned(),
            });
            loop {
                if let GenEvent::BlockResult {
                    hash,
                    accepted,
                    reason,
                    ..
                } = next_event(&rx)
                {
                    assert_eq!(hash, ours);
                    return (accepted, reason);
                }
            }
        };
        // Server 0 hangs up; server 1 takes it.
        assert_eq!(submit(json!(null), false), (true, None));
        assert_eq!(submit(json!("duplicate"), false), (true, None));
        // "inconclusive": accepted only if it is at its height in the chain.
        assert_eq!(submit(json!("inconclusive"), true), (true, None));
        assert_eq!(
            submit(json!("inconclusive"), false),
            (false, Some("inconclusive".to_owned()))
        );
        // Refused, unless it got in anyway.
        assert_eq!(
            submit(json!("high-hash"), false),
            (false, Some("high-hash".to_owned()))
        );
        assert_eq!(submit(json!("high-hash"), true), (true, None));
        generator.shutdown();
    }

    /// A scratch directory for block files, removed first.
    fn block_dir(test: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("ckpool-rs-gen-{test}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    fn files_in(dir: &std::path::Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        names
    }

    fn block_result(rx: &crossbeam_channel::Receiver<GenEvent>) -> (String, bool, Option<String>) {
        loop {
            if let GenEvent::BlockResult {
                hash,
                accepted,
                reason,
                ..
            } = next_event(rx)
            {
                return (hash, accepted, reason);
            }
        }
    }

    /// A node whose `submitblock` hangs up until `up` is set, then accepts; counts the
    /// `submitblock` calls it answered.
    fn flaky_node(
        up: Arc<std::sync::atomic::AtomicBool>,
        answered: Arc<std::sync::atomic::AtomicU32>,
    ) -> String {
        use fake_node::{ok, rpc_error, start};
        use serde_json::json;
        start(move |m| match m {
            "getblockchaininfo" => ok(json!({"chain": "regtest"})),
            "getbestblockhash" => ok(json!(PREV_A)),
            "getblocktemplate" => ok(fake_node::template(3, PREV_A)),
            "getblockcount" => ok(json!(2)),
            "getblockheader" => rpc_error(-5, "Block not found"),
            "submitblock" if up.load(Ordering::SeqCst) => {
                answered.fetch_add(1, Ordering::SeqCst);
                ok(json!(null))
            }
            "submitblock" => (0, String::new()),
            _ => ok(json!(null)),
        })
    }

    #[test]
    fn blocks_are_retried_until_taken_and_submitted_once() {
        let up = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let answered = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let node = flaky_node(Arc::clone(&up), Arc::clone(&answered));
        let dir = block_dir("retry");
        let (tx, rx) = unbounded();
        let cfg = GeneratorConfig {
            block_dir: Some(dir.clone()),
            ..fast(vec![fake_btcd(&node)])
        };
        let generator = Generator::start(cfg, tx).unwrap();
        let submitter = generator.block_submitter();
        let hash = "ab".repeat(32);
        let block = BlockSubmission {
            hash: hash.clone(),
            height: 3,
            hex: "0011".to_owned(),
        };
        submitter.submit(block.clone());
        // On disk while the node refuses the connection; a replay meanwhile is dropped.
        let pending = dir.join(format!("3-{hash}.hex"));
        let end = std::time::Instant::now() + Duration::from_secs(10);
        while !pending.exists() {
            assert!(std::time::Instant::now() < end, "no pending file");
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(std::fs::read_to_string(&pending).unwrap(), "0011");
        submitter.submit(block.clone());
        generator.submit_block(BlockSubmission {
            hash: hash.to_ascii_uppercase(),
            ..block.clone()
        });
        up.store(true, Ordering::SeqCst);
        assert_eq!(block_result(&rx), (hash.clone(), true, None));
        // Replays after it was taken are dropped too: the next result is for another block.
        submitter.submit(block.clone());
        let other = "cd".repeat(32);
        submitter.submit(BlockSubmission {
            hash: other.clone(),
            ..block.clone()
        });
        assert_eq!(block_result(&rx), (other.clone(), true, None));
        assert_eq!(
            answered.load(Ordering::SeqCst),
            2,
            "one submitblock per block"
        );
        generator.shutdown();
        assert_eq!(
            files_in(&dir),
            vec![format!("3-{hash}.hex.done"), format!("3-{other}.hex.done")]
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_broken_block_dir_does_not_stop_submission() {
        let up = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let answered = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let node = flaky_node(up, Arc::clone(&answered));
        let dir = block_dir("broken");
        std::fs::create_dir_all(&dir).unwrap();
        // A regular file where the block directory should be.
        let not_a_dir = dir.join("blocks");
        std::fs::write(&not_a_dir, "").unwrap();
        let (tx, rx) = unbounded();
        let cfg = GeneratorConfig {
            block_dir: Some(not_a_dir),
            ..fast(vec![fake_btcd(&node)])
        };
        let generator = Generator::start(cfg, tx).unwrap();
        let hash = "ef".repeat(32);
        generator.submit_block(BlockSubmission {
            hash: hash.clone(),
            height: 3,
            hex: "00".to_owned(),
        });
        assert_eq!(block_result(&rx), (hash, true, None));
        assert_eq!(answered.load(Ordering::SeqCst), 1);
        generator.shutdown();
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn stale_and_refused_blocks_are_settled_on_disk() {
        use fake_node::{ok, rpc_error, start};
        use serde_json::json;
        const OURS_STALE: &str = "00000000000000000000000000000000000000000000000000000000000000d1";
        const OURS_BAD: &str = "00000000000000000000000000000000000000000000000000000000000000d2";
        // Never takes a block (hangs up); its chain is at height 5 with another block at 4.
        let node = start(move |m| match m {
            "getblockchaininfo" => ok(json!({"chain": "regtest"})),
            "getbestblockhash" => ok(json!(PREV_A)),
            "getblocktemplate" => ok(fake_node::template(6, PREV_A)),
            "getblockheader" => rpc_error(-5, "Block not found"),
            "getblockcount" => ok(json!(5)),
            "getblockhash" => ok(json!(PREV_B)),
            _ => (0, String::new()),
        });
        // Refuses every block.
        let refusing = start(move |m| match m {
            "submitblock" => ok(json!("bad-txnmrklroot")),
            "getblockhash" => ok(json!(PREV_B)),
            _ => (0, String::new()),
        });
        let dir = block_dir("settled");
        let (tx, rx) = unbounded();
        let generator = Generator::start(
            GeneratorConfig {
                block_dir: Some(dir.clone()),
                ..fast(vec![fake_btcd(&node)])
            },
            tx,
        )
        .unwrap();
        generator.submit_block(BlockSubmission {
            hash: OURS_STALE.to_owned(),
            height: 4,
            hex: "aa".to_owned(),
        });
        let (hash, accepted, reason) = block_result(&rx);
        assert_eq!((hash.as_str(), accepted), (OURS_STALE, false));
        assert!(reason.unwrap().starts_with("stale"));
        generator.shutdown();

        let (tx, rx) = unbounded();
        let generator = Generator::start(
            GeneratorConfig {
                block_dir: Some(dir.clone()),
                ..fast(vec![fake_btcd(&refusing)])
            },
            tx,
        )
        .unwrap();
        generator.submit_block(BlockSubmission {
            hash: OURS_BAD.to_owned(),
            height: 4,
            hex: "bb".to_owned(),
        });
        assert_eq!(
            block_result(&rx),
            (
                OURS_BAD.to_owned(),
                false,
                Some("bad-txnmrklroot".to_owned())
            )
        );
        generator.shutdown();
        assert_eq!(
            files_in(&dir),
            vec![
                format!("4-{OURS_STALE}.hex.stale"),
                format!("4-{OURS_BAD}.hex.rejected")
            ]
        );
        assert_eq!(
            std::fs::read_to_string(dir.join(format!("4-{OURS_BAD}.hex.rejected"))).unwrap(),
            "bb"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn shutdown_is_bounded_when_every_node_hangs() {
        use fake_node::{ok, start};
        use serde_json::json;
        // Templates work; submitblock and every look-up hang far longer than the grace.
        let node = start(move |m| match m {
            "getblockchaininfo" => ok(json!({"chain": "regtest"})),
            "getbestblockhash" => ok(json!(PREV_A)),
            "getblocktemplate" => ok(fake_node::template(3, PREV_A)),
            _ => {
                std::thread::sleep(Duration::from_secs(60));
                ok(json!(null))
            }
        });
        let dir = block_dir("hang");
        let (tx, rx) = unbounded();
        let cfg = GeneratorConfig {
            block_dir: Some(dir.clone()),
            rpc_timeout: Duration::from_secs(30),
            shutdown_grace: Duration::from_millis(500),
            ..fast(vec![fake_btcd(&node)])
        };
        let generator = Generator::start(cfg, tx).unwrap();
        assert!(matches!(
            next_event(&rx),
            GenEvent::ServerUp { index: 0, .. }
        ));
        let hash = "12".repeat(32);
        generator.submit_block(BlockSubmission {
            hash: hash.clone(),
            height: 3,
            hex: "00".to_owned(),
        });
        // Its file is written before the submitblock that hangs.
        let pending = dir.join(format!("3-{hash}.hex"));
        let end = std::time::Instant::now() + Duration::from_secs(10);
        while !pending.exists() {
            assert!(std::time::Instant::now() < end, "no pending file");
            std::thread::sleep(Duration::from_millis(10));
        }
        let stopping = std::time::Instant::now();
        generator.shutdown();
        let took = stopping.elapsed();
        assert!(
            took < Duration::from_millis(500) + JOIN_MARGIN + Duration::from_millis(300),
            "{took:?}"
        );
        // Unconfirmed: still pending for the next start.
        assert_eq!(files_in(&dir), vec![format!("3-{hash}.hex")]);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
