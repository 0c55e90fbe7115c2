//! The read-only HTTP listener (`webserver` in the config; off by default): Prometheus metrics at
//! `/metrics`, the admin socket's statistics as JSON under `/api/`, and a small live dashboard
//! at `/` whose assets (and the vendored uPlot chart library, MIT) are built into the binary.
//!
//! It runs on threads of its own, never on a connector thread, and only reads what the pool
//! already keeps ([`stratifier::Pool::stats`], the connector threads' counters, the share log's
//! counters): a request costs the share path nothing. Every request is rendered from one
//! snapshot.
//!
//! The HTTP server is our own and minimal: one request per connection (every response says
//! `Connection: close` and the connection is closed after it), so no request ever waits unread
//! behind another on a kept-alive connection. One thread accepts and queues the connections,
//! [`WORKERS`] threads answer them.
//!
//! Bounds: at most [`WORKERS`] requests are served at once and at most [`QUEUE`] accepted
//! connections wait for a worker (more are closed at once); a connection has [`IO_TIMEOUT`] to
//! send its whole request head and the same for each write of the response, and is read for at
//! most [`LINGER`] after its response (so that closing does not reset it); the request head is
//! at most [`MAX_HEAD`] bytes (more: 431, malformed: 400); only `GET` and `HEAD` with no body and
//! a URL of at most [`MAX_URL`] bytes are served (anything else: 405 or 414). Bind it to loopback
//! (or firewall it).
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
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use connector::ConnectorHandle;
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TrySendError};
use parking_lot::Mutex;
use rustix::net::sockopt;
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
/// Longest request head (request line and headers) read: more is 431.
pub(crate) const MAX_HEAD: usize = 8 * 1024;
/// Accepted connections waiting for a worker; one more is closed at once.
pub(crate) const QUEUE: usize = 64;
/// Read and write timeout of a connection.
pub(crate) const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// How long, and how many bytes, a connection is read after its response before it is closed.
const LINGER: Duration = Duration::from_secs(1);
const LINGER_BYTES: usize = 64 * 1024;
/// How often the accept and worker threads look at the stop flag.
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
}

/// What answers a request: the reply to a `GET` of the URL.
type Handler = Arc<dyn Fn(&str) -> Reply + Send + Sync>;

/// The running web server; [`WebServer::stop`] joins its threads.
pub(crate) struct WebServer {
    stop: Arc<AtomicBool>,
    threads: Vec<thread::JoinHandle<()>>,
}

impl WebServer {
    /// Stops listening and joins the threads (each notices within [`POLL`]).
    pub(crate) fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            if t.join().is_err() {
                warn!("a web server thread panicked");
            }
        }
        debug!("web server stopped");
    }
}

/// Binds `addr` and starts the accept thread, the worker threads and the history sampler.
/// `wait`: how long to keep trying to bind (after a handover the old instance holds the port
/// until it has stopped its own web server, moments after the commit); zero: one try.
pub(crate) fn start(addr: &str, ctx: WebCtx, wait: Duration) -> io::Result<WebServer> {
    let deadline = Instant::now() + wait;
    let listener = loop {
        match TcpListener::bind(addr) {
            Ok(listener) => break listener,
            Err(e) if Instant::now() >= deadline => return Err(e),
            Err(e) => {
                debug!(addr, error = %e, "web server port still taken; trying again");
                thread::sleep(BIND_RETRY);
            }
        }
    };
    let bound = listener.local_addr()?;
    let shared = Arc::new(Shared {
        ctx,
        history: Mutex::new(VecDeque::with_capacity(HISTORY_LEN)),
    });
    let handler: Handler = {
        let shared = Arc::clone(&shared);
        Arc::new(move |url: &str| route(url, &shared))
    };
    let mut web = WebServer {
        stop: Arc::new(AtomicBool::new(false)),
        threads: Vec::with_capacity(WORKERS + 2),
    };
    let spawned = spawn_http(listener, handler, &web.stop, &mut web.threads).and_then(|()| {
        let stop = Arc::clone(&web.stop);
        let t = thread::Builder::new()
            .name("web-history".into())
            .spawn(move || history(&shared, &stop))?;
        web.threads.push(t);
        Ok(())
    });
    if let Err(e) = spawned {
        web.stop();
        return Err(e);
    }
    info!(addr = %bound, "web server listening");
    Ok(web)
}

