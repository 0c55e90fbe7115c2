//! Stratum v1 codec: a line parser on simd-json that cannot panic, writers for both ends
//! ([`write`]), client-side decoders ([`decode`]), a sans-IO stratum client ([`client`]) and
//! ckpool's passthrough framing ([`passthrough`]).
//!
//! The parser copies each line into a reused buffer (simd-json parses in place) and hands out a
//! [`Request`] borrowing from it. Writers append one `\n`-terminated JSON line to a `Vec<u8>`.
//!
//! Error replies use the standard form `[code, "message", null]`; share rejects additionally carry
//! ckpool's `"reject-reason"` key so clients written for either convention understand them.

use std::borrow::Cow;

use simd_json::prelude::*;

pub mod client;
pub mod decode;
pub mod node;
pub mod passthrough;
pub mod write;

pub use write::{
    reconnect, reply_error, reply_reject, reply_result, set_difficulty, set_extranonce,
    show_message, write_str, write_value,
};

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
    ///
    /// The common shape of a request (`{"id":…,"method":"…","params":["…",…]}`: plain strings, an
    /// integer or string id, nothing else) is read by a scanner that builds the same [`Request`]
    /// simd-json would, without its tape or its object map; anything else goes to simd-json.
    pub fn parse<'p>(&'p mut self, line: &[u8]) -> Result<Request<'p>, ParseError> {
        if let Some(shape) = fast::scan(line) {
            self.scratch.clear();
            self.scratch.extend_from_slice(line);
            return Ok(shape.build(&self.scratch));
        }
        self.parse_slow(line)
    }

    /// The general path alone: simd-json (public for the parse benchmark).
    #[doc(hidden)]
    pub fn parse_slow<'p>(&'p mut self, line: &[u8]) -> Result<Request<'p>, ParseError> {
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

/// One message a client reads from a pool: a notification (`method` set) or a reply.
#[derive(Debug)]
pub struct Message<'a> {
    /// The `id` member (`null` when absent).
    pub id: Value<'a>,
    /// The method; [`Method::Missing`] for a reply.
    pub method: Method<'a>,
    /// The `params` member (`null` when absent).
    pub params: Value<'a>,
    /// The `result` member (`null` when absent).
    pub result: Value<'a>,
    /// The `error` member (`null` when absent).
    pub error: Value<'a>,
    /// ckpool's `reject-reason` member, when it is a string.
    pub reject_reason: Option<Cow<'a, str>>,
}

impl Message<'_> {
    /// The method name, if it is a string.
    pub fn method_name(&self) -> Option<&str> {
        match &self.method {
            Method::Name(n) => Some(n),
            _ => None,
        }
    }

    /// The id as a number (also from a numeric string).
    pub fn id_u64(&self) -> Option<u64> {
        decode::id_u64(&self.id)
    }

    /// Whether the reply says yes (`result` is `true`).
    pub fn accepted(&self) -> bool {
        decode::accepted(&self.result)
    }

    /// Why the reply says no (see [`decode::reject_reason`]).
    pub fn reason(&self) -> Cow<'static, str> {
        decode::reject_reason(Some(&self.error), self.reject_reason.as_deref())
    }
}

impl Parser {
    /// Parses one line a pool sent to a client (without its newline). Never panics.
    ///
    /// The usual share verdict (`{"id":N,"result":true|false|null,"error":null}`, members in any
    /// order) is read by a scanner without building a map; anything else goes to simd-json.
    pub fn parse_message<'p>(&'p mut self, line: &[u8]) -> Result<Message<'p>, ParseError> {
        if let Some((id, result)) = fast::scan_verdict(line) {
            return Ok(Message {
                id,
                method: Method::Missing,
                params: Value::null(),
                result,
                error: Value::null(),
                reject_reason: None,
            });
        }
        self.scratch.clear();
        self.scratch.extend_from_slice(line);
        let value =
            simd_json::value::borrowed::to_value_with_buffers(&mut self.scratch, &mut self.buffers)
                .map_err(|_| ParseError::Json)?;
        let Value::Object(mut obj) = value else {
            return Err(ParseError::NotObject);
        };
        let method = match obj.remove("method") {
            Some(Value::String(s)) => Method::Name(s),
            Some(Value::Static(simd_json::StaticNode::Null)) | None => Method::Missing,
            Some(_) => Method::NotString,
        };
        let reject_reason = match obj.remove("reject-reason") {
            Some(Value::String(s)) => Some(s),
            _ => None,
        };
        let mut take = |k: &str| obj.remove(k).unwrap_or_else(Value::null);
        Ok(Message {
            id: take("id"),
            method,
            params: take("params"),
            result: take("result"),
            error: take("error"),
            reject_reason,
        })
    }
}

