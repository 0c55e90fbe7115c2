#![allow(clippy::unwrap_used, clippy::panic, reason = "test code")]
//! The RPC client and the generator against real regtest nodes (skipped without bitcoind,
//! except in CI).

extern crate ckpool_generator as generator;

mod events;
#[path = "../../tests/support/node.rs"]
mod node;

use std::time::{Duration, Instant};

use events::{expect_event, init_logs, is_template, stamped};
use generator::rpc::{RpcAuth, RpcClient, RpcError};
use generator::{BlockSubmission, BtcdConfig, GenEvent, Generator, GeneratorConfig};
use node::{NodeOptions, RegtestNet, RegtestNode};
use serde_json::json;

fn user_pass(node: &RegtestNode) -> RpcAuth {
    RpcAuth::UserPass {
        user: node.rpc_user().to_owned(),
        pass: node.rpc_pass().to_owned(),
    }
}

#[test]
fn rpc_client_calls_and_errors() {
    let Some(exe) = node::bitcoind_or_skip("rpc_client_calls_and_errors") else {
        return;
    };
    init_logs();
    let node = RegtestNode::start(&exe, NodeOptions::default());
    let client =
        RpcClient::new(&node.rpc_url(), user_pass(&node), Duration::from_secs(10)).unwrap();

    let info = client.call("getblockchaininfo", json!([])).unwrap();
    assert_eq!(info["chain"], "regtest");
    assert_eq!(client.call("getblockcount", json!([])).unwrap(), json!(0));
    // Keep-alive: many calls on one client work back to back.
    for _ in 0..20 {
        client.call("getbestblockhash", json!([])).unwrap();
    }
    // "host:port" without a scheme works too.
    let bare = node.rpc_url().replace("http://", "");
    let client2 = RpcClient::new(&bare, user_pass(&node), Duration::from_secs(10)).unwrap();
    assert_eq!(client2.call("getblockcount", json!([])).unwrap(), json!(0));

    match client.call("nosuchmethod", json!([])) {
        Err(RpcError::Rpc { code, message }) => {
            assert_eq!(code, -32601, "{message}");
        }
        other => panic!("expected an RPC error, got {other:?}"),
    }
    match client.call("getblockhash", json!([999])) {
        Err(RpcError::Rpc { code, .. }) => assert_eq!(code, -8),
        other => panic!("expected an RPC error, got {other:?}"),
    }

    let wrong = RpcClient::new(
        &node.rpc_url(),
        RpcAuth::UserPass {
            user: "nobody".into(),
            pass: "wrong".into(),
        },
        Duration::from_secs(10),
    )
    .unwrap();
    match wrong.call("getblockcount", json!([])) {
        Err(RpcError::Http { status, .. }) => assert_eq!(status, 401),
        other => panic!("expected HTTP 401, got {other:?}"),
    }

    let addr = node.new_address();
    let valid = client.call("validateaddress", json!([addr])).unwrap();
    assert_eq!(valid["isvalid"], true);

    // Nothing listens on a port we just let go of: a transport error, quickly.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dead = RpcClient::new(
        &format!("127.0.0.1:{port}"),
        user_pass(&node),
        Duration::from_secs(10),
    )
    .unwrap();
    let started = Instant::now();
    match dead.call("getblockcount", json!([])) {
        Err(e @ RpcError::Transport(_)) => assert!(e.is_transient()),
        other => panic!("expected a transport error, got {other:?}"),
    }
    assert!(started.elapsed() < Duration::from_secs(3));
}

#[test]
fn cookie_auth_survives_a_restart() {
    let Some(exe) = node::bitcoind_or_skip("cookie_auth_survives_a_restart") else {
        return;
    };
    init_logs();
    let mut node = RegtestNode::start(
        &exe,
        NodeOptions {
            cookie: true,
            ..NodeOptions::default()
        },
    );
    let client = RpcClient::new(
        &node.rpc_url(),
        RpcAuth::Cookie(node.cookie_path()),
        Duration::from_secs(10),
    )
    .unwrap();
    assert_eq!(client.call("getblockcount", json!([])).unwrap(), json!(0));
    let first_cookie = std::fs::read_to_string(node.cookie_path()).unwrap();
    node.stop();
    node.start_again();
    let second_cookie = std::fs::read_to_string(node.cookie_path()).unwrap();
    assert_ne!(
        first_cookie, second_cookie,
        "bitcoind wrote the same cookie twice"
    );
    // The client still holds the old cookie; a 401 makes it read the new one.
    assert_eq!(client.call("getblockcount", json!([])).unwrap(), json!(0));
}

