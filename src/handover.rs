//! Zero-disconnect upgrades (`-H`): a new instance takes the listening sockets and the live
//! connections over from the running one, and the miners notice nothing.
//!
//! ## Protocol
//!
//! On the old instance's admin socket (`<sockdir>/listener`) the new one sends the admin message
//! `handover <version>` ([`VERSION`]: the version of the state both sides must agree on). The
//! old one answers `ok`, or `refused: <reason>` (another version, or a handover already under
//! way), and from then on both speak the frames of [`wire`] on the same socket:
//!
//! 1. old → new `Listeners`: a descriptor per listening socket (`SCM_RIGHTS`), their addresses
//!    one a line;
//! 2. old → new `PoolState`: the stratifier's state, opaque ([`StateHooks`]);
//! 3. new → old `Ack` once its connector runs (ready), carrying how many descriptors it can
//!    take in the next batch (its open-files limit less what it has open, at most
//!    [`wire::MAX_FDS`]);
//! 4. old → new `Batch`, as many as needed: at most that many connections, their descriptors
//!    and their `connector::ConnState::encode` bytes (whose `user` part is the session as the
//!    handler's `on_export` left it); new → old `Ack` with the count adopted and the room for
//!    the next batch, after which the old instance closes its copies;
//! 5. old → new `Commit`, new → old `Ack`: the new instance owns everything, the old one exits 0.
//!
//! The old instance quiesces its connector when it says `ok` (no accepting, no reading, what it
//! owes flushed), so nothing is read twice or lost: a connection's unread bytes stay in its
//! socket, its partial line and unsent bytes travel in its state.
//!
//! ## Failure half way
//!
//! Until the commit, the old instance holds a descriptor of every connection not yet acked. If
//! the new instance disconnects, errs, refuses (`Abort`) or does not answer within
//! [`ACK_TIMEOUT`], the old one resumes its connector and adopts those connections back, and
//! keeps serving; the new one exits with the reason. Connections already acked belong to the new
//! instance.
//!
//! ## What moves
//!
//! The pool state ([`PoolHooks`]: `stratifier::Pool::export_state` / `import_state`: the job
//! books with their duplicate sets, the extranonce1 and session-id counters and keys, the
//! parked sessions, the share totals and the users' and workers' figures) and each
//! connection's session (`crate::handoff`'s handler: `Shard::export_session` in `on_export`,
//! `adopt_session` in `on_adopt`); a passthrough or node link goes with every sub-client's
//! session and what the link is (`crate::links::Links::export_link` / `adopt_link`; version 2),
//! so the passthrough behind it sees the same connection and its miners keep their sessions.
//! In proxy and userproxy mode every upstream connection goes too, as its socket and its
//! stratum client state, beside the pool state (`crate::modes::proxy`'s `ho` module).
//! Before the pool state is taken, the old instance settles
//! (`crate::handoff::settle`): every line it read has been judged and its reply queued, so the
//! totals are final and no reply is lost. The generator is not handed over: the new instance
//! starts its own (blocks waiting on disk are resubmitted as at every start).

pub(crate) mod wire;

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use connector::{ConnState, Connector, ExportedConn, InheritedListener};
use tracing::{debug, error, info, warn};

use self::wire::{Frame, Kind};
use crate::handoff::{self, Msg};

/// Version of the state a handover carries (frames, connection states, pool state, sessions).
/// Two builds hand over only when they agree on it. 2: passthrough links carry their
/// sub-clients.
pub(crate) const VERSION: u32 = 2;
/// How long either side waits for the other's next frame.
pub(crate) const ACK_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the old instance tries to write what it owes before it exports the rest.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(2);
/// The environment variable that makes a new instance ask with another version (for tests of
/// the refusal).
pub(crate) const TEST_VERSION: &str = "CKPOOL_RS_HANDOVER_TEST_VERSION";
/// The environment variable that makes a new instance exit on purpose once it has received the
/// given number of batches, before adopting the last one (for tests of the failure path).
pub(crate) const TEST_EXIT_AFTER_BATCHES: &str = "CKPOOL_RS_HANDOVER_TEST_EXIT_AFTER_BATCHES";

