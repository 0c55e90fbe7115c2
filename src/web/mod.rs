//! The read-only HTTP listener (`webserver` in the config; off by default): Prometheus metrics at
//! `/metrics`, the admin socket's statistics as JSON under `/api/`, and a small live dashboard
//! at `/` whose assets (and the vendored uPlot chart library, MIT) are built into the binary.
//!
//! It runs on threads of its own, never on a connector thread, and only reads what the pool
//! already keeps ([`stratifier::Pool::stats`], the connector threads' counters, the share log's
//! counters): a request costs the share path nothing. Every request is rendered from one
//! snapshot.
//!
//! Bounds: [`WORKERS`] threads answer requests, so at most that many are served at once and one
//! slow client holds up only its own thread; only `GET` and `HEAD` with no body and a URL of at
//! most [`MAX_URL`] bytes are served (anything else: 405 or 414). Reading a request is tiny_http's
//! own affair: a thread of its pool per open connection, a pool that grows with the connections,
//! and no socket timeouts; so a client that never reads a response larger than the socket
//! buffers holds a worker thread until it goes. Bind it to loopback (or firewall it).
//!
//! Endpoints: `/metrics`; `/api/pool`; `/api/users` and `/api/users/<name>`; `/api/workers` and
//! `/api/workers/<name>`; `/api/clients`; `/api/blocks`; `/api/upstreams`; `/api/history` (the
//! pool's 5-minute hashrate sampled every [`HISTORY_EVERY`], the last [`HISTORY_LEN`] samples);
//! `/` and its assets. Anything else is 404.
//!
//! Proxy and userproxy modes serve the same over their local pool, with the upstream connections
//! in `/api/upstreams` and the `ckpool_upstream_*` metrics (`PoolCtx::upstreams`); the modes
//! without a pool (passthrough, node, redirector) serve a smaller set (see `modes.rs`).

mod api;
mod metrics;
mod modes;

use std::collections::VecDeque;
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use connector::ConnectorHandle;
use parking_lot::Mutex;
use tiny_http::{Header, Method, Request, Response, Server};
use tracing::{debug, info, warn};

use crate::admin::GenLink;
use crate::handoff::Msg;
use crate::sharelog::StatsHandle;

/// Threads answering requests: at most this many requests are served at once.
pub(crate) const WORKERS: usize = 4;
/// Longest request URL served.
pub(crate) const MAX_URL: usize = 1024;
/// How often the hashrate history takes a sample.
pub(crate) const HISTORY_EVERY: Duration = Duration::from_secs(60);
/// Samples kept in the hashrate history (24 h at one a minute).
pub(crate) const HISTORY_LEN: usize = 24 * 60;
/// How often the worker threads look at the stop flag.
const POLL: Duration = Duration::from_millis(200);
/// How often binding the port is tried again (see [`start`]).
const BIND_RETRY: Duration = Duration::from_millis(50);

const INDEX_HTML: &str = include_str!("assets/index.html");
const DASHBOARD_JS: &str = include_str!("assets/dashboard.js");
const UPLOT_JS: &str = include_str!("assets/uPlot.iife.min.js");
const UPLOT_CSS: &str = include_str!("assets/uPlot.min.css");
const UPLOT_LICENSE: &str = include_str!("assets/uPlot.LICENSE");

/// What the web server reads: a pool (pool, solo, proxy and userproxy modes) or a link without
/// a pool of its own (passthrough, node and redirector modes).
pub(crate) enum WebCtx {
    Pool(PoolCtx),
    Link(modes::LinkCtx),
}

pub(crate) use modes::LinkCtx;

/// A JSON view kept by the mode (its admin `stats` or `upstreams`), rendered per request.
pub(crate) type JsonView = std::sync::Arc<dyn Fn() -> serde_json::Value + Send + Sync>;

