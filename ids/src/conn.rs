//! Compact identifiers shared by the connector and the stratifier.

use std::fmt;

/// Identifies one connection for its whole life: the connector thread that owns it, a slot in that
/// thread's connection table and the slot's generation (so a late message for a reused slot is
/// recognised as stale and dropped).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnId(pub u64);

impl ConnId {
    /// Packs a thread index, slot generation and slot index.
    pub const fn new(thread: u16, generation: u16, slot: u32) -> Self {
        Self(((thread as u64) << 48) | ((generation as u64) << 32) | slot as u64)
    }

    /// Index of the connector thread that owns the connection.
    pub const fn thread(self) -> u16 {
        (self.0 >> 48) as u16
    }

    /// Generation of the slot.
    pub const fn generation(self) -> u16 {
        (self.0 >> 32) as u16
    }

    /// Slot index in the owning thread's connection table.
    pub const fn slot(self) -> u32 {
        self.0 as u32
    }
}

impl fmt::Debug for ConnId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.thread(), self.slot(), self.generation())
    }
}

impl fmt::Display for ConnId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let id = ConnId::new(3, 65535, 123_456);
        assert_eq!(id.thread(), 3);
        assert_eq!(id.generation(), 65535);
        assert_eq!(id.slot(), 123_456);
    }
}
