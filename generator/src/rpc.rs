//! A blocking JSON-RPC 1.0 client for bitcoind over plain HTTP/1.1.
//!
//! One [`RpcClient`] holds one `ureq` agent, so its connections are kept alive between calls
//! (ckpool opens a new TCP connection for every call). A client may be shared between threads,
//! but callers that must never wait behind each other (template fetches and block submission)
//! should each own a client: calls on one agent do not queue, yet each owner then has its own
//! pooled connection and its own timeout.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use serde_json::{Value, json};

use crate::stats::GenStats;

/// Longest a TCP connect to bitcoind may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Largest reply body accepted (a `getblocktemplate` for a huge block is tens of MiB of hex).
const MAX_REPLY: u64 = 1 << 30;

/// How many bytes of an unexpected non-JSON body are kept in [`RpcError::Http`].
const BODY_SNIPPET: usize = 200;

/// How a client authenticates. Its `Debug` output leaves the password out.
#[derive(Clone, PartialEq, Eq)]
pub enum RpcAuth {
    /// `rpcuser`/`rpcpassword` (or an `rpcauth` entry) configured on the node.
    UserPass {
        /// User name.
        user: String,
        /// Password.
        pass: String,
    },
    /// The node's `.cookie` file (`__cookie__:<password>`), read at the first call and read again
    /// whenever the node answers 401 (it writes a new cookie at every start).
    Cookie(PathBuf),
}

/// Why an RPC call failed.
#[derive(Debug, thiserror::Error)]
pub enum RpcError {
    /// The URL is not a plain `http://host:port` address.
    #[error("bad RPC url {url}: {reason}")]
    Url {
        /// The URL as given.
        url: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// Connecting, sending or receiving failed: refused, reset, timed out, or broken HTTP.
    #[error("RPC transport error: {0}")]
    Transport(#[source] Box<ureq::Error>),
    /// The node answered with an HTTP status other than 200 and no JSON-RPC error in the body
    /// (401 for bad credentials, 403 for a refused address, 503 when its work queue is full).
    #[error("HTTP status {status} from bitcoind")]
    Http {
        /// The HTTP status code.
        status: u16,
        /// The start of the body, for the log.
        body: String,
    },
    /// The node answered with a JSON-RPC error object (bitcoind sends these with HTTP 500, or
    /// 404 for an unknown method).
    #[error("RPC error {code}: {message}")]
    Rpc {
        /// The JSON-RPC error code (e.g. -32601 method not found, -22 block decode failed).
        code: i64,
        /// The node's error message.
        message: String,
    },
    /// The reply body is not JSON.
    #[error("reply is not JSON: {0}")]
    Json(#[source] serde_json::Error),
    /// The reply is JSON but not a JSON-RPC reply.
    #[error("malformed JSON-RPC reply: {0}")]
    Malformed(&'static str),
    /// The cookie file could not be read or does not hold `user:password`.
    #[error("cannot use RPC cookie file {}: {source}", path.display())]
    Cookie {
        /// The cookie file.
        path: PathBuf,
        /// What went wrong.
        #[source]
        source: io::Error,
    },
}

impl std::fmt::Debug for RpcAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::UserPass { user, .. } => f
                .debug_struct("UserPass")
                .field("user", user)
                .field("pass", &"<redacted>")
                .finish(),
            Self::Cookie(path) => f.debug_tuple("Cookie").field(path).finish(),
        }
    }
}

impl RpcError {
    /// Whether the call may not have reached the node's RPC handler at all, so trying again (or
    /// trying another node) makes sense: transport failures, HTTP errors and garbled replies.
    /// A JSON-RPC error is the node's considered answer and is not worth repeating.
    pub fn is_transient(&self) -> bool {
        !matches!(self, Self::Rpc { .. } | Self::Url { .. })
    }
}

/// A JSON-RPC 1.0 client for one bitcoind.
pub struct RpcClient {
    agent: ureq::Agent,
    url: String,
    auth: RpcAuth,
    /// The `Authorization` header value; `None` until first needed (cookie not read yet).
    auth_header: Mutex<Option<String>>,
    timeout: Duration,
    next_id: AtomicU64,
    /// Where each call's latency goes, if anywhere.
    stats: Option<Arc<GenStats>>,
}

impl RpcClient {
    /// Makes a client for `url` (`host:port` or `http://host:port[/path]`). `timeout` bounds a
    /// whole call (connect, send, wait, read); connecting alone is bounded by [`CONNECT_TIMEOUT`].
    /// Nothing is sent until the first call.
    pub fn new(url: &str, auth: RpcAuth, timeout: Duration) -> Result<Self, RpcError> {
        let url = normalize_url(url)?;
        let config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_connect(Some(CONNECT_TIMEOUT.min(timeout)))
            .timeout_global(Some(timeout))
            .max_idle_connections(4)
            .max_idle_connections_per_host(2)
            .user_agent("ckpool-rs")
            .build();
        let auth_header = match &auth {
            RpcAuth::UserPass { user, pass } => Some(basic_auth(user, pass)),
            RpcAuth::Cookie(_) => None,
        };
        Ok(Self {
            agent: ureq::Agent::new_with_config(config),
            url,
            auth,
            auth_header: Mutex::new(auth_header),
            timeout,
            next_id: AtomicU64::new(1),
            stats: None,
        })
    }