/// The scanner behind [`Parser::parse`]'s fast path.
mod fast {
    use std::borrow::Cow;

    use simd_json::prelude::*;

    use super::{Method, Request, Value};

    /// Most params a request may have on the fast path (`mining.submit` has 5 or 6).
    const MAX_PARAMS: usize = 8;
    /// Longest integer id taken (simd-json reads it as the same u64).
    const MAX_ID_DIGITS: usize = 15;

    /// Where the parts of a request are in its line.
    pub(super) struct Shape {
        id: Option<Id>,
        method: Option<(usize, usize)>,
        params: Option<([(usize, usize); MAX_PARAMS], usize)>,
    }

    enum Id {
        Null,
        Int(u64),
        Str(usize, usize),
    }

    /// The object's members, if the line has the fast path's shape.
    pub(super) fn scan(line: &[u8]) -> Option<Shape> {
        let mut p = Cursor { b: line, i: 0 };
        let mut shape = Shape {
            id: None,
            method: None,
            params: None,
        };
        p.ws();
        p.byte(b'{')?;
        p.ws();
        if p.peek()? == b'}' {
            return None;
        }
        loop {
            let (ks, ke) = p.string()?;
            p.ws();
            p.byte(b':')?;
            p.ws();
            match line.get(ks..ke)? {
                b"id" if shape.id.is_none() => shape.id = Some(p.id()?),
                b"method" if shape.method.is_none() => shape.method = Some(p.string()?),
                b"params" if shape.params.is_none() => shape.params = Some(p.strings()?),
                _ => return None,
            }
            p.ws();
            match p.next()? {
                b',' => p.ws(),
                b'}' => break,
                _ => return None,
            }
        }
        p.ws();
        (p.i == line.len()).then_some(shape)
    }

    /// A share verdict `{"id":N,"result":true|false|null,"error":null}` (members in any order,
    /// each once, `id` a plain integer or `null`): its id and result.
    pub(super) fn scan_verdict(line: &[u8]) -> Option<(Value<'static>, Value<'static>)> {
        let mut p = Cursor { b: line, i: 0 };
        let (mut id, mut result, mut error) = (None, None, false);
        p.ws();
        p.byte(b'{')?;
        p.ws();
        loop {
            let (ks, ke) = p.string()?;
            p.ws();
            p.byte(b':')?;
            p.ws();
            match line.get(ks..ke)? {
                b"id" if id.is_none() => {
                    id = Some(match p.id()? {
                        Id::Null => Value::null(),
                        Id::Int(n) => Value::from(n),
                        Id::Str(..) => return None,
                    });
                }
                b"result" if result.is_none() => result = Some(p.literal()?),
                b"error" if !error => {
                    if !matches!(p.literal()?, Value::Static(simd_json::StaticNode::Null)) {
                        return None;
                    }
                    error = true;
                }
                _ => return None,
            }
            p.ws();
            match p.next()? {
                b',' => p.ws(),
                b'}' => break,
                _ => return None,
            }
        }
        p.ws();
        (p.i == line.len() && error).then_some((id?, result?))
    }