#[test]
fn generator_templates_zmq_and_submission() {
    let Some(exe) = node::bitcoind_or_skip("generator_templates_zmq_and_submission") else {
        return;
    };
    init_logs();
    let net = RegtestNet::start(&exe, 2);
    let n0 = &net.nodes[0];
    let hour = Duration::from_secs(3600);
    // Polling and routine refreshes off: only ZMQ (or request_update) can bring new templates.
    let cfg = GeneratorConfig {
        btcd: vec![BtcdConfig {
            url: n0.rpc_url(),
            auth: n0.rpc_user().to_owned(),
            pass: n0.rpc_pass().to_owned(),
            cookie: None,
            notify: false,
        }],
        blockpoll: hour,
        update_interval: hour,
        failover_check: hour,
        zmqblock: n0.zmq_endpoint(),
        ..GeneratorConfig::default()
    };
    let (tx, rx) = stamped();
    let started = Instant::now();
    let generator = Generator::start(cfg, tx).unwrap();
    assert!(
        started.elapsed() < Duration::from_millis(500),
        "start blocked"
    );

    let (_, up) = expect_event(&rx, Duration::from_secs(10), "ServerUp", |e| {
        matches!(e, GenEvent::ServerUp { .. })
    });
    assert!(matches!(up, GenEvent::ServerUp { index: 0, .. }), "{up:?}");
    let (_, first) = expect_event(&rx, Duration::from_secs(10), "first template", |e| {
        matches!(e, GenEvent::Template { .. })
    });
    let GenEvent::Template {
        template,
        new_block,
        server,
    } = first
    else {
        unreachable!()
    };
    assert!(new_block, "the first template starts new work");
    assert_eq!(server, 0);
    assert_eq!(template.height, 2);
    assert_eq!(generator.chain().as_deref(), Some("regtest"));
    assert_eq!(generator.network(), Some(bitcoin::Network::Regtest));
    assert_eq!(generator.active_server(), Some(0));

    // request_update: a fresh template for the same tip, not a new block.
    generator.request_update();
    let (_, ev) = expect_event(&rx, Duration::from_secs(10), "requested template", |e| {
        matches!(e, GenEvent::Template { .. })
    });
    assert!(is_template(&ev, false), "{ev:?}");

    // The ZMQ subscription may still be joining: mine until one new block is announced.
    let end = Instant::now() + Duration::from_secs(20);
    loop {
        n0.generate(1);
        if let Ok((_, ev)) = rx.recv_timeout(Duration::from_secs(2)) {
            assert!(is_template(&ev, true), "{ev:?}");
            break;
        }
        assert!(Instant::now() < end, "no template after blocks with ZMQ on");
    }
    while rx.try_recv().is_ok() {}

    // Latency from the `generate` call to the new-block template, over a few blocks. The node
    // publishes on ZMQ before it answers the RPC, so the event may come before `generate`
    // returns: measure from the call and report the call's own duration beside it.
    let mut latencies = Vec::new();
    let mut rpc_times = Vec::new();
    for _ in 0..5 {
        let called = Instant::now();
        let hash = n0.generate(1).remove(0);
        rpc_times.push(called.elapsed());
        let (at, ev) = expect_event(&rx, Duration::from_secs(5), "new-block template", |e| {
            matches!(e, GenEvent::Template { .. })
        });
        let GenEvent::Template {
            template,
            new_block,
            ..
        } = ev
        else {
            unreachable!()
        };
        assert!(new_block);
        assert_eq!(common::template::rpc_hash_hex(&template.prev_hash), hash);
        latencies.push(at.saturating_duration_since(called));
        // No second new-block template for the same tip.
        if let Ok((_, extra)) = rx.recv_timeout(Duration::from_millis(200)) {
            assert!(
                !is_template(&extra, true),
                "second new-block template: {extra:?}"
            );
        }
    }
    latencies.sort();
    rpc_times.sort();
    println!(
        "ZMQ new-block latency (generate called -> Template event), 5 blocks: \
         min {:?} median {:?} max {:?}; the generate RPC itself took median {:?}",
        latencies[0], latencies[2], latencies[4], rpc_times[2]
    );
    assert!(
        latencies[2] < Duration::from_secs(1),
        "ZMQ path too slow: {latencies:?}"
    );

    // A garbage block: refused with the node's reason.
    generator.submit_block(BlockSubmission {
        hash: "00".repeat(32),
        height: 99,
        hex: "00".into(),
    });
    let (_, ev) = expect_event(&rx, Duration::from_secs(10), "BlockResult", |e| {
        matches!(e, GenEvent::BlockResult { .. })
    });
    let GenEvent::BlockResult {
        accepted, reason, ..
    } = ev
    else {
        unreachable!()
    };
    assert!(!accepted);
    let reason = reason.unwrap();
    assert!(reason.contains("decode"), "{reason}");
    // A refused block makes the generator fetch a fresh template (the tip may have moved). Wait
    // for it here: it can arrive after the next submission's result, and must not be taken for
    // a template that followed that one.
    let (_, ev) = expect_event(&rx, Duration::from_secs(10), "refresh after refusal", |e| {
        matches!(e, GenEvent::Template { .. })
    });
    assert!(
        matches!(
            ev,
            GenEvent::Template {
                new_block: false,
                ..
            }
        ),
        "the refusal's refresh is for the same tip: {ev:?}"
    );

    // A block the node already has: "duplicate" counts as accepted.
    let height = n0.height();
    let hash = n0.rpc("getblockhash", json!([height]));
    let hex = n0.rpc("getblock", json!([hash, 0]));
    generator.submit_block(BlockSubmission {
        hash: hash.as_str().unwrap().to_owned(),
        height,
        hex: hex.as_str().unwrap().to_owned(),
    });
    let (_, ev) = expect_event(&rx, Duration::from_secs(10), "BlockResult", |e| {
        matches!(e, GenEvent::BlockResult { .. })
    });
    assert!(
        matches!(
            &ev,
            GenEvent::BlockResult {
                accepted: true,
                reason: None,
                ..
            }
        ),
        "{ev:?}"
    );
    // That block is already the tip, so no template follows for it: the next one is for the
    // next block (before, a same-tip template came first, a needless broadcast to every miner).
    let next = n0.generate(1).remove(0);
    let (_, ev) = expect_event(&rx, Duration::from_secs(10), "template after submit", |e| {
        matches!(e, GenEvent::Template { .. })
    });
    let GenEvent::Template {
        template,
        new_block,
        ..
    } = ev
    else {
        unreachable!()
    };
    assert!(
        new_block,
        "a same-tip template followed the accepted submission"
    );
    assert_eq!(common::template::rpc_hash_hex(&template.prev_hash), next);

    let stopping = Instant::now();
    generator.shutdown();
    println!("shutdown took {:?}", stopping.elapsed());
    assert!(stopping.elapsed() < Duration::from_secs(5));
}
