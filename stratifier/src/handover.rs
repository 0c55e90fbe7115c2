//! The wire format of a handover: the state a process passes to its successor at an upgrade
//! ([`crate::Pool::export_state`], [`crate::Shard::export_session`]).
//!
//! Every blob starts with a format version byte, then explicit little-endian fields; lengths
//! are `u32` and checked against the bytes left before anything is allocated, so a truncated,
//! corrupt or foreign blob is refused with a [`HandoverError`], never a panic or a huge
//! allocation. Times are ages relative to the `now` of the export (and are rebuilt against the
//! `now` of the import), since an [`Instant`] means nothing in another process.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::{Duration, Instant};

/// The format version of a pool state blob (2: best shares per round and ever).
pub(crate) const POOL_FORMAT: u8 = 2;
/// The format version of a session blob.
pub(crate) const SESSION_FORMAT: u8 = 1;

/// Why a handover blob was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandoverError {
    /// The leading format version byte is not one this build reads.
    #[error("handover format version {0} not supported")]
    Version(u8),
    /// The blob ended inside a field.
    #[error("handover blob truncated")]
    Truncated,
    /// Bytes left over after the last field.
    #[error("handover blob has {0} trailing bytes")]
    Trailing(usize),
    /// A field holds a value that cannot be (a zero difficulty, bad UTF-8, an unknown tag...).
    #[error("handover field {0} is malformed")]
    Malformed(&'static str),
    /// The blob does not fit this pool (another source layout, an unknown source).
    #[error("handover state does not fit this pool: {0}")]
    Mismatch(&'static str),
    /// The session's client id or extranonce1 is already in use here.
    #[error("handover session conflicts with one in use: {0}")]
    InUse(&'static str),
}

/// Writes fields little-endian.
#[derive(Debug, Default)]
pub(crate) struct Writer {
    pub(crate) buf: Vec<u8>,
}

impl Writer {
    pub(crate) fn u8(&mut self, v: u8) {
        self.buf.push(v);
    }
    pub(crate) fn u16(&mut self, v: u16) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    pub(crate) fn u32(&mut self, v: u32) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    pub(crate) fn u64(&mut self, v: u64) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    pub(crate) fn i64(&mut self, v: i64) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    pub(crate) fn f64(&mut self, v: f64) {
        self.u64(v.to_bits());
    }
    pub(crate) fn bool(&mut self, v: bool) {
        self.u8(u8::from(v));
    }
    /// A length (saturating at `u32::MAX`, which no reader accepts for real data).
    pub(crate) fn len(&mut self, n: usize) {
        self.u32(u32::try_from(n).unwrap_or(u32::MAX));
    }
    pub(crate) fn bytes(&mut self, b: &[u8]) {
        self.len(b.len());
        self.buf.extend_from_slice(b);
    }
    pub(crate) fn str(&mut self, s: &str) {
        self.bytes(s.as_bytes());
    }
    pub(crate) fn array<const N: usize>(&mut self, a: &[u8; N]) {
        self.buf.extend_from_slice(a);
    }
    /// A duration in nanoseconds (saturating).
    pub(crate) fn duration(&mut self, d: Duration) {
        self.u64(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
    }
    /// How long before `now` `t` was (0 for a time after `now`).
    pub(crate) fn age(&mut self, t: Instant, now: Instant) {
        self.duration(now.saturating_duration_since(t));
    }
    pub(crate) fn opt_age(&mut self, t: Option<Instant>, now: Instant) {
        match t {
            None => self.u8(0),
            Some(t) => {
                self.u8(1);
                self.age(t, now);
            }
        }
    }
    pub(crate) fn ip(&mut self, ip: IpAddr) {
        match ip {
            IpAddr::V4(a) => {
                self.u8(4);
                self.array(&a.octets());
            }
            IpAddr::V6(a) => {
                self.u8(6);
                self.array(&a.octets());
            }
        }
    }
}

/// Reads what [`Writer`] wrote, refusing anything short or out of range.
#[derive(Debug)]
pub(crate) struct Reader<'a> {
    b: &'a [u8],
}

impl<'a> Reader<'a> {
    /// A reader of a blob whose first byte must be `version`.
    pub(crate) fn new(b: &'a [u8], version: u8) -> Result<Self, HandoverError> {
        let mut r = Self { b };
        let v = r.u8()?;
        if v != version {
            return Err(HandoverError::Version(v));
        }
        Ok(r)
    }

    /// Fails unless every byte was read.
    pub(crate) fn finish(&self) -> Result<(), HandoverError> {
        if self.b.is_empty() {
            Ok(())
        } else {
            Err(HandoverError::Trailing(self.b.len()))
        }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], HandoverError> {
        if self.b.len() < n {
            return Err(HandoverError::Truncated);
        }
        let (head, rest) = self.b.split_at(n);
        self.b = rest;
        Ok(head)
    }

    pub(crate) fn array<const N: usize>(&mut self) -> Result<[u8; N], HandoverError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }
    pub(crate) fn u8(&mut self) -> Result<u8, HandoverError> {
        Ok(u8::from_le_bytes(self.array()?))
    }
    pub(crate) fn u16(&mut self) -> Result<u16, HandoverError> {
        Ok(u16::from_le_bytes(self.array()?))
    }
    pub(crate) fn u32(&mut self) -> Result<u32, HandoverError> {
        Ok(u32::from_le_bytes(self.array()?))
    }
    pub(crate) fn u64(&mut self) -> Result<u64, HandoverError> {
        Ok(u64::from_le_bytes(self.array()?))
    }
    pub(crate) fn i64(&mut self) -> Result<i64, HandoverError> {
        Ok(i64::from_le_bytes(self.array()?))
    }
    pub(crate) fn f64(&mut self) -> Result<f64, HandoverError> {
        Ok(f64::from_bits(self.u64()?))
    }
    pub(crate) fn bool(&mut self, what: &'static str) -> Result<bool, HandoverError> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(HandoverError::Malformed(what)),
        }
    }
    /// A count of items of at least `min_size` bytes each: no more than the bytes left allow,
    /// so a forged count cannot make the reader allocate beyond the blob's size.
    pub(crate) fn count(&mut self, min_size: usize) -> Result<usize, HandoverError> {
        let n = usize::try_from(self.u32()?).map_err(|_| HandoverError::Truncated)?;
        if n.saturating_mul(min_size.max(1)) > self.b.len() {
            return Err(HandoverError::Truncated);
        }
        Ok(n)
    }
    pub(crate) fn bytes(&mut self) -> Result<&'a [u8], HandoverError> {
        let n = self.count(1)?;
        self.take(n)
    }
    pub(crate) fn str(&mut self, what: &'static str) -> Result<&'a str, HandoverError> {
        std::str::from_utf8(self.bytes()?).map_err(|_| HandoverError::Malformed(what))
    }
    pub(crate) fn duration(&mut self) -> Result<Duration, HandoverError> {
        Ok(Duration::from_nanos(self.u64()?))
    }
    /// An instant written as an age before the export's `now`, against this `now` (clamped to
    /// `now` if the age reaches before this process's clock began).
    pub(crate) fn age(&mut self, now: Instant) -> Result<Instant, HandoverError> {
        let d = self.duration()?;
        Ok(now.checked_sub(d).unwrap_or(now))
    }
    pub(crate) fn opt_age(&mut self, now: Instant) -> Result<Option<Instant>, HandoverError> {
        if self.bool("optional time")? {
            self.age(now).map(Some)
        } else {
            Ok(None)
        }
    }
    pub(crate) fn ip(&mut self) -> Result<IpAddr, HandoverError> {
        match self.u8()? {
            4 => Ok(IpAddr::V4(Ipv4Addr::from(self.array::<4>()?))),
            6 => Ok(IpAddr::V6(Ipv6Addr::from(self.array::<16>()?))),
            _ => Err(HandoverError::Malformed("address")),
        }
    }
}