/// What the web server reads in the modes with a stratifier pool.
pub(crate) struct PoolCtx {
    /// The pool's statistics.
    pub(crate) pool: Arc<stratifier::Pool>,
    /// The connector threads' counters.
    pub(crate) conns: ConnectorHandle<Msg>,
    /// The generator's active server.
    pub(crate) generator: Arc<GenLink>,
    /// The bitcoind URLs, in priority order (the generator's server indices).
    pub(crate) servers: Vec<String>,
    /// The share log's counters (`-L`).
    pub(crate) share_log: Option<StatsHandle>,
    /// The generator's figures (RPC and template latency, failovers, ZMQ, block verdicts);
    /// `None` in proxy modes (no generator).
    pub(crate) gen_stats: Option<Arc<generator::stats::GenStats>>,
    /// Proxy and userproxy modes: the admin `upstreams` view (upstream connections and their
    /// verdicts), behind `/api/upstreams` and the `ckpool_upstream_*` metrics.
    pub(crate) upstreams: Option<JsonView>,
    /// The passthrough links open at the pool.
    pub(crate) links: Arc<crate::links::LinkRegistry>,
    /// The I/O backend's name.
    pub(crate) io: String,
    /// The handoff's name.
    pub(crate) handoff: String,
    /// When the daemon started.
    pub(crate) started: Instant,
}

/// Shared by the worker threads.
struct Shared {
    ctx: WebCtx,
    /// (unix seconds, 5-minute hashrate) samples, oldest first.
    history: Mutex<VecDeque<(u64, f64)>>,
    stop: AtomicBool,
}

/// The running web server; [`WebServer::stop`] joins its threads.
pub(crate) struct WebServer {
    server: Arc<Server>,
    shared: Arc<Shared>,
    threads: Vec<thread::JoinHandle<()>>,
}

impl WebServer {
    /// Stops listening and joins the threads.
    pub(crate) fn stop(self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        self.server.unblock();
        for t in self.threads {
            if t.join().is_err() {
                warn!("a web server thread panicked");
            }
        }
        debug!("web server stopped");
    }
}

/// Binds `addr` and starts the worker threads and the history sampler. `wait`: how long to
/// keep trying to bind (after a handover the old instance holds the port until it has stopped
/// its own web server, moments after the commit); zero: one try.
pub(crate) fn start(addr: &str, ctx: WebCtx, wait: Duration) -> io::Result<WebServer> {
    let deadline = Instant::now() + wait;
    let server = loop {
        match Server::http(addr) {
            Ok(server) => break server,
            Err(e) if Instant::now() >= deadline => return Err(io::Error::other(e)),
            Err(e) => {
                debug!(addr, error = %e, "web server port still taken; trying again");
                thread::sleep(BIND_RETRY);
            }
        }
    };
    let bound = server
        .server_addr()
        .to_ip()
        .ok_or_else(|| io::Error::other("not an IP listener"))?;
    let server = Arc::new(server);
    let shared = Arc::new(Shared {
        ctx,
        history: Mutex::new(VecDeque::with_capacity(HISTORY_LEN)),
        stop: AtomicBool::new(false),
    });
    let mut threads = Vec::with_capacity(WORKERS + 1);
    let spawned = spawn_all(&server, &shared, &mut threads);
    let web = WebServer {
        server,
        shared,
        threads,
    };
    if let Err(e) = spawned {
        web.stop();
        return Err(e);
    }
    info!(addr = %bound, "web server listening");
    Ok(web)
}

fn spawn_all(
    server: &Arc<Server>,
    shared: &Arc<Shared>,
    threads: &mut Vec<thread::JoinHandle<()>>,
) -> io::Result<()> {
    for i in 0..WORKERS {
        let server = Arc::clone(server);
        let shared = Arc::clone(shared);
        threads.push(
            thread::Builder::new()
                .name(format!("web-{i}"))
                .spawn(move || worker(&server, &shared))?,
        );
    }
    let sampler = Arc::clone(shared);
    threads.push(
        thread::Builder::new()
            .name("web-history".into())
            .spawn(move || history(&sampler))?,
    );
    Ok(())
}