/// Handovers this process took part in: (sent: committed as the old instance, received:
/// committed as the new one, failed: either side).
static SENT: AtomicU64 = AtomicU64::new(0);
static RECEIVED: AtomicU64 = AtomicU64::new(0);
static FAILED: AtomicU64 = AtomicU64::new(0);

/// Handovers this process took part in, for the metrics: `(sent, received, failed)`. Sent:
/// this instance handed everything over (and is about to exit); received: it took a running
/// instance over; failed: a handover it gave or took failed half way (on the taking side the
/// process exits after it, so it is seen mostly on the giving side, which serves on).
pub(crate) fn counts() -> (u64, u64, u64) {
    (
        SENT.load(Ordering::Relaxed),
        RECEIVED.load(Ordering::Relaxed),
        FAILED.load(Ordering::Relaxed),
    )
}

/// What a handover carries besides sockets: the stratifier's pool state (connection sessions
/// travel in `ConnState::user`, from the handler's `on_export` to `on_adopt`).
pub(crate) trait StateHooks {
    /// The old instance's pool state, opaque.
    fn export_pool_state(&self) -> Vec<u8>;
    /// The new instance takes the old one's pool state (before it serves anyone).
    fn import_pool_state(&self, blob: &[u8]) -> anyhow::Result<()>;
}

/// What the old instance's mode does around the hand-over of its connections ([`give`]).
pub(crate) trait GiveHooks {
    /// Once the connector is quiesced: every line read is judged and its replies queued, and
    /// nothing else will change the state sent next (before `deadline`).
    fn settle(&self, deadline: Instant) -> anyhow::Result<()>;
    /// The state to send as `PoolState`, with the descriptors that go with it.
    fn export_state(&self) -> anyhow::Result<(Vec<u8>, Vec<OwnedFd>)>;
    /// The handover failed: undo [`GiveHooks::settle`] before the connector resumes.
    fn release(&self);
    /// The handover failed and the connections not acked are back: serve on.
    fn taken_back(&self) {}
}

/// Pool and solo mode's [`GiveHooks`]: the stratifier's shards settle, the pool state goes.
pub(crate) struct PoolGive<'a> {
    /// The connector, whose stratifier shards settle.
    pub(crate) conns: &'a Connector<Msg>,
    /// The pool.
    pub(crate) hooks: &'a dyn StateHooks,
}

impl GiveHooks for PoolGive<'_> {
    fn settle(&self, deadline: Instant) -> anyhow::Result<()> {
        if handoff::settle(self.conns, deadline) {
            Ok(())
        } else {
            Err(anyhow!("the stratifier did not settle in time"))
        }
    }

    fn export_state(&self) -> anyhow::Result<(Vec<u8>, Vec<OwnedFd>)> {
        Ok((self.hooks.export_pool_state(), Vec::new()))
    }

    fn release(&self) {
        handoff::release(self.conns);
    }
}

/// The daemon's [`StateHooks`]: the stratifier's pool.
pub(crate) struct PoolHooks(pub(crate) Arc<stratifier::Pool>);

impl StateHooks for PoolHooks {
    fn export_pool_state(&self) -> Vec<u8> {
        self.0.export_state(Instant::now())
    }

    fn import_pool_state(&self, blob: &[u8]) -> anyhow::Result<()> {
        self.0
            .import_state(Instant::now(), blob)
            .context("importing the old instance's pool state")
    }
}

/// The admin reply to `handover <version>` when the versions differ (`None` when they agree).
pub(crate) fn version_refusal(arg: &str) -> Option<String> {
    match arg.trim().parse::<u32>() {
        Ok(VERSION) => None,
        Ok(v) => Some(format!(
            "refused: this instance's handover state format is version {VERSION}, the new one's is {v}"
        )),
        Err(_) => Some(format!("refused: bad handover version {arg:?}")),
    }
}

// ---------------------------------------------------------------------------------------------
// The old instance

/// How a handover ended for the old instance.
#[derive(Debug)]
pub(crate) enum Outcome {
    /// The new instance owns everything: exit (0) without disconnecting anyone.
    Committed {
        /// Connections handed over.
        connections: usize,
    },
    /// The handover failed; every connection not acked was taken back, the connector serves
    /// again.
    Failed(anyhow::Error),
}