/// Starts the accept thread and the [`WORKERS`] worker threads of the HTTP server on
/// `listener`, pushing them onto `threads`; they end once `stop` is set.
fn spawn_http(
    listener: TcpListener,
    handler: Handler,
    stop: &Arc<AtomicBool>,
    threads: &mut Vec<thread::JoinHandle<()>>,
) -> io::Result<()> {
    // accept() gives up after POLL so that the accept thread sees the stop flag.
    sockopt::set_socket_timeout(&listener, sockopt::Timeout::Recv, Some(POLL))
        .map_err(io::Error::from)?;
    let (tx, rx) = crossbeam_channel::bounded(QUEUE);
    for i in 0..WORKERS {
        let rx = rx.clone();
        let handler = Arc::clone(&handler);
        let stop = Arc::clone(stop);
        threads.push(
            thread::Builder::new()
                .name(format!("web-{i}"))
                .spawn(move || worker(&rx, &*handler, &stop))?,
        );
    }
    drop(rx);
    let stop = Arc::clone(stop);
    threads.push(
        thread::Builder::new()
            .name("web-accept".into())
            .spawn(move || accept(&listener, &tx, &stop))?,
    );
    Ok(())
}

/// Accepts connections and queues them for the workers; a connection that finds the queue
/// full is closed at once.
fn accept(listener: &TcpListener, tx: &Sender<TcpStream>, stop: &AtomicBool) {
    let mut dropped: u64 = 0;
    while !stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((stream, peer)) => match tx.try_send(stream) {
                Ok(()) => {}
                Err(TrySendError::Full(_)) => {
                    dropped += 1;
                    debug!(%peer, dropped, "web server busy; connection closed");
                }
                Err(TrySendError::Disconnected(_)) => return,
            },
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) => {}
            Err(e) => {
                // Out of descriptors, for one: wait rather than spin.
                debug!(error = %e, "web accept failed");
                thread::sleep(POLL);
            }
        }
    }
}

fn worker(
    rx: &Receiver<TcpStream>,
    handler: &(dyn Fn(&str) -> Reply + Send + Sync),
    stop: &AtomicBool,
) {
    while !stop.load(Ordering::Relaxed) {
        match rx.recv_timeout(POLL) {
            Ok(stream) => serve(stream, handler),
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => return,
        }
    }
}

/// Answers the one request of a connection and closes it.
fn serve(mut stream: TcpStream, handler: &(dyn Fn(&str) -> Reply + Send + Sync)) {
    if let Err(e) = stream
        .set_read_timeout(Some(IO_TIMEOUT))
        .and_then(|()| stream.set_write_timeout(Some(IO_TIMEOUT)))
    {
        debug!(error = %e, "web socket setup failed");
        return;
    }
    let mut buf = Vec::with_capacity(1024);
    let mut timed = Timed {
        stream: &stream,
        until: Instant::now() + IO_TIMEOUT,
    };
    let (reply, head_only) = match read_head(&mut timed, &mut buf) {
        Ok(end) => match parse_head(&buf[..end]) {
            Some(req) => {
                let head_only = req.method == "HEAD";
                let reply = refuse(&req).unwrap_or_else(|| handler(req.url));
                (reply, head_only)
            }
            None => (Reply::text(400, "bad request\n"), false),
        },
        Err(HeadError::TooLarge) => (Reply::text(431, "request head too large\n"), false),
        Err(HeadError::Closed) => return,
        Err(HeadError::Io(e)) => {
            debug!(error = %e, "web request read failed");
            return;
        }
    };
    if let Err(e) = respond(&mut stream, &reply, head_only) {
        debug!(error = %e, "web response failed");
        return;
    }
    linger(&mut stream);
}

/// A connection read with one deadline for all its reads: a client trickling its request
/// head holds a worker no longer than one that sends nothing.
struct Timed<'a> {
    stream: &'a TcpStream,
    until: Instant,
}

impl Read for Timed<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self.until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::ErrorKind::TimedOut.into());
        }
        self.stream.set_read_timeout(Some(left))?;
        self.stream.read(buf)
    }
}

