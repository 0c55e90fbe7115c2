//! ckpool's passthrough framing (`ckpool -P` and `-N` towards their upstream pool), both ways,
//! byte-compatible with ckpool 0.9.9.
//!
//! * The link opens with `{"method": "mining.passthrough", "params": ["ckpool\/0.9.9"]}` (or
//!   `mining.node`), answered with a bare `{"result":true}` ([`handshake`], [`HANDSHAKE_OK`]).
//! * Each miner line goes upstream compacted, with `"client_id":N,"address":"ip","server":idx`
//!   appended ([`encode_miner_line`]); a miner leaving becomes a `mining.term` with id 42
//!   ([`term`]). The pool side reads them back with [`decode_downstream`].
//! * Each line for a miner comes back with `"node.method":"…","client_id":N` appended
//!   ([`encode_for_client`]); the passthrough routes it by `client_id` and gives the miner the
//!   line without those two members ([`decode_upstream`]).
//! * **Multicast** (ckpool-rs only, not in ckpool): a passthrough may add `"multicast":true` to
//!   its handshake ([`handshake_ext`]; ckpool's pool ignores members it does not know). A
//!   ckpool-rs pool then sends a line that goes to many of its miners alike (a job's
//!   `mining.notify`) once, with `"node.method":"…","client_ids":[N,…]` appended
//!   ([`encode_for_clients`]) instead of once per miner; the passthrough gives each miner named
//!   the line without those two members ([`FromUpstream::Clients`], [`client_ids`]). A pool
//!   never sends it to a link that did not ask, so ckpool's passthroughs see ckpool's framing.
//! * Lines that are not JSON objects (ckpool's upstream sends connector commands such as
//!   `dropclient=N` raw) are [`FromUpstream::Text`]: data for the caller to judge, never a
//!   command this module runs.
//!
//! Member values are kept byte for byte (numbers are not re-printed); whitespace outside
//! strings is dropped, as ckpool's compact re-serialisation does.

use super::write::{write_str, write_u64};

/// What the link carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// `mining.passthrough`: miners' lines, relayed.
    Passthrough,
    /// `mining.node`: the same plus the pool's transactions and workinfos.
    Node,
}

/// The upstream's answer to the handshake, with its newline.
pub const HANDSHAKE_OK: &[u8] = b"{\"result\":true}\n";

/// The members a passthrough adds to a miner's line (any the miner sent are dropped).
const ROUTING: [&[u8]; 3] = [b"client_id", b"address", b"server"];
/// The members the upstream adds to a line for a miner (or for several: `client_ids`).
const FOR_CLIENT: [&[u8]; 3] = [b"client_id", b"node.method", b"client_ids"];
/// Most miners one multicast line names (its `client_ids`); a pool splits longer lists.
pub const MAX_MULTICAST_IDS: usize = 4096;
/// Most members an object may have here.
const MAX_MEMBERS: usize = 32;
/// Deepest nesting of arrays and objects accepted.
const MAX_DEPTH: usize = 32;

/// `{"method": "mining.passthrough", "params": ["<agent>"]}\n`, as ckpool writes it: with
/// spaces, and `/` escaped as `\/`.
pub fn handshake(out: &mut Vec<u8>, role: Role, agent: &str) {
    handshake_ext(out, role, agent, false);
}

/// [`handshake`], with `, "multicast": true` before its closing brace when `multicast`: the
/// passthrough reads multicast lines (module docs).
pub fn handshake_ext(out: &mut Vec<u8>, role: Role, agent: &str, multicast: bool) {
    out.extend_from_slice(match role {
        Role::Passthrough => b"{\"method\": \"mining.passthrough\", \"params\": [".as_slice(),
        Role::Node => b"{\"method\": \"mining.node\", \"params\": [".as_slice(),
    });
    let mut quoted = Vec::with_capacity(agent.len() + 2);
    write_str(&mut quoted, agent);
    let mut escape = false;
    for b in quoted {
        if escape {
            escape = false;
        } else if b == b'\\' {
            escape = true;
        } else if b == b'/' {
            out.push(b'\\');
        }
        out.push(b);
    }
    out.extend_from_slice(if multicast {
        b"], \"multicast\": true}\n".as_slice()
    } else {
        b"]}\n"
    });
}

/// Why a line cannot be framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// Not a JSON object (or nested too deep, or with too many members).
    #[error("not a JSON object")]
    NotObject,
}

