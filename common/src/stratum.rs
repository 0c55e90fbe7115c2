//! Stratum v1 codec: a line parser on simd-json that cannot panic, and reply/notification writers.
//!
//! The parser copies each line into a reused buffer (simd-json parses in place) and hands out a
//! [`Request`] borrowing from it. Writers append one `\n`-terminated JSON line to a `Vec<u8>`.
//!
//! Error replies use the standard form `[code, "message", null]`; share rejects additionally carry
//! ckpool's `"reject-reason"` key so clients written for either convention understand them.

use std::borrow::Cow;
use std::io::Write as _;

use simd_json::prelude::*;

use crate::target::Difficulty;

/// A parsed JSON value borrowing from the line.
pub type Value<'a> = simd_json::BorrowedValue<'a>;

/// Stratum error codes (the de facto standard set shared by most pools and miners).
pub mod codes {
    /// Other / unknown error.
    pub const OTHER: i32 = 20;
    /// Job not found (stale or unknown job id).
    pub const JOB_NOT_FOUND: i32 = 21;
    /// Duplicate share.
    pub const DUPLICATE: i32 = 22;
    /// Share above target (difficulty too low).
    pub const LOW_DIFFICULTY: i32 = 23;
    /// Unauthorized worker.
    pub const UNAUTHORIZED: i32 = 24;
    /// Not subscribed.
    pub const NOT_SUBSCRIBED: i32 = 25;
    /// JSON-RPC "method not found".
    pub const METHOD_NOT_FOUND: i32 = -3;
}

/// Why a line is not a usable stratum message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// Not valid JSON.
    #[error("invalid JSON")]
    Json,
    /// Valid JSON but not an object.
    #[error("message is not a JSON object")]
    NotObject,
}

/// The `method` member of a message.
#[derive(Debug, Clone, PartialEq)]
pub enum Method<'a> {
    /// A string method name.
    Name(Cow<'a, str>),
    /// No `method` member (a response, or a malformed request).
    Missing,
    /// A `method` member that is not a string.
    NotString,
}

/// One parsed stratum message.
#[derive(Debug)]
pub struct Request<'a> {
    /// The `id` member, echoed back exactly in replies (`null` when absent).
    pub id: Value<'a>,
    /// Whether an `id` member was present at all.
    pub has_id: bool,
    /// The method.
    pub method: Method<'a>,
    /// The `params` member (`null` when absent).
    pub params: Value<'a>,
    /// Whether a `params` member was present.
    pub has_params: bool,
    /// Whether the message carries `result` or `error`: a response from the client to us.
    pub is_response: bool,
}

impl<'a> Request<'a> {
    /// The method name, if it is a string.
    pub fn method_name(&self) -> Option<&str> {
        match &self.method {
            Method::Name(n) => Some(n),
            _ => None,
        }
    }

    /// The params as an array, if they are one.
    pub fn params_array(&self) -> Option<&[Value<'a>]> {
        match &self.params {
            Value::Array(a) => Some(a.as_slice()),
            _ => None,
        }
    }

    /// Params entry `i` of an array.
    pub fn param(&self, i: usize) -> Option<&Value<'a>> {
        self.params_array().and_then(|a| a.get(i))
    }

    /// Params entry `i` as a string.
    pub fn param_str(&self, i: usize) -> Option<&str> {
        self.param(i).and_then(ValueAsScalar::as_str)
    }
}

/// Reads a JSON number (or a numeric string, as some firmware sends) as a float.
pub fn value_as_f64(v: &Value<'_>) -> Option<f64> {
    match v {
        Value::String(s) => s.trim().parse::<f64>().ok(),
        other => other.cast_f64(),
    }
}

/// A reusable stratum line parser.
pub struct Parser {
    scratch: Vec<u8>,
    buffers: simd_json::Buffers,
}

impl Default for Parser {
    fn default() -> Self {
        Self::new()
    }
}

