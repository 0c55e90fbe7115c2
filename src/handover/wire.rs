//! The handover's framing on a unix stream socket: a 7-byte header (kind, descriptor count as a
//! big-endian `u16`, payload length as a big-endian `u32`) sent with the frame's descriptors
//! attached (`SCM_RIGHTS`), then the payload.

use std::io::{self, Read, Write};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;

use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};

/// Most descriptors one frame carries (the kernel's `SCM_MAX_FD` is 253).
pub(crate) const MAX_FDS: usize = 253;
/// Largest payload accepted (a batch of 253 connections with their unsent bytes stays far below).
const MAX_PAYLOAD: u32 = 1 << 30;
/// Header bytes: kind, descriptor count, payload length.
const HEADER: usize = 7;

/// What a frame is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    /// Old → new: the listening sockets (descriptors), their addresses one a line (payload).
    Listeners,
    /// Old → new: the stratifier's pool state, opaque.
    PoolState,
    /// Old → new: connections (descriptors), then a `u32` count and their `ConnState::encode`
    /// bytes back to back (payload).
    Batch,
    /// Old → new: nothing follows; the new instance owns everything once it acks this.
    Commit,
    /// New → old: ready (first), or the last frame was taken over (payload: the count adopted
    /// and the descriptors the next batch may carry, `u32` each).
    Ack,
    /// Either way: the handover is off (payload: the reason, text).
    Abort,
}

impl Kind {
    fn to_byte(self) -> u8 {
        match self {
            Self::Listeners => 1,
            Self::PoolState => 2,
            Self::Batch => 3,
            Self::Commit => 4,
            Self::Ack => 5,
            Self::Abort => 6,
        }
    }

    fn from_byte(b: u8) -> io::Result<Self> {
        Ok(match b {
            1 => Self::Listeners,
            2 => Self::PoolState,
            3 => Self::Batch,
            4 => Self::Commit,
            5 => Self::Ack,
            6 => Self::Abort,
            _ => return Err(invalid(format!("unknown handover frame kind {b}"))),
        })
    }
}

/// A frame as received.
#[derive(Debug)]
pub(crate) struct Frame {
    /// What it is.
    pub(crate) kind: Kind,
    /// Its payload.
    pub(crate) payload: Vec<u8>,
    /// The descriptors that came with it (close-on-exec).
    pub(crate) fds: Vec<OwnedFd>,
}

fn invalid(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

/// Sends one frame: at most [`MAX_FDS`] descriptors (they stay open here: the receiver gets
/// duplicates).
pub(crate) fn send(
    sock: &UnixStream,
    kind: Kind,
    payload: &[u8],
    fds: &[BorrowedFd<'_>],
) -> io::Result<()> {
    if fds.len() > MAX_FDS {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "too many descriptors for one frame",
        ));
    }
    let len = u32::try_from(payload.len())
        .ok()
        .filter(|&l| l <= MAX_PAYLOAD)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "payload too big"))?;
    let nfds = u16::try_from(fds.len()).unwrap_or(u16::MAX);
    let mut header = [0u8; HEADER];
    header[0] = kind.to_byte();
    header[1..3].copy_from_slice(&nfds.to_be_bytes());
    header[3..7].copy_from_slice(&len.to_be_bytes());
    let mut space = vec![MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !fds.is_empty() && !control.push(SendAncillaryMessage::ScmRights(fds)) {
        return Err(io::Error::other(
            "descriptors do not fit the control buffer",
        ));
    }
    // The descriptors go with the first byte; the rest of the header follows plainly.
    let sent = loop {
        match rustix::net::sendmsg(
            sock.as_fd(),
            &[io::IoSlice::new(&header)],
            &mut control,
            SendFlags::NOSIGNAL,
        ) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => break n,
            Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
    };
    let mut w = sock;
    w.write_all(header.get(sent..).unwrap_or_default())?;
    w.write_all(payload)?;
    w.flush()
}

