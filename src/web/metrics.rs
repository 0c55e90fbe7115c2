//! `/metrics`: Prometheus text (OpenMetrics) through `prometheus-client`, rendered from one
//! snapshot of the pool's statistics and the connector threads' counters per scrape. Every metric
//! is named `ckpool_...`.

use common::histogram::Snapshot;
use parking_lot::Mutex;
use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::{EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::{MetricType, TypedMetric};
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

use connector::ThreadCounters;
use serde_json::Value;

use super::PoolCtx;

type Labels = Vec<(&'static str, String)>;
type CounterFamily = Family<Labels, Counter>;
type GaugeFamily = Family<Labels, Gauge<f64, AtomicU64>>;

/// The hashrate windows and the `PoolRates` figures behind them.
const WINDOWS: [&str; 7] = ["1m", "5m", "15m", "1h", "6h", "1d", "7d"];

/// Renders every metric; `Err` only if the encoder fails.
pub(super) fn render(ctx: &PoolCtx) -> Result<String, ()> {
    let s = ctx.pool.stats();
    let threads = ctx.conns.counters();
    let mut reg = Registry::with_prefix("ckpool");
    connections(&mut reg, &threads);
    pool_metrics(&mut reg, ctx, &s);
    encode_registry(&reg)
}

/// Encodes a registry; `Err` only if the encoder fails.
pub(super) fn encode_registry(reg: &Registry) -> Result<String, ()> {
    let mut out = String::with_capacity(16 * 1024);
    encode(&mut out, reg).map_err(|_| ())?;
    Ok(out)
}

/// The connector threads' counters, per thread.
pub(super) fn connections(reg: &mut Registry, threads: &[ThreadCounters]) {
    let open = Family::<Labels, Gauge>::default();
    let accepted = CounterFamily::default();
    let refused = CounterFamily::default();
    let closed = CounterFamily::default();
    let adopted = CounterFamily::default();
    let exported = CounterFamily::default();
    let slow = CounterFamily::default();
    let panics = CounterFamily::default();
    let queued = Family::<Labels, Gauge>::default();
    let paused = Family::<Labels, Gauge>::default();
    let pauses = CounterFamily::default();
    for (i, c) in threads.iter().enumerate() {
        let t = || vec![("thread", i.to_string())];
        open.get_or_create(&t()).set(sat_i64(c.open));
        accepted.get_or_create(&t()).inc_by(c.accepted);
        refused.get_or_create(&t()).inc_by(c.refused);
        adopted.get_or_create(&t()).inc_by(c.adopted);
        exported.get_or_create(&t()).inc_by(c.exported);
        slow.get_or_create(&t()).inc_by(c.slow_rounds);
        panics.get_or_create(&t()).inc_by(c.handler_panics);
        queued.get_or_create(&t()).set(sat_i64(c.queued));
        paused.get_or_create(&t()).set(sat_i64(c.paused));
        pauses.get_or_create(&t()).inc_by(c.pauses);
        let k = &c.closed;
        for (reason, n) in [
            ("peer", k.peer),
            ("error", k.error),
            ("line_too_long", k.line_too_long),
            ("outbound", k.outbound),
            ("handler", k.handler),
            ("shutdown", k.shutdown),
            ("outbound_budget", k.outbound_budget),
            ("idle", k.idle),
            ("handler_panic", k.handler_panic),
            ("stalled", k.stalled),
        ] {
            closed
                .get_or_create(&vec![("thread", i.to_string()), ("reason", reason.into())])
                .inc_by(n);
        }
    }
    reg.register(
        "connections_open",
        "Connections open now, per connector thread",
        open,
    );
    reg.register(
        "connections_accepted",
        "Connections accepted (including those refused at once), per connector thread",
        accepted,
    );
    reg.register(
        "connections_refused",
        "Connections refused at once (maxclients, maxclientsperip), per connector thread",
        refused,
    );
    reg.register(
        "connections_closed",
        "Connections closed, per connector thread and reason",
        closed,
    );
    reg.register(
        "connections_adopted",
        "Connections taken over from another instance (handovers in), per connector thread",
        adopted,
    );
    reg.register(
        "connections_exported",
        "Connections handed over to another instance (handovers out), per connector thread",
        exported,
    );
    reg.register(
        "connector_slow_rounds",
        "Connector loop rounds that took 20 ms or more, per connector thread",
        slow,
    );
    reg.register(
        "connector_handler_panics",
        "Handler callbacks that panicked, per connector thread",
        panics,
    );
    reg.register(
        "connector_queued_bytes",
        "Bytes queued for the thread's connections and not yet written",
        queued,
    );
    reg.register(
        "connector_paused_connections",
        "Connections whose reads are paused now for back-pressure (pausereads), per connector thread",
        paused,
    );
    reg.register(
        "connector_read_pauses",
        "Times a connection's reads were paused for back-pressure, per connector thread",
        pauses,
    );
    reg.register(
        "connector_threads",
        "Connector threads",
        ConstGauge::new(sat_i64(threads.len() as u64)),
    );
}

/// Everything read from the pool, the generator, the share log and the process.
fn pool_metrics(reg: &mut Registry, ctx: &PoolCtx, s: &stratifier::StatsSnapshot) {
    // Shares.
    let shares = CounterFamily::default();
    shares
        .get_or_create(&vec![("result", "accepted".into())])
        .inc_by(s.accepted);
    shares
        .get_or_create(&vec![("result", "rejected".into())])
        .inc_by(s.rejected);
    reg.register("shares", "Shares by result", shares);
    let rejects = CounterFamily::default();
    let mut with_reason = 0u64;
    for (reason, n) in &s.reject_reasons {
        rejects
            .get_or_create(&vec![("reason", (*reason).to_owned())])
            .inc_by(*n);
        with_reason += n;
    }
    let other = s.rejected.saturating_sub(with_reason);
    if other > 0 {
        rejects
            .get_or_create(&vec![("reason", "other".into())])
            .inc_by(other);
    }
    reg.register(
        "shares_rejected_by_reason",
        "Rejected shares by reason",
        rejects,
    );
    reg.register(
        "accepted_difficulty",
        "Sum of the difficulty of accepted shares",
        ConstCounter::new(s.accepted_diff),
    );
    reg.register(
        "best_share",
        "Best share difficulty of the current round (since the pool's last block)",
        ConstGauge::new(s.bestshare),
    );
    reg.register(
        "best_share_ever",
        "Best share difficulty ever (kept across restarts through the stats files)",
        ConstGauge::new(s.bestever),
    );
    reg.register(
        "round_difficulty",
        "Difficulty accepted since the pool's last block, as of the last rate sample",
        ConstGauge::new(s.round_diff),
    );

    // Rates.
    let r = &s.rates;
    let hashrate = GaugeFamily::default();
    let rates = [
        r.hashrate1m,
        r.hashrate5m,
        r.hashrate15m,
        r.hashrate1hr,
        r.hashrate6hr,
        r.hashrate1d,
        r.hashrate7d,
    ];
    for (w, v) in WINDOWS.iter().zip(rates) {
        hashrate
            .get_or_create(&vec![("window", (*w).into())])
            .set(v);
    }
    reg.register(
        "hashrate",
        "Pool hashrate (hashes per second), moving average over the window",
        hashrate,
    );
    let sps = GaugeFamily::default();
    for (w, v) in ["1m", "5m", "15m", "1h"]
        .iter()
        .zip([r.sps1m, r.sps5m, r.sps15m, r.sps1h])
    {
        sps.get_or_create(&vec![("window", (*w).into())]).set(v);
    }
    reg.register(
        "shares_per_second",
        "Accepted shares per second, moving average over the window",
        sps,
    );

    // Clients, users, workers.
    reg.register(
        "clients",
        "Connected (subscribed) clients",
        ConstGauge::new(sat_i64(s.clients)),
    );
    reg.register(
        "disconnected_sessions",
        "Disconnected sessions kept for resume, as of the last rate sample",
        ConstGauge::new(sat_i64(s.disconnected)),
    );
    reg.register(
        "users",
        "Users with statistics",
        ConstGauge::new(sat_i64(s.users.len() as u64)),
    );
    let workers: usize = s.users.values().map(|u| u.workers.len()).sum();
    reg.register(
        "workers",
        "Workers with statistics",
        ConstGauge::new(sat_i64(workers as u64)),
    );

    // Blocks and the job.
    reg.register(
        "blocks_found",
        "Blocks found by the pool's miners",
        ConstCounter::new(s.blocks.len() as u64),
    );
    if let Some((_, height, netdiff)) = &s.job {
        reg.register(
            "job_height",
            "Height of the current job's block",
            ConstGauge::new(sat_i64(*height)),
        );
        reg.register(
            "network_difficulty",
            "Network difficulty of the current job",
            ConstGauge::new(*netdiff),
        );
    }

    // bitcoinds (pool and solo modes).
    if !ctx.servers.is_empty() {
        let active = ctx.generator.active();
        let up = Family::<Labels, Gauge>::default();
        for (i, url) in ctx.servers.iter().enumerate() {
            up.get_or_create(&vec![("server", i.to_string()), ("url", url.clone())])
                .set(i64::from(active == Some(i)));
        }
        reg.register(
            "bitcoind_active",
            "1 for the bitcoind the generator uses now, 0 for the others",
            up,
        );
    }
    if let Some(g) = &ctx.gen_stats {
        node_metrics(reg, g);
    }
    // Upstream pools (proxy and userproxy modes).
    if let Some(view) = &ctx.upstreams {
        proxy_upstreams(reg, &view());
    }

    reg.register(
        "submit_seconds",
        "Time from the start of the connector round that read a mining.submit line to the end \
         of the shard's handling of that round (its reply queued), per share",
        ConstHistogram::new(crate::handoff::submit_latency()),
    );

    // Passthrough links at this pool.
    let links = ctx.links.subclients();
    reg.register(
        "passthrough_links",
        "Passthrough links connected to this pool",
        ConstGauge::new(sat_i64(links.len() as u64)),
    );
    let subs = Family::<Labels, Gauge>::default();
    for (peer, n) in links {
        subs.get_or_create(&vec![("peer", peer)])
            .set(sat_i64(n as u64));
    }
    reg.register(
        "passthrough_subclients",
        "Sub-clients of each passthrough link (they also count in clients)",
        subs,
    );

    // Handovers.
    handovers(reg);

    // The share log.
    if let Some(log) = &ctx.share_log {
        sharelog(reg, &log.snapshot());
    }

    process(reg, ctx.started);
}

/// Handovers by result.
pub(super) fn handovers(reg: &mut Registry) {
    let (sent, received, failed) = crate::handover::counts();
    let handovers = CounterFamily::default();
    for (result, n) in [("sent", sent), ("received", received), ("failed", failed)] {
        handovers
            .get_or_create(&vec![("result", result.into())])
            .inc_by(n);
    }
    reg.register(
        "handovers",
        "Handovers (-H, restart) by result: sent (this instance handed over), received (it took \
         over), failed (either side)",
        handovers,
    );
}

fn sharelog(reg: &mut Registry, l: &crate::sharelog::ShareLogStats) {
    {
        reg.register(
            "sharelog_written",
            "Share-log records written",
            ConstCounter::new(l.written),
        );
        reg.register(
            "sharelog_write_errors",
            "Share-log write errors",
            ConstCounter::new(l.write_errors),
        );
        reg.register(
            "sharelog_backlog",
            "Share-log records queued or buffered, not yet written",
            ConstGauge::new(sat_i64(l.pending)),
        );
        reg.register(
            "sharelog_rejects_summarised",
            "Rejected shares summarised instead of logged one by one",
            ConstCounter::new(l.rejects_summarised),
        );
    }
}

/// The process: log counters and uptime.
pub(super) fn process(reg: &mut Registry, started: std::time::Instant) {
    reg.register(
        "log_dropped",
        "Log lines dropped (the log writer was behind)",
        ConstCounter::new(crate::logging::dropped()),
    );
    reg.register(
        "log_write_errors",
        "Log file write errors",
        ConstCounter::new(crate::logging::write_errors()),
    );
    reg.register(
        "uptime_seconds",
        "Seconds since the daemon started",
        ConstGauge::new(sat_i64(started.elapsed().as_secs())),
    );
}

/// `ckpool_upstream_*` from the proxy's admin `upstreams` view: each upstream connection open
/// (labelled by url, role and user) with its state, difficulty, miners and share verdicts, and
/// the shares that could not be queued for an upstream.
fn proxy_upstreams(reg: &mut Registry, v: &Value) {
    let up = Family::<Labels, Gauge>::default();
    let diff = GaugeFamily::default();
    let miners = Family::<Labels, Gauge>::default();
    let shares = CounterFamily::default();
    for c in v["connections"].as_array().into_iter().flatten() {
        let labels = || {
            vec![
                ("url", c["url"].as_str().unwrap_or("").to_owned()),
                ("role", c["role"].as_str().unwrap_or("").to_owned()),
                ("user", c["user"].as_str().unwrap_or("").to_owned()),
            ]
        };
        up.get_or_create(&labels())
            .set(i64::from(c["state"].as_str() == Some("active")));
        if let Some(d) = c["difficulty"].as_f64() {
            diff.get_or_create(&labels()).set(d);
        }
        if let Some(n) = c["miners"].as_u64() {
            miners.get_or_create(&labels()).set(sat_i64(n));
        }
        for result in ["accepted", "rejected", "lost"] {
            let mut l = labels();
            l.push(("result", result.into()));
            shares
                .get_or_create(&l)
                .inc_by(c[result].as_u64().unwrap_or(0));
        }
    }
    reg.register(
        "upstream_up",
        "1 for an upstream connection that is active (subscribed and authorised), 0 otherwise",
        up,
    );
    reg.register(
        "upstream_difficulty",
        "The difficulty the upstream set on the connection",
        diff,
    );
    reg.register(
        "upstream_miners",
        "Miners on the connection's work (live and parked for resume)",
        miners,
    );
    reg.register(
        "upstream_shares",
        "Shares sent on the connection, by the upstream's verdict (lost: no verdict came)",
        shares,
    );
    reg.register(
        "upstream_shares_dropped",
        "Shares that could not be queued for an upstream (queue full, link gone, stale source)",
        ConstCounter::new(v["dropped"].as_u64().unwrap_or(0)),
    );
    reg.register(
        "upstream_failovers",
        "Times the main upstream connection came up on another proxy entry than the one it was \
         last up on (failover or fail-back)",
        ConstCounter::new(v["failovers"].as_u64().unwrap_or(0)),
    );
}

/// The generator's figures: RPC and template latency, template age, failovers, ZMQ, block
/// verdicts.
fn node_metrics(reg: &mut Registry, g: &generator::stats::GenStats) {
    let verdicts = CounterFamily::default();
    for (verdict, n) in g.blocks() {
        verdicts
            .get_or_create(&vec![("verdict", verdict.into())])
            .inc_by(n);
    }
    reg.register(
        "blocks_settled",
        "Found blocks by the nodes' final verdict: accepted (in a node's best chain), refused \
         (invalid), stale (the chain passed its height), inconclusive (a node has it off its \
         best chain)",
        verdicts,
    );
    if let Some(age) = g.template_age() {
        reg.register(
            "template_age_seconds",
            "Seconds since the current block template was fetched",
            ConstGauge::new(age.as_secs_f64()),
        );
    }
    reg.register(
        "templates",
        "Block templates fetched and turned into jobs",
        ConstCounter::new(g.templates()),
    );
    reg.register(
        "template_fetch_seconds",
        "Time to fetch a block template (getblocktemplate and decoding its reply)",
        ConstHistogram::new(g.template_fetch().snapshot()),
    );
    let rpc = Family::<Labels, ConstHistogram>::default();
    for (method, h) in g.rpc() {
        rpc.get_or_create(&vec![("method", method.into())])
            .set(h.snapshot());
    }
    reg.register(
        "bitcoind_rpc_seconds",
        "Time of each JSON-RPC call to a bitcoind (answered or failed), per method",
        rpc,
    );
    reg.register(
        "bitcoind_failovers",
        "Times the active bitcoind changed to another one (failover or fail-back)",
        ConstCounter::new(g.failovers()),
    );
    reg.register(
        "zmq_hashblock",
        "ZMQ hashblock notifications received",
        ConstCounter::new(g.zmq_blocks()),
    );
}

/// A histogram whose figures are kept elsewhere (atomics), encoded as they were at the scrape.
#[derive(Debug, Default)]
struct ConstHistogram(Mutex<Snapshot>);

impl ConstHistogram {
    fn new(s: Snapshot) -> Self {
        Self(Mutex::new(s))
    }

    fn set(&self, s: Snapshot) {
        *self.0.lock() = s;
    }
}

impl TypedMetric for ConstHistogram {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for ConstHistogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let s = self.0.lock();
        encoder.encode_histogram::<NoLabelSet>(s.sum, s.count, &s.buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

pub(super) fn sat_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connector_counters_include_back_pressure() {
        let t = ThreadCounters {
            open: 3,
            paused: 2,
            pauses: 5,
            queued: 70_000,
            ..ThreadCounters::default()
        };
        let mut reg = Registry::with_prefix("ckpool");
        connections(&mut reg, &[t]);
        let text = encode_registry(&reg).expect("encodes");
        for line in [
            "ckpool_connections_open{thread=\"0\"} 3",
            "ckpool_connector_paused_connections{thread=\"0\"} 2",
            "ckpool_connector_read_pauses_total{thread=\"0\"} 5",
            "ckpool_connector_queued_bytes{thread=\"0\"} 70000",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} not in\n{text}");
        }
    }
}
