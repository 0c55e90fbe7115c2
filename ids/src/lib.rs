//! Identifiers shared by the connector and the stratifier: [`ConnId`] (a connection, as its
//! connector thread, slot and generation) and [`Peer`] (a client's address in 18 bytes).
//!
//! A crate of its own, with no dependencies, so that the connector compiles none of the
//! bitcoin, JSON or hashing code that `ckpool-common` carries.
#![forbid(unsafe_code)]

mod conn;
mod peer;

pub use conn::ConnId;
pub use peer::Peer;