/// Hands the connector's listeners and connections over on `stream` (whose `handover` request
/// has been answered `ok`). Blocks until the commit or the failure.
pub(crate) fn give<M: Send + Clone + 'static>(
    conns: &Connector<M>,
    stream: &UnixStream,
    hooks: &dyn GiveHooks,
) -> Outcome {
    let started = Instant::now();
    let reports = conns.quiesce(Instant::now() + FLUSH_TIMEOUT);
    if let Err(e) = hooks.settle(Instant::now() + FLUSH_TIMEOUT) {
        let _ = wire::send(stream, Kind::Abort, format!("{e:#}").as_bytes(), &[]);
        hooks.release();
        conns.resume();
        hooks.taken_back();
        error!(error = %format!("{e:#}"), "handover failed; serving on");
        FAILED.fetch_add(1, Ordering::Relaxed);
        return Outcome::Failed(e);
    }
    let held: usize = reports.iter().map(|r| r.connections).sum();
    let unflushed = reports.iter().filter(|r| !r.flushed).count();
    info!(
        connections = held,
        unflushed_threads = unflushed,
        "handover: quiesced"
    );
    let mut handed = 0;
    match give_all(conns, stream, hooks, &mut handed) {
        Ok(()) => {
            info!(
                connections = handed,
                ms = started.elapsed().as_millis(),
                "handover committed"
            );
            SENT.fetch_add(1, Ordering::Relaxed);
            Outcome::Committed {
                connections: handed,
            }
        }
        Err((e, pending)) => {
            let _ = wire::send(stream, Kind::Abort, format!("{e:#}").as_bytes(), &[]);
            hooks.release();
            conns.resume();
            let back = take_back(conns, pending);
            hooks.taken_back();
            error!(error = %format!("{e:#}"), handed_over = handed, taken_back = back, "handover failed; serving on");
            FAILED.fetch_add(1, Ordering::Relaxed);
            Outcome::Failed(e)
        }
    }
}

/// The old side's steps; on failure, the error and the connections exported and not acked.
fn give_all<M: Send + Clone + 'static>(
    conns: &Connector<M>,
    stream: &UnixStream,
    hooks: &dyn GiveHooks,
    handed: &mut usize,
) -> Result<(), (anyhow::Error, Vec<ExportedConn>)> {
    let fail = |e: anyhow::Error| (e, Vec::new());
    stream
        .set_read_timeout(Some(ACK_TIMEOUT))
        .and_then(|()| stream.set_write_timeout(Some(ACK_TIMEOUT)))
        .map_err(|e| fail(e.into()))?;
    let listeners = conns
        .listeners()
        .context("duplicating the listeners")
        .map_err(fail)?;
    let addrs: String = conns
        .local_addrs()
        .iter()
        .map(|a| format!("{a}\n"))
        .collect();
    let fds: Vec<BorrowedFd<'_>> = listeners.iter().map(AsFd::as_fd).collect();
    wire::send(stream, Kind::Listeners, addrs.as_bytes(), &fds)
        .context("sending the listeners")
        .map_err(fail)?;
    drop(fds);
    drop(listeners);
    let (state, state_fds) = hooks.export_state().map_err(fail)?;
    let fds: Vec<BorrowedFd<'_>> = state_fds.iter().map(AsFd::as_fd).collect();
    wire::send(stream, Kind::PoolState, &state, &fds)
        .context("sending the pool state")
        .map_err(fail)?;
    drop(fds);
    drop(state_fds);
    // The new instance says when its connector runs, and after each batch, how many
    // descriptors it can take next (its open-files limit): a batch never exceeds it.
    let (_, mut room) = expect_ack(stream)
        .context("waiting for the new instance to be ready")
        .map_err(fail)?;
    loop {
        let want = room.min(wire::MAX_FDS);
        if want == 0 {
            return Err(fail(anyhow!(
                "the new instance has no descriptor left for the next batch (its open-files limit)"
            )));
        }
        let batch = conns
            .export(want)
            .context("exporting connections")
            .map_err(fail)?;
        if batch.is_empty() {
            break;
        }
        let states: Vec<ConnState> = batch.iter().map(|c| c.state.clone()).collect();
        let fds: Vec<BorrowedFd<'_>> = batch.iter().map(|c| c.fd.as_fd()).collect();
        let sent = wire::send(stream, Kind::Batch, &wire::encode_batch(&states), &fds)
            .context("sending a batch");
        drop(fds);
        let acked = sent.and_then(|()| expect_ack(stream));
        match acked {
            Ok((n, next_room)) => {
                if n != batch.len() {
                    warn!(
                        sent = batch.len(),
                        adopted = n,
                        "the new instance could not adopt every connection of a batch"
                    );
                }
                *handed += batch.len();
                debug!(
                    connections = batch.len(),
                    next_room, "handover: batch acked"
                );
                room = next_room;
                // Our copies close here: the new instance has them.
                drop(batch);
            }
            Err(e) => return Err((e, batch)),
        }
    }
    wire::send(stream, Kind::Commit, b"", &[])
        .context("sending the commit")
        .map_err(fail)?;
    expect_ack(stream)
        .context("waiting for the commit's ack")
        .map_err(fail)?;
    Ok(())
}

