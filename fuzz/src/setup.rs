//! Building a stratifier to fuzz: a [`Pool`] with one job from a real Core template, one [`Shard`],
//! and a miner that subscribed and authorised. Kept apart from the bodies so that a change of
//! the stratifier's API is adapted here alone.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use common::address::{Network, script_for_address};
use common::template::Template;
use common::{ConnId, Difficulty};
use stratifier::{BlockCandidate, Pool, PoolConfig, RecordingOut, Shard};

/// Real Bitcoin Core output: regtest, height 111, 12 segwit and legacy transactions, nBits
/// `207fffff` (every other hash solves a block, so the block path is reached constantly).
const SEGWIT_TEMPLATE: &str = include_str!("../../testdata/core-regtest-gbt-12tx-segwit.json");

/// The pool's payout address in pool mode.
pub const PAYOUT: &str = "bcrt1qw508d6qejxtdg4y5r3zarvary0c5xw7kygt080";
/// A user that authorises in solo mode (a regtest address) and in pool mode.
pub const SOLO_USER: &str = "mnNghRjeAKbTqkvMYaE6kzkpsfWVdt3TRZ";

/// The parsed template, once per process.
pub fn template() -> Arc<Template> {
    static T: OnceLock<Arc<Template>> = OnceLock::new();
    Arc::clone(T.get_or_init(|| {
        let v: serde_json::Value =
            serde_json::from_str(SEGWIT_TEMPLATE).expect("the shipped template is JSON");
        let v = v.get("result").cloned().unwrap_or(v);
        Arc::new(Template::from_gbt(&v).expect("the shipped template parses"))
    }))
}

/// A peer address for connections.
pub fn peer() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 3333))
}

/// The connection id of harness connection `n`, generation `generation`.
pub fn conn(n: u8, generation: u16) -> ConnId {
    ConnId::new(0, generation, u32::from(n))
}

/// A pool with one shard and the segwit template as its job, on a clock the caller moves.
pub struct Rig {
    /// The shared pool.
    pub pool: Arc<Pool>,
    /// The one shard.
    pub shard: Shard,
    /// What the shard sent.
    pub out: RecordingOut,
    /// The clock.
    pub now: Instant,
    /// Block candidates the pool produced.
    pub blocks: Arc<Mutex<Vec<BlockCandidate>>>,
}

impl Rig {
    /// A pool in pool mode (paying [`PAYOUT`]) or solo mode, at the minimum difficulty.
    pub fn new(solo: bool) -> Self {
        let payout = (!solo).then(|| {
            script_for_address(PAYOUT, Network::Regtest).expect("the payout address is valid")
        });
        let mut cfg = PoolConfig::new(Network::Regtest, payout);
        cfg.solo = solo;
        cfg.mindiff = Difficulty::MIN;
        cfg.startdiff = Difficulty::MIN;
        let blocks = Arc::new(Mutex::new(Vec::new()));
        let pool = Pool::new(cfg, 1, Instant::now());
        let now = Instant::now();
        pool.new_template(template(), now)
            .expect("the shipped template makes a job");
        Self {
            shard: Shard::new(Arc::clone(&pool)),
            pool,
            out: RecordingOut::default(),
            now,
            blocks,
        }
    }

    /// Opens a connection.
    pub fn open(&mut self, c: ConnId) {
        self.shard.on_open(self.now, c, peer(), 0);
    }

    /// Closes a connection.
    pub fn close(&mut self, c: ConnId) {
        self.shard.on_close(self.now, c);
    }

    /// Delivers one line.
    pub fn line(&mut self, c: ConnId, line: &[u8]) {
        self.shard.on_line(self.now, c, line, &mut self.out);
        self.collect_blocks();
    }

    /// Periodic work.
    pub fn tick(&mut self) {
        self.shard.on_tick(self.now, &mut self.out);
        self.collect_blocks();
    }

    /// Moves the block candidates the shard emitted into [`Rig::blocks`].
    fn collect_blocks(&mut self) {
        let found = self.out.take_blocks();
        if !found.is_empty()
            && let Ok(mut v) = self.blocks.lock()
        {
            v.extend(found);
        }
    }

    /// A new template on the same or a new previous block, sent to the shard.
    pub fn new_job(&mut self, new_block: bool, curtime_delta: u32) {
        let mut t = (*template()).clone();
        if new_block {
            t.prev_hash[0] ^= 0xff;
            t.height += 1;
        }
        t.curtime = t.curtime.wrapping_add(curtime_delta);
        if let Ok(job) = self.pool.new_template(Arc::new(t), self.now) {
            self.shard.on_job(&job, &mut self.out);
        }
    }

