//! Stratum v1 writers: each appends one `\n`-terminated JSON line to the caller's `Vec<u8>` and
//! allocates nothing of its own (the vector grows only when its capacity is short).
//!
//! The pool-side writers produce exactly the bytes the stratifier has always sent (its tests pin
//! them); the client-side ones ([`subscribe_request`], [`submit`], …) are what a stratum client
//! (ckload, the proxy's upstream link) sends.

use std::io::Write as _;

use super::Value;
use crate::target::Difficulty;

/// Appends a JSON value (an echoed id) exactly as parsed.
pub fn write_value(out: &mut Vec<u8>, v: &Value<'_>) {
    use simd_json::prelude::*;
    // Writing into a Vec cannot fail.
    let _ = v.write(out);
}

/// Appends a JSON string literal with escaping.
pub fn write_str(out: &mut Vec<u8>, s: &str) {
    // Serialising a &str into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, s);
}

/// Appends lowercase hex of `bytes` (no quotes).
pub fn write_hex(out: &mut Vec<u8>, bytes: &[u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    out.reserve(bytes.len() * 2);
    for &b in bytes {
        out.push(DIGITS[usize::from(b >> 4)]);
        out.push(DIGITS[usize::from(b & 0xf)]);
    }
}

/// Appends `n` in decimal.
pub fn write_u64(out: &mut Vec<u8>, n: u64) {
    let mut buf = [0u8; 20];
    let mut i = buf.len();
    let mut n = n;
    loop {
        i -= 1;
        // n % 10 < 10, so the cast is exact.
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(buf.get(i..).unwrap_or_default());
}

/// Appends `"xxxxxxxx"`: a `u32` as 8 lowercase hex digits in quotes.
pub fn write_hex_u32(out: &mut Vec<u8>, v: u32) {
    out.push(b'"');
    write_hex(out, &v.to_be_bytes());
    out.push(b'"');
}

// ---------------------------------------------------------------------------------------------
// Pool side: replies.

/// `{"id":ID,"result":RAW,"error":null}\n`, where `raw` is already JSON.
pub fn reply_result(out: &mut Vec<u8>, id: &Value<'_>, raw: &[u8]) {
    out.extend_from_slice(b"{\"id\":");
    write_value(out, id);
    out.extend_from_slice(b",\"result\":");
    out.extend_from_slice(raw);
    out.extend_from_slice(b",\"error\":null}\n");
}

/// `{"id":ID,"result":true,"error":null}\n`: an accepted share, authorisation or suggestion.
pub fn reply_true(out: &mut Vec<u8>, id: &Value<'_>) {
    reply_result(out, id, b"true");
}

/// `{"id":ID,"result":"pong","error":null}\n`: the answer to `mining.ping`.
pub fn reply_pong(out: &mut Vec<u8>, id: &Value<'_>) {
    reply_result(out, id, b"\"pong\"");
}

/// `{"id":ID,"result":null,"error":[code,"msg",null]}\n`.
pub fn reply_error(out: &mut Vec<u8>, id: &Value<'_>, code: i32, msg: &str) {
    out.extend_from_slice(b"{\"id\":");
    write_value(out, id);
    let _ = write!(out, ",\"result\":null,\"error\":[{code},");
    write_str(out, msg);
    out.extend_from_slice(b",null]}\n");
}

/// A refusal with `result` false: `{"id":ID,"result":false,"error":[code,"msg",null]}\n` (a
/// failed authorisation: both client conventions read it).
pub fn reply_refused(out: &mut Vec<u8>, id: &Value<'_>, code: i32, msg: &str) {
    out.extend_from_slice(b"{\"id\":");
    write_value(out, id);
    let _ = write!(out, ",\"result\":false,\"error\":[{code},");
    write_str(out, msg);
    out.extend_from_slice(b",null]}\n");
}

/// A rejected share: `{"id":ID,"result":false,"error":[code,"msg",null],"reject-reason":"msg"}\n`.
pub fn reply_reject(out: &mut Vec<u8>, id: &Value<'_>, code: i32, msg: &str) {
    out.extend_from_slice(b"{\"id\":");
    write_value(out, id);
    let _ = write!(out, ",\"result\":false,\"error\":[{code},");
    write_str(out, msg);
    out.extend_from_slice(b",null],\"reject-reason\":");
    write_str(out, msg);
    out.extend_from_slice(b"}\n");
}

/// The subscribe reply:
/// `{"id":ID,"result":[[["mining.notify","<session %08x>"]],"<enonce1 hex>",<nonce2 len>],"error":null}\n`.
pub fn subscribe_result(
    out: &mut Vec<u8>,
    id: &Value<'_>,
    session_id: u32,
    enonce1: &[u8],
    nonce2_len: usize,
) {
    out.extend_from_slice(b"{\"id\":");
    write_value(out, id);
    out.extend_from_slice(b",\"result\":[[[\"mining.notify\",");
    write_hex_u32(out, session_id);
    out.extend_from_slice(b"]],\"");
    write_hex(out, enonce1);
    out.extend_from_slice(b"\",");
    write_u64(out, nonce2_len as u64);
    out.extend_from_slice(b"],\"error\":null}\n");
}

/// One answer in a `mining.configure` reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConfigureAnswer<'a> {
    /// `"version-rolling":true,"version-rolling.mask":"<mask %08x>"`.
    VersionRolling {
        /// The mask granted.
        mask: u32,
    },
    /// `"minimum-difficulty":<accepted>`.
    MinimumDifficulty(bool),
    /// `"subscribe-extranonce":true`.
    SubscribeExtranonce,
    /// An extension the pool does not know: `"<name>":false`.
    Unknown(&'a str),
}

/// The `mining.configure` reply `{"id":ID,"result":{…},"error":null}\n`.
///
/// The members are written sorted by name and a name answered twice keeps its last answer (the
/// object the stratifier has always built was a sorted map). It allocates once (configure comes
/// once per connection).
pub fn configure_result(out: &mut Vec<u8>, id: &Value<'_>, answers: &[ConfigureAnswer<'_>]) {
    #[derive(Clone, Copy)]
    enum Member {
        Bool(bool),
        Mask(u32),
    }
    // Once per connection, not on the share path: a vector holds every answer.
    let mut members: Vec<(&str, Member)> = Vec::with_capacity(answers.len() + 1);
    let mut put = |key, m| members.push((key, m));
    for a in answers {
        match *a {
            ConfigureAnswer::VersionRolling { mask } => {
                put("version-rolling", Member::Bool(true));
                put("version-rolling.mask", Member::Mask(mask));
            }
            ConfigureAnswer::MinimumDifficulty(ok) => put("minimum-difficulty", Member::Bool(ok)),
            ConfigureAnswer::SubscribeExtranonce => put("subscribe-extranonce", Member::Bool(true)),
            ConfigureAnswer::Unknown(name) => put(name, Member::Bool(false)),
        }
    }
    // A stable sort keeps a name's answers in order: the last one is written.
    members.sort_by(|a, b| a.0.cmp(b.0));
    out.extend_from_slice(b"{\"id\":");
    write_value(out, id);
    out.extend_from_slice(b",\"result\":{");
    let mut first = true;
    for (i, (k, m)) in members.iter().enumerate() {
        if members.get(i + 1).is_some_and(|(next, _)| next == k) {
            continue;
        }
        if !first {
            out.push(b',');
        }
        first = false;
        write_str(out, k);
        out.push(b':');
        match m {
            Member::Bool(true) => out.extend_from_slice(b"true"),
            Member::Bool(false) => out.extend_from_slice(b"false"),
            Member::Mask(mask) => write_hex_u32(out, *mask),
        }
    }
    out.extend_from_slice(b"},\"error\":null}\n");
}

// ---------------------------------------------------------------------------------------------
// Pool side: notifications.

/// The fields of a `mining.notify`.
#[derive(Debug, Clone, Copy)]
pub struct Notify<'a> {
    /// Job id as sent (the stratifier's is 16 hex digits).
    pub job_id: &'a str,
    /// Previous block hash in internal byte order (written word-swapped, as stratum wants it).
    pub prev_hash: &'a [u8; 32],
    /// Coinbase bytes before extranonce1.
    pub coinb1: &'a [u8],
    /// Coinbase bytes after extranonce2.
    pub coinb2: &'a [u8],
    /// Merkle branch.
    pub branch: &'a [[u8; 32]],
    /// Block version.
    pub version: u32,
    /// nBits.
    pub bits: u32,
    /// ntime.
    pub ntime: u32,
    /// Whether miners must drop older work.
    pub clean: bool,
}

