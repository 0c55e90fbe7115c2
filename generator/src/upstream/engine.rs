//! The failover engine shared by [`super::Pool`] and [`super::PassthroughLink`]: connections,
//! reader threads, the active link and the fail-back probe. The protocol is a [`Session`].

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream, ToSocketAddrs};
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Select, Sender, bounded, never};

use super::{SendError, Shared, UpstreamError, check, host_port};

/// Longest line read from an upstream: room for a node link's `transactions` or `workinfo`
/// carrying a whole block's transactions in hex; a longer line takes the connection down.
pub(crate) const MAX_LINE: usize = 16 << 20;
/// Lines a connection's thread reads ahead of the engine. With [`MAX_LINE`] this bounds the
/// memory a connection holds; usual lines are a few hundred bytes.
const READ_AHEAD: usize = 16;
/// How often a connection's reader looks at its pause flag while the upstream is silent (its
/// socket's receive timeout).
const READ_POLL: Duration = Duration::from_millis(100);

/// The owner's reader of the active connection (an owned link, see [`OwnedLink`]): called on
/// the engine thread once a connection has completed its handshake and its reader thread has
/// stopped at a line boundary, before its `Up` is emitted. Must not block for long.
pub type LinkOwner = Arc<dyn Fn(OwnedLink) + Send + Sync>;

/// The active connection, handed to the owner to read ([`LinkOwner`]): from then on the link's
/// engine has no reader thread for it; the owner reads its lines (starting with `partial`) and
/// reports its end with [`Handle::lost`] and `serial`. Every write still goes through the link
/// (direct writes under its writer lock, and the engine): the owner must never write to `fd`.
#[derive(Debug)]
pub struct OwnedLink {
    /// A duplicate of the connection's socket (the same open file: the owner may make it
    /// non-blocking; the engine's writes cope).
    pub fd: OwnedFd,
    /// Index in `servers` of the entry it is connected to.
    pub index: usize,
    /// Bytes read from the socket that do not yet form a line (the start of the next one).
    pub partial: Vec<u8>,
    /// This connection's number, for [`Handle::lost`].
    pub serial: u64,
}

/// Bytes the owner's direct writes may leave unwritten for the engine, at most (on top of the
/// socket's own buffer): past that, [`Handle::write`] waits.
const MAX_PENDING: usize = 1 << 20;

/// Why [`Handle::write`] did not take the bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteError {
    /// The engine has not written what is pending for that long: the upstream is not reading.
    Full,
    /// No active connection may be written directly (down, or handed over): the bytes are
    /// not sent.
    NoLink,
}

/// The owner's direct path to the active connection's socket ([`Handle::write`]): written under
/// this lock, without waiting (what the socket does not take is left in `pending` for the
/// engine, which writes it with blocking writes; meanwhile writers append to it). One lock, so
/// lines are never interleaved and each writer's lines go out in the order it wrote them.
pub(crate) struct Writer {
    state: parking_lot::Mutex<WriterState>,
    /// Signalled when `pending` was written (or dropped).
    drained: parking_lot::Condvar,
    /// Asks the engine to write `pending`.
    kick: Sender<()>,
}

impl std::fmt::Debug for Writer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Writer").finish_non_exhaustive()
    }
}

struct WriterState {
    /// A duplicate of the active connection's socket, while it may be written directly.
    stream: Option<TcpStream>,
    /// Bytes to write after what the socket has, in order.
    pending: Vec<u8>,
    /// `pending` is the engine's to write: nobody writes to the socket meanwhile.
    busy: bool,
}

/// The active connection of a link, taken out of a paused engine to be handed over to another
/// process (`-H`): its socket and what was read from it and not yet made into lines. The
/// connection's handshake is done; a link adopting it ([`Handle::start_adopted`]) sends nothing
/// to the upstream that it would not have sent anyway.
#[derive(Debug)]
pub struct LinkHandover {
    /// A duplicate of the connection's socket.
    pub fd: OwnedFd,
    /// Index in `servers` of the entry it is connected to.
    pub index: usize,
    /// Bytes read from the socket that do not yet form a line (the start of the next one).
    pub partial: Vec<u8>,
    /// The session's protocol state, opaque (empty for a link whose session keeps none: a
    /// passthrough); a stratum link's client state ([`crate::upstream::Pool::pause`]).
    pub session: Vec<u8>,
}

/// Controls of a link beyond commands (a handover).
pub(crate) enum Ctl {
    /// Write every queued command, stop reading (after handing on every line read), drop the
    /// candidates, and answer with the active connection (or why not).
    Pause {
        deadline: Instant,
        reply: Sender<Result<LinkHandover, String>>,
    },
    /// Read again (a handover failed, or the adopting side is ready). With an owner: `Some(serial)`
    /// when the owner reads the connection already (it came with the handover, as connection
    /// `serial`); `None`: hand it to the owner unless it has it.
    Resume(Option<u64>),
    /// The connection belongs to another process now: stop without closing it (no shutdown),
    /// then say so on `done` (by dropping it).
    Release { done: Sender<()> },
}

/// What a line (or the passing of time) does to a connection.
pub(crate) enum Outcome {
    /// Nothing more.
    Continue,
    /// Close the connection (a refusal, a timeout, garbage).
    Close(String),
    /// The upstream refused our credentials: close, reported as such.
    Refused(String),
    /// The upstream asks us to go elsewhere (`client.reconnect`); `None` host: the same server.
    Redirect {
        /// Host, if given.
        host: Option<String>,
        /// Port, if given.
        port: Option<u16>,
    },
}