/// Appends a miner's line for the upstream, compacted, with
/// `"client_id":N,"address":"<address>","server":<server>` added last (members of those names
/// the miner sent are dropped). Newline included. A line that would have more members than
/// [`decode_downstream`] reads is refused (nothing is appended).
pub fn encode_miner_line(
    out: &mut Vec<u8>,
    line: &[u8],
    client_id: u64,
    address: &str,
    server: u64,
) -> Result<(), FrameError> {
    let obj = Object::scan(line).ok_or(FrameError::NotObject)?;
    let mark = out.len();
    let n = obj.write_without(out, &ROUTING);
    if n + ROUTING.len() > MAX_MEMBERS {
        out.truncate(mark);
        return Err(FrameError::NotObject);
    }
    if n > 0 {
        out.push(b',');
    }
    out.extend_from_slice(b"\"client_id\":");
    write_u64(out, client_id);
    out.extend_from_slice(b",\"address\":");
    write_str(out, address);
    out.extend_from_slice(b",\"server\":");
    write_u64(out, server);
    out.extend_from_slice(b"}\n");
    Ok(())
}

/// `{"id":42,"client_id":N,"address":"<address>","server":<server>,"method":"mining.term","params":[]}\n`:
/// miner `client_id` left.
pub fn term(out: &mut Vec<u8>, client_id: u64, address: &str, server: u64) {
    out.extend_from_slice(b"{\"id\":42,\"client_id\":");
    write_u64(out, client_id);
    out.extend_from_slice(b",\"address\":");
    write_str(out, address);
    out.extend_from_slice(b",\"server\":");
    write_u64(out, server);
    out.extend_from_slice(b",\"method\":\"mining.term\",\"params\":[]}\n");
}

/// Appends a line for miner `client_id` as the upstream sends it down: compacted, with
/// `"node.method":"<node_method>","client_id":N` added last. Newline included. A line that
/// would have more members than [`decode_upstream`] reads is refused (nothing is appended).
pub fn encode_for_client(
    out: &mut Vec<u8>,
    line: &[u8],
    node_method: &str,
    client_id: u64,
) -> Result<(), FrameError> {
    encode_down(out, line, node_method, |out| {
        out.extend_from_slice(b",\"client_id\":");
        write_u64(out, client_id);
    })
}

/// Appends a line for every miner in `client_ids` (a multicast line, see the module docs):
/// compacted, with `"node.method":"<node_method>","client_ids":[N,…]` added last. Newline
/// included. The caller keeps lists at most [`MAX_MULTICAST_IDS`] long. A line that would have
/// more members than [`decode_upstream`] reads is refused (nothing is appended).
pub fn encode_for_clients(
    out: &mut Vec<u8>,
    line: &[u8],
    node_method: &str,
    client_ids: &[u64],
) -> Result<(), FrameError> {
    encode_down(out, line, node_method, |out| {
        write_client_ids(out, client_ids)
    })
}

/// `line` compacted without the members the upstream adds, then `"node.method":"<node_method>"`
/// and what `routing` writes (`,"client_id":N` or `,"client_ids":[…]`), newline included;
/// refused (nothing appended) beyond what [`decode_upstream`] reads.
fn encode_down(
    out: &mut Vec<u8>,
    line: &[u8],
    node_method: &str,
    routing: impl FnOnce(&mut Vec<u8>),
) -> Result<(), FrameError> {
    let obj = Object::scan(line).ok_or(FrameError::NotObject)?;
    let mark = out.len();
    let n = obj.write_without(out, &FOR_CLIENT);
    if n + 2 > MAX_MEMBERS {
        out.truncate(mark);
        return Err(FrameError::NotObject);
    }
    if n > 0 {
        out.push(b',');
    }
    out.extend_from_slice(b"\"node.method\":");
    write_str(out, node_method);
    routing(out);
    out.extend_from_slice(b"}\n");
    Ok(())
}

/// Appends `,"client_ids":[N,…]`.
pub fn write_client_ids(out: &mut Vec<u8>, client_ids: &[u64]) {
    out.extend_from_slice(b",\"client_ids\":[");
    for (i, id) in client_ids.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        write_u64(out, *id);
    }
    out.push(b']');
}