/// `{"params":["<job>","<prevhash>","<coinb1>","<coinb2>",[<branch>…],"<version>","<nbits>",
/// "<ntime>",<clean>],"id":null,"method":"mining.notify"}\n` (ckpool's key order).
pub fn notify(out: &mut Vec<u8>, n: &Notify<'_>) {
    notify_prefix(out, n.job_id, n.prev_hash, n.coinb1);
    write_hex(out, n.coinb2);
    notify_suffix(out, n.branch, n.version, n.bits, n.ntime, n.clean);
}

/// The part of a `mining.notify` before coinb2's hex: `{"params":["<job>","<prevhash>","<coinb1>","`.
/// With [`notify_suffix`] it builds lines whose coinb2 differs per user (solo mode).
pub fn notify_prefix(out: &mut Vec<u8>, job_id: &str, prev_hash: &[u8; 32], coinb1: &[u8]) {
    out.extend_from_slice(b"{\"params\":[");
    write_str(out, job_id);
    out.extend_from_slice(b",\"");
    write_prevhash(out, prev_hash);
    out.extend_from_slice(b"\",\"");
    write_hex(out, coinb1);
    out.extend_from_slice(b"\",\"");
}

/// The part of a `mining.notify` after coinb2's hex: `",[<branch>…],"<version>","<nbits>",
/// "<ntime>",<clean>],"id":null,"method":"mining.notify"}\n`.
pub fn notify_suffix(
    out: &mut Vec<u8>,
    branch: &[[u8; 32]],
    version: u32,
    bits: u32,
    ntime: u32,
    clean: bool,
) {
    out.extend_from_slice(b"\",[");
    for (i, b) in branch.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.push(b'"');
        write_hex(out, b);
        out.push(b'"');
    }
    out.extend_from_slice(b"],");
    write_hex_u32(out, version);
    out.push(b',');
    write_hex_u32(out, bits);
    out.push(b',');
    write_hex_u32(out, ntime);
    out.extend_from_slice(if clean { b",true" } else { b",false" });
    out.extend_from_slice(b"],\"id\":null,\"method\":\"mining.notify\"}\n");
}