/// Waits for an `Ack`: the count it acknowledges and the descriptors the new instance can
/// take in the next batch.
fn expect_ack(stream: &UnixStream) -> anyhow::Result<(usize, usize)> {
    let frame = wire::recv(stream).context("waiting for the new instance's ack")?;
    match frame.kind {
        Kind::Ack => wire::parse_ack(&frame.payload).ok_or_else(|| anyhow!("short ack")),
        Kind::Abort => bail!(
            "the new instance gave up: {}",
            String::from_utf8_lossy(&frame.payload)
        ),
        other => bail!("unexpected {other:?} frame instead of an ack"),
    }
}

/// Adopts exported connections back into `conns`, spread over its threads; returns how many.
fn take_back<M: Send + Clone + 'static>(conns: &Connector<M>, batch: Vec<ExportedConn>) -> usize {
    let mut ok = 0;
    for (t, group) in spread(
        conns.threads(),
        batch.into_iter().map(|c| (c.fd, c.state)).collect(),
    ) {
        for r in conns.adopt(t, group) {
            match r {
                Ok(_) => ok += 1,
                Err(e) => warn!(error = %e, "a connection could not be taken back"),
            }
        }
    }
    ok
}

/// Splits connections over `threads` threads, round robin: `(thread, its connections)`.
fn spread(
    threads: usize,
    conns: Vec<(OwnedFd, ConnState)>,
) -> Vec<(usize, Vec<(OwnedFd, ConnState)>)> {
    let threads = threads.max(1);
    let mut groups: Vec<Vec<(OwnedFd, ConnState)>> = (0..threads).map(|_| Vec::new()).collect();
    for (i, c) in conns.into_iter().enumerate() {
        if let Some(g) = groups.get_mut(i % threads) {
            g.push(c);
        }
    }
    groups
        .into_iter()
        .enumerate()
        .filter(|(_, g)| !g.is_empty())
        .collect()
}

// ---------------------------------------------------------------------------------------------
// The new instance

/// A handover under way, on the new instance's side: the listeners have arrived.
pub(crate) struct Incoming {
    stream: UnixStream,
    /// The old instance's listening sockets, by listener index.
    pub(crate) listeners: Vec<InheritedListener>,
    /// Their addresses, as the old instance listed them (for the log).
    pub(crate) addrs: Vec<String>,
}

/// Asks the instance on the admin socket `admin` for a handover and receives its listeners.
/// `Ok(None)` when no instance listens there.
pub(crate) fn request(admin: &Path) -> anyhow::Result<Option<Incoming>> {
    let stream = match UnixStream::connect(admin) {
        Ok(s) => s,
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Ok(None);
        }
        Err(e) => {
            return Err(e).with_context(|| format!("connecting to {}", admin.display()));
        }
    };
    stream.set_read_timeout(Some(ACK_TIMEOUT))?;
    stream.set_write_timeout(Some(ACK_TIMEOUT))?;
    let mut s = &stream;
    let version = std::env::var(TEST_VERSION)
        .ok()
        .and_then(|v| v.parse::<u32>().ok())
        .unwrap_or(VERSION);
    common::admin::write_message(&mut s, format!("handover {version}").as_bytes())
        .context("asking the running instance for a handover")?;
    let reply = common::admin::read_message(&mut s)
        .context("reading the running instance's answer")?
        .ok_or_else(|| anyhow!("the running instance closed the admin socket"))?;
    let reply = String::from_utf8_lossy(&reply);
    if reply != "ok" {
        bail!("the running instance refused the handover: {reply}");
    }
    let frame = recv_kind(&stream, Kind::Listeners)?;
    if frame.fds.is_empty() {
        bail!("the running instance handed over no listener");
    }
    let addrs = String::from_utf8_lossy(&frame.payload)
        .lines()
        .map(str::to_owned)
        .collect();
    Ok(Some(Incoming {
        stream,
        listeners: frame.fds.into_iter().map(InheritedListener::from).collect(),
        addrs,
    }))
}

