//! Admin unix-socket framing, as ckpool's: one request per connection, each message a 4-byte
//! little-endian length followed by that many bytes; the server answers with zero or one message
//! and closes.

use std::io::{self, Read, Write};

/// Largest message accepted (ckpool allows up to 2 GiB; this is plenty for stats and commands).
pub const MAX_MESSAGE: u32 = 16 * 1024 * 1024;

/// Writes one framed message.
pub fn write_message<W: Write>(w: &mut W, msg: &[u8]) -> io::Result<()> {
    let len = u32::try_from(msg.len())
        .ok()
        .filter(|&l| l > 0 && l <= MAX_MESSAGE)
        .ok_or_else(|| {
            io::Error::new(io::ErrorKind::InvalidInput, "message length out of range")
        })?;
    w.write_all(&len.to_le_bytes())?;
    w.write_all(msg)?;
    w.flush()
}

/// Reads one framed message; `Ok(None)` when the peer closed before sending a length.
pub fn read_message<R: Read>(r: &mut R) -> io::Result<Option<Vec<u8>>> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = u32::from_le_bytes(len);
    if len == 0 || len > MAX_MESSAGE {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "message length out of range",
        ));
    }
    let mut buf = vec![0u8; len as usize];
    r.read_exact(&mut buf)?;
    Ok(Some(buf))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let mut v = Vec::new();
        write_message(&mut v, b"stats").unwrap();
        assert_eq!(&v[..4], &5u32.to_le_bytes());
        let got = read_message(&mut &v[..]).unwrap().unwrap();
        assert_eq!(got, b"stats");
        assert!(read_message(&mut &b""[..]).unwrap().is_none());
        assert!(read_message(&mut &[0u8, 0, 0, 0][..]).is_err());
        assert!(write_message(&mut Vec::new(), b"").is_err());
    }
}
