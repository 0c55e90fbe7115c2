//! Helpers for reading generator events in tests.
#![allow(
    dead_code,
    reason = "each test binary uses a different part of this module"
)]

use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, unbounded};
use generator::GenEvent;

/// A generator event channel whose events are stamped with their arrival time by a helper
/// thread, so tests that are busy (stopping a node, waiting on an RPC) still measure latencies
/// exactly. The thread ends when the generator drops its sender.
pub(crate) fn stamped() -> (Sender<GenEvent>, Receiver<(Instant, GenEvent)>) {
    let (tx, raw) = unbounded::<GenEvent>();
    let (stamped_tx, rx) = unbounded();
    std::thread::spawn(move || {
        for ev in raw {
            if stamped_tx.send((Instant::now(), ev)).is_err() {
                break;
            }
        }
    });
    (tx, rx)
}

/// Waits for the first event matching `want` and returns it with its arrival time; panics after
/// `deadline` listing what came instead.
pub(crate) fn expect_event(
    rx: &Receiver<(Instant, GenEvent)>,
    deadline: Duration,
    what: &str,
    mut want: impl FnMut(&GenEvent) -> bool,
) -> (Instant, GenEvent) {
    let end = Instant::now() + deadline;
    let mut seen = Vec::new();
    loop {
        let left = end.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok((at, ev)) if want(&ev) => return (at, ev),
            Ok((_, ev)) => seen.push(ev),
            Err(_) => panic!("no {what} within {deadline:?}; saw {seen:#?}"),
        }
    }
}

/// Whether `ev` is a template with this `new_block` flag.
pub(crate) fn is_template(ev: &GenEvent, new_block: bool) -> bool {
    matches!(ev, GenEvent::Template { new_block: n, .. } if *n == new_block)
}

/// Sends the generator's logs to the test output (filtered by `RUST_LOG`, default `info`).
pub(crate) fn init_logs() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_test_writer()
        .try_init();
}
