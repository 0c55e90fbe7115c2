//! A minimal bitcoind JSON-RPC client (HTTP/1.1 on a plain TCP socket, one request per
//! connection) for the one thing ckload asks a node: mine a block now, so the pool sends a new
//! job. Loopback only, like everything ckload talks to.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::Duration;

use serde_json::{Value, json};

use crate::Error;

/// Where and how to reach a node's RPC.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RpcTarget {
    /// The node's RPC address (loopback).
    pub addr: SocketAddr,
    /// RPC user.
    pub user: String,
    /// RPC password.
    pub pass: String,
}

/// Longest RPC reply read.
const MAX_REPLY: u64 = 4 << 20;

impl RpcTarget {
    /// Parses `http://host:port` (or `host:port`) and refuses anything but loopback.
    pub fn new(url: &str, user: &str, pass: &str) -> Result<Self, Error> {
        let hostport = url
            .strip_prefix("http://")
            .unwrap_or(url)
            .trim_end_matches('/');
        let addr = crate::run::resolve_loopback(hostport)?;
        Ok(Self {
            addr,
            user: user.to_owned(),
            pass: pass.to_owned(),
        })
    }

    /// One call; the `result`, or the node's error as [`Error::Rpc`].
    pub fn call(&self, method: &str, params: Value) -> Result<Value, Error> {
        let body = json!({"jsonrpc": "1.0", "id": "ckload", "method": method, "params": params})
            .to_string();
        let auth = base64(format!("{}:{}", self.user, self.pass).as_bytes());
        let request = format!(
            "POST / HTTP/1.1\r\nHost: {}\r\nAuthorization: Basic {auth}\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            self.addr,
            body.len()
        );
        let io = |e: std::io::Error| Error::Rpc(format!("{method} to {}: {e}", self.addr));
        let mut stream =
            TcpStream::connect_timeout(&self.addr, Duration::from_secs(5)).map_err(io)?;
        stream
            .set_read_timeout(Some(Duration::from_secs(60)))
            .map_err(io)?;
        stream.write_all(request.as_bytes()).map_err(io)?;
        let mut reply = Vec::new();
        stream.take(MAX_REPLY).read_to_end(&mut reply).map_err(io)?;
        let text = String::from_utf8_lossy(&reply);
        let (head, body) = text
            .split_once("\r\n\r\n")
            .ok_or_else(|| Error::Rpc(format!("{method}: no HTTP reply from {}", self.addr)))?;
        if head.contains(" 401 ") {
            return Err(Error::Rpc(format!(
                "{method}: HTTP 401 (wrong RPC user or password)"
            )));
        }
        let v: Value = serde_json::from_str(body.trim()).map_err(|e| {
            Error::Rpc(format!(
                "{method}: unreadable reply ({e}): {}",
                head.lines().next().unwrap_or("")
            ))
        })?;
        match v.get("error") {
            Some(Value::Null) | None => Ok(v.get("result").cloned().unwrap_or(Value::Null)),
            Some(err) => Err(Error::Rpc(format!("{method}: {err}"))),
        }
    }

    /// Mines one block: `generate 1`, or `generatetoaddress 1 <new address>` on nodes without
    /// `generate`. Returns the block hash (RPC hex).
    pub fn generate_one(&self) -> Result<String, Error> {
        let result = match self.call("generate", json!([1])) {
            Ok(v) => v,
            Err(Error::Rpc(e)) if e.contains("-32601") || e.contains("not found") => {
                let addr = self.call("getnewaddress", json!([]))?;
                self.call("generatetoaddress", json!([1, addr]))?
            }
            Err(e) => return Err(e),
        };
        result
            .get(0)
            .and_then(Value::as_str)
            .map(str::to_owned)
            .ok_or_else(|| Error::Rpc(format!("generate gave {result}")))
    }
}

/// Resolves `host:port` to its first address.
pub(crate) fn resolve(hostport: &str) -> Result<Vec<SocketAddr>, Error> {
    hostport
        .to_socket_addrs()
        .map(Iterator::collect)
        .map_err(|e| Error::Config(format!("cannot resolve {hostport:?}: {e}")))
}

/// Standard base64 with padding (RFC 4648), through the `base64` crate.
fn base64(input: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(input)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "test code")]
mod tests {
    use super::*;

    #[test]
    fn base64_vectors() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(base64(b"foob"), "Zm9vYg==");
        assert_eq!(base64(b"ckpool:regtest"), "Y2twb29sOnJlZ3Rlc3Q=");
    }

    #[test]
    fn refuses_non_loopback() {
        assert!(RpcTarget::new("http://127.0.0.1:18443", "u", "p").is_ok());
        assert!(RpcTarget::new("http://10.0.0.1:18443", "u", "p").is_err());
        assert!(RpcTarget::new("192.168.1.1:8332", "u", "p").is_err());
    }

    #[test]
    fn talks_http_to_a_fake_node() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut buf = vec![0u8; 4096];
            let n = s.read(&mut buf).unwrap();
            let req = String::from_utf8_lossy(&buf[..n]).into_owned();
            let body = r#"{"result":["00ab"],"error":null,"id":"ckload"}"#;
            write!(
                s,
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            )
            .unwrap();
            req
        });
        let t = RpcTarget::new(&format!("http://{addr}"), "ckpool", "regtest").unwrap();
        assert_eq!(t.generate_one().unwrap(), "00ab");
        let req = server.join().unwrap();
        assert!(req.contains("Authorization: Basic Y2twb29sOnJlZ3Rlc3Q="));
        assert!(req.contains(r#""method":"generate""#));
    }
}
