//! Heap held per idle, authorised session, counted by a global allocator: the stratifier's part
//! of the user memory an idle miner costs (the connector's part is measured with `hold`).
#![allow(
    clippy::unwrap_used,
    clippy::panic,
    clippy::indexing_slicing,
    missing_docs,
    reason = "test code"
)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::Arc;
use std::sync::atomic::{AtomicIsize, Ordering};
use std::time::{Duration, Instant};

use ckpool_stratifier::{ClientId, Event, Out, Pool, PoolConfig, Shard};
use common::address::{Network, script_for_address};
use common::template::Template;
use common::{ConnId, Difficulty};

/// Counts live heap bytes (requested sizes; malloc's own overhead is not included).
struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

// SAFETY: every call forwards to the system allocator with the same layout; the counter is a
// side effect that does not touch the memory.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: the caller's contract for `alloc` is passed on unchanged.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: `ptr` came from `System` with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(
            new_size as isize - layout.size() as isize,
            Ordering::Relaxed,
        );
        // SAFETY: the caller's contract for `realloc` is passed on unchanged.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Drops everything sent: the connector owns outbound bytes, not the stratifier.
struct Sink;

impl Out for Sink {
    fn send(&mut self, _: ClientId, _: Vec<u8>) {}
    fn send_shared(&mut self, _: ClientId, _: Arc<[u8]>) {}
    fn close(&mut self, _: ClientId) {}
    fn event(&mut self, _: Event) {}
}

fn template() -> Arc<Template> {
    Arc::new(Template::empty([1; 32], 0x1d00_ffff))
}

#[test]
fn idle_authorised_session_heap() {
    const N: u32 = 20_000;
    let payout =
        script_for_address("mnNghRjeAKbTqkvMYaE6kzkpsfWVdt3TRZ", Network::Regtest).unwrap();
    let mut cfg = PoolConfig::new(Network::Regtest, Some(payout));
    cfg.mindiff = Difficulty::MIN;
    let pool = Pool::new(cfg, 1, Instant::now());
    let now = Instant::now();
    pool.new_template(template(), now).unwrap();
    let mut shard = Shard::new(Arc::clone(&pool));
    let peer = "127.0.0.1:5000".parse().unwrap();
    let mut out = Sink;
    // Warm up: the first sessions size the parser's and the shard's scratch buffers.
    let mut open = |shard: &mut Shard, i: u32| {
        let c = ConnId::new(0, 0, i);
        shard.on_open(now, c, peer, 0);
        let sub = br#"{"id":1,"method":"mining.subscribe","params":["bitaxe/BM1368/v2.4.2"]}"#;
        shard.on_line(now, c, sub, &mut out);
        let auth = format!(
            r#"{{"id":2,"method":"mining.authorize","params":["bc1qfarmowner0000000000000000000000000000.rig{i:06}","x"]}}"#
        );
        shard.on_line(now, c, auth.as_bytes(), &mut out);
    };
    for i in 0..64 {
        open(&mut shard, i);
    }
    let before = LIVE.load(Ordering::Relaxed);
    for i in 64..64 + N {
        open(&mut shard, i);
    }
    // Idle: past the authorisation deadline, whose queue then gives its memory back.
    let mut sink = Sink;
    shard.on_tick(now + Duration::from_secs(3600), &mut sink);
    let after = LIVE.load(Ordering::Relaxed);
    assert_eq!(shard.sessions(), N as usize + 64);
    let per = (after - before) as f64 / f64::from(N);
    println!("heap per idle authorised session: {per:.0} B");
    // 836 B before sessions were boxed and their strings shared or derived; 459 B after; 168 B
    // once sessions were packed (8-byte difficulties and instants, thin shared names, the worker
    // name kept as its short suffix inline, rare fields boxed) and stored inline in a chunked
    // table; 164 B with the shard's own slab (4 bytes of slot index per connection) and a
    // 16-byte worker suffix (was 24). The goal (reference/perf.md G4) is 256 B for the whole
    // process, connector included.
    assert!(per <= 184.0, "{per} B of heap per idle session");
}
