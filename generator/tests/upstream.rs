#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code"
)]
//! Upstream links against in-process fake pools on 127.0.0.1.

extern crate ckpool_generator as generator;

use std::io::{BufRead, BufReader, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::stratum::passthrough::{FromDownstream, Role, decode_downstream};
use crossbeam_channel::{Receiver, Sender, unbounded};
use generator::upstream::{
    Link, LinkOwner, MinerLine, OwnedLink, PassthroughEvent, PassthroughLink, Pool, SendError,
    Submit, UpstreamConfig, UpstreamEvent, UpstreamServer, WriteError,
};
use parking_lot::Mutex;
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(10);
const AGENT: &str = concat!("ckpool-rs/", env!("CARGO_PKG_VERSION"));
const NOTIFY: &str = r#"{"params":["6b12471e00000001","8920f2a0a97a4745f626fde1d16363be31488e38cc1045d7a15e2b586932c931","01000000010000000000000000000000000000000000000000000000000000000000000000ffffffff2b016f00041e47126b0499b514010c","0a636b706f6f6c092f636170747572652fffffffff029020062a010000001600146f16fe7c495ba8261016383a1d4b5bf0e185c8510000000000000000266a24aa21a9eda912708e67fbbe78a310ff8b88066b5a04e303f9a65e31ffe15ec6f88a8d145c00000000",[],"20000000","207fffff","6b124731",true],"id":null,"method":"mining.notify"}"#;

fn init_logs() {
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter("debug")
        .try_init();
}

/// One accepted connection, driven by the test line by line.
struct Peer {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

impl Peer {
    fn accept(listener: &TcpListener) -> Self {
        listener.set_nonblocking(true).unwrap();
        let end = Instant::now() + WAIT;
        let stream = loop {
            match listener.accept() {
                Ok((s, _)) => break s,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    assert!(Instant::now() < end, "no connection");
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(e) => panic!("{e}"),
            }
        };
        stream.set_nonblocking(false).unwrap();
        stream.set_read_timeout(Some(WAIT)).unwrap();
        Self {
            reader: BufReader::new(stream.try_clone().unwrap()),
            writer: stream,
        }
    }

    fn line(&mut self) -> String {
        let mut s = String::new();
        self.reader.read_line(&mut s).expect("a line in time");
        assert!(s.ends_with('\n'), "connection ended: {s:?}");
        s.pop();
        s
    }

    fn json(&mut self) -> Value {
        serde_json::from_str(&self.line()).unwrap()
    }

    fn send(&mut self, line: &str) {
        self.writer.write_all(line.as_bytes()).unwrap();
        self.writer.write_all(b"\n").unwrap();
    }
}

fn next<E: std::fmt::Debug>(rx: &Receiver<E>) -> E {
    rx.recv_timeout(WAIT).expect("an event in time")
}

/// Skips events until one matches; panics with what came instead after `WAIT`.
fn expect<E: std::fmt::Debug>(rx: &Receiver<E>, what: &str, want: impl Fn(&E) -> bool) -> E {
    let end = Instant::now() + WAIT;
    let mut seen = Vec::new();
    loop {
        match rx.recv_deadline(end) {
            Ok(ev) if want(&ev) => return ev,
            Ok(ev) => seen.push(format!("{ev:?}")),
            Err(_) => panic!("no {what}; got {seen:#?}"),
        }
    }
}

fn server(listener: &TcpListener, auth: &str, pass: &str) -> UpstreamServer {
    UpstreamServer::new(
        format!("stratum+tcp://{}", listener.local_addr().unwrap()),
        auth,
        pass,
    )
}

fn fast(servers: Vec<UpstreamServer>) -> UpstreamConfig {
    UpstreamConfig {
        servers,
        connect_timeout: Duration::from_secs(2),
        handshake_timeout: Duration::from_secs(1),
        idle_timeout: Some(Duration::from_secs(1)),
        failback_interval: Duration::from_millis(200),
        retry_interval: Duration::from_millis(100),
        ..UpstreamConfig::default()
    }
}

/// For tests driving the pool by hand: no idle detector, a generous handshake.
fn steady(servers: Vec<UpstreamServer>) -> UpstreamConfig {
    UpstreamConfig {
        handshake_timeout: Duration::from_secs(5),
        idle_timeout: None,
        ..fast(servers)
    }
}

fn submit(tag: u64, nonce: u32) -> Submit {
    Submit::new(
        Arc::from("6b12471e00000001"),
        &[0, 0, 0, 0, 0, 0, 0, 7],
        0x6b12_4731,
        nonce,
        0x0000_2000,
        tag,
    )
    .unwrap()
}

#[test]
fn handshake_lines_jobs_and_verdicts() {
    init_logs();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let (tx, rx) = unbounded();
    let cfg = UpstreamConfig {
        version_rolling: Some(0x1fff_e000),
        extranonce_subscribe: true,
        ..steady(vec![server(&listener, "user.w", "p\"w")])
    };
    let link = Link::start(cfg.servers[0].clone(), cfg, tx).unwrap();
    let mut pool = Peer::accept(&listener);
    assert_eq!(
        pool.line(),
        r#"{"id":1,"method":"mining.configure","params":[["version-rolling"],{"version-rolling.mask":"1fffe000","version-rolling.min-bit-count":2}]}"#
    );
    pool.send(r#"{"id":1,"result":{"version-rolling":true,"version-rolling.mask":"00ffe000"},"error":null}"#);
    assert_eq!(
        pool.line(),
        format!(r#"{{"id":2,"method":"mining.subscribe","params":["{AGENT}"]}}"#)
    );
    // Refused: ckpool's retry without params.
    pool.send(r#"{"id":2,"result":null,"error":[20,"Bad agent",null]}"#);
    assert_eq!(
        pool.line(),
        r#"{"id":3,"method":"mining.subscribe","params":[]}"#
    );
    pool.send(r#"{"id":3,"result":[[["mining.notify","ab"]],"1f47126b",8],"error":null}"#);
    assert_eq!(
        pool.line(),
        r#"{"id":4,"method":"mining.authorize","params":["user.w","p\"w"]}"#
    );
    assert_eq!(
        pool.line(),
        r#"{"id":5,"method":"mining.extranonce.subscribe","params":[]}"#
    );
    pool.send(r#"{"params":[0.001],"id":null,"method":"mining.set_difficulty"}"#);
    pool.send(NOTIFY);
    // Nothing is active before the authorisation.
    assert!(rx.recv_timeout(Duration::from_millis(100)).is_err());
    pool.send(r#"{"id":4,"result":true,"error":null}"#);
    pool.send(r#"{"id":5,"result":true,"error":null}"#);
    assert!(matches!(next(&rx), UpstreamEvent::Up { index: 0, .. }));
    assert_eq!(next(&rx), UpstreamEvent::VersionRolling(Some(0x00ff_e000)));
    assert_eq!(
        next(&rx),
        UpstreamEvent::Subscribed {
            enonce1: vec![0x1f, 0x47, 0x12, 0x6b],
            nonce2len: 8
        }
    );
    assert_eq!(next(&rx), UpstreamEvent::Difficulty(0.001));
    match next(&rx) {
        UpstreamEvent::Job(job) => {
            assert_eq!(job.job_id, "6b12471e00000001");
            assert_eq!(job.ntime, 0x6b12_4731);
            assert!(job.clean);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(next(&rx), UpstreamEvent::Authorised);

    // Requests from the pool are answered; messages logged.
    pool.send(r#"{"id":"v","method":"client.get_version","params":[]}"#);
    let v = pool.json();
    assert_eq!((&v["id"], &v["result"]), (&json!("v"), &json!(AGENT)));
    pool.send(r#"{"id":9,"method":"mining.ping","params":[]}"#);
    assert_eq!(pool.json()["result"], "pong");
    pool.send(r#"{"id":null,"method":"client.show_message","params":["hello"]}"#);
    pool.send(r#"{"id":null,"method":"mining.set_extranonce","params":["aabb",4]}"#);
    assert_eq!(
        next(&rx),
        UpstreamEvent::Extranonce {
            enonce1: vec![0xaa, 0xbb],
            nonce2len: 4
        }
    );
    pool.send(r#"{"id":null,"method":"mining.set_difficulty","params":[1.5]}"#);
    assert_eq!(next(&rx), UpstreamEvent::Difficulty(1.5));

    // Submits: the version bits go (rolling was granted); verdicts come back by tag.
    link.submit(submit(100, 0xc0ee_2000)).unwrap();
    link.submit(submit(101, 0x1234_5678)).unwrap();
    assert_eq!(
        pool.line(),
        r#"{"id":6,"method":"mining.submit","params":["user.w","6b12471e00000001","0000000000000007","6b124731","c0ee2000","00002000"]}"#
    );
    assert_eq!(pool.json()["id"], 7);
    pool.send(r#"{"id":7,"result":false,"error":null,"reject-reason":"Stale"}"#);
    pool.send(r#"{"id":6,"result":true,"error":null}"#);
    assert_eq!(
        next(&rx),
        UpstreamEvent::Verdict {
            tag: 101,
            accepted: false,
            reason: Some("Stale".into())
        }
    );
    assert_eq!(
        next(&rx),
        UpstreamEvent::Verdict {
            tag: 100,
            accepted: true,
            reason: None
        }
    );
    // One in flight at shutdown is reported, not dropped.
    link.submit(submit(102, 1)).unwrap();
    pool.line();
    link.shutdown();
    assert_eq!(
        next(&rx),
        UpstreamEvent::Verdict {
            tag: 102,
            accepted: false,
            reason: Some("shutdown".into())
        }
    );
}

#[test]
fn replays_the_captured_ckpool_proxy_link() {
    init_logs();
    let capture = include_str!("../../common/tests/data/ckpool-0.9.9-proxy-upstream.jsonl");
    let records: Vec<Value> = capture
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let (tx, rx) = unbounded();
    let cfg = steady(vec![server(&listener, "capture.proxy", "x")]);
    let link = Link::start(cfg.servers[0].clone(), cfg, tx).unwrap();
    let mut pool = Peer::accept(&listener);
    // ckpool's request ids (0, 42) are ours (1, 2) here: replies are re-addressed.
    let mut ids = std::collections::HashMap::new();
    for r in &records {
        let line = r["line"].as_str().unwrap();
        let mut v: Value = serde_json::from_str(line).unwrap();
        if r["dir"] == "to_pool" {
            let ours = pool.json();
            assert_eq!(ours["method"], v["method"]);
            if v["method"] == "mining.authorize" {
                assert_eq!(ours["params"], v["params"]);
            } else {
                assert_eq!(ours["params"], json!([AGENT]));
            }
            ids.insert(v["id"].to_string(), ours["id"].clone());
        } else {
            if let Some(ours) = ids.get(&v["id"].to_string()) {
                v["id"] = ours.clone();
            }
            pool.send(&v.to_string());
        }
    }
    assert!(matches!(next(&rx), UpstreamEvent::Up { index: 0, .. }));
    assert_eq!(
        next(&rx),
        UpstreamEvent::Subscribed {
            enonce1: vec![0x1f, 0x47, 0x12, 0x6b],
            nonce2len: 8
        }
    );
    assert_eq!(next(&rx), UpstreamEvent::Difficulty(0.001));
    let mut jobs = Vec::new();
    let mut authorised = false;
    while jobs.len() < 3 {
        match next(&rx) {
            UpstreamEvent::Job(job) => jobs.push(job.job_id),
            UpstreamEvent::Authorised => authorised = true,
            other => panic!("{other:?}"),
        }
    }
    assert!(authorised);
    assert_eq!(
        jobs,
        ["6b12471e00000001", "6b12471e00000002", "6b12471e00000003"]
    );
    link.shutdown();
}

/// A scripted pool: answers the handshake and submits, sends a notify every 50 ms unless
/// `silent`; `up` false drops connections at once.
struct FakePool {
    listener_addr: String,
    up: Arc<AtomicBool>,
    silent: Arc<AtomicBool>,
    answer_submits: Arc<AtomicBool>,
    accepted: Arc<AtomicUsize>,
    conns: Arc<Mutex<Vec<TcpStream>>>,
    /// Every line received, on every connection.
    lines: Receiver<Value>,
}

impl FakePool {
    fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let listener_addr = listener.local_addr().unwrap().to_string();
        let up = Arc::new(AtomicBool::new(true));
        let silent = Arc::new(AtomicBool::new(false));
        let answer_submits = Arc::new(AtomicBool::new(true));
        let accepted = Arc::new(AtomicUsize::new(0));
        let conns = Arc::new(Mutex::new(Vec::new()));
        let (tx, lines) = unbounded();
        let pool = Self {
            listener_addr,
            up: Arc::clone(&up),
            silent: Arc::clone(&silent),
            answer_submits: Arc::clone(&answer_submits),
            accepted: Arc::clone(&accepted),
            conns: Arc::clone(&conns),
            lines,
        };
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { return };
                accepted.fetch_add(1, Ordering::SeqCst);
                if !up.load(Ordering::SeqCst) {
                    let _ = stream.shutdown(Shutdown::Both);
                    continue;
                }
                conns.lock().push(stream.try_clone().unwrap());
                let (silent, answer, tx) =
                    (Arc::clone(&silent), Arc::clone(&answer_submits), tx.clone());
                std::thread::spawn(move || serve(stream, &silent, &answer, &tx));
            }
        });
        pool
    }

    fn server(&self) -> UpstreamServer {
        UpstreamServer::new(self.listener_addr.clone(), "u", "x")
    }

    /// Closes every connection and refuses new ones.
    fn kill(&self) {
        self.up.store(false, Ordering::SeqCst);
        for c in self.conns.lock().drain(..) {
            let _ = c.shutdown(Shutdown::Both);
        }
    }

    /// Writes `line` on every live connection.
    fn broadcast(&self, line: &str) {
        for c in self.conns.lock().iter_mut() {
            let _ = c.write_all(format!("{line}\n").as_bytes());
        }
    }

    fn expect_line(&self, want: impl Fn(&Value) -> bool) -> Value {
        let end = Instant::now() + WAIT;
        loop {
            let v = self.lines.recv_deadline(end).expect("the line in time");
            if want(&v) {
                return v;
            }
        }
    }
}

fn serve(stream: TcpStream, silent: &Arc<AtomicBool>, answer: &AtomicBool, tx: &Sender<Value>) {
    let mut writer = stream.try_clone().unwrap();
    let ticker = {
        let mut w = stream.try_clone().unwrap();
        let silent = Arc::clone(silent);
        std::thread::spawn(move || {
            loop {
                std::thread::sleep(Duration::from_millis(50));
                if !silent.load(Ordering::SeqCst)
                    && w.write_all(format!("{NOTIFY}\n").as_bytes()).is_err()
                {
                    return;
                }
            }
        })
    };
    let reader = BufReader::new(stream);
    for line in reader.lines() {
        let Ok(line) = line else { break };
        let Ok(v) = serde_json::from_str::<Value>(&line) else {
            continue;
        };
        let _ = tx.send(v.clone());
        if silent.load(Ordering::SeqCst) {
            continue;
        }
        let id = &v["id"];
        let reply = match v["method"].as_str().unwrap_or_default() {
            "mining.subscribe" => {
                json!({"id": id, "result": [[["mining.notify", "ab"]], "0a0b0c0d", 8], "error": null})
            }
            "mining.authorize" if v["params"][1] == "bad" => {
                json!({"id": id, "result": false, "error": [24, "Unauthorized worker", null]})
            }
            "mining.authorize" => json!({"id": id, "result": true, "error": null}),
            "mining.submit" if answer.load(Ordering::SeqCst) => {
                json!({"id": id, "result": true, "error": null})
            }
            _ => continue,
        };
        if writer.write_all(format!("{reply}\n").as_bytes()).is_err() {
            break;
        }
    }
    drop(ticker);
}

#[test]
fn fails_over_and_back_and_reports_lost_submits() {
    init_logs();
    let (a, b) = (FakePool::start(), FakePool::start());
    let (tx, rx) = unbounded();
    let pool = Pool::start(fast(vec![a.server(), b.server()]), tx).unwrap();
    expect(&rx, "Up 0", |e| {
        matches!(e, UpstreamEvent::Up { index: 0, .. })
    });
    expect(&rx, "a job", |e| matches!(e, UpstreamEvent::Job(_)));

    // A stops sending (its socket stays open): down after idle_timeout, over to B.
    a.silent.store(true, Ordering::SeqCst);
    let down = expect(&rx, "Down 0", |e| matches!(e, UpstreamEvent::Down { .. }));
    assert!(
        matches!(&down, UpstreamEvent::Down { index: 0, reason } if reason.starts_with("no line")),
        "{down:?}"
    );
    expect(&rx, "Up 1", |e| {
        matches!(e, UpstreamEvent::Up { index: 1, .. })
    });
    // A silent A is probed and fails its handshake; B stays.
    expect(&rx, "failed probe of A", |e| {
        matches!(e, UpstreamEvent::Failed { index: 0, .. })
    });

    // A submit B never answers is in flight when A comes back.
    b.answer_submits.store(false, Ordering::SeqCst);
    pool.submit(submit(7, 1)).unwrap();
    b.expect_line(|v| v["method"] == "mining.submit");
    a.silent.store(false, Ordering::SeqCst);
    let lost = expect(&rx, "the lost verdict", |e| {
        matches!(e, UpstreamEvent::Verdict { .. } | UpstreamEvent::Up { .. })
    });
    assert_eq!(
        lost,
        UpstreamEvent::Verdict {
            tag: 7,
            accepted: false,
            reason: Some("upstream switched".into())
        }
    );
    expect(&rx, "Up 0 again", |e| {
        matches!(e, UpstreamEvent::Up { index: 0, .. })
    });
    // Submits go to A now and are answered.
    pool.submit(submit(8, 2)).unwrap();
    assert_eq!(
        expect(&rx, "verdict 8", |e| matches!(
            e,
            UpstreamEvent::Verdict { .. }
        )),
        UpstreamEvent::Verdict {
            tag: 8,
            accepted: true,
            reason: None
        }
    );

    // A closes its connections and refuses new ones: down at once, over to B.
    a.kill();
    let down = expect(&rx, "Down 0", |e| matches!(e, UpstreamEvent::Down { .. }));
    assert!(
        matches!(down, UpstreamEvent::Down { index: 0, .. }),
        "{down:?}"
    );
    expect(&rx, "Up 1", |e| {
        matches!(e, UpstreamEvent::Up { index: 1, .. })
    });

    // B too: no link; a submit now is lost at once, never dropped.
    b.kill();
    expect(&rx, "Down 1", |e| {
        matches!(e, UpstreamEvent::Down { index: 1, .. })
    });
    pool.submit(submit(9, 3)).unwrap();
    assert_eq!(
        expect(&rx, "verdict 9", |e| matches!(
            e,
            UpstreamEvent::Verdict { .. }
        )),
        UpstreamEvent::Verdict {
            tag: 9,
            accepted: false,
            reason: Some("upstream down".into())
        }
    );
    pool.shutdown();
}

#[test]
fn refused_authorisation_fails_over() {
    init_logs();
    let (a, b) = (FakePool::start(), FakePool::start());
    let bad = UpstreamServer::new(a.listener_addr.clone(), "u", "bad");
    let (tx, rx) = unbounded();
    let pool = Pool::start(fast(vec![bad, b.server()]), tx).unwrap();
    // The first event: the refusal (no Failed, no Up before it).
    assert_eq!(
        next(&rx),
        UpstreamEvent::Refused {
            index: 0,
            reason: "Unauthorized worker".to_owned()
        }
    );
    expect(&rx, "Up 1", |e| {
        matches!(e, UpstreamEvent::Up { index: 1, .. })
    });
    pool.shutdown();
}

#[test]
fn reconnect_policy() {
    init_logs();
    let (a, b) = (FakePool::start(), FakePool::start());
    let (tx, rx) = unbounded();
    // Only A is configured; B listens on the same host, so it is a listed host.
    // "localhost" is not a configured host: only the allow-list lets it in.
    let cfg = UpstreamConfig {
        reconnect_allow: vec!["localhost".to_owned()],
        ..fast(vec![a.server()])
    };
    let pool = Pool::start(cfg, tx).unwrap();
    expect(&rx, "Up 0", |e| {
        matches!(e, UpstreamEvent::Up { index: 0, .. })
    });

    a.broadcast(r#"{"id":null,"method":"client.reconnect","params":["evil.example",3333,0]}"#);
    assert_eq!(
        expect(&rx, "refused reconnect", |e| {
            matches!(e, UpstreamEvent::Reconnect { .. })
        }),
        UpstreamEvent::Reconnect {
            host: Some("evil.example".to_owned()),
            port: Some(3333),
            honoured: false
        }
    );
    let b_port: u16 = b.listener_addr.rsplit_once(':').unwrap().1.parse().unwrap();
    a.broadcast(&format!(
        r#"{{"id":null,"method":"client.reconnect","params":["127.0.0.1",{b_port},0]}}"#
    ));
    // Nothing went down for the refused one: the next Down is the honoured one's.
    let mut seen = Vec::new();
    loop {
        match next(&rx) {
            UpstreamEvent::Down { index: 0, reason } => {
                assert_eq!(reason, "client.reconnect");
                break;
            }
            UpstreamEvent::Reconnect { honoured, .. } => seen.push(honoured),
            UpstreamEvent::Job(_) => {}
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(seen, [true]);
    expect(&rx, "Up 0 (at B)", |e| {
        matches!(e, UpstreamEvent::Up { index: 0, .. })
    });
    b.expect_line(|v| v["method"] == "mining.authorize");
    assert_eq!(b.accepted.load(Ordering::SeqCst), 1);

    // An allowed host (case aside) is honoured too: back to A by the name "LocalHost".
    let a_port: u16 = a.listener_addr.rsplit_once(':').unwrap().1.parse().unwrap();
    b.broadcast(&format!(
        r#"{{"id":null,"method":"client.reconnect","params":["LocalHost","{a_port}"]}}"#
    ));
    assert_eq!(
        expect(&rx, "allowed reconnect", |e| {
            matches!(e, UpstreamEvent::Reconnect { .. })
        }),
        UpstreamEvent::Reconnect {
            host: Some("LocalHost".to_owned()),
            port: Some(a_port),
            honoured: true
        }
    );
    expect(&rx, "Up 0 (at A)", |e| {
        matches!(e, UpstreamEvent::Up { index: 0, .. })
    });
    // The Up came from a second connection to A.
    assert_eq!(a.accepted.load(Ordering::SeqCst), 2);
    pool.shutdown();
}

fn passthrough_cfg(servers: Vec<UpstreamServer>) -> UpstreamConfig {
    UpstreamConfig {
        user_agent: "ckpool/0.9.9".to_owned(),
        // ckpool's handshake, byte for byte.
        multicast: false,
        ..steady(servers)
    }
}

#[test]
fn passthrough_handshake_routing_and_failover() {
    init_logs();
    let first = TcpListener::bind("127.0.0.1:0").unwrap();
    let second = TcpListener::bind("127.0.0.1:0").unwrap();
    let (tx, rx) = unbounded();
    let cfg = passthrough_cfg(vec![server(&first, "", ""), server(&second, "", "")]);
    let link = PassthroughLink::start(cfg, Role::Passthrough, tx).unwrap();
    let mut up = Peer::accept(&first);
    assert_eq!(
        up.line(),
        r#"{"method": "mining.passthrough", "params": ["ckpool\/0.9.9"]}"#
    );
    assert!(rx.recv_timeout(Duration::from_millis(100)).is_err());
    up.send(r#"{"result":true}"#);
    assert!(matches!(next(&rx), PassthroughEvent::Up { index: 0, .. }));

    // The captured ckpool passthrough link, both ways, byte for byte.
    let capture = include_str!("../../common/tests/data/ckpool-0.9.9-passthrough-link.jsonl");
    let mut client_lines = 0;
    for record in capture.lines().skip(2) {
        let r: Value = serde_json::from_str(record).unwrap();
        let line = r["line"].as_str().unwrap();
        if r["dir"] == "to_pool" {
            let mut miner = Vec::new();
            let cmd = match decode_downstream(line.as_bytes(), &mut miner) {
                FromDownstream::Miner {
                    client_id,
                    address,
                    server,
                } => {
                    miner.pop();
                    MinerLine::Line {
                        client_id,
                        address: Arc::from(address.unwrap()),
                        server: server.unwrap(),
                        line: miner,
                    }
                }
                FromDownstream::Term { client_id } => MinerLine::Term {
                    client_id,
                    address: Arc::from("127.0.0.1"),
                    server: 0,
                },
                other => panic!("{other:?}"),
            };
            link.send(cmd).unwrap();
            assert_eq!(up.line(), line);
        } else {
            up.send(line);
            let v: Value = serde_json::from_str(line).unwrap();
            match next(&rx) {
                PassthroughEvent::Client { client_id, line } => {
                    assert_eq!(json!(client_id), v["client_id"]);
                    let mut want = v.clone();
                    want.as_object_mut().unwrap().remove("client_id");
                    want.as_object_mut().unwrap().remove("node.method");
                    assert_eq!(line.last(), Some(&b'\n'));
                    assert_eq!(serde_json::from_slice::<Value>(&line).unwrap(), want);
                    client_lines += 1;
                }
                other => panic!("{other:?}"),
            }
        }
    }
    assert!(client_lines > 20, "{client_lines}");

    // dropclient=N is data; the link goes on.
    up.send("dropclient=3");
    let ev = next(&rx);
    assert_eq!(
        ev,
        PassthroughEvent::Text {
            line: b"dropclient=3".to_vec()
        }
    );
    assert_eq!(ev.dropclient(), Some(3));
    up.send(r#"{"node.method":"workinfo","jobid":1}"#);
    assert_eq!(
        next(&rx),
        PassthroughEvent::Link {
            line: br#"{"node.method":"workinfo","jobid":1}"#.to_vec()
        }
    );
    link.send(MinerLine::Term {
        client_id: 3,
        address: Arc::from("10.1.2.3"),
        server: 1,
    })
    .unwrap();
    assert_eq!(
        up.line(),
        r#"{"id":42,"client_id":3,"address":"10.1.2.3","server":1,"method":"mining.term","params":[]}"#
    );

    // The first upstream goes: Down, then Up on the second for the owner to replay its miners.
    drop(first);
    up.writer.shutdown(Shutdown::Both).unwrap();
    assert!(matches!(next(&rx), PassthroughEvent::Down { index: 0, .. }));
    let mut second_up = Peer::accept(&second);
    assert_eq!(
        second_up.line(),
        r#"{"method": "mining.passthrough", "params": ["ckpool\/0.9.9"]}"#
    );
    second_up.send(r#"{"result":true}"#);
    expect(&rx, "Up 1", |e| {
        matches!(e, PassthroughEvent::Up { index: 1, .. })
    });
    link.shutdown();
}

/// A handover of a passthrough link (`-H`): the paused link gives its socket and the bytes it
/// read of the next line; a link started on them sends no handshake and no `Up`, reads nothing
/// until resumed, then completes that line; the upstream sees one connection throughout, and
/// the released old link does not close it. A pause can also be taken back (resume).
#[test]
fn passthrough_link_pauses_and_is_adopted_on_the_same_connection() {
    init_logs();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let (tx, rx) = unbounded();
    let link = PassthroughLink::start(
        passthrough_cfg(vec![server(&listener, "", "")]),
        Role::Passthrough,
        tx,
    )
    .unwrap();
    let mut up = Peer::accept(&listener);
    up.line();
    up.send(r#"{"result":true}"#);
    assert!(matches!(next(&rx), PassthroughEvent::Up { index: 0, .. }));

    // A pause taken back: the link reads again.
    let first = link.pause(Instant::now() + WAIT).recv().unwrap().unwrap();
    assert_eq!(first.index, 0);
    drop(first);
    link.resume();
    up.send(r#"{"client_id":5,"id":1,"result":true}"#);
    expect(&rx, "a line for client 5", |e| {
        matches!(e, PassthroughEvent::Client { client_id: 5, .. })
    });

    // A line and the start of the next before the pause: the whole line is an event, the start
    // travels.
    up.send(r#"{"client_id":6,"id":2,"result":true}"#);
    up.writer.write_all(br#"{"client_id":7,"id""#).unwrap();
    let answer = link.pause(Instant::now() + WAIT);
    expect(&rx, "the line before the pause", |e| {
        matches!(e, PassthroughEvent::Client { client_id: 6, .. })
    });
    let handed = answer.recv_timeout(WAIT).unwrap().unwrap();
    // What the reader had of the next line travels (the rest is still in the socket).
    assert!(
        br#"{"client_id":7,"id""#.starts_with(&handed.partial),
        "{:?}",
        String::from_utf8_lossy(&handed.partial)
    );
    let (tx2, rx2) = unbounded();
    let adopted = PassthroughLink::start_adopted(
        passthrough_cfg(vec![server(&listener, "", "")]),
        Role::Passthrough,
        tx2,
        handed,
    )
    .unwrap();
    link.release();
    // The released link sends nothing more.
    let late = MinerLine::Term {
        client_id: 1,
        address: Arc::from("10.0.0.1"),
        server: 0,
    };
    assert!(matches!(link.send(late), Err(SendError::Closed(_))));
    up.writer.write_all(b":3,\"result\":true}\n").unwrap();
    // Nothing is read before the resume.
    assert!(rx2.recv_timeout(Duration::from_millis(300)).is_err());
    adopted.resume();
    let ev = next(&rx2);
    assert_eq!(
        ev,
        PassthroughEvent::Client {
            client_id: 7,
            line: b"{\"id\":3,\"result\":true}\n".to_vec()
        },
        "{ev:?}"
    );
    // Lines go up on the same connection, with no new handshake.
    adopted
        .send(MinerLine::Term {
            client_id: 7,
            address: Arc::from("10.0.0.1"),
            server: 0,
        })
        .unwrap();
    let v = up.json();
    assert_eq!(v["method"], "mining.term", "{v}");
    assert_eq!(v["client_id"], 7, "{v}");
    // No other connection was made.
    listener.set_nonblocking(true).unwrap();
    assert!(listener.accept().is_err());
    adopted.shutdown();
}

/// Direct writes (`PassthroughLink::write`) from two threads at once to an upstream that does
/// not read: once the socket is full the rest waits for the link's engine, and past its bound
/// `write` says `Full` (nothing of that call is taken). The writers go on (retrying) while the
/// upstream reads again: it gets every line, whole, and each writer's in the order written
/// (no direct write slips in while the engine has bytes left to write).
#[test]
fn owned_link_direct_writes_keep_lines_whole_and_in_order_under_backpressure() {
    const LINES: u64 = 16_000;
    init_logs();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let (tx, rx) = unbounded();
    // The owner keeps the connection (and reads nothing: the upstream sends nothing more).
    let (owned_tx, owned) = unbounded::<OwnedLink>();
    let owner: LinkOwner = Arc::new(move |l: OwnedLink| {
        let _ = owned_tx.send(l);
    });
    let link = Arc::new(
        PassthroughLink::start_owned(
            passthrough_cfg(vec![server(&listener, "", "")]),
            Role::Passthrough,
            tx,
            owner,
            None,
        )
        .unwrap(),
    );
    let mut up = Peer::accept(&listener);
    up.line();
    // Nothing may be written directly before the link is up.
    assert_eq!(link.write(b"{}\n", Duration::ZERO), Err(WriteError::NoLink));
    up.send(r#"{"result":true}"#);
    assert!(matches!(next(&rx), PassthroughEvent::Up { index: 0, .. }));
    let _held = owned
        .recv_timeout(WAIT)
        .expect("the owner gets the connection");

    // Each writer says once whether it was pushed back before it had written everything.
    let (pushed_tx, pushed) = unbounded::<bool>();
    let pad = "x".repeat(1000);
    let writers: Vec<_> = (0..2u64)
        .map(|t| {
            let (link, pad, pushed_tx) = (Arc::clone(&link), pad.clone(), pushed_tx.clone());
            std::thread::spawn(move || {
                let mut n = 0u64;
                let mut told = false;
                while n < LINES {
                    let mut batch = Vec::new();
                    for i in n..n + 16 {
                        batch.extend_from_slice(
                            format!("{{\"t\":{t},\"n\":{i},\"pad\":\"{pad}\"}}\n").as_bytes(),
                        );
                    }
                    match link.write(&batch, Duration::from_millis(100)) {
                        Ok(()) => n += 16,
                        Err(e) => {
                            assert_eq!(e, WriteError::Full);
                            if !told {
                                told = true;
                                pushed_tx.send(true).unwrap();
                            }
                        }
                    }
                }
                if !told {
                    pushed_tx.send(false).unwrap();
                }
            })
        })
        .collect();
    for _ in 0..2 {
        assert!(
            pushed.recv_timeout(WAIT).unwrap(),
            "an upstream that does not read must push back"
        );
    }
    // Now it reads, while the writers go on.
    let mut next_n = [0u64; 2];
    for _ in 0..2 * LINES {
        let v = up.json();
        let t = usize::try_from(v["t"].as_u64().unwrap()).unwrap();
        assert_eq!(v["n"].as_u64(), Some(next_n[t]), "writer {t} out of order");
        assert_eq!(v["pad"].as_str().map(str::len), Some(1000));
        next_n[t] += 1;
    }
    for w in writers {
        w.join().unwrap();
    }
    // And the link is fine: more goes through.
    link.write(b"{\"t\":0,\"n\":-1}\n", WAIT).unwrap();
    assert_eq!(up.json()["n"], -1);
    Arc::try_unwrap(link).unwrap().shutdown();
}

#[test]
fn node_handshake() {
    init_logs();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let (tx, rx) = unbounded();
    let link = PassthroughLink::start(
        passthrough_cfg(vec![server(&listener, "", "")]),
        Role::Node,
        tx,
    )
    .unwrap();
    let mut up = Peer::accept(&listener);
    assert_eq!(
        up.line(),
        r#"{"method": "mining.node", "params": ["ckpool\/0.9.9"]}"#
    );
    // Anything but {"result":true} fails the handshake.
    up.send(r#"{"result":false}"#);
    assert!(matches!(
        next(&rx),
        PassthroughEvent::Failed { index: 0, .. }
    ));
    link.shutdown();
}

/// A ckpool pool may send a node its transactions before the handshake's `{"result":true}`
/// (ckpool-lhr does: its stratifier and connector race). The node link takes them, comes up at
/// the answer and hands them on after its `Up`, in order; a passthrough link does not.
#[test]
fn node_messages_before_the_handshake_answer_are_kept_in_order() {
    init_logs();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let (tx, rx) = unbounded();
    let link = PassthroughLink::start(
        passthrough_cfg(vec![server(&listener, "", "")]),
        Role::Node,
        tx,
    )
    .unwrap();
    let mut up = Peer::accept(&listener);
    up.line();
    let early = r#"{"node.method":"transactions","transaction":[]}"#;
    up.send(early);
    up.send(r#"{"result":true}"#);
    let after = r#"{"node.method":"workinfo","jobid":1}"#;
    up.send(after);
    assert!(matches!(next(&rx), PassthroughEvent::Up { index: 0, .. }));
    assert_eq!(
        next(&rx),
        PassthroughEvent::Link {
            line: early.as_bytes().to_vec()
        }
    );
    assert_eq!(
        next(&rx),
        PassthroughEvent::Link {
            line: after.as_bytes().to_vec()
        }
    );
    link.shutdown();

    // A passthrough link still wants the answer first.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let (tx, rx) = unbounded();
    let link = PassthroughLink::start(
        passthrough_cfg(vec![server(&listener, "", "")]),
        Role::Passthrough,
        tx,
    )
    .unwrap();
    let mut up = Peer::accept(&listener);
    up.line();
    up.send(early);
    assert!(matches!(
        next(&rx),
        PassthroughEvent::Failed { index: 0, .. }
    ));
    link.shutdown();
}

#[test]
fn passthrough_back_pressure_is_bounded() {
    init_logs();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let (tx, rx) = unbounded();
    let cfg = UpstreamConfig {
        queue: 16,
        ..passthrough_cfg(vec![server(&listener, "", "")])
    };
    let link = PassthroughLink::start(cfg, Role::Passthrough, tx).unwrap();
    let mut up = Peer::accept(&listener);
    up.line();
    up.send(r#"{"result":true}"#);
    assert!(matches!(next(&rx), PassthroughEvent::Up { .. }));
    // The upstream never reads again.
    let filler = "f".repeat(64 * 1024);
    let line = format!(r#"{{"id":4,"method":"mining.submit","params":["{filler}"]}}"#).into_bytes();
    let end = Instant::now() + Duration::from_secs(30);
    let mut accepted_bytes = 0usize;
    loop {
        assert!(Instant::now() < end, "never Full");
        let cmd = MinerLine::Line {
            client_id: 1,
            address: Arc::from("10.0.0.1"),
            server: 0,
            line: line.clone(),
        };
        match link.send(cmd) {
            Ok(()) => accepted_bytes += line.len(),
            Err(SendError::Full(MinerLine::Line { line: back, .. })) => {
                assert_eq!(back, line, "the line comes back");
                break;
            }
            Err(e) => panic!("{e:?}"),
        }
    }
    assert!(link.queued() <= 16);
    // Bounded: the queue, one write batch and the kernel's socket buffers.
    assert!(
        accepted_bytes < 96 << 20,
        "{} MiB taken before Full",
        accepted_bytes >> 20
    );
    let stopping = Instant::now();
    drop(up);
    link.shutdown();
    assert!(stopping.elapsed() < Duration::from_secs(35));
}

#[test]
fn a_stalled_owner_does_not_hang_shutdown() {
    init_logs();
    let a = FakePool::start();
    // Room for one event; nobody reads: the link blocks on its second event (and stops
    // reading from the pool) until it is shut down.
    let (tx, rx) = crossbeam_channel::bounded(1);
    let pool = Pool::start(fast(vec![a.server()]), tx).unwrap();
    let end = Instant::now() + WAIT;
    while !rx.is_full() {
        assert!(Instant::now() < end, "no event");
        std::thread::sleep(Duration::from_millis(10));
    }
    let stopping = Instant::now();
    pool.shutdown();
    assert!(
        stopping.elapsed() < Duration::from_secs(2),
        "{:?}",
        stopping.elapsed()
    );
    assert!(matches!(next(&rx), UpstreamEvent::Up { index: 0, .. }));
}

#[test]
fn submits_carry_at_most_sixteen_bytes_of_extranonce2() {
    let job: Arc<str> = Arc::from("j");
    let s = Submit::new(Arc::clone(&job), &[1; 16], 0, 0, 0, 1).unwrap();
    assert_eq!(s.extranonce2(), &[1; 16]);
    assert!(Submit::new(job, &[1; 17], 0, 0, 0, 1).is_none());
}

/// A listener whose accept queue is full and never drained: connects to it hang (SYNs are
/// dropped), like a black-holed server. `None` if the queue does not fill here.
fn black_hole() -> Option<(TcpListener, Vec<TcpStream>)> {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let mut held = Vec::new();
    for _ in 0..4096 {
        match TcpStream::connect_timeout(&addr, Duration::from_millis(200)) {
            Ok(s) => held.push(s),
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => return Some((listener, held)),
            Err(_) => return None,
        }
    }
    None
}

#[test]
fn probing_a_black_holed_server_does_not_stall_submits() {
    init_logs();
    let Some((hole, _held)) = black_hole() else {
        eprintln!("skipped: the accept queue never filled");
        return;
    };
    let (b, c) = (FakePool::start(), FakePool::start());
    let (tx, rx) = unbounded();
    let connect_timeout = Duration::from_secs(4);
    let cfg = UpstreamConfig {
        connect_timeout,
        ..fast(vec![server(&hole, "u", "x"), b.server(), c.server()])
    };
    let pool = Pool::start(cfg, tx).unwrap();
    let failed = expect(&rx, "Failed 0", |e| {
        matches!(e, UpstreamEvent::Failed { .. })
    });
    assert!(
        matches!(&failed, UpstreamEvent::Failed { index: 0, reason } if reason.starts_with("connect to")),
        "{failed:?}"
    );
    expect(&rx, "Up 1", |e| {
        matches!(e, UpstreamEvent::Up { index: 1, .. })
    });
    // Probes of server 0 hang in connect for `connect_timeout` each, every 200 ms; meanwhile
    // submits on server 1 are answered at loopback speed.
    for tag in 0..6 {
        let sent = Instant::now();
        pool.submit(submit(tag, 1)).unwrap();
        let verdict = expect(&rx, "a verdict", |e| {
            matches!(e, UpstreamEvent::Verdict { .. })
        });
        assert_eq!(
            verdict,
            UpstreamEvent::Verdict {
                tag,
                accepted: true,
                reason: None
            }
        );
        assert!(sent.elapsed() < connect_timeout / 2, "{:?}", sent.elapsed());
        // Spread the submits over several probes.
        std::thread::sleep(Duration::from_millis(300));
    }
    // Server 1 dies while a probe of server 0 hangs: failover to server 2 does not wait for
    // the probe.
    b.kill();
    expect(&rx, "Down 1", |e| {
        matches!(e, UpstreamEvent::Down { index: 1, .. })
    });
    let down = Instant::now();
    expect(&rx, "Up 2", |e| {
        matches!(e, UpstreamEvent::Up { index: 2, .. })
    });
    assert!(down.elapsed() < connect_timeout / 2, "{:?}", down.elapsed());
    pool.shutdown();
}

#[test]
fn an_endless_line_takes_the_link_down() {
    init_logs();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let (tx, rx) = unbounded();
    let cfg = steady(vec![server(&listener, "u", "x")]);
    let link = Link::start(cfg.servers[0].clone(), cfg, tx).unwrap();
    let mut pool = Peer::accept(&listener);
    let id = pool.json()["id"].clone();
    pool.send(&json!({"id": id, "result": [[], "00", 4], "error": null}).to_string());
    let id = pool.json()["id"].clone();
    pool.send(&json!({"id": id, "result": true, "error": null}).to_string());
    assert!(matches!(next(&rx), UpstreamEvent::Up { index: 0, .. }));
    // 17 MiB without a newline: over the 16 MiB a line may have.
    let chunk = vec![b'x'; 1 << 20];
    for _ in 0..17 {
        if pool.writer.write_all(&chunk).is_err() {
            break;
        }
    }
    let down = expect(&rx, "Down", |e| matches!(e, UpstreamEvent::Down { .. }));
    assert_eq!(
        down,
        UpstreamEvent::Down {
            index: 0,
            reason: "line too long".to_owned()
        }
    );
    link.shutdown();
}

/// A handover of a stratum link (`-H`, proxy modes): the paused link gives its socket, the
/// bytes of the next line and its client state; a link started on them sends no configure,
/// subscribe or authorize and no `Up`, matches the verdict of a submit sent before the switch
/// to its tag, submits with the next request id and the negotiated version bits, and the
/// upstream sees one connection throughout.
#[test]
fn stratum_link_pauses_and_is_adopted_with_its_pending_submits() {
    init_logs();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let (tx, rx) = unbounded();
    let cfg = UpstreamConfig {
        version_rolling: Some(0x1fff_e000),
        ..steady(vec![server(&listener, "user.w", "x")])
    };
    let link = Pool::start(cfg.clone(), tx).unwrap();
    let mut up = Peer::accept(&listener);
    assert_eq!(up.json()["method"], "mining.configure");
    up.send(r#"{"id":1,"result":{"version-rolling":true,"version-rolling.mask":"00ffe000"},"error":null}"#);
    assert_eq!(up.json()["method"], "mining.subscribe");
    up.send(r#"{"id":2,"result":[[["mining.notify","ab"]],"1f47126b",8],"error":null}"#);
    assert_eq!(up.json()["method"], "mining.authorize");
    up.send(r#"{"id":3,"result":true,"error":null}"#);
    up.send(NOTIFY);
    expect(&rx, "the link up", |e| {
        matches!(e, UpstreamEvent::Up { .. })
    });
    expect(&rx, "the job", |e| matches!(e, UpstreamEvent::Job(_)));

    // A pause taken back: the link reads again.
    let first = link.pause(Instant::now() + WAIT).recv().unwrap().unwrap();
    assert!(!first.session.is_empty());
    drop(first);
    link.resume();
    up.send(r#"{"id":null,"method":"mining.set_difficulty","params":[2]}"#);
    assert_eq!(next(&rx), UpstreamEvent::Difficulty(2.0));

    // Two submits in flight; one answered before the pause, the other after the switch.
    link.submit(submit(200, 1)).unwrap();
    link.submit(submit(201, 2)).unwrap();
    assert_eq!(up.json()["id"], 4);
    assert_eq!(up.json()["id"], 5);
    up.send(r#"{"id":4,"result":true,"error":null}"#);
    // (Waited for before the pause: a line still in the socket at the pause is the adopting
    // side's to read, which would be right too, but is not what this part tests.)
    let v = expect(&rx, "the verdict before the pause", |e| {
        matches!(e, UpstreamEvent::Verdict { .. })
    });
    assert_eq!(
        v,
        UpstreamEvent::Verdict {
            tag: 200,
            accepted: true,
            reason: None
        }
    );
    up.writer.write_all(br#"{"id":5,"res"#).unwrap();
    let answer = link.pause(Instant::now() + WAIT);
    let handed = answer.recv_timeout(WAIT).unwrap().unwrap();
    assert!(br#"{"id":5,"res"#.starts_with(&handed.partial));
    let (tx2, rx2) = unbounded();
    let adopted = Pool::start_adopted(cfg, tx2, handed).unwrap();
    link.release();
    assert!(matches!(
        link.submit(submit(300, 3)),
        Err(SendError::Closed(_))
    ));
    up.writer
        .write_all(b"ult\":false,\"error\":null,\"reject-reason\":\"Stale\"}\n")
        .unwrap();
    // Nothing is read before the resume.
    assert!(rx2.recv_timeout(Duration::from_millis(300)).is_err());
    adopted.resume();
    assert_eq!(
        next(&rx2),
        UpstreamEvent::Verdict {
            tag: 201,
            accepted: false,
            reason: Some("Stale".into())
        }
    );
    // The next submit goes on the same connection, no handshake before it, with the next id
    // and the version bits negotiated before the switch.
    adopted.submit(submit(202, 0xc0ee_2000)).unwrap();
    assert_eq!(
        up.line(),
        r#"{"id":6,"method":"mining.submit","params":["user.w","6b12471e00000001","0000000000000007","6b124731","c0ee2000","00002000"]}"#
    );
    up.send(r#"{"id":6,"result":true,"error":null}"#);
    assert_eq!(
        next(&rx2),
        UpstreamEvent::Verdict {
            tag: 202,
            accepted: true,
            reason: None
        }
    );
    listener.set_nonblocking(true).unwrap();
    assert!(listener.accept().is_err());
    adopted.shutdown();
}
