//! The messages a ckpool pool sends its nodes (`mining.node` links, ckpool.md §5.3), both ways,
//! byte-compatible with ckpool 0.9.9 where a capture exists (`workinfo`, `transactions`).
//!
//! Each is one JSON object on its own line with no `client_id` and a `node.method` member:
//!
//! * `transactions`: `{"node.method":"transactions","transaction":[{"hash","data"}…]}`: each
//!   transaction's raw bytes with its **wtxid** in RPC order (what ckpool sends as `hash`).
//! * `workinfo`: every field a node rebuilds a job from, in ckpool's order, `node.method` last.
//!   Numbers are jansson's: integers in decimal, reals as `%.17g` ([`write_real`]).
//! * `block`: a block the pool found (header, coinbase and the share's fields), for the node to
//!   submit to its own bitcoind. No capture of it exists: the fields and their order are those of
//!   the reference, `node.method` last.
//!
//! The readers ([`WorkInfo::parse`], [`parse_transactions`], [`BlockSolve::parse`]) are lenient
//! about order and spacing; they never panic on any input.

use serde_json::Value;

use super::write::{write_hex, write_str, write_u64};
use crate::template::TemplateTx;

/// `node.method` of the pool's transactions.
pub const TRANSACTIONS: &str = "transactions";
/// `node.method` of a job description.
pub const WORKINFO: &str = "workinfo";
/// `node.method` of a block the pool found.
pub const BLOCK: &str = "block";

/// Why a node message could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NodeMsgError {
    /// Not a JSON object.
    #[error("not a JSON object")]
    NotObject,
    /// A field is missing, of the wrong type or malformed.
    #[error("field {0} missing or malformed")]
    Field(&'static str),
}

/// Appends a real as jansson writes one: `%.17g`, a `+` and leading zeros dropped from the
/// exponent, `.0` added when the result would read back as an integer. Not finite: `0.0`.
pub fn write_real(out: &mut Vec<u8>, v: f64) {
    if !v.is_finite() {
        out.extend_from_slice(b"0.0");
        return;
    }
    // %.17g: 17 significant digits; the exponent after rounding picks the style.
    let e = format!("{v:.16e}");
    let (mantissa, exp) = e.split_once('e').unwrap_or((e.as_str(), "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let start = out.len();
    if (-4..17).contains(&exp) {
        let decimals = usize::try_from(16 - exp).unwrap_or(0);
        let fixed = format!("{v:.decimals$}");
        out.extend_from_slice(strip_zeros(&fixed).as_bytes());
    } else {
        out.extend_from_slice(strip_zeros(mantissa).as_bytes());
        out.push(b'e');
        write_i64(out, i64::from(exp));
    }
    let written = out.get(start..).unwrap_or_default();
    if !written.iter().any(|&b| b == b'.' || b == b'e') {
        out.extend_from_slice(b".0");
    }
}

/// `%g`'s removal of trailing zeros after a decimal point (and of the point itself).
fn strip_zeros(s: &str) -> &str {
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.')
    } else {
        s
    }
}

fn write_i64(out: &mut Vec<u8>, n: i64) {
    if n < 0 {
        out.push(b'-');
    }
    write_u64(out, n.unsigned_abs());
}

/// A hash in RPC order (reversed), as hex.
fn write_rpc_hash(out: &mut Vec<u8>, h: &[u8; 32]) {
    let mut r = *h;
    r.reverse();
    write_hex(out, &r);
}

fn key(out: &mut Vec<u8>, first: bool, name: &str) {
    if !first {
        out.push(b',');
    }
    out.push(b'"');
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b"\":");
}

fn hex_field(out: &mut Vec<u8>, name: &str, bytes: &[u8]) {
    key(out, false, name);
    out.push(b'"');
    write_hex(out, bytes);
    out.push(b'"');
}

fn u64_field(out: &mut Vec<u8>, name: &str, n: u64) {
    key(out, false, name);
    write_u64(out, n);
}