/// Reads the raw `client_ids` array of a [`FromUpstream::Clients`] into `out` (cleared first):
/// `false` (and `out` holding what was read before the fault) unless it is an array of
/// non-negative integers, at most [`MAX_MULTICAST_IDS`] of them.
pub fn client_ids(raw: &[u8], out: &mut Vec<u64>) -> bool {
    out.clear();
    let Some(inner) = raw.strip_prefix(b"[").and_then(|r| r.strip_suffix(b"]")) else {
        return false;
    };
    if inner.trim_ascii().is_empty() {
        return true;
    }
    for item in inner.split(|&b| b == b',') {
        if out.len() >= MAX_MULTICAST_IDS {
            return false;
        }
        match uint(item.trim_ascii()) {
            Some(id) => out.push(id),
            None => return false,
        }
    }
    true
}

/// A line a passthrough received from its upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FromUpstream<'a> {
    /// `{"result":true}` with no id: the handshake was accepted.
    HandshakeOk,
    /// For miner `client_id`: the line it gets was appended to `out`.
    Client {
        /// The miner's id on this passthrough.
        client_id: u64,
        /// The upstream's message type (`share.result`, `update`, `diff`, …), if given.
        node_method: Option<&'a str>,
    },
    /// For each miner in `client_ids` (a multicast line): the line they get was appended to
    /// `out`. Read the list with [`client_ids`].
    Clients {
        /// The raw JSON array of miner ids.
        ids: &'a [u8],
        /// The upstream's message type, if given.
        node_method: Option<&'a str>,
    },
    /// A message for the passthrough (or node) itself, with no `client_id`: the line as it
    /// came (`workinfo`, `transactions`, `block` on a node link).
    Link {
        /// Its `node.method`, if given.
        node_method: Option<&'a str>,
    },
    /// Not a JSON object: raw text such as `dropclient=N`. Data, never a command to run.
    Text(&'a [u8]),
}

impl FromUpstream<'_> {
    /// For `dropclient=N`: the client the upstream dropped.
    pub fn dropclient(&self) -> Option<u64> {
        let Self::Text(t) = self else {
            return None;
        };
        let digits = t.trim_ascii().strip_prefix(b"dropclient=")?;
        if digits.is_empty() || digits.len() > 20 || !digits.iter().all(u8::is_ascii_digit) {
            return None;
        }
        std::str::from_utf8(digits).ok()?.parse().ok()
    }
}

/// Reads a line from the upstream (without its newline). For a miner's line, the line the
/// miner gets (without `client_id` and `node.method`, with a newline) is appended to `out`.
pub fn decode_upstream<'a>(line: &'a [u8], out: &mut Vec<u8>) -> FromUpstream<'a> {
    let Some(obj) = Object::scan(line) else {
        return FromUpstream::Text(line);
    };
    let node_method = obj.get(b"node.method").and_then(plain_string);
    match obj.get(b"client_id").and_then(uint) {
        Some(client_id) => {
            obj.write_without(out, &FOR_CLIENT);
            out.extend_from_slice(b"}\n");
            FromUpstream::Client {
                client_id,
                node_method,
            }
        }
        None if obj.len == 1 && obj.get(b"result") == Some(b"true") => FromUpstream::HandshakeOk,
        None if obj.get(b"client_ids").is_some_and(|v| v.starts_with(b"[")) => {
            let ids = obj.get(b"client_ids").unwrap_or_default();
            obj.write_without(out, &FOR_CLIENT);
            out.extend_from_slice(b"}\n");
            FromUpstream::Clients { ids, node_method }
        }
        None => FromUpstream::Link { node_method },
    }
}

/// A line the pool side received from a passthrough or node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FromDownstream<'a> {
    /// `mining.passthrough` or `mining.node` with no `client_id`: the link's handshake.
    Handshake {
        /// Which.
        role: Role,
        /// The first param (ckpool sends `"ckpool/0.9.9"`), as written (escapes kept).
        agent: Option<&'a str>,
        /// It sent `"multicast":true`: it reads multicast lines (module docs).
        multicast: bool,
    },
    /// `mining.term`: miner `client_id` left.
    Term {
        /// The miner's id on the passthrough.
        client_id: u64,
    },
    /// A miner's line: the line as the miner sent it (compacted, without the routing members,
    /// with a newline) was appended to `out`.
    Miner {
        /// The miner's id on the passthrough.
        client_id: u64,
        /// The miner's address as the passthrough gives it (escapes kept).
        address: Option<&'a str>,
        /// The passthrough's listening server index.
        server: Option<u64>,
    },
    /// Not a JSON object, or an object with no usable `client_id` that is no handshake.
    Invalid,
}

