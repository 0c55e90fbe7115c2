//! A second server cannot silently share a port: the per-thread listeners use SO_REUSEPORT,
//! which would otherwise let another process take half the miners.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    missing_docs,
    reason = "test code"
)]

mod common;

use std::net::SocketAddr;

use ckpool_connector::{BackendKind, Config};
use common::Silent;

fn config(addr: SocketAddr, backend: BackendKind) -> Config {
    Config {
        listen: vec![addr],
        threads: 2,
        backend,
        ..Config::default()
    }
}

#[test]
fn a_second_server_on_the_same_port_is_refused() {
    for backend in [BackendKind::Epoll, BackendKind::Auto] {
        let first =
            ckpool_connector::start(config("127.0.0.1:0".parse().unwrap(), backend), |_| Silent)
                .unwrap();
        let addr = first.local_addrs()[0];
        let second = ckpool_connector::start(config(addr, backend), |_| Silent);
        let err = second
            .err()
            .expect("a second server on a used port must fail");
        assert_eq!(err.kind(), std::io::ErrorKind::AddrInUse, "{err}");
        assert!(err.to_string().contains("already in use"), "{err}");
        first.shutdown();
        // Once the first is gone, the port can be used again.
        let again = ckpool_connector::start(config(addr, backend), |_| Silent).unwrap();
        again.shutdown();
    }
}