    impl Shape {
        /// The request, borrowing from `line` (the same bytes [`scan`] read).
        pub(super) fn build(self, line: &[u8]) -> Request<'_> {
            // The scanner took only ASCII, so this is checked once and never fails.
            let line = std::str::from_utf8(line).unwrap_or("");
            let text = |(s, e): (usize, usize)| Cow::Borrowed(line.get(s..e).unwrap_or(""));
            let has_id = self.id.is_some();
            let id = match self.id {
                None | Some(Id::Null) => Value::null(),
                Some(Id::Int(n)) => Value::from(n),
                Some(Id::Str(s, e)) => Value::String(text((s, e))),
            };
            let has_params = self.params.is_some();
            let params = match self.params {
                None => Value::null(),
                Some((spans, n)) => Value::Array(Box::new(
                    spans
                        .iter()
                        .take(n)
                        .map(|&span| Value::String(text(span)))
                        .collect(),
                )),
            };
            Request {
                id,
                has_id,
                method: self
                    .method
                    .map_or(Method::Missing, |m| Method::Name(text(m))),
                params,
                has_params,
                is_response: false,
            }
        }
    }

    struct Cursor<'a> {
        b: &'a [u8],
        i: usize,
    }

    impl Cursor<'_> {
        fn peek(&self) -> Option<u8> {
            self.b.get(self.i).copied()
        }

        fn next(&mut self) -> Option<u8> {
            let c = self.peek()?;
            self.i += 1;
            Some(c)
        }

        fn byte(&mut self, want: u8) -> Option<()> {
            (self.next()? == want).then_some(())
        }

        fn ws(&mut self) {
            while matches!(self.peek(), Some(b' ' | b'\t' | b'\n' | b'\r')) {
                self.i += 1;
            }
        }

        /// A string of printable ASCII without escapes; its contents' span.
        fn string(&mut self) -> Option<(usize, usize)> {
            self.byte(b'"')?;
            let start = self.i;
            let rest = self.b.get(start..)?;
            let len = rest
                .iter()
                .position(|&c| c == b'"' || c == b'\\' || !(0x20..0x7f).contains(&c))?;
            if rest.get(len) != Some(&b'"') {
                return None;
            }
            self.i = start + len + 1;
            Some((start, start + len))
        }

        /// `true`, `false` or `null`.
        fn literal(&mut self) -> Option<Value<'static>> {
            for (word, v) in [
                (&b"true"[..], Value::from(true)),
                (b"false", Value::from(false)),
                (b"null", Value::null()),
            ] {
                let end = self.i.checked_add(word.len())?;
                if self.b.get(self.i..end) == Some(word) {
                    self.i = end;
                    return Some(v);
                }
            }
            None
        }

        /// `null`, a non-negative integer without leading zeros, or a plain string.
        fn id(&mut self) -> Option<Id> {
            match self.peek()? {
                b'"' => self.string().map(|(s, e)| Id::Str(s, e)),
                b'n' => {
                    let end = self.i.checked_add(4)?;
                    (self.b.get(self.i..end)? == b"null").then(|| {
                        self.i = end;
                        Id::Null
                    })
                }
                b'0'..=b'9' => {
                    let start = self.i;
                    while matches!(self.peek(), Some(b'0'..=b'9')) {
                        self.i += 1;
                    }
                    let digits = self.b.get(start..self.i)?;
                    if digits.len() > MAX_ID_DIGITS || (digits.len() > 1 && digits[0] == b'0') {
                        return None;
                    }
                    // A fraction or an exponent: simd-json's number rules.
                    if matches!(self.peek(), Some(b'.' | b'e' | b'E')) {
                        return None;
                    }
                    let n = digits
                        .iter()
                        .fold(0u64, |n, d| n * 10 + u64::from(d - b'0'));
                    Some(Id::Int(n))
                }
                _ => None,
            }
        }

        /// An array of up to [`MAX_PARAMS`] plain strings.
        fn strings(&mut self) -> Option<([(usize, usize); MAX_PARAMS], usize)> {
            let mut spans = [(0, 0); MAX_PARAMS];
            let mut n = 0;
            self.byte(b'[')?;
            self.ws();
            if self.peek()? == b']' {
                self.i += 1;
                return Some((spans, 0));
            }
            loop {
                *spans.get_mut(n)? = self.string()?;
                n += 1;
                self.ws();
                match self.next()? {
                    b',' => self.ws(),
                    b']' => return Some((spans, n)),
                    _ => return None,
                }
            }
        }
    }
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

    /// A line of the fast path's shape, or near it (escapes, other keys, numbers, nesting,
    /// non-ASCII, spacing), from a small alphabet of parts.
    fn request_line() -> impl Strategy<Value = String> {
        let text = prop_oneof![
            20 => "[a-zA-Z0-9._]{0,12}",
            1 => Just("with space".to_owned()),
            1 => Just("esc\\\"aped".to_owned()),
            1 => Just("\\u0041".to_owned()),
            1 => Just("ünï".to_owned()),
        ];
        let value = prop_oneof![
            text.clone().prop_map(|t| format!("\"{t}\"")),
            (0u64..1_000_000_000_000_000_000).prop_map(|n| n.to_string()),
            Just("null".to_owned()),
            Just("-5".to_owned()),
            Just("1.5".to_owned()),
            Just("1e3".to_owned()),
            Just("007".to_owned()),
            Just("true".to_owned()),
            Just("[]".to_owned()),
            Just("{}".to_owned()),
        ];
        let params =
            prop::collection::vec(value.clone(), 0..10).prop_map(|v| format!("[{}]", v.join(",")));
        let key = prop_oneof![
            Just("id"),
            Just("method"),
            Just("params"),
            Just("result"),
            Just("jsonrpc"),
        ];
        let member =
            (key, value, params, any::<bool>(), " {0,2}").prop_map(|(k, v, p, use_p, sp)| {
                let v = if k == "params" && use_p { p } else { v };
                format!("{sp}\"{k}\"{sp}:{sp}{v}{sp}")
            });
        let anything = (prop::collection::vec(member, 0..5), " {0,2}")
            .prop_map(|(m, sp)| format!("{sp}{{{}}}{sp}", m.join(",")));
        // A request as miners send it, members in any order, some left out; the strings may
        // still hold escapes or non-ASCII.
        let id = prop_oneof![
            (0u64..1_000_000_000_000_000_000).prop_map(|n| n.to_string()),
            text.clone().prop_map(|t| format!("\"{t}\"")),
            Just("null".to_owned()),
        ];
        let strings = prop::collection::vec(text.clone(), 0..7).prop_map(|v| {
            let quoted: Vec<String> = v.iter().map(|t| format!("\"{t}\"")).collect();
            format!("[{}]", quoted.join(", "))
        });
        let usual = (id, text, strings, any::<u8>(), " {0,1}").prop_map(|(id, m, p, pick, sp)| {
            let mut members = vec![
                format!("\"id\":{sp}{id}"),
                format!("\"method\":{sp}\"{m}\""),
                format!("\"params\":{sp}{p}"),
            ];
            members.rotate_left(usize::from(pick % 3));
            if pick >= 240 {
                members.pop();
            }
            format!("{{{}}}", members.join(&format!(",{sp}")))
        });
        prop_oneof![3 => usual, 1 => anything]
    }

    proptest! {
        /// Whatever the fast path takes, it reads exactly as simd-json does.
        #[test]
        fn fast_path_agrees_with_simd_json(line in request_line()) {
            let mut p = Parser::new();
            let slow = format!("{:?}", p.parse_slow(line.as_bytes()));
            if let Some(shape) = fast::scan(line.as_bytes()) {
                let fast = format!("{:?}", Ok::<_, ParseError>(shape.build(line.as_bytes())));
                prop_assert_eq!(fast, slow.clone(), "{}", line);
            }
            prop_assert_eq!(format!("{:?}", p.parse(line.as_bytes())), slow);
        }

        /// Arbitrary bytes: never a panic, and the fast path agrees whenever it answers.
        #[test]
        fn fast_path_on_arbitrary_bytes(bytes in prop::collection::vec(any::<u8>(), 0..80)) {
            let mut p = Parser::new();
            let slow = format!("{:?}", p.parse_slow(&bytes));
            if let Some(shape) = fast::scan(&bytes) {
                prop_assert_eq!(format!("{:?}", Ok::<_, ParseError>(shape.build(&bytes))), slow);
            }
        }
    }

    /// The generator above reaches both paths often (else the agreement test shows little).
    #[test]
    fn request_lines_exercise_both_paths() {
        use proptest::strategy::ValueTree;
        let mut runner = proptest::test_runner::TestRunner::deterministic();
        let strategy = request_line();
        let (mut fast_hits, mut slow_hits) = (0, 0);
        for _ in 0..2000 {
            let line = strategy.new_tree(&mut runner).unwrap().current();
            if fast::scan(line.as_bytes()).is_some() {
                fast_hits += 1;
            } else {
                slow_hits += 1;
            }
        }
        assert!(
            fast_hits > 200 && slow_hits > 200,
            "{fast_hits} fast, {slow_hits} slow"
        );
    }

    #[test]
    fn fast_path_takes_the_usual_requests() {
        for line in [
            r#"{"params": ["ckload.1", "1a2b", "00000000", "6500abcd", "1234abcd"], "id": 17, "method": "mining.submit"}"#,
            r#"{"id":4,"method":"mining.submit","params":["w","j","0001","5e00","9a8b7c6d","1fffe000"]}"#,
            r#"{"id":"x1","method":"mining.authorize","params":["user.worker","x"]}"#,
            r#"{"id":null,"method":"mining.subscribe","params":[]}"#,
        ] {
            assert!(fast::scan(line.as_bytes()).is_some(), "{line}");
        }
        for line in [
            r#"{"id":1,"method":"mining.submit","params":["w","j","0001",5,"9a"]}"#,
            r#"{"id":1,"method":"mining.suggest_difficulty","params":[8]}"#,
            r#"{"id":1,"result":true,"error":null}"#,
            r#"{"id":1,"id":2,"method":"m","params":[]}"#,
            r#"{"id":1.0,"method":"m"}"#,
            r#"{}"#,
        ] {
            assert!(fast::scan(line.as_bytes()).is_none(), "{line}");
        }
    }

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

    /// The slow path of [`Parser::parse_message`] alone, for comparison.
    fn message_slow(p: &mut Parser, line: &[u8]) -> String {
        p.scratch.clear();
        p.scratch.extend_from_slice(line);
        // Make the fast path miss: a line with a leading member it does not take.
        let mut padded = b"{\"zz\":0,".to_vec();
        match line.iter().position(|&c| c == b'{') {
            Some(i)
                if line
                    .get(i + 1..)
                    .is_some_and(|r| !r.trim_ascii_start().starts_with(b"}")) =>
            {
                padded.extend_from_slice(line.get(i + 1..).unwrap_or_default());
            }
            _ => return format!("{:?}", p.parse_message(line).map(|_| ())),
        }
        format!("{:?}", p.parse_message(&padded))
    }

    proptest! {
        /// The verdict fast path reads exactly what simd-json reads.
        #[test]
        fn verdict_fast_path_agrees(
            id in prop_oneof![Just("null".to_owned()), (0u64..1_000_000_000_000_000).prop_map(|n| n.to_string()), Just("\"7\"".to_owned()), Just("1.5".to_owned())],
            result in prop_oneof![Just("true"), Just("false"), Just("null"), Just("1"), Just("\"x\"")],
            error in prop_oneof![Just("null"), Just("[21,\"Stale\",null]"), Just("true")],
            order in 0usize..6,
            sp in " {0,1}",
            extra in any::<bool>(),
        ) {
            let mut members = vec![
                format!("\"id\":{sp}{id}"),
                format!("\"result\":{sp}{result}"),
                format!("\"error\":{sp}{error}"),
            ];
            members.swap(0, order % 3);
            members.swap(1, 1 + order % 2);
            if extra {
                members.push("\"reject-reason\":\"Stale\"".to_owned());
            }
            let line = format!("{{{}}}", members.join(&format!(",{sp}")));
            let mut p = Parser::new();
            let fast = format!("{:?}", p.parse_message(line.as_bytes()));
            prop_assert_eq!(fast, message_slow(&mut p, line.as_bytes()), "{}", line);
        }

        #[test]
        fn parse_message_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let mut p = Parser::new();
            let _ = p.parse_message(&bytes);
        }
    }

    #[test]
    fn messages_from_a_pool() {
        let mut p = Parser::new();
        {
            let m = p
                .parse_message(br#"{"result":true,"error":null,"id":4}"#)
                .unwrap();
            assert!(m.accepted() && m.method_name().is_none());
            assert_eq!(m.id_u64(), Some(4));
        }
        assert!(fast::scan_verdict(br#"{"result":true,"error":null,"id":4}"#).is_some());
        {
            let m = p
                .parse_message(br#"{"id":"9","result":false,"error":null,"reject-reason":"Stale"}"#)
                .unwrap();
            assert_eq!((m.id_u64(), m.accepted()), (Some(9), false));
            assert_eq!(m.reason(), "Stale");
        }
        {
            let m = p
                .parse_message(br#"{"id":5,"result":null,"error":[21,"Job not found",null]}"#)
                .unwrap();
            assert_eq!(m.reason(), "Job not found");
        }
        {
            let m = p
                .parse_message(br#"{"params":[0.001],"id":null,"method":"mining.set_difficulty"}"#)
                .unwrap();
            assert_eq!(m.method_name(), Some("mining.set_difficulty"));
            assert_eq!(decode::set_difficulty(&m.params), Ok(0.001));
            assert!(m.id.is_null());
        }
        assert_eq!(
            p.parse_message(b"dropclient=5").unwrap_err(),
            ParseError::Json
        );
        assert_eq!(p.parse_message(b"[1]").unwrap_err(), ParseError::NotObject);
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