impl Incoming {
    /// Receives the pool state into `hooks` (before the connector starts).
    pub(crate) fn import_pool_state(&self, hooks: &dyn StateHooks) -> anyhow::Result<()> {
        let frame = recv_kind(&self.stream, Kind::PoolState)?;
        hooks
            .import_pool_state(&frame.payload)
            .inspect_err(|e| self.abort(&format!("{e:#}")))
    }

    /// Receives the old instance's state (a mode's own, opaque here) with the descriptors that
    /// came with it (before the connector starts).
    pub(crate) fn recv_state(&self) -> anyhow::Result<(Vec<u8>, Vec<OwnedFd>)> {
        let frame = recv_kind(&self.stream, Kind::PoolState)?;
        Ok((frame.payload, frame.fds))
    }

    /// Tells the old instance the handover is off (it keeps serving).
    pub(crate) fn abort(&self, reason: &str) {
        let _ = wire::send(&self.stream, Kind::Abort, reason.as_bytes(), &[]);
    }

    /// Adopts every batch into `conns` (spread over its threads), acking each, until the
    /// commit; returns the connections adopted.
    pub(crate) fn adopt_all<M: Send + Clone + 'static>(
        self,
        conns: &Connector<M>,
    ) -> anyhow::Result<usize> {
        let adopted = self.adopt_batches(conns);
        match adopted {
            Ok(_) => RECEIVED.fetch_add(1, Ordering::Relaxed),
            Err(_) => FAILED.fetch_add(1, Ordering::Relaxed),
        };
        adopted
    }

    fn adopt_batches<M: Send + Clone + 'static>(
        self,
        conns: &Connector<M>,
    ) -> anyhow::Result<usize> {
        let exit_after: Option<usize> = std::env::var(TEST_EXIT_AFTER_BATCHES)
            .ok()
            .and_then(|v| v.parse().ok());
        let (mut adopted, mut batches) = (0, 0usize);
        // Ready: the connector runs.
        wire::send(
            &self.stream,
            Kind::Ack,
            &wire::ack_payload(0, fd_room()),
            &[],
        )
        .context("telling the old instance this one is ready")?;
        loop {
            let frame = wire::recv(&self.stream).context("receiving from the old instance")?;
            match frame.kind {
                Kind::Batch => {
                    batches += 1;
                    if exit_after.is_some_and(|n| batches >= n) {
                        error!(batches, "handover test: exiting on purpose mid-handover");
                        std::process::exit(86);
                    }
                    let Frame { payload, fds, .. } = frame;
                    let states = match wire::decode_batch(&payload, fds.len()) {
                        Ok(s) => s,
                        Err(e) => {
                            self.abort(&format!("bad batch: {e}"));
                            return Err(e).context("a bad batch");
                        }
                    };
                    let mut n = 0;
                    for (t, group) in spread(conns.threads(), fds.into_iter().zip(states).collect())
                    {
                        for r in conns.adopt(t, group) {
                            match r {
                                Ok(_) => n += 1,
                                Err(e) => warn!(error = %e, "cannot adopt a connection"),
                            }
                        }
                    }
                    adopted += n;
                    wire::send(
                        &self.stream,
                        Kind::Ack,
                        &wire::ack_payload(n, fd_room()),
                        &[],
                    )
                    .context("acking a batch")?;
                }
                Kind::Commit => {
                    wire::send(&self.stream, Kind::Ack, &wire::ack_payload(adopted, 0), &[])
                        .context("acking the commit")?;
                    return Ok(adopted);
                }
                Kind::Abort => bail!(
                    "the old instance called the handover off: {}",
                    String::from_utf8_lossy(&frame.payload)
                ),
                other => bail!("unexpected {other:?} frame from the old instance"),
            }
        }
    }
}