/// The protocol half of a link.
pub(crate) trait Session: Send + Sized + 'static {
    /// A command from the owner.
    type Cmd: Send + 'static;
    /// An event for the owner.
    type Event: Send + 'static;

    /// What else a session is made from (the passthrough's role).
    type Params: Send + 'static;

    /// A session for server `index`.
    fn new(cfg: &Shared, params: &Self::Params, index: usize) -> Self;
    /// Writes the first lines of the handshake.
    fn start(&mut self, now: Instant, out: &mut Vec<u8>);
    /// The session's connection was handed over by another process with its handshake done
    /// ([`Handle::start_adopted`]): it is ready without one.
    fn adopted(&mut self) {}
    /// The session's protocol state for a handover (see [`LinkHandover::session`]), taken
    /// once every line read is handled.
    fn export(&self) -> Vec<u8> {
        Vec::new()
    }
    /// Takes the state [`Session::export`] wrote on the other side (before
    /// [`Session::adopted`]).
    fn import(&mut self, _state: &[u8], _now: Instant) -> Result<(), String> {
        Ok(())
    }
    /// The handshake is complete: the connection may become active.
    fn ready(&self) -> bool;
    /// Handles one line (without its newline).
    fn line(
        &mut self,
        line: &[u8],
        now: Instant,
        out: &mut Vec<u8>,
        events: &mut Vec<Self::Event>,
    ) -> Outcome;
    /// When [`Session::poll`] has something to do.
    fn deadline(&self) -> Option<Instant>;
    /// Ages out what is overdue.
    fn poll(&mut self, now: Instant, out: &mut Vec<u8>, events: &mut Vec<Self::Event>) -> Outcome;
    /// Carries out a command on the active, ready connection.
    fn command(
        &mut self,
        cmd: Self::Cmd,
        now: Instant,
        out: &mut Vec<u8>,
        events: &mut Vec<Self::Event>,
    );
    /// A command that cannot be carried out (no active link, a switch, shutdown).
    fn lose(cmd: Self::Cmd, reason: &'static str, events: &mut Vec<Self::Event>);
    /// The connection is closing: report what was in flight on it.
    fn drain(&mut self, reason: &'static str, events: &mut Vec<Self::Event>);
    /// Commands still queued when the link switches to another server are lost (they belong
    /// to the old server's jobs).
    const LOSE_QUEUED_ON_SWITCH: bool;
    /// Server `index` became the active link.
    fn up_event(index: usize, url: &str) -> Self::Event;
    /// The active link on server `index` went down.
    fn down_event(index: usize, reason: String) -> Self::Event;
    /// A connection attempt to server `index` failed (before it became active).
    fn failed_event(index: usize, reason: String) -> Self::Event;
    /// Server `index` refused the credentials (before it became active).
    fn refused_event(index: usize, reason: String) -> Self::Event {
        Self::failed_event(index, reason)
    }
    /// A `client.reconnect` was honoured (`true`) or refused.
    fn reconnect_event(
        host: Option<String>,
        port: Option<u16>,
        honoured: bool,
    ) -> Option<Self::Event>;
}

/// From a connection's thread.
enum ReadMsg {
    /// Connected: the stream to write to.
    Connected(TcpStream),
    Line(Vec<u8>),
    Closed(String),
    /// The reader stopped as asked (its pause flag), with the bytes read and not yet a line.
    Paused(Vec<u8>),
}

/// One TCP connection to an upstream.
struct Conn<S: Session> {
    index: usize,
    /// `None` while connecting.
    stream: Option<TcpStream>,
    lines: Receiver<ReadMsg>,
    session: S,
    last_line: Instant,
    /// The handshake must be complete by then (while not active).
    handshake_by: Instant,
    /// Events held until the connection becomes active.
    held: Vec<<S as Session>::Event>,
    out: Vec<u8>,
    /// Tells the reader to stop ([`ReadMsg::Paused`]).
    pause: Arc<AtomicBool>,
    /// While paused: what the reader had read and not made into lines.
    partial: Vec<u8>,
    _reader: Option<JoinHandle<()>>,
    /// The owner reads it ([`LinkOwner`]): no reader thread here.
    owned: bool,
    /// Its number, as the owner knows it ([`OwnedLink::serial`]).
    serial: u64,
}

impl<S: Session> Drop for Conn<S> {
    fn drop(&mut self) {
        // Ends the reader thread (its read fails) and tells the upstream we are gone. A thread
        // still connecting finds the engine gone when it connects and closes the stream.
        if let Some(s) = &self.stream {
            let _ = s.shutdown(Shutdown::Both);
        }
    }
}

/// The owner's handle: a bounded command queue and the engine thread.
#[derive(Debug)]
pub(crate) struct Handle<C> {
    /// Direct writes (owned links only, see [`LinkOwner`]).
    writer: Option<Arc<Writer>>,
    cmds: Sender<C>,
    ctl: Sender<Ctl>,
    stop: Option<Sender<()>>,
    thread: Option<JoinHandle<()>>,
    block: Duration,
    /// The owner's reports of owned connections that ended ([`Handle::lost`]).
    lost: Sender<(u64, String)>,
}

impl<C: Send + 'static> Handle<C> {
    /// Checks `cfg` and starts the engine thread.
    pub(crate) fn start<S: Session<Cmd = C>>(
        cfg: Shared,
        params: S::Params,
        name: &str,
        events: Sender<S::Event>,
    ) -> Result<Self, UpstreamError> {
        Self::spawn::<S>(cfg, params, name, events, None, None)
    }

    /// [`Handle::start`] for an owner that reads the active connection itself ([`LinkOwner`]):
    /// no reader thread once a connection is active; the owner writes to it directly
    /// ([`Handle::write`]).
    pub(crate) fn start_owned<S: Session<Cmd = C>>(
        cfg: Shared,
        params: S::Params,
        name: &str,
        events: Sender<S::Event>,
        owner: LinkOwner,
        adopted: Option<LinkHandover>,
    ) -> Result<Self, UpstreamError> {
        Self::spawn::<S>(cfg, params, name, events, Some(owner), adopted)
    }

    /// Starts the engine on a connection another process handed over ([`LinkHandover`]),
    /// active and paused: nothing is read from it until [`Handle::resume`] (lines for miners the
    /// owner has not taken over yet wait in the socket). No `Up` event is sent: the owner
    /// knows the link is up on entry `adopted.index`.
    pub(crate) fn start_adopted<S: Session<Cmd = C>>(
        cfg: Shared,
        params: S::Params,
        name: &str,
        events: Sender<S::Event>,
        adopted: LinkHandover,
    ) -> Result<Self, UpstreamError> {
        Self::spawn::<S>(cfg, params, name, events, None, Some(adopted))
    }

    fn spawn<S: Session<Cmd = C>>(
        cfg: Shared,
        params: S::Params,
        name: &str,
        events: Sender<S::Event>,
        owner: Option<LinkOwner>,
        adopted: Option<LinkHandover>,
    ) -> Result<Self, UpstreamError> {
        check(&cfg)?;
        let (cmds, cmd_rx) = bounded(cfg.queue);
        let (lost, lost_rx) = crossbeam_channel::unbounded();
        let (ctl, ctl_rx) = bounded(1);
        let (stop, stop_rx) = bounded(0);
        let (kick, kick_rx) = bounded(1);
        let writer = owner.is_some().then(|| {
            Arc::new(Writer {
                state: parking_lot::Mutex::new(WriterState {
                    stream: None,
                    pending: Vec::new(),
                    busy: false,
                }),
                drained: parking_lot::Condvar::new(),
                kick,
            })
        });
        let block = cfg.send_block;
        let now = Instant::now();
        let paused = adopted.is_some();
        let active = adopted.map(|a| {
            let mut session = S::new(&cfg, &params, a.index);
            if let Err(e) = session.import(&a.session, now) {
                tracing::warn!(index = a.index, error = %e, "adopted link's session state unusable");
            }
            session.adopted();
            Conn {
                index: a.index,
                stream: Some(TcpStream::from(a.fd)),
                lines: never(),
                session,
                last_line: now,
                handshake_by: now,
                held: Vec::new(),
                out: Vec::with_capacity(1024),
                pause: Arc::new(AtomicBool::new(true)),
                partial: a.partial,
                _reader: None,
                owned: false,
                serial: 0,
            }
        });
        let engine = Engine::<S> {
            probe_at: now + cfg.failback_interval,
            cfg,
            params,
            events,
            cmds: cmd_rx,
            ctl: ctl_rx,
            stop: stop_rx,
            active,
            paused,
            attempt: None,
            probe: None,
            next_try: 0,
            tried: 0,
            retry_at: now,
            probe_next: 0,
            redirect: None,
            scratch: Vec::new(),
            stopping: false,
            writer: writer.clone(),
            kick: kick_rx,
            owner,
            lost: lost_rx,
            serial: 0,
        };
        if let Some(a) = &engine.active {
            engine.attach_writer(a.stream.as_ref());
        }
        let thread = std::thread::Builder::new()
            .name(name.to_owned())
            .spawn(move || engine.run())
            .map_err(UpstreamError::Spawn)?;
        Ok(Self {
            writer,
            cmds,
            ctl,
            stop: Some(stop),
            thread: Some(thread),
            block,
            lost,
        })
    }

    /// The owner's connection `serial` ([`OwnedLink`]) ended (closed by the upstream, a read
    /// error): if it is still the active one, the link goes down and fails over.
    pub(crate) fn lost(&self, serial: u64, reason: String) {
        let _ = self.lost.send((serial, reason));
    }

    /// Queues `cmd`, waiting at most `send_block` for room.
    pub(crate) fn send(&self, cmd: C) -> Result<(), SendError<C>> {
        use crossbeam_channel::SendTimeoutError;
        match self.cmds.send_timeout(cmd, self.block) {
            Ok(()) => Ok(()),
            Err(SendTimeoutError::Timeout(c)) => Err(SendError::Full(c)),
            Err(SendTimeoutError::Disconnected(c)) => Err(SendError::Closed(c)),
        }
    }

    /// Writes `bytes` (whole lines) to the active connection from the calling thread, without
    /// the engine unless the socket is full (then what it did not take is left for the
    /// engine); waits at most `wait` while more than [`MAX_PENDING`] bytes are left. Lines
    /// queued with [`Handle::send`] are not ordered with these.
    pub(crate) fn write(&self, bytes: &[u8], wait: Duration) -> Result<(), WriteError> {
        use std::ops::DerefMut;
        let Some(w) = self.writer.as_deref() else {
            return Err(WriteError::NoLink);
        };
        let until = Instant::now() + wait;
        let mut st = w.state.lock();
        while st.stream.is_some() && st.pending.len() > MAX_PENDING {
            if w.drained.wait_until(&mut st, until).timed_out() {
                return Err(WriteError::Full);
            }
        }
        let WriterState {
            stream,
            pending,
            busy,
        } = st.deref_mut();
        let Some(stream) = stream.as_ref() else {
            return Err(WriteError::NoLink);
        };
        let mut done = 0;
        if !*busy {
            let sock = socket2::SockRef::from(stream);
            while let Some(rest) = bytes.get(done..).filter(|r| !r.is_empty()) {
                match sock.send_with_flags(rest, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL) {
                    Ok(n) if n > 0 => done += n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    // Full, or failed: the engine writes the rest (and sees the error).
                    Ok(_) | Err(_) => break,
                }
            }
        }
        if let Some(rest) = bytes.get(done..).filter(|r| !r.is_empty()) {
            pending.extend_from_slice(rest);
            if !*busy {
                *busy = true;
                let _ = w.kick.try_send(());
            }
        }
        Ok(())
    }

    /// Bytes direct writes left for the engine that it has not written yet.
    pub(crate) fn unwritten(&self) -> usize {
        self.writer
            .as_deref()
            .map_or(0, |w| w.state.lock().pending.len())
    }

    /// Queues `cmd` if there is room now.
    pub(crate) fn try_send(&self, cmd: C) -> Result<(), SendError<C>> {
        use crossbeam_channel::TrySendError;
        match self.cmds.try_send(cmd) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(c)) => Err(SendError::Full(c)),
            Err(TrySendError::Disconnected(c)) => Err(SendError::Closed(c)),
        }
    }

    /// Commands waiting in the queue.
    pub(crate) fn queued(&self) -> usize {
        self.cmds.len()
    }

    /// Asks the engine to pause for a handover (see [`Ctl::Pause`]); the answer comes on the
    /// returned channel. Meanwhile the engine hands on what it reads: keep taking its events.
    pub(crate) fn pause(&self, deadline: Instant) -> Receiver<Result<LinkHandover, String>> {
        let (reply, rx) = bounded(1);
        let sent = self
            .ctl
            .send_deadline(Ctl::Pause { deadline, reply }, deadline);
        if let Err(e) = sent
            && let Ctl::Pause { reply, .. } = e.into_inner()
        {
            let _ = reply.send(Err("the link's engine does not answer".to_owned()));
        }
        rx
    }

    /// Reads again after [`Handle::pause`], or on an adopted connection.
    pub(crate) fn resume(&self) {
        let _ = self.ctl.send(Ctl::Resume(None));
    }

    /// [`Handle::resume`] on an owned link whose owner reads the connection already (it came
    /// with a handover as connection `serial`).
    pub(crate) fn resume_owned(&self, serial: u64) {
        let _ = self.ctl.send(Ctl::Resume(Some(serial)));
    }

    /// The paused connection belongs to another process now: stops the engine without closing
    /// it, and waits (at most `wait`) until it has stopped: commands sent afterwards fail with
    /// [`SendError::Closed`], so nothing more is written to the connection from here.
    pub(crate) fn release(&self, wait: Duration) {
        let (done, stopped) = bounded::<()>(0);
        if self.ctl.send_timeout(Ctl::Release { done }, wait).is_ok() {
            // The engine drops `done` once its loop is over.
            let _ = stopped.recv_timeout(wait);
        }
    }

    /// Stops the engine and waits for it (at most a connect or a write timeout when it is in
    /// one).
    pub(crate) fn shutdown(mut self) {
        self.stop.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl<C> Drop for Handle<C> {
    fn drop(&mut self) {
        // Dropping the stop sender ends the engine; it is not waited for here.
        self.stop.take();
    }
}

struct Engine<S: Session> {
    cfg: Shared,
    params: S::Params,
    events: Sender<S::Event>,
    cmds: Receiver<S::Cmd>,
    ctl: Receiver<Ctl>,
    stop: Receiver<()>,
    /// Paused for a handover: the active connection is not read, nothing else is connected.
    paused: bool,
    /// The link in use: its handshake is complete.
    active: Option<Conn<S>>,
    /// A failover attempt (no active link) still in its handshake.
    attempt: Option<Conn<S>>,
    /// A fail-back probe of a better-ranked server still in its handshake (it goes on when
    /// the active link goes down meanwhile, alongside the failover attempts).
    probe: Option<Conn<S>>,
    /// The next server to try while no link is active.
    next_try: usize,
    /// Servers tried since the last active link went down (or since the start).
    tried: usize,
    retry_at: Instant,
    probe_at: Instant,
    /// The next better-ranked server to probe.
    probe_next: usize,
    /// A `client.reconnect` target for server `.0`, used for its next connection.
    redirect: Option<(usize, String, u16)>,
    scratch: Vec<S::Event>,
    /// Shutting down: events are no longer waited for.
    stopping: bool,
    /// The owner's direct writes to the active connection.
    writer: Option<Arc<Writer>>,
    /// A direct write left bytes for the engine.
    kick: Receiver<()>,
    /// The owner that reads active connections itself.
    owner: Option<LinkOwner>,
    /// Its reports of owned connections that ended.
    lost: Receiver<(u64, String)>,
    /// The last [`OwnedLink::serial`] given.
    serial: u64,
}

/// Which connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slot {
    Active,
    Attempt,
    Probe,
}