fn worker(server: &Server, shared: &Shared) {
    while !shared.stop.load(Ordering::Relaxed) {
        match server.recv_timeout(POLL) {
            Ok(Some(req)) => answer(req, shared),
            Ok(None) => {}
            Err(e) => {
                debug!(error = %e, "web accept failed");
                thread::sleep(POLL);
            }
        }
    }
}

/// Samples the pool's 5-minute hashrate now and every [`HISTORY_EVERY`].
fn history(shared: &Shared) {
    let mut next = Instant::now();
    while !shared.stop.load(Ordering::Relaxed) {
        let now = Instant::now();
        if now >= next {
            let WebCtx::Pool(ctx) = &shared.ctx else {
                return;
            };
            let rate = ctx.pool.stats().rates.hashrate5m;
            let mut h = shared.history.lock();
            if h.len() == HISTORY_LEN {
                h.pop_front();
            }
            h.push_back((unix_now(), rate));
            drop(h);
            next += HISTORY_EVERY;
        }
        thread::sleep(POLL.min(next.saturating_duration_since(Instant::now())));
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A response: status, content type and body.
struct Reply {
    status: u16,
    content_type: &'static str,
    body: Vec<u8>,
}

impl Reply {
    fn new(status: u16, content_type: &'static str, body: impl Into<Vec<u8>>) -> Self {
        Self {
            status,
            content_type,
            body: body.into(),
        }
    }

    fn json(v: &serde_json::Value) -> Self {
        Self::new(200, "application/json", v.to_string())
    }

    fn not_found() -> Self {
        Self::new(404, "text/plain; charset=utf-8", "not found\n")
    }
}

fn answer(req: Request, shared: &Shared) {
    let reply = if !matches!(req.method(), Method::Get | Method::Head)
        || req.body_length().is_some_and(|n| n > 0)
    {
        Reply::new(405, "text/plain; charset=utf-8", "read-only: GET only\n")
    } else if req.url().len() > MAX_URL {
        Reply::new(414, "text/plain; charset=utf-8", "URL too long\n")
    } else {
        route(req.url(), shared)
    };
    // tiny_http leaves the body out for HEAD and sets Content-Length itself.
    let mut resp = Response::from_data(reply.body).with_status_code(reply.status);
    if let Ok(h) = Header::from_bytes(&b"Content-Type"[..], reply.content_type.as_bytes()) {
        resp.add_header(h);
    }
    if let Ok(h) = Header::from_bytes(&b"Cache-Control"[..], &b"no-store"[..]) {
        resp.add_header(h);
    }
    if let Err(e) = req.respond(resp) {
        debug!(error = %e, "web response failed");
    }
}

/// The reply to a GET of `url` (path and optional query).
fn route(url: &str, shared: &Shared) -> Reply {
    let path = url.split(['?', '#']).next().unwrap_or("");
    let ctx = match &shared.ctx {
        WebCtx::Pool(ctx) => ctx,
        WebCtx::Link(ctx) => return modes::route(path, ctx),
    };
    match path {
        "/" | "/index.html" => Reply::new(200, "text/html; charset=utf-8", INDEX_HTML),
        "/assets/dashboard.js" => Reply::new(200, "text/javascript; charset=utf-8", DASHBOARD_JS),
        "/assets/uPlot.iife.min.js" => Reply::new(200, "text/javascript; charset=utf-8", UPLOT_JS),
        "/assets/uPlot.min.css" => Reply::new(200, "text/css; charset=utf-8", UPLOT_CSS),
        "/assets/uPlot.LICENSE" => Reply::new(200, "text/plain; charset=utf-8", UPLOT_LICENSE),
        "/metrics" => match metrics::render(ctx) {
            Ok(text) => Reply::new(
                200,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                text,
            ),
            Err(()) => Reply::new(500, "text/plain; charset=utf-8", "encoding failed\n"),
        },
        "/api/history" => {
            let h = shared.history.lock().clone();
            api::history(&h)
        }
        _ => match path.strip_prefix("/api/") {
            Some(rest) => api::route(rest, ctx).unwrap_or_else(Reply::not_found),
            None => Reply::not_found(),
        },
    }
}
