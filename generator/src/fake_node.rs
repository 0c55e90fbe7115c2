//! A scripted stand-in for bitcoind's RPC port, for unit tests of odd replies and failover order
//! without a real node. HTTP/1.1 with keep-alive, one thread per connection; the threads live as
//! long as the test process.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;

use serde_json::{Value, json};

/// What the fake answers to a method: HTTP status and body; status 0 hangs up instead.
pub(crate) type Script = dyn Fn(&str) -> (u16, String) + Send + Sync;

/// Starts a fake node on a free loopback port; returns `127.0.0.1:port`.
pub(crate) fn start(script: impl Fn(&str) -> (u16, String) + Send + Sync + 'static) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let script: Arc<Script> = Arc::new(script);
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { return };
            let script = Arc::clone(&script);
            std::thread::spawn(move || serve(stream, &*script));
        }
    });
    addr
}

/// A JSON-RPC success body.
pub(crate) fn ok(result: Value) -> (u16, String) {
    (
        200,
        json!({"result": result, "error": null, "id": 1}).to_string(),
    )
}

/// A JSON-RPC error body, with the status bitcoind uses.
pub(crate) fn rpc_error(code: i64, message: &str) -> (u16, String) {
    let body = json!({"result": null, "error": {"code": code, "message": message}, "id": 1});
    (500, body.to_string())
}

/// A minimal valid `getblocktemplate` result at `height` on `prev` (64 hex digits).
pub(crate) fn template(height: u64, prev: &str) -> Value {
    json!({
        "version": 536_870_912,
        "previousblockhash": prev,
        "bits": "207fffff",
        "curtime": 1_700_000_000,
        "height": height,
        "coinbasevalue": 5_000_000_000_u64,
        "transactions": [],
    })
}

fn serve(stream: TcpStream, script: &Script) {
    let Ok(mut writer) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(stream);
    loop {
        let mut length = 0usize;
        let mut line = String::new();
        let mut first = true;
        loop {
            line.clear();
            match reader.read_line(&mut line) {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
            if first {
                first = false;
                continue;
            }
            let trimmed = line.trim_end();
            if trimmed.is_empty() {
                break;
            }
            if let Some((name, value)) = trimmed.split_once(':')
                && name.eq_ignore_ascii_case("content-length")
            {
                length = value.trim().parse().unwrap_or(0);
            }
        }
        let mut body = vec![0u8; length];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        let request: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        let method = request.get("method").and_then(Value::as_str).unwrap_or("");
        let (status, reply) = script(method);
        if status == 0 {
            return;
        }
        let head = format!(
            "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            reply.len()
        );
        if writer.write_all(head.as_bytes()).is_err() || writer.write_all(reply.as_bytes()).is_err()
        {
            return;
        }
    }
}