/// One job as the pool describes it to its nodes.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkInfo {
    /// The pool's job (workinfo) id; its notify's job id is this as 16 hex digits.
    pub jobid: u64,
    /// The network target, big-endian (as `getblocktemplate` prints it).
    pub target: [u8; 32],
    /// The network difficulty.
    pub diff: f64,
    /// Block version.
    pub version: u32,
    /// The template's `curtime`.
    pub curtime: u32,
    /// Previous block hash, internal byte order (sent in stratum's word-swapped form).
    pub prev_hash: [u8; 32],
    /// The header's ntime.
    pub ntime: u32,
    /// nBits.
    pub bits: u32,
    /// What the coinbase may pay, in satoshis.
    pub coinbase_value: u64,
    /// Height of the block it builds.
    pub height: u64,
    /// `coinbaseaux.flags` bytes.
    pub flags: Vec<u8>,
    /// The transactions after the coinbase, by txid (internal byte order), in block order.
    pub txids: Vec<[u8; 32]>,
    /// The coinbase's merkle branch.
    pub branch: Vec<[u8; 32]>,
    /// Coinbase bytes before extranonce1.
    pub coinb1: Vec<u8>,
    /// Coinbase bytes after extranonce2.
    pub coinb2: Vec<u8>,
    /// extranonce1 bytes of the pool's miners.
    pub enonce1varlen: usize,
    /// extranonce2 bytes of the pool's miners.
    pub enonce2varlen: usize,
}

impl WorkInfo {
    /// Appends the `workinfo` line (newline included) as ckpool 0.9.9 writes it.
    pub fn write(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(b"{\"jobid\":");
        write_u64(out, self.jobid);
        hex_field(out, "target", &self.target);
        key(out, false, "diff");
        write_real(out, self.diff);
        u64_field(out, "version", u64::from(self.version));
        u64_field(out, "curtime", u64::from(self.curtime));
        key(out, false, "prevhash");
        out.push(b'"');
        super::write::write_prevhash(out, &self.prev_hash);
        out.push(b'"');
        hex_field(out, "ntime", &self.ntime.to_be_bytes());
        hex_field(out, "bbversion", &self.version.to_be_bytes());
        hex_field(out, "nbit", &self.bits.to_be_bytes());
        u64_field(out, "coinbasevalue", self.coinbase_value);
        u64_field(out, "height", self.height);
        hex_field(out, "flags", &self.flags);
        u64_field(out, "txns", self.txids.len() as u64);
        key(out, false, "txn_hashes");
        out.push(b'"');
        for t in &self.txids {
            write_rpc_hash(out, t);
            out.push(b' ');
        }
        out.push(b'"');
        u64_field(out, "merkles", self.branch.len() as u64);
        key(out, false, "merklehash");
        out.push(b'[');
        for (i, b) in self.branch.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            out.push(b'"');
            write_hex(out, b);
            out.push(b'"');
        }
        out.push(b']');
        hex_field(out, "coinb1", &self.coinb1);
        u64_field(out, "enonce1varlen", self.enonce1varlen as u64);
        u64_field(out, "enonce2varlen", self.enonce2varlen as u64);
        u64_field(out, "coinb1len", self.coinb1.len() as u64);
        u64_field(out, "coinb2len", self.coinb2.len() as u64);
        hex_field(out, "coinb2", &self.coinb2);
        key(out, false, "node.method");
        write_str(out, WORKINFO);
        out.extend_from_slice(b"}\n");
    }

    /// Reads a `workinfo` line (with or without its newline).
    pub fn parse(line: &[u8]) -> Result<Self, NodeMsgError> {
        let v: Value = serde_json::from_slice(line).map_err(|_| NodeMsgError::NotObject)?;
        let o = v.as_object().ok_or(NodeMsgError::NotObject)?;
        let get = |k: &'static str| o.get(k).ok_or(NodeMsgError::Field(k));
        let uint = |k: &'static str| get(k)?.as_u64().ok_or(NodeMsgError::Field(k));
        let u32_of = |k: &'static str| {
            uint(k).and_then(|n| u32::try_from(n).map_err(|_| NodeMsgError::Field(k)))
        };
        let text = |k: &'static str| get(k)?.as_str().ok_or(NodeMsgError::Field(k));
        let bytes = |k: &'static str| hex::decode(text(k)?).map_err(|_| NodeMsgError::Field(k));
        let hex32 = |k: &'static str, s: &str| {
            let mut b = [0u8; 32];
            hex::decode_to_slice(s, &mut b).map_err(|_| NodeMsgError::Field(k))?;
            Ok::<_, NodeMsgError>(b)
        };
        let word = |k: &'static str| {
            let mut b = [0u8; 4];
            hex::decode_to_slice(text(k)?, &mut b).map_err(|_| NodeMsgError::Field(k))?;
            Ok::<_, NodeMsgError>(u32::from_be_bytes(b))
        };
        let mut prev_hash = hex32("prevhash", text("prevhash")?)?;
        for w in prev_hash.chunks_exact_mut(4) {
            w.reverse();
        }
        let txns = usize::try_from(uint("txns")?).map_err(|_| NodeMsgError::Field("txns"))?;
        let txids = if txns == 0 {
            Vec::new()
        } else {
            text("txn_hashes")?
                .split_ascii_whitespace()
                .map(|h| {
                    let mut b = hex32("txn_hashes", h)?;
                    b.reverse();
                    Ok(b)
                })
                .collect::<Result<Vec<_>, NodeMsgError>>()?
        };
        if txids.len() != txns {
            return Err(NodeMsgError::Field("txn_hashes"));
        }
        let branch = get("merklehash")?
            .as_array()
            .ok_or(NodeMsgError::Field("merklehash"))?
            .iter()
            .map(|h| {
                hex32(
                    "merklehash",
                    h.as_str().ok_or(NodeMsgError::Field("merklehash"))?,
                )
            })
            .collect::<Result<Vec<_>, _>>()?;
        let len = |k: &'static str| {
            uint(k).and_then(|n| usize::try_from(n).map_err(|_| NodeMsgError::Field(k)))
        };
        Ok(Self {
            jobid: uint("jobid")?,
            target: hex32("target", text("target")?)?,
            diff: get("diff")?.as_f64().ok_or(NodeMsgError::Field("diff"))?,
            version: u32_of("version")?,
            curtime: u32_of("curtime")?,
            prev_hash,
            ntime: word("ntime")?,
            bits: word("nbit")?,
            coinbase_value: uint("coinbasevalue")?,
            height: uint("height")?,
            flags: o
                .get("flags")
                .and_then(Value::as_str)
                .and_then(|f| hex::decode(f).ok())
                .unwrap_or_default(),
            txids,
            branch,
            coinb1: bytes("coinb1")?,
            coinb2: bytes("coinb2")?,
            enonce1varlen: len("enonce1varlen")?,
            enonce2varlen: len("enonce2varlen")?,
        })
    }
}