/// Appends the previous-block hash in stratum's form: internal byte order with each 4-byte word
/// reversed, as hex.
pub fn write_prevhash(out: &mut Vec<u8>, prev: &[u8; 32]) {
    for w in prev.chunks_exact(4) {
        for &b in w.iter().rev() {
            write_hex(out, &[b]);
        }
    }
}

/// `{"id":null,"method":"mining.set_difficulty","params":[D]}\n`.
pub fn set_difficulty(out: &mut Vec<u8>, diff: Difficulty) {
    out.extend_from_slice(b"{\"id\":null,\"method\":\"mining.set_difficulty\",\"params\":[");
    diff.write_json(out);
    out.extend_from_slice(b"]}\n");
}

/// `{"id":null,"method":"client.show_message","params":["text"]}\n`.
pub fn show_message(out: &mut Vec<u8>, text: &str) {
    out.extend_from_slice(b"{\"id\":null,\"method\":\"client.show_message\",\"params\":[");
    write_str(out, text);
    out.extend_from_slice(b"]}\n");
}

/// `{"id":null,"method":"client.reconnect","params":[]}\n`.
pub fn reconnect(out: &mut Vec<u8>) {
    out.extend_from_slice(b"{\"id\":null,\"method\":\"client.reconnect\",\"params\":[]}\n");
}

/// `{"id":null,"method":"client.reconnect","params":["host",port,wait]}\n`: reconnect to another
/// server after `wait` seconds.
pub fn reconnect_to(out: &mut Vec<u8>, host: &str, port: u16, wait_secs: u32) {
    out.extend_from_slice(b"{\"id\":null,\"method\":\"client.reconnect\",\"params\":[");
    write_str(out, host);
    out.push(b',');
    write_u64(out, u64::from(port));
    out.push(b',');
    write_u64(out, u64::from(wait_secs));
    out.extend_from_slice(b"]}\n");
}

