#![allow(clippy::unwrap_used, clippy::panic, reason = "test code")]
//! Failover between real regtest nodes and back (skipped without bitcoind, except in CI).

extern crate ckpool_generator as generator;

mod events;
#[path = "../../tests/support/node.rs"]
mod node;

use std::time::{Duration, Instant};

use events::{expect_event, init_logs, stamped};
use generator::{BtcdConfig, GenEvent, Generator, GeneratorConfig};
use node::{RegtestNet, RegtestNode};

fn btcd(node: &RegtestNode) -> BtcdConfig {
    BtcdConfig {
        url: node.rpc_url(),
        auth: node.rpc_user().to_owned(),
        pass: node.rpc_pass().to_owned(),
        cookie: None,
        notify: false,
    }
}

#[test]
fn fails_over_and_back() {
    let Some(exe) = node::bitcoind_or_skip("fails_over_and_back") else {
        return;
    };
    init_logs();
    let mut net = RegtestNet::start(&exe, 3);
    let cfg = GeneratorConfig {
        btcd: vec![btcd(&net.nodes[0]), btcd(&net.nodes[1])],
        zmqblock: net.nodes[0].zmq_endpoint(),
        ..GeneratorConfig::default()
    };
    // Events are stamped as they arrive: the test is busy stopping nodes meanwhile.
    let (tx, rx) = stamped();
    let generator = Generator::start(cfg, tx).unwrap();
    let (_, ev) = expect_event(&rx, Duration::from_secs(10), "ServerUp", |e| {
        matches!(e, GenEvent::ServerUp { .. })
    });
    assert!(matches!(ev, GenEvent::ServerUp { index: 0, .. }), "{ev:?}");
    expect_event(&rx, Duration::from_secs(10), "first template", |e| {
        matches!(e, GenEvent::Template { server: 0, .. })
    });

    // Node 0 dies: templates move to node 1.
    let stop_requested = Instant::now();
    net.nodes[0].stop();
    let exited = Instant::now();
    let (at, _) = expect_event(&rx, Duration::from_secs(10), "ServerUp{1}", |e| {
        matches!(e, GenEvent::ServerUp { index: 1, .. })
    });
    let failover = at.saturating_duration_since(stop_requested);
    let vs_exit = if at >= exited {
        format!("{:?} after", at - exited)
    } else {
        format!("{:?} before", exited - at)
    };
    println!(
        "failover: ServerUp{{1}} {failover:?} after the stop request ({vs_exit} the process exited, \
         {:?} after the request)",
        exited - stop_requested
    );
    expect_event(&rx, Duration::from_secs(5), "template from node 1", |e| {
        matches!(e, GenEvent::Template { server: 1, .. })
    });
    assert_eq!(generator.active_server(), Some(1));
    assert!(
        failover < Duration::from_secs(2),
        "failover took {failover:?}"
    );

    // Blocks found meanwhile reach the pool through node 1 (polled every 100 ms).
    let hash = net.nodes[1].generate(1).remove(0);
    let (_, ev) = expect_event(&rx, Duration::from_secs(5), "new block via node 1", |e| {
        matches!(
            e,
            GenEvent::Template {
                new_block: true,
                ..
            }
        )
    });
    let GenEvent::Template { template, .. } = ev else {
        unreachable!()
    };
    assert_eq!(common::template::rpc_hash_hex(&template.prev_hash), hash);

    // Node 0 is back; start_again returns once it has a peer and the tip, i.e. is usable.
    let restarting = Instant::now();
    net.start_again(0);
    let ready = Instant::now();
    let (at, _) = expect_event(&rx, Duration::from_secs(10), "ServerUp{0}", |e| {
        matches!(e, GenEvent::ServerUp { index: 0, .. })
    });
    let failback = at.saturating_duration_since(ready);
    println!(
        "fail-back: ServerUp{{0}} {failback:?} after node 0 was usable again (peer + tip; \
         restart took {:?})",
        ready - restarting
    );
    assert!(
        failback < Duration::from_secs(2),
        "fail-back took {failback:?}"
    );
    expect_event(&rx, Duration::from_secs(5), "template from node 0", |e| {
        matches!(e, GenEvent::Template { server: 0, .. })
    });
    assert_eq!(generator.active_server(), Some(0));

    // ZMQ on node 0 reconnected: a block there is announced although node 0 is also polled;
    // either way exactly one new-block template comes for it.
    net.sync_heights(1);
    let hash = net.nodes[0].generate(1).remove(0);
    let (_, ev) = expect_event(&rx, Duration::from_secs(5), "new block via node 0", |e| {
        matches!(
            e,
            GenEvent::Template {
                new_block: true,
                ..
            }
        )
    });
    let GenEvent::Template { template, .. } = ev else {
        unreachable!()
    };
    assert_eq!(common::template::rpc_hash_hex(&template.prev_hash), hash);

    // Both down: NoServers.
    let down = Instant::now();
    net.nodes[0].stop();
    net.nodes[1].stop();
    let (at, _) = expect_event(&rx, Duration::from_secs(10), "NoServers", |e| {
        matches!(e, GenEvent::NoServers)
    });
    println!(
        "NoServers {:?} after the stops began",
        at.saturating_duration_since(down)
    );
    assert_eq!(generator.active_server(), None);

    generator.shutdown();
}