const CANDIDATES: [Slot; 2] = [Slot::Attempt, Slot::Probe];

/// What the select woke for.
enum Wake<C> {
    Stop,
    Ctl(Ctl),
    Cmd(Option<C>),
    Read(Slot, ReadMsg),
    /// Direct writes left bytes to write.
    Kick,
    /// The owner's connection ended.
    Lost(u64, String),
    Timer,
}

impl<S: Session> Engine<S> {
    fn run(mut self) {
        while !self.stopping {
            let now = Instant::now();
            self.maybe_connect(now);
            let deadline = self.deadline();
            match self.wait(deadline) {
                Wake::Stop | Wake::Cmd(None) => break,
                Wake::Ctl(Ctl::Release { done }) => {
                    // Closing our descriptor leaves the connection to the other process.
                    // What direct writes left goes first: it may end a line.
                    let active = self.active.take();
                    self.detach_writer(active.as_ref().and_then(|a| a.stream.as_ref()));
                    if let Some(mut a) = active {
                        a.stream = None;
                    }
                    self.attempt = None;
                    self.probe = None;
                    // No command is taken from now on.
                    let cmds = std::mem::replace(&mut self.cmds, never());
                    while let Ok(cmd) = cmds.try_recv() {
                        S::lose(cmd, "link handed over", &mut self.scratch);
                    }
                    drop(cmds);
                    drop(done);
                    break;
                }
                Wake::Ctl(Ctl::Pause { deadline, reply }) => {
                    let _ = reply.send(self.pause(deadline));
                }
                Wake::Ctl(Ctl::Resume(taken)) => {
                    if let (Some(serial), Some(a)) = (taken, self.active.as_mut()) {
                        a.owned = true;
                        a.serial = serial;
                        self.serial = self.serial.max(serial);
                    }
                    self.resume();
                }
                Wake::Lost(serial, reason) => {
                    if self
                        .active
                        .as_ref()
                        .is_some_and(|a| a.owned && a.serial == serial)
                    {
                        self.close(Slot::Active, reason, false);
                    }
                }
                Wake::Cmd(Some(cmd)) => {
                    self.command(cmd);
                    // Take what else is queued now, then write once.
                    for _ in 0..self.cfg.queue {
                        let Ok(cmd) = self.cmds.try_recv() else {
                            break;
                        };
                        self.command(cmd);
                    }
                }
                Wake::Read(slot, msg) => self.read(slot, msg),
                Wake::Kick => self.write_pending(),
                Wake::Timer => {}
            }
            self.timers(Instant::now());
            self.flush();
            self.emit_scratch();
        }
        // Shutdown: report what was in flight and what is still queued.
        self.stopping = true;
        self.detach_writer(None);
        if let Some(mut a) = self.active.take() {
            a.session.drain("shutdown", &mut self.scratch);
        }
        while let Ok(cmd) = self.cmds.try_recv() {
            S::lose(cmd, "shutdown", &mut self.scratch);
        }
        self.emit_scratch();
    }