impl Parser {
    /// A parser with buffers sized for typical stratum lines; they grow as needed.
    pub fn new() -> Self {
        Self {
            scratch: Vec::with_capacity(512),
            buffers: simd_json::Buffers::new(512),
        }
    }

    /// Parses one line (without its newline). Never panics, whatever the bytes.
    pub fn parse<'p>(&'p mut self, line: &[u8]) -> Result<Request<'p>, ParseError> {
        self.scratch.clear();
        self.scratch.extend_from_slice(line);
        let value =
            simd_json::value::borrowed::to_value_with_buffers(&mut self.scratch, &mut self.buffers)
                .map_err(|_| ParseError::Json)?;
        let Value::Object(mut obj) = value else {
            return Err(ParseError::NotObject);
        };
        let id = obj.remove("id");
        let has_id = id.is_some();
        let method = match obj.remove("method") {
            Some(Value::String(s)) => Method::Name(s),
            Some(_) => Method::NotString,
            None => Method::Missing,
        };
        let params = obj.remove("params");
        let has_params = params.is_some();
        let is_response = obj.contains_key("result") || obj.contains_key("error");
        Ok(Request {
            id: id.unwrap_or_else(Value::null),
            has_id,
            method,
            params: params.unwrap_or_else(Value::null),
            has_params,
            is_response,
        })
    }
}

/// Appends a JSON value (an echoed id) exactly as parsed.
pub fn write_value(out: &mut Vec<u8>, v: &Value<'_>) {
    // Writing into a Vec cannot fail.
    let _ = v.write(out);
}

/// Appends a JSON string literal with escaping.
pub fn write_str(out: &mut Vec<u8>, s: &str) {
    // Serialising a &str into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, s);
}

/// `{"id":ID,"result":RAW,"error":null}\n`, where `raw` is already JSON.
pub fn reply_result(out: &mut Vec<u8>, id: &Value<'_>, raw: &[u8]) {
    out.extend_from_slice(b"{\"id\":");
    write_value(out, id);
    out.extend_from_slice(b",\"result\":");
    out.extend_from_slice(raw);
    out.extend_from_slice(b",\"error\":null}\n");
}

