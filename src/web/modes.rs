//! The web server of the modes without a stratifier pool (passthrough, node and redirector):
//! `/metrics` with what those modes keep (the upstream's state, the miners carried, the lines
//! forwarded and ignored, the connector threads' counters, handovers, the process), and
//! `/api/upstreams` (also `/api/pool`) with the mode's admin `stats`. `/` is a short text page
//! naming these endpoints; there is no dashboard.

use std::time::Instant;

use connector::ThreadCounters;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::registry::Registry;

use super::metrics::{self, sat_i64};
use super::{JsonView, Reply};

/// The connector threads' counters, read per request.
pub(crate) type CountersView = std::sync::Arc<dyn Fn() -> Vec<ThreadCounters> + Send + Sync>;

/// What the web server reads in passthrough, node and redirector modes.
pub(crate) struct LinkCtx {
    /// The mode's admin `stats`.
    pub(crate) stats: JsonView,
    /// The connector threads' counters.
    pub(crate) counters: CountersView,
    /// The upstream URLs (`proxy` entries), in priority order.
    pub(crate) urls: Vec<String>,
    /// When the daemon started.
    pub(crate) started: Instant,
}

const INDEX: &str = "ckpool-rs: this mode has no pool of its own, so no dashboard.\n\
Endpoints: /metrics (Prometheus), /api/upstreams and /api/pool (the admin stats as JSON).\n";

/// The reply to a GET of `path`.
pub(super) fn route(path: &str, ctx: &LinkCtx) -> Reply {
    match path {
        "/" | "/index.html" => Reply::new(200, "text/plain; charset=utf-8", INDEX),
        "/metrics" => match render(ctx) {
            Ok(text) => Reply::new(
                200,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                text,
            ),
            Err(()) => Reply::new(500, "text/plain; charset=utf-8", "encoding failed\n"),
        },
        "/api/upstreams" | "/api/pool" => Reply::json(&(ctx.stats)()),
        _ => Reply::not_found(),
    }
}

/// Renders the metrics of a link mode; `Err` only if the encoder fails.
fn render(ctx: &LinkCtx) -> Result<String, ()> {
    let s = (ctx.stats)();
    let mut reg = Registry::with_prefix("ckpool");
    metrics::connections(&mut reg, &(ctx.counters)());

    let up_url = s["upstream"]["url"].as_str();
    let up = Family::<Vec<(&'static str, String)>, Gauge>::default();
    for (i, url) in ctx.urls.iter().enumerate() {
        up.get_or_create(&vec![("server", i.to_string()), ("url", url.clone())])
            .set(i64::from(
                s["upstream"]["index"].as_u64() == Some(i as u64) && up_url == Some(url),
            ));
    }
    reg.register(
        "upstream_up",
        "1 for the upstream the link is connected to now, 0 for the others",
        up,
    );
    let n = |k: &str| s[k].as_u64().unwrap_or(0);
    reg.register(
        "upstream_queued_bytes",
        "Bytes queued for the upstream and not yet written",
        ConstGauge::new(sat_i64(s["upstream"]["queued"].as_u64().unwrap_or(0))),
    );
    reg.register(
        "passthrough_miners",
        "Miners carried over the link now",
        ConstGauge::new(sat_i64(n("miners"))),
    );
    for (name, key, help) in [
        (
            "passthrough_lines_up",
            "lines_up",
            "Lines forwarded from the miners to the upstream",
        ),
        (
            "passthrough_lines_down",
            "lines_down",
            "Lines forwarded from the upstream to the miners",
        ),
        (
            "passthrough_ignored_commands",
            "ignored_commands",
            "Upstream text lines that were not a dropclient, ignored",
        ),
        (
            "passthrough_dropclients",
            "dropclients",
            "Miners dropped at the upstream's request",
        ),
        (
            "passthrough_dropped_slow_upstream",
            "dropped_slow_upstream",
            "Miners dropped because the upstream link did not take their lines in time",
        ),
        (
            "passthrough_replayed",
            "replayed",
            "Miners re-established on a new upstream (after a failover or reconnect)",
        ),
        (
            "passthrough_replay_closed",
            "replay_closed",
            "Miners closed because they could not be re-established on a new upstream",
        ),
        (
            "passthrough_rejected_down",
            "rejected_down",
            "Miner lines that came while no upstream was up (answered with an error or dropped)",
        ),
    ] {
        reg.register(name, help, ConstCounter::new(n(key)));
    }
    metrics::handovers(&mut reg);
    metrics::process(&mut reg, ctx.started);
    metrics::encode_registry(&reg)
}
