//! Who a session belongs to: a miner on its own connection, or a miner behind a passthrough.

use std::fmt;

use common::ConnId;

/// A client of the stratifier: a miner connected directly, or a sub-client, a miner behind a
/// passthrough whose lines arrive on the passthrough's connection tagged with the id the
/// passthrough gave it. The shard keeps a full session for each; closing a connection ends its
/// direct session and every sub-client on it.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ClientId {
    /// A miner on its own connection.
    Direct(ConnId),
    /// A miner behind the passthrough on this connection, by the passthrough's id for it.
    Sub(ConnId, u64),
}

impl ClientId {
    /// The connection its lines come on and go out on.
    pub const fn conn(self) -> ConnId {
        match self {
            Self::Direct(c) | Self::Sub(c, _) => c,
        }
    }

    /// The passthrough's id for a sub-client; `None` for a direct client.
    pub const fn remote(self) -> Option<u64> {
        match self {
            Self::Direct(_) => None,
            Self::Sub(_, r) => Some(r),
        }
    }
}

impl From<ConnId> for ClientId {
    fn from(c: ConnId) -> Self {
        Self::Direct(c)
    }
}

/// A direct client is its connection.
impl PartialEq<ConnId> for ClientId {
    fn eq(&self, c: &ConnId) -> bool {
        *self == Self::Direct(*c)
    }
}

impl fmt::Display for ClientId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Direct(c) => fmt::Display::fmt(c, f),
            Self::Sub(c, r) => write!(f, "{c}/{r}"),
        }
    }
}

impl fmt::Debug for ClientId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sub_clients_are_told_apart_by_connection_and_remote_id() {
        let a = ConnId::new(0, 1, 5);
        let b = ConnId::new(0, 1, 6);
        assert_ne!(ClientId::Sub(a, 1), ClientId::Sub(b, 1));
        assert_ne!(ClientId::Sub(a, 1), ClientId::Direct(a));
        assert_eq!(ClientId::Sub(a, 7).conn(), a);
        assert_eq!(ClientId::Sub(a, 7).remote(), Some(7));
        assert_eq!(ClientId::from(a), ClientId::Direct(a));
        assert!(ClientId::Direct(a) == a && ClientId::Sub(a, 0) != a);
        assert_eq!(ClientId::Direct(a).remote(), None);
        assert_eq!(ClientId::Sub(a, 7).to_string(), format!("{a}/7"));
    }
}