/// Why no request head was read.
#[derive(Debug)]
enum HeadError {
    /// More than [`MAX_HEAD`] bytes without the blank line.
    TooLarge,
    /// The peer closed before the blank line.
    Closed,
    Io(io::Error),
}

/// Reads until the blank line that ends a request head (at most [`MAX_HEAD`] bytes); returns
/// the length of the head within `buf`, blank line included. Bytes after it stay unread or
/// unused: one request per connection.
fn read_head(r: &mut impl Read, buf: &mut Vec<u8>) -> Result<usize, HeadError> {
    let mut chunk = [0u8; 1024];
    loop {
        if let Some(end) = head_end(buf) {
            return Ok(end);
        }
        if buf.len() >= MAX_HEAD {
            return Err(HeadError::TooLarge);
        }
        let room = (MAX_HEAD - buf.len()).min(chunk.len());
        match r.read(&mut chunk[..room]) {
            Ok(0) => return Err(HeadError::Closed),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(HeadError::Io(e)),
        }
    }
}

/// The end of the head in `buf`: after `\r\n\r\n` (or, leniently, `\n\n`).
fn head_end(buf: &[u8]) -> Option<usize> {
    let crlf = buf.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4);
    let lf = buf.windows(2).position(|w| w == b"\n\n").map(|i| i + 2);
    match (crlf, lf) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// A parsed request head.
#[derive(Debug, PartialEq)]
struct Head<'a> {
    method: &'a str,
    url: &'a str,
    /// A `Content-Length` above zero or any `Transfer-Encoding`.
    has_body: bool,
}

/// Parses a request head leniently (any version, `\n` or `\r\n` line ends, headers other than
/// the body's ignored); `None` for a malformed one.
fn parse_head(head: &[u8]) -> Option<Head<'_>> {
    let text = std::str::from_utf8(head).ok()?;
    let mut lines = text.lines();
    let mut parts = lines.next()?.split_ascii_whitespace();
    let method = parts.next()?;
    let url = parts.next()?;
    if let Some(version) = parts.next()
        && !version.starts_with("HTTP/")
    {
        return None;
    }
    if parts.next().is_some() || !method.bytes().all(|b| b.is_ascii_uppercase()) {
        return None;
    }
    let mut has_body = false;
    for line in lines.take_while(|l| !l.is_empty()) {
        let (name, value) = line.split_once(':')?;
        let (name, value) = (name.trim(), value.trim());
        if name.eq_ignore_ascii_case("content-length") {
            has_body |= value.parse::<u64>().ok()? > 0;
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            has_body = true;
        }
    }
    Some(Head {
        method,
        url,
        has_body,
    })
}

/// The refusal of a request this server does not serve: anything but a body-less `GET` or
/// `HEAD` (405), a URL over [`MAX_URL`] (414).
fn refuse(req: &Head<'_>) -> Option<Reply> {
    if !matches!(req.method, "GET" | "HEAD") || req.has_body {
        Some(Reply::text(405, "read-only: GET only\n"))
    } else if req.url.len() > MAX_URL {
        Some(Reply::text(414, "URL too long\n"))
    } else {
        None
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        414 => "URI Too Long",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        _ => "",
    }
}

/// Writes `reply` (its head only if `head_only`) and ends the connection's write side.
fn respond(stream: &mut TcpStream, reply: &Reply, head_only: bool) -> io::Result<()> {
    let allow = if reply.status == 405 {
        "Allow: GET, HEAD\r\n"
    } else {
        ""
    };
    let head = format!(
        "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nCache-Control: no-store\r\n\
         {allow}Connection: close\r\n\r\n",
        reply.status,
        reason(reply.status),
        reply.content_type,
        reply.body.len(),
    );
    let mut out = Vec::with_capacity(head.len() + reply.body.len());
    out.extend_from_slice(head.as_bytes());
    if !head_only {
        out.extend_from_slice(&reply.body);
    }
    stream.write_all(&out)?;
    stream.flush()?;
    stream.shutdown(Shutdown::Write)
}

