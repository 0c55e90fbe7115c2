#![allow(clippy::unwrap_used, clippy::panic, reason = "test code")]
//! Found blocks against a real regtest node: on disk before the node sees them, retried until
//! the node has them, submitted once, resubmitted at start, and submitted at shutdown (skipped
//! without bitcoind, except in CI).

extern crate ckpool_generator as generator;

mod events;
#[path = "../../tests/support/node.rs"]
mod node;

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::coinbase::{CoinbaseSpec, TxOutput};
use events::{expect_event, init_logs, stamped};
use generator::{BlockSubmission, BtcdConfig, GenEvent, Generator, GeneratorConfig};
use node::{NodeOptions, RegtestNode, WAIT, wait_until};
use serde_json::{Value, json};

fn btcd(url: String) -> BtcdConfig {
    BtcdConfig {
        url,
        auth: node::RPC_USER.to_owned(),
        pass: node::RPC_PASS.to_owned(),
        cookie: None,
        notify: false,
    }
}

fn config(url: String, dir: &Path) -> GeneratorConfig {
    GeneratorConfig {
        btcd: vec![btcd(url)],
        block_dir: Some(dir.to_path_buf()),
        ..GeneratorConfig::default()
    }
}

/// A fresh, empty block directory.
fn block_dir(test: &str) -> PathBuf {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let dir = std::env::temp_dir().join(format!(
        "ckpool-rs-blocks-{test}-{}-{nanos}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn files_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    names
}

fn file_of(block: &BlockSubmission) -> String {
    format!("{}-{}.hex", block.height, block.hash)
}

/// A valid block on `node`'s tip that no node has seen: a coinbase-only block whose coinbase
/// carries `tag`, with the nonce ground until the header meets regtest's target (half of all
/// hashes do).
fn solve_block(node: &RegtestNode, tag: &[u8]) -> BlockSubmission {
    let tip = node.rpc("getbestblockhash", json!([]));
    let tip = tip.as_str().unwrap();
    let header = node.rpc("getblockheader", json!([tip]));
    let height = header["height"].as_u64().unwrap() + 1;
    let bits = u32::from_str_radix(header["bits"].as_str().unwrap(), 16).unwrap();
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let time = u32::try_from(now.max(header["time"].as_u64().unwrap() + 1)).unwrap();
    let outputs = [TxOutput {
        value: 100_000_000,
        script: vec![0x51],
    }];
    let cb = common::coinbase::build(&CoinbaseSpec {
        height,
        flags: &[],
        extra: tag,
        nonce1_len: 0,
        nonce2_len: 0,
        tag: b"ckpool-rs test",
        btcsig: &[],
        outputs: &outputs,
        witness_commitment: None,
    })
    .unwrap();
    let coinbase = [cb.coinb1, cb.coinb2].concat();
    let merkle_root = common::hash::sha256d(&coinbase);
    let prev = common::template::parse_rpc_hash(tip).unwrap();
    for nonce in 0u32.. {
        let header = common::block::header(0x2000_0000, &prev, &merkle_root, time, bits, nonce);
        let hash = common::hash::sha256d_header(&header);
        // Below 0x7f00…: under regtest's target (0x7fffff << 232) whatever the rest.
        if hash[31] < 0x7f {
            return BlockSubmission {
                hash: common::template::rpc_hash_hex(&hash),
                height,
                hex: hex::encode(common::block::assemble(&header, &coinbase, false, &[])),
            };
        }
    }
    unreachable!("no nonce solves a regtest block")
}

/// Whether `node` knows `hash`.
fn knows(node: &RegtestNode, hash: &str) -> bool {
    node.try_rpc("getblockheader", json!([hash])).is_ok()
}

/// The next `BlockResult`: `(hash, accepted, reason)`.
fn block_result(
    rx: &crossbeam_channel::Receiver<(Instant, GenEvent)>,
) -> (String, bool, Option<String>) {
    let (_, ev) = expect_event(rx, WAIT, "BlockResult", |e| {
        matches!(e, GenEvent::BlockResult { .. })
    });
    let GenEvent::BlockResult {
        hash,
        accepted,
        reason,
        ..
    } = ev
    else {
        unreachable!()
    };
    (hash, accepted, reason)
}

/// What an HTTP proxy in front of a node saw of each `submitblock`: the pending files in the
/// block directory that held the submitted hex at the moment it was forwarded.
#[derive(Debug, Clone, PartialEq, Eq)]
struct SubmitSeen {
    on_disk: Vec<String>,
}

/// A keep-alive HTTP/1.1 proxy to bitcoind's RPC port that records each `submitblock`.
struct Proxy {
    addr: String,
    submits: Arc<Mutex<Vec<SubmitSeen>>>,
}

impl Proxy {
    fn start(upstream: String, dir: PathBuf) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let submits = Arc::new(Mutex::new(Vec::new()));
        let seen = Arc::clone(&submits);
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { return };
                let (upstream, dir, seen) = (upstream.clone(), dir.clone(), Arc::clone(&seen));
                std::thread::spawn(move || {
                    let _ = relay(client, &upstream, &dir, &seen);
                });
            }
        });
        Self { addr, submits }
    }

    fn submits(&self) -> Vec<SubmitSeen> {
        self.submits.lock().unwrap().clone()
    }
}

