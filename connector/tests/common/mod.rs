//! What several of the connector's test binaries share.

use std::net::SocketAddr;
use std::time::Instant;

use ckpool_connector::{CloseReason, ConnId, Handler, Outbox};

/// A handler that does nothing: for tests of listeners and threads, not of lines.
pub(crate) struct Silent;

impl Handler for Silent {
    type Msg = ();
    fn on_open(&mut self, _: Instant, _: ConnId, _: SocketAddr, _: usize, _: &mut Outbox) {}
    fn on_line(&mut self, _: Instant, _: ConnId, _: &[u8], _: &mut Outbox) {}
    fn on_close(&mut self, _: Instant, _: ConnId, _: CloseReason) {}
    fn on_msg(&mut self, _: Instant, (): (), _: &mut Outbox) {}
    fn on_tick(&mut self, _: Instant, _: &mut Outbox) {}
}
