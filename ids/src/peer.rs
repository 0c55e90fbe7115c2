//! A client's address in 18 bytes (a `SocketAddr` takes 32): kept per connection, where every
//! byte counts a hundred thousand times over.

use std::fmt;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};

/// An IPv4 or IPv6 address and port. IPv4 is stored as its IPv4-mapped IPv6 form and shown as
/// IPv4 again (a socket never reports a mapped address for an IPv6 peer, so nothing is lost).
/// IPv6 flow information and scope ids are not kept.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Peer {
    ip: [u8; 16],
    port: [u8; 2],
}

impl Peer {
    /// The address as a standard socket address.
    pub fn addr(self) -> SocketAddr {
        SocketAddr::new(self.ip(), u16::from_be_bytes(self.port))
    }

    /// The IP address alone.
    pub fn ip(self) -> IpAddr {
        let v6 = Ipv6Addr::from(self.ip);
        match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(v6),
        }
    }
}

impl From<SocketAddr> for Peer {
    fn from(addr: SocketAddr) -> Self {
        let ip = match addr.ip() {
            IpAddr::V4(v4) => v4.to_ipv6_mapped(),
            IpAddr::V6(v6) => v6,
        };
        Self {
            ip: ip.octets(),
            port: addr.port().to_be_bytes(),
        }
    }
}

impl fmt::Display for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.addr(), f)
    }
}

impl fmt::Debug for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.addr(), f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_shows_like_a_socket_address() {
        for s in [
            "127.0.0.1:3333",
            "[::1]:4444",
            "[2001:db8::7]:1",
            "0.0.0.0:0",
        ] {
            let addr: SocketAddr = s.parse().unwrap();
            let p = Peer::from(addr);
            assert_eq!(p.addr(), addr);
            assert_eq!(p.to_string(), s);
            assert_eq!(p.ip(), addr.ip());
        }
        assert_eq!(size_of::<Peer>(), 18);
        assert_eq!(align_of::<Peer>(), 1);
    }
}