/// Reads one HTTP message (head and `Content-Length` body) as raw bytes, and its body.
fn read_message(reader: &mut impl BufRead) -> std::io::Result<(Vec<u8>, Vec<u8>)> {
    let mut head = Vec::new();
    let mut length = 0usize;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        head.extend_from_slice(line.as_bytes());
        let trimmed = line.trim_end();
        if trimmed.is_empty() {
            break;
        }
        if let Some((name, value)) = trimmed.split_once(':')
            && name.eq_ignore_ascii_case("content-length")
        {
            length = value.trim().parse().unwrap_or(0);
        }
    }
    let mut body = vec![0u8; length];
    reader.read_exact(&mut body)?;
    Ok((head, body))
}

fn relay(
    client: TcpStream,
    upstream: &str,
    dir: &Path,
    seen: &Mutex<Vec<SubmitSeen>>,
) -> std::io::Result<()> {
    let mut to_client = client.try_clone()?;
    let mut from_client = BufReader::new(client);
    let node = TcpStream::connect(upstream)?;
    let mut to_node = node.try_clone()?;
    let mut from_node = BufReader::new(node);
    loop {
        let (head, body) = read_message(&mut from_client)?;
        let request: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        if request["method"] == "submitblock" {
            let hex = request["params"][0].as_str().unwrap_or_default();
            let on_disk = std::fs::read_dir(dir)
                .map(|entries| {
                    let mut names: Vec<String> = entries
                        .filter_map(Result::ok)
                        .map(|e| e.file_name().into_string().unwrap())
                        .filter(|name| name.ends_with(".hex"))
                        .filter(|name| {
                            std::fs::read_to_string(dir.join(name)).is_ok_and(|t| t == hex)
                        })
                        .collect();
                    names.sort();
                    names
                })
                .unwrap_or_default();
            seen.lock().unwrap().push(SubmitSeen { on_disk });
        }
        to_node.write_all(&head)?;
        to_node.write_all(&body)?;
        let (head, body) = read_message(&mut from_node)?;
        to_client.write_all(&head)?;
        to_client.write_all(&body)?;
    }
}