    fn slot(&mut self, slot: Slot) -> &mut Option<Conn<S>> {
        match slot {
            Slot::Active => &mut self.active,
            Slot::Attempt => &mut self.attempt,
            Slot::Probe => &mut self.probe,
        }
    }

    fn wait(&self, deadline: Option<Instant>) -> Wake<S::Cmd> {
        let none = never();
        let readers = [
            (
                Slot::Active,
                self.active.as_ref().map_or(&none, |c| &c.lines),
            ),
            (
                Slot::Attempt,
                self.attempt.as_ref().map_or(&none, |c| &c.lines),
            ),
            (Slot::Probe, self.probe.as_ref().map_or(&none, |c| &c.lines)),
        ];
        let mut sel = Select::new();
        let i_stop = sel.recv(&self.stop);
        let i_ctl = sel.recv(&self.ctl);
        let i_cmd = sel.recv(&self.cmds);
        let i_kick = sel.recv(&self.kick);
        let i_lost = sel.recv(&self.lost);
        let first_reader = readers.map(|(_, rx)| sel.recv(rx))[0];
        let op = match deadline {
            Some(d) => match sel.select_deadline(d) {
                Ok(op) => op,
                Err(_) => return Wake::Timer,
            },
            None => sel.select(),
        };
        let i = op.index();
        if i == i_stop {
            let _ = op.recv(&self.stop);
            return Wake::Stop;
        }
        if i == i_ctl {
            return match op.recv(&self.ctl) {
                Ok(c) => Wake::Ctl(c),
                Err(_) => Wake::Stop,
            };
        }
        if i == i_cmd {
            return Wake::Cmd(op.recv(&self.cmds).ok());
        }
        if i == i_kick {
            let _ = op.recv(&self.kick);
            return Wake::Kick;
        }
        if i == i_lost {
            return match op.recv(&self.lost) {
                Ok((serial, reason)) => Wake::Lost(serial, reason),
                Err(_) => Wake::Timer,
            };
        }
        match readers.get(i.wrapping_sub(first_reader)) {
            Some(&(slot, rx)) => Wake::Read(
                slot,
                op.recv(rx)
                    .unwrap_or_else(|_| ReadMsg::Closed("reader ended".to_owned())),
            ),
            None => Wake::Timer,
        }
    }

    fn deadline(&self) -> Option<Instant> {
        if self.paused {
            return None;
        }
        let mut d: Option<Instant> = None;
        let mut at = |t: Option<Instant>| {
            if let Some(t) = t {
                d = Some(d.map_or(t, |d| d.min(t)));
            }
        };
        match &self.active {
            Some(a) => {
                at(a.session.deadline());
                at(self.cfg.idle_timeout.map(|t| a.last_line + t));
                if a.index > 0 && self.probe.is_none() {
                    at(Some(self.probe_at));
                }
            }
            None if self.attempt.is_none() => at(Some(self.retry_at)),
            None => {}
        }
        for c in [&self.attempt, &self.probe].into_iter().flatten() {
            at(c.session.deadline());
            at(Some(c.handshake_by));
        }
        d
    }

