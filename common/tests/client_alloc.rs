//! A stratum client's submit and its accepted verdict allocate nothing (ckload drives the
//! benchmarks with it: its cost per share must stay flat).
#![allow(missing_docs, reason = "tests")]
#![allow(clippy::unwrap_used, clippy::panic, reason = "tests")]

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ckpool_common::stratum::Parser;
use ckpool_common::stratum::client::{Client, ClientConfig, Event, Phase};

thread_local! {
    static ALLOCS: Cell<u64> = const { Cell::new(0) };
}

/// The system allocator, counting allocations made on each thread.
struct Counting;

// SAFETY: every call is passed on unchanged to the system allocator, which upholds the
// `GlobalAlloc` contract; the counter is a const-initialised thread-local that never allocates.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCS.with(|c| c.set(c.get() + 1));
        // SAFETY: the caller's layout obligations are passed on unchanged.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `System.alloc` with this layout (every allocation goes there).
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCS.with(|c| c.set(c.get() + 1));
        // SAFETY: as for `dealloc`; the new size obligations are the caller's, passed on.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn allocs() -> u64 {
    ALLOCS.with(Cell::get)
}

#[test]
fn submit_and_accepted_verdict_do_not_allocate() {
    let mut cfg = ClientConfig::new("ckload/test");
    cfg.version_rolling = Some(0x1fff_e000);
    let t0 = Instant::now();
    let mut c: Client<(u32, bool)> = Client::new(Arc::new(cfg), "ckload.1", None);
    let mut p = Parser::new();
    let mut out = Vec::with_capacity(4096);
    c.start(t0, &mut out);
    let configure = br#"{"result":{"version-rolling":true,"version-rolling.mask":"1fffe000"},"id":1,"error":null}"#;
    c.feed(&mut p, configure, t0, &mut out);
    let subscribe = br#"{"result":[[["mining.notify","1"]],"00000001",8],"id":2,"error":null}"#;
    c.feed(&mut p, subscribe, t0, &mut out);
    c.feed(
        &mut p,
        br#"{"result":true,"error":null,"id":3}"#,
        t0,
        &mut out,
    );
    assert_eq!(c.phase(), Phase::Ready);
    let mut reply = Vec::with_capacity(128);
    let mut round =
        |c: &mut Client<(u32, bool)>, out: &mut Vec<u8>, reply: &mut Vec<u8>, i: u32| {
            out.clear();
            let now = t0 + Duration::from_millis(u64::from(i));
            let id = c.submit(
                now,
                out,
                "\"6b1242ec00000001\"",
                &[1, 2, 3, 4],
                0x6b12_42ff,
                i,
                0x2000,
                (i, true),
            );
            reply.clear();
            reply.extend_from_slice(b"{\"id\":");
            ckpool_common::stratum::write::write_u64(reply, id);
            reply.extend_from_slice(b",\"result\":true,\"error\":null}");
            match c.feed(&mut p, reply, now, out) {
                Some(Event::Verdict(v)) => assert!(v.accepted && v.tag == (i, true)),
                other => panic!("{other:?}"),
            }
        };
    // Warm up: the pending queue and the parser's buffers reach their size.
    for i in 0..16 {
        round(&mut c, &mut out, &mut reply, i);
    }
    let before = allocs();
    assert!(before > 0, "the counter counts (the handshake allocates)");
    for i in 16..10_016 {
        round(&mut c, &mut out, &mut reply, i);
    }
    assert_eq!(
        allocs() - before,
        0,
        "allocations in 10,000 submits and verdicts"
    );
    assert!(out.is_empty() || out.ends_with(b"\n"));
}
