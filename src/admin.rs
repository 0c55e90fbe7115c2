//! The admin unix socket (`<sockdir>/listener`), framed as ckpool's (see `common::admin`).
//!
//! Commands: `ping` → `pong`; `stats` → JSON statistics; `update` → asks the generator for a new
//! template (what the notifier sends); `shutdown` → `exiting`; anything else → `unknown`.

use std::io;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::Duration;

use tracing::{debug, warn};

/// What the admin socket can reach.
pub(crate) struct AdminCtx {
    pub(crate) io: String,
    /// How connector threads hand events to the stratifier (`inline` or `queue`).
    pub(crate) handoff: String,
    pub(crate) pool: Arc<stratifier::Pool>,
    pub(crate) generator: Arc<generator::Generator>,
    pub(crate) shutdown: Arc<AtomicBool>,
}

/// Binds the socket and serves it on its own thread.
pub(crate) fn start(path: &Path, ctx: AdminCtx) -> io::Result<thread::JoinHandle<()>> {
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path)?;
    listener.set_nonblocking(true)?;
    thread::Builder::new().name("admin".into()).spawn(move || {
        while !ctx.shutdown.load(Ordering::Relaxed) {
            match listener.accept() {
                Ok((stream, _)) => {
                    if let Err(e) = serve(stream, &ctx) {
                        debug!(error = %e, "admin request failed");
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    thread::sleep(Duration::from_millis(50))
                }
                Err(e) => {
                    warn!(error = %e, "admin accept failed");
                    thread::sleep(Duration::from_millis(200));
                }
            }
        }
    })
}

fn serve(mut stream: UnixStream, ctx: &AdminCtx) -> io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.set_write_timeout(Some(Duration::from_secs(10)))?;
    let Some(msg) = common::admin::read_message(&mut stream)? else {
        return Ok(());
    };
    let cmd = String::from_utf8_lossy(&msg);
    let cmd = cmd.trim();
    let reply: Vec<u8> = match cmd {
        "ping" => b"pong".to_vec(),
        "stats" | "stratifierstats" => {
            let mut stats = serde_json::to_value(ctx.pool.stats()).unwrap_or_default();
            if let Some(obj) = stats.as_object_mut() {
                obj.insert("server".into(), ctx.generator.active_server().into());
                obj.insert("io".into(), ctx.io.clone().into());
                obj.insert("handoff".into(), ctx.handoff.clone().into());
            }
            stats.to_string().into_bytes()
        }
        "update" => {
            ctx.generator.request_update();
            b"updating".to_vec()
        }
        "shutdown" => {
            ctx.shutdown.store(true, Ordering::Relaxed);
            b"exiting".to_vec()
        }
        _ => b"unknown".to_vec(),
    };
    common::admin::write_message(&mut stream, &reply)
}
