//! The stratifier's whole share path, as the connector drives it: `Shard::on_line` with a
//! `mining.submit` line, for 10,000 authorised miners taking turns (each its own worker, as
//! ckload's), every share accepted, into one job whose duplicate set grows to 600,000 hashes.
//! Parse, session lookup, checks, coinbase and header sha256d, duplicate set, counters, vardiff
//! and the reply; no sockets. Each of 5 rounds starts a fresh job; the median round is printed.
//!
//! `cargo bench -p ckpool-stratifier --bench submit_path`; under `cargo test --benches` (no
//! `--bench` argument) a few hundred shares, to check that it runs.
#![allow(
    missing_docs,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    reason = "bench"
)]

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ckpool_stratifier::{ClientId, Event, Out, Pool, PoolConfig, Shard};
use common::address::{Network, script_for_address};
use common::template::Template;
use common::{ConnId, Difficulty};

/// Miners, shares per miner and job, jobs: for a measurement, and for a test run.
const FULL: (u32, u32, usize) = (10_000, 60, 5);
const QUICK: (u32, u32, usize) = (100, 3, 2);

/// Keeps the last broadcast notify and counts the rest.
#[derive(Default)]
struct Keep {
    notify: Option<Arc<[u8]>>,
    replies: u64,
    closes: u64,
}

impl Out for Keep {
    fn send(&mut self, _: ClientId, buf: Vec<u8>) {
        self.replies += 1;
        black_box(buf);
    }
    fn send_shared(&mut self, _: ClientId, bytes: Arc<[u8]>) {
        self.notify = Some(bytes);
    }
    fn close(&mut self, _: ClientId) {
        self.closes += 1;
    }
    fn event(&mut self, ev: Event) {
        black_box(ev);
    }
}

/// Network difficulty 1: shares at 2^-32 never solve a block.
fn template(prev: u8) -> Arc<Template> {
    Arc::new(Template::empty([prev; 32], 0x1d00_ffff))
}

/// The job id and ntime of a `mining.notify` line.
fn job_of(notify: &[u8]) -> (String, String) {
    let v: serde_json::Value = serde_json::from_slice(notify).unwrap();
    let p = &v["params"];
    (
        p[0].as_str().unwrap().to_owned(),
        p[7].as_str().unwrap().to_owned(),
    )
}

fn main() {
    let measure = std::env::args().any(|a| a == "--bench");
    #[allow(non_snake_case, reason = "the constants of a run")]
    let (MINERS, PER_MINER, ROUNDS) = if measure { FULL } else { QUICK };
    let payout =
        script_for_address("mnNghRjeAKbTqkvMYaE6kzkpsfWVdt3TRZ", Network::Regtest).unwrap();
    let mut cfg = PoolConfig::new(Network::Regtest, Some(payout));
    // Pinned at 2^-32, as the load benchmarks: every share is accepted.
    cfg.mindiff = Difficulty::MIN;
    cfg.startdiff = Difficulty::MIN;
    cfg.maxdiff = Some(Difficulty::MIN);
    let n2len = cfg.coinbase.nonce2_len;
    let mut now = Instant::now();
    let pool = Pool::new(cfg, 1, now);
    pool.new_template(template(1), now).unwrap();
    let mut shard = Shard::new(Arc::clone(&pool));
    let mut out = Keep::default();
    let peer = "127.0.0.1:5000".parse().unwrap();
    let conns: Vec<ConnId> = (0..MINERS).map(|i| ConnId::new(0, 0, i)).collect();
    for (i, &c) in conns.iter().enumerate() {
        shard.on_open(now, c, peer, 0);
        let sub = br#"{"id":1,"method":"mining.subscribe","params":["ckload/0.1"]}"#;
        shard.on_line(now, c, sub, &mut out);
        let auth = format!(r#"{{"id":2,"method":"mining.authorize","params":["ckload.{i}","x"]}}"#);
        shard.on_line(now, c, auth.as_bytes(), &mut out);
    }
    assert_eq!(shard.sessions(), MINERS as usize);
    let mut times = Vec::new();
    for round in 0..ROUNDS {
        if round > 0 {
            // A new block: a fresh job with an empty duplicate set.
            let prev = u8::try_from(round + 1).unwrap();
            let job = pool.new_template(template(prev), now).unwrap();
            shard.on_job(&job, &mut out);
        }
        let (job_id, ntime) = job_of(out.notify.as_deref().expect("a notify"));
        let replies = out.replies;
        let mut busy = Duration::ZERO;
        let mut line = Vec::with_capacity(160);
        for k in 0..PER_MINER {
            // Lines built outside the timed part: the connector hands them over ready.
            let lines: Vec<Vec<u8>> = (0..MINERS)
                .map(|i| {
                    line.clear();
                    let en2 = format!("{:0width$x}", u64::from(k), width = 2 * n2len);
                    line.extend_from_slice(
                        format!(
                            r#"{{"id":{},"method":"mining.submit","params":["ckload.{i}","{job_id}","{en2}","{ntime}","{:08x}"]}}"#,
                            100 + k,
                            i ^ 0x5a5a
                        )
                        .as_bytes(),
                    );
                    line.clone()
                })
                .collect();
            let start = Instant::now();
            for (&c, l) in conns.iter().zip(&lines) {
                // 40,000 shares/s.
                now += Duration::from_micros(25);
                shard.on_line(now, c, l, &mut out);
            }
            busy += start.elapsed();
        }
        let shares = u64::from(MINERS) * u64::from(PER_MINER);
        assert_eq!(out.replies - replies, shares, "one reply per share");
        assert_eq!(out.closes, 0);
        let ns = busy.as_nanos() as f64 / shares as f64;
        println!("round {round}: {ns:.0} ns per share ({shares} shares)");
        times.push(ns);
    }
    let stats = pool.stats();
    black_box(&stats);
    times.sort_by(f64::total_cmp);
    println!(
        "submit path, {MINERS} miners, {} shares per job: median {:.0} ns per share (min {:.0}, max {:.0})",
        MINERS * PER_MINER,
        times[ROUNDS / 2],
        times[0],
        times[ROUNDS - 1]
    );
}