/// Receives one frame (blocking, within the socket's read timeout). The peer closing before a
/// header is `UnexpectedEof`.
pub(crate) fn recv(sock: &UnixStream) -> io::Result<Frame> {
    let mut header = [0u8; HEADER];
    let mut space = vec![MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let got = loop {
        match rustix::net::recvmsg(
            sock.as_fd(),
            &mut [io::IoSliceMut::new(&mut header)],
            &mut control,
            RecvFlags::CMSG_CLOEXEC,
        ) {
            Ok(m) => {
                if m.flags.contains(ReturnFlags::CTRUNC) {
                    return Err(invalid("descriptors truncated"));
                }
                break m.bytes;
            }
            Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
    };
    let mut fds = Vec::new();
    for msg in control.drain() {
        if let RecvAncillaryMessage::ScmRights(rights) = msg {
            fds.extend(rights);
        }
    }
    if got == 0 {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    let mut r = sock;
    r.read_exact(header.get_mut(got..).unwrap_or_default())?;
    let kind = Kind::from_byte(header[0])?;
    let nfds = usize::from(u16::from_be_bytes([header[1], header[2]]));
    let len = u32::from_be_bytes([header[3], header[4], header[5], header[6]]);
    if nfds != fds.len() {
        return Err(invalid(format!(
            "frame announced {nfds} descriptors, {} came",
            fds.len()
        )));
    }
    if len > MAX_PAYLOAD {
        return Err(invalid("payload too big"));
    }
    let mut payload = vec![0u8; len as usize];
    r.read_exact(&mut payload)?;
    Ok(Frame { kind, payload, fds })
}

/// A batch's payload: the count, then each state's encoding.
pub(crate) fn encode_batch(states: &[connector::ConnState]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(
        &u32::try_from(states.len())
            .unwrap_or(u32::MAX)
            .to_be_bytes(),
    );
    for s in states {
        s.encode(&mut out);
    }
    out
}

/// Reads a batch's payload back; fails unless it holds exactly `expect` states.
pub(crate) fn decode_batch(payload: &[u8], expect: usize) -> io::Result<Vec<connector::ConnState>> {
    let (count, mut rest) = payload
        .split_first_chunk::<4>()
        .ok_or_else(|| invalid("short batch"))?;
    let count = u32::from_be_bytes(*count) as usize;
    if count != expect {
        return Err(invalid(format!(
            "batch of {count} states for {expect} descriptors"
        )));
    }
    let mut states = Vec::with_capacity(count);
    for _ in 0..count {
        let (s, used) = connector::ConnState::decode(rest)?;
        states.push(s);
        rest = rest.get(used..).unwrap_or_default();
    }
    if !rest.is_empty() {
        return Err(invalid("trailing bytes after a batch"));
    }
    Ok(states)
}

/// An ack's payload: the count adopted, then the descriptors the sender can take in the next
/// batch (both `u32`, big-endian).
pub(crate) fn ack_payload(count: usize, room: usize) -> [u8; 8] {
    let mut p = [0u8; 8];
    p[..4].copy_from_slice(&u32::try_from(count).unwrap_or(u32::MAX).to_be_bytes());
    p[4..].copy_from_slice(&u32::try_from(room).unwrap_or(u32::MAX).to_be_bytes());
    p
}

/// Reads [`ack_payload`] back: (count, room); `None` when short.
pub(crate) fn parse_ack(payload: &[u8]) -> Option<(usize, usize)> {
    let (count, rest) = payload.split_first_chunk::<4>()?;
    let room = rest.first_chunk::<4>()?;
    Some((
        u32::from_be_bytes(*count) as usize,
        u32::from_be_bytes(*room) as usize,
    ))
}

#[cfg(test)]
mod tests {
    use std::net::{TcpListener, TcpStream};
    use std::os::fd::AsFd;

    use super::*;

    #[test]
    fn frames_round_trip_with_their_descriptors() {
        let (a, b) = UnixStream::pair().expect("socketpair");
        // Real sockets: the receiver's copies must reach the same connection.
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        // Each accepted at once: the backlog may be shorter than 253.
        let (clients, _accepted): (Vec<TcpStream>, Vec<TcpStream>) = (0..MAX_FDS)
            .map(|_| {
                let c = TcpStream::connect(addr).expect("connect");
                (c, listener.accept().expect("accept").0)
            })
            .unzip();
        let borrowed: Vec<BorrowedFd<'_>> = clients.iter().map(AsFd::as_fd).collect();
        send(&a, Kind::Batch, b"states", &borrowed).expect("send batch");
        send(&a, Kind::Commit, b"", &[]).expect("send commit");
        let big = vec![7u8; 300_000];
        let writer = std::thread::spawn(move || {
            send(&a, Kind::PoolState, &big, &[]).expect("send big");
            a
        });
        let f = recv(&b).expect("recv batch");
        assert_eq!(f.kind, Kind::Batch);
        assert_eq!(f.payload, b"states");
        assert_eq!(f.fds.len(), MAX_FDS);
        // The first received descriptor is the first client's socket: same local address.
        let got = TcpStream::from(f.fds.into_iter().next().expect("fd"));
        assert_eq!(
            got.local_addr().expect("local"),
            clients[0].local_addr().expect("local")
        );
        let f = recv(&b).expect("recv commit");
        assert_eq!((f.kind, f.payload.len(), f.fds.len()), (Kind::Commit, 0, 0));
        let f = recv(&b).expect("recv big");
        assert_eq!(f.kind, Kind::PoolState);
        assert_eq!(f.payload.len(), 300_000);
        assert!(f.payload.iter().all(|&x| x == 7));
        let a = writer.join().expect("writer");
        drop(a);
        let err = recv(&b).expect_err("eof");
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    }

    #[test]
    fn too_many_descriptors_and_bad_frames_are_refused() {
        let (a, b) = UnixStream::pair().expect("socketpair");
        let fds: Vec<BorrowedFd<'_>> = (0..=MAX_FDS).map(|_| a.as_fd()).collect();
        let err = send(&a, Kind::Batch, b"", &fds).expect_err("254 fds");
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        // A header announcing a descriptor that is not there.
        (&a).write_all(&[3, 0, 1, 0, 0, 0, 0]).expect("raw");
        assert_eq!(
            recv(&b).expect_err("missing fd").kind(),
            io::ErrorKind::InvalidData
        );
        (&a).write_all(&[99, 0, 0, 0, 0, 0, 0]).expect("raw");
        assert_eq!(
            recv(&b).expect_err("bad kind").kind(),
            io::ErrorKind::InvalidData
        );
    }

    #[test]
    fn batches_round_trip_and_must_match_their_descriptors() {
        let states: Vec<connector::ConnState> = (0..3u8)
            .map(|i| connector::ConnState {
                peer: format!("10.0.0.{i}:3333").parse().expect("addr"),
                listener: usize::from(i),
                partial: vec![i; 3],
                unsent: b"{\"id\":1}\n".to_vec(),
                user: vec![i; usize::from(i)],
            })
            .collect();
        let wire = encode_batch(&states);
        assert_eq!(decode_batch(&wire, 3).expect("decode"), states);
        assert!(decode_batch(&wire, 2).is_err());
        assert!(decode_batch(&wire[..wire.len() - 1], 3).is_err());
        let mut extra = wire.clone();
        extra.push(0);
        assert!(decode_batch(&extra, 3).is_err());
    }
}