    /// Gives a connection a new extranonce1.
    pub fn renew_extranonce1(&mut self, c: ConnId) {
        self.shard.renew_extranonce1(self.now, c, &mut self.out);
    }

    /// Number of live sessions.
    pub fn sessions(&self) -> usize {
        self.shard.sessions()
    }

    /// Connected clients as the pool counts them.
    pub fn clients(&self) -> u64 {
        self.pool.stats().clients
    }

    /// Takes everything sent so far, as (connection, bytes).
    pub fn take_sent(&mut self) -> Vec<(ConnId, Vec<u8>)> {
        std::mem::take(&mut self.out.sent)
            .into_iter()
            .map(|(c, bytes)| (c.conn(), bytes))
            .collect()
    }

    /// Takes the connections the shard asked to close.
    pub fn take_closed(&mut self) -> Vec<ConnId> {
        std::mem::take(&mut self.out.closed)
            .into_iter()
            .map(|c| c.conn())
            .collect()
    }

    /// The current job's id as sent to miners, and its ntime.
    pub fn job_id_and_ntime(&self) -> (String, u32) {
        self.pool
            .current_job()
            .map_or_else(|| (String::new(), 0), |j| (j.id_hex.clone(), j.ntime))
    }
}

/// Calls `getblocktemplate` through a [`generator::rpc::RpcClient`] on a loopback HTTP server
/// that answers with `status` and `body`, sent whole or in chunks of `chunk` bytes.
pub fn rpc_call(
    status: u16,
    chunk: Option<usize>,
    body: &[u8],
) -> Result<serde_json::Value, generator::rpc::RpcError> {
    use std::io::{BufRead as _, BufReader, Read as _, Write as _};
    use std::net::TcpListener;
    use std::time::Duration;

    type Reply = Mutex<(u16, Option<usize>, Vec<u8>)>;
    static SERVER: OnceLock<(generator::rpc::RpcClient, Arc<Reply>, Mutex<()>)> = OnceLock::new();
    let (client, reply, one_at_a_time) = SERVER.get_or_init(|| {
        let listener = TcpListener::bind("127.0.0.1:0").expect("a loopback port");
        let addr = listener.local_addr().expect("a bound address");
        let reply: Arc<Reply> = Arc::new(Mutex::new((200, None, Vec::new())));
        let answer = Arc::clone(&reply);
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let mut reader = BufReader::new(&stream);
                let mut length = 0usize;
                let mut line = String::new();
                while reader.read_line(&mut line).is_ok_and(|n| n > 0) {
                    let header = line.to_ascii_lowercase();
                    if let Some(v) = header.strip_prefix("content-length:") {
                        length = v.trim().parse().unwrap_or(0);
                    }
                    if line == "\r\n" {
                        break;
                    }
                    line.clear();
                }
                let mut request = vec![0; length];
                let _ = reader.read_exact(&mut request);
                let (status, chunk, body) = answer.lock().map(|a| a.clone()).unwrap_or_default();
                let mut out = format!("HTTP/1.1 {status} Whatever\r\nConnection: close\r\n");
                match chunk {
                    None => {
                        out.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
                        let mut out = out.into_bytes();
                        out.extend_from_slice(&body);
                        let _ = (&stream).write_all(&out);
                    }
                    Some(size) => {
                        out.push_str("Transfer-Encoding: chunked\r\n\r\n");
                        let mut out = out.into_bytes();
                        for piece in body.chunks(size) {
                            out.extend_from_slice(format!("{:x}\r\n", piece.len()).as_bytes());
                            out.extend_from_slice(piece);
                            out.extend_from_slice(b"\r\n");
                        }
                        out.extend_from_slice(b"0\r\n\r\n");
                        let _ = (&stream).write_all(&out);
                    }
                }
            }
        });
        let client = generator::rpc::RpcClient::new(
            &addr.to_string(),
            generator::rpc::RpcAuth::UserPass {
                user: "fuzz".into(),
                pass: "fuzz".into(),
            },
            Duration::from_secs(5),
        )
        .expect("a loopback url");
        (client, reply, Mutex::new(()))
    });
    let _turn = one_at_a_time.lock();
    if let Ok(mut r) = reply.lock() {
        *r = (status, chunk, body.to_vec());
    }
    client.call(
        "getblocktemplate",
        serde_json::json!([{"rules": ["segwit"]}]),
    )
}