/// `{"id":ID,"result":null,"error":[code,"msg",null]}\n`.
pub fn reply_error(out: &mut Vec<u8>, id: &Value<'_>, code: i32, msg: &str) {
    out.extend_from_slice(b"{\"id\":");
    write_value(out, id);
    let _ = write!(out, ",\"result\":null,\"error\":[{code},");
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

/// `{"id":null,"method":"mining.set_extranonce","params":["<enonce1 hex>",<nonce2 size>]}\n`:
/// the miner uses the new extranonce1 from the next `mining.notify` on.
pub fn set_extranonce(out: &mut Vec<u8>, enonce1: &[u8], nonce2_len: usize) {
    out.extend_from_slice(b"{\"id\":null,\"method\":\"mining.set_extranonce\",\"params\":[\"");
    let start = out.len();
    out.resize(start + enonce1.len() * 2, 0);
    if let Some(dst) = out.get_mut(start..) {
        // The destination is exactly twice the input long, so this cannot fail.
        let _ = hex::encode_to_slice(enonce1, dst);
    }
    out.extend_from_slice(b"\",");
    out.extend_from_slice(nonce2_len.to_string().as_bytes());
    out.extend_from_slice(b"]}\n");
}

/// Parses a hex string of exactly `2 * N` digits into `N` bytes.
pub fn hex_exact<const N: usize>(s: &str) -> Option<[u8; N]> {
    let mut out = [0u8; N];
    hex::decode_to_slice(s, &mut out).ok()?;
    Some(out)
}

/// Parses 1 to 8 hex digits as a big-endian `u32` (ntime, nonce, version bits).
pub fn hex_u32(s: &str) -> Option<u32> {
    if s.is_empty() || s.len() > 8 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    u32::from_str_radix(s, 16).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn set_extranonce_line() {
        let mut out = Vec::new();
        set_extranonce(&mut out, &[0x00, 0xab, 0x12, 0xff], 8);
        assert_eq!(
            out,
            b"{\"id\":null,\"method\":\"mining.set_extranonce\",\"params\":[\"00ab12ff\",8]}\n"
        );
    }

    #[test]
    fn parses_submit() {
        let mut p = Parser::new();
        let line = br#"{"id":4,"method":"mining.submit","params":["w","1","00000000","5e5f5a5b","12345678"]}"#;
        let r = p.parse(line).unwrap();
        assert_eq!(r.method_name(), Some("mining.submit"));
        assert_eq!(r.param_str(4), Some("12345678"));
        assert!(!r.is_response);
        let mut out = Vec::new();
        reply_result(&mut out, &r.id, b"true");
        assert_eq!(out, b"{\"id\":4,\"result\":true,\"error\":null}\n");
    }

    #[test]
    fn echoes_any_id_type() {
        let mut p = Parser::new();
        for (line, id) in [
            (&br#"{"id":"abc","method":"x"}"#[..], "\"abc\""),
            (br#"{"id":null,"method":"x"}"#, "null"),
            (br#"{"method":"x"}"#, "null"),
            (br#"{"id":[1,2],"method":"x"}"#, "[1,2]"),
            (br#"{"id":1.5,"method":"x"}"#, "1.5"),
        ] {
            let r = p.parse(line).unwrap();
            let mut out = Vec::new();
            write_value(&mut out, &r.id);
            assert_eq!(String::from_utf8(out).unwrap(), id);
        }
    }

    #[test]
    fn rejects_malformed() {
        let mut p = Parser::new();
        assert_eq!(p.parse(b"{").unwrap_err(), ParseError::Json);
        assert_eq!(p.parse(b"[1,2]").unwrap_err(), ParseError::NotObject);
        assert_eq!(p.parse(b"").unwrap_err(), ParseError::Json);
        assert_eq!(p.parse(b"\xff\xfe").unwrap_err(), ParseError::Json);
        {
            let r = p.parse(br#"{"id":1,"method":5}"#).unwrap();
            assert_eq!(r.method, Method::NotString);
        }
        let r = p.parse(br#"{"id":1,"result":true,"error":null}"#).unwrap();
        assert!(r.is_response);
        assert_eq!(r.method, Method::Missing);
    }

    #[test]
    fn reject_has_both_forms() {
        let mut out = Vec::new();
        reply_reject(&mut out, &Value::from(7u64), codes::DUPLICATE, "Duplicate");
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["error"][0], 22);
        assert_eq!(v["error"][1], "Duplicate");
        assert_eq!(v["reject-reason"], "Duplicate");
        assert_eq!(v["result"], false);
    }

    #[test]
    fn escapes_strings() {
        let mut out = Vec::new();
        show_message(&mut out, "a \"quoted\"\n line");
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["params"][0], "a \"quoted\"\n line");
    }

    #[test]
    fn hex_helpers() {
        assert_eq!(hex_u32("1fffe000"), Some(0x1fff_e000));
        assert_eq!(hex_u32("+1"), None);
        assert_eq!(hex_u32("123456789"), None);
        assert_eq!(hex_exact::<2>("abcd"), Some([0xab, 0xcd]));
        assert_eq!(hex_exact::<2>("abc"), None);
    }

    proptest! {
        #[test]
        fn never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let mut p = Parser::new();
            let _ = p.parse(&bytes);
        }

        #[test]
        fn round_trips_ids(id in any::<i64>(), method in "[a-z.]{1,20}", s in "\\PC{0,20}") {
            let line = serde_json::json!({"id": id, "method": method, "params": [s]}).to_string();
            let mut p = Parser::new();
            let r = p.parse(line.as_bytes()).unwrap();
            prop_assert_eq!(r.method_name(), Some(method.as_str()));
            prop_assert_eq!(r.param_str(0), Some(s.as_str()));
            let mut out = Vec::new();
            write_value(&mut out, &r.id);
            prop_assert_eq!(String::from_utf8(out).unwrap(), id.to_string());
        }
    }
}