/// Reads a line from a passthrough (without its newline).
pub fn decode_downstream<'a>(line: &'a [u8], out: &mut Vec<u8>) -> FromDownstream<'a> {
    let Some(obj) = Object::scan(line) else {
        return FromDownstream::Invalid;
    };
    let method = obj.get(b"method").and_then(plain_string);
    let Some(client_id) = obj.get(b"client_id").and_then(uint) else {
        let role = match method {
            Some("mining.passthrough") => Role::Passthrough,
            Some("mining.node") => Role::Node,
            _ => return FromDownstream::Invalid,
        };
        let agent = obj
            .get(b"params")
            .and_then(|p| Object::first_element(p))
            .and_then(raw_string);
        let multicast = obj.get(b"multicast") == Some(b"true");
        return FromDownstream::Handshake {
            role,
            agent,
            multicast,
        };
    };
    if method == Some("mining.term") {
        return FromDownstream::Term { client_id };
    }
    obj.write_without(out, &ROUTING);
    out.extend_from_slice(b"}\n");
    FromDownstream::Miner {
        client_id,
        address: obj.get(b"address").and_then(raw_string),
        server: obj.get(b"server").and_then(uint),
    }
}

/// A string value's contents, when it has no escapes (`None` otherwise).
fn plain_string(v: &[u8]) -> Option<&str> {
    let inner = v.strip_prefix(b"\"")?.strip_suffix(b"\"")?;
    if inner.contains(&b'\\') {
        return None;
    }
    std::str::from_utf8(inner).ok()
}

/// A string value's contents as written (escapes kept).
fn raw_string(v: &[u8]) -> Option<&str> {
    let inner = v.strip_prefix(b"\"")?.strip_suffix(b"\"")?;
    std::str::from_utf8(inner).ok()
}

/// A non-negative integer value (any `u64`: `parse` refuses the 20-digit ones past its end).
fn uint(v: &[u8]) -> Option<u64> {
    if v.is_empty() || v.len() > 20 || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(v).ok()?.parse().ok()
}

/// The members of a JSON object line: spans of each key (without quotes) and value.
///
/// Names are compared as a JSON reader reads them (`client\u005fid` is `client_id`), and of
/// members with the same name the last counts, as for jansson (ckpool) and serde_json: a miner
/// can neither hide a routing member from the passthrough nor shadow the one it appends.
struct Object<'a> {
    line: &'a [u8],
    members: [Member; MAX_MEMBERS],
    len: usize,
    /// Some name has an escape (rare): names are then compared decoded.
    escaped: bool,
}

#[derive(Clone, Copy, Default)]
struct Member {
    key: (usize, usize),
    value: (usize, usize),
}

impl<'a> Object<'a> {
    /// Scans a whole line holding one JSON object (surrounding whitespace allowed).
    fn scan(line: &'a [u8]) -> Option<Self> {
        let mut c = Cursor { b: line, i: 0 };
        let mut obj = Self {
            line,
            members: [Member::default(); MAX_MEMBERS],
            len: 0,
            escaped: false,
        };
        c.ws();
        c.expect(b'{')?;
        c.ws();
        if c.peek()? == b'}' {
            c.i += 1;
        } else {
            loop {
                let ks = c.i + 1;
                let escaped = c.string()?;
                let ke = c.i - 1;
                c.ws();
                c.expect(b':')?;
                c.ws();
                let vs = c.i;
                c.value(0)?;
                let ve = c.i;
                *obj.members.get_mut(obj.len)? = Member {
                    key: (ks, ke),
                    value: (vs, ve),
                };
                obj.escaped |= escaped;
                obj.len += 1;
                c.ws();
                match c.next()? {
                    b',' => c.ws(),
                    b'}' => break,
                    _ => return None,
                }
            }
        }
        c.ws();
        (c.i == line.len()).then_some(obj)
    }