    /// Starts a failover attempt or a fail-back probe when one is due.
    fn maybe_connect(&mut self, now: Instant) {
        if self.paused {
            return;
        }
        let n = self.cfg.servers.len();
        match &self.active {
            None if self.attempt.is_none() && now >= self.retry_at => {
                let index = self.next_try % n;
                self.next_try = (index + 1) % n;
                self.tried += 1;
                if self.tried >= n {
                    // A whole round: pause before the next one.
                    self.tried = 0;
                    self.retry_at = now + self.cfg.retry_interval;
                }
                self.attempt = self.connect(index, now);
            }
            Some(a) if a.index > 0 && self.probe.is_none() && now >= self.probe_at => {
                let index = self.probe_next % a.index;
                self.probe_next = (index + 1) % a.index;
                self.probe_at = now + self.cfg.failback_interval;
                tracing::debug!(index, "probing a better upstream for fail-back");
                self.probe = self.connect(index, now);
            }
            _ => {}
        }
    }

    /// Starts a connection to server `index` (or where a honoured `client.reconnect` sent
    /// it): its thread resolves, connects and then reads, so a black-holed server never stalls
    /// the active link. The handshake starts on [`ReadMsg::Connected`].
    fn connect(&mut self, index: usize, now: Instant) -> Option<Conn<S>> {
        let server = self.cfg.servers.get(index)?;
        let (host, port) = match self.redirect.take() {
            Some((i, host, port)) if i == index => (host, port),
            _ => host_port(&server.url)?,
        };
        let (tx, lines) = bounded(READ_AHEAD);
        let (connect_timeout, write_timeout) = (self.cfg.connect_timeout, self.cfg.write_timeout);
        let pause = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&pause);
        let spawned = std::thread::Builder::new()
            .name(format!("up-read-{index}"))
            .spawn(move || {
                connect_and_read(&host, port, connect_timeout, write_timeout, &flag, &tx);
            });
        let reader = match spawned {
            Ok(r) => r,
            Err(e) => {
                self.scratch
                    .push(S::failed_event(index, format!("thread: {e}")));
                return None;
            }
        };
        Some(Conn {
            index,
            stream: None,
            lines,
            session: S::new(&self.cfg, &self.params, index),
            last_line: now,
            handshake_by: now + connect_timeout + self.cfg.handshake_timeout,
            held: Vec::new(),
            out: Vec::with_capacity(1024),
            pause,
            partial: Vec::new(),
            _reader: Some(reader),
            owned: false,
            serial: 0,
        })
    }

    /// [`Ctl::Pause`]: see there. On failure the engine goes on as before (reading again).
    fn pause(&mut self, deadline: Instant) -> Result<LinkHandover, String> {
        if self.paused {
            return Err("the link is paused already".to_owned());
        }
        while let Ok(cmd) = self.cmds.try_recv() {
            self.command(cmd);
        }
        // Candidates are dropped (closed): the new process starts its own probes.
        self.attempt = None;
        self.probe = None;
        self.flush();
        self.write_pending();
        self.emit_scratch();
        let Some(a) = self.active.as_ref() else {
            return Err("the upstream link is down".to_owned());
        };
        // An owned connection is read by the owner, which stopped reading it (its connector
        // is quiesced) and hands the bytes read over itself.
        let owned = a.owned;
        if !owned {
            a.pause.store(true, Ordering::SeqCst);
        }
        // An owned connection has no reader here to stop.
        let mut stopped = owned;
        while !stopped {
            let Some(a) = self.active.as_mut() else {
                return Err("the upstream link went down while pausing".to_owned());
            };
            let Ok(msg) = a.lines.recv_deadline(deadline) else {
                // The reader goes on (or its `Paused` restarts it, see `read`).
                a.pause.store(false, Ordering::SeqCst);
                return Err("the upstream link's reader did not stop in time".to_owned());
            };
            if let ReadMsg::Paused(partial) = msg {
                a.partial = partial;
                a.lines = never();
                a._reader = None;
                stopped = true;
                continue;
            }
            self.read(Slot::Active, msg);
            self.flush();
            self.emit_scratch();
        }
        let Some(a) = self.active.as_ref() else {
            return Err("the upstream link went down while pausing".to_owned());
        };
        let fd = a
            .stream
            .as_ref()
            .ok_or_else(|| "the upstream link has no socket".to_owned())
            .and_then(|s| {
                s.try_clone()
                    .map_err(|e| format!("duplicating its socket: {e}"))
            })
            .map(OwnedFd::from);
        match fd {
            Ok(fd) => {
                self.paused = true;
                tracing::info!(
                    index = a.index,
                    partial = a.partial.len(),
                    "upstream link paused for a handover"
                );
                Ok(LinkHandover {
                    fd,
                    index: a.index,
                    partial: a.partial.clone(),
                    session: a.session.export(),
                })
            }
            Err(e) => {
                self.paused = true;
                self.resume();
                Err(e)
            }
        }
    }

    /// [`Ctl::Resume`]: a reader for the active connection again, starting with the bytes the
    /// last one left.
    fn resume(&mut self) {
        if !self.paused {
            return;
        }
        self.paused = false;
        let now = Instant::now();
        self.retry_at = now;
        self.probe_at = now + self.cfg.failback_interval;
        let Some(a) = self.active.as_mut() else {
            return;
        };
        a.last_line = now;
        if self.owner.is_some() {
            if !a.owned {
                let partial = std::mem::take(&mut a.partial);
                self.hand_to_owner(partial);
            }
            return;
        }
        let started = match a.stream.as_ref().map(TcpStream::try_clone) {
            Some(Ok(stream)) => spawn_reader(a.index, stream, std::mem::take(&mut a.partial)),
            Some(Err(e)) => Err(e),
            None => Err(std::io::Error::other("no socket")),
        };
        match started {
            Ok((lines, pause, reader)) => {
                a.lines = lines;
                a.pause = pause;
                a._reader = Some(reader);
                tracing::info!(index = a.index, "upstream link reading again");
            }
            Err(e) => self.close(Slot::Active, format!("restarting its reader: {e}"), false),
        }
    }

    fn command(&mut self, cmd: S::Cmd) {
        match &mut self.active {
            Some(a) => a
                .session
                .command(cmd, Instant::now(), &mut a.out, &mut self.scratch),
            None => S::lose(cmd, "upstream down", &mut self.scratch),
        }
    }

    fn read(&mut self, slot: Slot, msg: ReadMsg) {
        let now = Instant::now();
        let (conn, scratch, cfg) = match slot {
            Slot::Active => (&mut self.active, &mut self.scratch, &self.cfg),
            Slot::Attempt => (&mut self.attempt, &mut self.scratch, &self.cfg),
            Slot::Probe => (&mut self.probe, &mut self.scratch, &self.cfg),
        };
        let Some(conn) = conn.as_mut() else {
            return;
        };
        let outcome = match msg {
            ReadMsg::Connected(stream) => {
                tracing::info!(index = conn.index, url = cfg.servers.get(conn.index).map(|s| s.url.as_str()),
                    peer = ?stream.peer_addr().ok(), "connected to upstream");
                conn.stream = Some(stream);
                conn.last_line = now;
                conn.session.start(now, &mut conn.out);
                Outcome::Continue
            }
            ReadMsg::Line(line) => {
                conn.last_line = now;
                let events = if slot == Slot::Active {
                    scratch
                } else {
                    &mut conn.held
                };
                conn.session.line(&line, now, &mut conn.out, events)
            }
            ReadMsg::Closed(reason) => Outcome::Close(reason),
            ReadMsg::Paused(partial) => {
                // A pause that timed out: the reader stopped after all; start another.
                conn.partial = partial;
                self.paused = true;
                self.resume();
                return;
            }
        };
        self.outcome(slot, outcome);
        self.switch_if_ready(slot);
    }

    fn outcome(&mut self, slot: Slot, outcome: Outcome) {
        match outcome {
            Outcome::Continue => {}
            Outcome::Close(reason) => self.close(slot, reason, false),
            Outcome::Refused(reason) => self.close(slot, reason, true),
            Outcome::Redirect { host, port } => {
                let Some(index) = self.slot(slot).as_ref().map(|c| c.index) else {
                    return;
                };
                let allowed = host.as_deref().is_none_or(|h| self.allowed(h));
                self.scratch
                    .extend(S::reconnect_event(host.clone(), port, allowed));
                if !allowed {
                    tracing::warn!(
                        index,
                        host = host.as_deref().unwrap_or(""),
                        port,
                        "client.reconnect to a host neither configured nor allowed: refused"
                    );
                    return;
                }
                let (cur_host, cur_port) = self
                    .cfg
                    .servers
                    .get(index)
                    .and_then(|s| host_port(&s.url))
                    .unwrap_or_default();
                let host = host.unwrap_or(cur_host);
                let port = port.unwrap_or(cur_port);
                tracing::info!(index, %host, port, "client.reconnect honoured");
                self.redirect = Some((index, host, port));
                self.close(slot, "client.reconnect".to_owned(), false);
                // Reconnect to the same entry at once.
                if self.active.is_none() && self.attempt.is_none() {
                    self.next_try = index;
                    self.tried = 0;
                    self.retry_at = Instant::now();
                }
            }
        }
    }

    /// Whether `client.reconnect` may send us to `host`.
    fn allowed(&self, host: &str) -> bool {
        let listed = self
            .cfg
            .servers
            .iter()
            .filter_map(|s| host_port(&s.url))
            .any(|(h, _)| h.eq_ignore_ascii_case(host));
        listed
            || self
                .cfg
                .reconnect_allow
                .iter()
                .any(|h| h.eq_ignore_ascii_case(host))
    }

    fn close(&mut self, slot: Slot, reason: String, refused: bool) {
        let Some(mut c) = self.slot(slot).take() else {
            return;
        };
        if slot == Slot::Active {
            self.detach_writer(None);
            tracing::warn!(index = c.index, %reason, "upstream down");
            c.session.drain("upstream down", &mut self.scratch);
            self.scratch.push(S::down_event(c.index, reason));
            self.next_try = (c.index + 1) % self.cfg.servers.len();
            self.tried = 0;
            self.retry_at = Instant::now();
        } else {
            tracing::warn!(index = c.index, %reason, "upstream handshake failed");
            self.scratch.push(if refused {
                S::refused_event(c.index, reason)
            } else {
                S::failed_event(c.index, reason)
            });
        }
    }

    /// A candidate that completed its handshake becomes the active link; candidates no better
    /// than it are dropped.
    fn switch_if_ready(&mut self, slot: Slot) {
        if slot == Slot::Active || !self.slot(slot).as_ref().is_some_and(|c| c.session.ready()) {
            return;
        }
        let Some(mut c) = self.slot(slot).take() else {
            return;
        };
        // An owner reads the connection from here on: its reader stops at a line boundary
        // first (the lines it reads meanwhile are held, as the handshake's).
        let partial = match self.owner.is_some().then(|| stop_reader(&mut c)) {
            None => None,
            Some(Ok(partial)) => Some(partial),
            Some(Err(reason)) => {
                tracing::warn!(index = c.index, %reason, "upstream handshake failed");
                self.scratch.push(S::failed_event(c.index, reason));
                return;
            }
        };
        if let Some(mut old) = self.active.take() {
            // What direct writes left goes to the old connection (it may end a line).
            self.detach_writer(old.stream.as_ref());
            tracing::info!(from = old.index, to = c.index, "upstream fail-back");
            old.session.drain("upstream switched", &mut self.scratch);
            if S::LOSE_QUEUED_ON_SWITCH {
                while let Ok(cmd) = self.cmds.try_recv() {
                    S::lose(cmd, "upstream switched", &mut self.scratch);
                }
            }
        }
        for other in CANDIDATES {
            if self
                .slot(other)
                .as_ref()
                .is_some_and(|o| o.index >= c.index)
            {
                self.slot(other).take();
            }
        }
        let url = self
            .cfg
            .servers
            .get(c.index)
            .map(|s| s.url.as_str())
            .unwrap_or_default();
        tracing::info!(index = c.index, %url, "upstream active");
        self.scratch.push(S::up_event(c.index, url));
        self.scratch.append(&mut c.held);
        self.probe_next = 0;
        self.probe_at = Instant::now() + self.cfg.failback_interval;
        self.tried = 0;
        self.attach_writer(c.stream.as_ref());
        self.active = Some(c);
        if let Some(partial) = partial {
            self.hand_to_owner(partial);
        }
    }

    /// Hands the active connection to the owner ([`LinkOwner`]), `partial` the start of its
    /// input; its reader thread has stopped.
    fn hand_to_owner(&mut self, partial: Vec<u8>) {
        let Some(owner) = self.owner.clone() else {
            return;
        };
        let Some(a) = self.active.as_mut() else {
            return;
        };
        let dup = match a.stream.as_ref() {
            // The owner's reads wait on their own (and SO_RCVTIMEO is the socket's).
            Some(s) => s.set_read_timeout(None).and_then(|()| s.try_clone()),
            None => Err(std::io::Error::other("no socket")),
        };
        match dup {
            Ok(s) => {
                self.serial += 1;
                a.owned = true;
                a.serial = self.serial;
                a.lines = never();
                a._reader = None;
                tracing::debug!(
                    index = a.index,
                    serial = a.serial,
                    "upstream connection handed to its reader"
                );
                owner(OwnedLink {
                    fd: OwnedFd::from(s),
                    index: a.index,
                    partial,
                    serial: self.serial,
                });
            }
            Err(e) => self.close(
                Slot::Active,
                format!("handing it to its reader: {e}"),
                false,
            ),
        }
    }

    /// Lets the owner write to `stream` (the new active connection) directly.
    fn attach_writer(&self, stream: Option<&TcpStream>) {
        let Some(w) = self.writer.as_deref() else {
            return;
        };
        let dup = stream.map(TcpStream::try_clone);
        let mut st = w.state.lock();
        st.pending.clear();
        st.busy = false;
        st.stream = match dup {
            Some(Ok(s)) => Some(s),
            Some(Err(e)) => {
                tracing::warn!(error = %e, "upstream link: no direct writes (cannot duplicate its socket)");
                None
            }
            None => None,
        };
        w.drained.notify_all();
    }

    /// Ends direct writes to the active connection; what they left is written to `flush_to`
    /// first (the connection they were for), or dropped.
    fn detach_writer(&self, flush_to: Option<&TcpStream>) {
        let Some(w) = self.writer.as_deref() else {
            return;
        };
        let mut st = w.state.lock();
        if let Some(s) = flush_to
            && !st.pending.is_empty()
            && let Err(e) = write_all(s, &st.pending, self.cfg.write_timeout)
        {
            tracing::debug!(error = %e, "upstream link: the last direct writes were not written");
        }
        st.pending.clear();
        st.busy = false;
        st.stream = None;
        w.drained.notify_all();
    }

    /// Writes what direct writes left ([`Handle::write`]), with blocking writes, until none is
    /// left; a failed write closes the active connection.
    fn write_pending(&mut self) {
        let Some(w) = self.writer.clone() else {
            return;
        };
        let mut buf = Vec::new();
        loop {
            {
                let mut st = w.state.lock();
                if st.pending.is_empty() || st.stream.is_none() {
                    st.pending.clear();
                    st.busy = false;
                    w.drained.notify_all();
                    return;
                }
                // Still busy: writers append while this is written.
                std::mem::swap(&mut buf, &mut st.pending);
                w.drained.notify_all();
            }
            let res = match self.active.as_ref().and_then(|a| a.stream.as_ref()) {
                Some(s) => write_all(s, &buf, self.cfg.write_timeout),
                None => Err(std::io::Error::other("no active connection")),
            };
            buf.clear();
            if let Err(e) = res {
                self.close(Slot::Active, format!("write: {e}"), false);
                return;
            }
        }
    }

    fn timers(&mut self, now: Instant) {
        if self.paused {
            return;
        }
        if let Some(a) = &mut self.active {
            let mut outcome = Outcome::Continue;
            if a.session.deadline().is_some_and(|d| d <= now) {
                outcome = a.session.poll(now, &mut a.out, &mut self.scratch);
            }
            if let (Outcome::Continue, Some(idle)) = (&outcome, self.cfg.idle_timeout)
                && !a.owned
                && now.saturating_duration_since(a.last_line) >= idle
            {
                outcome = Outcome::Close(format!("no line for {} s", idle.as_secs_f64()));
            }
            self.outcome(Slot::Active, outcome);
        }
        for slot in CANDIDATES {
            let Some(c) = self.slot(slot).as_mut() else {
                continue;
            };
            let mut outcome = Outcome::Continue;
            if c.session.deadline().is_some_and(|d| d <= now) {
                outcome = c.session.poll(now, &mut c.out, &mut c.held);
            }
            if matches!(outcome, Outcome::Continue) && now >= c.handshake_by {
                outcome = Outcome::Close("handshake timed out".to_owned());
            }
            self.outcome(slot, outcome);
            self.switch_if_ready(slot);
        }
    }

    /// Writes what the sessions produced; a failed write closes its connection.
    fn flush(&mut self) {
        let writer = self.writer.clone();
        let timeout = self.cfg.write_timeout;
        for slot in [Slot::Active, Slot::Attempt, Slot::Probe] {
            let Some(c) = self.slot(slot).as_mut() else {
                continue;
            };
            if c.stream.is_none() || c.out.is_empty() {
                continue;
            }
            if slot == Slot::Active
                && let Some(w) = writer.as_deref()
            {
                // Behind what direct writes left, by the same path.
                let mut out = std::mem::take(&mut c.out);
                let queued = {
                    let mut st = w.state.lock();
                    let attached = st.stream.is_some();
                    if attached {
                        st.pending.append(&mut out);
                        st.busy = true;
                    }
                    attached
                };
                if let Some(c) = self.active.as_mut() {
                    c.out = out;
                }
                if queued {
                    self.write_pending();
                    continue;
                }
            }
            let Some(c) = self.slot(slot).as_mut() else {
                continue;
            };
            let Some(stream) = &c.stream else {
                continue;
            };
            let res = write_all(stream, &c.out, timeout);
            c.out.clear();
            if let Err(e) = res {
                self.close(slot, format!("write: {e}"), false);
            }
        }
    }

    /// Hands the events over. A full `events` channel blocks the engine (back-pressure)
    /// until the owner reads or stops the link; once stopping, events that find no room are
    /// counted and logged instead.
    fn emit_scratch(&mut self) {
        let mut undelivered = 0usize;
        for ev in self.scratch.drain(..) {
            if self.stopping {
                undelivered += usize::from(self.events.try_send(ev).is_err());
                continue;
            }
            crossbeam_channel::select! {
                send(self.events, ev) -> sent => undelivered += usize::from(sent.is_err()),
                recv(self.stop) -> _ => {
                    self.stopping = true;
                    undelivered += 1;
                }
            }
        }
        if undelivered > 0 {
            tracing::warn!(
                undelivered,
                "upstream events not delivered: the owner is gone or stopped"
            );
        }
    }
}