#[test]
fn blocks_are_on_disk_first_and_submitted_once() {
    let Some(exe) = node::bitcoind_or_skip("blocks_are_on_disk_first_and_submitted_once") else {
        return;
    };
    init_logs();
    let node = RegtestNode::start(&exe, NodeOptions::default());
    let dir = block_dir("first");
    let proxy = Proxy::start(node.rpc_url().replace("http://", ""), dir.clone());
    let (tx, rx) = stamped();
    let generator = Generator::start(config(proxy.addr.clone(), &dir), tx).unwrap();
    let submitter = generator.block_submitter();

    let first = solve_block(&node, b"first");
    generator.submit_block(first.clone());
    // Replays of the block-solving share, while it is pending or being submitted.
    submitter.submit(first.clone());
    generator.submit_block(first.clone());
    assert_eq!(block_result(&rx), (first.hash.clone(), true, None));
    assert!(knows(&node, &first.hash));
    // The file was complete on disk when the node got the block, and is now done.
    assert_eq!(
        proxy.submits(),
        vec![SubmitSeen {
            on_disk: vec![file_of(&first)]
        }]
    );
    assert_eq!(files_in(&dir), vec![format!("{}.done", file_of(&first))]);
    assert_eq!(
        std::fs::read_to_string(dir.join(format!("{}.done", file_of(&first)))).unwrap(),
        first.hex
    );

    // A replay after the node took it is dropped too. The next result is the next block's, and
    // the node saw one submitblock for each block.
    submitter.submit(first.clone());
    let second = solve_block(&node, b"second");
    submitter.submit(second.clone());
    assert_eq!(block_result(&rx), (second.hash.clone(), true, None));
    assert_eq!(
        proxy.submits(),
        vec![
            SubmitSeen {
                on_disk: vec![file_of(&first)]
            },
            SubmitSeen {
                on_disk: vec![file_of(&second)]
            }
        ]
    );
    assert_eq!(
        node.rpc("getbestblockhash", json!([])).as_str(),
        Some(second.hash.as_str())
    );
    generator.shutdown();
    assert_eq!(
        files_in(&dir),
        vec![
            format!("{}.done", file_of(&first)),
            format!("{}.done", file_of(&second))
        ]
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_pending_block_reaches_the_node_once_it_is_back() {
    let Some(exe) = node::bitcoind_or_skip("a_pending_block_reaches_the_node_once_it_is_back")
    else {
        return;
    };
    init_logs();
    let mut node = RegtestNode::start(&exe, NodeOptions::default());
    let block = solve_block(&node, b"retried");
    node.stop();
    let dir = block_dir("retried");
    // Server 0 never answers (nothing listens on its port): every attempt goes on to server 1.
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .to_string();
    let cfg = GeneratorConfig {
        btcd: vec![btcd(dead), btcd(node.rpc_url())],
        ..config(node.rpc_url(), &dir)
    };
    let (tx, rx) = stamped();
    let generator = Generator::start(cfg, tx).unwrap();
    generator.submit_block(block.clone());
    let pending = dir.join(file_of(&block));
    wait_until("the pending block file", WAIT, || pending.exists());
    // Attempts fail while the node is down (it is down from the first one on).
    node.start_again();
    assert_eq!(block_result(&rx), (block.hash.clone(), true, None));
    assert!(knows(&node, &block.hash));
    generator.shutdown();
    assert_eq!(files_in(&dir), vec![format!("{}.done", file_of(&block))]);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn shutdown_submits_a_queued_block() {
    let Some(exe) = node::bitcoind_or_skip("shutdown_submits_a_queued_block") else {
        return;
    };
    init_logs();
    let node = RegtestNode::start(&exe, NodeOptions::default());
    let dir = block_dir("shutdown");
    let (tx, rx) = stamped();
    let generator = Generator::start(config(node.rpc_url(), &dir), tx).unwrap();
    let block = solve_block(&node, b"at shutdown");
    generator.submit_block(block.clone());
    let stopping = Instant::now();
    generator.shutdown();
    let took = stopping.elapsed();
    assert!(took < Duration::from_secs(4), "shutdown took {took:?}");
    assert!(
        knows(&node, &block.hash),
        "the queued block was not submitted"
    );
    assert_eq!(block_result(&rx), (block.hash.clone(), true, None));
    assert_eq!(files_in(&dir), vec![format!("{}.done", file_of(&block))]);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn unconfirmed_blocks_stay_pending_and_are_submitted_at_the_next_start() {
    let Some(exe) = node::bitcoind_or_skip(
        "unconfirmed_blocks_stay_pending_and_are_submitted_at_the_next_start",
    ) else {
        return;
    };
    init_logs();
    let mut node = RegtestNode::start(&exe, NodeOptions::default());
    let block = solve_block(&node, b"next start");
    // A sibling whose file is already settled: it must not be submitted again.
    let settled = solve_block(&node, b"settled sibling");
    assert_ne!(block.hash, settled.hash);
    node.stop();

    let dir = block_dir("restart");
    std::fs::create_dir_all(&dir).unwrap();
    let settled_file = dir.join(format!("{}.done", file_of(&settled)));
    std::fs::write(&settled_file, &settled.hex).unwrap();
    let grace = Duration::from_secs(1);
    let cfg = GeneratorConfig {
        shutdown_grace: grace,
        ..config(node.rpc_url(), &dir)
    };
    let (tx, rx) = stamped();
    let generator = Generator::start(cfg.clone(), tx).unwrap();
    generator.submit_block(block.clone());
    let pending = dir.join(file_of(&block));
    wait_until("the pending block file", WAIT, || pending.exists());
    let stopping = Instant::now();
    generator.shutdown();
    let took = stopping.elapsed();
    assert!(
        took < grace + Duration::from_millis(1500),
        "shutdown took {took:?}"
    );
    // No node confirmed it: still pending, with its hex; no result was reported.
    assert_eq!(std::fs::read_to_string(&pending).unwrap(), block.hex);
    assert!(
        rx.try_iter()
            .all(|(_, e)| !matches!(e, GenEvent::BlockResult { .. }))
    );

    node.start_again();
    let (tx, rx) = stamped();
    let generator = Generator::start(cfg, tx).unwrap();
    assert_eq!(block_result(&rx), (block.hash.clone(), true, None));
    assert!(knows(&node, &block.hash));
    // Shutdown would submit anything else queued at start: the settled sibling was not.
    generator.shutdown();
    assert!(
        !knows(&node, &settled.hash),
        "a settled block was submitted again"
    );
    assert!(
        rx.try_iter()
            .all(|(_, e)| !matches!(e, GenEvent::BlockResult { .. }))
    );
    let mut expect = vec![
        format!("{}.done", file_of(&block)),
        format!("{}.done", file_of(&settled)),
    ];
    expect.sort();
    assert_eq!(files_in(&dir), expect);
    std::fs::remove_dir_all(&dir).unwrap();
}
