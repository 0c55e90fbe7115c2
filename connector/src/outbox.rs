//! What a handler hands back to the connector: bytes to send and connections to close.

use std::sync::Arc;

use ids::ConnId;

/// Bytes to send to a connection: owned, or shared between many connections without copying
/// (a `mining.notify` built once and sent to every miner).
#[derive(Clone, Debug)]
pub enum SendBuf {
    /// Bytes owned by this one send.
    Owned(Vec<u8>),
    /// Bytes shared by reference count; never copied per connection.
    Shared(Arc<[u8]>),
}

impl SendBuf {
    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        match self {
            Self::Owned(v) => v,
            Self::Shared(a) => a,
        }
    }

    /// Number of bytes.
    pub fn len(&self) -> usize {
        self.as_slice().len()
    }

    /// Whether there are no bytes.
    pub fn is_empty(&self) -> bool {
        self.as_slice().is_empty()
    }
}

impl AsRef<[u8]> for SendBuf {
    fn as_ref(&self) -> &[u8] {
        self.as_slice()
    }
}

impl From<Vec<u8>> for SendBuf {
    fn from(v: Vec<u8>) -> Self {
        Self::Owned(v)
    }
}

impl From<String> for SendBuf {
    fn from(s: String) -> Self {
        Self::Owned(s.into_bytes())
    }
}

impl From<Arc<[u8]>> for SendBuf {
    fn from(a: Arc<[u8]>) -> Self {
        Self::Shared(a)
    }
}

/// One request recorded in an [`Outbox`].
#[derive(Clone, Debug)]
pub enum Action {
    /// Queue bytes for a connection.
    Send(ConnId, SendBuf),
    /// Close a connection once the bytes queued for it before this request are written.
    Close(ConnId),
    /// The connection carries many peers' traffic (a passthrough or node link): from now on
    /// its cap on queued bytes is [`Config::max_outbound_trunk`](crate::Config) instead of
    /// [`Config::max_outbound`](crate::Config), its lines may be 16 MiB long (or
    /// [`Config::max_line`](crate::Config) if longer), its reads are never paused and it is never
    /// closed as idle (a link with no peers behind it may be silent).
    Trunk(ConnId),
}

/// Collects what a handler wants done; flushed by the connector after each callback batch, in
/// order.
///
/// Requests for connections that are closed (or owned by another connector thread) are ignored
/// silently, as are sends to a connection after a close was requested for it.
#[derive(Debug, Default)]
pub struct Outbox {
    actions: Vec<Action>,
}

impl Outbox {
    /// An empty outbox (the connector passes its own to the handler; this is for tests of code
    /// written against handlers).
    pub fn new() -> Self {
        Self::default()
    }

    /// Queues `buf` to be written to `conn`.
    pub fn send(&mut self, conn: ConnId, buf: impl Into<SendBuf>) {
        self.actions.push(Action::Send(conn, buf.into()));
    }

    /// Closes `conn` after the bytes already queued for it are written (best effort, bounded in
    /// time: a peer that does not read is closed anyway after a few seconds).
    pub fn close(&mut self, conn: ConnId) {
        self.actions.push(Action::Close(conn));
    }

    /// Marks `conn` as a trunk ([`Action::Trunk`]): it may queue up to
    /// [`Config::max_outbound_trunk`](crate::Config) bytes, send long lines, and is never
    /// closed as idle.
    pub fn trunk(&mut self, conn: ConnId) {
        self.actions.push(Action::Trunk(conn));
    }

    /// Whether nothing is recorded.
    pub fn is_empty(&self) -> bool {
        self.actions.is_empty()
    }

    /// The recorded requests, in order.
    pub fn actions(&self) -> &[Action] {
        &self.actions
    }

    /// Removes and returns the recorded requests, in order.
    pub fn drain(&mut self) -> std::vec::Drain<'_, Action> {
        self.actions.drain(..)
    }

    /// Whether a close of `conn` is recorded at or after action index `from`.
    pub(crate) fn closes_since(&self, from: usize, conn: ConnId) -> bool {
        self.actions.get(from..).is_some_and(|a| {
            a.iter()
                .any(|a| matches!(a, Action::Close(c) if *c == conn))
        })
    }

    /// Number of recorded requests.
    pub(crate) fn len(&self) -> usize {
        self.actions.len()
    }

    /// Frees the room beyond `keep` requests (a broadcast records one per connection).
    pub(crate) fn shrink_to(&mut self, keep: usize) {
        self.actions.shrink_to(keep);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_in_order() {
        let a = ConnId::new(0, 1, 2);
        let b = ConnId::new(0, 1, 3);
        let mut out = Outbox::new();
        out.send(a, b"x".to_vec());
        out.close(b);
        out.send(b, String::from("y"));
        assert!(out.closes_since(0, b));
        assert!(!out.closes_since(2, b));
        assert!(!out.closes_since(0, a));
        let got: Vec<_> = out.drain().collect();
        assert!(matches!(&got[0], Action::Send(c, SendBuf::Owned(v)) if *c == a && v == b"x"));
        assert!(matches!(&got[1], Action::Close(c) if *c == b));
        assert!(matches!(&got[2], Action::Send(c, buf) if *c == b && buf.as_slice() == b"y"));
        assert!(out.is_empty());
    }
}