/// `{"id":null,"method":"mining.set_extranonce","params":["<enonce1 hex>",<nonce2 size>]}\n`:
/// the miner uses the new extranonce1 from the next `mining.notify` on.
pub fn set_extranonce(out: &mut Vec<u8>, enonce1: &[u8], nonce2_len: usize) {
    out.extend_from_slice(b"{\"id\":null,\"method\":\"mining.set_extranonce\",\"params\":[\"");
    write_hex(out, enonce1);
    out.extend_from_slice(b"\",");
    write_u64(out, nonce2_len as u64);
    out.extend_from_slice(b"]}\n");
}

// ---------------------------------------------------------------------------------------------
// Client side: requests.

/// `{"id":N,"method":"mining.subscribe","params":["agent"]}\n`, `[…,"session"]` to resume, or
/// `params:[]` when `agent` is `None` (ckpool's retry without parameters).
pub fn subscribe_request(out: &mut Vec<u8>, id: u64, agent: Option<&str>, session: Option<&str>) {
    out.extend_from_slice(b"{\"id\":");
    write_u64(out, id);
    out.extend_from_slice(b",\"method\":\"mining.subscribe\",\"params\":[");
    if let Some(agent) = agent {
        write_str(out, agent);
        if let Some(s) = session {
            out.push(b',');
            write_str(out, s);
        }
    }
    out.extend_from_slice(b"]}\n");
}

/// `{"id":N,"method":"mining.authorize","params":["user","pass"]}\n`.
pub fn authorize_request(out: &mut Vec<u8>, id: u64, user: &str, pass: &str) {
    out.extend_from_slice(b"{\"id\":");
    write_u64(out, id);
    out.extend_from_slice(b",\"method\":\"mining.authorize\",\"params\":[");
    write_str(out, user);
    out.push(b',');
    write_str(out, pass);
    out.extend_from_slice(b"]}\n");
}

/// `{"id":N,"method":"mining.configure","params":[["version-rolling"],{"version-rolling.mask":
/// "<mask>","version-rolling.min-bit-count":2}]}\n`.
pub fn configure_request(out: &mut Vec<u8>, id: u64, mask: u32) {
    out.extend_from_slice(b"{\"id\":");
    write_u64(out, id);
    out.extend_from_slice(
        b",\"method\":\"mining.configure\",\"params\":[[\"version-rolling\"],{\"version-rolling.mask\":",
    );
    write_hex_u32(out, mask);
    out.extend_from_slice(b",\"version-rolling.min-bit-count\":2}]}\n");
}

/// `{"id":N,"method":"mining.extranonce.subscribe","params":[]}\n`.
pub fn extranonce_subscribe_request(out: &mut Vec<u8>, id: u64) {
    out.extend_from_slice(b"{\"id\":");
    write_u64(out, id);
    out.extend_from_slice(b",\"method\":\"mining.extranonce.subscribe\",\"params\":[]}\n");
}

/// The fields of a `mining.submit`.
#[derive(Debug, Clone, Copy)]
pub struct Submit<'a> {
    /// The worker name, already a JSON string literal with its quotes (kept encoded so that a
    /// client writing many submits escapes it once).
    pub worker_json: &'a str,
    /// The job id, a JSON string literal with its quotes.
    pub job_id_json: &'a str,
    /// extranonce2 bytes.
    pub extranonce2: &'a [u8],
    /// ntime.
    pub ntime: u32,
    /// nonce.
    pub nonce: u32,
    /// Version bits (the sixth parameter), when version rolling was negotiated.
    pub version_bits: Option<u32>,
}

