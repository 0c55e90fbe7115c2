//! A TCP proxy in front of a node's RPC port that a test can turn into a faulty node:
//!
//! - **refuse** `submitblock`: a connection whose request names `submitblock` is closed before
//!   the request is complete, so the node never sees it and the pool gets a transport error (as
//!   when the node is briefly unreachable), and retries;
//! - **stall** requests naming given methods: the request is held, never forwarded and never
//!   answered, until the stall is lifted (then the connection is closed) or the pool gives up
//!   (its RPC timeout);
//! - **garbage**: every request is answered by the proxy itself with an HTTP 200 whose body is
//!   not JSON or is cut short (alternately), and the connection is closed.
//!
//! It also remembers the header (first 80 bytes, as hex) of every `submitblock` it forwarded, so
//! a test can tell whether a block reached the node twice.
#![allow(dead_code, unreachable_pub, reason = "test support")]
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "test support")]

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

/// The running proxy; its threads end with the test process.
pub struct RpcProxy {
    /// Where the pool should connect (`127.0.0.1:port`).
    pub addr: SocketAddr,
    state: Arc<State>,
}

struct State {
    refuse: AtomicBool,
    refused: AtomicUsize,
    /// When each refusal happened, for the test's log.
    refusals: Mutex<Vec<Instant>>,
    /// Methods whose requests are held unanswered.
    stall: Mutex<Vec<&'static str>>,
    stalled: AtomicUsize,
    garbage: AtomicBool,
    garbled: AtomicUsize,
    /// Headers (160 hex digits) of the `submitblock` requests forwarded to the node.
    submitted: Mutex<Vec<String>>,
}

impl RpcProxy {
    /// Starts a proxy to `node` (its RPC `host:port`), refusing `submitblock` from the start if
    /// `refuse`.
    pub fn start(node: &str, refuse: bool) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let node: SocketAddr = node.parse().unwrap();
        let state = Arc::new(State {
            refuse: AtomicBool::new(refuse),
            refused: AtomicUsize::new(0),
            refusals: Mutex::new(Vec::new()),
            stall: Mutex::new(Vec::new()),
            stalled: AtomicUsize::new(0),
            garbage: AtomicBool::new(false),
            garbled: AtomicUsize::new(0),
            submitted: Mutex::new(Vec::new()),
        });
        let st = Arc::clone(&state);
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                let Ok(upstream) = TcpStream::connect(node) else {
                    continue;
                };
                let st = Arc::clone(&st);
                std::thread::spawn(move || relay(client, upstream, &st));
            }
        });
        Self { addr, state }
    }

    /// Stops or starts refusing `submitblock`.
    pub fn set_refuse(&self, refuse: bool) {
        self.state.refuse.store(refuse, Ordering::SeqCst);
    }

    /// How many `submitblock` requests were refused so far.
    pub fn refused(&self) -> usize {
        self.state.refused.load(Ordering::SeqCst)
    }

    /// When they were refused.
    pub fn refusals(&self) -> Vec<Instant> {
        self.state.refusals.lock().clone()
    }

    /// Holds requests naming any of `methods` unanswered from now on (an empty list lifts the
    /// stall: held connections are closed).
    pub fn set_stall(&self, methods: &[&'static str]) {
        *self.state.stall.lock() = methods.to_vec();
    }

    /// How many requests were held so far.
    pub fn stalled(&self) -> usize {
        self.state.stalled.load(Ordering::SeqCst)
    }

    /// Answers every request with a malformed body from now on, or stops doing so.
    pub fn set_garbage(&self, garbage: bool) {
        self.state.garbage.store(garbage, Ordering::SeqCst);
    }

    /// How many requests got a malformed answer so far.
    pub fn garbled(&self) -> usize {
        self.state.garbled.load(Ordering::SeqCst)
    }

    /// The headers (160 hex digits) of the blocks forwarded to the node with `submitblock`,
    /// once per request.
    pub fn submitted_headers(&self) -> Vec<String> {
        self.state.submitted.lock().clone()
    }
}

/// The first 160 hex digits of the first string in the request's `params`, if this chunk has
/// them.
fn submitted_header(chunk: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(chunk);
    let params = text.find("\"params\"")?;
    let rest = &text[params + 8..];
    let open = rest.find('[')?;
    let rest = &rest[open..];
    let quote = rest.find('"')?;
    let hex = rest.get(quote + 1..quote + 161)?;
    hex.bytes()
        .all(|b| b.is_ascii_hexdigit())
        .then(|| hex.to_ascii_lowercase())
}

/// Copies client → node (inspecting) on this thread and node → client on another.
fn relay(mut client: TcpStream, mut upstream: TcpStream, st: &State) {
    let (Ok(mut back_from), Ok(mut back_to)) = (upstream.try_clone(), client.try_clone()) else {
        return;
    };
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut back_from, &mut back_to);
        let _ = back_to.shutdown(Shutdown::Both);
    });
    const SUBMIT: &str = "submitblock";
    const KEEP: usize = 64;
    let has = |hay: &[u8], needle: &str| hay.windows(needle.len()).any(|w| w == needle.as_bytes());
    let mut tail: Vec<u8> = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match client.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        // The last bytes of what came before plus this chunk, so a name split across reads is
        // seen too.
        if buf[..n].starts_with(b"POST ") {
            // A new request on a kept-alive connection: the last one's name is not this one's.
            tail.clear();
        }
        tail.extend_from_slice(&buf[..n]);
        if st.garbage.load(Ordering::SeqCst) {
            let k = st.garbled.fetch_add(1, Ordering::SeqCst);
            let reply: &[u8] = if k.is_multiple_of(2) {
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 19\r\n\r\n<html>not json</htm"
            } else {
                // Cut short: fewer bytes than Content-Length, then the connection closes.
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 400\r\n\r\n{\"result\":{\"version\":536870912,\"previousblockhash\":\"00"
            };
            let _ = client.write_all(reply);
            break;
        }
        let stall = st.stall.lock().clone();
        if let Some(method) = stall.iter().find(|m| has(&tail, m)) {
            // Held: never forwarded, never answered, until the stall is lifted or the pool
            // closes the connection.
            st.stalled.fetch_add(1, Ordering::SeqCst);
            let _ = client.set_read_timeout(Some(Duration::from_millis(50)));
            loop {
                if !st.stall.lock().contains(method) {
                    break;
                }
                match client.read(&mut buf) {
                    Ok(0) => break,
                    Ok(_) => {}
                    Err(e)
                        if matches!(
                            e.kind(),
                            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                        ) => {}
                    Err(_) => break,
                }
            }
            break;
        }
        let submit = has(&tail, SUBMIT);
        if submit && st.refuse.load(Ordering::SeqCst) {
            // This chunk is not forwarded: the node never gets a whole request.
            st.refused.fetch_add(1, Ordering::SeqCst);
            st.refusals.lock().push(Instant::now());
            break;
        }
        if submit && let Some(header) = submitted_header(&buf[..n]) {
            st.submitted.lock().push(header);
        }
        if upstream.write_all(&buf[..n]).is_err() {
            break;
        }
        let keep = tail.len().saturating_sub(KEEP);
        tail.drain(..keep);
    }
    let _ = client.shutdown(Shutdown::Both);
    let _ = upstream.shutdown(Shutdown::Both);
}