    /// Records the latency of every call (answered or failed) in `stats`, per method.
    #[must_use]
    pub fn with_stats(mut self, stats: Arc<GenStats>) -> Self {
        self.stats = Some(stats);
        self
    }

    /// The normalised URL (`http://host:port/`).
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The timeout [`call`](Self::call) uses.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Calls `method` with `params` (a JSON array, or an object for named arguments) and returns
    /// the `result` member of the reply.
    pub fn call(&self, method: &str, params: Value) -> Result<Value, RpcError> {
        self.call_with_timeout(method, params, self.timeout)
    }

    /// As [`call`](Self::call), with a different timeout for this one call.
    pub fn call_with_timeout(
        &self,
        method: &str,
        params: Value,
        timeout: Duration,
    ) -> Result<Value, RpcError> {
        let Some(stats) = &self.stats else {
            return self.call_untimed(method, params, timeout);
        };
        let started = Instant::now();
        let result = self.call_untimed(method, params, timeout);
        stats.rpc_call(method, started.elapsed());
        result
    }

    fn call_untimed(
        &self,
        method: &str,
        params: Value,
        timeout: Duration,
    ) -> Result<Value, RpcError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let request = json!({"jsonrpc": "1.0", "id": id, "method": method, "params": params});
        let body = serde_json::to_vec(&request).map_err(RpcError::Json)?;
        let mut reload_cookie = false;
        loop {
            let auth = self.auth_header(reload_cookie)?;
            let mut reply = self
                .agent
                .post(&self.url)
                .config()
                .timeout_global(Some(timeout))
                .build()
                .header("Authorization", &auth)
                .header("Content-Type", "application/json")
                .send(&body[..])
                .map_err(|e| RpcError::Transport(Box::new(e)))?;
            let status = reply.status().as_u16();
            let text = reply
                .body_mut()
                .with_config()
                .limit(MAX_REPLY)
                .read_to_vec()
                .map_err(|e| RpcError::Transport(Box::new(e)))?;
            if status == 401 && !reload_cookie && matches!(self.auth, RpcAuth::Cookie(_)) {
                // The node restarted and wrote a new cookie: read it again, once.
                reload_cookie = true;
                continue;
            }
            return parse_reply(status, &text);
        }
    }

    fn auth_header(&self, reload: bool) -> Result<String, RpcError> {
        let mut cached = self.auth_header.lock();
        if let (Some(h), false) = (cached.as_ref(), reload) {
            return Ok(h.clone());
        }
        let header = match &self.auth {
            RpcAuth::UserPass { user, pass } => basic_auth(user, pass),
            RpcAuth::Cookie(path) => cookie_header(path)?,
        };
        *cached = Some(header.clone());
        Ok(header)
    }
}

impl std::fmt::Debug for RpcClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RpcClient")
            .field("url", &self.url)
            .field("auth", &self.auth)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

/// Turns `host:port` or `http://host:port[/path]` into a URL with a path.
fn normalize_url(url: &str) -> Result<String, RpcError> {
    let bad = |reason| RpcError::Url {
        url: url.to_owned(),
        reason,
    };
    let trimmed = url.trim();
    let rest = match trimmed.split_once("://") {
        Some((scheme, rest)) if scheme.eq_ignore_ascii_case("http") => rest,
        Some(_) => return Err(bad("only plain http:// is supported")),
        None => trimmed,
    };
    let (authority, path) = match rest.find('/') {
        Some(at) => rest.split_at(at),
        None => (rest, "/"),
    };
    if authority.is_empty() || authority.starts_with(':') {
        return Err(bad("no host"));
    }
    if authority.contains('@') {
        return Err(bad("put credentials in auth/pass, not in the url"));
    }
    Ok(format!("http://{authority}{path}"))
}

/// Reads a `user:password` cookie file into an `Authorization` header value.
fn cookie_header(path: &Path) -> Result<String, RpcError> {
    let err = |source| RpcError::Cookie {
        path: path.to_owned(),
        source,
    };
    let text = std::fs::read_to_string(path).map_err(err)?;
    let (user, pass) = text.trim().split_once(':').ok_or_else(|| {
        err(io::Error::new(
            io::ErrorKind::InvalidData,
            "no ':' in cookie",
        ))
    })?;
    Ok(basic_auth(user, pass))
}

/// Standard base64 with padding (RFC 4648), through the `base64` crate.
fn base64(input: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(input)
}

fn basic_auth(user: &str, pass: &str) -> String {
    format!("Basic {}", base64(format!("{user}:{pass}").as_bytes()))
}