/// Stops the reader thread of `c` at a line boundary (see [`read_lines`]); the lines it read
/// meanwhile go to its session (their events held). What it read of the next line, or why the
/// connection is unusable.
fn stop_reader<S: Session>(c: &mut Conn<S>) -> Result<Vec<u8>, String> {
    c.pause.store(true, Ordering::SeqCst);
    let deadline = Instant::now() + READ_POLL * 20;
    loop {
        match c.lines.recv_deadline(deadline) {
            Ok(ReadMsg::Paused(partial)) => {
                c.lines = never();
                c._reader = None;
                return Ok(partial);
            }
            Ok(ReadMsg::Line(line)) => {
                let now = Instant::now();
                c.last_line = now;
                match c.session.line(&line, now, &mut c.out, &mut c.held) {
                    Outcome::Continue => {}
                    Outcome::Close(r) | Outcome::Refused(r) => return Err(r),
                    Outcome::Redirect { .. } => {
                        return Err("client.reconnect while taking the connection over".to_owned());
                    }
                }
            }
            Ok(ReadMsg::Closed(r)) => return Err(r),
            Ok(ReadMsg::Connected(_)) => {}
            Err(_) => return Err("its reader did not stop in time".to_owned()),
        }
    }
}

/// Writes all of `buf` to `s`, which may be non-blocking (an owned connection's socket is
/// shared with its owner, whose connector makes it so): while the socket is full it waits in
/// short naps (1 to 10 ms; this crate has no `poll`), failing once no byte went for `timeout`.
fn write_all(s: &TcpStream, mut buf: &[u8], timeout: Duration) -> std::io::Result<()> {
    let mut w = s;
    let mut until = Instant::now() + timeout;
    let mut nap = Duration::from_millis(1);
    while !buf.is_empty() {
        match w.write(buf) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => {
                buf = buf.get(n..).unwrap_or_default();
                until = Instant::now() + timeout;
                nap = Duration::from_millis(1);
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() >= until {
                    return Err(std::io::ErrorKind::TimedOut.into());
                }
                std::thread::sleep(nap);
                nap = (nap * 2).min(Duration::from_millis(10));
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Connects to `host:port` (each address it resolves to in turn) within `timeout` each.
fn open(host: &str, port: u16, timeout: Duration) -> std::io::Result<TcpStream> {
    let mut last = std::io::Error::new(std::io::ErrorKind::NotFound, "no address");
    for addr in (host, port).to_socket_addrs()? {
        match connect_one(addr, timeout) {
            Ok(s) => return Ok(s),
            Err(e) => last = e,
        }
    }
    Err(last)
}

/// Socket buffers of an upstream link, each way (ckpool's 1 MiB): one link carries the lines of
/// thousands of miners, so bursts (a notify fan-out to every sub-client) fit in the kernel.
const LINK_BUFFER: usize = 1 << 20;

/// Connects to one address with large buffers (set before the connect, so the window scale
/// allows them) and TCP keep-alive (a silent link whose peer vanished is noticed by the kernel).
fn connect_one(addr: std::net::SocketAddr, timeout: Duration) -> std::io::Result<TcpStream> {
    use socket2::{Domain, Protocol, SockAddr, Socket, TcpKeepalive, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    // The kernel caps these at net.core.{w,r}mem_max; a smaller buffer is not an error.
    if let Err(e) = socket.set_send_buffer_size(LINK_BUFFER) {
        tracing::debug!(error = %e, "upstream link: cannot set the send buffer");
    }
    if let Err(e) = socket.set_recv_buffer_size(LINK_BUFFER) {
        tracing::debug!(error = %e, "upstream link: cannot set the receive buffer");
    }
    let keepalive = TcpKeepalive::new()
        .with_time(Duration::from_secs(60))
        .with_interval(Duration::from_secs(10));
    if let Err(e) = socket.set_tcp_keepalive(&keepalive) {
        tracing::debug!(error = %e, "upstream link: cannot set TCP keep-alive");
    }
    socket.connect_timeout(&SockAddr::from(addr), timeout)?;
    Ok(socket.into())
}

/// A connection's thread: connects, hands a clone of the stream over, then sends lines
/// (without newline) to `tx` until the stream ends, the engine drops the connection, or
/// `pause` is set ([`read_lines`]).
fn connect_and_read(
    host: &str,
    port: u16,
    connect_timeout: Duration,
    write_timeout: Duration,
    pause: &AtomicBool,
    tx: &Sender<ReadMsg>,
) {
    let opened = open(host, port, connect_timeout).and_then(|stream| {
        stream.set_nodelay(true)?;
        stream.set_write_timeout(Some(write_timeout))?;
        stream.set_read_timeout(Some(READ_POLL))?;
        let writer = stream.try_clone()?;
        Ok((stream, writer))
    });
    let stream = match opened {
        Ok((stream, writer)) => {
            if tx.send(ReadMsg::Connected(writer)).is_err() {
                // The engine gave up on this connection meanwhile.
                let _ = stream.shutdown(Shutdown::Both);
                return;
            }
            stream
        }
        Err(e) => {
            let _ = tx.send(ReadMsg::Closed(format!("connect to {host}:{port}: {e}")));
            return;
        }
    };
    read_lines(stream, Vec::new(), pause, tx);
}

/// A reader thread for a connection that is connected already (a resumed or adopted one),
/// starting with the bytes `partial`: its channel, its pause flag and its thread.
fn spawn_reader(
    index: usize,
    stream: TcpStream,
    partial: Vec<u8>,
) -> std::io::Result<(Receiver<ReadMsg>, Arc<AtomicBool>, JoinHandle<()>)> {
    stream.set_read_timeout(Some(READ_POLL))?;
    let (tx, lines) = bounded(READ_AHEAD);
    let pause = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&pause);
    let reader = std::thread::Builder::new()
        .name(format!("up-read-{index}"))
        .spawn(move || read_lines(stream, partial, &flag, &tx))?;
    Ok((lines, pause, reader))
}

/// Reads `stream` (whose receive timeout is [`READ_POLL`]) and sends its lines, without
/// newline (and a trailing `\r`), to `tx`, the first ones made of `buf` (bytes read before).
/// Stops when the stream ends or fails ([`ReadMsg::Closed`]), when the engine is gone, or, once
/// every complete line read is sent, when `pause` is set: then [`ReadMsg::Paused`] carries what
/// was read of the next line.
fn read_lines(mut stream: TcpStream, mut buf: Vec<u8>, pause: &AtomicBool, tx: &Sender<ReadMsg>) {
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        let mut start = 0;
        while let Some(i) = buf
            .get(start..)
            .and_then(|rest| rest.iter().position(|&b| b == b'\n'))
        {
            let mut line = buf.get(start..start + i).unwrap_or_default();
            start += i + 1;
            if line.last() == Some(&b'\r') {
                line = line.get(..line.len() - 1).unwrap_or_default();
            }
            if tx.send(ReadMsg::Line(line.to_vec())).is_err() {
                return;
            }
        }
        buf.drain(..start);
        if buf.len() > MAX_LINE {
            let _ = tx.send(ReadMsg::Closed("line too long".to_owned()));
            return;
        }
        if pause.load(Ordering::SeqCst) {
            let _ = tx.send(ReadMsg::Paused(buf));
            return;
        }
        match stream.read(&mut chunk) {
            Ok(0) => {
                let why = if buf.is_empty() {
                    "connection closed by upstream"
                } else {
                    "connection closed by upstream mid-line"
                };
                let _ = tx.send(ReadMsg::Closed(why.to_owned()));
                return;
            }
            Ok(n) => buf.extend_from_slice(chunk.get(..n).unwrap_or_default()),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock
                        | std::io::ErrorKind::TimedOut
                        | std::io::ErrorKind::Interrupted
                ) => {}
            Err(e) => {
                let _ = tx.send(ReadMsg::Closed(format!("read: {e}")));
                return;
            }
        }
    }
}