    fn key(&self, m: &Member) -> &'a [u8] {
        self.line.get(m.key.0..m.key.1).unwrap_or_default()
    }

    /// Whether member `m` is named `name`, its escapes decoded.
    fn named(&self, m: &Member, name: &[u8]) -> bool {
        let key = self.key(m);
        if !self.escaped || !key.contains(&b'\\') {
            return key == name;
        }
        // The name with its quotes, which the scan checked are there.
        let quoted = self
            .line
            .get(m.key.0.saturating_sub(1)..m.key.1.saturating_add(1))
            .unwrap_or_default();
        serde_json::from_slice::<String>(quoted).is_ok_and(|k| k.as_bytes() == name)
    }

    fn value(&self, m: &Member) -> &'a [u8] {
        self.line.get(m.value.0..m.value.1).unwrap_or_default()
    }

    /// The raw value of the last member named `key`.
    fn get(&self, key: &[u8]) -> Option<&'a [u8]> {
        self.members
            .get(..self.len)?
            .iter()
            .rev()
            .find(|m| self.named(m, key))
            .map(|m| self.value(m))
    }

    /// Writes `{` and every member not named in `skip`, compacted and comma-separated, leaving
    /// the object open; returns how many were written.
    fn write_without(&self, out: &mut Vec<u8>, skip: &[&[u8]]) -> usize {
        out.push(b'{');
        let mut n = 0;
        for m in self.members.get(..self.len).unwrap_or_default() {
            if skip.iter().any(|name| self.named(m, name)) {
                continue;
            }
            if n > 0 {
                out.push(b',');
            }
            out.push(b'"');
            out.extend_from_slice(self.key(m));
            out.extend_from_slice(b"\":");
            compact_into(out, self.value(m));
            n += 1;
        }
        n
    }

    /// The first element of an array value.
    fn first_element(v: &[u8]) -> Option<&[u8]> {
        let mut c = Cursor { b: v, i: 0 };
        c.expect(b'[')?;
        c.ws();
        let s = c.i;
        c.value(0)?;
        v.get(s..c.i)
    }
}