/// Reads what the client still sends (at most [`LINGER_BYTES`], for at most [`LINGER`]) until
/// it closes: closing with unread bytes would reset the connection and could destroy the
/// response before the client has read it.
fn linger(stream: &mut TcpStream) {
    let until = Instant::now() + LINGER;
    let mut left = LINGER_BYTES;
    let mut sink = [0u8; 1024];
    while left > 0 {
        let now = Instant::now();
        if now >= until || stream.set_read_timeout(Some(until - now)).is_err() {
            return;
        }
        match stream.read(&mut sink) {
            Ok(0) | Err(_) => return,
            Ok(n) => left = left.saturating_sub(n),
        }
    }
}

/// Samples the pool's 5-minute hashrate now and every [`HISTORY_EVERY`].
fn history(shared: &Shared, stop: &AtomicBool) {
    let mut next = Instant::now();
    while !stop.load(Ordering::Relaxed) {
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

    fn text(status: u16, body: &'static str) -> Self {
        Self::new(status, "text/plain; charset=utf-8", body)
    }

    fn not_found() -> Self {
        Self::text(404, "not found\n")
    }
}

/// The path of `url` (without query or fragment).
fn url_path(url: &str) -> &str {
    url.split(['?', '#']).next().unwrap_or("")
}

/// The dashboard and its assets, built into the binary.
fn asset(path: &str) -> Option<Reply> {
    let (content_type, body) = match path {
        "/" | "/index.html" => ("text/html; charset=utf-8", INDEX_HTML),
        "/assets/dashboard.js" => ("text/javascript; charset=utf-8", DASHBOARD_JS),
        "/assets/uPlot.iife.min.js" => ("text/javascript; charset=utf-8", UPLOT_JS),
        "/assets/uPlot.min.css" => ("text/css; charset=utf-8", UPLOT_CSS),
        "/assets/uPlot.LICENSE" => ("text/plain; charset=utf-8", UPLOT_LICENSE),
        _ => return None,
    };
    Some(Reply::new(200, content_type, body))
}

/// The reply to a GET of `url` (path and optional query).
fn route(url: &str, shared: &Shared) -> Reply {
    let path = url_path(url);
    let ctx = match &shared.ctx {
        WebCtx::Pool(ctx) => ctx,
        WebCtx::Link(ctx) => return modes::route(path, ctx),
    };
    if let Some(reply) = asset(path) {
        return reply;
    }
    match path {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn head(raw: &str) -> Head<'_> {
        parse_head(raw.as_bytes()).expect("a request head")
    }

    #[test]
    fn a_get_parses_and_is_served() {
        let mut r = &b"GET /api/pool?x=1 HTTP/1.1\r\nHost: a\r\nAccept: */*\r\n\r\nleft over"[..];
        let mut buf = Vec::new();
        let end = read_head(&mut r, &mut buf).expect("a head");
        assert_eq!(&buf[end..], b"left over");
        let req = parse_head(&buf[..end]).expect("a request");
        assert_eq!(
            req,
            Head {
                method: "GET",
                url: "/api/pool?x=1",
                has_body: false
            }
        );
        assert!(refuse(&req).is_none());
        // Lenient: bare `\n` line ends, no version, `Content-Length: 0`.
        let req = head("GET /\nContent-Length: 0\n\n");
        assert_eq!((req.method, req.url, req.has_body), ("GET", "/", false));
        assert!(refuse(&req).is_none());
    }

    #[test]
    fn a_head_is_served() {
        let req = head("HEAD /metrics HTTP/1.0\r\n\r\n");
        assert_eq!(req.method, "HEAD");
        assert!(refuse(&req).is_none());
    }

    #[test]
    fn other_methods_and_bodies_are_405() {
        let status = |raw: &str| refuse(&head(raw)).map(|r| r.status);
        assert_eq!(
            status("POST /api/pool HTTP/1.1\r\nContent-Length: 3\r\n\r\n"),
            Some(405)
        );
        assert_eq!(status("DELETE /metrics HTTP/1.1\r\n\r\n"), Some(405));
        assert_eq!(
            status("GET / HTTP/1.1\r\ncontent-length: 12\r\n\r\n"),
            Some(405)
        );
        assert_eq!(
            status("GET / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"),
            Some(405)
        );
    }

    #[test]
    fn an_oversize_head_is_refused() {
        let raw = format!("GET / HTTP/1.1\r\nX-Big: {}\r\n\r\n", "a".repeat(MAX_HEAD));
        let mut r = raw.as_bytes();
        let mut buf = Vec::new();
        assert!(matches!(
            read_head(&mut r, &mut buf),
            Err(HeadError::TooLarge)
        ));
        assert_eq!(buf.len(), MAX_HEAD, "reads no more than the bound");
        // A head that ends before the bound is fine; one the peer leaves unfinished is not.
        let mut r = &b"GET / HTTP/1.1\r\n"[..];
        assert!(matches!(
            read_head(&mut r, &mut Vec::new()),
            Err(HeadError::Closed)
        ));
    }

    #[test]
    fn a_bad_request_line_is_400() {
        for raw in [
            "\r\n\r\n",
            "GET\r\n\r\n",
            "GET / HTTP/1.1 extra\r\n\r\n",
            "GET / FTP/1.0\r\n\r\n",
            "get / HTTP/1.1\r\n\r\n",
            "GET / HTTP/1.1\r\nno colon\r\n\r\n",
            "GET / HTTP/1.1\r\nContent-Length: lots\r\n\r\n",
        ] {
            assert_eq!(parse_head(raw.as_bytes()), None, "{raw:?}");
        }
        assert_eq!(parse_head(b"GET /\xff HTTP/1.1\r\n\r\n"), None);
    }

    #[test]
    fn a_long_url_is_414() {
        let url = format!("/{}", "a".repeat(MAX_URL));
        let raw = format!("GET {url} HTTP/1.1\r\n\r\n");
        assert_eq!(refuse(&head(&raw)).map(|r| r.status), Some(414));
        let url = format!("/{}", "a".repeat(MAX_URL - 1));
        let raw = format!("GET {url} HTTP/1.1\r\n\r\n");
        assert!(refuse(&head(&raw)).is_none());
    }

    /// Sends `request` and reads the whole answer: the server must close after it.
    fn exchange(addr: std::net::SocketAddr, request: &str) -> String {
        let mut s = TcpStream::connect(addr).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(30)))
            .expect("timeout");
        s.write_all(request.as_bytes()).expect("send");
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).expect("EOF after the response");
        String::from_utf8(raw).expect("UTF-8")
    }

    #[test]
    fn the_server_answers_one_request_and_closes() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("address");
        let handler: Handler =
            Arc::new(|url: &str| asset(url_path(url)).unwrap_or_else(Reply::not_found));
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        spawn_http(listener, handler, &stop, &mut threads).expect("spawn");

        // A keep-alive request still gets its whole response and then EOF.
        let text = exchange(
            addr,
            "GET / HTTP/1.1\r\nHost: t\r\nConnection: keep-alive\r\n\r\n",
        );
        let (head, body) = text.split_once("\r\n\r\n").expect("a response");
        assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
        assert!(head.contains("\r\nConnection: close"), "{head}");
        assert!(head.contains("\r\nCache-Control: no-store"), "{head}");
        assert!(
            head.contains(&format!("\r\nContent-Length: {}", INDEX_HTML.len())),
            "{head}"
        );
        assert_eq!(body, INDEX_HTML);

        // HEAD: the same head, no body.
        let text = exchange(addr, "HEAD / HTTP/1.0\r\n\r\n");
        let (head, body) = text.split_once("\r\n\r\n").expect("a response");
        assert!(
            head.contains(&format!("\r\nContent-Length: {}", INDEX_HTML.len())),
            "{head}"
        );
        assert_eq!(body, "");

        // Refusals: a POST with its body, a bad line, an unknown path, an oversize head.
        let text = exchange(addr, "POST / HTTP/1.1\r\nContent-Length: 4\r\n\r\nbody");
        assert!(text.starts_with("HTTP/1.1 405 "), "{text}");
        assert!(text.contains("\r\nAllow: GET, HEAD\r\n"), "{text}");
        assert!(exchange(addr, "nonsense\r\n\r\n").starts_with("HTTP/1.1 400 "));
        assert!(exchange(addr, "GET /nope HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 404 "));
        let big = format!("GET / HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(MAX_HEAD));
        assert!(exchange(addr, &big).starts_with("HTTP/1.1 431 "));

        // Stopping joins every thread.
        stop.store(true, Ordering::Relaxed);
        assert_eq!(threads.len(), WORKERS + 1);
        for t in threads {
            t.join().expect("a web thread panicked");
        }
    }
}
