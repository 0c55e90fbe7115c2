//! A TCP proxy in front of a node's RPC port that can refuse `submitblock`: while refusing, a
//! connection whose request names `submitblock` is closed before the request is complete, so
//! the node never sees it and the pool gets a transport error (as when the node is briefly
//! unreachable), and retries.
#![allow(dead_code, unreachable_pub, reason = "test support")]
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "test support")]

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Instant;

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
    const NEEDLE: &[u8] = b"submitblock";
    let mut tail: Vec<u8> = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match client.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        // The last bytes of what came before plus this chunk, so a name split across reads is
        // seen too.
        tail.extend_from_slice(&buf[..n]);
        let found = tail.windows(NEEDLE.len()).any(|w| w == NEEDLE);
        if found && st.refuse.load(Ordering::SeqCst) {
            // This chunk is not forwarded: the node never gets a whole request.
            st.refused.fetch_add(1, Ordering::SeqCst);
            st.refusals.lock().push(Instant::now());
            break;
        }
        if upstream.write_all(&buf[..n]).is_err() {
            break;
        }
        let keep = tail.len().saturating_sub(NEEDLE.len() - 1);
        tail.drain(..keep);
    }
    let _ = client.shutdown(Shutdown::Both);
    let _ = upstream.shutdown(Shutdown::Both);
}