/// Appends `v` without the whitespace outside its strings.
fn compact_into(out: &mut Vec<u8>, v: &[u8]) {
    let mut in_str = false;
    let mut escaped = false;
    for &b in v {
        if in_str {
            out.push(b);
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_str = false;
            }
        } else if !matches!(b, b' ' | b'\t' | b'\n' | b'\r') {
            if b == b'"' {
                in_str = true;
            }
            out.push(b);
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

    fn expect(&mut self, want: u8) -> Option<()> {
        (self.next()? == want).then_some(())
    }

    fn ws(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.i += 1;
        }
    }

    /// A string (the cursor on its opening quote): escapes checked, control characters refused,
    /// the bytes UTF-8. Whether it has an escape.
    fn string(&mut self) -> Option<bool> {
        self.expect(b'"')?;
        let start = self.i;
        let mut escaped = false;
        loop {
            match self.next()? {
                b'"' => break,
                b'\\' => {
                    escaped = true;
                    match self.next()? {
                        b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => {}
                        b'u' => {
                            for _ in 0..4 {
                                if !self.next()?.is_ascii_hexdigit() {
                                    return None;
                                }
                            }
                        }
                        _ => return None,
                    }
                }
                c if c < 0x20 => return None,
                _ => {}
            }
        }
        std::str::from_utf8(self.b.get(start..self.i)?).ok()?;
        Some(escaped)
    }

    /// A number by JSON's grammar.
    fn number(&mut self) -> Option<()> {
        if self.peek() == Some(b'-') {
            self.i += 1;
        }
        match self.next()? {
            b'0' => {}
            b'1'..=b'9' => self.digits(),
            _ => return None,
        }
        if self.peek() == Some(b'.') {
            self.i += 1;
            self.digit()?;
            self.digits();
        }
        if matches!(self.peek(), Some(b'e' | b'E')) {
            self.i += 1;
            if matches!(self.peek(), Some(b'+' | b'-')) {
                self.i += 1;
            }
            self.digit()?;
            self.digits();
        }
        Some(())
    }

    fn digit(&mut self) -> Option<()> {
        self.next()?.is_ascii_digit().then_some(())
    }

    fn digits(&mut self) {
        while matches!(self.peek(), Some(b'0'..=b'9')) {
            self.i += 1;
        }
    }

    fn literal(&mut self, word: &[u8]) -> Option<()> {
        let end = self.i.checked_add(word.len())?;
        (self.b.get(self.i..end)? == word).then(|| self.i = end)
    }

    /// Any JSON value, nested at most [`MAX_DEPTH`] deep.
    fn value(&mut self, depth: usize) -> Option<()> {
        if depth > MAX_DEPTH {
            return None;
        }
        match self.peek()? {
            b'"' => self.string().map(drop),
            b'{' => {
                self.i += 1;
                self.ws();
                if self.peek()? == b'}' {
                    self.i += 1;
                    return Some(());
                }
                loop {
                    self.string()?;
                    self.ws();
                    self.expect(b':')?;
                    self.ws();
                    self.value(depth + 1)?;
                    self.ws();
                    match self.next()? {
                        b',' => self.ws(),
                        b'}' => return Some(()),
                        _ => return None,
                    }
                }
            }
            b'[' => {
                self.i += 1;
                self.ws();
                if self.peek()? == b']' {
                    self.i += 1;
                    return Some(());
                }
                loop {
                    self.value(depth + 1)?;
                    self.ws();
                    match self.next()? {
                        b',' => self.ws(),
                        b']' => return Some(()),
                        _ => return None,
                    }
                }
            }
            b't' => self.literal(b"true"),
            b'f' => self.literal(b"false"),
            b'n' => self.literal(b"null"),
            _ => self.number(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handshake_escapes_slashes_only_outside_escapes() {
        let mut out = Vec::new();
        handshake(&mut out, Role::Node, "a/b\\/c\"/");
        assert_eq!(
            String::from_utf8(out).unwrap_or_default(),
            "{\"method\": \"mining.node\", \"params\": [\"a\\/b\\\\\\/c\\\"\\/\"]}\n"
        );
    }

    #[test]
    fn multicast_is_asked_for_in_the_handshake_and_seen_by_the_pool() {
        let mut out = Vec::new();
        handshake_ext(&mut out, Role::Passthrough, "ckpool-rs/1", true);
        assert_eq!(
            String::from_utf8(out.clone()).unwrap_or_default(),
            "{\"method\": \"mining.passthrough\", \"params\": [\"ckpool-rs\\/1\"], \"multicast\": true}\n"
        );
        let mut scratch = Vec::new();
        let line = out.strip_suffix(b"\n").unwrap_or(&out);
        assert_eq!(
            decode_downstream(line, &mut scratch),
            FromDownstream::Handshake {
                role: Role::Passthrough,
                agent: Some("ckpool-rs\\/1"),
                multicast: true
            }
        );
        out.clear();
        handshake(&mut out, Role::Passthrough, "ckpool/0.9.9");
        let line = out.strip_suffix(b"\n").unwrap_or(&out);
        assert!(matches!(
            decode_downstream(line, &mut scratch),
            FromDownstream::Handshake {
                multicast: false,
                ..
            }
        ));
    }

    #[test]
    fn a_multicast_line_round_trips_and_bad_lists_are_refused() {
        let notify = br#"{"params":["1a",true],"id":null,"method":"mining.notify"}"#;
        let mut line = Vec::new();
        encode_for_clients(&mut line, notify, "update", &[3, 7, 4_294_967_295]).unwrap_or_default();
        assert_eq!(
            String::from_utf8(line.clone()).unwrap_or_default(),
            "{\"params\":[\"1a\",true],\"id\":null,\"method\":\"mining.notify\",\"node.method\":\"update\",\"client_ids\":[3,7,4294967295]}\n"
        );
        let mut body = Vec::new();
        let got = decode_upstream(line.strip_suffix(b"\n").unwrap_or(&line), &mut body);
        let FromUpstream::Clients { ids, node_method } = got else {
            panic!("{got:?}");
        };
        assert_eq!(node_method, Some("update"));
        assert_eq!(body, [notify.as_slice(), b"\n"].concat());
        let mut list = Vec::new();
        assert!(client_ids(ids, &mut list));
        assert_eq!(list, [3, 7, 4_294_967_295]);
        assert!(client_ids(b"[]", &mut list) && list.is_empty());
        assert!(client_ids(b"[ 1 , 2 ]", &mut list) && list == [1, 2]);
        for bad in [
            &b"[1,-2]"[..],
            b"[1,,2]",
            b"[\"1\"]",
            b"[1.5]",
            b"1",
            b"[1,2",
        ] {
            assert!(
                !client_ids(bad, &mut list),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        let long: Vec<u64> = (0..=MAX_MULTICAST_IDS as u64).collect();
        let mut raw = Vec::new();
        write_client_ids(&mut raw, &long);
        let raw = raw.strip_prefix(b",\"client_ids\":").unwrap_or_default();
        assert!(!client_ids(raw, &mut list), "longer than the cap");
        // `client_ids` that is no array is no multicast: the line is the link's.
        let mut body = Vec::new();
        assert!(matches!(
            decode_upstream(br#"{"method":"x","client_ids":7}"#, &mut body),
            FromUpstream::Link { .. }
        ));
    }
}