/// Descriptors this process can still open, less a margin for what it opens meanwhile (log
/// files, sockets to bitcoind, the admin socket): the most the next batch may carry (a
/// received descriptor past the open-files limit would be lost). On io_uring an adopted
/// connection's descriptor is closed once installed, so this comes back after each batch.
fn fd_room() -> usize {
    /// Descriptors kept free for everything else.
    const MARGIN: u64 = 32;
    let limit = rustix::process::getrlimit(rustix::process::Resource::Nofile)
        .current
        .unwrap_or(u64::MAX);
    let open = std::fs::read_dir("/proc/self/fd").map_or(0, Iterator::count) as u64;
    let room = limit.saturating_sub(open).saturating_sub(MARGIN);
    usize::try_from(room)
        .unwrap_or(usize::MAX)
        .min(wire::MAX_FDS)
}

/// Receives a frame of kind `want` (an `Abort` is an error with its reason).
fn recv_kind(stream: &UnixStream, want: Kind) -> anyhow::Result<Frame> {
    let frame = wire::recv(stream).with_context(|| format!("receiving {want:?}"))?;
    match frame.kind {
        k if k == want => Ok(frame),
        Kind::Abort => bail!(
            "the old instance called the handover off: {}",
            String::from_utf8_lossy(&frame.payload)
        ),
        other => bail!("expected {want:?}, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// Admin `restart`

/// Starts this program's binary again with the same arguments plus `-H`, so that it takes this
/// instance over. The binary is the file at the path this process was started from (read from
/// `/proc/self/exe`, so a binary replaced there since is the one started). A thread reaps the
/// child and logs how it ended. Returns its pid.
pub(crate) fn restart() -> io::Result<u32> {
    let exe = std::fs::read_link("/proc/self/exe")?;
    let exe = exe
        .to_str()
        .and_then(|s| s.strip_suffix(" (deleted)"))
        .map_or(exe.clone(), std::path::PathBuf::from);
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    if !args.iter().any(|a| a == "-H" || a == "--handover") {
        args.push("-H".into());
    }
    let mut child = std::process::Command::new(&exe)
        .args(&args)
        .stdin(std::process::Stdio::null())
        .spawn()?;
    let pid = child.id();
    info!(pid, exe = %exe.display(), "restart: started the new instance with -H");
    std::thread::Builder::new()
        .name("restart-reaper".into())
        .spawn(move || match child.wait() {
            Ok(status) if status.success() => info!(pid, "the restarted instance exited"),
            Ok(status) => warn!(pid, %status, "the restarted instance exited"),
            Err(e) => warn!(pid, error = %e, "cannot wait for the restarted instance"),
        })?;
    Ok(pid)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_same_version_is_accepted() {
        assert_eq!(version_refusal(&VERSION.to_string()), None);
        let r = version_refusal(&(VERSION + 1).to_string()).expect("refused");
        assert!(r.starts_with("refused: "), "{r}");
        assert!(r.contains(&format!("version {VERSION}")), "{r}");
        assert!(version_refusal("x").is_some());
    }

    #[test]
    fn spread_deals_connections_round_robin() {
        let (a, _b) = UnixStream::pair().expect("pair");
        let state = ConnState {
            peer: "127.0.0.1:1".parse().expect("addr"),
            listener: 0,
            partial: Vec::new(),
            unsent: Vec::new(),
            user: Vec::new(),
        };
        let conns: Vec<(OwnedFd, ConnState)> = (0..5)
            .map(|_| (OwnedFd::from(a.try_clone().expect("dup")), state.clone()))
            .collect();
        let groups = spread(2, conns);
        let sizes: Vec<(usize, usize)> = groups.iter().map(|(t, g)| (*t, g.len())).collect();
        assert_eq!(sizes, vec![(0, 3), (1, 2)]);
        let one = spread(8, vec![(OwnedFd::from(a), state)]);
        assert_eq!(one.len(), 1);
    }
}