/// Interprets a reply: the JSON-RPC error object wins over the HTTP status, since bitcoind sends
/// its errors with 404 or 500.
fn parse_reply(status: u16, body: &[u8]) -> Result<Value, RpcError> {
    let http = || RpcError::Http {
        status,
        body: snippet(body),
    };
    let value: Value = match serde_json::from_slice(body) {
        Ok(v) => v,
        Err(_) if status != 200 => return Err(http()),
        Err(e) => return Err(RpcError::Json(e)),
    };
    let Value::Object(mut reply) = value else {
        return Err(if status == 200 {
            RpcError::Malformed("reply is not a JSON object")
        } else {
            http()
        });
    };
    match reply.remove("error") {
        None | Some(Value::Null) => {}
        Some(Value::Object(err)) => {
            return Err(RpcError::Rpc {
                code: err.get("code").and_then(Value::as_i64).unwrap_or(0),
                message: match err.get("message") {
                    Some(Value::String(m)) => m.clone(),
                    Some(other) => other.to_string(),
                    None => String::new(),
                },
            });
        }
        Some(other) => {
            return Err(RpcError::Rpc {
                code: 0,
                message: other.to_string(),
            });
        }
    }
    if status != 200 {
        return Err(http());
    }
    reply
        .remove("result")
        .ok_or(RpcError::Malformed("no result member"))
}

fn snippet(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let mut end = text.len().min(BODY_SNIPPET);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text.get(..end).unwrap_or_default().to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_rfc4648_vectors() {
        let cases = [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ];
        for (plain, encoded) in cases {
            assert_eq!(base64(plain.as_bytes()), encoded, "{plain}");
        }
        assert_eq!(basic_auth("u", "p"), "Basic dTpw");
    }

    #[test]
    fn urls_are_normalised() {
        assert_eq!(
            normalize_url("127.0.0.1:8332").unwrap(),
            "http://127.0.0.1:8332/"
        );
        assert_eq!(normalize_url(" http://h:1 ").unwrap(), "http://h:1/");
        assert_eq!(
            normalize_url("HTTP://h:1/wallet/x").unwrap(),
            "http://h:1/wallet/x"
        );
        assert!(matches!(
            normalize_url("https://h:1"),
            Err(RpcError::Url { .. })
        ));
        assert!(matches!(normalize_url(""), Err(RpcError::Url { .. })));
        assert!(matches!(
            normalize_url("http://u:p@h:1"),
            Err(RpcError::Url { .. })
        ));
    }

    #[test]
    fn replies_are_interpreted() {
        assert_eq!(
            parse_reply(200, br#"{"result":5,"error":null,"id":1}"#).unwrap(),
            json!(5)
        );
        assert_eq!(
            parse_reply(200, br#"{"result":null,"error":null,"id":1}"#).unwrap(),
            Value::Null
        );
        match parse_reply(
            404,
            br#"{"result":null,"error":{"code":-32601,"message":"Method not found"},"id":1}"#,
        ) {
            Err(RpcError::Rpc { code, message }) => {
                assert_eq!(code, -32601);
                assert_eq!(message, "Method not found");
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(matches!(
            parse_reply(401, b""),
            Err(RpcError::Http { status: 401, .. })
        ));
        assert!(matches!(
            parse_reply(503, b"Work queue depth exceeded"),
            Err(RpcError::Http { status: 503, .. })
        ));
        assert!(matches!(parse_reply(200, b"nope"), Err(RpcError::Json(_))));
        assert!(matches!(
            parse_reply(200, b"[1]"),
            Err(RpcError::Malformed(_))
        ));
        assert!(matches!(
            parse_reply(200, br#"{"id":1}"#),
            Err(RpcError::Malformed(_))
        ));
        assert!(matches!(
            parse_reply(500, br#"{"result":null,"error":"boom"}"#),
            Err(RpcError::Rpc { code: 0, .. })
        ));
    }

    #[test]
    fn cookie_files_are_read() {
        let dir = std::env::temp_dir().join(format!("ckpool-rs-cookie-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(".cookie");
        std::fs::write(&path, "__cookie__:abc\n").unwrap();
        assert_eq!(
            cookie_header(&path).unwrap(),
            basic_auth("__cookie__", "abc")
        );
        std::fs::write(&path, "garbage").unwrap();
        assert!(matches!(cookie_header(&path), Err(RpcError::Cookie { .. })));
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(matches!(cookie_header(&path), Err(RpcError::Cookie { .. })));
    }

    #[test]
    fn debug_output_hides_passwords() {
        let auth = RpcAuth::UserPass {
            user: "alice".into(),
            pass: "s3cret".into(),
        };
        let client = RpcClient::new("h:1", auth.clone(), Duration::from_secs(1)).unwrap();
        for text in [format!("{auth:?}"), format!("{client:?}")] {
            assert!(text.contains("alice"), "{text}");
            assert!(!text.contains("s3cret"), "{text}");
        }
    }

    #[test]
    fn snippets_respect_char_boundaries() {
        let body = "é".repeat(150);
        let s = snippet(body.as_bytes());
        assert!(s.len() <= BODY_SNIPPET);
        assert!(s.chars().all(|c| c == 'é'));
    }
}