/// `{"id":N,"method":"mining.submit","params":[worker,job,"<en2>","<ntime>","<nonce>"(,"<bits>")]}\n`.
pub fn submit(out: &mut Vec<u8>, id: u64, s: &Submit<'_>) {
    out.extend_from_slice(b"{\"id\":");
    write_u64(out, id);
    out.extend_from_slice(b",\"method\":\"mining.submit\",\"params\":[");
    out.extend_from_slice(s.worker_json.as_bytes());
    out.push(b',');
    out.extend_from_slice(s.job_id_json.as_bytes());
    out.extend_from_slice(b",\"");
    write_hex(out, s.extranonce2);
    out.extend_from_slice(b"\",");
    write_hex_u32(out, s.ntime);
    out.push(b',');
    write_hex_u32(out, s.nonce);
    if let Some(bits) = s.version_bits {
        out.push(b',');
        write_hex_u32(out, bits);
    }
    out.extend_from_slice(b"]}\n");
}

/// A JSON string literal for `s`, quotes included (for [`Submit`]'s pre-encoded fields).
pub fn json_string(s: &str) -> String {
    let mut out = Vec::with_capacity(s.len() + 2);
    write_str(&mut out, s);
    String::from_utf8(out).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(out: &[u8]) -> &str {
        std::str::from_utf8(out).unwrap_or("<not utf-8>")
    }

    #[test]
    fn numbers_and_hex() {
        let mut out = Vec::new();
        for n in [0u64, 7, 10, 99, 12345, u64::MAX] {
            out.clear();
            write_u64(&mut out, n);
            assert_eq!(s(&out), n.to_string());
        }
        out.clear();
        write_hex(&mut out, &[0x00, 0xab, 0x12, 0xff]);
        assert_eq!(s(&out), "00ab12ff");
        out.clear();
        write_hex_u32(&mut out, 0x1fff_e000);
        assert_eq!(s(&out), "\"1fffe000\"");
    }

    #[test]
    fn client_requests() {
        let mut out = Vec::new();
        subscribe_request(&mut out, 1, Some("ckload/0.1"), None);
        subscribe_request(&mut out, 2, Some("a\"b"), Some("deadbeef"));
        subscribe_request(&mut out, 0, None, Some("ignored"));
        authorize_request(&mut out, 42, "user.w", "x");
        configure_request(&mut out, 3, 0x1fff_e000);
        extranonce_subscribe_request(&mut out, 4);
        submit(
            &mut out,
            17,
            &Submit {
                worker_json: "\"u.1\"",
                job_id_json: "\"6b1242ec00000001\"",
                extranonce2: &[0, 0, 0, 1],
                ntime: 0x6b12_42ff,
                nonce: 0xc0ee_2000,
                version_bits: None,
            },
        );
        submit(
            &mut out,
            18,
            &Submit {
                worker_json: "\"u.1\"",
                job_id_json: "\"j\"",
                extranonce2: &[],
                ntime: 1,
                nonce: 2,
                version_bits: Some(0x2000),
            },
        );
        assert_eq!(
            s(&out),
            concat!(
                "{\"id\":1,\"method\":\"mining.subscribe\",\"params\":[\"ckload/0.1\"]}\n",
                "{\"id\":2,\"method\":\"mining.subscribe\",\"params\":[\"a\\\"b\",\"deadbeef\"]}\n",
                "{\"id\":0,\"method\":\"mining.subscribe\",\"params\":[]}\n",
                "{\"id\":42,\"method\":\"mining.authorize\",\"params\":[\"user.w\",\"x\"]}\n",
                "{\"id\":3,\"method\":\"mining.configure\",\"params\":[[\"version-rolling\"],{\"version-rolling.mask\":\"1fffe000\",\"version-rolling.min-bit-count\":2}]}\n",
                "{\"id\":4,\"method\":\"mining.extranonce.subscribe\",\"params\":[]}\n",
                "{\"id\":17,\"method\":\"mining.submit\",\"params\":[\"u.1\",\"6b1242ec00000001\",\"00000001\",\"6b1242ff\",\"c0ee2000\"]}\n",
                "{\"id\":18,\"method\":\"mining.submit\",\"params\":[\"u.1\",\"j\",\"\",\"00000001\",\"00000002\",\"00002000\"]}\n",
            )
        );
        for line in s(&out).lines() {
            assert!(
                serde_json::from_str::<serde_json::Value>(line).is_ok(),
                "{line}"
            );
        }
        assert_eq!(json_string("a\"b"), "\"a\\\"b\"");
    }
}