/// Appends a `transactions` line (newline included): each transaction's wtxid (RPC order) and
/// raw bytes, as ckpool 0.9.9 writes it.
pub fn write_transactions<'a>(out: &mut Vec<u8>, txs: impl IntoIterator<Item = &'a TemplateTx>) {
    out.extend_from_slice(b"{\"node.method\":\"transactions\",\"transaction\":[");
    for (i, t) in txs.into_iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(b"{\"hash\":\"");
        write_rpc_hash(out, &t.wtxid);
        out.extend_from_slice(b"\",\"data\":\"");
        write_hex(out, &t.data);
        out.extend_from_slice(b"\"}");
    }
    out.extend_from_slice(b"]}\n");
}

/// Reads a `transactions` line: each transaction decoded, its txid and wtxid computed from its
/// bytes (the `hash` sent is not trusted). A transaction that does not decode is an error.
pub fn parse_transactions(line: &[u8]) -> Result<Vec<TemplateTx>, NodeMsgError> {
    use bitcoin::consensus::Decodable;
    let v: Value = serde_json::from_slice(line).map_err(|_| NodeMsgError::NotObject)?;
    let list = v
        .get("transaction")
        .and_then(Value::as_array)
        .ok_or(NodeMsgError::Field("transaction"))?;
    list.iter()
        .map(|t| {
            let data = t
                .get("data")
                .and_then(Value::as_str)
                .and_then(|d| hex::decode(d).ok())
                .ok_or(NodeMsgError::Field("data"))?;
            let mut r = data.as_slice();
            let tx = bitcoin::Transaction::consensus_decode(&mut r)
                .map_err(|_| NodeMsgError::Field("data"))?;
            if !r.is_empty() {
                return Err(NodeMsgError::Field("data"));
            }
            let txid: [u8; 32] = *AsRef::<[u8; 32]>::as_ref(&tx.compute_txid());
            let wtxid: [u8; 32] = *AsRef::<[u8; 32]>::as_ref(&tx.compute_wtxid());
            Ok(TemplateTx { data, txid, wtxid })
        })
        .collect()
}

/// A block the pool found, for its nodes to submit too.
#[derive(Debug, Clone, PartialEq)]
pub struct BlockSolve {
    /// The solver's extranonce1.
    pub enonce1: Vec<u8>,
    /// The header's nonce.
    pub nonce: u32,
    /// The solver's extranonce2.
    pub nonce2: Vec<u8>,
    /// The header's ntime.
    pub ntime: u32,
    /// The version bits the miner rolled (0: none).
    pub version_mask: u32,
    /// The job (workinfo) id.
    pub jobid: u64,
    /// The difficulty the share achieved.
    pub diff: f64,
    /// The worker that found it.
    pub name: String,
    /// The whole coinbase transaction (without witness).
    pub coinbase: Vec<u8>,
    /// The 80-byte header as serialised in the block.
    pub header: [u8; 80],
}

