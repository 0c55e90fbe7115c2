//! HTTP/1.0 GETs against a `webserver` and `/metrics` parsed with a Prometheus text parser.
#![allow(dead_code, reason = "each test file uses part of it")]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use serde_json::Value;

/// One HTTP/1.0 GET; the status code and the body.
pub(crate) fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    http(addr, "GET", path)
}

/// One HTTP/1.0 request with `method`; the status code and the body.
pub(crate) fn http(addr: SocketAddr, method: &str, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "{method} {path} HTTP/1.0\r\nHost: test\r\n\r\n").unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").expect("an HTTP response");
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("a status code");
    (status, body.to_owned())
}

/// A GET whose answer must be 200 and JSON.
pub(crate) fn get_json(addr: SocketAddr, path: &str) -> Value {
    let (status, body) = get(addr, path);
    assert_eq!(status, 200, "GET {path}: {body}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("GET {path}: {e}: {body}"))
}

/// `/metrics`, parsed.
pub(crate) fn scrape(addr: SocketAddr) -> prometheus_parse::Scrape {
    let (status, body) = get(addr, "/metrics");
    assert_eq!(status, 200, "{body}");
    if std::env::var_os("WEB_TEST_PRINT").is_some() {
        println!("{body}");
    }
    let lines = body.lines().map(|l| Ok(l.to_owned()));
    prometheus_parse::Scrape::parse(lines).expect("Prometheus text")
}

/// The value of counter or gauge `name` whose labels include all of `labels`, summed over the
/// matching samples; `None` if no sample matches.
pub(crate) fn metric(
    scrape: &prometheus_parse::Scrape,
    name: &str,
    labels: &[(&str, &str)],
) -> Option<f64> {
    let mut found = None;
    for s in scrape.samples.iter().filter(|s| s.metric == name) {
        if labels
            .iter()
            .all(|(k, v)| s.labels.get(k).is_some_and(|x| x == *v))
        {
            let (prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v)) = s.value
            else {
                panic!("{name} is not a counter or gauge")
            };
            *found.get_or_insert(0.0) += v;
        }
    }
    found
}