impl BlockSolve {
    /// Appends the `block` line (newline included).
    pub fn write(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(b"{\"enonce1\":\"");
        write_hex(out, &self.enonce1);
        out.push(b'"');
        hex_field(out, "nonce", &self.nonce.to_be_bytes());
        hex_field(out, "nonce2", &self.nonce2);
        u64_field(out, "ntime32", u64::from(self.ntime));
        u64_field(out, "version_mask", u64::from(self.version_mask));
        u64_field(out, "jobid", self.jobid);
        key(out, false, "diff");
        write_real(out, self.diff);
        key(out, false, "name");
        write_str(out, &self.name);
        u64_field(out, "cblen", self.coinbase.len() as u64);
        hex_field(out, "coinbasehex", &self.coinbase);
        hex_field(out, "swaphex", &self.header);
        key(out, false, "node.method");
        write_str(out, BLOCK);
        out.extend_from_slice(b"}\n");
    }

    /// Reads a `block` line. Only `jobid`, `coinbasehex` and `swaphex` are required (what a
    /// block is built from); the rest default when missing.
    pub fn parse(line: &[u8]) -> Result<Self, NodeMsgError> {
        let v: Value = serde_json::from_slice(line).map_err(|_| NodeMsgError::NotObject)?;
        let o = v.as_object().ok_or(NodeMsgError::NotObject)?;
        let hex_of = |k: &str| {
            o.get(k)
                .and_then(Value::as_str)
                .and_then(|s| hex::decode(s).ok())
        };
        // A number, or hex digits in a string.
        let word = |k: &str| match o.get(k) {
            Some(Value::Number(n)) => n.as_u64().and_then(|n| u32::try_from(n).ok()),
            Some(Value::String(s)) => u32::from_str_radix(s, 16).ok(),
            _ => None,
        };
        let header: [u8; 80] = hex_of("swaphex")
            .and_then(|h| h.try_into().ok())
            .ok_or(NodeMsgError::Field("swaphex"))?;
        let coinbase = hex_of("coinbasehex")
            .filter(|c| !c.is_empty())
            .ok_or(NodeMsgError::Field("coinbasehex"))?;
        Ok(Self {
            enonce1: hex_of("enonce1").unwrap_or_default(),
            nonce: word("nonce").unwrap_or(0),
            nonce2: hex_of("nonce2").unwrap_or_default(),
            ntime: word("ntime32").unwrap_or(0),
            version_mask: word("version_mask").unwrap_or(0),
            jobid: o
                .get("jobid")
                .and_then(Value::as_u64)
                .ok_or(NodeMsgError::Field("jobid"))?,
            diff: o.get("diff").and_then(Value::as_f64).unwrap_or(0.0),
            name: o
                .get("name")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned(),
            coinbase,
            header,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn real(v: f64) -> String {
        let mut out = Vec::new();
        write_real(&mut out, v);
        String::from_utf8(out).unwrap_or_default()
    }

    #[test]
    fn reals_are_written_as_jansson_writes_them() {
        assert_eq!(real(4.656_542_373_906_924_7e-10), "4.6565423739069247e-10");
        assert_eq!(real(0.001), "0.001");
        assert_eq!(real(1.0), "1.0");
        assert_eq!(real(42.0), "42.0");
        assert_eq!(real(0.5), "0.5");
        assert_eq!(real(1e17), "1e17");
        assert_eq!(real(123_456_789_012_345_680.0), "1.2345678901234568e17");
        assert_eq!(real(1e-5), "1.0000000000000001e-5");
        assert_eq!(real(0.0001), "0.0001");
        assert_eq!(real(-2.5), "-2.5");
        assert_eq!(real(0.0), "0.0");
        assert_eq!(real(f64::NAN), "0.0");
    }

    #[test]
    fn a_block_message_reads_back() {
        let b = BlockSolve {
            enonce1: vec![1, 2, 3, 4],
            nonce: 0xdead_beef,
            nonce2: vec![0; 8],
            ntime: 0x6b12_430a,
            version_mask: 0x2000,
            jobid: 7,
            diff: 12.5,
            name: "u.w\"x".into(),
            coinbase: vec![1, 0, 0, 0],
            header: [7; 80],
        };
        let mut out = Vec::new();
        b.write(&mut out);
        assert!(out.ends_with(b",\"node.method\":\"block\"}\n"));
        assert_eq!(BlockSolve::parse(&out), Ok(b));
        assert_eq!(
            BlockSolve::parse(br#"{"jobid":1,"coinbasehex":"00","swaphex":"00"}"#),
            Err(NodeMsgError::Field("swaphex"))
        );
        assert_eq!(
            BlockSolve::parse(b"dropclient=1"),
            Err(NodeMsgError::NotObject)
        );
    }
}
